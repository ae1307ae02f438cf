"""Patient facts from FHIR R4 resources (plain JSON dicts), read in one pass as docs/policy.md §2 selects them.

Every resource is classified once: its code goes through the code-set index of ``cards.codes`` (a coding's
(system, code), else a non-negated name), and the sets it is in name the fact it feeds (``LAB_FAMILIES``,
``CONDITION_FINDINGS``, the viral-load and pregnancy-test sets, the drug sets). Each fact keeps its date, the
resource it came from and the code that identified it, so a card can say where each number came from. The
rules read these facts only; they never look at the resources again.

Reading is defensive: a malformed element makes that one value unusable (and the card says what is missing);
it never raises. Resources are read as JSON rather than through fhir.resources models: the rules need a few
elements of a few resources, and model-validating every prefetched resource costs ~0.2 ms each. The selected
draft orders, which the service proposes to change, are validated against the FHIR R4 JSON Schema by the
service before they get here.
"""

from __future__ import annotations

import datetime as dt
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from cards import units
from cards.codes import Concept, coded_concept
from cards.fhir_in import (
    ConceptSets,
    coding_codes,
    concept_label,
    concept_memo,
    concept_sets,
    concept_texts,
    parse_date,
    parse_instant,
    reference_of,
    text_search,
)
from cards.orders import OrderFact, cmv_drug, medication_fact, read_draft_dose, text_phase
from cards.therapy import MedicationFact

Sex = Literal["male", "female", "other", "unknown"]

# Product safety limits (docs/policy.md §3, "Plausibility limits"): a value outside is a data error (wrong
# unit, typo) and is treated as unusable, so no dose is computed from it, and the card says so.
MAX_PLAUSIBLE_AGE_YEARS = 125

# docs/policy.md §9: a positive hCG "within 30 days" counts as pregnancy.
PREGNANCY_TEST_WINDOW_DAYS = 30
# docs/clinical-basis.md §5.2: a nephrotoxic agent "in the last 7 days" bars cidofovir.
NEPHROTOXIC_LOOKBACK_DAYS = 7

# docs/policy.md §2: Observations with these statuses are ignored ("preliminary" only when it has no value).
_IGNORED_STATUSES = frozenset({"entered-in-error", "cancelled"})
_ACTIVE_CONDITION = frozenset({"active", "recurrence", "relapse"})
_EXCLUDED_VERIFICATION = frozenset({"refuted", "entered-in-error"})

