"""The probe on real modules no one here wrote: planted failures found at the right op, the
engine's events reproduced event for event, and bad input refused in one line."""

import math
from dataclasses import replace

import numpy as np
import pytest

from precision_suite import Case, run_case
from precision_suite.formats import get_format, round_to_format

torch = pytest.importorskip("torch")
nn = torch.nn

from precision_suite.draws import LayerDraws, draw_input, draw_seed_grad, parse_input  # noqa: E402
from precision_suite.activations import get_activation  # noqa: E402
from precision_suite.inits import parse_init  # noqa: E402
from precision_suite.probe import ProbeError, probe, watch  # noqa: E402
from precision_suite.probe.run import probe_case  # noqa: E402
from precision_suite.results import Results, load_results, write_json_atomic  # noqa: E402


def _encoder(seed=0, d=64, heads=4):
    torch.manual_seed(seed)
    return nn.TransformerEncoderLayer(d, heads, 2 * d, dropout=0.0, batch_first=True)


def _site(result, event):
    return result.probe["event_sites"].get(event)


# ---------------------------------------------------------------- the engine, event for event

class _Act(nn.Module):
    def __init__(self, name):
        super().__init__()
        self.fn = get_activation(name).torch_fn

    def forward(self, x):
        return self.fn(x)


# The registry's GELU as one op, forward and backward, computing what the engine computes in fp32: its
# forward is the registry's expression, its backward the ops autograd runs for that expression
# (derivatives.yaml: mul, erfc, neg), in the same order, so each is rounded once, as in the engine.
_GELU = get_activation("gelu").torch_fn


@torch.library.custom_op("precision_suite_tests::gelu", mutates_args=())
def _gelu_one_op(x: torch.Tensor) -> torch.Tensor:
    return _GELU(x)


