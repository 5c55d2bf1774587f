"""The numpy backend: an independent reference for emulated mode (numpy + ml_dtypes + scipy, CPU).

Layer l (docs/definitions.md#the-chain-and-layer-numbering), ``rnd`` = round-to-nearest-even into the format:

    x_in   = x_{l-1}, or rnd(x_{l-1} * m) for an ``outliers`` input (m: ``draws.outlier_multiplier``)
    pre_l  = rnd(x_in @ W_l.T (+ b_l))
    h_l    = rnd(norm(pre_l))                                  (only with a norm)
    post_l = rnd(act(h_l))    or    rnd(x_{l-1} + alpha * rnd(act(h_l)))   (residual)

Each op runs in the wide precision (float32 for fp16/bf16/fp8, float64 for fp32 and fp64): matmuls
accumulate in it (BLAS), norms and activations are evaluated in float64 and rounded once to it. The
wide result is the element's exact value, its rounding the stored value. A bf16 layer whose input
is small enough to reach fp32's subnormals (amax < 2^-101) runs in float64. Backward is
written out by hand and rounds the gradient at the same points; through the outlier multiplier,
d x_{l-1} = rnd(d x_in * m). Statistics are reduced by ``numpy_stats``, in float64; only the event
logic (``stats``), the draws and the result model are shared with the torch backend.

A scaled format (``scaled``; rnd rounds to its storage format S) quantizes every matmul's inputs
with ``numpy_quantize`` along the matmul's reduction dimension and multiplies the dequantized
values in the layer's compute dtype (their product there is the exact value):

    forward  pre_e = deq(Q_act(x_in)) @ deq(Q_weight(W_l)).T (+ b_l)        blocks along `in`
    dgrad    dx_in = deq(Q_grad(g_pre)) @ deq(Q_weight(W_l.T)).T             blocks along `out`
    wgrad    dW_e  = deq(Q_grad(g_pre.T)) @ deq(Q_act(x_in.T)).T             blocks along the batch

(a batch that is not a whole number of blocks is padded with zeros). The three quantized inputs
that are not wgrad's own get statistics blocks: ``gemm_in`` (x_in), ``gemm_w`` (W_l), and
``grad_gemm_in`` (g_pre), judged against the element format (``numpy_stats.gemm_stats``). Decided
here where the shared specification left it open or, in the first two points, departs from it:

- the products run in the layer's compute dtype, as the plain formats' do, not always in float32:
  float64 for an fp32 S (so that pre's exact value can overflow or underflow S) and for the
  layers of a bf16 S whose input is below ``fp64_below`` (float32 products there reach fp32's
  subnormals, where BLAS libraries differ: docs/known-deviations.md);
- gemm_in judges x_in against its exact value, which for an ``outliers`` input is x_{l-1} * m
  before its rounding (an x_in that overflows S is then an overflow there, not a NaN block from
  nowhere), as the torch backend does;
- saturated_frac counts the elements whose code the clamp to +-max_elem changed (past the
  element's overflow threshold), not every |x / scale| > max_elem (``numpy_quantize.NpQuantized``);
- overflow_frac counts the elements of blocks whose exact values were all finite but which
  dequantize to inf/NaN (the scale left its format); a block holding an inf or NaN is NaN by design;
- m multiplies in the layer's compute dtype (a scale that float32 cannot hold is used as its
  float32 value in float32 layers; the defaults 100 and 1e4 are exact).
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as _np

from ..activations import get_activation
from ..draws import outlier_multiplier, parse_input
from ..formats import Format, get_format, round_to_format
from .numpy_quantize import nonfinite_blocks, quantize_np_full
from .numpy_stats import gemm_columns, gemm_stats, grad_extra_stats, layer_columns, tensor_stats

__all__ = ["NORM_EPS", "NumpyChain"]

NORM_EPS = 1e-5


def _round(x: _np.ndarray, fmt: Format) -> _np.ndarray:
    """Wide array -> same dtype holding the nearest-even ``fmt`` values (overflow: inf, or NaN for
    fp8_e4m3fn, which has no inf; ml_dtypes rounds its tie 464 to max 448, as nearest-even must)."""
    if not fmt.has_wider:
        return x
    with _np.errstate(over="ignore", invalid="ignore"):
        if x.dtype == _np.float64:
            return round_to_format(x, fmt).astype(_np.float64)
        return x.astype(fmt.np_dtype).astype(x.dtype)  # float32 -> fmt in one cast rounds once


# ---- norms (no affine), float64 in and out ----

def _norm_axis(kind: str) -> int:
    return 0 if kind == "batchnorm" else -1  # batchnorm: batch statistics per feature (training)


def _norm(kind: str, x: _np.ndarray) -> _np.ndarray:
    """batchnorm / layernorm: (x - mean) / sqrt(var + eps), biased var; rmsnorm: x / sqrt(mean(x^2) + eps)."""
    ax = _norm_axis(kind)
    if kind == "rmsnorm":
        return x / _np.sqrt(_np.mean(x * x, axis=ax, keepdims=True) + NORM_EPS)
    c = x - _np.mean(x, axis=ax, keepdims=True)
    return c / _np.sqrt(_np.mean(c * c, axis=ax, keepdims=True) + NORM_EPS)


def _norm_grad(kind: str, x: _np.ndarray, dy: _np.ndarray) -> _np.ndarray:
    """dL/dx from dL/dy for y = norm(x), means over the norm axis, s = sqrt(var + eps) or the rms:

    batchnorm / layernorm: (dy - mean(dy) - y * mean(dy * y)) / s;   rmsnorm: (dy - y * mean(dy * y)) / s
    """
    ax = _norm_axis(kind)
    if kind == "rmsnorm":
        s = _np.sqrt(_np.mean(x * x, axis=ax, keepdims=True) + NORM_EPS)
        y = x / s
        return (dy - y * _np.mean(dy * y, axis=ax, keepdims=True)) / s
    c = x - _np.mean(x, axis=ax, keepdims=True)
    s = _np.sqrt(_np.mean(c * c, axis=ax, keepdims=True) + NORM_EPS)
    y = c / s
    return (dy - _np.mean(dy, axis=ax, keepdims=True) - y * _np.mean(dy * y, axis=ax, keepdims=True)) / s


def _f64(x: _np.ndarray) -> _np.ndarray:
    return x.astype(_np.float64, copy=False)


def _f32(x: _np.ndarray) -> _np.ndarray:
    return x.astype(_np.float32, copy=False)


GEMM_KINDS = ("gemm_in", "gemm_w", "grad_gemm_in")


class NumpyChain:
    """One case's chain, stepped by ``engine.run_cases`` layer by layer: ``step``, ``run_backward``,
    ``columns(kind)`` for pre/post/grad/grad_pre/wgrad (and a scaled format's ``GEMM_KINDS``),
    ``input_columns``, ``rel_error_values``."""

    def __init__(self, case, x0_64: _np.ndarray, backward: bool, rel_error: bool):
        if case.mode != "emulated" or case.device != "cpu":
            raise ValueError(f"the numpy backend runs on cpu in emulated mode only, got device={case.device!r} "
                             f"mode={case.mode!r}; use --backends torch for that")
        self.case = case
        self.cases, self.views = [case], [self]  # a unit of one case (engine.protocol.Unit)
        self.fmt = get_format(case.format)
        wide = self.fmt.wide()
        self.wide = _np.dtype(_np.float32 if wide.name == "fp32" else _np.float64)
        # bf16 reaches fp32's subnormals, which keep fewer bits than one correct rounding to bf16
        # needs: a layer whose input amax is below 2^(p+1) * fp32's smallest normal (p = 24) runs in
        # float64 (the rule the torch backend applies, so both judge the same layers the same way)
        self.fp64_below = (wide.smallest_normal * 2.0 ** (wide.mantissa_bits + 2)
                           if self.fmt.smallest_subnormal < wide.smallest_normal else 0.0)
        self.act = get_activation(case.activation)
        self.alpha = case.residual
        self.backward = backward
        self.scaling = self.fmt.scaling
        self.m = outlier_multiplier(parse_input(case.input), case.seed, case.width)
        kinds = ("pre", "post", "grad", "grad_pre", "wgrad") + (GEMM_KINDS if self.scaling else ())
        self.rows = {k: [] for k in kinds}
        x0 = round_to_format(x0_64, self.fmt).astype(self.wide)
        self.input_stats = tensor_stats(x0, x0, self.fmt)
        self.x = x0
        self.saved = []  # backward: per layer (dtype, x_in, W, pre, h), all rounded
        self.shadow = x0.astype(_np.float64) if rel_error else None
        self.rel_error = [] if rel_error else None

    # ---- forward ----

    def step(self, layer: int, w_np: _np.ndarray, b_np: _np.ndarray | None) -> None:
        """Advance one layer with W_l (out, in) and b_l already rounded to the format."""
        with _np.errstate(all="ignore"):
            self._step(w_np, b_np)
            if self.shadow is not None:
                self._step_shadow(w_np, b_np)

    def _layer_dtype(self, x: _np.ndarray) -> _np.dtype:
        return _np.dtype(_np.float64) if self.fp64_below and _np.max(_np.abs(x)) < self.fp64_below else self.wide

    def _tail(self, x: _np.ndarray, h: _np.ndarray, dt) -> _np.ndarray:
        """act(h) [+ residual] in float64, rounded once to ``dt``: the exact post (h already rounded).
        bf16 keeps float64: activation tails reach below fp32's normal range (as in the torch backend)."""
        dt = _np.dtype(_np.float64) if self.fp64_below else dt
        a = self.act.numpy_fn(_f64(h))
        if self.alpha is None:
            return a.astype(dt)
        a = _round(a.astype(dt), self.fmt)
        return (_f64(x) + self.alpha * _f64(a)).astype(dt)

    def _matmul_input(self, x: _np.ndarray) -> tuple[_np.ndarray, _np.ndarray]:
        """(x_in, its exact value): x twice, or for an ``outliers`` input rnd(x * m) and x * m (the
        product of two short significands, exact in the layer's dtype for the default scales)."""
        if self.m is None:
            return x, x
        exact = x * self.m.astype(x.dtype)
        return _round(exact, self.fmt), exact

    def _scale_gradient(self, g: _np.ndarray) -> _np.ndarray:
        """d x_{l-1} = rnd(d x_in * m) through an ``outliers`` input's rounding (g without one)."""
        return g if self.m is None else _round(g * self.m.astype(g.dtype), self.fmt)

    def _quantized(self, x: _np.ndarray, role: str):
        """x (holding values of the storage format) quantized along its last dim, one tensor."""
        return quantize_np_full(_f32(x), self.scaling, role, per_row=False)

    def _gemm_stats(self, exact: _np.ndarray, quant, role: str) -> _np.ndarray:
        return gemm_stats(exact, quant, nonfinite_blocks(exact, self.scaling, role, per_row=False))

    def _product(self, x_in: _np.ndarray, x_exact: _np.ndarray, w: _np.ndarray, b_np) -> _np.ndarray:
        """x_in @ W.T (+ b) in x_in's dtype; a scaled format multiplies the quantized inputs and
        records their ``gemm_in`` (judged against x_in's exact value) and ``gemm_w`` statistics."""
        dt = x_in.dtype
        bias = None if b_np is None else b_np.astype(dt)
        if self.scaling is not None:
            xq, wq = self._quantized(x_in, "act"), self._quantized(w, "weight")
            self.rows["gemm_in"].append(self._gemm_stats(x_exact, xq, "act"))
            self.rows["gemm_w"].append(self._gemm_stats(w, wq, "weight"))
            x_in, w = xq.deq.astype(dt), wq.deq.astype(dt)
        pre_e = x_in @ w.T
        return pre_e if bias is None else pre_e + bias

    def _step(self, w_np, b_np) -> None:
        fmt = self.fmt
        dt = self._layer_dtype(self.x)
        x, w = self.x.astype(dt), w_np.astype(dt)
        x_in, x_exact = self._matmul_input(x)
        pre_e = self._product(x_in, x_exact, w, b_np)
        pre = _round(pre_e, fmt)
        self.rows["pre"].append(tensor_stats(pre_e, pre, fmt))
        h = pre if self.case.norm == "none" else _round(_norm(self.case.norm, _f64(pre)).astype(dt), fmt)
        post_e = self._tail(x, h, dt)
        post = _round(post_e, fmt)
        self.rows["post"].append(tensor_stats(post_e, post, fmt))
        if self.backward:
            self.saved.append((dt, x_in, w, pre, h))
        self.x = post.astype(self.wide)

    def _step_shadow(self, w_np, b_np) -> None:
        """The fp64 chain with the same weights; rel_error = ||post - shadow|| / ||shadow||."""
        s = self.shadow
        pre = (s if self.m is None else s * self.m) @ _f64(w_np).T
        if b_np is not None:
            pre += _f64(b_np)
        h = pre if self.case.norm == "none" else _norm(self.case.norm, pre)
        a = self.act.numpy_fn(h)
        self.shadow = a if self.alpha is None else s + self.alpha * a
        num = _np.linalg.norm(_f64(self.x) - self.shadow)
        self.rel_error.append(float(num / _np.linalg.norm(self.shadow)))

    # ---- backward ----

    def run_backward(self, g64: _np.ndarray) -> None:
        """loss = sum(post_depth * g) * loss_scale; records grad, grad_pre, wgrad (grad_gemm_in) per layer."""
        thr = self.case.underflow_threshold
        seed = round_to_format(g64 * self.case.loss_scale, self.fmt).astype(self.wide)
        rows = {k: [] for k in ("grad", "grad_pre", "wgrad") + (("grad_gemm_in",) if self.scaling else ())}
        with _np.errstate(all="ignore"):
            for kind, exact, rounded in self._gradients(seed):
                if kind == "grad_gemm_in":  # rounded: the quantized tensor
                    rows[kind].append(self._gemm_stats(exact, rounded, "grad"))
                    continue
                rows[kind].append(_np.concatenate([tensor_stats(exact, rounded, self.fmt),
                                                   grad_extra_stats(exact, thr, self.fmt)]))
        for kind, r in rows.items():
            self.rows[kind] = r[::-1]  # produced depth .. 1; stored by layer number

    def _gradients(self, seed: _np.ndarray) -> Iterator[tuple[str, _np.ndarray, _np.ndarray]]:
        """Backprop from dL/dpost_depth = seed, yielding (kind, exact, rounded) from layer depth down.

        Per layer, each product in float64 rounded once to the layer's dtype, then to the format:
            g_post = rnd(dL/dpost)             g_act = rnd(alpha * g_post) (residual) else g_post
            dL/dh  = g_act * act'(h)           dL/dpre = norm'(rnd(dL/dh)) (norm) else dL/dh
            g_pre  = rnd(dL/dpre)              dL/dW = g_pre.T @ x_in,   dL/dx_in = g_pre @ W
            dL/dx  = rnd(dL/dx_in * m) (outliers) or dL/dx_in,  + g_post (residual)
        A scaled format quantizes the dgrad and wgrad inputs (``_gradient_products``) and yields
        ("grad_gemm_in", g_pre, its quantized dgrad input) too.
        """
        fmt, alpha = self.fmt, self.alpha
        g_e = seed
        while self.saved:
            dt, x, w, pre, h = self.saved.pop()
            g_post = _round(g_e, fmt)  # g_e keeps the dtype of the layer above that produced it
            yield "grad", g_e, g_post
            g_post = g_post.astype(dt)
            g_act = g_post if alpha is None else _round((alpha * _f64(g_post)).astype(dt), fmt)
            gh_e = (_f64(g_act) * self.act.numpy_grad(_f64(h))).astype(dt)
            if self.case.norm == "none":
                gpre_e = gh_e
            else:
                gpre_e = _norm_grad(self.case.norm, _f64(pre), _f64(_round(gh_e, fmt))).astype(dt)
            g_pre = _round(gpre_e, fmt)
            yield "grad_pre", gpre_e, g_pre
            if self.scaling is None:
                gw_e, g_e = g_pre.T @ x, g_pre @ w
            else:
                gq = self._quantized(g_pre, "grad")
                yield "grad_gemm_in", g_pre, gq
                gw_e, g_e = self._gradient_products(gq.deq, g_pre, x, w)
            yield "wgrad", gw_e, _round(gw_e, fmt)
            g_e = self._scale_gradient(g_e)
            if alpha is not None:
                g_e += g_post

    def _gradient_products(self, g_q: _np.ndarray, g_pre: _np.ndarray, x_in: _np.ndarray, w: _np.ndarray):
        """A scaled format's (dW, dx_in) in the layer's dtype: dgrad from the quantized g_pre ``g_q``
        and W quantized along `out`; wgrad from g_pre.T and x_in.T, both quantized along the batch
        (their statistics are not recorded)."""
        dt = x_in.dtype
        wt = self._quantized(w.T, "weight").deq.astype(dt)  # [in, out]
        g_t = self._quantized(g_pre.T, "grad").deq.astype(dt)  # [out, batch]
        x_t = self._quantized(x_in.T, "act").deq.astype(dt)  # [in, batch]
        return g_t @ x_t.T, g_q.astype(dt) @ wt.T

    # ---- results ----

    def columns(self, kind: str) -> dict:
        if kind in GEMM_KINDS:
            return gemm_columns(self.rows[kind])
        return layer_columns(self.rows[kind], self.fmt)

    def input_columns(self) -> dict:
        cols = layer_columns([self.input_stats], self.fmt)
        return {k: (None if v is None else float(v[0])) for k, v in cols.items()}

    def rel_error_values(self) -> list | None:
        return self.rel_error
