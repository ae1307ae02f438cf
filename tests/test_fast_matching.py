"""The fast concept matching (cards.codes lookups + the per-call memo in cards.facts) gives exactly the
answers of the plain CodeSet methods it replaces on the hot path (bench/README.md, "Optimisations")."""

from __future__ import annotations

import re
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cards.codes import CodeSet, all_code_sets, code_set, load_code_sets
from cards.facts import _NOT_BLOOD
from cards.fhir_in import _NEGATED, coded_in, concept_in, concept_memo, concept_texts, text_search
from cards.orders import _ENTERAL_ROUTE, _LOCAL, _ROUTE_IV, _ROUTE_ORAL

REGISTRY = all_code_sets()
# Unregistered copies of the same sets take the original (slow) path: the reference answers.
REFERENCE = load_code_sets()
SYSTEMS = [
    *sorted({c.system for s in REGISTRY.values() for c in s.concepts}),
    "urn:oid:2.16.840.1.113883.6.88",
    "urn:oid:2.16.840.1.113883.6.1",
    " http://loinc.org ",
    "http://example.org",
]
CODES = sorted({c.code for s in REGISTRY.values() for c in s.concepts})
WORDS = [
    *sorted({w for s in REGISTRY.values() for p in s.text_patterns for w in p.split()}),
    "not",
    "negative",
    "donor",
    "IgG",
    "valganciclovir",
    "GANCICLOVIR",
    "500",
    "mg",
    "-",
]

code_text = st.one_of(
    st.sampled_from(CODES),
    st.sampled_from(CODES).map(lambda c: f" {c.lower()} "),
    st.sampled_from(CODES).map(lambda c: c.replace(".", "")),
)
text = st.lists(st.sampled_from(WORDS), min_size=1, max_size=5).map(" ".join)
coding = st.one_of(
    st.fixed_dictionaries(
        {"system": st.sampled_from(SYSTEMS), "code": code_text},
        optional={"display": st.one_of(text, st.integers())},
    ),
    st.just({"system": None, "code": "2160-0"}),
    st.just("not a coding"),
)
concept = st.one_of(
    st.fixed_dictionaries({}, optional={"coding": st.one_of(st.lists(coding, max_size=3), coding), "text": text}),
    st.none(),
    st.just("text instead of a concept"),
    st.just({"coding": {"system": "http://loinc.org", "code": "2160-0"}}),
)


def reference_concept_in(value: Any, value_set: CodeSet) -> bool:
    """cards.fhir_in.concept_in as it was before the fast path."""
    if value_set.matches_coding_only(value):
        return True
    return value_set.matches_concept(value) and not any(_NEGATED.search(t) for t in concept_texts(value))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(concept)
def test_fast_matching_agrees_with_the_code_set_methods(value: Any) -> None:
    for name, registered in REGISTRY.items():
        reference = REFERENCE[name]
        assert registered.registered
        assert not reference.registered
        expected = reference_concept_in(value, reference)
        assert concept_in(value, registered) is expected, name
        assert concept_in(value, reference) is expected, name
        assert coded_in(value, registered) is reference.matches_coding_only(value), name
        with concept_memo():
            assert concept_in(value, registered) is expected, name
            assert concept_in(value, registered) is expected, name  # from the memo
            assert coded_in(value, registered) is reference.matches_coding_only(value), name


def test_memo_never_answers_for_another_object_with_a_recycled_id() -> None:
    with concept_memo():
        for _ in range(200):  # temporary dicts: CPython reuses their ids
            assert concept_in({"text": "ganciclovir"}, code_set("Ganciclovir"))
            assert not concept_in({"text": "foscarnet"}, code_set("Ganciclovir"))


def test_long_texts_are_matched_without_the_cache() -> None:
    long_text = "x " * 500 + "ganciclovir"
    assert concept_in({"text": long_text}, code_set("Ganciclovir"))
    assert not concept_in({"text": long_text + " negative"}, code_set("Ganciclovir"))


# Each pattern the hot path searches through the cached text_search (cards.fhir_in), with texts that match and that
# do not, short (cached) and past the cache's length limit: the same answers as the pattern's own search.
@pytest.mark.parametrize(
    ("pattern", "matching", "other"),
    [
        (_NEGATED, "CMV IgG positive", "CMV viremia"),
        (_NOT_BLOOD, "CMV DNA [IU/volume] in Bronchoalveolar lavage", "CMV DNA [IU/volume] in Plasma"),
        (_ROUTE_IV, "IV piggyback", "by mouth"),
        (_ROUTE_ORAL, "per NG tube", "intravenous"),
        (_ENTERAL_ROUTE, " PEG-J ", "via PEG-J today"),
        (_LOCAL, "instill 1 drop into the left eye", "CMV retinitis of the left eye"),
    ],
)
def test_cached_text_search_answers_as_the_pattern_does(pattern: re.Pattern[str], matching: str, other: str) -> None:
    for text in (matching, other, "x " * 300 + matching, "x " * 300 + other):
        for _ in range(2):  # the second answer comes from the cache (short texts)
            assert text_search(pattern, text) is (pattern.search(text) is not None), text[-60:]
    assert text_search(pattern, matching)
    assert not text_search(pattern, other)


def test_the_text_search_memo_tells_patterns_apart_by_flags_and_stays_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    from cards import fhir_in

    # Same source, different flags: memoised under different keys, so each answers as itself.
    sensitive, insensitive = re.compile(r"\bGanciclovir\b"), re.compile(r"\bGanciclovir\b", re.IGNORECASE)
    for _ in range(2):
        assert not text_search(sensitive, "ganciclovir 5 mg/kg")
        assert text_search(insensitive, "ganciclovir 5 mg/kg")
    monkeypatch.setattr(fhir_in, "_TEXT_SEARCHES_MAX", 50)
    for n in range(300):
        assert text_search(insensitive, f"ganciclovir {n}")
        assert not text_search(insensitive, f"foscarnet {n}")
        assert len(fhir_in._TEXT_SEARCHES) <= 50


@pytest.mark.parametrize(
    ("unit", "key"),
    [
        ("mg/dL", "mg/dl"),
        ("µmol/L", "umol/l"),
        ("μmol/L", "umol/l"),
        ("×10^9/L", "x10^9/l"),
        (" 10*3 / uL ", "10*3/ul"),
    ],
)
def test_unit_keys_are_memoised_as_spelled_and_the_memo_stays_bounded(
    monkeypatch: pytest.MonkeyPatch, unit: str, key: str
) -> None:
    from cards import units

    memo = units._UNIT_KEYS
    memo.pop(unit, None)
    assert units.unit_key(unit) == key  # computed, and kept
    assert memo[unit] == key
    assert units.unit_key(unit) == key  # from the memo
    long_unit = "mg/dL" + " " * 100
    assert units.unit_key(long_unit) == "mg/dl"
    assert long_unit not in memo  # longer than any unit: keyed, not kept
    monkeypatch.setattr(units, "_UNIT_KEYS_MAX", 50)
    for n in range(300):
        assert units.unit_key(f"{n} MG/DL") == f"{n}mg/dl"
        assert len(memo) <= 50  # emptied when full
    memo.clear()  # a cache: the next reads key their units again
