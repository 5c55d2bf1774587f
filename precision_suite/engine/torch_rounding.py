"""Rounding to a format in torch: correct from float64 (round-to-odd through float32), an autograd
function that rounds in forward and backward and reports each (exact, rounded) gradient, and one that
scales an outliers input's channels and rounds (x_in = rnd(x m), d x = rnd(d x_in m)).
"""

from __future__ import annotations

import functools
import math

import numpy as _np

from ..formats import Format

__all__ = ["rounder", "round_fn", "scale_round_fn"]


def _fp64_to_fp32_odd(x):
    """float64 -> float32 rounding to odd (see ``formats.round_fp64_to_fp32_odd``), in torch."""
    import torch

    y = x.to(torch.float32)
    fix = (y.to(torch.float64) != x) & torch.isfinite(x)
    bits = y.view(torch.int32)
    fix &= (bits & 1) == 0
    step = torch.where(y.abs().to(torch.float64) > x.abs(), -1, 1) * fix
    return (bits + step.to(torch.int32)).view(torch.float32)


def rounder(fmt: Format):
    """tensor -> tensor of the same dtype holding the nearest-even value in ``fmt``.

    A float64 tensor is rounded to odd in float32 first (torch's float64 -> fp16/bf16/fp8 casts
    round twice). Overflow follows the format: inf, or NaN where it has none (fp8_e4m3fn), as in
    ml_dtypes; torch's saturating fp8 cast is what native mode shows. Where torch's cast to a
    format with inf saturates instead (``cast_saturates``: not so for fp8_e5m2 in torch 2.13), the
    overflowed elements are set to +-inf explicitly.
    """
    import torch

    if not fmt.has_wider:
        return lambda x: x
    low = fmt.torch_dtype()
    direct = fmt.np_dtype == _np.float32
    mark = math.nan if not fmt.has_inf else math.inf if cast_saturates(fmt.torch_name, fmt.overflow_threshold) else None

    def rnd(x):
        src = x if direct or x.dtype != torch.float64 else _fp64_to_fp32_odd(x)
        r = cast(src, low).to(x.dtype)
        if mark is None:
            return r
        over = fmt.overflows(x.abs())
        return torch.where(over, torch.copysign(torch.full_like(r, mark), x) if mark == math.inf else mark, r)

    return rnd


def cast(x, dtype):
    """torch's cast of ``x`` to ``dtype`` (one place, so that a test can stand in a saturating one)."""
    return x.to(dtype)


@functools.cache
def cast_saturates(torch_name: str, overflow_threshold: float) -> bool:
    """Does torch's cast to ``torch_name`` turn a value past the format's overflow threshold
    (twice T_of, from float64) into a finite one (saturation) rather than inf or NaN? Read from this
    torch at run time: fp8_e4m3fn's cast saturates in torch 2.13 (it has no inf), fp8_e5m2's gives
    inf, and either may change."""
    import torch

    beyond = torch.tensor([2 * overflow_threshold], dtype=torch.float64)
    return bool(torch.isfinite(cast(beyond, getattr(torch, torch_name)).double()).all())


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


@functools.cache
def round_fn():
    return _make_round_fn()


def _make_scale_round_fn():
    import torch

    class _ScaleRound(torch.autograd.Function):
        """x_in = rnd(x * m) in forward, d x = rnd(d x_in * m) in backward: the outliers input's
        channel multiplier m (width,) applied to a matmul input, rounded once each way."""

        @staticmethod
        def forward(ctx, x, m, rounder):
            ctx.m, ctx.rounder = m, rounder
            return rounder(x * m)

        @staticmethod
        def backward(ctx, g):
            return ctx.rounder(g * ctx.m), None, None

    return _ScaleRound


@functools.cache
def scale_round_fn():
    return _make_scale_round_fn()
