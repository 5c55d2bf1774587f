"""What to run: ``Case`` (one chain) and ``Matrix`` (the cross product of axes), validated at the edge.

Every parse error is a ``SpecError`` (a ValueError) whose one-line message names the bad value and
the valid choices; the CLI prints it and exits 2, the pytest plugin raises ``UsageError``.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from dataclasses import asdict, dataclass

from .activations import get_activation
from .defaults import DEFAULTS, DEVICES
from .draws import parse_input
from .formats import get_format
from .inits import parse_init
from .keywords import strict_keywords, unknown_keyword

__all__ = ["Case", "Matrix", "SpecError", "split_list", "NORMS", "MODES", "BACKENDS", "DEFAULTS",
           "parse_device", "default_devices", "default_modes", "axis_choices"]

NORMS = ("none", "batchnorm", "layernorm", "rmsnorm")
MODES = ("emulated", "native", "autocast")  # autocast: the probe's machinery (probe.chain)
BACKENDS = ("torch", "numpy")
DEVICE_KINDS = ("cpu", "cuda", "mps")
MAX_ELEMENTS = 2**31 - 1  # one activation tensor (batch x width) must be indexable


class SpecError(ValueError):
    """Bad user input: the message is one line naming the value and the valid choices."""


_INT_RANGES = {"depth": (1, 100_000), "width": (1, 65_536), "batch": (1, 1_048_576), "seed": (0, 2**32 - 1)}


@strict_keywords  # Case(widht=64) names the valid fields
@dataclass(frozen=True)
class Case:
    """One chain ``x_l = act(norm(x_{l-1} @ W_l.T + b_l)) [+ residual]`` in one format/device/mode."""

    init: str = "kaiming_normal"
    activation: str = "relu"
    format: str = "fp16"
    device: str = "cpu"
    mode: str = "emulated"
    backend: str = DEFAULTS["backends"][0]
    width: int = DEFAULTS["width"][0]  # the matrix's defaults: run_case() ids match a CLI run's
    depth: int = DEFAULTS["depth"][0]
    batch: int = DEFAULTS["batch"][0]
    seed: int = DEFAULTS["seed"][0]
    input: str = DEFAULTS["inputs"][0]
    norm: str = DEFAULTS["norms"][0]
    residual: float | None = DEFAULTS["residual"]
    bias: bool = DEFAULTS["bias"]
    underflow_threshold: float = DEFAULTS["underflow_threshold"]
    loss_scale: float = DEFAULTS["loss_scale"]

    def __post_init__(self):
        """Canonicalize names (aliases, parametric spellings) so equal cases have equal ids; check every value."""
        canon = dict(
            init=_parse(self.init, parse_init).label,
            activation=_parse(self.activation, get_activation).name,
            format=_parse(self.format, get_format).name,
            device=parse_device(self.device),
            mode=_choice("mode", self.mode, MODES),
            backend=_choice("backend", self.backend, BACKENDS),
            norm=_choice("norm", self.norm, NORMS),
            input=_parse(self.input, parse_input).label,
            **{key: _ints(key, [getattr(self, key)], low, high)[0] for key, (low, high) in _INT_RANGES.items()},
            **_scalars(residual=self.residual, bias=self.bias, underflow_threshold=self.underflow_threshold,
                       loss_scale=self.loss_scale),
        )
        for key, value in canon.items():
            object.__setattr__(self, key, value)
        _check_blocks(self.format, self.width)

    @property
    def id(self) -> str:
        """Stable id naming every axis; norm, residual, bias, input, threshold, loss scale only when not default."""
        parts = [self.activation, self.init, self.format, self.device, self.mode, self.backend,
                 f"w{self.width}", f"d{self.depth}", f"b{self.batch}", f"s{self.seed}"]
        if self.norm != "none":
            parts.append(self.norm)
        if self.residual is not None:
            parts.append(f"res{self.residual:g}")
        if self.bias:
            parts.append("bias")
        if self.input != "normal":
            parts.append(f"in_{self.input}")
        if self.underflow_threshold != DEFAULTS["underflow_threshold"]:
            parts.append(f"thr{self.underflow_threshold:g}")
        if self.loss_scale != DEFAULTS["loss_scale"]:
            parts.append(f"ls{self.loss_scale:g}")
        return "-".join(parts)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Case":
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in d.items() if k in known})

    def group_key(self) -> tuple:
        """Cases with equal keys share input and weight draws (lsuv's rescale depends on the activation)."""
        lsuv_dep = self.activation if parse_init(self.init).data_dependent else None
        return (self.init, self.seed, self.width, self.depth, self.batch, self.input, self.bias, lsuv_dep,
                self.mode == "autocast")


def _check_blocks(format_name: str, width: int) -> None:
    """A scaled format's blocks run along the width (the forward and dgrad matmuls' reduction
    dimension): the width must be a whole number of them (and of fp8_block's weight tiles)."""
    scaling = get_format(format_name).scaling
    if scaling is None:
        return
    block = max((scaling.block, *(scaling.weight_block or ())))
    if block and width % block:
        raise SpecError(f"--width {width} is not a whole number of {format_name}'s {block}-element blocks; "
                        f"use a multiple of {block}")


def split_list(text: str) -> list[str]:
    """Split on commas outside parentheses: ``"normal(mean=1,std=0.1),relu"`` -> two items."""
    items, depth, cur = [], 0, []
    for ch in text:
        if ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
            if depth < 0:
                raise SpecError(f"unbalanced ')' in {text!r}")
        if ch == "," and depth == 0:
            items.append("".join(cur).strip())
            cur = []
        else:
            cur.append(ch)
    if depth != 0:
        raise SpecError(f"unbalanced '(' in {text!r}")
    items.append("".join(cur).strip())
    if any(not it for it in items):
        raise SpecError(f"empty item in list {text!r}")
    return items


def parse_device(text: str) -> str:
    dev = text.strip().lower()
    kind, _, index = dev.partition(":")
    if kind not in DEVICE_KINDS or (index and not index.isdigit()):
        raise SpecError(f"unknown device {text!r}; valid: cpu, cuda, cuda:N, mps")
    return dev


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def default_devices() -> list[str]:
    """The default devices (``defaults.DEVICES``) present on this machine."""
    return [d for d in DEVICES if d != "cuda" or _cuda_available()]


def default_modes(devices) -> list[str]:
    """Emulated everywhere; native too where a GPU is present (that is what hardware regressions are about)."""
    return ["emulated", "native"] if any(d.startswith("cuda") for d in devices) else ["emulated"]


def _ints(name: str, values, low: int, high: int) -> list[int]:
    out = []
    for v in values:
        try:
            n = int(str(v).strip())
        except ValueError:
            raise SpecError(f"--{name} must be an integer between {low} and {high}, got {v!r}") from None
        if not low <= n <= high:
            raise SpecError(f"--{name} must be between {low} and {high}, got {n}")
        out.append(n)
    return out


def _choice(name: str, value: str, valid) -> str:
    v = value.strip().lower()
    if v not in valid:
        raise SpecError(f"unknown {name} {value!r}; valid: {', '.join(valid)}")
    return v


def _parse(value: str, parser):
    """``parser(value)``, its ValueError raised as a SpecError."""
    try:
        return parser(value)
    except SpecError:
        raise
    except ValueError as e:
        raise SpecError(str(e)) from None


@strict_keywords
@dataclass(frozen=True)
class Matrix:
    """Axes of a run; ``cases()`` is their cross product. Every field holds canonical names;
    ``modes`` None gives each device its own default modes (``default_modes``: native on a GPU)."""

    inits: tuple = tuple(DEFAULTS["inits"])
    activations: tuple = tuple(DEFAULTS["activations"])
    formats: tuple = tuple(DEFAULTS["formats"])
    devices: tuple | None = None  # None: this machine's default_devices(), as from_options and the CLI
    modes: tuple | None = None  # None: each device's default_modes([device])
    backends: tuple = tuple(DEFAULTS["backends"])
    norms: tuple = tuple(DEFAULTS["norms"])
    inputs: tuple = tuple(DEFAULTS["inputs"])
    depth: tuple = tuple(DEFAULTS["depth"])
    width: tuple = tuple(DEFAULTS["width"])
    batch: tuple = tuple(DEFAULTS["batch"])
    seed: tuple = tuple(DEFAULTS["seed"])
    residual: float | None = DEFAULTS["residual"]
    bias: bool = DEFAULTS["bias"]
    underflow_threshold: float = DEFAULTS["underflow_threshold"]
    loss_scale: float = DEFAULTS["loss_scale"]

    def __post_init__(self):
        if self.devices is None:
            object.__setattr__(self, "devices", tuple(default_devices()))

    @classmethod
    def from_options(cls, **opts) -> "Matrix":
        """Build from raw option values (comma strings or lists); unset (None) options take defaults.
        An unknown option is a TypeError naming the valid ones (``depht=5`` must not run depth 100)."""
        valid = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(opts) - set(valid))
        if unknown:
            raise unknown_keyword("Matrix.from_options", unknown[0], valid)

        def items(key):
            raw = opts.get(key)
            if raw is None:
                return None
            if isinstance(raw, str):
                return split_list(raw)
            if isinstance(raw, (int, float)):  # a single number from a config file or the API
                return [str(raw)]
            values = [str(x) for x in raw]
            if not values:
                raise SpecError(f"--{key} is an empty list; give at least one value (precision-suite list shows them)")
            return values

        kw: dict = {}
        if (v := items("inits")) is not None:
            kw["inits"] = tuple(dict.fromkeys(_parse(x, parse_init).label for x in v))
        if (v := items("activations")) is not None:
            kw["activations"] = tuple(dict.fromkeys(_parse(x, get_activation).name for x in v))
        if (v := items("formats")) is not None:
            kw["formats"] = tuple(dict.fromkeys(_parse(x, get_format).name for x in v))
        devices = items("devices")
        kw["devices"] = tuple(dict.fromkeys(parse_device(x) for x in devices)) if devices else tuple(default_devices())
        modes = items("modes")
        kw["modes"] = tuple(dict.fromkeys(_choice("mode", x, MODES) for x in modes)) if modes else None
        if (v := items("backends")) is not None:
            kw["backends"] = tuple(dict.fromkeys(_choice("backend", x, BACKENDS) for x in v))
        if (v := items("norms")) is not None:
            kw["norms"] = tuple(dict.fromkeys(_choice("norm", x, NORMS) for x in v))
        if (v := items("inputs")) is not None:
            kw["inputs"] = tuple(dict.fromkeys(_parse(x, parse_input).label for x in v))
        for key, (low, high) in _INT_RANGES.items():
            if (v := items(key)) is not None:
                kw[key] = tuple(dict.fromkeys(_ints(key, v, low, high)))
        kw.update(_scalars(**{k: opts[k] for k in ("residual", "bias", "underflow_threshold", "loss_scale")
                              if opts.get(k) is not None}))
        matrix = cls(**kw)
        matrix.check_sizes()
        return matrix

    def check_sizes(self) -> None:
        for w, b in itertools.product(self.width, self.batch):
            if w * b > MAX_ELEMENTS:
                raise SpecError(f"--width {w} x --batch {b} = {w * b} elements per tensor; at most {MAX_ELEMENTS}")
        if "batchnorm" in self.norms and min(self.batch) < 2:
            raise SpecError("--norms batchnorm needs --batch >= 2 (batch statistics)")

    def cases(self) -> list[Case]:
        out = []
        for (act, init, fmt, dev, mode, backend, norm, inp, depth, width, batch, seed) in (
                (*head, mode, *tail)
                for head in itertools.product(self.activations, self.inits, self.formats, self.devices)
                for mode in (self.modes or default_modes([head[3]]))
                for tail in itertools.product(self.backends, self.norms, self.inputs, self.depth, self.width,
                                              self.batch, self.seed)):
            out.append(Case(init=init, activation=act, format=fmt, device=dev, mode=mode, backend=backend,
                            width=width, depth=depth, batch=batch, seed=seed, input=inp, norm=norm,
                            residual=self.residual, bias=self.bias,
                            underflow_threshold=self.underflow_threshold, loss_scale=self.loss_scale))
        return out


