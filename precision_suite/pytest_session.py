"""pytest plugin (``pytest11`` entry point): precision cases as tests, one JSON and one report per run.

    @pytest.mark.precision_matrix(inits="kaiming_normal,orthogonal", activations="relu,gelu")
    @pytest.mark.precision(expect="no-overflow", depth=100)
    def test_chain(precision_case):
        precision_case()   # runs this test's case, records it, fails with a message naming the layer

``precision_matrix`` takes the axes of ``precision-suite run`` and parametrizes the test, one test
per case, ids ``relu-kaiming_normal-fp16-cpu``; formats and devices it does not name come from
``--precision-formats`` / ``--precision-devices``. ``precision`` declares expectations and fixes
Case fields. A case on a device this machine lacks (cuda without a GPU) skips with the reason.

Every option has an ini twin (``precision_json = reports/results.json`` under ``[pytest]`` or
``[tool.pytest.ini_options]``); the command line beats the ini file. Under pytest-xdist every
worker runs its share with ``cores // workers`` threads (``OMP_NUM_THREADS``) and hands its
results to the controller through ``workeroutput``; only the controller writes the JSON and the report.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import pytest

from .results import CaseResult, Results
from .spec import Case, Matrix, split_list
from .verdicts import (EXPECTATIONS, FAIL_ON_CHOICES, case_moves, checks_hit, compare_results, count_cases,
                       event_layer, expectation_met, theory_verdict)

__all__ = ["EXPECTATIONS", "PrecisionSession", "describe_event", "precision_case", "precision_spec"]

_OPTIONS = (
    ("json", "PATH", "write the results of every precision case of the run to this JSON file"),
    ("report", "PATH", "write the HTML report of every precision case of the run to this file"),
    ("baseline", "PATH", ("results JSON of an earlier run: a test fails when its case's failure, overflow, nan, "
                          "underflow or zero layer (forward or backward) differs from the baseline's, or the "
                          "case ran there and errors now")),
    ("devices", "LIST", ("devices of precision_matrix tests that name none (default: cpu,cuda; "
                         "cuda cases skip where no GPU is present)")),
    ("formats", "LIST", "formats of precision_matrix tests that name none (default: fp32,fp16,bf16)"),
    ("fail-on", "LIST", f"fail a test whose case shows one of: {', '.join(FAIL_ON_CHOICES)}"),
)
_DEFAULT_DEVICES = "cpu,cuda"

# Case field -> the Matrix option (``precision-suite run`` axis) that sets it
_AXES = {"init": "inits", "activation": "activations", "format": "formats", "device": "devices",
         "mode": "modes", "backend": "backends", "norm": "norms", "input": "inputs", "depth": "depth",
         "width": "width", "batch": "batch", "seed": "seed"}
_SCALARS = ("residual", "bias", "underflow_threshold", "loss_scale")
_MATRIX_OPTIONS = (*_AXES.values(), *_SCALARS)
_CASE_FIELDS = tuple(f.name for f in dataclasses.fields(Case))
# test id: always these, then the named axes where not at their default, then the sizes that vary
_ID_FIELDS = ("activation", "init", "format", "device")
_ID_NAMED = {"mode": "emulated", "backend": "torch", "norm": "none", "input": "normal"}
_ID_SIZES = {"depth": "d{}", "width": "w{}", "batch": "b{}", "seed": "s{}"}

_TENSOR_NAMES = {"pre": "pre-activation", "post": "post-activation", "grad": "gradient w.r.t. post",
                 "grad_pre": "gradient w.r.t. pre-activation", "wgrad": "weight gradient"}
_SESSION = pytest.StashKey["PrecisionSession"]()
_WORKER_KEY = "precision_suite"


# ---------------------------------------------------------------- options and configuration

def pytest_addoption(parser):
    group = parser.getgroup("precision", "precision-suite (numerical-precision matrices)")
    for name, metavar, help_text in _OPTIONS:
        group.addoption(f"--precision-{name}", metavar=metavar, help=help_text)
        parser.addini(f"precision_{name.replace('-', '_')}", help_text)


def pytest_configure(config):
    config.addinivalue_line("markers", "precision(expect=None, **case_fields): what the test's precision cases "
                                       f"must show (one or a comma list of: {', '.join(EXPECTATIONS[:8])}, ...) "
                                       "and Case fields they use (depth=100, width=256, ...)")
    config.addinivalue_line("markers", "precision_matrix(**axes): parametrize the test over a precision-suite "
                                       "matrix (inits=, activations=, formats=, devices=, depth=, ... as in "
                                       "`precision-suite run`)")
    session = PrecisionSession(config)
    config.stash[_SESSION] = session
    config.pluginmanager.register(session, "precision_suite.session")


def _setting(config, name: str) -> str | None:
    """Command line beats ini; an empty value is unset."""
    key = "precision_" + name.replace("-", "_")
    value = config.getoption(key) or config.getini(key)
    return (value.strip() or None) if value else None


def _usage(option: str, error: Exception) -> pytest.UsageError:
    return pytest.UsageError(f"--precision-{option}: {error}")


def _parse_list(option: str, text: str, parse) -> tuple:
    try:
        return tuple(dict.fromkeys(parse(item) for item in split_list(text)))
    except ValueError as e:  # SpecError and the registries' ValueErrors name the valid choices
        raise _usage(option, e) from None


# ---------------------------------------------------------------- the session: owns the run's results

class PrecisionSession:
    """Settings, the cases run in this process, and (on the controller) the JSON and report at the end."""

    def __init__(self, config):
        from .formats import get_format
        from .spec import parse_device

        self.config = config
        self.json_path = _path(_setting(config, "json"))
        self.report_path = _path(_setting(config, "report"))
        self.devices = _parse_list("devices", _setting(config, "devices") or _DEFAULT_DEVICES, parse_device)
        formats = _setting(config, "formats")
        self.formats = None if formats is None else _parse_list("formats", formats, lambda f: get_format(f).name)
        fail_on = _setting(config, "fail-on")
        self.fail_on = () if fail_on is None else _parse_list("fail-on", fail_on, _fail_on_item)
        self.baseline_path = _path(_setting(config, "baseline"))
        self.baseline = None if self.baseline_path is None else _load_baseline(self.baseline_path)
        if self.report_path is not None:
            _report_writer()  # fail now, not after the run, when the report module cannot load
        self.worker = getattr(config, "workerinput", None)
        self.records: list[tuple[str, int, CaseResult]] = []  # (test nodeid, call number in it, result)
        self.calls: dict[str, int] = {}  # test nodeid -> results it recorded so far
        self.ran: dict[tuple, CaseResult] = {}  # (case id, backward) -> result: tests sharing a case run it once
        self.environment: dict | None = None
        self.order: dict[str, int] = {}  # test nodeid -> collection index, for a stable JSON order
        self.lost_workers: list[str] = []
        self.written: list[str] = []

    # --- running and checking (called by the precision_case fixture)

    def run(self, case: Case, backward: bool = True) -> CaseResult:
        """Run a case in this process (once per session) or skip when its device is not here."""
        from .runner import run_matrix

        reason = _absent(case.device)
        if reason:
            pytest.skip(reason)
        key = (case.id, backward)
        if key not in self.ran:
            results = run_matrix(cases=[case], backward=backward)
            self.environment = self.environment or results.environment
            self.ran[key] = results.cases[0]
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

    @pytest.hookimpl(optionalhook=True)
    def pytest_xdist_setupnodes(self, config, specs):
        """Give each worker cores // workers threads (torch, and numpy's BLAS, which spins when
        oversubscribed: 2 workers x 2 threads on 2 cores ran the default matrix 4x slower than -n 0).
        Set in the workers' environment before they import anything; an OMP_NUM_THREADS of the
        user's is left alone."""
        if "OMP_NUM_THREADS" in os.environ:
            return
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        for spec in specs:
            spec.env.setdefault("OMP_NUM_THREADS", str(max(1, cores // len(specs))))

    @pytest.hookimpl
    def pytest_collection_finish(self, session):
        self.order = {item.nodeid: i for i, item in enumerate(session.items)}

    @pytest.hookimpl(optionalhook=True)
    def pytest_xdist_node_collection_finished(self, node, ids):
        if not self.order:  # every worker collects the same list; xdist checks that
            self.order = {nodeid: i for i, nodeid in enumerate(ids)}

    @pytest.hookimpl(optionalhook=True)
    def pytest_testnodedown(self, node, error):
        payload = getattr(node, "workeroutput", {}).get(_WORKER_KEY)
        if payload is None:
            if error is not None:
                self.lost_workers.append(f"{node.gateway.id}: {error}")
            return
        data = json.loads(payload)
        if self.environment is None:
            self.environment = data["environment"]
        self.records += [(nodeid, n, CaseResult.from_dict(d)) for nodeid, n, d in data["records"]]

    @pytest.hookimpl
    def pytest_sessionfinish(self, session):
        if self.worker is not None:
            payload = {"environment": self.environment,
                       "records": [[nodeid, n, r.to_dict()] for nodeid, n, r in self.records]}
            self.config.workeroutput[_WORKER_KEY] = json.dumps(payload, allow_nan=False)
            return
        if self.json_path is None and self.report_path is None:
            return
        if not self.records:  # e.g. --collect-only, or -k deselected them: keep the last run's files
            self.written.append("no precision case ran: no results written")
            return
        from .environment import fingerprint
        from .results import write_json_atomic

        results = Results(self.results(), self.environment or fingerprint())
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
            base = self.baseline.by_id()
            new = sum(r.id not in base for r in cases)
            not_run = sum(m.event == "missing" for m in compare_results(cases, self.baseline))
            lines.append(f"baseline {self.baseline_path}: {len(cases) - new} cases compared"
                         + (f", {new} not in it" if new else "")
                         + (f", {not_run} of its cases not run here" if not_run else ""))
        lines += self.written
        lines += [f"worker {w} went down: its precision results are missing" for w in self.lost_workers]
        terminalreporter.write_sep("-", "precision-suite")
        for line in lines:
            terminalreporter.write_line(line)


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


def _load_baseline(path: Path) -> Results:
    from .results import ResultsError, load_results

    try:
        return load_results(path)
    except (ResultsError, ValueError, KeyError, TypeError) as e:
        raise _usage("baseline", e) from None


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
    ``modes`` each device gets its own default (emulated; native too on a GPU), as ``run`` does."""
    from .spec import default_modes

    options = {"devices": list(session.devices), **options}
    if session.formats is not None:
        options.setdefault("formats", list(session.formats))
    if "modes" in options:
        return Matrix.from_options(**options).cases()
    devices = Matrix.from_options(devices=options["devices"]).devices
    return [case for device in devices
            for case in Matrix.from_options(**{**options, "devices": [device],
                                               "modes": default_modes([device])}).cases()]


def _test_id(case: Case, varying: list[str]) -> str:
    """``relu-kaiming_normal-fp16-cpu``, ``...-cuda-native``, ``...-cpu-d50`` when depth varies."""
    named = [("in_" if f == "input" else "") + getattr(case, f) for f, default in _ID_NAMED.items()
             if getattr(case, f) != default]
    return "-".join([getattr(case, f) for f in _ID_FIELDS] + named + [_ID_SIZES[f].format(getattr(case, f)) for f in varying])


def pytest_generate_tests(metafunc):
    definition = metafunc.definition
    if not any(definition.get_closest_marker(m) for m in ("precision", "precision_matrix")):
        return
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
        cases = _matrix_cases({**axes, **_as_options(fields)}, metafunc.config.stash[_SESSION])
    except ValueError as e:
        pytest.fail(f"{definition.nodeid}: {e}", pytrace=False)
    varying = [f for f in _ID_SIZES if len({getattr(c, f) for c in cases}) > 1]
    absent = {d: _absent(d) for d in {c.device for c in cases}}
    skip = {d: [pytest.mark.skip(reason=why)] if why else [] for d, why in absent.items()}
    params = [pytest.param(c, id=_test_id(c, varying), marks=skip[c.device]) for c in cases]
    metafunc.parametrize("precision_spec", params, indirect=True)


# ---------------------------------------------------------------- fixtures

@pytest.fixture
def precision_spec(request) -> Case | None:
    """This test's Case when ``@pytest.mark.precision_matrix`` parametrizes it, else None."""
    return getattr(request, "param", None)


@pytest.fixture
def precision_case(request, precision_spec):
    """Run and record a precision case; fail the test when it breaks an expectation.

    ``precision_case()`` runs this test's case (``precision_matrix``, else the ``precision``
    marker's fields); ``precision_case(activation="gelu", format="bf16")`` changes fields of it;
    ``precision_case(Case(...))`` runs that case; ``precision_case(case_result)`` records a
    finished result; ``backward=False`` runs the forward pass only. Returns the CaseResult.
    """
    session: PrecisionSession = request.config.stash[_SESSION]
    expect, fields = _declared(request.node)
    base = precision_spec.to_dict() if precision_spec is not None else fields

    def run(case: Case | CaseResult | None = None, /, *, backward: bool = True, **changes) -> CaseResult:
        if case is not None and changes:
            raise TypeError("precision_case: pass a Case (or CaseResult) or field changes, not both")
        if isinstance(case, CaseResult):
            result = case
        else:
            result = session.run(case if case is not None else _single_case({**base, **changes}), backward)
        session.record(request.node.nodeid, result)
        if result.status == "skipped":
            pytest.skip(f"{result.id}: {result.skip_reason or result.error}")
        failures = session.failures(result, expect)
        if failures:
            pytest.fail("\n".join(failures), pytrace=False)
        return result

    return run


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
