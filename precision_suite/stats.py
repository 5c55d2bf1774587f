"""Event detection over per-layer statistics: the one piece of logic every backend shares.

Backends reduce tensors to the statistics named in ``STAT_NAMES`` with their own array code; this
module turns the per-layer numbers into events (docs/definitions.md#events). Layers are numbered
1..depth; which event is a pass's failure is ``verdicts.pass_failure``'s decision.

Forward events are the *first* layer (lowest number) where the event shows on pre **or** post.
Backward events are the first in backward order: the *highest* layer where it shows on grad,
grad_pre or wgrad. A stat that is not available (fp64 has no wider format) is ``None`` and its
events are ``None``.

Scaled formats (docs/scaled-formats.md) add the quantized matmul inputs: ``gemm_in`` and ``gemm_w``
forward, ``grad_gemm_in`` backward. They count for overflow, NaN and underflow (their element
format's subnormals are by design, so not for ``first_subnormal``), and their flush fraction gives
the warning ``first_flush`` (``gemm_in`` forward, ``grad_gemm_in`` backward).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as _np

from .verdicts import pass_failure

__all__ = ["STAT_NAMES", "GRAD_EXTRA_STATS", "Events", "forward_events", "backward_events", "EVENT_NAMES"]

STAT_NAMES = ("rms", "mean", "std", "amax", "amin_nonzero", "zero_frac", "underflow_frac", "flush_frac",
              "overflow_frac", "subnormal_frac", "inf_frac", "nan_frac", "saturated_frac")
# gradients also carry, for the loss-scale advice (loss_scale.loss_scale_advice), two numbers of the
# exact (wide) values: exact_amax = max |exact|, and exact_q = the (m+1)-th smallest nonzero |exact|
# with m = ceil(threshold * n) - 1 (inf when fewer are nonzero). Scaling by S keeps the underflow
# fraction below the threshold iff S * exact_q > smallest_subnormal / 2.
GRAD_EXTRA_STATS = ("exact_amax", "exact_q")
EVENT_NAMES = ("first_overflow", "first_nan", "first_underflow", "first_underflow_any", "first_subnormal",
               "first_zero", "first_flush")

Columns = dict  # stat name -> np.ndarray of shape (depth,), or None when not available


@dataclass(frozen=True)
class Events:
    first_overflow: int | None = None
    first_nan: int | None = None
    first_underflow: int | None = None
    first_underflow_any: int | None = None
    first_subnormal: int | None = None
    first_zero: int | None = None
    first_flush: int | None = None  # scaled formats: the quantized matmul input's flush fraction >= threshold
    failure: dict | None = None  # verdicts.pass_failure: {"layer": int, "kind": "overflow" | "nan" | "zero" | "underflow"}
    zero_cause: str | None = None  # "underflow" or "exact_zeros" (e.g. a dead ReLU layer)

    def to_dict(self) -> dict:
        return {name: getattr(self, name) for name in (*EVENT_NAMES, "failure", "zero_cause")}

    @classmethod
    def from_dict(cls, d: dict) -> "Events":
        return cls(**{k: d.get(k) for k in (*EVENT_NAMES, "failure", "zero_cause")})


def _mask(tensors: list[Columns], stat: str, test) -> _np.ndarray | None:
    """Per-layer OR of ``test(column)`` over the tensors that have ``stat``; None if none has it."""
    cols = [t[stat] for t in tensors if t.get(stat) is not None]
    if not cols:
        return None
    out = _np.zeros(len(cols[0]), dtype=bool)
    for c in cols:
        out |= test(_np.asarray(c, dtype=_np.float64))
    return out


def _layer(mask: _np.ndarray | None, last: bool) -> int | None:
    if mask is None or not mask.any():
        return None
    idx = _np.flatnonzero(mask)
    return int(idx[-1] if last else idx[0]) + 1


def _events(tensors: list[Columns], zero_tensors: list[Columns], gemm: list[Columns], threshold: float,
            last: bool) -> Events:
    """``gemm``: the quantized matmul inputs of a scaled format, activation (or gradient) input
    first: its flush fraction is ``first_flush``."""
    ranged = tensors + gemm
    found = dict(
        first_overflow=_layer(_mask(ranged, "overflow_frac", lambda c: c > 0), last),
        first_nan=_layer(_mask(ranged, "nan_frac", lambda c: c > 0), last),
        first_underflow=_layer(_mask(ranged, "underflow_frac", lambda c: c >= threshold), last),
        first_underflow_any=_layer(_mask(ranged, "underflow_frac", lambda c: c > 0), last),
        first_subnormal=_layer(_mask(tensors, "subnormal_frac", lambda c: c >= threshold), last),
        first_zero=_layer(_mask(zero_tensors, "zero_frac", lambda c: c >= 1.0), last),
        first_flush=_layer(_mask(gemm[:1], "flush_frac", lambda c: c >= threshold), last),
    )
    zero_cause = None
    if found["first_zero"] is not None:
        under = _mask(ranged, "underflow_frac", lambda c: c > 0)
        zero_cause = "underflow" if under is not None and under[found["first_zero"] - 1] else "exact_zeros"
    return Events(**found, failure=pass_failure(found, backward=last), zero_cause=zero_cause)


def forward_events(pre: Columns, post: Columns, threshold: float, gemm_in: Columns | None = None,
                   gemm_w: Columns | None = None) -> Events:
    """Events of a forward pass; ``first_zero`` is the first layer whose whole post is zero.
    ``gemm_in``/``gemm_w``: a scaled format's quantized matmul inputs."""
    gemm = [] if gemm_in is None else [gemm_in] + ([] if gemm_w is None else [gemm_w])
    return _events([pre, post], [post], gemm, threshold, last=False)


def backward_events(grad: Columns, grad_pre: Columns, wgrad: Columns, threshold: float,
                    grad_gemm_in: Columns | None = None) -> Events:
    """Events of a backward pass, first in backward order (highest layer); ``first_zero`` is the
    highest layer whose whole gradient w.r.t. post or pre is zero (nothing flows below it).
    ``grad_gemm_in``: a scaled format's quantized gradient entering the dgrad matmul."""
    gemm = [] if grad_gemm_in is None else [grad_gemm_in]
    return _events([grad, grad_pre, wgrad], [grad, grad_pre], gemm, threshold, last=True)
