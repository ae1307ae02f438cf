"""The CMV rules: plain functions from patient facts and the selected order to cards.

One *main* card per selected CMV antiviral order, chosen in this order of precedence (policy.md §6):
myelosuppression → suspected resistance → CNS combination → oral valganciclovir steered to IV →
missing data → not recommended / contraindicated → dose correction (``update``) → dose confirmed
(monitoring, policy.md §7). Independent cards follow: pregnancy, interactions, IV→oral step-down,
cidofovir probenecid + hydration, and adjunctive-care information.
"""

from __future__ import annotations

import datetime as dt
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from cards import dosing, fhir_out
from cards.dosing import Drug, Phase, Schedule
from cards.facts import Measurement, MedicationFact, PatientFacts, ViralLoad, medication_route, medication_sets
from cards.model import Action, Card, Indicator, Suggestion
from cards.regimen import Missing, MissingItem, NotRecommended, Regimen, StaleInput, compute
from cards.sources import KOTTON_2025, LABEL, NIH_OI, PRODUCT_POLICY

# policy.md §6 / clinical.md §1.4, §2.4: avoid ganciclovir/valganciclovir below these.
ANC_MIN_PER_UL = 500.0
PLATELETS_MIN_PER_UL = 25000.0
HEMOGLOBIN_MIN_G_DL = 8.0
# policy.md §6: suspected resistance after ≥ 14 days on (val)ganciclovir.
RESISTANCE_MIN_THERAPY_DAYS = 14
# policy.md §6: IV → oral step-down after ≥ 3 days of IV ganciclovir.
STEP_DOWN_MIN_IV_DAYS = 3
# policy.md §1: maintenance once an order of the same drug started ≥ 14 days ago and CMV DNA is undetectable.
MAINTENANCE_AFTER_DAYS = 14
# policy.md §7 monitoring schedules.
WEEKLY = Schedule(1, 1, "wk", "weekly")  # weekly CMV PCR (policy.md §7; seeds)
TWICE_WEEKLY = Schedule(2, 1, "wk", "twice weekly")  # CBC twice weekly in induction (policy.md §7)
CHEMISTRY_FOSCARNET = Schedule(2, 1, "wk", "2–3 times weekly")  # policy.md §7; clinical.md §3.4 (frequencyMax 3)
CHEMISTRY_FOSCARNET_MAX = 3

DRUG_SET: dict[Drug, str] = {
    "ganciclovir": "Ganciclovir",
    "valganciclovir": "Valganciclovir",
    "foscarnet": "Foscarnet",
    "cidofovir": "Cidofovir",
}
DURATION_TEXT = "then reassess; continue until CMV DNA is undetectable (policy.md §5)"
FOSCARNET_HYDRATION = (
    "Hydration (label): 750–1000 mL normal saline or 5% dextrose before the first infusion; then 750–1000 mL "
    "with each 90–120 mg/kg dose or 500 mL with each 40–60 mg/kg dose, given concurrently (clinical.md §3.3)."
)
_MAINTENANCE = re.compile(r"\bmaintenance\b", re.IGNORECASE)
_BOLD_SOURCE = "**Source:** "


@dataclass(frozen=True)
class Options:
    dosing_weight: Literal["actual", "adjusted"]
    high_viral_load_iu_ml: float


@dataclass
class Context:
    """What every rule reads: the facts, the options, the patient id, and all draft orders."""

    facts: PatientFacts
    options: Options
    patient_id: str
    drafts: Sequence[Mapping[str, Any]] = field(default_factory=tuple)
    _regimens: dict[tuple[Drug, Phase], Regimen | Missing | NotRecommended] = field(default_factory=dict)

    def regimen(self, drug: Drug, phase: Phase) -> Regimen | Missing | NotRecommended:
        """The regimen of ``drug`` for this patient (policy.md §3-§5; the colitis course when the patient
        has CMV GI disease), computed once per call: several rules propose the same drug."""
        key = (drug, phase)
        if key not in self._regimens:
            colitis = "gastrointestinal" in self.facts.manifestations
            self._regimens[key] = compute(drug, phase, self.facts, self.options.dosing_weight, colitis=colitis)
        return self._regimens[key]

    def already_ordered(self, set_name: str) -> bool:
        """An active order or a draft (selected or not) of this drug exists: no duplicate proposal."""
        return bool(self.facts.medications_in(set_name)) or any(
            set_name in medication_sets(draft) for draft in self.drafts
        )


# --- helpers ------------------------------------------------------------------------------------


def _summary(text: str) -> str:
    return text if len(text) < 140 else text[:136].rstrip() + "…"


def _route_text(route: str) -> str:
    return "IV" if route == "iv" else "PO"


def regimen_text(regimen: Regimen) -> str:
    """The dosage instruction text of a proposed regimen."""
    parts = [f"{regimen.dose_mg:g} mg {_route_text(regimen.route)} {regimen.schedule.text}"]
    infusion = dosing.INFUSION_TEXT[regimen.drug]
    parts.append(infusion)
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
    lines = [f"- {line}" for line in regimen.inputs]
    lines.append(f"- Band: {regimen.band_text} → {regimen.row.dose_text()} ({regimen.row.source})")
    if regimen.row.mg_per_kg is not None and regimen.weight is not None:
        lines.append(
            f"- Dose: {regimen.row.mg_per_kg:g} mg/kg × {regimen.weight.kg:.1f} kg = {regimen.exact_mg:.1f} mg → "
            f"{regimen.dose_mg:g} mg (rounded to {dosing.ROUNDING_MG[regimen.drug]:g} mg, policy.md §5)"
        )
    return lines


def regimen_note(regimen: Regimen) -> str:
    """The computation, as the proposed resource's note (policy.md §8)."""
    parts = [line for line in regimen.inputs if not line.startswith("Age")]
    parts.append(f"Band {regimen.band_text}: {regimen.row.dose_text()}")
    parts.append(f"Source: {regimen.row.source}")
    return "Computed by CMV CDS. " + " | ".join(parts)


