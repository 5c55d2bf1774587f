"""Quantizers of the scaled formats: element rounding over every code, E8M0/E4M3 scales on
hand-built blocks, the torch and numpy quantizers against each other, and the edge cases (all-zero
blocks, inf/NaN blocks, the ends of the scale range, saturation)."""

import math
from fractions import Fraction

import numpy as np
import pytest

from precision_suite.engine.numpy_quantize import quantize_np
from precision_suite.formats import ELEMENT_FORMATS, get_format
from precision_suite.quantize import quantize, round_element
from precision_suite.scaled import SCALED_NAMES

torch = pytest.importorskip("torch")

ELEMENTS = ("fp8_e4m3fn", "fp8_e5m2", "fp6_e2m3", "fp6_e3m2", "fp4_e2m1")


def _codes(elem):
    """Every finite value of the element format, ascending, from its bit patterns."""
    dtype = elem.np_dtype
    bits = np.arange(2 ** (8 * dtype.itemsize), dtype=np.uint8 if dtype.itemsize == 1 else np.uint16)
    values = bits.view(dtype).astype(np.float64)
    return np.unique(values[np.isfinite(values)])


@pytest.mark.parametrize("name", ELEMENTS)
def test_round_element_matches_ml_dtypes_on_every_code_midpoint_and_neighbour(name):
    """Every code, every midpoint between neighbours (the ties) and the float32 values on either
    side of each midpoint, against ml_dtypes' nearest-even cast."""
    elem = ELEMENT_FORMATS[name]
    codes = _codes(elem)
    mids = ((codes[1:] + codes[:-1]) / 2).astype(np.float32)  # exact: codes have few bits
    probes = np.concatenate([codes.astype(np.float32), mids, np.nextafter(mids, np.float32(-np.inf)),
                             np.nextafter(mids, np.float32(np.inf))])
    probes = probes[np.abs(probes) <= elem.max]
    expected = probes.astype(elem.np_dtype).astype(np.float32)
    got = round_element(torch.from_numpy(probes), elem).numpy()
    np.testing.assert_array_equal(np.signbit(got[got == 0]), np.signbit(expected[got == 0]))
    np.testing.assert_array_equal(got, expected)
    assert len(codes) == len(np.unique(round_element(torch.from_numpy(codes.astype(np.float32)), elem).numpy()))


def _q(fmt_name, x, role="act", per_row=True):
    return quantize(torch.tensor(np.asarray(x, np.float32)), get_format(fmt_name).scaling, role, per_row)


def test_mx_floor_scale_saturates_and_ceil_does_not():
    """mxfp4, one block of 32 whose amax is 7: floor gives e = floor(log2 7) - 2 = 0, so 7 clamps to
    fp4's max 6 (saturation); ceil gives e = ceil(log2(7/6)) = 1 and 7/2 = 3.5 ties to 4 (even)."""
    x = np.full(32, 0.25, np.float32)
    x[0] = 7.0
    floor, ceil = _q("mxfp4", x), _q("mxfp4(scale_rule=ceil)", x)
    assert floor.scale.item() == 1.0 and floor.q[0].item() == 6.0 and floor.deq[0].item() == 6.0
    assert ceil.scale.item() == 2.0 and ceil.deq[0].item() == 8.0
    # 0.25 / 2 = 0.125 is below half of fp4's smallest subnormal 0.5: flushed under ceil
    assert floor.deq[1].item() == 0.0 and ceil.deq[1].item() == 0.0


@pytest.mark.parametrize("name", [n for n in SCALED_NAMES if n.startswith("mx")])
@pytest.mark.parametrize("rule", ["floor", "ceil"])
def test_e8m0_exponent_from_frexp_against_exact_log2(name, rule):
    """Blocks with amax 2^k * m across and beyond E8M0's range: e is floor(log2 amax) - emax or
    ceil(log2(amax / max)) computed here in exact rational arithmetic, clamped to [-127, 127]."""
    fmt = get_format(f"{name}(scale_rule={rule})")
    elem = ELEMENT_FORMATS[fmt.scaling.element]
    amaxes = [m * 2.0**k for k in range(-140, 128, 7) for m in (1.0, 1.25, 1.9999)]
    amaxes = [a for a in amaxes if a <= float(np.finfo(np.float32).max) and np.float32(a) > 0]
    blocks = np.zeros((len(amaxes), 32), np.float32)
    blocks[:, 3] = amaxes
    got = _q(fmt.name, blocks.reshape(1, -1)).scale.numpy().ravel()
    for a, s in zip(blocks[:, 3].astype(np.float64), got):
        if rule == "floor":
            e = math.frexp(a)[1] - 1 - elem.emax
        else:
            r = Fraction(a) / Fraction(elem.max)  # exact: the smallest e with a <= max * 2^e
            e = r.numerator.bit_length() - r.denominator.bit_length() - 1
            while Fraction(2) ** e < r:
                e += 1
        assert s == 2.0 ** min(max(e, -127), 127), (a, s, e)


