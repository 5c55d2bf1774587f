"""Result data model and the versioned JSON contract (DESIGN §5): build, write atomically, load, merge.

Non-finite floats are written as the strings ``"inf"``, ``"-inf"``, ``"nan"`` (strict JSON has
none) and read back as floats. A statistic that is not available is ``null``.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as _np

from .spec import Case
from .stats import Events

__all__ = ["SCHEMA", "SCHEMA_VERSION", "TensorStats", "ForwardResult", "BackwardResult", "CaseResult",
           "Results", "write_json_atomic", "load_results", "merge_results", "encode_float", "decode_float",
           "ResultsError"]

SCHEMA = "precision-suite/results"
SCHEMA_VERSION = 1


class ResultsError(ValueError):
    """A results file that cannot be read: not JSON, wrong schema, or a newer schema version."""


def encode_float(v):
    """float -> JSON value: finite floats stay numbers, inf/-inf/nan become strings, None stays null."""
    if v is None:
        return None
    v = float(v)
    if math.isnan(v):
        return "nan"
    if math.isinf(v):
        return "inf" if v > 0 else "-inf"
    return v


def decode_float(v):
    if v is None:
        return None
    return float(v)  # float("inf"), float("-inf"), float("nan") parse the encoded strings


TensorStats = dict  # stat name -> list[float] (per layer) | float (input) | None (not available)


def _encode_stats(stats: TensorStats) -> dict:
    out = {}
    for k, v in stats.items():
        if v is None:
            out[k] = None
        elif _np.ndim(v) == 0:
            out[k] = encode_float(v)
        else:
            out[k] = [encode_float(x) for x in _np.asarray(v, dtype=_np.float64).tolist()]
    return out


def _decode_stats(d: dict | None) -> TensorStats | None:
    if d is None:
        return None
    return {k: (None if v is None else decode_float(v) if not isinstance(v, list) else
                _np.array([decode_float(x) if x is not None else _np.nan for x in v], dtype=_np.float64))
            for k, v in d.items()}


@dataclass(frozen=True)
class ForwardResult:
    events: Events
    input: TensorStats
    pre: TensorStats
    post: TensorStats
    rel_error: list | None = None  # per-layer relative RMS error vs the fp64 shadow chain (--rel-error)

    def to_dict(self) -> dict:
        d = self.events.to_dict()
        d.update(input=_encode_stats(self.input), pre=_encode_stats(self.pre), post=_encode_stats(self.post))
        if self.rel_error is not None:
            d["rel_error"] = [encode_float(x) for x in self.rel_error]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "ForwardResult":
        rel = d.get("rel_error")
        return cls(Events.from_dict(d), _decode_stats(d["input"]), _decode_stats(d["pre"]), _decode_stats(d["post"]),
                   None if rel is None else [decode_float(x) for x in rel])


@dataclass(frozen=True)
class BackwardResult:
    events: Events
    grad: TensorStats
    grad_pre: TensorStats
    wgrad: TensorStats
    loss_scale: dict | None = None

    def to_dict(self) -> dict:
        d = self.events.to_dict()
        d.update(grad=_encode_stats(self.grad), grad_pre=_encode_stats(self.grad_pre),
                 wgrad=_encode_stats(self.wgrad), loss_scale=self.loss_scale)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "BackwardResult":
        return cls(Events.from_dict(d), _decode_stats(d["grad"]), _decode_stats(d["grad_pre"]),
                   _decode_stats(d["wgrad"]), d.get("loss_scale"))


@dataclass(frozen=True)
class CaseResult:
    case: Case
    status: str = "ok"  # "ok" | "error" | "skipped"
    error: str | None = None
    forward: ForwardResult | None = None
    backward: BackwardResult | None = None
    theory: dict | None = None
    seconds: float = 0.0

    @property
    def id(self) -> str:
        return self.case.id

    def to_dict(self) -> dict:
        return {"id": self.case.id, "status": self.status, "error": self.error, "spec": self.case.to_dict(),
                "forward": None if self.forward is None else self.forward.to_dict(),
                "backward": None if self.backward is None else self.backward.to_dict(),
                "theory": _encode_tree(self.theory), "seconds": round(self.seconds, 6)}

    @classmethod
    def from_dict(cls, d: dict) -> "CaseResult":
        fwd, bwd = d.get("forward"), d.get("backward")
        return cls(Case.from_dict(d["spec"]), d["status"], d.get("error"),
                   None if fwd is None else ForwardResult.from_dict(fwd),
                   None if bwd is None else BackwardResult.from_dict(bwd),
                   _decode_tree(d.get("theory")), float(d.get("seconds", 0.0)))


def _encode_tree(obj):
    if isinstance(obj, dict):
        return {k: _encode_tree(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, _np.ndarray)):
        return [_encode_tree(v) for v in obj]
    if isinstance(obj, (float, _np.floating)):
        return encode_float(obj)
    if isinstance(obj, _np.integer):
        return int(obj)
    return obj


def _decode_tree(obj):
    if isinstance(obj, dict):
        return {k: _decode_tree(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_decode_tree(v) for v in obj]
    if obj in ("inf", "-inf", "nan"):
        return float(obj)
    return obj


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


@dataclass(frozen=True)
class Results:
    """A run's cases; ``created`` and ``tool_version`` default to now and this version (a loaded
    file keeps its own, "" where it had none)."""

    cases: tuple[CaseResult, ...]
    environment: dict = field(default_factory=dict)
    created: str = field(default_factory=_now)
    tool_version: str = field(default_factory=lambda: _tool_version())

    def to_dict(self) -> dict:
        return {"schema": SCHEMA, "schema_version": SCHEMA_VERSION,
                "created": self.created or _now(),
                "tool_version": self.tool_version or _tool_version(),
                "environment": _encode_tree(self.environment),
                "cases": [c.to_dict() for c in self.cases]}

    @classmethod
    def from_dict(cls, d: dict) -> "Results":
        if d.get("schema") != SCHEMA:
            raise ResultsError(f"not a precision-suite results file (schema {d.get('schema')!r}, expected {SCHEMA!r})")
        if not isinstance(d.get("schema_version"), int) or d["schema_version"] > SCHEMA_VERSION:
            raise ResultsError(f"results schema_version {d.get('schema_version')!r} is newer than this tool "
                               f"reads ({SCHEMA_VERSION}); upgrade precision-suite")
        return cls(tuple(CaseResult.from_dict(c) for c in d["cases"]), _decode_tree(d.get("environment", {})),
                   d.get("created", ""), d.get("tool_version", ""))

    def by_id(self) -> dict[str, CaseResult]:
        return {c.id: c for c in self.cases}


def _tool_version() -> str:
    from . import __version__

    return __version__


def write_json_atomic(path: str | os.PathLike, payload: dict) -> Path:
    """Write JSON to a temp file beside ``path`` and rename it over: readers never see half a file.
    Compact separators keep json's C encoder (``indent`` falls back to pure Python, ~10x slower)."""
    return write_text_atomic(path, json.dumps(payload, separators=(",", ":"), allow_nan=False))


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; results are meant to be shared
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def load_results(path: str | os.PathLike) -> Results:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        raise ResultsError(f"results file not found: {path}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ResultsError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise ResultsError(f"{path} is not a precision-suite results file (top level is {type(data).__name__})")
    try:
        return Results.from_dict(data)
    except (KeyError, TypeError, AttributeError, ValueError) as e:  # ValueError: a spec this version rejects
        raise ResultsError(f"{path} does not follow the results schema: missing or malformed {e}") from None


def merge_results(parts: list[Results]) -> Results:
    """One Results from several shards; a case id in two shards must be the same run (later wins)."""
    merged: dict[str, CaseResult] = {}
    for part in parts:
        for c in part.cases:
            merged[c.id] = c
    env = parts[0].environment if parts else {}
    return Results(tuple(merged.values()), env)