def dose_spec(regimen: Regimen) -> fhir_out.DoseSpec:
    return fhir_out.DoseSpec(
        text=f"{regimen.drug} {regimen_text(regimen)}",
        amount=regimen.dose_mg,
        amount_unit="mg",
        schedule=regimen.schedule,
        route=regimen.route,
        duration_days=regimen.duration_days,
        count=regimen.count,
    )


def create_action(ctx: Context, regimen: Regimen) -> Action:
    resource = fhir_out.new_medication_request(
        ctx.patient_id,
        fhir_out.medication_concept(DRUG_SET[regimen.drug]),
        [dose_spec(regimen)],
        regimen_note(regimen),
    )
    return Action("create", f"Order {regimen.summary_text()}", resource=resource)


def update_action(order: Mapping[str, Any], regimen: Regimen) -> Action:
    resource = fhir_out.updated_medication_request(
        order, dose_spec(regimen), regimen_note(regimen), DRUG_SET[regimen.drug]
    )
    return Action("update", f"Change the selected order to {regimen.summary_text()}", resource=resource)


def delete_action(order: Mapping[str, Any], drug: str) -> Action:
    return Action("delete", f"Remove the selected {drug} order", resource_id=f"MedicationRequest/{order['id']}")


def lab_order(
    ctx: Context,
    lab_set: str,
    text: str,
    note: str,
    schedule: Schedule | None = None,
    duration: int | None = None,
    frequency_max: int | None = None,
) -> Action:
    resource = fhir_out.service_request(ctx.patient_id, lab_set, text, note, schedule, duration)
    if frequency_max is not None and "occurrenceTiming" in resource:
        resource["occurrenceTiming"]["repeat"]["frequencyMax"] = frequency_max
    return Action("create", f"Order {text}", resource=resource)


def missing_lines(items: Sequence[MissingItem]) -> list[str]:
    return [f"- **{item.label}**: {item.reason}" for item in items]


def missing_lab_suggestions(ctx: Context, items: Sequence[MissingItem]) -> list[Suggestion]:
    """policy.md §2: propose ordering a missing value where it is a lab."""
    return [
        Suggestion(
            f"Order {item.label}",
            (lab_order(ctx, item.lab_set, item.label, "Needed to dose the CMV antiviral (policy.md §2)"),),
            is_recommended=True,
        )
        for item in items
        if item.lab_set
    ]


def stale_suggestions(ctx: Context, stale: Sequence[StaleInput]) -> list[Suggestion]:
    """policy.md §2: a stale value is used, and a repeat of the test is proposed."""
    return [
        Suggestion(
            f"Repeat {item.label} (last {item.measurement.date.isoformat()})",
            (
                lab_order(
                    ctx,
                    item.lab_set,
                    item.label,
                    f"Last result is older than {item.window_days} days (policy.md §2)",
                ),
            ),
        )
        for item in stale
        if item.lab_set
    ]


def stale_lines(stale: Sequence[StaleInput], today: dt.date) -> list[str]:
    return [
        f"- ⚠ {item.label.capitalize()} is {item.measurement.age_days(today)} days old "
        f"(from {item.measurement.date.isoformat()}; window {item.window_days} days, policy.md §2): "
        "used, and a repeat is suggested."
        for item in stale
    ]


def _card(
    rule_id: str,
    summary: str,
    indicator: Indicator,
    detail: list[str],
    source_label: Any,
    suggestions: Sequence[Suggestion] = (),
    behavior: Literal["at-most-one", "any"] = "any",
) -> Card:
    return Card(
        rule_id=rule_id,
        summary=_summary(summary),
        indicator=indicator,
        detail="\n".join(detail),
        source=source_label,
        suggestions=tuple(suggestions),
        selection_behavior=behavior if suggestions else None,
    )


# --- draft order reading --------------------------------------------------------------------------

_TIMING_CODES: dict[str, float] = {  # doses per hour for common v3 GTSAbbreviation codes
    "QD": 1 / 24,
    "BID": 2 / 24,
    "TID": 3 / 24,
    "QID": 4 / 24,
    "QOD": 1 / 48,
    "Q8H": 1 / 8,
    "Q12H": 1 / 12,
    "Q24H": 1 / 24,
}
_PERIOD_HOURS = {"h": 1.0, "d": 24.0, "wk": 168.0, "min": 1 / 60, "s": 1 / 3600, "mo": 720.0}


def _as_dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


@dataclass(frozen=True)
class DraftDose:
    mg: float | None
    per_hour: float | None
    route: str


def read_draft_dose(order: Mapping[str, Any], weight_kg: float | None) -> DraftDose:
    """The dose (mg), frequency (doses/hour) and route of the draft's first dosage, where present."""
    dosages = order.get("dosageInstruction") or []
    dosage = dosages[0] if isinstance(dosages, list) and dosages and isinstance(dosages[0], dict) else {}
    mg: float | None = None
    for rate in dosage.get("doseAndRate") or []:
        quantity = rate.get("doseQuantity") if isinstance(rate, dict) else None
        if not isinstance(quantity, dict) or not isinstance(quantity.get("value"), int | float):
            continue
        unit = str(quantity.get("code") or quantity.get("unit") or "").strip().lower()
        value = float(quantity["value"])
        if unit == "mg":
            mg = value
        elif unit == "g":
            mg = value * 1000
        elif unit == "mg/kg" and weight_kg:
            mg = value * weight_kg
        break
    per_hour: float | None = None
    timing = _as_dict(dosage.get("timing"))
    repeat = _as_dict(timing.get("repeat"))
    period, period_unit = repeat.get("period"), repeat.get("periodUnit")
    if isinstance(period, int | float) and period > 0 and period_unit in _PERIOD_HOURS:
        frequency = repeat.get("frequency", 1)
        if isinstance(frequency, int | float) and frequency > 0:
            per_hour = frequency / (period * _PERIOD_HOURS[period_unit])
    else:
        for coding in _as_dict(timing.get("code")).get("coding") or []:
            if isinstance(coding, dict) and str(coding.get("code", "")).upper() in _TIMING_CODES:
                per_hour = _TIMING_CODES[str(coding["code"]).upper()]
    return DraftDose(mg=mg, per_hour=per_hour, route=medication_route(order))


