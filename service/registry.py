"""The one registry of CDS services this server hosts; discovery is rendered from it.

Prefetch templates ask for exactly the data the CMV rules read (see README "Clinical logic"). The
LOINC codes in them come from the ValueSets in ``fhir_profiles/valuesets`` (via ``cards.codes``),
so the queries and the rules can never disagree about which codes count.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

from cards.codes import code_set
from service.prefetch import PrefetchTemplate

LOINC = "http://loinc.org"
PATIENT = "{{context.patientId}}"


def _loinc_tokens(*set_names: str) -> str:
    return ",".join(f"{LOINC}|{code}" for name in set_names for code in code_set(name).codes(LOINC))


@functools.cache
def prefetch_templates() -> tuple[PrefetchTemplate, ...]:
    """The prefetch templates shared by both hooks (CDS Hooks 2.0.1 token rules: root-level only)."""
    return (
        PrefetchTemplate("patient", f"Patient/{PATIENT}"),
        # Latest weight (and height, for the optional adjusted-weight policy, docs/policy.md §4).
        PrefetchTemplate(
            "bodyMeasurements",
            f"Observation?patient={PATIENT}&code={_loinc_tokens('BodyWeight', 'BodyHeight')}&_sort=-date&_count=20",
        ),
        # Renal function, blood counts, urine protein (cidofovir) and pregnancy tests (docs/policy.md §2, §5, §9, §11).
        PrefetchTemplate(
            "labs",
            f"Observation?patient={PATIENT}&code="
            + _loinc_tokens(
                "SerumCreatinine",
                "NeutrophilCount",
                "PlateletCount",
                "Hemoglobin",
                "UrineProtein",
                "PregnancyTest",
            )
            + "&_sort=-date&_count=100",
        ),
        # CMV DNA series: response to therapy, resistance and the viral-load threshold (docs/policy.md §9).
        PrefetchTemplate(
            "cmvViralLoads",
            f"Observation?patient={PATIENT}&code="
            + _loinc_tokens("CmvViralLoadIU", "CmvViralLoadLog10IU", "CmvViralLoadCopies", "CmvDnaQualitative")
            + "&_sort=-date&_count=50",
        ),
        # CMV manifestations, transplant/HIV, dialysis, pregnancy, malabsorption: matched by code and text,
        # so the search cannot be narrowed by code.
        PrefetchTemplate("conditions", f"Condition?patient={PATIENT}&clinical-status=active,recurrence,relapse"),
        # Active anti-CMV therapy and its start, interacting drugs, and nephrotoxic drugs stopped within the
        # last 7 days (cidofovir, docs/clinical-basis.md §5), hence completed/stopped too. With the Medications
        # they reference (_include), so orders by medicationReference are identified in the same round trip
        # (service.medication_refs).
        PrefetchTemplate(
            "medications",
            f"MedicationRequest?patient={PATIENT}&status=active,on-hold,completed,stopped&_sort=-authoredon&_count=100"
            "&_include=MedicationRequest:medication",
        ),
    )


@dataclass(frozen=True)
class ServiceDefinition:
    """One CDS service: what discovery advertises and how its requests are checked."""

    id: str
    hook: str
    title: str
    description: str
    usage_requirements: str
    context_schema: str
    checks_all_draft_orders: bool  # order-sign: every draft order; order-select: the selections only

    @property
    def prefetch(self) -> tuple[PrefetchTemplate, ...]:
        return prefetch_templates()

    def discovery_json(self) -> dict[str, Any]:
        """The service's entry in the discovery response."""
        return {
            "hook": self.hook,
            "id": self.id,
            "title": self.title,
            "description": self.description,
            "prefetch": {t.key: t.query for t in self.prefetch},
            "usageRequirements": self.usage_requirements,
        }


_USAGE = (
    "FHIR R4 only (draft orders as MedicationRequest). Adults (18 years and over). Supply the prefetch keys or a "
    "fhirServer (https) with fhirAuthorization; without either the service answers 412. Dosing needs a body weight "
    "and a serum creatinine; when one is missing the card says so and proposes no dose."
)

SERVICES: dict[str, ServiceDefinition] = {
    definition.id: definition
    for definition in (
        ServiceDefinition(
            id="cmv-antiviral-order-select",
            hook="order-select",
            title="CMV antiviral dosing and safety",
            description=(
                "When a CMV antiviral (ganciclovir, valganciclovir, foscarnet, cidofovir) is selected, proposes the "
                "regimen that fits the patient's weight, renal function, blood counts and disease, per the drug "
                "labels and CMV treatment guidelines, and warns when the selected drug is unsafe."
            ),
            usage_requirements=_USAGE,
            context_schema="order-select-context.schema.json",
            checks_all_draft_orders=False,
        ),
        ServiceDefinition(
            id="cmv-antiviral-order-sign",
            hook="order-sign",
            title="CMV antiviral final check before signing",
            description=(
                "The same CMV antiviral dosing and safety logic as the order-select service, run on every draft "
                "order just before it is signed."
            ),
            usage_requirements=_USAGE,
            context_schema="order-sign-context.schema.json",
            checks_all_draft_orders=True,
        ),
    )
}


def discovery_document() -> dict[str, Any]:
    """The body of ``GET /cds-services``."""
    return {"services": [service.discovery_json() for service in SERVICES.values()]}
