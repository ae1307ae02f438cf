"""The service is not a proxy into the hospital network: which fhirServer URLs it will contact."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import responses
from fhir_fixtures import load, order_select, patient_resources, prefetch_for
from flask import Flask
from jwt_support import claims, ec_p384_key, jwks, mint, public_jwk

from service.app import create_app

URL = "/cds-services/cmv-antiviral-order-select"
ISS = "https://ehr.example.org"
KEY = ec_p384_key()


def _app(tmp_path: Path, **settings: Any) -> Flask:
    return create_app({"database_url": f"sqlite:///{tmp_path / 'f.sqlite3'}", **settings})


def _body(fhir_server: str) -> dict[str, Any]:
    """Everything prefetched except the patient, so exactly one read goes to fhirServer."""
    resources = patient_resources()
    prefetch = prefetch_for(resources)
    del prefetch["patient"]
    patient = next(r for r in resources if r["resourceType"] == "Patient")
    body = order_select([load("draft-ganciclovir.json")], prefetch=prefetch, fhirServer=fhir_server)
    body["_patient"] = patient
    return body


def _post(app: Flask, body: dict[str, Any], token: str | None = None) -> Any:
    patient = body.pop("_patient")
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    with responses.RequestsMock(assert_all_requests_are_fired=False) as rsps:
        rsps.get(f"{body['fhirServer'].rstrip('/')}/Patient/pat-cmv-1", json=patient)
        response = app.test_client().post(URL, json=body, headers=headers)
        contacted = len(rsps.calls)
    return response, contacted


def _issuers(**extra: Any) -> str:
    return json.dumps({ISS: {"jwks": jwks(public_jwk(KEY, "key-1")), **extra}})


def _token() -> str:
    return mint(KEY, payload=claims(iss=ISS, aud=f"http://localhost{URL}"))


@pytest.mark.parametrize(
    "server", ["https://ehr.example.org/fhir", "http://127.0.0.1:8103/fhir", "http://localhost/fhir"]
)
def test_auth_off_allows_https_and_loopback_http(tmp_path: Path, server: str) -> None:
    response, contacted = _post(_app(tmp_path, require_auth=False), _body(server))
    assert response.status_code == 200
    assert contacted == 1


@pytest.mark.parametrize(
    "server", ["http://10.0.0.5/fhir", "http://ehr.example.org/fhir", "ftp://ehr.example.org/fhir"]
)
def test_plain_http_to_a_non_loopback_host_is_refused_and_not_contacted(tmp_path: Path, server: str) -> None:
    response, contacted = _post(_app(tmp_path, require_auth=False), _body(server))
    assert response.status_code in (400, 412)
    assert contacted == 0


def test_auth_on_without_an_allowlist_contacts_nothing(tmp_path: Path) -> None:
    app = _app(tmp_path, require_auth=True, trusted_issuers=_issuers())
    response, contacted = _post(app, _body("https://ehr.example.org/fhir"), _token())
    assert response.status_code == 412
    assert response.get_json()["issue"][0]["expression"] == ["fhirServer"]
    assert "allowlist" in response.get_json()["issue"][0]["diagnostics"]
    assert contacted == 0


@pytest.mark.parametrize(
    ("server", "allowed"),
    [
        ("https://ehr.example.org/fhir", True),
        ("https://ehr.example.org/fhir/", True),
        ("https://EHR.example.org:443/fhir", True),
        ("https://ehr.example.org/fhir-internal", False),
        ("https://ehr.example.org/admin", False),
        ("https://attacker.example/fhir", False),
        ("https://ehr.example.org.attacker.example/fhir", False),
    ],
)
def test_global_allowlist_by_path_segment(tmp_path: Path, server: str, allowed: bool) -> None:
    app = _app(
        tmp_path, require_auth=True, trusted_issuers=_issuers(), fhir_server_allowlist="https://ehr.example.org/fhir"
    )
    response, contacted = _post(app, _body(server), _token())
    assert (response.status_code == 200) is allowed
    assert contacted == (1 if allowed else 0)


def test_issuer_allowlist_overrides_the_global_one(tmp_path: Path) -> None:
    app = _app(
        tmp_path,
        require_auth=True,
        trusted_issuers=_issuers(fhirServers=["https://fhir.hospital-a.org/r4"]),
        fhir_server_allowlist="https://ehr.example.org/fhir",
    )
    ok, contacted = _post(app, _body("https://fhir.hospital-a.org/r4"), _token())
    assert ok.status_code == 200
    assert contacted == 1
    refused, contacted = _post(app, _body("https://ehr.example.org/fhir"), _token())
    assert refused.status_code == 412
    assert contacted == 0


def test_http_loopback_needs_auth_off_even_when_allowlisted(tmp_path: Path) -> None:
    app = _app(
        tmp_path, require_auth=True, trusted_issuers=_issuers(), fhir_server_allowlist="http://127.0.0.1:8103/fhir"
    )
    response, contacted = _post(app, _body("http://127.0.0.1:8103/fhir"), _token())
    assert response.status_code == 412
    assert contacted == 0


def test_bad_allowlist_setting_fails_at_start(tmp_path: Path) -> None:
    from service.config import ConfigError

    with pytest.raises(ConfigError):
        _app(tmp_path, fhir_server_allowlist="ehr.example.org/fhir")