def _scalars(**opts) -> dict:
    """The single-valued options, checked: residual finite, bias a bool, threshold in (0, 1], loss scale > 0."""
    out = {}
    if opts.get("residual") is not None:
        out["residual"] = _finite_float("residual", opts["residual"])
    if "bias" in opts:
        if not isinstance(opts["bias"], bool):
            raise SpecError(f"--bias must be True or False, got {opts['bias']!r}")
        out["bias"] = opts["bias"]
    if "underflow_threshold" in opts:
        t = _finite_float("underflow-threshold", opts["underflow_threshold"])
        if not 0 < t <= 1:
            raise SpecError(f"--underflow-threshold must be in (0, 1], got {t}")
        out["underflow_threshold"] = t
    if "loss_scale" in opts:
        scale = _finite_float("loss-scale", opts["loss_scale"])
        if scale <= 0:
            raise SpecError(f"--loss-scale must be > 0, got {scale}")
        out["loss_scale"] = scale
    return out


def _finite_float(name: str, value) -> float:
    try:
        if isinstance(value, bool):
            raise TypeError
        v = float(value)
    except (TypeError, ValueError):
        raise SpecError(f"--{name} must be a number, got {value!r}") from None
    if not math.isfinite(v):
        raise SpecError(f"--{name} must be finite, got {value!r}")
    return v


