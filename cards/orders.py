"""Medication orders as the rules read them: which drug (by code set), by which route, at which dose and
frequency as written, and whether a draft says it is a maintenance regimen."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from cards.dosing import Drug
from cards.fhir_in import concept_label, concept_sets, concept_texts, parse_date, reference_of, text_search
from cards.therapy import MedicationFact, Route, exposure_window

DRUG_SETS = (
    "Ganciclovir",
    "Valganciclovir",
    "Foscarnet",
    "Cidofovir",
    "Probenecid",
    "ImipenemCilastatin",
    "Mycophenolate",
    "Zidovudine",
    "Didanosine",
    "MyelosuppressiveDrugs",
    "NephrotoxicDrugs",
    "Immunosuppressants",
)
_DRUG_SET_NAMES = frozenset(DRUG_SETS)


# DraftDose and OrderFact, built on every call, spell out their __init__ (init=False): native constructors, see
# cards/model.py above Coding.
@dataclass(slots=True, init=False)
class DraftDose:
    """The dose of a draft order as written: mg (None: not stated in mg), ``invalid`` for a zero or negative
    amount, doses per hour and route."""

    mg: float | None
    invalid: str | None
    per_hour: float | None
    route: Route

    def __init__(self, mg: float | None, invalid: str | None, per_hour: float | None, route: Route) -> None:
        self.mg = mg
        self.invalid = invalid
        self.per_hour = per_hour
        self.route = route


@dataclass(slots=True, init=False)
class OrderFact:
    """A selected draft order of a CMV antiviral: the drug, its dose as written, and what its words say about its
    phase (``text_phase``). ``resource`` is the validated draft, kept only to build update/delete actions."""

    resource: Mapping[str, Any]
    id: str
    drug: Drug
    dose: DraftDose
    text_phase: TextPhase | None

    def __init__(
        self, resource: Mapping[str, Any], id: str, drug: Drug, dose: DraftDose, text_phase: TextPhase | None
    ) -> None:
        self.resource = resource
        self.id = id
        self.drug = drug
        self.dose = dose
        self.text_phase = text_phase


# --- medications --------------------------------------------------------------------------------------------------

_ROUTE_IV = re.compile(r"\b(iv|ivpb|ivp|iv piggyback|iv push|intravenous\w*|i\.v\.?)(?!\w)", re.IGNORECASE)
# Enteral tubes (nasogastric, gastrostomy, jejunal, "per tube") deliver through the gut as the mouth does: systemic
# therapy, read as the oral route (a tacrolimus solution "per NG tube" is not a local form).
_ROUTE_ORAL = re.compile(
    r"\b(po|oral\w*|by mouth|p\.o\.|enteral\w*|per tube|feeding tube|nasogastric\w*|orogastric|ngt|ogt"
    r"|(ng|og|nj|peg|g|j)[- ]?tube|(via|per)\s+(ng|og|nj|peg)|gastrostom\w*|jejunostom\w*)\b",
    re.IGNORECASE,
)
# A route written only as a tube's abbreviation ("NG", "PEG-J", "GT", "Dobhoff"): read in the route field alone, where
# the abbreviation cannot be anything else.
_ENTERAL_ROUTE = re.compile(r"^\s*(ng|ngt|og|ogt|nj|peg|peg-?j|gt|jt|g-?t|j-?t|dobhoff|enteral)\s*$", re.IGNORECASE)
ROUTE_IV_SNOMED = "47625008"  # docs/policy.md §13: SNOMED CT intravenous route
ROUTE_ORAL_SNOMED = "26643006"  # SNOMED CT oral route


def _object(value: Any) -> dict[str, Any]:
    """``value`` if it is a JSON object, else an empty one (malformed input reads as absent)."""
    return value if isinstance(value, dict) else {}


def _first_dosage(request: Mapping[str, Any]) -> dict[str, Any]:
    dosages = request.get("dosageInstruction")
    return dosages[0] if isinstance(dosages, list) and dosages and isinstance(dosages[0], dict) else {}


def medication_route(request: Mapping[str, Any]) -> Route:
    """The route of a MedicationRequest's first dosage: SNOMED code, else route text."""
    dosage = _first_dosage(request)
    route = dosage.get("route")
    codings = route.get("coding") if isinstance(route, dict) else None
    for coding in codings if isinstance(codings, list) else ():
        if isinstance(coding, dict) and coding.get("code") == ROUTE_IV_SNOMED:
            return "iv"
        if isinstance(coding, dict) and coding.get("code") == ROUTE_ORAL_SNOMED:
            return "oral"
    route_texts = concept_texts(route)
    # The route field first: "oral" there is not overruled by "with maintenance IV fluids" in the instructions.
    if any(text_search(_ROUTE_IV, t) for t in route_texts):
        return "iv"
    if any(text_search(_ROUTE_ORAL, t) or text_search(_ENTERAL_ROUTE, t) for t in route_texts):
        return "oral"
    text = dosage.get("text")
    if isinstance(text, str):
        if text_search(_ROUTE_IV, text):
            return "iv"
        if text_search(_ROUTE_ORAL, text):
            return "oral"
    return "other" if route else "unknown"


