"""Patient facts from FHIR R4 resources (plain JSON dicts), as policy.md §2 selects them.

Every fact keeps its date and the id of the resource it came from, so a card can say where each
number came from. Reading is defensive: a malformed element makes that one value unusable (and the
card says what is missing); it never raises.

Resources are read as JSON rather than through fhir.resources models: the rules need a few elements
of a few resources, and model-validating every prefetched resource costs ~0.2 ms each
(reference/ecosystem.md §1). The selected draft orders, which the service proposes to change, are
validated against the FHIR R4 JSON Schema in ``service.draft_schema``.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import functools
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any, Literal

from cards import units
from cards.codes import CodeSet, code_set, coded_set_names, text_set_names

Sex = Literal["male", "female", "other", "unknown"]

# policy.md §2 freshness windows, in days.
FRESHNESS_DAYS = {
    "creatinine": 7,  # serum creatinine 7 days
    "anc": 7,  # blood counts 7 days
    "platelets": 7,
    "hemoglobin": 7,
    "weight": 30,  # body weight 30 days
    "viral_load": 14,  # CMV viral load 14 days
}
# Product safety limits, not label values (the references give none): a value outside them is a data
# error (wrong unit, typo), treated as unusable so no dose is computed from it, and the card says so.
# Cockcroft-Gault is meaningless at age ≥ 140, and mg/kg doses from a mistyped weight would be absurd.
PLAUSIBLE: dict[str, tuple[float, float]] = {
    "BodyWeight": (10.0, 500.0),  # kg
    "BodyHeight": (50.0, 250.0),  # cm
    "SerumCreatinine": (0.1, 25.0),  # mg/dL
}
MAX_PLAUSIBLE_AGE_YEARS = 125

# policy.md §6: a positive hCG "within 30 days" counts as pregnancy.
PREGNANCY_TEST_WINDOW_DAYS = 30
# clinical.md §4 / policy.md §4: a nephrotoxic agent active "in the last 7 days" bars cidofovir.
NEPHROTOXIC_LOOKBACK_DAYS = 7

# policy.md §2: Observations with these statuses are ignored ("preliminary" only when it has no value).
_IGNORED_STATUSES = frozenset({"entered-in-error", "cancelled"})
_ACTIVE_CONDITION = frozenset({"active", "recurrence", "relapse"})
_EXCLUDED_VERIFICATION = frozenset({"refuted", "entered-in-error"})
_ACTIVE_MEDICATION = frozenset({"active", "on-hold", "draft"})

# Text matches (not code matches) are ignored when the wording negates or qualifies the finding:
# "HIV negative", "not pregnant", "pre-dialysis", "transplant donor", "CMV IgG positive" (serostatus).
_NEGATED = re.compile(
    r"\b(not|no|negative|denies|denied|ruled out|rule out|without|pre-?dialysis|donor|igg|"
    r"serostatus|seropositive|seronegative|screening|risk of)\b",
    re.IGNORECASE,
)
_UNDETECTED = re.compile(r"\b(not detected|undetect\w*|negative|below|<\s*lloq|none detected)\b", re.IGNORECASE)
_DETECTED = re.compile(r"\b(detected|positive|reactive)\b", re.IGNORECASE)
_RESISTANCE_TEXT = re.compile(r"\b(ul97|ul54)\b|ganciclovir[- ]resistan|resistant cmv|cmv resistan", re.IGNORECASE)
_MUTATION = re.compile(r"\b[A-Z]\d{3}[A-Z]\b")

MANIFESTATION_SETS = {
    "pneumonitis": "CmvPneumonitis",
    "retinitis": "CmvRetinitis",
    "gastrointestinal": "CmvGastrointestinal",
    "cns": "CmvCns",
    "hepatitis": "CmvHepatitis",
}

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
CMV_ANTIVIRALS = ("Ganciclovir", "Valganciclovir", "Foscarnet", "Cidofovir")


@dataclass(frozen=True)
class Evidence:
    """Where a finding came from: the resource reference, its date, and a short label for the card."""

    source: str
    date: dt.date | None
    label: str


@dataclass(frozen=True)
class Measurement:
    """A numeric value in its canonical unit, with its date and source."""

    value: float
    unit: str
    date: dt.date
    source: str
    stale: bool

    def age_days(self, today: dt.date) -> int:
        return (today - self.date).days


@dataclass(frozen=True)
class Unusable:
    """The latest result exists but cannot be used (unit not recognised, no numeric value)."""

    reason: str
    source: str
    date: dt.date


@dataclass(frozen=True)
class ViralLoad:
    """One CMV DNA result: IU/mL when quantitative in IU, ``undetectable`` when below detection."""

    date: dt.date
    source: str
    iu_per_ml: float | None
    undetectable: bool
    copies_per_ml: float | None = None


@dataclass(frozen=True)
class MedicationFact:
    """An active (or recently stopped) medication or another draft order, classified by code set."""

    source: str
    name: str
    sets: frozenset[str]
    status: str
    start: dt.date | None
    end: dt.date | None
    route: Literal["iv", "oral", "other", "unknown"]
    draft: bool

    def active_on(self, day: dt.date) -> bool:
        if self.status in _ACTIVE_MEDICATION:
            return self.end is None or self.end >= day
        return self.end is not None and self.end >= day


@dataclass(frozen=True)
class PatientFacts:
    """Everything the CMV rules know about the patient, each value with its provenance."""

    today: dt.date
    patient_source: str | None
    age_years: int | None
    sex: Sex
    weight: Measurement | Unusable | None
    height: Measurement | Unusable | None
    creatinine: Measurement | Unusable | None
    anc: Measurement | Unusable | None
    platelets: Measurement | Unusable | None
    hemoglobin: Measurement | Unusable | None
    urine_protein: Measurement | Unusable | None
    viral_loads: tuple[ViralLoad, ...]  # oldest first
    pregnancy: Evidence | None
    dialysis: Evidence | None
    transplant: Evidence | None
    hiv: Evidence | None
    manifestations: Mapping[str, Evidence]
    severe: Evidence | None
    malabsorption: Evidence | None
    resistance: Evidence | None
    medications: tuple[MedicationFact, ...] = field(default=())

    @property
    def latest_viral_load(self) -> ViralLoad | None:
        return self.viral_loads[-1] if self.viral_loads else None

    def medications_in(self, set_name: str, *, on: dt.date | None = None) -> list[MedicationFact]:
        day = on or self.today
        return [m for m in self.medications if set_name in m.sets and m.active_on(day)]


# --- small readers -----------------------------------------------------------------------------


def parse_date(value: Any) -> dt.date | None:
    """FHIR date/dateTime/instant → date (partial dates take the first day); None if unparseable."""
    if not isinstance(value, str) or len(value) < 4:
        return None
    text = value.strip()
    try:
        if len(text) == 4:
            return dt.date(int(text), 1, 1)
        if len(text) == 7:
            return dt.date(int(text[:4]), int(text[5:7]), 1)
        if len(text) == 10:
            return dt.date.fromisoformat(text)
        return dt.datetime.fromisoformat(text.replace("z", "Z")).date()
    except ValueError:
        return None


def _reference(resource: Mapping[str, Any]) -> str:
    kind = resource.get("resourceType")
    ident = resource.get("id")
    return f"{kind}/{ident}" if isinstance(ident, str) else f"{kind} (no id)"


def _texts(concept: Any) -> list[str]:
    if not isinstance(concept, dict):
        return []
    texts = [concept["text"]] if isinstance(concept.get("text"), str) else []
    codings = concept.get("coding")
    if isinstance(codings, list):
        texts += [c["display"] for c in codings if isinstance(c, dict) and isinstance(c.get("display"), str)]
    return texts


def concept_in(concept: Any, value_set: CodeSet) -> bool:
    """Code match, or a name match whose wording is not negated or qualified."""
    if value_set.registered:
        return value_set.name in _concept_sets(concept).matched
    if value_set.matches_coding_only(concept):
        return True
    return value_set.matches_concept(concept) and not any(_NEGATED.search(t) for t in _texts(concept))


def coded_in(concept: Any, value_set: CodeSet) -> bool:
    """``value_set.matches_coding_only(concept)``, through the per-call memo for registered sets."""
    if value_set.registered:
        return value_set.name in _concept_sets(concept).coded
    return value_set.matches_coding_only(concept)


# Per-call memo of the registered code sets each CodeableConcept is in (the answers of the code above,
# computed once per concept from per-coding and per-text lookups cached in cards.codes).
# Why: build_facts and the rules ask some 300 (concept, set) questions per hook call, and each answer
# re-normalised the codings and re-ran regexes over the texts: 0.8 ms of a ~3 ms call (bench/README.md).
# Keyed by id() for speed; each entry keeps a reference to its concept, so the id cannot be reused by
# another object while the memo lives, and the identity check rules out a stale hit. The memo lives for
# one evaluate() / build_facts() call, during which the input resources are not modified.
@dataclass(frozen=True)
class _ConceptSets:
    concept: Any
    coded: frozenset[str]  # sets matched by a coding (matches_coding_only)
    matched: frozenset[str]  # concept_in: coded, or named by a text or display that is not negated


_MEMO: ContextVar[dict[int, _ConceptSets] | None] = ContextVar("cmv_cds_concept_memo", default=None)
# Texts longer than this (rare, and possibly hostile) are checked for negation without being cached.
_CACHEABLE_TEXT = 256


@functools.lru_cache(maxsize=8192)
def _negated_cached(text: str) -> bool:
    return _NEGATED.search(text) is not None


def _negated(text: str) -> bool:
    return _negated_cached(text) if len(text) <= _CACHEABLE_TEXT else _NEGATED.search(text) is not None


def _new_concept_sets(concept: Any) -> _ConceptSets:
    coded = coded_set_names(concept)
    matched = coded
    texts = _texts(concept)
    if texts and not any(_negated(t) for t in texts):
        for text in texts:
            matched = matched | text_set_names(text)
    return _ConceptSets(concept, coded, matched)


def _concept_sets(concept: Any) -> _ConceptSets:
    memo = _MEMO.get()
    if memo is None:
        return _new_concept_sets(concept)
    entry = memo.get(id(concept))
    if entry is None or entry.concept is not concept:
        entry = memo[id(concept)] = _new_concept_sets(concept)
    return entry


@contextlib.contextmanager
def concept_memo() -> Iterator[None]:
    """Memoise concept matching for the duration of the block (reentrant)."""
    if _MEMO.get() is not None:
        yield
        return
    token = _MEMO.set({})
    try:
        yield
    finally:
        _MEMO.reset(token)


def concept_label(concept: Any, fallback: str) -> str:
    texts = _texts(concept)
    return texts[0][:80] if texts else fallback


def parse_instant(value: Any) -> dt.datetime | None:
    """FHIR date/dateTime/instant → an aware datetime for ordering (dates at 00:00, naive times as UTC)."""
    day = parse_date(value)
    if day is None:
        return None
    assert isinstance(value, str)
    text = value.strip()
    if len(text) > 10:
        try:
            moment = dt.datetime.fromisoformat(text.replace("z", "Z"))
        except ValueError:
            return None
        return moment if moment.tzinfo else moment.replace(tzinfo=dt.UTC)
    return dt.datetime(day.year, day.month, day.day, tzinfo=dt.UTC)


def _observation_instant(observation: Mapping[str, Any]) -> dt.datetime | None:
    """When the observation was made (policy.md §2: effectiveDateTime, else issued), to the second, so
    that two results on the same day are ordered correctly."""
    for key in ("effectiveDateTime", "effectiveInstant", "issued"):
        found = parse_instant(observation.get(key))
        if found:
            return found
    period = observation.get("effectivePeriod")
    if isinstance(period, dict):
        return parse_instant(period.get("start")) or parse_instant(period.get("end"))
    return None


def _observation_date(observation: Mapping[str, Any]) -> dt.date | None:
    instant = _observation_instant(observation)
    return instant.date() if instant else None


def _has_value(observation: Mapping[str, Any]) -> bool:
    return any(key.startswith("value") for key in observation)


def _usable_observation(observation: Mapping[str, Any]) -> bool:
    status = observation.get("status")
    if not isinstance(status, str) or status in _IGNORED_STATUSES:
        return False
    return not (status == "preliminary" and not _has_value(observation))


@dataclass(frozen=True)
class _TimedObservation:
    """A usable, timed Observation with the code sets its code is in, classified once per call."""

    instant: dt.datetime
    observation: Mapping[str, Any]
    coded: frozenset[str]  # sets named by a coding (coded_in)
    matched: frozenset[str]  # sets named by a coding or a non-negated text (concept_in)


def _index_observations(observations: Iterable[Mapping[str, Any]]) -> tuple[_TimedObservation, ...]:
    """Usable observations with a time, oldest first by their full timestamp, each code classified once.

    Why: every fact below asks "the observations of set X"; classifying each Observation once and
    filtering by set name replaced ~200 (observation, set) questions per call (bench/README.md)."""
    indexed = []
    for observation in observations:
        if not _usable_observation(observation):
            continue
        instant = _observation_instant(observation)
        if instant is None:
            continue
        sets = _concept_sets(observation.get("code"))
        indexed.append(_TimedObservation(instant, observation, sets.coded, sets.matched))
    indexed.sort(key=lambda item: item.instant)  # stable: same-instant results keep their order
    return tuple(indexed)


def _observations_in(observations: Sequence[_TimedObservation], set_name: str) -> list[_TimedObservation]:
    """The indexed observations of one code set, oldest first."""
    code_set(set_name)  # an unknown set name is a programming error: KeyError naming the set
    return [item for item in observations if set_name in item.matched]


def _latest_measurement(
    observations: Sequence[_TimedObservation],
    set_name: str,
    table: Mapping[str, float],
    unit: str,
    today: dt.date,
    freshness_key: str | None,
) -> Measurement | Unusable | None:
    dated = _observations_in(observations, set_name)
    if not dated:
        return None
    latest = dated[-1]
    when, observation = latest.instant.date(), latest.observation
    source = _reference(observation)
    quantity = observation.get("valueQuantity")
    value = units.quantity_in(quantity, table)
    if value is None:
        reason = (
            f"unit '{units.unit_label(quantity)}' not recognised"
            if isinstance(quantity, dict) and quantity.get("value") is not None
            else "no numeric result"
        )
        return Unusable(reason=reason, source=source, date=when)
    limits = PLAUSIBLE.get(set_name)
    if limits is not None and not limits[0] <= value <= limits[1]:
        reason = f"value {value:.4g} {unit} outside the plausible range {limits[0]:g}–{limits[1]:g} {unit}"
        return Unusable(reason=reason, source=source, date=when)
    window = FRESHNESS_DAYS.get(freshness_key or "")
    stale = window is not None and (today - when).days > window
    return Measurement(value=value, unit=unit, date=when, source=source, stale=stale)


def _age(birth_date: dt.date | None, today: dt.date) -> int | None:
    """Completed years on ``today`` (policy.md §3); None when unknown or implausible."""
    if birth_date is None or birth_date > today:
        return None
    age = today.year - birth_date.year - ((today.month, today.day) < (birth_date.month, birth_date.day))
    return age if age <= MAX_PLAUSIBLE_AGE_YEARS else None


_VIRAL_LOAD_SETS = ("CmvViralLoadIU", "CmvViralLoadLog10IU", "CmvViralLoadCopies", "CmvDnaQualitative")


def _viral_loads(observations: Sequence[_TimedObservation]) -> tuple[ViralLoad, ...]:
    """The CMV DNA results, oldest first (the index is in time order)."""
    loads: list[ViralLoad] = []
    for item in observations:
        # A coding decides the kind; a name match only when no coding does.
        kind = next((name for name in _VIRAL_LOAD_SETS if name in item.coded), None)
        if kind is None:
            kind = next((name for name in _VIRAL_LOAD_SETS if name in item.matched), None)
        if kind is None:
            continue
        observation = item.observation
        when = item.instant.date()
        source = _reference(observation)
        quantity = observation.get("valueQuantity")
        undetectable = _reads_undetectable(observation)
        iu = copies = None
        if isinstance(quantity, dict) and not undetectable:
            comparator = quantity.get("comparator")
            if comparator in ("<", "<="):
                undetectable = True  # below the assay's reportable range
            elif kind == "CmvViralLoadLog10IU":
                log_value = units.quantity_in({**quantity, "code": "iu/ml"}, units.VIRAL_LOAD_TO_IU_ML)
                # 10^12 IU/mL is beyond any assay's range: a larger log value is a data error (product limit).
                iu = 10**log_value if log_value is not None and log_value < 12 else None
            elif kind == "CmvViralLoadIU":
                iu = units.quantity_in(quantity, units.VIRAL_LOAD_TO_IU_ML)
            elif kind == "CmvViralLoadCopies":
                copies = units.quantity_in(quantity, units.VIRAL_LOAD_COPIES)
        if iu is not None and iu <= 0:
            iu, undetectable = None, True
        if iu is None and copies is None and not undetectable:
            if kind == "CmvDnaQualitative" and _reads_detected(observation):
                loads.append(ViralLoad(date=when, source=source, iu_per_ml=None, undetectable=False))
            continue
        loads.append(ViralLoad(date=when, source=source, iu_per_ml=iu, undetectable=undetectable, copies_per_ml=copies))
    return tuple(loads)


def _value_texts(observation: Mapping[str, Any]) -> list[str]:
    texts = []
    if isinstance(observation.get("valueString"), str):
        texts.append(observation["valueString"])
    texts += _texts(observation.get("valueCodeableConcept"))
    for interpretation in observation.get("interpretation") or []:
        texts += _texts(interpretation)
    return texts


def _reads_undetectable(observation: Mapping[str, Any]) -> bool:
    return any(_UNDETECTED.search(text) for text in _value_texts(observation))


def _reads_detected(observation: Mapping[str, Any]) -> bool:
    return any(_DETECTED.search(t) and not _UNDETECTED.search(t) for t in _value_texts(observation))


def _positive_pregnancy_test(observations: Sequence[_TimedObservation], today: dt.date) -> Evidence | None:
    for item in reversed(_observations_in(observations, "PregnancyTest")):
        when, observation = item.instant.date(), item.observation
        if (today - when).days > PREGNANCY_TEST_WINDOW_DAYS:
            break
        # Qualitative tests say positive/detected; a quantitative hCG counts only when the lab flags it
        # positive or high (no numeric cut-off is in the reference).
        interpretation_codes = {
            c.get("code")
            for i in observation.get("interpretation") or []
            if isinstance(i, dict)
            for c in i.get("coding") or []
            if isinstance(c, dict)
        }
        if _reads_detected(observation) or interpretation_codes & {"POS", "H", "HH", "A"}:
            return Evidence(_reference(observation), when, "positive pregnancy test")
        return None  # the latest test within the window is negative
    return None


def coding_codes(concept: Any) -> set[str]:
    """The string codes of a CodeableConcept's codings; malformed parts are ignored."""
    codings = concept.get("coding") if isinstance(concept, dict) else None
    if not isinstance(codings, list):
        return set()
    return {c["code"] for c in codings if isinstance(c, dict) and isinstance(c.get("code"), str)}


