"""Text a user reads after a run: the summary table (verdicts from ``verdicts``)."""

from __future__ import annotations

from .results import Results
from .verdicts import backend_disagreements, count_cases

__all__ = ["summary_table", "describe_failure", "describe_case_failure"]


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


def describe_case_failure(result) -> str:
    """The case's failure, ``∇`` before a backward one: ``∇ overflow @ 12``, ``nan @ 3``, ``survived 100``."""
    f = result.failure
    if f is None:
        return f"survived {result.case.depth}"
    backward = f["direction"] == "backward"
    text = describe_failure(result.backward.events if backward else result.forward.events, result.case.depth)
    return ("∇ " if backward else "") + text


def _warnings(events) -> str:
    if events is None:
        return ""
    out = []
    if events.first_subnormal is not None:
        out.append(f"subnormal@{events.first_subnormal}")
    if events.first_underflow_any is not None:
        out.append(f"underflow_any@{events.first_underflow_any}")
    if events.first_flush is not None:
        out.append(f"flush@{events.first_flush}")
    return " ".join(out)


def summary_table(results: Results) -> str:
    """One row per case (its failure first, then each pass), a footer with the counts.

    A case whose twin on the other backend (same spec) fails its passes differently is flagged
    ``≠ numpy`` / ``≠ torch``."""
    disagree = backend_disagreements(results.cases)
    twins = {r.id: r.case.backend for r in results.cases}
    rows = [("case", "fails first", "forward", "backward", "warnings (fwd)")]
    for r in results.cases:
        if r.status != "ok":
            rows.append((r.id, r.status.upper(), "", "", r.error or r.skip_reason or ""))
            continue
        flag = f"≠ {twins[disagree[r.id]]}" if r.id in disagree else ""
        rows.append((r.id, describe_case_failure(r), describe_failure(r.forward.events, r.case.depth),
                     describe_failure(r.backward.events if r.backward else None, r.case.depth),
                     " ".join(w for w in (flag, _warnings(r.forward.events)) if w)))
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    lines = ["  ".join(f"{v:<{w}}" for v, w in zip(row, widths)) + f"  {row[4]}" for row in rows]
    lines = [line.rstrip() for line in lines]
    lines.insert(1, "-" * min(len(lines[0]) + 20, 160))
    n = count_cases(results.cases)
    footer = (f"{n.total} cases: {n.ran} ran, {n.failing} fail ({n.forward} forward, {n.backward} backward first), "
              f"{n.errors} errors, {n.skipped} skipped")
    if disagree:
        pairs = len(disagree) // 2
        footer += f"; {pairs} torch/numpy pair{'s' if pairs != 1 else ''} disagree (≠)"
    lines.append(footer)
    return "\n".join(lines)
