"""Speed of the probe on nn.TransformerEncoderLayer (d_model 512, 8 heads, seq 128, batch 8),
fp16 emulated forward + backward, as ratios measured in one run:

    statistics       every per-op statistic, forward and backward (what ``probe`` records)
    bare emulated    the same rounding of every op, forward and backward, no statistics
    plain fp32       the unmodified model's forward + backward

The bar: statistics <= 2x bare emulated (a naive six-reduction pass measured 2.07x).
"""

import statistics
import time

import pytest

torch = pytest.importorskip("torch")

from precision_suite.formats import get_format  # noqa: E402
from precision_suite.probe.run import Watch, prepare, step  # noqa: E402

ROUNDS = 5


@pytest.fixture(scope="module")
def encoder():
    """One torch thread: on a shared 2-core machine spinning intra-op threads make ratios noise."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = torch.nn.TransformerEncoderLayer(512, 8, 2048, dropout=0.0, batch_first=True)
    x = torch.randn(8, 128, 512)
    prepared = prepare(model, x, get_format("fp16"), "emulated", "cpu", True)
    yield model.eval(), x, prepared
    torch.set_num_threads(threads)


def _step(prepared, stats: bool) -> None:
    m, args, kwargs = prepared
    step(Watch(m, "fp16", "emulated", stats=stats), args, kwargs)


def _plain(model, x) -> None:
    out = model(x.clone().requires_grad_(True))
    out.backward(torch.ones_like(out))


def _median(fn, *args) -> float:
    fn(*args)  # warm-up
    times = []
    for _ in range(ROUNDS):
        t0 = time.perf_counter()
        fn(*args)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def test_probe_statistics_cost_at_most_twice_the_bare_emulated_step(benchmark, encoder):
    model, x, prepared = encoder
    bare = _median(_step, prepared, False)
    plain = _median(_plain, model, x)
    benchmark.pedantic(_step, args=(prepared, True), rounds=ROUNDS, iterations=1, warmup_rounds=1)
    suite = benchmark.stats.stats.median
    benchmark.extra_info.update(bare_median_s=bare, plain_median_s=plain, ratio_vs_bare=suite / bare,
                                ratio_vs_plain=suite / plain)
    print(f"\nprobe statistics {suite:.3f}s / bare emulated {bare:.3f}s = {suite / bare:.2f}x; "
          f"/ plain fp32 {plain:.3f}s = {suite / plain:.2f}x")
    assert suite / bare <= 2.0
