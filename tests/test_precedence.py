"""Precedence (docs/policy.md §10): every exclusion the available data proves wins over every missing input it
does not need, for every drug it concerns. Walks the exclusion rows of the precedence table itself, so a new
exclusion without a proof here fails."""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from typing import Any

import pytest
from clinical_builders import condition, draft, medication, normal_counts, observation, patient, run

from cards.dosing import Drug
from cards.rules.precedence import PRECEDENCE, RuleClass

TODAY = dt.date(2026, 11, 22)
Resources = list[dict[str, Any]]

# A draft of each drug at its label dose for the complete record below (each is dose-checked when no rule excludes it).
DRAFT_DOSES: dict[Drug, tuple[str, float, str, int, float, str]] = {
    "ganciclovir": ("310442", 400, "IV", 1, 12, "h"),
    "valganciclovir": ("313566", 900, "oral", 2, 1, "d"),
    "foscarnet": ("1734377", 7200, "IV", 1, 12, "h"),
    "cidofovir": ("199388", 400, "IV", 1, 1, "wk"),
}


def selected(drug: Drug) -> dict[str, Any]:
    rxnorm, mg, route, frequency, period, unit = DRAFT_DOSES[drug]
    return draft(drug, rxnorm, dose_mg=mg, route=route, frequency=frequency, period=period, period_unit=unit)


def _loinc(resource: dict[str, Any]) -> str | None:
    codings = resource.get("code", {}).get("coding", [])
    return codings[0]["code"] if resource["resourceType"] == "Observation" and codings else None


def complete_record(age: int = 54) -> Resources:
    """Everything every drug's dose needs, in range: 80 kg, SCr 1.0, normal counts, urine protein 20 mg/dL."""
    return [
        patient(age, "female", TODAY),
        *normal_counts(TODAY),
        observation("29463-7", 80.0, "kg", TODAY),
        observation("2160-0", 1.0, "mg/dL", TODAY),
        observation("2888-6", 20, "mg/dL", TODAY),
    ]


def replace(resources: Resources, loinc: str, new: dict[str, Any]) -> Resources:
    return [*(r for r in resources if _loinc(r) != loinc), new]


# The inputs a dose can lack: how to take each away from a record.
MISSING: dict[str, Callable[[Resources], Resources]] = {
    "nothing": lambda rs: rs,  # each proof also on the complete record
    "body weight": lambda rs: [r for r in rs if _loinc(r) != "29463-7"],
    "serum creatinine": lambda rs: [r for r in rs if _loinc(r) != "2160-0"],
    "age": lambda rs: [{**r, "birthDate": None} if r["resourceType"] == "Patient" else r for r in rs],
    "urine protein": lambda rs: [r for r in rs if _loinc(r) != "2888-6"],
}


