"""Per-layer cost of one default-matrix stack (5 activations, fp16, width 128, batch 64): where the
time of a layer goes. Run: ``python tests/benchmarks/layer_cost.py`` (a script, not a test)."""

import time

import numpy as np
import torch

from precision_suite.draws import draw_weight
from precision_suite.engine.memory import keep_freed_memory
from precision_suite.engine.torch_rounding import rounder
from precision_suite.engine.torch_stats import tensor_stats
from precision_suite.formats import get_format, round_to_format
from precision_suite.inits import parse_init

CASES, BATCH, WIDTH, LAYERS = 5, 64, 128, 200


def per_layer_us(fn) -> float:
    fn()
    t0 = time.perf_counter()
    for _ in range(LAYERS):
        fn()
    return (time.perf_counter() - t0) / LAYERS * 1e6


def main() -> None:
    keep_freed_memory()
    fmt, init = get_format("fp16"), parse_init("kaiming_normal")
    rnd = rounder(fmt)
    x = torch.randn(CASES, BATCH, WIDTH)
    w64 = draw_weight(init, 0, 1, WIDTH, WIDTH)
    w = torch.from_numpy(round_to_format(w64, fmt).astype(np.float32))
    pre = torch.nn.functional.linear(x, w)
    rounded = rnd(pre)
    chunk_pre, chunk_rounded = pre.repeat(16, 1, 1), rnd(pre.repeat(16, 1, 1))
    rows = [
        ("weight draw (float64, numpy)", per_layer_us(lambda: draw_weight(init, 0, 1, WIDTH, WIDTH))),
        ("weight rounding + to torch",
         per_layer_us(lambda: torch.from_numpy(round_to_format(w64, fmt).astype(np.float32)))),
        (f"matmul ({CASES} cases, fp32)", per_layer_us(lambda: torch.nn.functional.linear(x, w))),
        ("rounding pre + post", per_layer_us(lambda: (rnd(pre), rnd(pre)))),
        ("activation (tanh)", per_layer_us(lambda: torch.tanh(pre))),
        ("statistics pre + post, 1 layer a call",
         per_layer_us(lambda: (tensor_stats(pre, rounded, fmt), tensor_stats(pre, rounded, fmt)))),
        ("statistics pre + post, 16 layers a call", per_layer_us(
            lambda: (tensor_stats(chunk_pre, chunk_rounded, fmt), tensor_stats(chunk_pre, chunk_rounded, fmt))) / 16),
    ]
    for name, us in rows:
        print(f"{name:42s} {us:8.1f} us/layer  (threads: {torch.get_num_threads()})")


if __name__ == "__main__":
    main()
