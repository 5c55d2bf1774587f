"""Results -> a JSON-ready view of the report: what the templates print and what the charts draw.

Two parts, like pytest-html's ``report_data``: ``view`` (plain dicts, lists, strings and numbers the
jinja2 template renders, every string escaped there) and ``charts`` (one blob of per-layer series,
inlined into the page as escaped JSON for the vendored chart library). Charts plot log2 |value|:
one unit is one binade, so the distance to a format's band is headroom in bits.

Labels and layout only: what fails, what theory predicts and what moved against a baseline are
``verdicts``' decisions.
"""

from __future__ import annotations

import math
import re
from collections import defaultdict

import numpy as _np

from ..environment import flatten
from ..formats import get_format
from ..results import CaseResult, Results
from ..spec import Case
from ..stats import EVENT_NAMES
from ..summary import describe_case_failure, describe_failure
from ..verdicts import TheoryVerdict, backend_disagreements, count_cases, layers_survived, theory_verdict
from .probe_view import is_probe, least_headroom_text, probe_groups, probe_verdicts, probe_view
from .scaled_view import (flush_text, format_rank, is_scaled, quant_charts, quant_view, recipe_short, recipe_text,
                          recipes_view, scale_range_text, scaling_of)

__all__ = ["diff_results", "headroom", "report_data"]

# spec fields that pick a heatmap column (the rest, except init, pick the heatmap's group)
_COLUMN_AXES = ("format", "device", "mode", "backend")
_GROUP_AXES = ("activation", "norm", "residual", "input", "bias", "width", "depth", "batch", "seed",
               "underflow_threshold", "loss_scale")
_EVENT_LABELS = {
    "first_overflow": "overflow", "first_nan": "NaN", "first_zero": "dead (all zero)",
    "first_underflow": "underflow ≥ threshold", "first_underflow_any": "first underflowed element",
    "first_subnormal": "subnormal ≥ threshold", "first_flush": "quantized input flushed ≥ threshold",
}
_KIND_LABEL = {"overflow": "overflow", "nan": "NaN", "zero": "dead", "underflow": "underflow"}
# per-layer statistics drawn on the range charts, and the fractions drawn under them
_RANGE_STATS = ("rms", "amax", "amin_nonzero")
_DRIFT_ROWS = 50  # the diff section lists the first drifted statistics; `compare --json` has all
_FRACTION_STATS = ("underflow_frac", "flush_frac", "subnormal_frac", "zero_frac")
_SHORT_STAT = {"rms": "rms", "amax": "amax", "amin_nonzero": "amin", "underflow_frac": "underflow",
               "flush_frac": "flushed", "subnormal_frac": "subnormal", "zero_frac": "zero"}
_LOSS_SCALE_KEYS = (("max_safe_scale", "largest safe scale"), ("min_useful_scale", "smallest useful scale"),
                    ("recommended", "recommended"), ("gradscaler_backoffs", "GradScaler back-offs from 2^16"))


# ---------------------------------------------------------------- small formatting helpers

def _anchor(case_id: str) -> str:
    """An HTML id from a case id: letters, digits, ``-``, ``_`` and ``.`` only."""
    return "case-" + re.sub(r"[^A-Za-z0-9_.-]+", "_", case_id)


def _finite(v) -> bool:
    return v is not None and isinstance(v, (int, float, _np.floating)) and math.isfinite(v)


def _fmt_num(v) -> str:
    if v is None:
        return "n/a"
    v = float(v)
    if math.isnan(v):
        return "NaN"
    if math.isinf(v):
        return "∞" if v > 0 else "−∞"
    return f"{v:.4g}"


def _fmt_scale(v) -> str:
    """A loss scale as ``2^k (value)`` when it is a power of two; null (no bound / none fits) as a dash."""
    if v is None:
        return "—"
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return str(v)
    if not math.isfinite(v) or v <= 0:
        return _fmt_num(v)
    k = math.log2(v)
    if k == round(k):
        return f"2^{int(k)} ({v:g})"
    return f"{v:g}"


