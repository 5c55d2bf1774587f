"""The fingerprint names the libraries that change numerics: what torch was built with and what numpy calls."""

import re

import pytest
import torch

from precision_suite.environment import _torch_cpu_libraries, fingerprint


def test_cpu_library_versions_are_torch_s_own():
    """oneDNN and MKL as torch's build configuration states them, not an unrelated copy on the system."""
    env = fingerprint()
    config = torch.__config__.show()
    if env["onednn"] is None:
        assert "MKL-DNN v" not in config
    else:
        assert f"MKL-DNN v{env['onednn']}" in config and re.fullmatch(r"\d+(\.\d+)+", env["onednn"])
    if env["mkl"] is not None:
        assert f"Math Kernel Library Version {env['mkl']}" in config


def test_cpu_library_versions_absent_from_a_build_without_them():
    assert _torch_cpu_libraries("PyTorch built with:\n  - GCC 13.3\n") == {"mkl": None, "onednn": None}


def test_numpy_blas_is_the_one_numpy_loaded():
    threadpoolctl = pytest.importorskip("threadpoolctl")
    blas = [lib for lib in threadpoolctl.threadpool_info() if lib["user_api"] == "blas" and "numpy" in lib["filepath"]]
    expected = f"{blas[0]['internal_api']} {blas[0]['version']}" if blas else None
    assert fingerprint()["numpy_blas"] == expected
