"""Speed-up of a precision matrix under pytest-xdist: the same matrix run as ``-n 0`` and ``-n 2``.

Run: ``python -m pytest tests/benchmarks/test_xdist_speedup.py -s``. Every run is a subprocess
(pytest-benchmark disables itself under xdist, and each run must start cold). The test prints the
wall times and two speed-ups of ``-n 2`` (target >= 1.6x on 2 cores):

- over ``-n 0`` as a user runs it, with torch's default thread count;
- over ``-n 0`` with ``OMP_NUM_THREADS=1``, the thread count each of the two workers gets. This
  baseline isolates what the second process adds. At these sizes, two threads in one process
  can be slower than one, so the first ratio can overstate what xdist contributes.

It checks that every run wrote the same cases. The single-thread serial run must take >= 30 s, or
start-up costs would decide the figure.
"""

import json
import os
import subprocess
import sys
import time

MATRIX = {"inits": "kaiming_normal,lecun_normal,orthogonal,kaiming_normal(gain=1.2)",
          "activations": "relu,gelu,tanh,silu", "formats": "fp16,bf16", "devices": "cpu", "depth": 100, "width": 256,
          "batch": 64, "seed": "0,1,2"}
CASES = 96
MIN_SERIAL_SECONDS = 30.0
TARGET = 1.6
BASE_ENV = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}  # set only where a run asks for it


def _run(path, name: str, workers: int, **env) -> float:
    out = path / f"{name}.json"
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-n", str(workers),
                           "--precision-json", str(out), str(path / "test_matrix.py")],
                          cwd=path, capture_output=True, text=True, check=False, env={**BASE_ENV, **env})
    seconds = time.perf_counter() - start
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return seconds


def test_xdist_speedup(tmp_path, record_property):
    axes = ", ".join(f"{k}={v!r}" for k, v in MATRIX.items())
    (tmp_path / "test_matrix.py").write_text(
        "import pytest\n\n\n"
        f"@pytest.mark.precision_matrix({axes})\n"
        "def test_chain(precision_case):\n"
        "    precision_case()\n")
    parallel = _run(tmp_path, "n2", 2)
    serial_one_thread = _run(tmp_path, "n0_1thread", 0, OMP_NUM_THREADS="1")
    serial = _run(tmp_path, "n0", 0)
    record_property("xdist_speedup", serial / parallel)
    record_property("xdist_speedup_same_threads", serial_one_thread / parallel)
    print(f"\n-n 2: {parallel:.1f} s\n"
          f"-n 0: {serial:.1f} s (default threads)          -> speed-up {serial / parallel:.2f}x\n"
          f"-n 0: {serial_one_thread:.1f} s (OMP_NUM_THREADS=1) -> speed-up {serial_one_thread / parallel:.2f}x "
          f"(target >= {TARGET}x)")

    ids = [[c["id"] for c in json.loads((tmp_path / f"{name}.json").read_text())["cases"]]
           for name in ("n0", "n0_1thread", "n2")]
    assert ids[0] == ids[1] == ids[2] and len(ids[0]) == CASES
    assert serial_one_thread >= MIN_SERIAL_SECONDS, (
        f"the serial run took {serial_one_thread:.1f} s: enlarge MATRIX to measure a speed-up")
