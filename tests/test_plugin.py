"""The pytest plugin end to end: generated test files run with pytester, as a user would run them."""

import json
import re
import subprocess
import sys

import pytest
import torch

from precision_suite import load_results, run_matrix
from precision_suite.journal import timeless

pytest_plugins = ["pytester"]

TINY = "depth=12, width=16, batch=8"  # a few ms per case
ON_GPU = torch.cuda.is_available()


@pytest.fixture(scope="module", autouse=True)
def _loaded_once():
    """pytester's inline runs drop the modules first imported inside them, and numpy's C extensions
    cannot load twice in one process: run a case and render its report here first."""
    from precision_suite.report import render_report

    render_report(run_matrix(inits="normal", activations="relu", formats="fp16", devices="cpu", depth=2, width=4,
                             batch=2))


@pytest.fixture
def chain_tests(pytester):
    """A test file whose first test survives 12 layers and whose second overflows fp16 at layer ~4."""
    pytester.makepyfile(test_chains=f"""
        import pytest

        @pytest.mark.precision(expect="no-overflow", {TINY})
        def test_kaiming_survives(precision_case):
            precision_case(init="kaiming_normal", activation="relu", format="fp16")

        @pytest.mark.precision(expect="no-overflow", {TINY})
        def test_normal_overflows(precision_case):
            precision_case(init="normal", activation="relu", format="fp16")
    """)
    return pytester


def test_expectation_passes_and_fails_with_the_layer(chain_tests):
    result = chain_tests.runpytest("--precision-json", "out/results.json")
    result.assert_outcomes(passed=1, failed=1)
    results = load_results(chain_tests.path / "out/results.json").by_id()
    normal = next(r for cid, r in results.items() if cid.startswith("relu-normal-fp16"))
    layer = normal.forward.events.first_overflow
    assert layer is not None and normal.theory["applicable"]
    text = result.stdout.str()
    match = re.search(r"expected no-overflow: fp16 overflow at layer (\d+) of 12 \((pre|post)-activation: "
                      r"[\d.]+% of elements past max 65504, amax inf\); theory predicted (\d+|none within 12)", text)
    assert match, text
    assert int(match.group(1)) == layer
    assert match.group(3) == str(normal.theory["first_overflow"])
    assert "test_normal_overflows" in text and "FAILED test_chains.py::test_kaiming_survives" not in text


def test_expectations_survives_and_an_event_that_must_happen(pytester):
    pytester.makepyfile(f"""
        import pytest

        @pytest.mark.precision(expect="overflow,no-underflow", init="normal", activation="relu", {TINY})
        def test_known_to_overflow(precision_case):
            precision_case()

        @pytest.mark.precision(expect="survives", init="normal", activation="relu", {TINY})
        def test_survives(precision_case):
            precision_case()

        @pytest.mark.precision(expect="grad_overflow", init="kaiming_normal", activation="relu", {TINY})
        def test_gradients_overflow(precision_case):
            precision_case()

        # the forward pass survives, the gradients overflow: survives means both directions
        @pytest.mark.precision(expect="no-overflow", init="normal", activation="tanh", depth=12, width=64, batch=8)
        def test_forward_only_survives(precision_case):
            precision_case()

        @pytest.mark.precision(expect="survives", init="normal", activation="tanh", depth=12, width=64, batch=8)
        def test_gradients_fail(precision_case):
            precision_case()
    """)
    result = pytester.runpytest()
    result.assert_outcomes(passed=2, failed=3)
    result.stdout.fnmatch_lines([
        # the gradients of an overflowed chain are NaN from the top: the root cause is named, not its echo
        "expected to survive 12 layers in both directions: fp16 overflow at layer * of 12 (pre-activation*"
        "[[]relu-normal-fp16-*",
        "expected fp16 grad overflow within 12 layers, none happened (the backward pass survived)*",
        "expected to survive 12 layers in both directions: fp16 gradient overflow at layer 1 of 12, the first "
        "in backward order (*[[]tanh-normal-fp16-*",
    ])


def test_json_and_report_are_written(chain_tests):
    result = chain_tests.runpytest("--precision-json", "out/results.json", "--precision-report", "out/report.html")
    result.stdout.fnmatch_lines(["*precision-suite*", "2 precision cases: 1 fail (1 forward, 0 backward first), 0 could not run",
                                 "results: out/results.json", "report:  out/report.html"])
    cases = load_results(chain_tests.path / "out/results.json").cases
    assert [c.case.init for c in cases] == ["kaiming_normal", "normal"]  # collection order
    html = (chain_tests.path / "out/report.html").read_text(encoding="utf-8")
    assert all(c.id in html for c in cases)


