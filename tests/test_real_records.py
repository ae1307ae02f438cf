"""Clinical safety on records shaped like real ones (what is known outranks what is missing; clinical time
of medications; lab code families; both foscarnet columns; maintenance; the seeds' remaining advice).

Each scenario is one bullet of docs/policy.md or docs/clinical-basis.md; the expected values are computed
by hand here from those documents (and the label tables they cite), not taken from the code.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

import pytest
from clinical_builders import (
    PATIENT_ID,
    by_rule,
    condition,
    day,
    draft,
    medication,
    normal_counts,
    observation,
    patient,
    proposed,
    run,
)

from cards.model import Card

TODAY = dt.date(2026, 11, 22)
RXNORM = "http://www.nlm.nih.gov/research/umls/rxnorm"


def rules_of(cards: list[Card]) -> list[str]:
    return [card.rule_id for card in cards]


def doses(card: Card) -> list[tuple[float, int, float, str]]:
    """(mg, frequency, period, unit) of every MedicationRequest the card's suggestions create or update."""
    found = []
    for suggestion in card.suggestions:
        for action in suggestion.actions:
            resource = action.resource
            if resource and resource["resourceType"] == "MedicationRequest":
                dosage = resource["dosageInstruction"][0]
                repeat = dosage["timing"]["repeat"]
                found.append(
                    (
                        dosage["doseAndRate"][0]["doseQuantity"]["value"],
                        repeat["frequency"],
                        repeat["period"],
                        repeat["periodUnit"],
                    )
                )
    return found


def action_types(card: Card) -> list[list[str]]:
    return [[action.type for action in suggestion.actions] for suggestion in card.suggestions]


def base(
    age: int = 54, sex: str = "male", weight: float | None = 80.0, scr: float | None = 1.0
) -> list[dict[str, Any]]:
    resources = [patient(age, sex, TODAY), *normal_counts(TODAY)]
    if weight is not None:
        resources.append(observation("29463-7", weight, "kg", TODAY))
    if scr is not None:
        resources.append(observation("2160-0", scr, "mg/dL", TODAY))
    return resources


def without(resources: list[dict[str, Any]], loinc: str) -> list[dict[str, Any]]:
    """The resources less the Observations coded ``loinc``."""
    return [
        r for r in resources if not (r["resourceType"] == "Observation" and r["code"]["coding"][0]["code"] == loinc)
    ]


def cidofovir_draft(dose_mg: float | None = 400) -> dict[str, Any]:
    return draft("cidofovir", "199388", dose_mg=dose_mg, route="IV", frequency=1, period=1, period_unit="wk")


# --- what is known outranks what is missing (policy §Precedence) ------------------------------------------------


def test_cidofovir_with_high_creatinine_and_no_urine_protein_is_contraindicated() -> None:
    """SCr 1.8 > 1.5 proves the exclusion; the missing urine protein is named on the same card."""
    cards = run([cidofovir_draft()], base(scr=1.8), TODAY)
    card = cards[0]
    assert card.rule_id == "cidofovir-contraindicated"
    assert card.indicator == "critical"
    assert "serum creatinine 1.80 mg/dL > 1.5 mg/dL" in card.detail
    assert "urine protein" in card.detail.lower()
    assert "dose-missing-data" not in rules_of(cards)
    assert action_types(card)[0] == ["delete"]
    assert not any(doses(c) for c in cards)  # no cidofovir (and nothing else) dosed


def test_cidofovir_with_crcl_40_and_no_urine_protein_is_contraindicated() -> None:
    """Age 54, 40 kg, SCr 1.2 → CrCl (140−54)×40/(72×1.2) = 39.8 mL/min ≤ 55."""
    cards = run([cidofovir_draft()], base(weight=40.0, scr=1.2), TODAY)
    card = cards[0]
    assert card.rule_id == "cidofovir-contraindicated"
    assert "CrCl 39.8 mL/min ≤ 55 mL/min" in card.detail