def differences(draft: DraftDose, regimen: Regimen) -> list[str]:
    """What in the draft differs from the regimen (empty when it matches, policy.md §5 rounding)."""
    found = []
    tolerance = dosing.ROUNDING_MG[regimen.drug] / 2 if regimen.drug != "valganciclovir" else 0.0
    if draft.mg is None:
        found.append("no dose in mg")
    elif abs(draft.mg - regimen.exact_mg) > tolerance + 1e-9 and not math.isclose(draft.mg, regimen.dose_mg):
        found.append(f"dose {draft.mg:g} mg (computed {regimen.dose_mg:g} mg)")
    if draft.per_hour is None:
        found.append("no frequency")
    elif not math.isclose(draft.per_hour, regimen.schedule.doses_per_hour, rel_tol=1e-6):
        found.append(f"frequency differs (computed {regimen.schedule.text})")
    if draft.route != regimen.route:
        found.append(f"route {draft.route} (computed {_route_text(regimen.route)})")
    return found


def therapy_phase(ctx: Context, order: Mapping[str, Any], drug: Drug) -> Phase:
    """policy.md §1: induction unless the draft is explicitly maintenance or induction is complete."""
    texts: list[str] = []
    for dosage in order.get("dosageInstruction") or []:
        if isinstance(dosage, dict) and isinstance(dosage.get("text"), str):
            texts.append(dosage["text"])
    for note in order.get("note") or []:
        if isinstance(note, dict) and isinstance(note.get("text"), str):
            texts.append(note["text"])
    course = order.get("courseOfTherapyType")
    if isinstance(course, dict) and isinstance(course.get("text"), str):
        texts.append(course["text"])
    if any(_MAINTENANCE.search(text) for text in texts):
        return "maintenance"
    latest = ctx.facts.latest_viral_load
    started = [m.start for m in ctx.facts.medications_in(DRUG_SET[drug]) if not m.draft and m.start]
    if latest and latest.undetectable and started and (ctx.facts.today - min(started)).days >= MAINTENANCE_AFTER_DAYS:
        return "maintenance"
    return "induction"


# --- therapy history ------------------------------------------------------------------------------


def therapy_start(facts: PatientFacts, sets: Sequence[str]) -> dt.date | None:
    """Start of the current course: the earliest start of a chain of (val)ganciclovir orders that runs
    without a gap into an order active today."""
    orders = sorted(
        (m for m in facts.medications if not m.draft and m.start and any(s in m.sets for s in sets)),
        key=lambda m: m.start or dt.date.min,
    )
    active = [m for m in orders if m.active_on(facts.today)]
    if not active:
        return None
    start = min(m.start for m in active if m.start)
    for previous in reversed(orders):
        if (
            previous.start
            and previous.start < start
            and (previous.end is None or previous.end >= start - dt.timedelta(days=1))
        ):
            start = previous.start
    return start


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


def _vl_text(load: ViralLoad) -> str:
    if load.undetectable:
        value = "undetectable"
    elif load.iu_per_ml is not None:
        value = f"{load.iu_per_ml:,.0f} IU/mL"
    elif load.copies_per_ml is not None:
        value = f"{load.copies_per_ml:,.0f} copies/mL"
    else:
        value = "detected"
    return f"{value} on {load.date.isoformat()} ({load.source})"


# --- the main card for one selected order ------------------------------------------------------


def assess_order(ctx: Context, order: Mapping[str, Any], drug: Drug) -> list[Card]:
    """The main card for one selected CMV antiviral order, plus the order's follow-on cards."""
    phase = therapy_phase(ctx, order, drug)
    regimen = ctx.regimen(drug, phase)

    for rule in (myelosuppression, resistance, cns_combination, valganciclovir_to_iv):
        card = rule(ctx, order, drug, phase, regimen)
        if card is not None:
            return [card]
    if isinstance(regimen, Missing):
        return [missing_data_card(ctx, drug, regimen)]
    if isinstance(regimen, NotRecommended):
        return [not_recommended_card(order, drug, regimen)]
    cards = [dose_card(ctx, order, regimen)]
    if drug == "cidofovir":
        cards += cidofovir_adjuncts(ctx, regimen)
    cards += step_down(ctx, order, drug, regimen)
    return cards


def dose_card(ctx: Context, order: Mapping[str, Any], regimen: Regimen) -> Card:
    """Dose correction (``update``) when the draft differs; else the monitoring card (policy.md §7)."""
    weight = regimen.weight.kg if regimen.weight else None
    diffs = differences(read_draft_dose(order, weight), regimen)
    computation = computation_lines(regimen)
    extra = (
        [FOSCARNET_HYDRATION, "Alternative column: 60 mg/kg every 8 hours equivalents (label Table 13)."]
        if regimen.drug == "foscarnet"
        else []
    )
    renal = _renal_short(regimen)
    if not diffs:
        return monitoring_card(ctx, regimen, computation + stale_lines(regimen.stale, ctx.facts.today), extra)
    complete = diffs[:2] == ["no dose in mg", "no frequency"]
    summary = (
        f"{regimen.drug.capitalize()} for this patient: {regimen.dose_mg:g} mg {_route_text(regimen.route)} "
        f"{regimen.schedule.text} ({renal})"
        if complete
        else f"Adjust {regimen.drug}: {regimen.dose_mg:g} mg {_route_text(regimen.route)} "
        f"{regimen.schedule.text} ({renal})"
    )
    detail = [
        f"**Proposed:** {regimen.drug} {regimen_text(regimen)}.",
        "",
        f"**Selected order:** {'; '.join(diffs)}.",
        "",
        "**Computation**",
        *computation,
        *stale_lines(regimen.stale, ctx.facts.today),
        *(["", *extra] if extra else []),
        "",
        _BOLD_SOURCE + regimen.row.source,
    ]
    suggestions = [
        Suggestion(f"Update order: {regimen.summary_text()}", (update_action(order, regimen),), is_recommended=True),
        *stale_suggestions(ctx, regimen.stale),
    ]
    return _card("dose-adjust", summary, "warning", detail, LABEL[regimen.drug], suggestions)


