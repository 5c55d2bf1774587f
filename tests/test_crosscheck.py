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
from precision_suite.spec import Case

INITS = ("normal", "lecun_normal(gain=0.5)", "torch_default", "kaiming_normal", "kaiming_normal(gain=1.2)")
ACTIVATIONS = ("identity", "relu", "gelu", "tanh")
FORMATS = ("fp32", "fp16", "bf16", "fp8_e4m3fn", "fp8_e5m2")
SHAPE = {"width": 64, "batch": 16, "depth": 100, "seed": 0}
EVENTS = ("first_overflow", "first_underflow", "first_zero", "first_nan")
MARGIN = 2.0
TENSORS = {"forward": ("pre", "post"), "backward": ("grad", "grad_pre", "wgrad")}
ZERO_TENSORS = {"forward": ("post",), "backward": ("grad", "grad_pre")}

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
    if event == "first_zero":
        return any(_column(result, direction, t, "zero_frac")[i] >= 1 - thr for t in ZERO_TENSORS[direction])
    if event == "first_underflow":
        return any(_column(result, direction, t, "underflow_frac")[i] >= thr / MARGIN for t in TENSORS[direction])
    # overflow, and NaN, which in these chains only comes from inf
    return any(_column(result, direction, t, "amax")[i] >= fmt.max / MARGIN for t in TENSORS[direction])


def disagreements(torch_r, numpy_r, direction: str) -> list[str]:
    """The events of one case pair that differ beyond the margin, as readable lines."""
    out = []
    earliest = max if direction == "backward" else min  # backward events count from depth down
    for event in EVENTS:
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


def _check(pairs, direction: str, fmt: str, activations) -> list[str]:
    bad = []
    for (_, act, f), (t, n) in sorted(pairs.items()):
        if f != fmt or act not in activations:
            continue
        assert t.status == "ok" and n.status == "ok", f"{t.id}: {t.error} / {n.id}: {n.error}"
        if direction == "backward":
            ev = t.forward.events
            if ev.first_overflow is not None or ev.first_nan is not None:
                continue  # not sound: see the module docstring
        bad += disagreements(t, n, direction)
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
