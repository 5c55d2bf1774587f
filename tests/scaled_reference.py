"""Statistics of a quantized tensor from their definitions (docs/scaled-formats.md), in float64 numpy
over the numpy quantizer's output: the reference the torch statistics are checked against."""

import math

import numpy as np

from precision_suite.engine.numpy_quantize import quantize_np
from precision_suite.engine.torch_qstats import QSTAT_NAMES
from precision_suite.formats import get_format
from precision_suite.quantize import element_format

F32 = np.float32


def _clipped(x, scaling, role):
    """|x * s| past the element format's overflow threshold T_of (the clamp changed the code), as the
    recipe scales (fp32 arithmetic), from the numpy quantizer's scales."""
    elem = element_format(scaling, role)
    _, _, scale = quantize_np(x, scaling, role)  # the MX scales 2^k
    c = x.shape[0]
    block = x[0].size if scaling.block == 0 else scaling.block  # per tensor: one block of the whole case
    xb = x.reshape(c, -1, block).astype(F32)
    with np.errstate(all="ignore"):
        if scaling.family == "mx":  # a power of two: x / scale is exact
            y = xb / scale[:, :, None]
        elif scaling.family == "nv":  # t = amax / (448 * 6) per tensor, sb = E4M3(amax_b / 6 / t) per block
            e4m3 = get_format("fp8_e4m3fn")
            t_amax = np.abs(xb).max(axis=(1, 2), keepdims=True)
            t = np.where(t_amax == 0, F32(1), t_amax / F32(e4m3.max * elem.max)).astype(F32)
            amax = np.abs(xb).max(axis=-1, keepdims=True)
            sb = np.minimum(amax / F32(elem.max) / t, F32(e4m3.max)).astype(e4m3.np_dtype).astype(F32)
            y = xb * np.where(sb == 0, F32(0), ((F32(1) / t) / sb).astype(F32))
        else:
            amax = np.abs(xb).max(axis=-1, keepdims=True)
            y = xb * np.where(amax == 0, F32(1), F32(elem.max) / amax).astype(F32)
    return elem.overflows(np.abs(y)).reshape(c, -1)


def bulk_rms(e: np.ndarray, rounds: int = 16) -> float:
    """r* of docs/scaled-formats.md over the finite values of e, in float64: r_0 = rms, then the rms
    of the values with |x| <= 4 r until that set is the one the last r came from, at most ``rounds``
    rounds (the definition's 16)."""
    e = np.asarray(e, dtype=np.float64).ravel()
    e = e[np.isfinite(e)]
    if not e.size:
        return math.inf
    r, members = math.sqrt(np.mean(e * e)), np.ones(e.size, dtype=bool)
    for _ in range(rounds):
        inside = np.abs(e) <= 4 * r
        if (inside == members).all():
            break
        members = inside
        r = math.sqrt(np.mean(e[members] ** 2))
    return r


def reference(x: np.ndarray, scaling, role: str = "act") -> np.ndarray:
    """Each row's statistics from the definitions (docs/scaled-formats.md), in float64 numpy."""
    elem = element_format(scaling, role)
    deq, q, scale = quantize_np(x, scaling, role)
    clipped = _clipped(x, scaling, role)
    out = np.full((x.shape[0], len(QSTAT_NAMES)), np.nan)
    for row in range(x.shape[0]):
        e, d, qr, s = (v[row].astype(np.float64).ravel() for v in (x, deq, q, scale))
        n = e.size
        r = dict.fromkeys(QSTAT_NAMES, 0.0)
        a = np.abs(d)
        r["amax"] = a.max() if not np.isnan(a).any() else math.nan
        r["mean"], r["rms"] = d.mean(), math.sqrt(np.mean(d * d))
        r["std"] = d.std()
        nonzero = a[(a != 0) & ~np.isnan(a)]
        r["amin_nonzero"] = nonzero.min() if nonzero.size else math.nan
        r["zero_frac"] = np.mean(d == 0)
        fin_e = e[np.isfinite(e)]
        rms_e = math.sqrt(np.mean(fin_e * fin_e)) if fin_e.size else math.inf
        t = elem.eps * rms_e
        flushed = (e != 0) & (d == 0)
        r["flush_frac"] = np.mean(flushed)
        r["underflow_frac"] = np.mean(flushed & (np.abs(e) >= t))
        r["subnormal_frac"] = np.mean((np.abs(qr) > 0) & (np.abs(qr) < elem.smallest_normal) & (np.abs(e) >= t))
        r["saturated_frac"] = np.mean(clipped[row] & np.isfinite(d))
        r["inf_frac"], r["nan_frac"] = np.mean(np.isinf(d)), np.mean(np.isnan(d))
        block = n if scaling.block == 0 or scaling.family == "nv" else scaling.block
        poisoned = np.repeat(~np.isfinite(e).reshape(-1, block).all(axis=1), block)
        r["overflow_frac"] = np.mean(~np.isfinite(d) & np.isfinite(e) & ~poisoned)
        both = np.isfinite(d) & np.isfinite(e)
        bulk = both & (np.abs(e) <= bulk_rms(e))
        for name, m in (("qerr", both), ("qerr_bulk", bulk)):
            den = np.linalg.norm(e[m])
            r[name] = np.linalg.norm(d[m] - e[m]) / den if den > 0 else math.nan
        good = s[np.isfinite(s) & (s != 0)]
        r["scale_log2_min"], r["scale_log2_max"] = ((np.log2(good.min()), np.log2(good.max())) if good.size
                                                    else (math.nan, math.nan))
        out[row] = [r[name] for name in QSTAT_NAMES]
    return out
