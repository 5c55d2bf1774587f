"""``torch._scaled_mm`` for the scaled formats' native mode: quantized operands (``quantize.Quantized``)
laid out as the kernel takes them, and a probe of whether a device runs a recipe's scaling.

``scaled_mm(a, b, out_dtype, bias)`` computes a' @ b'.T (a' [M, K], b' [N, K] dequantized) as
torch._scaled_mm(A [M, K] row-major, B.t() [K, N] column-major, scale_a, scale_b), whose scales
multiply the element codes (``Quantized.scale`` is that dequantization factor). Layouts (torch 2.13,
from torch's own scaled-matmul tests and its meta checks):

    fp8_tensor  tensorwise: one fp32 scale each
    fp8_block   BlockWise1x128: scale_a (M, K/128) fp32, outer-dim-major (stride (1, M));
                BlockWise128x128 weights: scale_b (K/128, N/128); a 1x128 right operand (wgrad's
                quantized x_in.T): scale_b (K/128, N), contiguous
    mxfp8_*     BlockWise1x32 with e8m0 scales, each operand's (rows, K/32) scales in cuBLAS's
                blocked layout (128 x 4 tiles, ``_to_blocked``), flattened
    mxfp4       as mxfp8, with two fp4 codes packed per byte (float4_e2m1fn_x2, low nibble first)

K is padded with zeros to whole blocks (and to 16, which the CUDA kernels require): zero codes add
nothing. fp6 has no torch dtype, and nvfp4's two scale levels would need torch._scaled_mm_v2: those
recipes are not run natively (``unsupported``). Whether a device runs a layout is decided by
``unsupported`` with a small product checked against fp32, never assumed.
"""

from __future__ import annotations

import functools
import math

from ..formats import ELEMENT_FORMATS

__all__ = ["scaled_mm", "unsupported"]

_NOT_BUILT = {
    "mxfp6_e2m3": "torch has no fp6 dtype for torch._scaled_mm",
    "mxfp6_e3m2": "torch has no fp6 dtype for torch._scaled_mm",
    "nvfp4": "nvfp4's per-tensor and per-block scale levels need torch._scaled_mm_v2, which this suite does not call",
}
_FP4_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)  # e2m1's codes 0..7 (ml_dtypes agrees: see tests)


def _pad_k(t, multiple: int):
    """Zero-pad the last dimension to a multiple of ``multiple``."""
    import torch.nn.functional as F

    k = t.shape[-1]
    return t if k % multiple == 0 else F.pad(t, (0, multiple - k % multiple))


def _codes(q, element: str):
    """Element values (fp32, [rows, K]) -> the kernel's element tensor."""
    import torch

    if element == "fp4_e2m1":
        values = torch.tensor(_FP4_VALUES, device=q.device)
        nibble = torch.searchsorted(values, q.abs()).to(torch.uint8) | (torch.signbit(q).to(torch.uint8) << 3)
        return (nibble[:, 1::2] << 4 | nibble[:, ::2]).view(torch.float4_e2m1fn_x2)
    return q.to(ELEMENT_FORMATS[element].torch_dtype())


