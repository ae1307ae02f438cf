"""Cockcroft-Gault, dosing weight, and how facts are read from FHIR (docs/policy.md §2, §3)."""

from __future__ import annotations

import datetime as dt
from typing import Any

import pytest
from clinical_builders import condition, medication, observation, patient

from cards.facts import Measurement, Unusable, build_facts
from cards.renal import cockcroft_gault, dosing_weight

TODAY = dt.date(2026, 11, 22)


@pytest.mark.parametrize(
    ("age", "weight", "scr", "sex", "ml_min", "basis"),
    [
        (60, 80.0, 1.0, "male", 80 * 80 / 72, "male"),  # (140−60)×80/(72×1.0) = 88.89
        (60, 80.0, 1.0, "female", 80 * 80 / 72 * 0.85, "female"),  # × 0.85
        (60, 80.0, 1.0, "unknown", 80 * 80 / 72 * 0.85, "lower of male and female"),  # docs/policy.md §4
        (60, 80.0, 1.0, "other", 80 * 80 / 72 * 0.85, "lower of male and female"),
        (40, 70.0, 2.0, "male", 100 * 70 / 144, "male"),
    ],
)
def test_cockcroft_gault(age: int, weight: float, scr: float, sex: Any, ml_min: float, basis: str) -> None:
    clearance = cockcroft_gault(age, weight, scr, sex)
    assert clearance.ml_min == pytest.approx(ml_min)
    assert clearance.ml_min_kg == pytest.approx(ml_min / weight)  # the foscarnet per-kg form
    assert clearance.sex_basis == basis


def test_dosing_weight_actual_by_default() -> None:
    assert dosing_weight(120.0, 170.0, "male", "actual").kg == 120.0


def test_adjusted_weight_when_bmi_30_or_more() -> None:
    """docs/policy.md §4 option: Devine IBW 50 + 2.3 × (in − 60); AdjBW = IBW + 0.4 × (TBW − IBW)."""
    height_cm = 177.8  # 70 in
    ibw = 50 + 2.3 * (70 - 60)  # 73 kg
    result = dosing_weight(120.0, height_cm, "male", "adjusted")  # BMI 38
    assert result.kg == pytest.approx(ibw + 0.4 * (120 - ibw))
    assert "adjusted" in result.basis
    female = dosing_weight(120.0, height_cm, "female", "adjusted")
    assert female.kg == pytest.approx(45.5 + 2.3 * 10 + 0.4 * (120 - (45.5 + 2.3 * 10)))


def test_adjusted_weight_not_used_below_bmi_30_or_without_height() -> None:
    assert dosing_weight(70.0, 177.8, "male", "adjusted").kg == 70.0  # BMI 22
    no_height = dosing_weight(120.0, None, "male", "adjusted")
    assert no_height.kg == 120.0
    assert "needs a height" in no_height.basis


def _facts(resources: list[dict[str, Any]]) -> Any:
    return build_facts([patient(50, "female", TODAY), *resources], [], "pat-t", TODAY)


def test_latest_value_wins_and_keeps_date_and_source() -> None:
    old = observation("2160-0", 2.0, "mg/dL", TODAY, days_ago=5)
    new = observation("2160-0", 1.1, "mg/dL", TODAY, days_ago=1)
    facts = _facts([new, old])
    assert isinstance(facts.creatinine, Measurement)
    assert facts.creatinine.value == 1.1
    assert facts.creatinine.source == f"Observation/{new['id']}"
    assert facts.creatinine.date == TODAY - dt.timedelta(days=1)


@pytest.mark.parametrize("status", ["entered-in-error", "cancelled"])
def test_ignored_statuses(status: str) -> None:
    good = observation("2160-0", 1.1, "mg/dL", TODAY, days_ago=3)
    bad = observation("2160-0", 5.0, "mg/dL", TODAY, days_ago=1, status=status)
    facts = _facts([good, bad])
    assert isinstance(facts.creatinine, Measurement)
    assert facts.creatinine.value == 1.1


def test_preliminary_without_value_is_ignored_but_with_value_is_used() -> None:
    empty = observation("2160-0", None, "mg/dL", TODAY, days_ago=0, status="preliminary")
    prelim = observation("2160-0", 1.4, "mg/dL", TODAY, days_ago=1, status="preliminary")
    facts = _facts([empty, prelim])
    assert isinstance(facts.creatinine, Measurement)
    assert facts.creatinine.value == 1.4


