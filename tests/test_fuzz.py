"""Fuzzing the two readers of user files: the results loader and the config parser.

Whatever bytes they are given, they either return or raise the project's one clear error
(``ResultsError``, ``ConfigError``, then ``SpecError`` for the values) with a one-line message:
never a KeyError, TypeError or traceback from inside. Documents are drawn from the published
schema's own keywords, from mutations of a real run's file, and at random."""

from __future__ import annotations

import copy
import json
import math
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from precision_suite.config import ConfigError, load_config
from precision_suite.results import ResultsError, load_results
from precision_suite.spec import Case, Matrix, SpecError
from precision_suite.validation import results_schema

FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=False, allow_infinity=False)
    | st.sampled_from(["inf", "-inf", "nan", "ok", "error", "skipped", "fp16", "relu", ""]) | st.text(max_size=8),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12)


def _one_line(error: Exception) -> None:
    message = str(error)
    assert message and "\n" not in message and "Traceback" not in message, message


def _load(text: str | bytes):
    """load_results on a file holding ``text``: Results, or ResultsError with a one-line message."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "results.json"
        (path.write_bytes if isinstance(text, bytes) else path.write_text)(text)
        try:
            return load_results(path)
        except ResultsError as e:
            _one_line(e)
            return None


@pytest.fixture(scope="module")
def real_payload():
    """A small run's file: ok cases with inf/NaN statistics, fp64's nulls, native skips, rel_error."""
    from precision_suite import run_matrix

    results = run_matrix(inits="normal", activations="relu", formats="fp16,fp64", modes="emulated,native",
                         depth=[3], width=[8], batch=[2], rel_error=True)
    return results.to_dict()


def _paths(node, prefix=()):
    """Every (path, value) inside a JSON tree."""
    yield prefix, node
    children = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    for key, child in children:
        yield from _paths(child, (*prefix, key))


@FUZZ
@given(data=st.data())
def test_loader_survives_mutations_of_a_real_file(real_payload, data):
    doc = copy.deepcopy(real_payload)
    for _ in range(data.draw(st.integers(1, 3), label="mutations")):
        paths = [p for p, _ in _paths(doc) if p]
        if not paths:
            break
        path = data.draw(st.sampled_from(paths), label="path")
        parent = doc
        for key in path[:-1]:
            parent = parent[key]
        if data.draw(st.booleans(), label="delete") and isinstance(parent, dict):
            del parent[path[-1]]
        else:
            parent[path[-1]] = data.draw(json_values, label="value")
    loaded = _load(json.dumps(doc))
    if loaded is not None:  # what loads is whole: every case, each with the id its spec gives
        assert len(loaded.cases) == len(doc["cases"])
        assert all(c.id == c.case.id and c.id for c in loaded.cases)


def _from_schema(node: dict, root: dict, depth: int = 0) -> st.SearchStrategy:
    """Documents drawn from the published schema's own keywords (type, enum, const, properties,
    required, items, $ref, oneOf, allOf with if/then, pattern, minimum, minItems, minLength).
    hypothesis-jsonschema would do this, but its 0.23.1 cannot draw objects with this hypothesis
    (``'many' object has no attribute 'more'``). Near-misses are welcome: the loader must refuse
    them in one line, and the validator decides which is which."""
    if "$ref" in node:
        return _from_schema(_resolve(node, root), root, depth)
    if "const" in node:
        return st.just(node["const"])
    if "enum" in node:
        return st.sampled_from(node["enum"])
    if "oneOf" in node:
        return st.one_of([_from_schema(n, root, depth) for n in node["oneOf"]])
    types = node.get("type", "object" if "properties" in node or "required" in node else ["null", "number"])
    types = [types] if isinstance(types, str) else types
    if depth > 8:  # keep recursion finite where the schema allows open objects
        types = [t for t in types if t not in ("object", "array")] or ["null"]
    return st.one_of([_typed(t, node, root, depth) for t in types])


def _resolve(node: dict, root: dict) -> dict:
    while "$ref" in node:
        target = root
        for part in node["$ref"].removeprefix("#/").split("/"):
            target = target[part]
        node = target
    return node


# a real case's spec strings: drawn specs often name what this version runs (spec values it rejects
# are refused by the loader, which is tested too)
_SPEC_WORDS = {k: v for k, v in Case().to_dict().items() if isinstance(v, str)}


def _field(key: str, strategy: st.SearchStrategy) -> st.SearchStrategy:
    word = _SPEC_WORDS.get(key)
    return strategy if word is None else st.one_of(st.just(word), st.just(word), st.just(word), strategy)


def _typed(kind: str, node: dict, root: dict, depth: int) -> st.SearchStrategy:
    if kind == "null":
        return st.none()
    if kind == "boolean":
        return st.booleans()
    if kind in ("integer", "number"):
        low, above = (node["exclusiveMinimum"], True) if "exclusiveMinimum" in node else (node.get("minimum"), False)
        ints = st.integers(min_value=None if low is None else math.floor(low) + above, max_value=node.get("maximum", 200))
        return ints if kind == "integer" else ints | st.floats(min_value=low, max_value=node.get("maximum"),
                                                               exclude_min=above, allow_nan=False, allow_infinity=False)
    if kind == "string":
        if "pattern" in node:
            return st.from_regex(node["pattern"], fullmatch=True)
        return st.text(min_size=node.get("minLength", 0), max_size=12)
    if kind == "array":
        items = _from_schema(node["items"], root, depth + 1) if "items" in node else st.floats() | st.none()
        return st.lists(items, min_size=node.get("minItems", 0), max_size=max(node.get("minItems", 0), 3))
    return _object(node, root, depth)


def _object(node: dict, root: dict, depth: int) -> st.SearchStrategy:
    parts = [node, *(_resolve(p, root) for p in node.get("allOf", []))]
    props = {k: v for part in parts for k, v in part.get("properties", {}).items()}
    required = {k for part in parts for k in part.get("required", ())}
    extra = node.get("additionalProperties")
    unnamed = extra if isinstance(extra, dict) else {}
    strategy = st.fixed_dictionaries(
        {k: _field(k, _from_schema(props.get(k, unnamed), root, depth + 1)) for k in sorted(required)},
        optional={k: _field(k, _from_schema(v, root, depth + 1)) for k, v in props.items() if k not in required})
    if isinstance(extra, dict):
        strategy = st.tuples(strategy, st.dictionaries(st.text(min_size=1, max_size=8),
                                                       _from_schema(extra, root, depth + 1), max_size=3)).map(
            lambda pair: {**pair[1], **pair[0]})
    conditions = [p for p in node.get("allOf", []) if "if" in p]
    if not conditions:
        return strategy

    @st.composite
    def with_conditions(draw):
        doc = draw(strategy)
        for cond in conditions:  # {"if": {properties: {k: {const}}}, "then": {properties: {...}}}
            if all(doc.get(k) == v.get("const") for k, v in cond["if"]["properties"].items()):
                for k, v in cond["then"]["properties"].items():
                    doc[k] = draw(_from_schema(v, root, depth + 1))
        return doc

    return with_conditions()


SCHEMA = results_schema()


@FUZZ
@given(doc=_from_schema(SCHEMA, SCHEMA))
def test_loader_takes_or_refuses_every_document_the_schema_allows(doc):
    from precision_suite.validation import SchemaViolation, validate_results

    try:
        validate_results(doc)
        valid = True
    except SchemaViolation:
        valid = False
    loaded = _load(json.dumps(doc))
    if valid and loaded is not None:
        assert len(loaded.cases) == len(doc["cases"])


@FUZZ
@given(blob=st.binary(max_size=200) | st.text(max_size=200).map(str.encode))
def test_loader_refuses_random_bytes_in_one_line(blob):
    _load(blob)


@FUZZ
@given(doc=json_values | st.fixed_dictionaries(
    {"schema": st.just("precision-suite/results"), "schema_version": st.sampled_from([1, 2, 3, "2", None])},
    optional={"cases": json_values, "environments": json_values, "definitions": json_values,
              "environment": json_values, "created": json_values, "tool_version": json_values}))
def test_loader_refuses_random_json_in_one_line(doc):
    _load(json.dumps(doc))


# ---------------------------------------------------------------- config

def _run_options():
    from precision_suite.cli import _subcommand
    from precision_suite.config import run_options

    return run_options(_subcommand("run")._actions)


OPTIONS = _run_options()
MATRIX_KEYS = {f for f in Matrix.__dataclass_fields__}


def _toml_value(v) -> str:
    """A TOML literal (strings in JSON's escapes, which TOML basic strings share)."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        return "nan" if math.isnan(v) else ("inf" if v > 0 else "-inf") if math.isinf(v) else repr(v)
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if isinstance(v, str):
        return json.dumps(v)
    return str(v)


toml_scalars = (st.booleans() | st.integers(-2**63, 2**63 - 1) | st.floats()
                | st.sampled_from(["relu", "fp16", "normal(std=2)", "1,2", "cpu", "", "overflow", "none"])
                | st.text(max_size=10))
toml_values = toml_scalars | st.lists(toml_scalars, max_size=3)
keys = st.sampled_from(sorted(OPTIONS) + [k.replace("_", "-") for k in OPTIONS]) | st.from_regex(r"[a-z_-]{1,10}",
                                                                                                  fullmatch=True)
sections = st.sampled_from(["[tool.precision-suite]", "[tool.precision_suite]", "[tool.precisionsuite]",
                            "[precision-suite]", "[tool.black]", "[tool.precision-suite.run]", ""])


def _read(text: str, as_config: bool):
    """load_config on ``text`` (as ./pyproject.toml or as --config FILE), then the matrix options
    through Matrix.from_options: a dict, or ConfigError / SpecError in one line."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / ("precision.toml" if as_config else "pyproject.toml")
        path.write_text(text, encoding="utf-8")
        try:
            options = load_config(str(path) if as_config else None, OPTIONS, cwd=tmp)
        except ConfigError as e:
            _one_line(e)
            return None
    try:
        Matrix.from_options(**{k: v for k, v in options.items() if k in MATRIX_KEYS}, devices="cpu")
    except SpecError as e:
        _one_line(e)
    return options


@FUZZ
@given(section=sections, items=st.lists(st.tuples(keys, toml_values), max_size=4), as_config=st.booleans())
def test_config_with_random_keys_and_values(section, items, as_config):
    text = "\n".join([section, *(f"{json.dumps(k)} = {_toml_value(v)}" for k, v in items)])
    options = _read(text, as_config)
    if options is not None:  # accepted: every key is a run option, under its underscore name
        assert set(options) <= set(OPTIONS)


@FUZZ
@given(text=st.text(alphabet=st.sampled_from(list("[]=\"'.,#\n tool-precision_suite depth12fp16{}")), max_size=80)
       | st.text(max_size=80), as_config=st.booleans())
def test_config_with_random_tomlish_text(text, as_config):
    _read(text, as_config)
