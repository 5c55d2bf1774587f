"""Cross-check (docs/modes.md): torch-emulated and numpy-emulated give the same events.

The two backends share the draws, the event logic and the result model and no arithmetic: each
rounds, reduces and backpropagates with its own code. The matrix is 5 inits x 4 activations x
fp32, fp16, bf16, fp8_e4m3fn, fp8_e5m2 (100 cases per backend), width 64, batch 16, depth 100,
forward and backward; the inits are chosen so that overflow, underflow and dead layers all occur.

**Tolerance: a margin on the statistic, not a number of layers.** The two backends accumulate each
matmul in a different order, so an element whose exact value sits at a rounding boundary can land
on either side; the chains then differ in the last bits and, in chaotic chains (tanh with
sigma_w^2 > 1), those bits grow. An event may therefore sit at another layer only where the backend
that fires later was itself within a factor ``MARGIN`` = 2 of the event's threshold at the layer
where the other fired (``near_threshold``): overflow and NaN (NaN here only comes from inf) -
amax >= max/2; underflow - underflow fraction >= threshold/2; dead - at most a threshold's worth
of nonzero elements. Anywhere else the events must be equal, whatever the distance.

Measured with the committed torch backend over seeds 0-7 (800 forward pairs, 584 backward pairs
with a finite forward pass): forward ``first_overflow`` and ``first_zero`` never differed;
``first_underflow`` differed in 11 pairs (fp16 by 1-2 layers, bf16 GELU by 1-5) with the late
backend at >= 0.78 of the threshold; ``first_nan`` in 8 bf16 pairs by one layer (bf16's max sits at
fp32's edge, so the fp32 accumulator itself overflows, to NaN or to +-inf by summation order).
Backward: ``first_overflow`` moved by 1-9 layers in 6 chaotic tanh fp16 pairs whose gradient amax
hovered at 0.57-0.97 of max for several layers, ``first_nan`` with it, ``first_zero`` by one layer
in 4 pairs (one element of 1024 left), ``first_underflow`` by one layer in 2. Beyond the margin
there was only a torch-side inaccuracy in 1 of 8 seeds (not seed 0): fp16 tanh gradients, whose
fp32 ``1 - tanh(h)^2`` cancels to 0 for |h| > 9. (bf16 GELU weight gradients used to differ by 30-47
layers: the torch backend cast an fp64 layer's weight gradient, ~1e-61, to fp32 — an exact zero
where numpy kept the underflow. Fixed; both now agree to the layer.)
``first_underflow_any`` is a rare-event statistic and is not compared.

Scaled formats (docs/scaled-formats.md): 4 inits x 3 activations x the 8 recipes, and an outliers
input under kaiming_normal, width 128 (fp8_block's weight tiles), batch 16, depth 45. The rule is
the same; the quantized matmul inputs (gemm_in, gemm_w; grad_gemm_in backward) join the tensors it
reads, and ``first_flush`` is compared too (near: the late backend's flush fraction >= threshold/2).
Both quantizers agree bit for bit (tests/test_quantize.py), so the backends differ only where the
chains' products differ: the statistics of a tensor both quantize alike (W_l in every layer, the
input of layer 1) must be equal, those of later layers agree within what a re-rounded product can
move. These run only where the torch backend runs scaled formats.

Backward events are compared only where the forward pass stayed finite (no overflow, no NaN): past
an inf or NaN activation the gradient depends on each library's convention for derivatives at
non-finite points (torch's ReLU passes the gradient through a NaN input, ``numpy_grad`` gives 0),
not on the format. Likewise, where the forward passes die one layer apart (``first_zero`` within
the margin: one element left), a backward event between the two dead layers is not compared: a
layer's weight gradient there is x_{l-1}^T g with x_{l-1} one element in one backend and all zero in
the other (64 underflowed weight-gradient elements against none, on a 2-core AMD EPYC machine).
"""

from __future__ import annotations


import numpy as np
import pytest

from precision_suite.formats import get_format
from precision_suite.runner import run_matrix
from precision_suite.scaled import SCALED_NAMES
from precision_suite.spec import Case

