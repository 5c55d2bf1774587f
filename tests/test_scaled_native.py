"""Native mode for the scaled formats (engine/torch_scaled_native.py, torch_scaled_mm.py): fp8_tensor
runs torch._scaled_mm on CPU and agrees with emulated mode to the storage rounding; recipes whose
scaling the device refuses, or that are not built, are skipped with the reason; the layouts handed
to the kernel are checked against torch's own reference code where the kernel cannot run here."""

from dataclasses import replace

import numpy as np
import pytest

from precision_suite import run_case
from precision_suite.formats import ELEMENT_FORMATS, get_format
from precision_suite.quantize import quantize

torch = pytest.importorskip("torch")

HAS_SCALED_MM = hasattr(torch, "_scaled_mm")


@pytest.mark.skipif(not HAS_SCALED_MM, reason=f"torch {torch.__version__} has no torch._scaled_mm")
@pytest.mark.parametrize("inp", ["normal", "outliers(frac=0.02,scale=100)"])
def test_native_fp8_tensor_agrees_with_emulated(inp):
    """The quantization is the same function in both modes. Forward, the native matmul accumulates
    in its own order and computes q * (1/s) where emulated divides q / s: pre and post agree to a few
    bf16 roundings. Backward, the native bf16 kernels of the tail (GELU's derivative in bf16, not
    fp64) move grad_pre by bf16 roundings, and those can move an element of Q_grad(grad_pre) to the
    next e5m2 value: the gradients agree within the gradient element's rounding (eps/2 = 12.5% for
    one element, as a bound on their rms). The events are the same (but one warning, below)."""
    kw = dict(init="kaiming_normal", activation="gelu", format="fp8_tensor", width=128, depth=8, batch=64,
              input=inp, bias=True, residual=0.5)
    emulated, native = run_case(mode="emulated", **kw), run_case(mode="native", **kw)
    assert native.status == "ok", native.error or native.skip_reason
    assert emulated.forward.gemm_in["qerr"][0] == native.forward.gemm_in["qerr"][0]  # x_0: the same bits
    bf16, e5m2 = get_format("bf16").eps, ELEMENT_FORMATS["fp8_e5m2"].eps
    for kind in ("pre", "post"):
        np.testing.assert_allclose(getattr(native.forward, kind)["rms"], getattr(emulated.forward, kind)["rms"],
                                   rtol=4 * bf16, err_msg=kind)
    np.testing.assert_allclose(native.forward.gemm_in["qerr"], emulated.forward.gemm_in["qerr"], rtol=4 * bf16)
    np.testing.assert_array_equal(native.forward.gemm_w["qerr"], emulated.forward.gemm_w["qerr"])
    for kind in ("grad", "grad_pre", "wgrad"):
        np.testing.assert_allclose(getattr(native.backward, kind)["rms"], getattr(emulated.backward, kind)["rms"],
                                   rtol=e5m2 / 2, err_msg=kind)
    np.testing.assert_allclose(native.backward.grad_gemm_in["qerr"], emulated.backward.grad_gemm_in["qerr"],
                               rtol=e5m2 / 2)
    assert native.forward.events == emulated.forward.events
    # backward first_flush (a warning) is left out: emulated GELU' of a far-negative input is a tiny
    # nonzero that e5m2 flushes, native bf16 GELU' is an exact zero there (no flush, same zero)
    assert replace(native.backward.events, first_flush=None) == replace(emulated.backward.events, first_flush=None)


@pytest.mark.parametrize("name", ["mxfp8_e4m3", "mxfp8_e5m2", "mxfp4", "fp8_block"])
def test_block_scaled_native_is_skipped_on_cpu_with_the_reason(name):
    r = run_case(init="kaiming_normal", activation="relu", format=name, mode="native", width=128, depth=2, batch=8)
    assert r.status == "skipped" and r.error is None
    assert "torch._scaled_mm on cpu" in r.skip_reason and name in r.skip_reason