def _active_condition(condition: Mapping[str, Any], today: dt.date) -> bool:
    codes = coding_codes(condition.get("clinicalStatus"))
    if codes and not codes & _ACTIVE_CONDITION:
        return False
    if coding_codes(condition.get("verificationStatus")) & _EXCLUDED_VERIFICATION:
        return False
    abated = parse_date(condition.get("abatementDateTime"))
    return abated is None or abated > today


def _resistance(observations: Sequence[Mapping[str, Any]], conditions: Sequence[Mapping[str, Any]]) -> Evidence | None:
    """A reported UL97/UL54 mutation (policy.md §6) in a genotype result, or a resistance diagnosis."""
    for observation in observations:
        names = " ".join(_texts(observation.get("code")))
        if not _RESISTANCE_TEXT.search(names) or not _usable_observation(observation):
            continue
        values = _value_texts(observation)
        if any(_MUTATION.search(v) for v in values) or _reads_detected(observation):
            return Evidence(_reference(observation), _observation_date(observation), "UL97/UL54 mutation reported")
    for condition in conditions:
        if any(_RESISTANCE_TEXT.search(t) and not _NEGATED.search(t) for t in _texts(condition.get("code"))):
            return Evidence(
                _reference(condition), parse_date(condition.get("recordedDate")), "ganciclovir-resistant CMV"
            )
    return None


