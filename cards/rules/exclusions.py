"""Exclusions the available data proves (docs/policy.md §10): each is reported as a `critical` card with the
alternative where the policy names one, even when other inputs are missing, and names those missing inputs."""

from __future__ import annotations

from collections.abc import Sequence

from cards.dosing import Drug
from cards.model import Card, Suggestion
from cards.orders import OrderFact
from cards.regimen import MissingItem, NotRecommended, Regimen
from cards.rules.common import (
    Context,
    card,
    delete_action,
    low_counts,
    missing_lines,
    replace_order,
)
from cards.sources import LABELS, PRODUCT_POLICY, policy, source_line


def pediatric(ctx: Context) -> list[Card]:
    """Under 18 → one info card, no dose (docs/policy.md §1)."""
    age = ctx.facts.age_years
    if age is None or age >= 18:
        return []
    return [
        card(
            "pediatric",
            "CMV antiviral dosing for patients under 18 is not supported; no dose proposed",
            "info",
            [
                f"The patient is {age} years old. This service doses adults (18 years and over) only; use pediatric "
                "dosing references.",
                "",
                source_line(policy(1)),
            ],
            PRODUCT_POLICY,
        )
    ]


def also_missing(items: Sequence[MissingItem]) -> list[str]:
    """The inputs that were missing, named on an exclusion card all the same (docs/policy.md §10)."""
    return ["", "Also missing (not needed for this conclusion):", *missing_lines(items)] if items else []


def myelosuppression(ctx: Context, order: OrderFact) -> list[Card]:
    """(Val)ganciclovir with ANC < 500/µL, platelets < 25,000/µL or Hb < 8 g/dL → critical; remove the draft and
    give foscarnet instead (label §5.1; docs/policy.md §9)."""
    if order.drug not in ("ganciclovir", "valganciclovir"):
        return []
    low = low_counts(ctx.facts)
    if not low:
        return []
    phase = ctx.phase(order.drug, order)
    alternative = ctx.regimen("foscarnet", phase)
    detail = [
        f"**Avoid {order.drug}:** the label says it should be avoided below these counts:",
        *[f"- {line}" for line in low],
    ]
    lines, suggestions = replace_order(ctx, order, alternative)
    detail += lines
    low_text = low[0].split(" on ")[0]
    if isinstance(alternative, Regimen):
        summary = f"Avoid {order.drug}: {low_text}; foscarnet {alternative.dose_mg:g} mg IV {alternative.schedule.text}"
    else:
        summary = f"Avoid {order.drug}: {low_text}; use foscarnet instead (dose needs more data)"
    detail += [
        "",
        source_line(LABELS[order.drug].section("§5.1 Hematologic Toxicity"), policy(9)),
    ]
    return [card("myelosuppression", summary, "critical", detail, LABELS[order.drug].section("§5.1"), suggestions)]


def valganciclovir_not_recommended(ctx: Context, order: OrderFact) -> list[Card]:
    """Valganciclovir on dialysis, or with CrCl < 10 mL/min → critical; IV ganciclovir instead on the label's
    < 10 mL/min (hemodialysis) row (label §2.5 Table 2 and §8.6; docs/policy.md §9)."""
    if order.drug != "valganciclovir":
        return []
    phase = ctx.phase(order.drug, order)
    verdict = ctx.regimen("valganciclovir", phase)
    if not isinstance(verdict, NotRecommended):
        return []
    facts = ctx.facts
    reason = (
        f"dialysis-dependent ({facts.dialysis.label}, {facts.dialysis.source}): the label says valganciclovir "
        "tablets should not be used in hemodialysis"
        if facts.dialysis is not None
        else "CrCl < 10 mL/min: the label does not recommend valganciclovir"
    )
    detail = [f"**Valganciclovir is not recommended for this patient:** {reason}.", "", *computation_text(verdict)]
    gcv = ctx.regimen("ganciclovir", phase)
    lines, suggestions = replace_order(ctx, order, gcv)
    detail += lines
    why = "dialysis" if facts.dialysis else "CrCl < 10"
    if isinstance(gcv, Regimen):
        summary = f"Valganciclovir not recommended ({why}): IV ganciclovir {gcv.dose_mg:g} mg {gcv.schedule.text}"
    else:
        summary = f"Valganciclovir not recommended ({why}); use IV ganciclovir (dose needs more data)"
    detail += also_missing(verdict.missing)
    detail += [
        "",
        source_line(LABELS["valganciclovir"].section("§2.5 Table 2 and §8.6"), policy(9)),
    ]
    return [
        card(
            "valganciclovir-not-recommended",
            summary,
            "critical",
            detail,
            LABELS["valganciclovir"].section("§2.5 Table 2"),
            suggestions,
        )
    ]


