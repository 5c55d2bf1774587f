"""The scaled formats' chain (engine/torch_scaled.py) against a float64 re-computation written out
here with the numpy quantizer (engine/numpy_quantize.py): forward (the quantized matmul, the
storage rounding) and backward (dgrad with W quantized along `out`, wgrad with both operands
quantized along the batch), with the quantized inputs' statistics from their definitions."""

import math

import numpy as np
import pytest

from precision_suite import Case, run_case
from precision_suite.draws import draw_input, draw_seed_grad, draw_weight, parse_input
from precision_suite.engine.numpy_quantize import quantize_np
from precision_suite.engine.torch_qstats import QSTAT_NAMES
from precision_suite.formats import ELEMENT_FORMATS, get_format, round_to_format
from precision_suite.inits import parse_init
from precision_suite.scaled import SCALED_NAMES
from scaled_reference import reference

torch = pytest.importorskip("torch")

F32, F64 = np.float32, np.float64
COUNTS = ("zero_frac", "flush_frac", "underflow_frac", "subnormal_frac", "saturated_frac", "nan_frac", "overflow_frac")


def _q(x, scaling, role, along_batch=False):
    """deq of one case's [rows, n] tensor along its last dim (per case: one tensor), padded with
    zeros to whole blocks first when it runs along the batch (wgrad)."""
    n = x.shape[-1]
    block = scaling.block
    pad = (-n) % block if along_batch and block else 0
    xp = np.pad(x, ((0, 0), (0, pad))) if pad else x
    return quantize_np(xp[None].astype(F32), scaling, role)[0][0][:, :n].astype(F64)


def _bf16(x):
    return round_to_format(x, get_format("bf16")).astype(F64)


def chain_reference(case: Case):
    """Per layer: gemm_in, gemm_w and grad_gemm_in statistics (reference rows), pre's rounded values,
    the exact dx reaching each post and the exact wgrad, for a relu chain without bias or norm."""
    fmt = get_format(case.format)
    s = fmt.scaling
    init = parse_init(case.init)
    x = _bf16(draw_input(parse_input(case.input), case.seed, case.batch, case.width))
    layers = []
    for layer in range(1, case.depth + 1):
        w = _bf16(draw_weight(init, case.seed, layer, case.width, case.width))
        xq, wq = _q(x, s, "act"), quantize_np(w.astype(F32), s, "weight", per_row=False)[0].astype(F64)
        pre = _bf16(xq @ wq.T)
        layers.append(dict(x_in=x, w=w, pre=pre, gemm_in=reference(x[None].astype(F32), s, "act")[0],
                           gemm_w=reference(w[None].astype(F32), s, "weight")[0] if s.weight_block is None
                           else None))
        x = np.maximum(pre, 0.0)  # relu of a bf16 value is a bf16 value
    g = _bf16(draw_seed_grad(case.seed, case.batch, case.width))
    for layer in range(case.depth, 0, -1):
        rec = layers[layer - 1]
        g_pre = _bf16(g) * (rec["pre"] > 0)
        rec["grad_gemm_in"] = reference(g_pre[None].astype(F32), s, "grad")[0]
        w_t = quantize_np(np.ascontiguousarray(rec["w"].T).astype(F32), s, "weight", per_row=False)[0].astype(F64)
        rec["wgrad"] = _q(g_pre.T, s, "grad", along_batch=True) @ _q(rec["x_in"].T, s, "act", along_batch=True).T
        g = _q(g_pre, s, "grad") @ w_t.T
        rec["dx"] = g
    return layers