def test_myelosuppression_without_weight_names_the_alternative_and_removes_the_draft() -> None:
    """ANC 300 proves the exclusion; foscarnet cannot be dosed without a weight, and the card says so."""
    resources = [*without(base(weight=None), "751-8"), observation("751-8", 300, "/uL", TODAY)]
    cards = run([draft("ganciclovir", "310442", dose_mg=400, route="IV")], resources, TODAY)
    card = cards[0]
    assert card.rule_id == "myelosuppression"
    assert card.indicator == "critical"
    assert "foscarnet" in card.summary.lower()
    assert "body weight" in card.detail
    assert ["delete"] in action_types(card)
    assert not doses(card)  # nothing is dosed without a weight


# --- clinical time of medications (policy §Clinical time) --------------------------------------------------------


def test_nephrotoxic_drug_stopped_without_end_date_counts_for_the_seven_day_lookback() -> None:
    """IV amphotericin B ordered 6 days ago, now stopped with no end date: exposure from its start (6 days ago)."""
    ampho = medication("amphotericin B 50 mg IV", TODAY, started_days_ago=6, status="stopped", route="IV")
    resources = [*base(), observation("2888-6", 20, "mg/dL", TODAY), ampho]
    cards = run([cidofovir_draft()], resources, TODAY)
    card = cards[0]
    assert card.rule_id == "cidofovir-contraindicated"
    assert "nephrotoxic" in card.detail
    assert "cidofovir-probenecid-hydration" not in rules_of(cards)


def test_nephrotoxic_drug_stopped_eight_days_ago_does_not_bar_cidofovir() -> None:
    ampho = medication("amphotericin B 50 mg IV", TODAY, started_days_ago=20, status="stopped", ended_days_ago=8)
    resources = [*base(), observation("2888-6", 20, "mg/dL", TODAY), ampho]
    assert "cidofovir-contraindicated" not in rules_of(run([cidofovir_draft()], resources, TODAY))


def completed_induction(days: int = 21, ended_days_ago: int = 1) -> dict[str, Any]:
    """A valganciclovir 900 mg twice-daily induction order that is now completed."""
    order = medication(
        "valganciclovir 450 mg tablet", TODAY, started_days_ago=days + ended_days_ago, status="completed", route="oral"
    )
    repeat = order["dosageInstruction"][0]["timing"]["repeat"]
    repeat["boundsDuration"] = {"value": days, "unit": "days", "system": "http://unitsofmeasure.org", "code": "d"}
    return order


def undetectable_viral_load(days_ago: int = 2) -> dict[str, Any]:
    return observation("72493-0", None, "", TODAY, days_ago=days_ago, valueString="Not detected")


def test_maintenance_after_a_completed_valganciclovir_induction_is_confirmed() -> None:
    """Seed cmv-treatment-immunocompetent: 900 mg twice daily for 21 days, followed by 900 mg once daily."""
    resources = [*base(), completed_induction(), undetectable_viral_load()]
    maintenance = draft("valganciclovir", "313566", dose_mg=900, route="oral", frequency=1, period=1, period_unit="d")
    cards = run([maintenance], resources, TODAY)
    assert rules_of(cards)[0] == "dose-confirmed-monitoring"
    assert "dose-adjust" not in rules_of(cards)
    assert "maintenance" in cards[0].detail.lower()


def test_valganciclovir_twice_daily_is_still_corrected_when_the_viral_load_is_detectable() -> None:
    detectable = observation("72493-0", 2000, "[IU]/mL", TODAY, days_ago=2)
    resources = [*base(), completed_induction(), detectable]
    maintenance = draft("valganciclovir", "313566", dose_mg=900, route="oral", frequency=1, period=1, period_unit="d")
    cards = run([maintenance], resources, TODAY)
    card = by_rule(cards, "dose-adjust")
    assert doses(card) == [(900, 2, 1, "d")]  # induction continues: 900 mg twice daily


def test_ganciclovir_maintenance_after_fourteen_days_of_iv_induction() -> None:
    """IV ganciclovir for 16 days (active), viral load now undetectable → 5 mg/kg once daily = 400 mg q24h."""
    gcv = medication("ganciclovir 400 mg IV", TODAY, started_days_ago=16, route="IV")
    resources = [*base(), gcv, undetectable_viral_load()]
    selected = draft("ganciclovir", "310442", route="IV")
    cards = run([selected], resources, TODAY)
    card = by_rule(cards, "dose-adjust")
    assert doses(card) == [(400, 1, 24, "h")]