@pytest.mark.parametrize("name,why", [("mxfp6_e2m3", "no fp6 dtype"), ("nvfp4", "torch._scaled_mm_v2")])
def test_recipes_not_built_natively_say_why(name, why):
    r = run_case(init="kaiming_normal", activation="relu", format=name, mode="native", width=64, depth=2, batch=8)
    assert r.status == "skipped" and why in r.skip_reason


@pytest.mark.skipif(not HAS_SCALED_MM, reason=f"torch {torch.__version__} has no torch._scaled_mm")
def test_the_probe_refuses_a_kernel_that_reads_the_scales_otherwise(monkeypatch):
    """A tensorwise kernel handed twice the scale (as a misread layout would) is caught by the
    probe's comparison with the fp32 product, and the case is skipped, not reported."""
    from precision_suite.engine import torch_scaled_mm

    real = torch_scaled_mm._operand

    def doubled(qt, scaling, rows, k, rhs, tiles):
        codes, scale = real(qt, scaling, rows, k, rhs, tiles)
        return codes, scale * 2 if rhs else scale

    torch_scaled_mm.unsupported.cache_clear()
    monkeypatch.setattr(torch_scaled_mm, "_operand", doubled)
    try:
        reason = torch_scaled_mm.unsupported("cpu", "fp8_tensor")
    finally:
        torch_scaled_mm.unsupported.cache_clear()
    assert "away from the fp32 product" in reason


def test_mx_scale_layout_is_cublas_block_scaling_layout():
    """cuBLAS's layout of 1-D block scaling factors, from its documented index formula: the scale of
    row r, K-block c sits in 512-byte tile (r // 128, c // 4) (tiles row-major over the padded
    (rows, K/32) grid) at offset 16 (r mod 32) + 4 ((r mod 128) // 32) + (c mod 4)."""
    from precision_suite.engine.torch_scaled_mm import _to_blocked

    for rows, cols in [(128, 4), (200, 7), (64, 8), (256, 5)]:
        s = torch.arange(rows * cols, dtype=torch.float32).reshape(rows, cols) + 1
        got = _to_blocked(s).numpy()
        tiles_c = -(-cols // 4)
        want = np.zeros(-(-rows // 128) * tiles_c * 512, np.float32)
        for r in range(rows):
            for c in range(cols):
                tile = (r // 128) * tiles_c + c // 4
                want[tile * 512 + 16 * (r % 32) + 4 * ((r % 128) // 32) + c % 4] = s[r, c]
        np.testing.assert_array_equal(got, want, err_msg=str((rows, cols)))


def test_fp4_codes_pack_two_per_byte_low_nibble_first():
    """All 16 e2m1 codes' values (ml_dtypes decodes each bit pattern), packed, unpack nibble by
    nibble (low first) to the same values, -0 included."""
    from precision_suite.engine.torch_scaled_mm import _codes

    table = np.arange(16, dtype=np.uint8).view(ELEMENT_FORMATS["fp4_e2m1"].np_dtype).astype(np.float32)
    q = torch.tensor(np.tile(table, (3, 1)))
    packed = _codes(q, "fp4_e2m1").view(torch.uint8).numpy()
    nibbles = np.stack([packed & 0x0F, packed >> 4], axis=-1).reshape(3, -1)
    np.testing.assert_array_equal(table[nibbles], np.tile(table, (3, 1)))
    np.testing.assert_array_equal(np.signbit(table[nibbles]), np.signbit(np.tile(table, (3, 1))))


def test_quantized_operands_of_a_native_layer_are_the_emulated_ones():
    """Native and emulated quantize with the same function: the kernel's codes are the emulated
    element values (fp8 casts exact) and its tensorwise scale the dequantization factor."""
    from precision_suite.engine.torch_scaled_mm import _operand

    s = get_format("fp8_tensor").scaling
    x = torch.randn(64, 128)
    qt = quantize(x, s, "act", per_row=False)
    codes, scale = _operand(qt, s, 64, 128, rhs=False, tiles=False)
    np.testing.assert_array_equal(codes.float().numpy(), qt.q.numpy())
    assert scale.item() == qt.scale.item()
