"""The pytest plugin's session: settings, parametrization, batched runs, checks, the files at the end.

``pytest_plugin`` (the light entry point) creates one ``PrecisionSession`` per pytest process on
first need and registers it for the hooks below. Cases a session collected run in batches: the
first test that needs a case runs every collected case of the same draw group
(``Case.group_key()``: init, seed, shapes, input) through ``run_matrix`` — the CLI's stacks and
shared draws — and each test reads its own case's result. Every numeric decision is per case, so
the result is bit-identical to running the case alone. Under pytest-xdist the cases of a group
carry one ``xdist_group`` mark: with ``--dist loadgroup`` a group goes to one worker, which
batches it; under other schedulers a worker runs each case alone (it cannot know which of the
group's tests it will be sent).
"""

from __future__ import annotations

import dataclasses
import functools
import json
from pathlib import Path

import pytest

from .defaults import DEVICES
from .keywords import strict_keywords
from .pytest_plugin import WORKER_KEY, setting, setting_source
from .results import CaseResult, Results, unwritable
from .spec import Case, Matrix, split_list
from .verdicts import (EXPECTATIONS, FAIL_ON_CHOICES, case_moves, checks_hit, count_cases,
                       event_layer, expectation_met, theory_verdict)

__all__ = ["PrecisionSession", "describe_event"]

# Case field -> the Matrix option (``precision-suite run`` axis) that sets it
_AXES = {"init": "inits", "activation": "activations", "format": "formats", "device": "devices",
         "mode": "modes", "backend": "backends", "norm": "norms", "input": "inputs", "depth": "depth",
         "width": "width", "batch": "batch", "seed": "seed"}
_SCALARS = ("residual", "bias", "underflow_threshold", "loss_scale")
_MATRIX_OPTIONS = (*_AXES.values(), *_SCALARS)
_CASE_FIELDS = tuple(f.name for f in dataclasses.fields(Case))
# test id: always these, then the named axes where not at their default, then the sizes that vary
_ID_FIELDS = ("activation", "init", "format", "device")
_ID_NAMED = {name: Case.__dataclass_fields__[name].default for name in ("mode", "backend", "norm", "input")}
_ID_SIZES = {"depth": "d{}", "width": "w{}", "batch": "b{}", "seed": "s{}"}

_TENSOR_NAMES = {"pre": "pre-activation", "post": "post-activation", "grad": "gradient w.r.t. post",
                 "grad_pre": "gradient w.r.t. pre-activation", "wgrad": "weight gradient"}


# ---------------------------------------------------------------- settings

def _parse_list(source: str, text: str, parse) -> tuple:
    """``text``'s items through ``parse``; a bad one is a usage error naming ``source`` (``setting_source``)."""
    try:
        return tuple(dict.fromkeys(parse(item) for item in split_list(text)))
    except ValueError as e:  # SpecError and the registries' ValueErrors name the valid choices
        raise pytest.UsageError(f"{source}: {e}") from None


# ---------------------------------------------------------------- the session: owns the run's results