# --- lab code families (policy §Lab code families) ---------------------------------------------------------------


def test_recent_blood_creatinine_wins_over_an_older_serum_creatinine() -> None:
    """Blood creatinine (LOINC 38483-4) 2.2 mg/dL today vs serum 0.8 three days ago: CrCl uses 2.2 →
    (140−54)×80/(72×2.2) = 43.4 mL/min → 2.5 mg/kg q24h = 200 mg."""
    resources = [
        *base(scr=None),
        observation("2160-0", 0.8, "mg/dL", TODAY, days_ago=3),
        observation("38483-4", 2.2, "mg/dL", TODAY, days_ago=0),
    ]
    cards = run([draft("ganciclovir", "310442", route="IV")], resources, TODAY)
    card = by_rule(cards, "dose-adjust")
    assert doses(card) == [(200, 1, 24, "h")]
    assert "38483-4" in card.detail
    assert "blood" in card.detail.lower()


@pytest.mark.parametrize("loinc", ["14682-9", "77140-2"])
def test_molar_creatinine_codes_are_read(loinc: str) -> None:
    """88.4 µmol/L = 1.0 mg/dL → CrCl 95.6 → 5 mg/kg q12h = 400 mg."""
    resources = [*base(scr=None), observation(loinc, 88.4, "umol/L", TODAY)]
    cards = run([draft("ganciclovir", "310442", route="IV")], resources, TODAY)
    assert doses(by_rule(cards, "dose-adjust")) == [(400, 1, 12, "h")]


def strip(value: str) -> dict[str, Any]:
    return observation("5804-0", None, "", TODAY, valueCodeableConcept={"text": value})


@pytest.mark.parametrize(
    ("reading", "contraindicated"), [("2+", True), ("3+", True), ("1+", False), ("Negative", False)]
)
def test_urine_protein_by_test_strip(reading: str, contraindicated: bool) -> None:
    """Cidofovir limit: urine protein ≥ 100 mg/dL or test strip 2+ or more."""
    cards = run([cidofovir_draft()], [*base(), strip(reading)], TODAY)
    assert ("cidofovir-contraindicated" in rules_of(cards)) is contraindicated
    if not contraindicated:
        assert "dose-missing-data" not in rules_of(cards)


def test_urine_protein_test_strip_in_mg_per_dl() -> None:
    cards = run([cidofovir_draft()], [*base(), observation("5804-0", 100, "mg/dL", TODAY)], TODAY)
    assert "cidofovir-contraindicated" in rules_of(cards)


@pytest.mark.parametrize(("loinc", "value", "unit"), [("26499-4", 300, "/uL"), ("753-4", 0.3, "10*3/uL")])
def test_neutrophil_counts_in_other_loinc_forms(loinc: str, value: float, unit: str) -> None:
    resources = [*without(base(), "751-8"), observation(loinc, value, unit, TODAY, days_ago=0)]
    cards = run([draft("ganciclovir", "310442", route="IV")], resources, TODAY)
    card = by_rule(cards, "myelosuppression")
    assert loinc in card.detail


# --- both foscarnet columns (policy §Foscarnet columns) --------------------------------------------------------


def foscarnet_draft(mg: float, every_hours: int) -> dict[str, Any]:
    return draft("foscarnet", "1734377", dose_mg=mg, route="IV", frequency=1, period=every_hours, period_unit="h")


def test_foscarnet_60_mg_per_kg_every_8_hours_is_confirmed() -> None:
    """Age 54, SCr 0.8 → (140−54)/(72×0.8) = 1.49 mL/min/kg > 1.4: 60 mg/kg q8h column = 4800 mg q8h (80 kg)."""
    cards = run([foscarnet_draft(4800, 8)], base(scr=0.8), TODAY)
    assert rules_of(cards)[0] == "dose-confirmed-monitoring"
    assert "60 mg/kg" in cards[0].detail


