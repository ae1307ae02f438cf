"""The OpenAPI 3.1 document (``GET /openapi.json``) is valid, complete and true to the running service.

Sections: the document itself (OpenAPI 3.1 validity via ``openapi-spec-validator``, the embedded
schemas are the repository's); coverage (every Flask route is documented and every documented
operation exists; every status the error edge can produce is documented); each status provoked for
real and its response checked against the document; schemathesis, in process over WSGI, generating
valid and invalid requests from the document and checking the answers conform to it.

Schemathesis never reaches a FHIR server: every call runs inside a ``responses.RequestsMock`` with no
registered URL, so a request that would fetch from its ``fhirServer`` gets a ConnectionError and the
service answers 412 (documented).
"""

from __future__ import annotations

import contextlib
import copy
import json
import re
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
import responses
import schemathesis
from fhir_fixtures import load, order_select, patient_resources, prefetch_for
from flask import Flask
from flask.testing import FlaskClient
from hypothesis import HealthCheck, Phase, settings
from jsonschema import Draft202012Validator
from openapi_spec_validator import OpenAPIV31SpecValidator, validate
from openapi_spec_validator.validation.exceptions import OpenAPIValidationError
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    positive_data_acceptance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
    unsupported_method,
)
from sqlalchemy.exc import OperationalError
from werkzeug.test import TestResponse

from service.app import create_app
from service.errors import CdsError
from service.openapi import OPENAPI_FILE, component_name, openapi_document, repository_schemas
from service.registry import SERVICES
from service.validation import SCHEMA_DIR, load_schema

SELECT_ID = "cmv-antiviral-order-select"
SIGN_ID = "cmv-antiviral-order-sign"
HTTP_METHODS = ("get", "put", "post", "delete", "options", "head", "patch", "trace")
# Flask adds HEAD (to GET routes) and OPTIONS (to all) by itself; they are not part of the interface.
IMPLICIT_METHODS = {"HEAD", "OPTIONS"}
DOC_URI = "urn:cmv-cds:openapi"
NOW = "2026-11-21T10:00:00Z"


# --------------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------------


def document() -> dict[str, Any]:
    """A private copy of the built document (the cached one must not be mutated)."""
    return copy.deepcopy(openapi_document())


def _schema_validator(schema: dict[str, Any], *, formats: bool = False) -> Draft202012Validator:
    """A validator for ``schema`` whose ``#/components/...`` refs resolve inside the document.

    ``formats``: also assert ``format`` (annotation only by default in JSON Schema 2020-12).
    """
    doc = openapi_document()
    registry: Registry[Any] = Registry().with_resource(DOC_URI, Resource.from_contents(doc, DRAFT202012))
    checker = Draft202012Validator.FORMAT_CHECKER if formats else None
    return Draft202012Validator(_anchored(schema), registry=registry, format_checker=checker)


def _anchored(schema: Any) -> Any:
    """``schema`` with its document-local refs (``#/components/...``) made absolute (``urn:...#/components/...``)."""
    if isinstance(schema, list):
        return [_anchored(item) for item in schema]
    if isinstance(schema, dict):
        return {
            key: (
                DOC_URI + value
                if key == "$ref" and isinstance(value, str) and value.startswith("#/")
                else _anchored(value)
            )
            for key, value in schema.items()
        }
    return schema


def _resolve(node: dict[str, Any]) -> dict[str, Any]:
    """Follow a document-local ``$ref`` (responses, parameters, headers)."""
    while "$ref" in node:
        target: Any = openapi_document()
        for part in node["$ref"].removeprefix("#/").split("/"):
            target = target[part]
        node = target
    return node


def documented_path(rule: str) -> str:
    """``/cds-services/<service_id>`` and ``/cds-services/{id}`` → ``/cds-services/{}``."""
    return re.sub(r"\{[^}]*\}", "{}", re.sub(r"<(?:[^:>]*:)?[^>]*>", "{}", rule))


def operations() -> Iterator[tuple[str, str, dict[str, Any]]]:
    for path, item in openapi_document()["paths"].items():
        for method, operation in item.items():
            if method in HTTP_METHODS:
                yield path, method, operation


