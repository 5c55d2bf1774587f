"""Everything drawn from the seed: inputs, weights, biases and the backward seed gradient ``g``.

All draws happen on the CPU in float64 with ``numpy.random.default_rng`` and are then rounded
correctly to the case's format, so every backend, mode and device sees the same numbers. Each
purpose has its own stream, keyed by (seed, purpose[, layer]); a draw therefore never depends on
activation, format, mode, device or depth, and layer l can be drawn without drawing 1..l-1:

    input   default_rng([seed, 0])          (batch, width)
    W_l     default_rng([seed, 1, l])       (width, width), rows = outputs (F.linear layout)
    b_l     default_rng([seed, 2, l])       (width,), drawn like the weights, zero-mean
    g       default_rng([seed, 3])          (batch, width), N(0, 1)
    outliers default_rng([seed, 4])         the outlier channels of an ``outliers`` input
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import numpy as _np

from .inits import Init

__all__ = ["InputSpec", "parse_input", "draw_input", "draw_outlier_channels", "outlier_multiplier", "draw_weight",
           "draw_bias", "draw_seed_grad", "INPUT_NAMES", "INPUT_PARAMS"]

INPUT_NAMES = ("normal", "pixels", "shifted", "outliers")
# each parametric input's parameters and their defaults
INPUT_PARAMS = {"shifted": {"mean": 0.0, "std": 1.0}, "outliers": {"frac": 0.01, "scale": 100.0}}
_FORM = re.compile(r"^\s*([a-z_]+)\s*(?:\((.*)\))?\s*$")


@dataclass(frozen=True)
class InputSpec:
    """``normal`` = N(0,1); ``pixels`` = integers 0..255 (un-normalized image data);
    ``shifted(mean=m,std=s)`` = N(m, s^2); ``outliers(frac=f,scale=a)`` = N(0,1), and in *every*
    layer's matmul input the k = ceil(f * width) seeded channels of ``draw_outlier_channels`` are
    multiplied by a (the persistent activation outliers of large language models: an outlier only
    in x_0 would be mixed away by W_1)."""

    kind: str = "normal"
    mean: float = 0.0
    std: float = 1.0
    frac: float = 0.0
    scale: float = 1.0

    @property
    def label(self) -> str:
        if self.kind == "shifted":
            return f"shifted(mean={self.mean!r},std={self.std!r})"
        if self.kind == "outliers":
            return f"outliers(frac={self.frac!r},scale={self.scale!r})"
        return self.kind


def parse_input(text: str) -> InputSpec:
    m = _FORM.match(text.lower())
    if not m or m.group(1) not in INPUT_NAMES:
        raise ValueError(f"unknown input {text!r}; valid: normal, pixels, shifted(mean=..,std=..), "
                         "outliers(frac=..,scale=..)")
    kind, args = m.group(1), m.group(2)
    if kind not in INPUT_PARAMS:
        if args:
            raise ValueError(f"input {kind!r} takes no parameters (got {text!r})")
        return InputSpec(kind)
    values = dict(INPUT_PARAMS[kind])
    form = f"{kind}({','.join(f'{k}=<number>' for k in values)})"
    for item in filter(None, (s.strip() for s in (args or "").split(","))):
        key, _, raw = item.partition("=")
        key = key.strip()
        try:
            if key not in values:
                raise ValueError
            values[key] = float(raw)
        except ValueError:
            raise ValueError(f"malformed input {text!r}: expected {form}") from None
    if not all(math.isfinite(v) for v in values.values()):
        raise ValueError(f"malformed input {text!r}: every parameter must be finite")
    if kind == "shifted" and not values["std"] > 0:
        raise ValueError(f"malformed input {text!r}: std must be finite and > 0")
    if kind == "outliers" and not (0 < values["frac"] <= 1 and values["scale"] > 0):
        raise ValueError(f"malformed input {text!r}: frac must be in (0, 1] and scale > 0")
    return InputSpec(kind, **values)


def draw_input(spec: InputSpec, seed: int, batch: int, width: int) -> _np.ndarray:
    """x_0 in float64, (batch, width); an ``outliers`` input's x_0 is ``normal``'s (its channels are
    scaled in each layer's matmul input, see ``outlier_multiplier``)."""
    rng = _np.random.default_rng([seed, 0])
    if spec.kind == "pixels":
        return rng.integers(0, 256, (batch, width)).astype(_np.float64)
    return spec.mean + spec.std * rng.standard_normal((batch, width))


def draw_outlier_channels(seed: int, width: int, frac: float) -> _np.ndarray:
    """The k = ceil(frac * width) outlier channels (sorted indices), from ``default_rng([seed, 4])``."""
    k = min(width, math.ceil(frac * width))
    return _np.sort(_np.random.default_rng([seed, 4]).choice(width, k, replace=False))


def outlier_multiplier(spec: InputSpec, seed: int, width: int) -> _np.ndarray | None:
    """m (width,), float64: 1 except ``spec.scale`` on the outlier channels; every layer's matmul
    input is x_in = rnd(x_{l-1} * m). None for inputs without outliers."""
    if spec.kind != "outliers":
        return None
    m = _np.ones(width)
    m[draw_outlier_channels(seed, width, spec.frac)] = spec.scale
    return m


def draw_weight(init: Init, seed: int, layer: int, n_out: int, n_in: int) -> _np.ndarray:
    """W_l in float64, shape (n_out, n_in). LSUV's data-dependent rescale is applied by the caller."""
    return init.draw(_np.random.default_rng([seed, 1, layer]), n_out, n_in)


def draw_bias(init: Init, seed: int, layer: int, n_out: int, n_in: int) -> _np.ndarray:
    """b_l ~ the weights' distribution, re-centred at zero: std = init.std(n_in, n_out)."""
    rng = _np.random.default_rng([seed, 2, layer])
    return rng.standard_normal(n_out) * init.std(n_in, n_out)


def draw_seed_grad(seed: int, batch: int, width: int) -> _np.ndarray:
    """g ~ N(0,1): the backward pass starts from loss = sum(post_depth * g)."""
    return _np.random.default_rng([seed, 3]).standard_normal((batch, width))


LSUV_TOL = 0.01  # |Var(post) - 1| accepted
LSUV_MAX_ITER = 10


class LayerDraws:
    """Iterates (W_l, b_l or None) in float64 for l = 1..depth, one layer at a time (memory flat in
    depth). For ``lsuv`` it runs the float64 chain ``post = phi(x @ W.T + b)`` on the case's input
    (``multiplier``: outlier channels scaled in each matmul input) and rescales each W_l until
    Var(post_l) = 1 (Mishkin & Matas 2016); the rescale therefore depends on the activation, the
    orthogonal draw does not."""

    def __init__(self, init: Init, seed: int, width: int, depth: int, bias: bool,
                 activation=None, x0: _np.ndarray | None = None, multiplier: _np.ndarray | None = None):
        self.init, self.seed, self.width, self.depth, self.bias = init, seed, width, depth, bias
        if init.data_dependent and (activation is None or x0 is None):
            raise ValueError("lsuv needs the activation and the input batch")
        self._phi = activation.numpy_fn if activation is not None else None
        self._x = x0
        self._m = 1.0 if multiplier is None else multiplier  # outlier channels of each matmul input

    def __iter__(self):
        n = self.width
        for layer in range(1, self.depth + 1):
            w = draw_weight(self.init, self.seed, layer, n, n)
            b = draw_bias(self.init, self.seed, layer, n, n) if self.bias else None
            if self.init.data_dependent:
                w = self._lsuv_rescale(w, b)
            yield w, b

    def _lsuv_rescale(self, w, b):
        """Divide W by sqrt(Var(post)) until |Var(post) - 1| < LSUV_TOL (at most LSUV_MAX_ITER tries;
        bounded activations such as tanh cannot reach unit variance and stop there)."""
        shift = 0 if b is None else b
        x = self._x * self._m
        post = self._phi(x @ w.T + shift)
        for _ in range(LSUV_MAX_ITER):
            var = float(post.var())
            if not math.isfinite(var) or var == 0 or abs(var - 1) < LSUV_TOL:
                break
            w = w / math.sqrt(var)
            post = self._phi(x @ w.T + shift)
        self._x = post
        return w
