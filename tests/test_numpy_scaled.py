"""The numpy backend's scaled formats and outliers input: a 3-layer chain against the same chain
written out here (torch's quantizer, numpy products, the statistics from their formulas), forward
and backward, per recipe; qerr of Gaussian input against the expected error integrated from the
element grid and the block-maximum distribution; the outlier channels in every layer's matmul
input; and gradients through the outlier multiplier against finite differences."""

from __future__ import annotations

import math

import ml_dtypes
import numpy as np
import pytest
from scipy.integrate import trapezoid
from scipy.special import ndtr

from precision_suite import run_matrix
from precision_suite.engine.numpy_backend import NumpyChain
from precision_suite.engine.numpy_quantize import quantize_np_full
from precision_suite.formats import ELEMENT_FORMATS, get_format
from precision_suite.scaled import SCALED_NAMES
from precision_suite.spec import Case
from scaled_reference import bulk_rms

torch = pytest.importorskip("torch")
from precision_suite.quantize import quantize  # noqa: E402  (torch: the test's own quantizer)

BF16 = ml_dtypes.bfloat16


def _rnd(a):
    """float32 -> bf16 (one nearest-even cast) -> float32: the storage rounding of the chain."""
    return np.asarray(a, dtype=np.float32).astype(BF16).astype(np.float32)


def _q(a, scaling, role):
    """torch's quantizer over one tensor: the test's independent quantization."""
    return quantize(torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32)), scaling, role, per_row=False)


def _rms(a):
    return float(np.sqrt(np.mean(np.square(np.asarray(a, dtype=np.float64)))))


def _gemm_expected(x, qt) -> dict:
    """Every statistic of a quantized matmul input from its definition: x the unquantized tensor,
    qt torch's ``Quantized``."""
    elem = qt.element
    x = np.asarray(x, dtype=np.float64).ravel()
    d = qt.deq.numpy().astype(np.float64).ravel()
    q = qt.q.numpy().astype(np.float64).ravel()
    scale = qt.scale.numpy().astype(np.float64).ravel()
    n = x.size
    significant = np.abs(x) >= elem.eps * _rms(x)
    flushed = (x != 0) & (d == 0)
    # saturated: |x / scale| past the element's overflow threshold; scale = deq / q where q != 0
    coded = q != 0
    saturated = np.zeros(n, dtype=bool)
    saturated[coded] = elem.overflows(np.abs(x[coded]) * np.abs(q[coded]) / np.abs(d[coded]))
    bulk = np.abs(x) <= bulk_rms(x)
    return {
        "rms": _rms(d), "mean": d.mean(), "amax": np.abs(d).max(), "zero_frac": np.mean(d == 0),
        "flush_frac": np.mean(flushed), "underflow_frac": np.mean(flushed & significant),
        "subnormal_frac": np.mean((np.abs(q) > 0) & (np.abs(q) < elem.smallest_normal) & significant),
        "overflow_frac": 0.0, "nan_frac": 0.0, "saturated_frac": np.mean(saturated),
        "qerr": np.linalg.norm(d - x) / np.linalg.norm(x),
        "qerr_bulk": np.linalg.norm((d - x)[bulk]) / np.linalg.norm(x[bulk]),
        "scale_log2_min": np.log2(scale).min(), "scale_log2_max": np.log2(scale).max(),
    }


@pytest.mark.parametrize("name", SCALED_NAMES)
@pytest.mark.parametrize("role", ["act", "grad"])
def test_numpy_quantizer_pads_a_short_last_block_like_torch(name, role):
    """wgrad quantizes along the batch, which need not be a whole number of blocks: each row's short
    last block is padded with zeros (never filled from the next row), as torch's quantizer does."""
    rng = np.random.default_rng(4)
    x = (rng.standard_normal((24, 40)) * np.exp2(rng.integers(-4, 4, (24, 1)))).astype(np.float32)
    x[3, 39] = 1e4  # a row's last, short block holds an outlier; the next row must not see it
    scaling = get_format(name).scaling
    mine = quantize_np_full(x, scaling, role, per_row=False)
    ref = _q(x, scaling, role)
    for field in ("deq", "q", "scale"):
        np.testing.assert_array_equal(getattr(mine, field), getattr(ref, field).numpy(), err_msg=field)


