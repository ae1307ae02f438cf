"""Hypothesis property tests: a valid order-select call, mutated, never breaks the service or its dosing.

The starting point is the worked example: ganciclovir 500 mg IV q12h selected for a 54-year-old man,
80 kg, serum creatinine 1.0 mg/dL (CrCl 96 mL/min) → the service proposes 400 mg IV q12h.

Properties, for every mutated request:
- never a 5xx; a 4xx is a JSON OperationOutcome; a 200 satisfies ``response.schema.json``;
- every proposed MedicationRequest dose is a finite number of mg above zero;
- never a wrong ganciclovir dose: a mutation that leaves the dose inputs (weight and creatinine
  Observations, the Patient, the selected draft) alone leaves any proposed ganciclovir regimen at
  400 mg q12h; a mutation that touches them may only yield a regimen computable from data present in
  the mutated request (an independent oracle below, label Table 1 via docs/clinical-basis.md §2.2); and a
  targeted mutation of exactly those inputs yields exactly the regimen the oracle computes, or, when
  the weight/creatinine/age is unusable, no ganciclovir dose at all and a "dose not computed" card.

The oracle applies the product's plausibility limits (``cards.facts.PLAUSIBLE`` and
``MAX_PLAUSIBLE_AGE_YEARS``, imported, not restated): a latest weight or creatinine outside them, or an
older age, is unusable, so no dose may be computed from it. The properties hold for every generated
input, with no exclusions. The last section pins, one minimal request each, the inputs that used to
break the service (a malformed ``fhirServer``, implausible values, malformed Observation.status and
Condition status codings) to their correct answers.
"""

from __future__ import annotations

import copy
import datetime as dt
import json
import math
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import responses
from fhir_fixtures import PATIENT_ID, load, order_select, patient_resources, prefetch_for, relative_date
from flask import Flask
from flask.testing import FlaskClient
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from jsonschema import Draft202012Validator

from cards.codes import code_set
from cards.facts import MAX_PLAUSIBLE_AGE_YEARS, PLAUSIBLE
from service.app import create_app
from service.openapi import openapi_document
from service.validation import validator

SELECT_URL = "/cds-services/cmv-antiviral-order-select"
UCUM = "http://unitsofmeasure.org"
TODAY = dt.date.today()
FUZZ = settings(deadline=None, derandomize=True, database=None, suppress_health_check=[HealthCheck.too_slow])

JsonPath = tuple[str | int, ...]


def base_request() -> dict[str, Any]:
    body: dict[str, Any] = order_select(
        [load("draft-ganciclovir.json", TODAY)], prefetch=prefetch_for(patient_resources(TODAY))
    )
    body["hookInstance"] = "fuzz-hook-instance"
    return body


BASE = base_request()


def _entry_path(key: str, resource_id: str) -> JsonPath:
    entries = BASE["prefetch"][key]["entry"]
    index = next(i for i, entry in enumerate(entries) if entry["resource"]["id"] == resource_id)
    return ("prefetch", key, "entry", index, "resource")


WEIGHT: JsonPath = _entry_path("bodyMeasurements", "obs-weight")
SCR: JsonPath = _entry_path("labs", "obs-scr")  # the latest creatinine (1.0 mg/dL)
SCR_OLD: JsonPath = _entry_path("labs", "obs-scr-old")  # an older one (1.6 mg/dL)
PATIENT: JsonPath = ("prefetch", "patient")
# Everything the ganciclovir dose is computed from.
DOSE_INPUTS: tuple[JsonPath, ...] = (
    WEIGHT,
    SCR,
    SCR_OLD,
    PATIENT,
    ("context", "patientId"),
    ("context", "draftOrders", "entry", 0),
    ("context", "selections"),
)
BASE_REGIMEN = (400.0, 1, 12.0, "h")  # 400 mg, once every 12 h
DRAFT_REGIMEN = (500.0, 1, 12.0, "h")  # what the draft asks for


# --------------------------------------------------------------------------------------------------
# The app, and one call
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def client() -> Iterator[FlaskClient]:
    with tempfile.TemporaryDirectory(prefix="cmv-cds-fuzz-") as directory:
        app: Flask = create_app(
            {"require_auth": False, "database_url": f"sqlite:///{Path(directory) / 'fuzz.sqlite3'}"}
        )
        yield app.test_client()
        app.extensions["cmv_cds"]["store"].dispose()


OPERATION_OUTCOME = Draft202012Validator(openapi_document()["components"]["schemas"]["OperationOutcome"])


@dataclass(frozen=True)
class Answer:
    status: int
    body: Any


def call(client: FlaskClient, raw: bytes) -> Answer:
    """POST a raw body; no FHIR server is ever reached (an unregistered URL raises ConnectionError → 412)."""
    with responses.RequestsMock(assert_all_requests_are_fired=False):
        response = client.post(SELECT_URL, data=raw, content_type="application/json")
    assert response.status_code < 500, f"{response.status_code}: {response.get_data(as_text=True)[:300]}"
    assert response.mimetype == "application/json"
    body = response.get_json()
    if response.status_code == 200:
        errors = list(validator("response.schema.json").iter_errors(body))
        assert not errors, f"200 response violates response.schema.json: {errors[0].message}"
        for dose in proposed_doses(body):
            assert math.isfinite(dose), f"proposed dose {dose!r} mg"
            assert dose > 0, f"proposed dose {dose!r} mg"
    else:
        assert 400 <= response.status_code < 500
        assert OPERATION_OUTCOME.is_valid(body), body
    return Answer(response.status_code, body)


