"""Edges of real records found in review: sentinel dates, orders known only by their validity period, stopped and
cancelled orders, orders without ids, local routes, and resistance reports that name the mutations they did not find.

Expected values are computed by hand from docs/policy.md and the label tables it cites.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

import pytest
from clinical_builders import by_rule, condition, draft, medication, observation, run
from test_real_records import (
    TODAY,
    base,
    cidofovir_draft,
    completed_induction,
    doses,
    rules_of,
    undetectable_viral_load,
)


def maintenance_draft() -> dict[str, Any]:
    return draft("valganciclovir", "313566", dose_mg=900, route="oral", frequency=1, period=1, period_unit="d")


def genotype_report(report: str) -> dict[str, Any]:
    """A CMV UL97/UL54 genotype observation, named by text only, whose result is the free-text ``report``."""
    return observation("", None, "", TODAY, valueString=report, code={"text": "CMV UL97/UL54 genotype"})


def induction_order(days_ago_start: int, **changes: Any) -> dict[str, Any]:
    """Valganciclovir 900 mg twice daily, started ``days_ago_start`` days ago (fields overridden by ``changes``)."""
    order = medication("valganciclovir 450 mg tablet", TODAY, started_days_ago=days_ago_start, route="oral")
    order.update(changes)
    return order


# --- dates that leave the calendar ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "repeat",
    [
        {"boundsPeriod": {"start": "9999-12-31"}, "boundsDuration": {"value": 21, "unit": "d", "code": "d"}},
        {"boundsPeriod": {"start": "2026-01-01"}, "boundsDuration": {"value": 1e12, "unit": "d", "code": "d"}},
        {"boundsDuration": {"value": 9e15, "unit": "a", "code": "a"}},
    ],
)
def test_a_duration_past_the_calendar_does_not_break_the_call(repeat: dict[str, Any]) -> None:
    """A sentinel start date or an absurd duration is read as an unknown end; the dose card is still written:
    80 kg, CrCl (140−54)×80/(72×1.0) = 95.6 mL/min → 5 mg/kg q12h = 400 mg."""
    odd = medication("ganciclovir 400 mg IV", TODAY, route="IV")
    odd["dosageInstruction"][0]["timing"]["repeat"] = repeat
    cards = run([draft("ganciclovir", "310442", route="IV")], [*base(), odd], TODAY)
    assert doses(by_rule(cards, "dose-adjust"))[0][:2] == (400, 1)


# --- when an order started and whether it was given (docs/policy.md §7, §8) -----------------------------------


def test_an_order_known_only_by_its_validity_period_starts_there() -> None:
    """No authoredOn, no bounds: dispenseRequest.validityPeriod 22 days ago → yesterday is a 21-day induction given,
    so with CMV DNA undetectable the 900 mg once-daily maintenance draft is confirmed."""
    order = completed_induction()
    del order["authoredOn"]
    del order["dosageInstruction"][0]["timing"]["repeat"]["boundsPeriod"]
    del order["dosageInstruction"][0]["timing"]["repeat"]["boundsDuration"]
    order["dispenseRequest"] = {
        "validityPeriod": {
            "start": (TODAY - dt.timedelta(days=22)).isoformat(),
            "end": (TODAY - dt.timedelta(days=1)).isoformat(),
        }
    }
    cards = run([maintenance_draft()], [*base(), order, undetectable_viral_load()], TODAY)
    assert rules_of(cards)[0] == "dose-confirmed-monitoring"


def test_a_stopped_order_whose_planned_end_is_ahead_counts_to_its_start_only() -> None:
    """Stopped, planned to end in 5 days: when it stopped is unknown, so no 21 days of induction are proven and the
    maintenance draft is corrected back to induction, 900 mg twice daily."""
    order = induction_order(22, status="stopped")
    order["dosageInstruction"][0]["timing"]["repeat"]["boundsPeriod"]["end"] = (
        TODAY + dt.timedelta(days=5)
    ).isoformat()
    cards = run([maintenance_draft()], [*base(), order, undetectable_viral_load()], TODAY)
    assert doses(by_rule(cards, "dose-adjust")) == [(900, 2, 1, "d")]


@pytest.mark.parametrize("status", ["draft", "cancelled", "entered-in-error"])
def test_an_order_never_carried_out_is_not_therapy_given(status: str) -> None:
    """A 21-day course in an order that was a draft, cancelled or entered in error proves no induction."""
    order = completed_induction()
    order["status"] = status
    cards = run([maintenance_draft()], [*base(), order, undetectable_viral_load()], TODAY)
    assert doses(by_rule(cards, "dose-adjust")) == [(900, 2, 1, "d")]


def test_orders_without_ids_are_each_read() -> None:
    """Two id-less orders: the amphotericin B given 3 days ago bars cidofovir even though an id-less older order
    of the same drug comes after it in the bundle."""
    recent = medication("amphotericin B 50 mg IV", TODAY, started_days_ago=3, status="completed", route="IV")
    old = medication("amphotericin B 50 mg IV", TODAY, started_days_ago=60, status="completed", ended_days_ago=50)
    for order in (recent, old):
        del order["id"]
    resources = [*base(), observation("2888-6", 20, "mg/dL", TODAY), recent, old]
    assert rules_of(run([cidofovir_draft()], resources, TODAY))[0] == "cidofovir-contraindicated"


# --- local routes are not systemic therapy ---------------------------------------------------------------------


def test_ganciclovir_eye_gel_is_not_a_course_of_iv_ganciclovir() -> None:
    """Ganciclovir 0.15% ophthalmic gel for 20 days: no IV course, so the IV draft is dosed for induction
    (5 mg/kg q12h = 400 mg), not for maintenance, and no resistance is suspected."""
    gel = medication("ganciclovir 0.15% ophthalmic gel", TODAY, started_days_ago=20, route="ophthalmic")
    cards = run([draft("ganciclovir", "310442", route="IV")], [*base(), gel, undetectable_viral_load()], TODAY)
    assert doses(by_rule(cards, "dose-adjust")) == [(400, 1, 12, "h")]
    assert "resistance" not in rules_of(cards)


@pytest.mark.parametrize(
    ("text", "route", "suggested"),
    [("tacrolimus 0.1% ointment", "topical", False), ("tacrolimus 1 mg capsule", "sublingual", True)],
)
def test_only_systemic_immunosuppression_is_considered_for_reduction(text: str, route: str, suggested: bool) -> None:
    drug = medication(text, TODAY, started_days_ago=100, route=route)
    cards = run([draft("ganciclovir", "310442", route="IV")], [*base(), drug], TODAY)
    assert ("reduce-immunosuppression" in rules_of(cards)) is suggested


# --- resistance reports ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("report", "suspected"),
    [
        ("UL97 M460V detected", True),
        ("No resistance mutations detected (UL97 M460V, A594V, L595S screened)", False),
        ("UL97/UL54: wild type", False),
        ("Mutation not found: C603W", False),
    ],
)
def test_a_resistance_report_of_none_found_is_not_resistance(report: str, suspected: bool) -> None:
    genotype = genotype_report(report)
    cards = run([draft("ganciclovir", "310442", route="IV")], [*base(), genotype], TODAY)
    assert ("resistance" in rules_of(cards)) is suspected


# --- completed induction needs a current result (docs/policy.md §8) --------------------------------------------


@pytest.mark.parametrize(("result_days_ago", "maintenance"), [(14, True), (15, False)])
def test_completed_induction_needs_an_undetectable_result_from_the_last_14_days(
    result_days_ago: int, maintenance: bool
) -> None:
    """A 21-day induction ended yesterday; the undetectable result must be at most 14 days old."""
    resources = [*base(), completed_induction(), undetectable_viral_load(days_ago=result_days_ago)]
    cards = run([maintenance_draft()], resources, TODAY)
    assert (rules_of(cards)[0] == "dose-confirmed-monitoring") is maintenance
    if not maintenance:
        assert doses(by_rule(cards, "dose-adjust")) == [(900, 2, 1, "d")]


@pytest.mark.parametrize(("days", "maintenance"), [(16, False), (21, True)])
def test_cmv_colitis_induction_is_complete_after_21_days(days: int, maintenance: bool) -> None:
    """CMV GI disease is treated 21–42 days (docs/clinical-basis.md): 16 days of induction are not complete."""
    resources = [*base(), condition("CMV colitis", TODAY), completed_induction(days=days), undetectable_viral_load()]
    cards = run([maintenance_draft()], resources, TODAY)
    assert ("dose-adjust" not in rules_of(cards)) is maintenance


@pytest.mark.parametrize(
    ("text", "maintenance"),
    [
        ("900 mg once daily (maintenance)", True),
        ("not maintenance", False),
        ("do not start maintenance yet", False),
        ("Maintenance when PCR is undetectable", False),
    ],
)
def test_a_draft_says_maintenance_only_when_nothing_says_induction_first(text: str, maintenance: bool) -> None:
    """No course on record: the draft's own words decide. Maintenance → 900 mg once daily is confirmed; a text that
    begins with induction → corrected to 900 mg twice daily."""
    selected = draft(
        "valganciclovir", "313566", dose_mg=900, route="oral", frequency=1, period=1, period_unit="d", text=text
    )
    cards = run([selected], base(), TODAY)
    if maintenance:
        assert "dose-adjust" not in rules_of(cards)
    else:
        assert doses(by_rule(cards, "dose-adjust")) == [(900, 2, 1, "d")]


# --- results reported as a bound (Quantity.comparator) --------------------------------------------------------


def bound(loinc: str, comparator: str, value: float, unit: str) -> dict[str, Any]:
    result = observation(loinc, value, unit, TODAY)
    result["valueQuantity"]["comparator"] = comparator
    return result


def gcv_draft() -> dict[str, Any]:
    return draft("ganciclovir", "310442", dose_mg=400, route="IV", frequency=1, period=12, period_unit="h")


def test_a_neutrophil_count_below_a_bound_under_500_is_myelosuppression() -> None:
    resources = [*without_code(base(), "751-8"), bound("751-8", "<", 100, "/uL")]
    card = run([gcv_draft()], resources, TODAY)[0]
    assert card.rule_id == "myelosuppression"
    assert "ANC < 100 cells/µL < 500" in card.detail


def test_a_neutrophil_count_bound_that_leaves_500_open_is_named_and_reordered() -> None:
    """ "< 600": the count may or may not be below 500 — not myelosuppression, not a guess: the dose card names it and
    offers the counts now."""
    resources = [*without_code(base(), "751-8"), bound("751-8", "<", 600, "/uL")]
    cards = run([gcv_draft()], resources, TODAY)
    assert "myelosuppression" not in rules_of(cards)
    card = by_rule(cards, "dose-confirmed-monitoring")
    assert "does not say whether it is below 500" in card.detail
    assert card.suggestions[0].label == "Order blood counts now"
    (action,) = card.suggestions[0].actions
    assert action.resource is not None
    assert action.resource["code"]["coding"][0]["code"] == "751-8"


def test_a_creatinine_bound_cannot_dose_and_says_so() -> None:
    resources = [*without_code(base(), "2160-0"), bound("2160-0", "<", 0.3, "mg/dL")]
    card = run([gcv_draft()], resources, TODAY)[0]
    assert card.rule_id == "dose-missing-data"
    assert "is a bound, '< 0.3 mg/dL', not a value" in card.detail


def test_a_creatinine_above_a_bound_over_1_5_still_bars_cidofovir() -> None:
    resources = [*without_code(base(), "2160-0"), bound("2160-0", ">", 2.0, "mg/dL")]
    card = run([cidofovir_draft()], resources, TODAY)[0]
    assert card.rule_id == "cidofovir-contraindicated"
    assert "serum creatinine > 2.00 mg/dL > 1.5 mg/dL" in card.detail


@pytest.mark.parametrize(
    ("comparator", "value", "expected"),
    [("<", 30, "met"), (">=", 100, "failed"), (">", 300, "failed"), ("<=", 150, "open")],
)
def test_urine_protein_bounds_against_the_cidofovir_limit(comparator: str, value: float, expected: str) -> None:
    """Cidofovir needs urine protein < 100 mg/dL: "< 30" meets it, "≥ 100" fails it, "≤ 150" leaves it open."""
    cards = run([cidofovir_draft()], [*base(), bound("2888-6", comparator, value, "mg/dL")], TODAY)
    if expected == "failed":
        assert f"urine protein {comparator} {value:g} mg/dL ≥ 100 mg/dL" in cards[0].detail
    elif expected == "met":
        assert "cidofovir-contraindicated" not in rules_of(cards)
        assert "dose-missing-data" not in rules_of(cards)
    else:
        card = by_rule(cards, "dose-missing-data")
        assert "does not say whether it is below 100 mg/dL" in card.detail


def without_code(resources: list[dict[str, Any]], loinc: str) -> list[dict[str, Any]]:
    return [
        r for r in resources if not (r["resourceType"] == "Observation" and r["code"]["coding"][0]["code"] == loinc)
    ]


# --- units as laboratories print them --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "unit"), [(88.4, "µmol/L"), (88.4, "μmol/L"), (88.4, "umol/L"), (10, "mg/L"), (1.0, "mg / dL")]
)
def test_creatinine_units_as_printed(value: float, unit: str) -> None:
    """All are 1.0 mg/dL: CrCl (140−54)×80/(72×1.0) = 95.6 mL/min → 5 mg/kg q12h = 400 mg."""
    scr = observation("2160-0", value, unit, TODAY)
    scr["valueQuantity"].pop("code")
    cards = run([draft("ganciclovir", "310442", route="IV")], [*base(scr=None), scr], TODAY)
    assert doses(by_rule(cards, "dose-adjust")) == [(400, 1, 12, "h")]


@pytest.mark.parametrize("unit", ["x10E3/uL", "10^3/µL", "×10^9/L", "10*9/L", "K/uL", "thou/uL"])
def test_count_units_as_printed(unit: str) -> None:
    """ANC 0.3 thousand per µL = 300 cells/µL < 500: myelosuppression."""
    anc = observation("751-8", 0.3, unit, TODAY)
    anc["valueQuantity"].pop("code")
    card = run([gcv_draft()], [*without_code(base(), "751-8"), anc], TODAY)[0]
    assert card.rule_id == "myelosuppression"
    assert "ANC 300 cells/µL" in card.detail


# --- blood counts not known today (docs/policy.md §9) ------------------------------------------------------------


@pytest.mark.parametrize(("counts_days_ago", "reason"), [(None, "no result on record"), (10, "10 days old")])
def test_the_ganciclovir_dose_card_names_unknown_counts_and_orders_them(
    counts_days_ago: int | None, reason: str
) -> None:
    resources = [
        r
        for r in base()
        if r["resourceType"] != "Observation" or r["code"]["coding"][0]["code"] not in ("751-8", "777-3", "718-7")
    ]
    if counts_days_ago is not None:
        resources += [
            observation(code, value, unit, TODAY, days_ago=counts_days_ago)
            for code, value, unit in (("751-8", 3000, "/uL"), ("777-3", 200000, "/uL"), ("718-7", 12.0, "g/dL"))
        ]
    card = by_rule(run([draft("ganciclovir", "310442", route="IV")], resources, TODAY), "dose-adjust")
    assert "**Blood counts not known**" in card.detail
    assert card.detail.count(reason) == 3
    orders = [s for s in card.suggestions if s.label == "Order blood counts now"]
    assert len(orders) == 1
    codes = sorted(a.resource["code"]["coding"][0]["code"] for a in orders[0].actions if a.resource)
    assert codes == ["718-7", "751-8", "777-3"]


# --- CNS disease: the combination keeps what can be proposed (docs/policy.md §9) -------------------------------


def cns() -> dict[str, Any]:
    return condition("CMV encephalitis", TODAY)


def cns_card(selected: dict[str, Any], resources: list[dict[str, Any]]) -> Any:
    cards = run([selected], [*resources, cns()], TODAY)
    assert rules_of(cards)[0] == "cns-combination"
    return cards[0]


def test_cns_with_a_foscarnet_draft_on_the_60_column_adds_ganciclovir_only() -> None:
    """SCr 0.8: foscarnet 60 mg/kg q8h = 4800 mg (80 kg) is a label column: it is not rewritten to 90 q12h;
    ganciclovir 5 mg/kg q12h = 400 mg (CrCl 119 mL/min) is created beside it."""
    foscarnet = draft("foscarnet", "1734377", dose_mg=4800, route="IV", frequency=1, period=8, period_unit="h")
    card = cns_card(foscarnet, base(scr=0.8))
    assert card.suggestions[0].label == "Ganciclovir + foscarnet (combination)"
    assert [a.type for a in card.suggestions[0].actions] == ["create"]
    assert doses(card) == [(400, 1, 12, "h")]
    assert "fits as written" in card.detail


def test_cns_with_foscarnet_not_recommended_still_corrects_the_ganciclovir_draft() -> None:
    """Age 54, 80 kg, SCr 12 → CrCl (140−54)×80/(72×12) = 7.96 mL/min = 0.0995 mL/min/kg < 0.4: foscarnet is not
    recommended; ganciclovir's < 10 mL/min row is 1.25 mg/kg three times a week = 100 mg, and the 400 mg q12h
    draft is corrected to it on this card."""
    gcv = draft("ganciclovir", "310442", dose_mg=400, route="IV", frequency=1, period=12, period_unit="h")
    card = cns_card(gcv, base(scr=12.0))
    assert card.summary.endswith("not proposed: foscarnet (not recommended)")
    assert "**Foscarnet is not recommended:**" in card.detail
    assert [a.type for a in card.suggestions[0].actions] == ["update"]
    assert card.suggestions[0].label == "Ganciclovir"
    assert doses(card) == [(100, 3, 1, "wk")]


def test_cns_with_no_weight_names_both_drugs_and_proposes_none() -> None:
    gcv = draft("ganciclovir", "310442", dose_mg=400, route="IV", frequency=1, period=12, period_unit="h")
    card = cns_card(gcv, base(weight=None))
    assert "ganciclovir (data missing), foscarnet (data missing)" in card.summary
    assert card.detail.count("body weight") >= 2
    assert not doses(card)


def test_cns_with_a_fitting_ganciclovir_draft_creates_foscarnet() -> None:
    """SCr 1.0: ganciclovir 400 mg q12h fits (CrCl 95.6 mL/min); foscarnet at 95.6/80 = 1.19 mL/min/kg is in the
    > 1.0–1.4 band: 70 mg/kg q12h = 5600 mg."""
    gcv = draft("ganciclovir", "310442", dose_mg=400, route="IV", frequency=1, period=12, period_unit="h")
    card = cns_card(gcv, base())
    assert card.summary == "CNS CMV disease: give IV ganciclovir plus IV foscarnet together"
    assert [a.type for a in card.suggestions[0].actions] == ["create"]
    assert doses(card) == [(5600, 1, 12, "h")]


# --- urine protein as laboratories write it, within the label's 48 hours (docs/policy.md §2, §5) -------------


@pytest.mark.parametrize(
    ("text", "contraindicated"),
    [
        ("2+ (100 mg/dL)", True),
        ("+2", True),
        ("+++", True),
        (">=300 mg/dL", True),
        ("≥ 100 mg/dL", True),
        ("1+ (30 mg/dL)", False),
        ("30 mg/dL", False),
        ("< 30 mg/dL", False),
        ("0.2 g/L", False),
    ],
)
def test_urine_protein_text_results(text: str, contraindicated: bool) -> None:
    result = observation("5804-0", None, "", TODAY, valueString=text)
    cards = run([cidofovir_draft()], [*base(), result], TODAY)
    assert ("cidofovir-contraindicated" in rules_of(cards)) is contraindicated
    if not contraindicated:
        assert "dose-missing-data" not in rules_of(cards)


def test_a_bare_number_without_a_unit_is_not_read_as_urine_protein() -> None:
    """docs/policy.md §3: an unknown unit is missing, never guessed."""
    result = observation("5804-0", None, "", TODAY, valueString="30")
    card = run([cidofovir_draft()], [*base(), result], TODAY)[0]
    assert card.rule_id == "dose-missing-data"
    assert "urine protein" in card.detail


@pytest.mark.parametrize(("days_ago", "repeat"), [(0, False), (1, False), (2, True)])
def test_cidofovir_labs_older_than_48_hours_are_repeated(days_ago: int, repeat: bool) -> None:
    """Creatinine and urine protein within 48 h before each cidofovir dose (label). Dated results: yesterday's is
    within 48 hours at any hour today; one from the day before may be up to 72 hours old, so it is stale — used,
    flagged, and both repeats are offered."""
    resources = [
        *without_code(base(scr=None), "2888-6"),
        observation("2160-0", 1.0, "mg/dL", TODAY, days_ago=days_ago),
        observation("2888-6", 10, "mg/dL", TODAY, days_ago=days_ago),
    ]
    cards = run([cidofovir_draft(dose_mg=None)], resources, TODAY)
    card = by_rule(cards, "dose-adjust")
    labels = [s.label for s in card.suggestions]
    assert any(label.startswith("Repeat serum creatinine") for label in labels) is repeat
    assert any(label.startswith("Repeat urine protein") for label in labels) is repeat
    if repeat:
        assert "window 1 day," in card.detail


# --- CMV DNA results: specimen, named-only results, implausible values (docs/policy.md §3, §11) ----------------


def test_a_cmv_dna_result_in_lavage_is_not_the_blood_viral_load() -> None:
    """After a completed induction, blood CMV DNA 2,000 IU/mL 3 days ago; today's BAL 'Not detected' (specimen
    bronchoalveolar lavage) does not make the blood undetectable: induction continues, 900 mg twice daily."""
    blood = observation("72493-0", 2000, "[IU]/mL", TODAY, days_ago=3)
    lavage = undetectable_viral_load(days_ago=0)
    lavage["specimen"] = {"display": "Bronchoalveolar lavage fluid"}
    cards = run([maintenance_draft()], [*base(), completed_induction(), blood, lavage], TODAY)
    assert doses(by_rule(cards, "dose-adjust")) == [(900, 2, 1, "d")]


def test_a_named_cmv_dna_result_in_copies_is_read_by_its_unit() -> None:
    """No LOINC coding, 'CMV DNA PCR' 5,000 copies/mL after an earlier undetectable result: detectable, so the
    completed course does not move to maintenance."""
    named = observation("", 5000, "copies/mL", TODAY, days_ago=0, code={"text": "CMV DNA PCR, plasma"})
    resources = [*base(), completed_induction(), undetectable_viral_load(days_ago=3), named]
    cards = run([maintenance_draft()], resources, TODAY)
    assert doses(by_rule(cards, "dose-adjust")) == [(900, 2, 1, "d")]


@pytest.mark.parametrize(("value", "to_iv"), [(2e5, True), (5e12, False)])
def test_a_viral_load_beyond_any_assay_is_a_data_error(value: float, to_iv: bool) -> None:
    """≥ 10^12 IU/mL is implausible (docs/policy.md §3): it does not steer oral valganciclovir to IV."""
    load = observation("72493-0", value, "[IU]/mL", TODAY)
    cards = run([draft("valganciclovir", "313566", route="oral")], [*base(), load], TODAY)
    assert ("valganciclovir-to-iv" in rules_of(cards)) is to_iv


# --- drafts of this ordering session (order-sign selects every draft) -----------------------------------------


def test_an_older_probenecid_order_does_not_stand_in_for_the_cidofovir_regimen() -> None:
    """Probenecid 500 mg twice daily for gout is active: the cidofovir card still proposes 2 g before and 1 g at 2 h
    and 8 h after each dose (label); a probenecid drafted in this session (in the context or prefetched as a draft)
    leaves only the saline prehydration to propose."""
    gout = medication("probenecid 500 mg tablet", TODAY, started_days_ago=200, route="oral")
    cards = run([cidofovir_draft()], [*base(), observation("2888-6", 10, "mg/dL", TODAY), gout], TODAY)
    (probenecid, _saline) = by_rule(cards, "cidofovir-probenecid-hydration").suggestions[0].actions
    assert probenecid.resource is not None
    assert [d["doseAndRate"][0]["doseQuantity"]["value"] for d in probenecid.resource["dosageInstruction"]] == [
        2000,
        1000,
        1000,
    ]
    drafted = draft("probenecid", None, dose_mg=2000, route="oral", draft_id="draft-prob")
    drafted["medicationCodeableConcept"] = {"text": "probenecid 500 mg tablet"}
    prefetched = medication("probenecid 500 mg tablet", TODAY, started_days_ago=0, status="draft", route="oral")
    for selected, others, extra in (
        ([cidofovir_draft()], [drafted], []),
        ([cidofovir_draft(), drafted], [], []),
        ([cidofovir_draft()], [], [prefetched]),
    ):
        resources = [*base(), observation("2888-6", 10, "mg/dL", TODAY), *extra]
        card = by_rule(run(selected, resources, TODAY, others=others), "cidofovir-probenecid-hydration")
        assert card.suggestions[0].label == "Order saline prehydration with each cidofovir dose"
        (action,) = card.suggestions[0].actions
        assert action.resource is not None
        assert action.resource["dosageInstruction"][0]["doseAndRate"][0]["doseQuantity"]["value"] == 1000


def test_an_interacting_draft_signed_with_ganciclovir_is_read() -> None:
    """order-sign selects every draft: imipenem-cilastatin signed with ganciclovir gets the interaction card
    (label: seizures)."""
    imipenem = draft("imipenem-cilastatin 500 mg IV", None, route="IV", draft_id="draft-imi")
    cards = run([gcv_draft(), imipenem], base(), TODAY)
    assert "imipenem" in by_rule(cards, "interactions").detail.lower()


@pytest.mark.parametrize(("ended_days_ago", "barred"), [(6, True), (7, False)])
def test_a_nephrotoxic_drug_discontinued_seven_days_before_allows_cidofovir(ended_days_ago: int, barred: bool) -> None:
    """Label: nephrotoxic agents "must be discontinued at least seven days prior to starting" cidofovir."""
    ampho = medication(
        "amphotericin B 50 mg IV", TODAY, started_days_ago=20, status="stopped", ended_days_ago=ended_days_ago
    )
    resources = [*base(), observation("2888-6", 20, "mg/dL", TODAY), ampho]
    assert ("cidofovir-contraindicated" in rules_of(run([cidofovir_draft()], resources, TODAY))) is barred


# --- second review: what real orders and reports say ------------------------------------------------------------


def test_two_orders_started_the_same_day_are_read() -> None:
    """An ongoing IV ganciclovir order and a completed one, both started 5 days ago (a same-day dose change):
    no error, the dose card is written (5 mg/kg q12h = 400 mg)."""
    ongoing = medication("ganciclovir 400 mg IV", TODAY, started_days_ago=5, route="IV")
    changed = medication("ganciclovir 500 mg IV", TODAY, started_days_ago=5, status="completed", route="IV")
    changed["dosageInstruction"][0]["timing"]["repeat"]["boundsPeriod"]["end"] = ongoing["authoredOn"]
    cards = run([draft("ganciclovir", "310442", route="IV")], [*base(), ongoing, changed], TODAY)
    assert doses(by_rule(cards, "dose-adjust")) == [(400, 1, 12, "h")]


@pytest.mark.parametrize(
    "instructions",
    [
        "for CMV retinitis of the left eye",
        "if BP drops slow the rate",
        "Rinse line with NS before and after",
        "hazardous drug: avoid contact with skin",
    ],
)
def test_an_iv_order_whose_instructions_name_a_body_part_is_still_iv(instructions: str) -> None:
    """The route is IV: words in the instructions do not make it a local form (docs/policy.md §7)."""
    selected = draft("ganciclovir", "310442", dose_mg=500, route="IV", frequency=1, period=12, period_unit="h")
    selected["dosageInstruction"][0]["text"] = instructions
    cards = run([selected], base(), TODAY)
    assert doses(by_rule(cards, "dose-adjust")) == [(400, 1, 12, "h")]


@pytest.mark.parametrize("route", ["IVPB", "IV piggyback", "IV push"])
def test_iv_route_spellings(route: str) -> None:
    selected = draft("ganciclovir", "310442", dose_mg=500, route=route, frequency=1, period=12, period_unit="h")
    assert doses(by_rule(run([selected], base(), TODAY), "dose-adjust")) == [(400, 1, 12, "h")]


def test_a_ganciclovir_draft_named_as_an_eye_gel_is_not_systemic_therapy() -> None:
    """No route yet, but the medication is 'ganciclovir 0.15% ophthalmic gel': not this service's concern."""
    assert run([draft("ganciclovir 0.15% ophthalmic gel")], base(), TODAY) == []