INITS = ("normal", "lecun_normal(gain=0.5)", "torch_default", "kaiming_normal", "kaiming_normal(gain=1.2)")
ACTIVATIONS = ("identity", "relu", "gelu", "tanh")
FORMATS = ("fp32", "fp16", "bf16", "fp8_e4m3fn", "fp8_e5m2")
SHAPE = {"width": 64, "batch": 16, "depth": 100, "seed": 0}
EVENTS = ("first_overflow", "first_underflow", "first_zero", "first_nan")
MARGIN = 2.0
TENSORS = {"forward": ("pre", "post"), "backward": ("grad", "grad_pre", "wgrad")}
ZERO_TENSORS = {"forward": ("post",), "backward": ("grad", "grad_pre")}
GEMM_TENSORS = {"forward": ("gemm_in", "gemm_w"), "backward": ("grad_gemm_in",)}  # scaled formats only

@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """Tensors of 16 x 64: torch's intra-op threads only add synchronisation (on a busy 2-core
    machine they made each op ~100x slower)."""
    torch = pytest.importorskip("torch")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def pairs():
    """{(init, activation, format): (torch CaseResult, numpy CaseResult)} for the whole matrix."""
    cases = [Case(init=i, activation=a, format=f, backend=b, **SHAPE)
             for i in INITS for a in ACTIVATIONS for f in FORMATS for b in ("torch", "numpy")]
    by_key = {}
    for r in run_matrix(cases=cases).cases:
        by_key.setdefault((r.case.init, r.case.activation, r.case.format), {})[r.case.backend] = r
    return {k: (v["torch"], v["numpy"]) for k, v in by_key.items()}


def _column(result, direction: str, tensor: str, stat: str):
    part = getattr(result, direction)
    return np.asarray(getattr(part, tensor)[stat], dtype=np.float64)


def near_threshold(result, direction: str, event: str, layer: int) -> bool:
    """Was ``result`` within a factor MARGIN of ``event``'s threshold at ``layer`` (1-based)?"""
    fmt = get_format(result.case.format)
    thr = result.case.underflow_threshold
    i = layer - 1
    gemm = tuple(t for t in GEMM_TENSORS[direction] if getattr(getattr(result, direction), t) is not None)
    tensors = TENSORS[direction] + gemm
    if event == "first_zero":
        return any(_column(result, direction, t, "zero_frac")[i] >= 1 - thr for t in ZERO_TENSORS[direction])
    if event == "first_flush":
        return _column(result, direction, gemm[0], "flush_frac")[i] >= thr / MARGIN
    if event == "first_underflow":
        return any(_column(result, direction, t, "underflow_frac")[i] >= thr / MARGIN for t in tensors)
    # overflow, and NaN, which in these chains only comes from inf
    return any(_column(result, direction, t, "amax")[i] >= fmt.max / MARGIN for t in tensors)


def disagreements(torch_r, numpy_r, direction: str, events=EVENTS) -> list[str]:
    """The events of one case pair that differ beyond the margin, as readable lines."""
    out = []
    earliest = max if direction == "backward" else min  # backward events count from depth down
    for event in events:
        a, b = (getattr(getattr(r, direction).events, event) for r in (torch_r, numpy_r))
        if a == b:
            continue
        first = earliest(x for x in (a, b) if x is not None)
        if direction == "backward" and _between_dead_layers(torch_r, numpy_r, first):
            continue
        late = numpy_r if a == first else torch_r  # the backend that had not fired by then
        if not near_threshold(late, direction, event, first):
            out.append(f"{torch_r.case.id.replace('-torch-', '-*-')}: {direction} {event} torch={a} numpy={b}")
    return out


def _between_dead_layers(torch_r, numpy_r, layer: int) -> bool:
    """Does ``layer`` lie between the two backends' forward ``first_zero`` when those differ?"""
    zeros = {r.forward.events.first_zero for r in (torch_r, numpy_r)}
    if len(zeros) == 1:
        return False
    depth = torch_r.case.depth
    low, high = sorted(depth + 1 if z is None else z for z in zeros)
    return low <= layer <= high


def _check(pairs, direction: str, fmt: str, activations, events=EVENTS) -> list[str]:
    bad = []
    for (_, act, f, *_), (t, n) in sorted(pairs.items()):
        if f != fmt or act not in activations:
            continue
        assert t.status == "ok" and n.status == "ok", f"{t.id}: {t.error} / {n.id}: {n.error}"
        if direction == "backward":
            ev = t.forward.events
            if ev.first_overflow is not None or ev.first_nan is not None:
                continue  # not sound: see the module docstring
        bad += disagreements(t, n, direction, events)
    return bad


