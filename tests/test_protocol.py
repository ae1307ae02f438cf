"""CDS Hooks 2.0.1 protocol behaviour over HTTP (Flask test client; the FHIR server mocked with ``responses``).

Sections: discovery; prefetch states (present / null / absent / OperationOutcome / paginated / unobtainable);
400s for malformed bodies (one table); 404 / 405 / 413; feedback; order-sign; the error edge (500).
Every 200 hook response is checked against ``service/schemas/response.schema.json``; every error response
is checked to be a JSON OperationOutcome.
"""

from __future__ import annotations

import copy
import json
import logging
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
import requests
import responses
from fhir_fixtures import PATIENT_ID, load, order_select, patient_resources, prefetch_for, searchset
from flask import Flask
from flask.testing import FlaskClient
from responses import matchers
from werkzeug.test import TestResponse

from service.app import create_app
from service.registry import SERVICES, discovery_document, prefetch_templates
from service.store import FeedbackStore
from service.validation import is_valid

# --------------------------------------------------------------------------------------------------
# Constants and helpers
# --------------------------------------------------------------------------------------------------

REPO_ROOT = Path(__file__).resolve().parents[1]
# The CDS Hooks 2.0.1 specification's own JSON examples, copied into the repository (see its SOURCES.md).
SPEC_EXAMPLES = REPO_ROOT / "tests" / "fixtures" / "cds-hooks-spec"
VALUESETS = REPO_ROOT / "fhir_profiles" / "valuesets"

SELECT_ID = "cmv-antiviral-order-select"
SIGN_ID = "cmv-antiviral-order-sign"
SELECT_URL = f"/cds-services/{SELECT_ID}"
SIGN_URL = f"/cds-services/{SIGN_ID}"

FHIR_BASE = "https://ehr.example.org/fhir"
ACCESS_TOKEN = "opaque-access-token-7f3a"
LOINC = "http://loinc.org"
PREFETCH_KEYS = ("patient", "bodyMeasurements", "labs", "cmvViralLoads", "conditions", "medications")
DRAFT_REF = "context.draftOrders.entry[0].resource"


def fhir_access() -> dict[str, Any]:
    """``fhirServer`` + ``fhirAuthorization`` members of a request body."""
    return {
        "fhirServer": FHIR_BASE,
        "fhirAuthorization": {
            "access_token": ACCESS_TOKEN,
            "token_type": "Bearer",
            "expires_in": 300,
            "scope": "patient/Patient.read patient/Observation.read patient/Condition.read",
            "subject": "cmv-cds",
        },
    }


def gcv() -> dict[str, Any]:
    draft: dict[str, Any] = load("draft-ganciclovir.json")
    return draft


def full_prefetch() -> dict[str, Any]:
    return prefetch_for(patient_resources())


def gcv_request(prefetch: dict[str, Any] | None = None, **extra: Any) -> dict[str, Any]:
    """An order-select request for the ganciclovir draft (full prefetch unless given)."""
    return order_select([gcv()], prefetch=full_prefetch() if prefetch is None else prefetch, **extra)


def without(mapping: dict[str, Any], *keys: str) -> dict[str, Any]:
    return {k: v for k, v in mapping.items() if k not in keys}


def template_url(key: str, patient_id: str = PATIENT_ID) -> str:
    """The absolute URL a conformant fetch of prefetch ``key`` hits on ``FHIR_BASE``."""
    template = next(t for t in prefetch_templates() if t.key == key)
    return f"{FHIR_BASE}/" + template.query.replace("{{context.patientId}}", patient_id)


def serve(
    rsps: responses.RequestsMock,
    url: str,
    *,
    json_body: Any = None,
    status: int = 200,
    **kwargs: Any,
) -> responses.BaseResponse:
    """Register a GET on ``url`` that matches its query string exactly (responses ignores it by default)."""
    base, _, query = url.partition("?")
    match = [matchers.query_string_matcher(query or None)]
    if json_body is not None:
        kwargs["json"] = json_body
    response: responses.BaseResponse = rsps.get(base, status=status, match=match, **kwargs)
    return response


def serve_prefetch(rsps: responses.RequestsMock, *keys: str) -> dict[str, responses.BaseResponse]:
    """Answer the template queries for ``keys`` with the fixture patient's data."""
    data = full_prefetch()
    return {key: serve(rsps, template_url(key), json_body=data[key]) for key in keys}


def url_of(call: Any) -> str:
    """The URL a recorded ``responses`` call requested."""
    url = call.request.url
    assert isinstance(url, str)
    return url


def query_of(call: Any) -> dict[str, list[str]]:
    return parse_qs(urlsplit(url_of(call)).query)


def check_response(response: TestResponse) -> dict[str, Any]:
    """A 200 CDS Hooks response: JSON, and valid against the repo's response schema."""
    assert response.status_code == 200, response.get_data(as_text=True)
    assert response.mimetype == "application/json"
    body = response.get_json()
    assert isinstance(body, dict)
    assert is_valid(body, "response.schema.json"), body
    return body


def call_hook(client: FlaskClient, body: Any, url: str = SELECT_URL) -> list[dict[str, Any]]:
    """POST a hook call that must succeed; return its cards."""
    cards: list[dict[str, Any]] = check_response(client.post(url, json=body))["cards"]
    return cards


