"""What every rule shares: the call's context (facts, options, the regimens computed once), how a regimen is
written in words, and the actions and suggestions the cards propose."""

from __future__ import annotations

import datetime as dt
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

from cards import dosing, fhir_out
from cards.dosing import Drug, Phase, Schedule
from cards.facts import FAMILY_BY_FACT, FRESHNESS_DAYS, Measurement, PatientFacts, ViralLoad, days
from cards.model import Action, Card, Indicator, Source, Suggestion
from cards.orders import DraftDose, OrderFact, medication_sets
from cards.regimen import Missing, MissingItem, NotRecommended, Regimen, StaleInput, compute
from cards.sources import policy
from cards.therapy import COURSE_GAP_DAYS, current_course

DRUG_SET: dict[Drug, str] = {
    "ganciclovir": "Ganciclovir",
    "valganciclovir": "Valganciclovir",
    "foscarnet": "Foscarnet",
    "cidofovir": "Cidofovir",
}
# The drugs whose orders form one course (docs/policy.md §8): IV ganciclovir and oral valganciclovir are one
# therapy (valganciclovir is the oral prodrug), foscarnet and cidofovir each their own.
COURSE_SETS: dict[Drug, tuple[str, ...]] = {
    "ganciclovir": ("Ganciclovir", "Valganciclovir"),
    "valganciclovir": ("Ganciclovir", "Valganciclovir"),
    "foscarnet": ("Foscarnet",),
    "cidofovir": ("Cidofovir",),
}
# docs/policy.md §8: induction is complete after 14 days of therapy in the current course (21, the shortest colitis
# course, with CMV GI disease), with CMV DNA undetectable or below the assay's quantification limit on a sample
# taken during the course and at most 14 days ago (two weekly checks: an older result does not show today's state).
COMPLETED_INDUCTION_DAYS = 14
VIRAL_LOAD_CURRENT_DAYS = FRESHNESS_DAYS["viral_load"]
DURATION_TEXT = "then reassess; continue until CMV DNA is undetectable"
FOSCARNET_HYDRATION = (
    "Hydration (label): 750–1000 mL normal saline or 5% dextrose before the first infusion; then 750–1000 mL "
    "with each 90–120 mg/kg dose or 500 mL with each 40–60 mg/kg dose, given concurrently."
)
ANC_MIN_PER_UL = 500.0  # docs/clinical-basis.md §2.4: avoid (val)ganciclovir below these counts
PLATELETS_MIN_PER_UL = 25000.0
HEMOGLOBIN_MIN_G_DL = 8.0


# Options and Context, built on every call, spell out their __init__ (init=False): native constructors, see
# cards/model.py above Coding.
@dataclass(frozen=True, init=False)
class Options:
    dosing_weight: Literal["actual", "adjusted"]
    high_viral_load_iu_ml: float

    def __init__(self, dosing_weight: Literal["actual", "adjusted"], high_viral_load_iu_ml: float) -> None:
        object.__setattr__(self, "dosing_weight", dosing_weight)
        object.__setattr__(self, "high_viral_load_iu_ml", high_viral_load_iu_ml)