def test_oral_tacrolimus_with_skin_advice_is_still_immunosuppression() -> None:
    tacrolimus = medication("tacrolimus 1 mg capsule", TODAY, started_days_ago=100, route="oral")
    tacrolimus["dosageInstruction"][0]["text"] = "1 mg twice daily; protect skin from sun"
    cards = run([gcv_draft()], [*base(), tacrolimus], TODAY)
    assert "reduce-immunosuppression" in rules_of(cards)


@pytest.mark.parametrize(("text", "route", "barred"), [
    ("tobramycin 0.3% eye drops", "ophthalmic", False),
    ("cyclosporine 0.05% ophthalmic emulsion", "ophthalmic", False),
    ("tobramycin 80 mg", "IV", True),
])  # fmt: skip
def test_a_local_form_of_a_nephrotoxic_drug_does_not_bar_cidofovir(text: str, route: str, barred: bool) -> None:
    drug = medication(text, TODAY, started_days_ago=2, route=route)
    cards = run([cidofovir_draft()], [*base(), observation("2888-6", 10, "mg/dL", TODAY), drug], TODAY)
    assert (rules_of(cards)[0] == "cidofovir-contraindicated") is barred


@pytest.mark.parametrize(
    "report",
    [
        "UL97 M460V mutation detected. UL54: no mutations detected.",
        "UL97: A594V detected; UL54: wild type",
        "M460V detected; no other resistance mutations identified",
    ],
)
def test_a_mutation_reported_beside_a_gene_with_none_found_is_resistance(report: str) -> None:
    genotype = genotype_report(report)
    cards = run([gcv_draft()], [*base(), genotype], TODAY)
    assert "resistance" in rules_of(cards)


