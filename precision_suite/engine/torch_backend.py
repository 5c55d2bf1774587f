"""The torch backend: stacks of cases sharing a format, on any torch device, in emulated or native mode.

Layer l (docs/definitions.md#the-chain-and-layer-numbering), every op's result rounded to the format
(emulated) or produced in it (native):

    pre_l  = x_{l-1} @ W_l.T (+ b_l)
    post_l = x_l = act(norm(pre_l))            or   x_{l-1} + alpha * act(norm(pre_l))  (residual)

Emulated: each op runs in the wide precision (fp32; fp64 for fp32) on already-rounded operands and
its output is rounded with ``_Round``, which rounds the gradient too in backward and hands the
(exact, rounded) pair of every recorded tensor to the statistics. Native: the ops run in the
format with the backend's own kernels; the exact value of each recorded tensor is the same op
recomputed in the wide precision from the same low-precision operands.
"""

from __future__ import annotations

import functools
import math

import numpy as _np

from ..activations import get_activation
from ..formats import Format, get_format, round_to_format
from ..stats import GRAD_EXTRA_STATS, STAT_NAMES

__all__ = ["TorchStack", "CaseView", "stack_key", "tensor_stats", "grad_extra_stats"]

NORM_EPS = 1e-5
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
    amin, amax = _host(a.amin(dim=1), a.amax(dim=1))  # NaN propagates: a NaN row looks closer below
    out = _np.zeros((c, len(STAT_NAMES)))
    out[:, _I["amax"]] = amax
    out[:, [_I["mean"], _I["std"], _I["rms"]]] = _moments(r, amax)
    if native or not (amax < fmt.max).all():  # inf and NaN compare False too
        counts = {"inf_frac": torch.isinf(a).sum(dim=1), "nan_frac": torch.isnan(a).sum(dim=1),
                  "saturated_frac": (a == fmt.max).sum(dim=1)}
        if fmt.has_wider:
            over = fmt.overflows(e.abs())
            if native:
                over |= torch.isinf(r) | (torch.isnan(r) & torch.isfinite(e))
            counts["overflow_frac"] = over.sum(dim=1)
        for name, count in zip(counts, _host(*counts.values())):
            out[:, _I[name]] = count / n
    floors = _Floors(e, fmt, out[:, _I["rms"]], amax, exact_bound=not native)
    zeros, amin_nonzero = 0, amin
    zeros_possible = not (amin > 0).all()  # NaN compares False: look closer
    if zeros_possible:
        zeros, amin_nonzero = _host(_count_below(bits, 1), _amin_nonzero(bits, a.dtype))
        amin_nonzero[amin_nonzero == 0] = math.nan  # no nonzero, non-NaN element
        out[:, _I["zero_frac"]] = zeros / n
    out[:, _I["amin_nonzero"]] = amin_nonzero
    if not (amin_nonzero >= fmt.smallest_normal).all():
        [below_normal] = _host(_count_below(bits, _bits(fmt.smallest_normal, a.dtype), in_place=True))  # zeros too
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
            [flushed] = _host(((r == 0) & (e != 0)).sum(dim=1))
        else:  # exact zeros round to zero, so the difference is the flushed count
            ea = e.abs() if not _np.isnan(amax).any() else torch.nan_to_num(e.abs(), nan=1.0)  # NaN is no zero
            [nonzero_exact] = _host(ea.sign_().sum(dim=1))
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
        [n] = _host((mask & (magnitudes >= t_dev)).sum(dim=1))
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
        [amax] = _host(x.abs().amax(dim=1))
    count = _np.full(len(amax), float(n))
    if not _np.isfinite(amax).all():
        finite = torch.isfinite(x)
        x = torch.where(finite, x, 0.0)
        [count, amax] = _host(finite.sum(dim=1), x.abs().amax(dim=1))
    if x.dtype == torch.float64:
        k = _np.where(amax > 0, -_np.ceil(_np.log2(_np.where(amax > 0, amax, 1.0))), 0).astype(_np.int64)
        for part in (k // 2, k - k // 2):  # 2^k itself may lie outside float64 (subnormal rows: k ~ 1070)
            x = x * torch.from_numpy(_np.ldexp(1.0, part)).to(x.device)[:, None]
    else:
        k = _np.zeros(len(amax), dtype=_np.int64)
    [norm] = _host(torch.linalg.vector_norm(x, dim=1, dtype=torch.float64))
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


def _host(*tensors) -> list:
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
    out = _np.empty((r.shape[0], 3))
    wide = (_squares_out_of_range(amax, r.dtype, n) if r.dtype != torch.float64
            else _np.zeros(len(amax), dtype=bool))
    for rows, promote in ((_np.flatnonzero(~wide), False), (_np.flatnonzero(wide), True)):
        if rows.size:
            part = r if rows.size == len(amax) else r[torch.from_numpy(rows).to(r.device)]
            out[rows] = _moments_of(part.double() if promote else part, amax[rows])
    return out


def _moments_of(r, amax: _np.ndarray) -> _np.ndarray:
    """``_moments`` of rows that share one dtype."""
    import torch

    n = r.shape[1]
    k = _np.zeros(len(amax), dtype=_np.int64)
    rescale = _squares_out_of_range(amax, r.dtype, n)
    if rescale.any():  # largest magnitude ~1; 2^k itself may lie outside float64, so in two factors
        k[rescale] = -_np.ceil(_np.log2(amax[rescale])).astype(_np.int64)
        for part in (k // 2, k - k // 2):
            r = r * torch.tensor(_np.ldexp(1.0, part), dtype=r.dtype, device=r.device)[:, None]
    total, norm = _host(row_sum(r), torch.linalg.vector_norm(r, dim=1))
    mean, rms = total / n, norm / math.sqrt(n)
    with _np.errstate(invalid="ignore"):  # inf - inf: an overflowed row's std is NaN
        std = _np.sqrt(_np.clip(rms * rms - mean * mean, 0, None))
    second = _np.flatnonzero(~(mean * mean <= 0.25 * rms * rms))  # std^2 < 3/4 rms^2 (or NaN): cancellation
    if second.size:
        index = torch.from_numpy(second).to(r.device)
        centre = torch.tensor(mean[second], dtype=r.dtype, device=r.device)[:, None]
        [dev] = _host(torch.linalg.vector_norm(r[index] - centre, dim=1))
        std[second] = dev / math.sqrt(n)
    return _np.ldexp(_np.stack([mean, std, rms], axis=1), -k[:, None])


def row_sum(x):
    """Per-row sum of a [C, N] tensor, in an order that does not depend on C: torch sums one row
    of N >= 32768 elements in pieces across threads, but several rows one row per thread, each
    in order; a single row is therefore summed as one of two (the second is never read)."""
    return x.sum(dim=1) if x.shape[0] > 1 else x.expand(2, -1).sum(dim=1)[:1]


def _squares_out_of_range(amax: _np.ndarray, dtype, n: int) -> _np.ndarray:
    """Rows whose sum of squares leaves ``dtype``'s accurate range: above sqrt(max / n) it
    overflows; below sqrt(tiny / eps) (3e-16 in fp32) the squares fall among the subnormals and
    torch's norm loses them ([3e-23, 1e-24] gave 3.7e-23 in fp32; 2e-38 gave 0)."""
    import torch

    info = torch.finfo(dtype)
    with _np.errstate(invalid="ignore"):
        return (_np.isfinite(amax) & (amax > 0)
                & ((amax > math.sqrt(info.max / n)) | (amax < math.sqrt(info.tiny / info.eps))))


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
    [amax] = raw_amax = _host(a.amax(dim=1))  # NaN propagates: the rows the rms must mask
    if _np.isnan(amax).any():
        [amax] = _host(torch.nan_to_num(a, nan=0.0, posinf=math.inf).amax(dim=1))
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
    """Per row, rms of |values| ``a`` over the finite ones: a norm in a's own dtype where every square
    stays in its accurate range (``_squares_out_of_range``; relative error ~1e-7), else ``_exact_rms``."""
    import torch

    n = a.shape[1]
    direct = _np.isfinite(amax) & ~_squares_out_of_range(amax, a.dtype, n)  # decided per row
    if direct.all():
        [norm] = _host(torch.linalg.vector_norm(a, dim=1))
        return norm / math.sqrt(n)
    out = _np.empty(len(amax))
    for rows, exact in ((_np.flatnonzero(direct), False), (_np.flatnonzero(~direct), True)):
        if rows.size:
            part = a[torch.from_numpy(rows).to(a.device)]
            out[rows] = _exact_rms(part, amax[rows]) if exact else _host(torch.linalg.vector_norm(part, dim=1))[0] / math.sqrt(n)
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


def _fp64_to_fp32_odd(x):
    """float64 -> float32 rounding to odd (see ``formats.round_fp64_to_fp32_odd``), in torch."""
    import torch

    y = x.to(torch.float32)
    fix = (y.to(torch.float64) != x) & torch.isfinite(x)
    bits = y.view(torch.int32)
    fix &= (bits & 1) == 0
    step = torch.where(y.abs().to(torch.float64) > x.abs(), -1, 1) * fix
    return (bits + step.to(torch.int32)).view(torch.float32)


def _rounder(fmt: Format):
    """tensor -> tensor of the same dtype holding the nearest-even value in ``fmt``.

    A float64 tensor is rounded to odd in float32 first (torch's float64 -> fp16/bf16/fp8 casts
    round twice). Overflow follows the format: inf, or NaN where it has none (fp8_e4m3fn), as in
    ml_dtypes; torch's saturating fp8 cast is what native mode shows.
    """
    import torch

    if not fmt.has_wider:
        return lambda x: x
    low = fmt.torch_dtype()
    direct = fmt.np_dtype == _np.float32

    def rnd(x):
        src = x if direct or x.dtype != torch.float64 else _fp64_to_fp32_odd(x)
        r = src.to(low).to(x.dtype)
        return r if fmt.has_inf else torch.where(fmt.overflows(x.abs()), math.nan, r)

    return rnd


def _make_round_fn():
    import torch

    class _Round(torch.autograd.Function):
        """Round to the format in forward and backward; report (exact, rounded) gradients."""

        @staticmethod
        def forward(ctx, x, rounder, on_grad):
            ctx.rounder, ctx.on_grad = rounder, on_grad
            return rounder(x)

        @staticmethod
        def backward(ctx, g):
            r = ctx.rounder(g)
            if ctx.on_grad is not None:
                ctx.on_grad(g, r)
            return r, None, None

    return _Round


_ROUND_FN = None


def _round_fn():
    global _ROUND_FN
    if _ROUND_FN is None:
        _ROUND_FN = _make_round_fn()
    return _ROUND_FN


def _norm(kind: str, x):
    import torch.nn.functional as F

    if kind == "none":
        return x
    if kind == "batchnorm":  # x is [C, batch, width]: statistics over each case's batch
        c, b, w = x.shape
        flat = x.transpose(0, 1).reshape(b, c * w)
        return F.batch_norm(flat, None, None, training=True, eps=NORM_EPS).reshape(b, c, w).transpose(0, 1)
    if kind == "layernorm":
        return F.layer_norm(x, (x.shape[-1],), eps=NORM_EPS)
    if kind == "rmsnorm":
        return F.rms_norm(x, (x.shape[-1],), eps=NORM_EPS)
    raise ValueError(kind)


def _native_act(name: str):
    """The kernel a user would call for the activation in a low-precision model."""
    import torch.nn.functional as F

    return F.gelu if name == "gelu" else get_activation(name).torch_fn


class _Reducer:
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


def stack_key(case) -> tuple:
    """Cases with equal keys (and equal draws) run as one stacked [C, batch, width] chain: one
    matmul, one rounding and one statistics reduction per op for all of them. Native cases stay
    alone so that one kernel's error cannot take its neighbours down."""
    return (case.format, case.device, case.mode, case.norm, case.residual, case.loss_scale,
            case.underflow_threshold, case.activation if case.mode == "native" else None)


class TorchStack:
    """C cases that differ only in their activation, stepped together through one group's layers.

    ``views`` are per-case handles for ``engine._finish``. Statistics rows are [C, K] device
    tensors, copied to the host once at the end.
    """

    def __init__(self, cases: list, x0_64: _np.ndarray, backward: bool, rel_error: bool):
        import torch

        first = cases[0]
        self.cases = cases
        self.fmt = get_format(first.format)
        self.native = first.mode == "native"
        self.backward = backward
        self.device = torch.device(first.device)
        wide = self.fmt.wide()
        self.wide_dtype = wide.torch_dtype()
        self.acts = [get_activation(c.activation) for c in cases]
        self.norm, self.alpha, self.threshold = first.norm, first.residual, first.underflow_threshold
        self.stats = {kind: _Reducer(self.fmt, self.native, first.depth, len(cases),
                                     self.threshold if kind in ("grad", "grad_pre", "wgrad") else None)
                      for kind in ("pre", "post", "grad", "grad_pre", "wgrad")}
        self.round = _rounder(self.fmt)
        self.apply_round = _round_fn().apply if backward else (lambda x, rnd, on_grad: rnd(x))
        # bf16's subnormals are fp32 subnormals: layers whose input is that small run in fp64
        self.fp64_below = (wide.smallest_normal * 2.0 ** (wide.mantissa_bits + 2)
                           if self.fmt.smallest_subnormal < wide.smallest_normal else 0.0)
        x0 = self._to_device(round_to_format(x0_64, self.fmt))[None]
        self.input_stats = tensor_stats(x0, x0, self.fmt)
        x0 = x0.expand(len(cases), *x0.shape[1:])
        self.x = x0.to(self.fmt.torch_dtype()) if self.native else x0
        if backward and not self.native:  # the weights carry no gradient: the input starts the graph
            self.x = self.x.detach().requires_grad_(True)
        self.saved = []  # native backward: per layer (x_in, W, b, pre, post)
        self.shadow = x0.double() if rel_error else None
        self.rel_error = (torch.full((first.depth, len(cases)), math.nan, dtype=torch.float64, device=self.device)
                          if rel_error else None)  # allocated once, like the statistics tables
        self._backward_done = False
        self.views = [CaseView(self, i) for i in range(len(cases))]

    def _to_device(self, arr: _np.ndarray):
        """A correctly rounded numpy array -> wide-dtype tensor on the device (exact upcast)."""
        import torch

        host = torch.from_numpy(arr.astype(_np.float64 if self.wide_dtype == torch.float64 else _np.float32))
        return host.to(self.device, self.wide_dtype)

    # ---- forward ----

    def step(self, layer: int, w_np: _np.ndarray, b_np: _np.ndarray | None) -> None:
        w = self._to_device(w_np)
        b = None if b_np is None else self._to_device(b_np)
        if self.native:
            self._step_native(layer, w, b)
        else:
            self._step_emulated(layer, w, b)
        if self.shadow is not None:
            self._step_shadow(layer, w, b)

    def _activation(self, h, rows=None):
        """Each case's activation on its slice of the stack (``rows``: the stack rows h holds)."""
        import torch

        acts = self.acts if rows is None else [self.acts[i] for i in rows]
        if len({a.name for a in acts}) == 1:
            return acts[0].torch_fn(h)
        return torch.stack([act.torch_fn(h[i]) for i, act in enumerate(acts)])

    def _record_grad(self, kind: str, layer: int, rows=None):
        if not self.backward:
            return None
        reducer = self.stats[kind]

        def on_grad(exact, rounded):
            reducer.add(layer, exact, rounded, rows)

        return on_grad

    def _record_grad_pre(self, layer: int, x_w, rows=None):
        """grad_pre's hook, which also yields the layer's weight gradient per case from the rounded
        grad_pre g that flows on: wgrad_c = (x_c^T g_c)^T, the bmm autograd would run for a
        per-case weight, in the layer's compute dtype (fp64 where the layer ran in fp64: a bf16
        weight gradient of ~1e-61 is a real underflow, which an fp32 cast would turn into an exact
        zero). The weights themselves carry no gradient (they are drawn, not trained), so no
        W-sized copy per case is held for backward."""
        if not self.backward:
            return None
        import torch

        grad_pre, wgrad = self.stats["grad_pre"], self.stats["wgrad"]

        def on_grad(exact, rounded):
            grad_pre.add(layer, exact, rounded, rows)
            w_exact = torch.bmm(x_w.transpose(1, 2), rounded).transpose(1, 2)
            wgrad.add(layer, w_exact, self.round(w_exact), rows)

        return on_grad

    def _step_emulated(self, layer: int, w, b) -> None:
        """One layer; each case picks its own compute dtype from its own input (bf16: fp64 when its
        input amax is below ``fp64_below``), so a case computes the same alone and stacked: when the
        stacked cases disagree, each dtype's rows run as their own sub-stack."""
        import torch

        fp64 = (_host(self._input_amax())[0] < self.fp64_below if self.fp64_below
                else _np.zeros(len(self.cases), dtype=bool))
        if fp64.all() or not fp64.any():
            dtype = torch.float64 if fp64.all() else self.wide_dtype
            self.x = self._emulated_rows(layer, self.x, w, b, dtype, None)
            return
        parts, order = [], []
        for rows, dtype in ((_np.flatnonzero(~fp64), self.wide_dtype), (_np.flatnonzero(fp64), torch.float64)):
            index = torch.from_numpy(rows).to(self.device)
            parts.append(self._emulated_rows(layer, self.x[index], w, b, dtype, rows))
            order.append(rows)
        inverse = torch.from_numpy(_np.argsort(_np.concatenate(order))).to(self.device)
        self.x = torch.cat(parts)[inverse]

    def _emulated_rows(self, layer: int, x, w, b, wide_dtype, rows):
        """The layer for the stack rows ``rows`` (None: all) held by ``x``, computed in
        ``wide_dtype``; returns their post in the stack's wide dtype."""
        import torch
        import torch.nn.functional as F

        R, rnd = self.apply_round, self.round
        x_w = x.to(wide_dtype)
        pre_exact = F.linear(x_w, w.to(wide_dtype), None if b is None else b.to(wide_dtype))
        pre = R(pre_exact, rnd, self._record_grad_pre(layer, x_w.detach(), rows))
        self.stats["pre"].add(layer, pre_exact, pre, rows)
        h = pre
        if self.norm != "none":
            h = R(_norm(self.norm, h), rnd, None)
        if self.fp64_below:  # bf16: activation tails (and their derivatives) reach below fp32's normals
            h = h.to(torch.float64)
        post_exact = self._activation(h, rows)
        if self.alpha is not None:
            post_exact = x_w + self.alpha * R(post_exact, rnd, None)
        post = R(post_exact, rnd, self._record_grad("grad", layer, rows))
        self.stats["post"].add(layer, post_exact, post, rows)
        return post.to(self.wide_dtype) if post.dtype != self.wide_dtype else post

    def _input_amax(self):
        """amax of each stacked case's current layer input."""
        return self.x.detach().abs().flatten(1).amax(dim=1)

    def _tail_wide(self, x_in, pre):
        """norm -> act -> residual in the wide precision (the native layer's exact reference)."""
        out = self._activation(_norm(self.norm, pre))
        return x_in + self.alpha * out if self.alpha is not None else out

    def _step_native(self, layer: int, w, b) -> None:
        import torch
        import torch.nn.functional as F

        low = self.fmt.torch_dtype()
        wl = w.to(low)
        bl = None if b is None else b.to(low)
        if self.backward:
            wl.requires_grad_(True)
        x = self.x
        pre = F.linear(x, wl, bl)
        with torch.no_grad():
            pre_exact = F.linear(x.to(self.wide_dtype), w, b)
            self.stats["pre"].add(layer, pre_exact, pre.to(self.wide_dtype))
        h = _norm(self.norm, pre)
        post = _native_act(self.acts[0].name)(h)
        if self.alpha is not None:
            post = x + self.alpha * post
        with torch.no_grad():  # bf16: the activation's exact tail needs fp64 (as in emulated mode)
            exact_dtype = torch.float64 if self.fp64_below else self.wide_dtype
            post_exact = self._tail_wide(x.to(exact_dtype), pre.to(exact_dtype))
            self.stats["post"].add(layer, post_exact, post.to(self.wide_dtype))
        if self.backward:
            pre.retain_grad()
            post.retain_grad()
            self.saved.append((x, wl, bl, pre, post))
        self.x = post

    def _step_shadow(self, layer: int, w, b) -> None:
        import torch
        import torch.nn.functional as F

        with torch.no_grad():
            s = self.shadow
            self.shadow = self._tail_wide(s, F.linear(s, w.double(), None if b is None else b.double()))
            diff = self.x.detach().to(torch.float64) - self.shadow
            dims = (1, 2)
            self.rel_error[layer - 1] = (torch.linalg.vector_norm(diff, dim=dims) /
                                         torch.linalg.vector_norm(self.shadow, dim=dims))

    # ---- backward ----

    def run_backward(self, g64: _np.ndarray) -> None:
        """loss = sum_c sum(post_depth,c * g) * loss_scale (the same g for every case; cases do not
        interact, so each case's gradients are its own). Runs once for the whole stack."""
        if self._backward_done:
            return
        self._backward_done = True
        g = self._to_device(round_to_format(g64 * self.cases[0].loss_scale, self.fmt))
        seed_grad = g.expand(len(self.cases), *g.shape)
        if self.native:
            self.x.backward(seed_grad.to(self.x.dtype))
            self._native_backward_stats(seed_grad)
        else:
            self.x.backward(seed_grad)

    def _native_backward_stats(self, seed_grad) -> None:
        """Each native gradient against the same backward op recomputed in the wide precision from the
        layer's native operands and the native gradient arriving from above. The exact gradient
        w.r.t. post_l is the one layer l+1's wide recompute yields for its input (the seed at depth)."""
        import torch.nn.functional as F

        wide = self.wide_dtype
        exact_grad_post = seed_grad
        for layer in range(len(self.saved), 0, -1):
            x, wl, bl, pre, post = self.saved[layer - 1]
            x_w = x.detach().to(wide).requires_grad_(True)
            w_w = wl.detach().to(wide).requires_grad_(True)
            pre_w = F.linear(x_w, w_w, None if bl is None else bl.detach().to(wide))
            pre_w.retain_grad()
            self._tail_wide(x_w, pre_w).backward(post.grad.to(wide))
            self.stats["grad"].add(layer, exact_grad_post, post.grad.to(wide))
            self.stats["grad_pre"].add(layer, pre_w.grad, pre.grad.to(wide))
            self.stats["wgrad"].add(layer, w_w.grad, wl.grad.to(wide))
            exact_grad_post = x_w.grad
        self.saved.clear()

    # ---- results ----

    def case_columns(self, index: int, kind: str) -> dict:
        return columns(self.stats[kind].rows(), self.fmt, index)

    def case_input(self) -> dict:
        cols = columns(self.input_stats.numpy()[None], self.fmt, 0)
        return {k: (None if v is None else float(v[0])) for k, v in cols.items()}

    def case_rel_error(self, index: int) -> list | None:
        return None if self.rel_error is None else self.rel_error[:, index].cpu().tolist()


class CaseView:
    """One case of a ``TorchStack``, with the per-case interface ``engine._finish`` reads."""

    def __init__(self, stack: TorchStack, index: int):
        self.stack, self.index = stack, index
        self.case, self.fmt = stack.cases[index], stack.fmt

    def run_backward(self, g64) -> None:
        self.stack.run_backward(g64)

    def columns(self, kind: str) -> dict:
        return self.stack.case_columns(self.index, kind)

    def input_columns(self) -> dict:
        return self.stack.case_input()

    def rel_error_values(self) -> list | None:
        return self.stack.case_rel_error(self.index)
