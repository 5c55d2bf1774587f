"""Worker processes: every unit runs exactly once, results do not depend on the process, a worker
that dies or raises costs only its own unit, and an interrupt leaves no process behind."""

import functools
import multiprocessing
import os
import threading
import time

import pytest

from precision_suite.workers import run_units

SETTLE = 0.5  # how long this process dawdles per unit so that a spawned worker gets some of them


def _in_worker() -> bool:
    return multiprocessing.parent_process() is not None


def _pid_after(unit, slow_here: float = SETTLE, slow_there: float = 0.0):
    """The toy unit: which process ran it (this one dawdles, so workers get a share)."""
    time.sleep(slow_there if _in_worker() else slow_here)
    return os.getpid(), unit


def _die_on(unit, victim):
    if _in_worker() and unit == victim:
        os._exit(3)
    return _pid_after(unit)


def _raise_on(unit, victim):
    if _in_worker() and unit == victim:
        raise ValueError(f"unit {unit} is broken")
    return _pid_after(unit)


def _unpicklable_on(unit, victim):
    if _in_worker() and unit == victim:
        return lambda: None  # a result that cannot travel back
    return _pid_after(unit)


def _run(units, run_unit, jobs=2):
    done, failed, threads = {}, {}, set()

    def key(unit):
        return tuple(unit) if isinstance(unit, list) else unit

    def on_done(unit, out):
        threads.add(threading.get_ident())
        assert key(unit) not in done and key(unit) not in failed, f"unit {unit} reported twice"
        done[key(unit)] = out

    def on_failed(unit, message):
        threads.add(threading.get_ident())
        failed[key(unit)] = message

    run_units(units, run_unit, jobs=jobs, on_done=on_done, on_failed=on_failed)
    assert threads <= {threading.get_ident()}, "callbacks must run in the calling thread"
    assert not multiprocessing.active_children(), "a worker process outlived the run"
    return done, failed


def test_every_unit_runs_once_and_workers_take_a_share():
    units = list(range(8))
    done, failed = _run(units, _pid_after)
    assert not failed and sorted(done) == units
    assert all(out[1] == unit for unit, out in done.items())
    pids = {out[0] for out in done.values()}
    assert os.getpid() in pids and len(pids) == 2, f"expected this process and one worker, got {pids}"


def test_one_job_runs_everything_here():
    done, failed = _run(list(range(3)), functools.partial(_pid_after, slow_here=0.0), jobs=1)
    assert not failed and {out[0] for out in done.values()} == {os.getpid()}


@pytest.mark.parametrize("run_unit,needle", [
    (_die_on, "worker process exited with code 3"),
    (_raise_on, "ValueError: unit"),
    (_unpicklable_on, "Can't pickle"),
])
def test_a_failing_worker_costs_only_its_unit(run_unit, needle):
    """Units 0..7; every unit but the victim still comes back, the victim as a failure with the reason.
    The victim is one a worker is certain to get: this process dawdles SETTLE s on each of its own."""
    units = list(range(8))
    done, failed = _run(units, functools.partial(run_unit, victim=4))
    if 4 in done:  # this process happened to take unit 4 itself: the hazard only fires in a worker
        assert done[4][0] == os.getpid()
    else:
        assert list(failed) == [4] and needle in failed[4]
    assert sorted([*done, *failed]) == units


def test_interrupt_stops_workers_and_propagates():
    seen = []

    def on_done(unit, out):
        seen.append(unit)
        if len(seen) == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):  # the worker is mid-unit when this process stops
        run_units(list(range(20)), functools.partial(_pid_after, slow_there=5.0), jobs=2, on_done=on_done,
                  on_failed=lambda u, m: None)
    assert not multiprocessing.active_children()


def test_engine_results_do_not_depend_on_the_process(tmp_path):
    """The same matrix with jobs=2 (this process dawdling so a worker runs units) and jobs=1:
    identical results, case for case, apart from the time taken."""
    from precision_suite.engine import split_units
    from precision_suite.runner import _process_settings, _run_unit
    from precision_suite.spec import Matrix

    cases = Matrix.from_options(inits="normal,lecun_normal(gain=0.5)", activations="relu,gelu",
                                formats="fp16,bf16,fp32", depth=[12], width=[16], batch=[8]).cases()
    units = split_units(cases)
    run = functools.partial(_unit_with_pid, run=functools.partial(_run_unit, backward=True, rel_error=False))
    with _process_settings(1):
        parallel, failed = _run(units, functools.partial(run, settle=1.0))  # a worker imports torch first
        serial, _ = _run(units, functools.partial(run, settle=0.0), jobs=1)
    assert not failed
    assert len({pid for pid, _ in parallel.values()}) == 2, "no unit ran in a worker"
    by_id = {r.id: r.to_dict() for _, results in serial.values() for r in results}
    for _, results in parallel.values():
        for r in results:
            got, want = r.to_dict(), by_id[r.id]
            got.pop("seconds"), want.pop("seconds")
            assert got == want, r.id


def _unit_with_pid(unit, run, settle):
    if not _in_worker():
        time.sleep(settle)
    return os.getpid(), run(unit)


def test_ctrl_c_on_the_command_line_keeps_finished_cases_and_leaves_no_process(tmp_path):
    """A terminal's Ctrl-C reaches the whole process group: the run exits 130 with every finished
    case in its JSON, and no worker outlives it."""
    import json
    import signal
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "precision_suite", "run", "--jobs", "2", "--out", str(tmp_path),
           "--inits", "normal,kaiming_normal,lecun_normal,orthogonal", "--activations", "relu,tanh",
           "--formats", "fp16,bf16,fp32", "--depth", "60", "--width", "64", "--batch", "32"]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, start_new_session=True)
    finished = []
    for line in proc.stderr:  # plain progress lines: "[k/24 ...] id: what"
        if line.startswith("["):
            finished.append(line.split("] ", 1)[1].split(":", 1)[0])
        if len(finished) >= 4:
            os.killpg(proc.pid, signal.SIGINT)
            break
    rest = proc.stderr.read()
    assert proc.wait(timeout=60) == 130, rest
    kept = {c["id"] for c in json.loads((tmp_path / "results.json").read_text())["cases"]}
    assert set(finished) <= kept and len(kept) < 24
    deadline = time.monotonic() + 3  # a process already exiting ("R [python]", its memory being freed) may take a moment
    while True:
        group = subprocess.run(["ps", "-o", "pid=,stat=,ppid=,etimes=,comm=,args=", "-g", str(proc.pid)],
                               capture_output=True, text=True)
        alive = [line for line in group.stdout.splitlines() if line.split()[1][0] != "Z"]  # zombies have exited
        if not alive or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert not alive, f"processes left in the run's group: {alive}"

