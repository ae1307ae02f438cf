"""The order in which the rules take precedence: one table, the place a clinical reviewer reads first.

Classes, in order (docs/policy.md §10, "Precedence"):
1. **exclusion** — a reason not to give the selected drug that the available data already proves. Reported
   (`critical`, with the alternative where the policy names one) even when other inputs are missing; the
   missing inputs are named on the same card.
2. **steering** — the data points to another drug or route (resistance, CNS disease, oral valganciclovir where
   IV therapy is needed). Known data too, so it comes before missing data: where the drug it proposes cannot be
   dosed, the card says so and orders what is missing.
3. **missing** — no proven exclusion and no steering, but the dose needs a value that is missing or unusable.
4. **dosing** — the draft corrected to the computed regimen, or confirmed with its monitoring.
5. **adjunct** — what comes beside the main card: adjunct orders, step-down, interactions, guideline advice.

For each selected order the *deciding* rules run in table order and the first that answers gives the order's
main card. Rules that do not decide run after it: for an order only when its main card came from the class
named in ``after``; for the patient once per call. A request-scope rule that answers ends the evaluation.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from enum import IntEnum
from typing import Literal

from cards.dosing import Drug
from cards.model import Card
from cards.orders import OrderFact
from cards.rules import adjuncts, dosing_cards, exclusions, steering
from cards.rules.common import Context

OrderCheck = Callable[[Context, OrderFact], list[Card]]
PatientCheck = Callable[[Context], list[Card]]


class RuleClass(IntEnum):
    EXCLUSION = 1
    STEERING = 2
    MISSING = 3
    DOSING = 4
    ADJUNCT = 5


ALL_DRUGS: frozenset[Drug] = frozenset({"ganciclovir", "valganciclovir", "foscarnet", "cidofovir"})
GCV_VGC: frozenset[Drug] = frozenset({"ganciclovir", "valganciclovir"})


@dataclass(frozen=True)
class Rule:
    """One row of the precedence table."""

    rule_ids: tuple[str, ...]  # the card topics it can produce
    rule_class: RuleClass
    scope: Literal["request", "order", "patient"]
    decides: bool  # order scope: its card is the order's main card, and the later deciding rules do not run
    drugs: frozenset[Drug]  # the selected drugs it concerns
    when: str  # in words, for the reader (docs/clinical-basis.md §10 shows the same table)
    check_order: OrderCheck | None = None
    check_patient: PatientCheck | None = None
    after: RuleClass | None = None  # order-scope adjuncts: only after a main card of this class

    def __post_init__(self) -> None:
        if (self.check_order is None) == (self.check_patient is None):
            raise ValueError(f"rule {self.rule_ids} needs exactly one check")
        if (self.scope == "order") != (self.check_order is not None):
            raise ValueError(f"rule {self.rule_ids}: an order-scope rule checks orders, the others the patient")


EXCLUSION, STEERING, MISSING, DOSING, ADJUNCT = RuleClass

PRECEDENCE: tuple[Rule, ...] = (
    Rule(("pediatric",), EXCLUSION, "request", True, ALL_DRUGS, "age < 18: one info card, no dose",
         check_patient=exclusions.pediatric),
    Rule(("myelosuppression",), EXCLUSION, "order", True, GCV_VGC,
         "ANC < 500/µL, platelets < 25,000/µL or Hb < 8 g/dL: critical; remove; foscarnet instead",
         check_order=exclusions.myelosuppression),
    Rule(("valganciclovir-not-recommended",), EXCLUSION, "order", True, frozenset({"valganciclovir"}),
         "dialysis or CrCl < 10 mL/min: critical; remove; IV ganciclovir on the < 10 (hemodialysis) row",
         check_order=exclusions.valganciclovir_not_recommended),
    Rule(("foscarnet-not-recommended",), EXCLUSION, "order", True, frozenset({"foscarnet"}),
         "CrCl < 0.4 mL/min/kg or dialysis: critical; remove",
         check_order=exclusions.foscarnet_not_recommended),
    Rule(("cidofovir-contraindicated",), EXCLUSION, "order", True, frozenset({"cidofovir"}),
         "SCr > 1.5 mg/dL, CrCl ≤ 55 mL/min, urine protein ≥ 100 mg/dL (2+), a nephrotoxic drug in the last 7 "
         "days, or dialysis: critical; remove",
         check_order=exclusions.cidofovir_contraindicated),
    Rule(("pregnancy",), EXCLUSION, "patient", False, frozenset({"ganciclovir", "valganciclovir", "cidofovir"}),
         "positive hCG within 30 days or a pregnancy condition: critical, beside the dose (boxed warning)",
         check_patient=exclusions.pregnancy),
    Rule(("resistance",), STEERING, "order", True, GCV_VGC,
         "UL97/UL54 mutation, or ≥ 14 days of (val)ganciclovir with the viral load not lower: genotype + foscarnet",
         check_order=steering.resistance),
    Rule(("cns-combination",), STEERING, "order", True, frozenset({"ganciclovir", "valganciclovir", "foscarnet"}),
         "CNS disease: IV ganciclovir + IV foscarnet together",
         check_order=steering.cns_combination),
    Rule(("valganciclovir-to-iv",), STEERING, "order", True, frozenset({"valganciclovir"}),
         "severe disease, pneumonitis, impaired absorption or viral load ≥ threshold: IV ganciclovir instead",
         check_order=steering.valganciclovir_to_iv),
    Rule(("dose-missing-data",), MISSING, "order", True, ALL_DRUGS,
         "weight, creatinine, age (and urine protein for cidofovir) missing or unusable: no dose; order the lab",
         check_order=dosing_cards.missing_data),
    Rule(("dose-adjust", "dose-confirmed-monitoring"), DOSING, "order", True, ALL_DRUGS,
         "the draft differs from the computed regimen: update; else confirm and order monitoring",
         check_order=dosing_cards.dose),
    Rule(("cidofovir-probenecid-hydration",), ADJUNCT, "order", False, frozenset({"cidofovir"}),
         "eligible cidofovir: probenecid and 1 L saline with each dose",
         check_order=adjuncts.cidofovir_adjuncts, after=DOSING),
    Rule(("iv-to-oral-step-down",), ADJUNCT, "order", False, frozenset({"ganciclovir"}),
         "≥ 3 days of IV ganciclovir, falling viral load, no reason to stay IV: valganciclovir offered",
         check_order=adjuncts.step_down, after=DOSING),
    Rule(("interactions",), ADJUNCT, "patient", False, GCV_VGC,
         "imipenem-cilastatin, mycophenolate, zidovudine, myelosuppressive or nephrotoxic drugs, probenecid, "
         "didanosine active or drafted",
         check_patient=adjuncts.interactions),
    Rule(("reduce-immunosuppression",), ADJUNCT, "patient", False, ALL_DRUGS,
         "an immunosuppressant active (or a transplant recipient with severe disease): consider reducing it",
         check_patient=adjuncts.reduce_immunosuppression),
    Rule(("art-hiv",), ADJUNCT, "patient", False, ALL_DRUGS, "HIV: start or optimise ART",
         check_patient=adjuncts.art_hiv),
    Rule(("ivig-pneumonitis",), ADJUNCT, "patient", False, ALL_DRUGS, "CMV pneumonitis: adjunctive IVIG",
         check_patient=adjuncts.ivig_pneumonitis),
    Rule(("ophthalmology-retinitis",), ADJUNCT, "patient", False, ALL_DRUGS,
         "CMV retinitis: ophthalmology examination and follow-up",
         check_patient=adjuncts.ophthalmology_retinitis),
    Rule(("plasma-exchange-dic",), ADJUNCT, "patient", False, ALL_DRUGS,
         "DIC with CMV disease: plasma exchange may be considered",
         check_patient=adjuncts.plasma_exchange_dic),
)  # fmt: skip


_RANK = {"critical": 0, "warning": 1, "info": 2}


def run_rules(ctx: Context, table: tuple[Rule, ...] = PRECEDENCE) -> list[Card]:
    """Every card of the call, by the table, most urgent first (stable within an indicator)."""
    cards: list[Card] = []
    for rule in table:
        if rule.scope == "request" and rule.check_patient is not None:
            found = rule.check_patient(ctx)
            if found and rule.decides:
                return found
            cards += found
    for order in ctx.facts.orders:
        main: RuleClass | None = None
        for rule in table:
            if rule.check_order is None or order.drug not in rule.drugs:
                continue
            if rule.decides:
                if main is None and (found := rule.check_order(ctx, order)):
                    cards += found
                    main = rule.rule_class
            elif main is not None and main == rule.after:
                cards += rule.check_order(ctx, order)
    for rule in table:
        if rule.scope == "patient" and rule.check_patient is not None and not ctx.selected_drugs.isdisjoint(rule.drugs):
            cards += rule.check_patient(ctx)
    return sorted(cards, key=lambda card: _RANK[card.indicator])