def check_error(response: TestResponse, status: int) -> dict[str, Any]:
    """An error response: the status, JSON, a FHIR OperationOutcome; returns ``issue[0]``."""
    assert response.status_code == status, response.get_data(as_text=True)
    assert response.mimetype == "application/json"
    body = response.get_json()
    assert isinstance(body, dict)
    assert body["resourceType"] == "OperationOutcome"
    assert isinstance(body["issue"], list)
    assert body["issue"]
    issue: dict[str, Any] = body["issue"][0]
    assert issue["severity"] in ("error", "fatal")
    assert isinstance(issue["code"], str)
    assert isinstance(issue["diagnostics"], str)
    assert issue["diagnostics"]
    return issue


def expression(issue: dict[str, Any]) -> str | None:
    value = issue.get("expression")
    if value is None:
        return None
    assert isinstance(value, list)
    assert len(value) == 1
    return str(value[0])


def post_error(client: FlaskClient, body: Any, status: int, url: str = SELECT_URL) -> dict[str, Any]:
    """POST ``body`` (dict/list as JSON, bytes as raw JSON-typed data) and check the error response."""
    if isinstance(body, bytes):
        response = client.post(url, data=body, content_type="application/json")
    else:
        response = client.post(url, json=body)
    return check_error(response, status)


def rule_of(card: dict[str, Any]) -> str:
    return str(card["source"]["topic"]["code"])


# The fixture patient is a kidney-transplant recipient on tacrolimus and prednisone: beside the card about the
# selected order, every answer carries the information card on reducing immunosuppression (docs/policy.md §15).
FIXTURE_INFO_CARDS = ["reduce-immunosuppression"]


def only_card(cards: list[dict[str, Any]]) -> dict[str, Any]:
    """The one card about the selected order (the fixture patient's information card aside)."""
    main = [c for c in cards if rule_of(c) not in FIXTURE_INFO_CARDS]
    assert len(main) == 1, [c["summary"] for c in cards]
    assert sorted(rule_of(c) for c in cards if c is not main[0]) == FIXTURE_INFO_CARDS
    return main[0]


def assert_dose_card(cards: list[dict[str, Any]], observation: str = "Observation/obs-scr") -> dict[str, Any]:
    """The fixture patient's ganciclovir card: warning, 400 mg IV q12h, update of MedicationRequest/draft-gcv."""
    card = only_card(cards)
    assert card["indicator"] == "warning"
    assert rule_of(card) == "dose-adjust"
    assert card["summary"].startswith("Adjust ganciclovir: 400 mg IV every 12 hours")
    assert observation in card["detail"]  # the serum creatinine the dose was computed from
    (suggestion,) = card["suggestions"]
    (action,) = suggestion["actions"]
    assert action["type"] == "update"
    resource = action["resource"]
    assert (resource["resourceType"], resource["id"]) == ("MedicationRequest", "draft-gcv")
    dose = resource["dosageInstruction"][0]["doseAndRate"][0]["doseQuantity"]
    assert (dose["value"], dose["code"]) == (400, "mg")
    assert resource["dosageInstruction"][0]["timing"]["repeat"]["period"] == 12
    return card


def assert_missing_data_card(cards: list[dict[str, Any]], missing: str) -> dict[str, Any]:
    card = only_card(cards)
    assert card["indicator"] == "warning"
    assert rule_of(card) == "dose-missing-data"
    assert card["summary"] == f"Ganciclovir dose not computed: missing {missing}"
    for suggestion in card.get("suggestions", []):
        for action in suggestion.get("actions", []):
            assert action["resource"]["resourceType"] != "MedicationRequest"  # no dose is proposed
    return card


def cases(table: list[tuple[Any, ...]]) -> list[Any]:
    """``(id, *values[, mark])`` rows as pytest params named by id; a trailing mark (known bug) is applied."""
    params = []
    for case_id, *values in table:
        marks = [v for v in values if isinstance(v, pytest.MarkDecorator)]
        args = [v for v in values if not isinstance(v, pytest.MarkDecorator)]
        params.append(pytest.param(*args, id=case_id, marks=marks))
    return params


def valueset_loinc_codes() -> set[str]:
    codes: set[str] = set()
    for path in VALUESETS.glob("ValueSet-*.json"):
        valueset = json.loads(path.read_text(encoding="utf-8"))
        for include in valueset.get("compose", {}).get("include", []):
            if include.get("system") == LOINC:
                codes.update(concept["code"] for concept in include.get("concept", []))
    return codes


# --------------------------------------------------------------------------------------------------
# Fixtures
# --------------------------------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def rsps() -> Iterator[responses.RequestsMock]:
    """Every test runs with outbound HTTP mocked: an unregistered URL fails instead of reaching a network."""
    with responses.RequestsMock(assert_all_requests_are_fired=False) as mock:
        yield mock


@pytest.fixture
def store_of(app: Flask) -> FeedbackStore:
    store: FeedbackStore = app.extensions["cmv_cds"]["store"]
    return store


# --------------------------------------------------------------------------------------------------
# 1. Discovery
# --------------------------------------------------------------------------------------------------


def test_discovery_lists_both_services(client: FlaskClient) -> None:
    response = client.get("/cds-services")
    assert response.status_code == 200
    assert response.mimetype == "application/json"
    body = response.get_json()
    assert body == discovery_document()
    services = {s["id"]: s for s in body["services"]}
    assert {sid: s["hook"] for sid, s in services.items()} == {SELECT_ID: "order-select", SIGN_ID: "order-sign"}
    for service_id, service in services.items():
        registered = SERVICES[service_id]
        assert service["hook"] == registered.hook
        assert service["title"] == registered.title
        assert service["description"] == registered.description
        assert service["usageRequirements"] == registered.usage_requirements
        assert service["prefetch"] == {t.key: t.query for t in registered.prefetch}
        assert set(service["prefetch"]) == set(PREFETCH_KEYS)
        for member in ("title", "description", "usageRequirements"):
            assert isinstance(service[member], str)
            assert service[member].strip()