def test_saturated_counts_the_codes_the_clamp_changed():
    """mxfp4 (floor rule) scales a block with amax 7.9 by 2^0: fp4's max is 6 and its overflow
    threshold 7 (a tie that nearest-even sends to 8), so 7, 7.25, 7.5 and 7.9 are clamped to 6 from
    a code they would not round to, while 6.5 and 6.9 round to 6 anyway: not saturated."""
    values = [7.9, 7.5, 7.0, -7.25, 6.9, 6.5, 6.0, 1.0]
    x = np.array(values + [0.5] * 24, dtype=np.float32)[None]
    got = quantize_np_full(x, get_format("mxfp4").scaling, "act", per_row=False)
    assert got.scale[0, 0] == 1.0 and (np.abs(got.q[0, :7]) == 6).all()
    np.testing.assert_array_equal(got.saturated[0, :8], [True] * 4 + [False] * 4)
    assert not got.saturated[0, 8:].any()


@pytest.mark.parametrize("name", SCALED_NAMES)
def test_a_block_holding_inf_is_nan_not_saturated(name):
    x = np.random.default_rng(2).standard_normal((4, 128)).astype(np.float32)
    x[1, 3] = np.inf
    got = quantize_np_full(x, get_format(name).scaling, "act", per_row=False)
    assert np.isnan(got.deq[1, 3]) and not got.saturated[np.isnan(got.deq)].any()


def test_an_fp32_scale_that_rounds_its_amax_past_max_saturates_nothing():
    """fp8_block's s = fl(448 / amax) can put fl(amax * s) one float32 ulp above 448: the amax still
    becomes the code 448 exactly, which is the scale rule working, not saturation."""
    cand = np.float32(1) + np.arange(1, 4000, dtype=np.float32) * np.float32(2**-12)
    over = cand[(cand * (np.float32(448) / cand)) > np.float32(448)]
    assert over.size  # such amax values exist (about a tenth of these candidates)
    x = np.full((1, 128), 0.5, dtype=np.float32)
    x[0, 7] = over[0]
    got = quantize_np_full(x, get_format("fp8_block").scaling, "act", per_row=False)
    assert got.q[0, 7] == 448 and not got.saturated.any()


def test_overflow_is_a_scale_leaving_its_format_not_an_inf_input():
    """gemm statistics at the edges: fp8_tensor's s = 448 / amax leaves fp32 for amax ~ 1e-37, so a
    finite tensor dequantizes to NaN (overflow, not NaN input); an inf input makes its own block NaN
    (NaN fraction of one block of four; no overflow, no saturation)."""
    from precision_suite.engine.numpy_quantize import nonfinite_blocks
    from precision_suite.engine.numpy_stats import gemm_stats
    from precision_suite.quantize import GEMM_STATS
    from precision_suite.stats import STAT_NAMES

    def stats(x, name):
        scaling = get_format(name).scaling
        st = gemm_stats(x, quantize_np_full(x, scaling, "act", False), nonfinite_blocks(x, scaling, "act", False))
        return dict(zip(STAT_NAMES + GEMM_STATS, st))

    st = stats((np.random.default_rng(5).standard_normal((1, 128)) * 1e-37).astype(np.float32), "fp8_tensor")
    assert st["overflow_frac"] == 1 and st["nan_frac"] == 1 and math.isnan(st["qerr"])
    assert math.isnan(st["scale_log2_min"]) and math.isnan(st["scale_log2_max"])
    x = np.random.default_rng(5).standard_normal((1, 128)).astype(np.float32)
    x[0, 40] = np.inf
    st = stats(x, "mxfp4")
    assert st["overflow_frac"] == 0 and st["nan_frac"] == 32 / 128 and st["saturated_frac"] <= 96 / 128
    assert st["scale_log2_max"] <= 0 and math.isfinite(st["qerr"])


