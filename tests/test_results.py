"""The JSON contract: strict JSON, non-finite values as strings, atomic writes, load round trip,
schema version 2 (definitions, environments, the case failure) and version-1 files still loading."""

import json
import re
import math
import os
from dataclasses import replace

import numpy as np
import pytest

from precision_suite.results import (SCHEMA_VERSION, ResultsError, Results, load_results, merge_results,
                                     write_json_atomic)
from precision_suite.runner import run_matrix


@pytest.fixture(scope="module")
def results():
    # identity + N(0,1) in fp16 overflows -> inf and nan in the statistics
    return run_matrix(inits="normal,kaiming_normal", activations="identity", formats="fp16,fp64",
                      depth=[8], width=[32], batch=[8])


def test_round_trip_is_lossless(results, tmp_path):
    path = write_json_atomic(tmp_path / "r.json", results.to_dict())
    text = path.read_text()
    json.loads(text, parse_constant=lambda c: pytest.fail(f"non-strict JSON constant {c}"))
    assert '"inf"' in text or '"nan"' in text
    back = load_results(path)
    assert back.to_dict()["cases"] == results.to_dict()["cases"]
    case = back.by_id()["identity-normal-fp16-cpu-emulated-torch-w32-d8-b8-s0"]
    assert any(math.isinf(v) or math.isnan(v) for v in case.forward.pre["amax"])
    assert isinstance(case.forward.pre["amax"], np.ndarray)


def test_contract_fields(results):
    d = results.to_dict()
    assert d["schema"] == "precision-suite/results" and d["schema_version"] == SCHEMA_VERSION
    assert SCHEMA_VERSION == 2 and d["definitions"] == {"underflow": "significant"}
    assert {"created", "tool_version", "environments", "cases"} <= set(d) and "environment" not in d
    [env] = d["environments"]
    assert "flush_denormal" in env and "torch" in env
    c = d["cases"][0]
    assert set(c) == {"id", "status", "error", "skip_reason", "environment", "failure", "spec", "forward",
                      "backward", "theory", "seconds"}
    assert all(case["environment"] == 0 for case in d["cases"])
    overflows = next(case for case in d["cases"] if case["id"].startswith("identity-normal-fp16"))
    fwd, bwd = overflows["forward"]["failure"], overflows["backward"]["failure"]
    assert bwd["layer"] >= fwd["layer"]  # the NaN gradients of an overflowed chain: the forward failure's echo
    assert overflows["failure"] == {"direction": "forward", **fwd}
    assert set(c["spec"]) >= {"init", "activation", "format", "device", "mode", "backend", "width", "depth",
                              "batch", "seed", "input", "norm", "residual", "bias", "underflow_threshold"}
    for key in ("first_overflow", "first_nan", "first_underflow", "first_underflow_any", "first_subnormal",
                "first_zero", "failure", "input", "pre", "post"):
        assert key in c["forward"]
    for key in ("grad", "grad_pre", "wgrad", "loss_scale"):
        assert key in c["backward"]


def test_atomic_write_leaves_old_file_on_failure(tmp_path):
    path = tmp_path / "r.json"
    write_json_atomic(path, {"a": 1})
    with pytest.raises(ValueError):
        write_json_atomic(path, {"a": float("nan")})  # allow_nan=False refuses
    assert json.loads(path.read_text()) == {"a": 1}
    assert os.listdir(tmp_path) == ["r.json"]


