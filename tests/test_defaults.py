"""One default per option: the CLI, the Python API and the pytest plugin, each left to its
defaults, run the same cases with the same settings (read where each entry point uses them, not
from ``defaults`` itself), and every help text that names a default names the one in force."""

import argparse
import inspect
import json

import pytest

import precision_suite.compare as compare_module
import precision_suite.runner as runner
import precision_suite.workers as workers
from precision_suite import Case, Matrix, run_case
from precision_suite.cli import _subcommand, main
from precision_suite.compare import Tolerances
from precision_suite.defaults import DEFAULTS, DEVICES

pytest_plugins = ["pytester"]
pytest.importorskip("torch")  # before pytester, whose teardown drops the modules first imported inside a test


class _Captured(Exception):
    """Raised by a stand-in once it has seen what it was given: nothing is computed."""


def _cli_cases(tmp_path, monkeypatch, argv=()) -> list[str]:
    """The case ids ``precision-suite run`` hands to ``run_matrix``."""
    def capture(*args, cases=None, **kwargs):
        raise _Captured([c.id for c in cases])

    with monkeypatch.context() as patch:
        patch.chdir(tmp_path)
        patch.setattr(runner, "run_matrix", capture)
        with pytest.raises(_Captured) as seen:
            main(["run", "--quiet", *argv])
    return seen.value.args[0]


def _api_cases(monkeypatch, **axes) -> list[str]:
    """The case ids ``run_matrix(**axes)`` sends to its workers, in matrix order."""
    def capture(units, *args, **kwargs):
        raise _Captured([c.id for unit in units for c in unit])

    with monkeypatch.context() as patch:
        patch.setattr(workers, "run_units", capture)
        with pytest.raises(_Captured) as seen:
            runner.run_matrix(**axes)
    return seen.value.args[0]


@pytest.fixture
def plugin_default_cases(pytester) -> list[str]:
    """The case ids a bare ``precision_matrix()`` marker collects (those of absent devices too)."""
    pytester.makeconftest("""
        def pytest_collection_modifyitems(items):
            with open("ids.txt", "w") as f:
                f.writelines(item.callspec.params["precision_spec"].id + "\\n" for item in items)
    """)
    pytester.makepyfile("""
        import pytest

        @pytest.mark.precision_matrix()
        def test_default(precision_case):
            pass
    """)
    run = pytester.runpytest_subprocess("-p", "no:cacheprovider", "--collect-only", "-q")
    assert run.ret == pytest.ExitCode.OK
    return (pytester.path / "ids.txt").read_text().split()


@pytest.mark.parametrize("gpu", [False, True], ids=["cpu-only", "with-a-gpu"])
def test_cli_api_and_plugin_default_matrices_are_the_same_cases(tmp_path, monkeypatch, plugin_default_cases, gpu):
    """Left to their defaults, ``precision-suite run``, ``run_matrix()``, ``Matrix()`` and the plugin
    run the same cases: every default init x activation x format, emulated on the CPU, and on a
    machine with a GPU its emulated and native cases too (the plugin collects those everywhere and
    skips them where no GPU is present)."""
    import precision_suite.engine.support as support
    import precision_suite.spec as spec

    monkeypatch.setattr(spec, "_cuda_available", lambda: gpu)
    monkeypatch.setattr(support, "skip_reason", lambda case: None)  # "with-a-gpu" runs here too
    cli = _cli_cases(tmp_path, monkeypatch)
    api = _api_cases(monkeypatch)
    on = {("cpu", "emulated")} | ({("cuda", "emulated"), ("cuda", "native")} if gpu else set())
    matrix = Matrix.from_options().cases()
    assert {(c.device, c.mode) for c in matrix} == on
    assert len(matrix) == len(on) * len(DEFAULTS["inits"]) * len(DEFAULTS["activations"]) * len(DEFAULTS["formats"])
    assert cli == [c.id for c in matrix] == [c.id for c in Matrix().cases()]
    assert sorted(api) == sorted(cli)
    present = [i for i in plugin_default_cases if gpu or "-cuda-" not in i]
    assert sorted(present) == sorted(cli)
    assert len(plugin_default_cases) == len(matrix if gpu else cli) * (1 if gpu else 3)  # cpu; cuda emulated, native


