"""Write docs/codes.md: every code set of fhir_profiles/valuesets, each code with its display, verification status
and the public sources it was seen in, and each set's name patterns.

The ValueSets are the source of truth (the service loads them); this page prints them for a reviewer.
tests/test_docs.py fails when the page is not what this script writes. Run: python scripts/generate_code_tables.py
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from cards.codes import VALUESETS_DIR, load_code_sets  # noqa: E402

OUTPUT = REPO / "docs" / "codes.md"
_SYSTEM_NAMES = {
    "http://www.nlm.nih.gov/research/umls/rxnorm": "RxNorm",
    "http://loinc.org": "LOINC",
    "http://snomed.info/sct": "SNOMED CT",
    "http://hl7.org/fhir/sid/icd-10": "ICD-10",
    "http://hl7.org/fhir/sid/icd-10-cm": "ICD-10-CM",
}


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def render() -> str:
    """The page, from the ValueSet files."""
    lines = [
        "# Code sets",
        "",
        "Generated from `fhir_profiles/valuesets/` by `scripts/generate_code_tables.py`; do not edit by hand.",
        "How codes are matched and what each verification status means: [clinical-basis.md §9](clinical-basis.md).",
        "",
    ]
    for name, code_set in sorted(load_code_sets().items()):
        resource = json.loads((VALUESETS_DIR / f"ValueSet-{name}.json").read_text(encoding="utf-8"))
        lines += [f"## {resource['title']} (`{name}`)", "", resource["description"], ""]
        if code_set.concepts:
            lines += ["| System | Code | Display | Status | Sources |", "|---|---|---|---|---|"]
            for concept in code_set.concepts:
                sources = ", ".join(f"[{n}]({url})" for n, url in enumerate(concept.sources, start=1)) or "—"
                system = _SYSTEM_NAMES.get(concept.system, concept.system)
                lines.append(
                    f"| {system} | {concept.code} | {_cell(concept.display)} | {concept.verification} | {sources} |"
                )
            lines.append("")
        if code_set.text_patterns:
            lines += ["Name patterns: " + ", ".join(f"`{p}`" for p in code_set.text_patterns), ""]
    return "\n".join(lines)


def main() -> None:
    OUTPUT.write_text(render(), encoding="utf-8")
    print(f"wrote {OUTPUT.relative_to(REPO)}")


if __name__ == "__main__":
    main()