# A result that reports nothing found: "not detected", "No CMV DNA detected", "no resistance mutations detected",
# "wild type", "not found", "negative", "non-reactive", "below the limit", "<LLOQ", "TND" (target not detected).
# A "no ... detected" reading names what was not found, so "No PCR inhibition detected" is not one.
_ANALYTE = r"(cmv|hcmv|cytomegalovirus|viral|virus|dna|mutations?|resistance|variants?|hcg)"
_UNDETECTED = re.compile(
    r"\b(not detected|undetect\w*|negative|neg|non-?reactive|below|none detected|not found|wild[- ]?type|tnd"
    rf"|no\b[\w\s,/-]{{0,40}}?\b{_ANALYTE}\b[\w\s,/-]{{0,40}}?\b(detected|found|identified))\b"
    r"|<\s*lloq\b",
    re.IGNORECASE,
)
_DETECTED = re.compile(r"(?<!non-)(?<!not )\b(detected|positive|pos|reactive)\b", re.IGNORECASE)
# A genotype report is read sentence by sentence and, within one, part by part (split at , ; and brackets), in
# order (_resistance_reported). A sentence that lists what the assay screens for ("Mutations screened: UL97 M460V,
# H520Q; UL54 A987G") reports nothing found by itself; a gene label starts a new finding ("UL54: wild type; UL97
# M460V").
_SENTENCES = re.compile(r"(?<![.\s])\.(?=\s|$)|\n")  # a full stop, not an ellipsis
_PARTS = re.compile(r"[,;()\[\]]|\s+and\s+|\s+/\s+")
# A protein change in one-letter (M460V, p.M460V) or three-letter (p.Met460Val) notation, or a deletion (del 591-594).
_MUTATION = re.compile(
    r"\b(p\.)?([A-Z]\d{3}[A-Z]|[A-Z][a-z]{2}\d{3}[A-Z][a-z]{2})\b|\b(?i:del|deletion)\s*(of\s+)?(codons?\s+)?\d{3}\b"
)
# Identifiers that look like mutations ("Accession S240K", "Sample ID: A123B"): taken out before reading.
_IDENTIFIER = re.compile(
    r"\b(accession|sample|specimen|order|lot|reference|ref)\b\s*(#|no\.?|number|id)?\s*:?\s*[A-Z0-9][\w-]*", re.I
)
_GENE = re.compile(r"\bUL\s?\d{2,3}\b", re.IGNORECASE)
# What the assay looks for, as opposed to what it found: "Mutations screened: …", "this assay detects mutations such
# as M460V", "the most frequent UL97 mutations are …", "(e.g., M460V)". In such a part nothing is a finding, and
# to the end of the sentence a bare mutation is not one either. Not "include" or "tested region", which reports
# also use for findings ("Mutations identified include UL97 A594V").
_PANEL = re.compile(
    r"\b(screened|screens|screening|tested for|(this|the) assay|limit of detection|such as|e\.g|for example"
    r"|(most (frequent|common)|commonly \w+|known)\b[^.;]*\b(are|include\w*))\b",
    re.IGNORECASE,
)
# "panel", "known", "target" alone are not: reports use them for findings ("UL97 panel result: A594V", "Known
# resistance mutation: UL97 L595S"), and a missed resistance is the worse error.
_LIST_WORDS = re.compile(r"\b(panel|targets?|known|codons?|covered|covers|screen\w*)\b", re.IGNORECASE)
_OTHER_THAN = re.compile(r"\b(other|additional|further)\b", re.IGNORECASE)
_NONE = re.compile(r"\b(none|nothing|no evidence)\b", re.IGNORECASE)
_FOUND = re.compile(r"(?<!not )\b(identified|found)\b", re.IGNORECASE)
# A named variant that is not resistance: "UL97 D605E (polymorphism, not resistance)".
_NOT_RESISTANCE_WORDS = r"polymorphisms?|natural variants?|benign|no resistance"
_NOT_RESISTANCE = re.compile(rf"\b({_NOT_RESISTANCE_WORDS}|not\b[^.;,]{{0,30}}\bresistan\w*)\b", re.IGNORECASE)
# The report's own interpretation: "Ganciclovir: RESISTANT", "resistant to ganciclovir".
_GANCICLOVIR_RESISTANT = re.compile(
    r"\b((val)?ganciclovir|v?gcv)\W{0,3}(resistant|resistance (detected|present|likely))\b"
    r"|(?<!not )\bresistant to ((val)?ganciclovir|v?gcv)\b|\bconfers? (val)?ganciclovir resistance\b",
    re.IGNORECASE,
)
_BRACKETED_PANEL = re.compile(rf"\([^()]*{_PANEL.pattern}[^()]*\)|\[[^\[\]]*{_PANEL.pattern}[^\[\]]*\]", re.IGNORECASE)
# A variant named with "(polymorphism)" / "(not associated with resistance)"; not "(ganciclovir resistant; not
# resistant to foscarnet)", which is drug by drug.
_VARIANT_NOT_RESISTANCE = re.compile(
    rf"\S+\s*\([^()]*\b({_NOT_RESISTANCE_WORDS}|not (associated with )?resistance)\b[^()]*\)", re.IGNORECASE
)
# A CMV result named as a resistance test (not a glycoprotein/strain genotype, nor a viral load reflexing to one),
# and a value that speaks of mutations: a genotype report, not a viral load.
_RESISTANCE_NAME = re.compile(r"\b(resistan\w*|genotyp\w*|mutations?)\b", re.IGNORECASE)
_NOT_RESISTANCE_NAME = re.compile(
    r"\b(glycoprotein|g[bhno]\d?|strain|reflex\w*|quant\w*|viral load|load|pcr|naa|monitor\w*|consider\w*)\b",
    re.IGNORECASE,
)
_RESISTANCE_TEST_SETS = frozenset({"CmvResistance", "CmvInfection"})
_VIRAL_LOAD_NAME = re.compile(r"\b(reflex\w*|quant\w*|viral load)\b", re.IGNORECASE)
_OTHER_VIRUS = re.compile(r"\b(hsv|herpes simplex|vzv|varicella|ebv|epstein|hhv-?[1-8]|hiv|hbv|hcv)", re.IGNORECASE)
# The value's lead: "Detected" in "Detected; reflexed to UL97 analysis" (not split inside 5,000 or 2.5).
_LEAD = re.compile(r"\.(?!\d)|[;\n]|,(?!\d{3}\b)|\s[-–/]\s")
# The assay's limits stated beside the result ("LOD 35 IU/mL; not detected", "LLOQ 137 IU/mL", "cutoff 5 IU/mL").
_ASSAY_LIMIT = re.compile(
    r"\b(lod|lloq|loq|limit of (detection|quantification|quantitation)|detection limit|cut-?off|reference range"
    r"|reportable range|linear range)\b[^;,\n]*?\d[\d,.]*\s*(iu|copies|cp)\s*/\s*ml",
    re.IGNORECASE,
)
# An amount in the result's own words ("CMV: 5,000 IU/mL; EBV: NEG"): detected, unless given as a bound (< 137).
_DETECTED_AMOUNT = re.compile(r"(?<![<≤\d,.])(?<![<≤]\s)\b\d[\d,.]*\s*(iu|copies|cp)\s*/\s*ml\b", re.IGNORECASE)
_GENOTYPE_VALUE = re.compile(r"\b(mutations?|wild[- ]?type|polymorphisms?)\b", re.IGNORECASE)


@dataclass(frozen=True)
class LabFamily:
    """One measured value the rules read, from a family of codes (one ValueSet): the latest usable-status
    result across the family wins (docs/policy.md §11, "Lab code families")."""

    fact: str  # the PatientFacts attribute
    set_name: str  # the ValueSet of the family (fhir_profiles/valuesets)
    to_canonical: Mapping[str, float]  # unit → factor to the canonical unit
    unit: str  # the canonical unit, as cards print it
    label: str  # what the card calls it
    freshness_days: int | None  # docs/policy.md §2 freshness window; None: never stale
    plausible: tuple[float, float] | None  # docs/policy.md §3 plausibility limits, canonical unit
    ordinal: Mapping[str, float] | None = None  # test-strip readings → nominal value (urine protein)