def test_foscarnet_90_mg_per_kg_every_12_hours_is_confirmed() -> None:
    cards = run([foscarnet_draft(7200, 12)], base(scr=0.8), TODAY)
    assert rules_of(cards)[0] == "dose-confirmed-monitoring"


def test_a_foscarnet_draft_matching_neither_column_gets_the_90_column() -> None:
    cards = run([foscarnet_draft(5000, 12)], base(scr=0.8), TODAY)
    card = by_rule(cards, "dose-adjust")
    assert doses(card) == [(7200, 1, 12, "h")]
    assert "60 mg/kg every 8 hours" in card.detail  # the other column is named


# --- the seeds' remaining advice ------------------------------------------------------------------------------


def test_reduce_immunosuppression_whenever_an_immunosuppressant_is_active() -> None:
    """Seed cmv-treatment-disseminated: in transplant recipients and HIV patients, discontinuation of
    immunosuppressive therapy should be considered when possible (no severity needed)."""
    resources = [
        *base(),
        condition("Kidney transplant recipient", TODAY, snomed="161663000"),
        medication("tacrolimus 2 mg", TODAY, started_days_ago=200, route="oral"),
    ]
    cards = run(
        [draft("ganciclovir", "310442", dose_mg=400, route="IV", frequency=1, period=12, period_unit="h")],
        resources,
        TODAY,
    )
    card = by_rule(cards, "reduce-immunosuppression")
    assert card.indicator == "info"
    assert "tacrolimus" in card.detail


def test_cmv_associated_dic_gets_the_plasma_exchange_card() -> None:
    resources = [
        *base(),
        condition("CMV infection", TODAY, snomed="28944009"),
        condition("Disseminated intravascular coagulation", TODAY, snomed="67406007"),
    ]
    cards = run(
        [draft("ganciclovir", "310442", dose_mg=400, route="IV", frequency=1, period=12, period_unit="h")],
        resources,
        TODAY,
    )
    card = by_rule(cards, "plasma-exchange-dic")
    assert card.indicator == "info"
    assert "plasma exchange" in card.detail.lower()
    assert not card.suggestions


def test_progression_in_severe_disease_names_combination_therapy() -> None:
    """On IV ganciclovir 20 days, viral load 5,000 → 24,500, severe disease → the resistance card also names
    ganciclovir + foscarnet combination (seed cmv-treatment-disseminated, pitfalls)."""
    resources = [
        *base(),
        condition("CMV disease", TODAY, snomed="28944009", severity="severe"),
        medication("ganciclovir 400 mg IV", TODAY, started_days_ago=20, route="IV"),
        observation("72493-0", 5000, "[IU]/mL", TODAY, days_ago=21),
        observation("72493-0", 24500, "[IU]/mL", TODAY, days_ago=1),
    ]
    cards = run([draft("ganciclovir", "310442", route="IV")], resources, TODAY)
    card = by_rule(cards, "resistance")
    assert "combination" in card.detail.lower()


# --- an invalid draft dose ------------------------------------------------------------------------------------


@pytest.mark.parametrize("dose", [-5, 0])
def test_zero_or_negative_draft_dose_is_an_invalid_dose(dose: float) -> None:
    cards = run(
        [draft("ganciclovir", "310442", dose_mg=dose, route="IV", frequency=1, period=12, period_unit="h")],
        base(),
        TODAY,
    )
    card = by_rule(cards, "dose-adjust")
    assert f"dose {dose} mg" not in card.detail
    assert "not a valid dose" in card.detail
    assert doses(card) == [(400, 1, 12, "h")]


# --- citations a reader can follow -----------------------------------------------------------------------------