class PrecisionSession:
    """Settings, the cases run in this process, and (on the controller) the JSON and report at the end."""

    def __init__(self, config):
        from .formats import get_format
        from .spec import parse_device

        self.config = config
        self.json_path = _path(setting(config, "json"))
        self.report_path = _path(setting(config, "report"))
        source = functools.partial(setting_source, config)
        for name, path in (("json", self.json_path), ("report", self.report_path)):
            why = None if path is None else unwritable(path)
            if why:  # found now, not after the run
                raise pytest.UsageError(f"{source(name)}: {why}")
        self.devices = _parse_list(source("devices"), setting(config, "devices") or ",".join(DEVICES), parse_device)
        formats = setting(config, "formats")
        self.formats = None if formats is None else _parse_list(source("formats"), formats,
                                                                lambda f: get_format(f).name)
        fail_on = setting(config, "fail-on")
        self.fail_on = () if fail_on is None else _parse_list(source("fail-on"), fail_on, _fail_on_item)
        self.baseline_path = _path(setting(config, "baseline"))
        self.baseline = None if self.baseline_path is None else _load_baseline(self.baseline_path,
                                                                                source("baseline"))
        if self.report_path is not None:
            _report_writer()  # fail now, not after the run, when the report module cannot load
        self.worker = getattr(config, "workerinput", None)
        self.records: list[tuple[str, int, CaseResult]] = []  # (test nodeid, call number in it, result)
        self.calls: dict[str, int] = {}  # test nodeid -> results it recorded so far
        self.ran: dict[tuple, CaseResult] = {}  # (case id, backward) -> result: tests sharing a case run it once
        self.pending: dict[tuple, list[Case]] = {}  # draw group -> collected cases not run yet (batched)
        self.batching = self.worker is None or config.getoption("dist", "no") == "loadgroup"
        self.environments: list[dict] = []  # every machine (xdist worker) whose results this session holds
        self.order: dict[str, int] = {}  # test nodeid -> collection index, for a stable JSON order
        self.lost_workers: list[str] = []
        self.written: list[str] = []

    # --- running and checking (called by the precision_case fixture)

    def run(self, case: Case, backward: bool = True) -> CaseResult:
        """Run a case in this process (once per session) or skip when its device is not here.

        With the forward and backward passes (what a collected case's own test asks for), the
        case runs with every collected case of its draw group that has not run yet."""
        from .runner import run_matrix

        reason = _absent(case.device)
        if reason:
            pytest.skip(reason)
        key = (case.id, backward)
        if key not in self.ran:
            batch = [case]
            if backward:
                group = self.pending.pop(case.group_key(), [])
                batch += [c for c in group if c.id != case.id and (c.id, True) not in self.ran]
            results = run_matrix(cases=batch, backward=backward)
            env = self._environment_index(results.environment)
            self.ran.update(((r.id, backward), dataclasses.replace(r, environment=env)) for r in results.cases)
        return self.ran[key]

    def record(self, nodeid: str, result: CaseResult) -> None:
        self.calls[nodeid] = self.calls.get(nodeid, -1) + 1
        self.records.append((nodeid, self.calls[nodeid], result))

    def failures(self, result: CaseResult, expect: tuple) -> list[str]:
        """Why this case fails its test: declared expectations, --precision-fail-on, the baseline."""
        if result.status == "error":
            return [f"{result.id} could not run: {result.error}"]
        out = [_broken_expectation(result, e) for e in expect if not expectation_met(result, e)]
        out += [f"--precision-fail-on {item}: {describe_event(result, item)}" for item in checks_hit(result, self.fail_on)]
        if self.baseline is not None:
            out.append(_regression(result, self.baseline, self.baseline_path))
        return [line for line in out if line]

    # --- xdist: threads per worker; workers hand their records to the controller, which writes the files

    # --- parametrization and the fixture (``pytest_plugin`` delegates both here)

    def parametrize(self, metafunc) -> None:
        """One test per case of ``precision_matrix``; device-absent cases skip with the reason. Under
        xdist each case is marked ``xdist_group`` by its draw group, for ``--dist loadgroup``."""
        definition = metafunc.definition
        if "precision_case" not in metafunc.fixturenames:
            pytest.fail(f"{definition.nodeid}: @pytest.mark.precision / precision_matrix need the precision_case "
                        "fixture (add it to the test's arguments)", pytrace=False)
        try:
            _, fields = _declared(definition)
            axes = _matrix_options(definition)
            if axes is None:
                _single_case(fields)  # validate the declared fields now, not when the test runs
                return
            both = sorted(set(axes) & set(_as_options(fields)))
            if both:
                raise ValueError(f"{both[0]!r} is set by both @pytest.mark.precision and @pytest.mark.precision_matrix")
            cases = _matrix_cases({**axes, **_as_options(fields)}, self)
        except ValueError as e:
            pytest.fail(f"{definition.nodeid}: {e}", pytrace=False)
        varying = [f for f in _ID_SIZES if len({getattr(c, f) for c in cases}) > 1]
        absent = {d: _absent(d) for d in {c.device for c in cases}}
        grouped = self.config.pluginmanager.hasplugin("xdist")

        def marks(case: Case) -> list:
            out = [pytest.mark.skip(reason=absent[case.device])] if absent[case.device] else []
            if grouped:
                out.append(pytest.mark.xdist_group(name="precision-" + _group_name(case)))
            return out

        params = [pytest.param(c, id=_test_id(c, varying), marks=marks(c)) for c in cases]
        metafunc.parametrize("precision_spec", params, indirect=True)

    def case_runner(self, request, precision_spec: Case | None):
        """The callable the ``precision_case`` fixture returns (its docstring says how it is called)."""
        expect, fields = _declared(request.node)
        base = precision_spec.to_dict() if precision_spec is not None else fields

        @strict_keywords(forwards_to=Case)  # precision_case(widht=64) names the valid fields
        def precision_case(case: Case | CaseResult | None = None, /, *, backward: bool = True,
                           **changes) -> CaseResult:
            if case is not None and changes:
                raise TypeError("precision_case: pass a Case (or CaseResult) or field changes, not both")
            if isinstance(case, CaseResult):
                result = case
            else:
                result = self.run(case if case is not None else _single_case({**base, **changes}), backward)
            self.record(request.node.nodeid, result)
            if result.status == "skipped":
                pytest.skip(f"{result.id}: {result.skip_reason or result.error}")
            failures = self.failures(result, expect)
            if failures:
                pytest.fail("\n".join(failures), pytrace=False)
            return result

        return precision_case

    # --- collection: the order of the JSON, and the cases to batch

    @pytest.hookimpl
    def pytest_collection_finish(self, session):
        self.order = {item.nodeid: i for i, item in enumerate(session.items)}
        if not self.batching:
            return
        seen = set()
        for item in session.items:
            case = getattr(getattr(item, "callspec", None), "params", {}).get("precision_spec")
            if isinstance(case, Case) and case.id not in seen and not item.get_closest_marker("skip"):
                seen.add(case.id)
                self.pending.setdefault(case.group_key(), []).append(case)

    @pytest.hookimpl(optionalhook=True)
    def pytest_xdist_node_collection_finished(self, node, ids):
        if not self.order:  # every worker collects the same list; xdist checks that
            self.order = {nodeid: i for i, nodeid in enumerate(ids)}

    # --- xdist: workers hand their records to the controller, which writes the files

    def worker_down(self, node, payload: str | None, error) -> None:
        """A worker's records (``pytest_plugin.pytest_testnodedown`` forwards them here)."""
        if payload is None:
            if error is not None:
                self.lost_workers.append(f"{node.gateway.id}: {error}")
            return
        data = json.loads(payload)
        index = [self._environment_index(env) for env in data["environments"]]
        for nodeid, n, d in data["records"]:
            result = CaseResult.from_dict(d)
            self.records.append((nodeid, n, dataclasses.replace(result, environment=index[result.environment])))

    def _environment_index(self, env: dict) -> int:
        """Where ``env`` sits in ``environments`` (added when new): shards of one machine share one."""
        if env not in self.environments:
            self.environments.append(env)
        return self.environments.index(env)

    @pytest.hookimpl
    def pytest_sessionfinish(self, session):
        if self.worker is not None:
            payload = {"environments": self.environments,
                       "records": [[nodeid, n, r.to_dict()] for nodeid, n, r in self.records]}
            self.config.workeroutput[WORKER_KEY] = json.dumps(payload, allow_nan=False)
            return
        if self.json_path is None and self.report_path is None:
            return
        if not self.records:  # e.g. --collect-only, or -k deselected them: keep the last run's files
            self.written.append("no precision case ran: no results written")
            return
        from .environment import fingerprint
        from .results import write_json_atomic

        if not self.environments:  # only finished results were recorded
            self.environments.append(fingerprint())
        cases = tuple(r if r.environment < len(self.environments) else dataclasses.replace(r, environment=0)
                      for r in self.results())
        results = Results(cases, tuple(self.environments))
        if self.json_path is not None:
            self.written.append(f"results: {write_json_atomic(self.json_path, results.to_dict())}")
        if self.report_path is not None:
            self.written.append(f"report:  {_report_writer()(results, self.report_path, baseline=self.baseline)}")

    def results(self) -> tuple[CaseResult, ...]:
        """One result per case id, in collection order (the same under -n 0 and -n N)."""
        ordered = sorted(self.records, key=lambda r: (self.order.get(r[0], len(self.order)), r[0], r[1]))
        unique: dict[str, CaseResult] = {}
        for _, _, result in ordered:
            unique.setdefault(result.id, result)
        return tuple(unique.values())

    @pytest.hookimpl
    def pytest_terminal_summary(self, terminalreporter):
        if self.worker is not None or not (self.records or self.written or self.lost_workers):
            return
        cases = self.results()
        n = count_cases(cases)
        lines = [f"{n.total} precision cases: {n.failing} fail ({n.forward} forward, {n.backward} backward first), "
                 f"{n.errors} could not run"]
        if self.baseline is not None:
            lines.append(f"baseline {self.baseline_path}: {_baseline_verdict(self.baseline, cases)}")
        lines += self.written
        lines += [f"worker {w} went down: its precision results are missing" for w in self.lost_workers]
        terminalreporter.write_sep("-", "precision-suite")
        for line in lines:
            terminalreporter.write_line(line)


