"""Requests as real CDS clients send them (tests/fixtures/ehr, sources in its SOURCES.md), and a way to answer
each through the service under both client profiles without reaching any network.

A fixture's prefetch holds the data the client would have fetched; what is not in the request (Epic's
example MedicationRequests point at Medications on its FHIR server) is answered 404 by a mocked FHIR server,
so the service falls back to the reference's display, as it would when the EHR refuses the read.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import responses
from fhir_fixtures import FIXTURES, load, patient_resources, prefetch_for
from flask import Flask
from flask.testing import FlaskClient

from cards.profiles import CDS_HOOKS_2, EPIC
from service.app import create_app

EHR_FIXTURES = FIXTURES / "ehr"
REPLAYS = sorted(path.name for path in EHR_FIXTURES.glob("*.json"))
PROFILES = (CDS_HOOKS_2, EPIC)
SELECT_URL = "/cds-services/cmv-antiviral-order-select"
SIGN_URL = "/cds-services/cmv-antiviral-order-sign"


def replay(name: str) -> dict[str, Any]:
    """A fixture request, dates resolved. The generic client's request carries no prefetch of its own: it
    gets the fixture patient's (a conformant client fills every key)."""
    body: dict[str, Any] = load(f"ehr/{name}")
    if "prefetch" not in body and "fhirServer" not in body:
        body["prefetch"] = prefetch_for(patient_resources())
    return body


def url_for(body: dict[str, Any]) -> str:
    return SIGN_URL if body["hook"] == "order-sign" else SELECT_URL


def make_app(directory: Path, profile: str, **config: Any) -> Flask:
    return create_app(
        {
            "require_auth": False,
            "database_url": f"sqlite:///{directory / f'{profile}.sqlite3'}",
            "client_profile": profile,
            **config,
        }
    )


@contextmanager
def fhir_servers_answer_404() -> Iterator[responses.RequestsMock]:
    """Every FHIR read or search answered 404 (never the network); the mock records each call."""
    with responses.RequestsMock(assert_all_requests_are_fired=False) as mock:
        mock.add(responses.GET, re.compile(r"https://.*"), status=404, json={"resourceType": "OperationOutcome"})
        yield mock


def answer(client: FlaskClient, body: dict[str, Any]) -> tuple[int, Any]:
    with fhir_servers_answer_404():
        response = client.post(url_for(body), json=body)
    return response.status_code, response.get_json()


def actions_of(card: dict[str, Any]) -> list[dict[str, Any]]:
    return [action for suggestion in card.get("suggestions", []) for action in suggestion.get("actions", [])]


def topic(card: dict[str, Any]) -> str:
    return str(card["source"]["topic"]["code"])
