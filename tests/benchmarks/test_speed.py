"""Speed of the suite against the bare computation it wraps, measured as ratios in one run.

The bare chain is written plainly here: seeded float64 weights drawn per layer and rounded to the
format, an fp32 matmul, the activation, and rounding of each op's output to fp16 — no statistics.
Both run under the suite's thread setting (one thread unless OMP_NUM_THREADS says otherwise).
Run: ``python -m pytest tests/benchmarks/test_speed.py --benchmark-columns=median,min,max -s``;
each test prints the suite/bare ratio of medians.
"""

import time
from collections import defaultdict

import numpy as np
import pytest
import torch

from precision_suite.activations import get_activation
from precision_suite.draws import draw_input, draw_seed_grad, draw_weight, parse_input
from precision_suite.engine import run_cases
from precision_suite.formats import get_format, round_to_format
from precision_suite.inits import parse_init
from precision_suite.runner import run_matrix, torch_threads
from precision_suite.spec import Case, Matrix

ROUNDS = 5
FP16 = get_format("fp16")


@pytest.fixture(autouse=True)
def suite_threads():
    """The suite's own thread setting for the bare computation and the suite alike."""
    with torch_threads(None):
        yield


class _RoundBoth(torch.autograd.Function):
    """The bare chain's rounding: to the format in forward and backward, nothing recorded."""

    @staticmethod
    def forward(ctx, x, low):
        ctx.low = low
        return x.to(low).to(x.dtype)

    @staticmethod
    def backward(ctx, g):
        return g.to(ctx.low).to(g.dtype), None


def bare_chain(width, batch, depth, activation=torch.tanh, backward=False):
    """Seeded weights, fp32 matmul, activation, rounding to fp16: what the suite wraps (backward:
    from loss = sum(x_depth * g), every gradient rounded to fp16 too)."""
    init = parse_init("kaiming_normal")
    x = torch.from_numpy(round_to_format(draw_input(parse_input("normal"), 0, batch, width), FP16).astype(np.float32))
    x.requires_grad_(backward)
    h = x
    for layer in range(1, depth + 1):
        w = torch.from_numpy(round_to_format(draw_weight(init, 0, layer, width, width), FP16).astype(np.float32))
        if backward:
            h = _RoundBoth.apply(activation(_RoundBoth.apply(h @ w.T, torch.float16)), torch.float16)
        else:
            pre = (h @ w.T).half().float()
            h = activation(pre).half().float()
    if backward:
        h.backward(torch.from_numpy(draw_seed_grad(0, batch, width).astype(np.float16).astype(np.float32)))
    return h


def suite_chain(width, batch, depth, backward=False, **fields):
    case = Case(init="kaiming_normal", activation=fields.pop("activation", "tanh"), format=fields.pop("format", "fp16"),
                width=width, depth=depth, batch=batch, **fields)
    [r] = run_cases([case], backward=backward)
    assert r.status == "ok", r.error
    return r


def _against_bare(benchmark, bare, suite, *args, **kwargs):
    """Rounds of ``bare()`` and ``suite(*args, **kwargs)`` in turn (bare in pytest-benchmark's
    untimed setup, timed here), so that a machine whose speed drifts slows both alike; prints and
    records the ratio of the medians. Returns the suite's last result."""
    bare_times = []

    def timed_bare():
        t0 = time.perf_counter()
        bare()
        bare_times.append(time.perf_counter() - t0)

    result = benchmark.pedantic(suite, args=args, kwargs=kwargs, setup=timed_bare, rounds=ROUNDS, iterations=1)
    bare_s, suite_s = float(np.median(bare_times)), benchmark.stats.stats.median
    ratio = suite_s / bare_s
    benchmark.extra_info["bare_median_s"] = bare_s
    benchmark.extra_info["ratio_vs_bare"] = ratio
    print(f"\n{benchmark.name}: suite {suite_s:.3f}s / bare {bare_s:.3f}s = {ratio:.2f}x (medians of {ROUNDS}, interleaved)")
    return result


@pytest.mark.parametrize("batch", [1024, 64])
def test_forward_fp16_emulated_vs_bare(benchmark, batch):
    width, depth = 256, 1000 if batch == 1024 else 2000
    _against_bare(benchmark, lambda: bare_chain(width, batch, depth), suite_chain, width, batch, depth)


def test_forward_backward_fp16_emulated(benchmark):
    width, batch, depth = 256, 256, 200
    _against_bare(benchmark, lambda: bare_chain(width, batch, depth, torch.tanh, True), suite_chain, width, batch,
                  depth, backward=True)


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

    _against_bare(benchmark, bare_native, suite_chain, width, batch, depth, format="bf16", mode="native")


def bare_matrix(cases):
    """Every case's chain forward and backward, rounding each op and gradient, no statistics: the
    weights drawn once per init and rounded once per format (as the suite does), one case at a time."""
    by_init = defaultdict(list)
    for c in cases:
        by_init[c.init].append(c)
    for init_name, group in by_init.items():
        first = group[0]
        init = parse_init(init_name)
        x64 = draw_input(parse_input("normal"), first.seed, first.batch, first.width)
        w64 = [draw_weight(init, first.seed, layer, first.width, first.width) for layer in range(1, first.depth + 1)]
        g64 = draw_seed_grad(first.seed, first.batch, first.width)
        for fmt_name in sorted({c.format for c in group}):
            fmt = get_format(fmt_name)
            wide = fmt.wide().torch_dtype()
            low = fmt.torch_dtype()
            weights = [torch.from_numpy(round_to_format(w, fmt).astype(np.float64)).to(wide) for w in w64]
            for case in (c for c in group if c.format == fmt_name):
                act = get_activation(case.activation).torch_fn
                x = torch.from_numpy(round_to_format(x64, fmt).astype(np.float64)).to(wide).requires_grad_(True)
                h = x
                for w in weights:
                    h = _RoundBoth.apply(act(_RoundBoth.apply(h @ w.T, low)), low)
                h.backward(torch.from_numpy(round_to_format(g64, fmt).astype(np.float64)).to(wide))


def test_default_matrix(benchmark):
    """The whole default matrix, forward and backward, against the bare chains of all its cases:
    in one process (the ratio), and as ``precision-suite run`` spreads it over the cores."""
    cases = Matrix(devices=("cpu",), modes=("emulated",)).cases()
    results = _against_bare(benchmark, lambda: bare_matrix(cases), run_cases, cases)
    assert all(r.status == "ok" for r in results)
    t0 = time.perf_counter()
    run_matrix(cases=cases, jobs=None)
    print(f"default matrix: {len(cases)} cases; with the default jobs {time.perf_counter() - t0:.2f}s")
