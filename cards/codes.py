"""Code sets for the clinical logic, loaded from the FHIR ValueSets in ``fhir_profiles/valuesets``.

Each ``ValueSet-<Name>.json`` file is a FHIR R4 ValueSet whose ``compose.include[].concept[]`` lists the
codes (each with a ``code-verification`` extension carrying docs/clinical-basis.md §9's status label) and whose
ValueSet-level ``text-match`` extensions list lower-case name patterns. EHR coding varies, so a
CodeableConcept belongs to a set when one of its codings has a listed (system, code), or when its
``text`` or a coding's ``display`` contains one of the patterns as a whole word or phrase
(case-insensitive; "ganciclovir" does not match "valganciclovir").

The files are read and validated once per process (:func:`all_code_sets`); a malformed file fails
loudly with :class:`CodeSetError` naming the file. Matching never raises on malformed FHIR input.
"""

from __future__ import annotations

import functools
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Final

from cards import PACKAGE_DIR

FHIR_PROFILES_DIR: Final[Path] = PACKAGE_DIR.parent / "fhir_profiles"
VALUESETS_DIR: Final[Path] = FHIR_PROFILES_DIR / "valuesets"

VALUESET_URL_PREFIX: Final = "http://fhir.cmv-cds.org/ValueSet/"
VERIFICATION_EXTENSION_URL: Final = "http://fhir.cmv-cds.org/StructureDefinition/code-verification"
# Where a code was seen with its display: public URLs, one extension each (docs/clinical-basis.md §9).
SOURCE_EXTENSION_URL: Final = "http://fhir.cmv-cds.org/StructureDefinition/code-source"
TEXT_MATCH_EXTENSION_URL: Final = "http://fhir.cmv-cds.org/StructureDefinition/text-match"
# docs/clinical-basis.md §9 status labels.
VERIFICATION_STATUSES: Final = frozenset({"VERIFIED-openFDA", "VERIFIED-2+", "VERIFIED", "1-SRC", "UNVERIFIED"})

RXNORM: Final = "http://www.nlm.nih.gov/research/umls/rxnorm"
LOINC: Final = "http://loinc.org"
SNOMED: Final = "http://snomed.info/sct"
ICD10: Final = "http://hl7.org/fhir/sid/icd-10"
ICD10CM: Final = "http://hl7.org/fhir/sid/icd-10-cm"

# Some EHRs send the HL7 OID form of a code system instead of its canonical URI.
_SYSTEM_ALIASES: Final[dict[str, str]] = {
    "urn:oid:2.16.840.1.113883.6.88": RXNORM,
    "urn:oid:2.16.840.1.113883.6.1": LOINC,
    "urn:oid:2.16.840.1.113883.6.96": SNOMED,
    "urn:oid:2.16.840.1.113883.6.3": ICD10,
    "urn:oid:2.16.840.1.113883.6.90": ICD10CM,
}

_NAME_RE: Final = re.compile(r"[A-Z][A-Za-z0-9]*")
_ID_RE: Final = re.compile(r"[a-z0-9]+(?:-[a-z0-9]+)*")


class CodeSetError(ValueError):
    """A ValueSet file that cannot be used; raised when the sets are loaded, never per request."""


@dataclass(frozen=True)
class Concept:
    """One code of a set, with its verification status and the public sources it was seen in."""

    system: str
    code: str
    display: str
    verification: str  # the code-verification extension value
    sources: tuple[str, ...] = ()  # the code-source extension values (URLs)


_ICD_SYSTEMS: Final = frozenset({ICD10, ICD10CM})


def _normalize_system(system: str) -> str:
    system = system.strip()
    return _SYSTEM_ALIASES.get(system, system)


def _coding_key(system: str, code: str) -> tuple[str, str]:
    """The comparison key of a coding: canonical system URI; ICD codes compared without the dot."""
    system = _normalize_system(system)
    code = code.strip()
    if system in _ICD_SYSTEMS:
        code = code.replace(".", "").upper()
    return system, code


def _compile_patterns(patterns: tuple[str, ...]) -> re.Pattern[str] | None:
    """One regex for all patterns: whole words / phrases, case-insensitive, any run of white space."""
    if not patterns:
        return None
    # Longest first so that the reported match (if anyone looks) is the most specific one.
    alternatives = sorted(
        (r"\s+".join(re.escape(word) for word in pattern.split()) for pattern in patterns),
        key=len,
        reverse=True,
    )
    return re.compile(r"(?<!\w)(?:" + "|".join(alternatives) + r")(?!\w)", re.IGNORECASE)


