"""Per-layer bookkeeping of a probe: statistics rows, the first op of each event (its site), the
op that produced the first inf/NaN, and the columns, events and advice the results carry.

Statistics come from the engine's ``tensor_stats`` (the same significance rule, the same fused
passes) and events from ``stats``; two corrections make them fit ops of a real model:

* overflow counts the exact values an op made past T_of (``Format.overflows``): every one when
  all its inputs were finite (an exact inf included: the wide precision overflowed too, as bf16's
  fp32 does), else only the finite ones, so a ``-inf`` that came in from an operand (an attention
  mask) is not an overflow;
* the producer of the first inf/NaN is the first layer whose output holds one while every input
  was finite (a float scalar argument counts: ``masked_fill(x, m, -inf)`` produces no failure).

Headroom is one figure throughout (docs/probe.md): ``log2(T_of / M)`` with M the largest exact
magnitude the op made, over the same elements the overflow count reads; an event site's
``headroom_bits`` and ``least_headroom`` are both this number.
"""

from __future__ import annotations

import math

import numpy as _np
import torch

from ..engine.torch_stats import columns, grad_extra_stats, tensor_stats
from ..formats import Format
from .gradstats import grad_extras
from ..stats import GRAD_EXTRA_STATS, STAT_NAMES, backward_events, forward_events

__all__ = ["Recorder", "SITE_EVENTS"]

_I = {name: i for i, name in enumerate(STAT_NAMES)}
_K = len(STAT_NAMES) + len(GRAD_EXTRA_STATS)
SITE_EVENTS = ("first_overflow", "first_nan", "first_underflow", "first_underflow_any", "first_subnormal",
               "first_zero")


def _fires(row: _np.ndarray, threshold: float, zero_counts: bool) -> dict:
    """Which events this one statistics row shows (the per-layer tests of ``stats._events``)."""
    under = row[_I["underflow_frac"]]
    return {"first_overflow": row[_I["overflow_frac"]] > 0, "first_nan": row[_I["nan_frac"]] > 0,
            "first_underflow": under >= threshold, "first_underflow_any": under > 0,
            "first_subnormal": row[_I["subnormal_frac"]] >= threshold,
            "first_zero": zero_counts and row[_I["zero_frac"]] >= 1.0}


def _headroom_over(value: float, fmt: Format) -> float | None:
    """log2(T_of / |value|): bits left before ``value`` overflows (negative: it did; -inf for an
    exact inf); None for NaN or zero."""
    if math.isnan(value) or value == 0:
        return None
    return -math.inf if math.isinf(value) else math.log2(fmt.overflow_threshold) - math.log2(abs(value))


def _made(e, inputs_finite: bool):
    """The elements of exact tensor ``e`` that its op made rather than passed on: all but NaN when
    every input was finite, else the finite ones (an inf from an operand is not the op's)."""
    return ~torch.isnan(e) if inputs_finite else torch.isfinite(e)


def _overflowed(e, r, fmt: Format, native: bool, inputs_finite: bool):
    """The elements that overflowed in this op: made past T_of, or (native) made finite and
    returned inf/NaN by the kernel."""
    over = fmt.overflows(e.abs())
    if native:
        over |= torch.isinf(r) | (torch.isnan(r) & torch.isfinite(e))
    return over if inputs_finite else over & torch.isfinite(e)


def _largest_made(e, inputs_finite: bool) -> float:
    """M: the largest |exact| the op made (0 when it made none)."""
    return float(e.abs().where(_made(e, inputs_finite), 0.0).amax()) if e.numel() else 0.0


def _headroom_under(value: float, fmt: Format) -> float | None:
    """log2(|value| / smallest_subnormal): binades above the smallest subnormal (below -1: lost)."""
    if not math.isfinite(value) or value == 0:
        return None
    return math.log2(abs(value)) - math.log2(fmt.smallest_subnormal)


def _significance_floor(e, fmt: Format) -> float:
    """eps * rms over the finite exact values, in float64 (inf when none is finite)."""
    finite = e[torch.isfinite(e)]
    if finite.numel() == 0:
        return math.inf
    return fmt.eps * float(torch.linalg.vector_norm(finite, dtype=torch.float64)) / math.sqrt(e.numel())


def _site_value(event: str, e, r, fmt: Format, native: bool, inputs_finite: bool) -> tuple[float, float | None]:
    """(the value that broke the format, its headroom in bits) for one event on one tensor."""
    if event == "first_overflow":  # the largest exact value counted as overflowed: it is M too
        over = e.where(_overflowed(e, r, fmt, native, inputs_finite), 0.0)
        v = float(over.flatten()[over.abs().argmax()])
        return v, _headroom_over(v, fmt)
    if event == "first_nan":
        return math.nan, None
    if event == "first_zero":
        return 0.0, None
    floor = _significance_floor(e, fmt)
    if event == "first_subnormal":
        mask = (r != 0) & (r.abs() < fmt.smallest_normal) & (e.abs() >= floor)
        cand = e.abs().where(mask, math.inf)
        v = float(e.flatten()[cand.argmin()])
    else:  # underflow: the largest significant exact value that rounded to zero
        mask = (r == 0) & (e != 0) & (e.abs() >= floor)
        cand = e.abs().where(mask, 0.0)
        v = float(e.flatten()[cand.argmax()])
    return v, _headroom_under(v, fmt)