def check_documented(method: str, path: str, response: TestResponse) -> dict[str, Any]:
    """``response`` is one the document promises for ``method path``: status, media type, body schema, headers."""
    operation = openapi_document()["paths"][path][method.lower()]
    status = str(response.status_code)
    assert status in operation["responses"], f"{method} {path}: status {status} is not documented"
    documented = _resolve(operation["responses"][status])
    assert response.mimetype in documented["content"], f"{method} {path} {status}: media type {response.mimetype}"
    body = response.get_json()
    schema = documented["content"][response.mimetype]["schema"]
    errors = sorted(_schema_validator(schema).iter_errors(body), key=str)
    assert not errors, f"{method} {path} {status}: body does not match the document: {errors[0].message}"
    for name, header in documented.get("headers", {}).items():
        header = _resolve(header)
        if header.get("required"):
            assert name in response.headers, f"{method} {path} {status}: header {name} missing"
            assert _schema_validator(header["schema"]).is_valid(response.headers[name])
    return dict(body)


def gcv_request(**extra: Any) -> dict[str, Any]:
    return order_select([load("draft-ganciclovir.json")], prefetch=prefetch_for(patient_resources()), **extra)


def make_app(directory: Path, **config: Any) -> Flask:
    return create_app({"require_auth": False, "database_url": f"sqlite:///{directory / 'openapi.sqlite3'}"} | config)


@pytest.fixture
def app(tmp_path: Path) -> Iterator[Flask]:
    application = make_app(tmp_path)
    yield application
    application.extensions["cmv_cds"]["store"].dispose()


@pytest.fixture
def client(app: Flask) -> FlaskClient:
    return app.test_client()


# --------------------------------------------------------------------------------------------------
# 1. The document
# --------------------------------------------------------------------------------------------------


def test_document_is_valid_openapi_3_1() -> None:
    doc = document()
    assert doc["openapi"].startswith("3.1.")
    validate(doc, cls=OpenAPIV31SpecValidator)  # bundled OAS 3.1 meta-schema: no network


def test_validator_rejects_a_broken_document() -> None:
    """Guard against a validator that accepts anything."""
    doc = document()
    del doc["info"]["version"]
    with pytest.raises(OpenAPIValidationError, match="version"):
        validate(doc, cls=OpenAPIV31SpecValidator)


def test_served_document_is_the_built_one_and_needs_no_auth(tmp_path: Path) -> None:
    app = make_app(tmp_path, require_auth=True)  # no trusted issuers: every authenticated call is refused
    try:
        client = app.test_client()
        response = client.get("/openapi.json")
        assert response.status_code == 200
        assert response.mimetype == "application/json"
        assert response.get_json() == json.loads(orjson.dumps(openapi_document()))
        check_documented("GET", "/openapi.json", response)
        assert client.get("/cds-services").status_code == 401
    finally:
        app.extensions["cmv_cds"]["store"].dispose()


def test_every_repository_schema_is_embedded_once() -> None:
    schemas = openapi_document()["components"]["schemas"]
    files = sorted(SCHEMA_DIR.glob("*.schema.json"))
    assert files
    for path in files:
        name = component_name(path.name)
        original = load_schema(path.name)
        embedded = schemas[name]
        assert not {"$id", "$schema", "$defs"} & set(embedded)
        # Same keywords as the file (refs rewritten, $defs hoisted into components of their own).
        assert set(embedded) == set(original) - {"$id", "$schema", "$defs"}
        for definition in original.get("$defs", {}):
            assert f"{name}{definition[:1].upper()}{definition[1:]}" in schemas
    assert repository_schemas().keys() <= schemas.keys()
    # openapi.json itself embeds none of them: they are only filled in by service/openapi.py.
    raw = json.loads(OPENAPI_FILE.read_text(encoding="utf-8"))
    assert not {component_name(path.name) for path in files} & set(raw["components"]["schemas"])


def test_every_ref_resolves() -> None:
    def refs(node: Any) -> Iterator[str]:
        if isinstance(node, dict):
            for key, value in node.items():
                if key == "$ref" and isinstance(value, str):
                    yield value
                else:
                    yield from refs(value)
        elif isinstance(node, list):
            for item in node:
                yield from refs(item)

    found = set(refs(openapi_document()))
    assert found
    for ref in found:
        assert ref.startswith("#/components/"), ref
        _resolve({"$ref": ref})