def encode(body: Any) -> bytes:
    return json.dumps(body, allow_nan=True).encode("utf-8")


# --------------------------------------------------------------------------------------------------
# Reading the answer
# --------------------------------------------------------------------------------------------------

_GANCICLOVIR = code_set("Ganciclovir")
_VALGANCICLOVIR = code_set("Valganciclovir")


def _medication_requests(body: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for card in body["cards"]:
        for suggestion in card.get("suggestions", []):
            for action in suggestion.get("actions", []):
                resource = action.get("resource")
                if isinstance(resource, dict) and resource.get("resourceType") == "MedicationRequest":
                    yield resource


def _dose_and_timing(resource: dict[str, Any]) -> tuple[float, int, float, str]:
    (dosage,) = resource["dosageInstruction"]
    quantity = dosage["doseAndRate"][0]["doseQuantity"]
    assert (quantity["code"], quantity["system"]) == ("mg", UCUM), quantity
    repeat = dosage["timing"]["repeat"]
    return float(quantity["value"]), int(repeat.get("frequency", 1)), float(repeat["period"]), str(repeat["periodUnit"])


def proposed_doses(body: dict[str, Any]) -> list[float]:
    doses = []
    for resource in _medication_requests(body):
        for dosage in resource.get("dosageInstruction") or []:
            for rate in dosage.get("doseAndRate") or []:
                if "doseQuantity" in rate:
                    doses.append(float(rate["doseQuantity"]["value"]))
    return doses


def _is_ganciclovir(resource: dict[str, Any]) -> bool:
    concept = resource.get("medicationCodeableConcept")
    text = json.dumps(concept).lower()
    return _GANCICLOVIR.matches_concept(concept) and not (
        _VALGANCICLOVIR.matches_concept(concept) or "valganciclovir" in text
    )


def ganciclovir_regimens(body: dict[str, Any]) -> list[tuple[float, int, float, str]]:
    """(dose mg, frequency, period, periodUnit) of every proposed ganciclovir MedicationRequest."""
    return [_dose_and_timing(r) for r in _medication_requests(body) if _is_ganciclovir(r)]


def rule_ids(body: dict[str, Any]) -> set[str]:
    return {card["source"]["topic"]["code"] for card in body["cards"] if "topic" in card["source"]}


# --------------------------------------------------------------------------------------------------
# The oracle: ganciclovir regimens computable from the data in a request
# --------------------------------------------------------------------------------------------------
# Independent of cards/: label Table 1 (docs/clinical-basis.md §2.2) with the band edges of docs/policy.md §5,
# Cockcroft-Gault and the units of docs/policy.md §2-§3, rounding to 5 mg (docs/policy.md §6). Only the product's
# plausibility limits (not in the references) come from cards.facts.

_Q12H, _Q24H, _TIW = (1, 12.0, "h"), (1, 24.0, "h"), (3, 1.0, "wk")
# (lowest CrCl of the band in mL/min, mg/kg, schedule), highest band first.
GANCICLOVIR_TABLE = {
    "induction": (
        (70.0, 5.0, _Q12H),
        (50.0, 2.5, _Q12H),
        (25.0, 2.5, _Q24H),
        (10.0, 1.25, _Q24H),
        (-math.inf, 1.25, _TIW),
    ),
    "maintenance": (
        (70.0, 5.0, _Q24H),
        (50.0, 2.5, _Q24H),
        (25.0, 1.25, _Q24H),
        (10.0, 0.625, _Q24H),
        (-math.inf, 0.625, _TIW),
    ),
}
WEIGHT_KG = {"kg": 1.0, "g": 0.001, "[lb_av]": 0.45359237, "lb": 0.45359237, "lbs": 0.45359237}
SCR_MG_DL = {"mg/dl": 1.0, "umol/l": 1 / 88.4, "µmol/l": 1 / 88.4, "μmol/l": 1 / 88.4}
IGNORED_STATUSES = {"entered-in-error", "cancelled"}
PLAUSIBLE_WEIGHT_KG = PLAUSIBLE["BodyWeight"]  # inclusive, in kg
PLAUSIBLE_SCR_MG_DL = PLAUSIBLE["SerumCreatinine"]  # inclusive, in mg/dL


def _ignored(status: Any) -> bool:
    """docs/policy.md §2, and a status that is not a string (absent, a list, a number) is not a usable one."""
    return not isinstance(status, str) or status in IGNORED_STATUSES


def plausible_weight(kg: float | None) -> float | None:
    return kg if kg is not None and PLAUSIBLE_WEIGHT_KG[0] <= kg <= PLAUSIBLE_WEIGHT_KG[1] else None


def plausible_scr(mg_dl: float | None) -> float | None:
    return mg_dl if mg_dl is not None and PLAUSIBLE_SCR_MG_DL[0] <= mg_dl <= PLAUSIBLE_SCR_MG_DL[1] else None


def quantity_value(quantity: Any, table: dict[str, float]) -> float | None:
    """A Quantity in the canonical unit; None when absent, not a finite number, or in an unknown unit."""
    if not isinstance(quantity, dict):
        return None
    value = quantity.get("value")
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        return None
    try:
        number = float(value)  # the service also reads a numeric string
    except (ValueError, OverflowError):
        return None
    if not math.isfinite(number):
        return None
    for unit in (quantity.get("code"), quantity.get("unit")):
        if isinstance(unit, str) and unit.strip().lower() in table:
            return number * table[unit.strip().lower()]
    return None


def parse_birth_date(value: Any) -> dt.date | None:
    if not isinstance(value, str):
        return None
    text = value.strip()
    try:
        if len(text) == 4:
            return dt.date(int(text), 1, 1)
        if len(text) == 7:
            return dt.date(int(text[:4]), int(text[5:7]), 1)
        return dt.date.fromisoformat(text[:10])
    except ValueError:
        return None


def age_on(birth: dt.date | None, today: dt.date) -> int | None:
    """Completed years; None when unknown, in the future, or older than the plausible maximum."""
    if birth is None or birth > today:
        return None
    age = today.year - birth.year - ((today.month, today.day) < (birth.month, birth.day))
    return age if age <= MAX_PLAUSIBLE_AGE_YEARS else None


def regimen(
    age: int, weight_kg: float, scr_mg_dl: float, female_factor: float, phase: str
) -> tuple[float, int, float, str]:
    per_kg = (140.0 - age) / (72.0 * scr_mg_dl) * female_factor
    crcl = per_kg * weight_kg
    for low, mg_per_kg, (frequency, period, unit) in GANCICLOVIR_TABLE[phase]:
        if crcl >= low:
            dose = math.floor(mg_per_kg * weight_kg / 5.0 + 0.5) * 5.0
            return dose, frequency, period, unit
    raise AssertionError("unreachable")


def _sex_factor(patient: dict[str, Any]) -> float:
    return 1.0 if patient.get("gender") == "male" else 0.85  # female, other or unknown: the lower value


def _resources(body: dict[str, Any]) -> Iterator[dict[str, Any]]:
    prefetch = body.get("prefetch")
    if not isinstance(prefetch, dict):
        return
    for value in prefetch.values():
        if not isinstance(value, dict):
            continue
        yield value
        entries = value.get("entry")
        for entry in entries if isinstance(entries, list) else []:
            if isinstance(entry, dict) and isinstance(entry.get("resource"), dict):
                yield entry["resource"]


@dataclass(frozen=True)
class Candidates:
    """Every plausible value the dose could legitimately be computed from, whichever Observation is the latest."""

    weights: frozenset[float]
    scrs: frozenset[float]
    patients: tuple[tuple[int | None, float], ...]  # (age, female factor)
    dialysis: bool


def candidates(body: dict[str, Any]) -> Candidates:
    context = body.get("context") if isinstance(body.get("context"), dict) else {}
    assert isinstance(context, dict)
    weights, scrs, patients, dialysis = set(), set(), [], False
    for resource in _resources(body):
        kind = resource.get("resourceType")
        if kind == "Patient" and resource.get("id") == context.get("patientId"):
            patients.append((age_on(parse_birth_date(resource.get("birthDate")), TODAY), _sex_factor(resource)))
        elif kind == "Observation" and not _ignored(resource.get("status")):
            code = resource.get("code")
            if code_set("BodyWeight").matches_concept(code):
                weights.add(quantity_value(resource.get("valueQuantity"), WEIGHT_KG))
            if code_set("SerumCreatinine").matches_concept(code):
                scrs.add(quantity_value(resource.get("valueQuantity"), SCR_MG_DL))
        elif kind == "Condition" and code_set("DialysisDependence").matches_concept(resource.get("code")):
            dialysis = True
    usable_weights = {w for w in map(plausible_weight, weights) if w is not None}
    usable_scrs = {s for s in map(plausible_scr, scrs) if s is not None}
    return Candidates(frozenset(usable_weights), frozenset(usable_scrs), tuple(patients), dialysis)


def allowed_regimens(found: Candidates) -> set[tuple[float, int, float, str]]:
    allowed = set()
    for age, factor in found.patients:
        if age is None:
            continue
        for weight in found.weights:
            if found.dialysis:
                allowed |= {(math.floor(m * weight / 5 + 0.5) * 5.0, *_TIW) for m in (1.25, 0.625)}
            for scr in found.scrs:
                for phase in GANCICLOVIR_TABLE:
                    allowed.add(regimen(age, weight, scr, factor, phase))
    return allowed


# --------------------------------------------------------------------------------------------------
# Mutations
# --------------------------------------------------------------------------------------------------


def all_paths(node: Any, prefix: JsonPath = ()) -> list[JsonPath]:
    paths: list[JsonPath] = []
    children: list[tuple[str | int, Any]] = []
    if isinstance(node, dict):
        children = list(node.items())
    elif isinstance(node, list):
        children = list(enumerate(node))
    for key, child in children:
        path = (*prefix, key)
        paths.append(path)
        paths.extend(all_paths(child, path))
    return paths


PATHS = all_paths(BASE)


def get(node: Any, path: JsonPath) -> Any:
    for part in path:
        node = node[part]
    return node


def touches(path: JsonPath, targets: tuple[JsonPath, ...] = DOSE_INPUTS) -> bool:
    """``path`` is inside one of ``targets`` or contains one (mutating it may change that input)."""
    return any(path[: len(t)] == t or t[: len(path)] == path for t in targets)


ODD_NUMBERS: list[Any] = [
    1e308,
    -1e308,
    1e20,
    1e15,
    10**30,
    5000,
    -1,
    0,
    -0.0,
    1e-300,
    5e-324,
    0.5,
    2**63,
    -(2**63) - 1,
]
NAN_LIKE: list[Any] = ["NaN", "nan", "Infinity", "-Infinity", "1e308", "1e999", "-1", "0", "", " ", "80 kg", "½"]
WRONG_TYPES: list[Any] = [None, True, False, 0, 1.5, "", "x", [], {}, [None], {"value": 1}, [[[]]]]
LONG_STRINGS = [
    "x" * 10_000,
    "é" * 70_000,
    "𝔊" * 20_000,
    "\u202e" + "a" * 5_000,
    "\x00" * 1_000,
    "9" * 5_000,
    "y" * 2_200_000,  # over the 2 MiB body cap: 413
]
ODD_FHIR_SERVERS = [
    "https://ehr.example.org/fhir",
    "http://127.0.0.1:1/fhir",
    "https://{",
    "http://a:99999999/x",
    "https://user:pass@ehr.example.org/fhir",
    "http://ehr.example.org/fhir?x=%00",
    "https://ehr.example.org:0",
    "http://[",
    "http://[::1",
]


@dataclass(frozen=True)
class Mutation:
    kind: str
    path: JsonPath
    body: Any = field(repr=False)
    value: Any = None

    def __repr__(self) -> str:
        shown = repr(self.value)
        return f"Mutation({self.kind}, {'.'.join(map(str, self.path))}, {shown[:60]}{'…' if len(shown) > 60 else ''})"

    @property
    def neutral(self) -> bool:
        """Leaves the dose inputs as they were (a duplicated list item is an exact copy)."""
        return self.kind == "duplicate" or not touches(self.path)


def _set(body: dict[str, Any], path: JsonPath, value: Any) -> dict[str, Any]:
    mutated = copy.deepcopy(body)
    parent = get(mutated, path[:-1])
    parent[path[-1]] = value
    return mutated


def _drop(body: dict[str, Any], path: JsonPath) -> dict[str, Any]:
    mutated = copy.deepcopy(body)
    parent = get(mutated, path[:-1])
    del parent[path[-1]]
    return mutated


def _duplicate(body: dict[str, Any], path: JsonPath) -> dict[str, Any]:
    mutated = copy.deepcopy(body)
    parent = get(mutated, path[:-1])
    parent.insert(path[-1] + 1, copy.deepcopy(parent[path[-1]]))  # type: ignore[operator]
    return mutated


@st.composite
def mutations(draw: st.DrawFn) -> Mutation:
    kind = draw(st.sampled_from(["drop", "wrong-type", "odd-number", "long-string", "duplicate", "fhir-server"]))
    if kind == "duplicate":
        path = draw(st.sampled_from([p for p in PATHS if isinstance(p[-1], int)]))
        return Mutation(kind, path, _duplicate(BASE, path))
    if kind == "fhir-server":
        key = draw(st.sampled_from(sorted(BASE["prefetch"])))
        body = _drop(BASE, ("prefetch", key))
        body["fhirServer"] = server = draw(st.sampled_from(ODD_FHIR_SERVERS))
        return Mutation(kind, ("prefetch", key), body, server)
    path = draw(st.sampled_from(PATHS))
    if kind == "drop":
        return Mutation(kind, path, _drop(BASE, path))
    original = get(BASE, path)
    pool = {"wrong-type": WRONG_TYPES, "odd-number": ODD_NUMBERS + NAN_LIKE, "long-string": LONG_STRINGS}[kind]
    value = draw(st.sampled_from([v for v in pool if type(v) is not type(original)] if kind == "wrong-type" else pool))
    return Mutation(kind, path, _set(BASE, path, value), value)


def check_dose(mutation: Mutation, answer: Answer) -> None:
    if answer.status != 200:
        return
    proposed = ganciclovir_regimens(answer.body)
    if mutation.neutral:
        assert all(r == BASE_REGIMEN for r in proposed), (mutation.kind, mutation.path, proposed)
    else:
        allowed = allowed_regimens(candidates(mutation.body))
        assert set(proposed) <= allowed, (mutation.kind, mutation.path, proposed, allowed)


# --------------------------------------------------------------------------------------------------
# 1. Structural mutations anywhere in the request
# --------------------------------------------------------------------------------------------------


def test_the_unmutated_request_gives_400_mg_q12h(client: FlaskClient) -> None:
    answer = call(client, encode(BASE))
    assert answer.status == 200
    assert ganciclovir_regimens(answer.body) == [BASE_REGIMEN]
    assert "dose-adjust" in rule_ids(answer.body)


@settings(FUZZ, max_examples=70)
@given(mutation=mutations())
def test_mutated_request_is_answered_safely(client: FlaskClient, mutation: Mutation) -> None:
    answer = call(client, encode(mutation.body))
    event(f"{mutation.kind}: {answer.status}")
    check_dose(mutation, answer)


# --------------------------------------------------------------------------------------------------
# 2. Targeted mutations of the dose inputs: the exact regimen, or no dose
# --------------------------------------------------------------------------------------------------

KEEP = object()  # leave the field as it is


def _q(value: Any, unit: str | None = None, code: str | None = None) -> dict[str, Any]:
    quantity: dict[str, Any] = {"value": value}
    if unit is not None:
        quantity["unit"] = unit
    if code is not None:
        quantity |= {"system": UCUM, "code": code}
    return quantity


# Unusable values: implausible (outside PLAUSIBLE), not finite, not a number.
ODD_VALUES = [1e308, 1e20, 1e15, 1e-300, 5e-324, 1, -1, 0, -0.0, *NAN_LIKE, None, True, [80], {"value": 80}]
# The plausible range's edges (inclusive) and just outside them.
WEIGHT_EDGES = [*PLAUSIBLE_WEIGHT_KG, PLAUSIBLE_WEIGHT_KG[0] - 0.01, PLAUSIBLE_WEIGHT_KG[1] + 0.01]
SCR_EDGES = [*PLAUSIBLE_SCR_MG_DL, PLAUSIBLE_SCR_MG_DL[0] - 0.01, PLAUSIBLE_SCR_MG_DL[1] + 0.01]
WEIGHT_QUANTITIES = st.one_of(
    st.sampled_from(
        [
            _q(62.5, "kg", "kg"),
            _q(100, "kg", "kg"),  # 500 mg q12h: what the draft asks for, so confirmed
            _q(120.3, "kg", "kg"),
            _q(45, "kg", "kg"),
            _q(80000, "g", "g"),
            _q(176.37, "lb", "[lb_av]"),
            _q(176.37, "lbs"),
            _q(12.6, "stone", "[stone_av]"),
            _q(80, "st"),
            _q(80, " KG "),
            _q(80),
            _q(80, "kg", "[stone_av]"),
            _q(80, "stone", "kg"),
            _q("80", "kg", "kg"),
            {"unit": "kg", "system": UCUM, "code": "kg"},
            "80 kg",
            [_q(80, "kg", "kg")],
            None,
        ]
    ),
    st.builds(_q, st.sampled_from(ODD_VALUES + WEIGHT_EDGES), st.just("kg"), st.just("kg")),
    st.builds(lambda kg: _q(kg * 1000, "g", "g"), st.sampled_from(WEIGHT_EDGES)),
)
SCR_QUANTITIES = st.one_of(
    st.sampled_from(
        [
            _q(0.7, "mg/dL", "mg/dL"),
            _q(1.6, "mg/dL", "mg/dL"),
            _q(2.3, "mg/dL", "mg/dL"),
            _q(4.9, "mg/dL", "mg/dL"),
            _q(12, "mg/dL", "mg/dL"),
            _q(88.4, "umol/L", "umol/L"),
            _q(88.4, "µmol/L"),
            _q(150, "μmol/L"),
            _q(0.0884, "mmol/L", "mmol/L"),  # SI, but not a unit docs/policy.md §2 knows: missing
            _q(10, "mg/L", "mg/L"),
            _q(1.0, "MG/DL"),
            _q(1.0),
            _q("1.0", "mg/dL", "mg/dL"),
            {"unit": "mg/dL"},
            None,
        ]
    ),
    st.builds(_q, st.sampled_from(ODD_VALUES + SCR_EDGES), st.just("mg/dL"), st.just("mg/dL")),
    st.builds(lambda mg_dl: _q(mg_dl * 88.4, "umol/L", "umol/L"), st.sampled_from(SCR_EDGES)),
)
STATUSES: st.SearchStrategy[Any] = st.sampled_from(
    ["final", "amended", "preliminary", "entered-in-error", "cancelled", "registered", None, 42, ["final"], {}]
)
BIRTH_DATES = st.one_of(
    st.sampled_from(
        [
            "$birth-17",
            "$birth-18",
            "$birth-40",
            "$birth-90",
            f"$birth-{MAX_PLAUSIBLE_AGE_YEARS}",
            f"$birth-{MAX_PLAUSIBLE_AGE_YEARS + 1}",
        ]
    ).map(lambda token: relative_date(token, TODAY)),
    st.sampled_from(["1972", "1972-10", "9999-12-31", "not a date", "1972-02-30", 19721023, None, "1800-01-01"]),
)
GENDERS = st.sampled_from(["female", "other", "unknown", "MALE", None, 1])


@dataclass(frozen=True)
class DoseInputs:
    weight: Any = KEEP
    weight_status: Any = KEEP
    scr: Any = KEEP
    scr_status: Any = KEEP
    birth_date: Any = KEEP
    gender: Any = KEEP

    def apply(self) -> dict[str, Any]:
        body = copy.deepcopy(BASE)
        for value, path in (
            (self.weight, (*WEIGHT, "valueQuantity")),
            (self.weight_status, (*WEIGHT, "status")),
            (self.scr, (*SCR, "valueQuantity")),
            (self.scr_status, (*SCR, "status")),
            (self.birth_date, (*PATIENT, "birthDate")),
            (self.gender, (*PATIENT, "gender")),
        ):
            if value is KEEP:
                continue
            parent = get(body, path[:-1])
            if value is None:
                parent.pop(path[-1], None)  # None: the field is dropped
            else:
                parent[path[-1]] = value
        return body


def _maybe(strategy: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return st.one_of(st.just(KEEP), strategy)


DOSE_INPUT_MUTATIONS = st.builds(
    DoseInputs,
    weight=_maybe(WEIGHT_QUANTITIES),
    weight_status=_maybe(STATUSES),
    scr=_maybe(SCR_QUANTITIES),
    scr_status=_maybe(STATUSES),
    birth_date=_maybe(BIRTH_DATES),
    gender=_maybe(GENDERS),
)


def _latest_usable(observation: dict[str, Any]) -> bool:
    status = observation.get("status")
    if _ignored(status):
        return False
    return not (status == "preliminary" and not any(key.startswith("value") for key in observation))


def expected_regimen(body: dict[str, Any]) -> tuple[float, int, float, str] | str:
    """The exact induction regimen, or why there is none ("pediatric" / "missing").

    The latest usable Observation decides: when its value is unusable (no number, unknown unit,
    outside the plausible range) the dose is not computed, even if an older one would do.
    """
    patient = body["prefetch"]["patient"]
    age = age_on(parse_birth_date(patient.get("birthDate")), TODAY)
    if age is not None and age < 18:
        return "pediatric"
    weight_obs = get(body, WEIGHT)
    weight = quantity_value(weight_obs.get("valueQuantity"), WEIGHT_KG) if _latest_usable(weight_obs) else None
    scr_obs = get(body, SCR) if _latest_usable(get(body, SCR)) else get(body, SCR_OLD)
    scr = quantity_value(scr_obs.get("valueQuantity"), SCR_MG_DL)
    weight, scr = plausible_weight(weight), plausible_scr(scr)
    if age is None or weight is None or scr is None:
        return "missing"
    return regimen(age, weight, scr, _sex_factor(patient), "induction")


@settings(FUZZ, max_examples=50)
@given(inputs=DOSE_INPUT_MUTATIONS)
def test_dose_follows_the_data_or_is_not_computed(client: FlaskClient, inputs: DoseInputs) -> None:
    body = inputs.apply()
    answer = call(client, encode(body))
    assert answer.status == 200, answer.body
    expected = expected_regimen(body)
    proposed = ganciclovir_regimens(answer.body)
    rules = rule_ids(answer.body)
    event(f"expected {expected}")
    if expected == "pediatric":
        assert proposed == [], (inputs, proposed)
        assert "pediatric" in rules, (inputs, rules)
    elif expected == "missing":
        assert proposed == [], f"a ganciclovir dose {proposed} from unusable data: {inputs}"
        assert "dose-missing-data" in rules, (inputs, rules)
        assert any("dose not computed" in card["summary"] for card in answer.body["cards"])
    elif expected == DRAFT_REGIMEN:
        assert proposed == [], (inputs, proposed)
        assert "dose-confirmed-monitoring" in rules, (inputs, rules)
    else:
        assert proposed == [expected], (inputs, proposed, expected)
        assert "dose-adjust" in rules


# --------------------------------------------------------------------------------------------------
# 3. Bytes that are not UTF-8
# --------------------------------------------------------------------------------------------------

BAD_UTF8 = [
    b"\xff",
    b"\xfe\xff",
    b"\x80",
    b"\xc3\x28",  # a lead byte without its continuation
    b"\xe2\x28\xa1",
    b"\xf0\x28\x8c\xbc",
    b"\xc0\xaf",  # overlong "/"
    b"\xed\xa0\x80",  # a UTF-16 surrogate encoded as UTF-8 (CESU-8)
    b"\xf8\x88\x80\x80\x80",  # 5-byte form
    b"\xf4\x90\x80\x80",  # above U+10FFFF
]
BASE_BYTES = encode(BASE)


@settings(FUZZ, max_examples=30)
@given(
    position=st.integers(min_value=0, max_value=len(BASE_BYTES)),
    bad=st.one_of(
        st.sampled_from(BAD_UTF8),
        st.binary(min_size=1, max_size=6).filter(lambda b: not _is_utf8(b)),
    ),
    replace=st.booleans(),
)
def test_non_utf8_body_is_400(client: FlaskClient, position: int, bad: bytes, replace: bool) -> None:
    raw = BASE_BYTES[:position] + bad + BASE_BYTES[position + (len(bad) if replace else 0) :]
    answer = call(client, raw)
    assert answer.status == 400, answer.body


def _is_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def test_other_encodings_are_400(client: FlaskClient) -> None:
    text = json.dumps(copy.deepcopy(BASE) | {"extension": {"note": "µmol/L — ½"}}, ensure_ascii=False)
    for raw in (text.encode("latin-1", errors="replace"), text.encode("utf-16"), text.encode("utf-32")):
        assert call(client, raw).status == 400


# --------------------------------------------------------------------------------------------------
# 4. Inputs that used to break the service, one minimal request each, and their correct answers
# --------------------------------------------------------------------------------------------------


def _with(path: JsonPath, value: Any) -> dict[str, Any]:
    return _set(BASE, path, value)


def _without(path: JsonPath) -> dict[str, Any]:
    return _drop(BASE, path)


def _summaries(body: dict[str, Any]) -> list[str]:
    return [card["summary"] for card in body["cards"]]


def _missing_data_card(body: dict[str, Any]) -> dict[str, Any]:
    (card,) = [c for c in body["cards"] if c["source"].get("topic", {}).get("code") == "dose-missing-data"]
    return dict(card)


@pytest.mark.parametrize("server", ["http://[", "http://[::1", "https://[fe80::1", "http://a:99999999/x"])
def test_malformed_fhir_server_is_412_and_not_contacted(client: FlaskClient, server: str) -> None:
    """A fhirServer that is not a parseable URL is refused by the access policy (was: 500)."""
    body = _without(("prefetch", "labs")) | {"fhirServer": server}
    with responses.RequestsMock(assert_all_requests_are_fired=False) as mock:  # records any attempt
        response = client.post(SELECT_URL, data=encode(body), content_type="application/json")
        assert not mock.calls, [call.request.url for call in mock.calls]
    assert response.status_code == 412
    outcome = response.get_json()
    assert OPERATION_OUTCOME.is_valid(outcome), outcome
    assert outcome["issue"][0]["expression"] == ["fhirServer"]
    assert "not contacted" in outcome["issue"][0]["diagnostics"]


def _conditions_entry(index: int) -> JsonPath:
    return ("prefetch", "conditions", "entry", index, "resource")


ANC: JsonPath = _entry_path("labs", "obs-anc")
CMV_CONDITION = _conditions_entry(0)
VERIFICATION_CODING: JsonPath = (*CMV_CONDITION, "verificationStatus", "coding")
CLINICAL_CODING: JsonPath = (*CMV_CONDITION, "clinicalStatus", "coding")


@pytest.mark.parametrize(
    ("path", "value"),
    [
        pytest.param((*ANC, "status"), [], id="anc-status-list"),
        pytest.param((*ANC, "status"), {"code": "final"}, id="anc-status-object"),
        pytest.param((*ANC, "status"), 42, id="anc-status-number"),
        pytest.param(VERIFICATION_CODING, True, id="condition-verificationStatus-coding-true"),
        pytest.param(VERIFICATION_CODING, 1.5, id="condition-verificationStatus-coding-number"),
        pytest.param(VERIFICATION_CODING, [None, "x", {"code": []}], id="condition-verificationStatus-coding-junk"),
        pytest.param((*CLINICAL_CODING, 0, "code"), {}, id="condition-clinicalStatus-code-object"),
        pytest.param((*CLINICAL_CODING, 0, "code"), ["active"], id="condition-clinicalStatus-code-list"),
        pytest.param(CLINICAL_CODING, -1, id="condition-clinicalStatus-coding-number"),
    ],
)
def test_malformed_status_is_ignored_and_the_dose_card_stands(client: FlaskClient, path: JsonPath, value: Any) -> None:
    """A malformed Observation.status / Condition status coding is ignored (was: 500); the worked example's
    card is unchanged: these resources do not change the ganciclovir dose."""
    answer = call(client, encode(_with(path, value)))
    assert answer.status == 200, answer.body
    assert ganciclovir_regimens(answer.body) == [BASE_REGIMEN]
    assert _summaries(answer.body) == _summaries(call(client, encode(BASE)).body)


@pytest.mark.parametrize(
    ("path", "value", "expected"),
    [
        # The latest weight's status is not a string: the weight Observation is ignored, and it is the only one.
        pytest.param((*WEIGHT, "status"), ["final"], "missing", id="weight-status-list"),
        pytest.param((*WEIGHT, "status"), 7, "missing", id="weight-status-number"),
        # The latest creatinine's is not: that Observation is ignored, the older 1.6 mg/dL one is used.
        pytest.param((*SCR, "status"), {"x": 1}, (200.0, 1, 12.0, "h"), id="creatinine-status-object"),
        pytest.param((*SCR, "status"), ["final"], (200.0, 1, 12.0, "h"), id="creatinine-status-list"),
    ],
)
def test_malformed_dose_input_status_ignores_that_observation(
    client: FlaskClient, path: JsonPath, value: Any, expected: Any
) -> None:
    body = _with(path, value)
    assert expected_regimen(body) == expected  # the oracle agrees
    answer = call(client, encode(body))
    assert answer.status == 200, answer.body
    if expected == "missing":
        assert ganciclovir_regimens(answer.body) == []
        assert _missing_data_card(answer.body)["summary"] == "Ganciclovir dose not computed: missing body weight"
    else:
        assert ganciclovir_regimens(answer.body) == [expected]
        assert "dose-adjust" in rule_ids(answer.body)


CONDITION_CLINICAL = "http://terminology.hl7.org/CodeSystem/condition-clinical"
REFUTED = {"system": "http://terminology.hl7.org/CodeSystem/condition-ver-status", "code": "refuted"}
RESOLVED = {"system": CONDITION_CLINICAL, "code": "resolved"}
DIALYSIS_REGIMEN = (100.0, 3, 1.0, "wk")  # 1.25 mg/kg x 80 kg, 3 times weekly after hemodialysis


def _with_dialysis(clinical: Any = KEEP, verification: Any = KEEP) -> dict[str, Any]:
    """The worked example plus a dialysis-dependence Condition (which changes the dose) with these codings."""
    body = copy.deepcopy(BASE)
    condition: dict[str, Any] = {
        "resourceType": "Condition",
        "id": "cond-dialysis",
        "clinicalStatus": {"coding": [{"system": CONDITION_CLINICAL, "code": "active"}]},
        "code": {"coding": [{"system": "http://snomed.info/sct", "code": "105502003"}]},  # renal dialysis
        "subject": {"reference": f"Patient/{PATIENT_ID}"},
    }
    if clinical is not KEEP:
        condition["clinicalStatus"] = {"coding": clinical}
    if verification is not KEEP:
        condition["verificationStatus"] = {"coding": verification}
    body["prefetch"]["conditions"]["entry"].append({"resource": condition})
    return body


@pytest.mark.parametrize(
    ("clinical", "verification", "expected"),
    [
        pytest.param(KEEP, KEEP, DIALYSIS_REGIMEN, id="dialysis"),
        pytest.param(KEEP, True, DIALYSIS_REGIMEN, id="verification-coding-true-ignored"),
        pytest.param(KEEP, [{"code": {}}, None, 3], DIALYSIS_REGIMEN, id="verification-codings-malformed-ignored"),
        pytest.param([{"code": {}}], KEEP, DIALYSIS_REGIMEN, id="clinical-code-object-ignored"),
        pytest.param(KEEP, [{"code": {}}, REFUTED, None], BASE_REGIMEN, id="refuted-next-to-malformed-counts"),
        pytest.param([{"code": []}, RESOLVED], KEEP, BASE_REGIMEN, id="resolved-next-to-malformed-counts"),
    ],
)
def test_malformed_condition_codings_are_ignored_valid_ones_count(
    client: FlaskClient, clinical: Any, verification: Any, expected: tuple[float, int, float, str]
) -> None:
    """Only the malformed codings are ignored: the Condition is judged on its well-formed ones."""
    body = _with_dialysis(clinical, verification)
    answer = call(client, encode(body))
    assert answer.status == 200, answer.body
    assert ganciclovir_regimens(answer.body) == [expected]
    assert expected in allowed_regimens(candidates(body))  # the property tests' oracle allows it


WEIGHT_VALUE: JsonPath = (*WEIGHT, "valueQuantity", "value")
SCR_VALUE: JsonPath = (*SCR, "valueQuantity", "value")
BIRTH_DATE: JsonPath = (*PATIENT, "birthDate")
TOO_OLD = relative_date(f"$birth-{MAX_PLAUSIBLE_AGE_YEARS + 1}", TODAY)

IMPLAUSIBLE = [
    pytest.param(WEIGHT_VALUE, 1e308, "body weight", id="weight-1e308-kg"),  # was: 500 (OverflowError)
    pytest.param(WEIGHT_VALUE, 1e20, "body weight", id="weight-1e20-kg"),  # was: 500 (orjson integer range)
    pytest.param(WEIGHT_VALUE, 1e15, "body weight", id="weight-1e15-kg"),  # was: 5e15 mg q12h proposed
    pytest.param(WEIGHT_VALUE, 1, "body weight", id="weight-1-kg"),  # was: 0 mg proposed
    pytest.param(WEIGHT_VALUE, PLAUSIBLE_WEIGHT_KG[0] - 0.01, "body weight", id="weight-just-below"),
    pytest.param(WEIGHT_VALUE, PLAUSIBLE_WEIGHT_KG[1] + 0.01, "body weight", id="weight-just-above"),
    pytest.param(SCR_VALUE, 5e-324, "serum creatinine", id="creatinine-5e-324"),  # was: CrCl inf, dosed
    pytest.param(SCR_VALUE, PLAUSIBLE_SCR_MG_DL[0] - 0.01, "serum creatinine", id="creatinine-just-below"),
    pytest.param(SCR_VALUE, PLAUSIBLE_SCR_MG_DL[1] + 0.01, "serum creatinine", id="creatinine-just-above"),
    pytest.param(BIRTH_DATE, "1800-01-01", "age", id="age-over-200"),  # was: CrCl < 0, dosed on the < 10 row
    pytest.param(BIRTH_DATE, TOO_OLD, "age", id="age-just-above"),
]


@pytest.mark.parametrize(("path", "value", "label"), IMPLAUSIBLE)
def test_no_dose_from_implausible_data(client: FlaskClient, path: JsonPath, value: Any, label: str) -> None:
    body = _with(path, value)
    assert expected_regimen(body) == "missing"  # the property tests' oracle agrees
    if path != SCR_VALUE:  # (the older creatinine, 1.6 mg/dL, stays a candidate for the superset oracle)
        assert allowed_regimens(candidates(body)) == set()
    answer = call(client, encode(body))
    assert answer.status == 200, answer.body
    assert ganciclovir_regimens(answer.body) == []
    card = _missing_data_card(answer.body)
    assert card["summary"] == f"Ganciclovir dose not computed: missing {label}"
    assert card["indicator"] == "warning"
    if label != "age":
        assert "outside the plausible range" in card["detail"]


PLAUSIBLE_EDGES = [
    pytest.param(WEIGHT_VALUE, PLAUSIBLE_WEIGHT_KG[0], id="weight-lowest"),
    pytest.param(WEIGHT_VALUE, PLAUSIBLE_WEIGHT_KG[1], id="weight-highest"),
    pytest.param(SCR_VALUE, PLAUSIBLE_SCR_MG_DL[0], id="creatinine-lowest"),
    pytest.param(SCR_VALUE, PLAUSIBLE_SCR_MG_DL[1], id="creatinine-highest"),
    pytest.param(BIRTH_DATE, relative_date(f"$birth-{MAX_PLAUSIBLE_AGE_YEARS}", TODAY), id="age-oldest"),
]


@pytest.mark.parametrize(("path", "value"), PLAUSIBLE_EDGES)
def test_plausible_limits_are_inclusive(client: FlaskClient, path: JsonPath, value: Any) -> None:
    body = _with(path, value)
    expected = expected_regimen(body)
    assert isinstance(expected, tuple), expected
    answer = call(client, encode(body))
    assert answer.status == 200, answer.body
    assert ganciclovir_regimens(answer.body) == ([] if expected == DRAFT_REGIMEN else [expected])
    assert "dose-missing-data" not in rule_ids(answer.body)


def test_patient_id_is_the_fixture_patient() -> None:
    assert BASE["context"]["patientId"] == PATIENT_ID == BASE["prefetch"]["patient"]["id"]