def _log2_list(values, decimals: int = 2) -> list:
    """log2 |v| per layer, rounded; zero, inf and NaN become null (a gap in the line)."""
    a = _np.abs(_np.asarray(values, dtype=_np.float64))
    with _np.errstate(divide="ignore", invalid="ignore"):
        lg = _np.log2(a)
    ok = _np.isfinite(lg)
    out = _np.round(lg, decimals).tolist()
    return [x if k else None for x, k in zip(out, ok.tolist())]


def _frac_list(values) -> list:
    a = _np.asarray(values, dtype=_np.float64)
    ok = _np.isfinite(a)
    out = _np.round(a, 5).tolist()
    return [x if k else None for x, k in zip(out, ok.tolist())]


def _plain(obj):
    """Any JSON-ish tree with numpy scalars and non-finite floats -> strict-JSON-safe plain values."""
    if isinstance(obj, dict):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, _np.ndarray)):
        if isinstance(obj, list) and _plain_numbers(obj):  # a chart's series (``_log2_list``): as it is
            return obj
        return [_plain(v) for v in obj]
    if isinstance(obj, (bool, _np.bool_)):
        return bool(obj)
    if isinstance(obj, (int, _np.integer)):
        return int(obj)
    if isinstance(obj, (float, _np.floating)):
        return float(obj) if math.isfinite(obj) else None
    return obj


def _plain_numbers(values: list) -> bool:
    """Is every item None or a finite Python float (not a subclass: numpy's float64 is one)?"""
    kinds = set(map(type, values))
    if not kinds <= {float, type(None)}:
        return False
    return float not in kinds or math.isfinite(sum(v for v in values if v is not None))


# ---------------------------------------------------------------- formats

def _format_view(name: str) -> dict:
    """The band values of one format, in its units and as log2 (from finfo via ``formats``)."""
    f = get_format(name)
    t_of = f.overflow_threshold
    return {"name": f.name, "max": f.max, "smallest_normal": f.smallest_normal,
            "smallest_subnormal": f.smallest_subnormal, "overflow_threshold": t_of if math.isfinite(t_of) else None,
            "log2_max": math.log2(f.max), "log2_normal": math.log2(f.smallest_normal),
            "log2_subnormal": math.log2(f.smallest_subnormal),
            "log2_overflow": math.log2(t_of) if math.isfinite(t_of) else None,
            "has_wider": f.has_wider}


# ---------------------------------------------------------------- theory, headroom, loss scale

def _theory_text(th: TheoryVerdict) -> str:
    """``overflow @ 7``, ``survives`` or ``no prediction``."""
    if th.status != "prediction":
        return "no prediction"
    return "survives" if th.layer is None else f"{_KIND_LABEL[th.kind]} @ {th.layer}"


def headroom(tensors: dict, fmt_name: str) -> dict:
    """Tightest headroom in bits over layers and tensors: ``log2(T_of / amax)`` above,
    ``log2(amin_nonzero / smallest_subnormal)`` below. ``tensors`` maps a name (pre, post, ...)
    to its statistics columns. Negative overflow headroom or ``amax`` = inf/NaN means overflowed."""
    f = get_format(fmt_name)
    t_of = f.overflow_threshold
    out = {}
    top = None  # (bits, layer, tensor)
    bottom = None
    for name, stats in tensors.items():
        if not stats:
            continue
        amax = stats.get("amax")
        if amax is not None and math.isfinite(t_of):
            a = _np.asarray(amax, dtype=_np.float64)
            with _np.errstate(divide="ignore", invalid="ignore"):
                bits = _np.where(_np.isfinite(a), math.log2(t_of) - _np.log2(a), -_np.inf)
            bits = _np.where(_np.isnan(bits), _np.inf, bits)  # amax 0 -> nothing to overflow
            i = int(_np.argmin(bits))
            if top is None or bits[i] < top[0]:
                top = (float(bits[i]), i + 1, name)
        amin = stats.get("amin_nonzero")
        if amin is not None:
            a = _np.asarray(amin, dtype=_np.float64)
            good = _np.isfinite(a) & (a > 0)
            if good.any():
                bits = _np.full(a.shape, _np.inf)
                bits[good] = _np.log2(a[good]) - math.log2(f.smallest_subnormal)  # the ratio overflows in fp64
                i = int(_np.argmin(bits))
                if bottom is None or bits[i] < bottom[0]:
                    bottom = (float(bits[i]), i + 1, name)
    if not math.isfinite(t_of):
        out["overflow"] = {"text": f"n/a ({f.name} has no wider format to overflow into)", "bits": None}
    elif top is None:
        out["overflow"] = {"text": "n/a", "bits": None}
    elif not math.isfinite(top[0]):
        out["overflow"] = {"text": f"none left: overflowed at layer {top[1]} ({top[2]})", "bits": top[0],
                           "layer": top[1]}
    else:
        out["overflow"] = {"text": f"{top[0]:+.1f} bits at layer {top[1]} ({top[2]})", "bits": top[0], "layer": top[1]}
    if bottom is None:
        out["underflow"] = {"text": "n/a (no nonzero values)", "bits": None}
    else:
        out["underflow"] = {"text": f"{bottom[0]:+.1f} bits at layer {bottom[1]} ({bottom[2]})", "bits": bottom[0],
                            "layer": bottom[1]}
    return out


