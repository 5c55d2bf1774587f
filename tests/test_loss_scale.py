"""Loss-scale advice (docs/definitions.md): exact bounds on constructed gradient columns, a chain whose
gradient range is known by construction, and the end-to-end rerun with the recommended scale."""

from __future__ import annotations

import math

import numpy as np
import pytest

from precision_suite.draws import draw_seed_grad
from precision_suite.formats import get_format, round_to_format
from precision_suite.runner import run_case
from precision_suite.loss_scale import loss_scale_advice

FP16 = get_format("fp16")
T_OF, T_UNDER = FP16.overflow_threshold, FP16.underflow_threshold  # 65520, 2^-25


def cols(amax, q, scale=1.0, zero=None, under=None):
    """A gradient's columns as the engine records them at loss scale ``scale``."""
    amax = np.asarray(amax, dtype=float)
    return {"exact_amax": amax * scale, "exact_q": np.asarray(q, dtype=float) * scale,
            "zero_frac": np.zeros_like(amax) if zero is None else np.asarray(zero, dtype=float),
            "underflow_frac": np.zeros_like(amax) if under is None else np.asarray(under, dtype=float)}


def advise(amax, q, scale=1.0, fmt=FP16, threshold=0.01):
    c = cols(amax, q, scale)
    return loss_scale_advice({"grad": c, "grad_pre": c, "wgrad": c}, fmt, threshold, scale)


def test_bounds_are_the_exact_powers_of_two():
    # gradients halve per layer: amax 1 .. 2^-9, q at the threshold 2^-20 .. 2^-29
    layers = np.arange(10)
    a = advise(2.0**-layers, 2.0 ** (-20 - layers))
    assert a["max_safe_scale"] == 2.0**15  # 2^15 * 1 < 65520 <= 2^16 * 1
    assert a["min_useful_scale"] == 2.0**5  # 2^5 * 2^-29 = 2^-24 > 2^-25 = 2^4 * 2^-29
    assert a["recommended"] == 2.0**10
    assert a["gradscaler_backoffs"] == 1
    assert "2^10 fits fp16" in a["verdict"] and "does not fit" in a["verdict"]


def test_bounds_are_strict_at_the_thresholds():
    """S * amax == T_of overflows fp16 (the tie rounds to inf); S * q == smallest_subnormal/2
    rounds to zero; fp8_e4m3fn's tie at T_of = 464 rounds to max 448 and is safe."""
    a = advise([T_OF / 2.0**7], [T_UNDER / 2.0**3])
    assert a["max_safe_scale"] == 2.0**6
    assert a["min_useful_scale"] == 2.0**4
    e4m3 = get_format("fp8_e4m3fn")
    assert advise([e4m3.overflow_threshold / 2.0**7], [1.0], fmt=e4m3)["max_safe_scale"] == 2.0**7


@pytest.mark.parametrize("scale", [2.0**-7, 1.0, 3.0, 2.0**12])
def test_measured_scale_is_divided_out(scale):
    a = advise([2.0**3], [2.0**-30], scale=scale)
    assert (a["max_safe_scale"], a["min_useful_scale"], a["recommended"]) == (2.0**12, 2.0**6, 2.0**9)


def test_no_scaling_needed_recommends_one():
    # bf16-like gradients: max safe 2^120, min useful 2^-15; 1 already fits, so 1 it is (not 2^52)
    bf16 = get_format("bf16")
    a = advise([2.0**7], [2.0**-118], fmt=bf16)
    assert a["min_useful_scale"] < 1 < a["max_safe_scale"]
    assert a["recommended"] == 1.0
    assert a["verdict"].startswith("no loss scaling is needed in bf16") and "the current scale 1 fits" in a["verdict"]


def test_no_static_scale_fits():
    a = advise([2.0**10, 2.0**-20], [2.0**-5, 2.0**-40])
    assert a["max_safe_scale"] == 2.0**5 and a["min_useful_scale"] == 2.0**16
    assert a["recommended"] is None
    assert a["gradscaler_backoffs"] == 11
    assert "no static loss scale fits fp16" in a["verdict"] and "bf16" in a["verdict"]


def test_unbounded_sides_and_degenerate_gradients():
    never_under = advise([2.0**20], [math.inf])  # too few nonzero gradients to reach the threshold
    assert never_under["min_useful_scale"] is None
    assert never_under["recommended"] == never_under["max_safe_scale"] == 2.0**-5
    assert advise([0.0], [math.inf])["verdict"].startswith("every gradient is exactly zero")
    dead = advise([math.inf], [1.0])
    assert dead["recommended"] is None and dead["max_safe_scale"] is None and "inf/NaN" in dead["verdict"]
    assert advise([1.0], [1.0], fmt=get_format("fp64"))["recommended"] is None  # no wider format: not available
    fp32 = advise([2.0**-200], [2.0**-300], fmt=get_format("fp32"))
    assert fp32["min_useful_scale"] == 2.0**151 and fp32["max_safe_scale"] == 2.0**327