def test_discovery_prefetch_templates_use_only_patient_token_and_valueset_loinc_codes(client: FlaskClient) -> None:
    known = valueset_loinc_codes()
    assert known
    checked = 0
    for service in client.get("/cds-services").get_json()["services"]:
        for key, template in service["prefetch"].items():
            tokens = re.findall(r"\{\{(.*?)\}\}", template)
            assert tokens == ["context.patientId"], (key, template)
            assert template.count("{") == 2
            assert template.count("}") == 2
            query = parse_qs(urlsplit(template).query)
            for token in ",".join(query.get("code", [])).split(","):
                if not token:
                    continue
                system, _, code = token.rpartition("|")
                assert system == LOINC, (key, token)
                assert code in known, (key, code)
                checked += 1
        assert service["prefetch"]["patient"] == "Patient/{{context.patientId}}"
        assert "code=" in service["prefetch"]["labs"]
    assert checked > 20  # the Observation templates name their codes


# --------------------------------------------------------------------------------------------------
# 2. Prefetch states
# --------------------------------------------------------------------------------------------------


def test_full_prefetch_gives_the_dose_card_without_any_fetch(client: FlaskClient, rsps: responses.RequestsMock) -> None:
    assert_dose_card(call_hook(client, gcv_request(**fhir_access())))
    assert len(rsps.calls) == 0


def test_null_key_means_no_data_and_is_not_fetched(client: FlaskClient, rsps: responses.RequestsMock) -> None:
    prefetch = full_prefetch()
    prefetch["labs"] = None
    serve_prefetch(rsps, "labs")  # would give the creatinine if (wrongly) fetched
    assert_missing_data_card(call_hook(client, gcv_request(prefetch, **fhir_access())), "serum creatinine")
    assert len(rsps.calls) == 0


def test_absent_key_is_fetched_with_the_bearer_token(client: FlaskClient, rsps: responses.RequestsMock) -> None:
    served = serve_prefetch(rsps, "labs")
    assert_dose_card(call_hook(client, gcv_request(without(full_prefetch(), "labs"), **fhir_access())))
    assert served["labs"].call_count == 1
    (call,) = rsps.calls
    assert call.request.headers["Authorization"] == f"Bearer {ACCESS_TOKEN}"
    parts = urlsplit(url_of(call))
    assert f"{parts.scheme}://{parts.netloc}{parts.path}" == f"{FHIR_BASE}/Observation"
    query = query_of(call)
    assert query["patient"] == [PATIENT_ID]
    codes = query["code"][0].split(",")
    assert f"{LOINC}|2160-0" in codes  # serum creatinine
    assert f"{LOINC}|751-8" in codes  # neutrophils
    assert query["_sort"] == ["-date"]


def test_operation_outcome_key_is_refetched(client: FlaskClient, rsps: responses.RequestsMock) -> None:
    prefetch = full_prefetch()
    prefetch["labs"] = {
        "resourceType": "OperationOutcome",
        "issue": [{"severity": "error", "code": "timeout", "diagnostics": "lab system unavailable"}],
    }
    served = serve_prefetch(rsps, "labs")
    assert_dose_card(call_hook(client, gcv_request(prefetch, **fhir_access())))
    assert served["labs"].call_count == 1
    assert len(rsps.calls) == 1


def test_all_keys_absent_are_all_fetched_once(client: FlaskClient, rsps: responses.RequestsMock) -> None:
    served = serve_prefetch(rsps, *PREFETCH_KEYS)
    body = order_select([gcv()], **fhir_access())
    assert "prefetch" not in body
    assert_dose_card(call_hook(client, body))
    assert {key: r.call_count for key, r in served.items()} == dict.fromkeys(PREFETCH_KEYS, 1)
    assert len(rsps.calls) == len(PREFETCH_KEYS)
    for call in rsps.calls:
        assert call.request.headers["Authorization"] == f"Bearer {ACCESS_TOKEN}"
    patient_call = next(c for c in rsps.calls if urlsplit(url_of(c)).path.endswith("/Patient/" + PATIENT_ID))
    assert urlsplit(url_of(patient_call)).query == ""


def test_empty_prefetch_object_fetches_everything(client: FlaskClient, rsps: responses.RequestsMock) -> None:
    served = serve_prefetch(rsps, *PREFETCH_KEYS)
    assert_dose_card(call_hook(client, order_select([gcv()], prefetch={}, **fhir_access())))
    assert all(r.call_count == 1 for r in served.values())


def _split_labs() -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The fixture's labs, without and with the serum creatinines."""
    labs = [entry["resource"] for entry in full_prefetch()["labs"]["entry"]]
    creatinine = [r for r in labs if r["id"].startswith("obs-scr")]
    assert creatinine
    return [r for r in labs if not r["id"].startswith("obs-scr")], creatinine