@dataclass(slots=True, init=False)
class Context:
    """What every rule reads: the facts, the options, the patient id, and the drugs selected in this call."""

    facts: PatientFacts
    options: Options
    patient_id: str
    selected_drugs: frozenset[Drug] = frozenset()
    _regimens: dict[tuple[Drug, Phase, str | None], Regimen | Missing | NotRecommended] = field(
        default_factory=dict, init=False
    )
    _phases: dict[Drug, tuple[Phase, str | None]] = field(default_factory=dict, init=False)

    def __init__(
        self, facts: PatientFacts, options: Options, patient_id: str, selected_drugs: frozenset[Drug] = frozenset()
    ) -> None:
        self.facts = facts
        self.options = options
        self.patient_id = patient_id
        self.selected_drugs = selected_drugs
        self._regimens = {}  # computed once per call (``regimen``)
        self._phases = {}

    def regimen(self, drug: Drug, phase: Phase, column: str | None = None) -> Regimen | Missing | NotRecommended:
        """The regimen of ``drug`` for this patient (docs/policy.md §4-§6; the colitis course when the patient has
        CMV GI disease; the default table column unless one is named), computed once per call: several rules
        propose the same drug."""
        key = (drug, phase, column)
        if key not in self._regimens:
            colitis = "gastrointestinal" in self.facts.manifestations
            self._regimens[key] = compute(
                drug, phase, self.facts, self.options.dosing_weight, column=column, colitis=colitis
            )
        return self._regimens[key]

    def already_ordered(self, set_name: str) -> bool:
        """An order that could be running today, or a draft (selected or not), of this drug exists."""
        return bool(self.facts.medications_in(set_name)) or any(
            set_name in medication_sets(order.resource) for order in self.facts.orders
        )

    def phase(self, drug: Drug, order: OrderFact | None = None) -> Phase:
        """Induction unless the draft says maintenance or induction is complete (docs/policy.md §8)."""
        return self.phase_and_reason(drug, order)[0]

    def phase_and_reason(self, drug: Drug, order: OrderFact | None = None) -> tuple[Phase, str | None]:
        """The phase, and why maintenance (for the card), or None for induction (docs/policy.md §1, §8): the order's
        words when they say maintenance; the record when induction is complete; and when the words are unclear
        ("900 mg BID x21d f/b maintenance"), the dose as written if it is the maintenance regimen."""
        if order is not None and order.text_phase == "maintenance":
            return "maintenance", "the selected order says it is a maintenance regimen"
        if drug not in self._phases:
            self._phases[drug] = completed_induction(self.facts, drug)
        phase = self._phases[drug]
        unclear = phase[0] == "induction" and order is not None and order.text_phase == "either"
        if unclear and order is not None and not self._written_for_induction(drug, order):
            induction = self.regimen(drug, "induction")
            alternative = (
                f"; if induction is not complete, induction is {regimen_text(induction)}"
                if isinstance(induction, Regimen)
                else ""
            )
            return "maintenance", (
                "the selected order names maintenance among other words of sequence or time and is not written as "
                f"induction{alternative}"
            )
        return phase

    def _written_for_induction(self, drug: Drug, order: OrderFact) -> bool:
        """For a draft whose words are unclear: the order as written is nearer an induction regimen (either foscarnet
        column) than the maintenance one — by schedule and amount, each compared as a ratio, renal bands applied to
        all, a tie going to induction. Maintenance is never above induction in the label tables, so an order written
        at or above induction, renally adjusted or not, stays induction. Nothing to compare: maintenance, as its
        words say."""
        maintenance = self.regimen(drug, "maintenance")
        inductions = [self.regimen(drug, "induction")]
        if drug == "foscarnet":
            inductions.append(self.regimen(drug, "induction", dosing.FOSCARNET_ALTERNATIVE_COLUMN["induction"]))
        candidates = [r for r in inductions if isinstance(r, Regimen)]
        if not candidates or not isinstance(maintenance, Regimen):
            return False
        if any(fits_regimen(self, order, r) for r in candidates):
            return True
        if fits_regimen(self, order, maintenance):
            return False

        def distance(regimen: Regimen) -> float:
            total = 0.0
            if order.dose.per_hour is not None and order.dose.per_hour > 0:
                total += abs(math.log(order.dose.per_hour / regimen.schedule.doses_per_hour))
            if order.dose.mg is not None and order.dose.mg > 0:
                total += abs(math.log(order.dose.mg / regimen.dose_mg))
            return total

        if order.dose.per_hour is None and order.dose.mg is None:
            return False
        # A tie (renal bands where both regimens share a schedule or an amount) is induction, the default (§1).
        return min(distance(r) for r in candidates) <= distance(maintenance)


def completed_induction(facts: PatientFacts, drug: Drug) -> tuple[Phase, str | None]:
    """Maintenance when the current course of the drug's therapy has run ≥ 14 days (≥ 21 with CMV GI disease;
    active or completed orders) and the latest CMV DNA, taken during the course and at most 14 days ago, is
    undetectable (docs/policy.md §8)."""
    latest = facts.latest_viral_load
    if latest is None or not latest.undetectable or latest.date < facts.today - dt.timedelta(VIRAL_LOAD_CURRENT_DAYS):
        return "induction", None
    course = current_course(facts.medications, COURSE_SETS[drug], facts.today, COURSE_GAP_DAYS)
    colitis = "gastrointestinal" in facts.manifestations and drug in ("ganciclovir", "valganciclovir")
    needed = dosing.COLITIS_DAYS[0] if colitis else COMPLETED_INDUCTION_DAYS
    if course is None or course.days_given < needed or latest.date < course.start:
        return "induction", None
    names = " / ".join(sorted({s.lower() for s in COURSE_SETS[drug]}))
    return "maintenance", (
        f"induction complete: {course.days_given} days of {names} since {course.start.isoformat()} and CMV DNA "
        f"undetectable on {latest.date.isoformat()} ({latest.source})"
    )


