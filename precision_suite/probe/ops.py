"""Which aten ops are layers, and how a layer is named.

A layer is an op that computes new values from floating-point tensors: matmuls, softmax, layer
norm, activations, additions. Views and ops that only move, copy or re-describe values (view,
t, transpose, expand, detach, clone, ...) are not layers: their output holds the values of their
input. Factories (``ones_like``, ``full``) make constants, not results. A dtype cast is a layer
only when it narrows (autocast's fp32 -> fp16 casts round; a widening cast is exact).
"""

from __future__ import annotations

import torch

__all__ = ["is_layer", "is_cast", "op_name", "is_inplace", "float_tensors", "scalars_finite"]

_aten = torch.ops.aten
# ops whose outputs hold their inputs' values (or constants): never a layer, never rounded
_VALUE_PRESERVING = {
    _aten.clone, _aten._unsafe_view, _aten.detach, _aten.alias, _aten.lift_fresh, _aten.lift_fresh_copy,
    _aten.contiguous, _aten.copy_, _aten.copy, _aten.select_backward, _aten.slice_backward,
    _aten.as_strided_scatter, _aten.select_scatter, _aten.slice_scatter, _aten.cat, _aten.stack,
    _aten.ones_like, _aten.zeros_like, _aten.empty_like, _aten.full_like, _aten.new_zeros, _aten.new_ones,
    _aten.new_empty, _aten.new_empty_strided, _aten.new_full, _aten.zero_, _aten.fill_, _aten.empty_strided,
    _aten.index_select, _aten.gather, _aten.index, _aten.constant_pad_nd, _aten.repeat, _aten.flip,
    _aten.roll, _aten.t_copy, _aten.view_copy, _aten.expand_copy, _aten.permute_copy,
    _aten.transpose_copy, _aten.unsqueeze_copy, _aten.squeeze_copy, _aten.split_with_sizes_copy,
    _aten.embedding, _aten.max_pool2d_with_indices_backward,
}


def float_tensors(tree) -> list:
    """The floating-point tensors among an op's (flattened) arguments or outputs."""
    from torch.utils._pytree import tree_leaves

    return [t for t in tree_leaves(tree) if isinstance(t, torch.Tensor) and t.is_floating_point()]


def scalars_finite(tree) -> bool:
    """Are the op's float scalar arguments finite? (``masked_fill(x, m, -inf)`` gets its -inf here.)"""
    import math

    from torch.utils._pytree import tree_leaves

    return all(math.isfinite(v) for v in tree_leaves(tree) if isinstance(v, float))


def is_cast(func) -> bool:
    return func.overloadpacket in (_aten._to_copy, _aten.to)


def _narrowing_cast(func, args, kwargs, out) -> bool:
    src = float_tensors(args)
    return bool(src) and isinstance(out, torch.Tensor) and out.is_floating_point() \
        and torch.finfo(out.dtype).bits < torch.finfo(src[0].dtype).bits


def is_layer(func, args, kwargs, out) -> bool:
    """A computing op with a floating input and a floating (first) output."""
    first = out[0] if isinstance(out, (tuple, list)) and out else out
    if not (isinstance(first, torch.Tensor) and first.is_floating_point()):
        return False
    if is_cast(func):
        return _narrowing_cast(func, args, kwargs, first)
    if func.is_view or func.overloadpacket in _VALUE_PRESERVING:
        return False
    return bool(float_tensors((args, kwargs)))


def is_inplace(func) -> bool:
    """``add_``, ``relu_``: the op writes its first argument (schema: it is mutable)."""
    schema = func._schema
    return bool(schema.arguments) and schema.arguments[0].alias_info is not None \
        and schema.arguments[0].alias_info.is_write


def op_name(func) -> str:
    """``bmm``, ``addmm``, ``_softmax``, ``native_layer_norm``: the op's packet name."""
    return func.overloadpacket.__name__
