"""Speed of the suite against the bare computation it wraps, measured as ratios in one run.

The bare chain is written plainly here: seeded float64 weights drawn per layer and rounded to the
format, an fp32 matmul, the activation, and rounding of each op's output to fp16 — no statistics.
Run: ``python -m pytest tests/benchmarks/test_speed.py --benchmark-columns=median,min,max``;
each test prints the suite/bare ratio of medians.
"""

import numpy as np
import pytest
import torch

from precision_suite.draws import draw_input, draw_weight, parse_input
from precision_suite.engine import run_cases
from precision_suite.formats import get_format, round_to_format
from precision_suite.inits import parse_init
from precision_suite.spec import Case, Matrix

ROUNDS = 3
FP16 = get_format("fp16")


def bare_chain(width, batch, depth, activation=torch.tanh):
    """Seeded weights, fp32 matmul, activation, rounding to fp16: what the suite wraps."""
    init = parse_init("kaiming_normal")
    x = torch.from_numpy(round_to_format(draw_input(parse_input("normal"), 0, batch, width), FP16).astype(np.float32))
    for layer in range(1, depth + 1):
        w = torch.from_numpy(round_to_format(draw_weight(init, 0, layer, width, width), FP16).astype(np.float32))
        pre = (x @ w.T).half().float()
        x = activation(pre).half().float()
    return x


def suite_chain(width, batch, depth, backward=False, **fields):
    case = Case(init="kaiming_normal", activation=fields.pop("activation", "tanh"), format=fields.pop("format", "fp16"),
                width=width, depth=depth, batch=batch, **fields)
    [r] = run_cases([case], backward=backward)
    assert r.status == "ok", r.error
    return r


def _ratio(benchmark, bare_seconds):
    suite = benchmark.stats.stats.median
    ratio = suite / bare_seconds
    benchmark.extra_info["bare_median_s"] = bare_seconds
    benchmark.extra_info["ratio_vs_bare"] = ratio
    print(f"\n{benchmark.name}: suite {suite:.3f}s / bare {bare_seconds:.3f}s = {ratio:.2f}x")
    return ratio


def _bare_median(fn, *args):
    import time

    times = []
    for _ in range(ROUNDS):
        t0 = time.perf_counter()
        fn(*args)
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


@pytest.mark.parametrize("batch", [1024, 64])
def test_forward_fp16_emulated_vs_bare(benchmark, batch):
    width, depth = 256, 1000 if batch == 1024 else 2000
    bare = _bare_median(bare_chain, width, batch, depth)
    benchmark.pedantic(suite_chain, args=(width, batch, depth), rounds=ROUNDS, iterations=1)
    _ratio(benchmark, bare)


def test_forward_backward_fp16_emulated(benchmark):
    width, batch, depth = 256, 256, 200
    bare = _bare_median(bare_chain, width, batch, depth)
    benchmark.pedantic(suite_chain, args=(width, batch, depth), kwargs=dict(backward=True), rounds=ROUNDS,
                       iterations=1)
    _ratio(benchmark, bare)


def test_native_bf16(benchmark):
    width, batch, depth = 256, 256, 300

    def bare_native():
        init = parse_init("kaiming_normal")
        bf16 = get_format("bf16")
        x = torch.from_numpy(round_to_format(draw_input(parse_input("normal"), 0, batch, width), bf16)
                             .astype(np.float32)).bfloat16()
        for layer in range(1, depth + 1):
            w = torch.from_numpy(round_to_format(draw_weight(init, 0, layer, width, width), bf16)
                                 .astype(np.float32)).bfloat16()
            x = torch.tanh(torch.nn.functional.linear(x, w))
        return x

    bare = _bare_median(bare_native)
    benchmark.pedantic(suite_chain, args=(width, batch, depth), kwargs=dict(format="bf16", mode="native"),
                       rounds=ROUNDS, iterations=1)
    _ratio(benchmark, bare)


def test_default_matrix(benchmark):
    """The whole default matrix, forward and backward (what ``precision-suite run`` does)."""
    cases = Matrix(devices=("cpu",), modes=("emulated",)).cases()
    results = benchmark.pedantic(run_cases, args=(cases,), rounds=1, iterations=1)
    assert all(r.status == "ok" for r in results)
    print(f"\ndefault matrix: {len(cases)} cases in {benchmark.stats.stats.median:.2f}s")
