"""Statistics of stacked (exact, rounded) tensors on any torch device: one row of ``stats.STAT_NAMES``
per stacked case (docs/definitions.md#element-classes), reduced with few fused passes.

The numpy backend reduces with its own code (``numpy_backend.tensor_stats``); only the event logic
over the per-layer numbers is shared (``stats``).
"""

from __future__ import annotations

import functools
import math

import numpy as _np

from ..formats import Format, get_format
from ..stats import GRAD_EXTRA_STATS, STAT_NAMES

__all__ = ["tensor_stats", "grad_extra_stats", "columns", "row_sum", "host"]

_I = {name: i for i, name in enumerate(STAT_NAMES)}


def tensor_stats(exact, rounded, fmt: Format, native: bool = False):
    """Statistics of a stack of C tensors (leading dim) as a float64 CPU tensor [C, len(STAT_NAMES)].

    Per row, t = eps * rms(exact) (``_floors``) separates significant elements from those below the
    tensor's own resolution.
    flush: exact != 0 and rounded == 0. underflow: a flushed element with |exact| >= t (native: and
    |exact| < smallest normal — a larger exact value that came out zero was cancelled inside the
    kernel, not lost to the format's range). subnormal: 0 < |rounded| < smallest normal, |exact| >= t.
    overflow: |exact| rounds past max, i.e. >= T_of (> T_of for fp8_e4m3fn, see ``formats``)
    (native: also inf, or NaN from a finite exact value).

    Built for few, cheap passes (statistics are the suite's whole overhead over the bare chain):
    - magnitudes |r| in float32 whenever that holds r exactly (every format but fp64), so fp32
      cases' counts read half the bytes;
    - counts on the magnitudes' bit patterns, which order like the values (NaN above inf):
      #(|r| < t) = sum(clamp(bits(t) - bits, 0, 1)), one integer pass where a boolean mask and
      its sum are 5-10x slower on CPU;
    - counts that cannot be non-zero are skipped: amin(|r|) > 0 -> no zero, no flush; amax < max
      -> no inf, NaN, overflow or saturation; amin_nonzero >= smallest normal -> no subnormal;
      emulated flush = zeros(rounded) - zeros(exact); significance is settled from rms(rounded)
      where that bound decides it (``_floor_bounds``), so most rows need no pass over exact;
    - the per-row arithmetic (moments, fractions) on the host in float64. The decisions read a few
      numbers per stack, one synchronisation each on a GPU.
    """
    import torch

    c = rounded.shape[0]
    r, e = rounded.reshape(c, -1), exact.reshape(c, -1)
    n = r.shape[1]
    a = _magnitudes(r, fmt)
    bits = a.view(_int_dtype(a.dtype))
    amin, amax = host(a.amin(dim=1), a.amax(dim=1))  # NaN propagates: a NaN row looks closer below
    out = _np.zeros((c, len(STAT_NAMES)))
    out[:, _I["amax"]] = amax
    out[:, [_I["mean"], _I["std"], _I["rms"]]] = _moments(r, amax)
    if native or not (amax < fmt.max).all():  # inf and NaN compare False too
        for name, count in _range_counts(a, bits, e, r, fmt, native).items():
            out[:, _I[name]] = count / n
    floors = _Floors(e, fmt, out[:, _I["rms"]], amax, exact_bound=not native)
    zeros, amin_nonzero = 0, amin
    zeros_possible = not (amin > 0).all()  # NaN compares False: look closer
    if zeros_possible:
        zeros, amin_nonzero = host(_count_below(bits, 1), _amin_nonzero(bits, a.dtype))
        amin_nonzero[amin_nonzero == 0] = math.nan  # no nonzero, non-NaN element
        out[:, _I["zero_frac"]] = zeros / n
    out[:, _I["amin_nonzero"]] = amin_nonzero
    if not (amin_nonzero >= fmt.smallest_normal).all():
        [below_normal] = host(_count_below(bits, _bits(fmt.smallest_normal, a.dtype), in_place=True))  # zeros too
        subnormal = below_normal - zeros
        # emulated, a subnormal |r| >= smallest_subnormal came from |exact| > smallest_subnormal / 2
        # and one below smallest_normal: a floor at or below the first is met, one above the second never
        rows = _np.flatnonzero(subnormal > 0)
        keep_all = floors.at_most(fmt.underflow_threshold, rows) if not native else _np.zeros(len(rows), bool)
        none = floors.at_least(fmt.smallest_normal, rows) if not native else _np.zeros(len(rows), bool)
        subnormal[rows[none]] = 0
        look = rows[~keep_all & ~none]
        if look.size:
            ra, ea = r[look].abs(), e[look].abs()
            subnormal[look] = floors.count(look, (ra > 0) & (ra < fmt.smallest_normal), ea)
        out[:, _I["subnormal_frac"]] = subnormal / n
    if not fmt.has_wider:  # not available: fp64 has no wider format
        out[:, _I["underflow_frac"]] = out[:, _I["flush_frac"]] = out[:, _I["overflow_frac"]] = math.nan
    elif zeros_possible:
        if native:
            [flushed] = host(((r == 0) & (e != 0)).sum(dim=1))
        else:  # exact zeros round to zero, so the difference is the flushed count
            ea = e.abs() if not _np.isnan(amax).any() else torch.nan_to_num(e.abs(), nan=1.0)  # NaN is no zero
            [nonzero_exact] = host(ea.sign_().sum(dim=1))
            flushed = zeros - (n - nonzero_exact)
        out[:, _I["flush_frac"]] = flushed / n
        under = _np.zeros(c)
        rows = _np.flatnonzero(flushed > 0)
        # emulated, a flushed |exact| is at most smallest_subnormal / 2; native counts below smallest normal
        limit = fmt.smallest_normal if native else fmt.underflow_threshold
        look = rows[~floors.above(limit, rows)] if not native else rows[~floors.at_least(limit, rows)]
        if look.size:
            ra, ea = r[look], e[look].abs()
            mask = (ra == 0) & (ea > 0)
            if native:
                mask &= ea < fmt.smallest_normal
            under[look] = floors.count(look, mask, ea)
        out[:, _I["underflow_frac"]] = under / n
    return torch.from_numpy(out)