@pytest.mark.parametrize("direction", ["forward", "backward"])
@pytest.mark.parametrize("fmt", FORMATS)
def test_events_agree(pairs, direction, fmt):
    bad = _check(pairs, direction, fmt, set(ACTIVATIONS))
    assert not bad, f"{len(bad)} event(s) differ beyond the margin:\n" + "\n".join(bad)


def test_matrix_exercises_every_event(pairs):
    """The matrix is only a check where events happen: every headline event fires somewhere."""
    fired = {(d, e) for t, _ in pairs.values() for d in ("forward", "backward")
             for e in EVENTS if getattr(getattr(t, d).events, e) is not None}
    assert fired >= {(d, e) for d in ("forward", "backward") for e in EVENTS}


# ---- short chains: every statistic, with norms, residual and bias ----

STAT_RTOL = {"fp32": 1e-6, "fp16": 1e-2, "bf16": 1e-2}


@pytest.mark.parametrize("fmt", sorted(STAT_RTOL))
@pytest.mark.parametrize("norm,residual,bias", [("batchnorm", None, False), ("layernorm", 0.5, False),
                                                ("rmsnorm", None, True), ("none", 1.0, True)])
def test_short_chain_statistics_agree(fmt, norm, residual, bias):
    """Over 6 layers the chains have not drifted: rms, amax and std agree to the format's rounding,
    the element-class fractions to within 2 elements of n = 16 * 32 (accumulation order)."""
    shape = {"width": 32, "batch": 16, "depth": 6, "seed": 3}
    cases = [Case(init="kaiming_normal", activation="gelu", format=fmt, norm=norm, residual=residual, bias=bias,
                  backend=b, **shape) for b in ("torch", "numpy")]
    t, n = run_matrix(cases=cases).cases
    assert t.status == n.status == "ok", (t.error, n.error)
    count = shape["width"] * shape["batch"]
    for direction, tensors in TENSORS.items():
        for tensor in tensors:
            for stat in ("rms", "amax", "std"):
                np.testing.assert_allclose(_column(n, direction, tensor, stat), _column(t, direction, tensor, stat),
                                           rtol=STAT_RTOL[fmt], err_msg=f"{direction} {tensor} {stat}")
            for stat in ("zero_frac", "subnormal_frac", "underflow_frac"):
                diff = np.abs(_column(n, direction, tensor, stat) - _column(t, direction, tensor, stat))
                assert np.nanmax(diff) <= 2 / count, f"{direction} {tensor} {stat}: {diff}"


# ---- scaled formats ----

SCALED_INITS = ("normal", "lecun_normal(gain=0.1)", "kaiming_normal", "kaiming_normal(gain=1.2)")
SCALED_ACTIVATIONS = ("identity", "relu", "gelu")
SCALED_SHAPE = {"width": 128, "batch": 16, "depth": 45, "seed": 0}
SCALED_EVENTS = EVENTS + ("first_flush",)


def _scaled_cases(backend: str) -> list[Case]:
    plain = [Case(init=i, activation=a, format=f, backend=backend, **SCALED_SHAPE)
             for i in SCALED_INITS for a in SCALED_ACTIVATIONS for f in SCALED_NAMES]
    outliers = [Case(init="kaiming_normal", activation=a, format=f, input="outliers", backend=backend, **SCALED_SHAPE)
                for a in ("relu", "gelu") for f in SCALED_NAMES]
    return plain + outliers


@pytest.fixture(scope="module")
def scaled_pairs():
    """{(init, activation, format, input): (torch, numpy)}; skipped where torch runs no scaled format."""
    from precision_suite.engine.support import skip_reason

    reason = skip_reason(_scaled_cases("torch")[0])
    if reason is not None:
        pytest.skip(f"the torch backend does not run scaled formats here: {reason}")
    by_key = {}
    for r in run_matrix(cases=_scaled_cases("torch") + _scaled_cases("numpy")).cases:
        by_key.setdefault((r.case.init, r.case.activation, r.case.format, r.case.input), {})[r.case.backend] = r
    return {k: (v["torch"], v["numpy"]) for k, v in by_key.items()}


