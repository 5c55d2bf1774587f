"""Scaled formats as data: how each matmul input is quantized (docs/scaled-formats.md).

A scaled format is a recipe, not a storage type: the inputs of every matmul are quantized to a
small element format with a scale per tensor or per block, the product is accumulated in fp32,
and every result is stored in the storage format (bf16 by default). The recipe's element and
scale formats are ``formats.ELEMENT_FORMATS`` entries (limits from ml_dtypes' finfo).

    fp8_tensor   per tensor, s = max_elem / amax (amax 0 -> 1); e4m3 forward, e5m2 gradients
    fp8_block    e4m3, fp32 s = max_elem / amax_block; 1x128 activation/gradient blocks, 128x128 weights
    mxfp*        OCP MX v1.0: blocks of 32, E8M0 scale 2^k; floor: k = floor(log2 amax) - emax_elem,
                 ceil: k = ceil(log2(amax / max_elem))
    nvfp4        E2M1, blocks of 16, E4M3 block scale amax_block / 6 encoded after an fp32
                 per-tensor scale 448 * 6 / amax_tensor
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace

__all__ = ["Scaling", "SCALED_NAMES", "SCALE_RULES", "STORAGES", "parse_scaled"]

SCALE_RULES = ("floor", "ceil")
STORAGES = ("bf16", "fp32", "fp16")


@dataclass(frozen=True)
class Scaling:
    """One recipe. ``block``: elements per scale along the reduction dimension (0: per tensor);
    ``weight_block``: (rows, cols) of a weight's 2-D blocks, or None when weights use ``block``
    along their own reduction dimension; ``scale``: "fp32" (the reciprocal amax ratio), "e8m0"
    (a power of two) or "e4m3" (nvfp4's two-level scale); ``rule``: the MX exponent rule."""

    family: str  # "tensor", "block", "mx", "nv"
    element: str
    grad_element: str
    block: int
    scale: str
    rule: str | None
    storage: str
    weight_block: tuple | None = None


# name -> (Scaling with default parameters, the parameters a user may set)
_RECIPES: dict[str, Scaling] = {
    "fp8_tensor": Scaling("tensor", "fp8_e4m3fn", "fp8_e5m2", 0, "fp32", None, "bf16"),
    "fp8_block": Scaling("block", "fp8_e4m3fn", "fp8_e4m3fn", 128, "fp32", None, "bf16", (128, 128)),
    "mxfp8_e4m3": Scaling("mx", "fp8_e4m3fn", "fp8_e4m3fn", 32, "e8m0", "ceil", "bf16"),
    "mxfp8_e5m2": Scaling("mx", "fp8_e5m2", "fp8_e5m2", 32, "e8m0", "ceil", "bf16"),
    "mxfp6_e2m3": Scaling("mx", "fp6_e2m3", "fp6_e2m3", 32, "e8m0", "floor", "bf16"),
    "mxfp6_e3m2": Scaling("mx", "fp6_e3m2", "fp6_e3m2", 32, "e8m0", "floor", "bf16"),
    "mxfp4": Scaling("mx", "fp4_e2m1", "fp4_e2m1", 32, "e8m0", "floor", "bf16"),
    "nvfp4": Scaling("nv", "fp4_e2m1", "fp4_e2m1", 16, "e4m3", None, "bf16"),
}
SCALED_NAMES = tuple(_RECIPES)

_CALL = re.compile(r"^\s*([a-z0-9_]+)\s*(?:\((.*)\))?\s*$")


def parse_scaled(text: str):
    """``mxfp4``, ``mxfp4(scale_rule=ceil,storage=fp32)`` -> a ``formats.Format``: the storage
    format's limits under the canonical scaled name (default parameters omitted), with
    ``scaling`` set. ValueError names what was wrong and the valid choices."""
    from .formats import FORMATS

    m = _CALL.match(text.strip().lower())
    if not m or m.group(1) not in _RECIPES:
        raise ValueError(f"unknown scaled format {text!r}; valid: {', '.join(SCALED_NAMES)}")
    name, args = m.group(1), m.group(2)
    recipe = _RECIPES[name]
    valid = {"storage": STORAGES} | ({"scale_rule": SCALE_RULES} if recipe.family == "mx" else {})
    given: dict[str, str] = {}
    for part in filter(None, (p.strip() for p in (args or "").split(","))):
        key, eq, value = (s.strip() for s in part.partition("="))
        if not eq or key not in valid:
            raise ValueError(f"format {text!r}: bad parameter {part!r}; {name} takes "
                             f"{', '.join(k + '=<' + '|'.join(v) + '>' for k, v in valid.items())}")
        if value not in valid[key]:
            raise ValueError(f"format {text!r}: {key}={value!r}; valid: {', '.join(valid[key])}")
        given[key] = value
    scaling = replace(recipe, storage=given.get("storage", recipe.storage), rule=given.get("scale_rule", recipe.rule))
    shown = [f"{k}={given[k]}" for k in ("scale_rule", "storage")
             if k in given and given[k] != {"scale_rule": recipe.rule, "storage": recipe.storage}[k]]
    canonical = name + (f"({','.join(shown)})" if shown else "")
    return replace(FORMATS[scaling.storage], name=canonical, scaling=scaling)
