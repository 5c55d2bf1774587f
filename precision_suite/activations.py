"""Activation registry: each activation in a torch form, a numpy form and its numpy derivative.

The torch form is applied in the compute precision (fp32 or fp64) and must be accurate there:
GELU is ``x/2 * erfc(-x/sqrt 2)`` so its far negative tail keeps its tiny values instead of the
``1 + erf`` cancellation to zero. The numpy forms are independent code for the numpy backend and
for theory (E[phi(z)^2], E[phi'(z)^2] by quadrature in ``theory``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as _np

__all__ = ["Activation", "ACTIVATIONS", "get_activation", "activation_names"]

LEAKY_SLOPE = 0.01
# SELU constants (Klambauer et al. 2017), the values torch.nn.SELU uses
SELU_ALPHA = 1.6732632423543772848170429916717
SELU_SCALE = 1.0507009873554804934193349852946
ELU_ALPHA = 1.0


@dataclass(frozen=True)
class Activation:
    """phi in three forms. ``second_moment_factor`` is E[phi(z)^2]/q for z ~ N(0, q) where that is
    a closed form (identity 1, relu 1/2); None means theory integrates numerically."""

    name: str
    torch_fn: Callable
    numpy_fn: Callable[[_np.ndarray], _np.ndarray]
    numpy_grad: Callable[[_np.ndarray], _np.ndarray]
    second_moment_factor: float | None = None
    saturating: bool = False  # maps +-inf to finite values (tanh, sigmoid)


# ---- torch forms (imported lazily: the registry is used by --help and validation) ----

def _t_identity(x):
    return x


def _t_relu(x):
    import torch

    return torch.relu(x)  # NaN propagates (torch.where(x > 0, x, 0) would turn NaN into 0)


def _t_leaky_relu(x):
    import torch.nn.functional as F

    return F.leaky_relu(x, LEAKY_SLOPE)


def _t_gelu(x):
    import torch

    return 0.5 * x * torch.special.erfc(-x * math.sqrt(0.5))


def _t_silu(x):
    import torch.nn.functional as F

    return F.silu(x)


def _t_tanh(x):
    import torch

    return torch.tanh(x)


def _t_sigmoid(x):
    import torch

    return torch.sigmoid(x)


def _t_selu(x):
    import torch.nn.functional as F

    return F.selu(x)


def _t_elu(x):
    import torch.nn.functional as F

    return F.elu(x, ELU_ALPHA)


def _t_softplus(x):
    import torch.nn.functional as F

    return F.softplus(x)


# ---- numpy forms ----

def _erfc(x):
    from scipy.special import erfc

    return erfc(x)


def _sigmoid(x):
    from scipy.special import expit

    return expit(x)  # accurate in both tails: 1/2 (1 + tanh(x/2)) cancels to 0 for x << 0


def _np_gelu(x):
    return 0.5 * x * _erfc(-x * math.sqrt(0.5))


def _np_gelu_grad(x):
    return 0.5 * _erfc(-x * math.sqrt(0.5)) + x * _np.exp(-0.5 * x * x) / math.sqrt(2 * math.pi)


def _np_silu_grad(x):
    s = _sigmoid(x)
    return s * (1 + x * (1 - s))


def _np_selu(x):
    return SELU_SCALE * _np.where(x > 0, x, SELU_ALPHA * _np.expm1(_np.minimum(x, 0)))


def _np_elu(x):
    return _np.where(x > 0, x, ELU_ALPHA * _np.expm1(_np.minimum(x, 0)))


def _np_softplus(x):
    return _np.logaddexp(0, x)


ACTIVATIONS: dict[str, Activation] = {
    a.name: a
    for a in (
        Activation("identity", _t_identity, lambda x: x, _np.ones_like, second_moment_factor=1.0),
        Activation("relu", _t_relu, lambda x: _np.maximum(x, 0), lambda x: (x > 0).astype(x.dtype),
                   second_moment_factor=0.5),
        Activation("leaky_relu", _t_leaky_relu, lambda x: _np.where(x >= 0, x, LEAKY_SLOPE * x),
                   lambda x: _np.where(x > 0, 1.0, LEAKY_SLOPE).astype(x.dtype)),
        Activation("gelu", _t_gelu, _np_gelu, _np_gelu_grad),
        Activation("silu", _t_silu, lambda x: x * _sigmoid(x), _np_silu_grad),
        Activation("tanh", _t_tanh, _np.tanh, lambda x: 1 - _np.tanh(x) ** 2, saturating=True),
        Activation("sigmoid", _t_sigmoid, _sigmoid, lambda x: _sigmoid(x) * (1 - _sigmoid(x)), saturating=True),
        Activation("selu", _t_selu, _np_selu,
                   lambda x: SELU_SCALE * _np.where(x > 0, 1.0, SELU_ALPHA * _np.exp(_np.minimum(x, 0)))),
        Activation("elu", _t_elu, _np_elu, lambda x: _np.where(x > 0, 1.0, ELU_ALPHA * _np.exp(_np.minimum(x, 0)))),
        Activation("softplus", _t_softplus, _np_softplus, _sigmoid),
    )
}


def activation_names() -> list[str]:
    return list(ACTIVATIONS)


def get_activation(name: str) -> Activation:
    key = name.strip().lower()
    if key not in ACTIVATIONS:
        raise ValueError(f"unknown activation {name!r}; valid: {', '.join(ACTIVATIONS)}")
    return ACTIVATIONS[key]
