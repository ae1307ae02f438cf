"""``medicationReference`` resolved at the service edge, before the clinical engine reads a MedicationRequest.

The engine (``cards``) recognises a drug by its ``medicationCodeableConcept``. Real EHRs order by reference:
Epic sends ``medicationReference`` with the Medication as its own entry of the ``draftOrders`` Bundle (since
its February 2024 version; fhir.epic.com, CDS Hooks Tutorial, "Medication References"), a client may
contain it (``#med1``), and a prefetched MedicationRequest may point at a Medication that only the FHIR
server holds. A reference is resolved, in this order, from:

1. the MedicationRequest's ``contained`` Medication (``#id``);
2. a Medication of that id elsewhere in the request: a ``draftOrders`` entry, a prefetch Bundle (the
   ``medications`` template asks for ``_include=MedicationRequest:medication``, so one round trip still
   suffices), or a resource fetched for a prefetch key;
3. a read of ``Medication/<id>`` from ``fhirServer`` (relative references, and absolute ones under
   ``fhirServer``; never another host), all reads of one call in parallel;
4. the reference's ``display``.

The engine then gets a copy with ``medicationCodeableConcept`` = the Medication's ``code`` (its
ingredients' codes when it has none; the display as text when the code has none). That copy is for reading
only: it holds both ``medication[x]`` choices, which R4 forbids, so an ``update`` proposed for a selected
draft that came with a reference gets the client's ``medicationReference`` back in place of the concept
(``keep_client_medication``): the dose changes, the product the EHR knows stays what the clinician chose.

A selected MedicationRequest whose medication cannot be identified at all (steps 1-4 all fail) is a 412
naming the reference: guessing would answer silence on exactly the orders this service exists for, and a
card would have nothing clinical to say and would fire on every unidentifiable order, CMV or not (README,
"EHR integration"). For the other drafts and the prefetched MedicationRequests (context only) the reads are
best effort, at most ``CONTEXT_READ_CAP`` per call; what stays unidentified is counted in the log.
"""

from __future__ import annotations

import dataclasses
import logging
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from cards.model import Card
from service import metrics
from service.bundles import bundle_resources
from service.draft_orders import read_medication_request, reference_parts
from service.errors import PreconditionFailed
from service.fetch_pool import run_within_budget
from service.fhir_client import FhirDeadlineExceeded, FhirFetchError, FhirServer, fhir_session

log = logging.getLogger("cmv_cds.medications")

# Most Medication reads for context medications (other drafts, prefetched MedicationRequests) in one call.
CONTEXT_READ_CAP = 50
# Ids put into a FHIR URL: unreserved characters only, not "." or ".." (a path segment that would climb).
MAX_ID_CHARS = 255
_SAFE_ID = re.compile(r"\.*[A-Za-z0-9-][A-Za-z0-9.-]*")
# The prefetch_key label of Medication reads in the FHIR fetch metrics (service.metrics; README, "Monitoring").
METRIC_KEY = "medication"


def safe_id(value: Any) -> bool:
    """Whether ``value`` can be put into a FHIR URL as a resource id (README, "Security")."""
    return isinstance(value, str) and len(value) <= MAX_ID_CHARS and _SAFE_ID.fullmatch(value) is not None


@dataclasses.dataclass(frozen=True)
class _Target:
    """What a MedicationRequest's ``medicationReference`` points at."""

    reference: str | None
    display: str | None
    contained_id: str | None
    medication_id: str | None  # a Medication id (relative or absolute reference), when the literal names one


def _target(order: Mapping[str, Any]) -> _Target | None:
    """The reference to resolve; None when the order has a concept already or no usable reference."""
    if isinstance(order.get("medicationCodeableConcept"), dict):
        return None
    ref = order.get("medicationReference")
    if not isinstance(ref, dict):
        return None
    literal = ref.get("reference") if isinstance(ref.get("reference"), str) else None
    display = ref.get("display") if isinstance(ref.get("display"), str) and ref["display"].strip() else None
    contained_id = literal[1:] if literal and literal.startswith("#") else None
    parts = reference_parts(literal)
    medication_id = parts[1] if parts is not None and parts[0] == "Medication" else None
    return _Target(literal, display, contained_id, medication_id)


def medication_concept(medication: Mapping[str, Any]) -> dict[str, Any] | None:
    """A Medication as a CodeableConcept: its ``code``, else its ingredients' codes; None if it has neither."""
    code = medication.get("code")
    if isinstance(code, dict) and (code.get("coding") or code.get("text")):
        return dict(code)
    codings: list[Any] = []
    texts: list[str] = []
    ingredients = medication.get("ingredient")
    for ingredient in ingredients if isinstance(ingredients, list) else ():
        item = ingredient.get("itemCodeableConcept") if isinstance(ingredient, dict) else None
        if isinstance(item, dict):
            found = item.get("coding")
            codings += [c for c in found if isinstance(c, dict)] if isinstance(found, list) else []
            if isinstance(item.get("text"), str):
                texts.append(item["text"])
    if not codings and not texts:
        return None
    concept: dict[str, Any] = {}
    if codings:
        concept["coding"] = codings
    if texts:
        concept["text"] = " / ".join(texts)
    return concept