def test_paginated_prefetch_bundle_next_page_is_fetched(client: FlaskClient, rsps: responses.RequestsMock) -> None:
    first, second = _split_labs()
    page2_url = f"{FHIR_BASE}?_getpages=labs-1&_getpagesoffset=100"
    page1 = searchset(first) | {"link": [{"relation": "self", "url": template_url("labs")}]}
    page1["link"].append({"relation": "next", "url": page2_url})
    page2 = serve(rsps, page2_url, json_body=searchset(second))
    prefetch = full_prefetch()
    prefetch["labs"] = page1
    assert_dose_card(call_hook(client, gcv_request(prefetch, **fhir_access())))
    assert page2.call_count == 1
    assert rsps.calls[0].request.headers["Authorization"] == f"Bearer {ACCESS_TOKEN}"


def test_paginated_search_from_fhir_server_follows_next(client: FlaskClient, rsps: responses.RequestsMock) -> None:
    first, second = _split_labs()
    page2_url = f"{FHIR_BASE}/Observation?patient={PATIENT_ID}&_page_token=p2"
    page1 = serve(
        rsps, template_url("labs"), json_body=searchset(first) | {"link": [{"relation": "next", "url": page2_url}]}
    )
    page2 = serve(rsps, page2_url, json_body=searchset(second))
    assert_dose_card(call_hook(client, gcv_request(without(full_prefetch(), "labs"), **fhir_access())))
    assert (page1.call_count, page2.call_count) == (1, 1)


def test_prefetch_next_link_to_another_host_is_412(client: FlaskClient, rsps: responses.RequestsMock) -> None:
    first, second = _split_labs()
    evil_url = "https://intranet.example.net/fhir/Observation?page=2"
    evil = serve(rsps, evil_url, json_body=searchset(second))
    prefetch = full_prefetch()
    prefetch["labs"] = searchset(first) | {"link": [{"relation": "next", "url": evil_url}]}
    issue = post_error(client, gcv_request(prefetch, **fhir_access()), 412)
    assert expression(issue) == "prefetch.labs"
    assert evil.call_count == 0
    assert len(rsps.calls) == 0


def test_fhir_server_next_link_to_another_host_is_412(client: FlaskClient, rsps: responses.RequestsMock) -> None:
    first, second = _split_labs()
    evil_url = "https://intranet.example.net/fhir/Observation?page=2"
    evil = serve(rsps, evil_url, json_body=searchset(second))
    serve(rsps, template_url("labs"), json_body=searchset(first) | {"link": [{"relation": "next", "url": evil_url}]})
    issue = post_error(client, gcv_request(without(full_prefetch(), "labs"), **fhir_access()), 412)
    assert expression(issue) == "prefetch.labs"
    assert evil.call_count == 0


@pytest.mark.parametrize(
    "next_url",
    [
        pytest.param(f"{FHIR_BASE}-internal/Observation?page=2", id="sibling-path"),
        pytest.param(f"{FHIR_BASE}/../admin/Observation?page=2", id="dot-segments"),
    ],
)
def test_next_link_outside_the_base_path_is_412(
    client: FlaskClient, rsps: responses.RequestsMock, next_url: str
) -> None:
    first, second = _split_labs()
    outside = rsps.get(re.compile(r"https://ehr\.example\.org/.*"), json=searchset(second))
    prefetch = full_prefetch()
    prefetch["labs"] = searchset(first) | {"link": [{"relation": "next", "url": next_url}]}
    issue = post_error(client, gcv_request(prefetch, **fhir_access()), 412)
    assert expression(issue) == "prefetch.labs"
    assert outside.call_count == 0


def test_fhir_server_with_trailing_slash(client: FlaskClient, rsps: responses.RequestsMock) -> None:
    served = serve_prefetch(rsps, "labs")
    body = gcv_request(without(full_prefetch(), "labs"), **fhir_access())
    body["fhirServer"] = FHIR_BASE + "/"
    assert_dose_card(call_hook(client, body))
    assert served["labs"].call_count == 1


def test_fhir_server_redirect_is_not_followed_and_is_412(client: FlaskClient, rsps: responses.RequestsMock) -> None:
    target = serve(rsps, f"{FHIR_BASE}/moved/Observation", json_body=full_prefetch()["labs"])
    serve(rsps, template_url("labs"), status=302, headers={"Location": f"{FHIR_BASE}/moved/Observation"})
    issue = post_error(client, gcv_request(without(full_prefetch(), "labs"), **fhir_access()), 412)
    assert expression(issue) == "prefetch.labs"
    assert target.call_count == 0


def test_empty_searchset_is_no_data(client: FlaskClient, rsps: responses.RequestsMock) -> None:
    prefetch = full_prefetch()
    prefetch["labs"] = searchset([])
    assert_missing_data_card(call_hook(client, gcv_request(prefetch, **fhir_access())), "serum creatinine")
    assert len(rsps.calls) == 0


def test_empty_searchset_from_fhir_server_is_no_data(client: FlaskClient, rsps: responses.RequestsMock) -> None:
    served = serve(rsps, template_url("labs"), json_body=searchset([]))
    cards = call_hook(client, gcv_request(without(full_prefetch(), "labs"), **fhir_access()))
    assert_missing_data_card(cards, "serum creatinine")
    assert served.call_count == 1


def test_absent_key_without_fhir_server_is_412(client: FlaskClient) -> None:
    issue = post_error(client, gcv_request(without(full_prefetch(), "labs")), 412)
    assert issue["code"] == "incomplete"
    assert expression(issue) == "prefetch"
    assert "labs" in issue["diagnostics"]


def test_operation_outcome_key_without_fhir_server_is_412(client: FlaskClient) -> None:
    prefetch = full_prefetch()
    prefetch["labs"] = {"resourceType": "OperationOutcome", "issue": [{"severity": "error", "code": "exception"}]}
    post_error(client, gcv_request(prefetch), 412)


