"""What the pytest plugin costs: its import against ``import pytest`` alone, and the shipped matrix
under ``pytest -n 0`` against ``precision-suite run --jobs 1`` over the same cases.

Run: ``python -m pytest tests/benchmarks/test_plugin_cost.py -s``. Every figure is a fresh
subprocess (an import is only paid once per interpreter), rounds interleaved so that a noisy
neighbour slows both sides alike; each test prints the ratio of medians (targets: import <= 1.2x,
matrix <= 1.2x).
"""

import statistics
import subprocess
import sys
import time

import pytest

IMPORT_ROUNDS = 7
MATRIX_ROUNDS = 2
FORMATS = "fp32,fp16,bf16"  # the shipped matrix's default --precision-formats
NUMPY_CHECKED = "leaky_relu,gelu,silu,tanh,sigmoid,selu,elu,softplus"  # test_chain's numpy-referenced activations


def _seconds(argv, cwd=None) -> float:
    start = time.perf_counter()
    proc = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, check=False)
    seconds = time.perf_counter() - start
    assert proc.returncode in (0, 1), proc.stdout[-2000:] + proc.stderr[-2000:]
    return seconds


def _interleaved(rounds: int, *commands) -> list[float]:
    times = [[] for _ in commands]
    for _ in range(rounds):
        for i, run in enumerate(commands):
            times[i].append(run())
    return [statistics.median(t) for t in times]


def test_plugin_import_vs_pytest(benchmark):
    bare, plugin = _interleaved(
        IMPORT_ROUNDS,
        lambda: _seconds([sys.executable, "-c", "import pytest"]),
        lambda: _seconds([sys.executable, "-c", "import pytest, precision_suite.pytest_plugin"]))
    benchmark.extra_info.update(import_pytest_s=bare, import_plugin_s=plugin, ratio=plugin / bare)
    benchmark.pedantic(lambda: None, rounds=1, iterations=1)
    print(f"\nimport pytest {bare:.3f}s, + precision_suite.pytest_plugin {plugin:.3f}s = {plugin / bare:.2f}x")


@pytest.mark.parametrize("jobs", [1])
def test_shipped_matrix_pytest_vs_run(benchmark, tmp_path, jobs):
    """The same cases both ways: emulated and native (cpu), and the numpy references test_chain
    draws for the activations theory does not cover (forward only)."""
    from precision_suite.spec import DEFAULTS

    inits = ",".join(DEFAULTS["inits"])
    run = [sys.executable, "-m", "precision_suite", "run", "--quiet", "--devices", "cpu", "--formats", FORMATS,
           "--inits", inits, "--jobs", str(jobs)]
    activations = ",".join(DEFAULTS["activations"])
    numpy_acts = ",".join(a for a in DEFAULTS["activations"] if a in NUMPY_CHECKED.split(","))

    def cli() -> float:
        return (_seconds(run + ["--activations", activations, "--modes", "emulated,native", "--out", "a"], tmp_path)
                + _seconds(run + ["--activations", numpy_acts, "--backends", "numpy", "--no-backward", "--out", "b"],
                           tmp_path))

    def plugin() -> float:
        return _seconds([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-n", "0",
                         "--precision-devices", "cpu", "--pyargs", "precision_suite.matrix"], tmp_path)

    cli_s, plugin_s = _interleaved(MATRIX_ROUNDS, cli, plugin)
    benchmark.extra_info.update(run_s=cli_s, pytest_s=plugin_s, ratio=plugin_s / cli_s)
    benchmark.pedantic(lambda: None, rounds=1, iterations=1)
    print(f"\nshipped matrix: precision-suite run --jobs {jobs} {cli_s:.1f}s, pytest -n 0 {plugin_s:.1f}s "
          f"= {plugin_s / cli_s:.2f}x")