# Each exclusion, the ways the data can prove it, and the inputs each proof needs.
PROOFS: dict[str, list[tuple[str, Callable[[Resources], Resources], frozenset[str]]]] = {
    "pediatric": [
        ("age 15", lambda rs: [patient(15, "female", TODAY) if r["resourceType"] == "Patient" else r for r in rs],
         frozenset({"age"})),
    ],
    "myelosuppression": [
        ("ANC 300/µL", lambda rs: replace(rs, "751-8", observation("751-8", 300, "/uL", TODAY)), frozenset()),
        ("platelets 20,000/µL", lambda rs: replace(rs, "777-3", observation("777-3", 20, "10*3/uL", TODAY)),
         frozenset()),
        ("hemoglobin 7.5 g/dL", lambda rs: replace(rs, "718-7", observation("718-7", 7.5, "g/dL", TODAY)),
         frozenset()),
    ],
    "valganciclovir-not-recommended": [
        ("dialysis", lambda rs: [*rs, condition("ESRD on hemodialysis", TODAY, snomed="105502003")], frozenset()),
        ("CrCl 8 mL/min", lambda rs: replace(rs, "2160-0", observation("2160-0", 9.0, "mg/dL", TODAY)),
         frozenset({"body weight", "serum creatinine", "age"})),
    ],
    "foscarnet-not-recommended": [
        ("dialysis", lambda rs: [*rs, condition("ESRD on hemodialysis", TODAY, snomed="105502003")], frozenset()),
        # (140 − 54) × 0.85 / (72 × 3.0) = 0.34 mL/min/kg: the per-kilogram form needs no weight.
        ("CrCl 0.34 mL/min/kg", lambda rs: replace(rs, "2160-0", observation("2160-0", 3.0, "mg/dL", TODAY)),
         frozenset({"serum creatinine", "age"})),
    ],
    "cidofovir-contraindicated": [
        ("SCr 1.8", lambda rs: replace(rs, "2160-0", observation("2160-0", 1.8, "mg/dL", TODAY)),
         frozenset({"serum creatinine"})),
        # (140 − 54) × 40 × 0.85 / (72 × 1.0) = 40.6 mL/min ≤ 55
        ("CrCl 41 mL/min", lambda rs: replace(rs, "29463-7", observation("29463-7", 40.0, "kg", TODAY)),
         frozenset({"body weight", "serum creatinine", "age"})),
        ("urine protein 2+", lambda rs: replace(rs, "2888-6", observation(
            "5804-0", None, "", TODAY, valueCodeableConcept={"text": "2+"})), frozenset({"urine protein"})),
        ("amphotericin B stopped 3 days ago", lambda rs: [*rs, medication(
            "amphotericin B 50 mg IV", TODAY, started_days_ago=3, status="stopped", route="IV")], frozenset()),
        ("dialysis", lambda rs: [*rs, condition("ESRD on hemodialysis", TODAY, snomed="105502003")], frozenset()),
    ],
    "pregnancy": [
        ("positive hCG", lambda rs: [*rs, observation(
            "2106-3", None, "", TODAY, days_ago=3, valueCodeableConcept={"text": "Positive"})], frozenset()),
    ],
}  # fmt: skip

EXCLUSIONS = [rule for rule in PRECEDENCE if rule.rule_class == RuleClass.EXCLUSION]


def test_every_exclusion_of_the_table_has_its_proofs_here() -> None:
    assert {rule.rule_ids[0] for rule in EXCLUSIONS} == set(PROOFS)


CASES = [
    pytest.param(rule.rule_ids[0], drug, proof, prove, missing, id=f"{rule.rule_ids[0]}-{drug}-{proof}-no {missing}")
    for rule in EXCLUSIONS
    for drug in sorted(rule.drugs)
    for proof, prove, needs in PROOFS[rule.rule_ids[0]]
    for missing in MISSING
    if missing not in needs and (missing != "urine protein" or drug == "cidofovir")
]


@pytest.mark.parametrize(("rule_id", "drug", "proof", "prove", "missing"), CASES)
def test_a_proven_exclusion_wins_over_a_missing_input(
    rule_id: str, drug: Drug, proof: str, prove: Callable[[Resources], Resources], missing: str
) -> None:
    resources = MISSING[missing](prove(complete_record()))
    cards = run([selected(drug)], resources, TODAY)
    rules = [card.rule_id for card in cards]
    assert rule_id in rules, (proof, missing, rules)
    card = next(card for card in cards if card.rule_id == rule_id)
    assert card.indicator == ("info" if rule_id == "pediatric" else "critical")
    if rule_id != "pregnancy":  # pregnancy is reported beside the dose, not instead of it
        assert "dose-missing-data" not in rules, (proof, missing, rules)
        assert not any(
            action.type in ("create", "update")
            and (action.resource or {}).get("medicationCodeableConcept", {}).get("text") == drug
            for c in cards
            for suggestion in c.suggestions
            for action in suggestion.actions
        ), "the excluded drug must not be proposed"
    if rule_id not in ("pediatric", "pregnancy"):
        assert ["delete"] in [[action.type for action in s.actions][:1] for s in card.suggestions]


def test_the_walk_covers_every_pair() -> None:
    """6 exclusions × their drugs × their proofs × the inputs those proofs do not need (counted by hand)."""
    assert len(CASES) == 59 + 22  # and each of the 22 (proof, drug) pairs on the complete record
