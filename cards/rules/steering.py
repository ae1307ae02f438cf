"""Steering to another drug (docs/policy.md §9): suspected resistance, CNS disease, oral valganciclovir where IV
therapy is needed. Each fires on what is known; where the drug it proposes cannot be dosed, it says so and
orders what is missing."""

from __future__ import annotations

from cards import fhir_out
from cards.dosing import Drug, Phase
from cards.model import Action, Card, Suggestion
from cards.orders import OrderFact
from cards.regimen import Missing, Regimen
from cards.rules.common import (
    DRUG_SET,
    FOSCARNET_HYDRATION,
    Context,
    alternative_unavailable,
    card,
    computation_lines,
    count_gap_lines,
    count_gap_suggestions,
    count_gaps,
    create_action,
    delete_action,
    fits_regimen,
    low_counts,
    missing_lab_suggestions,
    missing_lines,
    proposal_lines,
    regimen_text,
    replace_order,
    update_action,
    viral_load_trend,
    vl_text,
)
from cards.sources import KOTTON_2025, LABELS, NIH_OI, SEED_DISSEMINATED, policy, source_line
from cards.therapy import CONTINUOUS_GAP_DAYS, current_course

# docs/policy.md §9: suspected resistance after ≥ 14 days of (val)ganciclovir.
RESISTANCE_MIN_THERAPY_DAYS = 14


def resistance(ctx: Context, order: OrderFact) -> list[Card]:
    """Suspected resistance (docs/policy.md §9): a reported UL97/UL54 mutation, or ≥ 14 days of continuous
    (val)ganciclovir with the latest viral load not lower than at the start → genotype testing + foscarnet; in
    severe disease the card also names ganciclovir + foscarnet combination (seed, pitfalls)."""
    if order.drug not in ("ganciclovir", "valganciclovir"):
        return []
    facts = ctx.facts
    reasons = []
    if facts.resistance is not None:
        reasons.append(f"{facts.resistance.label} ({facts.resistance.source})")
    course = current_course(facts.medications, ("Ganciclovir", "Valganciclovir"), facts.today, CONTINUOUS_GAP_DAYS)
    if course is not None and course.ongoing(facts.today):
        days = (facts.today - course.start).days
        trend = viral_load_trend(facts, course.start) if days >= RESISTANCE_MIN_THERAPY_DAYS else None
        if trend is not None and trend[3] >= trend[2] > 0:
            reasons.append(
                f"on (val)ganciclovir since {course.start.isoformat()} ({days} days) and the viral load is not "
                f"lower: {vl_text(trend[0])} → {vl_text(trend[1])}"
            )
    if not reasons:
        return []
    genotype = Action(
        "create",
        "Order CMV UL97/UL54 genotypic resistance testing",
        resource=fhir_out.uncoded_service_request(
            ctx.patient_id,
            "CMV genotypic antiviral resistance testing (UL97 and UL54)",
            f"Suspected ganciclovir resistance ({policy(9)}). No LOINC code for this test is in the product's "
            "code sets.",
        ),
    )
    alternative = ctx.regimen("foscarnet", ctx.phase("foscarnet"))
    detail = ["**Suspected ganciclovir resistance:**", *[f"- {r}" for r in reasons], ""]
    suggestions = []
    if isinstance(alternative, Regimen):
        detail += proposal_lines("**Proposed:** genotypic resistance testing and ", alternative, facts.today)
        suggestions.append(
            Suggestion(
                f"Genotype and switch to foscarnet {alternative.dose_mg:g} mg IV {alternative.schedule.text}",
                (delete_action(order), create_action(ctx, alternative), genotype),
                is_recommended=True,
            )
        )
    else:
        detail += ["**Proposed:** genotypic resistance testing; foscarnet is the alternative, but:"]
        detail += alternative_unavailable(alternative)[2:]
        if isinstance(alternative, Missing):
            suggestions += missing_lab_suggestions(ctx, alternative.items)
    suggestions.append(Suggestion("Order genotypic resistance testing only", (genotype,)))
    sources = [KOTTON_2025]
    if facts.severe is not None:
        detail += [
            "",
            f"**Severe disease** ({facts.severe.source}) progressing despite therapy: combination therapy with "
            "ganciclovir and foscarnet should be considered (clinical summary of disseminated CMV, pitfalls).",
        ]
        sources.append(SEED_DISSEMINATED)
    detail += ["", source_line(*sources, policy(9))]
    return [
        card(
            "resistance",
            "Suspected ganciclovir-resistant CMV: genotype UL97/UL54 and consider foscarnet",
            "warning",
            detail,
            KOTTON_2025,
            suggestions,
            behavior="at-most-one",
        )
    ]


CNS_DRUGS: tuple[Drug, ...] = ("ganciclovir", "foscarnet")  # docs/policy.md §9: both, IV, together