def _range_counts(a, bits, e, r, fmt: Format, native: bool) -> dict:
    """Per row, the counts of |r| == max (saturated), inf, NaN and overflowed elements, as float64
    host arrays. The first three from #(bits >= b) at the patterns of max, inf and the first NaN
    (``_count_below``'s integer pass; boolean masks and their sums cost ~3x more). Emulated
    rounding is correct (round-to-nearest-even), so in a format with inf an element overflowed
    exactly when it rounded to +-inf (|exact| >= T_of, an exact inf included); fp8_e4m3fn has no
    inf and the native kernels round their own way: there the exact values are compared with T_of."""
    import torch

    patterns = [_bits(fmt.max, a.dtype), _bits(fmt.max, a.dtype) + 1, _bits(math.inf, a.dtype),
                _bits(math.inf, a.dtype) + 1]
    at_max, above_max, at_inf, nan = host(*(_count_at_least(bits, p) for p in patterns))
    counts = {"saturated_frac": at_max - above_max, "inf_frac": at_inf - nan, "nan_frac": nan}
    if not fmt.has_wider:
        return counts
    if fmt.has_inf and not native:
        counts["overflow_frac"] = counts["inf_frac"]
        return counts
    over = fmt.overflows(e.abs())
    if native:
        over |= torch.isinf(r) | (torch.isnan(r) & torch.isfinite(e))
    [counts["overflow_frac"]] = host(over.sum(dim=1))
    return counts


def _count_at_least(bits, threshold_bits: int):
    """Per row, #(bits >= threshold_bits) = sum(clamp(bits - threshold_bits + 1, 0, 1))."""
    return (bits - (threshold_bits - 1)).clamp_(0, 1).sum(dim=1, dtype=bits.dtype)


