"""Prometheus metrics (``GET /metrics``), with ``prometheus_client``.

What is measured, and the only label values that can ever appear (so no patient data can reach a label,
and the number of series stays bounded):

* ``cmv_cds_http_requests_total{method, route, service_id, status}``: every answered request. ``route`` is
  the Flask route template (``/cds-services/<service:service_id>``; ``unmatched`` for a 404 on no route), never
  the path itself; ``service_id`` is a hosted service id or empty (an unknown id is not echoed); ``method``
  is a standard HTTP method or ``other``.
* ``cmv_cds_http_request_duration_seconds{method, route}``: latency, as the app measures it.
* ``cmv_cds_cards_total{service_id, rule_id, indicator}``: cards returned (rule ids are the service's own).
* ``cmv_cds_fhir_fetch_duration_seconds{prefetch_key}``: each fetch of one prefetch key from the client's
  FHIR server (all pages of a search), successful or not. Prefetch keys are the service's own templates.
* ``cmv_cds_fhir_fetch_errors_total{prefetch_key, kind}``: failed fetches, ``kind`` from ``FETCH_ERROR_KINDS``.
* ``cmv_cds_audit_rows_total{outcome}``, ``cmv_cds_audit_write_retries_total``, ``cmv_cds_audit_spool_bytes``: the
  issued-card audit trail (service.audit_log), ``outcome`` from ``AUDIT_OUTCOMES``.

Processes: gunicorn runs several workers, each with its own memory. When ``PROMETHEUS_MULTIPROC_DIR`` is set
before ``prometheus_client`` is first imported (``service.gunicorn_conf.on_starting`` sets it in the master,
before any worker is forked), every worker writes its values to files in that directory and ``/metrics``
adds them up across workers, whichever worker answers the scrape (prometheus_client's multiprocess mode).
Otherwise (one process: tests, ``flask run``) the values live in this process's registry, which also
carries the standard ``process_*`` and ``python_*`` metrics.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import requests
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
    multiprocess,
    values,
)

from service.fhir_client import FhirFetchError

# True when metric values are kept in PROMETHEUS_MULTIPROC_DIR files (decided by prometheus_client at import).
MULTIPROCESS = values.ValueClass is not values.MutexValue

REGISTRY = CollectorRegistry(auto_describe=True)
if not MULTIPROCESS:
    ProcessCollector(registry=REGISTRY)
    PlatformCollector(registry=REGISTRY)

_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"})
# Latency buckets in seconds: a hook answered from prefetch takes milliseconds; FHIR fetching is bounded by
# CMV_CDS_FHIR_DEADLINE_SECONDS (8 s by default) and gunicorn's worker timeout (30 s).
_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)

REQUESTS = Counter(
    "cmv_cds_http_requests",
    "HTTP requests answered, by method, route template, CDS service id (empty if none) and status code.",
    ["method", "route", "service_id", "status"],
    registry=REGISTRY,
)
REQUEST_DURATION = Histogram(
    "cmv_cds_http_request_duration_seconds",
    "Time to answer an HTTP request, by method and route template.",
    ["method", "route"],
    buckets=_BUCKETS,
    registry=REGISTRY,
)
CARDS = Counter(
    "cmv_cds_cards",
    "CDS Hooks cards returned, by service id, rule id (the card's topic code) and indicator.",
    ["service_id", "rule_id", "indicator"],
    registry=REGISTRY,
)
FHIR_FETCH_DURATION = Histogram(
    "cmv_cds_fhir_fetch_duration_seconds",
    "Time to fetch one prefetch key from the client's FHIR server (all pages), successful or not.",
    ["prefetch_key"],
    buckets=_BUCKETS,
    registry=REGISTRY,
)
FHIR_FETCH_ERRORS = Counter(
    "cmv_cds_fhir_fetch_errors",
    "Failed fetches of a prefetch key from the client's FHIR server, by prefetch key and kind of failure.",
    ["prefetch_key", "kind"],
    registry=REGISTRY,
)

# What happened to issued-card audit rows (service.audit_log; label values of cmv_cds_audit_rows_total).
AUDIT_OUTCOMES = (
    "written",  # inserted by the background writer
    "spilled",  # an insert failed: kept on disk for a retry
    "replayed",  # inserted from the spool after a failure or a process death
    "dropped",  # lost: spool full, memory queue full, or refused by the database as invalid
)
AUDIT_ROWS = Counter(
    "cmv_cds_audit_rows",
    "Issued-card audit rows by what happened to them: written, spilled (kept on disk after a failed insert), "
    "replayed (inserted from disk later) or dropped (lost).",
    ["outcome"],
    registry=REGISTRY,
)
AUDIT_RETRIES = Counter(
    "cmv_cds_audit_write_retries",
    "Failed database writes of issued-card rows, each retried after a back-off.",
    registry=REGISTRY,
)
AUDIT_SPOOL_BYTES = Gauge(
    "cmv_cds_audit_spool_bytes",
    "Issued-card rows waiting on disk for the database (bytes of spool segments left by failed writes).",
    registry=REGISTRY,
    multiprocess_mode="livemax",  # every worker sees the same spool directory
)

# The kinds of FHIR fetch failure (label values of cmv_cds_fhir_fetch_errors_total).
FETCH_ERROR_KINDS = (
    "timeout",  # no answer within CMV_CDS_FHIR_TIMEOUT_SECONDS
    "connection",  # refused, reset, DNS, TLS
    "transport",  # any other requests error
    "deadline",  # the request's CMV_CDS_FHIR_DEADLINE_SECONDS budget ran out
    "http_4xx",
    "http_5xx",
    "http_other",
    "too_large",  # over CMV_CDS_FHIR_MAX_RESPONSE_BYTES
    "too_many_pages",  # over CMV_CDS_FHIR_MAX_PAGES
    "foreign_link",  # a paging link outside the FHIR server's base URL
    "operation_outcome",
    "invalid_response",  # not JSON, not a FHIR resource, a search that is not a Bundle
    "other",
)
_HTTP_STATUS = re.compile(r"\bHTTP (\d)\d\d\b")
# FhirFetchError messages (service.fhir_client) → kind; the first match wins.
_MESSAGE_KINDS = (
    ("deadline", "deadline"),
    ("larger than", "too_large"),
    ("pages", "too_many_pages"),
    ("outside its own base", "foreign_link"),
    ("404 to a search", "http_4xx"),
    ("OperationOutcome", "operation_outcome"),
    ("not JSON", "invalid_response"),
    ("not a FHIR resource", "invalid_response"),
    ("not return a Bundle", "invalid_response"),
    ("unreachable", "transport"),  # normally classified by its cause (above)
)


def method_label(method: str) -> str:
    """An HTTP method as a bounded label value."""
    return method if method in _METHODS else "other"


# The labelled children of each label combination seen, so a request costs a dict lookup instead of
# prometheus_client's label validation, lock and lookup in ``labels()`` (the values are the same objects
# ``labels()`` returns; in multiprocess mode each re-opens its file when the process id changes, so they
# survive a fork). The label values are the service's own vocabulary, so these stay small; the cap only
# guards against a mistake.
_MAX_CACHED_CHILDREN = 4096
_request_children: dict[tuple[str, str, str | None, int], tuple[Any, Any]] = {}
_card_children: dict[tuple[str, str, str], Any] = {}


def observe_request(method: str, route: str, service_id: str | None, status: int, seconds: float) -> None:
    """Count one answered request and its latency (called once per request, from the app's after_request)."""
    method = method_label(method)
    key = (method, route, service_id, status)
    children = _request_children.get(key)
    if children is None:
        children = (
            REQUESTS.labels(method, route, service_id or "", str(status)),
            REQUEST_DURATION.labels(method, route),
        )
        if len(_request_children) < _MAX_CACHED_CHILDREN:
            _request_children[key] = children
    children[0].inc()
    children[1].observe(max(seconds, 0.0))


def count_cards(service_id: str, cards: Iterable[tuple[str, str]]) -> None:
    """Count returned cards, given as (rule id, indicator) pairs."""
    for rule_id, indicator in cards:
        key = (service_id, rule_id, indicator)
        child = _card_children.get(key)
        if child is None:
            child = CARDS.labels(service_id, rule_id, indicator)
            if len(_card_children) < _MAX_CACHED_CHILDREN:
                _card_children[key] = child
        child.inc()


@contextmanager
def fhir_fetch_timer(prefetch_key: str) -> Iterator[None]:
    """Observe the duration of the fetch inside the block, whether it succeeds or raises."""
    started = time.perf_counter()
    try:
        yield
    finally:
        FHIR_FETCH_DURATION.labels(prefetch_key).observe(time.perf_counter() - started)


def count_fhir_fetch_error(prefetch_key: str, error: FhirFetchError) -> None:
    """Count one failed FHIR fetch by prefetch key and kind."""
    FHIR_FETCH_ERRORS.labels(prefetch_key, fetch_error_kind(error)).inc()


def fetch_error_kind(error: FhirFetchError) -> str:
    """One of ``FETCH_ERROR_KINDS`` for a FhirFetchError (its cause, else its fixed message wording)."""
    cause = error.__cause__
    if isinstance(cause, requests.Timeout):
        return "timeout"
    if isinstance(cause, requests.ConnectionError):
        return "connection"
    if isinstance(cause, requests.RequestException):
        return "transport"
    message = str(error)
    status = _HTTP_STATUS.search(message)
    if status:
        return {"4": "http_4xx", "5": "http_5xx"}.get(status.group(1), "http_other")
    return next((kind for fragment, kind in _MESSAGE_KINDS if fragment in message), "other")


def count_audit_rows(outcome: str, count: int) -> None:
    """Count issued-card audit rows by outcome (one of ``AUDIT_OUTCOMES``)."""
    if count:
        AUDIT_ROWS.labels(outcome).inc(count)


def count_audit_retry() -> None:
    """Count one retried audit write."""
    AUDIT_RETRIES.inc()


def set_audit_spool_bytes(size: int) -> None:
    """Record the size of the audit spool file."""
    AUDIT_SPOOL_BYTES.set(size)


def exposition() -> tuple[bytes, str]:
    """The metrics in the Prometheus text format, and their content type.

    In multiprocess mode a fresh registry reads every worker's files on each scrape (as prometheus_client
    documents); otherwise this process's registry is rendered.
    """
    if MULTIPROCESS:
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        return generate_latest(registry), CONTENT_TYPE_LATEST
    return generate_latest(REGISTRY), CONTENT_TYPE_LATEST


__all__ = [
    "AUDIT_OUTCOMES",
    "FETCH_ERROR_KINDS",
    "MULTIPROCESS",
    "count_audit_retry",
    "count_audit_rows",
    "count_cards",
    "count_fhir_fetch_error",
    "exposition",
    "fetch_error_kind",
    "fhir_fetch_timer",
    "observe_request",
    "set_audit_spool_bytes",
]