def test_a_genotype_report_is_not_a_viral_load() -> None:
    """'CMV DNA UL97/UL54 genotype: No resistance mutations detected' today, blood CMV DNA 5,000 IU/mL 5 days ago:
    the blood is not undetectable, so the completed course stays on induction (900 mg twice daily)."""
    genotype = observation(
        "", None, "", TODAY, days_ago=0, valueString="No resistance mutations detected",
        code={"text": "CMV DNA UL97/UL54 genotype"},
    )  # fmt: skip
    blood = observation("72493-0", 5000, "[IU]/mL", TODAY, days_ago=5)
    cards = run([maintenance_draft()], [*base(), completed_induction(), blood, genotype], TODAY)
    assert doses(by_rule(cards, "dose-adjust")) == [(900, 2, 1, "d")]


@pytest.mark.parametrize(
    ("text", "undetectable"),
    [
        ("Detected. No PCR inhibition detected.", False),
        ("Positive, no inhibitors found", False),
        ("Detected; no prior result found for comparison", False),
        ("No CMV DNA detected", True),
        ("<LLOQ", True),
        ("TND", True),
        ("NEG", True),
    ],
)
def test_qualitative_cmv_dna_wording(text: str, undetectable: bool) -> None:
    """After a completed 21-day induction, today's result decides: undetectable → maintenance confirmed;
    detected → induction continues (900 mg twice daily)."""
    result = observation("", None, "", TODAY, days_ago=0, valueString=text, code={"text": "CMV DNA PCR, plasma"})
    cards = run([maintenance_draft()], [*base(), completed_induction(), result], TODAY)
    assert ("dose-adjust" not in rules_of(cards)) is undetectable


