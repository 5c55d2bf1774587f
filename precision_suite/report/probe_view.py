"""How the report shows probe cases (docs/probe.md): they are not chains, so they get their own
heatmaps, summary sentences and per-module section.

* ``probe_groups``: one heatmap per model and input shape, a row per mode, a column per format
  (and device), each cell the case's failure and the op where it happened; no "across inits"
  chart (ops of different modes do not line up);
* ``probe_verdicts``: a summary sentence per model and input shape;
* ``probe_view``: a case's per-module section, one bar per module, log2 amax and log2 rms of its
  ops' outputs against the format's bands (smallest subnormal .. T_of), the failing module marked.
  Per module: amax = the largest amax of its layers, rms = the largest rms (forward). Bars are
  placed in percent of the band [log2 smallest_subnormal, log2 T_of] of the case's format.
"""

from __future__ import annotations

import math

import numpy as _np

from ..formats import get_format

__all__ = ["is_probe", "probe_groups", "probe_verdicts", "probe_view", "failing_site", "least_headroom_text"]

_MODE_ORDER = {"emulated": 0, "autocast": 1, "native": 2}


def is_probe(r) -> bool:
    """A probe case (its spec names a model) rather than a chain."""
    return hasattr(r.case, "model")


def failing_site(r) -> dict | None:
    """The event site of the case's failure: ``{layer, name, value, headroom_bits, ...}``."""
    if not r.probe or not r.failure:
        return None
    key = ("grad_" if r.failure["direction"] == "backward" else "") + "first_" + r.failure["kind"]
    return r.probe.get("event_sites", {}).get(key)


def least_headroom_text(r) -> str | None:
    """``-2.0 bits at layer 6 (self_attn:bmm, forward)``."""
    lh = (r.probe or {}).get("least_headroom")
    if lh is None:
        return None
    what = "" if lh.get("tensor", "out") == "out" else f" {lh['tensor']}"
    return f"{lh['bits']:+.1f} bits at layer {lh['layer']} ({lh['name']}{what}, {lh['side']})"


def _model_label(c) -> str:
    return f"{c.model} · input {c.input_shape}"


def probe_groups(cases: list, case_index: dict, cell, first_anchor: int) -> list:
    """Heatmap groups of probe cases, shaped as the chain groups the template renders: one per model
    and input shape (and seed, threshold, loss scale where they vary), rows = mode, columns =
    format (/ device). ``cell(index, result, None)`` builds a chain cell, which is relabelled here."""
    groups: dict[tuple, list] = {}
    extra = [a for a in ("seed", "underflow_threshold", "loss_scale") if len({getattr(r.case, a) for r in cases}) > 1]
    for r in cases:
        groups.setdefault((r.case.model, r.case.input_shape, *(getattr(r.case, a) for a in extra)), []).append(r)
    devices = len({r.case.device for r in cases}) > 1
    out = []
    for gi, members in enumerate(groups.values()):
        c0 = members[0].case
        title = " · ".join([_model_label(c0), *(f"{a.replace('_', ' ')} {getattr(c0, a):g}" for a in extra)])
        col_of = lambda r: (r.case.format, r.case.device) if devices else (r.case.format,)  # noqa: E731
        cols = list(dict.fromkeys(col_of(r) for r in sorted(members, key=lambda r: _format_rank(r.case.format))))
        modes = sorted({r.case.mode for r in members}, key=lambda m: _MODE_ORDER.get(m, 9))
        table = {(r.case.mode, col_of(r)): r for r in members}
        rows = [{"init": mode, "cells": [_probe_cell(cell, case_index, table.get((mode, ck))) for ck in cols]}
                for mode in modes]
        columns = [{"label": " / ".join(ck), "format": ck[0]} for ck in cols]
        verdicts = [_column_sentence(c0.model, col["label"], [(row["init"], row["cells"][i]) for row in rows])
                    for i, col in enumerate(columns)]
        out.append({"anchor": f"group-{first_anchor + gi}", "title": title, "row_axis": "mode", "columns": columns,
                    "rows": rows, "verdicts": [v for v in verdicts if v], "comparisons": []})
    return out


def _format_rank(name: str) -> int:
    from ..formats import FORMATS

    return list(FORMATS).index(name) if name in FORMATS else 99


def _probe_cell(cell, case_index: dict, r) -> dict | None:
    """The chain cell, with the op of the failure where theory's line was."""
    if r is None:
        return None
    c = cell(case_index[id(r)], r, None)
    site = failing_site(r)
    c["theory"], c["theory_title"] = None, ""
    c["other"] = f"at {site['name']}" if site else ""
    return c


