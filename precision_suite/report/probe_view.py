"""A probe case's per-module section: one bar per module, log2 amax and log2 rms of its ops'
outputs against the format's bands (smallest subnormal .. T_of), the failing module marked.

Per module: amax = the largest amax of its layers, rms = the largest rms (forward). Bars are
placed in percent of the band [log2 smallest_subnormal, log2 T_of] of the case's format.
"""

from __future__ import annotations

import math

import numpy as _np

from ..formats import get_format

__all__ = ["probe_view"]


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
        key = ("grad_" if r.failure["direction"] == "backward" else "") + "first_" + r.failure["kind"]
        site = r.probe.get("event_sites", {}).get(key)
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
    lh = r.probe.get("least_headroom")
    return {"modules": rows, "sites": sites, "format": fmt.name,
            "normal_pct": _pct(math.log2(fmt.smallest_normal), lo, hi), "max_pct": _pct(math.log2(fmt.max), lo, hi),
            "least": None if lh is None else f"{lh['bits']:+.1f} bits at layer {lh['layer']} ({lh['name']}, {lh['side']})"}
