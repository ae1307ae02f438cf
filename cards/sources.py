"""Where each card's content comes from: the public label section, guideline or clinical summary a clinician
can open, by name and link (docs/clinical-basis.md §1 lists them, with how each was verified).

Labels link to their DailyMed page by set id. Product decisions (where the sources leave a choice) are cited as
"CMV CDS product policy §N", the numbered sections of docs/policy.md in this repository.
"""

from __future__ import annotations

from dataclasses import dataclass

from cards.dosing import Drug
from cards.model import Source

DAILYMED = "https://dailymed.nlm.nih.gov/dailymed/drugInfo.cfm?setid="


@dataclass(frozen=True)
class Label:
    """A drug's US prescribing information on DailyMed."""

    name: str
    setid: str

    @property
    def url(self) -> str:
        return DAILYMED + self.setid

    def section(self, section: str) -> Source:
        """A Source citing one section of this label."""
        return Source(f"{self.name}, {section}", self.url)


LABELS: dict[Drug, Label] = {
    "ganciclovir": Label("Ganciclovir for injection label (Cytovene-IV)", "87afd103-6e64-444f-971d-0e732e9ae995"),
    "valganciclovir": Label("Valganciclovir label (Valcyte)", "4c517a39-2ded-4c5a-8d56-276853414b31"),
    "foscarnet": Label("Foscarnet sodium injection label", "b612e6f1-584f-4188-b96e-1a9adfcfe75c"),
    "cidofovir": Label("Cidofovir injection label (Vistide)", "44966a7e-d777-40fb-956f-d0f31f737848"),
}
# The section each drug's dosing card rests on (its renal dosing table, or cidofovir's dosing instructions).
DOSING_SECTION: dict[Drug, str] = {
    "ganciclovir": "§2.5 Table 1",
    "valganciclovir": "§2.5 Table 2",
    "foscarnet": "Table 13",
    "cidofovir": "Dosage and Administration",
}
LABEL: dict[Drug, Source] = {drug: label.section(DOSING_SECTION[drug]) for drug, label in LABELS.items()}

KOTTON_2025 = Source(
    "Kotton et al., 4th international consensus on CMV in solid organ transplantation (Transplantation 2025)",
    "https://pubmed.ncbi.nlm.nih.gov/40200403/",
)
NIH_OI = Source(
    "NIH/CDC/IDSA adult opportunistic infection guidelines: CMV disease",
    "https://clinicalinfo.hiv.gov/en/guidelines/adult-and-adolescent-opportunistic-infection/cytomegalovirus-disease?view=full",
)
SEED_DISSEMINATED = Source("Clinical summary: treatment of disseminated CMV infection (docs/clinical-basis.md §1.3)")
SEED_IMMUNOCOMPETENT = Source(
    "Clinical summary: disseminated CMV in immunocompetent patients (Dr.Oracle, 2025)",
    "https://www.droracle.ai/articles/",
)
PRODUCT_POLICY = Source("CMV CDS product policy (docs/policy.md)")


def link(source: Source) -> str:
    """A source as markdown: its name, linked when it has a URL."""
    return f"[{source.label}]({source.url})" if source.url else source.label


def source_line(*parts: Source | str) -> str:
    """The card detail's closing line: each source by name and link, and product-policy sections in words."""
    return "**Source:** " + "; ".join(link(part) if isinstance(part, Source) else part for part in parts)


def policy(*sections: int) -> str:
    """``CMV CDS product policy §6, §9`` (docs/policy.md)."""
    return "CMV CDS product policy " + ", ".join(f"§{n}" for n in sections) + " (docs/policy.md)"
