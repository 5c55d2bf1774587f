"""The torch backend: one chain per case, on any torch device, in emulated or native mode.

Layer l (DESIGN §2), every op's result rounded to the format (emulated) or produced in it (native):

    pre_l  = x_{l-1} @ W_l.T (+ b_l)
    post_l = x_l = act(norm(pre_l))            or   x_{l-1} + alpha * act(norm(pre_l))  (residual)

Emulated: each op runs in the wide precision (fp32; fp64 for fp32) on already-rounded operands and
its output is rounded with ``_Round``, which rounds the gradient too in backward and hands the
(exact, rounded) pair of every recorded tensor to the statistics. Native: the ops run in the
format with the backend's own kernels; the exact value of each recorded tensor is the same op
recomputed in the wide precision from the same low-precision operands.
"""

from __future__ import annotations

import math

import numpy as _np

from ..activations import get_activation
from ..formats import FORMATS, Format, get_format, round_to_format
from ..stats import GRAD_EXTRA_STATS, STAT_NAMES

__all__ = ["TorchChain", "tensor_stats"]

NORM_EPS = 1e-5
_I = {name: i for i, name in enumerate(STAT_NAMES)}


def tensor_stats(exact, rounded, fmt: Format, native: bool = False):
    """The statistics of one tensor as a float64 vector ordered like ``STAT_NAMES`` (stays on device).

    underflow: exact != 0 and rounded == 0 (native: and |exact| < smallest normal — a larger exact
    value that came out zero was cancelled inside the kernel, not lost to the format's range).
    overflow: |exact| rounds past max, i.e. >= T_of (> T_of for fp8_e4m3fn, see ``formats``)
    (native: also inf, or NaN from a finite exact value).
    """
    import torch

    r = rounded
    n = r.numel()
    a = r.abs()
    zero = r == 0
    f64 = torch.float64
    out = torch.empty(len(STAT_NAMES), dtype=f64, device=r.device)
    out[_I["rms"]] = torch.linalg.vector_norm(r, dtype=f64) / math.sqrt(n)
    out[_I["mean"]] = r.mean(dtype=f64)
    out[_I["std"]] = r.to(f64).std(correction=0) if n > 1 else 0.0
    out[_I["amax"]] = a.amax().to(f64)
    out[_I["amin_nonzero"]] = torch.where(zero, math.inf, a).amin().to(f64)
    out[_I["zero_frac"]] = zero.sum() / n
    out[_I["subnormal_frac"]] = ((a > 0) & (a < fmt.smallest_normal)).sum() / n
    out[_I["inf_frac"]] = torch.isinf(r).sum() / n
    out[_I["nan_frac"]] = torch.isnan(r).sum() / n
    out[_I["saturated_frac"]] = (a == fmt.max).sum() / n
    if fmt.has_wider:
        ea = exact.abs()
        under = zero & (exact != 0)
        over = fmt.overflows(ea)
        if native:
            under &= ea < fmt.smallest_normal
            over |= torch.isinf(r) | (torch.isnan(r) & torch.isfinite(exact))
        out[_I["underflow_frac"]] = under.sum() / n
        out[_I["overflow_frac"]] = over.sum() / n
    else:
        out[_I["underflow_frac"]] = math.nan  # not available: fp64 has no wider format
        out[_I["overflow_frac"]] = math.nan
    return out


def grad_extra_stats(exact, threshold: float):
    """[exact_amax, exact_q] (see ``stats.GRAD_EXTRA_STATS``) as a float64 vector on the device."""
    import torch

    a = exact.detach().abs().flatten().to(torch.float64)
    n = a.numel()
    m = math.ceil(threshold * n) - 1
    nonzero = a[a > 0]
    q = torch.kthvalue(nonzero, m + 1).values if nonzero.numel() > m else torch.tensor(math.inf, dtype=torch.float64, device=a.device)
    amax = a.amax() if n else torch.tensor(0.0, dtype=torch.float64, device=a.device)
    return torch.stack([amax, q])


def columns(rows: list, fmt: Format) -> dict:
    """Stack per-layer stat vectors into columns (numpy); stats that are not available become None."""
    import torch

    if not rows:
        return {name: _np.zeros(0) for name in STAT_NAMES}
    table = torch.stack(rows).cpu().numpy()
    names = STAT_NAMES + (GRAD_EXTRA_STATS if table.shape[1] > len(STAT_NAMES) else ())
    cols = {name: table[:, i].copy() for i, name in enumerate(names)}
    cols["amin_nonzero"][cols["zero_frac"] >= 1.0] = _np.nan  # no nonzero element
    if not fmt.has_wider:
        cols["underflow_frac"] = cols["overflow_frac"] = None
    return cols


def _fp64_to_fp32_odd(x):
    """float64 -> float32 rounding to odd (see ``formats.round_fp64_to_fp32_odd``), in torch."""
    import torch

    y = x.to(torch.float32)
    fix = (y.to(torch.float64) != x) & torch.isfinite(x)
    bits = y.view(torch.int32)
    fix &= (bits & 1) == 0
    step = torch.where(y.abs().to(torch.float64) > x.abs(), -1, 1) * fix
    return (bits + step.to(torch.int32)).view(torch.float32)