LAB_FAMILIES: tuple[LabFamily, ...] = (
    LabFamily("weight", "BodyWeight", units.WEIGHT_TO_KG, "kg", "body weight", 30, (10.0, 500.0)),
    LabFamily("height", "BodyHeight", units.HEIGHT_TO_CM, "cm", "body height", None, (50.0, 250.0)),
    LabFamily("creatinine", "SerumCreatinine", units.CREATININE_TO_MG_DL, "mg/dL", "serum creatinine", 7, (0.1, 25.0)),
    LabFamily("anc", "NeutrophilCount", units.COUNT_TO_PER_UL, "cells/µL", "neutrophil count", 7, None),
    LabFamily("platelets", "PlateletCount", units.COUNT_TO_PER_UL, "/µL", "platelet count", 7, None),
    LabFamily("hemoglobin", "Hemoglobin", units.HEMOGLOBIN_TO_G_DL, "g/dL", "hemoglobin", 7, None),
    LabFamily(
        "urine_protein",
        "UrineProtein",
        units.URINE_PROTEIN_TO_MG_DL,
        "mg/dL",
        "urine protein",
        1,  # the cidofovir label: within 48 hours before each dose (docs/clinical-basis.md §5.4; regimen.py)
        None,
        ordinal=units.URINE_PROTEIN_STRIP_MG_DL,
    ),
)
FAMILY_BY_FACT: dict[str, LabFamily] = {family.fact: family for family in LAB_FAMILIES}
FRESHNESS_DAYS: dict[str, int] = {
    **{family.fact: family.freshness_days for family in LAB_FAMILIES if family.freshness_days is not None},
    "viral_load": 14,  # docs/policy.md §2: CMV viral load 14 days
}
PLAUSIBLE: dict[str, tuple[float, float]] = {
    family.set_name: family.plausible for family in LAB_FAMILIES if family.plausible is not None
}

# CMV DNA results, most specific kind first: a coding decides the kind; a name only when no coding does.
VIRAL_LOAD_SETS = ("CmvViralLoadIU", "CmvViralLoadLog10IU", "CmvViralLoadCopies", "CmvDnaQualitative")

# Condition findings: fact name → (ValueSet, label when the condition has no text, CMV-related only).
MANIFESTATION_SETS = {
    "pneumonitis": "CmvPneumonitis",
    "retinitis": "CmvRetinitis",
    "gastrointestinal": "CmvGastrointestinal",
    "cns": "CmvCns",
    "hepatitis": "CmvHepatitis",
}
CONDITION_FINDINGS: dict[str, tuple[str, str]] = {
    "dialysis": ("DialysisDependence", "dialysis dependence"),
    "transplant": ("OrganTransplant", "transplant recipient"),
    "hiv": ("HivInfection", "HIV infection"),
    "malabsorption": ("Malabsorption", "impaired GI absorption"),
    "pregnancy": ("Pregnancy", "pregnancy"),
    "dic": ("DisseminatedIntravascularCoagulation", "disseminated intravascular coagulation"),
    "resistance": ("CmvResistance", "ganciclovir-resistant CMV"),
}

_MANIFESTATION_SET_NAMES = frozenset(MANIFESTATION_SETS.values())


# Evidence, Measurement, ViralLoad and _Latest, built several times per hook call, spell out their __init__
# (init=False): native constructors, see cards/model.py above Coding.
@dataclass(slots=True, init=False)
class Evidence:
    """Where a finding came from: the resource reference, its date, and a short label for the card."""

    source: str
    date: dt.date | None
    label: str

    def __init__(self, source: str, date: dt.date | None, label: str) -> None:
        self.source = source
        self.date = date
        self.label = label


@dataclass(slots=True, init=False)
class Measurement:
    """A numeric value in its canonical unit, with its date, source and the code that identified it."""

    value: float
    unit: str
    date: dt.date
    source: str
    stale: bool
    code: str  # e.g. "LOINC 38483-4 Creatinine [Mass/volume] in Blood", or how it was recognised
    reading: str  # a test-strip reading as reported ("2+"), when the value is its nominal equivalent
    comparator: str  # "<", "<=", ">=" or ">" when the result is a bound ("< 0.2 mg/dL"), not a value

    def __init__(
        self,
        value: float,
        unit: str,
        date: dt.date,
        source: str,
        stale: bool,
        code: str = "",
        reading: str = "",
        comparator: str = "",
    ) -> None:
        self.value = value
        self.unit = unit
        self.date = date
        self.source = source
        self.stale = stale
        self.code = code
        self.reading = reading
        self.comparator = comparator

    def age_days(self, today: dt.date) -> int:
        """Days from the result's date to ``today``."""
        return (today - self.date).days

    def shown(self) -> str:
        """The value as reported, with its comparator ("< 100", "2,000")."""
        return f"{self.comparator} {self.value:,.6g}".strip()

    def below(self, limit: float) -> bool | None:
        """Whether the true value is < ``limit``: True or False when the result proves it, None when a bound leaves
        it open ("< 600" for a limit of 500)."""
        if not self.comparator:
            return self.value < limit
        if self.comparator in ("<", "<="):
            return True if self.value < limit or (self.comparator == "<" and self.value == limit) else None
        return False if self.value >= limit else None  # "> v" or ">= v" with v ≥ limit

    def above(self, limit: float) -> bool | None:
        """Whether the true value is > ``limit``: True or False when the result proves it, None when left open."""
        if not self.comparator:
            return self.value > limit
        if self.comparator in (">", ">="):
            return True if self.value > limit or (self.comparator == ">" and self.value == limit) else None
        return False if self.value <= limit else None  # "< v" or "<= v" with v ≤ limit


@dataclass(slots=True)
class Unusable:
    """The latest result exists but cannot be used (unit not recognised, no numeric value, implausible)."""

    reason: str
    source: str
    date: dt.date
    code: str = ""


