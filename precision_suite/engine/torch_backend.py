"""The torch backend: stacks of cases sharing a format, on any torch device, in emulated or native mode.

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
from ..formats import Format, get_format, round_to_format
from ..stats import GRAD_EXTRA_STATS, STAT_NAMES

__all__ = ["TorchStack", "CaseView", "stack_key", "tensor_stats"]

NORM_EPS = 1e-5
_I = {name: i for i, name in enumerate(STAT_NAMES)}


def tensor_stats(exact, rounded, fmt: Format, native: bool = False):
    """Statistics of a stack of C tensors (leading dim) as a float64 [C, len(STAT_NAMES)] tensor.

    underflow: exact != 0 and rounded == 0 (native: and |exact| < smallest normal — a larger exact
    value that came out zero was cancelled inside the kernel, not lost to the format's range).
    overflow: |exact| rounds past max, i.e. >= T_of (> T_of for fp8_e4m3fn, see ``formats``)
    (native: also inf, or NaN from a finite exact value).

    Built for few, cheap passes (statistics are the suite's whole overhead over the bare chain):
    sums and norms instead of var_mean/aminmax (10-50x slower on CPU here), counts as float sums of
    ``sign`` instead of boolean masks, and counts that cannot be non-zero skipped: no zero -> no
    underflow; amax finite and < max -> no inf, NaN, overflow or saturation; emulated underflow =
    zeros(rounded) - zeros(exact). The decisions read a few numbers on the host, which costs
    nothing on the CPU and one synchronisation per tensor on a GPU.
    """
    import torch

    f64 = torch.float64
    c = rounded.shape[0]
    r = rounded.reshape(c, -1)
    e = exact.reshape(c, -1)
    n = r.shape[1]
    a = r.abs()
    amax = a.amax(dim=1)
    amin = a.amin(dim=1)
    amin_h, amax_h = torch.stack([amin, amax]).to(f64).cpu()
    none = torch.zeros(c, dtype=f64, device=r.device)
    col = dict.fromkeys(STAT_NAMES, none)
    col["mean"], col["std"], col["rms"] = _moments(r, amax_h)
    col["amax"] = amax
    nans = 0
    if native or not bool((amax_h < fmt.max).all()):  # inf and NaN compare False too
        nans = torch.isnan(r).sum(dim=1)
        col["inf_frac"] = torch.isinf(r).sum(dim=1) / n
        col["nan_frac"] = nans / n
        col["saturated_frac"] = (a == fmt.max).sum(dim=1) / n
        if fmt.has_wider:
            over = fmt.overflows(e.abs())
            if native:
                over |= torch.isinf(r) | (torch.isnan(r) & torch.isfinite(e))
            col["overflow_frac"] = over.sum(dim=1) / n
        a = torch.nan_to_num(a, nan=0.0, posinf=math.inf)  # NaN is no magnitude: keep it out of amin
    zeros_possible = not bool((amin_h > 0).all())  # NaN compares False: look closer
    zeros = 0
    col["amin_nonzero"] = amin
    if zeros_possible:
        nonzero = torch.sign(a)  # 1 where |r| > 0, 0 where r == 0 or NaN (counted in nans)
        zeros = n - nonzero.sum(dim=1) - nans
        col["zero_frac"] = zeros / n
        col["amin_nonzero"] = torch.add(a, 1 - nonzero, alpha=torch.finfo(a.dtype).max).amin(dim=1)
    if not bool((col["amin_nonzero"].cpu() >= fmt.smallest_normal).all()):
        below_normal = (fmt.smallest_normal - a).clamp_(min=0).sign_().sum(dim=1)  # zeros and (zeroed) NaNs included
        col["subnormal_frac"] = (below_normal - zeros - nans) / n
    if not fmt.has_wider:  # not available: fp64 has no wider format
        col["underflow_frac"] = col["overflow_frac"] = none + math.nan
    elif zeros_possible and native:
        col["underflow_frac"] = ((r == 0) & (e != 0) & (e.abs() < fmt.smallest_normal)).sum(dim=1) / n
    elif zeros_possible:  # exact zeros round to zero, so the difference is the underflowed count
        exact_zeros = n - torch.sign(torch.nan_to_num(e.abs(), nan=1.0)).sum(dim=1)
        col["underflow_frac"] = (zeros - exact_zeros) / n
    return torch.stack([col[name].to(f64) for name in STAT_NAMES], dim=1)


def _moments(r, amax_h):
    """Per-row mean, population std and rms (float64) from a sum and a 2-norm in r's dtype.

    std = sqrt(rms^2 - mean^2) in float64 unless |mean| is large against rms (relative error of
    that difference ~ eps * rms^2 / std^2); then the second pass, the norm of r - mean. Rows whose
    squares could overflow r's dtype are scaled by a power of two first (exact): bf16 values near
    3e38 must not turn fp32 sums into inf."""
    import torch

    n = r.shape[1]
    finite = amax_h[torch.isfinite(amax_h)]
    top = float(finite.max()) if finite.numel() else 0.0
    scale = 1.0
    if top > math.sqrt(torch.finfo(r.dtype).max / n):
        scale = 2.0 ** -math.ceil(math.log2(top))
        r = r * scale
    mean = r.sum(dim=1).double() / n
    rms = torch.linalg.vector_norm(r, dim=1).double() / math.sqrt(n)
    if bool((mean * mean <= 0.25 * rms * rms).all()):  # std^2 >= 3/4 rms^2: no cancellation to fear
        std = (rms * rms - mean * mean).clamp(min=0).sqrt()
    else:
        std = torch.linalg.vector_norm(r - mean[:, None].to(r.dtype), dim=1).double() / math.sqrt(n)
    return mean / scale, std / scale, rms / scale


def grad_extra_stats(exact, threshold: float):
    """[C, 2]: exact_amax and exact_q of each of C stacked gradients (see ``stats.GRAD_EXTRA_STATS``):
    the (m + 1)-th smallest nonzero |exact|, m = ceil(threshold * n) - 1 — one batched selection
    over rows whose zeros (and NaNs) are moved to the top."""
    import torch

    c = exact.shape[0]
    a = torch.nan_to_num(exact.detach().reshape(c, -1).abs(), nan=0.0, posinf=math.inf)
    n = a.shape[1]
    m = math.ceil(threshold * n) - 1
    top = torch.finfo(a.dtype).max
    lifted = torch.add(a, 1 - torch.sign(a), alpha=top)  # zeros -> max, nonzeros unchanged
    if m < n:  # topk of the m + 1 smallest is ~2.5x faster than kthvalue on CPU here
        q = torch.topk(lifted, m + 1, dim=1, largest=False).values[:, -1]
    else:
        q = torch.full((c,), top, dtype=a.dtype, device=a.device)
    q = torch.where(q >= top, math.inf, q)  # fewer than m + 1 nonzero values
    return torch.stack([a.amax(dim=1), q], dim=1).double()


def columns(rows: list, fmt: Format, index: int) -> dict:
    """Per-layer stat rows ([C, K] each) -> numpy columns of stack member ``index``; stats that are
    not available become None, amin_nonzero of an all-zero tensor NaN."""
    import torch

    if not rows:
        return {name: _np.zeros(0) for name in STAT_NAMES}
    table = torch.stack([row[index] for row in rows]).cpu().numpy()
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


def _make_round_fns():
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

    class _RoundGrad(_Round):
        """For values that are already rounded (the weights): identity forward, ``_Round``'s backward."""

        @staticmethod
        def forward(ctx, x, rounder, on_grad):
            ctx.rounder, ctx.on_grad = rounder, on_grad
            return x.view_as(x)

    return _Round, _RoundGrad


_ROUND_FNS = None


def _round_fns():
    global _ROUND_FNS
    if _ROUND_FNS is None:
        _ROUND_FNS = _make_round_fns()
    return _ROUND_FNS


def _norm(kind: str, x):
    import torch.nn.functional as F

    if kind == "none":
        return x
    if kind == "batchnorm":  # x is [C, batch, width]: statistics over each case's batch
        c, b, w = x.shape
        flat = x.transpose(0, 1).reshape(b, c * w)
        return F.batch_norm(flat, None, None, training=True, eps=NORM_EPS).reshape(b, c, w).transpose(0, 1)
    if kind == "layernorm":
        return F.layer_norm(x, (x.shape[-1],), eps=NORM_EPS)
    if kind == "rmsnorm":
        return F.rms_norm(x, (x.shape[-1],), eps=NORM_EPS)
    raise ValueError(kind)


def _native_act(name: str):
    """The kernel a user would call for the activation in a low-precision model."""
    import torch.nn.functional as F

    return F.gelu if name == "gelu" else get_activation(name).torch_fn


class _Reducer:
    """Turns (exact, rounded) stacks into statistics rows ``CHUNK`` layers at a time.

    At the sizes the suite runs, per-op overhead, not arithmetic, dominates the statistics: one
    reduction over CHUNK x C rows costs little more than one over C. At most CHUNK layers are
    held, so memory stays flat in depth.
    """

    CHUNK = 16
    CHUNK_ELEMENTS = 2**18  # larger tensors gain nothing from batching and would pay for the copy

    def __init__(self, fmt: Format, native: bool, grad_threshold: float | None = None):
        self.fmt, self.native, self.grad_threshold = fmt, native, grad_threshold
        self.pending: list = []  # (layer, exact, rounded)
        self.rows: list = []  # (layer, [C, K] tensor)

    def add(self, layer: int, exact, rounded) -> None:
        if exact.dim() == 2:  # a native weight gradient: native stacks hold one case
            exact, rounded = exact[None], rounded[None]
        exact, rounded = exact.detach(), rounded.detach()
        if self.pending and (exact.dtype, exact.shape) != (self.pending[0][1].dtype, self.pending[0][1].shape):
            self.flush()
        self.pending.append((layer, exact, rounded))
        if len(self.pending) >= self.CHUNK or len(self.pending) * exact.numel() >= self.CHUNK_ELEMENTS:
            self.flush()

    def flush(self) -> None:
        import torch

        if not self.pending:
            return
        layers, exact, rounded = zip(*self.pending)
        self.pending = []
        c = exact[0].shape[0]
        exact, rounded = (exact[0], rounded[0]) if len(layers) == 1 else (torch.cat(exact), torch.cat(rounded))
        stats = tensor_stats(exact, rounded, self.fmt, native=self.native)
        if self.grad_threshold is not None:
            stats = torch.cat([stats, grad_extra_stats(exact, self.grad_threshold)], dim=1)
        self.rows += [(layer, stats[i * c:(i + 1) * c]) for i, layer in enumerate(layers)]

    def by_layer(self) -> list:
        """[C, K] rows ordered by layer number (gradients arrive from depth down)."""
        self.flush()
        return [row for _, row in sorted(self.rows, key=lambda t: t[0])]


def stack_key(case) -> tuple:
    """Cases with equal keys (and equal draws) run as one stacked [C, batch, width] chain: one
    matmul, one rounding and one statistics reduction per op for all of them. Native cases stay
    alone so that one kernel's error cannot take its neighbours down."""
    return (case.format, case.device, case.mode, case.norm, case.residual, case.loss_scale,
            case.underflow_threshold, case.activation if case.mode == "native" else None)


class TorchStack:
    """C cases that differ only in their activation, stepped together through one group's layers.

    ``views`` are per-case handles for ``engine._finish``. Statistics rows are [C, K] device
    tensors, copied to the host once at the end.
    """

    def __init__(self, cases: list, x0_64: _np.ndarray, backward: bool, rel_error: bool):
        import torch

        first = cases[0]
        self.cases = cases
        self.fmt = get_format(first.format)
        self.native = first.mode == "native"
        self.backward = backward
        self.device = torch.device(first.device)
        wide = self.fmt.wide()
        self.wide_dtype = wide.torch_dtype()
        self.acts = [get_activation(c.activation) for c in cases]
        self.norm, self.alpha, self.threshold = first.norm, first.residual, first.underflow_threshold
        self.stats = {kind: _Reducer(self.fmt, self.native, self.threshold if kind in ("grad", "grad_pre", "wgrad")
                                     else None) for kind in ("pre", "post", "grad", "grad_pre", "wgrad")}
        self.round = _rounder(self.fmt)
        self.apply_round = _round_fns()[0].apply if backward else (lambda x, rnd, on_grad: rnd(x))
        # bf16's subnormals are fp32 subnormals: layers whose input is that small run in fp64
        self.fp64_below = (wide.smallest_normal * 2.0 ** (wide.mantissa_bits + 2)
                           if self.fmt.smallest_subnormal < wide.smallest_normal else 0.0)
        x0 = self._to_device(round_to_format(x0_64, self.fmt))[None]
        self.input_stats = tensor_stats(x0, x0, self.fmt)
        x0 = x0.expand(len(cases), *x0.shape[1:])
        self.x = x0.to(self.fmt.torch_dtype()) if self.native else x0
        self.saved = []  # native backward: per layer (x_in, W, b, pre, post)
        self.shadow = x0.double() if rel_error else None
        self.rel_error = [] if rel_error else None
        self._backward_done = False
        self.views = [CaseView(self, i) for i in range(len(cases))]

    def _to_device(self, arr: _np.ndarray):
        """A correctly rounded numpy array -> wide-dtype tensor on the device (exact upcast)."""
        import torch

        host = torch.from_numpy(arr.astype(_np.float64 if self.wide_dtype == torch.float64 else _np.float32))
        return host.to(self.device, self.wide_dtype)

    # ---- forward ----

    def step(self, layer: int, w_np: _np.ndarray, b_np: _np.ndarray | None) -> None:
        w = self._to_device(w_np)
        b = None if b_np is None else self._to_device(b_np)
        if self.native:
            self._step_native(layer, w, b)
        else:
            self._step_emulated(layer, w, b)
        if self.shadow is not None:
            self._step_shadow(w, b)

    def _activation(self, h):
        """Each case's activation on its slice of the stack."""
        import torch

        if len({a.name for a in self.acts}) == 1:
            return self.acts[0].torch_fn(h)
        return torch.stack([act.torch_fn(h[i]) for i, act in enumerate(self.acts)])

    def _record_grad(self, kind: str, layer: int):
        if not self.backward:
            return None
        reducer = self.stats[kind]

        def on_grad(exact, rounded):
            reducer.add(layer, exact, rounded)

        return on_grad

    def _step_emulated(self, layer: int, w, b) -> None:
        import torch
        import torch.nn.functional as F

        R, rnd = self.apply_round, self.round
        x = self.x
        wide_dtype = self.wide_dtype
        if self.fp64_below and float(self._input_amax().min()) < self.fp64_below:
            wide_dtype = torch.float64
        if self.backward:
            w = w.expand(len(self.cases), *w.shape).clone().requires_grad_(True)  # one W per case: own wgrad
            w_used = _round_fns()[1].apply(w, rnd, self._record_grad("wgrad", layer))
            pre_exact = torch.baddbmm(b.to(wide_dtype).expand(x.shape[0], 1, -1), x.to(wide_dtype),
                                      w_used.to(wide_dtype).transpose(1, 2)) if b is not None else \
                torch.bmm(x.to(wide_dtype), w_used.to(wide_dtype).transpose(1, 2))
        else:
            pre_exact = F.linear(x.to(wide_dtype), w.to(wide_dtype), None if b is None else b.to(wide_dtype))
        pre = R(pre_exact, rnd, self._record_grad("grad_pre", layer))
        self.stats["pre"].add(layer, pre_exact, pre)
        h = pre
        if self.norm != "none":
            h = R(_norm(self.norm, h), rnd, None)
        if self.fp64_below:  # bf16: activation tails (and their derivatives) reach below fp32's normals
            h = h.to(torch.float64)
        post_exact = self._activation(h)
        if self.alpha is not None:
            post_exact = x.to(wide_dtype) + self.alpha * R(post_exact, rnd, None)
        post = R(post_exact, rnd, self._record_grad("grad", layer))
        self.stats["post"].add(layer, post_exact, post)
        self.x = post.to(self.wide_dtype) if post.dtype != self.wide_dtype else post

    def _input_amax(self):
        """amax of each stacked case's current layer input."""
        return self.x.detach().abs().flatten(1).amax(dim=1)

    def _tail_wide(self, x_in, pre):
        """norm -> act -> residual in the wide precision (the native layer's exact reference)."""
        out = self._activation(_norm(self.norm, pre))
        return x_in + self.alpha * out if self.alpha is not None else out

    def _step_native(self, layer: int, w, b) -> None:
        import torch
        import torch.nn.functional as F

        low = self.fmt.torch_dtype()
        wl = w.to(low)
        bl = None if b is None else b.to(low)
        if self.backward:
            wl.requires_grad_(True)
        x = self.x
        pre = F.linear(x, wl, bl)
        with torch.no_grad():
            pre_exact = F.linear(x.to(self.wide_dtype), w, b)
            self.stats["pre"].add(layer, pre_exact, pre.to(self.wide_dtype))
        h = _norm(self.norm, pre)
        post = _native_act(self.acts[0].name)(h)
        if self.alpha is not None:
            post = x + self.alpha * post
        with torch.no_grad():  # bf16: the activation's exact tail needs fp64 (as in emulated mode)
            exact_dtype = torch.float64 if self.fp64_below else self.wide_dtype
            post_exact = self._tail_wide(x.to(exact_dtype), pre.to(exact_dtype))
            self.stats["post"].add(layer, post_exact, post.to(self.wide_dtype))
        if self.backward:
            pre.retain_grad()
            post.retain_grad()
            self.saved.append((x, wl, bl, pre, post))
        self.x = post

    def _step_shadow(self, w, b) -> None:
        import torch
        import torch.nn.functional as F

        with torch.no_grad():
            s = self.shadow
            self.shadow = self._tail_wide(s, F.linear(s, w.double(), None if b is None else b.double()))
            diff = self.x.detach().to(torch.float64) - self.shadow
            dims = (1, 2)
            self.rel_error.append(torch.linalg.vector_norm(diff, dim=dims) /
                                  torch.linalg.vector_norm(self.shadow, dim=dims))

    # ---- backward ----

    def run_backward(self, g64: _np.ndarray) -> None:
        """loss = sum_c sum(post_depth,c * g) * loss_scale (the same g for every case; cases do not
        interact, so each case's gradients are its own). Runs once for the whole stack."""
        if self._backward_done:
            return
        self._backward_done = True
        g = self._to_device(round_to_format(g64 * self.cases[0].loss_scale, self.fmt))
        seed_grad = g.expand(len(self.cases), *g.shape)
        if self.native:
            self.x.backward(seed_grad.to(self.x.dtype))
            self._native_backward_stats(seed_grad)
        else:
            self.x.backward(seed_grad)

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
            self.stats["grad"].add(layer, exact_grad_post, post.grad.to(wide))
            self.stats["grad_pre"].add(layer, pre_w.grad, pre.grad.to(wide))
            self.stats["wgrad"].add(layer, w_w.grad, wl.grad.to(wide))
            exact_grad_post = x_w.grad
        self.saved.clear()

    # ---- results ----

    def case_columns(self, index: int, kind: str) -> dict:
        return columns(self.stats[kind].by_layer(), self.fmt, index)

    def case_input(self) -> dict:
        cols = columns([self.input_stats], self.fmt, 0)
        return {k: (None if v is None else float(v[0])) for k, v in cols.items()}

    def case_rel_error(self, index: int) -> list | None:
        import torch

        return None if self.rel_error is None else torch.stack(self.rel_error)[:, index].cpu().tolist()


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