def _outlier_m(seed, width, frac, scale):
    """m from the definition: ceil(frac * width) channels of default_rng([seed, 4]) scaled."""
    m = np.ones(width, dtype=np.float32)
    m[np.random.default_rng([seed, 4]).choice(width, math.ceil(frac * width), replace=False)] = scale
    return m


def _reference_chain(scaling, x0, ws, bs, g, m):
    """relu layers with bias in bf16 storage, written out: (forward {kind: [per-layer dict]},
    backward {kind: [per-layer dict]}), layers in order 1..depth."""
    fwd = {k: [] for k in ("pre", "post", "gemm_in", "gemm_w")}
    saved = []
    x = _rnd(x0)
    for w, b in zip(ws, bs):
        x_exact = x if m is None else x * m  # exact in float32: bf16 times 100
        x_in = _rnd(x_exact)
        xq, wq = _q(x_in, scaling, "act"), _q(w, scaling, "weight")
        pre = _rnd(xq.deq.numpy() @ wq.deq.numpy().T + b)
        post = np.maximum(pre, 0)  # relu of bf16 values is a bf16 value
        fwd["gemm_in"].append(_gemm_expected(x_exact, xq))  # judged against x_in before its rounding
        fwd["gemm_w"].append(_gemm_expected(w, wq))
        fwd["pre"].append({"rms": _rms(pre), "amax": np.abs(pre).max(), "zero_frac": np.mean(pre == 0)})
        fwd["post"].append({"rms": _rms(post), "amax": post.max(), "zero_frac": np.mean(post == 0)})
        saved.append((x_in, w, pre))
        x = post
    bwd = {k: [] for k in ("grad", "grad_pre", "wgrad", "grad_gemm_in")}
    g_e = _rnd(g)
    for x_in, w, pre in reversed(saved):
        g_post = _rnd(g_e)
        g_pre = _rnd(g_post * (pre > 0))
        gq = _q(g_pre, scaling, "grad")
        dw = _q(g_pre.T, scaling, "grad").deq.numpy() @ _q(x_in.T, scaling, "act").deq.numpy().T
        dx = gq.deq.numpy() @ _q(w.T, scaling, "weight").deq.numpy().T
        bwd["grad"].append({"rms": _rms(g_post), "amax": np.abs(g_post).max(), "exact_amax": np.abs(g_e).max()})
        bwd["grad_pre"].append({"rms": _rms(g_pre), "zero_frac": np.mean(g_pre == 0)})
        bwd["wgrad"].append({"rms": _rms(_rnd(dw)), "exact_amax": np.abs(dw).max(), "zero_frac": np.mean(_rnd(dw) == 0)})
        bwd["grad_gemm_in"].append(_gemm_expected(g_pre, gq))
        g_e = dx if m is None else _rnd(dx * m)
    return fwd, {k: v[::-1] for k, v in bwd.items()}


