"""The JSON contract: strict JSON, non-finite values as strings, atomic writes, load round trip."""

import json
import math
import os

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
    assert {"created", "tool_version", "environment", "cases"} <= set(d)
    assert "flush_denormal" in d["environment"] and "torch" in d["environment"]
    c = d["cases"][0]
    assert set(c) == {"id", "status", "error", "spec", "forward", "backward", "theory", "seconds"}
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


def test_merge_keeps_every_case_once(results):
    a = Results(results.cases[:2], results.environment)
    b = Results(results.cases[1:], results.environment)
    merged = merge_results([a, b])
    assert sorted(c.id for c in merged.cases) == sorted(c.id for c in results.cases)