def _loss_scale_view(backward, case: Case) -> dict:
    if backward is None:
        return {"status": "none", "text": "forward pass only (--no-backward): no gradients, no advice"}
    ls = backward.loss_scale
    if not ls:
        return {"status": "none", "text": "no loss-scale advice in these results"}
    rows = [(label, _fmt_scale(ls.get(key)) if key != "gradscaler_backoffs" else
             ("—" if ls.get(key) is None else str(ls.get(key))))
            for key, label in _LOSS_SCALE_KEYS if key in ls]
    known = {k for k, _ in _LOSS_SCALE_KEYS} | {"verdict"}
    rows += [(k.replace("_", " "), str(v)) for k, v in ls.items() if k not in known]
    return {"status": "advice", "rows": rows, "verdict": ls.get("verdict") or "",
            "applied": _fmt_scale(case.loss_scale) if case.loss_scale != 1.0 else None}


# ---------------------------------------------------------------- per case

def _event_text(layer) -> str:
    return "—" if layer is None else str(layer)


def _events_rows(r: CaseResult, fwd_theory: TheoryVerdict, bwd_theory: TheoryVerdict) -> list:
    """Rows (event, forward, theory forward, backward, theory backward) for the case's events table."""
    rows = []
    fe = r.forward.events
    be = r.backward.events if r.backward else None
    for name in EVENT_NAMES:
        if name == "first_flush" and r.forward.gemm_in is None:
            continue  # only scaled formats quantize their matmul inputs
        row = {"event": _EVENT_LABELS[name], "forward": _event_text(getattr(fe, name)),
               "backward": "n/a" if be is None else _event_text(getattr(be, name))}
        for col, th in (("theory_forward", fwd_theory), ("theory_backward", bwd_theory)):
            if th.status != "prediction" or name not in th.events:
                row[col] = ""
            else:
                v = th.events[name]
                row[col] = "never" if v is None else str(int(v))
        rows.append(row)
    return rows


def _series(stats: dict, names, transform, input_stats: dict | None = None) -> dict:
    """``{"post.rms": [...], ...}`` per tensor and statistic. With ``input_stats`` every series
    starts at x = 0, the input: its value for post (x_0 is layer 0's output), a gap for pre."""
    out = {}
    for tensor, cols in stats.items():
        for stat in names:
            v = (cols or {}).get(stat)
            if v is None:  # not available (fp64 has no wider format)
                continue
            values = transform(v)
            if input_stats is not None:
                iv = input_stats.get(stat) if tensor == "post" else None
                values = [None if iv is None else transform([iv])[0], *values]
            out[f"{tensor}.{_SHORT_STAT[stat]}"] = values
    return out


def _theory_curves(block, of: str) -> dict:
    """Per-layer lists inside a theory block as log2 series keyed by their legend label.

    theory.py's ``rms`` is sqrt(q_l), the predicted rms of ``pre`` forward and of the gradient
    w.r.t. pre (``grad_pre``) backward; any other per-layer list is drawn under its own name.
    """
    if not isinstance(block, dict) or not block.get("applicable", True):
        return {}
    return {(f"theory rms ({of})" if k == "rms" else "theory " + k.replace("_", " ")):
            _log2_list([_np.nan if x is None else x for x in v]) for k, v in block.items()
            if isinstance(v, list) and v and all(x is None or isinstance(x, (int, float)) for x in v)}


