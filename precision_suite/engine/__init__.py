"""Engines: run groups of cases that share their draws, one layer at a time, into ``CaseResult``s.

Cases with the same ``Case.group_key()`` (init, seed, shapes, input, bias) see the same input and
weights; the group draws each layer's weights once, rounds them once per format, and steps every
case's chain through that layer before drawing the next (memory flat in depth when forward-only).
"""

from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import replace
from typing import Callable, Iterable

from ..activations import get_activation
from ..draws import LayerDraws, draw_input, draw_seed_grad, outlier_multiplier, parse_input
from ..formats import round_to_format
from ..inits import parse_init
from ..results import BackwardResult, CaseResult, ForwardResult
from ..spec import Case
from ..stats import backward_events, forward_events
from .memory import keep_freed_memory
from .protocol import Unit

__all__ = ["run_cases", "group_cases", "split_units"]


def group_cases(cases: Iterable[Case]) -> list[list[Case]]:
    groups: dict[tuple, list[Case]] = defaultdict(list)
    for c in cases:
        groups[c.group_key()].append(c)
    return list(groups.values())


def split_units(cases: Iterable[Case]) -> list[list[Case]]:
    """The pieces a run can hand to different processes: a group's cases that share one torch
    stack (``torch_stack.stack_key``), or one format's numpy chains. A unit draws its own copy of
    the group's weights (~0.1 ms a layer at width 128), the price of running units apart."""
    from .torch_stack import stack_key

    units: dict[tuple, list[Case]] = defaultdict(list)
    for c in cases:
        units[(c.group_key(), stack_key(c) if c.backend == "torch" else (c.backend, c.format))].append(c)
    return list(units.values())


def run_cases(cases: list[Case], *, backward: bool = True, rel_error: bool = False,
              on_result: Callable[[CaseResult], None] | None = None) -> list[CaseResult]:
    """Run every case; ``on_result`` is called as each case finishes (progress, checkpoints).
    A case that raises is recorded with ``status="error"``, never dropped."""
    keep_freed_memory()
    results = []
    for group in group_cases(cases):
        try:
            group_results = _run_group(group, backward=backward, rel_error=rel_error)
        except Exception as exc:  # the group's shared draws failed: no case of it can run
            group_results = [CaseResult(c, status="error", error=_error_line(exc)) for c in group]
        for r in group_results:
            results.append(r)
            if on_result is not None:
                on_result(r)
    return results


def _error_line(exc: BaseException) -> str:
    """``ValueError: <the message's first line>``."""
    return f"{type(exc).__name__}: {exc}".strip().splitlines()[0]


def _make_unit(cases: list[Case], x0, backward: bool, rel_error: bool) -> Unit:
    """The ``Unit`` that steps ``cases`` (one of ``_units_plan``) through the layers: a numpy chain
    (one case) or a torch stack."""
    if cases[0].backend == "numpy":
        from .numpy_backend import NumpyChain

        return NumpyChain(cases[0], x0, backward=backward, rel_error=rel_error)
    from .torch_stack import make_stack

    return make_stack(cases, x0, backward=backward, rel_error=rel_error)


def _run_group(cases: list[Case], *, backward: bool, rel_error: bool) -> list[CaseResult]:
    """Run one group. A unit that raises (setting up, in a layer, or finishing) is dropped: alone,
    its case is an error; stacked, its cases rerun one by one, so that only the case that raises
    is an error and the others get the results they get alone (bit-identical)."""
    if cases[0].mode == "autocast":  # a group is all autocast or none (Case.group_key)
        from ..probe.chain import run_autocast_chains

        return run_autocast_chains(cases, backward=backward)
    done, seconds, raised = _run_units(cases, backward, rel_error)
    for unit_cases, error in raised:
        if len(unit_cases) == 1:
            done[unit_cases[0].id] = CaseResult(unit_cases[0], status="error", error=error)
            continue
        for case in unit_cases:
            alone = _run_group([case], backward=backward, rel_error=rel_error)[0]
            seconds[case.id] += alone.seconds
            done[case.id] = alone
    return [replace(done[c.id], seconds=seconds[c.id]) for c in cases]


