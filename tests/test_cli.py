"""The command line as a user meets it: exit codes, one-line errors, nothing half-written."""

import json
import subprocess
import sys

import pytest

from precision_suite.cli import main

TINY = ["--depth", "6", "--width", "16", "--batch", "4", "--inits", "normal,kaiming_normal",
        "--activations", "identity,relu", "--formats", "fp16,bf16"]


def test_run_writes_json_and_prints_summary(tmp_path, capsys):
    assert main(["run", *TINY, "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    data = json.loads((tmp_path / "results.json").read_text())
    assert len(data["cases"]) == 8
    for case in data["cases"]:
        assert case["id"] in out
    assert "identity-normal-fp16-cpu-emulated-torch-w16-d6-b4-s0" in out
    footer = next(line for line in out.splitlines() if line.startswith("8 cases:"))
    failing = [c for c in data["cases"] if c["failure"]]
    backward = sum(c["failure"]["direction"] == "backward" for c in failing)
    assert footer == (f"8 cases: 8 ran, {len(failing)} fail ({len(failing) - backward} forward, {backward} backward "
                      "first), 0 errors, 0 skipped")


def test_summary_row_shows_a_scaled_formats_flush_warning(tmp_path, capsys):
    """mxfp4 flushes ~9% of N(0,1) elements of its first matmul input (first_flush @ 1): the summary's
    warning column says so, at the layer the results hold."""
    assert main(["run", "--depth", "3", "--width", "64", "--batch", "16", "--inits", "kaiming_normal",
                 "--activations", "relu", "--formats", "mxfp4", "--no-backward", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    [case] = json.loads((tmp_path / "results.json").read_text())["cases"]
    flush = case["forward"]["first_flush"]
    assert flush is not None
    row = next(line for line in out.splitlines() if line.startswith(case["id"]))
    assert f"flush@{flush}" in row


@pytest.mark.parametrize("args,needle", [
    (["--inits", "gaussian"], "unknown init 'gaussian'; valid:"),
    (["--activations", "swish"], "unknown activation 'swish'; valid: identity"),
    (["--formats", "fp12"], "unknown format 'fp12'"),
    (["--depth", "0"], "--depth must be between 1 and"),
    (["--width", "abc"], "--width must be an integer"),
    (["--inits", "normal(std=2"], "unbalanced"),
    (["--modes", "fast"], "unknown mode 'fast'; valid: emulated, native"),
    (["--fail-on", "explode"], "--fail-on: unknown event 'explode'"),
    (["--residual", "x"], "invalid float value"),
    (["--width", "60000", "--batch", "60000"], "elements per tensor"),
    (["--width", "8192", "--depth", "100000"], "GiB"),
    (["--jobs", "0"], "--jobs must be an integer from 1 to"),
])
def test_bad_input_one_line_exit_2_nothing_written(tmp_path, capsys, args, needle):
    code = main(["run", *args, "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2
    assert needle in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_env_reports_the_threads_a_run_uses(capsys, monkeypatch):
    torch = pytest.importorskip("torch")
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)  # this process's setting is not what runs use
    assert main(["env"]) == 0
    assert json.loads(capsys.readouterr().out)["torch_threads"] == 1
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert main(["env"]) == 0
    assert json.loads(capsys.readouterr().out)["torch_threads"] == 3


def test_top_level_help_is_plain_text(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    assert "``" not in out and "exit codes:" in out and "docs/definitions.md" in out


def test_fail_on_exits_1_naming_case_and_layer(tmp_path, capsys):
    code = main(["run", "--inits", "normal", "--activations", "identity", "--formats", "fp16", "--depth", "10",
                 "--width", "256", "--batch", "4", "--fail-on", "overflow", "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 1
    assert "identity-normal-fp16" in err and "overflow at layer" in err
    assert main(["run", "--inits", "kaiming_normal", "--activations", "relu", "--formats", "fp32", "--depth", "4",
                 "--width", "16", "--batch", "4", "--fail-on", "overflow,grad_nan,error", "--out", str(tmp_path)]) == 0


def test_config_file_and_command_line_precedence(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "pyproject.toml").write_text('[tool.precision-suite]\ninits = "normal"\nformats = ["fp16"]\n'
                                             'activations = "relu"\ndepth = 4\nwidth = 8\nbatch = 2\n')
    assert main(["run", "--formats", "bf16"]) == 0
    data = json.loads((tmp_path / "reports" / "results.json").read_text())
    assert [c["id"] for c in data["cases"]] == ["relu-normal-bf16-cpu-emulated-torch-w8-d4-b2-s0"]
    (tmp_path / "bad.toml").write_text("widht = 3\n")
    assert main(["run", "--config", str(tmp_path / "bad.toml")]) == 2
    assert "unknown option 'widht'" in capsys.readouterr().err


def test_interrupted_run_keeps_finished_cases(tmp_path):
    from precision_suite.results import load_results
    from precision_suite.runner import run_matrix

    seen = []

    def stop_after_first_group(result):
        seen.append(result.id)
        if len(seen) == 3:
            raise KeyboardInterrupt

    path = tmp_path / "r.json"
    with pytest.raises(KeyboardInterrupt):
        run_matrix(inits="normal,kaiming_normal", activations="relu", formats="fp16,bf16", depth=[4], width=[8],
                   batch=[2], json_path=path, on_result=stop_after_first_group)
    kept = load_results(path)
    assert {c.id for c in kept.cases} == set(seen)
    assert len(kept.cases) >= 2


def test_help_does_not_import_torch():
    code = ("import sys; from precision_suite.cli import build_parser\n"
            "try:\n    build_parser().parse_args(['run', '--help'])\nexcept SystemExit:\n    pass\n"
            "assert 'torch' not in sys.modules, 'torch imported by --help'")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "--inits" in proc.stdout


def test_formats_command_prints_finfo_values(capsys):
    from precision_suite.formats import FORMATS

    assert main(["formats"]) == 0
    out = capsys.readouterr().out
    for f in FORMATS.values():
        assert f.name in out and f"{f.max:.6g}" in out and f"{f.smallest_subnormal:.6g}" in out


def test_module_entry_point(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "precision_suite", "run", "--inits", "bogus"],
                          capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 2 and "unknown init 'bogus'" in proc.stderr


def test_runs_single_threaded_by_default_and_restore_the_setting(monkeypatch):
    torch = pytest.importorskip("torch")
    from precision_suite.runner import run_matrix

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    seen = []
    before = torch.get_num_threads()
    run_matrix(inits="normal", activations="relu", formats="fp16", depth=[2], width=[8], batch=[2],
               on_result=lambda r: seen.append(torch.get_num_threads()))
    assert seen == [1] and torch.get_num_threads() == before
    results = run_matrix(inits="normal", activations="relu", formats="fp16", depth=[2], width=[8], batch=[2],
                         threads=2, on_result=lambda r: seen.append(torch.get_num_threads()))
    assert seen[-1] == 2 and torch.get_num_threads() == before
    assert results.environments[0]["torch_threads"] == 2  # the fingerprint says what the run used


def test_version(capsys):
    from precision_suite import __version__

    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.strip() == f"precision-suite {__version__}"


def test_a_misspelled_matrix_option_is_refused_not_ignored():
    from precision_suite import Case, run_matrix

    with pytest.raises(TypeError, match="unknown keyword 'depht' \\(did you mean 'depth'\\?\\); valid: .*depth"):
        run_matrix(depht=5)
    assert Case().width == 128  # one default per axis: run_case ids match a CLI run's