def _accepts(parse, text: str) -> bool:
    try:
        parse(text)
    except ValueError:
        return False
    return True


def axis_choices() -> dict[str, list[str]]:
    """Each ``run`` axis's valid values, read from the registries: ``{axis: [values, forms...]}``,
    one string per line (``precision-suite list``). Parametric forms are the ones the parsers accept."""
    from .activations import activation_names
    from .draws import INPUT_NAMES, INPUT_PARAMS
    from .formats import _ALIASES, format_names
    from .inits import _PARAMS, init_names
    from .scaled import SCALE_RULES, SCALED_NAMES, STORAGES, parse_scaled

    init_forms = [f"{name}({','.join(p + '=..' for p in params)})" for name, params in _PARAMS.items()]
    gained = [n for n in init_names() if _accepts(parse_init, f"{n}(gain=1)")]
    input_forms = [f"{k}({','.join(p + '=..' for p in params)})" for k, params in INPUT_PARAMS.items()]
    ruled = [n for n in SCALED_NAMES if _accepts(parse_scaled, f"{n}(scale_rule={SCALE_RULES[0]})")]
    return {
        "inits": [", ".join(init_names()),
                  f"parametric: {', '.join(init_forms)}; NAME(gain=..) for {', '.join(gained)}"],
        "activations": [", ".join(activation_names())],
        "formats": [", ".join(format_names()),
                    f"aliases: {', '.join(f'{a}={c}' for a, c in _ALIASES.items())}",
                    f"scaled: {', '.join(SCALED_NAMES)}",
                    f"  parameters: storage={'|'.join(STORAGES)}; scale_rule={'|'.join(SCALE_RULES)} for {', '.join(ruled)}"],
        "devices": [", ".join(DEVICE_KINDS) + ", cuda:N"],
        "modes": [", ".join(MODES)],
        "backends": [", ".join(BACKENDS)],
        "norms": [", ".join(NORMS)],
        "inputs": [", ".join(INPUT_NAMES), f"parametric: {', '.join(input_forms)}"],
        **{key: [f"integers {low}..{high}"] for key, (low, high) in _INT_RANGES.items()},
    }