@dataclass(frozen=True)
class CodeSet:
    """A named set of codes and name patterns (one FHIR ValueSet)."""

    name: str
    url: str
    concepts: tuple[Concept, ...]
    text_patterns: tuple[str, ...]
    _pairs: frozenset[tuple[str, str]] = field(init=False, repr=False, compare=False)
    _regex: re.Pattern[str] | None = field(init=False, repr=False, compare=False)
    # True on the registry's own instances only (code_set / all_code_sets), for which the fast lookups
    # at the end of this module answer.
    registered: bool = field(init=False, repr=False, compare=False, default=False)

    def __post_init__(self) -> None:
        pairs = frozenset(_coding_key(c.system, c.code) for c in self.concepts)
        object.__setattr__(self, "_pairs", pairs)
        object.__setattr__(self, "_regex", _compile_patterns(self.text_patterns))
        # Set here, not only as the field default: compiled (mypyc) dataclasses leave init=False fields unset.
        object.__setattr__(self, "registered", False)

    def has_coding(self, system: object, code: object) -> bool:
        """True if (system, code) is one of the set's codes; non-strings never match.

        Tolerated EHR variations: surrounding white space, the HL7 OID form of the code system, and ICD
        codes written without the dot or in lower case ("b259" = "B25.9").
        """
        if not isinstance(system, str) or not isinstance(code, str):
            return False
        return _coding_key(system, code) in self._pairs

    def codes(self, system: str) -> tuple[str, ...]:
        """The set's codes in ``system``, in file order."""
        system = _normalize_system(system)
        return tuple(c.code for c in self.concepts if _normalize_system(c.system) == system)

    def matches_text(self, text: object) -> bool:
        """True if ``text`` contains one of the name patterns as a whole word or phrase (case-insensitive)."""
        regex = self._regex
        if regex is None or not isinstance(text, str):
            return False
        return regex.search(text) is not None

    def matches_coding_only(self, concept: object) -> bool:
        """True if a coding of the CodeableConcept ``concept`` (a dict) has one of the set's codes."""
        if not isinstance(concept, dict):
            return False
        codings = concept.get("coding")
        if not isinstance(codings, list):
            return False
        for coding in codings:
            if isinstance(coding, dict) and self.has_coding(coding.get("system"), coding.get("code")):
                return True
        return False

    def matches_concept(self, concept: object) -> bool:
        """True if the CodeableConcept ``concept`` (a dict) matches by code, or by coding.display or text.

        Malformed input (not a dict, ``coding`` not a list, items not dicts, non-string fields) never
        raises; the parts that cannot be read simply do not match.
        """
        if not isinstance(concept, dict):
            return False
        if self.matches_coding_only(concept):
            return True
        regex = self._regex
        if regex is None:
            return False
        text = concept.get("text")
        if isinstance(text, str) and regex.search(text) is not None:
            return True
        codings = concept.get("coding")
        if isinstance(codings, list):
            for coding in codings:
                if isinstance(coding, dict):
                    display = coding.get("display")
                    if isinstance(display, str) and regex.search(display) is not None:
                        return True
        return False


# --------------------------------------------------------------------------------------- loading


def _fail(path: Path, message: str) -> CodeSetError:
    return CodeSetError(f"{path.name}: {message}")


def _extensions(path: Path, element: dict[str, Any], where: str) -> list[dict[str, Any]]:
    extensions = element.get("extension", [])
    if not isinstance(extensions, list) or not all(isinstance(e, dict) for e in extensions):
        raise _fail(path, f"{where}.extension must be a list of objects")
    return extensions


