"""Event logic over per-layer numbers, and the statistics that feed it."""

import numpy as np
import pytest

from precision_suite.formats import get_format
from precision_suite.stats import STAT_NAMES, backward_events, forward_events


def cols(depth, **overrides):
    c = {name: np.zeros(depth) for name in STAT_NAMES}
    for key, values in overrides.items():
        c[key] = np.asarray(values, dtype=float)
    return c


def test_overflow_hidden_by_saturating_post_is_caught_in_pre():
    pre = cols(4, overflow_frac=[0, 0, 0.5, 0.5])
    post = cols(4)  # tanh turned the infs into +-1
    ev = forward_events(pre, post, 0.01)
    assert ev.first_overflow == 3
    assert ev.failure == {"layer": 3, "kind": "overflow"}


def test_underflow_threshold_and_any():
    post = cols(5, underflow_frac=[0, 0.001, 0.005, 0.01, 0.2])
    ev = forward_events(cols(5), post, 0.01)
    assert (ev.first_underflow_any, ev.first_underflow) == (2, 4)
    assert forward_events(cols(5), post, 0.2).first_underflow == 5


def test_failure_tie_order_overflow_nan_zero_underflow():
    post = cols(3, zero_frac=[0, 1, 1], underflow_frac=[0, 0.5, 0], nan_frac=[0, 0.1, 0])
    ev = forward_events(cols(3), post, 0.01)
    assert ev.failure == {"layer": 2, "kind": "nan"}
    assert ev.zero_cause == "underflow"
    dead = forward_events(cols(3), cols(3, zero_frac=[0, 1, 1]), 0.01)
    assert dead.failure == {"layer": 2, "kind": "zero"} and dead.zero_cause == "exact_zeros"


def test_backward_events_are_first_in_backward_order():
    grad = cols(5, nan_frac=[1, 1, 1, 0, 0], underflow_frac=[0.5, 0.5, 0, 0, 0])
    ev = backward_events(grad, cols(5), cols(5), 0.01)
    assert ev.first_nan == 3 and ev.first_underflow == 2
    assert ev.failure == {"layer": 3, "kind": "nan"}


def test_unavailable_stats_give_no_event():
    pre = cols(3)
    post = cols(3)
    pre["underflow_frac"] = post["underflow_frac"] = None
    pre["overflow_frac"] = post["overflow_frac"] = None
    ev = forward_events(pre, post, 0.01)
    assert ev.first_underflow is None and ev.first_overflow is None and ev.failure is None


# ---- the torch statistics that feed the events ----

torch = pytest.importorskip("torch")
from precision_suite.engine.torch_stats import tensor_stats  # noqa: E402

IDX = {n: i for i, n in enumerate(STAT_NAMES)}


def stats(exact, rounded, fmt, native=False):
    return tensor_stats(torch.tensor([exact], dtype=torch.float32), torch.tensor([rounded], dtype=torch.float32),
                        get_format(fmt), native=native).numpy()[0]


def test_relu_zeros_are_not_underflow():
    fp16 = get_format("fp16")
    tiny = fp16.smallest_subnormal / 4  # rounds to zero in fp16
    exact = [0.0, 0.0, tiny, 4 * tiny]  # two ReLU zeros (exact), one true underflow (rms 2 tiny)
    s = stats(exact, [0.0, 0.0, 0.0, fp16.smallest_subnormal], "fp16")
    assert s[IDX["zero_frac"]] == 0.75
    assert s[IDX["underflow_frac"]] == s[IDX["flush_frac"]] == 0.25
    # beside a 1.0 the same element is below the tensor's resolution: flushed, not underflowed
    s = stats([0.0, 0.0, tiny, 1.0], [0.0, 0.0, 0.0, 1.0], "fp16")
    assert s[IDX["flush_frac"]] == 0.25 and s[IDX["underflow_frac"]] == 0.0


def test_overflow_is_judged_on_the_exact_value():
    fp16 = get_format("fp16")
    exact = [65519.0, 65520.0, -1e6, 1.0]
    rounded = [65504.0, np.inf, -np.inf, 1.0]
    s = stats(exact, rounded, "fp16")
    assert s[IDX["overflow_frac"]] == 0.5
    assert s[IDX["inf_frac"]] == 0.5
    assert s[IDX["saturated_frac"]] == 0.25  # 65519 -> max is a rounding, not an overflow
    assert fp16.overflows(65520.0) and not fp16.overflows(65519.0)


def test_e4m3fn_overflow_without_inf():
    s = stats([500.0, 464.0, 1.0], [np.nan, 448.0, 1.0], "fp8_e4m3fn")
    assert s[IDX["overflow_frac"]] == pytest.approx(1 / 3)
    assert s[IDX["nan_frac"]] == pytest.approx(1 / 3)


def test_native_cancellation_is_not_underflow():
    fp16 = get_format("fp16")
    exact = [fp16.smallest_normal * 4, fp16.smallest_normal / 2]  # rms ~ 2.9 smallest normal: both significant
    s = stats(exact, [0.0, 0.0], "fp16", native=True)
    assert s[IDX["underflow_frac"]] == 0.5  # only the one below smallest normal
    assert s[IDX["flush_frac"]] == 1.0


def test_subnormal_and_amin():
    fp16 = get_format("fp16")
    sub = fp16.smallest_subnormal * 3
    s = stats([sub, 2.0, 0.0, -4.0], [sub, 2.0, 0.0, -4.0], "fp16")
    assert s[IDX["subnormal_frac"]] == 0.0  # far below eps * rms: not significant
    assert stats([sub, 2 * sub, 0.0], [sub, 2 * sub, 0.0], "fp16")[IDX["subnormal_frac"]] == pytest.approx(2 / 3)
    assert s[IDX["amin_nonzero"]] == pytest.approx(sub)
    assert s[IDX["amax"]] == 4.0
    assert s[IDX["rms"]] == pytest.approx(np.sqrt((sub**2 + 4 + 16) / 4))
    assert s[IDX["mean"]] == pytest.approx((sub + 2 - 4) / 4)
