"""The CLI's ``probe package.module:factory``: import the factory, call it, build its inputs.

The factory returns ``(model, example_inputs)`` or a model; then ``--input-shape 8,128,512``
builds a normal input, N(0, 1) drawn in float64 from ``default_rng([seed, 0])`` (the engine's
input stream) and rounded to fp32; ``--inputs file.pt`` loads a tensor, a tuple of arguments or
a dict of keyword arguments. Every way this can go wrong is one ``ProbeError`` line.
"""

from __future__ import annotations

import importlib
import os
import sys

from .case import ProbeError

__all__ = ["load_factory", "parse_shape", "normal_input", "load_inputs"]


def _line(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}".strip().splitlines()[0]


def load_factory(spec: str):
    """``package.module:factory`` -> (model, example_inputs or None)."""
    import torch

    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ProbeError(f"factory {spec!r} must be package.module:function")
    if os.getcwd() not in sys.path:  # the console script does not put the current directory there
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except Exception as e:  # the user's module failed to import
        raise ProbeError(f"cannot import {module_name!r} for factory {spec!r}: {_line(e)}") from None
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise ProbeError(f"{module_name} has no callable {attr!r} (factory {spec!r})")
    try:
        made = factory()
    except Exception as e:  # the user's factory raised
        raise ProbeError(f"factory {spec!r} raised {_line(e)}") from None
    if isinstance(made, torch.nn.Module):
        return made, None
    if isinstance(made, tuple) and len(made) == 2 and isinstance(made[0], torch.nn.Module):
        return made
    raise ProbeError(f"factory {spec!r} returned {type(made).__name__}; it must return a torch.nn.Module or "
                     "(model, example_inputs)")


def parse_shape(text: str) -> tuple[int, ...]:
    """``8,128,512`` (or ``8x128x512``) -> (8, 128, 512); every size a positive integer."""
    parts = text.replace("x", ",").split(",")
    try:
        shape = tuple(int(p) for p in parts)
    except ValueError:
        raise ProbeError(f"--input-shape must be positive integers separated by commas, e.g. 8,128,512; "
                         f"got {text!r}") from None
    if not shape or min(shape) < 1:
        raise ProbeError(f"--input-shape sizes must be >= 1, got {text!r}")
    return shape


def normal_input(shape: tuple[int, ...], seed: int):
    """N(0, 1) in float64 from ``default_rng([seed, 0])``, rounded to fp32."""
    import numpy as np
    import torch

    return torch.from_numpy(np.random.default_rng([seed, 0]).standard_normal(shape).astype(np.float32))


def load_inputs(path: str):
    """Example inputs saved with ``torch.save`` (tensors only: loaded with ``weights_only``)."""
    import torch

    try:
        return torch.load(path, weights_only=True)
    except FileNotFoundError:
        raise ProbeError(f"--inputs: file not found: {path}") from None
    except Exception as e:  # not a torch file, or not tensors only
        raise ProbeError(f"--inputs {path}: cannot load example inputs: {_line(e)}") from None


def probe_command(args):
    """``precision-suite probe``'s parsed options -> Results (printing one line per case)."""
    from ..spec import split_list
    from ..summary import describe_case_failure
    from .run import probe

    model, example = load_factory(args.factory)
    if args.inputs:
        example = load_inputs(args.inputs)
    elif args.input_shape:
        example = normal_input(parse_shape(args.input_shape), args.seed)
    elif example is None:
        raise ProbeError(f"factory {args.factory!r} returned a model without example inputs: pass --input-shape "
                         "or --inputs")
    results = probe(model, example, formats=split_list(args.formats), modes=split_list(args.modes),
                    backward=not args.no_backward, device=args.device, seed=args.seed,
                    underflow_threshold=args.underflow_threshold, loss_scale=args.loss_scale,
                    model_name=args.factory)
    for r in results.cases:
        if r.status != "ok":
            print(f"{r.id}: {r.status}: {r.error or r.skip_reason}")
            continue
        site = _failing_site(r)
        print(f"{r.id}: {describe_case_failure(r)}" + (f" at {site}" if site else ""))
    return results


def _failing_site(r) -> str | None:
    """``encoder.layers.0.self_attn:bmm (value 2.03e+05, -1.6 bits)`` for the case's failure."""
    f = r.failure
    if f is None or not r.probe:
        return None
    key = ("grad_" if f["direction"] == "backward" else "") + ("first_" + f["kind"])
    site = r.probe.get("event_sites", {}).get(key)
    if site is None:
        return None
    bits = "" if site["headroom_bits"] is None else f", {site['headroom_bits']:+.1f} bits"
    return f"{site['name']} (value {site['value']:.4g}{bits})"