def test_missing_extra_stats_is_a_clear_error():
    with pytest.raises(ValueError, match="exact_amax"):
        loss_scale_advice({"grad": {"exact_q": np.ones(3)}}, FP16, 0.01, 1.0)


def test_vanished_gradients_make_min_useful_a_lower_bound():
    """Layers 1-2 are all zero below layer 3's underflow: their size is unknown at this scale."""
    amax, q = [0.0, 0.0, 2.0**-20, 1.0], [math.inf, math.inf, 2.0**-30, 2.0**-8]
    grad = cols(amax, q, zero=[1, 1, 0.2, 0], under=[0, 0, 0.2, 0])
    a = loss_scale_advice({"grad": grad, "grad_pre": grad, "wgrad": grad}, FP16, 0.01, 1.0)
    assert a["min_useful_scale"] == 2.0**6 and "layers 1..2 vanished" in a["verdict"] and "lower bound" in a["verdict"]
    dead_relu = cols(amax, q, zero=[1, 1, 0, 0])  # exact zeros with no underflow above: nothing hidden
    a = loss_scale_advice({"grad": dead_relu, "grad_pre": dead_relu, "wgrad": dead_relu}, FP16, 0.01, 1.0)
    assert "lower bound" not in a["verdict"]


# A chain whose gradient range is known by construction: identity, weights of std 1/(4 sqrt n),
# so every layer scales a vector's RMS by 1/4, forward and backward; the input has std 2^12 so the
# forward stays inside fp16 (2^12 .. 2^-10) while the gradients fall from the seed's N(0, 1) at the
# top to RMS 4^-(depth-1) at layer 1. wgrad_l ~ sqrt(batch) 2^12 4^-(depth-1) stays below the seed.
CHAIN = {"init": "lecun_normal(gain=0.25)", "activation": "identity", "format": "fp16",
         "input": "shifted(mean=0,std=4096)", "width": 64, "batch": 16, "depth": 12, "seed": 3}


@pytest.fixture(scope="module")
def chain():
    return run_case(**CHAIN)


def test_chain_gradients_shrink_by_construction(chain):
    rms = np.asarray(chain.backward.grad["rms"])
    ratios = np.log2(rms[:-1] / rms[1:])  # layer l against l+1
    assert np.all(np.abs(ratios + 2) < 0.5), f"log2 RMS ratio per layer {np.round(ratios, 2)}, expected -2"
    assert chain.backward.events.first_underflow is not None, "the construction must underflow in fp16"


