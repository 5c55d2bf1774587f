"""Statistics of quantized matmul inputs (``gemm_in``, ``gemm_w``, ``grad_gemm_in``) on any torch
device: one row of ``QSTAT_NAMES`` per stacked case (docs/scaled-formats.md#statistics).

x is the unquantized (exact) fp32 tensor, x' = ``Quantized.deq`` its dequantized value, q the element
codes, elem the element format, t = elem.eps * rms(x) with rms in float64 over the case's finite
values (zeros included; no finite value: t = inf):

    rms, mean, std, amax, amin_nonzero, zero_frac, inf_frac, nan_frac    of x'
    flush_frac      x != 0 and x' == 0
    underflow_frac  flushed and |x| >= t
    subnormal_frac  0 < |q| < elem.smallest_normal and |x| >= t
    saturated_frac  the scale rule clipped the element (``Quantized.clipped``: |x / scale| past elem's T_of), x' finite
    overflow_frac   x' inf or NaN, x finite, and no inf/NaN in x's block (its scale left its format)
    qerr            ||x' - x|| / ||x|| over the elements where both are finite (NaN where ||x|| = 0)
    qerr_bulk       the same over the elements with |x| <= r*, the bulk's rms (``bulk_rms``):
                    r_0 = rms(x), r_{k+1} = rms of the x with |x| <= 4 r_k, r* the last r once that
                    set stops changing (at most 16 rounds): outliers set rms(x), not r*
    scale_log2_min/max   min/max log2(scale) over the blocks with a finite, nonzero scale (NaN: none)

Every reduction is per row (case), so a case's numbers do not depend on the cases stacked with it.
"""

from __future__ import annotations

import math

import numpy as _np

from ..quantize import GEMM_STATS, Quantized
from ..stats import STAT_NAMES
from .torch_stats import _amin_nonzero, _count_below, _exact_rms, _moments, host

__all__ = ["QSTAT_NAMES", "quantized_stats", "bulk_rms", "QuantizedTable"]

QSTAT_NAMES = STAT_NAMES + GEMM_STATS
_I = {name: i for i, name in enumerate(QSTAT_NAMES)}


