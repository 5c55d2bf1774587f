"""The published JSON Schema of the results format (``results.schema.json`` beside this file), and
validation against it with fastjsonschema, compiled once per process (~0.05 s for a default-matrix
file, where a reference validator takes seconds). ``precision-suite schema`` prints it."""

from __future__ import annotations

import functools
import json
from pathlib import Path

__all__ = ["SCHEMA_PATH", "SchemaViolation", "results_schema", "validate_results"]

SCHEMA_PATH = Path(__file__).with_name("results.schema.json")


class SchemaViolation(ValueError):
    """A results payload that does not follow the schema: the message names where and what."""


def results_schema() -> dict:
    """A fresh copy of the schema (fastjsonschema's compile changes the dict it is given)."""
    with open(SCHEMA_PATH, encoding="utf-8") as f:
        return json.load(f)


@functools.cache
def _validator():
    """(compiled validator, the exception class it raises): kept together, since a test that
    re-imports modules would otherwise catch a fresh class the cached validator never raises."""
    import fastjsonschema

    return fastjsonschema.compile(results_schema()), fastjsonschema.JsonSchemaValueException


def validate_results(payload: dict) -> None:
    """Raise SchemaViolation (``cases[3].status: must be one of ['ok', 'error', 'skipped']``) unless
    ``payload`` follows the current results schema."""
    validate, invalid = _validator()
    try:
        validate(payload)
    except invalid as e:
        where = (e.name or "data").removeprefix("data").lstrip(".") or "the top level"
        raise SchemaViolation(f"{where}: {e.message.removeprefix((e.name or '') + ' ')}") from None