@pytest.mark.parametrize(
    "answer",
    [
        pytest.param({"status": 500, "json_body": {"resourceType": "OperationOutcome", "issue": []}}, id="http-500"),
        pytest.param({"status": 401, "json_body": {"resourceType": "OperationOutcome", "issue": []}}, id="http-401"),
        pytest.param({"body": requests.exceptions.ConnectTimeout("connect timed out")}, id="timeout"),
        pytest.param({"body": requests.exceptions.ConnectionError("refused")}, id="connection-error"),
        pytest.param({"body": "<html>login</html>", "content_type": "text/html"}, id="not-json"),
        pytest.param({"json_body": {"resourceType": "OperationOutcome", "issue": []}}, id="200-operation-outcome"),
        pytest.param({"json_body": {"resourceType": "Patient", "id": "x"}}, id="200-not-a-bundle"),
    ],
)
def test_fhir_server_failure_is_412(client: FlaskClient, rsps: responses.RequestsMock, answer: dict[str, Any]) -> None:
    served = serve(rsps, template_url("labs"), **answer)
    issue = post_error(client, gcv_request(without(full_prefetch(), "labs"), **fhir_access()), 412)
    assert issue["code"] == "incomplete"
    assert expression(issue) == "prefetch.labs"
    assert ACCESS_TOKEN not in json.dumps(issue)
    assert served.call_count == 1


def test_patient_read_404_means_no_patient(client: FlaskClient, rsps: responses.RequestsMock) -> None:
    served = serve(
        rsps,
        template_url("patient"),
        status=404,
        json_body={"resourceType": "OperationOutcome", "issue": [{"severity": "error", "code": "not-found"}]},
    )
    cards = call_hook(client, gcv_request(without(full_prefetch(), "patient"), **fhir_access()))
    card = assert_missing_data_card(cards, "age")
    assert "birth date" in card["detail"]
    assert served.call_count == 1


def test_no_cmv_antiviral_selected_is_silent_before_any_data(client: FlaskClient, rsps: responses.RequestsMock) -> None:
    body = order_select([load("draft-amoxicillin.json")])
    assert "prefetch" not in body
    assert "fhirServer" not in body
    response = client.post(SELECT_URL, json=body)
    assert check_response(response) == {"cards": []}
    assert len(rsps.calls) == 0


# --------------------------------------------------------------------------------------------------
# 3. Malformed bodies → 400 naming the field
# --------------------------------------------------------------------------------------------------


def _mutated(change: Callable[[dict[str, Any]], None]) -> Callable[[], dict[str, Any]]:
    def build() -> dict[str, Any]:
        body = gcv_request()
        change(body)
        return body

    return build


def _draft(change: Callable[[dict[str, Any]], None]) -> Callable[[dict[str, Any]], None]:
    def apply(body: dict[str, Any]) -> None:
        change(body["context"]["draftOrders"]["entry"][0]["resource"])

    return apply


def _dstu2_order() -> dict[str, Any]:
    order: dict[str, Any] = {"resourceType": "MedicationOrder", "id": "mo-1", "status": "draft"}
    order["medicationCodeableConcept"] = gcv()["medicationCodeableConcept"]
    order["patient"] = {"reference": f"Patient/{PATIENT_ID}"}
    return order_select([order], selections=["MedicationOrder/mo-1"], prefetch=full_prefetch())


def _auth_without_server(body: dict[str, Any]) -> None:
    body.update(without(fhir_access(), "fhirServer"))


def _auth_without_token(body: dict[str, Any]) -> None:
    body.update(fhir_access())
    del body["fhirAuthorization"]["access_token"]