@pytest.mark.parametrize("inputs", ["normal", "outliers(frac=0.05,scale=100.0)"])
@pytest.mark.parametrize("name", SCALED_NAMES)
def test_scaled_chain_against_the_chain_written_out(name, inputs):
    """Width 128 (fp8_block's tiles), batch 40 (not a whole number of any recipe's blocks: wgrad's
    blocks along the batch are padded), 3 relu layers with bias: every recorded statistic of
    pre, post, gemm_in, gemm_w, grad, grad_pre, wgrad and grad_gemm_in against its formula."""
    width, batch, depth, seed = 128, 40, 3, 5
    case = Case(format=name, activation="relu", bias=True, width=width, batch=batch, depth=depth, seed=seed,
                input=inputs, backend="numpy")
    rng = np.random.default_rng(3)
    x0 = rng.standard_normal((batch, width)).astype(np.float32).astype(np.float64)
    ws = [(rng.standard_normal((width, width)) * math.sqrt(2 / width)).astype(BF16) for _ in range(depth)]
    bs = [(rng.standard_normal(width) * 0.1).astype(BF16) for _ in range(depth)]
    g = rng.standard_normal((batch, width)).astype(np.float32)
    m = _outlier_m(seed, width, 0.05, 100.0) if inputs != "normal" else None
    chain = NumpyChain(case, x0, backward=True, rel_error=False)
    for layer, (w, b) in enumerate(zip(ws, bs), 1):
        chain.step(layer, w, b)
    chain.run_backward(g.astype(np.float64))
    want_f, want_b = _reference_chain(get_format(name).scaling, x0, [w.astype(np.float32) for w in ws],
                                      [b.astype(np.float32) for b in bs], g, m)
    for want in (want_f, want_b):
        for kind, layers in want.items():
            got = chain.columns(kind)
            for stat in layers[0]:
                expected = [layer[stat] for layer in layers]
                np.testing.assert_allclose(got[stat], expected, rtol=1e-9, atol=0, err_msg=f"{name} {kind} {stat}")
    if name in ("mxfp4", "mxfp6_e2m3"):  # the counts are exercised: these chains flush and saturate
        for kind in ("gemm_in", "gemm_w", "grad_gemm_in"):
            got = chain.columns(kind)
            assert all(got[s].max() > 0 for s in ("flush_frac", "subnormal_frac", "saturated_frac")), kind
        assert chain.columns("gemm_in")["underflow_frac"].max() > 0 or m is None


# ---- qerr of Gaussian input against the expected error ----

def _phi(x):
    return np.exp(-0.5 * np.square(x)) / math.sqrt(2 * math.pi)


def _element_codes(elem):
    """The element format's finite codes >= 0, ascending, from its bit patterns."""
    v = np.arange(256, dtype=np.uint8).view(elem.np_dtype).astype(np.float64)
    return np.unique(v[np.isfinite(v) & (v >= 0)])


def _squared_error(codes, sigma, top):
    """2 * integral over 0 <= x <= top of (sigma Q(x / sigma) - x)^2 phi(x) dx, per (sigma, top):
    Q is nearest-code with the clamp; over each code's cell the integral of (v - x)^2 phi is
    v^2 M0 - 2 v M1 + M2 with the Gaussian's partial moments M0, M1, M2 in closed form."""
    mids = (codes[1:] + codes[:-1]) / 2
    lo = np.minimum(np.concatenate([[0.0], mids])[None] * sigma[:, None], top[:, None])
    hi = np.minimum(np.concatenate([mids, [np.inf]])[None] * sigma[:, None], top[:, None])
    v = codes[None] * sigma[:, None]
    m0 = ndtr(hi) - ndtr(lo)
    m1 = _phi(lo) - _phi(hi)
    m2 = m0 - (hi * _phi(hi) - lo * _phi(lo))
    return 2 * (v * v * m0 - 2 * v * m1 + m2).sum(axis=1)


def _nearest_code(codes, y):
    i = np.clip(np.searchsorted(codes, y), 1, len(codes) - 1)
    return np.where(y - codes[i - 1] <= codes[i] - y, codes[i - 1], codes[i])


def _gaussian_bulk_rms() -> float:
    """r* of N(0, 1): the fixed point of r = sqrt(E[x^2; |x| <= 4r] / P(|x| <= 4r)), the sigma
    clipping of docs/scaled-formats.md on the distribution itself (0.99946)."""
    r = 1.0
    for _ in range(50):
        c = 4 * r
        inside = 2 * ndtr(c) - 1
        r = math.sqrt((inside - 2 * c * _phi(c)) / inside)
    return r