@dataclass(slots=True, init=False)
class ViralLoad:
    """One CMV DNA result: IU/mL when quantitative in IU, ``undetectable`` when below detection."""

    date: dt.date
    source: str
    iu_per_ml: float | None
    undetectable: bool
    copies_per_ml: float | None

    def __init__(
        self,
        date: dt.date,
        source: str,
        iu_per_ml: float | None,
        undetectable: bool,
        copies_per_ml: float | None = None,
    ) -> None:
        self.date = date
        self.source = source
        self.iu_per_ml = iu_per_ml
        self.undetectable = undetectable
        self.copies_per_ml = copies_per_ml


# Built once per call, with 24 fields: its __init__ is spelled out (init=False), a native constructor (see
# cards/model.py above Coding).
@dataclass(slots=True, init=False)
class PatientFacts:
    """Everything the CMV rules know about the patient, each value with its provenance."""

    today: dt.date
    patient_source: str | None
    age_years: int | None
    sex: Sex
    weight: Measurement | Unusable | None = None
    height: Measurement | Unusable | None = None
    creatinine: Measurement | Unusable | None = None
    anc: Measurement | Unusable | None = None
    platelets: Measurement | Unusable | None = None
    hemoglobin: Measurement | Unusable | None = None
    urine_protein: Measurement | Unusable | None = None
    viral_loads: tuple[ViralLoad, ...] = ()  # oldest first
    pregnancy: Evidence | None = None
    dialysis: Evidence | None = None
    transplant: Evidence | None = None
    hiv: Evidence | None = None
    malabsorption: Evidence | None = None
    dic: Evidence | None = None
    resistance: Evidence | None = None
    severe: Evidence | None = None
    cmv_disease: Evidence | None = None
    manifestations: dict[str, Evidence] = field(default_factory=dict)
    medications: tuple[MedicationFact, ...] = ()
    orders: tuple[OrderFact, ...] = ()

    def __init__(
        self,
        today: dt.date,
        patient_source: str | None,
        age_years: int | None,
        sex: Sex,
        weight: Measurement | Unusable | None = None,
        height: Measurement | Unusable | None = None,
        creatinine: Measurement | Unusable | None = None,
        anc: Measurement | Unusable | None = None,
        platelets: Measurement | Unusable | None = None,
        hemoglobin: Measurement | Unusable | None = None,
        urine_protein: Measurement | Unusable | None = None,
        viral_loads: tuple[ViralLoad, ...] = (),
        pregnancy: Evidence | None = None,
        dialysis: Evidence | None = None,
        transplant: Evidence | None = None,
        hiv: Evidence | None = None,
        malabsorption: Evidence | None = None,
        dic: Evidence | None = None,
        resistance: Evidence | None = None,
        severe: Evidence | None = None,
        cmv_disease: Evidence | None = None,
        manifestations: dict[str, Evidence] | None = None,
        medications: tuple[MedicationFact, ...] = (),
        orders: tuple[OrderFact, ...] = (),
    ) -> None:
        self.today = today
        self.patient_source = patient_source
        self.age_years = age_years
        self.sex = sex
        self.weight = weight
        self.height = height
        self.creatinine = creatinine
        self.anc = anc
        self.platelets = platelets
        self.hemoglobin = hemoglobin
        self.urine_protein = urine_protein
        self.viral_loads = viral_loads
        self.pregnancy = pregnancy
        self.dialysis = dialysis
        self.transplant = transplant
        self.hiv = hiv
        self.malabsorption = malabsorption
        self.dic = dic
        self.resistance = resistance
        self.severe = severe
        self.cmv_disease = cmv_disease
        self.manifestations = {} if manifestations is None else manifestations
        self.medications = medications
        self.orders = orders

    @property
    def latest_viral_load(self) -> ViralLoad | None:
        return self.viral_loads[-1] if self.viral_loads else None

    def medications_in(self, set_name: str, *, on: dt.date | None = None) -> list[MedicationFact]:
        """The medications of a drug set that could have been given on ``on`` (default today)."""
        day = on or self.today
        return [m for m in self.medications if set_name in m.sets and m.active_on(day)]

    def lab(self, fact: str) -> Measurement | Unusable | None:
        """The latest result of a lab fact (``LabFamily.fact``): a Measurement, why it is unusable, or None."""
        value: Measurement | Unusable | None = getattr(self, fact)
        return value


# --- small readers -------------------------------------------------------------------------------------------------


def days(count: int) -> str:
    """A number of days in words: "1 day", "7 days"."""
    return f"{count} day{'' if count == 1 else 's'}"


def _observation_instant(observation: Mapping[str, Any]) -> dt.datetime | None:
    """When the observation was made (docs/policy.md §2: effectiveDateTime, else issued), to the second, so
    that two results on the same day are ordered correctly."""
    for key in ("effectiveDateTime", "effectiveInstant", "issued"):
        found = parse_instant(observation.get(key))
        if found:
            return found
    period = observation.get("effectivePeriod")
    if isinstance(period, dict):
        return parse_instant(period.get("start")) or parse_instant(period.get("end"))
    return None


def _has_value(observation: Mapping[str, Any]) -> bool:
    return any(key.startswith("value") for key in observation)


def _usable_observation(observation: Mapping[str, Any]) -> bool:
    status = observation.get("status")
    if not isinstance(status, str) or status in _IGNORED_STATUSES:
        return False
    return not (status == "preliminary" and not _has_value(observation))


def _value_texts(observation: Mapping[str, Any], *, interpretations: bool = True) -> list[str]:
    """The result's words: valueString, valueCodeableConcept and (unless left out) the interpretations."""
    texts = []
    if isinstance(observation.get("valueString"), str):
        texts.append(observation["valueString"])
    texts += concept_texts(observation.get("valueCodeableConcept"))
    flags = observation.get("interpretation") if interpretations else None
    for interpretation in flags if isinstance(flags, list) else ():
        texts += concept_texts(interpretation)
    return texts


