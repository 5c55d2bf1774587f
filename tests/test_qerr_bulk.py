"""qerr_bulk's bulk (docs/scaled-formats.md): the elements with |x| <= r*, r* the rms left after
sigma clipping at 4 r. Outlier channels set rms(x) (3 of 256 channels at 1e4: rms ~ 1075), so the
bulk must not be |x| <= rms(x): it would hold outlier-channel values and report the bulk as fine.
Checked in both backends against what the test knows independently (which channels are the
outliers), and r* itself in torch (stacked and alone), numpy and the plain reference alike, on rows
that take every round the definition allows."""

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

torch = pytest.importorskip("torch")

from precision_suite.engine.numpy_quantize import nonfinite_blocks, quantize_np_full  # noqa: E402
from precision_suite.engine.numpy_stats import bulk_rms as numpy_bulk_rms  # noqa: E402
from precision_suite.engine.numpy_stats import gemm_stats  # noqa: E402
from precision_suite.engine.torch_qstats import QSTAT_NAMES, quantized_stats  # noqa: E402
from precision_suite.engine.torch_qstats import _just_above  # noqa: E402
from precision_suite.engine.torch_qstats import bulk_rms as torch_bulk_rms  # noqa: E402
from precision_suite.formats import get_format  # noqa: E402
from precision_suite.quantize import quantize  # noqa: E402
from precision_suite.stats import STAT_NAMES  # noqa: E402
from scaled_reference import bulk_rms as reference_bulk_rms  # noqa: E402

OUTLIER_CHANNELS = [5, 77, 200]


def _outlier_input() -> tuple[np.ndarray, np.ndarray]:
    """(x [64, 256] float32: N(0, 1) with channels 5, 77 and 200 multiplied by 1e4, the
    non-outlier channels as a [64, 256] bool mask)."""
    x = np.random.default_rng(0).standard_normal((64, 256))
    x[:, OUTLIER_CHANNELS] *= 1e4
    normal = np.ones(x.shape, dtype=bool)
    normal[:, OUTLIER_CHANNELS] = False
    return x.astype(np.float32), normal


def _qerr_bulk_and_deq(x: np.ndarray, name: str, backend: str) -> tuple[float, np.ndarray]:
    """qerr_bulk of x quantized as the recipe's activation (one case) by ``backend``, and that
    backend's dequantized x' (float64)."""
    scaling = get_format(name).scaling
    if backend == "torch":
        t = torch.from_numpy(x)[None]
        qt = quantize(t, scaling, "act", per_row=True)
        stats = quantized_stats(t, qt, scaling, "act")[0]
        return stats[QSTAT_NAMES.index("qerr_bulk")], qt.deq[0].numpy().astype(np.float64)
    quant = quantize_np_full(x, scaling, "act", per_row=False)
    stats = gemm_stats(x, quant, nonfinite_blocks(x, scaling, "act", per_row=False))
    return stats[len(STAT_NAMES) + 1], quant.deq.astype(np.float64)


def _sqnr(d: np.ndarray, e: np.ndarray) -> float:
    return -20 * math.log10(np.linalg.norm(d - e) / np.linalg.norm(e))


@pytest.mark.parametrize("backend", ["torch", "numpy"])
@pytest.mark.parametrize("name", ["mxfp4", "nvfp4", "fp8_tensor"])
def test_outlier_channels_stay_out_of_the_bulk(name, backend):
    """The bulk's SQNR is the SQNR of the non-outlier channels' elements with |x| <= their own rms
    (the bulk as the test knows it, without any clipping), within 0.05 dB. Under |x| <= rms(x) it
    was 18.3 / 30.1 / 31.8 dB against 4.3 / 7.3 / 23.3 dB: the outlier channels' values up to 1075
    carried the bulk's error energy.

    For the block recipes that is also within 1.5 dB of the SQNR over the whole non-outlier
    channels (a block's scale is set by the outlier in it, whatever the magnitude below it).
    fp8_tensor's scale 448 / amax ~ 0.01 puts every bulk element among e4m3's subnormals, a fixed
    absolute step: the small elements lose more, relatively, than the channels' larger ones, so
    the bulk's SQNR lies ~5 dB under the channels', and only the first check applies."""
    x, normal = _outlier_input()
    got, d = _qerr_bulk_and_deq(x, name, backend)
    e = x.astype(np.float64)
    rms_normal = math.sqrt(np.mean(e[normal] ** 2))
    bulk = normal & (np.abs(e) <= rms_normal)
    sqnr = -20 * math.log10(got)
    assert sqnr == pytest.approx(_sqnr(d[bulk], e[bulk]), abs=0.05)
    if name != "fp8_tensor":
        assert sqnr == pytest.approx(_sqnr(d[normal], e[normal]), abs=1.5)