def _baseline_verdict(baseline: Results, cases: tuple[CaseResult, ...]) -> str:
    """What ``precision-suite compare BASELINE`` says of these cases: pairs, cases in one run only, the verdict."""
    from .compare import CompareError, compare, verdict_line

    try:
        c = compare(baseline, Results(cases, ({},)))
    except CompareError as e:
        return str(e)
    extra = [f"{len(c.added)} not in it"] * bool(c.added) + [f"{len(c.missing)} of its cases not run here"] * bool(c.missing)
    return ", ".join([f"{len(c.pairs)} cases compared", *extra]) + f": {verdict_line(c)}"


def _absent(device: str) -> str | None:
    """Why a device is not here (a skip reason), or None; cpu needs no torch import to say so."""
    if device == "cpu":
        return None
    from .engine.support import device_absent

    absent = device_absent(device)
    return None if absent is None else f"device {device!r} is not available here ({absent})"


def _path(value: str | None) -> Path | None:
    return None if value is None else Path(value)


def _fail_on_item(item: str) -> str:
    if item not in FAIL_ON_CHOICES:
        raise ValueError(f"unknown event {item!r}; valid: {', '.join(FAIL_ON_CHOICES)}")
    return item


def _load_baseline(path: Path, source: str) -> Results:
    from .results import ResultsError, load_results

    try:
        return load_results(path)
    except (ResultsError, ValueError, KeyError, TypeError) as e:
        raise pytest.UsageError(f"{source}: {e}") from None