def test_run_case_defaults_are_a_cli_case():
    """``run_case()`` / ``Case()``: a case of the default matrix, so its id matches a CLI run's."""
    assert Case() in Matrix().cases()
    assert Case().id in {c.id for c in Matrix.from_options(devices="cpu").cases()}
    signature = inspect.signature(run_case)
    assert signature.parameters["backward"].default is True  # as run without --no-backward
    assert inspect.signature(runner.run_matrix).parameters["backward"].default is True


def test_compare_defaults_are_tolerances_everywhere(tmp_path, monkeypatch, capsys):
    """``compare``'s flags, ``run --baseline`` and ``compare()`` from Python use the same tolerances."""
    args = _subcommand("compare").parse_args(["a.json", "b.json"])
    assert Tolerances(args.layers, args.bits, args.fraction) == Tolerances()
    assert inspect.signature(compare_module.compare).parameters["tolerances"].default == Tolerances()
    tiny = ["--inits", "normal", "--activations", "relu", "--formats", "fp16", "--depth", "3", "--width", "8",
            "--batch", "2", "-q"]
    assert main(["run", *tiny, "--out", str(tmp_path / "base")]) == 0
    seen = []
    real = compare_module.compare
    monkeypatch.setattr(compare_module, "compare", lambda *a, **k: seen.append(k["tolerances"]) or real(*a, **k))
    assert main(["run", *tiny, "--out", str(tmp_path / "now"), "--baseline", str(tmp_path / "base/results.json")]) == 0
    assert main(["compare", str(tmp_path / "base/results.json"), str(tmp_path / "now/results.json")]) == 0
    assert seen == [Tolerances(), Tolerances()]
    capsys.readouterr()


def test_probe_cli_defaults_are_the_probe_api_s():
    pytest.importorskip("torch")
    from precision_suite.probe.run import probe

    args = vars(_subcommand("probe").parse_args(["pkg.mod:make"]))
    api = {name: p.default for name, p in inspect.signature(probe).parameters.items()
           if p.default is not inspect.Parameter.empty}
    assert args["formats"].split(",") == list(api["formats"])
    assert args["modes"].split(",") == list(api["modes"])
    for name in ("device", "seed", "underflow_threshold", "loss_scale"):
        assert args[name] == api[name], name
    assert args["no_backward"] is not api["backward"]
    # the chain options a probe shares with run default alike
    assert (args["seed"], args["underflow_threshold"], args["loss_scale"]) == (
        Case().seed, Case().underflow_threshold, Case().loss_scale)


def _help(parser: argparse.ArgumentParser, dest: str) -> str:
    action = next(a for a in parser._actions if a.dest == dest)
    return action.help % {"default": action.default} if action.help else ""


def test_help_texts_name_the_defaults_in_force(tmp_path, monkeypatch, capsys):
    from precision_suite.pytest_plugin import OPTIONS

    plugin = {name: text for name, _, text in OPTIONS}
    assert f"default: {','.join(DEVICES)};" in plugin["devices"]
    assert f"(default: {','.join(c for c in dict.fromkeys(c.format for c in Matrix().cases()))})" in plugin["formats"]
    run = _subcommand("run")
    assert f"(default {Case().underflow_threshold:g})" in _help(run, "underflow_threshold")
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert main(["env"]) == 0
    threads = json.loads(capsys.readouterr().out)["torch_threads"]
    assert f"else {threads}:" in _help(run, "threads")
    # --out: where a run without it writes
    monkeypatch.chdir(tmp_path)
    assert main(["run", "--inits", "normal", "--activations", "relu", "--formats", "fp16", "--depth", "2",
                 "--width", "4", "--batch", "2", "-q"]) == 0
    written = [p.parent.name for p in tmp_path.rglob("results.json")]
    assert written == [_help(run, "out").removeprefix("output directory (default: ").removesuffix(")")]