@pytest.mark.parametrize(("text", "pregnant"), [("Non-reactive", False), ("Not reactive", False), ("Reactive", True)])
def test_a_non_reactive_hcg_is_not_a_pregnancy(text: str, pregnant: bool) -> None:
    hcg = observation("2106-3", None, "", TODAY, valueString=text)
    cards = run([gcv_draft()], [*base(sex="female"), hcg], TODAY)
    assert ("pregnancy" in rules_of(cards)) is pregnant


@pytest.mark.parametrize(
    "specimen", ["CMV PCR, Spinal Fluid", "CMV PCR, pleural fluid", "CMV PCR, nasopharyngeal swab"]
)
def test_cmv_dna_in_other_fluids_is_not_the_blood_viral_load(specimen: str) -> None:
    blood = observation("72493-0", 5000, "[IU]/mL", TODAY, days_ago=3)
    other = observation("", None, "", TODAY, days_ago=0, valueString="Not detected", code={"text": specimen})
    cards = run([maintenance_draft()], [*base(), completed_induction(), blood, other], TODAY)
    assert doses(by_rule(cards, "dose-adjust")) == [(900, 2, 1, "d")]


def test_foscarnet_signed_with_cidofovir_bars_it() -> None:
    """order-sign: both drafts are selected; foscarnet is nephrotoxic (label), so cidofovir may not start."""
    foscarnet = draft("foscarnet", "1734377", dose_mg=7200, route="IV", frequency=1, period=12, period_unit="h")
    foscarnet["id"] = "draft-fos"
    cards = run([cidofovir_draft(), foscarnet], [*base(), observation("2888-6", 10, "mg/dL", TODAY)], TODAY)
    card = by_rule(cards, "cidofovir-contraindicated")
    assert "foscarnet" in card.detail