def _producer_site(layer: int, name: str, e, fmt: Format) -> dict:
    """The site of the first inf/NaN made from finite inputs: the exact value that rounded past max
    (its largest), or the first non-finite exact value (0/0 inside the op)."""
    bad = ~torch.isfinite(e)
    v = float(e.flatten()[bad.flatten().nonzero()[0, 0]]) if bool(bad.any()) else float(e.flatten()[e.abs().argmax()])
    return {"layer": layer, "name": name, "tensor": "out", "value": v, "headroom_bits": _headroom_over(v, fmt)}


class _Pass:
    """One direction's rows and sites. Forward events are the lowest layer, backward the highest."""

    def __init__(self, backward: bool, threshold: float, stats: bool = True):
        self.backward, self.threshold, self.stats = backward, threshold, stats
        self.rows: dict[str, dict[int, _np.ndarray]] = {"out": {}, "wgrad": {}}
        self.sites: dict[str, dict] = {}
        self.recent: list = []  # (tensor, row) of the last few tensors: see ``_seen``
        self.least: dict | None = None  # {layer, name, tensor, bits}: see ``_headroom``

    def _better(self, layer: int, event: str) -> bool:
        site = self.sites.get(event)
        return site is None or (layer > site["layer"] if self.backward else layer < site["layer"])

    def add(self, layer: int, name: str, tensor: str, exact, rounded, fmt: Format, native: bool,
            inputs_finite: bool = False) -> _np.ndarray:
        """One tensor's row; ``inputs_finite``: every input of the op that made it was finite (known
        forward only: a gradient's exact infs never count as made by its op)."""
        if not self.stats:  # the bare run the statistics' cost is measured against
            return _np.zeros(_K)
        e = exact.detach().float() if exact.dtype not in (torch.float32, torch.float64) else exact.detach()
        r = rounded.detach().to(e.dtype)
        row = self._seen(r, inputs_finite)
        if row is None:
            row = self._row(e, r, fmt, native, inputs_finite)
        self.rows[tensor][layer] = row
        for event, fired in _fires(row, self.threshold, zero_counts=tensor == "out").items():
            if fired and self._better(layer, event):
                value, bits = _site_value(event, e, r, fmt, native, inputs_finite)
                self.sites[event] = {"layer": layer, "name": name, "tensor": tensor, "value": value,
                                     "headroom_bits": bits}
        self._headroom(layer, name, tensor, e, r, row, fmt, native, inputs_finite)
        return row

    def _headroom(self, layer: int, name: str, tensor: str, e, r, row, fmt: Format, native: bool,
                  inputs_finite: bool) -> None:
        """Keep the tensor with the fewest bits log2(T_of / M) so far (M: ``_largest_made``). M is
        read from the row where the row pins it down: a gradient's exact_amax when finite, or the
        rounded amax of an output that is its own exact value. An emulated output's M lies within
        rounding of its rounded amax, so M is computed only when that bound could beat the best."""
        if not fmt.has_wider:
            return
        finite_row = row[_I["inf_frac"]] == 0 and row[_I["nan_frac"]] == 0
        m = None
        if self.backward and math.isfinite(row[len(STAT_NAMES)]):
            m = row[len(STAT_NAMES)]  # exact_amax: NaN counted as zero, no inf: the largest finite |e|
        elif finite_row and e.data_ptr() == r.data_ptr():
            m = row[_I["amax"]]
        elif finite_row and not native and self.least is not None:  # rounded amax = round(M)
            bound = row[_I["amax"]] * (1 + fmt.eps) + fmt.smallest_subnormal
            if math.log2(fmt.overflow_threshold) - math.log2(bound) > self.least["bits"]:
                return
        if m is None:
            m = _largest_made(e, inputs_finite and not self.backward)
        if m == 0:
            return
        bits = -math.inf if math.isinf(m) else math.log2(fmt.overflow_threshold) - math.log2(m)
        if self.least is None or bits < self.least["bits"]:
            self.least = {"layer": layer, "name": name, "tensor": tensor, "bits": bits}

    _RECENT = 4

    def _seen(self, r, inputs_finite: bool) -> _np.ndarray | None:
        """The row of a tensor holding the same elements as one of the last few: a gradient that
        passes unchanged through an add or a reshape reaches several layers' outputs as views of
        one buffer (statistics do not depend on shape). The recent tensors are held, so their
        memory cannot be reused by another tensor at the same address meanwhile; views share their
        base's version counter, so one written in place since (``relu_``) does not match."""
        if not r.is_contiguous():
            return None
        key = (r.data_ptr(), r.numel(), r.dtype, r._version, inputs_finite)
        for k, _, row in self.recent:
            if k == key:
                return row
        return None

    def _row(self, e, r, fmt: Format, native: bool, inputs_finite: bool) -> _np.ndarray:
        row = _np.full(_K, math.nan)
        row[:len(STAT_NAMES)] = tensor_stats(e[None], r[None], fmt, native=native).numpy()[0]
        if self.backward:  # float32: radix selection (gradstats), ~3x faster than the engine's top-k
            row[len(STAT_NAMES):] = (grad_extras(e, self.threshold, fmt) if e.dtype == torch.float32
                                     else grad_extra_stats(e[None], self.threshold, fmt)[0])
        if row[_I["overflow_frac"]] > 0 and not inputs_finite:  # an inf from an operand (a -inf mask) is not one
            row[_I["overflow_frac"]] = float(_overflowed(e, r, fmt, native, False).sum()) / e.numel()
        if r.is_contiguous():
            key = (r.data_ptr(), r.numel(), r.dtype, r._version, inputs_finite)
            self.recent = [*self.recent[-(self._RECENT - 1):], (key, r, row)]
        return row

    def table(self, tensor: str, depth: int) -> _np.ndarray:
        t = _np.full((depth, 1, _K), math.nan)
        for layer, row in self.rows[tensor].items():
            t[layer - 1, 0] = row
        return t