def test_cards_cite_public_sources_not_private_files() -> None:
    resources = [
        *base(),
        condition("CMV pneumonitis", TODAY, severity="severe"),
        condition("HIV infection", TODAY, snomed="86406008"),
        medication("mycophenolate mofetil 1 g", TODAY, started_days_ago=30),
    ]
    for selected in (
        draft("ganciclovir", "310442", route="IV"),
        draft("valganciclovir", "313566", route="oral"),
        foscarnet_draft(5000, 12),
        cidofovir_draft(),
    ):
        for card in run([selected], resources, TODAY):
            text = card.detail + card.summary + card.source.label
            assert "clinical.md" not in text, card.rule_id
            assert "policy.md" not in text.replace("docs/policy.md", ""), card.rule_id
            for suggestion in card.suggestions:
                for action in suggestion.actions:
                    for note in (action.resource or {}).get("note", []):
                        assert "clinical.md" not in note["text"]


def test_patient_id_is_the_subject() -> None:
    cards = run([draft("ganciclovir", "310442", route="IV")], base(), TODAY)
    (resource,) = proposed(cards[0])
    assert resource["subject"] == {"reference": f"Patient/{PATIENT_ID}"}
    assert day(TODAY, 0) == TODAY.isoformat()


def test_valganciclovir_maintenance_after_iv_ganciclovir_then_oral_induction() -> None:
    """IV ganciclovir 7 days (completed), then valganciclovir 10 days (completed yesterday): one 17-day course of
    the same therapy, CMV DNA undetectable → valganciclovir 900 mg once daily is confirmed."""
    iv = medication("ganciclovir 400 mg IV", TODAY, started_days_ago=18, status="completed", route="IV")
    iv["dosageInstruction"][0]["timing"]["repeat"]["boundsPeriod"]["end"] = day(TODAY, 12)
    oral = completed_induction(days=10, ended_days_ago=1)
    maintenance = draft("valganciclovir", "313566", dose_mg=900, route="oral", frequency=1, period=1, period_unit="d")
    cards = run([maintenance], [*base(), iv, oral, undetectable_viral_load()], TODAY)
    assert rules_of(cards)[0] == "dose-confirmed-monitoring"
    assert "induction complete: 17 days" in cards[0].detail


def test_a_cancelled_order_is_not_a_course_of_therapy() -> None:
    cancelled = completed_induction(days=21)
    cancelled["status"] = "cancelled"
    del cancelled["dosageInstruction"][0]["timing"]["repeat"]["boundsDuration"]
    maintenance = draft("valganciclovir", "313566", dose_mg=900, route="oral", frequency=1, period=1, period_unit="d")
    cards = run([maintenance], [*base(), cancelled, undetectable_viral_load()], TODAY)
    assert doses(by_rule(cards, "dose-adjust")) == [(900, 2, 1, "d")]


def test_log10_viral_load_reported_under_the_iu_code_is_read_as_log10() -> None:
    """Some laboratories report log10 IU/mL under 72493-0: 5.4 log → 251,189 IU/mL ≥ 100,000 → no oral start."""
    log_result = observation("72493-0", 5.4, "log10 IU/mL", TODAY)
    cards = run([draft("valganciclovir", "313566", route="oral")], [*base(), log_result], TODAY)
    card = by_rule(cards, "valganciclovir-to-iv")
    assert "251,189 IU/mL" in card.detail


def test_test_strip_graded_by_snomed_answer_code() -> None:
    coded = observation(
        "20454-5",
        None,
        "",
        TODAY,
        valueCodeableConcept={"coding": [{"system": "http://snomed.info/sct", "code": "167276005"}]},
    )
    cards = run([cidofovir_draft()], [*base(), coded], TODAY)
    assert "urine protein 2+ (test strip) ≥ 100 mg/dL" in by_rule(cards, "cidofovir-contraindicated").detail


def test_the_prefetch_templates_ask_for_the_whole_families() -> None:
    """One query per key still; the labs query names every code of the creatinine, counts and urine-protein families."""
    from service.registry import prefetch_templates

    (labs,) = [t.query for t in prefetch_templates() if t.key == "labs"]
    for code in ("2160-0", "38483-4", "14682-9", "77140-2", "21232-4", "5804-0", "20454-5", "26499-4", "753-4"):
        assert f"http://loinc.org|{code}" in labs, code
    (loads,) = [t.query for t in prefetch_templates() if t.key == "cmvViralLoads"]
    assert "http://loinc.org|72494-8" in loads