def _rounder(fmt: Format):
    """tensor -> tensor of the same dtype holding the nearest-even value in ``fmt``.

    A float64 tensor is rounded to odd in float32 first (torch's float64 -> fp16/bf16/fp8 casts
    round twice). Overflow follows the format: inf, or NaN where it has none (fp8_e4m3fn), as in
    ml_dtypes; torch's saturating fp8 cast is what native mode shows.
    """
    import torch

    if not fmt.has_wider:
        return lambda x: x
    low = fmt.torch_dtype()
    direct = fmt.name == "fp32"

    def rnd(x):
        src = x if direct or x.dtype != torch.float64 else _fp64_to_fp32_odd(x)
        r = src.to(low).to(x.dtype)
        return r if fmt.has_inf else torch.where(fmt.overflows(x.abs()), math.nan, r)

    return rnd


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


_ROUND = None


def _round_fn():
    global _ROUND
    if _ROUND is None:
        _ROUND = _make_round_fn()
    return _ROUND


def _norm(kind: str, x):
    import torch.nn.functional as F

    if kind == "none":
        return x
    if kind == "batchnorm":
        return F.batch_norm(x, None, None, training=True, eps=NORM_EPS)
    if kind == "layernorm":
        return F.layer_norm(x, (x.shape[-1],), eps=NORM_EPS)
    if kind == "rmsnorm":
        return F.rms_norm(x, (x.shape[-1],), eps=NORM_EPS)
    raise ValueError(kind)


def _native_act(name: str):
    """The kernel a user would call for the activation in a low-precision model."""
    import torch.nn.functional as F

    return F.gelu if name == "gelu" else get_activation(name).torch_fn