def _renal_short(regimen: Regimen) -> str:
    if regimen.on_dialysis and regimen.row.hemodialysis:
        return "hemodialysis"
    if regimen.clearance is None:
        return "renal function not used"
    if dosing.CLEARANCE_UNIT[regimen.drug] == dosing.ML_MIN_KG:
        return f"CrCl {regimen.clearance.ml_min_kg:.2f} mL/min/kg"
    return f"CrCl {regimen.clearance.ml_min:.0f} mL/min"


def monitoring_suggestions(ctx: Context, regimen: Regimen) -> list[Suggestion]:
    """policy.md §7: weekly CMV PCR; CBC twice weekly in induction; foscarnet chemistry 2–3×/week;
    creatinine + urine protein before each cidofovir dose."""
    days = regimen.duration_days
    note = f"Monitoring during {regimen.drug} therapy (policy.md §7)"
    suggestions = [
        Suggestion(
            "CMV DNA PCR weekly",
            (lab_order(ctx, "CmvViralLoadIU", "CMV DNA viral load (PCR), weekly", note, WEEKLY, days),),
        ),
    ]
    if regimen.drug in ("ganciclovir", "valganciclovir"):
        cbc_schedule = TWICE_WEEKLY if regimen.phase == "induction" else WEEKLY
        suggestions.append(
            Suggestion(
                f"Blood counts {cbc_schedule.text} (neutrophils, platelets, hemoglobin)",
                tuple(
                    lab_order(ctx, lab, f"{label}, {cbc_schedule.text}", note, cbc_schedule, days)
                    for lab, label in (
                        ("NeutrophilCount", "Neutrophil count"),
                        ("PlateletCount", "Platelet count"),
                        ("Hemoglobin", "Hemoglobin"),
                    )
                ),
            )
        )
    if regimen.drug == "foscarnet":
        suggestions.append(
            Suggestion(
                "Creatinine and electrolytes 2–3 times weekly (Ca, Mg, K, phosphate)",
                tuple(
                    lab_order(
                        ctx,
                        lab,
                        f"{label}, 2–3 times weekly",
                        note,
                        CHEMISTRY_FOSCARNET,
                        days,
                        CHEMISTRY_FOSCARNET_MAX,
                    )
                    for lab, label in (
                        ("SerumCreatinine", "Serum creatinine"),
                        ("Calcium", "Serum calcium"),
                        ("Magnesium", "Serum magnesium"),
                        ("Potassium", "Serum potassium"),
                        ("Phosphate", "Serum phosphate"),
                    )
                ),
            )
        )
    if regimen.drug == "cidofovir":
        suggestions.append(
            Suggestion(
                "Creatinine and urine protein within 48 h before each dose",
                tuple(
                    lab_order(ctx, lab, f"{label} before each cidofovir dose", note, regimen.schedule, days)
                    for lab, label in (
                        ("SerumCreatinine", "Serum creatinine"),
                        ("UrineProtein", "Urine protein"),
                    )
                ),
            )
        )
    return suggestions


def monitoring_card(ctx: Context, regimen: Regimen, computation: list[str], extra: list[str]) -> Card:
    detail = [
        f"The selected order matches the computed regimen: {regimen.drug} {regimen_text(regimen)}.",
        "",
        "**Monitoring** (policy.md §7): weekly CMV DNA PCR"
        + (
            "; CBC twice weekly during induction, weekly after"
            if regimen.drug in ("ganciclovir", "valganciclovir")
            else ""
        )
        + ("; creatinine, Ca, Mg, K, phosphate 2–3 times weekly in induction" if regimen.drug == "foscarnet" else "")
        + ("; creatinine and urine protein within 48 h before each dose" if regimen.drug == "cidofovir" else "")
        + ("; ophthalmology for CMV retinitis" if "retinitis" in ctx.facts.manifestations else "")
        + ".",
        "",
        "**Computation**",
        *computation,
        *(["", *extra] if extra else []),
        "",
        _BOLD_SOURCE + regimen.row.source,
    ]
    suggestions = [*monitoring_suggestions(ctx, regimen), *stale_suggestions(ctx, regimen.stale)]
    return _card(
        "dose-confirmed-monitoring",
        f"{regimen.drug.capitalize()} dose fits ({_renal_short(regimen)}); order monitoring labs",
        "info",
        detail,
        LABEL[regimen.drug],
        suggestions,
    )


def missing_data_card(ctx: Context, drug: Drug, missing: Missing) -> Card:
    labels = ", ".join(item.label for item in missing.items)
    detail = [
        f"No {drug} dose is proposed: the dose needs values that are missing or unusable (policy.md §2).",
        "",
        *missing_lines(missing.items),
        "",
        *(["Record a current body weight."] if any(i.label == "body weight" for i in missing.items) else []),
        *(["The missing labs can be ordered below."] if any(i.lab_set for i in missing.items) else []),
        "",
        _BOLD_SOURCE + "policy.md §2 (data selection); the label's renal dosing table",
    ]
    return _card(
        "dose-missing-data",
        f"{drug.capitalize()} dose not computed: missing {labels}",
        "warning",
        detail,
        LABEL[drug],
        missing_lab_suggestions(ctx, missing.items),
    )


def not_recommended_card(order: Mapping[str, Any], drug: Drug, verdict: NotRecommended) -> Card:
    if drug == "cidofovir":
        summary = f"Cidofovir contraindicated: {verdict.reason}"
        rule = "cidofovir-contraindicated"
    else:
        summary = f"{drug.capitalize()} not recommended at this renal function (label)"
        rule = f"{drug}-not-recommended"
    detail = [
        f"**{drug.capitalize()} is not recommended for this patient.** {verdict.reason}.",
        "",
        *[f"- {line}" for line in verdict.inputs],
    ]
    if drug == "foscarnet":
        detail += [
            "",
            "Hemodialysis has no label foscarnet dose; some centres use off-label post-dialysis dosing "
            "(clinical.md §3.2) — not proposed here.",
        ]
    detail += ["", _BOLD_SOURCE + verdict.source]
    suggestion = Suggestion(f"Remove the {drug} order", (delete_action(order, drug),), is_recommended=True)
    return _card(rule, summary, "critical", detail, LABEL[drug], [suggestion])