@pytest.mark.parametrize(
    ("name", "loinc", "value", "unit", "expected"),
    [
        ("creatinine", "2160-0", 106.08, "umol/L", 1.2),  # ÷ 88.4
        ("weight", "29463-7", 176.37, "[lb_av]", 80.0),
        ("weight", "29463-7", 80000, "g", 80.0),
        ("anc", "751-8", 1.5, "10*3/uL", 1500.0),
        ("anc", "751-8", 1.5, "10*9/L", 1500.0),
        ("platelets", "777-3", 150000, "/uL", 150000.0),
        ("hemoglobin", "718-7", 95, "g/L", 9.5),
    ],
)
def test_unit_conversion(name: str, loinc: str, value: float, unit: str, expected: float) -> None:
    facts = _facts([observation(loinc, value, unit, TODAY)])
    measured = getattr(facts, name)
    assert isinstance(measured, Measurement)
    assert measured.value == pytest.approx(expected, rel=1e-3)


@pytest.mark.parametrize(("loinc", "unit"), [("2160-0", "mmol/L"), ("29463-7", "stone"), ("718-7", "mmol/L")])
def test_unknown_unit_is_unusable_not_guessed(loinc: str, unit: str) -> None:
    facts = _facts([observation(loinc, 1.0, unit, TODAY)])
    value = {"2160-0": facts.creatinine, "29463-7": facts.weight, "718-7": facts.hemoglobin}[loinc]
    assert isinstance(value, Unusable)
    assert unit in value.reason


@pytest.mark.parametrize(
    ("loinc", "days_ago", "stale"),
    [("2160-0", 7, False), ("2160-0", 8, True), ("29463-7", 30, False), ("29463-7", 31, True), ("751-8", 8, True)],
)
def test_freshness_windows(loinc: str, days_ago: int, stale: bool) -> None:
    """docs/policy.md §2: creatinine 7 days, counts 7 days, weight 30 days."""
    unit = {"2160-0": "mg/dL", "29463-7": "kg", "751-8": "/uL"}[loinc]
    value = {"2160-0": 1.0, "29463-7": 70.0, "751-8": 2000.0}[loinc]
    facts = _facts([observation(loinc, value, unit, TODAY, days_ago=days_ago)])
    value = {"2160-0": facts.creatinine, "29463-7": facts.weight, "751-8": facts.anc}[loinc]
    assert isinstance(value, Measurement)
    assert value.stale is stale


@pytest.mark.parametrize(
    ("text", "snomed", "manifestation"),
    [
        ("CMV pneumonitis", None, "pneumonitis"),
        ("Cytomegaloviral pneumonia", "7678002", "pneumonitis"),
        ("CMV retinitis, left eye", None, "retinitis"),
        ("Retinitis", "22455005", "retinitis"),
        ("CMV colitis", None, "gastrointestinal"),
        ("Cytomegalovirus esophagitis", None, "gastrointestinal"),
        ("CMV encephalitis", None, "cns"),
        ("CMV ventriculitis", None, "cns"),
        ("CMV hepatitis", None, "hepatitis"),
    ],
)
def test_manifestations_by_code_and_text(text: str, snomed: str | None, manifestation: str) -> None:
    facts = _facts([condition(text, TODAY, snomed=snomed)])
    assert manifestation in facts.manifestations


@pytest.mark.parametrize("text", ["Ulcerative colitis", "Viral encephalitis", "Bacterial pneumonia"])
def test_non_cmv_conditions_are_not_cmv_manifestations(text: str) -> None:
    assert _facts([condition(text, TODAY)]).manifestations == {}


@pytest.mark.parametrize(
    ("text", "field"),
    [
        ("HIV negative", "hiv"),
        ("Not pregnant", "pregnancy"),
        ("Pre-dialysis CKD stage 4", "dialysis"),
        ("Kidney transplant donor", "transplant"),
        ("CMV IgG positive (serostatus)", "manifestations"),
    ],
)
def test_negated_wording_is_not_a_finding(text: str, field: str) -> None:
    value = getattr(_facts([condition(text, TODAY)]), field)
    assert not value


def test_resolved_condition_is_ignored() -> None:
    facts = _facts([condition("End stage renal disease on hemodialysis", TODAY, snomed="105502003", status="resolved")])
    assert facts.dialysis is None


def test_pregnancy_from_positive_hcg_within_30_days() -> None:
    positive = observation("2106-3", None, "", TODAY, days_ago=10, valueCodeableConcept={"text": "Positive"})
    assert _facts([positive]).pregnancy is not None
    old = observation("2106-3", None, "", TODAY, days_ago=31, valueCodeableConcept={"text": "Positive"})
    assert _facts([old]).pregnancy is None
    negative_later = observation("2106-3", None, "", TODAY, days_ago=2, valueCodeableConcept={"text": "Negative"})
    assert _facts([positive, negative_later]).pregnancy is None