@torch.library.custom_op("precision_suite_tests::gelu_backward", mutates_args=())
def _gelu_one_op_backward(g: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    c = -x * math.sqrt(0.5)
    ga, gd = g * torch.special.erfc(c), g * (0.5 * x)
    gc = (-2.0 / math.sqrt(math.pi)) * torch.exp(-(c.pow(2))) * gd
    return -(gc * math.sqrt(0.5)) + ga * 0.5


def _gelu_setup(ctx, inputs, output):
    ctx.save_for_backward(inputs[0])


_gelu_one_op.register_autograd(lambda ctx, g: _gelu_one_op_backward(g, ctx.saved_tensors[0]),
                               setup_context=_gelu_setup)


class _OneOpGelu(nn.Module):
    def forward(self, x):
        return _gelu_one_op(x)


def _sequential(case, one_op_gelu=False):
    """The engine's chain as nn.Sequential: weights drawn as the engine draws them, rounded to the format."""
    fmt = get_format(case.format)
    x0 = draw_input(parse_input(case.input), case.seed, case.batch, case.width)
    layers = []
    for w64, _ in LayerDraws(parse_init(case.init), case.seed, case.width, case.depth, False):
        lin = nn.Linear(case.width, case.width, bias=False)
        with torch.no_grad():
            lin.weight.copy_(torch.from_numpy(round_to_format(w64, fmt).astype(np.float32)))
        layers += [lin, _OneOpGelu() if one_op_gelu and case.activation == "gelu" else _Act(case.activation)]
    return nn.Sequential(*layers), torch.from_numpy(round_to_format(x0, fmt).astype(np.float32))


def _take(cols, rows):
    return {k: None if v is None else np.asarray(v)[rows] for k, v in cols.items()}


def _chain_view(r, depth):
    """A probe result read as the engine's chain. Probe layer 1 is the input rounded on entry (the
    engine's input block); Linear l (module 2l-2) -> pre_l, activation l (module 2l-1) -> post_l,
    the last op of each (pre_l itself for identity, which runs no op)."""
    modules = [n.split(":")[0] for n in r.probe["layer_names"]]
    last = {m: i for i, m in enumerate(modules)}
    pre = np.array([last[str(2 * i)] for i in range(depth)])
    post = np.array([last.get(str(2 * i + 1), p) for i, p in enumerate(pre)])
    f, b = r.forward.post, r.backward
    return {"input": {k: None if v is None else float(np.asarray(v)[0]) for k, v in f.items()},
            "forward": {"pre": _take(f, pre), "post": _take(f, post)},
            "backward": {"grad": _take(b.grad, post), "grad_pre": _take(b.grad, pre), "wgrad": _take(b.wgrad, pre)}}


def _engine_view(e):
    return {"input": e.forward.input, "forward": {"pre": e.forward.pre, "post": e.forward.post},
            "backward": {"grad": e.backward.grad, "grad_pre": e.backward.grad_pre, "wgrad": e.backward.wgrad}}


def _events(view, direction, threshold):
    from precision_suite.stats import backward_events, forward_events

    t = view[direction]
    if direction == "forward":
        return forward_events(t["pre"], t["post"], threshold)
    return backward_events(t["grad"], t["grad_pre"], t["wgrad"], threshold)


def _assert_same(probe_cols, engine_cols, what, layers=slice(None), skip=(), moments_rtol=0.0, inherited=None):
    """Every statistic equal, bit for bit (NaN equal NaN); ``moments_rtol`` for rms/mean/std. Where
    ``inherited`` (per layer) an operand held inf: the probe's overflow_frac counts only what the op made."""
    for stat, e in engine_cols.items():
        if stat in skip or e is None:
            continue
        a, b = np.asarray(probe_cols[stat], dtype=float)[layers], np.asarray(e, dtype=float)[layers]
        if stat == "overflow_frac" and inherited is not None:
            assert np.all(a[inherited] <= b[inherited]), f"{what}.{stat}"
            a, b = a[~inherited], b[~inherited]
        if moments_rtol and stat in ("rms", "mean", "std"):
            np.testing.assert_allclose(a, b, rtol=moments_rtol, err_msg=f"{what}.{stat}")
        else:
            np.testing.assert_array_equal(a, b, err_msg=f"{what}.{stat}")


def _near(view, direction, event, layer, fmt, threshold):
    """Within a factor 2 of ``event``'s threshold at ``layer``: the cross-check's margin
    (tests/test_crosscheck.py), for passes whose values differ by rounding."""
    i = layer - 1
    tensors = view[direction]
    if event == "first_zero":
        return any(np.asarray(tensors[t]["zero_frac"])[i] >= 1 - threshold for t in tensors if t != "wgrad")
    if event == "first_underflow":
        return any(np.asarray(tensors[t]["underflow_frac"])[i] >= threshold / 2 for t in tensors)
    return any(np.asarray(tensors[t]["amax"])[i] >= fmt.max / 2 for t in tensors)


def _assert_events_within_margin(pv, ev, direction, fmt, threshold):
    a, b = _events(pv, direction, threshold), _events(ev, direction, threshold)
    for event in ("first_overflow", "first_nan", "first_underflow", "first_zero"):
        x, y = getattr(a, event), getattr(b, event)
        if x == y:
            continue
        first = (max if direction == "backward" else min)(v for v in (x, y) if v is not None)
        late = ev if x == first else pv
        assert _near(late, direction, event, first, fmt, threshold), f"{direction} {event}: probe {x}, engine {y}"


def _rounded(t, fmt):
    return t.to(fmt.torch_dtype()).float()  # fp16/bf16: one correct rounding from fp32


def _hand_forward(model, x, fmt, act):
    """The probe's forward written out by hand: every op's fp32 result rounded. (pre, post) per layer."""
    out, h = [], x
    with torch.no_grad():
        for lin in model[::2]:
            pre = _rounded(h @ lin.weight.T, fmt)
            if act == "gelu5":  # the registry's 0.5 * x * erfc(-x * sqrt(0.5)) as five ops, each rounded
                half, neg = _rounded(pre * 0.5, fmt), _rounded(-pre, fmt)
                h = _rounded(half * _rounded(torch.special.erfc(_rounded(neg * math.sqrt(0.5), fmt)), fmt), fmt)
            else:
                h = _rounded(get_activation(act).torch_fn(pre), fmt)
            out.append((pre, h))
    return out


CHAIN_ACTIVATIONS = ("identity", "relu", "gelu", "tanh", "sigmoid", "silu")
# fp16 normal overflows within a few layers (inherited infinities follow); lecun(gain=0.5) underflows and
# dies; bf16 normal(std=8) overflows fp32 itself (bf16's range is fp32's) at layer ~20
CHAIN_SETTINGS = (("fp16", "normal"), ("fp16", "lecun_normal(gain=0.5)"), ("bf16", "normal(mean=0,std=8)"))
# which of the engine's values the probe reproduces (the test's docstring says why)
_SAME_VALUES = {("identity", "fp16"), ("identity", "bf16"), ("relu", "fp16"), ("relu", "bf16"), ("silu", "fp16"),
                ("gelu", "fp16")}
_SAVED_OUTPUT = {("tanh", "fp16"), ("tanh", "bf16"), ("sigmoid", "fp16")}
# identity's post is the matmul's op: the engine's post (and grad_pre) re-read rounded values as exact
_IDENTITY_EXACT_STATS = ("underflow_frac", "flush_frac", "subnormal_frac", "exact_amax", "exact_q")
# statistics of a tensor's smallest elements: where fp32 itself underflows they differ from fp64's
_TAIL_STATS = ("amin_nonzero", "zero_frac", "flush_frac", "underflow_frac", "subnormal_frac", "exact_q")
FP32_TINY = float(torch.finfo(torch.float32).tiny)


@pytest.fixture(scope="module")
def one_torch_thread():
    """16 x 64 tensors: intra-op threads only add synchronisation on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("fmt_name, init", CHAIN_SETTINGS)
@pytest.mark.parametrize("activation", CHAIN_ACTIVATIONS)
def test_sequential_chain_equals_the_engine(one_torch_thread, activation, fmt_name, init):
    """nn.Sequential(Linear, activation, ...) of the engine's draws, parameters and input rounded on entry,
    the default loss sum(out * g): the probe reproduces the engine's statistics and events. Where they
    differ, the difference is stated and checked against a computation written out by hand:

    * identity runs no op: the probe's post_l is its pre_l, whose exact value is the matmul's; the
      engine's post_l is an identity over the rounded pre_l, whose exact value is already rounded (so it
      underflows and flushes nothing); likewise grad_pre, the rounded grad passed on;
    * tanh, sigmoid: autograd saves their output, which the probe rounded (as fp16 training does):
      grad_pre = g * phi'(y) with the rounded y, the engine's with the exact y, from the top layer down;
    * gelu runs here as one op holding the registry's expression (``_gelu_one_op``), as the engine
      rounds it; as five ops, see ``test_the_registry_gelu_is_five_rounded_ops``;
    * bf16: the engine evaluates activations in fp64, the probe in the model's fp32: rms/mean/std agree
      to 1e-6; where fp32 itself underflows (sigmoid(x) is 0 below x = -88.7, silu and gelu with it) the
      probe's exact value is fp32's and the engine's fp64's, so the statistics of the smallest elements
      differ, by no more than the elements fp32 holds below its smallest normal;
    * after an overflow the engine counts an exact value that is inf because an operand was as overflow;
      the probe counts only what each op made, so its overflow_frac there is a subset of the engine's.
    Values that differ by rounding must give events within the cross-check's factor-2 margin; values
    that agree must give equal events."""
    fmt = get_format(fmt_name)
    case = Case(init=init, activation=activation, format=fmt_name, width=64, depth=24, batch=16)
    engine = run_case(case)
    model, x = _sequential(case, one_op_gelu=True)
    r = probe_case(model, x, fmt_name, "emulated", seed=case.seed)
    thr, key = case.underflow_threshold, (activation, fmt_name)
    pv, ev = _chain_view(r, case.depth), _engine_view(engine)
    rtol = 1e-6 if fmt_name == "bf16" else 0.0
    # rounded on entry: the probe's input layer is the engine's input block
    assert r.probe["layer_names"][0] == "(input):args[0]"
    _assert_same({k: [v] for k, v in pv["input"].items()}, {k: [v] for k, v in ev["input"].items()}, "input",
                 moments_rtol=rtol)
    # the probe computes what a forward written out by hand computes, every op rounded
    hand = _hand_forward(model, x, fmt, activation)
    np.testing.assert_array_equal(pv["forward"]["pre"]["amax"], [float(p.abs().max()) for p, _ in hand])
    np.testing.assert_array_equal(pv["forward"]["post"]["amax"], [float(h.abs().max()) for _, h in hand])
    _assert_same(pv["forward"]["pre"], ev["forward"]["pre"], "pre", layers=slice(0, 1), moments_rtol=rtol)
    top = slice(case.depth - 1, case.depth)
    _assert_same(pv["backward"]["grad"], ev["backward"]["grad"], "grad", layers=top, moments_rtol=rtol)

    if key not in _SAME_VALUES | _SAVED_OUTPUT:  # bf16 gelu, silu, sigmoid: fp32's tail against fp64's
        pre, _ = hand[0]
        tiny = float((get_activation(activation).torch_fn(pre).abs() < FP32_TINY).float().mean())
        p1, e1 = pv["forward"]["post"], ev["forward"]["post"]
        _assert_same(p1, e1, "post", layers=slice(0, 1), skip=_TAIL_STATS, moments_rtol=rtol)
        assert tiny > 0 and abs(p1["zero_frac"][0] - e1["zero_frac"][0]) <= tiny
        assert abs(p1["flush_frac"][0] - e1["flush_frac"][0]) <= tiny
        for direction in ("forward", "backward"):
            _assert_events_within_margin(pv, ev, direction, fmt, thr)
        return

    skip = _IDENTITY_EXACT_STATS if activation == "identity" else ()
    overflowed = engine.forward.events.first_overflow
    after = np.arange(1, case.depth + 1) >= (overflowed or case.depth + 1)
    _assert_same(pv["forward"]["pre"], ev["forward"]["pre"], "pre", moments_rtol=rtol, inherited=after)
    _assert_same(pv["forward"]["post"], ev["forward"]["post"], "post", skip=skip, moments_rtol=rtol, inherited=after)
    assert _events(pv, "forward", thr) == engine.forward.events
    if activation == "identity":
        for direction, tensor in (("forward", "post"), ("backward", "grad_pre")):
            assert not np.any(ev[direction][tensor]["underflow_frac"]) and not np.any(ev[direction][tensor]["flush_frac"])

    if key in _SAVED_OUTPUT:
        pre, y = hand[-1]
        g = torch.from_numpy(round_to_format(draw_seed_grad(case.seed, case.batch, case.width), fmt)
                             .astype(np.float32))
        slope = (lambda y: 1 - y * y) if activation == "tanh" else (lambda y: (1 - y) * y)
        exact_probe, exact_engine = g * slope(y), g * slope(get_activation(activation).torch_fn(pre))
        gp, ge = pv["backward"]["grad_pre"], ev["backward"]["grad_pre"]
        assert gp["exact_amax"][-1] == pytest.approx(float(exact_probe.abs().max()), rel=1e-6)
        assert gp["zero_frac"][-1] == float((_rounded(exact_probe, fmt) == 0).float().mean())
        assert ge["exact_amax"][-1] == pytest.approx(float(exact_engine.abs().max()), rel=1e-6)
        _assert_events_within_margin(pv, ev, "backward", fmt, thr)
        return

    for tensor in ("grad", "grad_pre", "wgrad"):
        _assert_same(pv["backward"][tensor], ev["backward"][tensor], tensor, moments_rtol=rtol,
                     skip=skip if tensor == "grad_pre" else (),
                     inherited=np.isinf(np.asarray(ev["backward"][tensor]["exact_amax"], dtype=float)))
    probe_bwd, engine_bwd = _events(pv, "backward", thr), engine.backward.events
    if probe_bwd.first_overflow != engine_bwd.first_overflow:  # inherited infinities, see the docstring
        layer = engine_bwd.first_overflow
        assert overflowed is not None
        assert any(np.isinf(ev["backward"][t]["exact_amax"][layer - 1]) for t in ev["backward"])
        assert probe_bwd.first_overflow is None or probe_bwd.first_overflow < layer
        probe_bwd = replace(probe_bwd, first_overflow=layer, failure=engine_bwd.failure)
    assert probe_bwd == engine_bwd


@pytest.mark.parametrize("init", ["normal", "lecun_normal(gain=0.5)"])
def test_the_registry_gelu_is_five_rounded_ops(one_torch_thread, init):
    """The registry's GELU written as Python, ``0.5 * x * erfc(-x * sqrt(0.5))``, is five aten ops: the
    probe rounds each (as a model computing GELU this way in fp16 does) where the engine rounds GELU
    once. Layer 1's output is checked against the five roundings by hand and the engine's against one;
    forward events stay within the cross-check's margin. Backward the five ops' gradients are rounded
    term by term, so gradients near fp16's subnormals vanish earlier than in the engine (in the
    lecun(gain=0.5) chain its grad_pre dies two layers higher): backward events are not compared here,
    the one-op GELU above compares them."""
    fmt = get_format("fp16")
    case = Case(init=init, activation="gelu", format="fp16", width=64, depth=24, batch=16)
    engine = run_case(case)
    model, x = _sequential(case)
    r = probe_case(model, x, "fp16", "emulated", seed=case.seed)
    assert [n.split(":")[1] for n in r.probe["layer_names"][2:7]] == ["mul", "neg", "mul", "erfc", "mul"]
    pv = _chain_view(r, case.depth)
    hand = _hand_forward(model, x, fmt, "gelu5")
    np.testing.assert_array_equal(pv["forward"]["post"]["amax"], [float(h.abs().max()) for _, h in hand])
    once = _rounded(_GELU(hand[0][0]), fmt)
    assert engine.forward.post["amax"][0] == float(once.abs().max())
    assert not torch.equal(once, hand[0][1])  # the five roundings do change values
    _assert_events_within_margin(pv, _engine_view(engine), "forward", fmt, case.underflow_threshold)


def test_the_chain_settings_cover_every_event():
    """The equivalence is only a check where events happen: the settings above make every headline
    event fire in the engine, forward and backward, inherited infinities included."""
    fired = set()
    for act in ("identity", "relu"):
        for fmt_name, init in CHAIN_SETTINGS:
            e = run_case(Case(init=init, activation=act, format=fmt_name, width=64, depth=24, batch=16))
            fired |= {(d, k) for d in ("forward", "backward") for k in ("first_overflow", "first_nan",
                      "first_underflow", "first_zero") if getattr(getattr(e, d).events, k) is not None}
    assert fired >= {("forward", "first_overflow"), ("forward", "first_nan"), ("forward", "first_underflow"),
                     ("backward", "first_overflow"), ("backward", "first_nan"), ("backward", "first_zero")}


def test_a_planted_chain_failure_is_reproduced():
    """The equivalence above must cover real events: N(0,1) weights overflow fp16 within a few layers."""
    case = Case(init="normal", activation="relu", format="fp16", width=64, depth=10, batch=16)
    model, x = _sequential(case)
    r = probe_case(model, x, "fp16", "emulated")
    engine_layer = run_case(case).forward.events.first_overflow
    assert engine_layer is not None
    assert r.forward.events.first_overflow == 2 * engine_layer  # the input is layer 1, Linear l layer 2l
    assert _site(r, "first_overflow")["name"] == f"{2 * engine_layer - 2}:mm"


# ---------------------------------------------------------------- planted failures in real modules

def test_fp16_attention_score_overflow_is_named_at_the_score_matmul():
    """Inputs scaled by 300: projections stay below 65504 (|q| ~ 800), their products do not."""
    model, x = _encoder(), torch.randn(2, 16, 64, generator=torch.Generator().manual_seed(1)) * 300
    res = probe(model, x, formats=("fp16", "bf16"), modes=("emulated",))
    fp16, bf16 = res.cases
    site = _site(fp16, "first_overflow")
    assert site["name"] == "self_attn:bmm"
    assert fp16.probe["layer_names"][site["layer"] - 2:site["layer"]] == ["self_attn:mul", "self_attn:bmm"]
    assert fp16.failure == {"direction": "forward", "layer": site["layer"], "kind": "overflow"}
    assert abs(site["value"]) >= get_format("fp16").overflow_threshold and site["headroom_bits"] < 0
    assert _site(fp16, "first_nonfinite")["layer"] == site["layer"]  # the producer, not softmax downstream
    assert fp16.forward.events.first_nan == site["layer"] + 1  # softmax of inf
    # the same score, checked independently in fp32: max |q k^T| / sqrt(d_head) with q, k scaled by sqrt
    assert site["value"] == pytest.approx(_max_score(model, x), rel=1e-2)
    assert bf16.failure is None and _site(bf16, "first_overflow") is None
    assert "math" == fp16.case.attention


def test_least_headroom_and_the_overflow_site_are_one_figure():
    """Headroom is log2(T_of / M), M the largest exact magnitude the op made: at the overflowing score
    matmul the event site and least_headroom give the same bits, those of the score checked in fp32."""
    model, x = _encoder(), torch.randn(2, 16, 64, generator=torch.Generator().manual_seed(1)) * 300
    r = probe(model, x, formats="fp16", modes="emulated").cases[0]
    site, least = _site(r, "first_overflow"), r.probe["least_headroom"]
    assert (least["layer"], least["name"], least["side"]) == (site["layer"], "self_attn:bmm", "forward")
    assert least["bits"] == site["headroom_bits"]
    t_of = get_format("fp16").overflow_threshold
    assert least["bits"] == pytest.approx(math.log2(t_of / _max_score(model, x)), abs=2e-2)


def test_loss_scale_advice_after_nan_gradients_claims_no_safety():
    """The score matmul overflows, softmax goes NaN and so do the gradients below it: the advice must
    not say a scale fits (it said 'no loss scaling is needed': exact_amax reads NaN as 0)."""
    model, x = _encoder(), torch.randn(2, 16, 64, generator=torch.Generator().manual_seed(1)) * 300
    r = probe(model, x, formats="fp16", modes="emulated").cases[0]
    assert r.backward.events.first_nan is not None
    advice = r.backward.loss_scale
    assert advice["recommended"] is None and advice["max_safe_scale"] is None
    layer = _site(r, "first_overflow")["layer"]
    assert f"after the forward pass overflowed at layer {layer}" in advice["verdict"]
    assert "fits" not in advice["verdict"] and "no loss scaling is needed" not in advice["verdict"]


def test_least_headroom_without_a_failure_reads_exact_values():
    """Nothing fails: the figure is the largest exact (pre-rounding) output over the layers, from a
    float64 forward written out by hand; the rounded amax would be off by up to 2^-11 relative."""
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
    x = torch.randn(8, 32, generator=torch.Generator().manual_seed(4)) * 100
    r = probe(model, x, formats="fp16", modes="emulated", backward=False).cases[0]
    assert r.failure is None
    fp16 = lambda a: a.astype(np.float16).astype(np.float64)  # noqa: E731
    h, largest = fp16(x.numpy().astype(np.float64)), 0.0
    largest = np.abs(x.numpy().astype(np.float64)).max()  # the input layer: its exact value is the input
    for m in model:
        if isinstance(m, nn.Linear):
            exact = h @ fp16(m.weight.detach().numpy()).T + fp16(m.bias.detach().numpy())
            largest, h = max(largest, np.abs(exact).max()), fp16(exact)
        else:
            h = np.maximum(h, 0)
    t_of = get_format("fp16").overflow_threshold
    assert r.probe["least_headroom"]["bits"] == pytest.approx(math.log2(t_of / largest), abs=1e-5)


def test_an_input_already_past_the_range_is_named_as_the_overflow_site():
    """fp16, inputs x1e5: rounding on entry makes them inf. The input is layer 1, named as such; the
    value is the largest input and the first model op inherits the inf (NaN there, not an overflow)."""
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 10))
    x = torch.randn(8, 32, generator=torch.Generator().manual_seed(4)) * 1e5
    fp16, bf16 = probe(model, x, formats=("fp16", "bf16"), modes="emulated").cases
    site = _site(fp16, "first_overflow")
    assert (site["layer"], site["name"]) == (1, "(input):args[0]") and fp16.probe["layer_names"][0] == site["name"]
    assert fp16.failure == {"direction": "forward", "layer": 1, "kind": "overflow"}
    largest = float(x.abs().max())
    assert abs(site["value"]) == largest and site["headroom_bits"] == pytest.approx(
        math.log2(get_format("fp16").overflow_threshold / largest))
    assert _site(fp16, "first_nonfinite")["layer"] == 1 and fp16.forward.events.first_nan == 2
    assert bf16.failure is None and bf16.probe["layer_names"][0] == "(input):args[0]"
    kw = probe(nn.Linear(32, 4), {"input": x}, formats="fp16", modes="emulated").cases[0]
    assert _site(kw, "first_overflow")["name"] == "(input):kwargs['input']"


@pytest.mark.parametrize("mode", ["emulated", "autocast", "native"])
def test_a_parameter_already_past_the_range_is_named_where_it_is_first_used(mode):
    """fp16, one weight of the second Linear planted at 1e5: the format cannot hold it, so it is the
    overflow site, as the layer ``(param):2.weight`` just before ``2:addmm`` consumes it (its value,
    its headroom log2(T_of / 1e5)); the addmm inherits the inf and is no overflow. In bf16 the
    weight fits: no such layer, no failure, and the other layers' names are unchanged."""
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 10))
    planted = 1e5
    with torch.no_grad():
        model[2].weight[3, 5] = -planted
    x = torch.randn(8, 32, generator=torch.Generator().manual_seed(4))
    fp16, bf16 = probe(model, x, formats=("fp16", "bf16"), modes=mode).cases
    names = fp16.probe["layer_names"]
    at = names.index("(param):2.weight") + 1
    assert names[at] == "2:addmm" and [n for n in names if n.startswith("(param)")] == ["(param):2.weight"]
    site = _site(fp16, "first_overflow")
    fi = np.finfo(np.float16)
    t_of = float(fi.max) + float(fi.eps) * 2.0 ** (fi.maxexp - 1) / 2  # max + half an ulp at max
    assert (site["layer"], site["name"], site["value"]) == (at, "(param):2.weight", -planted)
    assert site["headroom_bits"] == pytest.approx(math.log2(t_of / planted))
    assert fp16.failure == {"direction": "forward", "layer": at, "kind": "overflow"}
    assert _site(fp16, "first_nonfinite")["layer"] == at
    assert fp16.forward.pre["overflow_frac"][at] == 0  # the addmm made no overflow: it inherited one
    assert fp16.probe["least_headroom"]["layer"] == at
    assert bf16.failure is None and names[:at - 1] + names[at:] == bf16.probe["layer_names"]
    assert float(model[2].weight[3, 5].detach()) == -planted  # the caller's model is left alone


