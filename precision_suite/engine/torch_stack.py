"""The torch backend's stacks: C cases that share their draws and differ only in their activation,
stepped together as one [C, batch, width] chain on any torch device.

Layer l (docs/definitions.md#the-chain-and-layer-numbering), every op's result rounded to the format
(emulated, ``torch_emulated``) or produced in it (native, ``torch_native``):

    pre_l  = x_in @ W_l.T (+ b_l)              x_in = x_{l-1}, or rnd(x_{l-1} * m) for an outliers input
    post_l = x_l = act(norm(pre_l))            or   x_{l-1} + alpha * act(norm(pre_l))  (residual)

A scaled format quantizes x_in and W_l first (``torch_scaled``). This module holds what every mode
shares: set-up, the outlier multiplier m, the fp64 shadow chain (``--rel-error``), the seed gradient
and the per-case views; ``make_stack`` picks the mode's class.
"""

from __future__ import annotations

import math

import numpy as _np

from ..activations import get_activation
from ..draws import outlier_multiplier, parse_input
from ..formats import get_format, round_to_format
from .reducer import Reducer
from .torch_ops import norm
from .torch_stats import columns, tensor_stats

__all__ = ["TorchStack", "CaseView", "stack_key", "make_stack", "backward_from"]

GRADIENTS = ("grad", "grad_pre", "wgrad")


def stack_key(case) -> tuple:
    """Cases with equal keys (and equal draws) run as one stacked [C, batch, width] chain: one
    matmul, one rounding and one statistics reduction per op for all of them. Native cases stay
    alone so that one kernel's error cannot take its neighbours down."""
    return (case.format, case.device, case.mode, case.norm, case.residual, case.loss_scale,
            case.underflow_threshold, case.activation if case.mode == "native" else None)


def backward_from(y, g) -> None:
    """Backpropagate dL/dy = g (wide dtype, values of y's format) through ``y``'s graph as loss =
    sum(y * g) in g's dtype: the gradient reaching y is 1 * g cast to y's dtype, exactly g. A scalar
    loss spares autograd the shape check of a tensor gradient, whose first use in a process imports
    sympy (~0.9 s, paid again by every worker); the wide dtype, fp8's missing CPU sum kernel."""
    (y.to(g.dtype) * g).sum().backward()


def make_stack(cases: list, x0_64: _np.ndarray, backward: bool, rel_error: bool) -> "TorchStack":
    """The stack class of the cases' mode and format (one ``stack_key``: one mode, one format)."""
    scaled = get_format(cases[0].format).scaling is not None
    if cases[0].mode == "native":
        if scaled:
            from .torch_scaled_native import NativeScaledStack

            return NativeScaledStack(cases, x0_64, backward, rel_error)
        from .torch_native import NativeStack

        return NativeStack(cases, x0_64, backward, rel_error)
    if scaled:
        from .torch_scaled import ScaledStack

        return ScaledStack(cases, x0_64, backward, rel_error)
    from .torch_emulated import EmulatedStack

    return EmulatedStack(cases, x0_64, backward, rel_error)


class TorchStack:
    """What every mode shares. A mode implements ``_start`` (the chain's input tensor), ``_step``
    (one layer) and ``_backward`` (from the seed gradient); ``views`` are per-case handles for
    ``engine._finish``. Statistics rows go into one host table per tensor kind (``Reducer``)."""

    native = False

    def __init__(self, cases: list, x0_64: _np.ndarray, backward: bool, rel_error: bool):
        import torch

        first = cases[0]
        self.cases = cases
        self.fmt = get_format(first.format)
        self.backward = backward
        self.device = torch.device(first.device)
        wide = self.fmt.wide()
        self.wide_dtype = wide.torch_dtype()
        self.acts = [get_activation(c.activation) for c in cases]
        self.norm, self.alpha, self.threshold = first.norm, first.residual, first.underflow_threshold
        self.multiplier64 = outlier_multiplier(parse_input(first.input), first.seed, first.width)
        self._multipliers: dict = {}
        self.stats = {kind: Reducer(self.fmt, self.native, first.depth, len(cases),
                                    self.threshold if kind in GRADIENTS else None)
                      for kind in ("pre", "post", *GRADIENTS)}
        # bf16's subnormals are fp32 subnormals: layers whose input is that small run in fp64
        self.fp64_below = (wide.smallest_normal * 2.0 ** (wide.mantissa_bits + 2)
                           if self.fmt.smallest_subnormal < wide.smallest_normal else 0.0)
        x0 = self._to_device(round_to_format(x0_64, self.fmt))[None]
        self.input_stats = tensor_stats(x0, x0, self.fmt)
        x0 = x0.expand(len(cases), *x0.shape[1:])
        self.x = self._start(x0)
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

    def multiplier(self, dtype):
        """The outliers input's channel multiplier m (width,) in ``dtype`` on the device, or None."""
        if self.multiplier64 is None:
            return None
        if dtype not in self._multipliers:
            import torch

            self._multipliers[dtype] = torch.from_numpy(self.multiplier64).to(dtype).to(self.device)
        return self._multipliers[dtype]

    # ---- forward ----

    def _start(self, x0):
        """The chain's input [C, batch, width] from the rounded input in the wide dtype."""
        raise NotImplementedError

    def _step(self, layer: int, w, b) -> None:
        raise NotImplementedError

    def step(self, layer: int, w_np: _np.ndarray, b_np: _np.ndarray | None) -> None:
        w = self._to_device(w_np)
        b = None if b_np is None else self._to_device(b_np)
        self._step(layer, w, b)
        if self.shadow is not None:
            self._step_shadow(layer, w, b)

    def _activation(self, h, rows=None):
        """Each case's activation on its slice of the stack (``rows``: the stack rows h holds)."""
        import torch

        acts = self.acts if rows is None else [self.acts[i] for i in rows]
        if len({a.name for a in acts}) == 1:
            return acts[0].torch_fn(h)
        return torch.stack([act.torch_fn(h[i]) for i, act in enumerate(acts)])

    def _tail_wide(self, x_in, pre):
        """norm -> act -> residual in the wide precision (the native layer's exact reference)."""
        out = self._activation(norm(self.norm, pre))
        return x_in + self.alpha * out if self.alpha is not None else out

    def _step_shadow(self, layer: int, w, b) -> None:
        import torch
        import torch.nn.functional as F

        with torch.no_grad():
            s = self.shadow
            m = self.multiplier(torch.float64)
            s_in = s if m is None else s * m
            self.shadow = self._tail_wide(s, F.linear(s_in, w.double(), None if b is None else b.double()))
            diff = self.x.detach().to(torch.float64) - self.shadow
            dims = (1, 2)
            self.rel_error[layer - 1] = (torch.linalg.vector_norm(diff, dim=dims) /
                                         torch.linalg.vector_norm(self.shadow, dim=dims))

    # ---- backward ----

    def _backward(self, seed_grad) -> None:
        raise NotImplementedError

    def run_backward(self, g64: _np.ndarray) -> None:
        """loss = sum_c sum(post_depth,c * g) * loss_scale (the same g for every case; cases do not
        interact, so each case's gradients are its own). Runs once for the whole stack."""
        if self._backward_done:
            return
        self._backward_done = True
        g = self._to_device(round_to_format(g64 * self.cases[0].loss_scale, self.fmt))
        self._backward(g.expand(len(self.cases), *g.shape))

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
