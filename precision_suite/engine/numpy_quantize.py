"""The numpy backend's own quantizers of the scaled formats: numpy + ml_dtypes, no torch.

The same recipes as ``precision_suite.quantize`` (docs/scaled-formats.md), written independently:
elements round with ml_dtypes' float32 -> element casts after the clamp (ml_dtypes turns fp4/fp6
NaN into -0, so NaN is put back from the input), exponents come from ``numpy.frexp``, and blocks
are cut with numpy reshapes (a last dimension that is not a whole number of blocks is padded with
zeros, which change no block's amax). ``quantize_np_full`` returns what ``quantize.Quantized``
holds, as float32 arrays; ``quantize_np`` its (deq, q, scale).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as _np

from ..formats import ELEMENT_FORMATS, Format
from ..quantize import element_format

__all__ = ["NpQuantized", "quantize_np", "quantize_np_full", "nonfinite_blocks"]

_E4M3, _E8M0, _FP4 = ELEMENT_FORMATS["fp8_e4m3fn"], ELEMENT_FORMATS["e8m0"], ELEMENT_FORMATS["fp4_e2m1"]
_F32 = _np.float32


def _cast(v: _np.ndarray, elem: Format) -> _np.ndarray:
    """Nearest-even float32 -> ``elem`` -> float32 for |v| <= max; NaN stays NaN."""
    with _np.errstate(invalid="ignore"):
        out = v.astype(elem.np_dtype).astype(_F32)
    return _np.where(_np.isnan(v), _F32(_np.nan), out)


@dataclass
class NpQuantized:
    """``quantize.Quantized`` in numpy: ``deq`` (x' = q * scale, x's shape), ``q`` (the element
    values), ``scale`` ([lead, blocks], NaN where a block held inf/NaN or its scale left fp32) and
    ``saturated``: the elements the clamp to +-max_elem changed, i.e. whose
    scaled value y = x / scale lies past the element format's overflow threshold
    T_of = max + ulp(max)/2 (``Format.overflows``), in blocks that did not become NaN. Counting
    |y| > max instead would also count values that round to max anyway: a block's own amax whenever
    the fp32 scale's rounding puts y = amax * s one fp32 ulp above max (fp8_tensor, fp8_block), and
    nvfp4's block amax whenever the E4M3 block scale rounds down (y up to 6.375: about half its
    blocks). (The torch quantizer's ``clipped`` is the same rule, written independently.)"""

    deq: _np.ndarray
    q: _np.ndarray
    scale: _np.ndarray
    saturated: _np.ndarray
    element: Format


def _blocks(x: _np.ndarray, block: int, tile: tuple | None, per_row: bool) -> tuple[_np.ndarray, tuple]:
    """x -> [lead, blocks, elements] and what ``_unblock`` needs to put it back."""
    if tile is not None:
        (n, k), (tr, tc) = x.shape, tile
        t = x.reshape(n // tr, tr, k // tc, tc).transpose(0, 2, 1, 3)
        return _np.ascontiguousarray(t).reshape(1, -1, tr * tc), ("2d", n, k, tr, tc)
    lead = x.shape[0] if per_row and x.ndim > 1 else 1
    if block == 0:
        return x.reshape(lead, 1, -1), ("flat", x.shape, 0)
    n = x.shape[-1]
    pad = -n % block
    rows = x.reshape(-1, n)
    if pad:  # each row's short last block is filled with zeros, never with the next row's elements
        rows = _np.pad(rows, ((0, 0), (0, pad)))
    return rows.reshape(lead, -1, block), ("flat", x.shape, pad)


def _unblock(b: _np.ndarray, how: tuple) -> _np.ndarray:
    if how[0] == "2d":
        _, n, k, tr, tc = how
        return b.reshape(n // tr, k // tc, tr, tc).transpose(0, 2, 1, 3).reshape(n, k)
    _, shape, pad = how
    return b.reshape(-1, shape[-1] + pad)[:, :shape[-1]].reshape(shape)


def quantize_np(x: _np.ndarray, scaling, role: str, per_row: bool = True):
    """(deq, q, scale [lead, blocks]) of float32 ``x`` quantized along its last dim."""
    r = quantize_np_full(x, scaling, role, per_row)
    return r.deq, r.q, r.scale


@_np.errstate(all="ignore")
def quantize_np_full(x: _np.ndarray, scaling, role: str, per_row: bool = True) -> NpQuantized:
    """Float32 ``x`` quantized along its last dim for a matmul (``role``: "act", "weight", "grad");
    ``per_row``: x's first dim holds separate tensors, each with its own per-tensor scale."""
    elem = element_format(scaling, role)
    xb, how = _blocks(_np.asarray(x, dtype=_F32), scaling.block, scaling.weight_block if role == "weight" else None,
                      per_row)
    amax = _np.max(_np.abs(xb), axis=-1, keepdims=True)
    lim = _F32(elem.max)
    if scaling.family in ("tensor", "block"):
        s = _np.where(amax == 0, _F32(1), lim / amax).astype(_F32)
        s[_np.isinf(s)] = _np.nan
        y = xb * s
        q = _cast(_np.clip(y, -lim, lim), elem)
        deq, scale = q / s, _F32(1) / s
    elif scaling.family == "mx":
        if scaling.rule == "floor":
            e = _np.frexp(amax)[1] - 1 - elem.emax
        else:
            # the smallest e with amax <= max 2^e, compared exactly in float64 (no rounded ratio)
            e = _np.ceil(_np.log2(_np.where(amax > 0, amax, 1).astype(_np.float64) / elem.max)).astype(_np.int64)
            e = _np.where(_np.ldexp(elem.max, e - 1) >= amax, e - 1, e)
            e = _np.where(_np.ldexp(elem.max, e) < amax, e + 1, e)
        e = _np.where(amax == 0, _E8M0.emin, _np.clip(e, _E8M0.emin, _E8M0.emax))
        y = xb * _np.ldexp(_F32(1), -e).astype(_F32)
        q = _cast(_np.clip(y, -lim, lim), elem)
        scale = _np.ldexp(_F32(1), e).astype(_F32)
        deq = q * scale
    else:
        t_amax = _np.max(_np.abs(xb), axis=(1, 2), keepdims=True)
        big = _np.where(t_amax == 0, _F32(1), t_amax / _F32(_E4M3.max * _FP4.max)).astype(_F32)
        big[big == 0] = _np.nan
        bs = _cast(_np.minimum(amax / _F32(_FP4.max) / big, _F32(_E4M3.max)).astype(_F32), _E4M3)
        zero = bs == 0
        recip = ((_F32(1) / big) / bs).astype(_F32)
        y = _np.where(zero, _F32(0), xb * _np.where(zero, _F32(0), recip))
        q = _cast(_np.clip(y, -_F32(_FP4.max), _F32(_FP4.max)).astype(_F32), _FP4)
        scale = (bs * big).astype(_F32)
        deq = q * scale
    bad = ~_np.isfinite(scale) | ~_np.isfinite(amax)
    saturated = elem.overflows(_np.abs(y)) & ~bad  # a block holding inf/NaN is NaN, not saturated
    deq, q, scale = (_np.where(bad, _F32(_np.nan), a).astype(_F32) for a in (deq, q, scale))
    return NpQuantized(_unblock(deq, how), _unblock(q, how), scale.reshape(scale.shape[0], -1),
                       _unblock(saturated, how), elem)


def nonfinite_blocks(x: _np.ndarray, scaling, role: str, per_row: bool = True) -> _np.ndarray:
    """Per element of ``x``: does its block (as ``quantize_np_full`` cuts x) hold an inf or NaN?"""
    xb, how = _blocks(~_np.isfinite(_np.asarray(x)), scaling.block,
                      scaling.weight_block if role == "weight" else None, per_row)
    return _unblock(_np.broadcast_to(xb.any(axis=-1, keepdims=True), xb.shape), how)