@pytest.mark.parametrize("mode", ["emulated", "autocast", "native"])
@pytest.mark.parametrize("side", ["below", "at"])
def test_a_parameter_is_past_the_range_exactly_from_the_overflow_threshold(mode, side):
    """T_of = max + half an ulp (from numpy's finfo) rounds to inf in fp16 (ties to even); the
    float32 just below it rounds to max. Only the first makes the weight a layer and a failure."""
    fi = np.finfo(np.float16)
    t_of = np.float32(float(fi.max) + float(fi.eps) * 2.0 ** (fi.maxexp - 1) / 2)
    value = t_of if side == "at" else np.nextafter(t_of, np.float32(0))
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))
    with torch.no_grad():
        model[0].weight[1, 2] = float(value)
    r = probe(model, torch.randn(2, 8) * 1e-3, formats="fp16", modes=mode, backward=False).cases[0]
    past = [n for n in r.probe["layer_names"] if n.startswith("(param)")]
    if side == "at":
        assert past == ["(param):0.weight"] and _site(r, "first_overflow")["value"] == float(value)
    else:
        assert past == [] and r.failure is None


@pytest.mark.parametrize("mode", ["emulated", "native"])
def test_a_buffer_past_the_range_is_named_too(mode):
    """Batch norm's running_var at 1e6 in fp16 (eval mode): the consuming op divides by sqrt(inf) and
    makes no inf at all, so without the buffer's own layer nothing would fail."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU())
    with torch.no_grad():
        model[1].running_var[2] = 1e6
    r = probe(model, torch.randn(2, 3, 8, 8), formats="fp16", modes=mode, backward=False).cases[0]
    site = _site(r, "first_overflow")
    assert (site["name"], site["value"]) == ("(buffer):1.running_var", 1e6)
    assert r.probe["layer_names"][site["layer"]].startswith("1:") and r.failure["layer"] == site["layer"]


def test_watch_emulated_rounds_the_parameters_and_inputs_for_the_block_and_restores_them():
    """Inside the block every weight the model computes with is its fp16 rounding (numpy's cast),
    the input is a layer of its own; after it, the user's parameters are bit-identical to before."""
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 4))
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    seen = {}
    model[2].register_forward_pre_hook(lambda mod, args: seen.update(w=mod.weight.detach().clone()))
    x = torch.randn(8, 16, generator=torch.Generator().manual_seed(2)) / 3
    with watch(model, "fp16", "emulated") as w:
        model(x).square().sum().backward()
    r = w.result()
    want = before["2.weight"].numpy().astype(np.float16).astype(np.float32)
    assert np.array_equal(seen["w"].numpy(), want) and not np.array_equal(want, before["2.weight"].numpy())
    assert r.probe["layer_names"][0] == "(input):args[0]"
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert model[0].weight.grad is not None


