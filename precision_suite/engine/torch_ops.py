"""The layer ops a torch chain runs besides the matmul: normalizations (no affine, batch statistics
for batchnorm) and the activation kernel a user would call in a low-precision model.
"""

from __future__ import annotations

from ..activations import get_activation

__all__ = ["NORM_EPS", "norm", "native_act"]

NORM_EPS = 1e-5


def norm(kind: str, x):
    import torch.nn.functional as F

    if kind == "none":
        return x
    if kind == "batchnorm":  # x is [C, batch, width]: statistics over each case's batch
        c, b, w = x.shape
        flat = x.transpose(0, 1).reshape(b, c * w)
        return F.batch_norm(flat, None, None, training=True, eps=NORM_EPS).reshape(b, c, w).transpose(0, 1)
    if kind == "layernorm":
        return F.layer_norm(x, (x.shape[-1],), eps=NORM_EPS)
    if kind == "rmsnorm":
        return F.rms_norm(x, (x.shape[-1],), eps=NORM_EPS)
    raise ValueError(kind)


def native_act(name: str):
    """The kernel a user would call for the activation in a low-precision model."""
    import torch.nn.functional as F

    return F.gelu if name == "gelu" else get_activation(name).torch_fn