def test_ini_settings_are_read_and_the_command_line_wins(chain_tests):
    chain_tests.makeini("[pytest]\nprecision_json = from_ini.json\n")
    chain_tests.runpytest().assert_outcomes(passed=1, failed=1)
    assert (chain_tests.path / "from_ini.json").exists()
    chain_tests.runpytest("--precision-json", "from_cli.json")
    assert (chain_tests.path / "from_cli.json").exists()


def test_matrix_marker_parametrizes_with_readable_ids(pytester):
    pytester.makepyfile(f"""
        import pytest

        @pytest.mark.precision_matrix(inits="kaiming_normal,normal", activations="relu", formats="fp16,bf16", {TINY})
        def test_chain(precision_case, precision_spec):
            result = precision_case()
            assert result.case == precision_spec and result.case.depth == 12
    """)
    result = pytester.runpytest("-v", "-rs")
    ids = re.findall(r"test_chain\[(.+?)\] (?:PASSED|FAILED|SKIPPED)", result.stdout.str())
    assert ids[:4] == ["relu-kaiming_normal-fp16-cpu", "relu-kaiming_normal-bf16-cpu", "relu-normal-fp16-cpu",
                       "relu-normal-bf16-cpu"]
    if ON_GPU:  # on a GPU the cuda cases also run, emulated and native
        assert "relu-normal-bf16-cuda-native" in ids
    else:
        result.assert_outcomes(passed=4, skipped=8)  # cuda: emulated and native
        result.stdout.fnmatch_lines(["SKIPPED [[]8[]] *device 'cuda' is not available here*"])


def test_devices_and_formats_options_set_unnamed_axes(pytester):
    pytester.makepyfile(f"""
        import pytest

        @pytest.mark.precision_matrix(inits="kaiming_normal", activations="relu,tanh", {TINY})
        def test_chain(precision_case):
            precision_case()
    """)
    result = pytester.runpytest("--precision-devices", "cpu", "--precision-formats", "float16,fp8_e5m2",
                                "--collect-only", "-q")
    result.stdout.fnmatch_lines(["*test_chain[[]relu-kaiming_normal-fp16-cpu[]]", "*[[]relu-kaiming_normal-fp8_e5m2-cpu[]]",
                                 "*[[]tanh-kaiming_normal-fp16-cpu[]]", "*[[]tanh-kaiming_normal-fp8_e5m2-cpu[]]",
                                 "4 tests collected*"])


def test_fail_on_and_a_finished_result(pytester):
    pytester.makepyfile(f"""
        from precision_suite import run_case

        def test_recorded(precision_case):
            result = run_case(init="normal", activation="relu", format="fp16", {TINY})
            assert precision_case(result) is result
    """)
    result = pytester.runpytest("--precision-fail-on", "overflow,grad_nan", "--precision-json", "r.json")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*--precision-fail-on overflow: fp16 overflow at layer * of 12*"])
    assert len(load_results(pytester.path / "r.json").cases) == 1


def test_baseline_flags_a_moved_layer(chain_tests):
    chain_tests.runpytest("--precision-json", "base.json")
    same = chain_tests.runpytest("--precision-baseline", "base.json")
    same.assert_outcomes(passed=1, failed=1)  # the overflowing chain fails its expectation, nothing moved
    same.stdout.fnmatch_lines(["baseline base.json: 2 cases compared: no judged event moved"])
    data = json.loads((chain_tests.path / "base.json").read_text())
    survivor = next(c for c in data["cases"] if c["spec"]["init"] == "kaiming_normal")
    survivor["forward"]["first_underflow"] = 9  # the baseline underflowed at 9; now it survives
    (chain_tests.path / "base.json").write_text(json.dumps(data))
    result = chain_tests.runpytest("--precision-baseline", "base.json", "--precision-json", "now.json")
    result.assert_outcomes(failed=2)
    moved = "*moved against the baseline base.json: forward first_underflow layer 9 -> none [[]relu-kaiming_normal-fp16-cpu-*"
    cli = subprocess.run([sys.executable, "-m", "precision_suite", "compare", "base.json", "now.json"],
                         cwd=chain_tests.path, capture_output=True, text=True)
    assert cli.returncode == 1
    verdict = cli.stdout.strip().splitlines()[-1]  # the plugin says what `compare` says
    assert verdict.startswith("REGRESSION: ")
    result.stdout.fnmatch_lines([moved, f"baseline base.json: 2 cases compared: {verdict}"])