# --- writing a regimen ------------------------------------------------------------------------------------------


def summary(text: str) -> str:
    """``text`` cut to the spec's 140-character summary limit."""
    return text if len(text) < 140 else text[:136].rstrip() + "…"


def route_text(route: str) -> str:
    """The route as the cards write it: IV or PO."""
    return "IV" if route == "iv" else "PO"


def regimen_text(regimen: Regimen) -> str:
    """The dosage instruction text of a proposed regimen."""
    parts = [f"{regimen.dose_mg:g} mg {route_text(regimen.route)} {regimen.schedule.text}"]
    parts.append(dosing.INFUSION_TEXT[regimen.drug])
    if regimen.count:
        parts.append(f"{regimen.count} doses")
    if regimen.duration_days:
        length = (
            f"for {dosing.COLITIS_DAYS[0]}–{dosing.COLITIS_DAYS[1]} days (CMV colitis)"
            if regimen.colitis_course
            else f"for {regimen.duration_days} days"
        )
        parts.append(f"{length}, {DURATION_TEXT}")
    return "; ".join(parts)


def computation_lines(regimen: Regimen) -> list[str]:
    """Detail lines showing how a regimen was computed: inputs, band, dose arithmetic, warnings."""
    lines = [f"- {line}" for line in regimen.inputs]
    lines.append(f"- Band: {regimen.band_text} → {regimen.row.dose_text()} ({regimen.row.source})")
    if regimen.row.mg_per_kg is not None and regimen.weight is not None:
        lines.append(
            f"- Dose: {regimen.row.mg_per_kg:g} mg/kg × {regimen.weight.kg:.1f} kg = {regimen.exact_mg:.1f} mg → "
            f"{regimen.dose_mg:g} mg (rounded to {dosing.ROUNDING_MG[regimen.drug]:g} mg, {policy(6)})"
        )
    if regimen.hemodialysis_row_without_dialysis:
        lines.append(
            "- ⚠ The label's CrCl < 10 mL/min row assumes hemodialysis (dose after each session); no dialysis is on "
            f"record: involve nephrology before dosing ({policy(9)})."
        )
    return lines


def regimen_note(regimen: Regimen) -> str:
    """The computation, as the proposed resource's note (docs/policy.md §13)."""
    parts = [line for line in regimen.inputs if not line.startswith("Age")]
    parts.append(f"Band {regimen.band_text}: {regimen.row.dose_text()}")
    parts.append(f"Source: {regimen.row.source}")
    return "Computed by CMV CDS. " + " | ".join(parts)


def dose_spec(regimen: Regimen) -> fhir_out.DoseSpec:
    """The FHIR dosage of a proposed regimen."""
    return fhir_out.DoseSpec(
        text=f"{regimen.drug} {regimen_text(regimen)}",
        amount=regimen.dose_mg,
        amount_unit="mg",
        schedule=regimen.schedule,
        route=regimen.route,
        duration_days=regimen.duration_days,
        count=regimen.count,
    )


def differences(draft: DraftDose, regimen: Regimen) -> list[str]:
    """What in the draft differs from the regimen (empty when it matches, docs/policy.md §6 rounding)."""
    found = []
    tolerance = dosing.ROUNDING_MG[regimen.drug] / 2 if regimen.drug != "valganciclovir" else 0.0
    if draft.invalid is not None:
        found.append(f"the written amount ({draft.invalid}) is not a valid dose (computed {regimen.dose_mg:g} mg)")
    elif draft.mg is None:
        found.append("no dose in mg")
    elif abs(draft.mg - regimen.exact_mg) > tolerance + 1e-9 and not math.isclose(draft.mg, regimen.dose_mg):
        found.append(f"dose {draft.mg:g} mg (computed {regimen.dose_mg:g} mg)")
    if draft.per_hour is None:
        found.append("no frequency")
    elif not math.isclose(draft.per_hour, regimen.schedule.doses_per_hour, rel_tol=1e-6):
        found.append(f"frequency differs (computed {regimen.schedule.text})")
    if draft.route != regimen.route:
        found.append(f"route {draft.route} (computed {route_text(regimen.route)})")
    return found