@pytest.mark.parametrize("batch", [128, 80])
@pytest.mark.parametrize("name", SCALED_NAMES)
def test_scaled_chain_against_float64_recomputation(name, batch):
    """batch 80 is no whole number of wgrad's batch blocks (16, 32 or 128): zero padding."""
    case = Case(init="kaiming_normal", activation="relu", format=name, width=128, depth=3, batch=batch)
    r = run_case(case)
    assert r.status == "ok", r.error
    ref = chain_reference(case)
    i = QSTAT_NAMES.index
    for layer, rec in enumerate(ref):
        n_act = batch * case.width
        for block, kind in ((r.forward.gemm_in, "gemm_in"), (r.backward.grad_gemm_in, "grad_gemm_in"),
                            (r.forward.gemm_w, "gemm_w")):
            want = rec[kind]
            if want is None:  # fp8_block's weight tiles: the weight statistics test covers them
                continue
            label = f"{name} {kind} layer {layer + 1}"
            # layer 1's input is the same bits on both sides; above it a rare element may round to the
            # other bf16 neighbour (an fp32 against a float64 product): a count or two may move
            exact = (layer == 0 and kind == "gemm_in") or kind == "gemm_w"
            assert block["qerr"][layer] == pytest.approx(want[i("qerr")], rel=1e-9 if exact else 1e-3), label
            assert block["qerr_bulk"][layer] == pytest.approx(want[i("qerr_bulk")], rel=1e-9 if exact else 1e-3), label
            for stat in COUNTS:
                assert block[stat][layer] == pytest.approx(want[i(stat)], abs=0 if exact else 3 / n_act), (label, stat)
            for stat in ("scale_log2_min", "scale_log2_max", "amax"):
                assert block[stat][layer] == pytest.approx(want[i(stat)], rel=0 if exact else 2**-7), (label, stat)
        pre = rec["pre"]
        assert r.forward.pre["amax"][layer] == pytest.approx(np.abs(pre).max(), rel=2**-7)
        assert r.forward.pre["rms"][layer] == pytest.approx(math.sqrt(np.mean(pre**2)), rel=1e-3)
        # the exact values of the gradients: dx reaching post_{l-1} (grad's exact_amax there) and dW.
        # A weight quantized along `in` instead of `out`, or an unquantized operand, moves these by
        # the quantization error (>= 1e-2 relative for every recipe), far beyond the product's rounding
        assert r.backward.wgrad["exact_amax"][layer] == pytest.approx(np.abs(rec["wgrad"]).max(), rel=1e-4), name
        if layer > 0:
            assert r.backward.grad["exact_amax"][layer - 1] == pytest.approx(np.abs(rec["dx"]).max(), rel=1e-4), name


@pytest.mark.parametrize("name", SCALED_NAMES)
def test_qerr_of_gaussian_input_in_the_chain(name):
    """Layer 1 quantizes x_0 = N(0, 1) rounded to bf16: its qerr is the float64 relative error of the
    numpy quantizer's dequantized x_0, and lies where the element format puts it: above eps/16 and
    below eps (one element's relative rounding error is at most eps/2)."""
    case = Case(init="kaiming_normal", activation="relu", format=name, width=256, depth=1, batch=256)
    r = run_case(case, backward=False)
    x = _bf16(draw_input(parse_input("normal"), 0, 256, 256))
    deq = _q(x, get_format(name).scaling, "act")
    want = np.linalg.norm(deq - x) / np.linalg.norm(x)
    assert r.forward.gemm_in["qerr"][0] == pytest.approx(want, rel=1e-9)
    eps = ELEMENT_FORMATS[get_format(name).scaling.element].eps
    assert eps / 16 < want < eps