def _case_charts(r: CaseResult, fwd_theory: TheoryVerdict, bwd_theory: TheoryVerdict) -> dict:
    """The per-layer series of one case. Forward series have depth + 1 points: x = 0 is the input."""
    c = r.case
    out = {"id": r.id, "fmt": c.format, "depth": c.depth, "thr": c.underflow_threshold}
    if r.forward is None:
        return out
    fw = {"pre": r.forward.pre, "post": r.forward.post}
    out["f"] = _series(fw, _RANGE_STATS, _log2_list, input_stats=r.forward.input or {})
    out["ff"] = _series(fw, _FRACTION_STATS, _frac_list, input_stats=r.forward.input or {})
    markers = []
    if r.forward.events.failure:
        markers.append({"x": r.forward.events.failure["layer"], "label": _KIND_LABEL[r.forward.events.failure["kind"]],
                        "kind": "measured"})
    if fwd_theory.layer is not None:
        markers.append({"x": fwd_theory.layer, "label": "theory " + _KIND_LABEL[fwd_theory.kind], "kind": "theory"})
    out["fm"] = markers
    if is_scaled(r):  # the quantized matmul inputs (scaled formats only)
        out.update(quant_charts(r))
    if r.theory and r.theory.get("applicable"):
        out["ft"] = _theory_curves(r.theory, "pre")
    if r.backward is not None:
        bw = {"grad": r.backward.grad, "grad_pre": r.backward.grad_pre, "wgrad": r.backward.wgrad}
        out["b"] = _series(bw, _RANGE_STATS, _log2_list)
        out["bf"] = _series(bw, _FRACTION_STATS, _frac_list)
        markers = []
        if r.backward.events.failure:
            markers.append({"x": r.backward.events.failure["layer"],
                            "label": _KIND_LABEL[r.backward.events.failure["kind"]], "kind": "measured"})
        if bwd_theory.layer is not None:
            markers.append({"x": bwd_theory.layer, "label": "theory " + _KIND_LABEL[bwd_theory.kind], "kind": "theory"})
        out["bm"] = markers
        if r.theory and r.theory.get("applicable"):
            out["bt"] = _theory_curves(r.theory.get("backward"), "grad pre")
    return out


def _spec_rows(c: Case) -> list:
    rows = [("init", c.init), ("activation", c.activation), ("format", c.format), ("device", c.device),
            ("mode", c.mode), ("backend", c.backend), ("width", str(c.width)), ("depth", str(c.depth)),
            ("batch", str(c.batch)), ("seed", str(c.seed)), ("input", c.input), ("norm", c.norm),
            ("residual", "off" if c.residual is None else f"alpha = {c.residual:g}"), ("bias", "on" if c.bias else "off"),
            ("underflow threshold", f"{c.underflow_threshold:g}")]
    if c.loss_scale != 1.0:
        rows.append(("loss scale applied", _fmt_scale(c.loss_scale)))
    return rows


def _cell_colour(r: CaseResult) -> str:
    """Background by depth survived in either direction (``verdicts.layers_survived``): red (dies at
    once) through amber to green (survives the depth)."""
    s = layers_survived(r)
    if s is None:
        return "hsl(0, 0%, 85%)"
    if s >= r.case.depth:
        return "hsl(130, 50%, 80%)"
    frac = s / r.case.depth
    return f"hsl({round(4 + 44 * frac)}, {round(85 - 10 * frac)}%, {round(68 + 12 * frac)}%)"


def _machine(environments: tuple, index: int) -> str:
    """``[1] NVIDIA H100 · torch 2.13.0`` (or the CPU): which machine of a merged file ran a case."""
    env = environments[index] if 0 <= index < len(environments) else {}
    where = (env.get("cuda") or {}).get("device") or env.get("cpu") or "unknown machine"
    return f"[{index}] {where} · torch {env.get('torch', '?')}"


