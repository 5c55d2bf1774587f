"""Regression checks: `precision-suite compare`, `run --baseline`, and the comparison they share.

The regressions are planted: one init's weights are scaled by 1.5 (what a kernel that computes
something else would do), which moves that group's overflow layers and nothing else."""

from __future__ import annotations

import dataclasses
import json
import re

import pytest

import precision_suite.engine as engine
from precision_suite import run_matrix
from precision_suite.cli import main
from precision_suite.compare import Tolerances, compare
from precision_suite.results import write_json_atomic

AXES = dict(inits="normal,kaiming_normal", activations="identity", formats="fp16", depth=[40], width=[32],
            batch=[8])


class _Scaled:
    """LayerDraws whose weights for ``init`` are ``factor`` times larger."""

    def __init__(self, draws, factor):
        self.draws, self.factor = draws, factor

    def __iter__(self):
        for w, b in self.draws:
            yield w * self.factor, b


@pytest.fixture(scope="module")
def runs():
    """(baseline, current): the same matrix, kaiming_normal's weights x1.5 in the current run."""
    baseline = run_matrix(**AXES)
    mp = pytest.MonkeyPatch()
    real = engine.LayerDraws
    mp.setattr(engine, "LayerDraws", lambda init, *a, **k: _Scaled(real(init, *a, **k),
                                                                    1.5 if init.label == "kaiming_normal" else 1.0))
    try:
        current = run_matrix(**AXES)
    finally:
        mp.undo()
    return baseline, current


def _write(tmp_path, name, results):
    return str(write_json_atomic(tmp_path / name, results.to_dict()))


def test_identical_runs_compare_equal(runs, tmp_path, capsys):
    baseline, _ = runs
    path = _write(tmp_path, "a.json", baseline)
    again = _write(tmp_path, "b.json", run_matrix(**AXES))
    assert main(["compare", path, again]) == 0
    out = capsys.readouterr().out
    assert "compared 2 case pairs" in out and out.rstrip().endswith("no judged event moved")


def test_moved_overflow_is_caught_with_its_case_and_layers(runs, tmp_path, capsys):
    baseline, current = runs
    result = compare(baseline, current)
    moved = {(m.case_id.split("-")[1], m.direction, m.event) for m in result.regressions}
    assert ("kaiming_normal", "forward", "first_overflow") in moved
    assert all(init == "kaiming_normal" for init, _, _ in moved), moved  # the normal init did not move
    [ovf] = [m for m in result.regressions if m.direction == "forward" and m.event == "first_overflow"]
    before = baseline.by_id()[ovf.case_id].forward.events.first_overflow
    after = current.by_id()[ovf.case_id].forward.events.first_overflow
    assert (ovf.before, ovf.after, ovf.delta) == (before, after, after - before) and after < before
    assert main(["compare", _write(tmp_path, "a.json", baseline), _write(tmp_path, "b.json", current),
                 "--json", str(tmp_path / "diff.json")]) == 1
    out = capsys.readouterr().out
    row = rf"{re.escape(ovf.case_id)}\s+forward\s+first_overflow\s+{before}\s+{after}\s+{after - before:+d}\s+REGRESSION"
    assert re.search(row, out), out
    diff = json.loads((tmp_path / "diff.json").read_text())
    assert diff["verdict"] == "regression" and any(m["event"] == "first_overflow" and m["regression"]
                                                   for m in diff["moved"])


def test_layer_tolerance(runs):
    baseline, current = runs
    shift = max(abs(m.delta) for m in compare(baseline, current).regressions if m.delta is not None)
    assert compare(baseline, current, tolerances=Tolerances(layers=shift)).regressions == [
        m for m in compare(baseline, current).regressions if m.delta is None]


