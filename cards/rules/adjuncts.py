"""Adjuncts and information beside the main card: cidofovir's probenecid and saline, IV → oral step-down,
interactions, and the guideline advice that comes with CMV disease (no orders for the last group)."""

from __future__ import annotations

import datetime as dt

from cards import fhir_out
from cards.model import Action, Card, Source, Suggestion
from cards.orders import OrderFact
from cards.regimen import Regimen
from cards.rules.common import (
    Context,
    card,
    computation_lines,
    create_action,
    delete_action,
    regimen_text,
    viral_load_trend,
    vl_text,
)
from cards.rules.steering import steer_reasons
from cards.sources import KOTTON_2025, LABELS, NIH_OI, SEED_DISSEMINATED, SEED_IMMUNOCOMPETENT, policy, source_line
from cards.therapy import CONTINUOUS_GAP_DAYS, current_course

# docs/policy.md §9: IV → oral step-down after ≥ 3 days of IV ganciclovir.
STEP_DOWN_MIN_IV_DAYS = 3
# A MedicationRequest of status "draft" on the record counts as drafted in this ordering session when its
# authoredOn is today or yesterday (a session that spans midnight; tomorrow too, as a time written in a zone ahead
# of the server's reads); an older draft was left unsigned, and one with no authoredOn, or dated further ahead,
# cannot be placed in this session.
SESSION_DRAFT_DAYS = 1


def cidofovir_adjuncts(ctx: Context, order: OrderFact) -> list[Card]:
    """Probenecid (2 g 3 h before; 1 g at 2 h and 8 h after) and 1 L saline before each dose, each its own
    MedicationRequest (Vistide label, Dosage and Administration; docs/policy.md §6)."""
    if order.drug != "cidofovir":
        return []
    # A probenecid drafted in this session is the clinician ordering it; an older one (for gout) is not this regimen,
    # nor is a draft left on the record from an earlier day: those doses would go without probenecid.
    today = ctx.facts.today
    probenecid_drafted = any(
        "Probenecid" in m.sets
        and (
            m.draft
            or (
                m.status == "draft"
                and m.authored is not None
                and today - dt.timedelta(days=SESSION_DRAFT_DAYS) <= m.authored <= today + dt.timedelta(days=1)
            )
        )
        for m in ctx.facts.medications
    )
    regimen = ctx.regimen("cidofovir", ctx.phase("cidofovir", order))
    if not isinstance(regimen, Regimen):
        return []
    schedule, days, count = regimen.schedule, regimen.duration_days, regimen.count

    def probenecid_dose(text: str, mg: float, sequence: int) -> fhir_out.DoseSpec:
        return fhir_out.DoseSpec(text, mg, "mg", schedule, "oral", days, count, sequence=sequence)

    probenecid = fhir_out.new_medication_request(
        ctx.patient_id,
        fhir_out.medication_concept("Probenecid"),
        [
            probenecid_dose("probenecid 2 g PO 3 hours before each cidofovir dose", 2000, 1),
            probenecid_dose("probenecid 1 g PO 2 hours after the end of each cidofovir infusion", 1000, 2),
            probenecid_dose("probenecid 1 g PO 8 hours after the end of each cidofovir infusion", 1000, 3),
        ],
        f"With each cidofovir dose (Vistide label, Dosage and Administration; {policy(6)}).",
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
        f"Prehydration with each cidofovir dose (Vistide label, Dosage and Administration; {policy(6)}).",
    )
    label = LABELS["cidofovir"].section("Dosage and Administration")
    detail = [
        "Cidofovir must be given with **probenecid** and **IV saline prehydration** with each infusion (label):",
        "- Probenecid 2 g PO 3 h before, then 1 g at 2 h and 1 g at 8 h after the end of the infusion (4 g per dose).",
        "- 1 L 0.9% saline IV over 1–2 h immediately before; a second litre with or after the infusion if tolerated.",
        "",
        source_line(label, policy(6)),
    ]
    saline_action = Action("create", "Order 1 L normal saline before each cidofovir dose", resource=saline)
    if probenecid_drafted:
        detail[-1:-1] = ["Probenecid is drafted with this order: check it follows this schedule.", ""]
        suggestion = Suggestion("Order saline prehydration with each cidofovir dose", (saline_action,), True)
    else:
        suggestion = Suggestion(
            "Order probenecid and saline prehydration with each cidofovir dose",
            (Action("create", "Order probenecid with each cidofovir dose", resource=probenecid), saline_action),
            is_recommended=True,
        )
    return [
        card(
            "cidofovir-probenecid-hydration",
            "Cidofovir needs probenecid and saline prehydration with each dose",
            "warning",
            detail,
            label,
            [suggestion],
        )
    ]