def _lead(text: str, *, amounts: bool = True) -> str:
    """A result's own statement: the first segment (split at a full stop, comma, semicolon or dash) that says
    detected or not, or gives an amount, once the assay's limits are set aside. "Detected" in "Detected; reflexed to
    UL97 analysis", "1,200 IU/mL" in "1,200 IU/mL. Reference range: NEG", "CMV: Detected" in "CMV: Detected / BK:
    NEG", "Not detected" in "Assay LOD: 34.5 IU/mL. Result: Not detected" (docs/policy.md §11)."""
    segments = _LEAD.split(_ASSAY_LIMIT.sub(" ", text))
    for segment in segments:
        if _DETECTED.search(segment) or _UNDETECTED.search(segment) or (amounts and _DETECTED_AMOUNT.search(segment)):
            return segment
    return segments[0]


def _reads_undetectable(observation: Mapping[str, Any]) -> bool:
    """Its lead says not detected, before any detected."""
    for text in map(_lead, _value_texts(observation)):
        undetected = _UNDETECTED.search(text)
        detected = _DETECTED.search(text)
        if undetected is not None and (detected is None or undetected.start() < detected.start()):
            return True
    return False


def _resistance_test(observation: Mapping[str, Any], sets: ConceptSets) -> bool:
    """A CMV resistance genotype: by the CmvResistance names (the gene, CMV with resistance), or a CMV result whose
    name speaks of resistance, genotyping or mutations — not a glycoprotein or strain genotype, nor a viral load
    that names the resistance test it reflexes to (docs/policy.md §11)."""
    if sets.matched.isdisjoint(_RESISTANCE_TEST_SETS):
        return False  # not a CMV result: most observations (creatinine, counts) stop here
    if "valueQuantity" in observation or not sets.coded.isdisjoint(VIRAL_LOAD_SETS):
        return False  # a viral load (a quantity, or a viral-load LOINC code) is never a genotype report
    names = concept_texts(observation.get("code"))
    if any(_VIRAL_LOAD_NAME.search(name) for name in names):
        return False  # "CMV DNA, quantitative, reflex to UL97 genotype": the viral load, not the genotype
    if any(_OTHER_VIRUS.search(name) for name in names) and "CmvInfection" not in sets.matched:
        return False  # "HSV-1 UL54 genotype": herpes simplex has a UL54 gene too
    if "CmvResistance" in sets.matched:
        return True
    return any(_RESISTANCE_NAME.search(name) and not _NOT_RESISTANCE_NAME.search(name) for name in names)


def _genotype_value(observation: Mapping[str, Any]) -> bool:
    """A value whose first sentence speaks of mutations ("No resistance mutations detected", "wild type"): a
    genotype report's, never a viral load's. Interpretations are not read here ("consider resistance testing")."""
    # The result is stated first: "Detected, 5,200 IU/mL; sent for resistance mutation analysis" is a viral load.
    return any(_GENOTYPE_VALUE.search(_lead(text)) for text in _value_texts(observation, interpretations=False))


def _resistance_reported(observation: Mapping[str, Any]) -> bool:
    """Whether a genotype report reports ganciclovir resistance (docs/policy.md §11), each value text on its own."""
    return any(report_reads_resistance(text) for text in _value_texts(observation))


def report_reads_resistance(text: str) -> bool:
    """A finding stated as such ("UL97 M460V detected", "Ganciclovir: RESISTANT", "M460V (resistant to GCV)") is
    resistance, unless a negative comes first in its part ("No ganciclovir-resistant mutations detected"). A
    mutation named without a verdict ("UL97: M460V", "Amino acid changes: M460V") is resistance unless the report
    says nothing was found for its gene ("UL54: wild type; UL97 M460V" is resistance), or in its own sentence
    ("Not detected: M460V, H520Q"), or it is named in a list of targets (panel, known, target, codons) and the
    report says nothing was found ("Mutation panel: M460V, H520Q. No mutations detected."). Other fields' "none"
    ("Polymorphisms: none") do not cancel a mutation. Assay-scope wording ("this assay detects mutations such as
    M460V") reports nothing, to the end of its sentence."""
    text = _VARIANT_NOT_RESISTANCE.sub(" ", _BRACKETED_PANEL.sub(" ", _IDENTIFIER.sub(" ", text)))
    nothing_found_for: set[str] = set()
    nothing_found_at_all = False
    named: list[tuple[str | None, bool]] = []  # (gene, named in a list of targets) of each mutation without verdict
    for sentence in _SENTENCES.split(text):
        assay_scope = False
        listing = _LIST_WORDS.search(sentence) is not None
        sentence_negative = False
        in_sentence: list[tuple[str | None, bool]] = []
        sentence_gene: str | None = None
        for part in filter(None, _PARTS.split(sentence)):
            gene_match = _GENE.search(part)
            gene = re.sub(r"\s", "", gene_match.group(0)).upper() if gene_match else sentence_gene
            sentence_gene = gene
            if _PANEL.search(part):
                assay_scope = True
                continue
            mutation = _MUTATION.search(part)
            negative = _first(part, _UNDETECTED, _NOT_RESISTANCE, _NONE)
            positive = _first(part, _DETECTED, _GANCICLOVIR_RESISTANT, *((_FOUND,) if mutation else ()))
            if negative is not None and (positive is None or negative < positive):
                if _OTHER_THAN.search(part):
                    continue  # "no other mutations detected": says nothing of the ones named
                if gene_match is not None:
                    nothing_found_for.add(gene or "")
                else:
                    sentence_negative = nothing_found_at_all = True
                continue
            if positive is not None:
                return True
            if mutation and not assay_scope:
                in_sentence.append((gene, listing))
        if not sentence_negative:
            named += in_sentence
    return any(gene not in nothing_found_for and not (listed and nothing_found_at_all) for gene, listed in named)