def _expected_qerr(scaling, tensor_amax: float, r: float) -> tuple[float, float]:
    """(qerr, qerr_bulk) expected for x ~ N(0, 1) from the recipe's scale rule, E[x^2] = 1.

    Per tensor: the scale sigma = amax / max_elem is fixed by the sample's amax. Per block of B
    elements, the block max A has density B P^(B-1) 2 phi(a) with P = 2 Phi(a) - 1, and given
    A = a the other B - 1 elements are |N(0,1)| below a; sigma(a) is the recipe's scale. The
    expected squared error per element is then
        integral [P^(B-1) 2 phi(a) e_a(a)^2 + (B-1) P^(B-2) 2 phi(a) * 2 int_0^a e_a(x)^2 phi dx] da,
    the bulk (|x| <= r) the same with x and a restricted to r, over E[x^2; |x| <= r]."""
    elem = ELEMENT_FORMATS[scaling.element]
    codes = _element_codes(elem)
    bulk_norm = (2 * ndtr(r) - 1) - 2 * r * _phi(r)
    if scaling.family == "tensor":
        sigma = np.array([tensor_amax / elem.max])
        full = _squared_error(codes, sigma, np.array([tensor_amax]))[0]
        bulk = _squared_error(codes, sigma, np.array([min(r, tensor_amax)]))[0]
        return math.sqrt(full), math.sqrt(bulk / bulk_norm)
    a = np.linspace(0.05, 8, 40001)
    if scaling.family == "block":
        sigma = a / elem.max
    elif scaling.family == "mx":
        sigma = np.exp2(np.floor(np.log2(a)) - elem.emax if scaling.rule == "floor" else np.ceil(np.log2(a / elem.max)))
    else:  # nvfp4: an E4M3 block scale under the fp32 tensor scale t
        t = tensor_amax / (448 * 6)
        sigma = np.minimum(a / 6 / t, 448).astype(np.float32).astype(ml_dtypes.float8_e4m3fn).astype(np.float64) * t
    b, p = scaling.block, 2 * ndtr(a) - 1
    top_error = (sigma * _nearest_code(codes, np.minimum(a / sigma, codes[-1])) - a) ** 2

    def per_element(limit):
        rest = _squared_error(codes, sigma, np.minimum(a, limit))
        return trapezoid(p ** (b - 1) * 2 * _phi(a) * top_error * (a <= limit)
                         + (b - 1) * p ** (b - 2) * 2 * _phi(a) * rest, a)

    return math.sqrt(per_element(np.inf)), math.sqrt(per_element(r) / bulk_norm)


@pytest.mark.parametrize("name", SCALED_NAMES)
def test_qerr_of_gaussian_input_against_the_expected_error(name):
    """Layer 1's gemm_in qerr and qerr_bulk for x_0 ~ N(0,1) (131072 elements) against the
    expected relative error integrated from the element grid and the distribution of the block
    maximum: measured within 0.6% of it for every recipe (2%: sampling, and the bf16 storage
    rounding of x_0 before quantization). The bulk is |x| <= r* with N(0, 1)'s own r*."""
    width, batch = 256, 512
    case = Case(format=name, activation="identity", width=width, batch=batch, depth=1, backend="numpy")
    x0 = np.random.default_rng(0).standard_normal((batch, width))
    chain = NumpyChain(case, x0, backward=False, rel_error=False)
    chain.step(1, np.eye(width).astype(BF16), None)
    got = chain.columns("gemm_in")
    x_in = x0.astype(np.float32).astype(BF16).astype(np.float64)
    qerr, bulk = _expected_qerr(get_format(name).scaling, float(np.abs(x_in).max()),
                                 _gaussian_bulk_rms())
    assert got["qerr"][0] == pytest.approx(qerr, rel=0.02)
    assert got["qerr_bulk"][0] == pytest.approx(bulk, rel=0.02)


# ---- the outliers input ----

