"""The scaled formats in the report: their quantized matmul inputs per case, and the recipes side by side.

A scaled case (``fp8_tensor``, ``mxfp4``, ...; docs/scaled-formats.md) carries statistics blocks of
its quantized matmul inputs: ``gemm_in`` and ``gemm_w`` forward, ``grad_gemm_in`` backward. This
module turns them into what a user comparing fp8/fp4 recipes reads:

- per case, the quantization error as the signal-to-quantization-noise ratio

      SQNR = -20 log10(qerr)  dB        (qerr 0.1 -> 20 dB; qerr 0, exact, and NaN -> no point)

  of all elements and of the bulk (``qerr_bulk``: |x| <= r*, the rms without the outliers), the
  flushed and saturated fractions, and the scales' log2 range against the scale format's range
  (charts ``q``, ``qf``, ``qs``);
- per init and input, every recipe of the run: its failure, ``first_flush`` and SQNR at a few layers
  (a table), and the bulk SQNR of ``gemm_in`` over depth with one line per recipe (a chart).

Plain formats have none of these blocks: nothing here is shown for them.
"""

from __future__ import annotations

import math

import numpy as _np

from ..formats import ELEMENT_FORMATS, FORMATS, get_format
from ..results import CaseResult
from ..scaled import SCALED_NAMES
from ..summary import describe_case_failure

__all__ = ["format_rank", "is_scaled", "scaling_of", "recipe_text", "recipe_short", "scale_range_text", "sqnr_db",
           "flush_text", "quant_charts", "quant_view", "recipes_view"]

# (pass, statistics block) of every quantized matmul input, in the order the report lists them
QUANT_TENSORS = (("forward", "gemm_in"), ("forward", "gemm_w"), ("backward", "grad_gemm_in"))
_TENSOR_LABEL = {"gemm_in": "activation (gemm_in)", "gemm_w": "weight (gemm_w)",
                 "grad_gemm_in": "gradient (grad_gemm_in)"}
_E8M0 = ELEMENT_FORMATS["e8m0"]
_E4M3 = ELEMENT_FORMATS["fp8_e4m3fn"]
_FP32 = FORMATS["fp32"]
# nvfp4's E4M3 block scales reach from the tensor's largest block scale (E4M3 max x the fp32 tensor
# scale) down to E4M3's smallest subnormal x the same: a block scale below that floor is zero
_E4M3_SPAN = math.log2(_E4M3.max / _E4M3.smallest_subnormal)


# ---------------------------------------------------------------- formats

def format_rank(name: str) -> tuple:
    """Sort key of a format column: the plain formats by width (``FORMATS`` order), then the recipes
    in ``SCALED_NAMES`` order (per tensor, per block, MX, NV), a recipe's parameterised variants after
    its default; anything else last."""
    base = name.split("(")[0].strip()
    if base in FORMATS:
        return 0, list(FORMATS).index(base), name
    if base in SCALED_NAMES:
        return 1, SCALED_NAMES.index(base), name
    return 2, 0, name


def scaling_of(name: str):
    """The recipe (``scaled.Scaling``) of a scaled format's name, or None for a plain format."""
    try:
        return get_format(name).scaling
    except ValueError:  # a probe's or an older file's name this version does not know
        return None


def is_scaled(r: CaseResult) -> bool:
    """Did this case quantize its matmul inputs (does it carry ``gemm_in``)?"""
    return r.status == "ok" and getattr(r.forward, "gemm_in", None) is not None


def recipe_text(name: str) -> str:
    """One line describing a recipe: elements, blocks, scales, storage."""
    s = scaling_of(name)
    if s is None:
        return ""
    elem = s.element if s.grad_element == s.element else f"{s.element} (gradients {s.grad_element})"
    if s.block == 0:
        blocks = "one scale per tensor"
    else:
        blocks = f"blocks of {s.block} along the reduction dimension"
        if s.weight_block is not None:
            blocks += f" (weights: {s.weight_block[0]} × {s.weight_block[1]} tiles)"
    scale = {"fp32": "fp32 scales", "e8m0": "E8M0 scales (2^k)", "e4m3": "E4M3 block scales under an fp32 tensor scale"}
    rule = f", rule {s.rule}" if s.rule else ""
    return f"{elem} elements, {blocks}, {scale.get(s.scale, s.scale)}{rule}; results stored in {s.storage}"


