"""The torch engine end to end, on chains whose fate is known from the physics."""

import math

import numpy as np
import pytest

from precision_suite import Case, run_case, run_matrix
from precision_suite.formats import get_format

torch = pytest.importorskip("torch")


def run(**fields):
    r = run_case(**fields)
    assert r.status == "ok", r.error
    return r


def test_normal_identity_overflows_fp16_within_a_handful_of_layers():
    """N(0,1) weights at width 256 multiply the rms by ~16 a layer: fp16 (max 65504) overflows by
    layer log16(65520) ~ 4; fp32 (max 3.4e38) lasts ~32 layers."""
    fp16 = run(init="normal", activation="identity", format="fp16", width=256, depth=40, batch=32)
    fp32 = run(init="normal", activation="identity", format="fp32", width=256, depth=40, batch=32)
    assert fp16.forward.events.first_overflow is not None and fp16.forward.events.first_overflow <= 5
    assert fp32.forward.events.first_overflow is not None
    assert fp32.forward.events.first_overflow >= 5 * fp16.forward.events.first_overflow
    assert fp16.forward.events.failure["kind"] == "overflow"
    # the measured growth factor per layer is sqrt(width) before the overflow
    rms = fp16.forward.pre["rms"][:3]
    assert rms[1] / rms[0] == pytest.approx(16, rel=0.15)


@pytest.mark.parametrize("fmt", ["fp32", "bf16"])
def test_kaiming_relu_survives_100_layers(fmt):
    r = run(init="kaiming_normal", activation="relu", format=fmt, width=128, depth=100, batch=32, backward=False)
    assert r.forward.events.failure is None
    assert 0.1 < r.forward.post["rms"][-1] < 10


def test_small_gain_dies_in_fp16_long_before_fp32():
    """lecun_normal(gain=0.5) + identity halves the rms a layer: fp16's smallest subnormal 2^-24 is
    reached near layer 24+, fp32's 2^-149 near layer 149 (beyond depth)."""
    kw = dict(init="lecun_normal(gain=0.5)", activation="identity", width=128, depth=120, batch=32, backward=False)
    fp16 = run(format="fp16", **kw).forward.events
    fp32 = run(format="fp32", **kw).forward.events
    assert fp16.first_zero is not None and 20 <= fp16.first_zero <= 40
    assert fp16.zero_cause == "underflow"
    assert fp16.first_underflow < fp16.first_zero
    assert fp32.first_zero is None or fp32.first_zero > fp16.first_zero + 60


def test_emulated_and_native_agree_on_fp16_overflow():
    kw = dict(init="normal", activation="relu", format="fp16", width=256, depth=12, batch=32)
    emulated = run(mode="emulated", **kw).forward.events
    native = run(mode="native", **kw).forward.events
    assert emulated.first_overflow is not None
    assert native.first_overflow == emulated.first_overflow


def test_tanh_hides_overflow_in_post_but_pre_records_it():
    r = run(init="normal(std=10000.0)", activation="tanh", format="fp16", width=64, depth=3, batch=16)
    assert r.forward.events.first_overflow == 1
    # pre_1 ~ N(0, 64 * 1e8): P(|pre| >= 65520) = erfc(65520 / (8e4 sqrt 2))
    expected = math.erfc(get_format("fp16").overflow_threshold / (8e4 * math.sqrt(2)))
    assert r.forward.pre["overflow_frac"][0] == pytest.approx(expected, abs=0.06)
    assert r.forward.post["inf_frac"][0] == 0 and r.forward.post["overflow_frac"][0] == 0


def test_e4m3fn_overflow_is_detected_without_inf():
    r = run(init="normal", activation="identity", format="fp8_e4m3fn", width=256, depth=4, batch=16)
    # rms grows 16x a layer: the largest of 4096 elements (~3.5 rms) passes 464 at layer 2
    layer = r.forward.events.first_overflow
    assert layer == 2
    assert r.forward.pre["nan_frac"][layer - 1] == r.forward.pre["overflow_frac"][layer - 1] > 0
    assert np.all(r.forward.pre["inf_frac"] == 0)


def test_native_fp8_records_the_reason_instead_of_dropping_the_case():
    r = run_case(init="kaiming_normal", activation="relu", format="fp8_e4m3fn", mode="native", width=16, depth=3,
                 batch=4)
    assert r.status == "skipped" and "relu" in r.skip_reason and r.error is None


def test_fp64_has_no_underflow_or_overflow_statistics():
    r = run(init="kaiming_normal", activation="relu", format="fp64", width=16, depth=3, batch=4)
    assert r.forward.pre["underflow_frac"] is None and r.forward.post["overflow_frac"] is None
    assert r.forward.events.first_underflow is None
    assert r.to_dict()["forward"]["pre"]["underflow_frac"] is None


def test_every_per_layer_array_has_depth_entries():
    r = run(init="xavier_uniform", activation="gelu", format="bf16", width=32, depth=7, batch=8,
            norm="layernorm", residual=0.5, bias=True)
    for block in (r.forward.pre, r.forward.post, r.backward.grad, r.backward.grad_pre, r.backward.wgrad):
        assert all(len(v) == 7 for v in block.values() if v is not None)
    assert np.ndim(r.forward.input["rms"]) == 0


def test_same_seed_same_bits_and_draws_shared_across_formats():
    kw = dict(inits="kaiming_normal", activations="relu,tanh", formats="fp16,bf16", depth=[5], width=[32], batch=[8])
    a = run_matrix(**kw)
    b = run_matrix(**kw)
    for x, y in zip(a.cases, b.cases):
        assert x.to_dict()["forward"] == y.to_dict()["forward"]
        assert x.to_dict()["backward"] == y.to_dict()["backward"]
    # one fp64 draw, rounded per format: the fp16 and bf16 inputs are roundings of the same numbers
    fp16 = a.by_id()["relu-kaiming_normal-fp16-cpu-emulated-torch-w32-d5-b8-s0"].forward.input["rms"]
    bf16 = a.by_id()["relu-kaiming_normal-bf16-cpu-emulated-torch-w32-d5-b8-s0"].forward.input["rms"]
    assert fp16 == pytest.approx(bf16, rel=2 * get_format("bf16").eps)


def test_backward_gradient_underflow_moves_with_loss_scale():
    """Gradients of a gain-0.5 identity chain halve per layer going down: scaling the loss by 2^k
    delays the backward underflow by ~k layers."""
    kw = dict(init="lecun_normal(gain=0.5)", activation="identity", format="fp16", width=64, depth=60, batch=16)
    plain = run(**kw).backward.events.first_underflow
    scaled = run(loss_scale=2.0**10, **kw).backward.events.first_underflow
    assert plain is not None and scaled is not None
    assert plain - scaled == pytest.approx(10, abs=2)


def test_rel_error_against_fp64_shadow():
    r = run_case(Case(init="kaiming_normal", activation="relu", format="bf16", width=64, depth=10, batch=16),
                 rel_error=True, backward=False)
    err = np.asarray(r.forward.rel_error)
    assert len(err) == 10
    eps = get_format("bf16").eps
    assert np.all(err > 0) and err[0] < 2 * eps and err[-1] < 20 * math.sqrt(10) * eps