class TorchChain:
    """The state of one case's chain while the group it belongs to steps through its layers."""

    def __init__(self, case, x0_64: _np.ndarray, backward: bool, rel_error: bool):
        import torch

        self.case = case
        self.fmt = get_format(case.format)
        self.native = case.mode == "native"
        self.backward = backward
        self.device = torch.device(case.device)
        wide = self.fmt.wide()
        self.wide_dtype = wide.torch_dtype()
        self.act = get_activation(case.activation)
        self.alpha = case.residual
        self.rows = {k: [] for k in ("pre", "post", "grad", "grad_pre", "wgrad")}
        self.round = _rounder(self.fmt)
        # bf16's subnormals are fp32 subnormals: layers whose input is that small run in fp64
        self.fp64_below = (wide.smallest_normal * 2.0 ** (wide.mantissa_bits + 2)
                           if self.fmt.smallest_subnormal < wide.smallest_normal else 0.0)
        x0 = self._to_device(round_to_format(x0_64, self.fmt))
        self.input_stats = tensor_stats(x0, x0, self.fmt)
        self.x = x0 if not self.native else x0.to(self.fmt.torch_dtype())
        self.saved = []  # native backward: per layer (x_in, W, b, pre, post)
        self.params = []
        self.shadow = self._to_device(round_to_format(x0_64, self.fmt)).double() if rel_error else None
        self.rel_error = [] if rel_error else None

    def _to_device(self, arr: _np.ndarray):
        """A correctly rounded numpy array -> wide-dtype tensor on the case's device (exact upcast)."""
        import torch

        return torch.from_numpy(arr.astype(_np.float64 if self.wide_dtype == torch.float64 else _np.float32)).to(
            self.device, self.wide_dtype)

    # ---- forward ----

    def step(self, layer: int, w_np: _np.ndarray, b_np: _np.ndarray | None) -> None:
        w = self._to_device(w_np)
        b = None if b_np is None else self._to_device(b_np)
        if self.native:
            self._step_native(w, b)
        else:
            self._step_emulated(layer, w, b)
        if self.shadow is not None:
            self._step_shadow(w, b)

    def _record_grad(self, kind: str, layer: int):
        rows = self.rows[kind]

        def on_grad(exact, rounded):
            rows.append((layer, self._grad_stats(exact, rounded)))

        return on_grad if self.backward else None

    def _grad_stats(self, exact, rounded):
        """Gradient statistics: the forward ones plus ``GRAD_EXTRA_STATS`` of the exact values."""
        import torch

        stats = tensor_stats(exact, rounded, self.fmt, native=self.native)
        return torch.cat([stats, grad_extra_stats(exact, self.case.underflow_threshold)])

    def _step_emulated(self, layer: int, w, b) -> None:
        import torch
        import torch.nn.functional as F

        R = _round_fn().apply
        rnd = self.round
        x = self.x
        wide_dtype = self.wide_dtype
        if self.fp64_below and float(x.detach().abs().amax()) < self.fp64_below:
            wide_dtype = torch.float64
        if self.backward:
            w = w.clone().requires_grad_(True)
            self.params.append(w)
            w_used = R(w, rnd, self._record_grad("wgrad", layer))
        else:
            w_used = w
        pre_exact = F.linear(x.to(wide_dtype), w_used.to(wide_dtype), None if b is None else b.to(wide_dtype))
        pre = R(pre_exact, rnd, self._record_grad("grad_pre", layer))
        self.rows["pre"].append(tensor_stats(pre_exact.detach(), pre.detach(), self.fmt))
        h = pre
        if self.case.norm != "none":
            h = R(_norm(self.case.norm, h), rnd, None)
        post_exact = self.act.torch_fn(h)
        if self.alpha is not None:
            post_exact = x.to(wide_dtype) + self.alpha * R(post_exact, rnd, None)
        post = R(post_exact, rnd, self._record_grad("grad", layer))
        self.rows["post"].append(tensor_stats(post_exact.detach(), post.detach(), self.fmt))
        self.x = post.to(self.wide_dtype) if post.dtype != self.wide_dtype else post

    def _tail_wide(self, x_in, pre):
        """norm -> act -> residual in the wide precision (the native layer's exact reference)."""
        h = _norm(self.case.norm, pre)
        out = self.act.torch_fn(h)
        return x_in + self.alpha * out if self.alpha is not None else out

    def _step_native(self, w, b) -> None:
        import torch.nn.functional as F

        low = self.fmt.torch_dtype()
        wl = w.to(low)
        bl = None if b is None else b.to(low)
        if self.backward:
            wl.requires_grad_(True)
            self.params.append(wl)
        x = self.x
        pre = F.linear(x, wl, bl)
        with _no_grad():
            pre_exact = F.linear(x.to(self.wide_dtype), w, b)
            self.rows["pre"].append(tensor_stats(pre_exact, pre.to(self.wide_dtype), self.fmt, native=True))
        h = _norm(self.case.norm, pre)
        post = _native_act(self.act.name)(h)
        if self.alpha is not None:
            post = x + self.alpha * post
        with _no_grad():
            post_exact = self._tail_wide(x.to(self.wide_dtype), pre.to(self.wide_dtype))
            self.rows["post"].append(tensor_stats(post_exact, post.to(self.wide_dtype), self.fmt, native=True))
        if self.backward:
            pre.retain_grad()
            post.retain_grad()
            self.saved.append((x, wl, bl, pre, post))
        self.x = post

    def _step_shadow(self, w, b) -> None:
        import torch
        import torch.nn.functional as F

        with _no_grad():
            s = self.shadow
            pre = F.linear(s, w.double(), None if b is None else b.double())
            self.shadow = self._tail_wide(s, pre)
            post = self.x.detach().to(torch.float64)
            num = torch.linalg.vector_norm(post - self.shadow)
            den = torch.linalg.vector_norm(self.shadow)
            self.rel_error.append(num / den)

    # ---- results ----

    def columns(self, kind: str) -> dict:
        return columns(self.rows[kind], self.fmt)

    def input_columns(self) -> dict:
        cols = columns([self.input_stats], self.fmt)
        return {k: (None if v is None else float(v[0])) for k, v in cols.items()}

    def rel_error_values(self) -> list | None:
        import torch

        return None if self.rel_error is None else torch.stack(self.rel_error).cpu().tolist()

    # ---- backward ----

    def run_backward(self, g64: _np.ndarray) -> None:
        """loss = sum(post_depth * g) * loss_scale; emulated statistics arrive through ``_Round``."""
        seed_grad = self._to_device(round_to_format(g64 * self.case.loss_scale, self.fmt))
        if self.native:
            self.x.backward(seed_grad.to(self.x.dtype))
            self._native_backward_stats(seed_grad)
        else:
            self.x.backward(seed_grad)
        for kind in ("grad", "grad_pre", "wgrad"):
            # recorded in backward order (depth .. 1); store by layer number
            self.rows[kind] = [row for _, row in sorted(self.rows[kind], key=lambda t: t[0])]

    def _native_backward_stats(self, seed_grad) -> None:
        """Each native gradient against the same backward op recomputed in the wide precision from the
        layer's native operands and the native gradient arriving from above. The exact gradient
        w.r.t. post_l is the one layer l+1's wide recompute yields for its input (the seed at depth)."""
        import torch.nn.functional as F

        wide = self.wide_dtype
        exact_grad_post = seed_grad
        for layer in range(len(self.saved), 0, -1):
            x, wl, bl, pre, post = self.saved[layer - 1]
            x_w = x.detach().to(wide).requires_grad_(True)
            w_w = wl.detach().to(wide).requires_grad_(True)
            pre_w = F.linear(x_w, w_w, None if bl is None else bl.detach().to(wide))
            pre_w.retain_grad()
            self._tail_wide(x_w, pre_w).backward(post.grad.to(wide))
            stats = self._grad_stats
            self.rows["grad"].append((layer, stats(exact_grad_post, post.grad.to(wide))))
            self.rows["grad_pre"].append((layer, stats(pre_w.grad, pre.grad.to(wide))))
            self.rows["wgrad"].append((layer, stats(w_w.grad, wl.grad.to(wide))))
            exact_grad_post = x_w.grad
        self.saved.clear()


class _no_grad:
    def __enter__(self):
        import torch

        self._ctx = torch.no_grad()
        self._ctx.__enter__()

    def __exit__(self, *exc):
        return self._ctx.__exit__(*exc)