_ROUTE_IV = re.compile(r"\b(iv|intravenous\w*|i\.v\.)\b", re.IGNORECASE)
_ROUTE_ORAL = re.compile(r"\b(po|oral\w*|by mouth|p\.o\.)\b", re.IGNORECASE)
ROUTE_IV_SNOMED = "47625008"  # policy.md §8
ROUTE_ORAL_SNOMED = "26643006"  # policy.md §8


def medication_route(request: Mapping[str, Any]) -> Literal["iv", "oral", "other", "unknown"]:
    """The route of a MedicationRequest's first dosage: SNOMED code, else route text."""
    dosages = request.get("dosageInstruction")
    dosage = dosages[0] if isinstance(dosages, list) and dosages and isinstance(dosages[0], dict) else {}
    route = dosage.get("route")
    for coding in (route or {}).get("coding") or [] if isinstance(route, dict) else []:
        if isinstance(coding, dict) and coding.get("code") == ROUTE_IV_SNOMED:
            return "iv"
        if isinstance(coding, dict) and coding.get("code") == ROUTE_ORAL_SNOMED:
            return "oral"
    texts = _texts(route) + ([dosage["text"]] if isinstance(dosage.get("text"), str) else [])
    if any(_ROUTE_IV.search(t) for t in texts):
        return "iv"
    if any(_ROUTE_ORAL.search(t) for t in texts):
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