def _case_view(index: int, r: CaseResult, environments: tuple) -> dict:
    c = r.case
    fwd_theory = theory_verdict(r.theory, "forward")
    bwd_theory = theory_verdict(r.theory, "backward")
    rows = c.spec_rows() if hasattr(c, "spec_rows") else _spec_rows(c)  # a probe case describes itself
    spec = rows + ([("ran on", _machine(environments, r.environment))] if len(environments) > 1 else [])
    v = {"index": index, "id": r.id, "anchor": _anchor(r.id), "status": r.status, "error": r.error,
         "skip_reason": r.skip_reason, "seconds": f"{r.seconds:.2f}", "spec": spec,
         "format": _format_view(c.format), "theory": _theory_view(fwd_theory), "theory_backward": _theory_view(bwd_theory),
         "depth": c.depth}
    if r.status != "ok" or r.forward is None:
        v.update(failure_text=r.status, forward_text="", backward_text="", failing=r.status == "error",
                 has_backward=False)
        return v
    v["failure_text"] = describe_case_failure(r)
    v["forward_text"] = describe_failure(r.forward.events, c.depth)
    v["failing"] = r.failure is not None
    v["has_backward"] = r.backward is not None
    v["backward_text"] = describe_failure(r.backward.events, c.depth) if r.backward else ""
    v["events"] = _events_rows(r, fwd_theory, bwd_theory)
    warn = []
    if r.forward.events.first_subnormal is not None:
        warn.append(f"subnormal fraction ≥ {c.underflow_threshold:g} from layer {r.forward.events.first_subnormal}")
    if r.forward.events.first_underflow_any is not None:
        warn.append(f"first underflowed element at layer {r.forward.events.first_underflow_any}")
    if r.forward.events.first_flush is not None:
        warn.append(f"quantized matmul input flushed ≥ {c.underflow_threshold:g} from layer {r.forward.events.first_flush}")
    if r.backward is not None and r.backward.events.first_flush is not None:
        warn.append(f"quantized gradient flushed ≥ {c.underflow_threshold:g} at layer {r.backward.events.first_flush}"
                    " (backward)")
    v["warnings"] = warn
    v["quant"] = quant_view(r)
    v["headroom"] = headroom({"pre": r.forward.pre, "post": r.forward.post}, c.format)
    if r.backward is not None:
        v["headroom_backward"] = headroom({"grad": r.backward.grad, "grad_pre": r.backward.grad_pre,
                                           "wgrad": r.backward.wgrad}, c.format)
    v["loss_scale"] = _loss_scale_view(r.backward, c)
    v["probe"] = probe_view(r)
    if v["probe"] is not None:  # the probe's one figure (exact values, both passes) replaces the rounded amax's
        v["least_headroom"] = least_headroom_text(r) or "n/a (no op made a non-zero value)"
    return v


# ---------------------------------------------------------------- summary: groups, heatmaps, verdicts

def _varying(cases, axes) -> list:
    return [a for a in axes if len({getattr(r.case, a) for r in cases}) > 1]


def _axis_label(axis: str, value) -> str:
    if axis == "norm":
        return value if value != "none" else "no norm"
    if axis == "residual":
        return "no residual" if value is None else f"residual {value:g}"
    if axis == "bias":
        return "bias" if value else "no bias"
    if axis == "input":
        return f"input {value}"
    if axis == "underflow_threshold":
        return f"threshold {value:g}"
    if axis == "loss_scale":
        return f"loss scale {value:g}"
    if axis in ("width", "depth", "batch", "seed"):
        return f"{axis} {value}"
    return str(value)


def _theory_view(th: TheoryVerdict) -> dict:
    return {"status": th.status, "text": _theory_text(th), "reason": th.reason}


def _cell(index: int, r: CaseResult, disagrees: str | None) -> dict:
    """Line 1: the case failure (``∇`` when the gradients failed first); line 2: theory's forward
    prediction; line 3: the other pass (``fwd ...`` under a backward failure, ``∇ ...`` otherwise);
    a scaled format's line 4: its ``first_flush`` warning, when it has one (``flushed @ 1 · ∇ @ 40``)."""
    th = theory_verdict(r.theory, "forward")
    f = r.failure
    if r.status != "ok" or r.forward is None:
        label, other, kind = r.status, "", r.status
    else:
        label, kind = describe_case_failure(r), f["kind"] if f else "survived"
        if f and f["direction"] == "backward":
            other = "fwd " + describe_failure(r.forward.events, r.case.depth)
        else:
            other = ("∇ " + describe_failure(r.backward.events, r.case.depth)) if r.backward else ""
    flush = flush_text(r) if is_scaled(r) else ""
    return {"index": index, "id": r.id, "anchor": _anchor(r.id), "label": label, "kind": kind,
            "direction": f["direction"] if f else None, "theory": _theory_text(th), "theory_title": th.reason or "",
            "other": other, "flush": f"flushed {flush}" if flush else "", "colour": _cell_colour(r),
            "error": r.error or r.skip_reason or "",
            "survived": layers_survived(r), "disagrees": disagrees}


