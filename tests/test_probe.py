"""The probe on real modules no one here wrote: planted failures found at the right op, the
engine's events reproduced event for event, and bad input refused in one line."""

import math

import numpy as np
import pytest

from precision_suite import Case, run_case
from precision_suite.formats import get_format, round_to_format

torch = pytest.importorskip("torch")
nn = torch.nn

from precision_suite.draws import LayerDraws, draw_input, parse_input  # noqa: E402
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


def _sequential(case):
    """The engine's chain as nn.Sequential: weights drawn as the engine draws them, rounded to the format."""
    fmt = get_format(case.format)
    x0 = draw_input(parse_input(case.input), case.seed, case.batch, case.width)
    layers = []
    for w64, _ in LayerDraws(parse_init(case.init), case.seed, case.width, case.depth, False):
        lin = nn.Linear(case.width, case.width, bias=False)
        with torch.no_grad():
            lin.weight.copy_(torch.from_numpy(round_to_format(w64, fmt).astype(np.float32)))
        layers += [lin, _Act(case.activation)]
    return nn.Sequential(*layers), torch.from_numpy(round_to_format(x0, fmt).astype(np.float32))


def _take(cols, rows):
    return {k: None if v is None else np.asarray(v)[rows] for k, v in cols.items()}


# relu only, on purpose: autograd saves tanh's and sigmoid's output, which the probe rounds (as fp16
# training does) and the engine keeps exact; the registry's gelu is several ops, each rounded here
@pytest.mark.parametrize("init, activation", [("normal", "relu"), ("lecun_normal(gain=0.5)", "relu"),
                                              ("kaiming_normal(gain=1.2)", "relu"), ("torch_default", "relu")])
def test_sequential_chain_equals_the_engine_event_for_event(init, activation):
    """Engine layer l <-> probe layers {Linear l -> pre, activation l -> post}; both passes' events agree."""
    from precision_suite.stats import backward_events, forward_events

    case = Case(init=init, activation=activation, format="fp16", width=64, depth=30, batch=16)
    engine = run_case(case)
    model, x = _sequential(case)
    r = probe_case(model, x, "fp16", "emulated", seed=case.seed)
    assert r.case.depth == 2 * case.depth + 1  # the input, rounded on entry, is layer 1
    assert r.probe["layer_names"][:3] == ["(input):args[0]", "0:mm", "1:" + r.probe["layer_names"][2].split(":")[1]]
    pre_rows, post_rows = np.arange(1, 2 * case.depth + 1, 2), np.arange(2, 2 * case.depth + 1, 2)
    f = r.forward.post
    fwd = forward_events(_take(f, pre_rows), _take(f, post_rows), case.underflow_threshold)
    assert fwd == engine.forward.events
    np.testing.assert_array_equal(np.asarray(f["amax"])[pre_rows], engine.forward.pre["amax"])
    g, w = r.backward.grad, r.backward.wgrad
    bwd = backward_events(_take(g, post_rows), _take(g, pre_rows), _take(w, pre_rows), case.underflow_threshold)
    if engine.forward.events.first_overflow is None:
        assert bwd == engine.backward.events
        assert engine.forward.events.failure or engine.backward.events.failure or activation != "relu" \
            or init != "lecun_normal(gain=0.5)"  # the shrinking chain does fail: the comparison covers events
    else:  # the gradients' overflows past the forward one are finite ones here, which both count
        assert bwd == engine.backward.events
    np.testing.assert_array_equal(np.asarray(g["amax"])[post_rows], engine.backward.grad["amax"])


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
