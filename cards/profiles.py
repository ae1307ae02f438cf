"""Client profiles: the cards shaped into what each CDS client documents it can apply.

A plain function over the card model (``shape``); the service picks the profile per call from the calling
issuer's configuration (README, "EHR integration").

``cds-hooks-2.0`` (the default) answers the cards exactly as the rules wrote them (CDS Hooks 2.0.1, encoded
as docs/policy.md §13 says).

``epic`` follows Epic's CDS Hooks Tutorial (fhir.epic.com/Documentation?docId=cds-hooks) and docs/policy.md §14
("Client profiles"):

1. "An action creates or deletes a FHIR resource", and "Epic only supports a single action per
   suggestion" ("Actions", "Suggestion Attributes"): every suggestion is split into single-action
   suggestions (an action offered twice on one card is offered once).
2. No ``update``: the dose correction is carried in words, in the summary, the detail and the description
   of a suggestion that deletes the draft (the draft must not be signed as written; the clinician re-orders
   or edits it). That suggestion is not pre-selected (``isRecommended`` pre-selects in Epic).
3. A MedicationRequest ``create`` takes "all order details ... from the default values defined on the
   medication record ... or preference list", not from the resource sent ("Actions"). So a create never
   claims our dose: its description and the card's detail say that the EHR fills the dose in from its own
   defaults and what to set it to. Its medication is coded the way Epic reads creates ("Codesets for Create
   APIs"): RxNorm as ``urn:oid:2.16.840.1.113883.6.88``, or, where the institution maps the medication to
   one of its preference-list items, that item alone (``urn:com.epic.cdshooks.action.code.system.
   preference-list-item``). The same caveat is on ServiceRequest creates that carry a schedule.
4. ``selectionBehavior`` is ``any``, "the only value currently supported" ("Card Attributes").
5. ``source.topic.code`` is alphanumeric and at most 100 characters, and static per kind of card, since
   Epic remembers a clinician's override by it ("Card Attributes"): ``Cmv`` + the rule id in CamelCase.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping, Sequence
from typing import Any, Final

from cards.codes import RXNORM, SNOMED
from cards.fhir_out import json_copy
from cards.model import Action, Card, Coding, Suggestion

CDS_HOOKS_2: Final = "cds-hooks-2.0"
EPIC: Final = "epic"
PROFILES: Final = (CDS_HOOKS_2, EPIC)

RXNORM_OID: Final = "urn:oid:2.16.840.1.113883.6.88"
PREFERENCE_LIST_SYSTEM: Final = "urn:com.epic.cdshooks.action.code.system.preference-list-item"
EPIC_TOPIC_MAX_CHARS: Final = 100

# What the clinician reads where Epic cannot do what the rules propose (item 2 and 3 of the module docstring).
NO_UPDATE_NOTE: Final = "This EHR cannot change an order from a card"
CREATE_DEFAULTS_NOTE: Final = "this EHR fills in the dose from its own order defaults, not from this card"
SCHEDULE_DEFAULTS_NOTE: Final = "this EHR places it with its own order defaults: check the schedule before signing"

_ROUTE_WORDS: Final = {"47625008": "IV", "26643006": "PO"}  # SNOMED routes of docs/policy.md §13
_PERIOD_WORDS: Final = {"min": "minute", "h": "hour", "d": "day", "wk": "week", "mo": "month", "a": "year"}
_ADVERB: Final = {"d": "daily", "wk": "weekly", "mo": "monthly"}


@dataclasses.dataclass(frozen=True)
class ClientProfile:
    """How to answer one client: the profile's name, and (epic) the institution's preference-list items
    by medication name (``medicationCodeableConcept.text`` of what the service proposes, lower case)."""

    name: str = CDS_HOOKS_2
    preference_list_items: Mapping[str, str] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.name not in PROFILES:
            raise ValueError(f"unknown client profile {self.name!r}; one of {', '.join(PROFILES)}")


def shape(cards: Sequence[Card], profile: ClientProfile) -> list[Card]:
    """The cards as ``profile`` answers them (the ``cds-hooks-2.0`` profile returns them unchanged)."""
    if profile.name == CDS_HOOKS_2:
        return list(cards)
    return [_epic_card(card, profile) for card in cards]


# --- epic ---------------------------------------------------------------------------------------------------


def epic_topic_code(rule_id: str) -> str:
    """``dose-adjust`` → ``CmvDoseAdjust``: alphanumeric, at most 100 characters, the same for every card of
    a rule (Epic remembers overrides by it)."""
    words = [word for word in re.split(r"[^A-Za-z0-9]+", rule_id) if word]
    return ("Cmv" + "".join(word[:1].upper() + word[1:] for word in words))[:EPIC_TOPIC_MAX_CHARS]


@dataclasses.dataclass(frozen=True, init=False)  # Card's written __init__ (mypyc: a generated one cannot call it)
class EpicCard(Card):
    """A card whose ``source.topic.code`` is Epic's (``epic_topic_code``); everything else as ``Card``."""

    @property
    def topic(self) -> Coding:
        topic = super().topic
        return Coding(topic.system, epic_topic_code(self.rule_id), topic.display)