# --- steering rules (policy.md §6) ------------------------------------------------------------------


def _alternative_unavailable(alt: Missing | NotRecommended) -> list[str]:
    if isinstance(alt, Missing):
        return ["", "The alternative could not be dosed:", *missing_lines(alt.items)]
    return ["", f"The alternative ({alt.drug}) is not recommended either: {alt.reason} ({alt.source})."]


def _foscarnet_proposal(lead: str, alternative: Regimen) -> list[str]:
    """Detail lines proposing foscarnet in place of (val)ganciclovir: the regimen, how it was computed, and
    the hydration the label requires."""
    return [
        f"{lead}foscarnet {regimen_text(alternative)}.",
        "",
        "**Computation**",
        *computation_lines(alternative),
        "",
        FOSCARNET_HYDRATION,
    ]


def myelosuppression(ctx: Context, order: Mapping[str, Any], drug: Drug, phase: Phase, regimen: Any) -> Card | None:
    """(Val)ganciclovir with ANC < 500/µL, platelets < 25,000/µL or Hb < 8 g/dL → critical, foscarnet."""
    if drug not in ("ganciclovir", "valganciclovir"):
        return None
    facts = ctx.facts
    low = []
    for label, value, threshold, unit in (
        ("ANC", facts.anc, ANC_MIN_PER_UL, "cells/µL"),
        ("Platelets", facts.platelets, PLATELETS_MIN_PER_UL, "/µL"),
        ("Hemoglobin", facts.hemoglobin, HEMOGLOBIN_MIN_G_DL, "g/dL"),
    ):
        if isinstance(value, Measurement) and value.value < threshold:
            stale = " (stale)" if value.stale else ""
            low.append(
                f"{label} {value.value:,.4g} {unit} < {threshold:,.4g} "
                f"on {value.date.isoformat()} ({value.source}){stale}"
            )
    if not low:
        return None
    alternative = ctx.regimen("foscarnet", phase)
    detail = [
        f"**Avoid {drug}:** the label says it should be avoided below these counts "
        "(clinical.md §1.4, §2.4; policy.md §6).",
        *[f"- {line}" for line in low],
    ]
    suggestions = []
    if isinstance(alternative, Regimen):
        detail += ["", *_foscarnet_proposal("**Proposed instead:** ", alternative)]
        suggestions.append(
            Suggestion(
                f"Replace with foscarnet {alternative.dose_mg:g} mg IV {alternative.schedule.text}",
                (delete_action(order, drug), create_action(ctx, alternative)),
                is_recommended=True,
            )
        )
        summary = (
            f"Avoid {drug}: {low[0].split(' on ')[0]}; "
            f"foscarnet {alternative.dose_mg:g} mg IV {alternative.schedule.text}"
        )
    else:
        detail += _alternative_unavailable(alternative)
        summary = f"Avoid {drug}: {low[0].split(' on ')[0]} (label threshold)"
    detail += ["", _BOLD_SOURCE + "clinical.md §1.4 / §2.4 (label §5.1); policy.md §6"]
    return _card("myelosuppression", summary, "critical", detail, LABEL[drug], suggestions)


def resistance(ctx: Context, order: Mapping[str, Any], drug: Drug, phase: Phase, regimen: Any) -> Card | None:
    """Suspected resistance (policy.md §6): reported UL97/UL54 mutation, or ≥ 14 days on (val)ganciclovir
    with the latest viral load not lower than at the start → genotype testing + foscarnet."""
    if drug not in ("ganciclovir", "valganciclovir"):
        return None
    facts = ctx.facts
    reasons = []
    if facts.resistance is not None:
        reasons.append(f"{facts.resistance.label} ({facts.resistance.source})")
    start = therapy_start(facts, ("Ganciclovir", "Valganciclovir"))
    if start is not None and (facts.today - start).days >= RESISTANCE_MIN_THERAPY_DAYS:
        trend = viral_load_trend(facts, start)
        if trend is not None and trend[3] >= trend[2] > 0:
            reasons.append(
                f"on (val)ganciclovir since {start.isoformat()} ({(facts.today - start).days} days) and the viral load "
                f"is not lower: {_vl_text(trend[0])} → {_vl_text(trend[1])}"
            )
    if not reasons:
        return None
    genotype = Action(
        "create",
        "Order CMV UL97/UL54 genotypic resistance testing",
        resource=fhir_out.uncoded_service_request(
            ctx.patient_id,
            "CMV genotypic antiviral resistance testing (UL97 and UL54)",
            "Suspected ganciclovir resistance (policy.md §6; clinical.md §6.4). "
            "The reference has no LOINC code for this test.",
        ),
    )
    alternative = ctx.regimen("foscarnet", phase)
    detail = ["**Suspected ganciclovir resistance** (policy.md §6):", *[f"- {r}" for r in reasons], ""]
    suggestions = []
    if isinstance(alternative, Regimen):
        detail += _foscarnet_proposal("**Proposed:** genotypic resistance testing and ", alternative)
        suggestions.append(
            Suggestion(
                f"Genotype and switch to foscarnet {alternative.dose_mg:g} mg IV {alternative.schedule.text}",
                (delete_action(order, drug), create_action(ctx, alternative), genotype),
                is_recommended=True,
            )
        )
    else:
        detail += _alternative_unavailable(alternative)
    suggestions.append(Suggestion("Order genotypic resistance testing only", (genotype,)))
    detail += ["", _BOLD_SOURCE + "policy.md §6; clinical.md §6.4 (Kotton 2025; UCSF foscarnet guidance)"]
    return _card(
        "resistance",
        "Suspected ganciclovir-resistant CMV: genotype UL97/UL54 and consider foscarnet",
        "warning",
        detail,
        KOTTON_2025,
        suggestions,
        behavior="at-most-one",
    )


