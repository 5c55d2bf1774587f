"""The numpy backend's statistics: one tensor's ``stats.STAT_NAMES`` reduced in float64 with numpy.

ml_dtypes' own ``.sum()`` accumulates in the low format, so every reduction here converts to
float64 first. The torch backend reduces with its own code (``torch_stats``); only the event
logic (``stats``) is shared.

A scaled format's quantized matmul input (``gemm_stats``) is judged against its element format
elem, with x = the unquantized input, x' = its dequantized value, q = the element code value and
t = elem.eps * rms(x) (``significance_floor``):

    flush: x != 0, x' == 0;  underflow: flush and |x| >= t;  subnormal: 0 < |q| < elem's smallest
    normal and |x| >= t;  overflow: x' inf or NaN where x is finite and x's block held no inf or
    NaN (the scale left its format: such a block is NaN by design);
    saturated: the clamp to +-max_elem changed the code (``numpy_quantize.NpQuantized``);
    qerr = ||x' - x|| / ||x|| over the elements where both are finite (NaN when ||x|| = 0);
    qerr_bulk: the same over the elements with |x| <= r*, the bulk's rms (``bulk_rms``: sigma
    clipping at 4 r until the clipped set holds; outliers set rms(x), not r*);
    scale_log2_min / max: over the blocks whose scale is finite and nonzero (NaN where none).

rms, mean, std, amax, amin_nonzero and the zero/inf/NaN fractions are those of x'.
"""

from __future__ import annotations

import math

import numpy as _np

from ..formats import Format
from ..quantize import GEMM_STATS
from ..stats import GRAD_EXTRA_STATS, STAT_NAMES

__all__ = ["grad_extra_stats", "significance_floor", "bulk_rms", "tensor_stats", "layer_columns", "gemm_stats",
           "gemm_columns"]

_I = {name: i for i, name in enumerate(STAT_NAMES)}


def _rms(a: _np.ndarray, amax: float) -> float:
    """sqrt(mean(a^2)) for a = |x| >= 0, scaled by amax so float64 squares cannot overflow."""
    if not (math.isfinite(amax) and amax > 0):
        return amax  # 0, inf or NaN: the RMS is the same
    return amax * math.sqrt(_np.mean(_np.square(a / amax)))


def significance_floor(exact: _np.ndarray, fmt: Format) -> float:
    """eps * rms(exact), the rms in float64 over the finite exact values (exact zeros included):
    an element below it sits under the tensor's own resolution, so losing it is not underflow.
    inf when no exact value is finite (nothing is significant)."""
    e = _np.abs(_np.asarray(exact, dtype=_np.float64).ravel())
    e = e[_np.isfinite(e)]
    if not e.size:
        return math.inf
    return fmt.eps * _rms(e, float(e.max()))


def bulk_rms(exact: _np.ndarray) -> float:
    """r*, the rms of the bulk of ``exact`` by sigma clipping, over its finite values (zeros
    included), in float64:

        r_0 = rms(x);  r_{k+1} = rms of the x with |x| <= 4 r_k;
        stop when {|x| <= 4 r_k} no longer changes (at most 16 rounds): r* = the last r.

    A few outlier channels set rms(x) but not r*: for N(0, 1) plus channels at 1e4, r* ~ 1.
    inf when no value is finite (as ``significance_floor``)."""
    a = _np.abs(_np.asarray(exact, dtype=_np.float64).ravel())
    a = a[_np.isfinite(a)]
    if not a.size:
        return math.inf
    r, kept = _rms(a, float(a.max())), a
    for _ in range(16):
        clipped = a[a <= 4 * r]
        if clipped.size == kept.size:  # the same set: the sets only shrink
            break
        kept = clipped
        r = _rms(kept, float(kept.max()))
    return r


def _value_stats(out: _np.ndarray, values: _np.ndarray) -> tuple[_np.ndarray, _np.ndarray]:
    """The statistics of the stored values alone into ``out`` (rms, mean, std, amax, amin_nonzero,
    zero_frac); returns (|values|, values == 0) for the counts that follow."""
    a = _np.abs(values)
    zero = values == 0
    nonzero = a[~zero]
    amax = float(a.max())
    out[_I["rms"]] = _rms(a, amax)
    out[_I["mean"]] = values.mean()
    out[_I["std"]] = values.std()
    out[_I["amax"]] = amax
    out[_I["amin_nonzero"]] = nonzero.min() if nonzero.size else _np.nan
    out[_I["zero_frac"]] = _np.count_nonzero(zero) / values.size
    return a, zero


