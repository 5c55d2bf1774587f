"""Signals: SIGTERM (what CI timeouts and cancellations send) and SIGINT sent to a ``--jobs 2``
run's own process stop it with 143 / 130, leave no live worker, a valid results file of the
finished cases and the exact command that resumes it; a SIGKILLed run's workers exit by themselves.

Worker pids are read from /proc while the run is going (the children of the run's process), then
checked with ``os.kill(pid, 0)`` after it ended."""

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time

import pytest

from precision_suite.cli import main
from precision_suite.journal import KILL_ENV, journal_path, timeless
from precision_suite.results import load_results

pytestmark = pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="reads worker pids from /proc (Linux)")

# 24 cases, a few seconds of work: long enough that the signal lands mid-run
ARGS = ["run", "--inits", "normal,kaiming_normal,lecun_normal,orthogonal", "--activations", "relu,tanh",
        "--formats", "fp16,bf16,fp32", "--depth", "20", "--width", "64", "--batch", "32"]


def _children(pid: int) -> set[int]:
    """Live processes whose parent is ``pid`` (from /proc/*/stat: the field after the state)."""
    kids = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:  # it exited meanwhile
            continue
        if int(fields[1]) == pid:
            kids.add(int(entry))
    return kids


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:  # a zombie has exited; only its entry is left
        return f.read().rsplit(")", 1)[1].split()[0] != "Z"


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            words = f.read().split(b"\0")
    except OSError:
        return f"{pid}: (exited)"
    return f"{pid}: {b' '.join(words).decode()}"


def _start(out):
    env = {k: v for k, v in os.environ.items() if k != KILL_ENV}
    return subprocess.Popen([sys.executable, "-m", "precision_suite", *ARGS, "--jobs", "2", "--out", str(out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)


def _children_after_cases(proc, cases: int) -> dict[int, str]:
    """Wait until ``cases`` progress lines came (the pool is up), then the run's child processes
    and their command lines: the workers (``spawn_main``) and multiprocessing's resource tracker."""
    finished = 0
    for line in proc.stderr:
        finished += line.startswith("[")
        if finished >= cases:
            break
    children = {pid: _cmdline(pid) for pid in _children(proc.pid)}
    assert proc.poll() is None, "the run ended before the signal: make the matrix larger"
    assert any("spawn_main" in c for c in children.values()), f"no worker process was started: {children}"
    return children


def _left_alive(children: dict[int, str], grace: float) -> list[str]:
    """The children still alive ``grace`` seconds from now (polled: gone as soon as they are)."""
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and any(_alive(pid) for pid in children):
        time.sleep(0.05)
    return [cmd for pid, cmd in children.items() if _alive(pid)]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp("uninterrupted")
    assert main([*ARGS, "--out", str(out), "-q"]) == 0
    return json.loads((out / "results.json").read_text())


@pytest.mark.parametrize("signum,code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_signal_stops_the_run_leaves_no_worker_and_says_how_to_resume(tmp_path, uninterrupted, signum, code):
    proc = _start(tmp_path)
    children = _children_after_cases(proc, 2)
    proc.send_signal(signum)
    rest = proc.stderr.read()
    assert proc.wait(timeout=120) == code, rest
    workers = {pid: cmd for pid, cmd in children.items() if "spawn_main" in cmd}
    assert not [cmd for pid, cmd in workers.items() if _alive(pid)], "a worker outlived the run"  # joined before exit
    assert not _left_alive(children, grace=10), "the resource tracker outlived the run"
    kept = load_results(tmp_path / "results.json")  # valid against the schema
    assert 2 <= len(kept.cases) < len(uninterrupted["cases"])
    want = {c["id"]: c for c in timeless(uninterrupted)["cases"]}
    for case in timeless(kept.to_dict())["cases"]:
        assert case == want[case["id"]], case["id"]
    report = (tmp_path / "report.html").read_text(encoding="utf-8")  # the report of exactly the finished cases
    assert set(re.findall(r'<details id="[^"]*" class="case [^"]*" data-id="([^"]+)"', report)) == {
        c.id for c in kept.cases}
    assert f"saved in {tmp_path / 'results.json'}" in rest
    command = rest.split("resume with:\n", 1)[1].strip()
    words = shlex.split(command)
    assert words[:2] == ["precision-suite", "run"] and words[-1] == "--resume"
    resumed = subprocess.run([sys.executable, "-m", "precision_suite", *words[1:], "-q"], capture_output=True,
                             text=True, timeout=300)  # the printed command, word for word
    assert resumed.returncode == 0, resumed.stderr
    assert timeless(json.loads((tmp_path / "results.json").read_text())) == timeless(uninterrupted)
    assert not journal_path(tmp_path / "results.json").exists()


def test_workers_of_a_sigkilled_run_exit_by_themselves(tmp_path):
    """SIGKILL gives the run no chance to stop anyone: each worker notices its parent is gone."""
    proc = _start(tmp_path)
    children = _children_after_cases(proc, 1)
    proc.kill()
    proc.wait(timeout=30)
    # a worker notices at once, or (still starting) as soon as its main function runs
    assert not _left_alive(children, grace=20), "a worker outlived its SIGKILLed parent"
