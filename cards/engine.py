"""Entry point of the clinical logic: a hook request's data in, cards out (no HTTP here).

One pass builds the facts (``cards.facts``); the rules read only the facts, in the order of the precedence
table (``cards.rules.precedence``).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final, Literal

from cards.facts import build_facts
from cards.fhir_in import concept_memo
from cards.model import Card
from cards.orders import cmv_drug
from cards.rules.common import Context, Options
from cards.rules.precedence import run_rules

# The product options' defaults, written once for the fields and the constructor below.
DEFAULT_DOSING_WEIGHT: Final = "actual"  # docs/policy.md §4: actual body weight
DEFAULT_HIGH_VIRAL_LOAD_IU_ML: Final = 100000.0  # docs/policy.md §9: institutional default


# ClinicalOptions and HookRequest, built on every call, spell out their __init__ (init=False): native constructors,
# see cards/model.py above Coding.
@dataclass(frozen=True, init=False)
class ClinicalOptions:
    """Product options (docs/policy.md §4 dosing weight; §9 viral-load threshold)."""

    dosing_weight: Literal["actual", "adjusted"] = DEFAULT_DOSING_WEIGHT
    high_viral_load_iu_ml: float = DEFAULT_HIGH_VIRAL_LOAD_IU_ML

    def __init__(
        self,
        dosing_weight: Literal["actual", "adjusted"] = DEFAULT_DOSING_WEIGHT,
        high_viral_load_iu_ml: float = DEFAULT_HIGH_VIRAL_LOAD_IU_ML,
    ) -> None:
        object.__setattr__(self, "dosing_weight", dosing_weight)
        object.__setattr__(self, "high_viral_load_iu_ml", high_viral_load_iu_ml)


@dataclass(frozen=True, init=False)
class HookRequest:
    """The data of one order-select / order-sign call, already validated by the service."""

    hook: str
    patient_id: str
    today: dt.date
    selected_orders: Sequence[Mapping[str, Any]]
    other_draft_orders: Sequence[Mapping[str, Any]]
    resources: Sequence[Mapping[str, Any]]

    def __init__(
        self,
        hook: str,
        patient_id: str,
        today: dt.date,
        selected_orders: Sequence[Mapping[str, Any]],
        other_draft_orders: Sequence[Mapping[str, Any]],
        resources: Sequence[Mapping[str, Any]],
    ) -> None:
        object.__setattr__(self, "hook", hook)
        object.__setattr__(self, "patient_id", patient_id)
        object.__setattr__(self, "today", today)
        object.__setattr__(self, "selected_orders", selected_orders)
        object.__setattr__(self, "other_draft_orders", other_draft_orders)
        object.__setattr__(self, "resources", resources)


def selects_cmv_antiviral(orders: Sequence[Mapping[str, Any]]) -> bool:
    """docs/policy.md §12: with no CMV antiviral among the selected orders, the service stays silent."""
    return any(cmv_drug(order) for order in orders)


def evaluate(request: HookRequest, options: ClinicalOptions) -> list[Card]:
    """All cards for the request, most urgent first."""
    with concept_memo():  # the service classified the selected drafts already; the facts ask again
        facts = build_facts(
            request.resources,
            request.other_draft_orders,
            request.patient_id,
            request.today,
            selected_orders=request.selected_orders,
        )
        if not facts.orders:
            return []
        ctx = Context(
            facts=facts,
            options=Options(options.dosing_weight, options.high_viral_load_iu_ml),
            patient_id=request.patient_id,
            selected_drugs=frozenset(order.drug for order in facts.orders),
        )
        return run_rules(ctx)


__all__ = ["ClinicalOptions", "HookRequest", "cmv_drug", "evaluate", "selects_cmv_antiviral"]