def cns_combination(ctx: Context, order: OrderFact) -> list[Card]:
    """CNS disease (docs/policy.md §9; NIH OI guidelines; seeds): IV ganciclovir plus IV foscarnet together.
    The selected drug is corrected here when its draft differs (this card replaces the dose card), the partner is
    created unless already ordered; a partner that cannot be dosed, or ganciclovir the blood counts rule out
    (label §5.1), is named and the rest is still proposed. Oral valganciclovir is replaced."""
    facts = ctx.facts
    if "cns" not in facts.manifestations or order.drug == "cidofovir":
        return []
    drug = order.drug
    partners = [
        name for name in CNS_DRUGS if name != drug and not ctx.already_ordered(DRUG_SET[name])
    ]  # an order already there is dose-checked on its own
    if not partners and drug != "valganciclovir":
        return []
    phase = ctx.phase(drug, order)
    evidence = facts.manifestations["cns"]
    detail = [
        f"**CNS CMV disease** ({evidence.label}, {evidence.source}): combination IV ganciclovir + IV foscarnet is "
        "preferred as initial therapy despite more adverse effects.",
        "",
    ]
    low = low_counts(facts)
    actions: list[Action] = [delete_action(order)] if drug == "valganciclovir" else []
    in_plan: list[Drug] = []  # the drugs the combination holds once the suggestion is accepted
    left_out: list[str] = []
    missing_labs: list[Suggestion] = []
    for name in CNS_DRUGS:
        if name != drug and name not in partners:
            in_plan.append(name)
            continue
        if name == "ganciclovir" and low:
            detail += ["**Ganciclovir is not proposed:** the blood counts are below the label's thresholds:"]
            detail += [*[f"- {line}" for line in low], ""]
            left_out.append("ganciclovir (blood counts)")
            continue
        reg = ctx.regimen(name, phase)
        if not isinstance(reg, Regimen):
            if isinstance(reg, Missing):
                detail += [f"**{name.capitalize()} cannot be dosed:**", *missing_lines(reg.items), ""]
                missing_labs += missing_lab_suggestions(ctx, reg.items)
                left_out.append(f"{name} (data missing)")
            else:
                detail += [f"**{name.capitalize()} is not recommended:** {reg.reason} ({reg.source}).", ""]
                left_out.append(f"{name} (not recommended)")
            continue
        in_plan.append(name)
        if name == drug and fits_regimen(ctx, order, reg):
            detail += [f"**{name.capitalize()} (selected order):** fits as written ({regimen_text(reg)}).", ""]
            continue
        label = f"{name.capitalize()}{' (selected order, corrected)' if name == drug else ''}"
        detail += [f"**{label}:** {regimen_text(reg)}.", *computation_lines(reg), ""]
        actions.append(update_action(order, reg) if name == drug else create_action(ctx, reg))
    gaps = count_gaps(facts) if "ganciclovir" in in_plan else []
    detail += count_gap_lines(gaps)
    if "foscarnet" in in_plan:
        detail.append(FOSCARNET_HYDRATION)
    detail += ["", source_line(NIH_OI, SEED_DISSEMINATED, policy(9))]
    suggestions = [*count_gap_suggestions(ctx, gaps), *missing_labs]
    if actions:
        plan = " + ".join(in_plan).capitalize() if in_plan else f"Remove the {drug} order"
        plan += " (combination)" if len(in_plan) == 2 else ""
        suggestions.insert(0, Suggestion(plan, tuple(actions), is_recommended=True))
    if left_out:
        summary = f"CNS CMV disease: ganciclovir + foscarnet preferred; not proposed: {', '.join(left_out)}"
    else:
        summary = "CNS CMV disease: give IV ganciclovir plus IV foscarnet together"
    return [card("cns-combination", summary, "warning", detail, NIH_OI, suggestions)]


def steer_reasons(ctx: Context) -> list[str]:
    """docs/policy.md §9 reasons not to start oral valganciclovir (CNS is handled by its own rule)."""
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
            f"(institutional threshold CMV_CDS_HIGH_VIRAL_LOAD_IU_ML; {latest.source})"
        )
    return reasons


def valganciclovir_to_iv(ctx: Context, order: OrderFact) -> list[Card]:
    """Oral valganciclovir as initial therapy where IV ganciclovir is needed → IV ganciclovir, renally dosed
    (docs/policy.md §9; Kotton 2025; seed cmv-treatment-disseminated, pitfalls)."""
    if order.drug != "valganciclovir":
        return []
    phase: Phase = ctx.phase(order.drug, order)
    reasons = steer_reasons(ctx) if phase == "induction" else []
    if not reasons:
        return []
    gcv = ctx.regimen("ganciclovir", phase)
    lines, suggestions = replace_order(ctx, order, gcv)
    detail = ["**Oral valganciclovir is not advised as initial therapy here:**", *[f"- {r}" for r in reasons], *lines]
    if isinstance(gcv, Regimen):
        summary = f"Use IV ganciclovir {gcv.dose_mg:g} mg {gcv.schedule.text} instead of oral valganciclovir"
    else:
        summary = "Use IV ganciclovir instead of oral valganciclovir (dose needs missing data)"
    detail += ["", source_line(KOTTON_2025, SEED_DISSEMINATED, policy(9))]
    return [
        card(
            "valganciclovir-to-iv",
            summary,
            "warning",
            detail,
            LABELS["valganciclovir"].section("§2.5 Table 2"),
            suggestions,
        )
    ]
