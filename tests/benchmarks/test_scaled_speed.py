"""Speed of the scaled formats' chain against the same chain in raw fp8_e4m3fn emulation, as ratios
measured in one run: forward, width 256, batch 1024, tanh (target: mxfp4 and mxfp8_e4m3 each
<= 2x fp8_e4m3fn). Both are the suite's own chains with every statistic (the scaled one adds the
quantizers and the gemm_in/gemm_w statistics). Rounds alternate between the formats, so a noisy
neighbour slows each alike, under the suite's thread setting (one thread unless OMP_NUM_THREADS).
Run: ``python -m pytest tests/benchmarks/test_scaled_speed.py -s``; each test prints the ratio of
medians and the per-layer milliseconds.
"""

import statistics
import time

import pytest

from precision_suite.engine import run_cases
from precision_suite.runner import torch_threads
from precision_suite.spec import Case

WIDTH, BATCH, DEPTH, ROUNDS = 256, 1024, 40, 5
TARGET = 2.0


def _seconds(fmt: str) -> float:
    case = Case(init="kaiming_normal", activation="tanh", format=fmt, width=WIDTH, depth=DEPTH, batch=BATCH)
    t0 = time.perf_counter()
    [r] = run_cases([case], backward=False)
    elapsed = time.perf_counter() - t0
    assert r.status == "ok", r.error
    return elapsed


@pytest.mark.parametrize("fmt", ["mxfp4", "mxfp8_e4m3"])
def test_scaled_forward_costs_at_most_twice_raw_fp8(benchmark, fmt):
    with torch_threads(None):
        _seconds("fp8_e4m3fn"), _seconds(fmt)  # warm-up: first-call costs (imports, allocator)
        raw, scaled = [], []
        for _ in range(ROUNDS):
            raw.append(_seconds("fp8_e4m3fn"))
            scaled.append(_seconds(fmt))
        benchmark.pedantic(_seconds, args=(fmt,), rounds=1, iterations=1)  # recorded for the JSON report
    ratio = statistics.median(scaled) / statistics.median(raw)
    benchmark.extra_info.update(raw_median_s=statistics.median(raw), scaled_median_s=statistics.median(scaled),
                                ratio=ratio)
    print(f"\n{fmt}: {statistics.median(scaled) / DEPTH * 1e3:.1f} ms/layer vs fp8_e4m3fn "
          f"{statistics.median(raw) / DEPTH * 1e3:.1f} ms/layer = {ratio:.2f}x (target <= {TARGET}x)")
    assert ratio <= TARGET