@pytest.mark.parametrize(
    ("schema_name", "instance", "valid"),
    [
        pytest.param("HookRequest", gcv_request(), True, id="order-select-request"),
        pytest.param("HookRequest", gcv_request(hook="order-sign"), True, id="order-sign-request"),
        pytest.param("HookRequest", gcv_request() | {"hook": "patient-view"}, False, id="unknown-hook"),
        pytest.param("HookRequest", gcv_request() | {"hookInstance": 42}, False, id="hookInstance-not-string"),
        pytest.param("HookRequest", {**gcv_request(), "context": {"patientId": "p"}}, False, id="context-incomplete"),
        pytest.param(
            "Feedback",
            {"feedback": [{"card": "c-1", "outcome": "overridden", "outcomeTimestamp": NOW}]},
            True,
            id="feedback",
        ),
        pytest.param(
            "Feedback",
            {"feedback": [{"card": "c-1", "outcome": "accepted", "outcomeTimestamp": NOW}]},
            False,
            id="accepted-without-suggestions",
        ),
    ],
)
def test_embedded_schemas_judge_like_the_service(schema_name: str, instance: Any, valid: bool) -> None:
    """The document's request schemas accept and reject what the repository schemas do."""
    assert _schema_validator({"$ref": f"#/components/schemas/{schema_name}"}).is_valid(instance) is valid


# --------------------------------------------------------------------------------------------------
# 2. Coverage: routes, methods, statuses, security
# --------------------------------------------------------------------------------------------------


def test_every_route_is_documented_with_its_methods_and_nothing_else(app: Flask) -> None:
    routes: dict[str, set[str]] = {}
    for rule in app.url_map.iter_rules():
        if rule.endpoint == "static":
            continue
        routes.setdefault(documented_path(rule.rule), set()).update((rule.methods or set()) - IMPLICIT_METHODS)
    documented: dict[str, set[str]] = {}
    for path, method, _operation in operations():
        documented.setdefault(documented_path(path), set()).add(method.upper())
    assert documented == routes


def test_service_id_enum_is_the_registry() -> None:
    assert openapi_document()["components"]["schemas"]["ServiceId"]["enum"] == sorted(SERVICES)
    branches = openapi_document()["components"]["schemas"]["HookRequest"]["allOf"][1]["anyOf"]
    assert {b["properties"]["hook"]["const"] for b in branches} == {s.hook for s in SERVICES.values()}


def _error_statuses() -> set[int]:
    """Every status the error edge (service/errors.py) can produce."""
    typed: set[int] = set()
    pending: list[type[CdsError]] = [CdsError]
    while pending:
        cls = pending.pop()
        typed.add(cls.status)
        pending.extend(cls.__subclasses__())
    # werkzeug's routing and body cap (404, 405, 413), the catch-all (500), and readiness (503).
    return typed | {404, 405, 413, 500, 503}


def test_every_error_status_is_documented() -> None:
    documented = {int(status) for _path, _method, op in operations() for status in op["responses"]}
    assert _error_statuses() <= documented
    assert {400, 401, 404, 405, 412, 413, 415, 500, 503} <= documented
    for _path, _method, operation in operations():
        for status, response in operation["responses"].items():
            if int(status) >= 400:
                schema = _resolve(response)["content"]["application/json"]["schema"]
                assert schema == {"$ref": "#/components/schemas/OperationOutcome"}, status