def medication_concept(request: Mapping[str, Any]) -> Any:
    """The medication as a CodeableConcept: medicationCodeableConcept, or a reference's display."""
    concept = request.get("medicationCodeableConcept")
    if concept is not None:
        return concept
    reference = request.get("medicationReference")
    if isinstance(reference, dict) and isinstance(reference.get("display"), str):
        return {"text": reference["display"]}
    return None


# A local (non-systemic) route or dose form, read only when the route is neither coded nor written as IV or oral:
# the route's text or display, the medication's name, the dosage text. The words name a route or a form
# ("ophthalmic gel", "tacrolimus ointment", "apply"), not a body part: "CMV retinitis of the left eye" or
# "avoid contact with skin" in an IV order's instructions say nothing about its route.
_LOCAL = re.compile(
    r"\b(topical\w*|ophthalmic|ophth|intravitreal\w*|intraocular|cutaneous|transdermal|ointment|cream|lotion"
    r"|eye ?drops?|eye gel|mouthwash|oral rinse|apply|implant"
    r"|instill?\w*\s+(\d+(-\d+)?\s+)?(drops?\s+)?(in|into|to)\s+(the\s+|each\s+|both\s+|left\s+|right\s+|affected\s+)*"
    r"(eyes?|ears?))\b",
    re.IGNORECASE,
)
# Drug sets that count only as systemic therapy: a local form of these drugs does not act on the whole body.
_SYSTEMIC_ONLY = frozenset({"Ganciclovir", "Immunosuppressants", "NephrotoxicDrugs", "MyelosuppressiveDrugs"})


def _is_local(request: Mapping[str, Any], route: Route) -> bool:
    if route in ("iv", "oral"):
        return False
    dosage = _first_dosage(request)
    texts = [*concept_texts(dosage.get("route")), *concept_texts(medication_concept(request))]
    if isinstance(dosage.get("text"), str):
        texts.append(dosage["text"])
    return any(text_search(_LOCAL, text) for text in texts)


def medication_sets(request: Mapping[str, Any], route: Route | None = None) -> frozenset[str]:
    """The drug code sets (``DRUG_SETS``) a MedicationRequest's medication is in (``concept_in``), less those its
    route rules out: ganciclovir counts only as the IV drug (or a draft with no route yet); immunosuppressants,
    nephrotoxic and myelosuppressive drugs only when not applied locally (tacrolimus ointment, tobramycin eye
    drops: docs/policy.md §7). ``route`` is ``medication_route(request)`` where the caller has it already."""
    sets = concept_sets(medication_concept(request)).matched & _DRUG_SET_NAMES
    if sets.isdisjoint(_SYSTEMIC_ONLY):
        return sets
    if route is None:
        route = medication_route(request)
    if _is_local(request, route):
        sets -= _SYSTEMIC_ONLY
    if "Ganciclovir" in sets and route in ("other", "oral"):
        sets -= {"Ganciclovir"}
    return sets


def medication_fact(request: Mapping[str, Any], *, draft: bool) -> MedicationFact | None:
    """The order as the rules read it (drug sets, exposure window, route), or None for a drug no rule concerns."""
    route = medication_route(request)
    sets = medication_sets(request, route)
    if not sets:
        return None
    status = request.get("status") if isinstance(request.get("status"), str) else "unknown"
    start, end = exposure_window(request, str(status))
    return MedicationFact(
        source=reference_of(request),
        name=concept_label(medication_concept(request), "medication"),
        sets=sets,
        status=str(status),
        start=start,
        end=end,
        route=route,
        draft=draft,
        authored=parse_date(request.get("authoredOn")),
    )


# --- draft orders -------------------------------------------------------------------------------------------------