def test_chain_advice_matches_the_construction(chain):
    advice = chain.backward.loss_scale
    # the largest gradient is the seed itself, known exactly
    seed_max = float(np.abs(round_to_format(draw_seed_grad(CHAIN["seed"], CHAIN["batch"], CHAIN["width"]),
                                            FP16).astype(float)).max())
    k_max = max(k for k in range(64) if 2.0**k * seed_max < T_OF)
    assert advice["max_safe_scale"] == 2.0**k_max
    # the smallest: layer 1's gradient, RMS 4^-(depth-1); its 1% quantile is 0.0125 RMS (|N(0, s^2)|)
    q1 = 0.0125 * 4.0 ** -(CHAIN["depth"] - 1)
    k_min = math.floor(math.log2(T_UNDER / q1)) + 1
    assert abs(math.log2(advice["min_useful_scale"]) - k_min) <= 1, advice
    assert advice["recommended"] == 2.0 ** ((math.log2(advice["min_useful_scale"]) + k_max) // 2)


def test_rerun_with_recommended_scale_removes_gradient_underflow(chain):
    scale = chain.backward.loss_scale["recommended"]
    rerun = run_case(**CHAIN, loss_scale=scale)
    before, after = chain.backward.events, rerun.backward.events
    print(f"\nloss scale 1 -> {scale:g}: grad first_underflow {before.first_underflow} -> {after.first_underflow}, "
          f"first_overflow {before.first_overflow} -> {after.first_overflow}")
    assert after.first_underflow is None and after.first_overflow is None and after.first_nan is None
    assert rerun.backward.loss_scale["recommended"] == scale, "the advice must not depend on the scale it ran at"


# ---- gradients that hold inf/NaN: no scale is called safe ----

def _with(c, **cols):
    return {**c, **{k: np.asarray(v, dtype=float) for k, v in cols.items()}}


def test_nan_gradients_get_no_scale_even_though_exact_amax_counts_nan_as_zero():
    """exact_amax reads NaN as 0, so a NaN gradient looks small: the advice must read nan_frac too."""
    c = _with(cols([1.0, 2.0**-3], [2.0**-20, 2.0**-24]), nan_frac=[0.0, 0.5], inf_frac=[0.0, 0.0])
    a = loss_scale_advice({"grad": c, "grad_pre": c, "wgrad": c}, FP16, 0.01, 1.0)
    assert a["recommended"] is None and a["max_safe_scale"] is None and a["min_useful_scale"] is None
    assert "layer 2" in a["verdict"] and "inf/NaN" in a["verdict"]
    assert "fits" not in a["verdict"] and "no loss scaling is needed" not in a["verdict"]
    fwd = loss_scale_advice({"grad": c, "grad_pre": c, "wgrad": c}, FP16, 0.01, 1.0,
                            forward_failure={"layer": 5, "kind": "overflow"})
    assert "forward pass overflowed at layer 5" in fwd["verdict"] and fwd["recommended"] is None


def test_a_gradient_overflowed_by_the_scale_names_the_largest_scale_it_fits():
    """Layer 3's exact gradient is finite but past T_of at scale 2^8; below it the gradients are inf."""
    scale = 2.0**8
    c = _with(cols([2.0**-5, 2.0**-4, 2.0**9], [2.0**-30] * 3, scale=scale), inf_frac=[1.0, 1.0, 0.1],
              nan_frac=[0.0, 0.0, 0.0])
    c["exact_amax"][:2] = math.inf
    a = loss_scale_advice({"grad": c, "grad_pre": c, "wgrad": c}, FP16, 0.01, scale)
    assert a["recommended"] is None
    assert "first at layer 3" in a["verdict"] and "rerun at 2^6 or lower" in a["verdict"]  # 2^6 * 2^9 < 65520


def test_layers_no_gradient_reached_are_left_out():
    """A probe's op whose output no gradient reached is a NaN row: it is not a NaN gradient."""
    c = cols([1.0, math.nan, 2.0**-3], [2.0**-20, math.nan, 2.0**-24])
    a = loss_scale_advice({"grad": c, "grad_pre": c, "wgrad": c}, FP16, 0.01, 1.0)
    assert a["max_safe_scale"] == 2.0**15 and a["recommended"] is not None


def test_chain_advice_after_a_forward_overflow_says_so():
    """fp8_e4m3fn has no inf: the forward overflow is NaN, and so are the gradients; fp16's are inf."""
    for fmt in ("fp8_e4m3fn", "fp16"):
        r = run_case(init="normal", activation="relu", format=fmt, width=64, depth=10, batch=16)
        f = r.forward.events.failure
        assert f["kind"] == "overflow" and r.backward.events.first_nan is not None
        a = r.backward.loss_scale
        assert a["recommended"] is None and f"forward pass overflowed at layer {f['layer']}" in a["verdict"]


def test_chain_rerun_at_the_advised_scale_keeps_the_gradients_finite():
    """At 2^11 a gradient overflows fp16; a rerun at the scale the advice names keeps every gradient finite."""
    shape = {"init": "kaiming_normal", "activation": "relu", "format": "fp16", "width": 64, "depth": 10, "batch": 16}
    r = run_case(**shape, loss_scale=2.0**11)
    assert r.backward.events.first_overflow is not None
    k = int(r.backward.loss_scale["verdict"].split("rerun at 2^")[1].split()[0])
    again = run_case(**shape, loss_scale=2.0**k)
    assert again.backward.events.failure is None and again.backward.loss_scale["recommended"] is not None


def test_a_scaled_format_is_advised_on_its_storage_range_and_its_quantized_gradients_need_none():
    """mxfp4 keeps its gradients in bf16: the bounds are bf16's (from the same columns), and the
    verdict says the quantized gradients are scaled per block by the recipe."""
    layers = np.arange(10)
    for name, per in (("mxfp4", "per 32-element block"), ("fp8_tensor(storage=fp16)", "per tensor")):
        scaled = advise(2.0**-layers, 2.0 ** (-140 - layers), fmt=get_format(name))
        storage = advise(2.0**-layers, 2.0 ** (-140 - layers), fmt=get_format(get_format(name).scaling.storage))
        for key in ("max_safe_scale", "min_useful_scale", "recommended", "gradscaler_backoffs"):
            assert scaled[key] == storage[key], (name, key)
        assert f"scales its quantized gradients {per}" in scaled["verdict"]
        assert f"{get_format(name).scaling.storage} storage's range" in scaled["verdict"]
