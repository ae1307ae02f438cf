"""Where each card's content comes from: the label or guideline a clinician can open.

URLs are the DailyMed set IDs clinical.md §8 lists for the labels, and the guideline addresses
clinical.md §6 cites.
"""

from __future__ import annotations

from cards.dosing import Drug
from cards.model import Source

_DAILYMED = "https://dailymed.nlm.nih.gov/dailymed/drugInfo.cfm?setid="

LABEL: dict[Drug, Source] = {
    "ganciclovir": Source(
        "Ganciclovir for injection label (Cytovene-IV), §2.5 Table 1",
        _DAILYMED + "87afd103-6e64-444f-971d-0e732e9ae995",
    ),
    "valganciclovir": Source(
        "Valganciclovir label (Valcyte), §2.5 Table 2", _DAILYMED + "4c517a39-2ded-4c5a-8d56-276853414b31"
    ),
    "foscarnet": Source(
        "Foscarnet sodium injection label, Table 13", _DAILYMED + "b612e6f1-584f-4188-b96e-1a9adfcfe75c"
    ),
    "cidofovir": Source("Cidofovir injection label (Vistide)", _DAILYMED + "44966a7e-d777-40fb-956f-d0f31f737848"),
}
KOTTON_2025 = Source(
    "Kotton et al., 4th international consensus on CMV in solid organ transplantation (Transplantation 2025)",
    "https://pubmed.ncbi.nlm.nih.gov/40200403/",
)
NIH_OI = Source(
    "NIH/CDC/IDSA adult opportunistic infection guidelines: CMV disease",
    "https://clinicalinfo.hiv.gov/en/guidelines/adult-and-adolescent-opportunistic-infection/cytomegalovirus-disease?view=full",
)
PRODUCT_POLICY = Source("CMV CDS dosing policy (scope and data rules)")
