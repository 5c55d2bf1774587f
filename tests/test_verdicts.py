"""The rules every consumer shares: which event fails a pass and a case, expectations, --fail-on,
what moved against a baseline, and the summary that counts both directions. Hand-built events."""

import json
from dataclasses import replace

import pytest

from precision_suite.results import BackwardResult, CaseResult, ForwardResult, Results, load_results
from precision_suite.spec import Case
from precision_suite.stats import EVENT_NAMES, Events
from precision_suite.summary import summary_table
from precision_suite.stats import STAT_NAMES
from precision_suite.verdicts import (JUDGED_EVENTS, REPORTED_EVENTS, case_failure, case_moves, compare_results,
                                      count_cases, expectation_met, failed_checks, pass_failure, theory_verdict)

DEPTH = 10


def events(backward: bool = False, **layers) -> Events:
    return Events(**layers, failure=pass_failure(layers, backward=backward))


def result(fwd: dict | None = None, bwd: dict | None = None, **case) -> CaseResult:
    """An ok case of depth 10 whose forward/backward passes show the given event layers."""
    spec = Case(**{"depth": DEPTH, "width": 8, "batch": 2, **case})
    columns = {name: [0.0] * DEPTH for name in STAT_NAMES}  # the statistics are not what these tests read
    forward = ForwardResult(events(**(fwd or {})), {name: 0.0 for name in STAT_NAMES}, columns, columns)
    backward = None if bwd is None else BackwardResult(events(backward=True, **bwd), columns, columns, columns)
    return CaseResult(spec, forward=forward, backward=backward)


# ---------------------------------------------------------------- a pass's failure

def test_pass_failure_is_earliest_forward_and_highest_backward_with_the_kind_order_on_ties():
    layers = {"first_underflow": 3, "first_zero": 3, "first_nan": 7, "first_overflow": 7}
    assert pass_failure(layers, backward=False) == {"layer": 3, "kind": "zero"}  # zero before underflow
    assert pass_failure(layers, backward=True) == {"layer": 7, "kind": "overflow"}  # overflow before nan
    assert pass_failure({"first_subnormal": 1, "first_underflow_any": 1}, backward=False) is None  # warnings


# ---------------------------------------------------------------- a case's failure

@pytest.mark.parametrize("fwd_layer, bwd_layer, direction", [
    (6, 8, "forward"),   # the gradients fail above the broken forward pass: its echo
    (6, 6, "forward"),   # at the very layer: still the echo
    (9, 3, "backward"),  # below it, where the forward was intact: forward survived 8, backward 10 - 3 = 7
    (8, 2, "forward"),   # 7 and 8: forward survived fewer
    (9, 2, "forward"),   # 8 and 8: a tie goes to forward
], ids=["echo-above", "echo-same-layer", "backward-fewer", "forward-fewer", "tie"])
def test_case_failure_is_the_direction_that_survived_fewer_layers(fwd_layer, bwd_layer, direction):
    fwd = events(first_overflow=fwd_layer)
    bwd = events(backward=True, first_nan=bwd_layer)
    kind, layer = ("overflow", fwd_layer) if direction == "forward" else ("nan", bwd_layer)
    assert case_failure(fwd, bwd, DEPTH) == {"direction": direction, "layer": layer, "kind": kind}


def test_case_failure_sees_either_pass_alone():
    assert case_failure(events(), events(backward=True, first_zero=9), DEPTH) == {
        "direction": "backward", "layer": 9, "kind": "zero"}
    assert case_failure(events(first_underflow=4), None, DEPTH)["direction"] == "forward"  # --no-backward
    assert case_failure(events(), events(backward=True), DEPTH) is None


# ---------------------------------------------------------------- expectations and --fail-on

def test_survives_fails_on_a_backward_only_failure():
    grads_die = result(bwd={"first_nan": 1, "first_overflow": 1})
    assert not expectation_met(grads_die, "survives")
    assert expectation_met(grads_die, "no-nan") and not expectation_met(grads_die, "no-grad_nan")
    assert expectation_met(grads_die, "grad_overflow") and not expectation_met(grads_die, "overflow")
    assert expectation_met(result(bwd={}), "survives")
    assert not expectation_met(result(), "grad_overflow")  # no backward pass: the event cannot be shown


def test_fail_on_error_counts_an_errored_case():
    errored = CaseResult(Case(depth=DEPTH), status="error", error="RuntimeError: boom")
    skipped = CaseResult(Case(depth=DEPTH, device="cuda"), status="skipped", skip_reason="no GPU")
    overflowing = result(fwd={"first_overflow": 3}, bwd={"first_nan": 9}, init="normal")
    runs = Results((errored, skipped, overflowing), {})
    assert failed_checks(runs, ["error"]) == [f"{errored.id}: error: RuntimeError: boom"]
    assert failed_checks(runs, ["overflow", "grad_nan"]) == [f"{overflowing.id}: overflow at layer 3",
                                                            f"{overflowing.id}: grad_nan at layer 9"]
    assert failed_checks(runs, ["nan", "grad_overflow"]) == []


# ---------------------------------------------------------------- against a baseline