class _Floors:
    """Per row, the significance floor t = eps * rms(exact), rms in float64 over the finite exact
    values (exact zeros included; none finite: t = inf, nothing is significant).

    Emulated rounding is nearest-even, |r - e| <= eps/2 |e| + smallest_subnormal/2 per element, so
    by Minkowski's inequality rms(e) lies within [(rms(r) - s/2)/(1 + eps/2), (rms(r) + s/2)/(1 - eps/2)]
    for a row whose rounded values are all finite (``exact_bound``). Most decisions (no underflow,
    every subnormal significant) follow from that interval; the exact rms is computed only for the
    rows whose floor the interval leaves undecided."""

    _SLACK = 1e-4  # rms(r) itself comes from a float32 norm: a relative error far below this

    def __init__(self, exact, fmt: Format, rms_rounded: _np.ndarray, amax: _np.ndarray, exact_bound: bool):
        self.exact, self.fmt = exact, fmt
        half_eps, half_sub = fmt.eps / 2, fmt.smallest_subnormal / 2
        usable = _np.isfinite(amax) & exact_bound
        with _np.errstate(invalid="ignore"):
            lo = _np.maximum(rms_rounded - half_sub, 0) / (1 + half_eps) * (1 - self._SLACK)
            hi = (rms_rounded + half_sub) / (1 - half_eps) * (1 + self._SLACK)
        self.lo = fmt.eps * _np.where(usable, lo, 0.0)
        self.hi = fmt.eps * _np.where(usable, hi, math.inf)
        self.exact_floor: dict[int, float] = {}

    def at_most(self, value: float, rows: _np.ndarray) -> _np.ndarray:
        return self.hi[rows] <= value

    def at_least(self, value: float, rows: _np.ndarray) -> _np.ndarray:
        return self.lo[rows] >= value

    def above(self, value: float, rows: _np.ndarray) -> _np.ndarray:
        return self.lo[rows] > value

    def count(self, rows: _np.ndarray, mask, magnitudes) -> _np.ndarray:
        """Per row of ``rows``: #(mask & magnitudes >= t), t the row's exact floor."""
        import torch

        t = self.floor(rows)
        t_dev = torch.from_numpy(_ceil_to(t, magnitudes.dtype)).to(magnitudes.device)[:, None]
        [n] = host((mask & (magnitudes >= t_dev)).sum(dim=1))
        return n

    def floor(self, rows: _np.ndarray) -> _np.ndarray:
        missing = [i for i in rows.tolist() if i not in self.exact_floor]
        if missing:
            self.exact_floor.update(zip(missing, self.fmt.eps * _exact_rms(self.exact[missing])))
        return _np.array([self.exact_floor[i] for i in rows.tolist()])


