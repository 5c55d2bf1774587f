"""Static loss-scale advice from the measured (exact, wide) gradients of every layer.

It reads measurements, not theory: the gradients' ``exact_amax`` and ``exact_q``
(``stats.GRAD_EXTRA_STATS``) recorded by the engine. Definitions: docs/definitions.md#loss-scale-advice.
"""

from __future__ import annotations

import math

import numpy as _np

from .formats import Format

__all__ = ["loss_scale_advice"]

def _gradscaler_defaults() -> tuple[float, float]:
    """(init_scale, backoff_factor) of torch.amp.GradScaler, read from its signature (2^16, 0.5)."""
    import inspect

    import torch

    params = inspect.signature(torch.amp.GradScaler.__init__).parameters
    return float(params["init_scale"].default), float(params["backoff_factor"].default)


def _pow2(k: int | None) -> float | None:
    """2^k as a float, or None where k is None or 2^k lies outside float64."""
    if k is None or not -1074 <= k <= 1023:
        return None
    return math.ldexp(1.0, k)


def _largest_safe_k(a: float, fmt: Format) -> int:
    """The largest k with 2^k a not overflowing ``fmt`` (a > 0 finite; below T_of, or at it where
    the tie rounds to max, as in fp8_e4m3fn)."""
    k = math.floor(math.log2(fmt.overflow_threshold) - math.log2(a))
    with _np.errstate(over="ignore"):
        while fmt.overflows(_np.ldexp(a, k)):
            k -= 1
        while not fmt.overflows(_np.ldexp(a, k + 1)):
            k += 1
    return k


def _smallest_k_above(a: float, limit: float) -> int:
    """The smallest k with 2^k a > limit (a, limit > 0 and finite)."""
    k = math.ceil(math.log2(limit) - math.log2(a))
    with _np.errstate(over="ignore"):
        while _np.ldexp(a, k) <= limit:
            k += 1
        while _np.ldexp(a, k - 1) > limit:
            k -= 1
    return k


def loss_scale_advice(backward_columns, fmt: Format, threshold: float, current_scale: float,
                      forward_failure: dict | None = None) -> dict:
    """``_advice`` for the format's range; a scaled format's verdict adds that its matmuls' quantized
    gradients are scaled per tensor or block by the recipe, so they need no loss scale: the bounds
    are those of the storage format the gradients are kept in (docs/scaled-formats.md)."""
    advice = _advice(backward_columns, fmt, threshold, current_scale, forward_failure)
    scaling = fmt.scaling
    if scaling is not None:
        per = "per tensor" if scaling.block == 0 else f"per {scaling.block}-element block"
        advice["verdict"] += (f"; {fmt.name} scales its quantized gradients {per} (grad_gemm_in), so they need no "
                              f"loss scale: the bounds above are its {scaling.storage} storage's range")
    return advice