def _parse_concepts(path: Path, resource: dict[str, Any]) -> tuple[Concept, ...]:
    compose = resource.get("compose")
    if compose is None:
        return ()
    if not isinstance(compose, dict) or not isinstance(compose.get("include"), list):
        raise _fail(path, "compose.include must be a list")
    concepts: list[Concept] = []
    seen: set[tuple[str, str]] = set()
    for i, include in enumerate(compose["include"]):
        where = f"compose.include[{i}]"
        if not isinstance(include, dict):
            raise _fail(path, f"{where} must be an object")
        system = include.get("system")
        if not isinstance(system, str) or not system:
            raise _fail(path, f"{where}.system is missing")
        items = include.get("concept")
        if not isinstance(items, list) or not items:
            raise _fail(path, f"{where}.concept must be a non-empty list")
        for j, item in enumerate(items):
            cwhere = f"{where}.concept[{j}]"
            if not isinstance(item, dict):
                raise _fail(path, f"{cwhere} must be an object")
            code, display = item.get("code"), item.get("display")
            if not isinstance(code, str) or not code.strip() or code != code.strip():
                raise _fail(path, f"{cwhere}.code is missing or has surrounding white space")
            if not isinstance(display, str) or not display:
                raise _fail(path, f"{cwhere} ({code}) has no display")
            statuses = [
                e.get("valueCode")
                for e in _extensions(path, item, cwhere)
                if e.get("url") == VERIFICATION_EXTENSION_URL
            ]
            if len(statuses) != 1 or statuses[0] not in VERIFICATION_STATUSES:
                raise _fail(
                    path,
                    f"{cwhere} ({system}|{code}) needs exactly one code-verification extension with one of "
                    f"{sorted(VERIFICATION_STATUSES)}, got {statuses!r}",
                )
            sources = tuple(
                e.get("valueUri") for e in _extensions(path, item, cwhere) if e.get("url") == SOURCE_EXTENSION_URL
            )
            if not all(isinstance(u, str) and u.startswith(("https://", "http://")) for u in sources):
                raise _fail(path, f"{cwhere} ({system}|{code}): every code-source must be an http(s) URL")
            if statuses[0] != "UNVERIFIED" and not sources:
                raise _fail(path, f"{cwhere} ({system}|{code}) is {statuses[0]} but names no code-source")
            key = (system, code)
            if key in seen:
                raise _fail(path, f"duplicate code {system}|{code}")
            seen.add(key)
            concepts.append(
                Concept(system=system, code=code, display=display, verification=statuses[0], sources=sources)  # type: ignore[arg-type]
            )
    return tuple(concepts)


def _parse_patterns(path: Path, resource: dict[str, Any]) -> tuple[str, ...]:
    patterns: list[str] = []
    for ext in _extensions(path, resource, "ValueSet"):
        if ext.get("url") != TEXT_MATCH_EXTENSION_URL:
            continue
        value = ext.get("valueString")
        if not isinstance(value, str) or not value.strip():
            raise _fail(path, "a text-match extension has no valueString")
        if value != value.strip().lower():
            raise _fail(path, f"text-match pattern {value!r} must be lower-case without surrounding space")
        if value in patterns:
            raise _fail(path, f"duplicate text-match pattern {value!r}")
        patterns.append(value)
    return tuple(patterns)


def _parse_file(path: Path) -> CodeSet:
    try:
        resource = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise _fail(path, f"cannot be read as JSON: {exc}") from exc
    if not isinstance(resource, dict) or resource.get("resourceType") != "ValueSet":
        raise _fail(path, "resourceType must be 'ValueSet'")
    name = resource.get("name")
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name):
        raise _fail(path, f"name must be a PascalCase string, got {name!r}")
    if path.name != f"ValueSet-{name}.json":
        raise _fail(path, f"file name does not match name {name!r} (expected ValueSet-{name}.json)")
    rid = resource.get("id")
    if not isinstance(rid, str) or not _ID_RE.fullmatch(rid):
        raise _fail(path, f"id must be kebab-case, got {rid!r}")
    url = resource.get("url")
    if url != VALUESET_URL_PREFIX + rid:
        raise _fail(path, f"url must be {VALUESET_URL_PREFIX + rid!r}, got {url!r}")
    concepts = _parse_concepts(path, resource)
    patterns = _parse_patterns(path, resource)
    if not concepts and not patterns:
        raise _fail(path, "has neither codes nor text-match patterns")
    return CodeSet(name=name, url=url, concepts=concepts, text_patterns=patterns)


def load_code_sets(directory: Path = VALUESETS_DIR) -> dict[str, CodeSet]:
    """Read and validate every ``ValueSet-*.json`` in ``directory`` (uncached; see :func:`all_code_sets`)."""
    paths = sorted(directory.glob("ValueSet-*.json"))
    if not paths:
        raise CodeSetError(f"no ValueSet-*.json files in {directory}")
    sets: dict[str, CodeSet] = {}
    urls: set[str] = set()
    for path in paths:
        code_set_ = _parse_file(path)
        if code_set_.name in sets:
            raise _fail(path, f"duplicate ValueSet name {code_set_.name!r}")
        if code_set_.url in urls:
            raise _fail(path, f"duplicate ValueSet url {code_set_.url!r}")
        sets[code_set_.name] = code_set_
        urls.add(code_set_.url)
    return sets