def test_baseline_judges_exactly_the_five_events_and_status_and_reports_the_warnings():
    every = dict.fromkeys(EVENT_NAMES, 5)
    before = result(fwd=every, bwd=every)
    moved = {name: 6 for name in EVENT_NAMES}
    after = result(fwd=moved, bwd=moved)
    moves = case_moves(before, after)
    judged = {(m.direction, m.event) for m in moves if m.judged}
    shown = {(m.direction, m.event) for m in moves if not m.judged}
    assert judged == {(d, e) for d in ("forward", "backward") for e in JUDGED_EVENTS}
    assert shown == {(d, e) for d in ("forward", "backward") for e in REPORTED_EVENTS}
    assert {m.delta for m in moves} == {1}
    assert [m for m in case_moves(before, before)] == []
    only_warnings = result(fwd={**every, "first_subnormal": 2, "first_underflow_any": 1}, bwd=every)
    assert not any(m.judged for m in case_moves(before, only_warnings))


def test_baseline_judges_ok_to_error_and_a_missing_case():
    ok = result(fwd={}, bwd={})
    errored = replace(ok, status="error", error="boom", forward=None, backward=None)
    [broke] = case_moves(ok, errored)
    assert (broke.event, broke.before, broke.after, broke.judged) == ("status", "ok", "error", True)
    [fixed] = case_moves(errored, ok)
    assert fixed.event == "status" and not fixed.judged
    other = result(fwd={}, bwd={}, init="normal")
    [missing] = compare_results([ok], Results((ok, other), {}))
    assert (missing.case_id, missing.event, missing.judged) == (other.id, "missing", True)


# ---------------------------------------------------------------- theory

def test_theory_verdict_forward_and_backward():
    theory = {"applicable": True, "first_overflow": 9, "first_underflow": 4, "first_zero": None,
              "backward": {"first_overflow": None, "first_underflow": 2, "first_zero": 6}}
    fwd, bwd = theory_verdict(theory), theory_verdict(theory, "backward")
    assert (fwd.status, fwd.failure) == ("prediction", {"layer": 4, "kind": "underflow"})
    assert bwd.failure == {"layer": 6, "kind": "zero"}  # first in backward order: the highest layer
    assert theory_verdict({"applicable": True, "first_overflow": None}).failure is None
    off = theory_verdict({"applicable": False, "reason": "tanh saturates"}, "backward")
    assert (off.status, off.reason, off.failure) == ("not applicable", "tanh saturates", None)
    assert theory_verdict(None).status == "none"


# ---------------------------------------------------------------- results schema 2 and the summary

def test_schema_2_round_trip_and_version_1_load(tmp_path):
    grads_die = result(fwd={}, bwd={"first_nan": 2})
    runs = Results((grads_die, result(fwd={"first_overflow": 3}, init="normal")), {"torch": "x"})
    d = json.loads(json.dumps(runs.to_dict()))
    assert d["schema_version"] == 2 and d["definitions"] == {"underflow": "significant"}
    assert d["environments"] == [{"torch": "x"}] and d["cases"][0]["environment"] == 0
    assert d["cases"][0]["failure"] == {"direction": "backward", "layer": 2, "kind": "nan"}
    assert Results.from_dict(d).to_dict() == {**d, "created": runs.created}
    v1 = {k: v for k, v in d.items() if k not in ("definitions", "environments")}
    v1.update(schema_version=1, environment={"torch": "old"},
              cases=[{k: v for k, v in c.items() if k not in ("failure", "environment")} for c in d["cases"]])
    (tmp_path / "v1.json").write_text(json.dumps(v1))
    old = load_results(tmp_path / "v1.json")
    assert old.definitions == {"underflow": "any"} and old.environments == ({"torch": "old"},)
    assert old.cases[0].failure == {"direction": "backward", "layer": 2, "kind": "nan"}


def test_summary_counts_a_backward_only_failure_as_failing():
    grads_die = result(fwd={}, bwd={"first_nan": 2})
    healthy = result(fwd={}, bwd={}, init="orthogonal")
    errored = CaseResult(Case(depth=DEPTH, init="normal"), status="error", error="boom")
    runs = Results((grads_die, healthy, errored), {})
    n = count_cases(runs.cases)
    assert (n.failing, n.forward, n.backward, n.errors) == (1, 0, 1, 1)
    text = summary_table(runs)
    assert text.splitlines()[-1] == "3 cases: 2 ran, 1 fail (0 forward, 1 backward first), 1 errors, 0 skipped"
    row = next(line for line in text.splitlines() if line.startswith(grads_die.id))
    assert row.split()[1:4] == ["∇", "nan", "@"]


def test_summary_flags_torch_and_numpy_twins_that_disagree():
    torch_case = result(fwd={"first_underflow": 7}, bwd={})
    numpy_case = result(fwd={"first_underflow": 8}, bwd={}, backend="numpy")
    agree = [result(fwd={}, bwd={}, init="orthogonal"), result(fwd={}, bwd={}, init="orthogonal", backend="numpy")]
    text = summary_table(Results((torch_case, numpy_case, *agree), {}))
    rows = {line.split()[0]: line for line in text.splitlines()[2:-1]}
    assert "≠ numpy" in rows[torch_case.id] and "≠ torch" in rows[numpy_case.id]
    assert not any("≠" in rows[r.id] for r in agree)
    assert text.splitlines()[-1].endswith("; 1 torch/numpy pair disagree (≠)")