def test_newer_schema_and_garbage_are_refused(tmp_path, results):
    newer = results.to_dict()
    newer["schema_version"] = SCHEMA_VERSION + 1
    (tmp_path / "new.json").write_text(json.dumps(newer))
    with pytest.raises(ResultsError, match="newer"):
        load_results(tmp_path / "new.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ResultsError, match="not valid JSON"):
        load_results(tmp_path / "bad.json")


def test_another_schema_is_named_in_one_clear_line(tmp_path):
    path = tmp_path / "X.json"
    path.write_text(json.dumps({"schema": "foo", "cases": []}))
    with pytest.raises(ResultsError) as err:
        load_results(path)
    assert str(err.value) == (f"{path} is not a precision-suite results file (its \"schema\" is 'foo', "
                              "expected 'precision-suite/results')")


def _as_version_1(d: dict) -> dict:
    """What version 1 wrote: one environment, no definitions, no case failure, index or skip reason."""
    v1 = {k: v for k, v in d.items() if k not in ("definitions", "environments")}
    v1.update(schema_version=1, environment=d["environments"][0],
              cases=[{k: v for k, v in c.items() if k not in ("failure", "environment", "skip_reason")}
                     for c in d["cases"]])
    return v1


def test_version_1_files_still_load(results, tmp_path):
    path = write_json_atomic(tmp_path / "v1.json", _as_version_1(results.to_dict()))
    back = load_results(path)
    assert back.definitions == {"underflow": "any"}  # version 1 counted every nonzero -> zero element
    assert back.environments == (results.environment,) and back.environment == results.environment
    assert [c.environment for c in back.cases] == [0] * len(results.cases)
    assert [c.failure for c in back.cases] == [c.failure for c in results.cases]
    assert back.to_dict()["schema_version"] == SCHEMA_VERSION


def test_merged_shards_equal_the_single_run(results):
    """Shards run apart (one format each, as the README's CI recipe does) merge into the full run."""
    shards = [run_matrix(inits="normal,kaiming_normal", activations="identity", formats=f, depth=[8], width=[32],
                         batch=[8]) for f in ("fp64", "fp16")]
    merged = {c.id: c.to_dict() for c in merge_results(shards).cases}
    full = {c.id: c.to_dict() for c in results.cases}
    assert merged.keys() == full.keys()
    for cid, d in full.items():
        assert {**merged[cid], "seconds": 0} == {**d, "seconds": 0}, cid


def test_merge_keeps_every_case_once(results):
    a = Results(results.cases[:2], results.environment)
    b = Results(results.cases[1:], results.environment)
    merged = merge_results([a, b])
    assert sorted(c.id for c in merged.cases) == sorted(c.id for c in results.cases)
    assert merged.environments == (results.environment,)  # identical environments once


def test_merge_keeps_every_environment_and_reindexes_cases(results):
    other = {**results.environment, "hostname": "shard-b"}
    a = Results(results.cases[:2], results.environment)
    b = Results(results.cases[2:], (other,))
    merged = merge_results([b, a])
    assert merged.environments == (other, results.environment)
    index = {c.id: c.environment for c in merged.cases}
    assert all(index[c.id] == 1 for c in results.cases[:2]) and all(index[c.id] == 0 for c in results.cases[2:])
    back = Results.from_dict(json.loads(json.dumps(merged.to_dict())))
    assert [back.environments[c.environment]["hostname"] for c in back.cases if c.id == results.cases[2].id] == ["shard-b"]


def test_merge_refuses_parts_with_different_definitions(results):
    old = replace(Results(results.cases[:1], results.environment), definitions={"underflow": "any"})
    with pytest.raises(ResultsError, match="different definitions"):
        merge_results([old, Results(results.cases[1:], results.environment)])


def test_merge_refuses_a_case_run_twice_with_different_results(results, tmp_path, capsys):
    import dataclasses

    from precision_suite.cli import main

    first = results.cases[0]
    changed = dataclasses.replace(first, error="x", seconds=first.seconds + 1)
    again = dataclasses.replace(first, seconds=first.seconds + 1)  # the same run, another timing: fine
    assert merge_results([results, Results((again,), results.environments)]).by_id()[first.id] == again
    with pytest.raises(ResultsError, match=f"case {re.escape(first.id)} is in shards 1 and 2 with different results"):
        merge_results([results, Results((changed,), results.environments)])
    assert merge_results([results, Results((changed,), results.environments)], allow_mixed=True).by_id()[first.id].error == "x"
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_text(json.dumps(results.to_dict()))
    b.write_text(json.dumps(Results((changed,), results.environments).to_dict()))
    assert main(["merge", str(a), str(b), "-o", str(tmp_path / "m.json")]) == 2
    assert "--allow-mixed" in capsys.readouterr().err and not (tmp_path / "m.json").exists()
    assert main(["merge", str(a), str(b), "-o", str(tmp_path / "m.json"), "--allow-mixed"]) == 0
