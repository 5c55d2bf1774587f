"""The shipped matrix under pytest writes bit-identical results however xdist spreads it: ``-n 0``,
``-n 2 --dist loadgroup`` (a worker batches each draw group it is sent) and ``-n 2 --dist load``
(a worker runs each case alone) write the same results JSON, timing fields aside (``created`` and
each case's ``seconds``). The environments are compared too: every case ran with the same thread
count, whichever process ran it.

A slice of the matrix keeps this short and still holds every kind of case it has: two draw groups,
an activation checked against theory (relu) and one checked against the numpy reference (gelu, so
numpy cases are recorded), fp16 and bf16, emulated and native. The runs see a machine of 4 cores
(``fake_cores``), twice the workers: where a worker's thread count followed its share of the cores,
``-n 2`` ran with 2 threads a process while ``-n 0`` ran with 1.
"""

import json
import os
import re
import subprocess
import sys

import pytest

from precision_suite.journal import timeless

SLICE = ["--pyargs", "precision_suite.matrix", "--precision-devices", "cpu", "--precision-formats", "fp16,bf16",
         "-k", "(orthogonal or torch_default) and (relu or gelu)"]
RUNS = {"n0": ["-n", "0"], "loadgroup": ["-n", "2", "--dist", "loadgroup"], "load": ["-n", "2", "--dist", "load"]}
FAKE_CORES = "import os\n\nos.sched_getaffinity = lambda pid: set(range(4))\nos.cpu_count = lambda: 4\n"


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    """{run: (its results JSON, its verbose output)}, each run a fresh pytest process."""
    folder = tmp_path_factory.mktemp("xdist")
    (folder / "fake_cores.py").write_text(FAKE_CORES)
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(folder), env.get("PYTHONPATH")]))
    out = {}
    for name, args in RUNS.items():
        proc = subprocess.run([sys.executable, "-m", "pytest", "-v", "-p", "no:cacheprovider", "-p", "fake_cores", *args,
                               *SLICE, "--precision-json", f"{name}.json"],
                              cwd=folder, env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        out[name] = json.loads((folder / f"{name}.json").read_text()), proc.stdout
    return out


def test_the_slice_holds_every_kind_of_case(runs):
    data, _ = runs["n0"]
    specs = [c["spec"] for c in data["cases"]]
    assert {s["mode"] for s in specs} == {"emulated", "native"}
    assert {s["backend"] for s in specs} == {"torch", "numpy"}
    assert {s["format"] for s in specs} == {"fp16", "bf16"}
    assert {s["init"] for s in specs} == {"orthogonal", "torch_default"}
    assert all(c["status"] == "ok" for c in data["cases"]) and len(specs) == 20


@pytest.mark.parametrize("run", ["loadgroup", "load"])
def test_two_workers_write_what_one_process_writes(runs, run):
    (serial, _), (parallel, output) = runs["n0"], runs[run]
    workers = set(re.findall(r"^\[(gw\d+)\] \[ *\d+%\] PASSED", output, re.MULTILINE))
    assert workers == {"gw0", "gw1"}, f"both workers must have run tests: {workers}"
    assert timeless(parallel) == timeless(serial)
