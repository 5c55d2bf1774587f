"""The ``TorchDispatchMode`` that sees every aten op of a model, forward and backward.

* **emulated** (the model in the wide precision, fp32 for fp16/bf16/fp8): each layer op's output
  is rounded to the format (nearest-even); its value before rounding is the exact value. Backward
  ops are rounded too, and their exact values are kept beside the rounded gradients (through
  views and copies as well) so that the gradient reaching a layer's output has its exact value.
* **autocast** / **native** (ops run in whatever dtype autocast or the model chose): nothing is
  rounded; a layer whose output is fp16/bf16 is recomputed in fp32 from its own (upcast)
  operands for the exact value and judged against that format, an fp32 output against fp32
  (its own value is its exact value: only inf/NaN show there). Gradients are observed as they are.

Parameters and floating buffers: emulated rounds them to the format on entry (``enter_params``,
restored on exit: a watched model is the user's own), native casts them with the model, autocast
casts them per op. One whose finite value is past the format's range turns inf (NaN) there, made
by no op of the model: it becomes a layer of its own, ``(param):fc1.weight`` or
``(buffer):bn.running_var``, recorded just before the first op that consumes it, so the overflow
is named at the parameter as it is at an input. Layer numbers of other models do not change.

Backward statistics are keyed to forward layers: a hook on each layer's output receives the
gradient w.r.t. it (registered at the next op, once autograd has attached the output's history),
and a hook on each parameter the gradient w.r.t. it, keyed to the first layer that consumed it.
The hooks compute with this mode and autocast disabled (``unobserved``): statistics are not ops
of the model. In emulated and native mode the model's inputs are rounded on entry as layers of
their own (``enter_inputs``), before the mode is entered.
"""

from __future__ import annotations

import contextlib

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_map
from torch.utils.weak import WeakTensorKeyDictionary

from ..formats import FORMATS, Format
from .ops import float_tensors, is_layer, leaves, op_kind, scalars_finite
from .record import Recorder
from .tracker import BUFFER, INPUT, PARAM

__all__ = ["Observer", "round_tensor", "unobserved", "past_range", "entry_label"]

_DTYPE_FORMAT = {"float16": "fp16", "bfloat16": "bf16", "float32": "fp32", "float64": "fp64",
                 "float8_e4m3fn": "fp8_e4m3fn", "float8_e5m2": "fp8_e5m2"}


def round_tensor(x, fmt: Format):
    """Nearest-even rounding of a wide tensor to ``fmt``, kept in x's dtype: one cast is correct
    from the wide precision (fp32 -> fp16/bf16/fp8, fp64 -> fp32). Overflow is inf, or NaN where
    the format has none (torch's fp8_e4m3fn cast saturates instead)."""
    r = x.to(fmt.torch_dtype()).to(x.dtype)
    return r if fmt.has_inf else torch.where(fmt.overflows(x.abs()), torch.nan, r)


def past_range(exact, rounded) -> bool:
    """Some finite element of ``exact`` is inf or NaN in ``rounded``: it was past the format's range."""
    if exact.dtype == rounded.dtype and exact.data_ptr() == rounded.data_ptr():
        return False
    return bool((torch.isfinite(exact) & ~torch.isfinite(rounded.to(exact.dtype))).any())


def entry_label(name: str, is_parameter: bool) -> str:
    """The layer name of a parameter or buffer past the range: ``(param):fc1.weight``."""
    return f"{PARAM if is_parameter else BUFFER}:{name}"


@contextlib.contextmanager
def unobserved(device_type: str):
    """Ops that are the probe's own, not the model's: the statistics of a gradient, taken in a hook
    while the backward pass runs under this mode (and autocast), and the seed gradient. They must be
    neither rounded nor recorded nor autocast."""
    from torch.utils._python_dispatch import _disable_current_modes

    with _disable_current_modes(), torch.autocast(device_type, enabled=False):
        yield


def _format_of(dtype) -> Format:
    return FORMATS[_DTYPE_FORMAT[str(dtype).removeprefix("torch.")]]


