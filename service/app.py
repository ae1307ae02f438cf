"""Flask application factory for the CMV antiviral CDS Hooks service."""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Mapping
from typing import Any

from flask import Flask, Request, Response, current_app, g, request
from werkzeug.exceptions import RequestEntityTooLarge
from werkzeug.routing import BaseConverter

from cards.model import new_uuid
from cards.profiles import shape
from service import lifecycle, metrics
from service.auth import Authenticator, NoTrustedIssuers, build_authenticator, load_trusted_issuers
from service.client_profiles import ClientProfiles
from service.config import Settings
from service.errors import (
    NotFound,
    PayloadTooLarge,
    UnsupportedMediaType,
    json_response,
    operation_outcome,
    register_error_handlers,
)
from service.feedback import read_feedback
from service.fhir_client import FhirAccessPolicy
from service.hooks import parse_json_object, run_hook, validate_request
from service.logs import configure_logging, log_request
from service.openapi import openapi_document
from service.preview import is_preview_path, preview_blueprint
from service.registry import SERVICES, ServiceDefinition, discovery_document
from service.report import check_service_id, parse_since, report_json
from service.store import FeedbackStore, IssuedCard
from service.validation import validate

log = logging.getLogger("cmv_cds.app")

_REQUEST_ID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
# Probes for orchestrators: no JWT, no patient data in or out. The OpenAPI document describes the
# interface only: it is static and contains no patient data.
_UNAUTHENTICATED_PATHS = frozenset({"/healthz", "/readyz", "/openapi.json"})
_DATABASE_NOT_READY = {
    "unavailable": "feedback database unreachable",
    "schema-missing": "feedback database schema missing and not creatable here: run `cmv-cds migrate`",
}


