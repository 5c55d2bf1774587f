"""Result data model and the versioned JSON contract: build, write atomically, load, merge.

Schema version 2: ``definitions`` (``{"underflow": "significant"}``: an element counts as underflow
only when |exact| >= eps * rms, see docs/definitions.md#element-classes), ``environments`` (a list; each
case names its own by index) and each case's ``failure`` (``verdicts.case_failure``). Version-1
files still load: their one ``environment`` becomes ``environments[0]`` and their definitions are
``{"underflow": "any"}`` (version 1 counted every nonzero -> zero element).

Non-finite floats are written as the strings ``"inf"``, ``"-inf"``, ``"nan"`` (strict JSON has
none) and read back as floats. A statistic that is not available is ``null``.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
import tempfile
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as _np

from .keywords import strict_keywords
from .spec import Case
from .stats import Events
from .verdicts import case_failure

__all__ = ["SCHEMA", "SCHEMA_VERSION", "DEFINITIONS", "TensorStats", "ForwardResult", "BackwardResult", "CaseResult",
           "Results", "write_json_atomic", "unwritable", "load_results", "merge_results", "encode_float", "decode_float",
           "ResultsError"]

SCHEMA = "precision-suite/results"
SCHEMA_VERSION = 2
DEFINITIONS = {"underflow": "significant"}
_V1_DEFINITIONS = {"underflow": "any"}


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
            out[k] = _encode_column(_np.asarray(v, dtype=_np.float64))
    return out


def _encode_column(a: _np.ndarray) -> list:
    """``encode_float`` over a float64 array: a list of floats, non-finite entries as strings."""
    out = a.tolist()
    for i in _np.flatnonzero(~_np.isfinite(a)).tolist():
        out[i] = encode_float(out[i])
    return out


def _decode_stats(d: dict | None) -> TensorStats | None:
    if d is None:
        return None
    # numpy parses the "inf"/"-inf"/"nan" strings and turns null into NaN itself: 2x the Python loop
    return {k: (None if v is None else decode_float(v) if not isinstance(v, list) else _np.array(v, dtype=_np.float64))
            for k, v in d.items()}


@dataclass(frozen=True)
class ForwardResult:
    events: Events
    input: TensorStats
    pre: TensorStats
    post: TensorStats
    rel_error: list | None = None  # per-layer relative RMS error vs the fp64 shadow chain (--rel-error)
    # scaled formats only (docs/scaled-formats.md): the quantized matmul inputs, activation and weight
    gemm_in: TensorStats | None = None
    gemm_w: TensorStats | None = None

    def to_dict(self) -> dict:
        d = self.events.to_dict()
        d.update(input=_encode_stats(self.input), pre=_encode_stats(self.pre), post=_encode_stats(self.post))
        if self.rel_error is not None:
            d["rel_error"] = [encode_float(x) for x in self.rel_error]
        d.update({k: _encode_stats(v) for k in ("gemm_in", "gemm_w") if (v := getattr(self, k)) is not None})
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "ForwardResult":
        rel = d.get("rel_error")
        return cls(Events.from_dict(d), _decode_stats(d["input"]), _decode_stats(d["pre"]), _decode_stats(d["post"]),
                   None if rel is None else [decode_float(x) for x in rel],
                   _decode_stats(d.get("gemm_in")), _decode_stats(d.get("gemm_w")))


@dataclass(frozen=True)
class BackwardResult:
    events: Events
    grad: TensorStats
    grad_pre: TensorStats
    wgrad: TensorStats
    loss_scale: dict | None = None
    grad_gemm_in: TensorStats | None = None  # scaled formats: the quantized gradient entering the dgrad matmul

    def to_dict(self) -> dict:
        d = self.events.to_dict()
        d.update(grad=_encode_stats(self.grad), grad_pre=_encode_stats(self.grad_pre),
                 wgrad=_encode_stats(self.wgrad), loss_scale=self.loss_scale)
        if self.grad_gemm_in is not None:
            d["grad_gemm_in"] = _encode_stats(self.grad_gemm_in)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "BackwardResult":
        return cls(Events.from_dict(d), _decode_stats(d["grad"]), _decode_stats(d["grad_pre"]),
                   _decode_stats(d["wgrad"]), d.get("loss_scale"), _decode_stats(d.get("grad_gemm_in")))


@strict_keywords
@dataclass(frozen=True)
class CaseResult:
    case: Case
    status: str = "ok"  # "ok" | "error" | "skipped"
    error: str | None = None  # the exception's one line (status "error")
    forward: ForwardResult | None = None
    backward: BackwardResult | None = None
    theory: dict | None = None
    seconds: float = 0.0
    skip_reason: str | None = None  # why it could not run here, known before it started (status "skipped")
    environment: int = 0  # index into Results.environments: the machine/shard that ran it
    probe: dict | None = None  # probe cases: PROBE_KEYS (layer names, event sites, least headroom)

    @property
    def id(self) -> str:
        return self.case.id

    @property
    def failure(self) -> dict | None:
        """``{"direction", "layer", "kind"}`` of the case (``verdicts.case_failure``); None when it
        survives both directions or did not run."""
        if self.status != "ok" or self.forward is None:
            return None
        return case_failure(self.forward.events, self.backward and self.backward.events, self.case.depth)

    def to_dict(self) -> dict:
        return {"id": self.case.id, "status": self.status, "error": self.error, "skip_reason": self.skip_reason,
                "environment": self.environment, "failure": self.failure, "spec": self.case.to_dict(),
                "forward": None if self.forward is None else self.forward.to_dict(),
                "backward": None if self.backward is None else self.backward.to_dict(),
                "theory": _encode_tree(self.theory), "seconds": round(self.seconds, 6),
                **_encode_tree(self.probe or {})}

    @classmethod
    def from_dict(cls, d: dict) -> "CaseResult":
        fwd, bwd = d.get("forward"), d.get("backward")
        probe = {k: _decode_tree(d[k]) for k in PROBE_KEYS if k in d} or None
        return cls(_spec_from_dict(d["spec"]), d["status"], d.get("error"),
                   None if fwd is None else ForwardResult.from_dict(fwd),
                   None if bwd is None else BackwardResult.from_dict(bwd),
                   _decode_tree(d.get("theory")), float(d.get("seconds", 0.0)), d.get("skip_reason"),
                   int(d.get("environment", 0)), probe)


# a probe case's extra keys (docs/probe.md): its layers' names and formats, where each event first showed
PROBE_KEYS = ("layer_names", "layer_formats", "event_sites", "least_headroom")


def _spec_from_dict(spec: dict):
    """A chain ``Case``, or a ``ProbeCase`` (its spec names a ``model``)."""
    if "model" in spec:
        from .probe.case import ProbeCase

        return ProbeCase.from_dict(spec)
    return Case.from_dict(spec)


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


@strict_keywords
@dataclass(frozen=True)
class Results:
    """A run's cases and the environments they ran in; ``created`` and ``tool_version`` default to
    now and this version (a loaded file keeps its own, "" where it had none). A plain run passes its
    one fingerprint dict as ``environments``."""

    cases: tuple[CaseResult, ...]
    environments: tuple[dict, ...] = ()
    created: str = field(default_factory=_now)
    tool_version: str = field(default_factory=lambda: _tool_version())
    definitions: dict = field(default_factory=lambda: dict(DEFINITIONS))

    def __post_init__(self):
        if isinstance(self.environments, dict):
            object.__setattr__(self, "environments", (self.environments,))

    @property
    def environment(self) -> dict:
        """The first environment (a plain run has exactly one)."""
        return self.environments[0] if self.environments else {}

    def to_dict(self, encoded: dict | None = None) -> dict:
        """The JSON document. ``encoded``: case dicts already made (``CaseResult.to_dict()``, by id),
        used as they are instead of encoding those cases again."""
        encoded = encoded or {}
        return {"schema": SCHEMA, "schema_version": SCHEMA_VERSION, "definitions": self.definitions,
                "created": self.created or _now(),
                "tool_version": self.tool_version or _tool_version(),
                "environments": [_encode_tree(e) for e in self.environments],
                "cases": [encoded.get(c.id) or c.to_dict() for c in self.cases]}

    @classmethod
    def from_dict(cls, d: dict) -> "Results":
        if d.get("schema") != SCHEMA:
            raise ResultsError(f"is not a precision-suite results file (its \"schema\" is {d.get('schema')!r}, "
                               f"expected {SCHEMA!r})")
        version = d.get("schema_version")
        if not isinstance(version, int) or version > SCHEMA_VERSION:
            raise ResultsError(f"has results schema_version {version!r}, newer than this tool reads "
                               f"({SCHEMA_VERSION}); upgrade precision-suite")
        if version == 1:
            environments, definitions = [d.get("environment", {})], _V1_DEFINITIONS
        else:
            environments, definitions = d["environments"], d["definitions"]
        cases = tuple(CaseResult.from_dict(c) for c in d["cases"])
        for i, case in enumerate(cases):
            if not 0 <= case.environment < max(len(environments), 1):
                raise ResultsError(f"does not follow the results schema: cases[{i}].environment is {case.environment}, "
                                   f"but the file has {len(environments)} environments")
        return cls(cases, tuple(_decode_tree(e) for e in environments), d.get("created", ""),
                   d.get("tool_version", ""), dict(definitions))

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


def unwritable(path: str | os.PathLike) -> str | None:
    """Why ``write_text_atomic(path, ...)`` cannot write there (a directory, a file where a folder
    must be, a folder this user cannot write in), else None: checked before the work that fills it."""
    path = Path(path)
    if path.is_dir():
        return f"{path} is a directory; give a file path"
    parent = next(p for p in (path.parent, *path.parent.parents) if p.exists())  # what mkdir would build on
    if not parent.is_dir():
        return f"{parent} is not a directory"
    return None if os.access(parent, os.W_OK | os.X_OK) else f"cannot write in {parent}"


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@strict_keywords
def load_results(path: str | os.PathLike) -> Results:
    """Read and validate a results file; anything wrong with it is a ResultsError in one line."""
    if not isinstance(path, (str, os.PathLike)):  # open(3) would read file descriptor 3
        raise TypeError(f"load_results: path must be a str or os.PathLike, got {type(path).__name__}")
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        raise ResultsError(f"results file not found: {path}") from None
    except OSError as e:  # a directory, no permission
        raise ResultsError(f"cannot read results file {path}: {e.strerror or e}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ResultsError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise ResultsError(f"{path} is not a precision-suite results file (top level is {type(data).__name__})")
    if data.get("schema") == SCHEMA and data.get("schema_version") == SCHEMA_VERSION:
        from .validation import SchemaViolation, validate_results

        try:
            validate_results(data)
        except SchemaViolation as e:
            raise ResultsError(f"{path} does not follow the results schema: {e}") from None
    try:
        return Results.from_dict(data)
    except ResultsError as e:
        raise ResultsError(f"{path} {e}") from None
    except KeyError as e:
        raise ResultsError(f"{path} does not follow the results schema: {e} is missing") from None
    except (TypeError, AttributeError, ValueError) as e:  # ValueError: a spec this version rejects
        raise ResultsError(f"{path} does not follow the results schema: {e}") from None


@strict_keywords
def merge_results(parts: list[Results], allow_mixed: bool = False) -> Results:
    """One Results from several shards. A case id in two shards must be the same run: its results
    (timing and environment aside) must agree, else ``ResultsError`` — unless ``allow_mixed``, and
    then the later shard wins. Every part's environments are kept (identical ones once) and each
    case points at its own; parts must share their definitions (a version-1 file's underflow is not
    a version-2 one's), which ``allow_mixed`` cannot override."""
    if isinstance(parts, (str, os.PathLike)) or not all(isinstance(p, Results) for p in parts):
        raise TypeError("merge_results: parts must be a list of Results (load_results reads a file)")
    definitions = {str(p.definitions) for p in parts}
    if len(definitions) > 1:
        raise ResultsError(f"cannot merge results with different definitions ({', '.join(sorted(definitions))}): "
                           "rerun the older shards with this version")
    if not allow_mixed:
        _refuse_disagreeing_duplicates(parts)
    environments: list[dict] = []
    merged: dict[str, CaseResult] = {}
    for part in parts:
        index = {}
        for i, env in enumerate(part.environments):
            if env not in environments:
                environments.append(env)
            index[i] = environments.index(env)
        for c in part.cases:
            merged[c.id] = replace(c, environment=index.get(c.environment, 0))
    return Results(tuple(merged.values()), tuple(environments),
                   definitions=dict(parts[0].definitions) if parts else dict(DEFINITIONS))


def _refuse_disagreeing_duplicates(parts: list[Results]) -> None:
    seen: dict[str, dict] = {}
    for n, part in enumerate(parts):
        for c in part.cases:
            body = {k: v for k, v in c.to_dict().items() if k not in ("seconds", "environment")}
            if c.id in seen and seen[c.id]["body"] != body:
                raise ResultsError(f"case {c.id} is in shards {seen[c.id]['part'] + 1} and {n + 1} with different "
                                   "results: shard by an axis so that no case runs twice, or pass --allow-mixed to "
                                   "keep the later one")
            seen[c.id] = {"part": n, "body": body}