def _first(text: str, *patterns: re.Pattern[str]) -> int | None:
    """Where the earliest of the patterns matches in ``text``, if any does."""
    starts = [m.start() for m in (p.search(text) for p in patterns) if m is not None]
    return min(starts) if starts else None


def _reads_detected(observation: Mapping[str, Any], *, amounts: bool = False) -> bool:
    """Its lead says detected (or, with ``amounts``, gives a viral-load amount), before any not detected."""
    for text in (_lead(value, amounts=amounts) for value in _value_texts(observation)):
        detected = _DETECTED.search(text) or (_DETECTED_AMOUNT.search(text) if amounts else None)
        undetected = _UNDETECTED.search(text)
        if detected is not None and (undetected is None or detected.start() < undetected.start()):
            return True
    return False


def _code_label(concept: Any, set_name: str) -> str:
    """How a result was identified, for the card: the family code and its display (which names the specimen),
    or the name it was recognised by."""
    found: Concept | None = coded_concept(concept, set_name)
    if found is not None:
        system = "LOINC" if found.system == "http://loinc.org" else found.system
        return f"{system} {found.code} {found.display}"
    texts = concept_texts(concept)
    return f"recognised by its name '{texts[0][:60]}'" if texts else "recognised by its name"


# --- assembly: one pass over the resources -------------------------------------------------------------------------


def build_facts(
    resources: Iterable[Mapping[str, Any]],
    other_draft_orders: Iterable[Mapping[str, Any]],
    patient_id: str,
    today: dt.date,
    selected_orders: Iterable[Mapping[str, Any]] = (),
) -> PatientFacts:
    """Collect the facts from every resource the request carried or the service fetched, in one pass."""
    with concept_memo():
        return _FactBuilder(patient_id, today).build(resources, other_draft_orders, selected_orders)


@dataclass(slots=True, init=False)
class _Latest:
    instant: dt.datetime
    observation: Mapping[str, Any]

    def __init__(self, instant: dt.datetime, observation: Mapping[str, Any]) -> None:
        self.instant = instant
        self.observation = observation


_FAMILY_BY_SET = {family.set_name: family for family in LAB_FAMILIES}
_FINDING_BY_SET = {set_name: (fact, label) for fact, (set_name, label) in CONDITION_FINDINGS.items()}
_MANIFESTATION_BY_SET = {set_name: name for name, set_name in MANIFESTATION_SETS.items()}