BAD_REQUESTS: list[tuple[Any, ...]] = [
    # (id, body builder, expected expression or None)
    ("not-json", lambda: b"{not json", None),
    ("json-array", lambda: b"[]", None),
    ("empty-body", lambda: b"", None),
    ("missing-hook", _mutated(lambda b: b.pop("hook")), "hook"),
    ("order-sign-body", lambda: order_select([gcv()], prefetch=full_prefetch(), hook="order-sign"), "hook"),
    ("patient-view-hook", _mutated(lambda b: b.update(hook="patient-view")), "hook"),
    ("missing-hookInstance", _mutated(lambda b: b.pop("hookInstance")), "hookInstance"),
    ("hookInstance-not-string", _mutated(lambda b: b.update(hookInstance=42)), "hookInstance"),
    ("missing-context", _mutated(lambda b: b.pop("context")), "context"),
    ("context-not-object", _mutated(lambda b: b.update(context=[])), "context"),
    ("missing-patientId", _mutated(lambda b: b["context"].pop("patientId")), "context.patientId"),
    ("missing-userId", _mutated(lambda b: b["context"].pop("userId")), "context.userId"),
    ("missing-selections", _mutated(lambda b: b["context"].pop("selections")), "context.selections"),
    ("missing-draftOrders", _mutated(lambda b: b["context"].pop("draftOrders")), "context.draftOrders"),
    ("empty-selections", _mutated(lambda b: b["context"].update(selections=[])), "context.selections"),
    (
        "selection-not-in-draftOrders",
        _mutated(lambda b: b["context"].update(selections=["MedicationRequest/not-there"])),
        "context.selections[0]",
    ),
    (
        "draftOrders-not-bundle",
        _mutated(lambda b: b["context"]["draftOrders"].update(resourceType="Patient")),
        "context.draftOrders.resourceType",
    ),
    (
        "draftOrders-searchset",
        _mutated(lambda b: b["context"]["draftOrders"].update(type="searchset")),
        "context.draftOrders.type",
    ),
    (
        "patientId-with-slash",
        _mutated(lambda b: b["context"].update(patientId="Patient/pat-cmv-1")),
        "context.patientId",
    ),
    ("patientId-with-query", _mutated(lambda b: b["context"].update(patientId="pat-cmv-1?_id=x")), "context.patientId"),
    ("fhirAuthorization-without-fhirServer", _mutated(_auth_without_server), "fhirServer"),
    ("fhirAuthorization-without-token", _mutated(_auth_without_token), "fhirAuthorization.access_token"),
    ("prefetch-value-string", _mutated(lambda b: b["prefetch"].update(labs="Observation?patient=x")), "prefetch.labs"),
    ("prefetch-not-object", _mutated(lambda b: b.update(prefetch=[])), "prefetch"),
    (
        "prefetch-patient-is-observation",
        _mutated(lambda b: b["prefetch"].update(patient=b["prefetch"]["labs"]["entry"][0]["resource"])),
        "prefetch.patient",
    ),
    (
        "prefetch-search-not-bundle",
        _mutated(lambda b: b["prefetch"].update(labs=b["prefetch"]["patient"])),
        "prefetch.labs",
    ),
    ("draft-bad-authoredOn", _mutated(_draft(lambda r: r.update(authoredOn="25/12/2024"))), f"{DRAFT_REF}.authoredOn"),
    ("draft-status-number", _mutated(_draft(lambda r: r.update(status=5))), f"{DRAFT_REF}.status"),
    ("draft-dstu2-MedicationOrder", _dstu2_order, DRAFT_REF),
    (
        "draft-other-patient",
        _mutated(_draft(lambda r: r.update(subject={"reference": "Patient/someone-else"}))),
        f"{DRAFT_REF}.subject",
    ),
]


@pytest.mark.parametrize(("build", "expected"), cases(BAD_REQUESTS))
def test_malformed_request_is_400_naming_the_field(
    client: FlaskClient,
    rsps: responses.RequestsMock,
    build: Callable[[], Any],
    expected: str | None,
) -> None:
    issue = post_error(client, build(), 400)
    assert issue["code"] == "invalid"
    assert expression(issue) == expected
    assert len(rsps.calls) == 0


def test_sandbox_shapes_on_the_selected_draft_are_accepted(client: FlaskClient) -> None:
    draft = gcv()
    draft["category"] = {
        "coding": [{"system": "http://terminology.hl7.org/CodeSystem/medicationrequest-category", "code": "inpatient"}]
    }
    draft["reasonCode"] = {
        "coding": [{"system": "http://snomed.info/sct", "code": "28944009"}],
        "text": "CMV infection",
    }
    draft["dosageInstruction"][0]["doseAndRate"] = draft["dosageInstruction"][0]["doseAndRate"][0]
    assert_dose_card(call_hook(client, order_select([draft], prefetch=full_prefetch())))


def test_malformed_non_selected_draft_does_not_sink_the_request(client: FlaskClient) -> None:
    other = load("draft-amoxicillin.json") | {"id": "draft-other", "authoredOn": "garbage", "status": 5}
    body = order_select([gcv(), other], selections=["MedicationRequest/draft-gcv"], prefetch=full_prefetch())
    assert_dose_card(call_hook(client, body))


# --------------------------------------------------------------------------------------------------
# 4. Routing: 404, 405, 413
# --------------------------------------------------------------------------------------------------


def test_unknown_service_id_is_404(client: FlaskClient) -> None:
    issue = check_error(client.post("/cds-services/no-such-service", json=gcv_request()), 404)
    assert expression(issue) == "id"
    issue = check_error(client.post("/cds-services/no-such-service/feedback", json={"feedback": []}), 404)
    assert expression(issue) == "id"


def test_get_on_a_service_is_405(client: FlaskClient) -> None:
    response = client.get(SELECT_URL, json=gcv_request())
    check_error(response, 405)
    assert "POST" in response.headers.get("Allow", "")


@pytest.mark.parametrize(
    ("method", "path"),
    [("GET", "/"), ("GET", "/no/such/route"), ("POST", "/cds-services/x/y/z"), ("GET", "/cds-services/x/feedback/1")],
)
def test_unknown_route_is_404_json(client: FlaskClient, method: str, path: str) -> None:
    response = client.open(path, method=method)
    check_error(response, 404)
    assert "<html" not in response.get_data(as_text=True).lower()


def test_body_over_the_cap_is_413_json(tmp_path: Path) -> None:
    app = create_app(
        {"require_auth": False, "database_url": f"sqlite:///{tmp_path / 'small.sqlite3'}", "max_body_bytes": 1024}
    )
    try:
        client = app.test_client()
        body = gcv_request()
        assert len(json.dumps(body)) > 1024
        for response in (
            client.post(SELECT_URL, json=body),
            client.post(f"{SELECT_URL}/feedback", data=b"x" * 2048, content_type="application/json"),
        ):
            issue = check_error(response, 413)
            # The client is told the limit and the operator the setting that changes it.
            assert issue["code"] == "too-costly"
            assert issue["diagnostics"] == (
                "request body larger than the service's limit of 1024 bytes (set by CMV_CDS_MAX_BODY_BYTES)"
            )
    finally:
        app.extensions["cmv_cds"]["store"].dispose()


# --------------------------------------------------------------------------------------------------
# 5. Feedback
# --------------------------------------------------------------------------------------------------