def cns_combination(ctx: Context, order: Mapping[str, Any], drug: Drug, phase: Phase, regimen: Any) -> Card | None:
    """CNS disease (policy.md §6; seeds): ganciclovir plus foscarnet together."""
    if "cns" not in ctx.facts.manifestations or drug == "cidofovir":
        return None
    needs_gcv = drug != "ganciclovir" and not ctx.already_ordered("Ganciclovir")
    needs_fos = drug != "foscarnet" and not ctx.already_ordered("Foscarnet")
    if not needs_gcv and not needs_fos and drug != "valganciclovir":
        return None  # both drugs are already ordered: each is dose-checked on its own
    gcv = ctx.regimen("ganciclovir", phase)
    fos = ctx.regimen("foscarnet", phase)
    evidence = ctx.facts.manifestations["cns"]
    detail = [
        f"**CNS CMV disease** ({evidence.label}, {evidence.source}): combination IV ganciclovir + IV foscarnet is "
        "preferred as initial therapy despite more adverse effects (seeds; clinical.md §6.1; policy.md §6).",
        "",
    ]
    actions: list[Action] = []
    if drug == "valganciclovir":
        actions.append(delete_action(order, drug))
    partners: tuple[tuple[Drug, Regimen | Missing | NotRecommended], ...] = (("ganciclovir", gcv), ("foscarnet", fos))
    missing_labs: list[Suggestion] = []
    for name, reg in partners:
        if name != drug and ctx.already_ordered(DRUG_SET[name]):
            continue  # already ordered: that order is dose-checked on its own
        if not isinstance(reg, Regimen):
            detail += _alternative_unavailable(reg)
            missing_labs = missing_lab_suggestions(ctx, reg.items) if isinstance(reg, Missing) else []
            actions = []
            break
        detail += [f"**{name.capitalize()}:** {regimen_text(reg)}.", *computation_lines(reg), ""]
        actions.append(update_action(order, reg) if name == drug else create_action(ctx, reg))
    if isinstance(fos, Regimen):
        detail.append(FOSCARNET_HYDRATION)
    detail += [
        "",
        _BOLD_SOURCE + "seeds (CMV treatment); clinical.md §6.1 (NIH OI, neurologic disease); policy.md §6",
    ]
    suggestions = (
        [Suggestion("Ganciclovir + foscarnet (combination)", tuple(actions), is_recommended=True)]
        if actions
        else missing_labs
    )
    return _card(
        "cns-combination",
        "CNS CMV disease: give IV ganciclovir plus IV foscarnet together",
        "warning",
        detail,
        NIH_OI,
        suggestions,
    )


def steer_reasons(ctx: Context) -> list[str]:
    """policy.md §6 reasons not to start oral valganciclovir (CNS is handled by its own rule)."""
    facts = ctx.facts
    reasons = []
    if facts.severe is not None:
        reasons.append(f"severe or life-threatening disease ({facts.severe.source})")
    if "pneumonitis" in facts.manifestations:
        reasons.append(f"CMV pneumonitis ({facts.manifestations['pneumonitis'].source})")
    if facts.malabsorption is not None:
        reasons.append(f"impaired GI absorption: {facts.malabsorption.label} ({facts.malabsorption.source})")
    elif "gastrointestinal" in facts.manifestations and facts.severe is not None:
        reasons.append("severe CMV gastrointestinal disease (absorption in doubt)")
    latest = facts.latest_viral_load
    if latest and latest.iu_per_ml is not None and latest.iu_per_ml >= ctx.options.high_viral_load_iu_ml:
        reasons.append(
            f"viral load {latest.iu_per_ml:,.0f} IU/mL ≥ {ctx.options.high_viral_load_iu_ml:,.0f} IU/mL "
            f"(institutional threshold CMV_CDS_HIGH_VIRAL_LOAD_IU_ML, policy.md §6; {latest.source})"
        )
    if facts.dialysis is not None:
        reasons.append(f"dialysis ({facts.dialysis.source}): the label says valganciclovir should not be used")
    return reasons


def valganciclovir_to_iv(ctx: Context, order: Mapping[str, Any], drug: Drug, phase: Phase, regimen: Any) -> Card | None:
    """Oral valganciclovir steered to IV ganciclovir, renally dosed (policy.md §6)."""
    if drug != "valganciclovir":
        return None
    reasons = (
        steer_reasons(ctx)
        if phase == "induction"
        else ([f"dialysis ({ctx.facts.dialysis.source})"] if ctx.facts.dialysis else [])
    )
    if isinstance(regimen, NotRecommended):
        reasons.append(f"valganciclovir not recommended: {regimen.reason}")
    if not reasons:
        return None
    critical = ctx.facts.dialysis is not None or isinstance(regimen, NotRecommended)
    gcv = ctx.regimen("ganciclovir", phase)
    detail = [
        "**Oral valganciclovir is not advised as initial therapy here** (policy.md §6):",
        *[f"- {r}" for r in reasons],
        "",
    ]
    suggestions = []
    if isinstance(gcv, Regimen):
        detail += [
            f"**Proposed instead:** ganciclovir {regimen_text(gcv)}.",
            "",
            "**Computation**",
            *computation_lines(gcv),
            *stale_lines(gcv.stale, ctx.facts.today),
        ]
        suggestions.append(
            Suggestion(
                f"Replace with ganciclovir {gcv.dose_mg:g} mg IV {gcv.schedule.text}",
                (delete_action(order, drug), create_action(ctx, gcv)),
                is_recommended=True,
            )
        )
        suggestions += stale_suggestions(ctx, gcv.stale)
        summary = f"Use IV ganciclovir {gcv.dose_mg:g} mg {gcv.schedule.text} instead of oral valganciclovir"
    else:
        detail += _alternative_unavailable(gcv)
        suggestions += missing_lab_suggestions(ctx, gcv.items) if isinstance(gcv, Missing) else []
        summary = "Use IV ganciclovir instead of oral valganciclovir (dose needs missing data)"
    detail += [
        "",
        _BOLD_SOURCE + "policy.md §6; clinical.md §2.2 (label, hemodialysis) and §6.1 (Kotton 2025)",
    ]
    return _card(
        "valganciclovir-to-iv",
        summary,
        "critical" if critical else "warning",
        detail,
        LABEL["valganciclovir"],
        suggestions,
    )