class _FactBuilder:
    """The single pass: each resource is classified once and dispatched to the facts it feeds."""

    __slots__ = ("_latest", "_loads", "_pregnancy_tests", "facts", "patient_id", "today")

    def __init__(self, patient_id: str, today: dt.date) -> None:
        self.patient_id = patient_id
        self.today = today
        self.facts = PatientFacts(today=today, patient_source=None, age_years=None, sex="unknown")
        self._latest: dict[str, _Latest] = {}
        self._loads: list[tuple[dt.datetime, ViralLoad]] = []
        self._pregnancy_tests: list[_Latest] = []

    def build(
        self,
        resources: Iterable[Mapping[str, Any]],
        other_draft_orders: Iterable[Mapping[str, Any]],
        selected_orders: Iterable[Mapping[str, Any]],
    ) -> PatientFacts:
        facts = self.facts
        medications: list[MedicationFact] = []  # one per resource (an id-less order is its own)
        seen: set[tuple[str, str]] = set()
        for resource in resources:
            if not isinstance(resource, dict):
                continue
            kind = resource.get("resourceType")
            ident = resource.get("id")
            if isinstance(kind, str) and isinstance(ident, str):
                if (kind, ident) in seen:
                    continue  # the same resource from two prefetch keys or pages: read once
                seen.add((kind, ident))
            if kind == "Observation":
                self._observation(resource)
            elif kind == "Condition":
                self._condition(resource)
            elif kind == "MedicationRequest":
                fact = medication_fact(resource, draft=False)
                if fact is not None:
                    medications.append(fact)
            elif kind == "Patient" and ident == self.patient_id:
                self._patient(resource)
        # Drafts of this ordering session: the other drafts and the selected ones (at order-sign every draft is
        # selected: imipenem signed with ganciclovir, foscarnet signed with cidofovir). Drafts are not therapy
        # given (MedicationFact.given), and each rule leaves out the drug it is checking.
        selected_orders = tuple(selected_orders)
        for order in (*other_draft_orders, *selected_orders):
            if isinstance(order, dict) and order.get("resourceType") == "MedicationRequest":
                fact = medication_fact(order, draft=True)
                if fact is not None:
                    medications.append(fact)
        facts.medications = tuple(medications)
        self._labs()
        self._loads.sort(key=lambda item: item[0])  # stable: same-instant results keep their order
        facts.viral_loads = tuple(load for _, load in self._loads)
        facts.pregnancy = self._positive_pregnancy_test() or facts.pregnancy
        weight = facts.weight.value if isinstance(facts.weight, Measurement) else None
        facts.orders = tuple(
            OrderFact(order, str(order.get("id", "")), drug, read_draft_dose(order, weight), text_phase(order))
            for order in selected_orders
            if (drug := cmv_drug(order)) is not None
        )
        return facts

    # -- Patient
    def _patient(self, patient: Mapping[str, Any]) -> None:
        facts = self.facts
        facts.patient_source = reference_of(patient)
        birth = parse_date(patient.get("birthDate"))
        if birth is not None and birth <= self.today:
            age = self.today.year - birth.year - ((self.today.month, self.today.day) < (birth.month, birth.day))
            facts.age_years = age if age <= MAX_PLAUSIBLE_AGE_YEARS else None
        gender = patient.get("gender")
        facts.sex = gender if gender in ("male", "female", "other") else "unknown"

    # -- Observation
    def _observation(self, observation: Mapping[str, Any]) -> None:
        if not _usable_observation(observation):
            return
        sets = concept_sets(observation.get("code"))
        if not sets.matched:
            return
        instant = _observation_instant(observation)
        if instant is None:
            return
        for set_name in sets.matched:
            if set_name in _FAMILY_BY_SET:
                best = self._latest.get(set_name)
                if best is None or instant >= best.instant:  # same instant: the later-listed result
                    self._latest[set_name] = _Latest(instant, observation)
            elif set_name == "PregnancyTest":
                self._pregnancy_tests.append(_Latest(instant, observation))
        resistance_test = _resistance_test(observation, sets)
        if resistance_test and self.facts.resistance is None and _resistance_reported(observation):
            self.facts.resistance = Evidence(reference_of(observation), instant.date(), "UL97/UL54 mutation reported")
        kind = next((name for name in VIRAL_LOAD_SETS if name in sets.coded), None)
        if kind is None and not sets.matched.isdisjoint(VIRAL_LOAD_SETS):
            kind = _viral_load_kind_by_unit(observation)  # named, not coded: the unit says which kind
            if resistance_test or _genotype_value(observation):
                kind = None  # a genotype report, not a viral load (a coded viral-load LOINC code always is one)
        if kind is not None and not _specimen_not_blood(observation):
            load = _viral_load(observation, kind, instant.date())
            if load is not None:
                self._loads.append((instant, load))

    def _labs(self) -> None:
        for family in LAB_FAMILIES:
            latest = self._latest.get(family.set_name)
            if latest is not None:
                setattr(self.facts, family.fact, _measure(latest, family, self.today))

    def _positive_pregnancy_test(self) -> Evidence | None:
        """The latest pregnancy test within 30 days decides (docs/policy.md §9)."""
        if not self._pregnancy_tests:
            return None
        latest = max(self._pregnancy_tests, key=lambda item: item.instant)
        when, observation = latest.instant.date(), latest.observation
        if (self.today - when).days > PREGNANCY_TEST_WINDOW_DAYS:
            return None
        # Qualitative tests say positive/detected; a quantitative hCG counts only when the lab flags it
        # positive or high (the sources give no numeric cut-off).
        interpretations = observation.get("interpretation")
        flags = (
            {code for item in interpretations for code in coding_codes(item)}
            if isinstance(interpretations, list)
            else set()
        )
        if _reads_detected(observation) or flags & {"POS", "H", "HH", "A"}:
            return Evidence(reference_of(observation), when, "positive pregnancy test")
        return None

    # -- Condition
    def _condition(self, condition: Mapping[str, Any]) -> None:
        if not _active_condition(condition, self.today):
            return
        code = condition.get("code")
        sets = concept_sets(code)
        if not sets.matched:
            return
        facts = self.facts
        cmv = "CmvInfection" in sets.matched or not sets.coded.isdisjoint(_MANIFESTATION_SET_NAMES)

        def evidence(label: str) -> Evidence:
            return Evidence(
                reference_of(condition), parse_date(condition.get("recordedDate")), concept_label(code, label)
            )

        for set_name in sets.matched:
            finding = _FINDING_BY_SET.get(set_name)
            if finding is not None and getattr(facts, finding[0]) is None:
                setattr(facts, finding[0], evidence(finding[1]))
            manifestation = _MANIFESTATION_BY_SET.get(set_name)
            if manifestation is not None and cmv and manifestation not in facts.manifestations:
                facts.manifestations[manifestation] = evidence(manifestation)
        if cmv:
            if facts.cmv_disease is None:
                facts.cmv_disease = evidence("CMV disease")
            if facts.severe is None and (
                "SevereSeverity" in concept_sets(condition.get("severity")).matched or "SevereSeverity" in sets.matched
            ):
                facts.severe = Evidence(
                    reference_of(condition), parse_date(condition.get("recordedDate")), "severe CMV disease"
                )


def _active_condition(condition: Mapping[str, Any], today: dt.date) -> bool:
    codes = coding_codes(condition.get("clinicalStatus"))
    if codes and not codes & _ACTIVE_CONDITION:
        return False
    if coding_codes(condition.get("verificationStatus")) & _EXCLUDED_VERIFICATION:
        return False
    abated = parse_date(condition.get("abatementDateTime"))
    return abated is None or abated > today


_COMPARATORS = frozenset({"<", "<=", ">=", ">"})  # FHIR Quantity.comparator ("ad" is a unit claim, not a bound)