def _report_writer():
    try:
        from .report import write_report
    except ImportError as e:
        raise pytest.UsageError(f"--precision-report: the report module cannot be loaded ({e}); "
                                "reinstall precision-suite with its dependencies") from None
    return write_report


# ---------------------------------------------------------------- markers and parametrization

def _declared(node) -> tuple[tuple, dict]:
    """(expectations, Case fields) of the ``precision`` marker; ValueError names what is wrong."""
    marker = node.get_closest_marker("precision")
    if marker is None:
        return (), {}
    if marker.args:
        raise ValueError(f"@pytest.mark.precision takes keyword arguments only, got {marker.args!r}")
    fields = dict(marker.kwargs)
    expect = fields.pop("expect", None)
    unknown = sorted(set(fields) - set(_CASE_FIELDS))
    if unknown:
        raise ValueError(f"@pytest.mark.precision: unknown argument {unknown[0]!r}; valid: expect, {', '.join(_CASE_FIELDS)}")
    if expect is None:
        return (), fields
    items = split_list(expect) if isinstance(expect, str) else list(expect)
    for item in items:
        if item not in EXPECTATIONS:
            raise ValueError(f"@pytest.mark.precision: unknown expectation {item!r}; valid: {', '.join(EXPECTATIONS)}")
    return tuple(items), fields


