"""``probe``: a user's ``nn.Module`` in every format x mode, as ``Results`` (one case each); and
``watch``: the same recording around one step of the user's own training loop.

A case copies the model (the caller's model and its gradients are left alone), puts it in eval
mode and runs forward and backward under the ``Observer``:

    emulated   params, buffers and float inputs rounded to the format on entry, the model in the
               wide precision (fp32), every op's output rounded; SDPBackend.MATH and no MHA fast
               path, so attention's score matmul and softmax are ops of their own
    autocast   torch.autocast(device_type, dtype), fp32 master weights (AMP as in training)
    native     model.to(dtype) and float inputs cast

The backward pass starts from ``loss = loss_scale * sum(out * g)``, g ~ N(0, 1) drawn from
``default_rng([seed, 3])`` per output tensor (the engine's seed gradient), unless ``loss_fn``
is given: then ``loss = loss_scale * loss_fn(output)``.
"""

from __future__ import annotations

import contextlib
import copy
import time

import numpy as _np
import torch

from ..formats import get_format, round_to_format
from ..keywords import strict_keywords
from ..loss_scale import loss_scale_advice
from ..results import BackwardResult, CaseResult, ForwardResult, Results
from .case import PROBE_MODES, ProbeCase, ProbeError
from .observer import Observer, entry_label, past_range, unobserved
from .record import Recorder
from .tracker import INPUT, ModuleStack

__all__ = ["probe", "watch", "probe_case", "Watch"]

_THEORY = {"applicable": False, "reason": "mean-field theory predicts synthetic chains; a probed model has no "
                                          "prediction"}
_AUTOCAST_FORMATS = ("fp16", "bf16")


def _shape_label(inputs) -> str:
    shapes = [t.shape for t in _leaves(inputs) if isinstance(t, torch.Tensor)]
    return "+".join("x".join(str(n) for n in s) or "scalar" for s in shapes) or "none"


def _leaves(tree) -> list:
    from torch.utils._pytree import tree_leaves

    return tree_leaves(tree)


def _as_args(example_inputs) -> tuple[tuple, dict]:
    """A tensor, a tuple/list of positional arguments, or a dict of keyword arguments."""
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,), {}
    if isinstance(example_inputs, (tuple, list)):
        return tuple(example_inputs), {}
    if isinstance(example_inputs, dict):
        return (), dict(example_inputs)
    raise ProbeError(f"example inputs must be a tensor, a tuple/list of arguments or a dict of keyword arguments, "
                     f"got {type(example_inputs).__name__}")


def check_model(model, example_inputs) -> None:
    """Bad input before anything runs: not a module, no parameters, NaN in the inputs."""
    if not isinstance(model, torch.nn.Module):
        raise ProbeError(f"the model must be a torch.nn.Module, got {type(model).__name__}")
    if not any(True for _ in model.parameters()):
        raise ProbeError(f"{type(model).__name__} has no parameters: there is nothing to probe")
    for i, t in enumerate(t for t in _leaves(_as_args(example_inputs)) if isinstance(t, torch.Tensor)):
        if t.is_floating_point() and bool(torch.isnan(t).any()):
            raise ProbeError(f"example input {i} (shape {'x'.join(map(str, t.shape))}) already holds NaN")


def _prepare(model, args, kwargs, fmt, mode: str, device: str, backward: bool):
    """The case's copy of the model (emulated: in the wide precision, ``Watch`` rounds its
    parameters on entry; native: cast) and its inputs on the device, floating ones in the wide
    precision: emulated and native round them on entry (``Observer.enter_inputs``), autocast takes
    them as they are."""
    m = copy.deepcopy(model).to(device).eval()
    wide = fmt.wide().torch_dtype()
    dtype = wide if mode == "emulated" else fmt.torch_dtype() if mode == "native" else None

    def cast(t):
        if not (isinstance(t, torch.Tensor) and t.is_floating_point()):
            return t.to(device) if isinstance(t, torch.Tensor) else t
        t = t.detach().to(device)
        if mode != "autocast":
            return t.to(wide)
        return t.requires_grad_(backward)

    if dtype is not None:
        m.to(dtype)
    from torch.utils._pytree import tree_map

    return m, tree_map(cast, args), tree_map(cast, kwargs)


