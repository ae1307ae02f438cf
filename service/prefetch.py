"""Prefetch semantics of CDS Hooks 2.0.1 ("Providing FHIR Resources to a CDS Service").

For each template the service declared:
- key present with data → used (a paginated Bundle's further pages are fetched from ``fhirServer``);
- key present with ``null`` → no data; never re-queried;
- key absent, or holding an OperationOutcome → fetched from ``fhirServer`` with the bearer token;
- data that cannot be obtained → ``PreconditionFailed`` (HTTP 412).
Fetches for one request run in parallel, all within one budget (``CMV_CDS_FHIR_DEADLINE_SECONDS``,
``service.fhir_client.FetchBudget``) that the pool is awaited with too.

**An expired budget is a 412, never cards from what arrived.** Every prefetch key feeds a safety rule: the
conditions hold dialysis, pregnancy and CNS disease (which change the drug and the dose), the medications the
interactions and the nephrotoxic drugs (which contraindicate cidofovir), the observations the weight, renal
function and blood counts every dose depends on. Without one of them a card would look complete while it is not
(a creatinine-clearance dose for a patient on dialysis), so the call answers 412 naming the keys that did not
arrive in time, and the EHR shows no card rather than a wrong one.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Mapping
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

from service import metrics
from service.bundles import bundle_resources, next_link
from service.config import Settings
from service.errors import InvalidRequest, PreconditionFailed
from service.fetch_pool import run_within_budget
from service.fhir_client import (
    FetchBudget,
    FhirAccessPolicy,
    FhirDeadlineExceeded,
    FhirFetchError,
    FhirServer,
    fhir_session,
)

log = logging.getLogger("cmv_cds.prefetch")

_TOKEN = re.compile(r"\{\{\s*([A-Za-z.]+)\s*\}\}")
_USER_TOKENS = {
    "userPractitionerId": "Practitioner",
    "userPractitionerRoleId": "PractitionerRole",
    "userPatientId": "Patient",
    "userRelatedPersonId": "RelatedPerson",
}


@dataclass(frozen=True)
class PrefetchTemplate:
    """One declared prefetch key: a FHIR read (``Patient/{{...}}``) or search (``Type?...``)."""

    key: str
    query: str

    @property
    def resource_type(self) -> str:
        return self.query.split("?", 1)[0].split("/", 1)[0]  # up to the first "/" or "?"

    @property
    def is_read(self) -> bool:
        return "?" not in self.query and "/" in self.query


def render(template: str, context: Mapping[str, Any]) -> str:
    """Substitute ``{{context.X}}`` (root-level primitives only) and the spec's user tokens."""

    def substitute(match: re.Match[str]) -> str:
        token = match.group(1)
        if token.startswith("context."):
            value = context.get(token[len("context.") :])
            if isinstance(value, str | int) and not isinstance(value, bool):
                return str(value)
            raise PreconditionFailed(f"prefetch token {{{{{token}}}}} has no value in this request")
        if token in _USER_TOKENS:
            kind, _, ident = str(context.get("userId", "")).partition("/")
            if kind == _USER_TOKENS[token] and ident:
                return ident
            raise PreconditionFailed(f"prefetch token {{{{{token}}}}} does not apply to this user")
        raise PreconditionFailed(f"unsupported prefetch token {{{{{token}}}}}")

    return _TOKEN.sub(substitute, template)


def _is_operation_outcome(value: Any) -> bool:
    return isinstance(value, dict) and value.get("resourceType") == "OperationOutcome"


def _from_prefetch(template: PrefetchTemplate, value: dict[str, Any]) -> tuple[list[dict[str, Any]], str | None]:
    """Resources held by a satisfied key, and the next-page URL if the Bundle is paginated."""
    kind = value.get("resourceType")
    if template.is_read:
        if kind != template.resource_type:
            raise InvalidRequest(
                f"prefetch.{template.key} must be a {template.resource_type} resource",
                expression=f"prefetch.{template.key}",
            )
        return [value], None
    if kind != "Bundle":
        raise InvalidRequest(f"prefetch.{template.key} must be a Bundle", expression=f"prefetch.{template.key}")
    return bundle_resources(value), next_link(value)


def resolve(
    templates: list[PrefetchTemplate],
    body: Mapping[str, Any],
    settings: Settings,
    access: FhirAccessPolicy,
    budget: FetchBudget | None = None,
) -> dict[str, list[dict[str, Any]]]:
    """Return, for every template key, the resources it yields (possibly an empty list).

    ``budget``: the hook call's FHIR budget, when the caller reads more from the FHIR server after this (it then
    closes the budget itself); by default one of ``CMV_CDS_FHIR_DEADLINE_SECONDS`` for these fetches alone."""
    context: Mapping[str, Any] = body["context"]
    prefetch: Mapping[str, Any] = body.get("prefetch") or {}
    results: dict[str, list[dict[str, Any]]] = {}
    to_fetch: list[tuple[PrefetchTemplate, str | None]] = []  # (template, next-page URL or None)

    for template in templates:
        if template.key in prefetch:
            value = prefetch[template.key]
            if value is None:
                results[template.key] = []  # "no data": do not re-query
                continue
            if _is_operation_outcome(value):
                to_fetch.append((template, None))
                continue
            resources, next_url = _from_prefetch(template, value)
            results[template.key] = resources
            if next_url:
                to_fetch.append((template, next_url))
        else:
            to_fetch.append((template, None))

    if not to_fetch:
        return results

    own_budget = budget is None
    budget = FetchBudget(settings.fhir_deadline_seconds) if budget is None else budget
    try:
        server = _server_for(body, settings, [t.key for t, _ in to_fetch], access, budget)
        fetched = _fetch_all(server, to_fetch, context, results, settings.fhir_max_workers)
    finally:
        if own_budget:
            budget.close()
    results.update(fetched)
    return results