@pytest.mark.parametrize("fmt", ["bf16", "fp32", "mxfp8_e4m3"])
def test_outlier_channels_are_scaled_in_every_layers_matmul_input(fmt):
    """x_in = rnd(x_{l-1} * m) in every layer: the matmul input divided by the layer's input is
    exactly 64 on the ceil(0.03 * 64) = 2 channels default_rng([seed, 4]) chooses and 1 elsewhere
    (64 is a power of two, so the rounding is exact), in layer 1 and in the layers after it."""
    width, batch, depth, seed = 64, 64, 3, 9
    case = Case(format=fmt, activation="relu", width=width, batch=batch, depth=depth, seed=seed,
                input="outliers(frac=0.03,scale=64)", backend="numpy")
    rng = np.random.default_rng(1)
    x0 = rng.standard_normal((batch, width))
    chain = NumpyChain(case, x0, backward=True, rel_error=False)
    storage = get_format(fmt)
    for layer in range(1, depth + 1):
        w = rng.standard_normal((width, width)) * math.sqrt(2 / width)
        chain.step(layer, w.astype(storage.np_dtype), None)
    channels = np.random.default_rng([seed, 4]).choice(width, 2, replace=False)
    want = np.ones(width)
    want[channels] = 64.0
    layer_input = x0.astype(storage.np_dtype).astype(np.float64)
    for _, x_in, _, _, h in chain.saved:  # per layer: (dtype, x_in, W, pre, h)
        x_in = x_in.astype(np.float64)
        nonzero = layer_input != 0
        assert nonzero[:, channels].any(axis=0).all() and nonzero.mean() > 0.3  # the ratio is seen
        np.testing.assert_array_equal((x_in[nonzero] / layer_input[nonzero]),
                                      np.broadcast_to(want, layer_input.shape)[nonzero])
        layer_input = np.maximum(h.astype(np.float64), 0)  # the next layer's input: relu(h), exact


@pytest.mark.parametrize("norm,residual", [("none", None), ("layernorm", 0.5), ("rmsnorm", 1.0)])
def test_gradients_through_the_outlier_multiplier_match_finite_differences(norm, residual):
    """fp64 (no rounding anywhere): dL/dW_l from backward, which passes d x_{l-1} = d x_in * m
    below every layer, against central finite differences of the forward loss."""
    width, batch, depth = 5, 4, 3
    case = Case(format="fp64", activation="tanh", norm=norm, residual=residual, width=width, batch=batch,
                depth=depth, input="outliers(frac=0.4,scale=3)", backend="numpy")
    rng = np.random.default_rng(8)
    x0 = rng.standard_normal((batch, width))
    ws = [rng.standard_normal((width, width)) / math.sqrt(width) for _ in range(depth)]
    g = rng.standard_normal((batch, width))

    def loss(weights):
        chain = NumpyChain(case, x0, backward=False, rel_error=False)
        for layer, w in enumerate(weights, 1):
            chain.step(layer, w, None)
        return float(np.sum(chain.x * g))

    chain = NumpyChain(case, x0, backward=True, rel_error=False)
    for layer, w in enumerate(ws, 1):
        chain.step(layer, w, None)
    wgrads = [exact for kind, exact, _ in chain._gradients(g) if kind == "wgrad"][::-1]
    h = 1e-6
    for layer in range(depth):
        fd = np.empty((width, width))
        for idx in np.ndindex(fd.shape):
            up, down = [w.copy() for w in ws], [w.copy() for w in ws]
            up[layer][idx] += h
            down[layer][idx] -= h
            fd[idx] = (loss(up) - loss(down)) / (2 * h)
        np.testing.assert_allclose(wgrads[layer], fd, rtol=1e-5, atol=1e-7, err_msg=f"dL/dW_{layer + 1}")


def test_lsuv_calibrates_on_the_scaled_matmul_inputs():
    """lsuv rescales each W_l until Var(post_l) = 1 for the chain's own input: with outlier
    channels that is x_in = x_{l-1} * m (100x on 1% of 128 channels would leave Var ~ 2 otherwise)."""
    case = Case(init="lsuv", activation="relu", format="fp32", width=128, batch=256, depth=4, seed=2,
                input="outliers(frac=0.01,scale=100)", backend="numpy")
    [r] = run_matrix(cases=[case], backward=False).cases
    assert r.status == "ok", r.error
    var = np.asarray(r.forward.post["std"]) ** 2
    np.testing.assert_allclose(var, 1.0, atol=0.03)


