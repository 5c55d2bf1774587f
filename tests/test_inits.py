"""Each init's sample statistics match its formula; parametric forms parse; bad ones say why."""

import math

import numpy as np
import pytest

from precision_suite.activations import get_activation
from precision_suite.draws import LayerDraws, draw_input, draw_weight, parse_input
from precision_suite.inits import INIT_NAMES, parse_init

N = 256


@pytest.mark.parametrize("label", [n for n in INIT_NAMES if n != "lsuv"] +
                         ["normal(std=2.0)", "normal(mean=1.0,std=0.1)", "kaiming_normal(gain=1.2)",
                          "lecun_normal(gain=0.5)", "xavier_uniform(gain=2)"])
def test_sample_std_matches_formula(label):
    init = parse_init(label)
    w = draw_weight(init, seed=3, layer=1, n_out=N, n_in=N)
    expected_std = init.std(N, N)
    # sample std of n iid values has relative standard error ~ 1/sqrt(2n) (normal); 6 sigma, uniform is tighter
    tol = 6 / math.sqrt(2 * w.size)
    assert w.std() == pytest.approx(expected_std, rel=tol)
    assert w.mean() == pytest.approx(init.mean, abs=6 * expected_std / math.sqrt(w.size))


def test_named_formulas():
    n_in, n_out = 300, 100
    assert parse_init("kaiming_normal").std(n_in, n_out) == pytest.approx(math.sqrt(2 / n_in))
    assert parse_init("xavier_normal").std(n_in, n_out) == pytest.approx(math.sqrt(2 / (n_in + n_out)))
    assert parse_init("lecun_normal(gain=0.5)").std(n_in, n_out) == pytest.approx(0.5 / math.sqrt(n_in))
    assert parse_init("normal(mean=1.0,std=0.1)").std(n_in, n_out) == 0.1


def test_torch_default_is_nn_linear_init():
    """Same distribution as torch.nn.Linear's own init: U(+-1/sqrt(n_in))."""
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    ref = torch.nn.Linear(N, N, bias=False).weight.detach().double().numpy()
    ours = draw_weight(parse_init("torch_default"), 0, 1, N, N)
    bound = 1 / math.sqrt(N)
    assert np.abs(ours).max() <= bound and np.abs(ref).max() <= bound
    assert ours.std() == pytest.approx(ref.std(), rel=0.02)


def test_orthogonal_is_orthogonal():
    w = draw_weight(parse_init("orthogonal(gain=2)"), 0, 1, 64, 64)
    np.testing.assert_allclose(w @ w.T, 4 * np.eye(64), atol=1e-10)


@pytest.mark.parametrize("activation", ["relu", "gelu", "identity"])
def test_lsuv_gives_unit_variance_posts(activation):
    x0 = draw_input(parse_input("normal"), 0, 64, 64)
    act = get_activation(activation)
    x = x0
    for w, _ in LayerDraws(parse_init("lsuv"), 0, 64, 5, False, activation=act, x0=x0):
        x = act.numpy_fn(x @ w.T)
        assert x.var() == pytest.approx(1.0, abs=0.02)


def test_draws_do_not_depend_on_depth():
    a = list(LayerDraws(parse_init("normal"), 7, 8, 3, False))
    b = list(LayerDraws(parse_init("normal"), 7, 8, 5, False))
    for (wa, _), (wb, _) in zip(a, b):
        np.testing.assert_array_equal(wa, wb)


def test_canonical_labels():
    assert parse_init("Kaiming_Normal( gain = 1.20 )").label == "kaiming_normal(gain=1.2)"
    assert parse_init("normal(std=0.1,mean=1)").label == "normal(mean=1.0,std=0.1)"
    assert parse_init("normal(std=1.0)").label == "normal(std=1.0)"


@pytest.mark.parametrize("text,match", [
    ("gaussian", "unknown init 'gaussian'; valid: normal"),
    ("kaiming_normal(std=2)", "gain=<number>"),
    ("normal(std=abc)", "not a number"),
    ("normal(std=-1)", "must be > 0"),
    ("normal(std=2", "malformed"),
])
def test_malformed_inits_say_what_is_wrong(text, match):
    with pytest.raises(ValueError, match=match):
        parse_init(text)