def _matrix_options(node) -> dict | None:
    marker = node.get_closest_marker("precision_matrix")
    if marker is None:
        return None
    if marker.args:
        raise ValueError(f"@pytest.mark.precision_matrix takes keyword arguments only, got {marker.args!r}")
    unknown = sorted(set(marker.kwargs) - set(_MATRIX_OPTIONS))
    if unknown:
        raise ValueError(f"@pytest.mark.precision_matrix: unknown axis {unknown[0]!r}; valid: {', '.join(_MATRIX_OPTIONS)}")
    return dict(marker.kwargs)


def _as_options(fields: dict) -> dict:
    """Case fields -> Matrix options: one-value axes, scalars as they are."""
    return {_AXES.get(k, k): [v] if k in _AXES else v for k, v in fields.items()}


def _single_case(fields: dict) -> Case:
    """A Case from field values (Case defaults for the rest), validated like a ``run`` option."""
    defaults = {f.name: f.default for f in dataclasses.fields(Case)}
    return Matrix.from_options(**_as_options({**defaults, **fields})).cases()[0]


def _matrix_cases(options: dict, session: PrecisionSession) -> list[Case]:
    """The cases of a test's matrix; formats and devices default to the session's, and without
    ``modes`` each device gets its own default (emulated; native too on a GPU), as ``run`` does,
    one device after the other."""
    options = {"devices": list(session.devices), **options}
    if session.formats is not None:
        options.setdefault("formats", list(session.formats))
    if "modes" in options:
        return Matrix.from_options(**options).cases()
    devices = Matrix.from_options(devices=options["devices"]).devices
    return [case for device in devices for case in Matrix.from_options(**{**options, "devices": [device]}).cases()]


def _group_name(case: Case) -> str:
    """A short stable name of the case's draw group (``Case.group_key()``)."""
    import hashlib

    return hashlib.sha1(repr(case.group_key()).encode()).hexdigest()[:12]


def _test_id(case: Case, varying: list[str]) -> str:
    """``relu-kaiming_normal-fp16-cpu``, ``...-cuda-native``, ``...-cpu-d50`` when depth varies."""
    named = [("in_" if f == "input" else "") + getattr(case, f) for f, default in _ID_NAMED.items()
             if getattr(case, f) != default]
    return "-".join([getattr(case, f) for f in _ID_FIELDS] + named + [_ID_SIZES[f].format(getattr(case, f)) for f in varying])


# ---------------------------------------------------------------- messages a user can act on

def _broken_expectation(result: CaseResult, expectation: str) -> str:
    """Why ``result`` does not meet ``expectation`` (``verdicts.expectation_met`` said it does not)."""
    case = result.case
    if expectation == "survives":
        f = result.failure
        item = ("grad_" if f["direction"] == "backward" else "") + f["kind"]
        return f"expected to survive {case.depth} layers in both directions: {describe_event(result, item)}"
    if expectation.startswith("no-"):
        return f"expected {expectation}: {describe_event(result, expectation[3:])}"
    direction = "backward" if expectation.startswith("grad_") else "forward"
    block = getattr(result, direction)
    if block is None:
        return f"expected {expectation}, but the backward pass was not run"
    failure = block.events.failure
    summary = (f"the {direction} pass survived" if failure is None
               else f"{direction} failure: {failure['kind']} at layer {failure['layer']}")
    return (f"expected {case.format} {expectation.replace('_', ' ')} within {case.depth} layers, none happened "
            f"({summary}){_theory_note(result, expectation)}")


