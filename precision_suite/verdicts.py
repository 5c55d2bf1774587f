"""Verdicts: the one place that decides what fails, what an expectation means and what moved.

Every consumer — the summary, the report, the pytest plugin, ``--fail-on``, the shipped matrix —
asks this module; none re-derives a rule from the events (see docs/definitions.md#when-a-case-fails).

* A pass's **failure** is the earliest of ``FAILURE_ORDER``'s events (forward: lowest layer;
  backward: first in backward order, the highest layer); ties go to the kind listed first.
* A **case fails** when its forward *or* its backward pass fails. A backward failure at or above
  the forward failure's layer echoes it (an overflowed loss makes every gradient NaN): the case
  failure is then the forward one. Otherwise it is the one that left fewer layers intact: a
  forward failure at L survived L - 1 layers, a backward failure at L survived depth - L; on a tie
  the forward one.
* Against a baseline, the ``JUDGED_EVENTS`` of both passes and a status going ok -> error are
  regressions; ``REPORTED_EVENTS`` (rare-event statistics) and other changes are shown, not judged.

Imports nothing heavy: ``precision-suite --help`` reads ``FAIL_ON_CHOICES`` from here.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # annotations only: results.py and stats.py import this module
    from .results import CaseResult, Results
    from .stats import Events

__all__ = ["FAILURE_ORDER", "FAIL_ON_CHOICES", "EXPECTATIONS", "JUDGED_EVENTS", "REPORTED_EVENTS",
           "pass_failure", "case_failure", "layers_survived", "CaseCounts", "count_cases", "backend_disagreements",
           "TheoryVerdict", "theory_verdict", "event_layer", "checks_hit", "failed_checks", "expectation_met",
           "Moved", "case_moves", "compare_results"]

# (kind, event): a pass's failure is the earliest of these; on a tie the first listed wins
FAILURE_ORDER = (("overflow", "first_overflow"), ("nan", "first_nan"), ("zero", "first_zero"),
                 ("underflow", "first_underflow"))
_EVENTS = ("overflow", "nan", "underflow", "zero", "subnormal", "underflow_any", "flush")
# --fail-on items: forward events, the same with grad_ (backward), and error (a case that could not run)
FAIL_ON_CHOICES = (*_EVENTS, *(f"grad_{e}" for e in _EVENTS), "error")
_EVENT_ITEMS = FAIL_ON_CHOICES[:-1]
# @pytest.mark.precision(expect=...): survives (both directions), no-EVENT, EVENT
EXPECTATIONS = ("survives", *(f"no-{e}" for e in _EVENT_ITEMS), *_EVENT_ITEMS)
# compared exactly against a baseline (same seed, same bits), in both directions
JUDGED_EVENTS = ("failure", "first_overflow", "first_nan", "first_underflow", "first_zero")
# warnings: they move by tens of layers with accumulation order, so a change is shown, never judged
REPORTED_EVENTS = ("first_underflow_any", "first_subnormal", "first_flush")
_DIRECTIONS = ("forward", "backward")


# ---------------------------------------------------------------- failures

def pass_failure(events: Mapping[str, int | None], backward: bool) -> dict | None:
    """``{"layer", "kind"}`` of one pass from its event layers (``first_overflow`` -> 4, ...), or None.

    forward: layer = min over ``FAILURE_ORDER``'s events; backward: max (first in backward order)."""
    found = [(layer, rank, kind) for rank, (kind, key) in enumerate(FAILURE_ORDER)
             if (layer := events.get(key)) is not None]
    if not found:
        return None
    layer = (max if backward else min)(f[0] for f in found)
    kind = min((f for f in found if f[0] == layer), key=lambda f: f[1])[2]
    return {"layer": layer, "kind": kind}


def _survived(direction: str, layer: int, depth: int) -> int:
    """Layers left intact: forward L - 1 (layers 1..L-1), backward depth - L (layers L+1..depth)."""
    return layer - 1 if direction == "forward" else depth - layer