_DRUG_SET_NAMES = frozenset(DRUG_SETS)


def medication_sets(request: Mapping[str, Any]) -> frozenset[str]:
    """The drug code sets (``DRUG_SETS``) a MedicationRequest's medication is in (``concept_in``)."""
    return _concept_sets(medication_concept(request)).matched & _DRUG_SET_NAMES


def _medication_fact(request: Mapping[str, Any], *, draft: bool) -> MedicationFact | None:
    sets = medication_sets(request)
    if not sets:
        return None
    dosages = request.get("dosageInstruction")
    bounds: Any = None
    if isinstance(dosages, list) and dosages and isinstance(dosages[0], dict):
        timing = dosages[0].get("timing")
        repeat = timing.get("repeat") if isinstance(timing, dict) else None
        bounds = repeat.get("boundsPeriod") if isinstance(repeat, dict) else None
    start = parse_date(bounds.get("start")) if isinstance(bounds, dict) else None
    end = parse_date(bounds.get("end")) if isinstance(bounds, dict) else None
    start = start or parse_date(request.get("authoredOn"))
    status = request.get("status") if isinstance(request.get("status"), str) else "unknown"
    return MedicationFact(
        source=_reference(request),
        name=concept_label(medication_concept(request), "medication"),
        sets=sets,
        status=str(status),
        start=start,
        end=end,
        route=medication_route(request),
        draft=draft,
    )


