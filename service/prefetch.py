"""Prefetch semantics of CDS Hooks 2.0.1 ("Providing FHIR Resources to a CDS Service").

For each template the service declared:
- key present with data → used (a paginated Bundle's further pages are fetched from ``fhirServer``);
- key present with ``null`` → no data; never re-queried;
- key absent, or holding an OperationOutcome → fetched from ``fhirServer`` with the bearer token;
- data that cannot be obtained → ``PreconditionFailed`` (HTTP 412).
Fetches for one request run in parallel.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import requests

from service import metrics
from service.config import Settings
from service.errors import InvalidRequest, PreconditionFailed
from service.fhir_client import FhirAccessPolicy, FhirFetchError, FhirServer, bundle_resources, next_link

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
        return re.split(r"[/?]", self.query, maxsplit=1)[0]

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
) -> dict[str, list[dict[str, Any]]]:
    """Return, for every template key, the resources it yields (possibly an empty list)."""
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

    server = _server_for(body, settings, [t.key for t, _ in to_fetch], access)
    started = time.monotonic()

    def fetch(item: tuple[PrefetchTemplate, str | None]) -> tuple[str, list[dict[str, Any]]]:
        template, next_url = item
        with requests.Session() as session, metrics.fhir_fetch_timer(template.key):
            try:
                if next_url is not None:
                    # Further pages of a paginated prefetch Bundle (links are checked to stay on fhirServer).
                    return template.key, results.get(template.key, []) + server.search(next_url, session)
                query = server.url_for(render(template.query, context))
                if template.is_read:
                    resource = server.get_json(query, session)
                    return template.key, [] if resource is None else [resource]
                return template.key, server.search(query, session)
            except FhirFetchError as exc:
                metrics.count_fhir_fetch_error(template.key, exc)
                log.warning("prefetch fetch failed", extra={"prefetch_key": template.key, "reason": str(exc)})
                raise PreconditionFailed(
                    f"could not obtain prefetch '{template.key}' from fhirServer: {exc}",
                    expression=f"prefetch.{template.key}",
                ) from exc

    if len(to_fetch) == 1:
        fetched = [fetch(to_fetch[0])]
    else:
        with ThreadPoolExecutor(max_workers=min(settings.fhir_max_workers, len(to_fetch))) as pool:
            fetched = list(pool.map(fetch, to_fetch))
    for key, resources in fetched:
        results[key] = resources
    log.info(
        "prefetch fetched from fhirServer",
        extra={"fetch_count": len(to_fetch), "latency_ms": round((time.monotonic() - started) * 1000, 1)},
    )
    return results


def _server_for(body: Mapping[str, Any], settings: Settings, keys: list[str], access: FhirAccessPolicy) -> FhirServer:
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
        deadline=time.monotonic() + settings.fhir_deadline_seconds,
    )


def fhir_server_or_reason(body: Mapping[str, Any], settings: Settings, access: FhirAccessPolicy) -> FhirServer | str:
    """The request's fhirServer for reads outside the prefetch templates (Medication reads,
    ``service.medication_refs``), or why it may not be contacted; never raises."""
    try:
        return _server_for(body, settings, ["medication"], access)
    except PreconditionFailed as refused:
        return "no fhirServer to read it from" if refused.expression == "prefetch" else refused.message
