"""The project's own clinical documentation stays true to the code: the dosing tables and the precedence table
in docs/clinical-basis.md are the tables the code uses, docs/codes.md is what the ValueSets say, and every
citation of a docs section (in code, cards, conformance resources and docs) names a section that exists."""

from __future__ import annotations

import datetime as dt
import re
import sys
from pathlib import Path

import pytest
from clinical_builders import draft, normal_counts, observation, patient, run

from cards import dosing
from cards.dosing import DoseRow
from cards.rules.precedence import PRECEDENCE, RuleClass

REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / "docs"
CLINICAL = DOCS / "clinical-basis.md"
POLICY = DOCS / "policy.md"
sys.path.insert(0, str(REPO / "scripts"))
import generate_code_tables as code_tables  # noqa: E402

CITATION = re.compile(r"docs/(clinical-basis|policy)\.md §(\d+(?:\.\d+)?)(?:-§(\d+))?((?:, §\d+(?:\.\d+)?)*)")
PRODUCT_POLICY = re.compile(r"product policy §(\d+)((?:, §\d+)*)")


def sections(path: Path) -> set[str]:
    """The section numbers of a doc's headings (``## §2`` → "2", ``### §2.4`` → "2.4")."""
    return set(re.findall(r"^#{2,3} §(\d+(?:\.\d+)?) ", path.read_text(encoding="utf-8"), re.MULTILINE))


def table(name: str) -> list[list[str]]:
    """The rows of the markdown table that follows ``<!-- table: name -->`` in clinical-basis.md."""
    text = CLINICAL.read_text(encoding="utf-8")
    start = text.index(f"<!-- table: {name} -->")
    rows: list[list[str]] = []
    for line in text[start:].splitlines()[1:]:
        if not line.startswith("|"):
            if rows:
                break
            continue
        rows.append([cell.strip() for cell in line.strip().strip("|").split("|")])
    return [row for row in rows[2:]]  # without the header and the rule line


def _band(row: DoseRow) -> str:
    label = row.band.label().removesuffix(f" {row.band.unit}")
    if row.hemodialysis and row.drug != "foscarnet":
        return f"{label} (hemodialysis)"
    return label


def _dose(row: DoseRow) -> list[str]:
    if row.schedule is None:
        return ["not recommended", ""]
    amount = f"{row.mg_per_kg:g} mg/kg" if row.mg_per_kg is not None else f"{row.fixed_mg:g} mg"
    return [amount, row.schedule.text]


@pytest.mark.parametrize("drug", sorted(dosing.TABLES))
def test_the_documented_dosing_table_is_the_one_the_code_uses(drug: str) -> None:
    rows = dosing.TABLES[drug]  # type: ignore[index]
    if drug == "foscarnet":
        expected = [[r.phase, r.column, _band(r), *_dose(r)] for r in rows]
    else:
        expected = [[r.phase, _band(r), *_dose(r)] for r in rows]
    assert table(drug) == expected


def test_the_documented_precedence_is_the_table_the_engine_runs() -> None:
    names = {RuleClass.EXCLUSION: "exclusion", RuleClass.STEERING: "steering", RuleClass.MISSING: "missing"}
    names |= {RuleClass.DOSING: "dosing", RuleClass.ADJUNCT: "adjunct"}
    order = ("ganciclovir", "valganciclovir", "foscarnet", "cidofovir")
    expected = [
        [
            str(number),
            ", ".join(rule.rule_ids),
            names[rule.rule_class],
            "all" if len(rule.drugs) == 4 else ", ".join(d for d in order if d in rule.drugs),
            rule.when,
        ]
        for number, rule in enumerate(PRECEDENCE, start=1)
    ]
    assert table("precedence") == expected


def test_codes_md_is_what_the_valuesets_say() -> None:
    assert (DOCS / "codes.md").read_text(encoding="utf-8") == code_tables.render(), (
        "docs/codes.md is stale: run python scripts/generate_code_tables.py"
    )


def _cited(text: str) -> list[tuple[str, str]]:
    found = []
    for doc, first, last, more in CITATION.findall(text):
        found.append((doc, first))
        if last:
            found += [(doc, str(n)) for n in range(int(first.split(".")[0]) + 1, int(last) + 1)]
        found += [(doc, n) for n in re.findall(r"§(\d+(?:\.\d+)?)", more)]
    for first, more in PRODUCT_POLICY.findall(text):
        found += [("policy", first), *(("policy", n) for n in re.findall(r"§(\d+)", more))]
    return found


CITING_FILES = sorted(
    [
        *REPO.glob("cards/**/*.py"),
        *REPO.glob("service/**/*.py"),
        *REPO.glob("fhir_profiles/**/*.json"),
        *DOCS.glob("*.md"),
        REPO / "README.md",
    ]
)


def test_every_cited_section_exists() -> None:
    known = {"clinical-basis": sections(CLINICAL), "policy": sections(POLICY)}
    missing = []
    for path in CITING_FILES:
        for doc, section in _cited(path.read_text(encoding="utf-8")):
            if section not in known[doc]:
                missing.append(f"{path.relative_to(REPO)}: docs/{doc}.md §{section}")
    assert missing == []
    assert len(known["clinical-basis"]) >= 30
    assert len(known["policy"]) >= 15


def test_nothing_cites_files_outside_the_repository() -> None:
    """The product's references are its own docs: no code, card text or resource cites the private references."""
    offenders = [
        str(path.relative_to(REPO))
        for path in CITING_FILES
        if re.search(r"(?<![\w/-])(clinical|policy)\.md\b", path.read_text(encoding="utf-8")) and path.parent != DOCS
    ]
    assert offenders == []


def test_cards_cite_sections_that_exist() -> None:
    """Card text cites product-policy sections by number: each must exist (a card sample across the rules)."""
    today = dt.date(2026, 11, 22)
    resources = [
        patient(54, "male", today),
        *normal_counts(today),
        observation("29463-7", 80.0, "kg", today),
        observation("2160-0", 1.0, "mg/dL", today, days_ago=9),
    ]
    cards = run([draft("ganciclovir", "310442", route="IV")], resources, today)
    cards += run([draft("cidofovir", "199388", route="IV")], resources, today)
    known = {"clinical-basis": sections(CLINICAL), "policy": sections(POLICY)}
    cited = [(card.rule_id, doc, section) for card in cards for doc, section in _cited(card.detail)]
    assert cited
    for rule_id, doc, section in cited:
        assert section in known[doc], (rule_id, doc, section)
