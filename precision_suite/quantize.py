"""Torch quantizers for the scaled formats (``scaled``): scale rules, element rounding, dequantization.

A tensor x (fp32) is quantized along its last dimension, the matmul's reduction dimension, in
blocks of ``Scaling.block`` elements (0: one scale per tensor; a short last block is padded with
zeros, which change no block amax). Per block, with amax = max |x| over the block:

    fp32 scale (fp8_tensor, fp8_block):  s = max_elem / amax (amax 0 -> 1), q = Q(x s), x' = q / s
    E8M0 (mx*), floor: k = floor(log2 amax) - emax_elem;  ceil: k = ceil(log2(amax / max_elem)), exactly;
                k clamped to e8m0's [-127, 127], all-zero block -> -127,  q = Q(x 2^-k), x' = q 2^k
    E4M3 (nvfp4): t = amax_tensor / (448 * 6) (0 -> 1), s_b = E4M3(min(amax_b / 6 / t, 448)),
                q = Q(x ((1/t) / s_b)), x' = (q s_b) t;  s_b == 0 -> q = 0

Q clamps to +-max_elem (saturation) and rounds to nearest-even in the element format: a cast for
fp8, arithmetic for fp6/fp4 (no torch dtype): with e = max(floor(log2|y|), emin), the quantum is
u = 2^(e - mantissa_bits) and Q(y) = sign(y) ((|y| + c) - c) with c = 2^23 u: the fp32 sum lies in
[c, 2c), whose spacing is u, so the hardware's nearest-even addition does the rounding (e read from
the bit pattern). A block holding inf or NaN gets a NaN scale and becomes NaN. Block exponents come
from frexp, never a cast; powers of two are built from their bit patterns (x 2^k is then the exact
product torch.ldexp computes, at a fraction of its cost).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .formats import ELEMENT_FORMATS, Format

__all__ = ["Quantized", "quantize", "round_element", "element_format", "mx_exponent", "pow2", "GEMM_STATS"]

# the extra statistics of a quantized matmul input (docs/scaled-formats.md)
GEMM_STATS = ("qerr", "qerr_bulk", "scale_log2_min", "scale_log2_max")
_E8M0 = ELEMENT_FORMATS["e8m0"]
_E4M3 = ELEMENT_FORMATS["fp8_e4m3fn"]
_FP4 = ELEMENT_FORMATS["fp4_e2m1"]


@dataclass
class Quantized:
    """``deq``: the dequantized tensor x' (fp32, x's shape); ``q``: the element values;
    ``scale``: the dequantization factor x'/q per tensor (leading dim) and block, fp32
    [lead, blocks], NaN where the block held inf/NaN or its scale left fp32; ``clipped``:
    the scale rule saturated the element: |x / scale| past the element format's overflow threshold
    (``_codes``)."""

    deq: object
    q: object
    scale: object
    clipped: object
    element: Format


def element_format(scaling, role: str) -> Format:
    """The element format of a matmul input: ``role`` "act", "weight" or "grad"."""
    return ELEMENT_FORMATS[scaling.grad_element if role == "grad" else scaling.element]


def round_element(y, elem: Format):
    """Nearest-even rounding of fp32 ``y`` (|y| <= max_elem, NaN passes) to ``elem``, as fp32."""
    if elem.torch_name:
        return y.to(elem.torch_dtype()).to(y.dtype)
    return _round_magnitude(y.abs(), elem).copysign_(y)


def _round_magnitude(a, elem: Format):
    """Nearest-even rounding of fp32 magnitudes ``a`` (<= max_elem, NaN passes) to a format without a
    torch dtype: (a + c) - c with c = 2^23 u, u = 2^(max(floor(log2 a), emin) - mantissa_bits), where
    2^floor(log2 a) is a with its significand bits cleared (NaN: c = inf, and the sum stays NaN)."""
    import torch

    c = (a.view(torch.int32) & 0x7F800000).view(torch.float32)
    c.clamp_(min=elem.smallest_normal).mul_(2.0 ** (23 - elem.mantissa_bits))
    return (a + c).sub_(c)


def pow2(k):
    """2^k (fp32, exact) for integer tensors k in [-127, 127] (e8m0's range; 2^-127 is an fp32 subnormal)."""
    import torch

    normal = (k.clamp(-126, 127) + 127).bitwise_left_shift_(23).view(torch.float32)
    return torch.where(k < -126, math.ldexp(1.0, -127), normal)


def mx_exponent(amax, elem: Format, rule: str):
    """The E8M0 exponent k (int32) of blocks with max magnitude ``amax`` (fp32): floor or ceil rule,
    clamped to e8m0's range; all-zero blocks get e8m0's smallest exponent."""
    import torch

    ma, ea = torch.frexp(amax)  # amax = ma 2^ea, ma in [0.5, 1)
    if rule == "floor":
        k = ea - 1 - elem.emax
    else:  # the smallest k with amax <= max_elem 2^k, exactly: max_elem = mm 2^em, k = ea - em + (ma > mm)
        mm, em = math.frexp(elem.max)
        k = ea - em + (ma > mm).to(ea.dtype)
    lo, hi = _E8M0.emin, _E8M0.emax
    return torch.where(amax == 0, lo, torch.clamp(k, lo, hi))


def _blocks(x, block: int):
    """x [..., n] -> [..., ceil(n / block), block], zero-padded; block 0: one block of n."""
    import torch.nn.functional as F

    n = x.shape[-1]
    if block == 0 or block == n:
        return x.unsqueeze(-2)
    if n % block:
        x = F.pad(x, (0, block - n % block))
    return x.reshape(*x.shape[:-1], -1, block)


def _cut(t, shape):
    """Blocks [..., nb, b] -> x's ``shape`` (padding dropped)."""
    if t.numel() == math.prod(shape):
        return t.reshape(shape)
    flat = t.reshape(*t.shape[:-2], -1)
    return flat[..., :shape[-1]].reshape(shape)


def quantize(x, scaling, role: str, per_row: bool = True) -> Quantized:
    """Quantize fp32 ``x`` for a matmul (``role``: "act", "weight", "grad"). ``per_row``: x's
    first dim holds separate tensors (stacked cases), each with its own per-tensor scale."""
    import torch

    elem = element_format(scaling, role)
    if role == "weight" and scaling.weight_block is not None:
        return _quantize_2d(x, elem, scaling.weight_block)
    shape = x.shape
    lead = shape[0] if per_row and len(shape) > 1 else 1
    xb = _blocks(x.reshape(lead, 1, -1) if scaling.block == 0 else x.reshape(lead, -1, shape[-1]), scaling.block)
    amax = xb.abs().amax(dim=-1, keepdim=True)  # [lead, rows, blocks, 1]
    if scaling.family == "mx":
        k = mx_exponent(amax, elem, scaling.rule)
        scale = pow2(k)
        q, clipped = _codes(xb * pow2(-k), elem)
        deq = q * scale
    elif scaling.family == "nv":
        t_amax = amax.amax(dim=(1, 2), keepdim=True)
        t = torch.where(t_amax == 0, 1.0, t_amax / (_E4M3.max * elem.max))
        t = torch.where(t == 0, math.nan, t)  # the per-tensor scale left fp32 at the bottom
        sb = round_element(torch.clamp(amax / elem.max / t, max=_E4M3.max), _E4M3)
        q, clipped = _codes(torch.where(sb == 0, 0.0, xb * (_div(1.0, t) / sb)), elem)
        scale = sb * t
        deq = q * scale
    else:
        s = torch.where(amax == 0, 1.0, _div(elem.max, amax))
        s = torch.where(torch.isinf(s), math.nan, s)  # the scale left fp32 at the top
        q, clipped = _codes(xb * s, elem)
        deq, scale = q / s, _div(1.0, s)
    ok = torch.isfinite(scale) & torch.isfinite(amax)
    if not bool(ok.all()):  # one small reduction spares three passes over x when every block is fine
        deq, q, scale = (torch.where(ok, v, math.nan) for v in (deq, q, scale))
    return Quantized(_cut(deq, shape), _cut(q, shape), scale.reshape(lead, -1), _cut(clipped, shape), elem)


def _div(c: float, t):
    """c / t, correctly rounded (torch computes ``float / tensor`` as c * reciprocal(t))."""
    import torch

    return torch.full_like(t, c) / t


def _codes(y, elem: Format):
    """(Q(y), clipped): clamp, then round to the element format. ``clipped``: the clamp changed the
    code, i.e. |y| lies past the element format's overflow threshold (``Format.overflows``); a y
    just above max (an amax that the fp32 scale's rounding puts one ulp over) rounds to max anyway."""
    a = y.abs()
    clipped = elem.overflows(a)
    a.clamp_(max=elem.max)
    if elem.torch_name:
        q = a.to(elem.torch_dtype()).to(a.dtype)
    else:
        q = _round_magnitude(a, elem)
    return q.copysign_(y), clipped


def _quantize_2d(w, elem: Format, tile: tuple) -> Quantized:
    """A weight [out, in] in (rows x cols) tiles with fp32 scales s = max_elem / amax (fp8_block)."""
    import torch
    import torch.nn.functional as F

    rows, cols = tile
    o, i = w.shape
    p = F.pad(w, (0, -i % cols, 0, -o % rows))
    b = p.reshape(p.shape[0] // rows, rows, p.shape[1] // cols, cols)
    amax = b.abs().amax(dim=(1, 3), keepdim=True)
    s = torch.where(amax == 0, 1.0, _div(elem.max, amax))
    s = torch.where(torch.isinf(s), math.nan, s)
    q, clipped = _codes(b * s, elem)
    ok = torch.isfinite(s) & torch.isfinite(amax)
    deq, q, scale = (torch.where(ok, v, math.nan) for v in (q / s, q, _div(1.0, s)))

    def back(t):
        return t.expand_as(b).reshape(p.shape)[:o, :i]

    return Quantized(back(deq), back(q), scale.reshape(1, -1), back(clipped), elem)