def fits_regimen(ctx: Context, order: OrderFact, regimen: Regimen) -> bool:
    """The draft matches the regimen as written; for foscarnet, either label column (docs/policy.md §6)."""
    if not differences(order.dose, regimen):
        return True
    if regimen.drug != "foscarnet":
        return False
    other = ctx.regimen("foscarnet", regimen.phase, dosing.FOSCARNET_ALTERNATIVE_COLUMN[regimen.phase])
    return isinstance(other, Regimen) and not differences(order.dose, other)


def create_action(ctx: Context, regimen: Regimen) -> Action:
    """A ``create`` action for a new MedicationRequest of the regimen."""
    resource = fhir_out.new_medication_request(
        ctx.patient_id,
        fhir_out.medication_concept(DRUG_SET[regimen.drug]),
        [dose_spec(regimen)],
        regimen_note(regimen),
    )
    return Action("create", f"Order {regimen.summary_text()}", resource=resource)


def update_action(order: OrderFact, regimen: Regimen) -> Action:
    """An ``update`` action rewriting the selected draft to the regimen (its id and other fields kept)."""
    resource = fhir_out.updated_medication_request(
        order.resource, dose_spec(regimen), regimen_note(regimen), DRUG_SET[regimen.drug]
    )
    return Action("update", f"Change the selected order to {regimen.summary_text()}", resource=resource)


def delete_action(order: OrderFact) -> Action:
    """A ``delete`` action removing the selected draft."""
    return Action("delete", f"Remove the selected {order.drug} order", resource_id=f"MedicationRequest/{order.id}")


def lab_order(
    ctx: Context,
    lab_set: str,
    text: str,
    note: str,
    schedule: Schedule | None = None,
    duration: int | None = None,
    frequency_max: int | None = None,
) -> Action:
    """A ``create`` action for a ServiceRequest of the lab set's test (docs/policy.md §13)."""
    resource = fhir_out.service_request(ctx.patient_id, lab_set, text, note, schedule, duration)
    if frequency_max is not None and "occurrenceTiming" in resource:
        resource["occurrenceTiming"]["repeat"]["frequencyMax"] = frequency_max
    return Action("create", f"Order {text}", resource=resource)


def missing_lines(items: Sequence[MissingItem]) -> list[str]:
    """Detail lines naming each missing value and why."""
    return [f"- **{item.label}**: {item.reason}" for item in items]


def missing_lab_suggestions(ctx: Context, items: Sequence[MissingItem]) -> list[Suggestion]:
    """docs/policy.md §2: propose ordering a missing value where it is a lab."""
    return [
        Suggestion(
            f"Order {item.label}",
            (lab_order(ctx, item.lab_set, item.label, f"Needed to dose the CMV antiviral ({policy(2)})"),),
            is_recommended=True,
        )
        for item in items
        if item.lab_set
    ]


def stale_suggestions(ctx: Context, stale: Sequence[StaleInput]) -> list[Suggestion]:
    """docs/policy.md §2: a stale value is used, and a repeat of the test is proposed."""
    return [
        Suggestion(
            f"Repeat {item.label} (last {item.measurement.date.isoformat()})",
            (
                lab_order(
                    ctx,
                    item.lab_set,
                    item.label,
                    f"Last result is older than {days(item.window_days)} ({policy(2)})",
                ),
            ),
        )
        for item in stale
        if item.lab_set
    ]


def stale_lines(stale: Sequence[StaleInput], today: dt.date) -> list[str]:
    """Detail lines flagging each stale input with its age and window."""
    return [
        f"- ⚠ {item.label.capitalize()} is {item.measurement.age_days(today)} days old "
        f"(from {item.measurement.date.isoformat()}; window {days(item.window_days)}, {policy(2)}): "
        "used, and a repeat is suggested."
        for item in stale
    ]


