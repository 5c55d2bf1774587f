"""Every numeric decision is made per case: a case's result is bit-identical alone and stacked.

A torch stack runs the cases that differ only in their activation as one [C, batch, width] chain.
The stack partners below are chosen to take the other branch of each per-row decision: ReLU's
mean is large against its rms (the std's second pass), its rows shrink faster (fp64 layers for
bf16, float64 sums of squares), while the identity case alone takes the cheap branch. The sizes
include one whose tensors fill a statistics chunk (2^18 elements) alone, so that one layer of one
case is reduced as a single row, which torch would sum in pieces across threads: with one thread
and with two (``engine.torch_stats.row_sum`` takes another path for each).
"""

import pytest

from precision_suite.engine import run_cases
from precision_suite.spec import Case

torch = pytest.importorskip("torch")

PARTNERS = ("relu", "sigmoid", "gelu")


@pytest.fixture(params=[1, 2], ids=["1-thread", "2-threads"])
def threads(request):
    saved = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(saved)


def _result(case, others=()):
    stacked = [case, *(Case(**{**case.to_dict(), "activation": a}) for a in others)]
    [result] = [r for r in run_cases(stacked) if r.id == case.id]
    assert result.status == "ok", result.error
    d = result.to_dict()
    d.pop("seconds")
    return d


@pytest.mark.parametrize("shape", [dict(width=32, batch=8, depth=40), dict(width=256, batch=1024, depth=3)],
                         ids=["small", "past-grain"])
@pytest.mark.parametrize("fmt,init", [("bf16", "lecun_normal(gain=0.1)"), ("fp16", "normal"),
                                      ("fp32", "kaiming_normal")])
def test_a_case_is_bit_identical_alone_and_stacked(shape, fmt, init, threads):
    case = Case(init=init, activation="identity", format=fmt, **shape)
    alone = _result(case)
    stacked = _result(case, PARTNERS)
    assert alone == stacked