def test_per_operation_statuses_and_security() -> None:
    doc = openapi_document()
    assert doc["components"]["securitySchemes"]["cdsHooksJwt"] == doc["components"]["securitySchemes"][
        "cdsHooksJwt"
    ] | {"type": "http", "scheme": "bearer", "bearerFormat": "JWT"}
    assert doc["security"] == [{"cdsHooksJwt": []}]
    open_paths = {"/healthz", "/readyz", "/openapi.json"}
    open_paths |= {path for path in doc["paths"] if path.startswith("/preview")}  # service.preview: no token
    for path, method, operation in operations():
        statuses = set(operation["responses"])
        assert {"200", "405", "500"} <= statuses, (path, method)
        if path in open_paths:
            assert operation["security"] == [], path
            assert "401" not in statuses, path
        else:
            assert "security" not in operation, path  # the document-wide bearer requirement applies
            assert "WWW-Authenticate" in _resolve(operation["responses"]["401"])["headers"], path
            assert "503" in statuses, path  # the JWT replay check needs the database
        if method == "post":
            assert {"400", "401", "404", "413", "415"} <= statuses, path
            assert operation["requestBody"]["required"] is True
            assert set(operation["requestBody"]["content"]) == {"application/json"}
    assert "412" in doc["paths"]["/cds-services/{id}"]["post"]["responses"]
    assert "503" in doc["paths"]["/readyz"]["get"]["responses"]


# --------------------------------------------------------------------------------------------------
# 3. Every status, provoked for real, is answered as documented
# --------------------------------------------------------------------------------------------------

HOOK = "/cds-services/{id}"
FEEDBACK = "/cds-services/{id}/feedback"


def documented_path_of(path: str) -> str:
    return FEEDBACK if path.endswith("/feedback") else HOOK


def test_success_responses_match_the_document(client: FlaskClient) -> None:
    check_documented("GET", "/cds-services", client.get("/cds-services"))
    check_documented("GET", "/healthz", client.get("/healthz"))
    check_documented("GET", "/readyz", client.get("/readyz"))
    check_documented("GET", "/openapi.json", client.get("/openapi.json"))
    body = check_documented("POST", HOOK, client.post(f"/cds-services/{SELECT_ID}", json=gcv_request()))
    assert body["cards"], "the worked example gives a dose card"
    signed = check_documented(
        "POST", HOOK, client.post(f"/cds-services/{SIGN_ID}", json=gcv_request(hook="order-sign"))
    )
    assert signed["cards"]
    silent = order_select([load("draft-amoxicillin.json")], prefetch=prefetch_for(patient_resources()))
    assert check_documented("POST", HOOK, client.post(f"/cds-services/{SELECT_ID}", json=silent)) == {"cards": []}
    item = {"card": body["cards"][0]["uuid"], "outcome": "overridden", "outcomeTimestamp": NOW}
    result = check_documented(
        "POST", FEEDBACK, client.post(f"/cds-services/{SELECT_ID}/feedback", json={"feedback": [item]})
    )
    assert result == {"stored": 1, "unknownCards": 0}


def test_client_errors_match_the_document(client: FlaskClient) -> None:
    select = f"/cds-services/{SELECT_ID}"
    cases: list[tuple[str, str, TestResponse, int]] = [
        ("POST", HOOK, client.post(select, data=b"{not json", content_type="application/json"), 400),
        ("POST", HOOK, client.post(select, json=gcv_request(hook="order-sign")), 400),
        ("POST", FEEDBACK, client.post(f"{select}/feedback", json={"feedback": []}), 400),
        ("POST", HOOK, client.post("/cds-services/no-such-service", json=gcv_request()), 404),
        ("POST", FEEDBACK, client.post("/cds-services/no-such-service/feedback", json={"feedback": []}), 404),
        ("POST", HOOK, client.get(select), 405),
        ("POST", FEEDBACK, client.put(f"{select}/feedback", json={}), 405),
        ("GET", "/cds-services", client.post("/cds-services", json={}), 405),
        ("GET", "/healthz", client.delete("/healthz"), 405),
        ("POST", HOOK, client.post(select, json={**gcv_request(), "prefetch": {}}), 412),
        ("POST", HOOK, client.post(select, data=b"{}", content_type="text/plain"), 415),
        ("POST", FEEDBACK, client.post(f"{select}/feedback", data=b"{}"), 415),
    ]
    for method, path, response, status in cases:
        assert response.status_code == status, (method, path, response.get_data(as_text=True))
        check_documented(method, path, response)
    assert "POST" in client.get(select).headers["Allow"]


def test_unreachable_fhir_server_is_a_documented_412(client: FlaskClient) -> None:
    body = gcv_request(fhirServer="https://ehr.example.org/fhir")
    del body["prefetch"]["labs"]
    with responses.RequestsMock(assert_all_requests_are_fired=False):  # no URL registered: ConnectionError
        response = client.post(f"/cds-services/{SELECT_ID}", json=body)
    assert response.status_code == 412
    check_documented("POST", HOOK, response)