# --- follow-on cards ------------------------------------------------------------------------------


def cidofovir_adjuncts(ctx: Context, regimen: Regimen) -> list[Card]:
    """Probenecid (2 g 3 h before; 1 g at 2 h and 8 h after) and 1 L saline before each dose, each its own
    MedicationRequest (policy.md §5; clinical.md §4)."""
    if ctx.already_ordered("Probenecid"):
        return []
    schedule = regimen.schedule
    days, count = regimen.duration_days, regimen.count
    probenecid = fhir_out.new_medication_request(
        ctx.patient_id,
        fhir_out.medication_concept("Probenecid"),
        [
            fhir_out.DoseSpec(
                "probenecid 2 g PO 3 hours before each cidofovir dose",
                2000,
                "mg",
                schedule,
                "oral",
                days,
                count,
                sequence=1,
            ),
            fhir_out.DoseSpec(
                "probenecid 1 g PO 2 hours after the end of each cidofovir infusion",
                1000,
                "mg",
                schedule,
                "oral",
                days,
                count,
                sequence=2,
            ),
            fhir_out.DoseSpec(
                "probenecid 1 g PO 8 hours after the end of each cidofovir infusion",
                1000,
                "mg",
                schedule,
                "oral",
                days,
                count,
                sequence=3,
            ),
        ],
        "With each cidofovir dose (clinical.md §4; policy.md §5). No verified RxNorm code in the reference.",
    )
    saline = fhir_out.new_medication_request(
        ctx.patient_id,
        {"text": "sodium chloride 0.9% injection"},
        [
            fhir_out.DoseSpec(
                "1 L 0.9% sodium chloride IV over 1–2 hours immediately before each cidofovir dose",
                1000,
                "mL",
                schedule,
                "iv",
                days,
                count,
            )
        ],
        "Prehydration with each cidofovir dose (clinical.md §4; policy.md §5). No RxNorm code in the reference.",
    )
    detail = [
        "Cidofovir must be given with **probenecid** and **IV saline prehydration** with each infusion (label):",
        "- Probenecid 2 g PO 3 h before, then 1 g at 2 h and 1 g at 8 h after the end of the infusion (4 g per dose).",
        "- 1 L 0.9% saline IV over 1–2 h immediately before; a second litre with or after the infusion if tolerated.",
        "",
        _BOLD_SOURCE + "clinical.md §4 (Vistide label D&A); policy.md §5",
    ]
    suggestion = Suggestion(
        "Order probenecid and saline prehydration with each cidofovir dose",
        (
            Action("create", "Order probenecid with each cidofovir dose", resource=probenecid),
            Action("create", "Order 1 L normal saline before each cidofovir dose", resource=saline),
        ),
        is_recommended=True,
    )
    return [
        _card(
            "cidofovir-probenecid-hydration",
            "Cidofovir needs probenecid and saline prehydration with each dose",
            "warning",
            detail,
            LABEL["cidofovir"],
            [suggestion],
        )
    ]


def step_down(ctx: Context, order: Mapping[str, Any], drug: Drug, regimen: Regimen) -> list[Card]:
    """IV → oral step-down (policy.md §6): ≥ 3 days of IV ganciclovir, falling viral load, no steer reason."""
    if drug != "ganciclovir" or steer_reasons(ctx) or "cns" in ctx.facts.manifestations or ctx.facts.pregnancy:
        return []
    iv_orders = [m for m in ctx.facts.medications_in("Ganciclovir") if not m.draft and m.start and m.route != "oral"]
    if not iv_orders:
        return []
    start = min(m.start for m in iv_orders if m.start)
    if (ctx.facts.today - start).days < STEP_DOWN_MIN_IV_DAYS:
        return []
    trend = viral_load_trend(ctx.facts, start)
    if trend is None or not trend[3] < trend[2]:
        return []
    oral = ctx.regimen("valganciclovir", regimen.phase)
    if not isinstance(oral, Regimen):
        return []
    detail = [
        f"IV ganciclovir since {start.isoformat()} ({(ctx.facts.today - start).days} days) "
        "and the viral load is falling: "
        f"{_vl_text(trend[0])} → {_vl_text(trend[1])}. If the patient is improving and absorbing oral medication, "
        f"valganciclovir {regimen_text(oral)} can complete the course (seeds; policy.md §6).",
        "",
        "**Computation**",
        *computation_lines(oral),
        "",
        _BOLD_SOURCE + "seeds (transition after 3–5 days of IV therapy); policy.md §6; clinical.md §2.2",
    ]
    suggestion = Suggestion(
        f"Step down to valganciclovir {oral.dose_mg:g} mg PO {oral.schedule.text}",
        (delete_action(order, drug), create_action(ctx, oral)),
    )
    return [
        _card(
            "iv-to-oral-step-down",
            f"Consider oral valganciclovir {oral.dose_mg:g} mg {oral.schedule.text} step-down",
            "info",
            detail,
            KOTTON_2025,
            [suggestion],
        )
    ]


# --- patient-level cards ------------------------------------------------------------------------------


def pediatric_card(age: int) -> Card:
    """policy.md §1: under 18 → one info card, no dose."""
    return _card(
        "pediatric",
        "CMV antiviral dosing for patients under 18 is not supported; no dose proposed",
        "info",
        [
            f"The patient is {age} years old. This service doses adults (18 years and over) only (policy.md §1); "
            "use pediatric dosing references."
        ],
        PRODUCT_POLICY,
    )