def _measure(latest: _Latest, family: LabFamily, today: dt.date) -> Measurement | Unusable:
    """The latest result of a family in its canonical unit, or why it cannot be used."""
    when, observation = latest.instant.date(), latest.observation
    source = reference_of(observation)
    code = _code_label(observation.get("code"), family.set_name)
    quantity = observation.get("valueQuantity")
    value = units.quantity_in(quantity, family.to_canonical)
    reading, comparator = "", ""
    if value is None and family.ordinal is not None and not isinstance(quantity, dict):
        reading, value, comparator = _ordinal_reading(observation, family.ordinal)
    if value is None:
        if isinstance(quantity, dict) and quantity.get("value") is not None:
            reason = f"unit '{units.unit_label(quantity)}' not recognised"
        elif reading:
            reason = f"reading '{reading}' not recognised"
        else:
            reason = "no numeric result"
        return Unusable(reason=reason, source=source, date=when, code=code)
    if family.plausible is not None and not family.plausible[0] <= value <= family.plausible[1]:
        low, high = family.plausible
        reason = f"value {value:.4g} {family.unit} outside the plausible range {low:g}–{high:g} {family.unit}"
        return Unusable(reason=reason, source=source, date=when, code=code)
    stale = family.freshness_days is not None and (today - when).days > family.freshness_days
    if isinstance(quantity, dict) and quantity.get("comparator") in _COMPARATORS:
        comparator = str(quantity["comparator"])
    return Measurement(value, family.unit, when, source, stale, code, reading, comparator)


def _ordinal_reading(observation: Mapping[str, Any], scale: Mapping[str, float]) -> tuple[str, float | None, str]:
    """A test-strip result reported as text or a coded ordinal ("2+", "++", "+2", "trace", "negative",
    "2+ (100 mg/dL)"), or an amount written as text (">= 300 mg/dL"): (reading, nominal value, comparator)."""
    for code in coding_codes(observation.get("valueCodeableConcept")):
        grade = units.URINE_PROTEIN_STRIP_SNOMED.get(code)
        if grade is not None:
            return grade, scale[grade], ""
    texts = _value_texts(observation)
    for text in texts:
        key = units.normalise_strip_reading(text)
        if key in scale:
            return text.strip()[:32], scale[key], ""
        amount = units.strip_amount(text)
        if amount is not None:
            return "", amount[1], amount[0]
    return (texts[0].strip()[:32] if texts else ""), None, ""


# A CMV DNA result from another specimen (bronchoalveolar lavage, CSF, urine, tissue...) is not a blood viral load
# (docs/policy.md §11), whatever its name; read from the specimen's display and the code's text.
_NOT_BLOOD = re.compile(
    r"\b(bal|bronch\w*|lavage|csf|cerebrospinal|spinal|urine|vitreous|aqueous|ocular|tissue|biopsy|saliva|amniotic"
    r"|stool|sputum|respiratory|pleural|peritoneal|pericardial|synovial|nasopharyn\w*|swab|throat|breast milk)\b",
    re.IGNORECASE,
)
# docs/policy.md §3: 10^12 IU/mL is beyond any assay's range; a larger value is a data error.
VIRAL_LOAD_MAX_IU_ML = 1e12


def _specimen_not_blood(observation: Mapping[str, Any]) -> bool:
    specimen = observation.get("specimen")
    texts = concept_texts(observation.get("code"))
    if isinstance(specimen, dict) and isinstance(specimen.get("display"), str):
        texts.append(specimen["display"])
    return any(text_search(_NOT_BLOOD, text) for text in texts)


def _viral_load_kind_by_unit(observation: Mapping[str, Any]) -> str:
    """The kind of a CMV DNA result recognised by name only: log10 IU/mL, IU/mL or copies/mL by its unit, else
    qualitative (a detected / not detected text)."""
    quantity = observation.get("valueQuantity")
    if not isinstance(quantity, dict):
        return "CmvDnaQualitative"
    if "log" in units.unit_label(quantity).lower():
        return "CmvViralLoadLog10IU"
    if units.quantity_in(quantity, units.VIRAL_LOAD_COPIES) is not None:
        return "CmvViralLoadCopies"
    return "CmvViralLoadIU"


def _viral_load(observation: Mapping[str, Any], kind: str, when: dt.date) -> ViralLoad | None:
    source = reference_of(observation)
    quantity = observation.get("valueQuantity")
    # A quantity outranks words: 5,000 IU/mL with an interpretation "EBV: NEG" is not undetectable.
    quantified = isinstance(quantity, dict) and isinstance(quantity.get("value"), int | float)
    undetectable = not quantified and _reads_undetectable(observation)
    iu = copies = None
    if isinstance(quantity, dict) and not undetectable:
        comparator = quantity.get("comparator")
        if comparator in ("<", "<="):
            undetectable = True  # below the assay's reportable range
        elif kind == "CmvViralLoadLog10IU" or (
            kind == "CmvViralLoadIU" and "log" in units.unit_label(quantity).lower()
        ):
            # Some laboratories report log10 IU/mL under the IU code (docs/clinical-basis.md §9): the unit decides.
            log_value = units.quantity_in({**quantity, "code": "iu/ml"}, units.VIRAL_LOAD_TO_IU_ML)
            iu = 10**log_value if log_value is not None and log_value < math.log10(VIRAL_LOAD_MAX_IU_ML) else None
        elif kind == "CmvViralLoadIU":
            iu = units.quantity_in(quantity, units.VIRAL_LOAD_TO_IU_ML)
            iu = iu if iu is None or iu < VIRAL_LOAD_MAX_IU_ML else None
        elif kind == "CmvViralLoadCopies":
            copies = units.quantity_in(quantity, units.VIRAL_LOAD_COPIES)
            copies = copies if copies is None or copies < VIRAL_LOAD_MAX_IU_ML else None  # same limit
    if iu is not None and iu <= 0:
        iu, undetectable = None, True
    if iu is None and copies is None and not undetectable:
        if _reads_detected(observation, amounts=True):  # "Detected", or an amount written as text
            return ViralLoad(date=when, source=source, iu_per_ml=None, undetectable=False)
        return None
    return ViralLoad(date=when, source=source, iu_per_ml=iu, undetectable=undetectable, copies_per_ml=copies)
