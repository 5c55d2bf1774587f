"""``run --modes autocast``: a synthetic chain as an ``nn.Sequential`` of ``nn.Linear`` and
activation modules, run under ``torch.autocast`` through the probe's machinery.

The draws are the engine's (``draws``), held as fp32 master weights; engine layer l is read
from the probe's layers as pre_l = the last op of Linear l and post_l = the last op of
activation l (pre_l itself when the activation runs no op, as identity). Norms and residuals are
not modules of this chain, nor are an outliers input's scaled channels: such a case is skipped
with the reason.
"""

from __future__ import annotations

import time

import numpy as _np
import torch

from ..activations import get_activation
from ..draws import LayerDraws, draw_input, parse_input
from ..formats import get_format, round_to_format
from ..inits import parse_init
from ..loss_scale import loss_scale_advice
from ..results import BackwardResult, CaseResult, ForwardResult
from ..stats import backward_events, forward_events
from ..theory import predict
from .observer import round_tensor
from .run import Watch, step

__all__ = ["run_autocast_chains"]

_FORMATS = ("fp16", "bf16")


class _Activation(torch.nn.Module):
    """The registry's activation as a module (the function the engine applies)."""

    def __init__(self, name: str):
        super().__init__()
        self.fn = get_activation(name).torch_fn

    def forward(self, x):
        return self.fn(x)


def _why_not(case) -> str | None:
    if parse_input(case.input).kind == "outliers":
        return "autocast chains are nn.Sequential(Linear, activation): they do not model the outliers input's channels"
    if case.norm != "none" or case.residual is not None:
        return "autocast chains are nn.Sequential(Linear, activation): no norm or residual"
    if case.format not in _FORMATS:
        return f"autocast runs in {' or '.join(_FORMATS)}, not {case.format}"
    return None


def _chain(case) -> tuple[torch.nn.Sequential, torch.Tensor]:
    fp32 = get_format("fp32")
    x0 = draw_input(parse_input(case.input), case.seed, case.batch, case.width)
    draws = LayerDraws(parse_init(case.init), case.seed, case.width, case.depth, case.bias,
                       activation=get_activation(case.activation), x0=x0)
    layers = []
    for w64, b64 in draws:
        lin = torch.nn.Linear(case.width, case.width, bias=b64 is not None)
        with torch.no_grad():
            lin.weight.copy_(torch.from_numpy(round_to_format(w64, fp32)))
            if b64 is not None:
                lin.bias.copy_(torch.from_numpy(round_to_format(b64, fp32)))
        layers += [lin, _Activation(case.activation)]
    device = torch.device(case.device)
    return torch.nn.Sequential(*layers).to(device), torch.from_numpy(round_to_format(x0, fp32)).to(device)


def _last_of(modules: list[str], name: str) -> int | None:
    found = [i for i, m in enumerate(modules) if m == name]
    return found[-1] if found else None


def _pick(cols: dict, rows) -> dict:
    return {k: (None if v is None else _np.asarray(v)[rows]) for k, v in cols.items()}


def run_autocast_chains(cases: list, *, backward: bool = True) -> list[CaseResult]:
    out = []
    for case in cases:
        reason = _why_not(case)
        out.append(CaseResult(case, status="skipped", skip_reason=reason) if reason else _run(case, backward))
    return out


def _run(case, backward: bool) -> CaseResult:
    from ..engine.torch_stats import columns, tensor_stats

    t0 = time.perf_counter()
    fmt = get_format(case.format)
    model, x = _chain(case)
    x.requires_grad_(backward)
    w = Watch(model, fmt.name, "autocast", device=case.device, underflow_threshold=case.underflow_threshold,
              loss_scale=case.loss_scale, backward=backward)
    step(w, (x,), {}, seed=case.seed)
    rec = w.recorder
    pre = [_last_of(rec.modules, str(2 * i)) for i in range(case.depth)]
    post = [p if (q := _last_of(rec.modules, str(2 * i + 1))) is None else q for i, p in enumerate(pre)]
    probe_cols = rec.forward_columns()
    pre_cols, post_cols = _pick(probe_cols, pre), _pick(probe_cols, post)
    x_in = x.detach()[None]
    inp = columns(tensor_stats(x_in, round_tensor(x_in, fmt), fmt).numpy()[None], fmt, 0)
    fwd = ForwardResult(forward_events(pre_cols, post_cols, case.underflow_threshold),
                        {k: (None if v is None else float(v[0])) for k, v in inp.items()}, pre_cols, post_cols)
    bwd = None
    if backward:
        grad_all, wgrad_all = rec.backward_columns()
        grad, grad_pre, wgrad = _pick(grad_all, post), _pick(grad_all, pre), _pick(wgrad_all, pre)
        advice = loss_scale_advice({"grad": grad, "grad_pre": grad_pre, "wgrad": wgrad}, fmt,
                                   case.underflow_threshold, case.loss_scale, forward_failure=fwd.events.failure)
        bwd = BackwardResult(backward_events(grad, grad_pre, wgrad, case.underflow_threshold), grad, grad_pre, wgrad,
                             loss_scale=advice)
    return CaseResult(case, status="ok", forward=fwd, backward=bwd, theory=predict(case),
                      seconds=time.perf_counter() - t0)
