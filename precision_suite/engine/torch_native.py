"""Native mode: the ops run in the format with the backend's own kernels; the exact value of each
recorded tensor is the same op recomputed in the wide precision from the same low-precision
operands (and, backward, from the native gradient arriving from above). An outliers input's
x_in = x_{l-1} * m is rounded once to the format, as a native elementwise kernel does.
"""

from __future__ import annotations

from .torch_ops import native_act, norm
from .torch_stack import TorchStack, backward_from

__all__ = ["NativeStack"]


class NativeStack(TorchStack):
    """Native mode for one case (``stack_key`` keeps native cases alone)."""

    native = True

    def _start(self, x0):
        self.saved = []  # backward: per layer (x_{l-1}, x_in, W, b, pre, post)
        return x0.to(self.fmt.torch_dtype())

    def _matmul_input(self, x):
        """x_in: x_{l-1}, or x_{l-1} * m rounded once to the format (an elementwise product as a native
        kernel computes it); autograd gives d x_{l-1} = rnd(d x_in * m) the same way."""
        m = self.multiplier(self.wide_dtype)
        return x if m is None else (x.to(self.wide_dtype) * m).to(x.dtype)

    def _step(self, layer: int, w, b) -> None:
        import torch
        import torch.nn.functional as F

        low = self.fmt.torch_dtype()
        wl = w.to(low)
        bl = None if b is None else b.to(low)
        if self.backward:
            wl.requires_grad_(True)
        x = self.x
        x_in = self._matmul_input(x)
        pre = F.linear(x_in, wl, bl)
        with torch.no_grad():
            pre_exact = F.linear(x_in.to(self.wide_dtype), w, b)
            self.stats["pre"].add(layer, pre_exact, pre.to(self.wide_dtype))
        h = norm(self.norm, pre)
        post = native_act(self.acts[0].name)(h)
        if self.alpha is not None:
            post = x + self.alpha * post
        with torch.no_grad():  # bf16: the activation's exact tail needs fp64 (as in emulated mode)
            exact_dtype = torch.float64 if self.fp64_below else self.wide_dtype
            post_exact = self._tail_wide(x.to(exact_dtype), pre.to(exact_dtype))
            self.stats["post"].add(layer, post_exact, post.to(self.wide_dtype))
        if self.backward:
            pre.retain_grad()
            post.retain_grad()
            self.saved.append((x, x_in, wl, bl, pre, post))
        self.x = post

    def _backward(self, seed_grad) -> None:
        backward_from(self.x, seed_grad)
        self._native_backward_stats(seed_grad)

    def _native_backward_stats(self, seed_grad) -> None:
        """Each native gradient against the same backward op recomputed in the wide precision from the
        layer's native operands and the native gradient arriving from above. The exact gradient
        w.r.t. post_l is the one layer l+1's wide recompute yields for its input (the seed at depth)."""
        import torch.nn.functional as F

        wide = self.wide_dtype
        exact_grad_post = seed_grad
        m = self.multiplier(wide)
        for layer in range(len(self.saved), 0, -1):
            x, x_in, wl, bl, pre, post = self.saved[layer - 1]
            x_w = x.detach().to(wide).requires_grad_(True)
            xi_w = x_w if m is None else x_in.detach().to(wide).requires_grad_(True)
            w_w = wl.detach().to(wide).requires_grad_(True)
            pre_w = F.linear(xi_w, w_w, None if bl is None else bl.detach().to(wide))
            pre_w.retain_grad()
            backward_from(self._tail_wide(x_w, pre_w), post.grad.to(wide))
            self.stats["grad"].add(layer, exact_grad_post, post.grad.to(wide))
            self.stats["grad_pre"].add(layer, pre_w.grad, pre.grad.to(wide))
            self.stats["wgrad"].add(layer, w_w.grad, wl.grad.to(wide))
            exact_grad_post = x_w.grad if m is None else _through_multiplier(xi_w.grad, m, x_w.grad)
        self.saved.clear()


def _through_multiplier(grad_in, m, grad_residual):
    """d x_{l-1} = d x_in * m (+ the residual branch's gradient, None without a residual)."""
    g = grad_in * m
    return g if grad_residual is None else g + grad_residual

