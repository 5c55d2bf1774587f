"""The interface every backend implements: what ``engine.run_cases`` steps and reads.

A backend (``numpy_backend``, ``torch_stack``) turns a unit of cases that share their draws into a
``Unit``; the engine draws each layer's weights once, rounds them once per format, calls ``step``
on every unit, then reads each case's results through its ``CaseChain`` view. Only the draws, the
event logic (``stats``) and the result model are shared: a backend computes its own statistics.
"""

from __future__ import annotations

from typing import Protocol

import numpy as _np

from ..formats import Format
from ..spec import Case

__all__ = ["Unit", "CaseChain"]


class CaseChain(Protocol):
    """One case of a unit, as ``engine._finish`` reads it."""

    case: Case
    fmt: Format

    def run_backward(self, g64: _np.ndarray) -> None:
        """Backpropagate loss = sum(post_depth * g) * loss_scale from the float64 seed gradient g
        (the unit may run it once for all its cases)."""

    def columns(self, kind: str) -> dict:
        """Per-layer statistics of ``kind`` (pre, post, grad, grad_pre, wgrad; for a scaled format
        also gemm_in, gemm_w, grad_gemm_in with ``quantize.GEMM_STATS``): stat name -> float64
        array of depth values, or None where the statistic is not available."""

    def input_columns(self) -> dict:
        """The rounded input's statistics: stat name -> float (or None)."""

    def rel_error_values(self) -> list | None:
        """Per-layer relative RMS error against the fp64 shadow chain, or None (not asked for)."""


class Unit(Protocol):
    """Cases stepped together through one group's layers (all of one format)."""

    cases: list[Case]
    fmt: Format
    views: list[CaseChain]

    def step(self, layer: int, w: _np.ndarray, b: _np.ndarray | None) -> None:
        """Advance layer ``layer`` (1-based) with W_l (out, in) and b_l already rounded to the
        format (numpy arrays of the format's dtype)."""
