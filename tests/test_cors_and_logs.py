"""CORS for browser-based clients, and the log guard itself."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from fhir_fixtures import load, order_select, patient_resources, prefetch_for
from log_guard import CAPTURE, leaks, sensitive_strings

from service.app import create_app

SANDBOX = "https://sandbox.cds-hooks.org"


def _app(tmp_path: Path, **settings: object):  # type: ignore[no-untyped-def]
    return create_app({"database_url": f"sqlite:///{tmp_path / 'f.sqlite3'}", **settings})


def test_preflight_is_answered_without_a_token_even_with_auth_on(tmp_path: Path) -> None:
    client = _app(tmp_path, require_auth=True, cors_origins=SANDBOX).test_client()
    response = client.options(
        "/cds-services/cmv-antiviral-order-select",
        headers={
            "Origin": SANDBOX,
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization, content-type",
        },
    )
    assert response.status_code == 200
    assert response.headers["Access-Control-Allow-Origin"] == SANDBOX
    assert "Authorization" in response.headers["Access-Control-Allow-Headers"]
    assert "Access-Control-Allow-Credentials" not in response.headers
    # The real call still needs the JWT.
    assert client.get("/cds-services", headers={"Origin": SANDBOX}).status_code == 401


def test_only_configured_origins_get_cors_headers(tmp_path: Path) -> None:
    client = _app(tmp_path, require_auth=False, cors_origins=SANDBOX).test_client()
    assert client.get("/cds-services", headers={"Origin": SANDBOX}).headers["Access-Control-Allow-Origin"] == SANDBOX
    assert (
        "Access-Control-Allow-Origin"
        not in client.get("/cds-services", headers={"Origin": "https://evil.example"}).headers
    )


def test_no_cors_headers_by_default(tmp_path: Path) -> None:
    client = _app(tmp_path, require_auth=False).test_client()
    assert "Access-Control-Allow-Origin" not in client.get("/cds-services", headers={"Origin": SANDBOX}).headers


def test_wildcard_origin(tmp_path: Path) -> None:
    client = _app(tmp_path, require_auth=False, cors_origins="*").test_client()
    assert (
        client.get("/cds-services", headers={"Origin": "https://x.example"}).headers["Access-Control-Allow-Origin"]
        == "*"
    )


def test_log_guard_detects_patient_data() -> None:
    sensitive = sensitive_strings()
    assert {"Quixotetest", "Marigold", "MRN-7788123"} <= sensitive
    assert leaks(['{"message":"request","note":"Quixotetest"}'], sensitive)
    assert leaks(['{"message":"x","body":{"resourceType":"Patient"}}'], sensitive)
    assert leaks(['{"message":"x","body":"{\\"resourceType\\": \\"Patient\\"}"}'], sensitive)
    assert not leaks(['{"message":"request","status":200}'], sensitive)
    assert not leaks(['{"reason":"InvalidRequest at context.draftOrders.resourceType"}'], sensitive)


def test_a_full_request_logs_no_patient_data(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    client = _app(tmp_path, require_auth=False).test_client()
    before = len(CAPTURE.lines)
    caplog.set_level(logging.DEBUG, logger="cmv_cds")
    body = order_select([load("draft-ganciclovir.json")], prefetch=prefetch_for(patient_resources()))
    assert client.post("/cds-services/cmv-antiviral-order-select", json=body).status_code == 200
    bad = client.post("/cds-services/cmv-antiviral-order-select", json={**body, "hook": "Quixotetest"})
    assert bad.status_code == 400
    lines = CAPTURE.lines[before:]
    assert lines, "the request was logged"
    assert leaks(lines, sensitive_strings()) == []