def test_changed_environment_field_is_reported(runs):
    baseline, _ = runs
    env = dict(baseline.environments[0], torch="9.9.9")
    other = dataclasses.replace(baseline, environments=(env,))
    result = compare(baseline, other)
    assert ("torch", baseline.environments[0]["torch"], "9.9.9") in result.env_diff
    assert result.exit_code == 0  # a different machine alone is no regression


def test_missing_case_and_error_are_regressions(runs):
    baseline, _ = runs
    first, second = baseline.cases
    errored = dataclasses.replace(second, status="error", error="RuntimeError: boom", forward=None, backward=None)
    result = compare(baseline, dataclasses.replace(baseline, cases=(errored,)))
    assert {(m.case_id, m.event) for m in result.regressions} == {(first.id, "missing"), (second.id, "status")}


def test_across_axis_matches_within_one_file(tmp_path, capsys):
    results = run_matrix(inits="normal", activations="identity,relu", formats="fp16", backends="torch,numpy",
                         depth=[12], width=[16], batch=[4])
    path = _write(tmp_path, "r.json", results)
    code = main(["compare", path, "--across", "backend=torch:numpy"])
    out = capsys.readouterr().out
    assert "compared 2 case pairs (backend=torch -> backend=numpy)" in out
    assert code == (1 if "REGRESSION" in out else 0)
    result = compare(results, results, across="backend", values=("torch", "numpy"))
    assert sorted(b.split("-")[0] for b, _ in result.pairs) == ["identity", "relu"]
    assert all(b.replace("-torch-", "-numpy-") == c for b, c in result.pairs)


def test_run_with_baseline(tmp_path, capsys):
    args = ["run", "--depth", "40", "--width", "32", "--batch", "8", "--inits", "normal", "--activations", "identity",
            "--formats", "fp16", "-q", "--out", str(tmp_path / "a")]
    assert main(args) == 0
    base = tmp_path / "a" / "results.json"
    assert main([*args[:-1], str(tmp_path / "b"), "--baseline", str(base)]) == 0
    data = json.loads(base.read_text())
    data["cases"][0]["forward"]["first_overflow"] += 3  # as if the old machine overflowed 3 layers later
    base.write_text(json.dumps(data))
    capsys.readouterr()
    assert main([*args[:-1], str(tmp_path / "c"), "--baseline", str(base)]) == 1
    assert "REGRESSION: 1 events moved in 1 cases" in capsys.readouterr().out


@pytest.mark.parametrize("content, needle", [
    ('{"schema": "precision-suite/results", "schema_version": 2, "cases": [', "is not valid JSON"),
    ('{"schema": "someone-else/v1", "cases": []}', "is not a precision-suite results file"),
    ("not json at all", "is not valid JSON"),
    (None, "results file not found"),
])
def test_bad_inputs_exit_2_with_one_line(runs, tmp_path, capsys, content, needle):
    good = _write(tmp_path, "good.json", runs[0])
    bad = tmp_path / "bad.json"
    if content is not None:
        bad.write_text(content)
    assert main(["compare", good, str(bad)]) == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and len(err.splitlines()) == 1 and "bad.json" in err, err


@pytest.mark.parametrize("extra, needle", [
    (["--across", "colour"], "--across: unknown axis 'colour'; valid: device, mode, backend, format"),
    (["--across", "mode=emulated"], "AXIS=BASELINE:CURRENT"),
    (["--layers", "-1"], "--layers must be >= 0"),
])
def test_bad_options_exit_2(runs, tmp_path, capsys, extra, needle):
    good = _write(tmp_path, "good.json", runs[0])
    assert main(["compare", good, good, *extra]) == 2
    assert needle in capsys.readouterr().err


def test_no_matched_case_hints_at_across(runs, tmp_path, capsys):
    baseline, _ = runs
    other = run_matrix(**{**AXES, "formats": "bf16"})
    assert main(["compare", _write(tmp_path, "a.json", baseline), _write(tmp_path, "b.json", other)]) == 2
    assert "--across" in capsys.readouterr().err
