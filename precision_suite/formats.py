"""Number formats: limits read from ``ml_dtypes.finfo`` / ``numpy.finfo``, and correct rounding.

Every limit is read from finfo; the one that finfo lacks, the overflow threshold, is derived:

    T_of = max + ulp(max) / 2,   ulp(max) = eps * 2**floor(log2(max))

the midpoint between ``max`` and the next value a format with unbounded exponent would have
(fp16: 65520, bf16: ~3.3961e38, fp8_e5m2: 61440, fp8_e4m3fn: 464). Beyond it everything rounds
past ``max``; a value exactly at it is a tie, and nearest-even sends it past ``max`` only when
``max``'s last significand bit is odd. That holds for fp16, bf16, fp32 and fp8_e5m2, whose max
has an all-ones significand, but not for fp8_e4m3fn: its max 448 = 0b1.110 * 2^8 is even (0b1.111
with the top exponent is NaN), so 464 rounds to 448 (ml_dtypes agrees) and overflow starts above
464: ``Format.overflows`` applies the exact rule (docs/definitions.md).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import ml_dtypes as _mld
import numpy as _np

from .keywords import strict_keywords

__all__ = ["Format", "FORMATS", "ELEMENT_FORMATS", "get_format", "format_names", "round_to_format",
           "round_fp64_to_fp32_odd"]


@strict_keywords
@dataclass(frozen=True)
class Format:
    """One number format with its finfo limits (all in the format's own units, as Python floats)."""

    name: str
    np_dtype: _np.dtype = field(repr=False)
    torch_name: str  # attribute of the ``torch`` module, resolved lazily so --help never imports torch
    wide_name: str  # the compute precision that holds this format's exact values (docs/definitions.md)
    max: float
    smallest_normal: float
    smallest_subnormal: float
    eps: float
    has_inf: bool
    mantissa_bits: int
    has_nan: bool = True  # fp6 and fp4 have no NaN encoding (ml_dtypes turns NaN into -0 there)
    scaling: "object | None" = None  # a scaled format's recipe (``scaled.Scaling``); its limits are the storage's

    @property
    def emax(self) -> int:
        """floor(log2(max)): the exponent of the largest binade (e4m3 8, e5m2 15, e2m3 2, e3m2 4, e2m1 2)."""
        return math.frexp(self.max)[1] - 1

    @property
    def emin(self) -> int:
        """log2(smallest_normal): the exponent of the smallest normal binade."""
        return math.frexp(self.smallest_normal)[1] - 1

    @property
    def overflow_threshold(self) -> float:
        """T_of = max + ulp(max)/2; inf for fp64, whose T_of lies beyond every float."""
        _, exp = math.frexp(self.max)  # max = m * 2**exp with m in [0.5, 1)
        ulp_max = self.eps * 2.0 ** (exp - 1)
        try:
            return self.max + ulp_max / 2
        except OverflowError:  # pragma: no cover - float addition saturates to inf instead
            return math.inf

    @property
    def tie_overflows(self) -> bool:
        """Does the tie at exactly T_of round past max? Yes iff max / ulp(max) is odd."""
        _, exp = math.frexp(self.max)
        return int(self.max / (self.eps * 2.0 ** (exp - 1))) % 2 == 1

    def overflows(self, magnitude):
        """Elementwise: does an exact magnitude round past max (to inf, or NaN without inf)?
        Works on floats, numpy arrays and torch tensors."""
        t = self.overflow_threshold
        return magnitude >= t if self.tie_overflows else magnitude > t

    @property
    def underflow_threshold(self) -> float:
        """Magnitudes at or below smallest_subnormal / 2 round to zero (round-to-nearest-even)."""
        return self.smallest_subnormal / 2

    @property
    def has_wider(self) -> bool:
        """fp64 has no wider format: its underflow/overflow statistics are not available."""
        return self.name != self.wide_name

    @property
    def overflow_behaviour(self) -> str:
        return "inf" if self.has_inf else "nan (no inf encoding)"

    def subset_of(self, other: "Format") -> bool:
        """Does ``other`` hold every value of this format exactly? (Binary formats nest when the
        range, the precision and the subnormal grid all fit: every format here but fp64 is a
        subset of fp32.)"""
        return (self.max <= other.max and self.mantissa_bits <= other.mantissa_bits
                and self.smallest_subnormal >= other.smallest_subnormal)

    def torch_dtype(self):
        import torch

        return getattr(torch, self.torch_name)

    def wide(self) -> "Format":
        return FORMATS[self.wide_name]


def _from_finfo(name: str, dtype, torch_name: str, wide_name: str) -> Format:
    info = _mld.finfo(dtype) if dtype in _ML_DTYPES else _np.finfo(dtype)
    with _np.errstate(invalid="ignore", over="ignore"):
        inf_value = _np.array(_np.inf, dtype=_np.float64).astype(dtype)
        nan_value = _np.array(_np.nan, dtype=_np.float64).astype(dtype)
    return Format(
        name=name,
        np_dtype=_np.dtype(dtype),
        torch_name=torch_name,
        wide_name=wide_name,
        max=float(info.max),
        smallest_normal=float(info.smallest_normal),
        smallest_subnormal=float(info.smallest_subnormal),
        eps=float(info.eps),
        has_inf=bool(_np.isinf(inf_value.astype(_np.float64))),
        mantissa_bits=int(info.nmant),
        has_nan=bool(_np.isnan(nan_value.astype(_np.float64))),
    )


_ML_DTYPES = (_mld.bfloat16, _mld.float8_e4m3fn, _mld.float8_e5m2, _mld.float6_e2m3fn, _mld.float6_e3m2fn,
              _mld.float4_e2m1fn, _mld.float8_e8m0fnu)

FORMATS: dict[str, Format] = {
    f.name: f
    for f in (
        _from_finfo("fp64", _np.float64, "float64", "fp64"),
        _from_finfo("fp32", _np.float32, "float32", "fp64"),
        _from_finfo("fp16", _np.float16, "float16", "fp32"),
        _from_finfo("bf16", _mld.bfloat16, "bfloat16", "fp32"),
        _from_finfo("fp8_e4m3fn", _mld.float8_e4m3fn, "float8_e4m3fn", "fp32"),
        _from_finfo("fp8_e5m2", _mld.float8_e5m2, "float8_e5m2", "fp32"),
    )
}

# the elements and scales of the scaled formats (``scaled``): not on the --formats axis themselves.
# fp6/fp4 have no torch dtype (torch_name ""): the torch backend rounds to them arithmetically.
ELEMENT_FORMATS: dict[str, Format] = {
    f.name: f
    for f in (
        FORMATS["fp8_e4m3fn"], FORMATS["fp8_e5m2"],
        _from_finfo("fp6_e2m3", _mld.float6_e2m3fn, "", "fp32"),
        _from_finfo("fp6_e3m2", _mld.float6_e3m2fn, "", "fp32"),
        _from_finfo("fp4_e2m1", _mld.float4_e2m1fn, "", "fp32"),
        _from_finfo("e8m0", _mld.float8_e8m0fnu, "float8_e8m0fnu", "fp32"),
    )
}

_ALIASES = {
    "float64": "fp64", "double": "fp64", "f64": "fp64",
    "float32": "fp32", "float": "fp32", "single": "fp32", "f32": "fp32",
    "float16": "fp16", "half": "fp16", "f16": "fp16",
    "bfloat16": "bf16",
    "e4m3": "fp8_e4m3fn", "e4m3fn": "fp8_e4m3fn", "float8_e4m3fn": "fp8_e4m3fn", "fp8": "fp8_e4m3fn",
    "e5m2": "fp8_e5m2", "float8_e5m2": "fp8_e5m2",
}


def format_names() -> list[str]:
    return list(FORMATS)


@strict_keywords
def get_format(name: str) -> Format:
    """Canonical format for a name or alias (case-insensitive), or a scaled format such as
    ``mxfp4(scale_rule=ceil)`` (``scaled.parse_scaled``: the storage format's limits under the
    scaled name); ValueError lists the valid names."""
    key = name.strip().lower()
    key = _ALIASES.get(key, key)
    if key in FORMATS:
        return FORMATS[key]
    from .scaled import SCALED_NAMES, parse_scaled

    if key.split("(")[0].strip() in SCALED_NAMES:
        return parse_scaled(key)
    raise ValueError(f"unknown format {name!r}; valid: {', '.join(FORMATS)}, {', '.join(SCALED_NAMES)} "
                     f"(aliases: {', '.join(_ALIASES)})")


def round_fp64_to_fp32_odd(x: _np.ndarray) -> _np.ndarray:
    """float64 -> float32 with round-to-odd: truncate toward zero, set the last bit if inexact.

    Rounding a round-to-odd value with p >= q + 2 bits to q bits gives the correctly rounded
    result, so fp64 -> fp32 (odd) -> bf16/fp8 (nearest-even) rounds once, correctly.
    """
    x = _np.asarray(x, dtype=_np.float64)
    with _np.errstate(over="ignore"):
        nearest = x.astype(_np.float32)
    inexact = (nearest.astype(_np.float64) != x) & _np.isfinite(x)
    bits = nearest.view(_np.uint32).copy()
    fix = inexact & ((bits & 1) == 0)
    # the even neighbour was chosen; the odd one lies on the other side of x, one ulp away
    away = _np.abs(nearest.astype(_np.float64)) > _np.abs(x)
    bits[fix & away] -= 1
    bits[fix & ~away] += 1
    return bits.view(_np.float32)


def round_to_format(x, fmt: Format) -> _np.ndarray:
    """Correctly rounded (nearest-even) float64 -> ``fmt``, returned as an array of fmt's dtype.

    numpy's float64 -> float16/float32 casts round once; ml_dtypes' float64 -> bf16/fp8 casts go
    through float32 and would round twice, so those go through round-to-odd float32 first.
    """
    x = _np.asarray(x, dtype=_np.float64)
    with _np.errstate(over="ignore"):  # overflow to inf is the format's answer, not an accident
        if fmt.np_dtype in (_np.float64, _np.float32, _np.float16):
            return x.astype(fmt.np_dtype)
        return round_fp64_to_fp32_odd(x).astype(fmt.np_dtype)
