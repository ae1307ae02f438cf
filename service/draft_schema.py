"""Structural validation of a selected draft MedicationRequest against the FHIR R4 JSON Schema.

The schema (``fhir_profiles/jsonschema/MedicationRequest-r4.schema.json``) is generated from HL7's FHIR R4
4.0.1 JSON Schema and StructureDefinitions by ``scripts/generate_draft_schema.py``: MedicationRequest and
everything it references, every R4 resource type allowed in ``contained``, and tightened to what FHIR's
JSON rules require and the raw schema does not check (complex types are objects, no empty arrays or
objects, integer ranges, one ``value[x]`` at most, required codes from their required value sets, real
calendar dates). It is compiled once per process by ``jsonschema_rs``.

Why not the fhir.resources R4B models used before: they cost ~0.2 ms per draft (the largest single item of a
hook call, bench/README.md) against ~6 µs here, they validate R4B rather than R4, and they accept codes
outside required value sets (``status: "bogus"``). tests/test_draft_schema.py keeps this check at least
as strict as the R4B models, case by case.

Error messages name the element at fault and the rule it breaks, never the offending value (it may be
clinical): ``'dosageInstruction[0].timing.repeat.periodUnit' is not an allowed code``.
"""

from __future__ import annotations

import datetime as dt
import functools
import re
from collections.abc import Sequence
from typing import Any, Final

import jsonschema_rs
import orjson

from cards.codes import FHIR_PROFILES_DIR

SCHEMA_PATH: Final = FHIR_PROFILES_DIR / "jsonschema" / "MedicationRequest-r4.schema.json"

# A member name safe to quote back (an identifier, as every FHIR element name is).
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}")


def _fhir_date(value: str) -> bool:
    """The calendar check for date, dateTime and instant (``format: fhir-date`` in the schema): the
    schema's pattern checks the syntax, and this rejects dates such as 2026-02-30 that the pattern allows."""
    if len(value) < 10:
        return True  # a year or year-month: the pattern has checked it
    try:
        dt.date(int(value[0:4]), int(value[5:7]), int(value[8:10]))
    except ValueError:
        return False
    return True


class DraftSchema:
    """The compiled schema, and readable messages for its errors."""

    def __init__(self, schema: dict[str, Any]) -> None:
        self._validator = jsonschema_rs.Draft7Validator(
            schema, formats={"fhir-date": _fhir_date}, validate_formats=True
        )
        # The generator's own constraints (in each definition's allOf): a required primitive may be
        # given as ``x`` or as its extension ``_x`` (anyOf), and a choice element ``x[x]`` takes one of
        # its typed names at most, or exactly one when required (oneOf).
        self._required_primitive: dict[tuple[Any, ...], str] = {}
        self._choice: dict[tuple[Any, ...], list[str]] = {}
        for name, definition in schema["definitions"].items():
            for index, constraint in enumerate(definition.get("allOf", ())):
                where = ("definitions", name, "allOf", index)
                if "anyOf" in constraint:
                    self._required_primitive[(*where, "anyOf")] = constraint["anyOf"][0]["required"][0]
                elif "oneOf" in constraint:
                    names = [branch["required"][0] for branch in constraint["oneOf"] if "required" in branch]
                    self._choice[(*where, "oneOf")] = names

    def is_valid(self, resource: Any) -> bool:
        """Whether ``instance`` validates against the schema."""
        return bool(self._validator.is_valid(resource))

    def first_error(self, resource: Any) -> tuple[list[str | int], str] | None:
        """The first error as (path inside the resource, rule broken), or None when valid."""
        for error in self._validator.iter_errors(resource):
            return self._describe(error)
        return None

    def _describe(self, error: jsonschema_rs.ValidationError) -> tuple[list[str | int], str]:
        path: list[str | int] = list(error.instance_path)
        kind = type(error.kind).__name__
        schema_path = tuple(error.schema_path)
        if schema_path in self._required_primitive:
            return [*path, self._required_primitive[schema_path]], "is required"
        if schema_path in self._choice:
            names = self._choice[schema_path]
            if kind == "OneOfMultipleValid":
                listed = ", ".join(names) if len(names) <= 4 else _choice_name(names)
                return path, f"may have only one of {listed}"
            return [*path, _choice_name(names)], "is required"
        if kind == "Required":
            return [*path, str(getattr(error.kind, "property", "?"))], "is required"
        if kind == "AdditionalProperties":
            unexpected = [n for n in getattr(error.kind, "unexpected", ()) if _NAME.fullmatch(str(n))]
            listed = f": {', '.join(map(str, unexpected))}" if unexpected else ""
            return path, f"has members that are not FHIR R4 elements here{listed}"
        rule = {
            "Enum": "is not an allowed code",
            "Constant": f"must be {getattr(error.kind, 'expected_value', '?')!r}",
            "Type": f"must be of type {'/'.join(map(str, getattr(error.kind, 'types', ()))) or '?'}",
            "Pattern": "has an invalid format",
            "Format": "has an invalid format",
            "MinItems": "must not be empty",
            "MinProperties": "must not be empty",
            "Minimum": "is out of range",
            "Maximum": "is out of range",
            "Not": "must not contain resources (a contained resource cannot contain others)",
        }.get(kind, "is invalid")
        return path, rule


def _choice_name(names: Sequence[str]) -> str:
    """``["medicationCodeableConcept", "medicationReference"]`` → ``medication[x]``."""
    first, last = min(names), max(names)
    size = 0
    while size < min(len(first), len(last)) and first[size] == last[size]:
        size += 1
    return f"{first[:size]}[x]"


@functools.cache
def draft_schema() -> DraftSchema:
    """The compiled schema (once per process; about 0.1 s, done at worker start by service.gunicorn_conf)."""
    return DraftSchema(orjson.loads(SCHEMA_PATH.read_bytes()))
