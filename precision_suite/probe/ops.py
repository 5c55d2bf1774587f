"""Which aten ops are layers, and how a layer is named.

A layer is an op that computes new values from floating-point tensors: matmuls, softmax, layer
norm, activations, additions. Views and ops that only move, copy or re-describe values (view,
t, transpose, expand, detach, clone, ...) are not layers: their output holds the values of their
input. Factories (``ones_like``, ``full``) make constants, not results. A dtype cast is a layer
only when it narrows (autocast's fp32 -> fp16 casts round; a widening cast is exact).
"""

from __future__ import annotations

import functools
import math

import torch

__all__ = ["op_kind", "is_layer", "leaves", "float_tensors", "scalars_finite"]

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


def leaves(args, kwargs) -> list:
    """An op's arguments, flattened once (nested lists of tensors included)."""
    from torch.utils._pytree import tree_leaves

    return tree_leaves((args, kwargs))


def float_tensors(items) -> list:
    """The floating-point tensors among flattened arguments or outputs."""
    return [t for t in items if isinstance(t, torch.Tensor) and t.is_floating_point()]


def scalars_finite(items) -> bool:
    """Are the float scalar arguments finite? (``masked_fill(x, m, -inf)`` gets its -inf here.)"""
    return all(math.isfinite(v) for v in items if isinstance(v, float))


@functools.lru_cache(maxsize=None)
def op_kind(func) -> tuple[str, bool, str]:
    """(kind, writes its first argument, name): kind ``cast``, ``passive`` (views, copies and
    constants, never a layer) or ``compute``; ``add_``/``relu_`` write their first argument."""
    schema = func._schema
    inplace = bool(schema.arguments) and schema.arguments[0].alias_info is not None \
        and schema.arguments[0].alias_info.is_write
    packet = func.overloadpacket
    kind = "cast" if packet in (_aten._to_copy, _aten.to) else \
        "passive" if func.is_view or packet in _VALUE_PRESERVING else "compute"
    return kind, inplace, packet.__name__


def is_layer(kind: str, inputs: list, out) -> bool:
    """A computing op (or a narrowing cast) with a floating input and a floating (first) output.
    ``inputs``: the op's floating tensor arguments."""
    first = out[0] if isinstance(out, (tuple, list)) and out else out
    if kind == "passive" or not inputs or not (isinstance(first, torch.Tensor) and first.is_floating_point()):
        return False
    return kind == "compute" or torch.finfo(first.dtype).bits < torch.finfo(inputs[0].dtype).bits
