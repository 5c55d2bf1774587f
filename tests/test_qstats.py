"""Statistics of quantized matmul inputs (engine/torch_qstats.py) against plain numpy masks over the
numpy quantizer's output (engine/numpy_quantize.py), on stacks that mix Gaussian rows, outlier
channels, zeros, tiny values and inf/NaN: every count exactly, the norms to float64 rounding, each
row the same alone and stacked (the shortcuts the scale bounds allow must never change a number)."""

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

torch = pytest.importorskip("torch")

from precision_suite.engine.numpy_quantize import quantize_np  # noqa: E402
from precision_suite.engine.torch_qstats import QSTAT_NAMES, quantized_stats  # noqa: E402
from precision_suite.formats import get_format  # noqa: E402
from precision_suite.quantize import quantize  # noqa: E402
from precision_suite.scaled import SCALED_NAMES  # noqa: E402
from scaled_reference import reference  # noqa: E402

FLOATS = ["rms", "mean", "std", "qerr", "qerr_bulk"]
EXACT = [name for name in QSTAT_NAMES if name not in FLOATS]
F32 = np.float32


def _hot_block(x, rng):
    """In place on one case [2, 128]: a 16-element block holding 2^20 and values near 2^20 / 26, the
    rest of the case a thousand times smaller. Then rms ~ 2^20 / 16, so eps * rms is 2^20 / 32 for
    fp4 (eps 1/2), while the block's scale flushes everything below 2^20 / 16 (mxfp4: 2^18 * 1/4)
    or 2^20 / 24 (nvfp4): those values are flushed *and* significant, an underflow."""
    x *= 1e-3
    x[0, :16] = rng.choice([-1.0, 1.0], 16) * 2.0**20 / 26 * rng.uniform(0.98, 1.02, 16)
    x[0, 0] = 2.0**20


@st.composite
def stacks(draw):
    """(recipe, x [C, 2, 128] float32; widths are whole blocks, as the chain's are): Gaussian rows at
    a random magnitude, and per row possibly outlier channels, zero stretches, values far below the
    rest, log-uniform magnitudes over 2^+-30 (qerr_bulk's clipping runs all its rounds), a hot
    block, an inf or a NaN."""
    name = draw(st.sampled_from(SCALED_NAMES))
    c = draw(st.integers(1, 3))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    x = rng.standard_normal((c, 2, 128)) * np.exp2(rng.uniform(-60, 60, (c, 1, 1)))
    for row in range(c):
        kind = draw(st.sampled_from(["plain", "outliers", "zeros", "tiny", "wide", "hot_block", "inf", "nan"]))
        if kind == "outliers":
            x[row, :, rng.choice(128, 2, replace=False)] *= 1e4
        elif kind == "zeros":
            x[row].flat[rng.random(256) < 0.3] = 0.0
            x[row, 1] = 0.0
        elif kind == "tiny":
            x[row].flat[rng.random(256) < 0.3] *= 2.0**-40
        elif kind == "wide":
            x[row] = np.sign(x[row]) * np.exp2(rng.uniform(-30, 30, (2, 128)))
        elif kind == "hot_block":
            _hot_block(x[row], rng)
        elif kind in ("inf", "nan"):
            x[row, rng.integers(2), rng.integers(128)] = math.inf if kind == "inf" else math.nan
    return name, x.astype(F32)


def _compare(got, want, label, n):
    """Counts and extremes exactly; qerr to float64 rounding (both accumulate in float64); the
    moments of x' to fp32 accumulation (as the plain statistics: ``torch_stats._moments``)."""
    for i, stat in enumerate(QSTAT_NAMES):
        if stat in ("qerr", "qerr_bulk"):
            np.testing.assert_allclose(got[:, i], want[:, i], rtol=1e-9, atol=0, equal_nan=True,
                                       err_msg=f"{stat} ({label})")
        elif stat in FLOATS:  # sums in fp32: error ~ eps n max|x'|
            for row in np.flatnonzero(np.isfinite(want[:, QSTAT_NAMES.index("amax")])):
                scale = 1e-6 * n * want[row, QSTAT_NAMES.index("amax")]
                assert got[row, i] == pytest.approx(want[row, i], rel=1e-5, abs=scale), (stat, label, row)
        else:
            np.testing.assert_array_equal(got[:, i], want[:, i], err_msg=f"{stat} ({label})")