def _seed_grads(outputs, seed: int, fmt, loss_scale: float) -> tuple[list, list]:
    """(tensors, gradients): g ~ N(0,1) from default_rng([seed, 3]) per floating output, scaled and
    rounded correctly to the format (draws.draw_seed_grad for a (batch, width) output)."""
    rng = _np.random.default_rng([seed, 3])
    tensors, grads = [], []
    for t in _leaves(outputs):
        if isinstance(t, torch.Tensor) and t.is_floating_point() and t.requires_grad:
            g = round_to_format(rng.standard_normal(tuple(t.shape)) * loss_scale, fmt)
            tensors.append(t)
            grads.append(torch.from_numpy(g.astype(_np.float32)).to(t.device, t.dtype))
    return tensors, grads


@contextlib.contextmanager
def _mode_context(mode: str, device: str, fmt):
    """emulated: math attention, no fused encoder fast path; autocast: torch.autocast."""
    if mode == "emulated":
        from torch.nn.attention import SDPBackend, sdpa_kernel

        saved = torch.backends.mha.get_fastpath_enabled()
        torch.backends.mha.set_fastpath_enabled(False)
        try:
            with sdpa_kernel(SDPBackend.MATH):
                yield
        finally:
            torch.backends.mha.set_fastpath_enabled(saved)
    elif mode == "autocast":
        with torch.autocast(torch.device(device).type, dtype=fmt.torch_dtype()):
            yield
    else:
        yield


class Watch:
    """Records the ops of ``model`` and of whatever runs inside the block (the user's loss, the
    backward pass) into one case: ``with watch(model, "fp16") as w: ...; w.result()``.

    emulated: the model's parameters and buffers are rounded to the format for the block and
    restored after it; emulated and native: its floating inputs are rounded (cast) on entry to
    its forward, each a layer of its own (gradients stop at the rounded copy)."""

    def __init__(self, model, format: str = "fp16", mode: str = "autocast", *, device: str | None = None,
                 underflow_threshold: float = 0.01, loss_scale: float = 1.0, model_name: str | None = None,
                 backward: bool = True, input_shape: str = "watched", stats: bool = True):
        self.fmt = _format(format)
        self.mode = _mode(mode, self.fmt)
        self.model, self.backward = model, backward
        self.device = device or _model_device(model)
        self.threshold, self.loss_scale = underflow_threshold, loss_scale
        self.name = model_name or type(model).__name__
        self.input_shape = input_shape
        self.recorder = Recorder(self.fmt, underflow_threshold, stats=stats)
        self.modules = ModuleStack(model)
        self.observer = Observer(self.recorder, self.modules, self.fmt, emulated=self.mode == "emulated",
                                 backward=backward, model=model)
        self._stack = contextlib.ExitStack()
        self._t0 = 0.0
        self.seconds = 0.0

    def __enter__(self) -> "Watch":
        self._t0 = time.perf_counter()
        if self.mode == "emulated":
            self.observer.enter_params(self.model)
            self._stack.callback(self.observer.restore_params)
        if self.mode != "autocast":
            handle = self.model.register_forward_pre_hook(self._enter_inputs, with_kwargs=True)
            self._stack.callback(handle.remove)
        self._stack.enter_context(self.modules)
        self._stack.enter_context(_mode_context(self.mode, self.device, self.fmt))
        self._stack.enter_context(self.observer)
        return self

    def _enter_inputs(self, module, args, kwargs):
        """The forward pre-hook that rounds the model's inputs (``Observer.enter_inputs``)."""
        with unobserved(torch.device(self.device).type):
            return self.observer.enter_inputs(args, kwargs)

    def __exit__(self, *exc) -> None:
        try:
            self._stack.close()
        finally:
            self.observer.remove_hooks()
            self.seconds = time.perf_counter() - self._t0

    def result(self) -> CaseResult:
        """The case recorded so far (forward, and backward if gradients reached the recorded ops)."""
        rec = self.recorder
        if all(m == INPUT for m in rec.modules):  # its inputs' rounding on entry is no op of the model
            raise ProbeError(f"{self.name} ran no floating-point ops inside the block: there is nothing to report")
        case = ProbeCase(model=self.name, input_shape=self.input_shape, format=self.fmt.name, mode=self.mode,
                         device=self.device, seed=0, depth=rec.depth,
                         attention="math" if self.mode == "emulated" else "default",
                         underflow_threshold=self.threshold, loss_scale=self.loss_scale)
        return _case_result(case, rec, self.backward, self.seconds)