def _column_verdict(col_label: str, cells: list) -> str:
    """``in fp16, 3 of 8 inits die before layer 100: normal (overflow @ 4), ...; 5 survive``."""
    ran = [(init, c) for init, c in cells if c is not None and c["kind"] not in ("error", "skipped")]
    errors = [(init, c) for init, c in cells if c is not None and c["kind"] in ("error", "skipped")]
    dead = sorted(((init, c) for init, c in ran if c["kind"] != "survived"), key=lambda t: t[1]["survived"])
    parts = []
    if ran:
        if dead:
            names = ", ".join(f"{init} ({c['label']})" for init, c in dead)
            parts.append(f"in {col_label}, {len(dead)} of {len(ran)} inits fail: {names}")
            if len(dead) < len(ran):
                parts[-1] += f"; {len(ran) - len(dead)} survive"
        else:
            parts.append(f"in {col_label}, all {len(ran)} inits survive")
    if errors:
        where = "" if ran else f"in {col_label}, "
        parts.append(f"{where}{len(errors)} could not run ({', '.join(init for init, _ in errors)})")
    return "; ".join(parts) + "." if parts else ""


def _format_verdicts(results: Results, cases_by_fmt: dict) -> list:
    """Per format: how many cases fail (either direction), by kind, with the one that survived fewest layers."""
    out = []
    for fmt in sorted(cases_by_fmt, key=format_rank):
        cases = cases_by_fmt[fmt]
        ran = [r for r in cases if r.status == "ok" and r.forward is not None]
        not_run = len(cases) - len(ran)
        failing = [r for r in ran if r.failure]
        depths = sorted({r.case.depth for r in ran})
        within = f"depth {depths[0]}" if len(depths) == 1 else "their depth"
        if not ran:
            sentence = f"no {fmt} case ran ({not_run} errors or skips)."
        elif not failing:
            sentence = f"all {len(ran)} cases survive to {within}, forward and backward."
        else:
            n = count_cases(failing)
            by_kind = defaultdict(list)
            for r in failing:
                by_kind[r.failure["kind"]].append(r)
            kinds = []
            for kind in ("overflow", "nan", "zero", "underflow"):
                rs = by_kind.get(kind)
                if not rs:
                    continue
                first = min(rs, key=layers_survived)
                kinds.append(f"{len(rs)} {_KIND_LABEL[kind]} (fewest layers survived: {first.case.activation} · "
                             f"{first.case.init}, {describe_case_failure(first)})")
            sentence = (f"{len(failing)} of {len(ran)} cases fail within {within} ({n.forward} forward, "
                        f"{n.backward} backward first): " + ", ".join(kinds) + ".")
            inits = defaultdict(list)
            for r in ran:
                inits[r.case.init].append(r.failure is None)
            safe = [i for i, ok in inits.items() if all(ok)]
            others = {tuple(getattr(r.case, a) for a in _GROUP_AXES[1:] + _COLUMN_AXES[1:]) for r in ran}
            setting = "activation" if len(others) == 1 else "setting"
            if safe:
                sentence += f" Survive every {setting}: {', '.join(safe)}."
            else:
                sentence += f" No init survives every {setting}."
        if not_run and ran:
            sentence += f" {not_run} did not run."
        out.append({"format": fmt, "sentence": sentence, "failing": len(failing), "ran": len(ran)})
    return out


def _chain_by_format(by_fmt: dict) -> dict:
    """``by_fmt`` without probe cases, which get their own sentences (``probe_view.probe_verdicts``)."""
    kept = {f: [r for r in rs if not is_probe(r)] for f, rs in by_fmt.items()}
    return {f: rs for f, rs in kept.items() if rs}