def _column_sentence(model: str, label: str, cells: list) -> str:
    """``encoder in fp16: emulated fails (overflow @ 6 at self_attn:bmm); autocast, native survive.``"""
    ran = [(mode, c) for mode, c in cells if c is not None and c["kind"] not in ("error", "skipped")]
    not_run = [mode for mode, c in cells if c is not None and c["kind"] in ("error", "skipped")]
    failing = [f"{mode} fails ({c['label']}{' ' + c['other'] if c['other'] else ''})" for mode, c in ran
               if c["kind"] != "survived"]
    survive = [mode for mode, c in ran if c["kind"] == "survived"]
    parts = failing + ([f"{', '.join(survive)} survive{'s' if len(survive) == 1 else ''}"] if survive else []) \
        + ([f"{', '.join(not_run)} did not run"] if not_run else [])
    return f"{model} in {label}: {'; '.join(parts)}." if parts else ""


def probe_verdicts(cases: list) -> list:
    """Summary sentences, one per model and input shape: which format x mode fails first, where."""
    by_model: dict[str, list] = {}
    for r in cases:
        by_model.setdefault(_model_label(r.case), []).append(r)
    out = []
    for label, members in by_model.items():
        ran = [r for r in members if r.status == "ok" and r.forward is not None]
        failing = [r for r in ran if r.failure]
        named = lambda r: f"{r.case.format} {r.case.mode}"  # noqa: E731
        if not ran:
            sentence = f"no case ran ({len(members)} errors or skips)."
        elif not failing:
            sentence = f"all {len(ran)} format × mode cases survive, forward and backward."
        else:
            from ..summary import describe_case_failure

            parts = []
            for r in failing:
                site = failing_site(r)
                parts.append(f"{named(r)} ({describe_case_failure(r)}{' at ' + site['name'] if site else ''})")
            sentence = f"{len(failing)} of {len(ran)} cases fail: {', '.join(parts)}."
            safe = [named(r) for r in ran if not r.failure]
            if safe:
                sentence += f" Survive: {', '.join(safe)}."
        if len(ran) < len(members):
            sentence += f" {len(members) - len(ran)} did not run."
        out.append({"format": label, "sentence": sentence, "failing": len(failing), "ran": len(ran)})
    return out


def _pct(v: float, lo: float, hi: float) -> float:
    return round(min(max((v - lo) / (hi - lo) * 100, 0.0), 100.0), 1)


def _largest(values: _np.ndarray) -> float:
    """The largest non-NaN value (inf included), NaN when every value is NaN."""
    kept = values[~_np.isnan(values)]
    return float(kept.max()) if kept.size else math.nan


def probe_view(r) -> dict | None:
    """None for a chain case; else {"modules": [...], "sites": [...], "band": {...}}."""
    if not r.probe or r.forward is None:
        return None
    fmt = get_format(r.case.format)
    lo, hi = math.log2(fmt.smallest_subnormal), math.log2(fmt.overflow_threshold)
    names = r.probe["layer_names"]
    amax = _np.asarray(r.forward.post["amax"], dtype=float)
    rms = _np.asarray(r.forward.post["rms"], dtype=float)
    failing = None
    if r.failure:
        site = failing_site(r)
        failing = site["name"].split(":")[0] if site else names[r.failure["layer"] - 1].split(":")[0]
    modules: dict[str, list[int]] = {}
    for i, n in enumerate(names):
        modules.setdefault(n.split(":")[0], []).append(i)
    rows = []
    for module, idx in modules.items():
        a, s = _largest(_np.abs(amax[idx])), _largest(rms[idx])
        la = hi if not _np.isfinite(a) else (math.log2(a) if a > 0 else lo)
        ls = hi if not _np.isfinite(s) else (math.log2(s) if s > 0 else lo)
        rows.append({"module": module, "ops": ", ".join(dict.fromkeys(names[i].split(":")[1] for i in idx)),
                     "layers": f"{idx[0] + 1}–{idx[-1] + 1}" if len(idx) > 1 else str(idx[0] + 1),
                     "amax": f"{a:.3g}", "rms": f"{s:.3g}", "amax_pct": _pct(la, lo, hi), "rms_pct": _pct(ls, lo, hi),
                     "failing": module == failing})
    sites = [{"event": k, "layer": v["layer"], "name": v["name"], "value": f"{v['value']:.4g}" if v["value"] is not None
              else "—", "bits": "—" if v["headroom_bits"] is None else f"{v['headroom_bits']:+.1f}"}
             for k, v in r.probe.get("event_sites", {}).items()]
    return {"modules": rows, "sites": sites, "format": fmt.name,
            "normal_pct": _pct(math.log2(fmt.smallest_normal), lo, hi), "max_pct": _pct(math.log2(fmt.max), lo, hi),
            "least": least_headroom_text(r)}
