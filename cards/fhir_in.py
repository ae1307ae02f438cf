"""Reading FHIR R4 JSON elements defensively: dates, references, and concept matching (is this
CodeableConcept in code set X?). Malformed parts read as absent; nothing here raises on input.

A concept belongs to a set by a coding's (system, code), or by a text or display that names it — unless the
wording negates or qualifies the finding. The answers for each concept are memoised for one hook call
(``concept_memo``), on top of the per-process caches of ``cards.codes``.
"""

from __future__ import annotations

import datetime as dt
import functools
import re
from collections.abc import Mapping
from contextvars import ContextVar, Token
from typing import Any, Final

import orjson

from cards.codes import CodeSet, coded_set_names, text_set_names

# Text matches (not code matches) are ignored when the wording negates or qualifies the finding:
# "HIV negative", "not pregnant", "pre-dialysis", "transplant donor", "CMV IgG positive" (serostatus).
_NEGATED = re.compile(
    r"\b(not|no|negative|denies|denied|ruled out|rule out|without|pre-?dialysis|donor|igg|"
    r"serostatus|seropositive|seronegative|screening|risk of)\b",
    re.IGNORECASE,
)

# --- concept matching, memoised per call --------------------------------------------------------------------------


def concept_texts(concept: Any) -> list[str]:
    """A CodeableConcept's text and its codings' displays (the strings its name can be matched in)."""
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
        return value_set.name in concept_sets(concept).matched
    if value_set.matches_coding_only(concept):
        return True
    return value_set.matches_concept(concept) and not any(_NEGATED.search(t) for t in concept_texts(concept))


def coded_in(concept: Any, value_set: CodeSet) -> bool:
    """``value_set.matches_coding_only(concept)``, through the per-call memo for registered sets."""
    if value_set.registered:
        return value_set.name in concept_sets(concept).coded
    return value_set.matches_coding_only(concept)


# Per-call memo of the registered code sets each CodeableConcept is in. Why: the service classifies the selected
# drafts before the facts do, and the rules ask again about the same medications. Keyed by id() for speed; each
# entry keeps a reference to its concept, so the id cannot be reused while the memo lives, and the identity check
# rules out a stale hit. The memo lives for one call, during which the input resources are not modified.
class ConceptSets:
    """The registered code sets one concept is in. A plain class rather than a dataclass: 24 are built per hook
    call, and compiled (scripts/compile_hot_path.py) its ``__init__`` is native, where a dataclass's generated
    ``__init__`` stays interpreted Python."""

    __slots__ = ("coded", "concept", "matched")

    def __init__(self, concept: Any, coded: frozenset[str], matched: frozenset[str]) -> None:
        self.concept = concept
        self.coded = coded  # sets matched by a coding (matches_coding_only)
        self.matched = matched  # concept_in: coded, or named by a text or display that is not negated


_MEMO: ContextVar[dict[int, ConceptSets] | None] = ContextVar("cmv_cds_concept_memo", default=None)
# Texts longer than this (rare, and possibly hostile) are searched without being cached.
_CACHEABLE_TEXT = 256


# Keyed by the pattern's source and flags, not the Pattern object: hashing a Pattern hashes its whole compiled
# program every time (no cached hash), thousands of instructions per lookup for the long alternations here.
_TEXT_SEARCHES: Final[dict[tuple[str, int, str], bool]] = {}  # Final: compiled, a C static, no dict lookup
_TEXT_SEARCHES_MAX = 16384


def text_search(pattern: re.Pattern[str], text: str) -> bool:
    """Whether ``pattern`` occurs in ``text``. Memoised across calls: the same names, displays and instructions
    come back request after request, and a case-insensitive alternation of words costs microseconds per text.
    Bounded: emptied when full (a dict's single operations are atomic under the GIL, so threads may share it)."""
    if len(text) > _CACHEABLE_TEXT:
        return pattern.search(text) is not None
    key = (pattern.pattern, pattern.flags, text)
    found = _TEXT_SEARCHES.get(key)
    if found is None:
        if len(_TEXT_SEARCHES) >= _TEXT_SEARCHES_MAX:
            _TEXT_SEARCHES.clear()
        found = _TEXT_SEARCHES[key] = pattern.search(text) is not None
    return found


def _negated(text: str) -> bool:
    return text_search(_NEGATED, text)


