"""``ProbeCase``: what one probe case ran (model, input shape, format, mode, device, seed), with a stable id.

It stands where a chain's ``spec.Case`` stands in ``CaseResult``, so results files, the report,
``compare`` and the pytest plugin read probe cases unchanged; the chain axes a probe does not have
(init, activation, width, ...) are read-only properties naming the model and its input.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from ..formats import get_format
from ..spec import SpecError, _choice, parse_device

__all__ = ["ProbeCase", "ProbeError", "PROBE_MODES"]

PROBE_MODES = ("emulated", "autocast", "native")


class ProbeError(SpecError):
    """Bad probe input (model, inputs, factory, options): a one-line message naming what was wrong."""


@dataclass(frozen=True)
class ProbeCase:
    """One probe case. ``depth`` is the number of layers (ops) it observed; ``attention`` the
    scaled-dot-product backend it forced (``math`` in emulated mode, ``default`` otherwise)."""

    model: str
    input_shape: str
    format: str = "fp16"
    mode: str = "emulated"
    device: str = "cpu"
    seed: int = 0
    depth: int = 1
    attention: str = "default"
    underflow_threshold: float = 0.01
    loss_scale: float = 1.0
    backend: str = "torch"

    def __post_init__(self):
        try:
            fmt = get_format(self.format).name
        except ValueError as e:
            raise ProbeError(str(e)) from None
        object.__setattr__(self, "format", fmt)
        object.__setattr__(self, "mode", _choice("mode", self.mode, PROBE_MODES))
        object.__setattr__(self, "device", parse_device(self.device))

    @property
    def id(self) -> str:
        """``probe-<model>-<format>-<device>-<mode>-in<shape>-s<seed>`` (+ thr/ls when not default)."""
        parts = ["probe", self.model, self.format, self.device, self.mode, f"in{self.input_shape}", f"s{self.seed}"]
        if self.underflow_threshold != 0.01:
            parts.append(f"thr{self.underflow_threshold:g}")
        if self.loss_scale != 1.0:
            parts.append(f"ls{self.loss_scale:g}")
        return "-".join(parts)

    # the chain axes, as the report and summaries group by them
    @property
    def activation(self) -> str:
        return self.model

    @property
    def init(self) -> str:
        return f"input {self.input_shape}"

    @property
    def input(self) -> str:
        return "given"

    @property
    def batch(self) -> int:
        return int(self.input_shape.split("x")[0]) if self.input_shape[:1].isdigit() else 0

    @property
    def width(self) -> int:
        return int(self.input_shape.split("+")[0].split("x")[-1]) if self.input_shape[:1].isdigit() else 0

    norm = "none"
    residual = None
    bias = False

    def spec_rows(self) -> list:
        """(label, value) rows for the report's case header."""
        return [("model", self.model), ("input shape", self.input_shape), ("format", self.format),
                ("mode", self.mode), ("device", self.device), ("seed", str(self.seed)),
                ("layers (ops)", str(self.depth)), ("attention backend", self.attention),
                ("underflow threshold", f"{self.underflow_threshold:g}")]

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ProbeCase":
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in d.items() if k in known})