NOW = "2026-03-01T10:15:30Z"


def _issued_card(client: FlaskClient) -> tuple[str, str]:
    """Call the hook; return the dose card's uuid and its suggestion's uuid."""
    card = assert_dose_card(call_hook(client, gcv_request()))
    return card["uuid"], card["suggestions"][0]["uuid"]


def _accepted(card_uuid: str, suggestion_uuid: str) -> dict[str, Any]:
    """The feedback item for a card whose suggestion was accepted."""
    return {
        "card": card_uuid,
        "outcome": "accepted",
        "acceptedSuggestions": [{"id": suggestion_uuid}],
        "outcomeTimestamp": NOW,
    }


def post_feedback(client: FlaskClient, body: Any, service_id: str = SELECT_ID) -> dict[str, Any]:
    response = client.post(f"/cds-services/{service_id}/feedback", json=body)
    assert response.status_code == 200, response.get_data(as_text=True)
    assert response.mimetype == "application/json"
    result: dict[str, Any] = response.get_json()
    return result


def test_feedback_accepted_is_stored_against_the_issued_card(client: FlaskClient, store_of: FeedbackStore) -> None:
    card_uuid, suggestion_uuid = _issued_card(client)
    item = _accepted(card_uuid, suggestion_uuid)
    assert post_feedback(client, {"feedback": [item]}) == {"stored": 1, "unknownCards": 0}
    (row,) = store_of.list_feedback()
    assert (row.card_uuid, row.service_id, row.outcome) == (card_uuid, SELECT_ID, "accepted")
    assert row.accepted_suggestions == (suggestion_uuid,)
    assert row.known_card is True
    assert row.rule_id == "dose-adjust"
    assert row.unknown_suggestions == ()


def test_feedback_overridden_with_reason_is_stored(client: FlaskClient, store_of: FeedbackStore) -> None:
    card_uuid, _ = _issued_card(client)
    reason = {
        "code": "risk-benefit-ratio",
        "system": "http://terminology.hl7.org/CodeSystem/non-adherence-reason-codes",
        "display": "Benefit outweighs the risk for this patient",
    }
    item = {
        "card": card_uuid,
        "outcome": "overridden",
        "overrideReason": {"reason": reason, "userComment": "ID consult advised full dose"},
        "outcomeTimestamp": NOW,
    }
    assert post_feedback(client, {"feedback": [item]}) == {"stored": 1, "unknownCards": 0}
    (row,) = store_of.list_feedback()
    assert row.outcome == "overridden"
    assert (row.override_code, row.override_system, row.override_display) == (
        reason["code"],
        reason["system"],
        reason["display"],
    )
    assert row.user_comment == "ID consult advised full dose"
    assert row.known_card is True


def test_feedback_for_an_unknown_card_is_stored_and_flagged(client: FlaskClient, store_of: FeedbackStore) -> None:
    item = {"card": "00000000-0000-4000-8000-000000000000", "outcome": "overridden", "outcomeTimestamp": NOW}
    assert post_feedback(client, {"feedback": [item]}) == {"stored": 1, "unknownCards": 1}
    (row,) = store_of.list_feedback()
    assert row.known_card is False
    assert row.rule_id is None


def test_feedback_for_a_card_of_the_other_service_is_unknown(client: FlaskClient, store_of: FeedbackStore) -> None:
    card_uuid, _ = _issued_card(client)  # issued by the order-select service
    item = {"card": card_uuid, "outcome": "overridden", "outcomeTimestamp": NOW}
    assert post_feedback(client, {"feedback": [item]}, service_id=SIGN_ID) == {"stored": 1, "unknownCards": 1}


def test_repeated_feedback_is_not_duplicated(client: FlaskClient, store_of: FeedbackStore) -> None:
    card_uuid, suggestion_uuid = _issued_card(client)
    item = _accepted(card_uuid, suggestion_uuid)
    assert post_feedback(client, {"feedback": [item]}) == {"stored": 1, "unknownCards": 0}
    assert post_feedback(client, {"feedback": [item]}) == {"stored": 0, "unknownCards": 0}
    assert post_feedback(client, {"feedback": [item, copy.deepcopy(item)]})["stored"] == 0
    assert len(store_of.list_feedback()) == 1


_GOOD_ITEM = {"card": "c-1", "outcome": "overridden", "outcomeTimestamp": NOW}

BAD_FEEDBACK: list[tuple[Any, ...]] = [
    ("missing-outcome", {"feedback": [without(_GOOD_ITEM, "outcome")]}, "feedback[0].outcome"),
    ("outcome-maybe", {"feedback": [_GOOD_ITEM | {"outcome": "maybe"}]}, "feedback[0].outcome"),
    (
        "accepted-without-suggestions",
        {"feedback": [_GOOD_ITEM | {"outcome": "accepted"}]},
        "feedback[0].acceptedSuggestions",
    ),
    (
        "timestamp-yesterday",
        {"feedback": [_GOOD_ITEM | {"outcomeTimestamp": "yesterday"}]},
        "feedback[0].outcomeTimestamp",
    ),
    (
        "timestamp-not-a-date",
        {"feedback": [_GOOD_ITEM | {"outcomeTimestamp": "2026-02-30T10:00:00Z"}]},
        "feedback[0].outcomeTimestamp",
    ),
    ("missing-card", {"feedback": [without(_GOOD_ITEM, "card")]}, "feedback[0].card"),
    ("feedback-not-list", {"feedback": _GOOD_ITEM}, "feedback"),
    ("feedback-empty", {"feedback": []}, "feedback"),
    ("missing-feedback", {}, "feedback"),
    ("not-json", b"feedback", None),
    ("json-array", b"[]", None),
]


