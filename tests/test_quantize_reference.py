"""The quantizers against third-party reference code on fixed vectors (torchao's MX and NVFP4
reference implementations, CPU), and qerr of Gaussian input against an independent float64
computation. Test-only: torchao is not a dependency of the package."""

import warnings

import numpy as np
import pytest

from precision_suite.engine.numpy_quantize import quantize_np
from precision_suite.formats import get_format
from precision_suite.quantize import quantize
from precision_suite.scaled import SCALED_NAMES

torch = pytest.importorskip("torch")
with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    mx = pytest.importorskip("torchao.prototype.mx_formats.mx_tensor", reason="torchao's MX reference code")
    nv = pytest.importorskip("torchao.prototype.mx_formats.nvfp4_tensor", reason="torchao's NVFP4 reference code")
    from torchao.prototype.mx_formats.config import ScaleCalculationMode
    from torchao.prototype.mx_formats.constants import DTYPE_FP6_E2M3, DTYPE_FP6_E3M2
    from torchao.prototype.mx_formats.kernels import f4_unpacked_to_f32, unpack_uint4

ELEM = {"mxfp8_e4m3": torch.float8_e4m3fn, "mxfp8_e5m2": torch.float8_e5m2, "mxfp6_e2m3": DTYPE_FP6_E2M3,
        "mxfp6_e3m2": DTYPE_FP6_E3M2, "mxfp4": torch.float4_e2m1fn_x2}


def _vectors():
    """[16, 64] float32: Gaussian rows over a wide range of scales, with an all-zero block, a
    saturating outlier, rows at the bottom and top of E8M0's range and a NaN block."""
    rng = np.random.default_rng(3)
    x = rng.standard_normal((16, 64)) * np.exp2(rng.integers(-20, 20, (16, 1)))
    x[0, :32] = 0  # all-zero block
    x[1, 5] = 1e4  # one outlier: its block's small elements flush
    # not compared: blocks whose exponent clamps at E8M0's bottom (2^-127); torchao's dequantized
    # values there are half ours (test_quantize.py checks that edge on hand-built blocks)
    x[3] *= 2.0**100  # near the top
    x[4, 40] = np.nan
    return x.astype(np.float32)


def _torchao_mx(x, name, rule):
    mode = {"floor": ScaleCalculationMode.FLOOR, "ceil": ScaleCalculationMode.RCEIL}[rule]
    scale, data = mx.to_mx(torch.from_numpy(x), ELEM[name], 32, scaling_mode=mode)
    return mx.to_dtype(data, scale, ELEM[name], 32, torch.float32).numpy()


@pytest.mark.parametrize("name", list(ELEM))
@pytest.mark.parametrize("rule", ["floor", "ceil"])
def test_mx_matches_torchao(name, rule):
    """Both quantizers equal torchao's dequantized MX tensor, NaN where torchao's is NaN."""
    x = _vectors()
    if rule == "ceil" and name in ("mxfp6_e2m3", "mxfp6_e3m2", "mxfp4"):
        pytest.skip("torchao's RCEIL supports fp8 elements only")
    fmt = get_format(f"{name}(scale_rule={rule})")
    want = _torchao_mx(x, name, rule)
    got = quantize(torch.from_numpy(x), fmt.scaling, "act", per_row=False).deq.numpy()
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(quantize_np(x, fmt.scaling, "act", per_row=False)[0], want)


def test_nvfp4_matches_torchao_two_level_scaling():
    """Vectors whose block scales stay above E4M3's smallest subnormal (torchao clamps a scale
    there; we let it round to zero, docs/scaled-formats.md), including a saturating outlier."""
    rng = np.random.default_rng(5)
    x = (rng.standard_normal((8, 64)) * np.exp2(rng.integers(-3, 3, (8, 1)))).astype(np.float32)
    x[0, 3] = 40.0
    t = torch.from_numpy(x)
    amax = t.abs().amax()
    pts = nv.per_tensor_amax_to_scale(amax)
    scales, packed = nv.nvfp4_quantize(t, 16, pts)
    codes = f4_unpacked_to_f32(unpack_uint4(packed)).reshape(8, 4, 16)
    want = (codes * (scales.to(torch.float32).reshape(8, 4, 1) * pts)).reshape(8, 64).numpy()
    fmt = get_format("nvfp4")
    got = quantize(t, fmt.scaling, "act", per_row=False)
    np.testing.assert_array_equal(got.q.numpy(), codes.reshape(8, 64).numpy())
    np.testing.assert_allclose(got.deq.numpy(), want, rtol=2**-23, atol=0)


@pytest.mark.parametrize("name", SCALED_NAMES)
def test_qerr_of_gaussian_input_against_float64(name):
    """qerr = ||x' - x|| / ||x|| for N(0, 1) input, the torch quantizer's x' against a float64
    dequantization of the numpy quantizer's codes and scales (the product q * scale in float64),
    and within the bounds the element format implies: the relative rounding error of one element
    is at most eps/2, so qerr <= eps/2 unless elements saturate or flush."""
    fmt = get_format(name)
    x = np.random.default_rng(11).standard_normal((4, 1024)).astype(np.float32)
    got = quantize(torch.from_numpy(x), fmt.scaling, "act")
    deq, q, scale = quantize_np(x, fmt.scaling, "act")
    block = fmt.scaling.block or 1024
    deq64 = (q.astype(np.float64).reshape(4, -1, block) * scale.astype(np.float64)[:, :, None]).reshape(4, 1024)
    ref = np.linalg.norm(deq64 - x, axis=1) / np.linalg.norm(x.astype(np.float64), axis=1)
    mine = np.linalg.norm(got.deq.numpy().astype(np.float64) - x, axis=1) / np.linalg.norm(x, axis=1)
    np.testing.assert_allclose(mine, ref, rtol=1e-6)
    eps = got.element.eps
    assert (ref < eps).all() and (ref > eps / 16).all(), (ref, eps)