def _run_units(cases: list[Case], backward: bool, rel_error: bool) -> tuple[dict, dict, list]:
    """Step every unit of a group through its layers and finish it: (results by case id, seconds by
    case id, [(cases of a unit that raised, the error's line)]). Its chains are freed on return."""
    import torch

    first = cases[0]
    init = parse_init(first.init)
    x0 = draw_input(parse_input(first.input), first.seed, first.batch, first.width)
    done: dict[str, CaseResult] = {}
    seconds: dict[str, float] = defaultdict(float)
    raised: list[tuple[list[Case], str]] = []
    units = []
    for unit_cases in _units_plan(cases):
        t0 = time.perf_counter()
        try:
            units.append(_make_unit(unit_cases, x0, backward, rel_error))
        except Exception as exc:
            raised.append((unit_cases, _error_line(exc)))
        _charge(seconds, unit_cases, time.perf_counter() - t0)
    draws = LayerDraws(init, first.seed, first.width, first.depth, first.bias,
                       activation=get_activation(first.activation), x0=x0,
                       multiplier=outlier_multiplier(parse_input(first.input), first.seed, first.width))
    with torch.enable_grad() if backward else torch.no_grad():
        for layer, (w64, b64) in enumerate(draws, 1):
            rounded = {}
            for unit in list(units):
                t0 = time.perf_counter()
                fmt = unit.fmt
                if fmt.name not in rounded:
                    rounded[fmt.name] = (round_to_format(w64, fmt), None if b64 is None else round_to_format(b64, fmt))
                try:
                    unit.step(layer, *rounded[fmt.name])
                except Exception as exc:
                    raised.append((unit.cases, _error_line(exc)))
                    units.remove(unit)
                _charge(seconds, unit.cases, time.perf_counter() - t0)
        g64 = draw_seed_grad(first.seed, first.batch, first.width) if backward else None
        for unit in units:
            t0 = time.perf_counter()
            try:
                finished = [_finish(view, g64) for view in unit.views]
            except Exception as exc:
                raised.append((unit.cases, _error_line(exc)))
            else:
                done.update({r.id: r for r in finished})
            _charge(seconds, unit.cases, time.perf_counter() - t0)
    return done, seconds, raised


def _units_plan(cases: list[Case]) -> list[list[Case]]:
    """The cases of each unit: a numpy chain per case, a torch stack per ``stack_key``."""
    from .torch_stack import stack_key

    units: dict[tuple, list[Case]] = defaultdict(list)
    for c in cases:
        units[stack_key(c) if c.backend == "torch" else ("numpy", c.id)].append(c)
    return list(units.values())


def _charge(seconds: dict, cases: list[Case], elapsed: float) -> None:
    """Split a unit's time evenly over its cases."""
    for c in cases:
        seconds[c.id] += elapsed / len(cases)


def _finish(chain, g64) -> CaseResult:
    from ..loss_scale import loss_scale_advice
    from ..theory import predict

    case = chain.case
    if g64 is not None:
        chain.run_backward(g64)
    fmt = chain.fmt
    scaled = fmt.scaling is not None  # the quantized matmul inputs have statistics of their own
    pre, post = chain.columns("pre"), chain.columns("post")
    gemm_in, gemm_w = (chain.columns("gemm_in"), chain.columns("gemm_w")) if scaled else (None, None)
    fwd = ForwardResult(forward_events(pre, post, case.underflow_threshold, gemm_in, gemm_w), chain.input_columns(),
                        pre, post, chain.rel_error_values(), gemm_in, gemm_w)
    bwd = None
    if g64 is not None:
        grad, grad_pre, wgrad = chain.columns("grad"), chain.columns("grad_pre"), chain.columns("wgrad")
        grad_gemm_in = chain.columns("grad_gemm_in") if scaled else None
        advice = loss_scale_advice({"grad": grad, "grad_pre": grad_pre, "wgrad": wgrad}, fmt, case.underflow_threshold,
                                   case.loss_scale)
        bwd = BackwardResult(backward_events(grad, grad_pre, wgrad, case.underflow_threshold, grad_gemm_in),
                             grad, grad_pre, wgrad, loss_scale=advice, grad_gemm_in=grad_gemm_in)
    return CaseResult(case, status="ok", forward=fwd, backward=bwd, theory=predict(case))