class Recorder:
    """Layers in execution order (name, module, judging format) and both passes' statistics."""

    def __init__(self, fmt: Format, threshold: float, stats: bool = True):
        """``stats=False`` records the layers' names only (the benchmark's baseline)."""
        self.fmt, self.threshold = fmt, threshold
        self.names: list[str] = []
        self.modules: list[str] = []
        self.formats: list[Format] = []
        self.nonfinite: list[bool] = []  # the output holds an inf or NaN
        self.nonfinite_from_finite: list[bool] = []  # ... and every input was finite: it produced them
        self.forward = _Pass(backward=False, threshold=threshold, stats=stats)
        self.backward = _Pass(backward=True, threshold=threshold, stats=stats)

    @property
    def depth(self) -> int:
        return len(self.names)

    def add_layer(self, module: str, op: str, exact, rounded, fmt: Format, native: bool, inputs_finite: bool) -> int:
        """Record one forward op's output; returns its 1-based layer number."""
        self.names.append(f"{module}:{op}")
        self.modules.append(module)
        self.formats.append(fmt)
        layer = len(self.names)
        row = self.forward.add(layer, self.names[-1], "out", exact, rounded, fmt, native, inputs_finite)
        self.nonfinite.append(bool(row[_I["inf_frac"]] > 0 or row[_I["nan_frac"]] > 0))
        self.nonfinite_from_finite.append(self.nonfinite[-1] and inputs_finite)
        if self.nonfinite_from_finite[-1] and "first_nonfinite" not in self.forward.sites:
            self.forward.sites["first_nonfinite"] = _producer_site(layer, self.names[-1], exact.detach().float(), fmt)
        return layer

    def add_grad(self, layer: int, tensor: str, exact, rounded, native: bool) -> None:
        """The gradient w.r.t. layer ``layer``'s output (``out``) or its parameters (``wgrad``)."""
        self.backward.add(layer, self.names[layer - 1], tensor, exact, rounded, self.formats[layer - 1], native)

    # ---- results ----

    def forward_columns(self) -> dict:
        return columns(self.forward.table("out", self.depth), self.fmt, 0)

    def backward_columns(self) -> tuple[dict, dict]:
        return (columns(self.backward.table("out", self.depth), self.fmt, 0),
                columns(self.backward.table("wgrad", self.depth), self.fmt, 0))

    def forward_events(self):
        cols = self.forward_columns()
        return forward_events(cols, cols, self.threshold), cols

    def backward_events(self):
        grad, wgrad = self.backward_columns()
        return backward_events(grad, grad, wgrad, self.threshold), grad, wgrad

    def least_headroom(self) -> dict | None:
        """The tensor with the fewest bits log2(T_of / M) over both directions (M: the largest exact
        magnitude its op made, ``_Pass._headroom``): ``{layer, name, tensor, bits, side}``, side
        forward | backward; forward wins a tie. None when no op made a non-zero value."""
        best = None
        for side, p in (("forward", self.forward), ("backward", self.backward)):
            if p.least is not None and (best is None or p.least["bits"] < best["bits"]):
                best = {**p.least, "side": side}
        return best

    def sites(self) -> dict:
        """Forward sites by event name, backward ones prefixed ``grad_`` (as ``--fail-on`` names them)."""
        return {**self.forward.sites, **{f"grad_{k}": v for k, v in self.backward.sites.items()}}
