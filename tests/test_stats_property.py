"""The torch statistics (bit-pattern counts, float32 magnitudes, host arithmetic) against the numpy
backend's plain masks, on random stacks that mix every element class: zeros, subnormals, normals,
values past max, inf and NaN."""

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

torch = pytest.importorskip("torch")

from precision_suite.engine import numpy_stats as ref  # noqa: E402
from precision_suite.engine.numpy_backend import _round  # noqa: E402
from precision_suite.engine.torch_stats import grad_extra_stats, tensor_stats  # noqa: E402
from precision_suite.formats import get_format  # noqa: E402
from precision_suite.stats import GRAD_EXTRA_STATS, STAT_NAMES  # noqa: E402

FORMATS = ["fp16", "bf16", "fp32", "fp8_e4m3fn", "fp8_e5m2", "fp64"]
COUNTS = ["zero_frac", "underflow_frac", "flush_frac", "overflow_frac", "subnormal_frac", "inf_frac", "nan_frac",
          "saturated_frac"]


@st.composite
def stacks(draw):
    """(format, exact [C, n] in the wide dtype): magnitudes log-uniform from below the format's
    smallest subnormal to past its max, with exact zeros and specials sprinkled in."""
    fmt = get_format(draw(st.sampled_from(FORMATS)))
    c, n = draw(st.integers(1, 3)), draw(st.integers(1, 40))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    lo, hi = math.log2(fmt.smallest_subnormal) - 3, math.log2(fmt.max) + 2  # fp64: to 2^-1077 and inf
    exps = rng.uniform(lo, hi, (c, n))
    if draw(st.booleans()):  # a narrow band: all-subnormal or all-normal rows happen too
        centre = rng.uniform(lo, hi)
        exps = centre + rng.uniform(-1, 1, (c, n))
    with np.errstate(over="ignore"):  # fp64's band reaches past 2^1024: inf on purpose, not a warning
        x = np.exp2(exps) * rng.choice([-1.0, 1.0], (c, n))
    for value, prob in ((0.0, draw(st.sampled_from([0, 0.1, 0.5, 1.0]))),
                        (math.inf, draw(st.sampled_from([0, 0.05]))),
                        (math.nan, draw(st.sampled_from([0, 0.05, 1.0])))):
        x[rng.random((c, n)) < prob] = value
    wide = np.float64 if fmt.name in ("fp32", "fp64") else np.float32
    with np.errstate(over="ignore"):
        return fmt, x.astype(wide)


def _moments(x: np.ndarray) -> dict:
    """mean, std and rms by exactly rounded sums (math.fsum) of x scaled by 2^k to a largest
    magnitude ~1, so no square leaves float64 (numpy's own std overflows near 1e300)."""
    x = x.astype(np.float64)
    top = float(np.abs(x).max())
    k = 0 if top == 0 else -math.ceil(math.log2(top))
    y, n = np.ldexp(x, k), len(x)
    mean = math.fsum(y) / n
    return {"mean": math.ldexp(mean, -k), "rms": math.ldexp(math.sqrt(math.fsum(y * y) / n), -k),
            "std": math.ldexp(math.sqrt(math.fsum((y - mean) ** 2) / n), -k)}


@settings(max_examples=300, deadline=None)
@given(stacks())
def test_torch_statistics_match_numpy_masks(case):
    fmt, exact = case
    rounded = _round(exact, fmt)
    got = tensor_stats(torch.from_numpy(exact), torch.from_numpy(rounded), fmt).numpy()
    grads = grad_extra_stats(torch.from_numpy(exact), 0.1, fmt)
    for row in range(exact.shape[0]):
        want = ref.tensor_stats(exact[row], rounded[row], fmt)
        alone = tensor_stats(torch.from_numpy(exact[row:row + 1]), torch.from_numpy(rounded[row:row + 1]), fmt).numpy()
        for name in COUNTS:
            i = STAT_NAMES.index(name)
            assert got[row, i] == pytest.approx(want[i], abs=1e-12, nan_ok=True), (name, fmt.name, row)
            np.testing.assert_equal(alone[0, i], got[row, i], err_msg=f"{name}: alone vs stacked ({fmt.name})")
        i = STAT_NAMES.index("amax")
        np.testing.assert_equal(got[row, i], want[i])
        if not np.isnan(rounded[row]).any():  # numpy's min propagates NaN; torch leaves NaN out
            i = STAT_NAMES.index("amin_nonzero")
            np.testing.assert_equal(got[row, i], want[i])
        if np.isfinite(rounded[row]).all():  # sums in the wide dtype: error ~ eps n max|x|
            scale = 1e-6 * rounded.shape[1] * float(np.abs(rounded[row]).max())
            for name, value in _moments(rounded[row]).items():
                got_value = got[row, STAT_NAMES.index(name)]
                assert got_value == pytest.approx(value, rel=1e-5, abs=scale), (name, fmt.name)
        if not np.isnan(exact[row]).any():  # torch counts NaN as zero there, numpy sorts it last
            want_extra = ref.grad_extra_stats(exact[row], 0.1, fmt)
            for k, name in enumerate(GRAD_EXTRA_STATS):
                np.testing.assert_equal(grads[row, k], want_extra[k], err_msg=f"{name} {fmt.name}")