def test_body_over_the_cap_is_a_documented_413(tmp_path: Path) -> None:
    app = make_app(tmp_path, max_body_bytes=1024)
    try:
        client = app.test_client()
        for path in (f"/cds-services/{SELECT_ID}", f"/cds-services/{SELECT_ID}/feedback"):
            response = client.post(path, data=b" " * 2048, content_type="application/json")
            assert response.status_code == 413
            check_documented("POST", documented_path_of(path), response)
    finally:
        app.extensions["cmv_cds"]["store"].dispose()


def test_unauthorized_is_a_documented_401_on_every_secured_operation(tmp_path: Path) -> None:
    app = make_app(tmp_path, require_auth=True)
    try:
        client = app.test_client()
        calls = [
            ("GET", "/cds-services", client.get("/cds-services")),
            ("POST", HOOK, client.post(f"/cds-services/{SELECT_ID}", json=gcv_request())),
            ("POST", FEEDBACK, client.post(f"/cds-services/{SIGN_ID}/feedback", json={"feedback": []})),
        ]
        for method, path, response in calls:
            assert response.status_code == 401
            check_documented(method, path, response)
            assert response.headers["WWW-Authenticate"].startswith("Bearer ")
        for path in ("/healthz", "/readyz", "/openapi.json"):
            assert client.get(path).status_code == 200, path
    finally:
        app.extensions["cmv_cds"]["store"].dispose()


def test_unexpected_error_is_a_documented_500(client: FlaskClient, monkeypatch: pytest.MonkeyPatch) -> None:
    def explode(*_args: Any, **_kwargs: Any) -> Any:
        raise RuntimeError("boom")

    monkeypatch.setattr("service.app.run_hook", explode)
    monkeypatch.setattr("service.app.discovery_document", explode)
    for method, path, response in (
        ("POST", HOOK, client.post(f"/cds-services/{SELECT_ID}", json=gcv_request())),
        ("GET", "/cds-services", client.get("/cds-services")),
    ):
        assert response.status_code == 500
        check_documented(method, path, response)


def test_database_outage_is_a_documented_503_and_hook_calls_go_on(tmp_path: Path) -> None:
    """The SQLite file's directory disappears (a lost volume): a real outage, not a mock. Feedback and the
    report need the database: 503 ``transient``. A hook call does not wait for it (issued cards are written
    behind, service.store): it still answers its cards."""
    volume = tmp_path / "volume"
    volume.mkdir()
    app = make_app(volume)
    store = app.extensions["cmv_cds"]["store"]
    client = app.test_client()
    feedback = {"feedback": [{"card": str(uuid.uuid4()), "outcome": "overridden", "outcomeTimestamp": NOW}]}
    assert client.post(f"/cds-services/{SELECT_ID}/feedback", json=feedback).status_code == 200
    shutil.rmtree(volume)
    store.engine.dispose()  # pooled connections still hold the deleted file open; new ones cannot open it
    try:
        for method, path, response in (
            ("POST", FEEDBACK, client.post(f"/cds-services/{SELECT_ID}/feedback", json=feedback)),
            ("GET", "/cds-services/report", client.get("/cds-services/report")),
        ):
            assert response.status_code == 503, (path, response.get_data(as_text=True))
            body = check_documented(method, path, response)
            assert body["issue"][0]["code"] == "transient"
            assert "database is unavailable" in body["issue"][0]["diagnostics"]
        hook = client.post(f"/cds-services/{SELECT_ID}", json=gcv_request())
        assert hook.status_code == 200
        assert hook.get_json()["cards"]
    finally:
        with contextlib.suppress(OperationalError):
            store.dispose()  # its queued issued cards cannot be written either