def quantized_stats(exact, qt: Quantized, scaling, role: str):
    """[C, len(QSTAT_NAMES)] float64 numpy rows of C stacked quantized tensors: ``exact`` (fp32, C
    leading) quantized as ``qt`` (``quantize.quantize`` with ``role``, per_row over C; a weight with
    C = 1).

    Built for few passes over the tensor (the quantized inputs are most of a scaled chain's cost):
    counts on the magnitudes' bit patterns (``torch_stats._count_below``), float masks where a mask
    multiplies (float x bool runs ~10x slower on CPU), and the classes the scales rule out skipped
    without a pass: a flushed element has |x| <= elem.smallest_subnormal / 2 * scale and an element
    with a subnormal code |x| < elem.smallest_normal * scale, so a row whose floor t lies above
    that for its largest scale has none that is significant."""
    import torch

    c = exact.shape[0]
    e = exact.detach().reshape(c, -1)
    d = qt.deq.reshape(c, -1)
    n = e.shape[1]
    elem = qt.element
    out = _np.zeros((c, len(QSTAT_NAMES)))
    a = d.abs()
    bits = a.view(torch.int32)
    amin, amax = host(a.amin(dim=1), a.amax(dim=1))  # NaN propagates into both
    out[:, _I["amax"]] = amax
    out[:, [_I["mean"], _I["std"], _I["rms"]]] = _moments(d, amax)
    e_abs = e.abs()
    [e_amax] = host(e_abs.amax(dim=1))
    rms_e = _exact_rms(e, e_amax)  # inf where no exact value is finite
    floor = elem.eps * rms_e
    s_lo, s_hi, s_zero = _scale_bounds(qt.scale.reshape(c, -1))
    with _np.errstate(divide="ignore", invalid="ignore"):
        out[:, _I["scale_log2_min"]], out[:, _I["scale_log2_max"]] = _np.log2(s_lo), _np.log2(s_hi)
    finite = _np.isfinite(amax) & _np.isfinite(e_amax)  # rows where x and x' are all finite
    if not _np.isfinite(amax).all():
        bad = ~torch.isfinite(d)
        counts = host(torch.isinf(d).sum(dim=1), torch.isnan(d).sum(dim=1),
                      (bad & torch.isfinite(e) & ~_poisoned(exact, scaling, role)).sum(dim=1))
        for name, count in zip(("inf_frac", "nan_frac", "overflow_frac"), counts):
            out[:, _I[name]] = count / n
    amin_nonzero = amin
    if not (amin > 0).all():  # a zero somewhere (or NaN: look closer)
        zeros, amin_nonzero, exact_zeros = host(_count_below(bits, 1), _amin_nonzero(bits, a.dtype),
                                                _count_below(e_abs.view(torch.int32), 1))
        amin_nonzero[amin_nonzero == 0] = math.nan
        out[:, _I["zero_frac"]] = zeros / n
        flushed = zeros - exact_zeros  # an exact zero quantizes to zero, unless its block is NaN:
        if not finite.all():  # count those rows element by element
            rows = _np.flatnonzero(~finite)
            flushed[rows] = _count(_rows(d, rows) == 0, _rows(e, rows) != 0)
        out[:, _I["flush_frac"]] = flushed / n
        # a flushed element: |x| <= sub/2 * scale (a block whose scale is zero flushes whatever x is)
        bound = elem.smallest_subnormal / 2 * s_hi * _SLACK
        rows = _np.flatnonzero((flushed > 0) & (s_zero | ~(floor > bound)))
        if rows.size:
            t = _row_column(floor[rows], e.device)
            out[rows, _I["underflow_frac"]] = _count(_rows(bits, rows) == 0, _rows(e_abs, rows) >= t) / n
    out[:, _I["amin_nonzero"]] = amin_nonzero
    rows = _np.flatnonzero(_np.isfinite(s_hi) & ~(floor >= elem.smallest_normal * s_hi * _SLACK))
    if rows.size:  # (no finite nonzero scale: no nonzero code either)
        qa = _rows(qt.q.reshape(c, -1), rows).abs()
        t = _row_column(floor[rows], e.device)
        out[rows, _I["subnormal_frac"]] = _count(qa > 0, qa < elem.smallest_normal, _rows(e_abs, rows) >= t) / n
    [clipped] = host(qt.clipped.reshape(c, -1).sum(dim=1))
    if not finite.all():  # an inf input is 'clipped' too, but its block is NaN: not a saturation
        rows = _np.flatnonzero(~finite)
        clipped[rows] = _count(_rows(qt.clipped.reshape(c, -1), rows), torch.isfinite(_rows(d, rows)))
    out[:, _I["saturated_frac"]] = clipped / n
    r_bulk = bulk_rms(e_abs, rms_e, _np.isfinite(e_amax))
    out[:, [_I["qerr"], _I["qerr_bulk"]]] = _qerr(e, d, e_abs, r_bulk, finite)
    return out


BULK_CLIP = 4.0  # the bulk's clipping radius, in units of its own rms
BULK_ROUNDS = 16  # at most this many clipping rounds