def create_app(config: Mapping[str, Any] | None = None) -> Flask:
    """Build the app. ``config`` overrides ``CMV_CDS_*`` environment variables (see README)."""
    settings = Settings.load(config)
    configure_logging(settings.log_level)

    app = Flask("cmv_cds")
    app.config["MAX_CONTENT_LENGTH"] = settings.max_body_bytes
    app.url_map.converters["service"] = _ServiceIdConverter
    # No database connection at boot: a worker starts (and serves hook calls) while the database is down. The
    # schema comes from `cmv-cds migrate`, or is created on first use (service.store).
    store = FeedbackStore(
        settings.database_url, settings.spool_dir or None, settings.spool_max_bytes, create_schema_on_use=True
    )
    store.start_background_writer()
    authenticator: Authenticator = build_authenticator(settings, store.engine)
    issuer_fhir_servers = {
        iss: issuer.fhir_servers
        for iss, issuer in load_trusted_issuers(settings.trusted_issuers).items()
        if issuer.fhir_servers is not None
    }
    profiles = ClientProfiles(settings)
    fhir_server_prefixes = settings.fhir_server_prefixes  # parsed from CMV_CDS_FHIR_SERVER_ALLOWLIST once
    app.extensions["cmv_cds"] = {"settings": settings, "store": store, "authenticator": authenticator}
    register_error_handlers(app)
    if settings.preview_active:  # CMV_CDS_PREVIEW_ENABLED; otherwise /preview is a 404
        app.register_blueprint(preview_blueprint(settings))

    if settings.require_auth and isinstance(authenticator, NoTrustedIssuers):
        log.warning(
            "AUTHENTICATION ON WITH NO TRUSTED ISSUERS: CMV_CDS_TRUSTED_ISSUERS is empty, so every call that "
            "needs a client JWT is refused (401). List the CDS clients (EHRs) to trust in CMV_CDS_TRUSTED_ISSUERS "
            "(README, Security; `cmv-cds token` makes a local one to try), or set CMV_CDS_REQUIRE_AUTH=false "
            "for local development only.",
            extra={"setting": "CMV_CDS_TRUSTED_ISSUERS"},
        )
    if not settings.require_auth:
        log.warning(
            "AUTHENTICATION DISABLED: CMV_CDS_REQUIRE_AUTH=false; any caller can invoke the services. "
            "Use only for local development.",
            extra={"setting": "CMV_CDS_REQUIRE_AUTH"},
        )

    # GET /metrics needs a JWT like every other endpoint unless CMV_CDS_METRICS_PUBLIC=true (service.metrics).
    open_paths = _UNAUTHENTICATED_PATHS | ({"/metrics"} if settings.metrics_public else set())

    # The edge of every request, in two hooks. The request and the app-context globals are looked up once per
    # hook (each access through Flask's context proxies costs a context-variable lookup), and only the work
    # the configuration asks for is registered: the token check with auth on, CORS headers with origins set.
    cors_origins = frozenset(o.strip() for o in settings.cors_origins.split(",") if o.strip())

    def _begin() -> tuple[Request, Any]:
        req: Request = current(request)
        state = current(g)
        state.started = time.perf_counter()
        supplied = req.headers.get("X-Request-ID")
        state.request_id = supplied if supplied is not None and _REQUEST_ID.match(supplied) else new_uuid()
        return req, state

    if settings.require_auth:

        @app.before_request
        def _start_and_authenticate() -> None:
            req, state = _begin()
            path = req.path
            # Open paths, CORS preflights (no Authorization header by design: Fetch standard) and the preview
            # page (the hook call it makes is checked: service.preview) need no token; they reveal nothing.
            if path in open_paths or req.method == "OPTIONS" or is_preview_path(path):
                return
            state.issuer = authenticator.authenticate(req.headers.get("Authorization"), _endpoint_url(settings, req))

    else:

        @app.before_request
        def _start() -> None:
            _begin()

    if cors_origins:

        @app.after_request
        def _cors(response: Response) -> Response:
            _add_cors_headers(current(request), response, cors_origins)
            return response

    @app.after_request
    def _finish(response: Response) -> Response:
        req: Request = current(request)
        state = vars(current(g))
        request_id = state.get("request_id", "")
        headers = response.headers
        headers["X-Request-ID"] = request_id
        headers["Cache-Control"] = "no-store"
        rule = req.url_rule
        route = rule.rule if rule is not None else "unmatched"
        now = time.perf_counter()
        seconds = now - state.get("started", now)
        service_id = state.get("service_id")
        log_request(
            {
                "request_id": request_id or None,
                "method": req.method,
                "path": route,
                "service_id": service_id,
                "hook_instance": state.get("hook_instance"),
                "status": response.status_code,
                "card_count": state.get("card_count"),
                "rules": state.get("rules"),
                "latency_ms": round(seconds * 1000, 2),
            }
        )
        metrics.observe_request(req.method, route, service_id, response.status_code, seconds)
        return response

    @app.get("/healthz")
    def healthz() -> Response:
        """Liveness: the process answers."""
        return json_response({"status": "ok"})

    @app.get("/openapi.json")
    def openapi() -> Response:
        """This service's OpenAPI 3.1 document (service/openapi.json, completed by service.openapi)."""
        return json_response(openapi_document())

    @app.get("/readyz")
    def readyz() -> Response:
        """Readiness: not draining for shutdown, and the database answers with its tables in place."""
        if lifecycle.is_draining():
            outcome = operation_outcome("shutting down: answering queued connections only", issue_code="transient")
            return json_response(outcome, status=503)
        database = store.readiness()
        if database != "ok":
            message = _DATABASE_NOT_READY[database]
            return json_response(operation_outcome(message, issue_code="transient"), status=503)
        return json_response({"status": "ready", "database": "ok"})

    @app.get("/cds-services")
    def discovery() -> Response:
        return json_response(discovery_document())

    @app.get("/metrics")
    def prometheus_metrics() -> Response:
        """Prometheus metrics (service.metrics): no patient data in any label."""
        body, content_type = metrics.exposition()
        return Response(body, content_type=content_type)

    @app.get("/cds-services/report")
    def governance_report() -> Response:
        """CDS governance report (service.report): per rule, cards shown, accepted, overridden and why."""
        service_id = request.args.get("service")
        service_id = check_service_id(service_id) if service_id is not None else None
        since = request.args.get("since")
        since_at = parse_since(since) if since is not None else None
        return json_response(report_json(store.report(service_id, since_at), service_id, since_at))

    @app.post("/cds-services/<service:service_id>")
    def call_service(service_id: str) -> Response:
        # The request and the app-context globals looked up once (see _begin above).
        state = current(g)
        service = _service(service_id, state)
        body = parse_json_object(_json_body(current(request)))
        validate_request(service, body)
        state.hook_instance = body["hookInstance"]
        issuer = state.get("issuer")
        access = FhirAccessPolicy(
            prefixes=issuer_fhir_servers.get(issuer or "", fhir_server_prefixes),
            auth_required=settings.require_auth,
        )
        # Shaped for what the calling client can apply (cards.profiles); issued cards are recorded as answered.
        cards = shape(run_hook(service, body, settings, access), profiles.for_issuer(issuer))
        rendered = [card.to_json() for card in cards]
        # Written behind by a background thread (service.store): the answer does not wait for the database.
        store.record_cards_later(
            service.id,
            body["hookInstance"],
            [
                IssuedCard(card.uuid, card.rule_id, card.indicator, tuple(s.uuid for s in card.suggestions))
                for card in cards
            ],
        )
        state.card_count = len(cards)
        state.rules = [card.rule_id for card in cards]
        metrics.count_cards(service.id, [(card.rule_id, card.indicator) for card in cards])
        return json_response({"cards": rendered})

    @app.post("/cds-services/<service_id>/feedback")
    def feedback(service_id: str) -> Response:
        service = _service(service_id, current(g))
        body = parse_json_object(_json_body(current(request)))
        validate(body, "feedback.schema.json")
        result = store.store_feedback(service.id, read_feedback(body["feedback"]))  # Epic's form too
        log.info(
            "feedback stored",
            extra={
                "service_id": service.id,
                "feedback_count": result.stored,
                "unknown_cards": result.unknown_cards,
            },
        )
        return json_response({"stored": result.stored, "unknownCards": result.unknown_cards})

    return app