def step_down(ctx: Context, order: OrderFact) -> list[Card]:
    """IV → oral step-down (docs/policy.md §9; seeds: transition after 3–5 days of IV therapy): ≥ 3 days of IV
    ganciclovir, a falling viral load, no reason to stay IV."""
    facts = ctx.facts
    if order.drug != "ganciclovir" or steer_reasons(ctx) or "cns" in facts.manifestations or facts.pregnancy:
        return []
    iv = [m for m in facts.medications if m.route != "oral"]
    course = current_course(iv, ("Ganciclovir",), facts.today, CONTINUOUS_GAP_DAYS)
    if course is None or not course.ongoing(facts.today):
        return []
    days = (facts.today - course.start).days
    if days < STEP_DOWN_MIN_IV_DAYS:
        return []
    trend = viral_load_trend(facts, course.start)
    if trend is None or not trend[3] < trend[2]:
        return []
    oral = ctx.regimen("valganciclovir", ctx.phase("valganciclovir"))
    if not isinstance(oral, Regimen):
        return []
    detail = [
        f"IV ganciclovir since {course.start.isoformat()} ({days} days) and the viral load is falling: "
        f"{vl_text(trend[0])} → {vl_text(trend[1])}. If the patient is improving and absorbing oral medication, "
        f"valganciclovir {regimen_text(oral)} can complete the course.",
        "",
        "**Computation**",
        *computation_lines(oral),
        "",
        source_line(SEED_DISSEMINATED, KOTTON_2025, LABELS["valganciclovir"].section("§2.5 Table 2"), policy(9)),
    ]
    suggestion = Suggestion(
        f"Step down to valganciclovir {oral.dose_mg:g} mg PO {oral.schedule.text}",
        (delete_action(order), create_action(ctx, oral)),
    )
    return [
        card(
            "iv-to-oral-step-down",
            f"Consider oral valganciclovir {oral.dose_mg:g} mg {oral.schedule.text} step-down",
            "info",
            detail,
            KOTTON_2025,
            [suggestion],
        )
    ]


