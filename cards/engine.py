"""Entry point of the clinical logic: a hook request's data in, cards out (no HTTP here)."""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from cards import rules
from cards.dosing import Drug
from cards.facts import build_facts, concept_memo, medication_route, medication_sets
from cards.model import Card

_DRUGS: tuple[tuple[str, Drug], ...] = (
    ("Valganciclovir", "valganciclovir"),
    ("Ganciclovir", "ganciclovir"),
    ("Foscarnet", "foscarnet"),
    ("Cidofovir", "cidofovir"),
)
_RANK = {"critical": 0, "warning": 1, "info": 2}


@dataclass(frozen=True)
class ClinicalOptions:
    """Product options (policy.md §3 dosing weight; §6 viral-load threshold)."""

    dosing_weight: Literal["actual", "adjusted"] = "actual"
    high_viral_load_iu_ml: float = 100000.0  # policy.md §6 default


@dataclass(frozen=True)
class HookRequest:
    """The data of one order-select / order-sign call, already validated by the service."""

    hook: str
    patient_id: str
    today: dt.date
    selected_orders: Sequence[Mapping[str, Any]]
    other_draft_orders: Sequence[Mapping[str, Any]]
    resources: Sequence[Mapping[str, Any]]


def cmv_drug(order: Mapping[str, Any]) -> Drug | None:
    """The CMV antiviral a MedicationRequest orders, by RxNorm code or name; None otherwise.

    Ganciclovir by a route other than IV (ophthalmic gel, intravitreal implant) is not systemic therapy
    and is not this service's concern; a draft without a route yet is taken as the IV drug.
    """
    if order.get("resourceType") != "MedicationRequest":
        return None
    sets = medication_sets(order)
    for set_name, drug in _DRUGS:
        if set_name in sets:
            if drug == "ganciclovir" and medication_route(order) in ("other", "oral"):
                return None
            return drug
    return None


def selects_cmv_antiviral(orders: Sequence[Mapping[str, Any]]) -> bool:
    """policy.md §7: with no CMV antiviral among the selected orders, the service stays silent."""
    return any(cmv_drug(order) for order in orders)


def evaluate(request: HookRequest, options: ClinicalOptions) -> list[Card]:
    """All cards for the request, most urgent first."""
    with concept_memo():  # the rules ask the same concept questions as the facts (cards.facts)
        return _evaluate(request, options)


def _evaluate(request: HookRequest, options: ClinicalOptions) -> list[Card]:
    selected = [(order, drug) for order in request.selected_orders if (drug := cmv_drug(order))]
    if not selected:
        return []
    facts = build_facts(request.resources, request.other_draft_orders, request.patient_id, request.today)
    if facts.age_years is not None and facts.age_years < 18:  # policy.md §1: adults only
        return [rules.pediatric_card(facts.age_years)]
    ctx = rules.Context(
        facts=facts,
        options=rules.Options(options.dosing_weight, options.high_viral_load_iu_ml),
        patient_id=request.patient_id,
        drafts=[*request.selected_orders, *request.other_draft_orders],
    )
    cards: list[Card] = []
    for order, drug in selected:
        cards += rules.assess_order(ctx, order, drug)
    drugs = {drug for _, drug in selected}
    for card in (rules.pregnancy_card(ctx, drugs), rules.interactions_card(ctx, drugs)):
        if card is not None:
            cards.append(card)
    cards += rules.adjunctive_cards(ctx)
    return sorted(cards, key=lambda card: _RANK[card.indicator])