def _element_short(name: str) -> str:
    """``fp8_e4m3fn`` -> ``e4m3``, ``fp4_e2m1`` -> ``e2m1``."""
    return name.split("_", 1)[-1].removesuffix("fn")


def recipe_short(name: str) -> str:
    """A heatmap column's subtitle: ``e2m1 · 1×32 · E8M0 floor``, ``e4m3/e5m2 · per tensor · fp32``."""
    s = scaling_of(name)
    if s is None:
        return ""
    elem = _element_short(s.element) + ("" if s.grad_element == s.element else "/" + _element_short(s.grad_element))
    blocks = "per tensor" if s.block == 0 else f"1×{s.block}"
    scale = s.scale if s.scale == "fp32" else s.scale.upper()
    return " · ".join(p for p in (elem, blocks, scale + (f" {s.rule}" if s.rule else ""),
                                  "" if s.storage == "bf16" else f"in {s.storage}") if p)


def scale_band(name: str) -> dict | None:
    """The range of the scale format as log2 of the dequantization factor, where it is a fixed range:
    E8M0 2^-127..2^127 (finfo); fp32 scales from 1 / fp32 max (the reciprocal max_elem / amax
    overflows below it and the block turns NaN) to fp32 max. nvfp4's floor moves with each tensor's
    scale: ``quant_charts`` draws it per layer instead (None here)."""
    s = scaling_of(name)
    if s is None or s.scale not in ("e8m0", "fp32"):
        return None
    if s.scale == "e8m0":
        return {"lo": math.log2(_E8M0.smallest_normal), "hi": math.log2(_E8M0.max),
                "lo_label": "E8M0 smallest", "hi_label": "E8M0 max"}
    return {"lo": -math.log2(_FP32.max), "hi": math.log2(_FP32.max),
            "lo_label": "1 / fp32 max (scale NaN below)", "hi_label": "fp32 max"}


def scale_range_text(name: str) -> str:
    """The scale format's range in words: fixed (E8M0, fp32) or relative to each tensor (nvfp4's E4M3)."""
    band = scale_band(name)
    if band is not None:
        return f"2^{band['lo']:.4g} … 2^{band['hi']:.4g} ({band['lo_label']} … {band['hi_label']})"
    if scaling_of(name) is None:
        return ""
    return (f"E4M3 block scales reach 2^{_E4M3_SPAN:.2f} below the tensor's largest block scale "
            "(E4M3 max / smallest subnormal); a block whose scale falls under that floor is zero")


# ---------------------------------------------------------------- per case

def sqnr_db(qerr) -> _np.ndarray:
    """-20 log10(qerr) per layer in float64; qerr 0 gives inf, NaN stays NaN."""
    q = _np.asarray(qerr, dtype=_np.float64)
    with _np.errstate(divide="ignore", invalid="ignore"):
        return -20.0 * _np.log10(q)


def _points(values, decimals: int) -> list:
    """Rounded per-layer values; inf and NaN become null (a gap in the line)."""
    a = _np.asarray(values, dtype=_np.float64)
    ok = _np.isfinite(a)
    out = _np.round(a, decimals).tolist()
    return [x if k else None for x, k in zip(out, ok.tolist())]


def _blocks(r: CaseResult):
    """(name, statistics) of the case's quantized matmul inputs that it recorded."""
    for direction, name in QUANT_TENSORS:
        res = r.forward if direction == "forward" else r.backward
        stats = getattr(res, name, None) if res is not None else None
        if stats:
            yield name, stats


def quant_charts(r: CaseResult) -> dict:
    """The per-layer series of a scaled case (x = layer 1..depth): ``q`` SQNR in dB (``<t>.all``,
    ``<t>.bulk``), ``qf`` fractions (``<t>.flushed``, ``<t>.saturated``), ``qs`` log2 scales
    (``<t>.min``, ``<t>.max``; nvfp4 also ``<t>.floor``), ``qband`` the scale format's fixed range."""
    q, qf, qs = {}, {}, {}
    scaling = scaling_of(r.case.format)
    nv = scaling is not None and scaling.scale == "e4m3"
    for t, st in _blocks(r):
        q[f"{t}.all"] = _points(sqnr_db(st["qerr"]), 2)
        q[f"{t}.bulk"] = _points(sqnr_db(st["qerr_bulk"]), 2)
        qf[f"{t}.flushed"] = _points(st["flush_frac"], 5)
        qf[f"{t}.saturated"] = _points(st["saturated_frac"], 5)
        qs[f"{t}.min"] = _points(st["scale_log2_min"], 2)
        qs[f"{t}.max"] = _points(st["scale_log2_max"], 2)
        if nv:
            qs[f"{t}.floor"] = _points(_np.asarray(st["scale_log2_max"], dtype=_np.float64) - _E4M3_SPAN, 2)
    return {"q": q, "qf": qf, "qs": qs, "qband": scale_band(r.case.format)}