def _axes(cases: list) -> tuple[list, list]:
    """(group axes, column axes) of the heatmaps: the axes that vary (or leave their default), the
    activation always, the format always."""
    group_axes = [a for a in _GROUP_AXES if a == "activation" or len({getattr(r.case, a) for r in cases}) > 1
                  or (a in ("norm", "residual", "input", "bias") and any(
                      getattr(r.case, a) != getattr(Case(), a) for r in cases))]
    column_axes = ["format"] + [a for a in _COLUMN_AXES[1:] if len({getattr(r.case, a) for r in cases}) > 1]
    return group_axes, column_axes


def _groups(results: Results, case_index: dict) -> list:
    cases = [r for r in results.cases if not is_probe(r)]  # probe cases: probe_view.probe_groups
    disagree = backend_disagreements(cases)
    backend = {r.id: r.case.backend for r in cases}
    group_axes, column_axes = _axes(cases)
    grouped: dict[tuple, list] = {}
    for r in cases:
        grouped.setdefault(tuple(getattr(r.case, a) for a in group_axes), []).append(r)
    out = []
    for gi, (gkey, members) in enumerate(grouped.items()):
        title = " · ".join(_axis_label(a, v) for a, v in zip(group_axes, gkey))
        cols: dict[tuple, str] = {}
        for r in sorted(members, key=lambda r: (format_rank(r.case.format),
                                                 *(str(getattr(r.case, a)) for a in column_axes[1:]))):
            ckey = tuple(getattr(r.case, a) for a in column_axes)
            cols.setdefault(ckey, " / ".join(str(v) for v in ckey))
        inits = list(dict.fromkeys(r.case.init for r in members))
        table = {(r.case.init, tuple(getattr(r.case, a) for a in column_axes)): r for r in members}
        rows = []
        for init in inits:
            rows.append({"init": init, "cells": [
                _cell(case_index[id(r)], r, backend.get(disagree.get(r.id))) if (r := table.get((init, ck))) else None
                for ck in cols]})
        columns, verdicts, comparisons = [], [], []
        for ci, (ckey, label) in enumerate(cols.items()):
            columns.append({"label": label, "format": ckey[0], "recipe": recipe_short(ckey[0])})
            col_cells = [(row["init"], row["cells"][ci]) for row in rows]
            verdicts.append(_column_verdict(label, col_cells))
            members_col = [(init, c) for init, c in col_cells if c is not None and c["kind"] not in ("error", "skipped")]
            if members_col:
                comparisons.append({"title": f"{label} ({title})", "format": ckey[0],
                                    "cases": [c["index"] for _, c in members_col],
                                    "labels": [f"{init} · {c['label']}" for init, c in members_col]})
        out.append({"anchor": f"group-{gi}", "title": title, "columns": columns, "rows": rows,
                    "verdicts": [v for v in verdicts if v], "comparisons": comparisons})
    probes = [r for r in results.cases if is_probe(r)]
    return out + (probe_groups(probes, case_index, _cell, len(out)) if probes else [])


# ---------------------------------------------------------------- baseline diff

def diff_results(current: Results, baseline: Results) -> dict:
    """``compare.compare(baseline, current)`` as rows, the same verdict as ``precision-suite compare``:
    events that moved (beyond tolerance, within it, or warnings shown only), status changes,
    statistics that drifted, cases only in one run, and the environment fields that differ
    between the machines of matched cases (usually why something moved)."""
    from ..compare import CompareError, compare

    header = {"created": baseline.created, "tool_version": baseline.tool_version}
    try:
        c = compare(baseline, current)
    except CompareError as e:  # nothing matched: the section says so instead of a diff
        return {**header, "error": str(e)}
    base, cur = baseline.by_id(), current.by_id()
    moved = [{"id": m.case_id, "anchor": _anchor(m.case_id), "pass": m.direction, "event": _moved_label(m.event),
              "before": _moved_value(m.event, m.before), "after": _moved_value(m.event, m.after),
              "delta": "" if m.delta is None else f"{m.delta:+d}", "judged": m in c.regressions,
              "verdict": ("moved" if m in c.regressions else "within tolerance" if m.judged
                          else "warning, not judged")}
             for m in c.moved if m.direction is not None]
    status_changed = [{"id": m.case_id, "anchor": _anchor(m.case_id), "before": m.before, "after": m.after,
                       "judged": m in c.regressions, "error": cur[m.case_id].error or base[m.case_id].error or ""}
                      for m in c.moved if m.event == "status"]
    drift = [{"id": d.case_id, "anchor": _anchor(d.case_id), "what": f"{d.tensor}.{d.stat}", "layer": d.layer,
              "before": f"{d.before:.4g}", "after": f"{d.after:.4g}", "amount": f"{d.amount:.3g} {d.unit}"}
             for d in c.drift[:_DRIFT_ROWS]]
    return {**header, "error": None, "shared": len(c.pairs), "moved": moved,
            "moved_cases": len({m.case_id for m in c.regressions if m.direction is not None}),
            "regressions": len(c.regressions), "notes": c.notes, "status_changed": status_changed,
            "drift": drift, "drift_total": len(c.drift), "only_current": c.added, "only_baseline": c.missing,
            "env_changes": [{"key": k, "before": a, "after": b} for k, a, b in c.env_diff]}


