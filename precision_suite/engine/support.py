"""What can run here: why a case is skipped, decided before anything runs.

A case is skipped when its device is not present, its backend cannot run it, or (native mode) a
tiny probe of an op its chain needs raises NotImplementedError on this device in the format's
dtype (torch has no fp8 activation or norm kernels on CPU); a scaled format's native matmuls are
probed per (device, recipe) by ``torch_scaled_mm.unsupported`` (MX block scales are refused on
CPU). Probes are cached. Anything else that goes wrong is the run's to record as an error.
"""

from __future__ import annotations

import functools

from ..formats import get_format

__all__ = ["skip_reason", "device_absent"]

# batchnorm in training mode needs two values per channel; [cases, batch, width] as the engine stacks
_PROBE_SHAPE = (1, 2, 2)


def device_absent(device: str) -> str | None:
    """Why the (parsed) device is not present here, or None: ``torch.cuda.is_available() is False``."""
    import torch

    kind, _, index = device.partition(":")
    if kind == "cuda":
        if not torch.cuda.is_available():
            return "torch.cuda.is_available() is False"
        if index and int(index) >= torch.cuda.device_count():
            return f"this machine has {torch.cuda.device_count()} CUDA device(s)"
    if kind == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        return "torch.backends.mps.is_available() is False"
    return None


def skip_reason(case) -> str | None:
    """Why ``case`` cannot run here, or None when it can."""
    absent = device_absent(case.device)
    if absent:
        return f"no {case.device.split(':')[0].upper()} device: {absent}"
    if case.backend == "numpy" and (case.device != "cpu" or case.mode != "emulated"):
        return "the numpy backend runs on cpu in emulated mode only"
    if case.device.startswith("mps") and case.format == "fp64":
        return "mps has no fp64"
    if case.mode == "native":
        if get_format(case.format).scaling is not None:  # its matmuls are torch._scaled_mm's
            from .torch_scaled_mm import unsupported

            missing = unsupported(case.device, case.format)
            if missing:
                return missing
        for op in _native_ops(case):
            missing = _missing_kernel(case.device, case.format, op)
            if missing:
                return missing
    return None


def _native_ops(case) -> list[str]:
    """The ops a native chain runs in the format's dtype, in the order a layer runs them."""
    ops = ["cast", "F.linear with bias" if case.bias else "F.linear"]
    if case.norm != "none":
        ops.append(case.norm)
    ops.append(case.activation)
    if case.residual is not None:
        ops.append("residual add")
    return ops


@functools.cache
def _missing_kernel(device: str, format_name: str, op: str) -> str | None:
    """``no cpu kernel for relu in torch.float8_e4m3fn (...)`` when the probe of ``op`` raises
    NotImplementedError, else None."""
    import torch

    from ..formats import get_format

    dtype = get_format(format_name).torch_dtype()
    try:
        _probe(op, torch.ones(_PROBE_SHAPE, device=device).to(dtype))
    except NotImplementedError as exc:
        return f"no {device} kernel for {op} in {dtype} ({str(exc).strip().splitlines()[0]})"
    except Exception:  # noqa: BLE001 - not a missing kernel: the case runs and records what it raises
        return None
    return None


def _probe(op: str, x):
    """``op`` as ``NativeStack._step`` calls it, on the probe tensor ``x``."""
    import torch.nn.functional as F

    from ..spec import NORMS
    from .torch_ops import native_act, norm

    if op == "cast":
        return x
    if op.startswith("F.linear"):
        return F.linear(x, x[0], x[0, 0] if op.endswith("bias") else None)
    if op == "residual add":
        return x + 0.5 * x
    if op in NORMS:
        return norm(op, x)
    return native_act(op)(x)
