"""Environment fingerprint: what a result depends on besides its spec (versions, hardware, numeric settings)."""

from __future__ import annotations

import os
import platform
import re
import sys

from .defaults import THREADS

__all__ = ["fingerprint", "flatten", "flush_denormal_enabled", "resolve_threads", "parallel_limit", "check_parallel"]


def resolve_threads(threads: int | None) -> int:
    """The torch threads a run uses: ``threads``, else OMP_NUM_THREADS if the user set it, else
    ``defaults.THREADS`` (see ``runner.torch_threads``)."""
    if threads is None:
        threads = int(os.environ["OMP_NUM_THREADS"]) if os.environ.get("OMP_NUM_THREADS", "").isdigit() else THREADS
    return max(1, threads)


def parallel_limit() -> int:
    """The most threads (per process) or processes a run may ask for: the CPUs this process may
    run on, and two on a one-CPU machine so that runs can still be compared across --jobs 1/2.
    More only spin-wait and, for processes, cost ~230 MB each (torch imported)."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(2, cpus)


def check_parallel(name: str, value) -> str | None:
    """What is wrong with ``value`` as a count of threads or processes (None: nothing)."""
    limit = parallel_limit()
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= limit:
        return f"{name} must be an integer from 1 to {limit} (the CPUs here), got {value!r}"
    return None


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
        **_torch_cpu_libraries(torch.__config__.show()),
        "numpy_blas": _numpy_blas(),
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
            "gpu_count": torch.cuda.device_count(),
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


def _torch_cpu_libraries(build_config: str) -> dict:
    """MKL and oneDNN versions torch was built with, from ``torch.__config__.show()`` (torch exposes
    no other accessor for them; both are linked statically, so threadpoolctl cannot see them)."""
    mkl = re.search(r"Math Kernel Library Version (\S+)", build_config)
    onednn = re.search(r"MKL-DNN v(\S+)", build_config)
    return {"mkl": mkl.group(1) if mkl else None, "onednn": onednn.group(1) if onednn else None}


def _numpy_blas() -> str | None:
    """The BLAS numpy calls (the numpy backend's matmuls), as threadpoolctl reports it: ``openblas 0.3.31``.
    numpy's own copy lies under its install directory (``numpy.libs``, ``numpy/.libs``); scipy's
    copy (``scipy.libs``) is another library, whatever the path above site-packages says."""
    import os

    import numpy
    from threadpoolctl import threadpool_info

    prefix = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(numpy.__file__))), "numpy")
    for lib in threadpool_info():
        if lib.get("user_api") == "blas" and os.path.abspath(lib.get("filepath", "")).startswith(prefix):
            return f"{lib.get('internal_api')} {lib.get('version')}"
    return None


def _nvidia_driver() -> str | None:
    """The NVIDIA driver version from NVML (nvidia-ml-py) when installed, else /proc's first line."""
    try:
        import pynvml

        pynvml.nvmlInit()
        try:
            version = pynvml.nvmlSystemGetDriverVersion()
            return version.decode() if isinstance(version, bytes) else version
        finally:
            pynvml.nvmlShutdown()
    except Exception:  # no nvidia-ml-py, or no NVML on this machine: fall back
        pass
    try:
        with open("/proc/driver/nvidia/version", encoding="utf-8") as f:
            return f.readline().strip()
    except OSError:
        return None
