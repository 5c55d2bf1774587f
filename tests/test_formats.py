"""Format limits come from finfo; the derived overflow threshold sits where rounding says it does."""

import functools
import math

import ml_dtypes
import numpy as np
import pytest

from precision_suite.formats import FORMATS, get_format, round_to_format

LOW = ["fp16", "bf16", "fp8_e4m3fn", "fp8_e5m2"]


@pytest.mark.parametrize("name", list(FORMATS))
def test_limits_equal_finfo(name):
    fmt = FORMATS[name]
    info = ml_dtypes.finfo(fmt.np_dtype)
    assert fmt.max == float(info.max)
    assert fmt.smallest_normal == float(info.smallest_normal)
    assert fmt.smallest_subnormal == float(info.smallest_subnormal)
    assert fmt.eps == float(info.eps) == 2.0 ** int(info.machep)
    assert fmt.smallest_subnormal == fmt.smallest_normal * fmt.eps  # documented identity of IEEE-like formats


@pytest.mark.parametrize("name", LOW + ["fp32"])
def test_overflow_threshold_is_the_rounding_edge(name):
    """Just below T_of rounds to max (a rounding error, not an overflow); T_of itself rounds past max."""
    fmt = FORMATS[name]
    t = fmt.overflow_threshold
    below = np.nextafter(t, 0.0)
    assert float(round_to_format(np.array([below]), fmt)[0]) == fmt.max
    above = np.nextafter(t, np.inf)
    at, past = (float(v) for v in round_to_format(np.array([t, above]), fmt).astype(np.float64))
    assert math.isinf(past) if fmt.has_inf else math.isnan(past)
    # the tie at T_of: nearest-even goes past max only when max's significand is odd
    assert (at != fmt.max) == fmt.tie_overflows == bool(fmt.overflows(t))
    assert not fmt.overflows(below) and fmt.overflows(above)
    assert fmt.max < t < 2 * fmt.max


def test_e4m3fn_tie_at_464_rounds_to_max():
    """e4m3fn's max 448 has an even significand, so 464 (the tie) rounds to 448, not to NaN."""
    fmt = get_format("e4m3")
    assert fmt.overflow_threshold == 464 and not fmt.tie_overflows
    assert get_format("fp16").tie_overflows and get_format("fp16").overflow_threshold == 65520


def test_has_inf_matches_the_format():
    assert not FORMATS["fp8_e4m3fn"].has_inf
    assert all(FORMATS[n].has_inf for n in ("fp64", "fp32", "fp16", "bf16", "fp8_e5m2"))


@pytest.mark.parametrize("alias,name", [("half", "fp16"), ("float16", "fp16"), ("bfloat16", "bf16"),
                                        ("E4M3", "fp8_e4m3fn"), ("e5m2", "fp8_e5m2"), ("float32", "fp32")])
def test_aliases_normalize(alias, name):
    assert get_format(alias).name == name


def test_unknown_format_lists_valid_names():
    with pytest.raises(ValueError, match="fp16.*bf16"):
        get_format("fp12")


@pytest.mark.parametrize("saturating", [False, True], ids=["torch-casts", "casts-saturate"])
@pytest.mark.parametrize("name", LOW + ["fp32"])
def test_torch_emulated_rounding_equals_numpy_reference(name, saturating, monkeypatch):
    """The torch engine's rounder (fp32 and fp64 inputs) against the numpy/ml_dtypes reference, with
    this torch's casts and as if every cast saturated (the rounder then marks overflows itself)."""
    torch = pytest.importorskip("torch")
    from precision_suite.engine import torch_rounding
    from precision_suite.engine.torch_rounding import rounder

    if saturating:  # a torch whose every cast clamps to the format's max (as its e4m3fn cast does)
        real = torch_rounding.cast
        monkeypatch.setattr(torch_rounding, "cast", lambda x, dtype: real(
            x.clamp(-torch.finfo(dtype).max, torch.finfo(dtype).max), dtype))
        torch_rounding.cast_saturates.cache_clear()
        monkeypatch.setattr(torch_rounding, "cast_saturates", functools.cache(torch_rounding.cast_saturates.__wrapped__))

    fmt = FORMATS[name]
    rng = np.random.default_rng(1)
    scale = np.exp2(rng.uniform(math.log2(fmt.smallest_subnormal) - 2, math.log2(fmt.max) + 1, 20000))
    x64 = scale * rng.choice([-1.0, 1.0], scale.size) * (1 + rng.uniform(0, 1, scale.size))
    # double-rounding traps: a hair above the midpoint between neighbours of the format, which a
    # float64 -> fp32 -> format cast rounds to the midpoint and then to even (1+2^-8+2^-30 -> bf16)
    codes = round_to_format(x64[:2000], fmt).astype(np.float64)
    codes = codes[np.isfinite(codes) & (np.abs(codes) < fmt.max / 2) & (np.abs(codes) >= fmt.smallest_normal)]
    ulp = np.exp2(np.floor(np.log2(np.abs(codes)))) * fmt.eps
    x64 = np.concatenate([x64, codes + ulp / 2 * (1 + 2.0**-22), codes - ulp / 2 * (1 + 2.0**-22)])
    want = round_to_format(x64, fmt).astype(np.float64)
    got64 = rounder(fmt)(torch.from_numpy(x64)).numpy()
    np.testing.assert_array_equal(got64, want)
    if fmt.name != "fp32":  # from fp32 a single cast is correct
        with np.errstate(over="ignore"):
            x32 = x64.astype(np.float32)
        want32 = round_to_format(x32.astype(np.float64), fmt).astype(np.float64)
        got32 = rounder(fmt)(torch.from_numpy(x32)).numpy().astype(np.float64)
        np.testing.assert_array_equal(got32, want32)