# --- assembly ----------------------------------------------------------------------------------


def build_facts(
    resources: Iterable[Mapping[str, Any]],
    other_draft_orders: Iterable[Mapping[str, Any]],
    patient_id: str,
    today: dt.date,
) -> PatientFacts:
    """Collect the facts from every resource the request carried or the service fetched."""
    with concept_memo():
        return _build_facts(resources, other_draft_orders, patient_id, today)


def _build_facts(
    resources: Iterable[Mapping[str, Any]],
    other_draft_orders: Iterable[Mapping[str, Any]],
    patient_id: str,
    today: dt.date,
) -> PatientFacts:
    by_type: dict[str, dict[str, Mapping[str, Any]]] = {}
    for resource in resources:
        if not isinstance(resource, dict) or not isinstance(resource.get("resourceType"), str):
            continue
        key = str(resource["id"]) if isinstance(resource.get("id"), str) else str(id(resource))
        by_type.setdefault(resource["resourceType"], {})[key] = resource  # one copy per id
    patient = by_type.get("Patient", {}).get(patient_id)
    observations = list(by_type.get("Observation", {}).values())
    timed = _index_observations(observations)
    conditions = [c for c in by_type.get("Condition", {}).values() if _active_condition(c, today)]

    birth = parse_date(patient.get("birthDate")) if patient else None
    gender = patient.get("gender") if patient else None
    sex: Sex = gender if gender in ("male", "female", "other") else "unknown"

    cmv_conditions = [c for c in conditions if _cmv_related(c.get("code"))]

    def finding(set_name: str, label: str, *, cmv_only: bool = False) -> Evidence | None:
        value_set = code_set(set_name)
        for condition in cmv_conditions if cmv_only else conditions:
            code = condition.get("code")
            if concept_in(code, value_set):
                return Evidence(
                    _reference(condition),
                    parse_date(condition.get("recordedDate")),
                    concept_label(code, label),
                )
        return None

    manifestations = {
        name: evidence
        for name, set_name in MANIFESTATION_SETS.items()
        if (evidence := finding(set_name, name, cmv_only=True)) is not None
    }
    severe = None
    severity_set = code_set("SevereSeverity")
    for condition in cmv_conditions:
        if concept_in(condition.get("severity"), severity_set) or severity_set.matches_text(
            " ".join(_texts(condition.get("code")))
        ):
            severe = Evidence(_reference(condition), parse_date(condition.get("recordedDate")), "severe CMV disease")
            break

    medications = [
        fact
        for request in by_type.get("MedicationRequest", {}).values()
        if (fact := _medication_fact(request, draft=False)) is not None
    ]
    medications += [
        fact
        for request in other_draft_orders
        if isinstance(request, dict) and request.get("resourceType") == "MedicationRequest"
        if (fact := _medication_fact(request, draft=True)) is not None
    ]

    return PatientFacts(
        today=today,
        patient_source=_reference(patient) if patient else None,
        age_years=_age(birth, today),
        sex=sex,
        weight=_latest_measurement(timed, "BodyWeight", units.WEIGHT_TO_KG, "kg", today, "weight"),
        height=_latest_measurement(timed, "BodyHeight", units.HEIGHT_TO_CM, "cm", today, None),
        creatinine=_latest_measurement(
            timed, "SerumCreatinine", units.CREATININE_TO_MG_DL, "mg/dL", today, "creatinine"
        ),
        anc=_latest_measurement(timed, "NeutrophilCount", units.COUNT_TO_PER_UL, "cells/µL", today, "anc"),
        platelets=_latest_measurement(timed, "PlateletCount", units.COUNT_TO_PER_UL, "/µL", today, "platelets"),
        hemoglobin=_latest_measurement(timed, "Hemoglobin", units.HEMOGLOBIN_TO_G_DL, "g/dL", today, "hemoglobin"),
        urine_protein=_latest_measurement(timed, "UrineProtein", units.URINE_PROTEIN_TO_MG_DL, "mg/dL", today, None),
        viral_loads=_viral_loads(timed),
        pregnancy=_positive_pregnancy_test(timed, today) or finding("Pregnancy", "pregnancy"),
        dialysis=finding("DialysisDependence", "dialysis dependence"),
        transplant=finding("OrganTransplant", "transplant recipient"),
        hiv=finding("HivInfection", "HIV infection"),
        manifestations=manifestations,
        severe=severe,
        malabsorption=finding("Malabsorption", "impaired GI absorption"),
        resistance=_resistance(observations, conditions),
        medications=tuple(medications),
    )


_MANIFESTATION_SET_NAMES = frozenset(MANIFESTATION_SETS.values())


def _cmv_related(concept: Any) -> bool:
    """Named as CMV infection, or coded as a CMV manifestation."""
    sets = _concept_sets(concept)
    return "CmvInfection" in sets.matched or not sets.coded.isdisjoint(_MANIFESTATION_SET_NAMES)