def test_watch_emulated_keeps_an_optimizer_step_taken_inside_the_block():
    """An SGD step inside the block moves the rounded weights (an op like any other there, so it is
    emulated too); on exit that move is applied to the exact weights: the step is kept and the
    rounding on entry is not. (docs/probe.md asks for the step after the block.)"""
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 4))
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with watch(model, "fp16", "emulated"):
        model(torch.randn(8, 16)).square().sum().backward()
        opt.step()
        inside = {k: v.detach().clone() for k, v in model.named_parameters()}
    for k, p in model.named_parameters():
        b = before[k].numpy().astype(np.float64)
        moved = inside[k].numpy().astype(np.float64) - b.astype(np.float16).astype(np.float64)
        assert np.abs(moved).max() > 0
        assert np.allclose(p.detach().numpy(), b + moved, rtol=0, atol=1e-7), k


def test_bf16_overflowing_fp32_itself_is_an_overflow():
    """bf16's range is fp32's: an op whose fp32 result is inf from finite inputs overflowed (its exact
    value is past T_of); it is the overflow site, at -inf bits, not a NaN further on."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64))
    with torch.no_grad():
        model[0].weight.mul_(1e37)
    x = torch.randn(4, 64, generator=torch.Generator().manual_seed(0)) * 1e3
    with torch.no_grad():
        assert torch.isinf(model[0](x)).any() and torch.isfinite(x).all()  # fp32 itself overflows
    r = probe(model, x, formats="bf16", modes="emulated").cases[0]
    site = _site(r, "first_overflow")
    assert (site["layer"], site["name"], site["headroom_bits"]) == (2, "0:addmm", -math.inf)
    assert r.failure == {"direction": "forward", "layer": 2, "kind": "overflow"}
    assert r.probe["least_headroom"]["bits"] == -math.inf and r.probe["least_headroom"]["layer"] == 2
    assert Results((r,), {}).to_dict()["cases"][0]["least_headroom"]["bits"] == "-inf"  # the schema's encoding


def _max_score(model, x):
    with torch.no_grad():
        d = model.self_attn.embed_dim
        h = model.self_attn.num_heads
        qkv = x @ model.self_attn.in_proj_weight.T + model.self_attn.in_proj_bias
        q, k = qkv[..., :d], qkv[..., d:2 * d]
        q = q.reshape(2, 16, h, d // h).transpose(1, 2)
        k = k.reshape(2, 16, h, d // h).transpose(1, 2)
        return float((q @ k.transpose(-1, -2)).abs().max() / math.sqrt(d // h))


@pytest.mark.parametrize("mask_kind", ["float", "bool"])
def test_a_minus_inf_attention_mask_is_not_an_overflow(mask_kind):
    model, x = _encoder(), torch.randn(2, 16, 64, generator=torch.Generator().manual_seed(2))
    causal = torch.triu(torch.ones(16, 16, dtype=torch.bool), 1)
    mask = causal if mask_kind == "bool" else torch.zeros(16, 16).masked_fill(causal, float("-inf"))
    res = probe(model, (x, mask), formats=("fp16",), modes=("emulated", "autocast"))
    for r in res.cases:
        assert r.status == "ok"
        assert r.forward.events.first_overflow is None, r.probe["event_sites"]
        assert r.failure is None
        assert "first_nonfinite" not in r.probe["event_sites"]
    emulated = res.cases[0]
    # the mask did reach the scores: some layer holds -inf (the masked scores)
    assert max(np.asarray(emulated.forward.post["inf_frac"])) > 0


def _cnn():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(8, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2))


def test_cnn_layers_are_named_by_module_and_a_planted_conv_overflow_is_found():
    model = _cnn()
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    ok = probe(model, x, formats="fp16", modes="emulated").cases[0]
    modules = [n.split(":")[0] for n in ok.probe["layer_names"]]
    assert modules[:2] == ["(input)", "0"] and {"1", "2", "3", "4", "5", "7"} <= set(modules)
    assert ok.failure is None
    # conv output amax equals an independent fp32 forward, rounded
    with torch.no_grad():
        ref = model[0](x.half().float()).half().float().abs().max()
    assert ok.forward.post["amax"][1] == pytest.approx(float(ref), rel=1e-3)
    with torch.no_grad():
        model[0].weight.mul_(3e4)  # weights up to ~6e3 still fit fp16; their sums of 27 products do not
    big = probe(model, x, formats="fp16", modes="emulated").cases[0]
    assert _site(big, "first_overflow")["name"] == "0:convolution"
    assert big.failure["layer"] == 2


def test_mlp_of_default_linears_matches_a_manual_rounded_forward():
    """nn.Linear's own init; per-layer amax against a forward written out by hand (numpy, fp16 casts)."""
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
    x = torch.randn(8, 32, generator=torch.Generator().manual_seed(4))
    r = probe(model, x, formats="fp16", modes="emulated").cases[0]
    h = x.numpy().astype(np.float16).astype(np.float32)
    amax = []
    for m in model:
        if isinstance(m, nn.Linear):
            w = m.weight.detach().numpy().astype(np.float16).astype(np.float32)
            b = m.bias.detach().numpy().astype(np.float16).astype(np.float32)
            h = (h @ w.T + b).astype(np.float16).astype(np.float32)  # addmm rounds once: product + bias
        else:
            h = np.maximum(h, 0)
        amax.append(np.abs(h).max())
    names = r.probe["layer_names"]
    assert [n.split(":")[0] for n in names] == ["(input)", "0", "1", "2", "3", "4"]
    np.testing.assert_allclose(r.forward.post["amax"][1:], amax, rtol=2e-3)  # fp16 ulp: 2^-10
    assert r.failure is None and r.backward is not None and r.backward.loss_scale["recommended"] == 1.0