def case_failure(forward: Events | None, backward: Events | None, depth: int) -> dict | None:
    """``{"direction", "layer", "kind"}`` of the case, or None.

    A backward failure at or above the forward failure's layer is the forward failure's echo (the
    loss of an overflowed chain is inf and every gradient from the top down NaN; the gradients of
    dead layers are zero): the case failure is the forward one. A backward failure below it, in
    layers the forward pass left intact, is a finding of its own: then the pass that survived fewer
    layers wins (forward L: L - 1 layers; backward L: depth - L), a tie going to forward."""
    fwd = forward.failure if forward is not None else None
    bwd = backward.failure if backward is not None else None
    if fwd is not None and (bwd is None or bwd["layer"] >= fwd["layer"]):
        return {"direction": "forward", **fwd}
    if bwd is None:
        return None
    if fwd is not None and _survived("forward", fwd["layer"], depth) <= _survived("backward", bwd["layer"], depth):
        return {"direction": "forward", **fwd}
    return {"direction": "backward", **bwd}


def layers_survived(result: CaseResult) -> int | None:
    """Depth survived by the case (the heatmap colour): depth when it does not fail; None when it did not run."""
    if result.status != "ok" or result.forward is None:
        return None
    f = result.failure
    return result.case.depth if f is None else _survived(f["direction"], f["layer"], result.case.depth)


@dataclass(frozen=True)
class CaseCounts:
    """How many cases ran, failed (split by the direction that failed first), errored, were skipped."""

    total: int
    ran: int
    failing: int
    forward: int
    backward: int
    errors: int
    skipped: int


def count_cases(cases: Iterable[CaseResult]) -> CaseCounts:
    cases = list(cases)
    failures = [r.failure for r in cases if r.status == "ok" and r.failure is not None]
    forward = sum(f["direction"] == "forward" for f in failures)
    return CaseCounts(len(cases), sum(r.status == "ok" for r in cases), len(failures), forward,
                      len(failures) - forward, sum(r.status == "error" for r in cases),
                      sum(r.status == "skipped" for r in cases))


def backend_disagreements(cases: Iterable[CaseResult]) -> dict[str, str]:
    """Case id -> the id of its other-backend twin (same spec but the backend) whose pass failures differ.

    Both directions are compared where both cases recorded them; a case that did not run has no verdict."""
    by_spec: dict[tuple, list] = {}
    for r in cases:
        if r.status == "ok" and r.forward is not None:
            key = tuple(sorted((k, str(v)) for k, v in r.case.to_dict().items() if k != "backend"))
            by_spec.setdefault(key, []).append(r)
    out = {}
    for twins in by_spec.values():
        for a in twins:
            for b in twins:
                if a.case.backend != b.case.backend and _pass_failures(a, b) != _pass_failures(b, a):
                    out[a.id] = b.id
    return out


def _pass_failures(r: CaseResult, other: CaseResult) -> tuple:
    both_backward = r.backward is not None and other.backward is not None
    return r.forward.events.failure, r.backward.events.failure if both_backward else None


# ---------------------------------------------------------------- theory

@dataclass(frozen=True)
class TheoryVerdict:
    """What theory predicts for one pass. status: "prediction", "not applicable" or "none" (no block).

    With a prediction, ``events`` maps first_overflow/first_underflow/first_zero to a layer or None
    (never within depth), and ``layer``/``kind`` are their failure (None: predicted to survive)."""

    status: str
    layer: int | None = None
    kind: str | None = None
    events: Mapping[str, int | None] | None = None
    reason: str | None = None

    @property
    def failure(self) -> dict | None:
        """Shaped like ``Events.failure``."""
        return None if self.layer is None else {"layer": self.layer, "kind": self.kind}


_THEORY_EVENTS = ("first_overflow", "first_underflow", "first_zero")  # theory predicts no NaN


def theory_verdict(theory: dict | None, direction: str = "forward") -> TheoryVerdict:
    """From a case's theory block: its top level is the forward prediction, ``theory["backward"]`` the
    backward one. Inside an applicable block a null event means "predicted never within depth"."""
    if not theory:
        return TheoryVerdict("none", reason="these results carry no theory block")
    if not theory.get("applicable", False):
        return TheoryVerdict("not applicable", reason=theory.get("reason") or "theory does not apply to this case")
    block = theory if direction == "forward" else theory.get("backward")
    if not isinstance(block, dict):
        return TheoryVerdict("none", reason=f"theory has no {direction} prediction")
    if not block.get("applicable", True):
        return TheoryVerdict("not applicable",
                             reason=block.get("reason") or f"theory does not apply to this case's {direction} pass")
    events = {key: _layer_or_none(block.get(key)) for key in _THEORY_EVENTS}
    f = pass_failure(events, backward=direction == "backward")
    return TheoryVerdict("prediction", f and f["layer"], f and f["kind"], events)