@dataclasses.dataclass
class _Shaping:
    """What one card's actions became: the suggestions, and what the card must say about them."""

    suggestions: list[Suggestion] = dataclasses.field(default_factory=list)
    corrections: list[str] = dataclasses.field(default_factory=list)  # regimens in words, for dropped updates
    medication_created: bool = False
    seen: set[tuple[str, str]] = dataclasses.field(default_factory=set)


def _epic_card(card: Card, profile: ClientProfile) -> Card:
    shaping = _Shaping()
    for suggestion in card.suggestions:
        for action in suggestion.actions:
            _add_action(shaping, suggestion, action, profile)
    summary, detail = card.summary, card.detail
    for words in shaping.corrections:
        summary = _summary_with(summary, words)
    notes = [
        f"- **{NO_UPDATE_NOTE}:** change the selected order to {words} yourself, or remove it with the suggestion "
        "below and order it again."
        for words in shaping.corrections
    ]
    if shaping.medication_created:
        notes.append(
            "- **Orders placed from this card** take their dose, route and frequency from this EHR's order "
            "defaults (medication record or preference list), not from this card: set them to the regimen "
            "stated here before signing."
        )
    if notes:
        detail = "\n".join([detail, "", "**In this EHR**", *notes]) if detail else "\n".join(notes)
    fields = {field.name: getattr(card, field.name) for field in dataclasses.fields(card)}
    fields.update(
        summary=summary,
        detail=detail,
        suggestions=tuple(shaping.suggestions),
        selection_behavior="any" if shaping.suggestions else None,
    )
    return EpicCard(**fields)


def _add_action(shaping: _Shaping, suggestion: Suggestion, action: Action, profile: ClientProfile) -> None:
    recommended = suggestion.is_recommended
    resource = action.resource or {}
    original = action.type
    if action.type == "update":
        target = f"{resource.get('resourceType')}/{resource.get('id')}"
        words = regimen_words(resource) or action.description
        shaping.corrections.append(words)
        action = Action(
            "delete",
            f"Remove the selected order: as written it differs from the computed regimen. {NO_UPDATE_NOTE}; "
            f"order it again at {words}.",
            resource_id=target,
        )
        recommended = False  # editing the order is the other way; removal is offered, not pre-selected
    elif action.type == "create" and resource.get("resourceType") == "MedicationRequest":
        recoded = _recode_medication(resource, profile)
        words = regimen_words(resource)
        drug = _medication_name(resource)
        setting = f": set it to {words} before signing" if words else ": set it before signing"
        action = Action("create", f"Order {drug} ({CREATE_DEFAULTS_NOTE}{setting})", resource=recoded)
        shaping.medication_created = True
    elif action.type == "create" and "occurrenceTiming" in resource:
        action = dataclasses.replace(action, description=f"{action.description} ({SCHEDULE_DEFAULTS_NOTE})")
    key = (action.type, action.resource_id or str(resource.get("id") or action.description))
    if key in shaping.seen:
        return  # the same action offered by two suggestions of the card: once is enough
    shaping.seen.add(key)
    # Epic shows the action's description, not the label; the label still names what this suggestion does.
    label = suggestion.label if len(suggestion.actions) == 1 and action.type == original else action.description
    shaping.suggestions.append(Suggestion(label, (action,), is_recommended=recommended))


def _summary_with(summary: str, words: str) -> str:
    """The summary, naming the corrected regimen when it does not already (at most 139 characters)."""
    dose = " ".join(words.split(" ", 2)[:2])
    if dose in summary.replace(",", ""):  # the rules write 4,900 mg
        return summary
    addition = f" (selected order: {words})"
    if len(addition) > 90:  # several dosage lines: the dose alone, the detail has the rest
        addition = f" (selected order: {dose} …)"
    if len(summary) + len(addition) < 140:
        return summary + addition
    return summary[: 139 - len(addition) - 1].rstrip() + "…" + addition