def _mlp(seed=3):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 64), nn.GELU(), nn.Linear(64, 10))


@pytest.mark.parametrize("fmt_name", ["fp16", "bf16"])
def test_native_mode_runs_the_kernels_and_judges_them_against_fp32(fmt_name):
    """model.to(dtype) on the CPU's own kernels: the same ops as emulated mode, values within the
    format's rounding of it; planted weights x1e5 overflow fp16's addmm kernel to inf, and the site's
    value is that addmm recomputed in fp32 from the kernel's own fp16 operands (written out here)."""
    model, fmt = _mlp(), get_format(fmt_name)
    x = torch.randn(8, 32, generator=torch.Generator().manual_seed(4))
    emulated, native = probe(model, x, formats=fmt_name, modes=("emulated", "native")).cases
    assert native.status == "ok" and native.case.mode == "native" and native.failure is None
    assert native.probe["layer_names"] == emulated.probe["layer_names"]
    assert set(native.probe["layer_formats"]) == {fmt_name}
    np.testing.assert_allclose(native.forward.post["amax"], emulated.forward.post["amax"], rtol=4 * fmt.eps)
    np.testing.assert_allclose(native.backward.grad["amax"][1:], emulated.backward.grad["amax"][1:], rtol=0.05)
    with torch.no_grad():
        model[0].weight.mul_(1e5)  # weights up to ~2e4 still fit fp16; their sums do not
    big = probe(model, x, formats=fmt_name, modes="native").cases[0]
    if fmt_name == "bf16":
        assert big.failure is None
        return
    site = _site(big, "first_overflow")
    assert (site["layer"], site["name"]) == (2, "0:addmm") and big.failure["layer"] == 2
    lin = model[0]
    with torch.no_grad():  # the kernel's operands are fp16; its exact value is the op on them, in fp32
        exact = torch.addmm(lin.bias.half().float(), x.half().float(), lin.weight.half().float().T)
    assert abs(site["value"]) == pytest.approx(float(exact.abs().max()), rel=1e-6)
    assert float(exact.abs().max()) > fmt.overflow_threshold