def test_all_zero_block_gets_two_to_minus_127_and_zeros():
    x = np.zeros(64, np.float32)
    x[40] = 3.0
    out = _q("mxfp8_e4m3", x)
    assert out.scale[0, 0].item() == 2.0**-127 and np.all(out.deq[:32].numpy() == 0)
    assert out.deq[40].item() == 3.0


@pytest.mark.parametrize("name", SCALED_NAMES)
@pytest.mark.parametrize("special", [math.inf, -math.inf, math.nan])
def test_a_block_holding_inf_or_nan_becomes_nan_and_no_other_block_does(name, special):
    """fp6/fp4 have no NaN: the NaN must survive as NaN in the dequantized tensor, never -0."""
    fmt = get_format(name)
    x = np.random.default_rng(1).standard_normal((2, 256)).astype(np.float32)
    x[0, 5] = special
    out = _q(name, x)
    deq = out.deq.numpy()
    if fmt.scaling.block == 0 or fmt.scaling.family == "nv":  # the per-tensor scale sees it: the whole case
        assert np.isnan(deq[0]).all() or np.isnan(deq[0, :fmt.scaling.block or 256]).all()
    else:
        assert np.isnan(deq[0, :fmt.scaling.block]).all()
    assert np.isfinite(deq[1]).all()


def test_fp8_tensor_scale_leaving_fp32_is_nan_not_a_silent_zero():
    """amax 1e-40: 448 / amax overflows fp32, so the scale is past the top of its format."""
    out = _q("fp8_tensor", np.full(16, 1e-40, np.float32))
    assert np.isnan(out.deq.numpy()).all()


def test_nvfp4_block_scale_rounding_to_zero_gives_zeros():
    """A block whose amax / 6 / S is below half E4M3's smallest subnormal (2^-10) rounds its scale
    to zero: its elements are zeros, not NaN; the block holding the tensor's amax keeps 6 * S."""
    x = np.zeros(32, np.float32)
    x[0] = 1.0
    x[16:] = 1e-7
    out = _q("nvfp4", x)
    assert out.deq[0].item() == pytest.approx(1.0, rel=2**-3)
    assert np.all(out.deq[16:].numpy() == 0) and out.scale[0, 1].item() == 0


def test_fp8_block_weights_take_128x128_tiles():
    w = np.ones((256, 256), np.float32)
    w[130, 3] = 100.0  # tile (1, 0) only
    out = _q("fp8_block", w, role="weight", per_row=False)
    scale = out.scale.numpy().reshape(2, 2)
    assert scale[1, 0] == np.float32(100.0) / np.float32(448.0) and scale[0, 0] == scale[0, 1] == scale[1, 1]


def _specials(rng, shape):
    x = rng.standard_normal(shape).astype(np.float32) * np.exp2(rng.integers(-30, 30, shape[:-1] + (1,)))
    x[..., :3] *= 1e4  # outliers
    x[0, 0, 32:64] = 0  # an all-zero block
    x[0, 1, 0:128] = 0
    x[0, 2, 7] = np.inf
    x[0, 3, 100] = np.nan
    x[1, 0, :] *= 2.0**-120  # the bottom of E8M0's range
    return x.astype(np.float32)


@pytest.mark.parametrize("name", [*SCALED_NAMES, "mxfp4(scale_rule=ceil)", "mxfp8_e4m3(scale_rule=floor)"])
@pytest.mark.parametrize("role", ["act", "weight", "grad"])
def test_torch_and_numpy_quantizers_agree_bit_for_bit(name, role):
    rng = np.random.default_rng(7)
    fmt = get_format(name)
    x = _specials(rng, (2, 8, 256)) if role != "weight" else rng.standard_normal((256, 256)).astype(np.float32)
    per_row = role != "weight"
    t = quantize(torch.from_numpy(x), fmt.scaling, role, per_row)
    deq, q, scale = quantize_np(x, fmt.scaling, role, per_row)
    np.testing.assert_array_equal(t.deq.numpy(), deq)
    np.testing.assert_array_equal(t.q.numpy(), q)
    np.testing.assert_array_equal(t.scale.numpy(), scale)
