"""JSON Schema validation of CDS Hooks bodies against the schemas kept in ``service/schemas``.

Validators are compiled once per process. A failure becomes an ``InvalidRequest`` (HTTP 400) whose
OperationOutcome names the field at fault as a path such as ``context.selections[0]``.

Two engines, one schema: ``jsonschema_rs`` (compiled Rust) answers "valid?" for every request, ~100x faster
than the ``jsonschema`` package here (0.19 ms of a hook call, bench/README.md); only an invalid body goes
on to ``jsonschema``, whose ``best_match`` picks the error the 400 names. The schemas' patterns are written
to mean the same in both regex engines (control characters are named explicitly rather than left to the
whitespace class, which differs), and a test runs both engines over the same fuzzed requests. Where they
still disagree (Python's ``$`` also matches before a trailing newline, ECMA-262's does not), the body is
refused with the Rust engine's first error.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Iterable
from typing import Any

import jsonschema_rs
from jsonschema import Draft202012Validator
from jsonschema.exceptions import ValidationError, best_match
from referencing import Registry, Resource

from service import PACKAGE_DIR
from service.errors import InvalidRequest

SCHEMA_DIR = PACKAGE_DIR / "schemas"


@functools.cache
def load_schema(name: str) -> dict[str, Any]:
    """Load one schema file by name (e.g. ``request.schema.json``)."""
    with (SCHEMA_DIR / name).open(encoding="utf-8") as handle:
        schema: dict[str, Any] = json.load(handle)
    return schema


@functools.cache
def _registry() -> Registry[Any]:
    resources = []
    for path in sorted(SCHEMA_DIR.glob("*.schema.json")):
        schema = load_schema(path.name)
        resource = Resource.from_contents(schema)
        # Register under the $id and the bare file name so relative $refs resolve either way.
        resources += [(schema["$id"], resource), (path.name, resource)]
    return Registry().with_resources(resources)


@functools.cache
def validator(name: str) -> Draft202012Validator:
    """A compiled validator for one schema file, sharing the registry for cross-file refs."""
    schema = load_schema(name)
    Draft202012Validator.check_schema(schema)
    return Draft202012Validator(schema, registry=_registry())


@functools.cache
def fast_validator(name: str) -> jsonschema_rs.Validator:
    """The same schema compiled by ``jsonschema_rs``, with the same cross-file references."""
    resources = []
    for path in sorted(SCHEMA_DIR.glob("*.schema.json")):
        schema = load_schema(path.name)
        resources.append((schema["$id"], schema))
    registry = jsonschema_rs.Registry(resources)
    schema = load_schema(name)
    return jsonschema_rs.Draft202012Validator(schema, registry=registry, base_uri=schema["$id"])


def format_path(parts: Iterable[Any], prefix: str = "") -> str:
    """``["context", "selections", 0]`` → ``context.selections[0]``."""
    text = prefix
    for part in parts:
        if isinstance(part, int):
            text += f"[{part}]"
        else:
            text += f".{part}" if text else str(part)
    return text


def _describe(error: ValidationError, prefix: str) -> tuple[str, str]:
    path = format_path(error.absolute_path, prefix)
    where = path or (prefix or "body")
    if error.validator == "required":
        missing = str(error.message).split("'")[1] if "'" in error.message else "a required field"
        field = format_path([missing], where) if path or prefix else missing
        return f"missing required field '{field}'", field
    if error.validator == "dependentRequired":
        # message: "'fhirServer' is a dependency of 'fhirAuthorization'"
        missing = str(error.message).split("'")[1] if "'" in error.message else "a dependent field"
        field = format_path([missing], path or prefix)
        return f"missing required field '{field}' ({error.message})", field
    if error.validator in (
        "type",
        "enum",
        "const",
        "pattern",
        "minItems",
        "maxItems",
        "minLength",
        "maxLength",
        "minimum",
        "additionalProperties",
    ):
        # Name the rule without echoing the (possibly clinical) offending value back.
        rule = {
            "type": f"must be of type {error.validator_value}",
            "enum": f"must be one of {error.validator_value}",
            "const": f"must be {error.validator_value!r}",
            "pattern": "has an invalid format",
            "minItems": f"must have at least {error.validator_value} item(s)",
            "maxItems": f"must have at most {error.validator_value} item(s)",
            "minLength": "must not be empty",
            "maxLength": f"must be at most {error.validator_value} characters",
            "minimum": f"must be at least {error.validator_value}",
            "additionalProperties": "has members that are not allowed",
        }[str(error.validator)]
        return f"'{where}' {rule}", where
    return f"'{where}' is invalid", where


def validate(instance: Any, schema_name: str, *, prefix: str = "") -> None:
    """Raise ``InvalidRequest`` naming the most relevant error, if ``instance`` is invalid."""
    if fast_validator(schema_name).is_valid(instance):
        return
    errors = list(validator(schema_name).iter_errors(instance))
    if not errors:
        # The engines disagree. The Rust engine follows the ECMA-262 regex semantics JSON Schema
        # prescribes, where Python's ``$`` also matches before a trailing newline ("id\n"): refuse.
        first = next(iter(fast_validator(schema_name).iter_errors(instance)))
        where = format_path(first.instance_path, prefix) or prefix or "body"
        rule = "has an invalid format" if type(first.kind).__name__ == "Pattern" else "is invalid"
        raise InvalidRequest(f"'{where}' {rule}", expression=where)
    error = best_match(errors)
    assert error is not None
    message, expression = _describe(error, prefix)
    raise InvalidRequest(message, expression=expression)


def is_valid(instance: Any, schema_name: str) -> bool:
    """True when ``instance`` satisfies the schema (used by tests and the response self-check)."""
    return bool(validator(schema_name).is_valid(instance))


__all__ = ["SCHEMA_DIR", "format_path", "is_valid", "load_schema", "validate", "validator"]