def test_native_mode_skips_a_case_whose_op_has_no_kernel_and_names_the_op():
    """fp8 on the CPU: torch has fp8 matmuls there but no fp8 ReLU. The case is skipped, never dropped,
    and the reason names the model's op; where torch has the kernel, the case runs."""
    x = torch.randn(8, 32, generator=torch.Generator().manual_seed(4))
    r = probe(_mlp(), x, formats="fp8_e4m3fn", modes="native").cases[0]
    try:
        torch.relu(torch.zeros(2, dtype=torch.float8_e4m3fn))
    except NotImplementedError:
        assert r.status == "skipped"
        assert r.skip_reason.startswith("native fp8_e4m3fn cannot run here: 1:relu has no kernel for its inputs")
        assert "\n" not in r.skip_reason
    else:
        assert r.status == "ok", r.skip_reason


# ---------------------------------------------------------------- data model

def test_results_round_trip_and_stable_ids(tmp_path):
    model, x = _encoder(), torch.randn(2, 8, 64, generator=torch.Generator().manual_seed(5))
    a = probe(model, x, formats=("fp16",), modes=("emulated", "autocast"))
    b = probe(model, x, formats=("fp16",), modes=("emulated", "autocast"))
    assert [c.id for c in a.cases] == [c.id for c in b.cases]
    assert a.cases[0].id == "probe-TransformerEncoderLayer-fp16-cpu-emulated-in2x8x64-s0"
    path = write_json_atomic(tmp_path / "r.json", a.to_dict())
    back = load_results(path)
    assert back.cases[0].probe["layer_names"] == a.cases[0].probe["layer_names"]
    assert back.cases[0].case == a.cases[0].case
    assert back.cases[0].forward.events == a.cases[0].forward.events