@pytest.mark.parametrize(
    ("text", "maintenance"),
    [
        ("Maintenance dose following completed induction", True),
        ("maintenance after induction", True),
        ("maintenance; check CBC then adjust", True),
        ("Induction complete; maintenance 900 mg daily", True),
        ("Check CBC before first dose. Maintenance 900 mg daily", True),
        ("Draw CBC and creatinine before starting. Maintenance therapy.", True),
    ],
)
def test_maintenance_after_induction_stays_maintenance(text: str, maintenance: bool) -> None:
    selected = draft(
        "valganciclovir", "313566", dose_mg=900, route="oral", frequency=1, period=1, period_unit="d", text=text
    )
    assert ("dose-adjust" not in rules_of(run([selected], base(), TODAY))) is maintenance


def no_counts() -> list[dict[str, Any]]:
    return [
        r
        for r in base()
        if r["resourceType"] != "Observation" or r["code"]["coding"][0]["code"] not in ("751-8", "777-3", "718-7")
    ]


def test_cards_proposing_ganciclovir_instead_name_unknown_counts() -> None:
    """Pneumonitis steers valganciclovir to IV ganciclovir; CNS disease proposes ganciclovir + foscarnet. With no
    counts on record, each card says so and offers them."""
    vgc = draft("valganciclovir", "313566", dose_mg=900, route="oral", frequency=2, period=1, period_unit="d")
    for selected, extra, rule in (
        (vgc, condition("CMV pneumonitis", TODAY), "valganciclovir-to-iv"),
        (gcv_draft(), condition("CMV encephalitis", TODAY), "cns-combination"),
    ):
        card = by_rule(run([selected], [*no_counts(), extra], TODAY), rule)
        assert "**Blood counts not known**" in card.detail, rule
        assert "Order blood counts now" in [s.label for s in card.suggestions], rule


def test_a_completed_order_whose_planned_end_is_ahead_counts_to_its_start() -> None:
    order = induction_order(22, status="completed")
    order["dosageInstruction"][0]["timing"]["repeat"]["boundsPeriod"]["end"] = (
        TODAY + dt.timedelta(days=5)
    ).isoformat()
    cards = run([maintenance_draft()], [*base(), order, undetectable_viral_load()], TODAY)
    assert doses(by_rule(cards, "dose-adjust")) == [(900, 2, 1, "d")]


# --- third review: wording and routes that read the wrong way --------------------------------------------------


@pytest.mark.parametrize(
    ("route", "instructions"),
    [
        ("Per NG tube", "150 mg q12h; instill via NG tube and flush"),
        ("G-tube", "150 mg q12h via G-tube"),
        ("", "150 mg q12h, instill per PEG tube"),
    ],
)
def test_a_drug_given_by_enteral_tube_is_systemic(route: str, instructions: str) -> None:
    """Cyclosporine oral solution (nephrotoxic and an immunosuppressant) by tube, started 2 days ago: systemic
    exposure, so cidofovir is barred and reducing immunosuppression is offered."""
    order = medication("cyclosporine 100 mg/mL oral solution", TODAY, started_days_ago=2, route=route)
    order["dosageInstruction"][0]["text"] = instructions
    cards = run([cidofovir_draft()], [*base(), observation("2888-6", 10, "mg/dL", TODAY), order], TODAY)
    assert rules_of(cards)[0] == "cidofovir-contraindicated"
    assert "reduce-immunosuppression" in rules_of(cards)


def test_eye_drops_instilled_into_the_eye_are_still_local() -> None:
    drops = medication("tobramycin 0.3% solution", TODAY, started_days_ago=2, route="")
    drops["dosageInstruction"][0]["text"] = "Instill 1 drop into both eyes every 4 hours"
    cards = run([cidofovir_draft()], [*base(), observation("2888-6", 10, "mg/dL", TODAY), drops], TODAY)
    assert rules_of(cards)[0] != "cidofovir-contraindicated"


def test_a_valganciclovir_draft_by_feeding_tube_is_not_a_route_change() -> None:
    """Valganciclovir oral solution 900 mg twice daily by NG tube: the induction dose as written is confirmed."""
    selected = draft(
        "valganciclovir", "313566", dose_mg=900, route="per NG tube", frequency=2, period=1, period_unit="d"
    )
    assert "dose-adjust" not in rules_of(run([selected], base(), TODAY))


@pytest.mark.parametrize(
    ("report", "suspected"),
    [
        ("No resistance mutations detected. Mutations screened: UL97 M460V, H520Q, C592G; UL54 A987G.", False),
        ("UL97 M460V detected, UL54 NEG", True),
        ("UL97: M460V detected, UL54: no mutations detected", True),
        ("Mutations detected: UL97 L595S, UL54 none detected", True),
        ("UL54: wild type; UL97 M460V", True),
        ("Not detected: M460V, H520Q", False),
        ("Mutation panel: M460V, H520Q, A594V. Result: M460V detected", True),
    ],
)  # fmt: skip
def test_resistance_reports_read_part_by_part(report: str, suspected: bool) -> None:
    genotype = genotype_report(report)
    cards = run([gcv_draft()], [*base(), genotype], TODAY)
    assert ("resistance" in rules_of(cards)) is suspected


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("CMV DNA genotyping, antiviral resistance", "No resistance mutations detected"),
        ("CMV DNA PCR, plasma", "Wild type, no resistance mutations detected"),
    ],
)
def test_a_genotype_report_named_or_worded_as_one_is_not_a_viral_load(name: str, value: str) -> None:
    """Blood CMV DNA 5,000 IU/mL five days ago after a completed induction; today's genotype report is not an
    undetectable viral load, so induction continues (900 mg twice daily)."""
    genotype = observation("", None, "", TODAY, days_ago=0, valueString=value, code={"text": name})
    blood = observation("72493-0", 5000, "[IU]/mL", TODAY, days_ago=5)
    cards = run([maintenance_draft()], [*base(), completed_induction(), blood, genotype], TODAY)
    assert doses(by_rule(cards, "dose-adjust")) == [(900, 2, 1, "d")]


def test_a_mutation_in_a_genotype_named_by_cmv_and_resistance_is_resistance() -> None:
    genotype = observation(
        "",
        None,
        "",
        TODAY,
        valueString="UL97 M460V detected",
        code={"text": "CMV DNA genotyping, antiviral resistance"},
    )
    assert "resistance" in rules_of(run([gcv_draft()], [*base(), genotype], TODAY))


@pytest.mark.parametrize(("authored_days_ago", "saline_only"), [(0, True), (1, True), (2, False), (60, False)])
def test_a_probenecid_draft_left_from_an_earlier_day_is_not_this_session(
    authored_days_ago: int, saline_only: bool
) -> None:
    left = medication(
        "probenecid 500 mg tablet", TODAY, started_days_ago=authored_days_ago, status="draft", route="oral"
    )
    cards = run([cidofovir_draft()], [*base(), observation("2888-6", 10, "mg/dL", TODAY), left], TODAY)
    labels = [s.label for s in by_rule(cards, "cidofovir-probenecid-hydration").suggestions]
    assert (labels == ["Order saline prehydration with each cidofovir dose"]) is saline_only