def _fmt_db(v) -> str:
    return "—" if v is None or not math.isfinite(v) else f"{v:.1f}"


def _extreme(values, pick) -> tuple:
    """(value, layer) of the finite value ``pick`` (``_np.argmin``/``_np.argmax``) chooses, layers
    from 1; (None, None) when there is none."""
    a = _np.asarray(values, dtype=_np.float64)
    ok = _np.isfinite(a)
    if not ok.any():
        return None, None
    i = int(_np.flatnonzero(ok)[pick(a[ok])])
    return float(a[i]), i + 1


def _at_worst(values) -> tuple:
    """The smallest finite value and its layer (``_extreme``)."""
    return _extreme(values, _np.argmin)


def _at_most(values) -> tuple:
    """The largest finite value and its layer (``_extreme``)."""
    return _extreme(values, _np.argmax)


def _median(values):
    a = _np.asarray(values, dtype=_np.float64)
    a = a[_np.isfinite(a)]
    return float(_np.median(a)) if a.size else None


def _pct(v) -> str:
    return "—" if v is None else f"{100 * v:.3g}%"


def quant_view(r: CaseResult) -> dict | None:
    """The case section's table of its quantized inputs (None for a plain format): per tensor the SQNR
    (median over the layers, worst with its layer), the bulk's, the largest flushed and saturated
    fractions, and the scales' log2 range against the scale format's."""
    if not is_scaled(r):
        return None
    rows = []
    for t, st in _blocks(r):
        s_all, s_bulk = sqnr_db(st["qerr"]), sqnr_db(st["qerr_bulk"])
        worst, worst_at = _at_worst(s_all)
        bworst, bworst_at = _at_worst(s_bulk)
        flush, flush_at = _at_most(st["flush_frac"])
        sat, sat_at = _at_most(st["saturated_frac"])
        lo, _ = _at_worst(st["scale_log2_min"])
        hi, _ = _at_most(st["scale_log2_max"])
        rows.append({
            "tensor": _TENSOR_LABEL[t], "key": t,
            "sqnr_median": _fmt_db(_median(s_all)), "sqnr_worst": _fmt_db(worst), "sqnr_worst_at": worst_at or "",
            "bulk_median": _fmt_db(_median(s_bulk)), "bulk_worst": _fmt_db(bworst), "bulk_worst_at": bworst_at or "",
            "flushed": _pct(flush), "flushed_at": (flush and flush_at) or "",  # no layer for "never"
            "saturated": _pct(sat), "saturated_at": (sat and sat_at) or "",
            "scales": "—" if lo is None else f"{lo:.1f} … {hi:.1f}"})
    return {"recipe": recipe_text(r.case.format), "rows": rows, "scale_range": scale_range_text(r.case.format)}


# ---------------------------------------------------------------- recipes side by side