def test_backward_statistics_are_keyed_to_forward_layers():
    """The gradient w.r.t. the last op's output is the seed gradient g, drawn as the engine draws it."""
    model, x = _encoder(), torch.randn(2, 8, 64, generator=torch.Generator().manual_seed(6))
    r = probe(model, x, formats="fp16", modes="emulated").cases[0]
    g = round_to_format(np.random.default_rng([0, 3]).standard_normal((2, 8, 64)), get_format("fp16"))
    assert r.backward.grad["amax"][-1] == pytest.approx(float(np.abs(g.astype(np.float64)).max()))
    # the statistics themselves are not rounded: the hooks run while the backward pass is observed
    g64 = g.astype(np.float64)
    assert r.backward.grad["rms"][-1] == pytest.approx(float(np.sqrt(np.mean(g64 * g64))), rel=1e-6)
    assert len(r.backward.grad["amax"]) == r.case.depth
    lh = r.probe["least_headroom"]
    assert lh["side"] in ("forward", "backward") and lh["name"] == r.probe["layer_names"][lh["layer"] - 1]


def test_watch_one_training_step_with_the_users_loss():
    model = nn.Sequential(nn.Linear(16, 16), nn.GELU(), nn.Linear(16, 4))
    x, y = torch.randn(8, 16), torch.randn(8, 4)
    with watch(model, "bf16", "autocast") as w:
        loss = nn.functional.mse_loss(model(x).float(), y)
        loss.backward()
    r = w.result()
    assert any(n.startswith("(outside):") for n in r.probe["layer_names"])
    first_matmul = next(i for i, n in enumerate(r.probe["layer_names"]) if n.startswith("0:addmm"))
    assert r.backward is not None and not np.isnan(r.backward.grad["amax"][first_matmul])
    assert np.isnan(r.backward.grad["amax"][0])  # the cast of x, which needs no gradient
    assert model[0].weight.grad is not None  # the user's own model, trained as usual