# ---- end to end: what a user reads ----

def test_a_numpy_run_of_a_scaled_format_writes_its_gemm_blocks_and_first_flush(tmp_path):
    """``precision-suite run --backends numpy``: a scaled format's cases carry gemm_in, gemm_w and
    grad_gemm_in with every statistic, and first_flush is the first layer whose gemm_in flush
    fraction reaches the threshold (the highest for grad_gemm_in backward); a plain format's carry
    none and a null first_flush."""
    import json

    from precision_suite.cli import main
    from precision_suite.quantize import GEMM_STATS
    from precision_suite.stats import STAT_NAMES

    args = ["run", "--backends", "numpy", "--formats", "mxfp4,bf16", "--inputs", "normal,outliers",
            "--inits", "kaiming_normal", "--activations", "relu", "--depth", "4", "--width", "64", "--batch", "16",
            "--quiet", "--out", str(tmp_path)]
    assert main(args) == 0
    cases = json.loads((tmp_path / "results.json").read_text())["cases"]
    assert len(cases) == 4 and all(c["status"] == "ok" for c in cases)
    for c in cases:
        fwd, bwd = c["forward"], c["backward"]
        if c["spec"]["format"] == "bf16":
            assert "gemm_in" not in fwd and "grad_gemm_in" not in bwd
            assert fwd["first_flush"] is None and bwd["first_flush"] is None
            continue
        for block in (fwd["gemm_in"], fwd["gemm_w"], bwd["grad_gemm_in"]):
            assert set(block) == set(STAT_NAMES + GEMM_STATS) and all(len(v) == 4 for v in block.values())
        flushed = [layer for layer, f in enumerate(fwd["gemm_in"]["flush_frac"], 1) if f >= 0.01]
        assert fwd["first_flush"] == flushed[0]  # mxfp4 flushes ~8% of a Gaussian block
        flushed = [layer for layer, f in enumerate(bwd["grad_gemm_in"]["flush_frac"], 1) if f >= 0.01]
        assert bwd["first_flush"] == flushed[-1]


def test_an_outlier_input_that_overflows_the_storage_is_a_gemm_in_overflow():
    """fp16 storage, outliers scaled 1e5: x_{l-1} * m passes fp16's max on the outlier channels,
    so x_in holds inf there and its blocks are NaN. gemm_in judges them against the finite
    x_{l-1} * m: an overflow at layer 1, not a NaN from nowhere."""
    case = Case(format="mxfp8_e4m3(storage=fp16)", activation="relu", width=64, batch=16, depth=2,
                input="outliers(frac=0.05,scale=100000.0)", backend="numpy")
    [r] = run_matrix(cases=[case], backward=False).cases
    assert r.status == "ok", r.error
    gemm_in = r.forward.gemm_in
    assert gemm_in["overflow_frac"][0] > 0 and gemm_in["nan_frac"][0] >= gemm_in["overflow_frac"][0]
    assert r.forward.events.first_overflow == 1


def test_fp32_storage_multiplies_in_float64():
    """With fp32 storage the products run in float64 (the storage's compute precision): a product
    below fp32's smallest subnormal (~1e-30 * 2e-18 summed over 32) is an exact nonzero value that
    rounds to zero in pre, an underflow a float32 product would have turned into an exact zero."""
    case = Case(format="mxfp4(storage=fp32)", activation="identity", width=32, batch=4, depth=1, backend="numpy")
    x0 = np.full((4, 32), 1e-30)
    chain = NumpyChain(case, x0, backward=False, rel_error=False)
    chain.step(1, np.full((32, 32), 2e-18, dtype=np.float32), None)
    pre = chain.columns("pre")
    assert pre["flush_frac"][0] == 1 and pre["underflow_frac"][0] == 1