@pytest.mark.parametrize("args, message", [
    (["--precision-formats", "fp16,fp17"], "--precision-formats: unknown format 'fp17'; valid: fp64, fp32, fp16, bf16, *"),
    (["--precision-devices", "tpu"], "--precision-devices: unknown device 'tpu'; valid: cpu, cuda, cuda:N, mps"),
    (["--precision-fail-on", "overflw"], "--precision-fail-on: unknown event 'overflw'; valid: overflow, nan, *"),
    (["--precision-baseline", "missing.json"], "--precision-baseline: results file not found: missing.json"),
    (["--precision-json", "."], "--precision-json: . is a directory; give a file path"),
    (["--precision-report", "test_bad_option_is_a_usage_error_at_configure_time.py/r.html"],
     "--precision-report: test_bad_option_is_a_usage_error_at_configure_time.py is not a directory"),
], ids=["formats", "devices", "fail-on", "baseline", "json-folder", "report-in-a-file"])
def test_bad_option_is_a_usage_error_at_configure_time(pytester, args, message):
    pytester.makepyfile("def test_never_runs(): raise AssertionError")
    result = pytester.runpytest(*args)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines([f"ERROR: {message}"])


@pytest.mark.parametrize("ini, message", [
    ("[pytest]\nprecision_formats = fp16,fp17\n",
     "precision_formats in tox.ini: unknown format 'fp17'; valid: fp64, fp32, fp16, bf16, *"),
    ("[pytest]\nprecision_fromats = fp16\n",
     "tox.ini: unknown ini key 'precision_fromats' (did you mean 'precision_formats'?); valid: precision_json, *"),
    ("[tool.pytest.ini_options]\nprecision-json = 'r.json'\n",
     "pyproject.toml: unknown ini key 'precision-json' (did you mean 'precision_json'?); valid: *"),
], ids=["value", "key", "pyproject-key"])
def test_bad_ini_setting_is_a_usage_error_naming_the_file(pytester, ini, message):
    """An ini value is checked as its option is, and named as the ini key; a misspelled key, which
    pytest only warns about (the setting would silently not apply), stops the run too."""
    pytester.makepyfile("def test_never_runs(): raise AssertionError")
    if ini.startswith("[tool."):
        pytester.makepyprojecttoml(ini)
    else:
        pytester.makeini(ini)
    result = pytester.runpytest()
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines([f"ERROR: {message}"])


@pytest.mark.parametrize("markers, message", [
    ('precision(expect="no-overflw")', "unknown expectation 'no-overflw'; valid: survives, no-overflow, *"),
    ("precision(dpeth=10)", "unknown argument 'dpeth'; valid: expect, init, activation, *"),
    ('precision_matrix(activations="relu,swish")', "unknown activation 'swish'*"),
    ("precision_matrix(depth=10) @pytest.mark.precision(depth=12)",
     "*'depth' is set by both @pytest.mark.precision and @pytest.mark.precision_matrix"),
], ids=["expectation", "field", "axis-value", "conflict"])
def test_bad_marker_is_a_collection_error(pytester, markers, message):
    decorators = "\n".join(f"@pytest.mark.{m}" for m in markers.split(" @pytest.mark."))
    pytester.makepyfile(f"""
import pytest

{decorators}
def test_chain(precision_case):
    precision_case()
""")
    result = pytester.runpytest()
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines([f"*{message}"])


def test_precision_case_names_its_valid_keywords(pytester):
    pytester.makepyfile(f"""
        def test_misspelled(precision_case):
            precision_case(init="normal", widht=16, {TINY.replace("width=16, ", "")})
    """)
    result = pytester.runpytest()
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["E       TypeError: precision_case() got an unknown keyword 'widht' (did you mean "
                                 "'width'?); valid: backward, init, activation, *"])


def test_xdist_workers_results_reach_one_json(pytester):
    pytester.makepyfile(f"""
        import pytest

        @pytest.mark.precision_matrix(inits="kaiming_normal,normal,torch_default", activations="relu",
                                      formats="fp16,bf16", devices="cpu", {TINY})
        def test_chain(precision_case):
            precision_case()
    """)
    serial = pytester.runpytest_subprocess("-n", "0", "--precision-json", "serial.json")
    parallel = pytester.runpytest_subprocess("-n", "2", "--precision-json", "parallel.json", "--precision-report", "p.html")
    assert serial.ret == parallel.ret == pytest.ExitCode.OK
    parallel.stdout.fnmatch_lines(["6 precision cases: * fail (* forward, * backward first), 0 could not run"])
    assert sorted(p.name for p in pytester.path.iterdir() if p.suffix in (".json", ".html")) == [
        "p.html", "parallel.json", "serial.json"]
    a, b = (json.loads((pytester.path / name).read_text()) for name in ("serial.json", "parallel.json"))
    assert timeless(a) == timeless(b)  # bit for bit (tests/test_determinism_pytest.py: the shipped matrix)


