"""Checkpoint and resume: a run SIGKILLed at any point (reached through the
``PRECISION_SUITE_TEST_KILL_AT`` hook, not by timing) and resumed with ``run --resume`` runs only
the cases its journal lacks and writes results identical to an uninterrupted run's, timing fields
(``created``, each case's ``seconds``) aside."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys

import pytest

from precision_suite.cli import main
from precision_suite.journal import KILL_ENV, journal_path, timeless

# 18 cases in 6 stacked units of 3 (one per init x format; the activations share a stack)
ARGS = ["run", "--inits", "normal,kaiming_normal,lecun_normal(gain=0.5)", "--activations", "relu,tanh,gelu",
        "--formats", "fp16,bf16", "--depth", "12", "--width", "64", "--batch", "16"]
TOTAL = 18


def _run_cli(out, *extra, kill_at=None):
    """The command line in a subprocess (the kill hook SIGKILLs that process)."""
    env = {k: v for k, v in os.environ.items() if k != KILL_ENV}
    if kill_at:
        env[KILL_ENV] = kill_at
    return subprocess.run([sys.executable, "-m", "precision_suite", *ARGS, "--out", str(out), *extra],
                          capture_output=True, text=True, env=env, timeout=300)


def _journaled_cases(path) -> list[str]:
    """The ids a resume can read back: complete lines (newline-terminated, valid JSON) that hold a case."""
    ids = []
    for line in path.read_bytes().split(b"\n")[:-1]:
        try:
            doc = json.loads(line)
        except ValueError:
            continue
        if "case" in doc:
            ids.append(doc["case"]["id"])
    return ids


def _ran_now(stderr: str) -> list[str]:
    """Case ids of the plain progress lines ``[k/N 1.2s] id: what`` (a resumed run's restored cases
    get one ``[k/N] resumed: ...`` line instead)."""
    return [line.split("] ", 1)[1].split(":", 1)[0] for line in stderr.splitlines()
            if line.startswith("[") and "s] " in line]


def _resume_here(out, capsys, *extra):
    """``run --resume`` in this process: (exit code, stderr)."""
    capsys.readouterr()
    code = main([*ARGS, "--out", str(out), "--resume", *extra])
    return code, capsys.readouterr().err


@pytest.fixture(scope="module")
def killed(tmp_path_factory):
    """A run SIGKILLed with 4 of its cases journaled; tests copy its directory."""
    out = tmp_path_factory.mktemp("killed")
    assert _run_cli(out, kill_at="case:4").returncode == -signal.SIGKILL
    return out


def _copy(killed, tmp_path):
    shutil.copytree(killed, tmp_path, dirs_exist_ok=True)
    return journal_path(tmp_path / "results.json")


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp("uninterrupted")
    assert main([*ARGS, "--out", str(out), "-q"]) == 0
    assert not journal_path(out / "results.json").exists(), "a finished run leaves no journal behind"
    return json.loads((out / "results.json").read_text())


@pytest.mark.parametrize("kill_at,jobs,journaled", [
    ("journal-started", 1, 0),   # early: the header is written, nothing has run
    ("case:1", 1, 1),            # mid-unit: the first of a stack's three cases is journaled
    ("case:8", 1, 8),            # mid-unit, two units and two cases in
    ("torn:5", 1, 2),            # the third case's line is half written (header, environment, case, case, torn)
    ("case:5", 2, 5),            # two processes: the fifth case journaled while both run units (how many
                                 # units each has started depends on when the worker is ready: not pinned)
    ("final-write", 1, TOTAL),   # every case journaled, the results file not written yet
    ("results-written", 1, TOTAL),  # results written, the journal not yet removed
])
def test_sigkilled_run_resumes_to_the_uninterrupted_results(tmp_path, uninterrupted, kill_at, jobs, journaled, capsys):
    killed = _run_cli(tmp_path, "--jobs", str(jobs), kill_at=kill_at)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    journal = journal_path(tmp_path / "results.json")
    kept = _journaled_cases(journal)
    if journaled is not None:
        assert len(kept) == journaled
    if kill_at.startswith("torn"):
        assert not journal.read_bytes().endswith(b"\n"), "the hook did not tear the last line"
    code, stderr = _resume_here(tmp_path, capsys)
    assert code == 0, stderr
    ran = _ran_now(stderr)
    assert sorted(ran) == sorted({c["id"] for c in uninterrupted["cases"]} - set(kept)), "resume ran other cases"
    assert not journal.exists()
    got = json.loads((tmp_path / "results.json").read_text())
    assert timeless(got) == timeless(uninterrupted)


def test_resume_with_other_arguments_is_refused_and_touches_nothing(tmp_path, killed, capsys):
    journal = _copy(killed, tmp_path)
    before = journal.read_bytes()
    for other, needle in ((["--depth", "13"], "18 of this run's 18 cases are not in it"),
                          (["--no-backward"], "--no-backward given now"),
                          (["--rel-error"], "--rel-error given now")):
        code, stderr = _resume_here(tmp_path, capsys, *other)
        lines = stderr.strip().splitlines()
        assert code == 2 and len(lines) == 1 and needle in lines[0], stderr
        assert "--resume" in lines[0]
        assert journal.read_bytes() == before and not (tmp_path / "results.json").exists()


@pytest.mark.parametrize("damage,needle", [
    (lambda lines: [lines[0], b"{not json", *lines[1:]], "damaged at line 2"),
    (lambda lines: [lines[0], b"[1, 2]", *lines[1:]], "damaged at line 2"),
    (lambda lines: [b'{"journal": "something else"}', *lines[1:]], "is not a precision-suite journal"),
    (lambda lines: [*lines, re.sub(rb'"activation":"\w+"', b'"activation":"elu"', lines[-1])],
     "is not one of the run's cases"),
])
def test_a_damaged_journal_is_one_clear_line(tmp_path, killed, capsys, damage, needle):
    journal = _copy(killed, tmp_path)
    lines = journal.read_bytes().split(b"\n")[:-1]
    journal.write_bytes(b"\n".join(damage(lines)) + b"\n")
    code, stderr = _resume_here(tmp_path, capsys)
    assert code == 2 and len(stderr.strip().splitlines()) == 1 and needle in stderr, stderr


def test_a_journal_whose_header_was_torn_starts_over(tmp_path, uninterrupted):
    """Killed while writing the header: nothing of the run is readable, so --resume runs it all."""
    assert _run_cli(tmp_path, kill_at="torn:1").returncode == -signal.SIGKILL
    assert b"\n" not in journal_path(tmp_path / "results.json").read_bytes()
    assert main([*ARGS, "--out", str(tmp_path), "-q", "--resume"]) == 0
    assert timeless(json.loads((tmp_path / "results.json").read_text())) == timeless(uninterrupted)


def test_resume_without_a_journal_runs_every_case(tmp_path, uninterrupted, capsys):
    assert main([*ARGS, "--out", str(tmp_path), "-q", "--resume"]) == 0
    assert "no interrupted run at" in capsys.readouterr().err
    assert timeless(json.loads((tmp_path / "results.json").read_text())) == timeless(uninterrupted)


def test_resume_on_another_machine_keeps_each_case_s_environment(tmp_path, killed, uninterrupted, monkeypatch):
    """The cases journaled on one machine point at its fingerprint, the rest at the resuming one's."""
    import precision_suite.runner as runner

    _copy(killed, tmp_path)
    real = runner.fingerprint
    monkeypatch.setattr(runner, "fingerprint", lambda *a, **k: {**real(*a, **k), "cpu": "another machine"})
    assert main([*ARGS, "--out", str(tmp_path), "-q", "--resume"]) == 0
    got = json.loads((tmp_path / "results.json").read_text())
    assert [e["cpu"] for e in got["environments"]] == [uninterrupted["environments"][0]["cpu"], "another machine"]
    assert sorted(c["environment"] for c in got["cases"]) == [0] * 4 + [1] * (TOTAL - 4)
    for case in (*got["cases"], *uninterrupted["cases"]):
        case["environment"] = 0
    got["environments"] = uninterrupted["environments"]
    assert timeless(got) == timeless(uninterrupted)


def test_timeless_drops_exactly_the_timing_fields(uninterrupted):
    stripped = timeless(uninterrupted)
    assert set(uninterrupted) - set(stripped) == {"created"}
    for case, kept in zip(uninterrupted["cases"], stripped["cases"]):
        assert set(case) - set(kept) == {"seconds"}


def test_resume_needs_a_results_path():
    from precision_suite.runner import run_matrix

    with pytest.raises(TypeError, match="resume=True needs json_path"):
        run_matrix(inits="normal", activations="relu", formats="fp16", depth=[2], width=[8], batch=[2], resume=True)