def _layer_or_none(v) -> int | None:
    return int(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) else None


# ---------------------------------------------------------------- --fail-on and expectations

def event_layer(result: CaseResult, item: str) -> int | None:
    """Layer of a fail-on event (``overflow``: forward first_overflow; ``grad_nan``: backward first_nan);
    None when the case does not show it or that pass was not run."""
    block = result.backward if item.startswith("grad_") else result.forward
    return None if block is None else getattr(block.events, "first_" + item.removeprefix("grad_"))


def checks_hit(result: CaseResult, fail_on: Iterable[str]) -> list[str]:
    """The ``fail_on`` items this case shows; ``error`` is hit by a case that could not run."""
    if result.status == "error":
        return ["error"] if "error" in fail_on else []
    if result.status != "ok":
        return []
    return [item for item in fail_on if item != "error" and event_layer(result, item) is not None]


def failed_checks(results: Results, fail_on: Iterable[str]) -> list[str]:
    """One line per (case, item) that ``--fail-on`` names and the case has."""
    fail_on = list(fail_on)
    return [f"{r.id}: error: {r.error}" if item == "error" else f"{r.id}: {item} at layer {event_layer(r, item)}"
            for r in results.cases for item in checks_hit(r, fail_on)]


def expectation_met(result: CaseResult, expectation: str) -> bool:
    """``survives``: neither pass fails; ``no-EVENT``: the case does not show EVENT; ``EVENT``: it does
    (a ``grad_`` event needs the backward pass)."""
    if expectation == "survives":
        return result.failure is None
    if expectation.startswith("no-"):
        return event_layer(result, expectation[3:]) is None
    return event_layer(result, expectation) is not None


# ---------------------------------------------------------------- against a baseline

@dataclass(frozen=True)
class Moved:
    """One difference from the baseline. ``event``: a name of ``JUDGED_EVENTS``/``REPORTED_EVENTS``,
    "status", "recorded" (a pass run in one and not the other), or "missing" (a baseline case not
    run now); ``judged``: it is a regression, not only shown."""

    case_id: str
    direction: str | None  # "forward" | "backward" | None (the case as a whole)
    event: str
    before: object
    after: object
    judged: bool

    @property
    def delta(self) -> int | None:
        """Layers the event moved (after - before) when both are layers."""
        a, b = self.before, self.after
        if isinstance(a, dict) and isinstance(b, dict):
            a, b = a["layer"], b["layer"]
        return b - a if isinstance(a, int) and isinstance(b, int) else None


def case_moves(before: CaseResult, after: CaseResult) -> list[Moved]:
    """What moved between two runs of the same case id (judged: the 5 events of either pass, ok -> error)."""
    cid = after.id
    if before.status != after.status:
        return [Moved(cid, None, "status", before.status, after.status,
                      judged=before.status == "ok" and after.status == "error")]
    if after.status != "ok":
        return []
    out = []
    for direction in _DIRECTIONS:
        old, new = getattr(before, direction), getattr(after, direction)
        if old is None or new is None:
            if (old is None) != (new is None):
                out.append(Moved(cid, direction, "recorded", old is not None, new is not None, judged=False))
            continue
        for name in (*JUDGED_EVENTS, *REPORTED_EVENTS):
            a, b = getattr(old.events, name), getattr(new.events, name)
            if a != b:
                out.append(Moved(cid, direction, name, a, b, judged=name in JUDGED_EVENTS))
    return out


def compare_results(current: Iterable[CaseResult], baseline: Results) -> list[Moved]:
    """``case_moves`` for every case in both (matched by id), and each baseline case missing from
    ``current`` (judged: a case that no longer runs can hide any regression)."""
    base = baseline.by_id()
    current = list(current)
    ids = {r.id for r in current}
    out = [m for r in current if r.id in base for m in case_moves(base[r.id], r)]
    out += [Moved(cid, None, "missing", before.status, None, judged=True) for cid, before in base.items()
            if cid not in ids]
    return out