def _to_blocked(scales):
    """(rows, K/32) scales -> cuBLAS's block-scaling layout: 128 x 4 tiles, each stored as 32 x 16
    (rows r, r+32, r+64, r+96 of a tile side by side), zero-padded to whole tiles, flattened."""
    import torch

    rows, cols = scales.shape
    r, c = -(-rows // 128), -(-cols // 4)
    padded = torch.zeros((r * 128, c * 4), dtype=scales.dtype, device=scales.device)
    padded[:rows, :cols] = scales
    tiles = padded.view(r, 128, c, 4).permute(0, 2, 1, 3)
    return tiles.reshape(-1, 4, 32, 4).transpose(1, 2).reshape(-1, 32, 16).flatten()


def _operand(qt, scaling, rows: int, k: int, rhs: bool, tiles: bool):
    """(codes [rows, K padded], scale in the kernel's layout) of one operand quantized along K
    (its scales cover ceil(K / block) blocks per row already: ``quantize`` pads the same way)."""
    import torch

    block = scaling.block
    codes = _codes(_pad_k(qt.q.reshape(rows, k), max(16, block)), qt.element.name)
    if scaling.family == "tensor":
        return codes, qt.scale.reshape(())
    if scaling.family == "block":
        if tiles:  # 128 x 128 weight tiles, (N/128, K/128) -> (K/128, N/128)
            return codes, qt.scale.reshape(-1, math.ceil(k / 128)).t()
        s = qt.scale.reshape(rows, -1)  # 1 x 128 blocks: (rows, K/128)
        return codes, (s.t().contiguous() if rhs else s.t().contiguous().t())
    return codes, _to_blocked(qt.scale.reshape(rows, -1).to(torch.float8_e8m0fnu))  # mx: e8m0


def scaled_mm(a, b, scaling, out_dtype, bias=None, b_tiles: bool = False):
    """a' @ b'.T through torch._scaled_mm: ``a``, ``b`` Quantized along their last dim (a [M, K],
    b [N, K]; ``b_tiles``: b is a weight in fp8_block's 128 x 128 tiles), out_dtype the storage's."""
    import torch

    (m, k), n = a.q.shape[-2:], b.q.shape[-2]
    codes_a, scale_a = _operand(a, scaling, m, k, rhs=False, tiles=False)
    codes_b, scale_b = _operand(b, scaling, n, k, rhs=True, tiles=b_tiles)
    if bias is not None and out_dtype == torch.float32:  # some backends refuse a bias with fp32 output:
        # added to the fp32 result it is the same one rounding the kernel's epilogue would make
        return torch._scaled_mm(codes_a, codes_b.t(), scale_a, scale_b, out_dtype=out_dtype) + bias
    return torch._scaled_mm(codes_a, codes_b.t(), scale_a, scale_b, bias=bias, out_dtype=out_dtype)


@functools.cache
def unsupported(device: str, format_name: str) -> str | None:
    """Why ``device`` cannot run ``format_name``'s matmuls natively, or None: the recipe is not built
    here, or a 128 x 128 x 160 product of each operand pairing (forward, dgrad, wgrad) raises or
    differs from the fp32 product of the same quantized operands by more than 2^-7 (the output's
    rounding and accumulation order stay far below; a scale layout this torch reads otherwise than
    documented here does not)."""
    import torch

    from ..formats import get_format
    from ..quantize import quantize

    fmt = get_format(format_name)
    scaling = fmt.scaling
    name = format_name.split("(")[0]
    if name in _NOT_BUILT:
        return f"native {name}: {_NOT_BUILT[name]}"
    gen = torch.Generator().manual_seed(0)

    def operand(rows, k, role):
        # rows 2^-3 .. 2^3 apart: a misread scale layout is off by such factors; products stay within fp16
        x = torch.randn(rows, k, generator=gen) * torch.exp2(torch.randint(-3, 4, (rows, 1), generator=gen).float())
        return quantize(x.to(device), scaling, role, per_row=False)

    pairs = (("forward", operand(128, 128, "act"), operand(128, 128, "weight"), True),
             ("dgrad", operand(128, 128, "grad"), operand(128, 128, "weight"), True),
             ("wgrad", operand(128, 160, "grad"), operand(128, 160, "act"), False))
    out_dtype = fmt.torch_dtype()
    for what, a, b, tiles in pairs:
        try:
            got = scaled_mm(a, b, scaling, out_dtype, b_tiles=tiles and scaling.weight_block is not None)
        except Exception as exc:  # noqa: BLE001 - any refusal of the kernel means: not on this device
            message = " ".join(str(exc).split())[:240] or type(exc).__name__
            return f"torch._scaled_mm on {device} does not run {name}'s {what} scaling: {message}"
        want = a.deq @ b.deq.T
        err = (got.float() - want).abs()  # a misread layout is off by a factor 2^k, |k| >= 1: far past this
        if not bool((err <= 2.0**-7 * (want.abs() + want.abs().max())).all()):
            return (f"torch._scaled_mm on {device} gives {name}'s {what} product {float(err.max()):.3g} away from "
                    "the fp32 product of the same quantized operands: its scale layout is not read as documented")
    return None
