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

from precision_suite.engine.numpy_backend import NumpyChain
from precision_suite.engine.numpy_quantize import quantize_np_full
from precision_suite.formats import get_format
from precision_suite.scaled import SCALED_NAMES
from precision_suite.spec import Case

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
    bulk = np.abs(x) <= _rms(x)
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
        x_in = x if m is None else _rnd(x * m)
        xq, wq = _q(x_in, scaling, "act"), _q(w, scaling, "weight")
        pre = _rnd(xq.deq.numpy() @ wq.deq.numpy().T + b)
        post = np.maximum(pre, 0)  # relu of bf16 values is a bf16 value
        fwd["gemm_in"].append(_gemm_expected(x_in, xq))
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
