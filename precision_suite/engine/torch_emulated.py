"""Emulated mode: each op runs in the wide precision (fp32; fp64 for fp32) on already-rounded
operands and its output is rounded to the format (round-to-nearest-even) by ``round_fn``, which
rounds the gradient too in backward and hands the (exact, rounded) pair of every recorded gradient
to the statistics. The wide value is the element's exact value. The matmul is ``_matmul``, which a
scaled format's stack (``torch_scaled``) replaces with its quantized one.
"""

from __future__ import annotations

import numpy as _np

from .torch_ops import norm
from .torch_rounding import round_fn, rounder, scale_round_fn
from .torch_stack import TorchStack, backward_from
from .torch_stats import host

__all__ = ["EmulatedStack"]


class EmulatedStack(TorchStack):
    """Emulated mode for a stack of cases (``torch_stack.TorchStack``)."""

    def _start(self, x0):
        self.round = rounder(self.fmt)
        self.apply_round = round_fn().apply if self.backward else (lambda x, rnd, on_grad: rnd(x))
        # the weights carry no gradient: the input starts the graph
        return x0.detach().requires_grad_(True) if self.backward else x0

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

    def _step(self, layer: int, w, b) -> None:
        """One layer; each case picks its own compute dtype from its own input (bf16: fp64 when its
        input amax is below ``fp64_below``), so a case computes the same alone and stacked: when the
        stacked cases disagree, each dtype's rows run as their own sub-stack."""
        import torch

        fp64 = (host(self._input_amax())[0] < self.fp64_below if self.fp64_below
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

        R, rnd = self.apply_round, self.round
        x_w = x.to(wide_dtype)
        pre_exact, on_grad_pre = self._matmul(layer, *self._matmul_input(x_w), w, b, rows)
        pre = R(pre_exact, rnd, on_grad_pre)
        self.stats["pre"].add(layer, pre_exact, pre, rows)
        h = pre
        if self.norm != "none":
            h = R(norm(self.norm, h), rnd, None)
        if self.fp64_below:  # bf16: activation tails (and their derivatives) reach below fp32's normals
            h = h.to(torch.float64)
        post_exact = self._activation(h, rows)
        if self.alpha is not None:
            post_exact = x_w + self.alpha * R(post_exact, rnd, None)
        post = R(post_exact, rnd, self._record_grad("grad", layer, rows))
        self.stats["post"].add(layer, post_exact, post, rows)
        return post.to(self.wide_dtype) if post.dtype != self.wide_dtype else post

    def _matmul_input(self, x_w):
        """(x_in, its exact value): x_{l-1} twice, or for an outliers input rnd(x_{l-1} * m) (its gradient
        rnd(d x_in * m)) and the product x_{l-1} * m before that rounding (exact in the layer's dtype:
        a product of two short significands)."""
        m = self.multiplier(x_w.dtype)
        if m is None:
            return x_w, x_w
        exact = x_w.detach() * m
        return (scale_round_fn().apply(x_w, m, self.round) if self.backward else self.round(exact)), exact

    def _matmul(self, layer: int, x_in, x_in_exact, w, b, rows):
        """(pre's exact value x_in @ W.T (+ b) in x_in's dtype, the hook that records grad_pre and wgrad).
        ``x_in_exact``: x_in before its rounding (a scaled format's gemm_in judges against it)."""
        import torch.nn.functional as F

        dtype = x_in.dtype
        pre_exact = F.linear(x_in, w.to(dtype), None if b is None else b.to(dtype))
        return pre_exact, self._record_grad_pre(layer, x_in.detach(), rows)

    def _input_amax(self):
        """amax of each stacked case's current layer input."""
        return self.x.detach().abs().flatten(1).amax(dim=1)

    def _backward(self, seed_grad) -> None:
        backward_from(self.x, seed_grad)