def test_xdist_workers_keep_their_own_environments(pytester):
    """Workers whose fingerprints differ (here: a label naming the worker) each keep theirs in the
    JSON, and every case points at the fingerprint of the worker that ran it."""
    pytester.makeconftest("""
        import os
        import precision_suite.runner as runner

        real = runner.fingerprint
        runner.fingerprint = lambda *a, **k: {**real(*a, **k), "label": os.environ.get("PYTEST_XDIST_WORKER")}
    """)
    pytester.makepyfile(f"""
        import os
        import pytest

        @pytest.mark.precision_matrix(inits="kaiming_normal,normal,torch_default,lecun_normal", activations="relu",
                                      formats="fp16", devices="cpu", {TINY})
        def test_chain(precision_case):
            result = precision_case()
            with open("ran_by.txt", "a") as f:
                f.write(f"{{result.id}} {{os.environ['PYTEST_XDIST_WORKER']}}\\n")
    """)
    run = pytester.runpytest_subprocess("-n", "2", "--precision-json", "out.json")
    assert run.ret == pytest.ExitCode.OK
    ran_by = dict(line.split() for line in (pytester.path / "ran_by.txt").read_text().splitlines())
    data = json.loads((pytester.path / "out.json").read_text())
    labels = [env["label"] for env in data["environments"]]
    assert sorted(labels) == sorted(set(ran_by.values()))
    assert {c["id"]: labels[c["environment"]] for c in data["cases"]} == ran_by


def test_skip_reason_names_the_missing_device(pytester):
    if ON_GPU:
        pytest.skip("this machine has a GPU: cuda cases run here")
    pytester.makepyfile(f"""
        def test_gpu(precision_case):
            precision_case(device="cuda", {TINY})
    """)
    result = pytester.runpytest("-rs")
    result.assert_outcomes(skipped=1)
    result.stdout.fnmatch_lines(["SKIPPED [[]1[]] *device 'cuda' is not available here (torch.cuda.is_available() is False)"])



# ---------------------------------------------------------------- a light plugin, batched cases

def test_plugin_import_loads_no_numerics(tmp_path):
    """pytest imports the plugin in every project where the package is installed: that must not
    pull numpy, ml_dtypes or torch, nor the session, until a precision option, marker or fixture
    is used — checked in a fresh interpreter, and in a pytest run of a plain test file."""
    heavy = ("numpy", "ml_dtypes", "torch", "precision_suite.pytest_session")
    probe = ("import sys, precision_suite.pytest_plugin; "
             f"print([m for m in {heavy!r} if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
    (tmp_path / "test_plain.py").write_text(
        "import sys\n\ndef test_plain():\n"
        f"    assert [m for m in {heavy!r} if m in sys.modules] == []\n")
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:randomly",
                          str(tmp_path / "test_plain.py")], cwd=tmp_path, capture_output=True, text=True)
    assert run.returncode == 0, run.stdout[-2000:]


def test_matrix_cases_run_batched_and_equal_the_cli_s(pytester, monkeypatch):
    """A session runs a draw group's collected cases in one ``run_matrix`` call, and every test's
    case equals the same case from one ``run_matrix`` over the whole list, statistic for statistic."""
    import precision_suite.runner as runner

    calls = []
    real = runner.run_matrix

    def counting(*args, **kwargs):
        calls.append(len(kwargs.get("cases") or ()))
        return real(*args, **kwargs)

    monkeypatch.setattr(runner, "run_matrix", counting)
    pytester.makepyfile(test_batched=f"""
        import pytest

        @pytest.mark.precision_matrix(inits="normal,kaiming_normal", activations="relu,tanh,gelu",
                                      formats="fp16,bf16", devices="cpu", {TINY})
        def test_chain(precision_case):
            precision_case()
    """)
    result = pytester.runpytest("-p", "no:randomly", "--precision-json", "out/results.json")
    result.assert_outcomes(passed=12)
    assert sorted(calls) == [6, 6]  # one call per init (draw group), not one per case
    got = load_results(pytester.path / "out/results.json")
    cli = real(inits="normal,kaiming_normal", activations="relu,tanh,gelu", formats="fp16,bf16", devices="cpu",
               depth=12, width=16, batch=8)
    strip = lambda r: {k: v for k, v in r.to_dict().items() if k not in ("seconds", "environment")}  # noqa: E731
    assert {r.id: strip(r) for r in got.cases} == {r.id: strip(r) for r in cli.cases}
