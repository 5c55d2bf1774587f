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
worker runs its share and hands its results to the controller through ``workeroutput``; only the
controller writes the JSON and the report. Workers run cases with the thread count ``-n 0`` uses
(``OMP_NUM_THREADS`` if set, else one: ``environment.resolve_threads``), so that the results are
bit-identical however many workers share them; the plugin sets no worker's environment.

This module is what pytest imports in every project where the package is installed, so it holds
only options, markers and hook dispatch: the session (``pytest_session.PrecisionSession``, with
numpy, ml_dtypes and torch behind it) is created on first need — a ``--precision-*`` option or
ini key, a precision marker, the fixture, or a worker's precision results.
"""

from __future__ import annotations

import pytest

from .defaults import DEFAULTS, DEVICES
from .verdicts import EXPECTATIONS, FAIL_ON_CHOICES

__all__ = ["EXPECTATIONS", "describe_event", "precision_case", "precision_spec", "session"]  # noqa: F822 - describe_event loads lazily (__getattr__)

OPTIONS = (
    ("json", "PATH", "write the results of every precision case of the run to this JSON file"),
    ("report", "PATH", "write the HTML report of every precision case of the run to this file"),
    ("baseline", "PATH", ("results JSON of an earlier run: a test fails when its case's failure, overflow, nan, "
                          "underflow or zero layer (forward or backward) differs from the baseline's, or the "
                          "case ran there and errors now")),
    ("devices", "LIST", (f"devices of precision_matrix tests that name none (default: {','.join(DEVICES)}; "
                         "cuda cases skip where no GPU is present)")),
    ("formats", "LIST", f"formats of precision_matrix tests that name none (default: {','.join(DEFAULTS['formats'])})"),
    ("fail-on", "LIST", f"fail a test whose case shows one of: {', '.join(FAIL_ON_CHOICES)}"),
)
WORKER_KEY = "precision_suite"  # where a worker's results travel in xdist's workeroutput
_MARKERS = ("precision", "precision_matrix")
_SESSION = pytest.StashKey[object]()


def setting(config, name: str) -> str | None:
    """``--precision-NAME``, else the ini key ``precision_NAME``; an empty value is unset."""
    key = "precision_" + name.replace("-", "_")
    value = config.getoption(key) or config.getini(key)
    return (value.strip() or None) if value else None


def setting_source(config, name: str) -> str:
    """Where ``setting(config, name)`` came from, as an error message names it:
    ``--precision-formats`` or ``precision_formats in pytest.ini``."""
    key = "precision_" + name.replace("-", "_")
    if config.getoption(key) or config.inipath is None:
        return f"--precision-{name}"
    return f"{key} in {config.inipath.name}"


def session(config):
    """The run's ``PrecisionSession``, created (and registered for its hooks) on first need."""
    found = config.stash.get(_SESSION, None)
    if found is None:
        from .pytest_session import PrecisionSession

        found = config.stash[_SESSION] = PrecisionSession(config)
        config.pluginmanager.register(found, "precision_suite.session")
    return found


# ---------------------------------------------------------------- hooks

def pytest_addoption(parser):
    group = parser.getgroup("precision", "precision-suite (numerical-precision matrices)")
    for name, metavar, help_text in OPTIONS:
        group.addoption(f"--precision-{name}", metavar=metavar, help=help_text)
        parser.addini(f"precision_{name.replace('-', '_')}", help_text)


def pytest_configure(config):
    config.addinivalue_line("markers", "precision(expect=None, **case_fields): what the test's precision cases "
                                       f"must show (one or a comma list of: {', '.join(EXPECTATIONS[:8])}, ...) "
                                       "and Case fields they use (depth=100, width=256, ...)")
    config.addinivalue_line("markers", "precision_matrix(**axes): parametrize the test over a precision-suite "
                                       "matrix (inits=, activations=, formats=, devices=, depth=, ... as in "
                                       "`precision-suite run`)")
    _refuse_misspelled_ini_keys(config)
    if any(setting(config, name) for name, _, _ in OPTIONS):
        session(config)  # settings are checked now: a bad one stops the run before any test


def _refuse_misspelled_ini_keys(config) -> None:
    """An ini key meant for this plugin but misspelled (``precision_fromats``) stops the run: pytest
    itself only warns of an unknown key, and the setting would silently not apply."""
    ours = [f"precision_{name.replace('-', '_')}" for name, _, _ in OPTIONS]
    for key in _ini_keys(config):
        if key in ours or not key.lower().replace("-", "_").startswith(("precision", "precison", "presicion")):
            continue
        try:
            config.getini(key)  # another plugin's key
            continue
        except ValueError:
            pass
        import difflib

        close = difflib.get_close_matches(key, ours, n=1, cutoff=0.6)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise pytest.UsageError(f"{config.inipath.name}: unknown ini key {key!r}{hint}; valid: {', '.join(ours)}")


def _ini_keys(config) -> list[str]:
    """The keys of pytest's table in the config file pytest read: [pytest] (pytest.ini, tox.ini),
    [tool:pytest] (setup.cfg), [tool.pytest.ini_options] or [tool.pytest] (pyproject.toml). Read
    here because pytest lists them only through a deprecated attribute."""
    import configparser

    path = getattr(config, "inipath", None)
    if path is None:
        return []
    try:
        if path.suffix == ".toml":
            try:
                import tomllib
            except ModuleNotFoundError:  # Python < 3.11
                import tomli as tomllib
            table = tomllib.loads(path.read_text(encoding="utf-8")).get("tool", {}).get("pytest", {})
            return [*table.get("ini_options", {}), *(k for k in table if k != "ini_options")]
        parser = configparser.RawConfigParser()
        parser.read(path, encoding="utf-8")
        section = "tool:pytest" if path.name == "setup.cfg" else "pytest"
        return list(parser[section]) if parser.has_section(section) else []
    except (OSError, ValueError, AttributeError, configparser.Error):  # pytest has said what it could not read
        return []


def pytest_generate_tests(metafunc):
    if any(metafunc.definition.get_closest_marker(m) for m in _MARKERS):
        session(metafunc.config).parametrize(metafunc)


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node, error):
    """A worker finished: its precision results (if it ran any) go to the controller's session."""
    payload = getattr(node, "workeroutput", {}).get(WORKER_KEY)
    known = node.config.stash.get(_SESSION, None)
    if payload is not None or known is not None:
        session(node.config).worker_down(node, payload, error)


# ---------------------------------------------------------------- fixtures

@pytest.fixture
def precision_spec(request):
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
    return session(request.config).case_runner(request, precision_spec)


def __getattr__(name: str):
    """``describe_event`` (the failure message of a case) lives with the session."""
    if name == "describe_event":
        from .pytest_session import describe_event

        return describe_event
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