@pytest.mark.parametrize(("body", "expected"), cases(BAD_FEEDBACK))
def test_invalid_feedback_is_400(client: FlaskClient, store_of: FeedbackStore, body: Any, expected: str | None) -> None:
    issue = post_error(client, body, 400, url=f"{SELECT_URL}/feedback")
    assert expression(issue) == expected
    assert store_of.list_feedback() == []


@pytest.mark.parametrize("name", ["accepted", "overridden-no-reason", "overridden-with-reason"])
def test_spec_feedback_examples_are_accepted(client: FlaskClient, store_of: FeedbackStore, name: str) -> None:
    path = SPEC_EXAMPLES / f"cds-hooks-2.0.1.feedback-{name}.json"
    example = json.loads(path.read_text(encoding="utf-8"))
    assert post_feedback(client, example) == {"stored": 1, "unknownCards": 1}
    (row,) = store_of.list_feedback()
    assert row.card_uuid == example["feedback"][0]["card"]


# --------------------------------------------------------------------------------------------------
# 6. order-sign
# --------------------------------------------------------------------------------------------------


def test_order_sign_gives_the_dose_card_without_selections(client: FlaskClient, rsps: responses.RequestsMock) -> None:
    body = order_select([gcv()], prefetch=full_prefetch(), hook="order-sign")
    assert "selections" not in body["context"]
    assert_dose_card(call_hook(client, body, url=SIGN_URL))
    assert len(rsps.calls) == 0


def test_order_sign_rejects_an_order_select_body(client: FlaskClient) -> None:
    issue = post_error(client, gcv_request(), 400, url=SIGN_URL)
    assert expression(issue) == "hook"


# --------------------------------------------------------------------------------------------------
# 7. The error edge
# --------------------------------------------------------------------------------------------------


def test_unexpected_exception_is_an_opaque_500(
    client: FlaskClient, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def explode(*_args: Any, **_kwargs: Any) -> Any:
        raise RuntimeError("secret internal detail pat-cmv-1")

    monkeypatch.setattr("service.app.run_hook", explode)
    with caplog.at_level(logging.ERROR, logger="cmv_cds.errors"):
        response = client.post(SELECT_URL, json=gcv_request())
    issue = check_error(response, 500)
    assert issue["code"] == "exception"
    records = [r for r in caplog.records if r.name == "cmv_cds.errors" and hasattr(r, "error_id")]
    assert len(records) == 1
    error_id = str(getattr(records[0], "error_id"))  # noqa: B009
    assert re.fullmatch(r"[0-9a-f-]{36}", error_id)
    assert error_id in issue["diagnostics"]
    assert records[0].exc_info is not None
    text = response.get_data(as_text=True)
    for leak in ("Traceback", "RuntimeError", "secret internal detail", "pat-cmv-1", 'File "'):
        assert leak not in text


def test_error_responses_are_json_operation_outcomes(client: FlaskClient) -> None:
    """One of each status through the same checker (content type + OperationOutcome)."""
    check_error(client.post(SELECT_URL, data=b"nope", content_type="application/json"), 400)
    check_error(client.post("/cds-services/nope", json=gcv_request()), 404)
    check_error(client.put(SELECT_URL, json=gcv_request()), 405)
    check_error(client.post(SELECT_URL, json=gcv_request(without(full_prefetch(), "labs"))), 412)


@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded", None])
def test_non_json_content_type_is_415(client: FlaskClient, content_type: str | None) -> None:
    headers = {"Content-Type": content_type} if content_type else {}
    response = client.post(SELECT_URL, data=json.dumps(gcv_request()), headers=headers)
    assert response.status_code == 415
    assert response.get_json()["resourceType"] == "OperationOutcome"


def test_fhir_json_content_type_is_accepted(client: FlaskClient) -> None:
    response = client.post(
        SELECT_URL, data=json.dumps(gcv_request()), headers={"Content-Type": "application/fhir+json; charset=utf-8"}
    )
    assert response.status_code == 200


TOO_DEEP = "request body is nested too deeply: JSON arrays and objects may be nested at most 1024 levels deep"


@pytest.mark.parametrize(
    "body",
    [
        b'{"hook":"order-select","hookInstance":"x","context":' + b'{"a":' * 1100 + b"1" + b"}" * 1100 + b"}",
        b'{"hook":"order-select","hookInstance":"x","context":' + b'{"a":' * 20000 + b"1" + b"}" * 20000 + b"}",
        b"[" * 100_000 + b"]" * 100_000,
    ],
    ids=["objects-1100", "objects-20000", "array-100000"],
)
def test_absurdly_nested_json_is_400_too_deep(client: FlaskClient, body: bytes) -> None:
    """Valid JSON nested past 1024 levels (orjson's limit) is refused as too deeply nested, never a
    RecursionError, and not called invalid JSON (it is not)."""
    issue = check_error(client.post(SELECT_URL, data=body, content_type="application/json"), 400)
    assert issue["diagnostics"] == TOO_DEEP


def test_broken_json_is_still_called_invalid(client: FlaskClient) -> None:
    issue = check_error(client.post(SELECT_URL, data=b'{"hook": ', content_type="application/json"), 400)
    assert issue["diagnostics"] == "request body is not valid JSON (UTF-8)"