def alternative_unavailable(alt: Missing | NotRecommended) -> list[str]:
    """Why the alternative a card names could not be dosed."""
    if isinstance(alt, Missing):
        return ["", f"The alternative ({alt.drug}) could not be dosed:", *missing_lines(alt.items)]
    return ["", f"The alternative ({alt.drug}) is not recommended either: {alt.reason} ({alt.source})."]


def unavailable_lines(alt: Missing | NotRecommended) -> list[str]:
    """List lines saying why a drug cannot be proposed: each missing value, or the reason it is not recommended."""
    if isinstance(alt, Missing):
        return missing_lines(alt.items)
    return [f"- not recommended: {alt.reason} ({alt.source})"]


def card(
    rule_id: str,
    summary_text: str,
    indicator: Indicator,
    detail: list[str],
    source: Source,
    suggestions: Sequence[Suggestion] = (),
    behavior: Literal["at-most-one", "any"] = "any",
) -> Card:
    """A card with its markdown detail joined from lines and the spec's selection behaviour set."""
    return Card(
        rule_id=rule_id,
        summary=summary(summary_text),
        indicator=indicator,
        detail="\n".join(detail),
        source=source,
        suggestions=tuple(suggestions),
        selection_behavior=behavior if suggestions else None,
    )


# --- viral load ---------------------------------------------------------------------------------------------------


def _comparable(a: ViralLoad, b: ViralLoad) -> tuple[float, float] | None:
    def value(load: ViralLoad, unit: str) -> float | None:
        if load.undetectable:
            return 0.0
        return load.iu_per_ml if unit == "iu" else load.copies_per_ml

    for unit in ("iu", "copies"):
        first, second = value(a, unit), value(b, unit)
        if first is not None and second is not None:
            return first, second
    return None


def viral_load_trend(facts: PatientFacts, start: dt.date) -> tuple[ViralLoad, ViralLoad, float, float] | None:
    """(baseline at therapy start, latest after it, their values) when both are comparable."""
    before = [v for v in facts.viral_loads if v.date <= start + dt.timedelta(days=1)]
    after = [v for v in facts.viral_loads if v.date > start + dt.timedelta(days=1)]
    if not before or not after:
        return None
    pair = _comparable(before[-1], after[-1])
    if pair is None:
        return None
    return before[-1], after[-1], pair[0], pair[1]


def vl_text(load: ViralLoad) -> str:
    """A viral load as the cards write it, with date and source ("12,000 IU/mL on 2026-11-20 (Observation/vl-1)")."""
    if load.undetectable:
        value = "undetectable"
    elif load.iu_per_ml is not None:
        value = f"{load.iu_per_ml:,.0f} IU/mL"
    elif load.copies_per_ml is not None:
        value = f"{load.copies_per_ml:,.0f} copies/mL"
    else:
        value = "detected"
    return f"{value} on {load.date.isoformat()} ({load.source})"


def low_counts(facts: PatientFacts) -> list[str]:
    """The blood counts below the (val)ganciclovir "avoid" thresholds (docs/clinical-basis.md §2.4), each with
    its value, date, source and code."""
    low = []
    for label, value, threshold, unit in (
        ("ANC", facts.anc, ANC_MIN_PER_UL, "cells/µL"),
        ("Platelets", facts.platelets, PLATELETS_MIN_PER_UL, "/µL"),
        ("Hemoglobin", facts.hemoglobin, HEMOGLOBIN_MIN_G_DL, "g/dL"),
    ):
        if isinstance(value, Measurement) and value.below(threshold):
            stale = " (stale)" if value.stale else ""
            low.append(
                f"{label} {value.shown()} {unit} < {threshold:,.4g} on {value.date.isoformat()} "
                f"({value.source}; {value.code}){stale}"
            )
    return low


GCV_VGC_DRUGS: frozenset[Drug] = frozenset({"ganciclovir", "valganciclovir"})  # the counts rule applies to both
_COUNTS = (("anc", ANC_MIN_PER_UL), ("platelets", PLATELETS_MIN_PER_UL), ("hemoglobin", HEMOGLOBIN_MIN_G_DL))
_LABEL_BY_SET = {family.set_name: family.label for family in FAMILY_BY_FACT.values()}