# --- fourth review: what the third pass's readings still got wrong --------------------------------------------


def induction_draft(text: str) -> dict[str, Any]:
    return draft(
        "valganciclovir", "313566", dose_mg=900, route="oral", frequency=2, period=1, period_unit="d", text=text
    )


@pytest.mark.parametrize(
    "text",
    [
        "900 mg BID x21d f/b maintenance 900 mg daily",
        "900 mg BID -> maintenance 900 mg daily",
        "Days 1-21: 900 mg BID. Days 22+: maintenance",
        "900 mg BID x21d; maintenance 900 mg daily",
        "Maintenance 900 mg daily, start next week",
        "Do not start maintenance until day 22",
        "Maintenance not yet - induction x21d",
        "Maintenance once PCR undetectable",
    ],
)
def test_an_induction_draft_whose_text_also_names_maintenance_is_confirmed(text: str) -> None:
    """900 mg twice daily as written (the induction regimen), words that name maintenance for later or unclearly:
    the dose as written is not halved."""
    assert "dose-adjust" not in rules_of(run([induction_draft(text)], base(), TODAY))


@pytest.mark.parametrize(
    "text",
    [
        "900 mg twice daily for 21 days, then 900 mg once daily maintenance",
        "induction before maintenance",
        "Induction: 900 mg PO twice daily x 21 days; maintenance 900 mg daily afterwards",
        "Induction dose; maintenance to follow",
        "Induction over 21 days; maintenance 900 mg daily",
        "Induction complete? No. Maintenance later",
    ],
)
def test_a_once_daily_draft_whose_words_also_name_induction_shows_the_induction_dose(text: str) -> None:
    """Written as 900 mg once daily (the maintenance regimen), words naming induction as well, no completed course
    on record: the order as written is kept, and the card names the induction regimen to use if induction is not
    complete (docs/policy.md §1)."""
    selected = draft(
        "valganciclovir", "313566", dose_mg=900, route="oral", frequency=1, period=1, period_unit="d", text=text
    )
    cards = run([selected], base(), TODAY)
    assert "dose-adjust" not in rules_of(cards)
    assert "if induction is not complete, induction is 900 mg PO twice daily" in cards[0].detail


@pytest.mark.parametrize(
    "texts",
    [
        ("Induction: 900 mg PO BID x 21 days", "Maintenance dose: 900 mg once daily"),
        ("900 mg PO BID x 21 days; maintenance 900 mg daily after induction",),
        ("Upon completion of induction, maintenance 900 mg daily",),
        ("At end of induction, maintenance 900 mg daily",),
    ],
)
def test_a_twice_daily_draft_with_maintenance_for_later_is_confirmed(texts: tuple[str, ...]) -> None:
    selected = induction_draft(texts[0])
    if len(texts) > 1:
        selected["note"] = [{"text": texts[1]}]
    assert "dose-adjust" not in rules_of(run([selected], base(), TODAY))


def test_secondary_prophylaxis_is_maintenance() -> None:
    card = by_rule(run([induction_draft("Secondary prophylaxis")], base(), TODAY), "dose-adjust")
    assert doses(card) == [(900, 1, 1, "d")]


@pytest.mark.parametrize(
    "extra",
    [
        {"code": {"coding": [{"system": "http://loinc.org", "code": "72493-0"}],
                  "text": "CMV DNA Quant PCR (reflex to resistance genotyping if >1000 IU/mL)"}},
        {"code": {"coding": [{"system": "http://loinc.org", "code": "72493-0"}], "text": "sequence-specific probe"}},
        {"interpretation": [{"text": "High. Rising on therapy: consider resistance testing"}]},
    ],
)  # fmt: skip
def test_a_coded_viral_load_is_read_whatever_its_name_says(extra: dict[str, Any]) -> None:
    """Induction complete on record, undetectable 3 days ago, 5,000 IU/mL today (LOINC 72493-0): viraemic again, so
    the maintenance draft is corrected to induction (900 mg twice daily)."""
    today = observation("72493-0", 5000, "[IU]/mL", TODAY, days_ago=0, **extra)
    resources = [*base(), completed_induction(), undetectable_viral_load(days_ago=3), today]
    assert doses(by_rule(run([maintenance_draft()], resources, TODAY), "dose-adjust")) == [(900, 2, 1, "d")]


@pytest.mark.parametrize(
    ("report", "suspected"),
    [
        ("UL97 codon 460: M460V", True),
        ("M460V detected in the UL97 region sequenced", True),
        ("Resistance mutation M460V detected in the UL97 gene region", True),
        ("UL97 M460V detected and UL54 not detected", True),
        ("UL97 M460V detected / UL54 negative", True),
        ("Ganciclovir: RESISTANT", True),
        ("Interpretation: resistant to ganciclovir", True),
        ("UL97: p.Met460Val", True),
        ("UL97 del 591-594", True),
        ("UL97 D605E (polymorphism, not resistance)", False),
        ("Not resistant to ganciclovir", False),
    ],
)
def test_genotype_report_formats(report: str, suspected: bool) -> None:
    genotype = genotype_report(report)
    assert ("resistance" in rules_of(run([gcv_draft()], [*base(), genotype], TODAY))) is suspected


@pytest.mark.parametrize("name", ["CMV genotype (glycoprotein B)", "HIV-1 genotype"])
def test_other_genotypes_are_not_cmv_resistance(name: str) -> None:
    genotype = observation("", None, "", TODAY, valueString="gB2 genotype detected", code={"text": name})
    assert "resistance" not in rules_of(run([gcv_draft()], [*base(), genotype], TODAY))


@pytest.mark.parametrize(("authored_days_ago", "starts_days_ago"), [(60, 0), (-7, -7), (None, 0)])
def test_a_probenecid_draft_is_of_this_session_by_when_it_was_written(
    authored_days_ago: int | None, starts_days_ago: int
) -> None:
    """Written 60 days ago (planned to start today), dated next week, or with no authoredOn: not this session's, so
    the regimen's probenecid is still proposed."""
    left = medication("probenecid 500 mg tablet", TODAY, started_days_ago=starts_days_ago, status="draft", route="oral")
    if authored_days_ago is None:
        del left["authoredOn"]
    else:
        left["authoredOn"] = (TODAY - dt.timedelta(days=authored_days_ago)).isoformat()
    cards = run([cidofovir_draft()], [*base(), observation("2888-6", 10, "mg/dL", TODAY), left], TODAY)
    labels = [s.label for s in by_rule(cards, "cidofovir-probenecid-hydration").suggestions]
    assert labels == ["Order probenecid and saline prehydration with each cidofovir dose"]


def test_eye_drops_instilled_to_the_affected_eye_are_local() -> None:
    drops = medication("tobramycin 0.3% solution", TODAY, started_days_ago=2, route="")
    drops["dosageInstruction"][0]["text"] = "Instill 1-2 drops to affected eye every 4 hours"
    cards = run([cidofovir_draft()], [*base(), observation("2888-6", 10, "mg/dL", TODAY), drops], TODAY)
    assert rules_of(cards)[0] != "cidofovir-contraindicated"


@pytest.mark.parametrize("route", ["NG", "PEG-J", "GT", "Dobhoff"])
def test_a_route_written_as_a_tube_abbreviation_is_enteral(route: str) -> None:
    selected = draft("valganciclovir", "313566", dose_mg=900, route=route, frequency=2, period=1, period_unit="d")
    assert "dose-adjust" not in rules_of(run([selected], base(), TODAY))


# --- fifth review ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "interpretation"),
    [
        ("CMV DNA PCR, plasma (resistance monitoring)", "Detected"),
        ("CMV DNA quant; consider genotypic resistance testing", "Positive"),
    ],
)
def test_a_coded_viral_load_is_never_a_resistance_report(name: str, interpretation: str) -> None:
    load = observation(
        "72493-0", 5000, "[IU]/mL", TODAY, days_ago=0, interpretation=[{"text": interpretation}],
        code={"coding": [{"system": "http://loinc.org", "code": "72493-0"}], "text": name},
    )  # fmt: skip
    assert "resistance" not in rules_of(run([gcv_draft()], [*base(), load], TODAY))