def describe_event(result: CaseResult, item: str) -> str:
    """``fp16 overflow at layer 28 of 100 (pre-activation: 3.1% of elements past max 65504, amax inf);
    theory predicted 28``."""
    from .formats import get_format

    case, fmt = result.case, get_format(result.case.format)
    layer = event_layer(result, item)
    event = item.removeprefix("grad_")
    backward = item.startswith("grad_")
    tensors = ("grad", "grad_pre", "wgrad") if backward else ("pre", "post")
    block = result.backward if backward else result.forward
    i = layer - 1
    stat = {"overflow": "overflow_frac", "nan": "nan_frac", "underflow": "underflow_frac", "zero": "zero_frac",
            "subnormal": "subnormal_frac", "underflow_any": "underflow_frac"}[event]
    name = next((t for t in tensors if _at(getattr(block, t), stat, i) > 0), tensors[0])
    stats = getattr(block, name)
    where, frac = _TENSOR_NAMES[name], _at(stats, stat, i)
    detail = {
        "overflow": f"{frac:.2%} of elements past max {fmt.max:g}, amax {_at(stats, 'amax', i):.3g}",
        "nan": f"{frac:.2%} of elements NaN",
        "underflow": f"{frac:.2%} of elements rounded to zero from nonzero (threshold {case.underflow_threshold:.0%}); "
                     f"rms {_at(stats, 'rms', i):.3g}, smallest subnormal {fmt.smallest_subnormal:.3g}",
        "underflow_any": f"{frac:.2%} of elements rounded to zero from nonzero",
        "subnormal": f"{frac:.2%} of elements subnormal (threshold {case.underflow_threshold:.0%}); "
                     f"smallest normal {fmt.smallest_normal:.3g}",
        "zero": "every element zero, " + ("by underflow" if block.events.zero_cause == "underflow" else "exact zeros"),
    }[event]
    kind = {"zero": "signal dead", "nan": "NaN", "underflow_any": "first underflowed element"}.get(event, event)
    order = ", the first in backward order" if backward else ""
    return (f"{case.format} {'gradient ' if backward else ''}{kind} at layer {layer} of {case.depth}{order} "
            f"({where}: {detail}){_theory_note(result, item)} [{result.id}]")


def _at(stats: dict, stat: str, i: int) -> float:
    column = stats.get(stat)
    return float("nan") if column is None else float(column[i])


def _theory_note(result: CaseResult, item: str) -> str:
    """``; theory predicted 28`` where theory is applicable and predicts this kind of event."""
    verdict = theory_verdict(result.theory, "backward" if item.startswith("grad_") else "forward")
    key = "first_" + item.removeprefix("grad_")
    if verdict.status != "prediction" or key not in verdict.events:
        return ""
    predicted = verdict.events[key]
    return f"; theory predicted {predicted}" if predicted is not None else f"; theory predicted none within {result.case.depth}"


def _regression(result: CaseResult, baseline: Results, path: Path) -> str | None:
    """The judged changes (``verdicts.case_moves``) against the baseline's run of the same case id."""
    before = baseline.by_id().get(result.id)
    moved = [] if before is None else [m for m in case_moves(before, result) if m.judged]
    if not moved:
        return None
    said = [f"status {m.before} -> {m.after}" if m.direction is None
            else f"{m.direction} {m.event} {_said(m.before)} -> {_said(m.after)}" for m in moved]
    return f"moved against the baseline {path}: {'; '.join(said)} [{result.id}]"


def _said(value) -> str:
    if value is None:
        return "none"
    if isinstance(value, dict):
        return f"{value['kind']} at layer {value['layer']}"
    return f"layer {value}"