def _moved_label(event: str) -> str:
    return {"failure": "failure", "recorded": "pass recorded"}.get(event) or _EVENT_LABELS[event]


def _moved_value(event: str, value) -> str:
    if event == "recorded":
        return "yes" if value else "no"
    if event == "failure":
        return "none" if value is None else f"{_KIND_LABEL[value['kind']]} @ {value['layer']}"
    return _event_text(value)


def _environment_rows(environments: tuple) -> list:
    """(key, value) rows; with several environments (merged shards) each key is prefixed ``[i]``."""
    if len(environments) == 1:
        return sorted(flatten(environments[0]).items())
    return [(f"[{i}] {k}", v) for i, env in enumerate(environments) for k, v in sorted(flatten(env).items())]


# ---------------------------------------------------------------- entry point

def report_data(results: Results, baseline: Results | None = None) -> dict:
    """``{"view": ..., "charts": ...}`` for one Results (and an optional baseline to diff against)."""
    cases = list(results.cases)
    case_index = {id(r): i for i, r in enumerate(cases)}
    by_fmt = defaultdict(list)
    for r in cases:
        by_fmt[r.case.format].append(r)
    counts = count_cases(cases)
    axes = []
    chain_axes = ("init", "activation", "format", "device", "mode", "backend", "norm", "input", "width", "depth",
                  "batch", "seed")
    for axis in chain_axes if not cases or not all(map(is_probe, cases)) else (
            "model", "input_shape", "format", "mode", "device", "seed"):
        values = list(dict.fromkeys(str(getattr(r.case, axis)) for r in cases))
        axes.append({"axis": axis, "values": values})
    case_views = [_case_view(i, r, results.environments) for i, r in enumerate(cases)]
    groups = _groups(results, case_index)
    comparisons = [cmp for g in groups for cmp in g["comparisons"]]
    for i, cmp in enumerate(comparisons):
        cmp["index"] = i
    chains = [r for r in cases if not is_probe(r)]
    recipes, recipe_charts = recipes_view(chains, case_index, *_axes(chains), _axis_label, _anchor)
    recipe_formats = [{"name": n, "text": recipe_text(n), "scale_range": scale_range_text(n)}
                      for n in sorted(by_fmt, key=format_rank) if scaling_of(n) is not None]
    view = {
        "created": results.created, "tool_version": results.tool_version, "n_cases": len(cases), "counts": counts,
        "definitions": sorted(results.definitions.items()), "axes": axes,
        "verdicts": _format_verdicts(results, _chain_by_format(by_fmt)) + probe_verdicts([r for r in cases if is_probe(r)]),
        "groups": groups,
        "cases": case_views, "environment": _environment_rows(results.environments),
        "formats": [_format_view(n) for n in sorted(by_fmt, key=format_rank)],
        "recipes": recipes, "recipe_formats": recipe_formats,
        "baseline": None if baseline is None else diff_results(results, baseline),
    }
    charts = {"formats": {n: _format_view(n) for n in by_fmt},
              "cases": [_case_charts(r, theory_verdict(r.theory, "forward"), theory_verdict(r.theory, "backward"))
                        for r in cases],
              "comparisons": [{k: cmp[k] for k in ("title", "format", "cases", "labels")} for cmp in comparisons],
              "recipes": recipe_charts}
    return {"view": view, "charts": _plain(charts)}