class _ServiceIdConverter(BaseConverter):
    """A path segment naming a CDS service: anything but ``report``, which is ``GET /cds-services/report``.
    So a POST to /cds-services/report is a 405 (Allow: GET) rather than a call of a service named "report"."""

    regex = r"(?!report$)[^/]+"
    part_isolating = True


def _service(service_id: str, state: Any) -> ServiceDefinition:
    """The service a path names (``state``: the request's ``g``, which records it for the log line); 404 if none."""
    state.service_id = service_id if service_id in SERVICES else None
    service = SERVICES.get(service_id)
    if service is None:
        raise NotFound(f"no CDS service with id '{service_id[:64]}'", expression="id")
    return service


def _add_cors_headers(req: Request, response: Response, allowed: frozenset[str]) -> None:
    """CORS for browser-based CDS clients (CDS Hooks 2.0.1 §CORS): only configured origins, no cookies."""
    origin = req.headers.get("Origin")
    if not origin or not allowed or ("*" not in allowed and origin not in allowed):
        return
    response.headers["Access-Control-Allow-Origin"] = "*" if "*" in allowed else origin
    response.headers["Vary"] = "Origin"
    response.headers["Access-Control-Allow-Headers"] = "Authorization, Content-Type"
    response.headers["Access-Control-Allow-Methods"] = "GET, POST, OPTIONS"
    response.headers["Access-Control-Expose-Headers"] = "X-Request-ID"
    response.headers["Access-Control-Max-Age"] = "600"


def _json_body(req: Request) -> bytes:
    """The raw body of a request that declares JSON (application/json or a +json type); 415 otherwise."""
    mimetype = req.mimetype
    if mimetype != "application/json" and not mimetype.endswith("+json"):
        raise UnsupportedMediaType(f"Content-Type must be application/json (got '{mimetype[:64] or 'none'}')")
    try:
        return req.get_data(cache=False)
    except RequestEntityTooLarge:
        limit = current_app.config["MAX_CONTENT_LENGTH"]
        raise PayloadTooLarge(
            f"request body larger than the service's limit of {limit} bytes (set by CMV_CDS_MAX_BODY_BYTES)"
        ) from None


def _endpoint_url(settings: Settings, req: Request) -> str:
    """The URL the client called, as it must appear in the JWT ``aud`` (public base URL behind a proxy)."""
    if settings.public_base_url:
        return settings.public_base_url.rstrip("/") + req.path
    return req.base_url


def current(proxy: Any) -> Any:
    """The object behind one of Flask's context proxies (``request``, ``g``), looked up once: werkzeug's
    documented ``LocalProxy._get_current_object``."""
    return proxy._get_current_object()
