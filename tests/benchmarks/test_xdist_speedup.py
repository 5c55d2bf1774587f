"""Speed-up of a precision matrix under pytest-xdist: the same matrix run as ``-n 0`` and ``-n 2``.

Run: ``python -m pytest tests/benchmarks/test_xdist_speedup.py -s``. Both runs are subprocesses
(pytest-benchmark disables itself under xdist, and each run must start cold); the test prints the
wall times and the speed-up (target >= 1.6x on 2 cores) and checks that both runs wrote the same
cases. The serial run must take >= 30 s, or start-up costs would decide the figure.
"""

import json
import subprocess
import sys
import time

MATRIX = {"inits": "kaiming_normal,lecun_normal,orthogonal,kaiming_normal(gain=1.2)",
          "activations": "relu,gelu,tanh,silu", "formats": "fp16,bf16", "devices": "cpu", "depth": 100, "width": 256,
          "batch": 64, "seed": "0,1,2"}
MIN_SERIAL_SECONDS = 30.0
TARGET = 1.6


def _run(path, workers: int) -> float:
    out = path / f"n{workers}.json"
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-n", str(workers),
                           "--precision-json", str(out), str(path / "test_matrix.py")],
                          cwd=path, capture_output=True, text=True, check=False)
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
    serial = _run(tmp_path, 0)
    parallel = _run(tmp_path, 2)
    speedup = serial / parallel
    record_property("xdist_speedup", speedup)
    print(f"\n-n 0: {serial:.1f} s   -n 2: {parallel:.1f} s   speed-up {speedup:.2f}x (target >= {TARGET}x)")

    ids = [[c["id"] for c in json.loads((tmp_path / f"n{n}.json").read_text())["cases"]] for n in (0, 2)]
    assert ids[0] == ids[1] and len(ids[0]) == 96
    assert serial >= MIN_SERIAL_SECONDS, f"the serial run took {serial:.1f} s: enlarge MATRIX to measure a speed-up"