def _fetch_all(
    server: FhirServer,
    to_fetch: list[tuple[PrefetchTemplate, str | None]],
    context: Mapping[str, Any],
    prefetched: Mapping[str, list[dict[str, Any]]],
    max_workers: int,
) -> dict[str, list[dict[str, Any]]]:
    """Fetch every key in parallel, awaited no longer than the budget; 412 when any key cannot be obtained."""
    started = time.monotonic()

    def fetch(item: tuple[PrefetchTemplate, str | None]) -> list[dict[str, Any]]:
        template, next_url = item
        with metrics.fhir_fetch_timer(template.key):
            try:
                if next_url is not None:
                    # Further pages of a paginated prefetch Bundle (links are checked to stay on fhirServer).
                    return prefetched.get(template.key, []) + server.search(next_url, session)
                query = server.url_for(render(template.query, context))
                if template.is_read:
                    resource = server.get_json(query, session)
                    return [] if resource is None else [resource]
                return server.search(query, session)
            except FhirFetchError as exc:
                metrics.count_fhir_fetch_error(template.key, exc)
                log.warning("prefetch fetch failed", extra={"prefetch_key": template.key, "reason": str(exc)})
                raise

    with fhir_session(max_workers) as session:  # one for the call's fetch threads (service.fhir_client.fhir_session)
        futures = run_within_budget(fetch, to_fetch, max_workers, server.budget)

    fetched: dict[str, list[dict[str, Any]]] = {}
    late: list[str] = []
    failure: tuple[str, FhirFetchError] | None = None
    for (template, _), future in zip(to_fetch, futures, strict=True):
        error = _outcome(future)
        if error is None:
            fetched[template.key] = future.result()
        elif isinstance(error, FhirDeadlineExceeded):
            late.append(template.key)
            if future.cancelled():  # never started; one still running counts itself when its read is ended
                metrics.count_fhir_fetch_error(template.key, error)
        elif failure is None:
            failure = (template.key, error)
    if late:
        raise PreconditionFailed(
            f"fhirServer did not answer within the request's budget of {server.budget.seconds:g} s "
            f"(CMV_CDS_FHIR_DEADLINE_SECONDS); not obtained: {', '.join(sorted(late))}",
            expression="prefetch." + sorted(late)[0],
        )
    if failure is not None:
        key, error = failure
        raise PreconditionFailed(
            f"could not obtain prefetch '{key}' from fhirServer: {error}", expression=f"prefetch.{key}"
        ) from error
    log.info(
        "prefetch fetched from fhirServer",
        extra={"fetch_count": len(to_fetch), "latency_ms": round((time.monotonic() - started) * 1000, 1)},
    )
    return fetched


def _outcome(future: Future[list[dict[str, Any]]]) -> FhirFetchError | None:
    """The fetch error of a finished fetch; a deadline error for one still running (or never started)."""
    if not future.done() or future.cancelled():
        return FhirDeadlineExceeded()
    error = future.exception()
    if error is None:
        return None
    if isinstance(error, FhirFetchError):
        return error
    raise error


def _server_for(
    body: Mapping[str, Any], settings: Settings, keys: list[str], access: FhirAccessPolicy, budget: FetchBudget
) -> FhirServer:
    base = body.get("fhirServer")
    if not isinstance(base, str) or not base:
        raise PreconditionFailed(
            "prefetch incomplete and no fhirServer to fetch from: " + ", ".join(sorted(keys)),
            expression="prefetch",
        )
    refusal = access.refusal(base)
    if refusal is not None:
        log.warning("fhirServer refused", extra={"reason": refusal})
        raise PreconditionFailed(f"{refusal}; it was not contacted", expression="fhirServer")
    auth = body.get("fhirAuthorization")
    token = auth.get("access_token") if isinstance(auth, dict) else None
    return FhirServer(
        base_url=base,
        access_token=token if isinstance(token, str) else None,
        timeout_seconds=settings.fhir_timeout_seconds,
        max_response_bytes=settings.fhir_max_response_bytes,
        max_pages=settings.fhir_max_pages,
        budget=budget,
    )


def fhir_server_or_reason(
    body: Mapping[str, Any], settings: Settings, access: FhirAccessPolicy, budget: FetchBudget
) -> FhirServer | str:
    """The request's fhirServer for reads outside the prefetch templates (Medication reads,
    ``service.medication_refs``), within the hook call's ``budget``, or why it may not be contacted; never
    raises."""
    try:
        return _server_for(body, settings, ["medication"], access, budget)
    except PreconditionFailed as refused:
        return "no fhirServer to read it from" if refused.expression == "prefetch" else refused.message