def _exact_rms(e, amax: _np.ndarray | None = None) -> _np.ndarray:
    """Per row, rms over the finite values, accumulated in float64; inf where no value is finite.
    ``amax``: the rows' max |e| if known (inf/NaN there means a row needs the finite mask).

    float32 squares always fit float64 (2^-298 .. 2^256), so float32 rows need no scaling; float64
    rows are scaled by a power of two per row first."""
    import torch

    x = e.detach()
    n = x.shape[1]
    if amax is None:
        [amax] = host(x.abs().amax(dim=1))
    count = _np.full(len(amax), float(n))
    if not _np.isfinite(amax).all():
        finite = torch.isfinite(x)
        x = torch.where(finite, x, 0.0)
        [count, amax] = host(finite.sum(dim=1), x.abs().amax(dim=1))
    if x.dtype == torch.float64:
        k = _np.where(amax > 0, -_np.ceil(_np.log2(_np.where(amax > 0, amax, 1.0))), 0).astype(_np.int64)
        for part in (k // 2, k - k // 2):  # 2^k itself may lie outside float64 (subnormal rows: k ~ 1070)
            x = x * torch.from_numpy(_np.ldexp(1.0, part)).to(x.device)[:, None]
    else:
        k = _np.zeros(len(amax), dtype=_np.int64)
    [norm] = host(torch.linalg.vector_norm(x, dim=1, dtype=torch.float64))
    with _np.errstate(divide="ignore", invalid="ignore"):
        rms = _np.ldexp(norm, -k) / _np.sqrt(count)
    return _np.where(count > 0, rms, math.inf)


def _ceil_to(t: _np.ndarray, dtype) -> _np.ndarray:
    """float64 thresholds -> the smallest value of ``dtype`` (float32/float64) at or above each, so
    that ``|x| >= result`` in dtype means ``|x| >= t`` for every x of that dtype."""
    import torch

    np_dtype = _np.float32 if dtype == torch.float32 else _np.float64
    with _np.errstate(over="ignore"):
        d = t.astype(np_dtype)
    up = d.astype(_np.float64) < t
    d[up] = _np.nextafter(d[up], np_dtype(_np.inf))
    return d


def _magnitudes(r, fmt: Format):
    """|r|, in float32 where that holds every value of the format exactly (r is rounded to it)."""
    import torch

    if r.dtype == torch.float64 and fmt.subset_of(get_format("fp32")):
        return r.to(torch.float32).abs_()
    return r.abs()


def _int_dtype(dtype):
    """The signed integer dtype as wide as float ``dtype``: non-negative floats order like their bits."""
    import torch

    return {torch.float32: torch.int32, torch.float64: torch.int64}[dtype]


@functools.lru_cache(maxsize=64)
def _bits(value: float, dtype) -> int:
    """The bit pattern of a non-negative ``value`` in float ``dtype``, as a Python int."""
    import torch

    return int(torch.tensor(value, dtype=dtype).view(_int_dtype(dtype)))


def _count_below(bits, threshold_bits: int, in_place: bool = False):
    """Per row, #(bits < threshold_bits) = sum(clamp(threshold_bits - bits, 0, 1)). ``in_place``
    overwrites ``bits`` (its last use) instead of writing a new tensor: two passes over memory that
    is already in cache, where a fresh buffer costs ~3x more in the middle of a layer."""
    if in_place:
        return bits.sub_(threshold_bits).clamp_(-1, 0).sum(dim=1, dtype=bits.dtype).neg_()
    return (threshold_bits - bits).clamp_(0, 1).sum(dim=1, dtype=bits.dtype)


def _amin_nonzero(bits, dtype):
    """Per row, the smallest nonzero non-NaN magnitude; 0 where there is none. ``(bits - 1) & MAX``
    sends 0 to the top of the integer range and keeps every other pattern's order (NaN above inf)."""
    import torch

    top = torch.iinfo(bits.dtype).max
    m = (bits - 1).bitwise_and_(top).amin(dim=1)
    inf_bits = _bits(math.inf, dtype)
    return torch.where(m < inf_bits, m + 1, 0).view(dtype)


def host(*tensors) -> list:
    """Device [C] reductions -> float64 numpy arrays (on a GPU, the first one synchronises; the
    conversion happens on the host, since some devices have no float64)."""
    return [t.cpu().numpy().astype(_np.float64) for t in tensors]


def _moments(r, amax: _np.ndarray) -> _np.ndarray:
    """[C, 3]: per-row mean, population std and rms (float64) from a sum and a 2-norm.

    Every choice is made per row, so a row's numbers do not depend on the rows stacked with it:
    - rows whose squares leave r's accurate range (``_squares_out_of_range``) are summed in
      float64, which holds every fp32 square (bf16 values near 3e38, bf16 tails near 1e-40);
      float64 rows near float64's own limits (the fp64 format) are scaled by 2^k, exactly;
    - std = sqrt(rms^2 - mean^2) in float64 unless |mean| is large against rms (relative error of
      that difference ~ eps * rms^2 / std^2); then the second pass, the norm of r - mean."""
    import torch

    n = r.shape[1]
    if r.dtype == torch.float64:
        return _moments_of(r, amax)
    wide = _squares_out_of_range(amax, r.dtype, n)
    if not wide.any():  # the common case, without the row bookkeeping (~20 us a call)
        return _moments_of(r, amax, rescale=wide)
    out = _np.empty((r.shape[0], 3))
    for rows, promote in ((_np.flatnonzero(~wide), False), (_np.flatnonzero(wide), True)):
        if rows.size:
            part = r if rows.size == len(amax) else r[torch.from_numpy(rows).to(r.device)]
            out[rows] = _moments_of(part.double() if promote else part, amax[rows])
    return out


def _moments_of(r, amax: _np.ndarray, rescale: _np.ndarray | None = None) -> _np.ndarray:
    """``_moments`` of rows that share one dtype; ``rescale``: ``_squares_out_of_range`` if known."""
    import torch

    n = r.shape[1]
    out = _np.empty((r.shape[0], 3))
    if rescale is None:
        rescale = _squares_out_of_range(amax, r.dtype, n)
    k = None
    if rescale.any():  # largest magnitude ~1; 2^k itself may lie outside float64, so in two factors
        k = _np.zeros(len(amax), dtype=_np.int64)
        k[rescale] = -_np.ceil(_np.log2(amax[rescale])).astype(_np.int64)
        for part in (k // 2, k - k // 2):
            r = r * torch.tensor(_np.ldexp(1.0, part), dtype=r.dtype, device=r.device)[:, None]
    total, norm = host(row_sum(r), torch.linalg.vector_norm(r, dim=1))
    mean, rms = total / n, norm / math.sqrt(n)
    with _np.errstate(invalid="ignore"):  # inf - inf: an overflowed row's std is NaN
        std = _np.sqrt(_np.maximum(rms * rms - mean * mean, 0))
    second = _np.flatnonzero(~(mean * mean <= 0.25 * rms * rms))  # std^2 < 3/4 rms^2 (or NaN): cancellation
    if second.size:
        index = torch.from_numpy(second).to(r.device)
        centre = torch.tensor(mean[second], dtype=r.dtype, device=r.device)[:, None]
        [dev] = host(torch.linalg.vector_norm(r[index] - centre, dim=1))
        std[second] = dev / math.sqrt(n)
    out[:, 0], out[:, 1], out[:, 2] = mean, std, rms
    return out if k is None else _np.ldexp(out, -k[:, None])


def row_sum(x):
    """Per-row sum of a [C, N] tensor, in an order that does not depend on C: torch sums one row
    of N >= 32768 elements in pieces across threads, but several rows one row per thread, each
    in order; a single row is therefore summed as one of two (the second is never read), except
    on a CPU with one thread, where both orders are the same (checked for N up to 3e6)."""
    import torch

    single_threaded = x.device.type == "cpu" and torch.get_num_threads() == 1
    return x.sum(dim=1) if x.shape[0] > 1 or single_threaded else x.expand(2, -1).sum(dim=1)[:1]


def _squares_out_of_range(amax: _np.ndarray, dtype, n: int) -> _np.ndarray:
    """Rows whose sum of squares leaves ``dtype``'s accurate range: above sqrt(max / n) it
    overflows; below sqrt(tiny / eps) (3e-16 in fp32) the squares fall among the subnormals and
    torch's norm loses them ([3e-23, 1e-24] gave 3.7e-23 in fp32; 2e-38 gave 0)."""
    high, low = _square_limits(dtype, n)
    with _np.errstate(invalid="ignore"):
        return _np.isfinite(amax) & (amax > 0) & ((amax > high) | (amax < low))


@functools.lru_cache(maxsize=64)
def _square_limits(dtype, n: int) -> tuple[float, float]:
    """(sqrt(max / n), sqrt(tiny / eps)) of float ``dtype``: see ``_squares_out_of_range``."""
    import torch

    info = torch.finfo(dtype)
    return math.sqrt(info.max / n), math.sqrt(info.tiny / info.eps)


def grad_extra_stats(exact, threshold: float, fmt: Format) -> _np.ndarray:
    """[C, 2] float64: exact_amax and exact_q of each of C stacked gradients (see ``stats.GRAD_EXTRA_STATS``):
    the (m + 1)-th smallest significant |exact| (>= eps * rms(exact), ``_Floors``), m = ceil(threshold * n) - 1,
    NaN counted as zero — one batched selection over the bit patterns with zeros and the elements
    below the floor sent to the top (``_amin_nonzero``)."""
    import torch

    c = exact.shape[0]
    a = exact.detach().reshape(c, -1).abs()
    n = a.shape[1]
    m = math.ceil(threshold * n) - 1
    [amax] = raw_amax = host(a.amax(dim=1))  # NaN propagates: the rows the rms must mask
    if _np.isnan(amax).any():
        [amax] = host(torch.nan_to_num(a, nan=0.0, posinf=math.inf).amax(dim=1))
    q = _np.full(c, math.inf)
    if m < n:  # topk of the m + 1 smallest is ~2.5x faster than kthvalue on CPU here; ints ~20% faster still
        int_dtype = _np.int32 if a.dtype == torch.float32 else _np.int64
        floor = _np.maximum(_ceil_to(fmt.eps * _rms_of_magnitudes(a, raw_amax[0]), a.dtype).view(int_dtype), 1)
        bits = a.view(_int_dtype(a.dtype))  # a's last use: lifted in place (see _count_below)
        # bits - floor is negative below the floor (zeros too: floor >= 1) and the mask lifts those above
        # every significant element, whose order it keeps: one pass where a compare and a fill took two
        lifted = bits.sub_(torch.from_numpy(floor).to(a.device)[:, None]).bitwise_and_(torch.iinfo(bits.dtype).max)
        qb = torch.topk(lifted, m + 1, dim=1, largest=False).values[:, -1].cpu().numpy()  # bits: no float64 trip
        found = qb < _bits(math.inf, a.dtype) - floor  # else fewer than m + 1 significant, non-NaN values
        q[found] = (qb[found] + floor[found]).view(_np.float32 if int_dtype is _np.int32 else _np.float64)
    return _np.stack([amax, q], axis=1)


def _rms_of_magnitudes(a, amax: _np.ndarray) -> _np.ndarray:
    """Per row, rms of |values| ``a`` over the finite ones, in a's own dtype (relative error ~1e-7):
    a row whose squares would leave the dtype's accurate range (``_squares_out_of_range``) is first
    scaled by 2^k, exactly, so that its largest magnitude is ~1. Rows holding inf or NaN go through
    ``_exact_rms``, which masks them. Every choice is made per row."""
    import torch

    n = a.shape[1]
    finite = _np.isfinite(amax)
    out = _np.empty(len(amax))
    for rows, masked in ((_np.flatnonzero(finite), False), (_np.flatnonzero(~finite), True)):
        if not rows.size:
            continue
        part = a if rows.size == len(amax) else a[torch.from_numpy(rows).to(a.device)]
        if masked:
            out[rows] = _exact_rms(part, amax[rows])
            continue
        k = _np.zeros(rows.size, dtype=_np.int64)
        rescale = _squares_out_of_range(amax[rows], a.dtype, n)
        if rescale.any():
            k[rescale] = -_np.ceil(_np.log2(amax[rows][rescale])).astype(_np.int64)
            for half in (k // 2, k - k // 2):  # 2^k itself may lie outside the dtype
                part = part * torch.from_numpy(_np.ldexp(1.0, half)).to(part.device, part.dtype)[:, None]
        [norm] = host(torch.linalg.vector_norm(part, dim=1))
        out[rows] = _np.ldexp(norm, -k) / math.sqrt(n)
    return out


def columns(rows: _np.ndarray, fmt: Format, index: int) -> dict:
    """Per-layer stat rows [layers, C, K] -> numpy columns of stack member ``index``; stats that
    are not available become None."""
    if not len(rows):
        return {name: _np.zeros(0) for name in STAT_NAMES}
    table = rows[:, index]
    names = STAT_NAMES + (GRAD_EXTRA_STATS if table.shape[1] > len(STAT_NAMES) else ())
    cols = {name: table[:, i].copy() for i, name in enumerate(names)}
    if not fmt.has_wider:
        cols["underflow_frac"] = cols["overflow_frac"] = None
    return cols
