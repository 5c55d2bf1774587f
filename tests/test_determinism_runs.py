"""Same arguments and seed -> bit-identical results (timing fields aside: ``created`` and each
case's ``seconds``) across runs, across ``--jobs 1`` / ``--jobs 2`` (with units proven to have run
in a worker), and across a SIGKILL and ``--resume`` with another job count."""

import json
import multiprocessing
import os
import signal
import subprocess
import sys
import time

import pytest

import precision_suite.runner as runner
from precision_suite.cli import main
from precision_suite.journal import KILL_ENV, timeless

# 16 cases: the torch engine and the independent numpy one, 8 units
ARGS = ["run", "--inits", "normal,kaiming_normal", "--activations", "relu,tanh", "--formats", "fp16,bf16",
        "--backends", "torch,numpy", "--depth", "12", "--width", "64", "--batch", "16", "-q"]
TAGS = "PRECISION_SUITE_TEST_UNIT_TAGS"  # a directory: each process that runs a unit leaves a file named by its pid
WORKER_WAIT = 120.0  # seconds this process waits at most, in a unit, for a worker (importing torch first) to take one
_run_unit = runner._run_unit  # the real one, as every process imports it


def _tagged_unit(unit, **kwargs):
    """``runner._run_unit``, leaving the running process's pid behind; this process waits until a
    worker has taken a unit too (a fixed delay was outrun by a worker's start on a busy machine)."""
    tags, me = os.environ[TAGS], str(os.getpid())
    with open(os.path.join(tags, me), "a") as f:
        f.write(f"{unit[0].id}\n")
    deadline = time.monotonic() + WORKER_WAIT
    while (multiprocessing.parent_process() is None and time.monotonic() < deadline
           and not set(os.listdir(tags)) - {me}):
        time.sleep(0.05)
    return _run_unit(unit, **kwargs)


@pytest.fixture
def tagged(tmp_path, monkeypatch):
    """Units run through ``_tagged_unit`` (in workers too: it travels pickled by reference)."""
    tags = tmp_path / "tags"
    tags.mkdir()
    monkeypatch.setenv(TAGS, str(tags))
    monkeypatch.setattr(runner, "_run_unit", _tagged_unit)
    return lambda: {int(p.name) for p in tags.iterdir()}


def _results(out) -> dict:
    return json.loads((out / "results.json").read_text())


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("jobs1")
    assert main([*ARGS, "--out", str(out), "--jobs", "1"]) == 0
    return _results(out)


def test_a_second_run_is_bit_identical(tmp_path, reference):
    assert main([*ARGS, "--out", str(tmp_path), "--jobs", "1"]) == 0
    assert timeless(_results(tmp_path)) == timeless(reference)


def test_jobs_2_equals_jobs_1(tmp_path, reference, tagged):
    assert main([*ARGS, "--out", str(tmp_path), "--jobs", "2"]) == 0
    pids = tagged()
    assert os.getpid() in pids and len(pids) == 2, f"expected this process and one worker to run units: {pids}"
    assert timeless(_results(tmp_path)) == timeless(reference)


def test_killed_with_one_job_and_resumed_with_two_equals_the_uninterrupted_run(tmp_path, reference, tagged):
    env = {**os.environ, KILL_ENV: "case:5"}  # mid-unit: a torch stack's first case journaled
    killed = subprocess.run([sys.executable, "-m", "precision_suite", *ARGS, "--out", str(tmp_path), "--jobs", "1"],
                            capture_output=True, text=True, env=env, timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert not tagged(), "the killed run is not this test's process"
    assert main([*ARGS, "--out", str(tmp_path), "--jobs", "2", "--resume"]) == 0
    assert len(tagged()) == 2, "no unit of the resumed run ran in a worker"
    assert timeless(_results(tmp_path)) == timeless(reference)
