"""The outliers input: its drawn channels, and only those, are scaled in every layer's matmul input
(emulated, scaled and native stacks), the gradient goes back through the same rounding, and what
the scale does to an fp16 chain follows from the arithmetic."""

import math

import numpy as np
import pytest

from precision_suite import Case, run_case
from precision_suite.draws import draw_outlier_channels, parse_input
from precision_suite.formats import get_format, round_to_format

torch = pytest.importorskip("torch")

OUTLIERS = "outliers(frac=0.02,scale=100)"


def _captured_inputs(monkeypatch, case: Case):
    """Run ``case`` and return [(x_{l-1}, x_in)] per layer, as the stack's matmul received them."""
    from precision_suite.engine import torch_emulated, torch_native

    seen = []
    if case.mode == "native":
        original = torch_native.NativeStack._matmul_input

        def spy(self, x):
            x_in = original(self, x)
            seen.append((x.detach().double().numpy().copy(), x_in.detach().double().numpy().copy()))
            return x_in

        monkeypatch.setattr(torch_native.NativeStack, "_matmul_input", spy)
    else:
        original = torch_emulated.EmulatedStack._matmul_input

        def spy(self, x_w):
            x_in, exact = original(self, x_w)
            seen.append((x_w.detach().double().numpy().copy(), x_in.detach().double().numpy().copy()))
            return x_in, exact

        monkeypatch.setattr(torch_emulated.EmulatedStack, "_matmul_input", spy)
    r = run_case(case)
    assert r.status == "ok", r.error
    return seen


@pytest.mark.parametrize("fmt,mode", [("bf16", "emulated"), ("fp16", "emulated"), ("mxfp8_e4m3", "emulated"),
                                      ("nvfp4", "emulated"), ("bf16", "native")])
def test_the_drawn_channels_and_only_they_are_scaled_in_every_layer(monkeypatch, fmt, mode):
    case = Case(init="kaiming_normal", activation="tanh", format=fmt, mode=mode, width=128, depth=4, batch=16,
                input=OUTLIERS)
    seen = _captured_inputs(monkeypatch, case)
    assert len(seen) == case.depth
    spec = parse_input(case.input)
    channels = draw_outlier_channels(case.seed, case.width, spec.frac)
    assert len(channels) == math.ceil(0.02 * 128)
    others = np.setdiff1d(np.arange(case.width), channels)
    storage = get_format(fmt)
    for layer, (x, x_in) in enumerate(seen, 1):
        np.testing.assert_array_equal(x_in[..., others], x[..., others], err_msg=f"layer {layer}")
        want = round_to_format(x[..., channels] * spec.scale, storage).astype(np.float64)
        np.testing.assert_array_equal(x_in[..., channels], want, err_msg=f"layer {layer}")
        assert np.abs(x[..., channels]).max() > 0


def test_the_gradient_goes_back_through_the_same_rounding():
    """x_in = rnd(x m) forward, d x = rnd(d x_in m) backward (fp16, m = 100 on two channels)."""
    from precision_suite.engine.torch_rounding import rounder, scale_round_fn

    fp16 = get_format("fp16")
    rnd = rounder(fp16)
    m = torch.ones(8)
    m[[2, 5]] = 100.0
    x = torch.tensor(round_to_format(np.random.default_rng(1).standard_normal((4, 8)) * 3000, fp16).astype(np.float32))
    x.requires_grad_(True)
    y = scale_round_fn().apply(x, m, rnd)
    g = torch.tensor(round_to_format(np.random.default_rng(2).standard_normal((4, 8)) * 3000, fp16).astype(np.float32))
    y.backward(g)
    x64, g64, m64 = x.detach().double().numpy(), g.double().numpy(), m.double().numpy()
    np.testing.assert_array_equal(y.detach().numpy(), round_to_format(x64 * m64, fp16).astype(np.float32))
    np.testing.assert_array_equal(x.grad.numpy(), round_to_format(g64 * m64, fp16).astype(np.float32))
    assert np.isinf(y.detach().numpy()[:, [2, 5]]).any() and np.isinf(x.grad.numpy()[:, [2, 5]]).any()


def test_fp16_chain_overflows_at_layer_2_with_outliers_of_1e4_and_never_without():
    """kaiming_normal + ReLU at width 256 keeps rms ~1 (fp16 holds it for any depth). With 3 channels
    x 1e4: pre_1 ~ N(0, 1e8 * 3 * 2/256 * E[x^2]) has sd ~ 1.5e3, so its largest of 65536 is ~7e3
    < 65520 (layer 1 survives), while post_1 on an outlier channel is ~1e3 and times 1e4 is 1e7 in
    layer 2's matmul input: past fp16's max, so layer 2 overflows."""
    kw = dict(init="kaiming_normal", activation="relu", format="fp16", width=256, depth=12, batch=256)
    plain = run_case(**kw).forward.events
    scaled = run_case(input="outliers(frac=0.01,scale=10000)", **kw).forward.events
    assert plain.first_overflow is None and plain.failure is None
    assert scaled.first_overflow == 2 and scaled.failure == {"layer": 2, "kind": "overflow"}


@pytest.mark.parametrize("fmt", ["mxfp4(storage=fp16)", "fp8_tensor(storage=fp16)"])
def test_a_scaled_format_reports_the_storage_overflow_of_the_outlier_input(fmt):
    """The same chain in a scaled format with fp16 storage: x_in = rnd(x_1 m) overflows fp16 at layer 2,
    its block (tensor) becomes NaN: an overflow of gemm_in there, not a NaN out of nowhere."""
    r = run_case(init="kaiming_normal", activation="relu", format=fmt, width=256, depth=4, batch=256,
                 input="outliers(frac=0.01,scale=10000)")
    events = r.forward.events
    assert events.first_overflow == 2 and events.failure == {"layer": 2, "kind": "overflow"}
    assert r.forward.gemm_in["overflow_frac"][1] > 0 and r.forward.gemm_in["overflow_frac"][0] == 0


def test_autocast_chains_skip_outliers_with_the_reason():
    from precision_suite.engine import run_cases

    [r] = run_cases([Case(init="kaiming_normal", activation="relu", format="bf16", mode="autocast", width=16,
                          depth=2, batch=4, input=OUTLIERS)])
    assert r.status == "skipped" and "outliers" in r.skip_reason