@pytest.mark.parametrize(
    "report",
    [
        "No ganciclovir-resistant mutations detected",
        "No ganciclovir-resistant UL97 or UL54 variants identified.",
        "Not predicted to be resistant to ganciclovir",
        "No resistance mutations detected. Specimen delayed 120 min in transit.",
        "UL97: wild type. UL54: wild type. Report delegated 2024",
        "UL97: wild type. Accession S240K",
    ],
)
def test_wording_around_a_negative_genotype_is_not_resistance(report: str) -> None:
    genotype = genotype_report(report)
    assert "resistance" not in rules_of(run([gcv_draft()], [*base(), genotype], TODAY))


@pytest.mark.parametrize(
    "text",
    [
        "Maintenance once daily",
        "Maintenance until CD4 > 100 for 6 months",
        "Maintenance 900 mg daily, starting on 11/22",
        "Days 22+: maintenance",
    ],
)
def test_a_maintenance_draft_at_900_mg_daily_is_confirmed(text: str) -> None:
    assert "dose-adjust" not in rules_of(run([maintenance_draft_with(text)], base(), TODAY))


def maintenance_draft_with(text: str, route: str | None = "oral") -> dict[str, Any]:
    return draft(
        "valganciclovir", "313566", dose_mg=900, route=route, frequency=1, period=1, period_unit="d", text=text
    )


def test_an_unclear_maintenance_draft_not_yet_renally_adjusted_gets_the_maintenance_dose() -> None:
    """SCr 1.6 (CrCl 60 → 40–59 band): maintenance 450 mg once daily, induction 450 mg twice daily (label Table).
    A once-daily 900 mg draft with unclear words is maintenance: 450 mg once daily, not twice."""
    resources = [*without_code(base(), "2160-0"), observation("2160-0", 1.6, "mg/dL", TODAY)]
    card = by_rule(run([maintenance_draft_with("Days 22+: maintenance")], resources, TODAY), "dose-adjust")
    assert doses(card) == [(450, 1, 1, "d")]


def test_an_unclear_maintenance_draft_without_a_route_stays_maintenance() -> None:
    card = by_rule(run([maintenance_draft_with("Days 22+: maintenance", route=None)], base(), TODAY), "dose-adjust")
    assert doses(card) == [(900, 1, 1, "d")]


def test_reinduction_is_induction() -> None:
    assert "dose-adjust" not in rules_of(
        run([induction_draft("Reinduction; maintenance to be decided")], base(), TODAY)
    )


def test_maintenance_fluids_are_not_a_maintenance_regimen() -> None:
    """Ganciclovir 400 mg IV q12h (5 mg/kg, induction) 'run with maintenance IV fluids': confirmed as written."""
    selected = draft("ganciclovir", "310442", dose_mg=400, route="IV", frequency=1, period=12, period_unit="h",
                     text="Run with maintenance IV fluids")  # fmt: skip
    assert "dose-adjust" not in rules_of(run([selected], base(), TODAY))


def test_the_route_field_outranks_the_instructions() -> None:
    """Valganciclovir route 'oral', instructions mentioning IV fluids: an oral order, confirmed as written."""
    assert "dose-adjust" not in rules_of(run([induction_draft("Give with IV fluids running")], base(), TODAY))


def test_a_named_viral_load_sent_on_for_genotyping_is_still_a_viral_load() -> None:
    result = observation(
        "", None, "", TODAY, days_ago=0, code={"text": "CMV DNA PCR, plasma"},
        valueString="Detected. Sent for resistance mutation analysis.",
    )  # fmt: skip
    resources = [*base(), completed_induction(), undetectable_viral_load(days_ago=3), result]
    assert doses(by_rule(run([maintenance_draft()], resources, TODAY), "dose-adjust")) == [(900, 2, 1, "d")]


def test_a_probenecid_draft_written_in_a_zone_ahead_is_of_this_session() -> None:
    left = medication("probenecid 500 mg tablet", TODAY, started_days_ago=0, status="draft", route="oral")
    left["authoredOn"] = f"{(TODAY + dt.timedelta(days=1)).isoformat()}T01:15:00+09:00"
    cards = run([cidofovir_draft()], [*base(), observation("2888-6", 10, "mg/dL", TODAY), left], TODAY)
    labels = [s.label for s in by_rule(cards, "cidofovir-probenecid-hydration").suggestions]
    assert labels == ["Order saline prehydration with each cidofovir dose"]


@pytest.mark.parametrize(("name", "suspected"), [("HSV-1 UL54 genotype", False), ("UL97/UL54 genotype", True)])
def test_a_herpes_simplex_ul54_genotype_is_not_cmv_resistance(name: str, suspected: bool) -> None:
    genotype = observation("", None, "", TODAY, valueString="UL54 A719V detected", code={"text": name})
    assert ("resistance" in rules_of(run([gcv_draft()], [*base(), genotype], TODAY))) is suspected


# --- net review of the series against the code before it -------------------------------------------------------


@pytest.mark.parametrize(
    ("report", "suspected"),
    [
        ("Resistance mutations detected include UL97 M460V and UL54 L501I.", True),
        ("Mutations identified include UL97 A594V.", True),
        ("UL97 M460V detected in the tested region", True),
        ("The UL97 mutation M460V was identified in the region analyzed.", True),
        ("Predicted drug sensitivity: Ganciclovir RESISTANT (UL97 M460V)", True),
        ("UL97: A594V (ganciclovir resistant; not resistant to foscarnet or cidofovir)", True),
        ("Mutation ID: M460V", True),
        ("UL97: No mutations detected. UL54: none. The most frequent UL97 mutations are M460V/I.", False),
        ("No resistance mutations detected. This assay detects UL97 mutations such as M460V.", False),
        ("None detected. Limit of detection: 20% (e.g., M460V).", False),
        ("Sample ID: A123B. No mutations detected", False),
    ],
)  # fmt: skip
def test_genotype_report_wording_from_reference_laboratories(report: str, suspected: bool) -> None:
    genotype = genotype_report(report)
    assert ("resistance" in rules_of(run([gcv_draft()], [*base(), genotype], TODAY))) is suspected


@pytest.mark.parametrize(
    "value",
    [
        "Detected; reflexed to UL97/UL54 mutation analysis",
        "DETECTED - specimen sent for CMV resistance mutation testing",
        "CMV: Detected / BK: NEG",
    ],
)
def test_a_detected_named_viral_load_that_mentions_genotyping_or_another_virus_is_detected(value: str) -> None:
    """After a completed induction with an older undetectable result, today's detected result keeps induction."""
    result = observation("", None, "", TODAY, days_ago=0, code={"text": "CMV DNA PCR, plasma"}, valueString=value)
    resources = [*base(), completed_induction(), undetectable_viral_load(days_ago=3), result]
    assert doses(by_rule(run([maintenance_draft()], resources, TODAY), "dose-adjust")) == [(900, 2, 1, "d")]


# --- second net review -------------------------------------------------------------------------------------------


def with_creatinine(value: float) -> list[dict[str, Any]]:
    return [*without_code(base(), "2160-0"), observation("2160-0", value, "mg/dL", TODAY)]