def test_viral_load_series_units_and_undetectable() -> None:
    facts = _facts(
        [
            observation("72493-0", 12000, "[IU]/mL", TODAY, days_ago=20),
            observation("100676-6", 3.0, "{log_IU}/mL", TODAY, days_ago=10),  # log10 → 1000 IU/mL
            observation("72493-0", None, "", TODAY, days_ago=1, valueString="Not detected"),
        ]
    )
    loads = facts.viral_loads
    assert [v.iu_per_ml for v in loads[:2]] == [12000, pytest.approx(1000)]
    assert loads[-1].undetectable


def test_malformed_resources_do_not_raise() -> None:
    junk: list[Any] = [
        {"resourceType": "Observation", "id": "x1", "status": "final", "code": "nope", "effectiveDateTime": 5},
        {
            "resourceType": "Observation",
            "id": "x2",
            "status": "final",
            "code": {"coding": [{"system": "http://loinc.org", "code": "2160-0"}]},
            "effectiveDateTime": "yesterday",
            "valueQuantity": {"value": "abc"},
        },
        {"resourceType": "Condition", "id": "x3", "code": {"coding": "CMV"}, "clinicalStatus": "active"},
        {"resourceType": "MedicationRequest", "id": "x4", "status": 7, "medicationCodeableConcept": []},
        "not a resource",
    ]
    facts = build_facts([patient(50, "male", TODAY), *junk], [], "pat-t", TODAY)
    assert facts.creatinine is None
    assert facts.age_years == 50


def test_medications_classified_with_start_and_route() -> None:
    gcv = medication("ganciclovir 500 mg IV", TODAY, started_days_ago=5, route="IV")
    stopped = medication("vancomycin 1 g IV", TODAY, status="stopped", started_days_ago=20, ended_days_ago=3)
    facts = _facts([gcv, stopped])
    (ganciclovir,) = facts.medications_in("Ganciclovir")
    assert ganciclovir.start == TODAY - dt.timedelta(days=5)
    assert ganciclovir.route == "iv"
    assert facts.medications_in("NephrotoxicDrugs") == []  # stopped 3 days ago: not active today
    assert any("NephrotoxicDrugs" in m.sets for m in facts.medications)


@pytest.mark.parametrize(
    ("loinc", "value", "unit", "usable"),
    [
        ("29463-7", 10.0, "kg", True),
        ("29463-7", 9.99, "kg", False),
        ("29463-7", 500.0, "kg", True),
        ("29463-7", 1e15, "kg", False),
        ("2160-0", 0.1, "mg/dL", True),
        ("2160-0", 0.09, "mg/dL", False),
        ("2160-0", 25.0, "mg/dL", True),
        ("2160-0", 5e-324, "mg/dL", False),
    ],
)
def test_implausible_values_are_unusable(loinc: str, value: float, unit: str, usable: bool) -> None:
    """Product safety limits (cards.facts.PLAUSIBLE): a mistyped value must not become a dose."""
    facts = _facts([observation(loinc, value, unit, TODAY)])
    measured = facts.weight if loinc == "29463-7" else facts.creatinine
    assert isinstance(measured, Measurement) is usable
    if not usable:
        assert isinstance(measured, Unusable)
        assert "plausible range" in measured.reason


def test_implausible_age_is_unknown() -> None:
    facts = build_facts([patient(126, "male", TODAY)], [], "pat-t", TODAY)
    assert facts.age_years is None
    assert build_facts([patient(125, "male", TODAY)], [], "pat-t", TODAY).age_years == 125


def test_latest_value_by_time_of_day_not_only_date() -> None:
    """docs/policy.md §2: most recent by effectiveDateTime; two results on one day → the later one, whatever
    order the server lists them in."""
    yesterday = TODAY - dt.timedelta(days=1)
    evening = observation("2160-0", 2.0, "mg/dL", TODAY, effectiveDateTime=f"{yesterday}T18:00:00Z")
    morning = observation("2160-0", 1.0, "mg/dL", TODAY, effectiveDateTime=f"{yesterday}T06:00:00Z")
    for order in ([evening, morning], [morning, evening]):
        facts = _facts(order)
        assert isinstance(facts.creatinine, Measurement)
        assert facts.creatinine.value == 2.0