def _layers(depth: int) -> list[int]:
    """The layers the comparison table reads: the first, the middle and the last."""
    return sorted({1, (depth + 1) // 2, depth})


def _pair(stats, layer: int) -> dict:
    """SQNR of all elements / of the bulk at one layer (1-based), with the bulk's value for shading."""
    if not stats:
        return {"text": "n/a", "bulk": None}
    a = sqnr_db(stats["qerr"])[layer - 1]
    b = sqnr_db(stats["qerr_bulk"])[layer - 1]
    return {"text": f"{_fmt_db(a)} / {_fmt_db(b)}", "bulk": float(b) if math.isfinite(b) else None}


def _shade(db) -> str:
    """Background by the bulk SQNR: red at 0 dB through amber to green at 30 dB and above."""
    if db is None:
        return "transparent"
    frac = min(max(db / 30.0, 0.0), 1.0)
    return f"hsl({round(120 * frac)}, 60%, 88%)"


def flush_text(r: CaseResult, fwd_label: str = "", bwd_label: str = "∇ ") -> str:
    """``@ 1 · ∇ @ 40`` (``fwd_label`` and ``bwd_label`` name the passes): the case's ``first_flush`` in
    each pass that has one; "" when neither has."""
    fwd = r.forward.events.first_flush if r.forward is not None else None
    bwd = r.backward.events.first_flush if r.backward is not None else None
    return " · ".join(p for p in (f"{fwd_label}@ {fwd}" if fwd is not None else "",
                                  f"{bwd_label}@ {bwd}" if bwd is not None else "") if p)


def recipes_view(cases: list, case_index: dict, group_axes: list, column_axes: list, label, anchor) -> tuple:
    """The "recipes compared" section: per heatmap group without its input axis (the inputs sit side by
    side), per init, a table of every recipe × input and a chart per input of ``gemm_in``'s bulk SQNR
    over depth, one line per recipe. A recipe is a heatmap column (``column_axes``: the format, and
    device, mode or backend where those vary); ``label(axis, value)`` titles a group and
    ``anchor(case_id)`` links a case's section. Returns (view, charts): the charts list
    ``{"cases", "labels", "colours", "yrange"}`` the page's script draws (``colours``: each
    line's recipe position, so a recipe keeps its colour in every chart of the group)."""
    scaled = [r for r in cases if is_scaled(r)]
    if not scaled:
        return [], []
    axes = [a for a in group_axes if a != "input"]
    sub: dict[tuple, list] = {}
    for r in scaled:
        sub.setdefault(tuple(getattr(r.case, a) for a in axes), []).append(r)
    view, charts = [], []
    for si, (key, members) in enumerate(sub.items()):
        title = " · ".join(label(a, v) for a, v in zip(axes, key)) or "all cases"
        depth = members[0].case.depth
        layers = _layers(depth)
        inputs = list(dict.fromkeys(r.case.input for r in members))
        column = {r.id: tuple(getattr(r.case, a) for a in column_axes) for r in members}
        keys = sorted(set(column.values()), key=lambda k: (format_rank(k[0]), *map(str, k[1:])))
        recipe_of = {i: " / ".join(map(str, k)) for i, k in column.items()}
        recipes = [" / ".join(map(str, k)) for k in keys]
        bulk = [v for r in members for v in sqnr_db(r.forward.gemm_in["qerr_bulk"]).tolist() if math.isfinite(v)]
        yrange = [math.floor(min(bulk)) - 2, math.ceil(max(bulk)) + 2] if bulk else [0, 40]
        blocks = []
        for init in dict.fromkeys(r.case.init for r in members):
            mine = {(recipe_of[r.id], r.case.input): r for r in members if r.case.init == init}
            block_charts = []
            for inp in inputs:
                lines = [(k, rec, mine[(rec, inp)]) for k, rec in enumerate(recipes) if (rec, inp) in mine]
                if not lines:
                    continue
                charts.append({"cases": [case_index[id(r)] for _, _, r in lines],
                               "labels": [f"{rec} · {describe_case_failure(r)}" for _, rec, r in lines],
                               "colours": [k for k, _, _ in lines], "yrange": yrange})
                block_charts.append({"index": len(charts) - 1, "title": f"input {inp}"})
            rows = []
            for rec in recipes:
                for inp in inputs:
                    r = mine.get((rec, inp))
                    if r is None:
                        continue
                    fwd = [_pair(r.forward.gemm_in, L) for L in layers]
                    bwd = [_pair(r.backward.grad_gemm_in if r.backward else None, L) for L in layers]
                    rows.append({"recipe": rec, "input": inp, "id": r.id, "anchor": anchor(r.id),
                                 "failure": describe_case_failure(r), "failing": r.failure is not None,
                                 "flush": flush_text(r, "fwd ") or "—",
                                 "forward": [{**c, "shade": _shade(c["bulk"])} for c in fwd],
                                 "backward": [{**c, "shade": _shade(c["bulk"])} for c in bwd]})
            blocks.append({"init": init, "charts": block_charts, "rows": rows})
        view.append({"anchor": f"recipes-{si}", "title": title, "layers": layers, "inits": blocks,
                     "has_backward": any(r.backward is not None for r in members)})
    return view, charts
