"""Engines: run groups of cases that share their draws, one layer at a time, into ``CaseResult``s.

Cases with the same ``Case.group_key()`` (init, seed, shapes, input, bias) see the same input and
weights; the group draws each layer's weights once, rounds them once per format, and steps every
case's chain through that layer before drawing the next (memory flat in depth when forward-only).
"""

from __future__ import annotations

import time
import traceback
from collections import defaultdict
from typing import Callable, Iterable

from ..activations import get_activation
from ..draws import LayerDraws, draw_input, draw_seed_grad, parse_input
from ..formats import get_format, round_to_format
from ..inits import parse_init
from ..results import BackwardResult, CaseResult, ForwardResult
from ..spec import Case
from ..stats import backward_events, forward_events

__all__ = ["run_cases", "group_cases"]


def group_cases(cases: Iterable[Case]) -> list[list[Case]]:
    groups: dict[tuple, list[Case]] = defaultdict(list)
    for c in cases:
        groups[c.group_key()].append(c)
    return list(groups.values())


def run_cases(cases: list[Case], *, backward: bool = True, rel_error: bool = False,
              on_result: Callable[[CaseResult], None] | None = None) -> list[CaseResult]:
    """Run every case; ``on_result`` is called as each case finishes (progress, checkpoints)."""
    results = []
    for group in group_cases(cases):
        for r in _run_group(group, backward=backward, rel_error=rel_error):
            results.append(r)
            if on_result is not None:
                on_result(r)
    return results


def _error_result(case: Case, exc: BaseException, seconds: float = 0.0) -> CaseResult:
    msg = f"{type(exc).__name__}: {exc}".strip().splitlines()[0]
    return CaseResult(case, status="error", error=msg, seconds=seconds)


def _make_chain(case: Case, x0, backward: bool, rel_error: bool):
    if case.backend == "numpy":
        from .numpy_backend import NumpyChain

        return NumpyChain(case, x0, backward=backward, rel_error=rel_error)
    from .torch_backend import TorchChain

    return TorchChain(case, x0, backward=backward, rel_error=rel_error)


def _run_group(cases: list[Case], *, backward: bool, rel_error: bool) -> list[CaseResult]:
    import torch

    first = cases[0]
    init = parse_init(first.init)
    x0 = draw_input(parse_input(first.input), first.seed, first.batch, first.width)
    chains, done = {}, {}
    seconds = defaultdict(float)
    for case in cases:
        t0 = time.perf_counter()
        try:
            chains[case.id] = _make_chain(case, x0, backward, rel_error)
        except Exception as exc:  # a case that cannot run is recorded, never dropped
            done[case.id] = _error_result(case, exc)
        seconds[case.id] += time.perf_counter() - t0
    draws = LayerDraws(init, first.seed, first.width, first.depth, first.bias,
                       activation=get_activation(first.activation), x0=x0)
    grad_ctx = torch.enable_grad() if backward else torch.no_grad()
    with grad_ctx:
        for layer, (w64, b64) in enumerate(draws, 1):
            rounded = {}
            for cid, chain in list(chains.items()):
                t0 = time.perf_counter()
                fmt = chain.fmt
                if fmt.name not in rounded:
                    rounded[fmt.name] = (round_to_format(w64, fmt), None if b64 is None else round_to_format(b64, fmt))
                try:
                    chain.step(layer, *rounded[fmt.name])
                except Exception as exc:
                    done[cid] = _error_result(chain.case, exc)
                    del chains[cid]
                seconds[cid] += time.perf_counter() - t0
        g64 = draw_seed_grad(first.seed, first.batch, first.width) if backward else None
        for cid, chain in chains.items():
            t0 = time.perf_counter()
            try:
                done[cid] = _finish(chain, g64)
            except Exception as exc:
                done[cid] = _error_result(chain.case, exc)
            seconds[cid] += time.perf_counter() - t0
    from dataclasses import replace

    return [replace(done[c.id], seconds=seconds[c.id]) for c in cases]


def _finish(chain, g64) -> CaseResult:
    case = chain.case
    if g64 is not None:
        chain.run_backward(g64)
    fmt = chain.fmt
    pre, post = chain.columns("pre"), chain.columns("post")
    fwd = ForwardResult(forward_events(pre, post, case.underflow_threshold), chain.input_columns(), pre, post,
                        chain.rel_error_values())
    bwd = None
    if g64 is not None:
        grad, grad_pre, wgrad = chain.columns("grad"), chain.columns("grad_pre"), chain.columns("wgrad")
        bwd = BackwardResult(backward_events(grad, grad_pre, wgrad, case.underflow_threshold), grad, grad_pre, wgrad)
    return CaseResult(case, status="ok", forward=fwd, backward=bwd)