_TIMING_CODES: dict[str, float] = {  # doses per hour for common HL7 v3 GTSAbbreviation codes
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
# "Maintenance IV fluids" / "maintenance hydration" are not a regimen; "secondary prophylaxis" is maintenance.
_MAINTENANCE = re.compile(
    r"\b(maint(enance|\.)?(?!\w)(?!\s+(iv\s+)?(fluids?|hydration|rate)\b)|secondary prophylaxis)", re.IGNORECASE
)
_NOT_MAINTENANCE = re.compile(
    r"\b(not|no|non)[\s-]+(a\s+)?maint(enance|\.)?(?!\w)"
    r"|\bnot\s+(yet\s+)?(start|begin)\w*\s+maint"
    r"|\bmaint(enance|\.)?\s+(not\s+yet|when|once\s+(?!daily|a\s+day|weekly|per\b))",
    re.IGNORECASE,
)
# Words of another phase, of sequence or of time beside "maintenance" ("Induction: 900 mg BID x21d; maintenance
# afterwards", "maintenance after completed induction", "Days 22+: maintenance", "f/b", "→"): the words alone
# cannot say which phase the order is, and the order as written decides (TextPhase "either").
_SEQUENCE_CUES = re.compile(
    r"\b((re-?)?induct\w*|then|f/b|followed|next|later|subsequent\w*|after\w*|before|prior|upon|start\w*"
    r"|begin\w*|follow\w*|days?\s*\d+|weeks?|x\s*\d+\s*d\w*|post|end of|complet\w*)(?!\w)|→|->",
    re.IGNORECASE,
)

# What the draft's own words say about its phase: maintenance (named, with nothing of another phase, sequence or
# time); induction (named as not maintenance, or not yet); "either" (maintenance beside such words); None when
# maintenance is not named (docs/policy.md §1).
TextPhase = Literal["maintenance", "induction", "either"]


def _text_phase(text: str) -> TextPhase | None:
    if _MAINTENANCE.search(text) is None:
        return None
    if _NOT_MAINTENANCE.search(text):
        return "induction"
    return "either" if _SEQUENCE_CUES.search(text) else "maintenance"


def read_draft_dose(order: Mapping[str, Any], weight_kg: float | None) -> DraftDose:
    """The dose (mg), frequency (doses/hour) and route of a draft's first dosage, where present. A zero or
    negative amount is not a dose: it is reported as invalid (the card says so and proposes the computed one)."""
    dosage = _first_dosage(order)
    mg: float | None = None
    invalid: str | None = None
    rates = dosage.get("doseAndRate")
    for rate in rates if isinstance(rates, list) else ():
        quantity = rate.get("doseQuantity") if isinstance(rate, dict) else None
        value = quantity.get("value") if isinstance(quantity, dict) else None
        if isinstance(value, bool) or not isinstance(value, int | float):
            continue
        assert isinstance(quantity, dict)
        unit = str(quantity.get("code") or quantity.get("unit") or "").strip().lower()
        if value <= 0:
            invalid = f"{value:g} {unit or 'no unit'}"
        elif unit == "mg":
            mg = float(value)
        elif unit == "g":
            mg = float(value) * 1000
        elif unit == "mg/kg" and weight_kg:
            mg = float(value) * weight_kg
        break
    per_hour: float | None = None
    timing = _object(dosage.get("timing"))
    repeat = _object(timing.get("repeat"))
    period, period_unit = repeat.get("period"), repeat.get("periodUnit")
    if isinstance(period, int | float) and period > 0 and period_unit in _PERIOD_HOURS:
        frequency = repeat.get("frequency", 1)
        if isinstance(frequency, int | float) and frequency > 0:
            per_hour = frequency / (period * _PERIOD_HOURS[period_unit])
    else:
        codings = _object(timing.get("code")).get("coding")
        for coding in codings if isinstance(codings, list) else ():
            if isinstance(coding, dict) and str(coding.get("code", "")).upper() in _TIMING_CODES:
                per_hour = _TIMING_CODES[str(coding["code"]).upper()]
    return DraftDose(mg=mg, invalid=invalid, per_hour=per_hour, route=medication_route(order))


def text_phase(order: Mapping[str, Any]) -> TextPhase | None:
    """What the draft's dosage text, notes and course of therapy, read together, say about its phase (``TextPhase``;
    docs/policy.md §1)."""
    texts: list[str] = []
    for key in ("dosageInstruction", "note"):
        items = order.get(key)
        for item in items if isinstance(items, list) else ():
            if isinstance(item, dict) and isinstance(item.get("text"), str):
                texts.append(item["text"])
    texts += concept_texts(order.get("courseOfTherapyType"))
    # One reading of all of them: "Induction: …" in the dosage, maintenance in a note.
    return _text_phase(". ".join(texts))


_DRUGS: tuple[tuple[str, Drug], ...] = (
    ("Valganciclovir", "valganciclovir"),
    ("Ganciclovir", "ganciclovir"),
    ("Foscarnet", "foscarnet"),
    ("Cidofovir", "cidofovir"),
)


def cmv_drug(order: Mapping[str, Any]) -> Drug | None:
    """The CMV antiviral a MedicationRequest orders, by RxNorm code or name; None otherwise.

    Ganciclovir by a route other than IV (ophthalmic gel, intravitreal implant) is not systemic therapy
    and is not this service's concern (``medication_sets``); a draft without a route yet is taken as the IV drug.
    """
    if order.get("resourceType") != "MedicationRequest":
        return None
    sets = medication_sets(order)
    return next((drug for set_name, drug in _DRUGS if set_name in sets), None)
