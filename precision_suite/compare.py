"""Regression checks: a run against a baseline run, or one run's cases against each other along an axis.

Cases are matched by id (old vs new machine, driver or library), or with ``across`` by every spec
field but one axis (cpu vs cuda, emulated vs native, torch vs numpy), so both are diffed alike.
What counts as moved is ``verdicts.case_moves``'s rule; here only the tolerance ``layers`` applies:
a judged event that moved by more than that many layers (or between a layer and never) is a
regression. Statistics that drifted beyond ``Tolerances`` are reported, and judged only when
``strict_stats``. Exit codes: 0 same, 1 regression, 2 bad input (``CompareError``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as _np

from .defaults import TOLERANCES
from .environment import flatten
from .keywords import strict_keywords
from .results import CaseResult, Results
from .verdicts import JUDGED_EVENTS, Moved, case_moves

__all__ = ["ACROSS_AXES", "CompareError", "Tolerances", "Drift", "Comparison", "compare", "parse_across",
           "render_text", "to_json", "verdict_line"]

ACROSS_AXES = ("device", "mode", "backend", "format")
_LOG2_STATS = ("rms", "amax")  # compared as log2: bits
_FRACTION_STATS = ("zero_frac", "underflow_frac", "flush_frac", "overflow_frac", "subnormal_frac", "nan_frac")
_DRIFT_LINES = 12  # the text table shows the first ones; --json has all
_TENSORS = {"forward": ("pre", "post"), "backward": ("grad", "grad_pre", "wgrad")}


class CompareError(ValueError):
    """Bad input to a comparison (no case matched, an unknown axis): one line, exit code 2."""


@strict_keywords
@dataclass(frozen=True)
class Tolerances:
    """``layers``: how far a judged event may move; ``bits``: drift of log2 rms/amax per layer;
    ``fraction``: drift of a fraction statistic (0.01 = one percentage point)."""

    layers: int = TOLERANCES["layers"]
    bits: float = TOLERANCES["bits"]
    fraction: float = TOLERANCES["fraction"]


@dataclass(frozen=True)
class Drift:
    """The largest drift of one statistic of a matched pair: ``amount`` in bits or fraction points."""

    case_id: str
    tensor: str
    stat: str
    layer: int
    before: float
    after: float
    amount: float
    unit: str


@dataclass(frozen=True)
class Comparison:
    baseline_label: str
    current_label: str
    across: str | None
    pairs: list[tuple[str, str]]  # (baseline case id, current case id) matched
    moved: list[Moved]  # judged and reported moves of matched cases (and missing ones)
    regressions: list[Moved]  # the judged moves beyond the tolerance
    drift: list[Drift]
    added: list[str]  # current cases with no baseline
    missing: list[str]  # baseline cases with no current
    env_diff: list[tuple[str, str, str]]  # (key, baseline value, current value)
    notes: list[str] = field(default_factory=list)
    strict_stats: bool = False

    @property
    def exit_code(self) -> int:
        return 1 if self.regressions or (self.strict_stats and self.drift) else 0


def parse_across(text: str) -> tuple[str, tuple[str, str] | None]:
    """``mode`` or ``mode=emulated:native`` -> (axis, (baseline value, current value) or None)."""
    axis, _, values = text.partition("=")
    axis = axis.strip()
    if axis not in ACROSS_AXES:
        raise CompareError(f"--across: unknown axis {axis!r}; valid: {', '.join(ACROSS_AXES)}")
    if not values:
        return axis, None
    a, sep, b = values.partition(":")
    if not sep or not a.strip() or not b.strip():
        raise CompareError(f"--across {text!r}: give the two values as AXIS=BASELINE:CURRENT, e.g. mode=emulated:native")
    return axis, (a.strip(), b.strip())


@strict_keywords
def compare(baseline: Results, current: Results, *, tolerances: Tolerances = Tolerances(), across: str | None = None,
            values: tuple[str, str] | None = None, strict_stats: bool = False) -> Comparison:
    """Diff ``current`` against ``baseline`` (the same Results twice with ``across`` for one file)."""
    if across is not None and across not in ACROSS_AXES:
        raise CompareError(f"across: unknown axis {across!r}; valid: {', '.join(ACROSS_AXES)}")
    if across is None:
        base, cur = baseline.by_id(), current.by_id()
        pairs = [(i, i) for i in cur if i in base]
        labels = ("baseline", "current")
        added = [i for i in cur if i not in base]
        missing = [i for i in base if i not in cur]
    else:
        pairs, labels, added, missing, base, cur = _match_across(baseline, current, across, values)
    if not pairs:
        hint = "" if across else "; to diff cases that differ in one axis (cpu vs cuda, emulated vs native) use --across AXIS"
        raise CompareError(f"no case of the current run matches one of the baseline ({len(cur)} vs {len(base)} cases)"
                           + hint)
    notes = []
    same_definitions = baseline.definitions == current.definitions
    if not same_definitions:
        notes.append(f"the underflow definition differs (baseline {baseline.definitions.get('underflow')!r}, current "
                     f"{current.definitions.get('underflow')!r}): underflow events are shown, not judged")
    moved, drift = [], []
    for b_id, c_id in pairs:
        b, c = base[b_id], cur[c_id]
        moved += case_moves(b, c)  # named by the current case's id
        drift += _drift(b, c, c_id, tolerances)
    moved += [Moved(i, None, "missing", base[i].status, None, judged=True) for i in missing if across is None]
    regressions = [m for m in moved if _is_regression(m, tolerances.layers, same_definitions)]
    env_diff = _env_diff(baseline, current, [(base[b], cur[c]) for b, c in pairs])
    if across is not None:
        notes.append(f"matched along {across}: {labels[0]} is the baseline, {labels[1]} the current side")
    return Comparison(labels[0], labels[1], across, pairs, moved, regressions, drift, added, missing, env_diff, notes,
                      strict_stats)


def _is_regression(m: Moved, layers: int, same_definitions: bool) -> bool:
    if not m.judged:
        return False
    if not same_definitions and (m.event == "first_underflow" or (
            m.event == "failure" and "underflow" in {(x or {}).get("kind") for x in (m.before, m.after)})):
        return False
    if m.event in JUDGED_EVENTS:
        return m.delta is None or abs(m.delta) > layers
    return True


def _match_across(baseline: Results, current: Results, axis: str, values):
    """Pairs of cases whose specs differ only in ``axis``: baseline side from ``baseline``, current
    side from ``current`` (the same file for a one-file comparison)."""
    def key(r: CaseResult) -> tuple:
        return tuple(sorted((k, str(v)) for k, v in r.case.to_dict().items() if k != axis))

    found = sorted({getattr(r.case, axis) for r in (*baseline.cases, *current.cases)})
    if values is None:
        if len(found) < 2:
            raise CompareError(f"--across {axis}: every case has {axis} {', '.join(found) or 'none'}: nothing to "
                               "compare along it (give a second file, or run with two values of the axis)")
        if len(found) > 2:
            raise CompareError(f"--across {axis}: the cases hold {len(found)} values ({', '.join(found)}); name the "
                               f"two to compare, e.g. --across {axis}={found[0]}:{found[1]}")
        values = (found[0], found[1])
    for v in values:
        if v not in found:
            raise CompareError(f"--across {axis}: no case has {axis} {v!r}; the cases hold {', '.join(found)}")
    base = {r.id: r for r in baseline.cases if getattr(r.case, axis) == values[0]}
    cur = {r.id: r for r in current.cases if getattr(r.case, axis) == values[1]}
    by_key = {key(r): i for i, r in base.items()}
    pairs = [(by_key[key(r)], i) for i, r in cur.items() if key(r) in by_key]
    matched_base = {b for b, _ in pairs}
    added = [i for i, _ in cur.items() if i not in {c for _, c in pairs}]
    missing = [i for i in base if i not in matched_base]
    return pairs, (f"{axis}={values[0]}", f"{axis}={values[1]}"), added, missing, base, cur


def _drift(b: CaseResult, c: CaseResult, case_id: str, tol: Tolerances) -> list[Drift]:
    """Per tensor and statistic, the layer of largest drift when it exceeds the tolerance, over the
    layers before either run's failure of that pass (after an overflow the numbers are inf/NaN
    debris, and the failure itself is judged as an event)."""
    if b.status != "ok" or c.status != "ok":
        return []
    out = []
    for direction, tensors in _TENSORS.items():
        old, new = getattr(b, direction), getattr(c, direction)
        if old is None or new is None:
            continue
        failed = [e.failure["layer"] for e in (old.events, new.events) if e.failure]
        intact = _intact_layers(direction, failed, b.case.depth)
        for tensor in tensors:
            so, sn = getattr(old, tensor), getattr(new, tensor)
            for stat in (*_LOG2_STATS, *_FRACTION_STATS):
                x, y = so.get(stat), sn.get(stat)
                if x is None or y is None or len(x) != len(y) or not len(x):
                    continue
                x, y = _np.asarray(x, dtype=_np.float64), _np.asarray(y, dtype=_np.float64)
                log2 = stat in _LOG2_STATS
                with _np.errstate(divide="ignore", invalid="ignore"):
                    d = _np.abs(_np.log2(_np.abs(y)) - _np.log2(_np.abs(x))) if log2 else _np.abs(y - x)
                d = _np.where(_np.isfinite(d) & intact, d, 0.0)  # a stat that went non-finite shows as an event
                i = int(_np.argmax(d))
                if d[i] > (tol.bits if log2 else tol.fraction):
                    out.append(Drift(case_id, tensor, stat, i + 1, float(x[i]), float(y[i]), float(d[i]),
                                     "bits" if log2 else "fraction"))
    return out


def _intact_layers(direction: str, failed: list[int], depth: int) -> _np.ndarray:
    """Mask of layers 1..depth before the earliest failure: forward below it, backward above it."""
    layers = _np.arange(1, depth + 1)
    if not failed:
        return _np.ones(depth, dtype=bool)
    return layers < min(failed) if direction == "forward" else layers > max(failed)


def _env_diff(baseline: Results, current: Results, pairs: list[tuple[CaseResult, CaseResult]]):
    """Environment fields that differ between the machines that ran matched cases."""
    seen, out = set(), []
    for b, c in pairs:
        envs = (b.environment, c.environment)
        if envs in seen:
            continue
        seen.add(envs)
        ea = flatten(_env(baseline, b.environment))
        eb = flatten(_env(current, c.environment))
        out += [(k, ea.get(k, "—"), eb.get(k, "—")) for k in sorted(set(ea) | set(eb))
                if ea.get(k) != eb.get(k) and (k, ea.get(k, "—"), eb.get(k, "—")) not in out]
    return out


def _env(results: Results, index: int) -> dict:
    return results.environments[index] if 0 <= index < len(results.environments) else {}


# ---------------------------------------------------------------- output

def _value(v) -> str:
    if v is None:
        return "never"
    if isinstance(v, dict):
        return f"{v['kind']} @ {v['layer']}"
    return str(v)


def render_text(c: Comparison) -> str:
    """The readable table: regressions first, then what is only reported, drift, added/missing, environment."""
    lines = [f"compared {len(c.pairs)} case pairs ({c.baseline_label} -> {c.current_label})"]
    lines += [f"note: {n}" for n in c.notes]
    rows = [(m.case_id, m.direction or "", m.event, _value(m.before), _value(m.after),
             "" if m.delta is None else f"{m.delta:+d}", "REGRESSION" if m in c.regressions else "reported")
            for m in sorted(c.moved, key=lambda m: (m not in c.regressions, m.case_id))]
    if rows:
        head = ("case", "pass", "event", c.baseline_label, c.current_label, "moved", "")
        widths = [max(len(r[i]) for r in (head, *rows)) for i in range(len(head))]
        lines.append("")
        lines += ["  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip() for r in (head, *rows)]
    if c.drift:
        lines.append("")
        lines.append(f"statistics that drifted beyond tolerance ({'judged' if c.strict_stats else 'reported'}):")
        lines += [f"  {d.case_id} {d.tensor}.{d.stat} layer {d.layer}: {d.before:.4g} -> {d.after:.4g} "
                  f"({d.amount:.3g} {d.unit})" for d in c.drift[:_DRIFT_LINES]]
        if len(c.drift) > _DRIFT_LINES:
            lines.append(f"  ... and {len(c.drift) - _DRIFT_LINES} more (--json lists every one)")
    for title, ids in (("only in the current run", c.added), ("only in the baseline", c.missing)):
        if ids:
            lines.append(f"{len(ids)} {title}: {', '.join(ids[:10])}{' ...' if len(ids) > 10 else ''}")
    if c.env_diff:
        lines.append("")
        lines.append("environment fields that differ:")
        width = max(len(k) for k, _, _ in c.env_diff)
        lines += [f"  {k.ljust(width)}  {a}  ->  {b}" for k, a, b in c.env_diff]
    lines.append("")
    lines.append(verdict_line(c))
    return "\n".join(lines)


def verdict_line(c: Comparison) -> str:
    """The last line of ``render_text``, also what the pytest plugin's summary says of a baseline."""
    moved_cases = len({m.case_id for m in c.regressions})
    verdict = (f"REGRESSION: {len(c.regressions)} events moved in {moved_cases} cases" if c.regressions
               else "no judged event moved")
    if c.strict_stats and c.drift:
        verdict += f"; {len(c.drift)} statistics drifted (--strict-stats)"
    return verdict


def to_json(c: Comparison) -> dict:
    """The machine-readable form: verdict, moved, drift, added, missing, env_diff."""
    def moved(m: Moved) -> dict:
        return {"case": m.case_id, "direction": m.direction, "event": m.event, "before": m.before, "after": m.after,
                "delta": m.delta, "judged": m.judged, "regression": m in c.regressions}

    return {"verdict": "regression" if c.exit_code else "same", "exit_code": c.exit_code,
            "baseline": c.baseline_label, "current": c.current_label, "across": c.across, "pairs": len(c.pairs),
            "moved": [moved(m) for m in c.moved],
            "drift": [{"case": d.case_id, "tensor": d.tensor, "stat": d.stat, "layer": d.layer,
                       "before": _finite_or_none(d.before), "after": _finite_or_none(d.after),
                       "amount": d.amount, "unit": d.unit} for d in c.drift],
            "added": c.added, "missing": c.missing,
            "env_diff": [{"key": k, "baseline": a, "current": b} for k, a, b in c.env_diff], "notes": c.notes}


def _finite_or_none(v: float) -> float | None:
    return v if math.isfinite(v) else None
