"""Emulated mode for the scaled formats (docs/scaled-formats.md): every matmul's inputs quantized with
the recipe's scales, the product accumulated in the compute precision, every result rounded to the
storage format S. Layer l, rnd = round to S:

    xq = deq(Q_act(x_in))        per case, blocks along the width (the reduction dimension)
    wq = deq(Q_w(W_l))           W_l already rounded to S; once per layer for the whole stack
    pre_l = rnd(xq @ wq.T (+ b_l)),  then norm, activation and residual as ``EmulatedStack``

Backward (``_QuantizedMatmul``), from g = grad_pre (rounded to S):

    dgrad  dx = deq(Q_grad(g)) @ deq(Q_w(W_l)) (W_l quantized along `out`)   -> flows to x_in
    wgrad  dW = deq(Q_grad(g.T)) @ deq(Q_act(x_in.T)).T (both along the batch), recorded as rnd(dW)

The quantized inputs get statistics of their own (``torch_qstats``): ``gemm_in`` (xq), ``gemm_w``
(wq), ``grad_gemm_in`` (the dgrad's quantized g).
"""

from __future__ import annotations

import functools
from ..quantize import quantize
from .torch_emulated import EmulatedStack
from .torch_qstats import QuantizedTable, quantized_stats

__all__ = ["ScaledStack", "GEMM_KINDS"]

GEMM_KINDS = ("gemm_in", "gemm_w", "grad_gemm_in")


def _make_quantized_matmul():
    import torch
    import torch.nn.functional as F

    class _QuantizedMatmul(torch.autograd.Function):
        """pre = xq @ wq.T (+ b) from the quantized operands; the gradient w.r.t. x_in is what
        ``backward_fn(g)`` computes from its own quantized operands (the weights get none)."""

        @staticmethod
        def forward(ctx, x_in, xq, wq, bias, backward_fn):
            ctx.backward_fn = backward_fn
            return F.linear(xq, wq, bias)

        @staticmethod
        def backward(ctx, g):
            return ctx.backward_fn(g), None, None, None, None

    return _QuantizedMatmul


@functools.cache
def quantized_matmul():
    return _make_quantized_matmul()


class ScaledStack(EmulatedStack):
    """Emulated mode of a scaled format for a stack of cases: ``EmulatedStack`` with the quantized matmul."""

    def _start(self, x0):
        self.scaling = self.fmt.scaling
        depth, cases = self.cases[0].depth, len(self.cases)
        self.qstats = {kind: QuantizedTable(depth, cases) for kind in GEMM_KINDS}
        return super()._start(x0)

    def _step(self, layer: int, w, b) -> None:
        """Quantize W_l once for every case (forward along `in`; backward along `out`), then the layer."""
        w32 = w.float()
        wq = quantize(w32, self.scaling, "weight", per_row=False)
        self.qstats["gemm_w"].add(layer, quantized_stats(w32[None], wq, self.scaling, "weight"))
        self.wq = wq.deq
        self.wq_t = quantize(w32.T.contiguous(), self.scaling, "weight", per_row=False).deq if self.backward else None
        super()._step(layer, w, b)

    def _matmul(self, layer: int, x_in, x_in_exact, w, b, rows):
        """pre's exact value xq @ wq.T (+ b) in x_in's dtype, recording gemm_in; the grad_pre hook.
        gemm_in judges xq against x_in's exact value, x_{l-1} * m for an outliers input: an x_in that
        overflowed S is an overflow there (its block is NaN), not a NaN from nowhere."""
        import torch.nn.functional as F

        dtype = x_in.dtype
        x32 = x_in.detach().float()  # holds S's values exactly (fp64 rows too)
        xq = quantize(x32, self.scaling, "act", per_row=True)
        exact = x32 if x_in_exact is x_in else x_in_exact.float()
        self.qstats["gemm_in"].add(layer, quantized_stats(exact, xq, self.scaling, "act"), rows)
        operands = (xq.deq.to(dtype), self.wq.to(dtype), None if b is None else b.to(dtype))
        if not self.backward:
            return F.linear(*operands), None
        backward_fn = self._dgrad_wgrad(layer, x32, self.wq_t, rows)
        return quantized_matmul().apply(x_in, *operands, backward_fn), self._record_grad("grad_pre", layer, rows)

    def _dgrad_wgrad(self, layer: int, x32, wq_t, rows):
        """The layer's backward from g = grad_pre: records grad_gemm_in and wgrad, returns dx."""
        import torch
        import torch.nn.functional as F

        scaling = self.scaling

        def backward(g):
            dtype = g.dtype
            g32 = g.float()
            gq = quantize(g32, scaling, "grad", per_row=True)
            self.qstats["grad_gemm_in"].add(layer, quantized_stats(g32, gq, scaling, "grad"), rows)
            dx = F.linear(gq.deq.to(dtype), wq_t.to(dtype))
            g_t = quantize(g32.transpose(1, 2), scaling, "grad", per_row=True).deq.to(dtype)
            x_t = quantize(x32.transpose(1, 2), scaling, "act", per_row=True).deq.to(dtype)
            dw = torch.bmm(g_t, x_t.transpose(1, 2))
            self.stats["wgrad"].add(layer, dw, self.round(dw), rows)
            return dx

        return backward

    def case_columns(self, index: int, kind: str) -> dict:
        if kind in self.qstats:
            return self.qstats[kind].columns(index)
        return super().case_columns(index, kind)