# Interactions of (val)ganciclovir (label §7): the drug set and the effect the card states.
INTERACTIONS: tuple[tuple[str, str], ...] = (
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
_ANTIVIRAL_SETS = frozenset({"Ganciclovir", "Valganciclovir", "Foscarnet", "Cidofovir"})


def interactions(ctx: Context) -> list[Card]:
    """Interactions of (val)ganciclovir with active medications and other drafts (labels §7)."""
    selected = sorted(ctx.selected_drugs & {"ganciclovir", "valganciclovir"})
    if not selected:
        return []
    found: list[str] = []
    seen: set[str] = set()
    for set_name, effect in INTERACTIONS:
        for med in ctx.facts.medications_in(set_name):
            if med.source in seen or not med.sets.isdisjoint(_ANTIVIRAL_SETS):
                continue
            seen.add(med.source)
            found.append(f"- **{med.name}** ({'draft order' if med.draft else med.status}, {med.source}): {effect}")
    if not found:
        return []
    names = " and ".join(selected)
    labels = [LABELS[drug].section("§7 Drug Interactions") for drug in selected]
    detail = [f"**Interactions with {names}:**", *found, "", source_line(*labels)]
    seizures = any("seizures" in line for line in found)
    summary = (
        f"Imipenem-cilastatin with {names}: seizure risk"
        if seizures
        else f"{len(found)} interacting medication(s) with {names}: monitor CBC and creatinine"
    )
    return [card("interactions", summary, "warning", detail, labels[0])]


def _info(rule_id: str, summary: str, text: str, source: Source, *cited: Source | str) -> list[Card]:
    """An information-only card: no orders (the decision belongs to the treating team)."""
    return [card(rule_id, summary, "info", [text, "", source_line(source, *cited)], source)]


def reduce_immunosuppression(ctx: Context) -> list[Card]:
    """Whenever an immunosuppressant is active (docs/policy.md §15; seed cmv-treatment-disseminated: "discontinuation
    of immunosuppressive therapy should be considered when possible"; strongly recommended in severe disease)."""
    facts = ctx.facts
    drugs = sorted({m.name for m in facts.medications_in("Immunosuppressants") if not m.draft})
    if not drugs and not (facts.transplant and facts.severe):
        return []
    who = ", ".join(
        part
        for part in (
            f"transplant recipient ({facts.transplant.source})" if facts.transplant else "",
            f"HIV ({facts.hiv.source})" if facts.hiv else "",
        )
        if part
    )
    on = f"on {', '.join(drugs)}" if drugs else "transplant recipient"
    if facts.severe is not None:
        text = (
            f"Immunosuppressed ({on}{'; ' + who if who and drugs else ''}) with severe CMV disease "
            f"({facts.severe.source}): discontinuing or reducing immunosuppressive therapy is strongly recommended "
            "where possible."
        )
    else:
        text = (
            f"Immunosuppressed ({on}{'; ' + who if who else ''}): reducing or stopping immunosuppressive therapy "
            "should be considered where possible."
        )
    text += " No order is proposed: this is the treating team's decision."
    summary = (
        "Severe CMV with immunosuppression: consider reducing immunosuppression"
        if facts.severe
        else "CMV on immunosuppressive therapy: consider reducing immunosuppression"
    )
    return _info("reduce-immunosuppression", summary, text, SEED_DISSEMINATED, KOTTON_2025, policy(15))


def art_hiv(ctx: Context) -> list[Card]:
    """HIV with CMV: start or optimise ART concurrently (NIH OI guidelines; seed cmv-treatment-disseminated)."""
    hiv = ctx.facts.hiv
    if hiv is None:
        return []
    text = f"HIV infection ({hiv.source}): initiate or optimise antiretroviral therapy concurrently with CMV treatment."
    return _info(
        "art-hiv", "HIV with CMV disease: start or optimise antiretroviral therapy", text, NIH_OI, SEED_DISSEMINATED
    )


def ivig_pneumonitis(ctx: Context) -> list[Card]:
    """CMV pneumonitis: adjunctive IVIG may be considered (seed cmv-treatment-disseminated)."""
    pneumonitis = ctx.facts.manifestations.get("pneumonitis")
    if pneumonitis is None:
        return []
    text = (
        f"CMV pneumonitis ({pneumonitis.source}): adjunctive IV immunoglobulin can be given, typically every other "
        "day for 3 to 5 doses; evidence of benefit is limited. No order is proposed."
    )
    return _info("ivig-pneumonitis", "CMV pneumonitis: adjunctive IVIG may be considered", text, SEED_DISSEMINATED)


def ophthalmology_retinitis(ctx: Context) -> list[Card]:
    """CMV retinitis: ophthalmologic examination and follow-up (NIH OI guidelines; seed)."""
    retinitis = ctx.facts.manifestations.get("retinitis")
    if retinitis is None:
        return []
    text = (
        f"CMV retinitis ({retinitis.source}): ophthalmologic examination now and regular follow-up even after "
        "successful treatment."
    )
    return _info(
        "ophthalmology-retinitis",
        "CMV retinitis: ophthalmology examination and follow-up",
        text,
        NIH_OI,
        SEED_DISSEMINATED,
    )


def plasma_exchange_dic(ctx: Context) -> list[Card]:
    """CMV-associated disseminated intravascular coagulation: plasma exchange may be considered as an adjunct
    to antiviral therapy (seed cmv-treatment-immunocompetent; docs/policy.md §15)."""
    facts = ctx.facts
    if facts.dic is None or facts.cmv_disease is None:
        return []
    text = (
        f"Disseminated intravascular coagulation ({facts.dic.label}, {facts.dic.source}) with CMV disease "
        f"({facts.cmv_disease.source}): CMV-associated DIC is rare but serious; plasma exchange may be considered "
        "as adjunctive therapy alongside antiviral treatment. No order is proposed: involve hematology."
    )
    return _info(
        "plasma-exchange-dic",
        "CMV-associated DIC: plasma exchange may be considered as an adjunct",
        text,
        SEED_IMMUNOCOMPETENT,
        policy(15),
    )