@pytest.mark.parametrize("backend", ["torch", "numpy"])
def test_bulk_rms_of_outlier_channels_is_the_other_channels_rms(backend):
    """r* of the outlier input: within 1% of the rms of the non-outlier channels (~1), while
    rms(x) is ~1075."""
    x, normal = _outlier_input()
    e = x.astype(np.float64)
    if backend == "torch":
        t = torch.from_numpy(x).reshape(1, -1)
        r = torch_bulk_rms(t.abs())[0]
    else:
        r = numpy_bulk_rms(x)
    assert math.sqrt(np.mean(e * e)) > 1000
    assert r == pytest.approx(math.sqrt(np.mean(e[normal] ** 2)), rel=0.01)


def _hard_rows() -> np.ndarray:
    """[6, 512] float32 rows for r*: Gaussian (one round), Gaussian with outlier elements (a few),
    log-uniform magnitudes over 2^-40 .. 2^40 (more rounds than the 16 allowed), the same with an inf
    and a NaN (left out of every rms), all zeros (r* = 0) and all inf (r* = inf)."""
    rng = np.random.default_rng(7)
    rows = np.empty((6, 512))
    rows[0] = rng.standard_normal(512)
    rows[1] = rng.standard_normal(512)
    rows[1, rng.choice(512, 6, replace=False)] *= 1e5
    rows[2] = rng.choice([-1.0, 1.0], 512) * np.exp2(rng.uniform(-40, 40, 512))
    rows[3] = rows[2]
    rows[3, [3, 300]] = math.inf, math.nan
    rows[4] = 0.0
    rows[5] = math.inf
    return rows.astype(np.float32)


def test_bulk_rms_is_the_same_in_both_backends_and_the_reference():
    """Every row's r*: torch stacked, torch alone, numpy and the plain reference agree to float64
    rounding (their sums run in other orders), and the log-uniform rows stop at the 16th round:
    a 17th would still move r*."""
    rows = _hard_rows()
    t = torch.from_numpy(rows)
    stacked = torch_bulk_rms(t.abs())
    for i, row in enumerate(rows):
        one = t[i:i + 1]
        alone = torch_bulk_rms(one.abs())[0]
        assert alone == stacked[i] or (math.isnan(alone) and math.isnan(stacked[i])), f"row {i} alone vs stacked"
        want = reference_bulk_rms(row)
        assert stacked[i] == pytest.approx(want, rel=1e-12, abs=0), f"row {i}: torch"
        assert numpy_bulk_rms(row) == pytest.approx(want, rel=1e-12, abs=0), f"row {i}: numpy"
    assert stacked[4] == 0 and stacked[5] == math.inf
    for i in (2, 3):  # the cap binds: these rows are still clipping after 16 rounds
        r0, r16, r17 = (reference_bulk_rms(rows[i], rounds=k) for k in (0, 16, 17))
        assert r17 < r16 < 1e-3 * r0


F32_MAX = float(np.finfo(np.float32).max)


@settings(max_examples=300, deadline=None)
@given(st.floats(0, 1e39), st.lists(st.floats(0, F32_MAX, width=32), min_size=1, max_size=8))
def test_the_fp32_bound_keeps_exactly_the_values_at_most_a_float64_bound(value, xs):
    """|x| <= bound (float64) for fp32 |x|, in both masks the torch statistics build from
    ``_just_above``: on values and on bit patterns. Bounds: a random one (past fp32's max too), and
    at x[0] itself, one float64 ulp either side of it and halfway to the next fp32, where rounding
    the bound the wrong way would keep or drop x == x[0]."""
    x = np.array(xs, dtype=np.float32)
    x0 = float(x[0])
    with np.errstate(over="ignore"):  # the next fp32 after fp32's max is inf
        bounds = np.array([value, x0, np.nextafter(x0, -np.inf), np.nextafter(x0, np.inf),
                           (x0 + float(np.nextafter(x[0], np.float32(np.inf)))) / 2])
        above = _just_above(bounds, "cpu")
    want = x.astype(np.float64)[None, :] <= bounds[:, None]
    t = torch.from_numpy(x)[None, :]
    np.testing.assert_array_equal((above - t).sign().clamp(min=0).numpy() == 1, want)
    np.testing.assert_array_equal((t.view(torch.int32) < above.view(torch.int32)).numpy(), want)