def _recode_medication(resource: Mapping[str, Any], profile: ClientProfile) -> dict[str, Any]:
    recoded = json_copy(resource)
    concept = recoded.get("medicationCodeableConcept")
    if not isinstance(concept, dict):
        return recoded
    text = concept.get("text")
    item = profile.preference_list_items.get(text.strip().lower()) if isinstance(text, str) else None
    if item is not None:
        concept["coding"] = [{"system": PREFERENCE_LIST_SYSTEM, "code": item}]
        return recoded
    for coding in concept.get("coding") or []:
        if isinstance(coding, dict) and coding.get("system") == RXNORM:
            coding["system"] = RXNORM_OID
    return recoded


def _medication_name(resource: Mapping[str, Any]) -> str:
    concept = resource.get("medicationCodeableConcept")
    text = concept.get("text") if isinstance(concept, dict) else None
    return text if isinstance(text, str) and text.strip() else "the medication"


def regimen_words(resource: Mapping[str, Any]) -> str:
    """A proposed MedicationRequest's regimen in words, from its FHIR elements: ``400 mg IV every 12 hours
    for 21 days``. Several dosage lines (probenecid around each cidofovir dose) are given by their texts."""
    dosages = [d for d in resource.get("dosageInstruction") or [] if isinstance(d, dict)]
    if len(dosages) > 1 and all(isinstance(d.get("text"), str) for d in dosages):
        return "; ".join(d["text"] for d in dosages)
    return "; ".join(words for words in (_dosage_words(d) for d in dosages) if words)


def _dosage_words(dosage: Mapping[str, Any]) -> str:
    parts: list[str] = []
    rates = dosage.get("doseAndRate")
    first = rates[0] if isinstance(rates, list) and rates and isinstance(rates[0], dict) else {}
    quantity = first.get("doseQuantity")
    if isinstance(quantity, dict) and isinstance(quantity.get("value"), int | float):
        parts.append(f"{quantity['value']:g} {quantity.get('unit') or quantity.get('code') or ''}".strip())
    route = dosage.get("route")
    if isinstance(route, dict):
        codes = [c.get("code") for c in route.get("coding") or [] if isinstance(c, dict) and c.get("system") == SNOMED]
        named = next((_ROUTE_WORDS[code] for code in codes if code in _ROUTE_WORDS), None)
        if named or isinstance(route.get("text"), str):
            parts.append(named or str(route["text"]))
    timing = dosage.get("timing")
    repeat = timing.get("repeat") if isinstance(timing, dict) else None
    if isinstance(repeat, dict):
        parts += [words for words in (_timing_words(repeat), _bounds_words(repeat)) if words]
    instructions = dosage.get("additionalInstruction")
    for instruction in instructions if isinstance(instructions, list) else ():
        if isinstance(instruction, dict) and isinstance(instruction.get("text"), str):
            parts.append(f"({instruction['text']})")
    return " ".join(parts)


def _timing_words(repeat: Mapping[str, Any]) -> str:
    frequency, period, unit = repeat.get("frequency", 1), repeat.get("period"), repeat.get("periodUnit")
    if not isinstance(period, int | float) or not isinstance(frequency, int | float) or unit not in _PERIOD_WORDS:
        return ""
    noun = _PERIOD_WORDS[str(unit)]
    upper = repeat.get("frequencyMax")
    if frequency == 1 and not upper:
        if period == 1:
            return f"once {_ADVERB[unit]}" if unit in _ADVERB else f"every {noun}"
        return f"every {period:g} {noun}s"
    times = (
        f"{frequency:g}–{upper:g} times"
        if isinstance(upper, int | float)
        else ("twice" if frequency == 2 else f"{frequency:g} times")
    )
    if period == 1:
        return f"{times} {_ADVERB[unit]}" if unit in _ADVERB else f"{times} per {noun}"
    return f"{times} every {period:g} {noun}s"


def _bounds_words(repeat: Mapping[str, Any]) -> str:
    bounds = repeat.get("boundsDuration")
    if isinstance(bounds, dict) and isinstance(bounds.get("value"), int | float):
        return f"for {bounds['value']:g} {bounds.get('unit') or bounds.get('code') or ''}".strip()
    count = repeat.get("count")
    return f"({count:g} doses)" if isinstance(count, int | float) else ""