def computation_text(verdict: NotRecommended) -> list[str]:
    """The computation section of a not-recommended verdict (empty when it has no inputs)."""
    return ["**Computation**", *[f"- {line}" for line in verdict.inputs]] if verdict.inputs else []


def foscarnet_not_recommended(ctx: Context, order: OrderFact) -> list[Card]:
    """Foscarnet with CrCl < 0.4 mL/min/kg or on dialysis: not recommended by the label's table (Table 13)."""
    return _not_recommended_card(ctx, order, "foscarnet", "foscarnet-not-recommended")


def cidofovir_contraindicated(ctx: Context, order: OrderFact) -> list[Card]:
    """Cidofovir whose start criteria fail on the available data (docs/policy.md §5; label Contraindications)."""
    return _not_recommended_card(ctx, order, "cidofovir", "cidofovir-contraindicated")


def _not_recommended_card(ctx: Context, order: OrderFact, drug: Drug, rule_id: str) -> list[Card]:
    if order.drug != drug:
        return []
    verdict = ctx.regimen(order.drug, ctx.phase(order.drug, order))
    if not isinstance(verdict, NotRecommended):
        return []
    if order.drug == "cidofovir":
        summary = f"Cidofovir contraindicated: {verdict.reason}"
        section = "Contraindications"
        lead = f"**Cidofovir must not be started:** {verdict.reason}."
    else:
        summary = "Foscarnet not recommended at this renal function (label Table 13)"
        section = "Table 13"
        lead = f"**Foscarnet is not recommended for this patient:** {verdict.reason}."
    detail = [lead, "", *computation_text(verdict)]
    if order.drug == "foscarnet":
        detail += [
            "",
            "Hemodialysis has no label foscarnet dose; some centres use off-label post-dialysis dosing — not "
            "proposed here.",
        ]
    detail += also_missing(verdict.missing)
    detail += ["", source_line(LABELS[order.drug].section(section), policy(5, 10))]
    suggestion = Suggestion(f"Remove the {order.drug} order", (delete_action(order),), is_recommended=True)
    return [card(rule_id, summary, "critical", detail, LABELS[order.drug].section(section), [suggestion])]


def pregnancy(ctx: Context) -> list[Card]:
    """Pregnancy with ganciclovir, valganciclovir or cidofovir: boxed warning for fetal toxicity; contraception 30
    days (women) / 90 days (men) after treatment (labels §8.3; docs/policy.md §9). Reported beside the dose:
    a boxed warning, not a contraindication."""
    teratogenic: list[Drug] = sorted(ctx.selected_drugs & {"ganciclovir", "valganciclovir", "cidofovir"})
    evidence = ctx.facts.pregnancy
    if not teratogenic or evidence is None:
        return []
    names = " / ".join(teratogenic)
    first = teratogenic[0]
    detail = [
        f"**Pregnancy** ({evidence.label}, {evidence.source}"
        + (f", {evidence.date.isoformat()}" if evidence.date else "")
        + f"). {names.capitalize()}: boxed warning for fetal toxicity, impaired fertility, mutagenesis and "
        "carcinogenesis.",
        "",
        "- Weigh the benefit against fetal risk; involve infectious diseases and obstetrics.",
        "- Contraception after treatment: **women ≥ 30 days**; **men (barrier) ≥ 90 days**.",
        "",
        source_line(LABELS[first].section("Boxed Warning and §8.3"), policy(9)),
    ]
    return [
        card(
            "pregnancy",
            f"Pregnancy: {names} is fetotoxic (boxed warning); confirm benefit outweighs risk",
            "critical",
            detail,
            LABELS[first].section("Boxed Warning"),
        )
    ]
