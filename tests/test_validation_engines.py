"""The two JSON Schema engines (service.validation) agree: jsonschema_rs decides, jsonschema explains.

Every request is checked by the compiled ``jsonschema_rs`` engine; only a body it refuses goes on to the
``jsonschema`` package for the error message. So the fast engine must never accept what the reference
engine refuses. Checked here over the fuzzer's mutated requests (tests/test_fuzz.py) and over strings
chosen where the two regex engines are known to differ.
"""

from __future__ import annotations

import copy
import json
from typing import Any

import pytest
from flask.testing import FlaskClient
from hypothesis import given, settings
from hypothesis import strategies as st
from test_fuzz import BASE, FUZZ, SELECT_URL, Mutation, client, mutations

from service.validation import fast_validator, validator

__all__ = ["client"]  # the fuzz suite's app fixture, reused

SCHEMAS = (("request.schema.json", ()), ("order-select-context.schema.json", ("context",)))


def _part(body: Any, path: tuple[str, ...]) -> Any:
    for key in path:
        if not isinstance(body, dict) or key not in body:
            return None
        body = body[key]
    return body


def _strings(value: Any) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [s for k, v in value.items() for s in (k, *_strings(v))]
    if isinstance(value, list):
        return [s for item in value for s in _strings(item)]
    return []


@settings(FUZZ, max_examples=200)
@given(mutation=mutations())
def test_engines_agree_on_mutated_requests(mutation: Mutation) -> None:
    for name, path in SCHEMAS:
        instance = _part(mutation.body, path)
        if instance is None:
            continue
        fast, reference = fast_validator(name).is_valid(instance), validator(name).is_valid(instance)
        assert not (fast and not reference), f"{name}: jsonschema_rs accepts what jsonschema refuses"
        if not any(s.endswith("\n") for s in _strings(instance)):
            assert fast == reference, name


# Characters on which the two regex engines' classes differ: Python's \s includes \x1c-\x1f and
# Python's $ matches before a final newline; neither may let a bad value through.
ODD_CHARACTERS = ["\x1c", "\x1f", "\x7f", "\x00", "\n", "\u00a0", "\u2028", "\u3000", "\t"]


@settings(FUZZ, max_examples=120)
@given(
    field=st.sampled_from([("fhirServer",), ("hookInstance",), ("context", "patientId"), ("context", "userId")]),
    character=st.sampled_from(ODD_CHARACTERS),
    at_end=st.booleans(),
)
def test_engines_agree_on_odd_characters(field: tuple[str, ...], character: str, at_end: bool) -> None:
    body = copy.deepcopy(BASE)
    body["fhirServer"] = "https://ehr.example.org/fhir"
    parent = _part(body, field[:-1]) if len(field) > 1 else body
    value = parent[field[-1]]
    parent[field[-1]] = value + character if at_end else value[:3] + character + value[3:]
    for name, path in SCHEMAS:
        instance = _part(body, path)
        fast, reference = fast_validator(name).is_valid(instance), validator(name).is_valid(instance)
        assert not (fast and not reference), f"{name}: {field} with {character!r} accepted by jsonschema_rs only"


@pytest.mark.parametrize(
    ("field", "value", "expression"),
    [
        (("context", "patientId"), "pat-1\n", "context.patientId"),
        (("context", "selections"), ["MedicationRequest/draft-1\n"], "context.selections[0]"),
        (("fhirServer",), "https://ehr.example.org/fhir\n", "fhirServer"),
        (("fhirServer",), "https://ehr.example.org/\x1cfhir", "fhirServer"),
    ],
)
def test_values_only_one_engine_refuses_are_a_400_naming_the_field(
    client: FlaskClient, field: tuple[str, ...], value: Any, expression: str
) -> None:
    body = copy.deepcopy(BASE)
    parent = _part(body, field[:-1]) if len(field) > 1 else body
    parent[field[-1]] = value
    response = client.post(SELECT_URL, data=json.dumps(body), content_type="application/json")
    assert response.status_code == 400
    issue = response.get_json()["issue"][0]
    assert issue["expression"] == [expression]
    assert "invalid format" in issue["diagnostics"]