@pytest.mark.parametrize("direction", ["forward", "backward"])
@pytest.mark.parametrize("fmt", SCALED_NAMES)
def test_scaled_events_agree(scaled_pairs, direction, fmt):
    bad = _check(scaled_pairs, direction, fmt, set(SCALED_ACTIVATIONS), SCALED_EVENTS)
    assert not bad, f"{len(bad)} event(s) differ beyond the margin:\n" + "\n".join(bad)


def test_scaled_matrix_exercises_every_event(scaled_pairs):
    """Every compared event fires in both passes somewhere in this matrix (measured with the numpy
    backend; the fp32 scales of fp8_tensor, fp8_block and nvfp4 leave fp32 in the decaying chains:
    overflow and NaN without any large value)."""
    fired = {(d, e) for pair in scaled_pairs.values() for r in pair for d in ("forward", "backward")
             for e in SCALED_EVENTS if getattr(getattr(r, d).events, e) is not None}
    assert fired >= {(d, e) for d in ("forward", "backward") for e in SCALED_EVENTS}


def _short_scaled_pair(fmt: str):
    """(torch, numpy) results of a 6-layer chain with layernorm, residual, bias and outliers."""
    from precision_suite.engine.support import skip_reason

    shape = {"width": 128, "batch": 16, "depth": 6, "seed": 3}
    cases = [Case(init="kaiming_normal", activation="gelu", format=fmt, norm="layernorm", residual=0.5, bias=True,
                  input="outliers", backend=b, **shape) for b in ("torch", "numpy")]
    reason = skip_reason(cases[0])
    if reason is not None:
        pytest.skip(f"the torch backend does not run scaled formats here: {reason}")
    t, n = run_matrix(cases=cases).cases
    assert t.status == n.status == "ok", (t.error, n.error)
    return t, n


@pytest.mark.parametrize("fmt", SCALED_NAMES)
def test_statistics_of_the_same_quantized_tensor_are_equal(fmt):
    """gemm_w in every layer (both backends quantize the same rounded W_l) and gemm_in in layer 1
    (the same x_0 and outlier channels): the element fractions exactly equal, the rest to 1e-5 (the
    torch backend accumulates moments in float32, numpy in float64). Both quantizers agree bit for
    bit, so this holds the two statistics codes to the same definitions (saturation included)."""
    t, n = _short_scaled_pair(fmt)
    for tensor, layers in (("gemm_w", slice(None)), ("gemm_in", slice(0, 1))):
        got, want = getattr(t.forward, tensor), getattr(n.forward, tensor)
        assert set(got) == set(want), tensor
        for stat, column in want.items():
            a, b = np.asarray(got[stat])[layers], np.asarray(column)[layers]
            if stat.endswith("_frac"):
                np.testing.assert_array_equal(a, b, err_msg=f"{tensor} {stat}")
            else:
                np.testing.assert_allclose(a, b, rtol=1e-5, err_msg=f"{tensor} {stat}")


@pytest.mark.parametrize("fmt", SCALED_NAMES)
def test_short_scaled_chain_statistics_agree(fmt):
    """Over 6 layers every statistic of the quantized matmul inputs agrees within what a product
    rounded the other way can move: a per-tensor scale 448/amax that moves by an ulp re-rounds
    every element, so qerr within 10%, the element fractions within 1% of the elements, a scale
    within one binade; rms, std and amax within 1%, the mean within 1% of the rms."""
    t, n = _short_scaled_pair(fmt)
    for direction, tensors in GEMM_TENSORS.items():
        for tensor in tensors:
            got, want = getattr(getattr(t, direction), tensor), getattr(getattr(n, direction), tensor)
            assert set(got) == set(want), tensor
            for stat, column in want.items():
                a, b, msg = np.asarray(got[stat]), np.asarray(column), f"{direction} {tensor} {stat}"
                if stat.endswith("_frac"):
                    np.testing.assert_allclose(a, b, rtol=0, atol=0.01, err_msg=msg)
                elif stat.startswith("scale_log2"):
                    np.testing.assert_allclose(a, b, rtol=0, atol=1, err_msg=msg)
                elif stat.startswith("qerr"):
                    np.testing.assert_allclose(a, b, rtol=0.1, err_msg=msg)
                elif stat == "mean":
                    np.testing.assert_allclose(a, b, rtol=0, atol=0.01 * float(np.max(want["rms"])), err_msg=msg)
                else:
                    np.testing.assert_allclose(a, b, rtol=1e-2, err_msg=msg)