def test_database_down_is_a_documented_503(app: Flask, client: FlaskClient, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(app.extensions["cmv_cds"]["store"], "ping", lambda: False)
    response = client.get("/readyz")
    assert response.status_code == 503
    body = check_documented("GET", "/readyz", response)
    assert body["resourceType"] == "OperationOutcome"
    assert body["issue"][0]["code"] == "transient"


# --------------------------------------------------------------------------------------------------
# 4. Schemathesis, in process over WSGI
# --------------------------------------------------------------------------------------------------
# schemathesis.pytest.from_fixture does not work with pytest 9 (its lazy loader reads the removed
# ``Function._nodeid``), so the app is built at import, on a throwaway SQLite file.

_STORE_DIR = tempfile.TemporaryDirectory(prefix="cmv-cds-schemathesis-")
_ST_APP = make_app(Path(_STORE_DIR.name))
# The app runs with authentication off, so the bearer requirement is not exercised here (401 has its own
# test above): schemathesis must not treat a missing Authorization header as invalid data.
SCHEMA = schemathesis.openapi.from_wsgi("/openapi.json", _ST_APP)
SCHEMA.config.generation.update(with_security_parameters=False)
# Only the feedback operation, valid data only: what the document calls valid feedback is accepted.
FEEDBACK_SCHEMA = schemathesis.openapi.from_wsgi("/openapi.json", _ST_APP).include(operation_id="feedback")
FEEDBACK_SCHEMA.config.generation.update(with_security_parameters=False, modes=[GenerationMode.POSITIVE])

CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
    response_headers_conformance,
    negative_data_rejection,
    unsupported_method,
]
# Reproducible and bounded for CI: about 50 examples per operation and generation mode.
CI_SETTINGS = settings(
    max_examples=50,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=list(HealthCheck),
)


@pytest.fixture(scope="module", autouse=True)
def _dispose_schemathesis_app() -> Iterator[None]:
    yield
    _ST_APP.extensions["cmv_cds"]["store"].dispose()
    _STORE_DIR.cleanup()


@pytest.mark.calendar_free
@SCHEMA.parametrize()
@CI_SETTINGS
def test_schemathesis(case: schemathesis.Case[Any]) -> None:
    """No 5xx; status, media type, body and headers as documented; schema-invalid requests refused (4xx)."""
    with responses.RequestsMock(assert_all_requests_are_fired=False):  # any FHIR fetch: ConnectionError → 412
        case.call_and_validate(checks=CHECKS)


@pytest.mark.calendar_free
@FEEDBACK_SCHEMA.parametrize()
@settings(CI_SETTINGS, max_examples=25, phases=[Phase.explicit, Phase.reuse, Phase.generate])
def test_schemathesis_documented_valid_feedback_is_accepted(case: schemathesis.Case[Any]) -> None:
    """Feedback valid against the document (``outcomeTimestamp`` a real RFC 3339 date-time) is stored (200)."""
    case.call_and_validate(checks=[positive_data_acceptance])


@pytest.mark.parametrize(
    "timestamp",
    ["0000-00-00T00:00:00Z", "2026-02-30T10:00:00Z", "2026-11-21T24:00:00Z", "2026-13-01T10:00:00+01:00"],
)
def test_impossible_outcome_timestamp_is_refused(client: FlaskClient, timestamp: str) -> None:
    """The pattern admits these; ``"format": "date-time"`` documents that they are invalid, and the service says 400."""
    documented = openapi_document()["components"]["schemas"]["Feedback"]["properties"]["feedback"]["items"]
    assert documented["properties"]["outcomeTimestamp"]["format"] == "date-time"
    assert re.fullmatch(documented["properties"]["outcomeTimestamp"]["pattern"], timestamp)
    item = {"card": "c-1", "outcome": "overridden", "outcomeTimestamp": timestamp}
    feedback = {"$ref": "#/components/schemas/Feedback"}
    assert _schema_validator(feedback).is_valid({"feedback": [item]})  # the pattern alone admits it
    assert not _schema_validator(feedback, formats=True).is_valid({"feedback": [item]})
    assert _schema_validator(feedback, formats=True).is_valid({"feedback": [item | {"outcomeTimestamp": NOW}]})
    response = client.post(f"/cds-services/{SELECT_ID}/feedback", json={"feedback": [item]})
    assert response.status_code == 400
    body = check_documented("POST", FEEDBACK, response)
    assert body["issue"][0]["expression"] == ["feedback[0].outcomeTimestamp"]
