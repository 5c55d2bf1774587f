"""Environment fingerprint: what a result depends on besides its spec (versions, hardware, numeric settings)."""

from __future__ import annotations

import os
import platform
import sys

__all__ = ["fingerprint", "flatten", "flush_denormal_enabled", "resolve_threads"]


def resolve_threads(threads: int | None) -> int:
    """The torch threads a run uses: ``threads``, else OMP_NUM_THREADS if the user set it, else 1
    (see ``runner.torch_threads``)."""
    if threads is None:
        threads = int(os.environ["OMP_NUM_THREADS"]) if os.environ.get("OMP_NUM_THREADS", "").isdigit() else 1
    return max(1, threads)


def flush_denormal_enabled() -> bool:
    """True when fp32 subnormals are flushed on CPU (``torch.set_flush_denormal(True)``).

    torch has no getter, so this multiplies the smallest fp32 subnormal by one and looks."""
    import torch

    tiny = torch.tensor([torch.finfo(torch.float32).tiny / 2], dtype=torch.float32)
    return bool((tiny * 1.0).item() == 0.0)


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def fingerprint(threads: int | None = None) -> dict:
    """Versions, hardware and numeric settings, as plain JSON values; ``torch_threads`` is the
    count a run with ``threads`` uses (``resolve_threads``), not this process's current setting."""
    import ml_dtypes
    import numpy
    import scipy
    import torch

    from . import __version__

    env = {
        "tool_version": __version__,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        # the vector ISA torch's CPU kernels dispatch to (AVX2, AVX512, AMX): oneDNN's bf16 matmul keeps
        # subnormals on one and flushes them on another (docs/known-deviations.md)
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "torch": torch.__version__,
        "numpy": numpy.__version__,
        "ml_dtypes": ml_dtypes.__version__,
        "scipy": scipy.__version__,
        "torch_threads": resolve_threads(threads),
        "flush_denormal": flush_denormal_enabled(),
        "mkldnn": bool(torch.backends.mkldnn.is_available()),
        "float32_matmul_precision": torch.get_float32_matmul_precision(),
        "deterministic_algorithms": torch.are_deterministic_algorithms_enabled(),
        "cuda_available": torch.cuda.is_available(),
        "cuda": None,
    }
    if torch.cuda.is_available():
        idx = torch.cuda.current_device()
        props = torch.cuda.get_device_properties(idx)
        env["cuda"] = {
            "device": props.name,
            "capability": f"{props.major}.{props.minor}",
            "cuda_runtime": torch.version.cuda,
            "cudnn": torch.backends.cudnn.version(),
            "driver": _nvidia_driver(),
            "allow_tf32_matmul": bool(torch.backends.cuda.matmul.allow_tf32),
            "allow_tf32_cudnn": bool(torch.backends.cudnn.allow_tf32),
            "allow_fp16_reduced_precision_reduction": bool(
                torch.backends.cuda.matmul.allow_fp16_reduced_precision_reduction),
            "allow_bf16_reduced_precision_reduction": bool(
                torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction),
        }
    return env


def flatten(env: dict, prefix: str = "") -> dict[str, str]:
    """A fingerprint as ``{"cuda.device": "...", ...}`` strings (None as a dash): what diffs and reports list."""
    out = {}
    for k, v in (env or {}).items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = "—" if v is None else str(v)
    return out


def _nvidia_driver() -> str | None:
    try:
        with open("/proc/driver/nvidia/version", encoding="utf-8") as f:
            return f.readline().strip()
    except OSError:
        return None
