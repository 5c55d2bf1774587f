"""Bad input, everywhere a user can give it: each entry of the table gives exit 2 (the CLI) or a
typed exception (the API), one line that names the bad value and what is valid, no traceback, and
nothing written: the working directory is exactly as it was."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

import precision_suite
from precision_suite import (Case, CaseResult, Matrix, Results, SpecError, get_format, load_results, merge_results,
                             probe, run_case, run_matrix, watch)
from precision_suite.cli import main
from precision_suite.compare import CompareError, Tolerances, compare
from precision_suite.config import ConfigError
from precision_suite.environment import parallel_limit
from precision_suite.report import render_report, write_report
from precision_suite.results import ResultsError

CPUS = parallel_limit()
TINY = ["--inits", "normal", "--activations", "relu", "--formats", "fp16", "--depth", "3", "--width", "8",
        "--batch", "2"]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A good results file and broken ones, in a folder each test copies into its own directory."""
    folder = tmp_path_factory.mktemp("inputs")
    good = run_matrix(inits="normal", activations="relu", formats="fp16", depth=[3], width=[8], batch=[2]).to_dict()
    (folder / "good.json").write_text(json.dumps(good))
    text = json.dumps(good)
    (folder / "truncated.json").write_text(text[: len(text) // 2])
    (folder / "garbage.json").write_bytes(b"\x89PNG\r\n\x1a\n\x00\xff")
    (folder / "other.json").write_text(json.dumps({"schema": "pytest-benchmark", "benchmarks": []}))
    (folder / "list.json").write_text("[1, 2]")
    for name, edit in {"newer.json": lambda d: d.update(schema_version=99),
                       "status.json": lambda d: d["cases"][0].update(status="done"),
                       "environment.json": lambda d: d["cases"][0].update(environment=4),
                       "spec.json": lambda d: d["cases"][0]["spec"].update(format="fp12"),
                       "nocases.json": lambda d: d.pop("cases")}.items():
        broken = json.loads(text)
        edit(broken)
        (folder / name).write_text(json.dumps(broken))
    (folder / "folder.json").mkdir()
    return folder


def _snapshot(root: Path) -> dict:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*")}


# (id, files written into the working directory {name: text}, argv, what the one line must say)
CLI = [
    # run: every axis, every option
    ("init", {}, ["run", "--inits", "gaussian"], "unknown init 'gaussian'; valid: normal, lecun_normal"),
    ("init-param", {}, ["run", "--inits", "normal(stdd=2)"], "'stdd=2' is not one of mean=<number>, std=<number>"),
    ("init-list", {}, ["run", "--inits", "normal,,relu"], "empty item in list 'normal,,relu'"),
    ("init-paren", {}, ["run", "--inits", "normal(std=2"], "unbalanced '('"),
    ("activation", {}, ["run", "--activations", "swish"], "unknown activation 'swish'; valid: identity, relu"),
    ("format", {}, ["run", "--formats", "fp12"], "unknown format 'fp12'; valid: fp64, fp32, fp16"),
    ("scaled-param", {}, ["run", "--formats", "mxfp4(scale_rule=round)"], "scale_rule='round'; valid: floor, ceil"),
    ("scaled-width", {}, ["run", "--formats", "mxfp4", "--width", "48"],
     "--width 48 is not a whole number of mxfp4's 32-element blocks; use a multiple of 32"),
    ("scaled-tiles", {}, ["run", "--formats", "fp8_block", "--width", "64"],
     "--width 64 is not a whole number of fp8_block's 128-element blocks; use a multiple of 128"),
    ("device", {}, ["run", "--devices", "tpu"], "unknown device 'tpu'; valid: cpu, cuda, cuda:N, mps"),
    ("mode", {}, ["run", "--modes", "fast"], "unknown mode 'fast'; valid: emulated, native, autocast"),
    ("backend", {}, ["run", "--backends", "jax"], "unknown backend 'jax'; valid: torch, numpy"),
    ("norm", {}, ["run", "--norms", "groupnorm"], "unknown norm 'groupnorm'; valid: none, batchnorm"),
    ("input", {}, ["run", "--inputs", "shifted(mean=x)"], "malformed input 'shifted(mean=x)': expected shifted(mean="),
    ("depth", {}, ["run", "--depth", "0"], "--depth must be between 1 and 100000, got 0"),
    ("width", {}, ["run", "--width", "abc"], "--width must be an integer between 1 and 65536, got 'abc'"),
    ("batch", {}, ["run", "--batch", "-1"], "--batch must be between 1 and 1048576, got -1"),
    ("seed", {}, ["run", "--seed", "1.5"], "--seed must be an integer between 0 and"),
    ("batchnorm-batch", {}, ["run", "--norms", "batchnorm", "--batch", "1"], "batchnorm needs --batch >= 2"),
    ("threshold", {}, ["run", "--underflow-threshold", "2"], "--underflow-threshold must be in (0, 1], got 2.0"),
    ("loss-scale", {}, ["run", "--loss-scale", "0"], "--loss-scale must be > 0, got 0.0"),
    ("residual", {}, ["run", "--residual", "nan"], "--residual must be finite, got nan"),
    ("residual-type", {}, ["run", "--residual", "x"], "argument --residual: invalid float value: 'x'"),
    ("fail-on", {}, ["run", "--fail-on", "explode"], "--fail-on: unknown event 'explode'; valid: overflow, nan"),
    ("jobs", {}, ["run", "--jobs", "0"], f"--jobs must be an integer from 1 to {CPUS} (the CPUs here), got 0"),
    ("threads", {}, ["run", "--threads", "0"], f"--threads must be an integer from 1 to {CPUS} (the CPUs here), got 0"),
    ("threads-many", {}, ["run", "--threads", str(CPUS + 1)], f"--threads must be an integer from 1 to {CPUS}"),
    ("jobs-many", {}, ["run", "--jobs", "100000"], f"--jobs must be an integer from 1 to {CPUS}"),
    ("flag", {}, ["run", "--widht", "3"], "unrecognized arguments: --widht"),
    ("memory", {}, ["run", "--width", "8192", "--depth", "100000"], "GiB available"),
    ("baseline", {}, ["run", *TINY, "--baseline", "missing.json"], "results file not found: missing.json"),
    ("config-missing", {}, ["run", "--config", "missing.toml"], "--config: file not found: missing.toml"),
    ("json-folder", {"folder.json": None}, ["run", *TINY, "--json", "folder.json"],
     "--json folder.json: folder.json is a directory; give a file path"),
    ("out-file", {"out": "a file"}, ["run", *TINY, "--out", "out"], "--json out/results.json: out is not a directory"),
    ("html-folder", {"folder.json": None}, ["run", *TINY, "--html", "folder.json"], "--html folder.json: folder.json is"),
    # config: the file and pyproject.toml's section
    ("pyproject-toml", {"pyproject.toml": "[tool.precision-suite\ndepth = 3\n"}, ["run"],
     "pyproject.toml: invalid TOML: Expected ']' at the end of a table declaration"),
    ("section-underscore", {"pyproject.toml": "[tool.precision_suite]\ndepth = 3\n"}, ["run"],
     "section [tool.precision_suite] is not read; the section is [tool.precision-suite]"),
    ("section-squashed", {"pyproject.toml": "[tool.precisionsuite]\ndepth = 3\n"}, ["run"],
     "section [tool.precisionsuite] is not read"),
    ("section-top", {"pyproject.toml": "[precision-suite]\ndepth = 3\n"}, ["run"],
     "section [precision-suite] is not read; the section is [tool.precision-suite]"),
    ("section-type", {"pyproject.toml": '[tool]\nprecision-suite = "fast"\n'}, ["run"],
     "[tool.precision-suite] must be a table of options, got a string"),
    ("config-key", {"pyproject.toml": "[tool.precision-suite]\nwidht = 3\n"}, ["run"],
     "unknown option 'widht' (did you mean 'width'?); valid: activations, backends"),
    ("config-bool", {"pyproject.toml": '[tool.precision-suite]\nbias = "yes"\n'}, ["run"],
     "'bias' must be true or false, got 'yes' (a string)"),
    ("config-int", {"pyproject.toml": "[tool.precision-suite]\njobs = 1.5\n"}, ["run"],
     "'jobs' must be an integer, got 1.5 (a float)"),
    ("config-list", {"pyproject.toml": "[tool.precision-suite]\ndepth = []\n"}, ["run"], "got [] (an empty array)"),
    ("config-twice", {"pyproject.toml": '[tool.precision-suite]\nfail-on = "nan"\nfail_on = "zero"\n'}, ["run"],
     "'fail_on' is set twice (as 'fail-on' and 'fail_on')"),
    ("config-value", {"pyproject.toml": '[tool.precision-suite]\ninits = "gaussian"\n'}, ["run"],
     "unknown init 'gaussian'"),
    ("config-file-toml", {"c.toml": "depth = = 3\n"}, ["run", "--config", "c.toml"], "--config c.toml: invalid TOML"),
    ("config-file-section", {"c.toml": "[tool.black]\nline-length = 9\n"}, ["run", "--config", "c.toml"],
     "no [tool.precision-suite] section (it has [tool.black])"),
    ("config-file-utf8", {"c.toml": b"depth = 3 # \xff\n"}, ["run", "--config", "c.toml"], "not UTF-8 text"),
    # report, compare, merge: results files
    ("report-missing", {}, ["report", "missing.json"], "results file not found: missing.json"),
    ("report-truncated", {"truncated.json": None}, ["report", "truncated.json"], "truncated.json is not valid JSON"),
    ("report-garbage", {"garbage.json": None}, ["report", "garbage.json"], "garbage.json is not valid JSON"),
    ("report-other", {"other.json": None}, ["report", "other.json"],
     "is not a precision-suite results file (its \"schema\" is 'pytest-benchmark'"),
    ("report-list", {"list.json": None}, ["report", "list.json"], "not a precision-suite results file (top level is list)"),
    ("report-newer", {"newer.json": None}, ["report", "newer.json"], "schema_version 99, newer than this tool reads"),
    ("report-status", {"status.json": None}, ["report", "status.json"],
     "cases[0].status: must be one of ['ok', 'error', 'skipped']"),
    ("report-environment", {"environment.json": None}, ["report", "environment.json"],
     "cases[0].environment is 4, but the file has 1 environments"),
    ("report-spec", {"spec.json": None}, ["report", "spec.json"], "unknown format 'fp12'"),
    ("report-nocases", {"nocases.json": None}, ["report", "nocases.json"], "must contain"),
    ("report-folder", {"folder.json": None}, ["report", "folder.json"], "cannot read results file folder.json"),
    ("report-output", {"good.json": None, "folder.json": None}, ["report", "good.json", "-o", "folder.json"],
     "--output folder.json: folder.json is a directory"),
    ("report-baseline", {"good.json": None}, ["report", "good.json", "-o", "r.html", "--baseline", "status.json"],
     "results file not found: status.json"),
    ("compare-one", {"good.json": None}, ["compare", "good.json"], "compare needs BASELINE.json and CURRENT.json"),
    ("compare-axis", {"good.json": None}, ["compare", "good.json", "good.json", "--across", "colour"],
     "--across: unknown axis 'colour'; valid: device, mode, backend, format"),
    ("compare-layers", {"good.json": None}, ["compare", "good.json", "good.json", "--layers", "-1"],
     "--layers must be >= 0"),
    ("compare-bits", {"good.json": None}, ["compare", "good.json", "good.json", "--bits", "x"],
     "argument --bits: invalid float value: 'x'"),
    ("compare-newer", {"good.json": None, "newer.json": None}, ["compare", "good.json", "newer.json", "--json", "d.json"],
     "schema_version 99"),
    ("merge-output", {"good.json": None}, ["merge", "good.json"], "the following arguments are required: -o/--output"),
    ("merge-output-file", {"good.json": None, "x": "a file"}, ["merge", "good.json", "-o", "x/m.json"],
     "--output x/m.json: x is not a directory"),
    ("compare-json-folder", {"good.json": None, "folder.json": None},
     ["compare", "good.json", "good.json", "--json", "folder.json"], "--json folder.json: folder.json is a directory"),
    ("merge-truncated", {"good.json": None, "truncated.json": None}, ["merge", "good.json", "truncated.json", "-o", "m.json"],
     "truncated.json is not valid JSON"),
    # the small commands
    ("schema", {}, ["schema", "extra"], "unrecognized arguments: extra"),
    ("formats", {}, ["formats", "--all"], "unrecognized arguments: --all"),
    ("env", {}, ["env", "--json"], "unrecognized arguments: --json"),
    ("list", {}, ["list", "inits"], "unrecognized arguments: inits"),
    ("command", {}, ["runn"], "invalid choice: 'runn'"),
    # probe
    ("probe-form", {}, ["probe", "justaname"], "factory 'justaname' must be package.module:function"),
    ("probe-html", {"folder.json": None}, ["probe", "os:getcwd", "--html", "folder.json"], "--html folder.json: folder.json"),
    ("probe-module", {}, ["probe", "nosuchmod:make"], "cannot import 'nosuchmod' for factory 'nosuchmod:make'"),
    ("probe-returns", {}, ["probe", "os:getcwd"], "factory 'os:getcwd' returned str; it must return a torch.nn.Module"),
]


@pytest.mark.parametrize("given,argv,needle", [c[1:] for c in CLI], ids=[c[0] for c in CLI])
def test_cli_bad_input(files, tmp_path, monkeypatch, capsys, given, argv, needle):
    for name, text in given.items():
        if text is None:
            source = files / name
            (shutil.copytree if source.is_dir() else shutil.copy)(source, tmp_path / name)
        else:
            (tmp_path / name).write_bytes(text if isinstance(text, bytes) else text.encode())
    monkeypatch.chdir(tmp_path)
    before = _snapshot(tmp_path)
    code = main(argv)
    out, err = capsys.readouterr()
    assert code == 2, (out, err)
    assert needle in err
    assert len(err.strip().splitlines()) == 1 and err.startswith("precision-suite: error: "), err
    assert "Traceback" not in err + out
    assert _snapshot(tmp_path) == before


# (id, the call, the exception type, what its one line must say)
API = [
    ("run_matrix-keyword", lambda: run_matrix(depht=5), TypeError,
     "run_matrix() got an unknown keyword 'depht' (did you mean 'depth'?); valid: matrix, cases, backward,"),
    ("run_matrix-width", lambda: run_matrix(widht=64), TypeError, "unknown keyword 'widht' (did you mean 'width'?)"),
    ("run_matrix-own", lambda: run_matrix(json="r.json"), TypeError, "(did you mean 'json_path'?)"),
    ("run_matrix-value", lambda: run_matrix(formats="fp16", underflow_threshold=0), SpecError,
     "--underflow-threshold must be in (0, 1], got 0.0"),
    ("run_matrix-empty", lambda: run_matrix(inits=[]), SpecError, "--inits is an empty list"),
    ("run_matrix-bias", lambda: run_matrix(bias="yes"), SpecError, "--bias must be True or False, got 'yes'"),
    ("run_matrix-jobs", lambda: run_matrix(inits="normal", jobs=0), SpecError,
     f"run_matrix: jobs must be an integer from 1 to {CPUS} (the CPUs here), got 0 (or None)"),
    ("run_matrix-threads", lambda: run_matrix(inits="normal", threads="2"), SpecError,
     f"run_matrix: threads must be an integer from 1 to {CPUS} (the CPUs here), got '2' (or None)"),
    ("run_matrix-threads-many", lambda: run_matrix(inits="normal", threads=CPUS + 1), SpecError,
     f"run_matrix: threads must be an integer from 1 to {CPUS}"),
    ("run_matrix-backward", lambda: run_matrix(inits="normal", backward="no"), SpecError,
     "run_matrix: backward must be True or False, got 'no'"),
    ("run_matrix-json_path", lambda: run_matrix(inits="normal", json_path=3), SpecError,
     "run_matrix: json_path must be a str or os.PathLike, got int"),
    ("run_matrix-ignored", lambda: run_matrix(cases=[Case(depth=2)], depth=[5]), TypeError,
     "axes (depth) go with neither matrix= nor cases="),
    ("run_case-keyword", lambda: run_case(widht=64), TypeError,
     "run_case() got an unknown keyword 'widht' (did you mean 'width'?); valid: case, backward, rel_error, init,"),
    ("run_case-own", lambda: run_case(backwards=False), TypeError, "'backwards' (did you mean 'backward'?)"),
    ("run_case-depth", lambda: run_case(depth=0), SpecError, "--depth must be between 1 and 100000, got 0"),
    ("Case-format", lambda: Case(format="fp12"), SpecError, "unknown format 'fp12'"),
    ("Case-width", lambda: Case(width=2.5), SpecError, "--width must be an integer between 1 and 65536, got 2.5"),
    ("Case-threshold", lambda: Case(underflow_threshold=1.5), SpecError, "--underflow-threshold must be in (0, 1]"),
    ("Case-keyword", lambda: Case(activations="relu"), TypeError,
     "Case() got an unknown keyword 'activations' (did you mean 'activation'?); valid: init, activation,"),
    ("Matrix-keyword", lambda: Matrix(depht=3), TypeError, "Matrix() got an unknown keyword 'depht' (did you mean"),
    ("Matrix-options", lambda: Matrix.from_options(modes="fast"), SpecError, "unknown mode 'fast'"),
    ("Matrix-options-keyword", lambda: Matrix.from_options(mode="native"), TypeError,
     "Matrix.from_options() got an unknown keyword 'mode' (did you mean 'modes'?)"),
    ("load_results-fd", lambda: load_results(3), TypeError, "path must be a str or os.PathLike, got int"),
    ("load_results-missing", lambda: load_results("missing.json"), ResultsError, "results file not found"),
    ("load_results-keyword", lambda: load_results(pth="good.json"), TypeError,
     "load_results() got an unknown keyword 'pth' (did you mean 'path'?); valid: path"),
    ("merge_results-path", lambda: merge_results("good.json"), TypeError, "parts must be a list of Results"),
    ("merge_results-keyword", lambda: merge_results([load_results("good.json")], allow_mixd=True), TypeError,
     "merge_results() got an unknown keyword 'allow_mixd' (did you mean 'allow_mixed'?); valid: parts, allow_mixed"),
    ("compare-across", lambda: compare(load_results("good.json"), load_results("good.json"), across="colour"),
     CompareError, "unknown axis 'colour'"),
    ("compare-keyword", lambda: compare(load_results("good.json"), load_results("good.json"), layers=1), TypeError,
     "compare() got an unknown keyword 'layers'; valid: baseline, current, tolerances, across, values, strict_stats"),
    ("Tolerances-keyword", lambda: Tolerances(bit=0.5), TypeError, "Tolerances() got an unknown keyword 'bit' (did you"),
    ("render_report-keyword", lambda: render_report(load_results("good.json"), baselin=None), TypeError,
     "render_report() got an unknown keyword 'baselin' (did you mean 'baseline'?); valid: results, baseline"),
    ("write_report-keyword", lambda: write_report(load_results("good.json"), path="r.html", out="x"), TypeError,
     "write_report() got an unknown keyword 'out'; valid: results, path, baseline"),
    ("get_format-keyword", lambda: get_format(format="fp16"), TypeError, "get_format() got an unknown keyword 'format'"),
    ("Results-keyword", lambda: Results((), environment={}), TypeError,
     "Results() got an unknown keyword 'environment' (did you mean 'environments'?); valid: cases,"),
    ("CaseResult-keyword", lambda: CaseResult(Case(), stauts="ok"), TypeError,
     "CaseResult() got an unknown keyword 'stauts' (did you mean 'status'?)"),
    ("probe-keyword", lambda: probe(None, None, format="fp16"), TypeError,
     "probe() got an unknown keyword 'format' (did you mean 'formats'?); valid: model, example_inputs, formats,"),
    ("watch-keyword", lambda: watch(None, formats="bf16"), TypeError,
     "watch() got an unknown keyword 'formats' (did you mean 'format'?); valid: model, format, mode, device,"),
]
@pytest.mark.parametrize("call,error,needle", [pytest.param(*c[1:], id=c[0]) for c in API])
def test_api_bad_input(files, tmp_path, monkeypatch, call, error, needle):
    shutil.copy(files / "good.json", tmp_path / "good.json")
    monkeypatch.chdir(tmp_path)
    before = _snapshot(tmp_path)
    with pytest.raises(error) as e:
        call()
    assert needle in str(e.value) and "\n" not in str(e.value)
    assert _snapshot(tmp_path) == before


def test_every_public_callable_names_its_valid_keywords():
    """Everything ``precision_suite`` exports that takes keywords refuses one it does not take, in
    the table's words, before it runs (Python's own TypeError names no valid choice)."""
    callables = [name for name in precision_suite.__all__ if callable(getattr(precision_suite, name))
                 and not (isinstance(getattr(precision_suite, name), type)
                          and issubclass(getattr(precision_suite, name), Exception))]
    assert len(callables) >= 12
    for name in callables:
        with pytest.raises(TypeError) as e:
            getattr(precision_suite, name)(not_a_keyword=1)
        assert re.fullmatch(r"\w+\(\) got an unknown keyword 'not_a_keyword'; valid: \w+(, \w+)*", str(e.value)), name


def test_the_table_covers_every_command_and_is_large():
    """At least 40 bad inputs, and every CLI command is in the table."""
    from precision_suite.cli import _COMMANDS

    assert len(CLI) + len(API) >= 40
    assert set(_COMMANDS) <= {argv[0] for _, _, argv, _ in CLI}


def test_config_errors_are_the_one_config_type(tmp_path):
    """The config module raises its own error, which the CLI turns into exit 2."""
    from precision_suite.cli import _subcommand
    from precision_suite.config import load_config, run_options

    (tmp_path / "pyproject.toml").write_text("[tool.precision-suite]\nbatchh = 2\n")
    with pytest.raises(ConfigError, match="unknown option 'batchh' \\(did you mean 'batch'\\?\\)"):
        load_config(None, run_options(_subcommand("run")._actions), cwd=tmp_path)


def test_a_catch_all_must_say_where_its_keywords_go():
    """``strict_keywords`` cannot check a ``**kwargs`` it knows nothing of: it refuses to guess."""
    from precision_suite.keywords import strict_keywords

    def takes_anything(**options):
        return options

    with pytest.raises(TypeError, match="strict_keywords: takes_anything takes \\*\\*kwargs; say where they go"):
        strict_keywords(takes_anything)
    forwarded = strict_keywords(takes_anything, forwards_to=Case)
    assert forwarded(width=3) == {"width": 3}
    with pytest.raises(TypeError, match="takes_anything\\(\\) got an unknown keyword 'widht' \\(did you mean 'width'"):
        forwarded(widht=3)