@settings(max_examples=200, deadline=None)
@given(stacks())
def test_quantized_statistics_match_numpy_masks_alone_and_stacked(case):
    name, x = case
    scaling = get_format(name).scaling
    qt = quantize(torch.from_numpy(x), scaling, "act", per_row=True)
    got = quantized_stats(torch.from_numpy(x), qt, scaling, "act")
    _compare(got, reference(x, scaling), name, x[0].size)
    for row in range(x.shape[0]):
        one = torch.from_numpy(x[row:row + 1])
        alone = quantized_stats(one, quantize(one, scaling, "act", per_row=True), scaling, "act")
        np.testing.assert_array_equal(alone[0], got[row], err_msg=f"{name}: row {row} alone vs stacked")


@pytest.mark.parametrize("name", SCALED_NAMES)
def test_weight_statistics_match_numpy_masks(name):
    """One weight, quantized per tensor, per 32/16 block along `in` or in 128x128 tiles (fp8_block)."""
    scaling = get_format(name).scaling
    w = np.random.default_rng(2).standard_normal((256, 256)).astype(F32)
    w[3, 7] = 40.0  # an outlier: its block (tile, tensor) flushes more
    qt = quantize(torch.from_numpy(w), scaling, "weight", per_row=False)
    got = quantized_stats(torch.from_numpy(w)[None], qt, scaling, "weight")
    deq, _, _ = quantize_np(w, scaling, "weight", per_row=False)
    np.testing.assert_array_equal(qt.deq.numpy(), deq)
    d, e = deq.astype(np.float64), w.astype(np.float64)
    i = QSTAT_NAMES.index
    assert got[0, i("qerr")] == pytest.approx(np.linalg.norm(d - e) / np.linalg.norm(e), rel=1e-9)
    assert got[0, i("flush_frac")] == np.mean((e != 0) & (d == 0))
    assert got[0, i("overflow_frac")] == got[0, i("nan_frac")] == 0


def test_an_inf_block_is_nan_not_overflow_and_a_scale_past_fp32_is_overflow():
    """mxfp8_e4m3: an inf makes its own 32-block NaN (nan_frac 32/n, overflow 0); fp8_tensor: a
    tensor of 1e-40s needs the scale 448 / 1e-40, past fp32's max: every element overflows."""
    x = np.ones((1, 4, 64), F32)
    x[0, 2, 40] = math.inf
    mx = get_format("mxfp8_e4m3").scaling
    got = quantized_stats(torch.from_numpy(x), quantize(torch.from_numpy(x), mx, "act"), mx, "act")
    i = QSTAT_NAMES.index
    assert got[0, i("nan_frac")] == 32 / 256 and got[0, i("overflow_frac")] == 0 and got[0, i("inf_frac")] == 0
    assert got[0, i("qerr")] == 0  # the other blocks hold 1.0 exactly
    tiny = np.full((1, 4, 64), 1e-40, F32)
    ft = get_format("fp8_tensor").scaling
    got = quantized_stats(torch.from_numpy(tiny), quantize(torch.from_numpy(tiny), ft, "act"), ft, "act")
    assert got[0, i("overflow_frac")] == 1 and got[0, i("nan_frac")] == 1 and math.isnan(got[0, i("qerr")])


@pytest.mark.parametrize("name", ["mxfp4", "nvfp4"])
def test_a_hot_block_underflows_significantly(name):
    """The one construction above in which a block format flushes significant values: every
    flushed value of the hot block counts as underflow (the scale bounds must not skip it)."""
    x = np.random.default_rng(5).standard_normal((1, 2, 128))
    _hot_block(x[0], np.random.default_rng(6))
    x = x.astype(F32)
    scaling = get_format(name).scaling
    got = quantized_stats(torch.from_numpy(x), quantize(torch.from_numpy(x), scaling, "act"), scaling, "act")
    i = QSTAT_NAMES.index
    assert got[0, i("underflow_frac")] == pytest.approx(15 / 256)  # the 15 values near 2^20 / 26
    _compare(got, reference(x, scaling), name, x.size)