def bulk_rms(e_abs, rms_e: _np.ndarray | None = None, finite_rows: _np.ndarray | None = None) -> _np.ndarray:
    """Per row of |x| (fp32 [C, n]), r* = the rms of the bulk, by sigma clipping over the finite
    values (zeros included), in float64:

        r_0 = rms(x) (``rms_e``);  r_{k+1} = rms of the x with |x| <= 4 r_k;
        stop when {|x| <= 4 r_k} is the set r_k came from (at most 16 rounds): r* = the last r.

    The sets shrink (what a round removes lies above 4 r_k > r_k, so r_{k+1} <= r_k), so a set is
    unchanged exactly when its count is. Rows with no finite value (r_0 = inf) or none nonzero
    (r_0 = 0) keep r_0. ``rms_e``, ``finite_rows``: r_0 and whether every x of a row is finite, if
    known.

    Each round works on the magnitudes' bit patterns (nonnegative floats order as their bits): an
    integer 0/1 mask of |x| <= 4 r, its count, and for the rows whose set changed the mask times
    the bits, which are the kept |x| and +0, for the float64 sum of squares. A row that has
    converged leaves the loop. Every decision is the row's own: a row's r* is the same alone and
    stacked."""
    import torch

    c, n = e_abs.shape
    if finite_rows is None:
        [amax] = host(e_abs.amax(dim=1))
        finite_rows = _np.isfinite(amax)
    r = (_exact_rms(e_abs) if rms_e is None else rms_e).copy()
    a, outside = e_abs, _np.zeros(c)  # outside: the non-finite elements, zeroed in `a` below
    if not finite_rows.all():  # zeroed, they add nothing to a sum and pass every |x| <= c
        ok = torch.isfinite(e_abs)
        a = torch.where(ok, e_abs, 0.0)
        [outside] = host(n - ok.sum(dim=1))
    count = _np.full(c, float(n))  # |set| + outside, of the set r came from
    active = _np.flatnonzero(_np.isfinite(r) & (r > 0))
    if not active.size:
        return r
    bits = _rows(a, active).view(torch.int32)
    for _ in range(BULK_ROUNDS):
        inside = (_just_above(BULK_CLIP * r[active], bits.device).view(torch.int32) - bits).clamp_(0, 1)
        [kept] = host(inside.sum(dim=1, dtype=torch.int32))  # inside: |x| <= 4 r as int 0/1
        moved = kept != count[active]
        if not moved.all():  # the rows whose set held leave the loop with their r
            if not moved.any():
                break
            index = torch.from_numpy(_np.flatnonzero(moved)).to(bits.device)
            active, bits, inside, kept = active[moved], bits[index], inside[index], kept[moved]
        inside = inside.mul_(bits).view(torch.float32)  # the bit patterns of |x| inside, +0 outside
        [norm] = host(torch.linalg.vector_norm(inside, dim=1, dtype=torch.float64))
        r[active] = norm / _np.sqrt(kept - outside[active])
        count[active] = kept
    return r


_SLACK = 1 + 2.0**-20  # the scale and x * (1 / scale) are rounded: a few fp32 ulps of room


def _rows(t, rows: _np.ndarray):
    """``t[rows]``, without a copy when ``rows`` is every row."""
    import torch

    return t if rows.size == t.shape[0] else t[torch.from_numpy(rows).to(t.device)]


def _count(*masks) -> _np.ndarray:
    """Per row, the number of elements where every bool mask holds."""
    m = masks[0]
    for other in masks[1:]:
        m = m & other
    [n] = host(m.sum(dim=1))
    return n


def _scale_bounds(scale) -> tuple:
    """Per row of block scales: (smallest, largest) finite nonzero scale (NaN where none) and
    whether a block's scale is zero, as host arrays."""
    import torch

    ok = torch.isfinite(scale) & (scale != 0)
    lo, hi, zero, count = host(torch.where(ok, scale.abs(), math.inf).amin(dim=1),
                               torch.where(ok, scale.abs(), -math.inf).amax(dim=1), (scale == 0).sum(dim=1),
                               ok.sum(dim=1))
    none = count == 0
    lo[none] = hi[none] = math.nan
    return lo, hi, zero > 0


def _just_above(values: _np.ndarray, device):
    """Per-row float64 bounds as a [rows, 1] fp32 column ``above`` such that, for fp32 |x| >= 0,
    ``|x| < above`` (and, on bit patterns, ``bits(|x|) < bits(above)``) means ``|x| <= value``:
    the next fp32 after the largest fp32 <= value (a bound past fp32's max: inf, every finite
    |x| passes). The fp32 difference ``above - |x|`` of two distinct values is never zero, so
    ``sign(above - |x|)`` clamped at 0 is the mask."""
    import torch

    with _np.errstate(over="ignore"):  # past fp32's max: inf, stepped back down to max, then up to inf
        col = values.astype(_np.float32)
        down = col.astype(_np.float64) > values
        col[down] = _np.nextafter(col[down], _np.float32(-_np.inf))
        above = _np.nextafter(col, _np.float32(_np.inf))
    return torch.from_numpy(above).to(device)[:, None]


