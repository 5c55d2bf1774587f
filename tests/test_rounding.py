"""``formats.round_to_format`` against a nearest-even search over the table of every code.

The reference knows nothing of casts: it decodes every bit pattern of the format (widening to
float64 is exact), sorts the finite values, takes the two neighbours of x, keeps the nearer and,
on a tie, the one whose code is even. Past max the neighbour is the code one ulp above max, which
the format does not have: beyond their midpoint T_of (derived here from the table) x overflows,
and at T_of itself the tie goes to max when max's code is even — fp8_e4m3fn's max 448 is
S.1111.110, so 464 rounds to 448, while fp16/bf16/fp8_e5m2 (max mantissa all ones) overflow.
"""

from __future__ import annotations

import functools

import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from precision_suite import formats
from precision_suite.formats import get_format

FORMATS = ("fp16", "bf16", "fp8_e4m3fn", "fp8_e5m2")


@functools.cache
def code_table(name: str):
    """(sorted finite values, their codes, T_of) of every bit pattern of the format, sign-magnitude."""
    fmt = get_format(name)
    bits = fmt.np_dtype.itemsize * 8
    codes = np.arange(2**bits, dtype=np.uint64).astype(np.dtype(f"uint{bits}"))
    with np.errstate(invalid="ignore"):  # NaN codes
        values = codes.view(fmt.np_dtype).astype(np.float64)
    keep = np.isfinite(values) & ~((values == 0) & np.signbit(values))  # one zero: the sign is set apart
    order = np.argsort(values[keep], kind="stable")
    vals, kept = values[keep][order], codes[keep][order].astype(np.int64)
    top, below = vals[-1], vals[-2]
    t_of = top + (top - below) / 2  # midpoint between max and the missing code max + ulp(max)
    return vals, kept, t_of


def reference(x: np.ndarray, name: str) -> np.ndarray:
    """Nearest-even rounding of float64 ``x`` by search over the code table (float64 out)."""
    vals, codes, t_of = code_table(name)
    x = np.asarray(x, dtype=np.float64)
    hi = np.clip(np.searchsorted(vals, x), 1, len(vals) - 1)
    lo = hi - 1
    d_lo, d_hi = np.abs(x - vals[lo]), np.abs(vals[hi] - x)
    take_hi = (d_hi < d_lo) | ((d_hi == d_lo) & (codes[hi] % 2 == 0))
    out = np.where(take_hi, vals[hi], vals[lo])
    max_is_odd = codes[-1] % 2 == 1
    over = (np.abs(x) > t_of) | ((np.abs(x) == t_of) & max_is_odd)
    out = np.where(over, np.copysign(np.inf if get_format(name).has_inf else np.nan, x), out)
    out = np.where(np.isnan(x), np.nan, out)
    return np.where(out == 0, np.copysign(0.0, x), out)  # a value rounding to zero keeps its sign


def assert_rounds_like_reference(x, name):
    """The project's ``formats.round_to_format`` (looked up at call time, so a test can swap it)
    gives the reference's value, sign of zero and NaN for every element of float64 ``x``."""
    x = np.asarray(x, dtype=np.float64)
    got = formats.round_to_format(x, get_format(name)).astype(np.float64)
    want = reference(x, name)
    same = (got == want) & (np.signbit(got) == np.signbit(want)) | (np.isnan(got) & np.isnan(want))
    if not same.all():
        bad = np.flatnonzero(~same)
        i = bad[0]
        raise AssertionError(f"{name}: {bad.size} / {x.size} inputs misrounded; first: x = {x[i]!r} "
                             f"({x[i].hex()}) gave {got[i]!r}, nearest-even is {want[i]!r}")


def probes(name: str) -> np.ndarray:
    """Every code's value, every midpoint between neighbours (ties), the float64 numbers just
    below and above each midpoint (where double rounding goes wrong), and the overflow edge."""
    vals, _, t_of = code_table(name)
    mids = (vals[:-1] + vals[1:]) / 2  # exact: these formats have far fewer bits than float64
    edge = np.array([t_of, vals[-1]])
    ties = np.concatenate([mids, edge])
    near = [np.nextafter(ties, np.inf), np.nextafter(ties, -np.inf)]
    return np.concatenate([vals, ties, *near, -ties, [np.inf, -np.inf]])


@pytest.mark.parametrize("name", FORMATS)
def test_table_overflow_edge_is_formats(name):
    """formats' T_of and its tie rule (Format.overflows) match the table's."""
    vals, codes, t_of = code_table(name)
    fmt = get_format(name)
    assert t_of == fmt.overflow_threshold
    assert bool(fmt.overflows(t_of)) == (codes[-1] % 2 == 1)
    assert fmt.overflows(np.nextafter(t_of, np.inf)) and not fmt.overflows(np.nextafter(t_of, 0))


@pytest.mark.parametrize("name", FORMATS)
def test_every_code_midpoint_and_neighbour(name):
    assert_rounds_like_reference(probes(name), name)


@pytest.mark.parametrize("name, x, want", [
    ("fp16", 65519.99, 65504.0),  # inside (max, T_of): a rounding error, not an overflow
    ("fp16", 65520.0, np.inf),  # T_of is a tie; max has an odd code, so it rounds up, past max
    ("fp8_e4m3fn", 464.0, 448.0),  # the tie at T_of goes to max: 448's code 0x7E is even
    ("fp8_e4m3fn", 464.0 + 1e-9, np.nan),  # no inf: overflow is NaN (via fp32 this would tie to 448)
    ("fp8_e4m3fn", 463.99, 448.0),
    ("fp8_e5m2", 61440.0, np.inf),
    ("bf16", 1 + 2.0**-8 + 2.0**-30, 1.0078125),  # double rounding via fp32 gives 1.0
])
def test_named_edges(name, x, want):
    got = float(formats.round_to_format(np.array([x]), get_format(name))[0])
    assert got == want or (np.isnan(want) and np.isnan(got)), f"{name}: {x!r} -> {got!r}, want {want!r}"