def _classify(concept: Any) -> tuple[frozenset[str], frozenset[str]]:
    coded = coded_set_names(concept)
    matched = coded
    texts = concept_texts(concept)
    if texts and not any(_negated(t) for t in texts):
        for text in texts:
            matched = matched | text_set_names(text)
    return coded, matched


# Across calls: the same concepts come back request after request (every creatinine result carries the same LOINC
# coding and display), so a concept's classification is also cached by its JSON text, which orjson writes in well
# under a microsecond, against ~5 µs to classify. Bounded; a long concept (rare, possibly hostile) is not cached.
_CACHEABLE_CONCEPT_BYTES = 512


@functools.lru_cache(maxsize=4096)
def _classify_json(key: bytes) -> tuple[frozenset[str], frozenset[str]]:
    return _classify(orjson.loads(key))


def _json_key(concept: Any) -> bytes:
    """The concept's JSON text, the cache key; empty when it is not a JSON object (a caller's own objects)."""
    if not isinstance(concept, dict):
        return b""
    try:
        return orjson.dumps(concept)
    except TypeError:
        return b""


def _new_concept_sets(concept: Any) -> ConceptSets:
    key = _json_key(concept)
    cached = 0 < len(key) <= _CACHEABLE_CONCEPT_BYTES
    coded, matched = _classify_json(key) if cached else _classify(concept)
    return ConceptSets(concept, coded, matched)  # unpacked first: compiled, a star-args call is not a native call


def concept_sets(concept: Any) -> ConceptSets:
    """The registered code sets the concept is in, by coding and by name (memoised for the call)."""
    memo = _MEMO.get()
    if memo is None:
        return _new_concept_sets(concept)
    entry = memo.get(id(concept))
    if entry is None or entry.concept is not concept:
        entry = memo[id(concept)] = _new_concept_sets(concept)
    return entry


class ConceptMemo:
    """The block of ``concept_memo``. A class rather than a ``contextlib.contextmanager`` generator: three blocks
    are entered per hook call, and compiled (scripts/compile_hot_path.py) its ``__enter__``/``__exit__`` are native
    calls, where the generator's wrapper runs as interpreted Python, a dozen Python calls per hook call."""

    __slots__ = ("_token",)

    def __init__(self) -> None:
        self._token: Token[dict[int, ConceptSets] | None] | None = None

    def __enter__(self) -> None:
        if _MEMO.get() is None:  # reentrant: an inner block uses the outer block's memo
            self._token = _MEMO.set({})

    def __exit__(self, *_: object) -> None:
        token, self._token = self._token, None
        if token is not None:
            _MEMO.reset(token)


def concept_memo() -> ConceptMemo:
    """Memoise concept matching for the duration of the block (reentrant): ``with concept_memo(): ...``."""
    return ConceptMemo()


def concept_label(concept: Any, fallback: str) -> str:
    """The concept's first text or display (80 characters at most), for a card; else ``fallback``."""
    texts = concept_texts(concept)
    return texts[0][:80] if texts else fallback


def coding_codes(concept: Any) -> set[str]:
    """The string codes of a CodeableConcept's codings; malformed parts are ignored."""
    codings = concept.get("coding") if isinstance(concept, dict) else None
    if not isinstance(codings, list):
        return set()
    return {c["code"] for c in codings if isinstance(c, dict) and isinstance(c.get("code"), str)}


# --- dates and references ------------------------------------------------------------------------------------------


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


def parse_instant(value: Any) -> dt.datetime | None:
    """FHIR date/dateTime/instant → an aware datetime for ordering (dates at 00:00, naive times as UTC)."""
    if not isinstance(value, str):
        return None
    text = value.strip()
    if len(text) > 10:  # a dateTime with a time: parsed once (the common case, every lab result)
        try:
            moment = dt.datetime.fromisoformat(text.replace("z", "Z"))
        except ValueError:
            return None
        return moment if moment.tzinfo else moment.replace(tzinfo=dt.UTC)
    day = parse_date(text)
    return None if day is None else dt.datetime(day.year, day.month, day.day, tzinfo=dt.UTC)


def reference_of(resource: Mapping[str, Any]) -> str:
    """``ResourceType/id`` of a resource, for a card that says where a value came from."""
    kind = resource.get("resourceType")
    ident = resource.get("id")
    return f"{kind}/{ident}" if isinstance(ident, str) else f"{kind} (no id)"