class Observer(TorchDispatchMode):
    """Rounds (emulated) or observes (autocast, native) every op; records layers in ``recorder``."""

    def __init__(self, recorder: Recorder, modules, fmt: Format, emulated: bool, backward: bool, model=None):
        super().__init__()
        self.rec, self.modules, self.fmt = recorder, modules, fmt
        self.emulated, self.backward = emulated, backward
        self.exact_of = WeakTensorKeyDictionary()  # backward: rounded gradient -> its exact value
        self.finite_of = WeakTensorKeyDictionary()  # forward: tensor -> holds no inf/NaN
        self.origin = WeakTensorKeyDictionary()  # tensor -> the parameters it is a view of
        self.param_name: dict[int, str] = {}  # id(param) -> its name in model.named_parameters()
        for name, p in (model.named_parameters() if model is not None else ()):
            self.origin[p] = (p,)
            self.param_name[id(p)] = name
        self.past_range = WeakTensorKeyDictionary()  # tensor -> (label, exact, rounded): see mark_past_range
        self.entered: set[str] = set()  # the labels of past-range parameters already recorded as layers
        self.param_layer: dict[int, tuple] = {}  # id(param) -> (layer, param)
        self.pending: list = []  # (output, layer): hooks to register once autograd has seen it
        self.handles: list = []
        self.saved: list = []  # (tensor, its value before enter_params rounded it, its version after)

    # ---- the model's parameters and buffers ----

    def enter_params(self, model) -> None:
        """Emulated: round every floating parameter and buffer to the format in place (the exact
        values are kept for ``restore_params``); one past the range is marked (``mark_past_range``)."""
        params = {id(p) for p in model.parameters()}
        with torch.no_grad():
            for name, t in [*model.named_parameters(), *model.named_buffers()]:
                if not t.is_floating_point():
                    continue
                exact = t.detach().clone()
                t.copy_(round_tensor(exact, self.fmt))
                self.saved.append((t, exact, t._version))
                if past_range(exact, t):
                    self.mark_past_range(t, entry_label(name, id(t) in params), exact)

    def restore_params(self) -> None:
        """Put back the values ``enter_params`` rounded. A parameter the block changed (an optimizer
        step inside it) keeps the change, applied to its exact value: t + (exact - round(exact))."""
        with torch.no_grad():
            for t, exact, version in self.saved:
                if t._version == version:
                    t.copy_(exact)
                else:
                    t.add_(exact - round_tensor(exact, self.fmt))
        self.saved.clear()

    def mark_past_range(self, t, label: str, exact) -> None:
        """``t`` (a parameter, buffer or autocast's cast of one) holds inf/NaN only because finite
        values of ``exact`` (its value before rounding) were past the format's range."""
        self.past_range[t] = (label, exact.detach(), t.detach())
        self.finite_of[t] = False  # an op consuming it inherits the inf: it made none

    def _enter_past_range(self, inputs: list) -> None:
        """Record each past-range parameter among an op's inputs as a layer, the first time one is
        consumed: judged as a correct rounding of its exact value, like an input on entry."""
        for t in inputs:
            if t in self.past_range and self.past_range[t][0] not in self.entered:
                label, exact, rounded = self.past_range[t]
                self.entered.add(label)
                module, name = label.split(":", 1)
                with unobserved(exact.device.type):
                    self.rec.add_layer(module, name, exact, rounded, self.fmt if self.emulated else
                                       _format_of(rounded.dtype), native=False, inputs_finite=True)

    # ---- the model's inputs ----

    def enter_inputs(self, args, kwargs) -> tuple[tuple, dict]:
        """Round the model's floating inputs (in the wide precision) on entry, outside the dispatch:
        emulated to the format, kept in the wide dtype; native cast to it. Each is a layer of its
        own, ``(input):args[0]``, ``(input):kwargs['mask']``, judged as a correct rounding, so an
        input already past the format's range is an overflow named at the input itself."""
        from torch.utils._pytree import keystr, tree_flatten_with_path, tree_unflatten

        flat, spec = tree_flatten_with_path((tuple(args), dict(kwargs)))
        out = []
        for path, t in flat:
            if isinstance(t, torch.Tensor) and t.is_floating_point():
                t = self._enter_input(("args" if path[0].idx == 0 else "kwargs") + keystr(path[1:]), t.detach())
            out.append(t)
        return tree_unflatten(out, spec)

    def _enter_input(self, label: str, exact):
        rounded = round_tensor(exact, self.fmt) if self.emulated else exact.to(self.fmt.torch_dtype())
        finite = bool(torch.isfinite(exact).all())
        layer = self.rec.add_layer(INPUT, label, exact, rounded, self.fmt, native=False, inputs_finite=finite)
        self.finite_of[rounded] = not self.rec.nonfinite[-1]
        if self.backward:
            rounded.requires_grad_(True)
            self.handles.append(rounded.register_hook(self._grad_hook(layer, "out")))
        return rounded

    # ---- hooks ----

    def flush(self) -> None:
        """Register the gradient hooks of the layer outputs recorded so far."""
        pending, self.pending = self.pending, []
        for t, layer in pending:
            if t.requires_grad:
                self.handles.append(t.register_hook(self._grad_hook(layer, "out")))

    def _grad_hook(self, layer: int, tensor: str):
        def hook(g):
            exact = self.exact_of.get(g)
            with unobserved(g.device.type):
                self.rec.add_grad(layer, tensor, g if exact is None else exact, g, native=not self.emulated)
        return hook

    def _claim_params(self, layer: int, inputs: list) -> None:
        """The parameters this layer consumes (through views) that no earlier layer did; a layer
        keeps the gradient of its largest one."""
        new = [p for t in inputs for p in self.origin.get(t, ()) if id(p) not in self.param_layer]
        for p in new:
            self.param_layer[id(p)] = (layer, p)
        if new and self.backward:
            p = max(new, key=lambda q: q.numel())
            if p.requires_grad:
                self.handles.append(p.register_hook(self._grad_hook(layer, "wgrad")))

    def remove_hooks(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()

    # ---- dispatch ----

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.pending:
            self.flush()
        kind, inplace, name = op_kind(func)
        in_backward = torch._C._current_graph_task_id() != -1
        flat = leaves(args, kwargs)
        inputs = float_tensors(flat)
        snapshot = None
        if not self.emulated and not in_backward and inplace and inputs:
            snapshot = args[0].clone()  # the operand as it was, for the exact recompute
        try:
            out = func(*args, **kwargs)
        except NotImplementedError as e:  # no kernel for this dtype here: the case is skipped, naming the op
            where = f"the backward op {name}" if in_backward else f"{self.modules.current}:{name}"
            raise NotImplementedError(f"{where} has no kernel for its inputs "
                                      f"({str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__})") from e
        # autocast's cast of a parameter is bookkeeping: the op consuming the weight is the layer
        if not is_layer(kind, inputs, out) or (kind == "cast" and inputs[0] in self.origin):
            self._pass_through(func, args, kwargs, out, in_backward, flat, inputs, kind)
            return out
        if in_backward:
            return self._round_gradients(out, inplace) if self.emulated else out
        return self._forward_layer(func, args, kwargs, out, snapshot, kind, inplace, name, flat, inputs)

    def _pass_through(self, func, args, kwargs, out, in_backward: bool, flat: list, inputs: list, kind: str) -> None:
        """A view, copy or constant: its output inherits what is known of its inputs."""
        if not isinstance(out, torch.Tensor):
            return
        if in_backward:
            if self.emulated and any(t in self.exact_of for t in inputs):
                swap = lambda t: self.exact_of.get(t, t) if isinstance(t, torch.Tensor) else t  # noqa: E731
                self.exact_of[out] = func(*tree_map(swap, args), **tree_map(swap, kwargs))
            return
        self.finite_of[out] = all(self._finite(t) for t in inputs) and scalars_finite(flat)
        origins = tuple(p for t in inputs for p in self.origin.get(t, ()))
        if origins:
            self.origin[out] = origins
        past = next((self.past_range[t] for t in inputs if t in self.past_range), None)
        if past is not None:  # a view of a past-range parameter is one too
            self.past_range[out] = past
        elif kind == "cast" and origins and past_range(inputs[0], out):  # autocast's cast of a parameter
            self.mark_past_range(out, entry_label(self.param_name.get(id(origins[0]), "?"), True), inputs[0])

    def _finite(self, t) -> bool:
        known = self.finite_of.get(t)
        if known is None:  # a parameter, buffer or input: checked once (fp8 has no isfinite kernel)
            known = self.finite_of[t] = bool(torch.isfinite(t if t.element_size() > 1 else t.float()).all())
        return known

    def _round_gradients(self, out, inplace: bool):
        """Emulated backward: round every floating output, remembering its exact value."""
        def rnd(t):
            if not (isinstance(t, torch.Tensor) and t.is_floating_point()):
                return t
            r = round_tensor(t, self.fmt)
            if inplace:
                exact = t.clone()
                t.copy_(r)
                r = t
            else:
                exact = t
            self.exact_of[r] = exact
            return r
        return tuple(rnd(t) for t in out) if isinstance(out, (tuple, list)) else rnd(out)

    def _forward_layer(self, func, args, kwargs, out, snapshot, kind, inplace, name, flat, inputs):
        first = out[0] if isinstance(out, (tuple, list)) else out
        inputs_finite = all(self._finite(t) for t in inputs) and scalars_finite(flat)
        if self.emulated:
            fmt, exact = self.fmt, first
            rounded = round_tensor(first, fmt)
            if inplace:
                exact = first.clone()
                first.copy_(rounded)
                rounded = first
        else:
            fmt = _format_of(first.dtype)
            exact, rounded = self._exact(func, args, kwargs, first, snapshot, kind), first
        if self.past_range:
            self._enter_past_range(inputs)
        layer = self.rec.add_layer(self.modules.current, name, exact, rounded, fmt,
                                   native=not self.emulated, inputs_finite=inputs_finite)
        self.finite_of[rounded] = not self.rec.nonfinite[-1]
        self._claim_params(layer, inputs)
        if self.backward:
            self.pending.append((rounded, layer))
        if rounded is first:
            return out
        return (rounded, *out[1:]) if isinstance(out, (tuple, list)) else rounded

    def _exact(self, func, args, kwargs, first, snapshot, kind: str):
        """autocast/native: the op recomputed in fp32 from its own operands upcast (exact upcast);
        a narrowing cast's exact value is its input; an fp32 output is its own exact value."""
        if first.dtype in (torch.float32, torch.float64):
            return first
        if kind == "cast":
            return args[0].float()
        if snapshot is not None:
            args = (snapshot, *args[1:])
        up = lambda t: t.float() if isinstance(t, torch.Tensor) and t.is_floating_point() else t  # noqa: E731
        wide = func(*tree_map(up, args), **tree_map(up, kwargs))
        return (wide[0] if isinstance(wide, (tuple, list)) else wide).float()
