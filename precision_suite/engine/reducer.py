"""Per-layer statistics rows of a torch stack, reduced ``CHUNK`` layers at a time."""

from __future__ import annotations

import math

import numpy as _np

from ..formats import Format
from ..stats import GRAD_EXTRA_STATS, STAT_NAMES
from .torch_stats import grad_extra_stats, tensor_stats

__all__ = ["Reducer"]


class Reducer:
    """Turns (exact, rounded) stacks into statistics rows ``CHUNK`` layers at a time.

    At the sizes the suite runs, per-op overhead, not arithmetic, dominates the statistics: one
    reduction over CHUNK x C rows costs little more than one over C. At most CHUNK layers are
    held, so memory stays flat in depth. Rows go into one table allocated up front: a small
    allocation that outlives the multi-MiB temporaries freed around it splits their heap blocks,
    and the next big tensor then takes fresh pages (measured: 3.2 MB of heap growth and ~900 page
    faults per layer when each layer's row was its own array).
    """

    CHUNK = 16
    CHUNK_ELEMENTS = 2**18  # larger tensors gain nothing from batching and would pay for the copy

    def __init__(self, fmt: Format, native: bool, depth: int, cases: int, grad_threshold: float | None = None):
        self.fmt, self.native, self.grad_threshold = fmt, native, grad_threshold
        width = len(STAT_NAMES) + (len(GRAD_EXTRA_STATS) if grad_threshold is not None else 0)
        self.table = _np.full((depth, cases, width), math.nan)  # [layer - 1, case, stat]
        self.recorded = 0
        self.pending: list = []  # (layer, exact, rounded)

    def add(self, layer: int, exact, rounded, rows=None) -> None:
        """Record a layer's [C', ...] stacks; ``rows``: the stack rows they hold (None: all C)."""
        if exact.dim() == 2:  # a native weight gradient: native stacks hold one case
            exact, rounded = exact[None], rounded[None]
        exact, rounded = exact.detach(), rounded.detach()
        rows = None if rows is None else tuple(int(i) for i in rows)
        if self.pending and ((exact.dtype, exact.shape, rows) !=
                             (self.pending[0][1].dtype, self.pending[0][1].shape, self.pending[0][3])):
            self.flush()
        self.pending.append((layer, exact, rounded, rows))
        if len(self.pending) >= self.CHUNK or len(self.pending) * exact.numel() >= self.CHUNK_ELEMENTS:
            self.flush()

    def flush(self) -> None:
        import torch

        if not self.pending:
            return
        layers, exact, rounded, [rows, *_] = zip(*self.pending)
        rows = slice(None) if rows is None else list(rows)
        self.pending = []
        c = exact[0].shape[0]
        exact, rounded = (exact[0], rounded[0]) if len(layers) == 1 else (torch.cat(exact), torch.cat(rounded))
        stats = tensor_stats(exact, rounded, self.fmt, native=self.native).numpy()
        if self.grad_threshold is not None:
            stats = _np.concatenate([stats, grad_extra_stats(exact, self.grad_threshold, self.fmt)], axis=1)
        for i, layer in enumerate(layers):
            self.table[layer - 1, rows] = stats[i * c:(i + 1) * c]
        self.recorded += len(layers)

    def rows(self) -> _np.ndarray:
        """[layers, C, K]: every recorded layer in layer order (gradients arrive from depth down)."""
        self.flush()
        return self.table if self.recorded else self.table[:0]
