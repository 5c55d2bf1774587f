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


def test_numpy_blas_is_numpys_own_copy_not_scipys(monkeypatch, tmp_path):
    """scipy bundles a BLAS of its own; a checkout whose path says "numpy" (``/work/wt-numpy/.venv``)
    must not make scipy's copy pass for numpy's."""
    import os

    import numpy
    import threadpoolctl

    site = os.path.dirname(os.path.dirname(os.path.abspath(numpy.__file__)))
    libs = [{"user_api": "blas", "internal_api": "openblas", "version": "0.3.30",
             "filepath": os.path.join(str(tmp_path), "wt-numpy", "site-packages", "scipy.libs", "libscipy_openblas.so")},
            {"user_api": "blas", "internal_api": "openblas", "version": "0.3.31",
             "filepath": os.path.join(site, "numpy.libs", "libscipy_openblas64_.so")}]
    monkeypatch.setattr(threadpoolctl, "threadpool_info", lambda: libs)
    from precision_suite.environment import _numpy_blas

    assert _numpy_blas() == "openblas 0.3.31"


def test_numpy_blas_is_the_one_numpy_loaded():
    threadpoolctl = pytest.importorskip("threadpoolctl")
    blas = [lib for lib in threadpoolctl.threadpool_info() if lib["user_api"] == "blas" and "numpy" in lib["filepath"]]
    expected = f"{blas[0]['internal_api']} {blas[0]['version']}" if blas else None
    assert fingerprint()["numpy_blas"] == expected