def _case_result(case: ProbeCase, rec: Recorder, backward: bool, seconds: float) -> CaseResult:
    events, cols = rec.forward_events()
    fwd = ForwardResult(events, _input_stats(), cols, cols)
    bwd = None
    if backward:
        bevents, grad, wgrad = rec.backward_events()
        # layers no gradient reached are NaN rows, which the advice leaves out
        advice = loss_scale_advice({"grad": grad, "grad_pre": grad, "wgrad": wgrad}, rec.fmt, case.underflow_threshold,
                                   case.loss_scale, forward_failure=events.failure) if rec.backward.rows["out"] else None
        bwd = BackwardResult(bevents, grad, grad, wgrad, loss_scale=advice)
    probe = {"layer_names": list(rec.names), "layer_formats": [f.name for f in rec.formats],
             "event_sites": rec.sites(), "least_headroom": rec.least_headroom()}
    return CaseResult(case, status="ok", forward=fwd, backward=bwd, theory=dict(_THEORY), seconds=seconds, probe=probe)


def _input_stats() -> dict:
    """Probe layers start at the model's first op: the inputs get no statistics block of their own."""
    from ..stats import STAT_NAMES

    return {name: None for name in STAT_NAMES}


def _model_device(model) -> str:
    p = next(model.parameters(), None)
    return str(p.device) if p is not None else "cpu"


def _format(name: str):
    try:
        fmt = get_format(name)
    except ValueError as e:
        raise ProbeError(str(e)) from None
    if fmt.scaling is not None:  # its quantizers exist; the probe does not quantize op inputs yet
        raise ProbeError(f"{fmt.name} is a scaled format, which the probe does not run yet; probe formats: fp32, "
                         "fp16, bf16, fp8_e4m3fn, fp8_e5m2")
    if not fmt.has_wider:
        raise ProbeError(f"{fmt.name} has no wider format to hold exact values; probe formats: fp32, fp16, bf16, "
                         "fp8_e4m3fn, fp8_e5m2")
    return fmt


def _mode(mode: str, fmt) -> str:
    m = mode.strip().lower()
    if m not in PROBE_MODES:
        raise ProbeError(f"unknown probe mode {mode!r}; valid: {', '.join(PROBE_MODES)}")
    if m == "autocast" and fmt.name not in _AUTOCAST_FORMATS:
        raise ProbeError(f"autocast runs in {' or '.join(_AUTOCAST_FORMATS)}, not {fmt.name}")
    return m


@strict_keywords(forwards_to=Watch)
def watch(model, format: str = "fp16", mode: str = "autocast", **options) -> Watch:
    """Watch one training step: forward, the user's loss and backward run inside the block."""
    return Watch(model, format, mode, **options)


def probe_case(model, example_inputs, fmt_name: str, mode: str, *, backward: bool = True, loss_fn=None,
               device: str = "cpu", seed: int = 0, underflow_threshold: float = 0.01, loss_scale: float = 1.0,
               model_name: str | None = None) -> CaseResult:
    """One format x mode of ``probe`` (inputs already checked by ``check_model``)."""
    fmt = _format(fmt_name)
    mode = _mode(mode, fmt)
    t0 = time.perf_counter()
    m, args, kwargs = prepare(model, example_inputs, fmt, mode, device, backward)
    w = Watch(m, fmt.name, mode, device=device, underflow_threshold=underflow_threshold, loss_scale=loss_scale,
              model_name=model_name or type(model).__name__, backward=backward, input_shape=_shape_label(args))
    if mode == "native":  # the cast lost the values past the range: they are the caller's model's
        _mark_past_range(w.observer, model, m)
    step(w, args, kwargs, seed=seed, loss_fn=loss_fn)
    result = w.result()
    from dataclasses import replace

    return replace(result, case=replace(result.case, seed=seed), seconds=time.perf_counter() - t0)


def prepare(model, example_inputs, fmt, mode: str, device: str, backward: bool):
    """(the case's model, args, kwargs): see ``_prepare``."""
    args, kwargs = _as_args(example_inputs)
    return _prepare(model, args, kwargs, fmt, mode, device, backward)