@pytest.mark.parametrize("step,period", [(1, 8), (2, 16)])
@pytest.mark.parametrize("name", SCALED_NAMES)
def test_dgrad_quantizes_the_weight_along_out(name, step, period):
    """Layer 2's weight has rows 2^(step (i mod period)) apart and the seed gradient's columns the
    inverse, so every row adds alike to dx = deq(Q_grad(g)) @ deq(Q_w(W)). Blocks along `out` (down a
    column of W, along g's row) span 2^7 (the fp4/fp6 elements' range) or 2^30 (more than any
    element's): the small rows of W lose precision or flush there, and not along `in`. The two
    choices give different dx,
    which reaches post_1: its gradient's exact values (exact_amax) and rounded rms are recorded.
    (fp8_tensor's one scale and fp8_block's 128x128 tiles are the same both ways.)"""
    from precision_suite.engine.torch_stack import make_stack

    case = Case(init="kaiming_normal", activation="identity", format=name, width=128, depth=2, batch=64)
    fmt, s = get_format(name), get_format(name).scaling
    rng = np.random.default_rng(3)
    x0 = rng.standard_normal((64, 128))
    spread = np.exp2(step * (np.arange(128) % period))
    w1 = round_to_format(np.eye(128), fmt)
    w2 = round_to_format(rng.standard_normal((128, 128)) * spread[:, None] / spread.max(), fmt)
    stack = make_stack([case], x0, backward=True, rel_error=False)
    stack.step(1, w1, None)
    stack.step(2, w2, None)
    g = rng.standard_normal((64, 128)) / spread
    stack.run_backward(g)
    grad = stack.case_columns(0, "grad")
    g_pre = _bf16(g)  # identity: grad_pre = the rounded seed
    w_out = quantize_np(np.ascontiguousarray(w2.astype(F32).T), s, "weight", per_row=False)[0].astype(F64)
    dx = _q(g_pre, s, "grad") @ w_out.T
    assert grad["exact_amax"][0] == pytest.approx(np.abs(dx).max(), rel=1e-5)
    assert grad["rms"][0] == pytest.approx(math.sqrt(np.mean(_bf16(dx) ** 2)), rel=1e-4)


@pytest.mark.parametrize("name,init,inp,shape", [
    ("mxfp4", "lecun_normal(gain=0.1)", "normal", dict(width=32, batch=8, depth=40)),
    ("nvfp4", "kaiming_normal", "outliers(frac=0.05,scale=100)", dict(width=64, batch=16, depth=6)),
    ("fp8_tensor", "normal", "outliers(frac=0.05,scale=100)", dict(width=64, batch=16, depth=6)),
    ("fp8_block", "kaiming_normal", "normal", dict(width=128, batch=100, depth=4)),
    ("mxfp6_e3m2(storage=fp32)", "lecun_normal(gain=0.5)", "normal", dict(width=64, batch=16, depth=8)),
])
def test_a_scaled_case_is_bit_identical_alone_and_stacked(name, init, inp, shape):
    """Every scale is per case (per-tensor scales too): a case's results do not depend on the cases
    stacked with it. The case is tanh (bounded), its partners grow past it, so a scale shared over
    the stack would be theirs; the gain-0.1 chain dies (bf16 layers move to fp64) while sigmoid's
    partner stays near 0.5."""
    from precision_suite.engine import run_cases

    case = Case(init=init, activation="tanh", format=name, input=inp, **shape)

    def result(cases):
        [r] = [r for r in run_cases(cases) if r.id == case.id]
        assert r.status == "ok", r.error
        d = r.to_dict()
        d.pop("seconds")
        return d

    partners = [Case(**{**case.to_dict(), "activation": a}) for a in ("identity", "relu", "sigmoid", "gelu")]
    assert result([case]) == result([case, *partners])


def test_an_inf_reaching_a_block_is_a_recorded_nan_never_a_silent_zero():
    """mxfp4 in fp16 storage, N(0, 1) weights at width 256 (rms x16 a layer): fp16 overflows at layer
    4; its inf values reach layer 5's matmul input, whose blocks (fp4 has no NaN and no inf) become
    NaN, counted in gemm_in's nan_frac at least as often as layer 4 left an inf behind."""
    r = run_case(init="normal", activation="identity", format="mxfp4(storage=fp16)", width=256, depth=6, batch=32)
    events, gemm_in, post = r.forward.events, r.forward.gemm_in, r.forward.post
    layer = events.first_overflow
    assert layer is not None and 3 <= layer <= 5
    if post["inf_frac"][layer - 1] > 0:  # the inf values went on into the next layer's quantizer
        assert gemm_in["nan_frac"][layer] >= post["inf_frac"][layer - 1]
        assert gemm_in["inf_frac"][layer] == 0 and gemm_in["overflow_frac"][layer] == 0
    assert events.first_nan is not None and events.first_nan <= layer + 1
    assert r.backward.wgrad["nan_frac"][layer] > 0  # wgrad quantizes that input again (along the batch)