@_np.errstate(all="ignore")
def tensor_stats(exact: _np.ndarray, rounded: _np.ndarray, fmt: Format) -> _np.ndarray:
    """The statistics of one tensor as a float64 vector ordered like ``STAT_NAMES``.

    With t = eps * rms(exact) (``significance_floor``):
    underflow: exact != 0, rounded == 0 and |exact| >= t;  flush: exact != 0 and rounded == 0;
    overflow: |exact| rounds past max (``Format.overflows``: >= T_of; > T_of for fp8_e4m3fn);
    subnormal: 0 < |rounded| < smallest normal and |exact| >= t;  saturated: |rounded| == max.
    fp64: underflow, flush and overflow are NaN here (not available; ``_columns`` makes them None).
    """
    r = _np.asarray(rounded, dtype=_np.float64).ravel()
    e = _np.asarray(exact, dtype=_np.float64).ravel()
    n = r.size
    significant = _np.abs(e) >= significance_floor(e, fmt)
    out = _np.empty(len(STAT_NAMES))
    a, zero = _value_stats(out, r)
    out[_I["subnormal_frac"]] = _np.count_nonzero((a > 0) & (a < fmt.smallest_normal) & significant) / n
    out[_I["inf_frac"]] = _np.count_nonzero(_np.isinf(r)) / n
    out[_I["nan_frac"]] = _np.count_nonzero(_np.isnan(r)) / n
    out[_I["saturated_frac"]] = _np.count_nonzero(a == fmt.max) / n
    if fmt.has_wider:
        flushed = zero & (e != 0)
        out[_I["underflow_frac"]] = _np.count_nonzero(flushed & significant) / n
        out[_I["flush_frac"]] = _np.count_nonzero(flushed) / n
        out[_I["overflow_frac"]] = _np.count_nonzero(fmt.overflows(_np.abs(e))) / n
    else:
        out[_I["underflow_frac"]] = out[_I["flush_frac"]] = out[_I["overflow_frac"]] = _np.nan
    return out


def grad_extra_stats(exact: _np.ndarray, threshold: float, fmt: Format) -> _np.ndarray:
    """[exact_amax, exact_q] of ``stats.GRAD_EXTRA_STATS``: max |exact|, and the (m+1)-th smallest
    significant |exact| (>= ``significance_floor``) with m = ceil(threshold * n) - 1 (inf when fewer
    are significant): only significant elements count as underflow, at any loss scale."""
    a = _np.abs(_np.asarray(exact, dtype=_np.float64).ravel())
    m = math.ceil(threshold * a.size) - 1
    floor = significance_floor(a, fmt)
    candidates = a[(a > 0) & (a >= floor)]
    q = _np.partition(candidates, m)[m] if candidates.size > m else math.inf
    return _np.array([a.max() if a.size else 0.0, q])


def layer_columns(rows: list, fmt: Format) -> dict:
    """Per-layer stat vectors -> columns; underflow/overflow are None where not available (fp64)."""
    if not rows:
        return {name: _np.zeros(0) for name in STAT_NAMES}
    table = _np.vstack(rows)
    names = STAT_NAMES + (GRAD_EXTRA_STATS if table.shape[1] > len(STAT_NAMES) else ())
    cols = {name: table[:, i].copy() for i, name in enumerate(names)}
    if not fmt.has_wider:
        cols["underflow_frac"] = cols["overflow_frac"] = None
    return cols


def _relative_error(approx: _np.ndarray, exact: _np.ndarray) -> float:
    """||approx - exact|| / ||exact|| in float64; NaN when ||exact|| = 0 (nothing to be relative to)."""
    norm = _np.linalg.norm(exact)
    return float(_np.linalg.norm(approx - exact) / norm) if norm > 0 else math.nan


@_np.errstate(all="ignore")
def gemm_stats(exact: _np.ndarray, quant, nonfinite_block: _np.ndarray) -> _np.ndarray:
    """``STAT_NAMES`` + ``quantize.GEMM_STATS`` of one quantized matmul input (module docstring):
    ``exact`` the unquantized tensor, ``quant`` its ``numpy_quantize.NpQuantized``,
    ``nonfinite_block`` per element: its block of ``exact`` holds an inf or NaN."""
    elem = quant.element
    e = _np.asarray(exact, dtype=_np.float64).ravel()
    d = quant.deq.astype(_np.float64).ravel()
    n = d.size
    significant = _np.abs(e) >= significance_floor(e, elem)
    out = _np.empty(len(STAT_NAMES) + len(GEMM_STATS))
    a, zero = _value_stats(out, d)
    flushed = zero & (e != 0)
    out[_I["underflow_frac"]] = _np.count_nonzero(flushed & significant) / n
    out[_I["flush_frac"]] = _np.count_nonzero(flushed) / n
    scale_left = ~_np.isfinite(d) & _np.isfinite(e) & ~_np.asarray(nonfinite_block).ravel()
    out[_I["overflow_frac"]] = _np.count_nonzero(scale_left) / n
    q = _np.abs(quant.q.astype(_np.float64).ravel())
    out[_I["subnormal_frac"]] = _np.count_nonzero((q > 0) & (q < elem.smallest_normal) & significant) / n
    out[_I["inf_frac"]] = _np.count_nonzero(_np.isinf(d)) / n
    out[_I["nan_frac"]] = _np.count_nonzero(_np.isnan(d)) / n
    out[_I["saturated_frac"]] = _np.count_nonzero(quant.saturated) / n
    finite = _np.isfinite(d) & _np.isfinite(e)
    bulk = finite & (_np.abs(e) <= bulk_rms(e))
    s = quant.scale.astype(_np.float64).ravel()
    log2s = _np.log2(s[_np.isfinite(s) & (s != 0)])
    g = len(STAT_NAMES)
    out[g:] = (_relative_error(d[finite], e[finite]), _relative_error(d[bulk], e[bulk]),
               log2s.min() if log2s.size else _np.nan, log2s.max() if log2s.size else _np.nan)
    return out


def gemm_columns(rows: list) -> dict:
    """Per-layer ``gemm_stats`` vectors -> columns (every statistic is available: an element
    format always has a wider one)."""
    names = STAT_NAMES + GEMM_STATS
    if not rows:
        return {name: _np.zeros(0) for name in names}
    table = _np.vstack(rows)
    return {name: table[:, i].copy() for i, name in enumerate(names)}