def test_run_modes_autocast_runs_chains():
    r = run_case(init="kaiming_normal", activation="relu", format="bf16", mode="autocast", width=32, depth=8, batch=8)
    assert r.status == "ok" and r.failure is None
    assert len(r.forward.pre["amax"]) == 8 and len(r.backward.wgrad["amax"]) == 8
    skipped = run_case(init="kaiming_normal", activation="relu", format="fp8_e4m3fn", mode="autocast", width=8,
                       depth=2, batch=4)
    assert skipped.status == "skipped" and "fp16 or bf16" in skipped.skip_reason


# ---------------------------------------------------------------- bad input

@pytest.mark.parametrize("model, inputs, says", [
    (nn.ReLU(), torch.randn(2, 3), "no parameters"),
    (nn.Linear(3, 3), torch.tensor([[1.0, float("nan"), 0.0]]), "already holds NaN"),
    (nn.Linear(3, 3), torch.randn(2, 4), "cannot run on inputs of shape 2x4"),
    ("not a model", torch.randn(2, 3), "must be a torch.nn.Module"),
])
def test_bad_input_is_one_clear_line(model, inputs, says):
    with pytest.raises(ProbeError, match=says) as info:
        probe(model, inputs)
    assert "\n" not in str(info.value)


class _PassThrough(nn.Module):
    """Parameters, but no op: it returns its input."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.ones(3))

    def forward(self, x):
        return x


@pytest.mark.parametrize("mode", ["emulated", "autocast", "native"])
def test_a_model_that_runs_no_op_is_refused_in_every_mode(mode):
    """Emulated and native mode record the inputs' rounding on entry: that is no op of the model."""
    with pytest.raises(ProbeError, match="_PassThrough ran no floating-point ops"):
        probe(_PassThrough(), torch.randn(2, 3), formats="fp16", modes=mode)


def test_nested_outputs_each_get_a_seed_gradient():
    """A dict holding a tuple: every floating output starts the backward pass (g drawn per output, in
    the order of the output's leaves), so both heads' ops have gradients."""

    class Heads(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 2)

        def forward(self, x):
            h = self.a(x)
            return {"h": h, "pair": (self.b(h), torch.relu(h))}

    x = torch.randn(3, 4, generator=torch.Generator().manual_seed(1))
    r = probe(Heads(), x, formats="fp16", modes="emulated").cases[0]
    assert r.probe["layer_names"] == ["(input):args[0]", "a:addmm", "b:addmm", "(root):relu"]
    rng = np.random.default_rng([0, 3])
    fp16 = get_format("fp16")
    seeds = [round_to_format(rng.standard_normal(shape), fp16) for shape in ((3, 4), (3, 2), (3, 4))]
    assert r.backward.grad["amax"][2] == float(np.abs(seeds[1]).max())  # b's output: its own seed only
    assert r.backward.grad["amax"][3] == float(np.abs(seeds[2]).max())  # relu's output
    assert np.all(np.isfinite(r.backward.grad["amax"]))


@pytest.mark.parametrize("kw, says", [({"formats": "fp64"}, "no wider format"), ({"modes": "fast"}, "valid: emulated"),
                                      ({"formats": "fp17"}, "unknown format")])
def test_bad_options_name_the_valid_choices(kw, says):
    with pytest.raises(ProbeError, match=says):
        probe(nn.Linear(3, 3), torch.randn(2, 3), **kw)


def _cli(tmp_path, monkeypatch, *argv):
    from precision_suite.cli import main

    (tmp_path / "user_models.py").write_text(
        "import torch\n"
        "def ok():\n    torch.manual_seed(0)\n    return torch.nn.Linear(8, 8), torch.randn(4, 8)\n"
        "def bare():\n    return torch.nn.Linear(8, 8)\n"
        "def wrong():\n    return 3\n"
        "def boom():\n    raise RuntimeError('no weights')\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    return main(["probe", *argv, "--out", str(tmp_path / "out")])


@pytest.mark.parametrize("argv, says", [
    (["user_models:wrong"], "returned int"), (["user_models:boom"], "raised RuntimeError: no weights"),
    (["nowhere:f"], "cannot import 'nowhere'"), (["user_models:bare"], "pass --input-shape"),
    (["user_models:bare", "--input-shape", "4,9"], "cannot run on inputs of shape 4x9"),
    (["user_models:bare", "--input-shape", "4,x"], "--input-shape"),
])
def test_cli_bad_input_exits_2_with_one_line_and_writes_nothing(tmp_path, monkeypatch, capsys, argv, says):
    assert _cli(tmp_path, monkeypatch, *argv) == 2
    err = capsys.readouterr().err.strip()
    assert says in err and len(err.splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_cli_writes_results_and_report(tmp_path, monkeypatch, capsys):
    assert _cli(tmp_path, monkeypatch, "user_models:bare", "--input-shape", "4,8", "--formats", "fp16",
                "--modes", "emulated,autocast") == 0
    res = load_results(tmp_path / "out" / "results.json")
    assert [c.case.mode for c in res.cases] == ["emulated", "autocast"]
    html = (tmp_path / "out" / "report.html").read_text()
    assert "0:addmm" in html or ":addmm" in html
    assert isinstance(res, Results)


def test_scaled_formats_are_refused_until_the_probe_quantizes():
    """A scaled format would otherwise run as its bf16 storage and report a verdict it never checked."""
    model = nn.Sequential(nn.Linear(8, 8))
    with pytest.raises(ProbeError, match="mxfp4 is a scaled format, which the probe does not run yet"):
        probe(model, (torch.randn(2, 8),), formats=("mxfp4",), modes=("emulated",))
