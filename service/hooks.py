"""One CDS Hooks call, from raw body to cards: validate, resolve prefetch, run the clinical rules."""

from __future__ import annotations

import datetime as dt
import logging
import re
from collections.abc import Mapping
from typing import Any

import orjson

from cards.engine import ClinicalOptions, HookRequest, evaluate, selects_cmv_antiviral
from cards.fhir_in import concept_memo
from cards.model import Card
from service import prefetch
from service.config import Settings
from service.draft_orders import split_draft_orders
from service.errors import InvalidRequest
from service.fhir_client import FetchBudget, FhirAccessPolicy
from service.medication_refs import MedicationResolver
from service.registry import ServiceDefinition
from service.validation import validate

# orjson refuses documents nested deeper than this (its recursion limit; no CDS Hooks request comes close).
MAX_JSON_DEPTH = 1024

log = logging.getLogger("cmv_cds.hooks")

# The top-level ``extension`` object (CDS Hooks 2.0.1 "Extensions"; Epic sends its version, trigger and
# criteria record there) is kept and logged by key only: its values are the client's and may identify people.
_EXTENSION_KEY = re.compile(r"[A-Za-z0-9._-]{1,128}")
_MAX_LOGGED_EXTENSION_KEYS = 20


def parse_json_object(raw: bytes) -> dict[str, Any]:
    """Decode a request body that must be a JSON object; 400 otherwise."""
    if not raw:
        raise InvalidRequest("request body is empty; expected a JSON object")
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        if exc.msg.startswith("depth limit"):  # orjson's fixed nesting limit: valid JSON, but not readable here
            raise InvalidRequest(
                f"request body is nested too deeply: JSON arrays and objects may be nested at most "
                f"{MAX_JSON_DEPTH} levels deep"
            ) from None
        raise InvalidRequest("request body is not valid JSON (UTF-8)") from None
    if not isinstance(body, dict):
        raise InvalidRequest("request body must be a JSON object")
    return body


def validate_request(service: ServiceDefinition, body: Mapping[str, Any]) -> None:
    """Envelope schema, hook match, then the hook's context schema."""
    validate(body, "request.schema.json")
    if body["hook"] != service.hook:
        raise InvalidRequest(
            f"hook '{body['hook']}' does not match service '{service.id}', which handles '{service.hook}'",
            expression="hook",
        )
    validate(body["context"], service.context_schema, prefix="context")


def run_hook(
    service: ServiceDefinition,
    body: Mapping[str, Any],
    settings: Settings,
    access: FhirAccessPolicy,
    today: dt.date | None = None,
) -> list[Card]:
    """Cards for a validated request. No CMV antiviral selected → no cards, and no data is fetched."""
    # One concept-matching memo for the whole call: the selected drafts are classified here and again
    # by the rules (cards.fhir_in.concept_memo).
    with concept_memo():
        return _run_hook(service, body, settings, access, today)


def _run_hook(
    service: ServiceDefinition,
    body: Mapping[str, Any],
    settings: Settings,
    access: FhirAccessPolicy,
    today: dt.date | None,
) -> list[Card]:
    context = body["context"]
    _log_extension(body)
    drafts = split_draft_orders(context, all_selected=service.checks_all_draft_orders)
    # One FHIR budget for every read of the call: Medication reads and prefetch fetches share it.
    budget = FetchBudget(settings.fhir_deadline_seconds)
    try:
        medications = MedicationResolver(
            body, lambda: prefetch.fhir_server_or_reason(body, settings, access, budget), settings.fhir_max_workers
        )
        selected = medications.selected(drafts.selected, drafts.selected_paths)
        if not selects_cmv_antiviral(selected):
            return []
        data = prefetch.resolve(list(service.prefetch), body, settings, access, budget=budget)
        fetched = [resource for key in sorted(data) for resource in data[key]]
        context_data = medications.context([*drafts.others, *fetched])
    finally:
        budget.close()
    request = HookRequest(
        hook=service.hook,
        patient_id=context["patientId"],
        today=today or dt.date.today(),
        selected_orders=selected,
        other_draft_orders=tuple(context_data[: len(drafts.others)]),
        resources=tuple(context_data[len(drafts.others) :]),
    )
    options = ClinicalOptions(
        dosing_weight=settings.dosing_weight, high_viral_load_iu_ml=settings.high_viral_load_iu_ml
    )
    return medications.keep_client_medication(evaluate(request, options))


def _log_extension(body: Mapping[str, Any]) -> None:
    extension = body.get("extension")
    if isinstance(extension, dict) and extension:
        keys = sorted(key for key in extension if _EXTENSION_KEY.fullmatch(key))[:_MAX_LOGGED_EXTENSION_KEYS]
        log.info("request extension", extra={"extension_keys": keys})
