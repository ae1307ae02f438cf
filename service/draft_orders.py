"""The draft orders of an order-select / order-sign context: which are selected, and are they R4.

Selected MedicationRequests are validated against the FHIR R4 JSON Schema (``service.draft_schema``) after
the shapes real clients send have been read into R4 (``normalise_medication_request``):

- a single object where R4 has an array is wrapped: the CDS Hooks sandbox sends ``category`` and
  ``reasonCode`` as single objects, Epic ``category``, and the hook library's own R4 example
  ``doseAndRate``;
- the pre-R4 dose elements written directly on the Dosage (``doseQuantity``, ``doseRange``,
  ``rateQuantity``, ``rateRange``, ``rateRatio``: STU3 and older Epic examples) move into
  ``doseAndRate[0]``, where R4 keeps them;
- Epic's ``https://open.epic.com/fhir/extensions/ordered-dose`` extension (the dose as ordered; Epic's IV
  orders carry their dose only there) becomes ``doseAndRate[0].doseQuantity`` when the Dosage has no
  ``doseQuantity`` of its own. The standard element wins when both are present. The extension itself is
  kept, and so is Epic's ``admin-amount`` (tablets per administration, not a dose).

Every MedicationRequest is read that way (``read_medication_request``, which copies only what it changes); the
non-selected orders and prefetched ones are never validated, so a malformed one cannot sink the request.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

from cards.fhir_out import json_copy
from service.draft_schema import draft_schema
from service.errors import InvalidRequest
from service.validation import format_path

# R4 MedicationRequest / Dosage members that are arrays (0..*), where clients have been seen sending
# a single object. Only these are repaired; anything else that is wrong is reported.
_MEDREQ_ARRAYS = ("category", "reasonCode", "reasonReference", "dosageInstruction", "note", "identifier")
_DOSAGE_ARRAYS = ("doseAndRate", "additionalInstruction")
# Dosage elements of STU3 (and older Epic examples) that R4 moved into Dosage.doseAndRate.
_PRE_R4_DOSE = ("doseQuantity", "doseRange", "rateQuantity", "rateRange", "rateRatio")
# Epic: "the dose as ordered" (fhir.epic.com, CDS Hooks Tutorial, "Example HTTP Request").
EPIC_ORDERED_DOSE = "https://open.epic.com/fhir/extensions/ordered-dose"


# Built on every call: its __init__ is spelled out (init=False), a native constructor (see cards/model.py above
# Coding).
@dataclass(frozen=True, init=False)
class DraftOrders:
    """Selected orders (validated; read into R4's shape, copied only when that changes them) and the other draft
    orders (raw, context only).

    ``selected_paths`` names where each selected order sits in the request (for an error naming it).
    """

    selected: tuple[dict[str, Any], ...]
    others: tuple[dict[str, Any], ...]
    selected_paths: tuple[str, ...] = ()

    def __init__(
        self,
        selected: tuple[dict[str, Any], ...],
        others: tuple[dict[str, Any], ...],
        selected_paths: tuple[str, ...] = (),
    ) -> None:
        object.__setattr__(self, "selected", selected)
        object.__setattr__(self, "others", others)
        object.__setattr__(self, "selected_paths", selected_paths)


def _wrap(resource: dict[str, Any], names: tuple[str, ...]) -> None:
    for name in names:
        if isinstance(resource.get(name), dict):
            resource[name] = [resource[name]]


def _ordered_dose(dosage: Mapping[str, Any]) -> Any:
    extensions = dosage.get("extension")
    for extension in extensions if isinstance(extensions, list) else ():
        if isinstance(extension, dict) and extension.get("url") == EPIC_ORDERED_DOSE:
            quantity = extension.get("valueQuantity")
            if isinstance(quantity, dict) and quantity:
                return quantity
    return None


def _read_dosage(dosage: dict[str, Any]) -> None:
    """One Dosage into R4's shape, in place (see the module docstring)."""
    _wrap(dosage, _DOSAGE_ARRAYS)
    rates = dosage.get("doseAndRate", [])
    if not isinstance(rates, list) or (rates and not isinstance(rates[0], dict)):
        return  # malformed: left as it is, for the validation to name (selected orders) or to ignore
    moved = {name: dosage.pop(name) for name in _PRE_R4_DOSE if name in dosage}
    ordered = _ordered_dose(dosage)
    if not moved and ordered is None:
        return
    first: dict[str, Any] = rates[0] if rates else {}
    for name, value in moved.items():
        first.setdefault(name, value)  # an R4 element already there wins
    if ordered is not None and "doseQuantity" not in first and "doseRange" not in first:
        first["doseQuantity"] = ordered
    if not rates:
        dosage["doseAndRate"] = [first]


# A Dosage member that ``_read_dosage`` may have to move or read (the arrays are checked for being objects).
_DOSAGE_SUSPECTS = frozenset((*_PRE_R4_DOSE, "extension"))


def needs_reading(resource: Mapping[str, Any]) -> bool:
    """Whether ``normalise_medication_request`` would change anything but the copy. Cheap, no copy: it runs
    for every prefetched MedicationRequest of every call (plain loops, as this is the hot path)."""
    for name in _MEDREQ_ARRAYS:
        if type(resource.get(name)) is dict:
            return True
    dosages = resource.get("dosageInstruction")
    if type(dosages) is not list:
        return False
    for dosage in dosages:
        if type(dosage) is dict and (
            not _DOSAGE_SUSPECTS.isdisjoint(dosage)
            or type(dosage.get("doseAndRate")) is dict
            or type(dosage.get("additionalInstruction")) is dict
        ):
            return True
    return False


def normalise_medication_request(resource: Mapping[str, Any]) -> dict[str, Any]:
    """A deep copy read into R4's shape: arrays wrapped, pre-R4 and Epic dose shapes moved into
    ``doseAndRate`` (see the module docstring)."""
    fixed = json_copy(resource)  # an orjson round trip, ~6x cheaper than copy.deepcopy (cards.fhir_out)
    _wrap(fixed, _MEDREQ_ARRAYS)
    dosages = fixed.get("dosageInstruction")
    if isinstance(dosages, list):
        for dosage in dosages:
            if isinstance(dosage, dict):
                _read_dosage(dosage)
    return fixed


# A resource as the caller holds it: a selected draft (a dict, validated next) or context data (any mapping).
_Resource = TypeVar("_Resource", bound=Mapping[str, Any])


def read_medication_request(resource: _Resource) -> _Resource | dict[str, Any]:
    """``resource`` itself when it is already in R4's shape, else a normalised copy. Nothing downstream modifies
    what it returns (an update action is built on its own copy, cards.fhir_out), so no copy is made to protect it."""
    return normalise_medication_request(resource) if needs_reading(resource) else resource


def _validate_r4(resource: dict[str, Any], where: str) -> None:
    schema = draft_schema()
    if schema.is_valid(resource):
        return
    error = schema.first_error(resource)
    path, rule = error if error is not None else ([], "is invalid")
    expression = format_path(path, where)
    raise InvalidRequest(f"'{expression}' is not valid FHIR R4: it {rule}", expression=expression)


def reference_parts(reference: Any) -> tuple[str, str] | None:
    """(type, id) of a literal reference, relative (``Patient/1``) or absolute
    (``https://host/fhir/R4/Patient/1``), with any ``/_history/<version>`` dropped; None otherwise."""
    if not isinstance(reference, str) or not reference or reference.startswith("#"):
        return None
    segments = reference.split("?", 1)[0].rstrip("/").split("/")
    if len(segments) >= 4 and segments[-2] == "_history":
        segments = segments[:-2]
    if len(segments) < 2 or not segments[-2] or not segments[-1]:
        return None
    return segments[-2], segments[-1]


def _subject_patient_id(resource: Mapping[str, Any]) -> str | None:
    subject = resource.get("subject")
    parts = reference_parts(subject.get("reference") if isinstance(subject, dict) else None)
    return parts[1] if parts is not None and parts[0] == "Patient" else None


def split_draft_orders(context: Mapping[str, Any], *, all_selected: bool) -> DraftOrders:
    """Resolve ``selections`` against ``draftOrders`` and validate the selected MedicationRequests."""
    entries = context["draftOrders"].get("entry") or []
    by_reference: dict[str, tuple[int, dict[str, Any]]] = {}
    for index, entry in enumerate(entries):
        resource = entry.get("resource") if isinstance(entry, dict) else None
        if isinstance(resource, dict) and isinstance(resource.get("id"), str):
            by_reference[f"{resource['resourceType']}/{resource['id']}"] = (index, resource)

    if all_selected:
        chosen = list(by_reference)
    else:
        chosen = []
        for position, reference in enumerate(context["selections"]):
            if reference not in by_reference:
                raise InvalidRequest(
                    f"context.selections[{position}] references {reference}, which is not in context.draftOrders",
                    expression=f"context.selections[{position}]",
                )
            chosen.append(reference)

    selected: list[dict[str, Any]] = []
    paths: list[str] = []
    for reference in dict.fromkeys(chosen):
        index, resource = by_reference[reference]
        where = f"context.draftOrders.entry[{index}].resource"
        if resource["resourceType"] == "MedicationOrder":
            raise InvalidRequest(
                f"'{where}' is a DSTU2 MedicationOrder; this service requires FHIR R4 MedicationRequest",
                expression=where,
            )
        if resource["resourceType"] != "MedicationRequest":
            continue  # selected lab, diet or imaging orders (and Epic's Medication entries) are out of scope
        fixed = read_medication_request(resource)
        _validate_r4(fixed, where)
        patient_id = _subject_patient_id(fixed)
        if patient_id is not None and patient_id != context["patientId"]:
            raise InvalidRequest(f"'{where}.subject' is not context.patientId", expression=f"{where}.subject")
        selected.append(fixed)
        paths.append(where)

    selected_refs = set(chosen)
    others = tuple(resource for ref, (_, resource) in by_reference.items() if ref not in selected_refs)
    return DraftOrders(selected=tuple(selected), others=others, selected_paths=tuple(paths))
