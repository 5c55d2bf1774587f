"""Native mode for the scaled formats: each matmul is ``torch._scaled_mm`` on the quantized operands
(``torch_scaled_mm``), its output produced in the storage format S by the kernel; norm, activation
and residual run in S with the backend's kernels, as ``NativeStack``. The quantization itself is the
emulated mode's (``quantize``), so the two modes differ only in the kernels.

Exact values: pre's is the same matmul in fp32 from the same quantized operands (+ b); backward,
dgrad's and wgrad's are the fp32 products of their quantized operands, quantized from the native
gradient arriving from above; the tail's (norm, activation, residual) is recomputed in fp32 from
the native pre and that native gradient. The quantized inputs' statistics are the emulated mode's.
"""

from __future__ import annotations

import functools
from ..quantize import quantize
from .torch_native import NativeStack, _through_multiplier
from .torch_ops import native_act, norm
from .torch_qstats import QuantizedTable, quantized_stats
from .torch_scaled import GEMM_KINDS
from .torch_scaled_mm import scaled_mm
from .torch_stack import backward_from

__all__ = ["NativeScaledStack"]


def _make_native_matmul():
    import torch

    class _NativeScaledMatmul(torch.autograd.Function):
        """pre = torch._scaled_mm(...) computed by ``forward_fn``; the gradient w.r.t. x_in is what
        ``backward_fn(g)`` computes with the kernel from its own quantized operands."""

        @staticmethod
        def forward(ctx, x_in, forward_fn, backward_fn):
            ctx.backward_fn = backward_fn
            return forward_fn()

        @staticmethod
        def backward(ctx, g):
            return ctx.backward_fn(g), None, None

    return _NativeScaledMatmul


@functools.cache
def native_matmul():
    return _make_native_matmul()


class NativeScaledStack(NativeStack):
    """Native mode of a scaled format for one case (``stack_key`` keeps native cases alone)."""

    def _start(self, x0):
        self.scaling = self.fmt.scaling
        self.qstats = {kind: QuantizedTable(self.cases[0].depth, 1) for kind in GEMM_KINDS}
        self.exact_dgrad = {}  # layer -> fp32 dgrad product (the exact gradient reaching x_in)
        x = super()._start(x0)
        return x.requires_grad_(True) if self.backward else x  # the weights carry no gradient here

    def _step(self, layer: int, w, b) -> None:
        import torch
        import torch.nn.functional as F

        s, low, wide = self.scaling, self.fmt.torch_dtype(), self.wide_dtype
        tiles = s.weight_block is not None
        w32 = w.float()
        wq = quantize(w32, s, "weight", per_row=False)
        self.qstats["gemm_w"].add(layer, quantized_stats(w32[None], wq, s, "weight"))
        x = self.x
        x_in = self._matmul_input(x)
        m = self.multiplier(wide)
        with torch.no_grad():
            x32 = x_in.detach()[0].float()
            xq = quantize(x32, s, "act", per_row=False)
            exact_in = x32 if m is None else (x.detach()[0].to(wide) * m).float()
            self.qstats["gemm_in"].add(layer, quantized_stats(exact_in[None], xq, s, "act"))
        bl = None if b is None else b.to(low)

        def forward():
            return scaled_mm(xq, wq, s, low, bl, b_tiles=tiles)[None]

        if self.backward:
            wq_t = quantize(w32.T.contiguous(), s, "weight", per_row=False)
            pre = native_matmul().apply(x_in, forward, self._dgrad_wgrad(layer, x32, wq_t, low))
        else:
            pre = forward()
        with torch.no_grad():
            pre_exact = F.linear(xq.deq.to(wide), wq.deq.to(wide), None if b is None else b.to(wide))[None]
            self.stats["pre"].add(layer, pre_exact, pre.to(wide))
        post = native_act(self.acts[0].name)(norm(self.norm, pre))
        if self.alpha is not None:
            post = x + self.alpha * post
        with torch.no_grad():
            exact_dtype = torch.float64 if self.fp64_below else wide
            post_exact = self._tail_wide(x.to(exact_dtype), pre.to(exact_dtype))
            self.stats["post"].add(layer, post_exact, post.to(wide))
        if self.backward:
            pre.retain_grad()
            post.retain_grad()
            self.saved.append((x, x_in, None, None, pre, post))
        self.x = post

    def _dgrad_wgrad(self, layer: int, x32, wq_t, low):
        """The layer's backward from the native g = d loss / d pre: records grad_gemm_in and wgrad
        (exact: the fp32 product; native: the kernel's, in S) and returns the kernel's dx."""
        import torch
        import torch.nn.functional as F

        s = self.scaling

        def backward(g):
            with torch.no_grad():
                g32 = g[0].float()
                gq = quantize(g32, s, "grad", per_row=False)
                self.qstats["grad_gemm_in"].add(layer, quantized_stats(g32[None], gq, s, "grad"))
                self.exact_dgrad[layer] = F.linear(gq.deq, wq_t.deq)[None]
                dx = scaled_mm(gq, wq_t, s, low, b_tiles=s.weight_block is not None)[None]
                g_t = quantize(g32.T.contiguous(), s, "grad", per_row=False)
                x_t = quantize(x32.T.contiguous(), s, "act", per_row=False)
                dw_exact = g_t.deq @ x_t.deq.T
                dw = scaled_mm(g_t, x_t, s, low)
                self.stats["wgrad"].add(layer, dw_exact.to(self.wide_dtype), dw.to(self.wide_dtype))
            return dx

        return backward

    def _native_backward_stats(self, seed_grad) -> None:
        """grad and grad_pre against the tail recomputed in the wide precision from the native pre and
        the native gradient from above; the exact gradient reaching post_{l-1} is the fp32 dgrad
        product (times m for an outliers input) plus the residual branch's."""
        wide = self.wide_dtype
        m = self.multiplier(wide)
        exact_grad_post = seed_grad
        for layer in range(len(self.saved), 0, -1):
            x, _, _, _, pre, post = self.saved[layer - 1]
            x_w = x.detach().to(wide).requires_grad_(True)
            pre_w = pre.detach().to(wide).requires_grad_(True)
            backward_from(self._tail_wide(x_w, pre_w), post.grad.to(wide))
            self.stats["grad"].add(layer, exact_grad_post, post.grad.to(wide))
            self.stats["grad_pre"].add(layer, pre_w.grad, pre.grad.to(wide))
            dgrad = self.exact_dgrad.pop(layer).to(wide)
            exact_grad_post = _through_multiplier(dgrad, 1.0 if m is None else m, x_w.grad)
        self.saved.clear()

    def case_columns(self, index: int, kind: str) -> dict:
        if kind in self.qstats:
            return self.qstats[kind].columns(index)
        return super().case_columns(index, kind)