def via_fp32(x, name: str) -> np.ndarray:
    """Naive double rounding: float64 -> float32 (nearest-even) -> the format (nearest-even again).
    Each cast rounds once (numpy's to float32, ml_dtypes' from float32), on every library version."""
    return np.asarray(x, dtype=np.float64).astype(np.float32).astype(get_format(name).np_dtype)


# (format, x, nearest-even, what double rounding through float32 gives): x sits just past a
# midpoint of the format, closer to it than fp32's ulp, so fp32 rounds it onto the midpoint and the
# second rounding breaks the tie the wrong way.
TRAPS = [
    ("bf16", 1 + 2.0**-8 + 2.0**-30, 1.0078125, 1.0),
    ("fp8_e4m3fn", 464.0 + 1e-9, np.nan, 448.0),  # past T_of = 464: overflow, NaN (no inf)
]
TRAP_IDS = [t[0] for t in TRAPS]


def _same(a: float, b: float) -> bool:
    return a == b or (np.isnan(a) and np.isnan(b))


@pytest.mark.parametrize("name, x, want, wrong", TRAPS, ids=TRAP_IDS)
def test_double_rounding_traps_are_real(name, x, want, wrong):
    """The traps exist, whatever the installed libraries do: the exact reference and naive double
    rounding through fp32 disagree on them, and the project's rounding gives the reference's value."""
    assert _same(float(reference(np.array([x]), name)[0]), want)
    assert _same(float(via_fp32([x], name)[0]), wrong) and not _same(wrong, want)
    assert_rounds_like_reference([x], name)


@pytest.mark.parametrize("name, x, want, wrong", TRAPS, ids=TRAP_IDS)
def test_ml_dtypes_float64_cast_on_the_traps(name, x, want, wrong):
    """Documents a library deviation, never asserts it: ml_dtypes 0.4 casts float64 -> bf16/fp8
    through float32 and so rounds twice; 0.7 rounds once. round_to_format does not depend on
    which (test_double_rounding_traps_are_real holds it to the reference on every version)."""
    got = float(np.array([x]).astype(get_format(name).np_dtype)[0])
    if _same(got, want):
        pytest.skip(f"ml_dtypes {ml_dtypes.__version__} rounds float64 -> {name} correctly: the trap is gone")
    how = "double rounding through float32" if _same(got, wrong) else "neither nearest-even nor via float32"
    pytest.xfail(f"ml_dtypes {ml_dtypes.__version__} rounds float64 {x!r} -> {name} to {got!r} ({how}); "
                 f"nearest-even is {want!r}: round_to_format rounds to odd in float32 first")


def _naive_inner(monkeypatch):
    """round_to_format's own code with its round-to-odd step made a plain float32 cast."""
    monkeypatch.setattr(formats, "round_fp64_to_fp32_odd", lambda x: np.asarray(x, dtype=np.float64).astype(np.float32))


def _naive_whole(monkeypatch):
    """round_to_format replaced by x.astype(float32).astype(format)."""
    def naive(x, fmt):
        with np.errstate(over="ignore"):
            return np.asarray(x, dtype=np.float64).astype(np.float32).astype(fmt.np_dtype)
    monkeypatch.setattr(formats, "round_to_format", naive)


@pytest.mark.parametrize("swap", [_naive_inner, _naive_whole], ids=["inner-path", "whole-function"])
@pytest.mark.parametrize("name", ["bf16", "fp8_e4m3fn", "fp8_e5m2"])
def test_reference_check_catches_double_rounding(monkeypatch, swap, name):
    """The checks have teeth: with naive double rounding through fp32 swapped in for the project's,
    the same checking helper fails on the probes (every midpoint's float64 neighbours), and on the
    named traps."""
    swap(monkeypatch)
    with pytest.raises(AssertionError, match=f"{name}: .* misrounded"):
        assert_rounds_like_reference(probes(name), name)
    for trap_name, x, want, wrong in TRAPS:
        if trap_name == name:
            got = float(formats.round_to_format(np.array([x]), get_format(name))[0])
            assert _same(got, wrong), "the swap did not take: round_to_format still rounds once"
            with pytest.raises(AssertionError, match="misrounded"):
                assert_rounds_like_reference([x], name)
            with pytest.raises(AssertionError):
                test_named_edges(name, x, want)


@pytest.mark.parametrize("name", FORMATS)
@settings(max_examples=200, deadline=None)
@given(x=st.floats(allow_nan=False, width=64))
def test_random_float64(name, x):
    assert_rounds_like_reference([x], name)


@pytest.mark.parametrize("name", FORMATS)
@settings(max_examples=200, deadline=None)
@given(data=st.data())
def test_random_near_midpoints(name, data):
    """x a few float64 ulps from a random midpoint: where a rounding that is off by one ulp shows."""
    vals = code_table(name)[0]
    i = data.draw(st.integers(0, len(vals) - 2), label="code index")
    steps = data.draw(st.integers(-3, 3), label="float64 ulps from the midpoint")
    x = (vals[i] + vals[i + 1]) / 2
    for _ in range(abs(steps)):
        x = np.nextafter(x, np.inf if steps > 0 else -np.inf)
    assert_rounds_like_reference([x], name)