def _mark_past_range(observer: Observer, model, cast) -> None:
    """Native: each floating parameter and buffer of ``cast`` (the case's copy of ``model``, cast to
    the format) whose value in ``model`` was finite and is not any more (``Observer.mark_past_range``)."""
    exact = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    params = {id(p) for p in cast.parameters()}
    for name, t in [*cast.named_parameters(), *cast.named_buffers()]:
        if t.is_floating_point():
            e = exact[name].detach().to(t.device, torch.float32)
            if past_range(e, t):
                observer.mark_past_range(t, entry_label(name, id(t) in params), e)


def step(w: "Watch", args, kwargs, *, seed: int = 0, loss_fn=None) -> None:
    """One watched forward (and backward) of ``w.model`` on prepared inputs (``prepare``): emulated
    and native mode round them on entry first, each a layer of its own."""
    with torch.enable_grad() if w.backward else torch.no_grad(), w:
        out = w.model(*args, **kwargs)
        if not w.backward:
            return
        if loss_fn is None:
            with unobserved(torch.device(w.device).type):
                tensors, grads = _seed_grads(out, seed, w.fmt, w.loss_scale)
            w.observer.flush()
            if tensors:
                torch.autograd.backward(tensors, grads)
        else:
            loss = loss_fn(out) * w.loss_scale
            w.observer.flush()
            loss.backward()


@strict_keywords
def probe(model, example_inputs, formats=("fp16", "bf16"), modes=("emulated", "autocast"), *, backward: bool = True,
          loss_fn=None, device: str = "cpu", seed: int = 0, underflow_threshold: float = 0.01,
          loss_scale: float = 1.0, model_name: str | None = None) -> Results:
    """Probe ``model`` on ``example_inputs`` in every format x mode: ``Results`` with one case each,
    whose layers are the model's ops in execution order (``fqn:op``). autocast cases run only in
    fp16/bf16; other formats get emulated (and native) cases. Bad input raises ``ProbeError``."""
    from ..environment import fingerprint

    check_model(model, example_inputs)
    fmts = [_format(f).name for f in ([formats] if isinstance(formats, str) else formats)]
    mds = [_mode(m, get_format("fp16")) for m in ([modes] if isinstance(modes, str) else modes)]
    if not fmts or not mds:
        raise ProbeError("probe needs at least one format and one mode")
    _dry_run(model, example_inputs, device)
    cases = []
    for fmt in dict.fromkeys(fmts):
        for mode in dict.fromkeys(mds):
            if mode == "autocast" and fmt not in _AUTOCAST_FORMATS:
                continue
            cases.append(_run_or_record(model, example_inputs, fmt, mode, backward=backward, loss_fn=loss_fn,
                                        device=device, seed=seed, underflow_threshold=underflow_threshold,
                                        loss_scale=loss_scale, model_name=model_name))
    return Results(tuple(cases), fingerprint())


def _dry_run(model, example_inputs, device: str) -> None:
    """The model must run in fp32 on its inputs: a wrong shape is bad input, said in one line."""
    from torch.utils._pytree import tree_map

    args, kwargs = _as_args(example_inputs)
    to = lambda t: t.to(device) if isinstance(t, torch.Tensor) else t  # noqa: E731
    m = copy.deepcopy(model).to(device).eval()
    try:
        with torch.no_grad():
            m(*tree_map(to, args), **tree_map(to, kwargs))
    except Exception as e:  # the user's model rejected its inputs
        line = f"{type(e).__name__}: {e}".strip().splitlines()[0]
        raise ProbeError(f"{type(model).__name__} cannot run on inputs of shape {_shape_label(args)}: {line}") from None


def _run_or_record(model, example_inputs, fmt: str, mode: str, **kw) -> CaseResult:
    """A case that cannot run here (no fp16 kernel for an op in native mode) is skipped with the reason."""
    try:
        return probe_case(model, example_inputs, fmt, mode, **kw)
    except NotImplementedError as e:
        line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        case = ProbeCase(model=kw.get("model_name") or type(model).__name__,
                         input_shape=_shape_label(_as_args(example_inputs)[0]), format=fmt, mode=mode,
                         device=kw["device"], seed=kw["seed"], underflow_threshold=kw["underflow_threshold"],
                         loss_scale=kw["loss_scale"])
        return CaseResult(case, status="skipped", skip_reason=f"{mode} {fmt} cannot run here: {line}")