def pregnancy_card(ctx: Context, drugs: set[Drug]) -> Card | None:
    """policy.md §6 / clinical.md §1.6, §2.4: fetal toxicity; contraception 30 days (women), 90 days (men)."""
    teratogenic: list[Drug] = sorted(drugs & {"ganciclovir", "valganciclovir", "cidofovir"})
    if not teratogenic or ctx.facts.pregnancy is None:
        return None
    evidence = ctx.facts.pregnancy
    names = " / ".join(teratogenic)
    detail = [
        f"**Pregnancy** ({evidence.label}, {evidence.source}"
        + (f", {evidence.date.isoformat()}" if evidence.date else "")
        + f"). {names.capitalize()}: boxed warning for "
        "fetal toxicity, impaired fertility, mutagenesis and carcinogenesis.",
        "",
        "- Weigh the benefit against fetal risk; involve infectious diseases and obstetrics.",
        "- Contraception after treatment: **women ≥ 30 days**; **men (barrier) ≥ 90 days** (label §8.3).",
        "",
        _BOLD_SOURCE + "clinical.md §1.6, §2.4; policy.md §6",
    ]
    drug0: Drug = teratogenic[0]
    return _card(
        "pregnancy",
        f"Pregnancy: {names} is fetotoxic (boxed warning); confirm benefit outweighs risk",
        "critical",
        detail,
        LABEL[drug0],
    )


_INTERACTIONS: tuple[tuple[str, str], ...] = (
    ("ImipenemCilastatin", "generalized seizures; do not combine unless the benefit outweighs the risk"),
    ("Mycophenolate", "additive myelosuppression; monitor CBC"),
    ("Zidovudine", "additive myelosuppression; monitor CBC"),
    ("MyelosuppressiveDrugs", "additive hematologic toxicity; monitor CBC and creatinine"),
    ("NephrotoxicDrugs", "additive nephrotoxicity; monitor creatinine"),
    (
        "Probenecid",
        "reduces ganciclovir renal clearance (AUC about +53%); monitor for toxicity, consider a lower dose",
    ),
    ("Didanosine", "didanosine exposure rises (AUC +38–70%); monitor for didanosine toxicity"),
)


def interactions_card(ctx: Context, drugs: set[Drug]) -> Card | None:
    """clinical.md §1.7 / §2.4: interactions of (val)ganciclovir with active medications and other drafts."""
    if not drugs & {"ganciclovir", "valganciclovir"}:
        return None
    found: list[str] = []
    seen: set[str] = set()
    for set_name, effect in _INTERACTIONS:
        for med in ctx.facts.medications_in(set_name):
            if med.source in seen or med.sets & {"Ganciclovir", "Valganciclovir", "Foscarnet", "Cidofovir"}:
                continue
            seen.add(med.source)
            found.append(f"- **{med.name}** ({'draft order' if med.draft else med.status}, {med.source}): {effect}")
    if not found:
        return None
    detail = [
        "**Interactions with ganciclovir/valganciclovir** (label §7):",
        *found,
        "",
        _BOLD_SOURCE + "clinical.md §1.7 (label §7 Table 6, §12.3) and §2.4",
    ]
    seizures = any("seizures" in line for line in found)
    summary = (
        "Imipenem-cilastatin with ganciclovir: seizure risk"
        if seizures
        else f"{len(found)} interacting medication(s) with ganciclovir: monitor CBC and creatinine"
    )
    return _card("interactions", summary, "warning", detail, LABEL["ganciclovir"])


def adjunctive_cards(ctx: Context) -> list[Card]:
    """Information only, no orders: reduce immunosuppression, ART in HIV, IVIG for pneumonitis,
    ophthalmology for retinitis (seeds; clinical.md §6.1, §6.5)."""
    facts = ctx.facts
    cards = []
    immunosuppressants = facts.medications_in("Immunosuppressants")
    if (facts.transplant or immunosuppressants) and facts.severe:
        on = ", ".join(sorted({m.name for m in immunosuppressants})) or "transplant recipient"
        cards.append(
            _card(
                "reduce-immunosuppression",
                "Severe CMV with immunosuppression: consider reducing immunosuppression",
                "info",
                [
                    f"Immunosuppressed ({on}) with severe CMV disease ({facts.severe.source}): reducing or stopping "
                    "immunosuppressive therapy should be considered when possible (seeds; clinical.md §6.5). "
                    "No order is proposed: this is the transplant team's decision.",
                    "",
                    _BOLD_SOURCE + "seeds; clinical.md §6.2, §6.5 (Kotton 2025)",
                ],
                KOTTON_2025,
            )
        )
    if facts.hiv:
        cards.append(
            _card(
                "art-hiv",
                "HIV with CMV disease: start or optimise antiretroviral therapy",
                "info",
                [
                    f"HIV infection ({facts.hiv.source}): initiate or optimise ART concurrently with CMV treatment "
                    "(seeds; clinical.md §6.1).",
                    "",
                    _BOLD_SOURCE + "seeds; clinical.md §6.1 (NIH OI guidelines)",
                ],
                NIH_OI,
            )
        )
    if "pneumonitis" in facts.manifestations:
        cards.append(
            _card(
                "ivig-pneumonitis",
                "CMV pneumonitis: adjunctive IVIG may be considered",
                "info",
                [
                    f"CMV pneumonitis ({facts.manifestations['pneumonitis'].source}): adjunctive IV "
                    "immunoglobulin can be given, typically every other day for 3 to 5 doses (seeds); "
                    "evidence of benefit is limited (clinical.md "
                    "§6.5). No order is proposed.",
                    "",
                    _BOLD_SOURCE + "seeds; clinical.md §6.5",
                ],
                KOTTON_2025,
            )
        )
    if "retinitis" in facts.manifestations:
        cards.append(
            _card(
                "ophthalmology-retinitis",
                "CMV retinitis: ophthalmology examination and follow-up",
                "info",
                [
                    f"CMV retinitis ({facts.manifestations['retinitis'].source}): ophthalmologic examination "
                    "now and regular "
                    "follow-up even after successful treatment (seeds; clinical.md §2.4, §6.1).",
                    "",
                    _BOLD_SOURCE + "seeds; clinical.md §6.1",
                ],
                NIH_OI,
            )
        )
    return cards


__all__ = [
    "Context",
    "MedicationFact",
    "Options",
    "adjunctive_cards",
    "assess_order",
    "interactions_card",
    "pediatric_card",
    "pregnancy_card",
]