def _with_concept(order: Mapping[str, Any], concept: dict[str, Any], display: str | None) -> dict[str, Any]:
    if display and not concept.get("text"):
        concept = {**concept, "text": display}
    return {**order, "medicationCodeableConcept": concept}


def _contained(order: Mapping[str, Any], contained_id: str) -> Mapping[str, Any] | None:
    contained = order.get("contained")
    for resource in contained if isinstance(contained, list) else ():
        if (
            isinstance(resource, dict)
            and resource.get("resourceType") == "Medication"
            and resource.get("id") == contained_id
        ):
            return resource
    return None


class MedicationResolver:
    """Resolves the ``medicationReference``s of one hook call (see the module docstring).

    ``server`` is called at most once, when a read is needed; it returns the FHIR server to read from, or
    why there is none (no ``fhirServer``, or one the access policy refuses).
    """

    def __init__(
        self,
        body: Mapping[str, Any],
        server: Callable[[], FhirServer | str],
        max_workers: int,
    ) -> None:
        self._body = body
        self._server_factory = server
        self._server: FhirServer | str | None = None
        self._max_workers = max_workers
        self._medications: dict[str, Mapping[str, Any]] | None = None
        self._failures: dict[str, str] = {}  # Medication id → why it could not be read
        self._client_references: dict[str, Any] = {}  # selected draft id → the client's medicationReference

    # --- where Medications come from ---------------------------------------------------------------------

    def _known(self) -> dict[str, Mapping[str, Any]]:
        """Medications in the request (draftOrders entries, prefetch), by id; built on first use."""
        if self._medications is None:
            self._medications = {}
            entries = self._body["context"]["draftOrders"].get("entry") or []
            self._add(entry.get("resource") for entry in entries if isinstance(entry, dict))
            prefetch = self._body.get("prefetch") or {}
            for value in prefetch.values():
                if isinstance(value, dict):
                    self._add(bundle_resources(value) if value.get("resourceType") == "Bundle" else [value])
        return self._medications

    def _add(self, resources: Iterable[Any]) -> None:
        known = self._medications if self._medications is not None else self._known()
        for resource in resources:
            if isinstance(resource, dict) and resource.get("resourceType") == "Medication":
                ident = resource.get("id")
                if isinstance(ident, str):
                    known.setdefault(ident, resource)

    def _local(self, order: Mapping[str, Any], target: _Target) -> dict[str, Any] | None:
        medication: Mapping[str, Any] | None = None
        if target.contained_id is not None:
            medication = _contained(order, target.contained_id)
        elif target.medication_id is not None:
            medication = self._known().get(target.medication_id)
        return medication_concept(medication) if medication is not None else None

    def _readable(self, target: _Target) -> bool:
        """A reference this service may read: a Medication id on fhirServer (relative, or absolute under it)."""
        if target.medication_id is None or not safe_id(target.medication_id) or target.reference is None:
            return False
        if "://" not in target.reference:
            return True
        server = self._get_server()
        return isinstance(server, FhirServer) and server.contains(target.reference)

    def _get_server(self) -> FhirServer | str:
        if self._server is None:
            self._server = self._server_factory()
        return self._server

    def _read(self, ids: Sequence[str]) -> None:
        """Read these Medications from fhirServer, in parallel; results join the known Medications, and
        each failure is remembered (with its reason) for the 412 message."""
        server = self._get_server()
        if not isinstance(server, FhirServer):
            self._failures.update(dict.fromkeys(ids, server))
            return

        def read(ident: str) -> Mapping[str, Any] | str:
            with metrics.fhir_fetch_timer(METRIC_KEY):
                try:
                    found = server.get_json(server.url_for(f"Medication/{ident}"), session)
                except FhirFetchError as exc:
                    metrics.count_fhir_fetch_error(METRIC_KEY, exc)
                    return f"reading it from fhirServer failed: {exc}"
            if found is None:
                return "fhirServer has no such Medication"
            if found.get("resourceType") != "Medication" or found.get("id") != ident:
                return "fhirServer answered with something other than that Medication"
            return found

        with fhir_session(self._max_workers) as session:  # one for these reads' threads (fhir_session)
            futures = run_within_budget(read, ids, self._max_workers, server.budget)
        for ident, future in zip(ids, futures, strict=True):
            if future.done() and not future.cancelled():
                result = future.result()
            else:  # still blocked after the budget, or never started: a running read counts itself when it ends
                late = FhirDeadlineExceeded()
                if future.cancelled():
                    metrics.count_fhir_fetch_error(METRIC_KEY, late)
                result = f"reading it from fhirServer failed: {late}"
            if isinstance(result, str):
                self._failures[ident] = result
            else:
                self._add([result])

    # --- selected orders -------------------------------------------------------------------------------

    def selected(self, orders: Sequence[dict[str, Any]], paths: Sequence[str]) -> tuple[dict[str, Any], ...]:
        """The selected MedicationRequests with their medication resolved (copies where it changed).

        A selected order whose medication cannot be identified at all is a ``PreconditionFailed`` (412)
        naming its ``medicationReference``."""
        targets = [_target(order) for order in orders]
        pending = {
            target.medication_id
            for order, target in zip(orders, targets, strict=True)
            if target is not None and self._local(order, target) is None and self._readable(target)
        }
        if pending:
            self._read(sorted(i for i in pending if i is not None))
        resolved: list[dict[str, Any]] = []
        for order, target, path in zip(orders, targets, paths, strict=True):
            if target is None:
                resolved.append(order)
                continue
            concept = self._local(order, target) or ({"text": target.display} if target.display else None)
            if concept is None:
                raise PreconditionFailed(
                    f"the medication of the selected {order['resourceType']}/{order.get('id')} cannot be "
                    f"identified: {self._why_not(order, target)}",
                    expression=f"{path}.medicationReference",
                )
            self._client_references[str(order.get("id"))] = order["medicationReference"]
            resolved.append(_with_concept(order, concept, target.display))
        return tuple(resolved)

    def _why_not(self, order: Mapping[str, Any], target: _Target) -> str:
        shown = f"medicationReference '{(target.reference or '(no reference)')[:300]}'"
        if target.contained_id is not None:
            return f"{shown} names no contained Medication with a code, and has no display"
        if target.medication_id is None:
            return f"{shown} is not a Medication reference this service can follow, and has no display"
        if target.medication_id in self._known() and target.medication_id not in self._failures:
            return f"{shown} names a Medication with neither a code nor ingredient codes, and has no display"
        where = "is not contained, not in draftOrders or prefetch"
        if not self._readable(target):
            return f"{shown} {where}, is not on fhirServer, and has no display"
        reason = self._failures.get(target.medication_id, "the Medication read from fhirServer has no code")
        return f"{shown} {where}, {reason}, and it has no display"

    def keep_client_medication(self, cards: Sequence[Card]) -> list[Card]:
        """Cards whose ``update`` of a selected draft that came with a ``medicationReference`` keeps that
        reference (and not the concept the engine read; see the module docstring)."""
        if not self._client_references:
            return list(cards)
        return [self._keep_in_card(card) for card in cards]

    def _keep_in_card(self, card: Card) -> Card:
        suggestions = []
        changed = False
        for suggestion in card.suggestions:
            actions = []
            for action in suggestion.actions:
                resource = action.resource
                reference = self._client_references.get(str(resource.get("id"))) if resource else None
                if action.type == "update" and resource and reference is not None:
                    kept = {k: v for k, v in resource.items() if k != "medicationCodeableConcept"}
                    kept["medicationReference"] = reference
                    action = dataclasses.replace(action, resource=kept)
                    changed = True
                actions.append(action)
            suggestions.append(dataclasses.replace(suggestion, actions=tuple(actions)))
        return dataclasses.replace(card, suggestions=tuple(suggestions)) if changed else card

    # --- context medications ---------------------------------------------------------------------------

    def context(self, resources: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
        """Other drafts and prefetched/fetched resources, their MedicationRequests read into R4's shape and
        their medication resolved where possible (best effort: nothing here fails the call)."""
        read: list[Mapping[str, Any]] = [
            read_medication_request(r) if r.get("resourceType") == "MedicationRequest" else r for r in resources
        ]
        targets = [_target(r) if r.get("resourceType") == "MedicationRequest" else None for r in read]
        if not any(targets):
            return read  # nothing ordered by reference: no index of Medications is built
        self._add(resources)
        pending = sorted(
            {
                target.medication_id
                for order, target in zip(read, targets, strict=True)
                if target is not None
                and target.medication_id is not None
                and target.medication_id not in self._failures
                and self._local(order, target) is None
                and self._readable(target)
            }
        )
        if pending:
            self._read(pending[:CONTEXT_READ_CAP])
        unidentified = 0
        for index, (order, target) in enumerate(zip(read, targets, strict=True)):
            if target is None:
                continue
            concept = self._local(order, target) or ({"text": target.display} if target.display else None)
            if concept is None:
                unidentified += 1
                continue
            read[index] = _with_concept(order, concept, target.display)
        if unidentified or len(pending) > CONTEXT_READ_CAP:
            log.warning(
                "medications not identified",
                extra={"unidentified_medications": unidentified, "fetch_count": min(len(pending), CONTEXT_READ_CAP)},
            )
        return read