def _advice(backward_columns, fmt: Format, threshold: float, current_scale: float,
            forward_failure: dict | None = None) -> dict:
    """Static loss-scale advice from the exact (wide) gradients of every layer.

    ``backward_columns``: {"grad", "grad_pre", "wgrad"} -> column dicts, whose ``exact_amax`` and
    ``exact_q`` (stats.GRAD_EXTRA_STATS) were measured at ``current_scale``. With A = max exact_amax
    and Q = min exact_q, both divided by the current scale, a power of two S = 2^k

        overflows nothing      iff  S A < T_of (fmt.overflows)  -> max_safe_scale = max such S
        lifts every underflow  iff  S Q > smallest_subnormal/2  -> min_useful_scale = min such S
        fraction below ``threshold``

    ``recommended`` is 1 (no scaling) where 1 lies between them, else the power of two halfway
    between them (in log2, rounded down), or null where min_useful > max_safe; an unbounded side
    is null. Only significant elements count as underflow (|exact| >= eps * rms of their tensor,
    as the engine's exact_q already applies), so the set is the same at every scale.
    ``gradscaler_backoffs``: halvings of GradScaler's initial scale down to max_safe_scale.
    Exact values are computed from rounded operands: below a layer whose gradient underflowed, a
    gradient that vanished entirely shows no magnitude at all, and the verdict says
    min_useful_scale is then only a lower bound.

    Gradients that hold inf or NaN (rounded or exact) get no scale at all: the gradients computed
    from them were not measured, so no scale can be called safe (``_non_finite_advice``).
    ``forward_failure`` (the forward pass's ``Events.failure``) says whether the forward pass
    failed first. A layer whose ``exact_amax`` is NaN was not recorded (a probe's op that no
    gradient reached) and is left out.
    """
    cols = list(backward_columns.values())
    missing = [name for name in ("exact_amax", "exact_q") if any(c.get(name) is None for c in cols)]
    if missing:
        raise ValueError(f"backward columns lack {', '.join(missing)} (stats.GRAD_EXTRA_STATS): "
                         "the backend must record them for the loss-scale advice")
    recorded = [~_np.isnan(_np.asarray(c["exact_amax"], dtype=_np.float64)) for c in cols]
    amax = _np.concatenate([_np.asarray(c["exact_amax"], dtype=_np.float64)[k] for c, k in zip(cols, recorded)])
    q = _np.concatenate([_np.asarray(c["exact_q"], dtype=_np.float64)[k] for c, k in zip(cols, recorded)])
    amax, q = amax / current_scale, q / current_scale
    advice = {"max_safe_scale": None, "min_useful_scale": None, "recommended": None, "gradscaler_backoffs": None}
    if not fmt.has_wider:
        advice["verdict"] = f"{fmt.name} has no wider format: its gradients' range cannot be judged"
        return advice
    bad = _first_non_finite(cols)
    if bad is not None or not _np.isfinite(amax).all() or _np.isnan(q).any():
        advice["verdict"] = _non_finite_advice(bad, amax, fmt, current_scale, forward_failure)
        return advice
    a, q_min = float(amax.max()), float(q.min())
    if a == 0:
        advice["gradscaler_backoffs"] = 0
        advice["verdict"] = "every gradient is exactly zero: there is nothing for a loss scale to lift"
        return advice
    t_of, t_under = fmt.overflow_threshold, fmt.underflow_threshold
    k_max = _largest_safe_k(a, fmt) if math.isfinite(t_of) else None
    k_min = _smallest_k_above(q_min, t_under) if math.isfinite(q_min) else None
    init_scale, backoff = _gradscaler_defaults()
    backoffs = 0
    if k_max is not None and math.ldexp(1.0, k_max) < init_scale:
        backoffs = math.ceil((math.log2(init_scale) - k_max) / -math.log2(backoff))
    advice.update(max_safe_scale=_pow2(k_max), min_useful_scale=_pow2(k_min), gradscaler_backoffs=backoffs)
    if k_min is not None and k_max is not None and k_min > k_max:
        advice["verdict"] = (f"no static loss scale fits {fmt.name}: keeping every layer's gradient underflow "
                             f"below {threshold:g} needs at least 2^{k_min}, but scales above 2^{k_max} overflow a "
                             "gradient; use bf16 or per-tensor scaling")
        return advice
    low, high = (-math.inf if k_min is None else k_min), (math.inf if k_max is None else k_max)
    k = 0 if low <= 0 <= high else (k_min + k_max) // 2 if k_min is not None and k_max is not None \
        else min(0, k_max) if k_max is not None else max(0, k_min)
    advice["recommended"] = _pow2(k)
    bounds = [f"scales above 2^{k_max} overflow a gradient" if k_max is not None else "no scale overflows",
              f"below 2^{k_min} >= {threshold:g} of a layer's gradients underflow" if k_min is not None
              else "none underflows"]
    fits = not fmt.overflows(current_scale * a) and (k_min is None or current_scale * q_min > t_under)
    head = (f"no loss scaling is needed in {fmt.name} (scale 1 fits)" if k == 0
            else f"loss scale 2^{k} fits {fmt.name}")
    advice["verdict"] = (f"{head}: {', '.join(bounds)}; "
                         f"the current scale {current_scale:g} {'fits' if fits else 'does not fit'}")
    lost = _lost_below(backward_columns["grad"], backward_columns["grad_pre"])
    if lost:
        advice["verdict"] += (f"; the gradients of layers 1..{lost} vanished entirely below an underflow, so "
                              "min_useful_scale is only a lower bound: rerun at the recommended scale")
    return advice


def _first_non_finite(cols: list) -> int | None:
    """The highest layer (backward order: the first reached) where a gradient holds inf or NaN,
    rounded or exact (``exact_amax`` counts NaN as zero: ``nan_frac`` sees it); None if none does."""
    bad = _np.zeros(len(_np.asarray(cols[0]["exact_amax"])), dtype=bool)
    for c in cols:
        bad |= _np.isinf(_np.asarray(c["exact_amax"], dtype=_np.float64))
        for name in ("inf_frac", "nan_frac"):
            if c.get(name) is not None:
                bad |= _np.nan_to_num(_np.asarray(c[name], dtype=_np.float64)) > 0
    return int(_np.flatnonzero(bad)[-1]) + 1 if bad.any() else None


def _non_finite_advice(layer: int | None, amax: _np.ndarray, fmt: Format, current_scale: float,
                       forward_failure: dict | None) -> str:
    """The verdict when some gradient is inf/NaN: why, as far as the columns tell, and no scale."""
    where = f" (first at layer {layer} in backward order)" if layer is not None else ""
    if forward_failure and forward_failure.get("kind") in ("overflow", "nan"):
        kind = "overflowed" if forward_failure["kind"] == "overflow" else "went NaN"
        return (f"the gradients hold inf/NaN{where} after the forward pass {kind} at layer {forward_failure['layer']}: "
                "no loss scale can make them finite; fix the forward pass first")
    finite = amax[_np.isfinite(amax)]
    if finite.size and fmt.overflows(current_scale * finite.max()):
        k = _largest_safe_k(float(finite.max()), fmt)
        return (f"the gradients hold inf/NaN{where} at the current scale {current_scale:g}: a gradient overflows "
                f"{fmt.name} at scales above 2^{k}, and the gradients computed from the overflowed ones were not "
                f"measured, so no scale is known to be safe; rerun at 2^{k} or lower")
    head = f"some gradients are inf/NaN even in the wide precision{where}: no static loss scale can be derived from them"
    if current_scale > 1:  # the loss's own gradient, scaled, may be what overflowed
        return f"{head}; rerun at scale 1 to see whether the current scale {current_scale:g} made them"
    return f"{head}, and no loss scale makes them finite"


def _lost_below(*flow) -> int | None:
    """The highest layer whose gradient (w.r.t. post or pre) is entirely zero while some layer
    above it lost gradient elements to underflow; None if there is none."""
    zero = _np.any([_np.asarray(c["zero_frac"], dtype=_np.float64) >= 1 for c in flow], axis=0)
    under = _np.any([_np.nan_to_num(_np.asarray(c["underflow_frac"], dtype=_np.float64)) > 0 for c in flow], axis=0)
    for i in _np.flatnonzero(zero)[::-1]:
        if under[i + 1:].any():
            return int(i) + 1
    return None