def count_gaps(facts: PatientFacts) -> list[tuple[str, str]]:
    """The blood counts (val)ganciclovir needs checked (docs/clinical-basis.md §2.4) that are not known today:
    (lab set, why) for each one missing, unusable, stale, or reported as a bound that leaves the threshold open."""
    gaps = []
    for fact, threshold in _COUNTS:
        family = FAMILY_BY_FACT[fact]
        value = facts.lab(fact)
        if value is None:
            why = "no result on record"
        elif not isinstance(value, Measurement):
            why = f"latest result ({value.date.isoformat()}, {value.source}) unusable: {value.reason}"
        elif value.below(threshold) is None:
            why = f"latest result '{value.shown()} {value.unit}' does not say whether it is below {threshold:,g}"
        elif value.stale:
            window = days(family.freshness_days or 0)
            why = f"latest result is {days(value.age_days(facts.today))} old (window {window})"
        else:
            continue
        gaps.append((family.set_name, f"{family.label}: {why}"))
    return gaps


def count_gap_lines(gaps: Sequence[tuple[str, str]]) -> list[str]:
    """Detail lines naming the blood counts that are not known (empty when all are)."""
    if not gaps:
        return []
    return [
        "",
        f"**Blood counts not known** (ganciclovir and valganciclovir are avoided below ANC 500/µL, platelets "
        f"25,000/µL or hemoglobin 8 g/dL; {policy(9)}):",
        *[f"- {why}" for _, why in gaps],
    ]


def count_gap_suggestions(ctx: Context, gaps: Sequence[tuple[str, str]]) -> list[Suggestion]:
    """One suggestion ordering the unknown blood counts now (none when all are known)."""
    if not gaps:
        return []
    note = f"Blood counts before ganciclovir or valganciclovir ({policy(9)})"
    actions = tuple(lab_order(ctx, lab_set, _LABEL_BY_SET[lab_set], note) for lab_set, _ in gaps)
    return [Suggestion("Order blood counts now", actions)]


def foscarnet_proposal(lead: str, alternative: Regimen) -> list[str]:
    """Detail lines proposing foscarnet: the regimen, how it was computed, and the hydration the label requires."""
    return [
        f"{lead}foscarnet {regimen_text(alternative)}.",
        "",
        "**Computation**",
        *computation_lines(alternative),
        "",
        FOSCARNET_HYDRATION,
    ]


def proposal_lines(lead: str, alternative: Regimen, today: dt.date) -> list[str]:
    """Detail lines proposing a regimen: what, how it was computed, foscarnet's hydration, stale inputs."""
    lines = [f"{lead}{alternative.drug} {regimen_text(alternative)}.", "", "**Computation**"]
    lines += computation_lines(alternative)
    if alternative.drug == "foscarnet":
        lines += ["", FOSCARNET_HYDRATION]
    return lines + stale_lines(alternative.stale, today)


def replace_order(
    ctx: Context, order: OrderFact, alternative: Regimen | Missing | NotRecommended
) -> tuple[list[str], list[Suggestion]]:
    """The detail lines and suggestions of a card that steers the selected order to another drug: remove the draft
    and order the alternative, renally dosed; or, where the alternative cannot be dosed, say why, still offer to
    remove the draft, and order the labs its dose needs."""
    if isinstance(alternative, Regimen):
        detail = ["", *proposal_lines("**Proposed instead:** ", alternative, ctx.facts.today)]
        replace = Suggestion(
            f"Replace with {alternative.summary_text()}",
            (delete_action(order), create_action(ctx, alternative)),
            is_recommended=True,
        )
        gaps = count_gaps(ctx.facts) if alternative.drug in GCV_VGC_DRUGS else []
        detail += count_gap_lines(gaps)
        return detail, [replace, *count_gap_suggestions(ctx, gaps), *stale_suggestions(ctx, alternative.stale)]
    detail = ["", f"**The alternative is IV {alternative.drug}**, but it cannot be dosed now:"]
    detail += unavailable_lines(alternative)
    remove = Suggestion(f"Remove the selected {order.drug} order", (delete_action(order),), is_recommended=True)
    labs = missing_lab_suggestions(ctx, alternative.items) if isinstance(alternative, Missing) else []
    return detail, [remove, *labs]
