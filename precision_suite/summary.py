"""Text a user reads after a run: the summary table and the ``--fail-on`` verdicts."""

from __future__ import annotations

from .results import Results

__all__ = ["summary_table", "failed_checks", "describe_failure"]


def describe_failure(events, depth: int) -> str:
    """``overflow @ 4`` or ``survived 100``; a dead layer says whether underflow or exact zeros did it."""
    if events is None:
        return "-"
    f = events.failure
    if f is None:
        return f"survived {depth}"
    kind = f["kind"]
    if kind == "zero":
        kind = "dead (underflow)" if events.zero_cause == "underflow" else "dead (exact zeros)"
    return f"{kind} @ {f['layer']}"


def _warnings(events) -> str:
    if events is None:
        return ""
    out = []
    if events.first_subnormal is not None:
        out.append(f"subnormal@{events.first_subnormal}")
    if events.first_underflow_any is not None:
        out.append(f"underflow_any@{events.first_underflow_any}")
    return " ".join(out)


def summary_table(results: Results) -> str:
    rows = [("case", "forward", "backward", "warnings (fwd)")]
    for r in results.cases:
        if r.status != "ok":
            rows.append((r.id, r.status.upper(), "", r.error or ""))
            continue
        rows.append((r.id, describe_failure(r.forward.events, r.case.depth),
                     describe_failure(r.backward.events if r.backward else None, r.case.depth),
                     _warnings(r.forward.events)))
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    lines = [f"{a:<{widths[0]}}  {b:<{widths[1]}}  {c:<{widths[2]}}  {d}".rstrip() for a, b, c, d in rows]
    lines.insert(1, "-" * min(len(lines[0]) + 20, 160))
    ok = sum(r.status == "ok" for r in results.cases)
    failed = sum(r.status == "ok" and r.forward.events.failure is not None for r in results.cases)
    lines.append(f"{len(results.cases)} cases: {ok} ran, {failed} fail in the forward pass, "
                 f"{sum(r.status == 'error' for r in results.cases)} errors, "
                 f"{sum(r.status == 'skipped' for r in results.cases)} skipped")
    return "\n".join(lines)


def failed_checks(results: Results, fail_on: list[str]) -> list[str]:
    """One line per (case, event) that ``--fail-on`` names and the case has."""
    out = []
    for r in results.cases:
        if r.status != "ok":
            continue
        for item in fail_on:
            grad = item.startswith("grad_")
            events = r.backward.events if grad else r.forward.events
            if events is None:
                continue
            name = "first_" + (item[5:] if grad else item)
            layer = getattr(events, name)
            if layer is not None:
                out.append(f"{r.id}: {item} at layer {layer}")
    return out