@functools.cache
def _registry() -> MappingProxyType[str, CodeSet]:
    sets = load_code_sets(VALUESETS_DIR)
    for code_set_ in sets.values():
        object.__setattr__(code_set_, "registered", True)
    return MappingProxyType(sets)


def all_code_sets() -> dict[str, CodeSet]:
    """Every code set by name (loaded once per process; the returned dict is a copy)."""
    return dict(_registry())


def code_set(name: str) -> CodeSet:
    """The code set called ``name`` (= ValueSet.name). KeyError naming the set if there is none."""
    registry = _registry()
    try:
        return registry[name]
    except KeyError:
        raise KeyError(f"unknown code set {name!r}; known sets: {', '.join(sorted(registry))}") from None


# ----------------------------------------------------------------------------------- fast lookups
# The clinical rules ask "is this concept in set X?" a few hundred times per hook call (every
# observation against every measurement set, every medication against every drug set), which was the
# largest CPU cost of a call (bench/README.md). These give the same answers as ``CodeSet.has_coding`` and
# ``CodeSet.matches_text`` for the registered sets, with the normalisation and the regex search of a
# given coding or text done once per process instead of once per question.

# Strings longer than this (rare, and possibly hostile) are looked up without being cached.
_CACHEABLE_LENGTH: Final = 256
_NO_SETS: Final[frozenset[str]] = frozenset()


@functools.lru_cache(maxsize=8192)
def _cached_coding_key(system: str, code: str) -> tuple[str, str]:
    return _coding_key(system, code)


@functools.cache
def _code_index() -> MappingProxyType[tuple[str, str], frozenset[str]]:
    """(normalised system, code) → names of the registered sets that list it."""
    index: dict[tuple[str, str], set[str]] = {}
    for code_set_ in _registry().values():
        for pair in code_set_._pairs:
            index.setdefault(pair, set()).add(code_set_.name)
    return MappingProxyType({pair: frozenset(names) for pair, names in index.items()})


def coded_set_names(concept: object) -> frozenset[str]:
    """Names of the registered sets for which ``matches_coding_only(concept)`` is true."""
    if not isinstance(concept, dict):
        return _NO_SETS
    codings = concept.get("coding")
    if not isinstance(codings, list):
        return _NO_SETS
    index = _code_index()
    found = _NO_SETS
    for coding in codings:
        if not isinstance(coding, dict):
            continue
        system, code = coding.get("system"), coding.get("code")
        if isinstance(system, str) and isinstance(code, str):
            cacheable = len(system) + len(code) <= _CACHEABLE_LENGTH
            names = index.get(_cached_coding_key(system, code) if cacheable else _coding_key(system, code))
            if names:
                found = found | names
    return found


def _text_set_names(text: str) -> frozenset[str]:
    return frozenset(name for name, code_set_ in _registry().items() if code_set_.matches_text(text))


_cached_text_set_names = functools.lru_cache(maxsize=8192)(_text_set_names)


def text_set_names(text: str) -> frozenset[str]:
    """Names of the registered sets for which ``matches_text(text)`` is true (cached per text: the same
    displays and medication names come back in call after call)."""
    return _cached_text_set_names(text) if len(text) <= _CACHEABLE_LENGTH else _text_set_names(text)


@functools.cache
def _concepts_by_key(set_name: str) -> MappingProxyType[tuple[str, str], Concept]:
    return MappingProxyType({_coding_key(c.system, c.code): c for c in code_set(set_name).concepts})


def coded_concept(concept: object, set_name: str) -> Concept | None:
    """The concept of the registered set ``set_name`` that one of the CodeableConcept's codings names, if any
    (the first such coding): what a card cites as the code it used."""
    if not isinstance(concept, dict) or not isinstance(concept.get("coding"), list):
        return None
    by_key = _concepts_by_key(set_name)
    for coding in concept["coding"]:
        if isinstance(coding, dict) and isinstance(coding.get("system"), str) and isinstance(coding.get("code"), str):
            found = by_key.get(_coding_key(coding["system"], coding["code"]))
            if found is not None:
                return found
    return None