def _row_column(values: _np.ndarray, device):
    """Per-row float64 thresholds as a [rows, 1] fp32 column, each rounded up to the next fp32 so
    that ``|x| >= column`` in fp32 means ``|x| >= value`` (inf stays inf: nothing passes)."""
    import torch

    col = values.astype(_np.float32)
    up = col.astype(_np.float64) < values
    col[up] = _np.nextafter(col[up], _np.float32(_np.inf))
    return torch.from_numpy(col).to(device)[:, None]


def _qerr(e, d, e_abs, r_bulk: _np.ndarray, finite: _np.ndarray) -> _np.ndarray:
    """[C, 2]: qerr and qerr_bulk (over |x| <= ``r_bulk``), norms accumulated in float64. Rows with
    an inf/NaN count only the elements where x and x' are finite (zeroed; a finite row's values are
    untouched, so its numbers are the same alone and stacked). ``e_abs`` is overwritten (its last
    use)."""
    import torch

    if not finite.all():
        both = torch.isfinite(d) & torch.isfinite(e)
        zero = torch.zeros((), dtype=e.dtype, device=e.device)
        d, e = torch.where(both, d, zero), torch.where(both, e, zero)
        e_abs = e.abs()
    diff = d - e
    num, den = host(torch.linalg.vector_norm(diff, dim=1, dtype=torch.float64),
                    torch.linalg.vector_norm(e, dim=1, dtype=torch.float64))
    bulk = (_just_above(r_bulk, e.device) - e_abs).sign_().clamp_(min=0)  # |x| <= r* as 0/1
    num_b, den_b = host(torch.linalg.vector_norm(diff.mul_(bulk), dim=1, dtype=torch.float64),
                        torch.linalg.vector_norm(e_abs.mul_(bulk), dim=1, dtype=torch.float64))
    with _np.errstate(divide="ignore", invalid="ignore"):
        return _np.stack([_np.where(den > 0, num / den, math.nan), _np.where(den_b > 0, num_b / den_b, math.nan)],
                         axis=1)


def _poisoned(exact, scaling, role: str):
    """[C, n] bool: the element's block (or tensor, for a per-tensor scale) holds an inf/NaN exact value,
    which makes the whole block NaN by design: its finite elements are not overflows."""
    import torch

    c = exact.shape[0]
    bad = ~torch.isfinite(exact.reshape(c, -1))
    n = bad.shape[1]
    if role == "weight" and scaling.weight_block is not None:  # one [out, in] weight in (rows x cols) tiles
        (rows, cols), (o, i) = scaling.weight_block, exact.shape[-2:]
        tiles = bad.reshape(o // rows, rows, i // cols, cols).any(dim=3, keepdim=True).any(dim=1, keepdim=True)
        return tiles.expand(o // rows, rows, i // cols, cols).reshape(1, n)
    if scaling.block == 0 or scaling.family == "nv":  # one scale per tensor (nvfp4: its per-tensor level)
        return bad.any(dim=1, keepdim=True).expand(c, n)
    b = scaling.block
    return bad.reshape(c, -1, b).any(dim=2, keepdim=True).expand(c, n // b, b).reshape(c, n)


class QuantizedTable:
    """Per-layer rows of ``QSTAT_NAMES`` for one quantized tensor kind of a stack: [depth, C, K]."""

    def __init__(self, depth: int, cases: int):
        self.table = _np.full((depth, cases, len(QSTAT_NAMES)), math.nan)
        self.recorded = 0

    def add(self, layer: int, rows_stats: _np.ndarray, rows=None) -> None:
        """Layer ``layer``'s rows (one per stack row in ``rows``; None: all; a single row is every case's)."""
        self.table[layer - 1, slice(None) if rows is None else list(rows)] = rows_stats
        self.recorded += 1

    def columns(self, index: int) -> dict:
        if not self.recorded:
            return {name: _np.zeros(0) for name in QSTAT_NAMES}
        return {name: self.table[:, index, i].copy() for i, name in enumerate(QSTAT_NAMES)}