@pytest.mark.parametrize(
    ("selected", "creatinine", "expected"),
    [
        (("foscarnet", "1734377", 4800, 8, "Induction 60 mg/kg q8h x 14 days, then maintenance 90 mg/kg daily"), 1.0,
         (5600, 1, 12, "h")),
        (("foscarnet", "1734377", 4800, 8, "Induction 60 mg/kg q8h x 14 days, then maintenance 90 mg/kg daily"), 2.5,
         (4000, 1, 24, "h")),
        (("valganciclovir", "313566", 900, 12, "900 mg BID x21d, then maintenance daily"), 2.5, (450, 1, 1, "d")),
        (("valganciclovir", "313566", 900, 12, "900 mg BID x21d, then maintenance daily"), 4.0, (450, 1, 2, "d")),
    ],
)  # fmt: skip
def test_an_induction_order_not_yet_renally_adjusted_is_adjusted_as_induction(
    selected: tuple[str, str, float, int, str], creatinine: float, expected: tuple[float, int, int, str]
) -> None:
    """Unclear words, an order written at the full induction schedule: the renal band's induction regimen is
    proposed, not its maintenance (label renal tables; docs/policy.md §1)."""
    drug, rxnorm, mg, hours, text = selected
    route = "oral" if drug == "valganciclovir" else "IV"
    order = draft(drug, rxnorm, dose_mg=mg, route=route, frequency=1, period=hours, period_unit="h", text=text)
    assert doses(by_rule(run([order], with_creatinine(creatinine), TODAY), "dose-adjust")) == [expected]


@pytest.mark.parametrize(
    "report",
    [
        "Known resistance mutation detected: UL97 L595S",
        "Most common UL97 resistance mutation M460V detected",
        "UL97 target region: A594V detected",
        "Panel result: UL97 A594V detected",
        "UL97 resistance panel: M460V DETECTED",
    ],
)
def test_a_finding_worded_with_panel_words_is_resistance(report: str) -> None:
    genotype = genotype_report(report)
    assert "resistance" in rules_of(run([gcv_draft()], [*base(), genotype], TODAY))


@pytest.mark.parametrize(
    "extra",
    [
        {"valueString": "CMV: 5,000 IU/mL; EBV: NEG", "code": {"text": "CMV DNA PCR, plasma"}},
        {"valueString": "CMV 800 IU/mL, HHV6 <LLOQ", "code": {"text": "CMV DNA PCR, plasma"}},
        {"valueQuantity": {"value": 5000, "unit": "IU/mL", "system": "http://unitsofmeasure.org", "code": "[IU]/mL"},
         "interpretation": [{"text": "Reference range: NEG"}]},
    ],
)  # fmt: skip
def test_a_viral_load_is_not_undetectable_because_of_another_virus_or_a_reference_range(extra: dict[str, Any]) -> None:
    result = observation("72493-0", None, "", TODAY, days_ago=0, **extra)
    resources = [*base(), completed_induction(), undetectable_viral_load(days_ago=3), result]
    assert doses(by_rule(run([maintenance_draft()], resources, TODAY), "dose-adjust")) == [(900, 2, 1, "d")]


def test_a_quantitative_viral_load_reflexing_to_genotyping_is_not_a_resistance_report() -> None:
    result = observation(
        "", None, "", TODAY, days_ago=0, valueString="Detected",
        code={"text": "CMV DNA, quantitative, reflex to UL97 genotype"},
    )  # fmt: skip
    assert "resistance" not in rules_of(run([gcv_draft()], [*base(), result], TODAY))


def test_an_amount_written_as_text_under_a_viral_load_code_is_detected() -> None:
    result = observation("72493-0", None, "", TODAY, days_ago=0, valueString="CMV: 5,000 IU/mL; EBV: NEG")
    resources = [*base(), completed_induction(), undetectable_viral_load(days_ago=3), result]
    assert doses(by_rule(run([maintenance_draft()], resources, TODAY), "dose-adjust")) == [(900, 2, 1, "d")]


# --- third net review --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("report", "suspected"),
    [
        ("Known resistance mutation UL97 C603W identified", True),
        ("Known ganciclovir resistance mutation: UL97 L595S", True),
        ("UL97 panel result: A594V", True),
        ("Mutation panel result - UL97 H520Q", True),
        ("Known resistance mutation found: UL54 A987G", True),
        ("No mutations present", False),
        ("No resistance mutations identified", False),
    ],
)
def test_panel_and_known_wording_does_not_hide_a_finding(report: str, suspected: bool) -> None:
    genotype = genotype_report(report)
    assert ("resistance" in rules_of(run([gcv_draft()], [*base(), genotype], TODAY))) is suspected


@pytest.mark.parametrize(
    "value",
    ["LOD 35 IU/mL; not detected", "LLOQ 137 IU/mL, not detected", "Assay LOD: 34.5 IU/mL. Result: Not detected"],
)
def test_an_assay_limit_beside_a_not_detected_result_is_not_an_amount(value: str) -> None:
    """Completed induction, today's result not detected: the maintenance draft is confirmed."""
    result = observation("", None, "", TODAY, days_ago=0, code={"text": "CMV DNA PCR, plasma"}, valueString=value)
    assert "dose-adjust" not in rules_of(run([maintenance_draft()], [*base(), completed_induction(), result], TODAY))


@pytest.mark.parametrize("value", ["0 IU/mL", "hCG 3 IU/mL, negative", "Less than 5 IU/mL"])
def test_an_hcg_amount_is_not_a_positive_test(value: str) -> None:
    hcg = observation("2106-3", None, "", TODAY, valueString=value)
    assert "pregnancy" not in rules_of(run([gcv_draft()], [*base(sex="female"), hcg], TODAY))


@pytest.mark.parametrize(("creatinine", "expected"), [(2.5, (200, 1, 24, "h")), (4.0, (100, 1, 24, "h"))])
def test_a_twice_daily_ganciclovir_order_without_a_dose_stays_induction_in_the_lower_bands(
    creatinine: float, expected: tuple[float, int, int, str]
) -> None:
    """Ganciclovir IV twice daily, no dose, unclear words: at SCr 2.5 and 4.0 both regimens are once daily (label
    Table 1), a tie that goes to induction: 2.5 and 1.25 mg/kg, not the maintenance 1.25 and 0.625 mg/kg."""
    order = draft("ganciclovir", "310442", route="IV", frequency=2, period=1, period_unit="d",
                  text="Induction: BID x21d; maintenance afterwards")  # fmt: skip
    assert doses(by_rule(run([order], with_creatinine(creatinine), TODAY), "dose-adjust")) == [expected]


# --- fourth net review: a report that says nothing was found outranks mutations named without a verdict ---------


@pytest.mark.parametrize(
    "report",
    [
        "None identified",
        "Mutations found: none",
        "Resistance mutations: none identified",
        "Found no evidence of resistance",
        "Insufficient DNA found for genotyping",
        "Patient identified by 2 identifiers; wild type",
        "Mutation panel: M460V, H520Q, A594V. No mutations detected.",
        "Targets: UL97 M460V, H520Q; UL54 A987G. Result: not detected",
        "Known mutations: M460V, H520Q, A594V. None detected.",
        "UL97 panel (M460V, H520Q, A594V): negative",
        "Result: no mutations found. Panel: M460V, H520Q, A594V",
    ],
)
def test_a_report_of_nothing_found_is_not_resistance(report: str) -> None:
    genotype = genotype_report(report)
    assert "resistance" not in rules_of(run([gcv_draft()], [*base(), genotype], TODAY))


def test_an_hcg_amount_before_its_verdict_does_not_hide_a_positive() -> None:
    hcg = observation("2106-3", None, "", TODAY, valueString="hCG: 5,000 IU/mL, positive")
    assert "pregnancy" in rules_of(run([gcv_draft()], [*base(sex="female"), hcg], TODAY))


@pytest.mark.parametrize(
    "report",
    [
        "UL97: M460V (resistant to GCV)\nComment: No evidence of foscarnet resistance.",
        "Mutations: M460V\nPolymorphisms: none",
        "UL97: A594V\nComment: none",
        "UL97: M460V\nUL54: no changes\nOther findings: none",
        "Changes: M460V, D605E\nInterpretation: M460V confers ganciclovir resistance; D605E is a polymorphism.",
        "UL97: M460V\nD605E: natural polymorphism, no resistance",
        "Gene Mutation Drug Interpretation UL97 M460V GCV Resistant UL54 None",
        "UL97: L595S. No resistance mutations.",
        "UL97 M460V; no other mutations detected",
    ],
)
def test_a_mutation_is_not_cancelled_by_another_fields_none(report: str) -> None:
    """Another field's "none", a comment on another drug or another variant, or a contradictory summary do not
    cancel a mutation the report names (a missed resistance keeps ganciclovir going)."""
    genotype = genotype_report(report)
    assert "resistance" in rules_of(run([gcv_draft()], [*base(), genotype], TODAY))
