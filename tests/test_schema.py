"""The published JSON Schema of results files: what runs write follows it, what breaks it is refused
with one line naming the place, and `precision-suite schema` prints it."""

from __future__ import annotations

import copy
import json

import pytest

from precision_suite import run_matrix
from precision_suite.cli import main
from precision_suite.results import ResultsError, load_results, write_json_atomic
from precision_suite.validation import SCHEMA_PATH, SchemaViolation, validate_results


@pytest.fixture(scope="module")
def payload():
    """ok cases with inf/NaN statistics and fp64's nulls, a skipped case, an error, rel_error."""
    results = run_matrix(inits="normal", activations="identity,relu", formats="fp16,fp64", modes="emulated,native",
                         depth=[6], width=[16], batch=[4], rel_error=True)
    data = copy.deepcopy(results.to_dict())
    errored = copy.deepcopy(data["cases"][0])
    errored.update(id=errored["id"] + "-x", status="error", error="RuntimeError: boom", forward=None, backward=None,
                   failure=None)
    skipped = copy.deepcopy(data["cases"][1])
    skipped.update(id=skipped["id"] + "-y", status="skipped", skip_reason="no CUDA device", forward=None,
                   backward=None, failure=None)
    data["cases"] += [errored, skipped]
    return data


def test_written_results_follow_the_schema(payload):
    validate_results(payload)
    inf_or_nan = {v for c in payload["cases"] if c["forward"] for t in ("pre", "post")
                  for col in c["forward"][t].values() if col for v in col if isinstance(v, str)}
    assert inf_or_nan <= {"inf", "-inf", "nan"} and inf_or_nan  # the run did reach non-finite statistics


@pytest.mark.parametrize("path, value, needle", [
    (("cases", 0, "status"), "weird", "cases[0].status: must be one of ['ok', 'error', 'skipped']"),
    (("cases", 0, "failure"), {"direction": "sideways", "layer": 3, "kind": "overflow"}, "cases[0].failure"),
    (("cases", 0, "forward", "first_overflow"), 0, "cases[0].forward.first_overflow"),
    (("cases", 0, "spec", "width"), "wide", "cases[0].spec.width"),
    (("schema_version",), 3, "schema_version"),
    (("definitions", "underflow"), "sometimes", "definitions.underflow"),
])
def test_a_break_is_refused_with_its_place(payload, path, value, needle):
    broken = copy.deepcopy(payload)
    node = broken
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    with pytest.raises(SchemaViolation) as e:
        validate_results(broken)
    assert needle in str(e.value)


def test_missing_key_is_named(payload):
    broken = copy.deepcopy(payload)
    del broken["cases"][2]["forward"]["pre"]
    with pytest.raises(SchemaViolation, match=r"cases\[2\]\.forward.*pre"):
        validate_results(broken)


def test_load_and_compare_refuse_a_broken_file_in_one_line(payload, tmp_path, capsys):
    broken = copy.deepcopy(payload)
    broken["cases"][1]["status"] = "weird"
    path = tmp_path / "broken.json"
    path.write_text(json.dumps(broken))
    with pytest.raises(ResultsError, match="broken.json does not follow the results schema: cases"):
        load_results(path)
    good = write_json_atomic(tmp_path / "good.json", payload)
    assert main(["compare", str(good), str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "cases[1].status" in err


def test_schema_command_prints_the_published_schema(capsys):
    assert main(["schema"]) == 0
    assert json.loads(capsys.readouterr().out) == json.loads(SCHEMA_PATH.read_text())
