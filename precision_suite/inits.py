"""Weight-init registry: a name or a parametric string -> float64 weights of shape (n_out, n_in).

fan_in = n_in, fan_out = n_out. Parametric forms: ``normal(std=2.0)``, ``normal(mean=1.0,std=0.1)``
(absolute), ``kaiming_normal(gain=1.2)``, ``lecun_normal(gain=0.5)`` (gain multiplies the named std).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Callable

import numpy as _np

__all__ = ["Init", "INIT_NAMES", "parse_init", "init_names"]


def _normal_std(n_in, n_out):
    """N(0, 1): std 1."""
    return 1.0


def _lecun_std(n_in, n_out):
    """LeCun: std = 1/sqrt(n_in)."""
    return 1.0 / math.sqrt(n_in)


def _xavier_std(n_in, n_out):
    """Xavier/Glorot: std = sqrt(2/(n_in + n_out))."""
    return math.sqrt(2.0 / (n_in + n_out))


def _kaiming_std(n_in, n_out):
    """Kaiming/He (fan_in, ReLU gain): std = sqrt(2/n_in)."""
    return math.sqrt(2.0 / n_in)


def _torch_default_std(n_in, n_out):
    """nn.Linear's default, U(+-1/sqrt(n_in)): std = 1/sqrt(3 n_in) (a linear chain shrinks 1/sqrt 3 a layer)."""
    return 1.0 / math.sqrt(3.0 * n_in)


def _orthogonal_std(n_in, n_out):
    """Orthogonal (square): rows of unit norm, so entries have std 1/sqrt(n_in)."""
    return 1.0 / math.sqrt(n_in)


# name -> (std formula, distribution): "normal", "uniform" (U(+-sqrt 3 std)) or "orthogonal"
_BASE: dict[str, tuple[Callable[[int, int], float], str]] = {
    "normal": (_normal_std, "normal"),
    "lecun_normal": (_lecun_std, "normal"),
    "xavier_normal": (_xavier_std, "normal"),
    "xavier_uniform": (_xavier_std, "uniform"),
    "kaiming_normal": (_kaiming_std, "normal"),
    "kaiming_uniform": (_kaiming_std, "uniform"),
    "torch_default": (_torch_default_std, "uniform"),
    "orthogonal": (_orthogonal_std, "orthogonal"),
    "lsuv": (_orthogonal_std, "orthogonal"),
}
INIT_NAMES = tuple(_BASE)
_PARAMS = {"normal": ("mean", "std")}  # every other init takes ``gain`` only
_FORM = re.compile(r"^\s*([a-z_]+)\s*(?:\((.*)\))?\s*$")


@dataclass(frozen=True)
class Init:
    """A weight init. ``mean`` is absolute; std = gain * formula(n_in, n_out), or ``std`` if given."""

    name: str
    gain: float = 1.0
    mean: float = 0.0
    std_override: float | None = None

    @property
    def label(self) -> str:
        """Canonical string, stable across runs (used in case ids)."""
        params = []
        if self.mean != 0.0:
            params.append(f"mean={self.mean!r}")
        if self.std_override is not None:
            params.append(f"std={self.std_override!r}")
        if self.gain != 1.0:
            params.append(f"gain={self.gain!r}")
        return f"{self.name}({','.join(params)})" if params else self.name

    @property
    def data_dependent(self) -> bool:
        """LSUV rescales each layer on the batch's forward pass (see ``weights``)."""
        return self.name == "lsuv"

    def std(self, n_in: int, n_out: int) -> float:
        if self.std_override is not None:
            return self.std_override
        formula, _ = _BASE[self.name]
        return self.gain * formula(n_in, n_out)

    def draw(self, rng: _np.random.Generator, n_out: int, n_in: int) -> _np.ndarray:
        """float64 weights of shape (n_out, n_in) with mean ``mean`` and std ``std(n_in, n_out)``."""
        std = self.std(n_in, n_out)
        kind = _BASE[self.name][1]
        if kind == "normal":
            w = rng.standard_normal((n_out, n_in)) * std
        elif kind == "uniform":
            bound = math.sqrt(3.0) * std  # U(-a, a) has std a/sqrt 3
            w = rng.uniform(-bound, bound, (n_out, n_in))
        else:
            w = _orthogonal(rng, n_out, n_in) * self.gain
        return w + self.mean if self.mean else w


def _orthogonal(rng: _np.random.Generator, n_out: int, n_in: int) -> _np.ndarray:
    """Haar-random (semi-)orthogonal matrix, as torch.nn.init.orthogonal_ builds it (QR, sign fix)."""
    tall = n_out >= n_in
    a = rng.standard_normal((n_out, n_in) if tall else (n_in, n_out))
    q, r = _np.linalg.qr(a)
    q *= _np.sign(_np.diag(r))
    return q if tall else q.T


def init_names() -> list[str]:
    return list(INIT_NAMES)


def parse_init(text: str) -> Init:
    """Parse ``name`` or ``name(k=v,...)``; ValueError names what is wrong and the valid choices."""
    m = _FORM.match(text.lower())
    if not m:
        raise ValueError(f"malformed init {text!r}; expected NAME or NAME(key=value,...), e.g. kaiming_normal(gain=1.2)")
    name, arglist = m.group(1), m.group(2)
    if name not in _BASE:
        raise ValueError(f"unknown init {name!r}; valid: {', '.join(INIT_NAMES)} "
                         "(parametric: normal(mean=..,std=..), <name>(gain=..))")
    allowed = _PARAMS.get(name, ("gain",))
    values: dict[str, float] = {}
    for item in filter(None, (s.strip() for s in (arglist or "").split(","))):
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or key not in allowed:
            raise ValueError(f"malformed init {text!r}: {item!r} is not one of {', '.join(k + '=<number>' for k in allowed)}")
        try:
            values[key] = float(raw)
        except ValueError:
            raise ValueError(f"malformed init {text!r}: {key}={raw.strip()!r} is not a number") from None
        if not math.isfinite(values[key]):
            raise ValueError(f"malformed init {text!r}: {key} must be finite")
    if values.get("std", 1.0) <= 0 or values.get("gain", 1.0) <= 0:
        raise ValueError(f"malformed init {text!r}: std and gain must be > 0")
    return Init(name=name, gain=values.get("gain", 1.0), mean=values.get("mean", 0.0),
                std_override=values.get("std"))
