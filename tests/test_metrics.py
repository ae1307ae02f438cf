"""Prometheus metrics (``GET /metrics``, service/metrics.py): values, label vocabulary, auth, multiprocess mode.

Values are read from the endpoint's own text output, as before/after differences (the metrics are
process-wide and other tests also count). Multiprocess mode runs in subprocesses with
``PROMETHEUS_MULTIPROC_DIR`` set, as gunicorn's workers do; tests/test_cli.py checks it under gunicorn.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
import responses
from fhir_fixtures import PATIENT_ID
from flask import Flask
from flask.testing import FlaskClient
from jwt_support import claims, ec_p384_key, jwks, mint, public_jwk
from log_guard import sensitive_strings
from prometheus_client.parser import text_string_to_metric_families
from responses.matchers import query_string_matcher
from test_protocol import ACCESS_TOKEN, PREFETCH_KEYS, fhir_access, full_prefetch, gcv_request, serve
from test_protocol import template_url as fhir_url

from service import fhir_client, medication_refs, metrics
from service.app import create_app
from service.config import Settings
from service.fhir_client import FhirFetchError
from service.registry import SERVICES

REPO = Path(__file__).resolve().parents[1]
SELECT_ID = "cmv-antiviral-order-select"
HOOK_ROUTE = "/cds-services/<service:service_id>"
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(client: FlaskClient, **kwargs: Any) -> str:
    response = client.get("/metrics", **kwargs)
    assert response.status_code == 200, response.get_data(as_text=True)
    assert response.mimetype == "text/plain"
    return response.get_data(as_text=True)


def samples(text: str) -> Samples:
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(found: Samples, name: str, **labels: str) -> float:
    return found.get((name, frozenset(labels.items())), 0.0)


def make_app(tmp_path: Path, **config: Any) -> Flask:
    return create_app({"require_auth": False, "database_url": f"sqlite:///{tmp_path / 'metrics.sqlite3'}"} | config)


@pytest.fixture
def auth_app(tmp_path: Path) -> Iterator[Flask]:
    """Auth on, no trusted issuer: every authenticated call is refused."""
    application = make_app(tmp_path, require_auth=True)
    yield application
    application.extensions["cmv_cds"]["store"].dispose()


# --- values -----------------------------------------------------------------------------------------


def test_hook_call_is_counted_with_route_template_service_and_cards(client: FlaskClient) -> None:
    before = samples(scrape(client))
    response = client.post(f"/cds-services/{SELECT_ID}", json=gcv_request())
    assert response.status_code == 200
    cards = response.get_json()["cards"]
    assert cards
    after = samples(scrape(client))

    hook = {"method": "POST", "route": HOOK_ROUTE, "service_id": SELECT_ID, "status": "200"}
    assert (
        value(after, "cmv_cds_http_requests_total", **hook) - value(before, "cmv_cds_http_requests_total", **hook) == 1
    )
    timing = {"method": "POST", "route": HOOK_ROUTE}
    count = "cmv_cds_http_request_duration_seconds_count"
    assert value(after, count, **timing) - value(before, count, **timing) == 1
    assert value(after, "cmv_cds_http_request_duration_seconds_sum", **timing) > 0
    for card in cards:
        labels = {"service_id": SELECT_ID, "rule_id": card["source"]["topic"]["code"], "indicator": card["indicator"]}
        expected = sum(
            1
            for c in cards
            if (c["source"]["topic"]["code"], c["indicator"]) == (labels["rule_id"], labels["indicator"])
        )
        assert (
            value(after, "cmv_cds_cards_total", **labels) - value(before, "cmv_cds_cards_total", **labels) == expected
        )
    # The previous scrape is itself counted, with no service id.
    scraped = {"method": "GET", "route": "/metrics", "service_id": "", "status": "200"}
    assert value(after, "cmv_cds_http_requests_total", **scraped) >= 1


def test_errors_are_counted_by_status_without_echoing_the_path(client: FlaskClient) -> None:
    before = samples(scrape(client))
    assert client.post("/cds-services/no-such-service", json=gcv_request()).status_code == 404
    assert client.get("/no/such/path").status_code == 404
    after = samples(scrape(client))
    unknown_service = {"method": "POST", "route": HOOK_ROUTE, "service_id": "", "status": "404"}
    unmatched = {"method": "GET", "route": "unmatched", "service_id": "", "status": "404"}
    for labels in (unknown_service, unmatched):
        total = "cmv_cds_http_requests_total"
        assert value(after, total, **labels) - value(before, total, **labels) == 1


def test_fhir_fetches_are_timed_and_failures_counted_by_kind(client: FlaskClient) -> None:
    prefetch = full_prefetch()
    del prefetch["labs"], prefetch["conditions"]
    count = "cmv_cds_fhir_fetch_duration_seconds_count"
    before = samples(scrape(client))
    with responses.RequestsMock() as rsps:
        serve(rsps, fhir_url("labs"), json_body=full_prefetch()["labs"])
        serve(rsps, fhir_url("conditions"), json_body=full_prefetch()["conditions"])
        assert client.post(f"/cds-services/{SELECT_ID}", json=gcv_request(prefetch, **fhir_access())).status_code == 200
    after = samples(scrape(client))
    for key in ("labs", "conditions"):
        assert value(after, count, prefetch_key=key) - value(before, count, prefetch_key=key) == 1
    assert value(after, count, prefetch_key="patient") == value(before, count, prefetch_key="patient")

    # Failures, one key missing per call (after a first failure, fetches not yet started are cancelled).
    errors = "cmv_cds_fhir_fetch_errors_total"
    for key, kind, mock in (
        ("labs", "http_5xx", {"status": 503, "json": {"resourceType": "OperationOutcome"}}),
        ("conditions", "timeout", {"body": requests.ConnectTimeout("slow")}),
    ):
        one_missing = full_prefetch()
        del one_missing[key]
        before = samples(scrape(client))
        with responses.RequestsMock() as rsps:
            url, _, query = fhir_url(key).partition("?")
            rsps.get(url, match=[query_string_matcher(query)], **mock)
            response = client.post(f"/cds-services/{SELECT_ID}", json=gcv_request(one_missing, **fhir_access()))
        assert response.status_code == 412
        after = samples(scrape(client))
        labels = {"prefetch_key": key, "kind": kind}
        assert value(after, errors, **labels) - value(before, errors, **labels) == 1, (key, kind)
        assert value(after, count, prefetch_key=key) - value(before, count, prefetch_key=key) == 1


# --- no patient data in any label --------------------------------------------------------------------


def test_label_values_come_only_from_the_service_vocabulary(app: Flask, client: FlaskClient) -> None:
    """Whatever the requests carried, a label is a route template, a hosted service id, a status, one of the
    service's rule ids / indicators / prefetch keys / error kinds, or a histogram bound."""
    body = gcv_request()
    cards = client.post(f"/cds-services/{SELECT_ID}", json=body).get_json()["cards"]
    feedback = {"card": cards[0]["uuid"], "outcome": "overridden", "outcomeTimestamp": "2026-11-21T10:00:00Z"}
    client.post(f"/cds-services/{SELECT_ID}/feedback", json={"feedback": [feedback]})
    client.post(f"/cds-services/Patient-{PATIENT_ID}", json=body)  # an id-like unknown service
    client.get(f"/Patient/{PATIENT_ID}/$everything?name=Smith")
    client.open(f"/cds-services/{SELECT_ID}", method="PROPFIND")
    with responses.RequestsMock(assert_all_requests_are_fired=False):  # every fetch: ConnectionError
        prefetch = full_prefetch()
        del prefetch["labs"]
        client.post(f"/cds-services/{SELECT_ID}", json=gcv_request(prefetch, **fhir_access()))
    text = scrape(client)

    routes = {rule.rule for rule in app.url_map.iter_rules()} | {"unmatched"}
    rule_ids = {card["source"]["topic"]["code"] for card in cards}
    vocabulary = {
        "method": {"GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "other"},
        "route": routes,
        "service_id": set(SERVICES) | {""},
        "indicator": {"info", "warning", "critical"},
        "prefetch_key": set(PREFETCH_KEYS) | {medication_refs.METRIC_KEY},
        "kind": set(metrics.FETCH_ERROR_KINDS),
        "outcome": set(metrics.AUDIT_OUTCOMES),
    }
    seen: dict[str, set[str]] = {}
    for family in text_string_to_metric_families(text):
        if not family.name.startswith("cmv_cds_"):
            continue
        for sample in family.samples:
            for label, label_value in sample.labels.items():
                seen.setdefault(label, set()).add(label_value)
    assert {"method", "route", "service_id", "status", "rule_id", "indicator", "prefetch_key", "kind"} <= set(seen)
    for label, allowed in vocabulary.items():
        assert seen[label] <= allowed, (label, seen[label] - allowed)
    assert all(re.fullmatch(r"[1-5]\d\d", status) for status in seen["status"])
    assert all(re.fullmatch(r"[a-z0-9]+(-[a-z0-9]+)*", rule) for rule in seen["rule_id"])
    assert rule_ids <= seen["rule_id"]
    assert all(bound == "+Inf" or float(bound) >= 0 for bound in seen["le"])
    assert set(seen) <= {*vocabulary, "status", "rule_id", "le"}

    # ...and nothing of the requests anywhere in the output.
    for secret in (*sensitive_strings(), PATIENT_ID, body["hookInstance"], cards[0]["uuid"], ACCESS_TOKEN, "Smith"):
        assert secret not in text, secret


def test_fetch_error_kinds_cover_every_fhir_client_failure() -> None:
    """Each FhirFetchError message of service/fhir_client.py maps to a kind (not ``other``): keeps the two in step."""
    source = Path(fhir_client.__file__).read_text(encoding="utf-8")
    messages = re.findall(r'FhirFetchError\(f?"([^"]+)"', source)
    assert len(messages) >= 10
    for message in messages:
        concrete = message.replace("{resp.status_code}", "503")
        concrete = re.sub(r"\{[^}]*\}", "7", concrete)
        kind = metrics.fetch_error_kind(FhirFetchError(concrete))
        assert kind in metrics.FETCH_ERROR_KINDS
        assert kind != "other", message
    assert metrics.fetch_error_kind(FhirFetchError("FHIR server answered HTTP 401")) == "http_4xx"
    assert metrics.fetch_error_kind(FhirFetchError("FHIR server answered HTTP 302")) == "http_other"
    for cause, kind in (
        (requests.ReadTimeout(), "timeout"),
        (requests.ConnectionError(), "connection"),
        (requests.TooManyRedirects(), "transport"),
    ):
        error = FhirFetchError(f"FHIR server unreachable ({type(cause).__name__})")
        error.__cause__ = cause
        assert metrics.fetch_error_kind(error) == kind
    assert metrics.fetch_error_kind(FhirFetchError("something new")) == "other"


# --- authentication ------------------------------------------------------------------------------------


def test_metrics_need_a_token_by_default(auth_app: Flask) -> None:
    response = auth_app.test_client().get("/metrics")
    assert response.status_code == 401
    assert response.headers["WWW-Authenticate"].startswith("Bearer ")
    assert response.get_json()["resourceType"] == "OperationOutcome"


def test_metrics_with_a_valid_token(tmp_path: Path) -> None:
    key = ec_p384_key()
    issuer = "https://ehr.example.org"
    trusted = {issuer: {"jwks": jwks(public_jwk(key, "k1"))}}
    app = make_app(tmp_path, require_auth=True, trusted_issuers=json.dumps(trusted))
    try:
        token = mint(key, kid="k1", payload=claims(iss=issuer, aud="http://localhost/metrics"))
        response = app.test_client().get("/metrics", headers={"Authorization": f"Bearer {token}"})
        assert response.status_code == 200
        assert "cmv_cds_http_requests_total" in response.get_data(as_text=True)
    finally:
        app.extensions["cmv_cds"]["store"].dispose()


def test_metrics_public_when_configured(tmp_path: Path) -> None:
    app = make_app(tmp_path, require_auth=True, metrics_public=True)
    try:
        client = app.test_client()
        assert "cmv_cds_http_requests_total" in scrape(client)
        # Only /metrics is opened: the services and the report still need a token.
        assert client.get("/cds-services").status_code == 401
        assert client.get("/cds-services/report").status_code == 401
        assert client.post(f"/cds-services/{SELECT_ID}", json=gcv_request()).status_code == 401
    finally:
        app.extensions["cmv_cds"]["store"].dispose()


def test_metrics_public_setting_is_off_by_default() -> None:
    assert Settings.load(environ={}).metrics_public is False
    assert Settings.load(environ={"CMV_CDS_METRICS_PUBLIC": "true"}).metrics_public is True


# --- multiprocess mode ---------------------------------------------------------------------------------

_WORKER = textwrap.dedent(
    """
    import json, sys
    sys.path.insert(0, sys.argv[3])
    from fhir_fixtures import load, order_select, patient_resources, prefetch_for
    from service import metrics
    from service.app import create_app

    app = create_app({"require_auth": False, "database_url": sys.argv[1]})
    client = app.test_client()
    body = order_select([load("draft-ganciclovir.json")], prefetch=prefetch_for(patient_resources()))
    for _ in range(int(sys.argv[2])):
        assert client.post("/cds-services/cmv-antiviral-order-select", json=body).status_code == 200
    scraped = client.get("/metrics")
    app.extensions["cmv_cds"]["store"].dispose()
    print(json.dumps({"multiprocess": metrics.MULTIPROCESS, "metrics": scraped.get_data(as_text=True)}))
    """
)


def run_worker(calls: int, multiproc_dir: Path, database_url: str) -> dict[str, Any]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CMV_CDS_")}
    env["PROMETHEUS_MULTIPROC_DIR"] = str(multiproc_dir)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    completed = subprocess.run(
        [sys.executable, "-c", _WORKER, database_url, str(calls), str(REPO / "tests")],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    result: dict[str, Any] = json.loads(completed.stdout.strip().splitlines()[-1])
    return result


def test_multiprocess_mode_adds_up_the_processes(tmp_path: Path) -> None:
    """Two processes sharing PROMETHEUS_MULTIPROC_DIR (as gunicorn workers do): each scrape sees both."""
    directory = tmp_path / "prometheus"
    directory.mkdir()
    database_url = f"sqlite:///{tmp_path / 'shared.sqlite3'}"
    first = run_worker(2, directory, database_url)
    assert first["multiprocess"] is True
    assert sorted(path.name.split("_")[0] for path in directory.glob("*.db"))  # counter_<pid>.db, histogram_...
    second = run_worker(1, directory, database_url)
    hook = {"method": "POST", "route": HOOK_ROUTE, "service_id": SELECT_ID, "status": "200"}
    assert value(samples(first["metrics"]), "cmv_cds_http_requests_total", **hook) == 2
    assert value(samples(second["metrics"]), "cmv_cds_http_requests_total", **hook) == 3
    timing = {"method": "POST", "route": HOOK_ROUTE}
    assert value(samples(second["metrics"]), "cmv_cds_http_request_duration_seconds_count", **timing) == 3
    assert value(samples(second["metrics"]), "cmv_cds_cards_total", **_one_card_labels(second["metrics"])) >= 3


def _one_card_labels(text: str) -> dict[str, str]:
    for (name, labels), _count in samples(text).items():
        if name == "cmv_cds_cards_total":
            return dict(labels)
    raise AssertionError("no cmv_cds_cards_total sample")


# --- gunicorn hooks (service/gunicorn_conf.py) ---------------------------------------------------------


class FakeServer:
    def __init__(self) -> None:
        self.messages: list[str] = []
        self.log = self

    def info(self, message: str, *args: Any) -> None:
        self.messages.append(message % args)

    def warning(self, message: str, *args: Any) -> None:
        self.messages.append("WARNING " + message % args)


def test_gunicorn_hooks_are_gunicorn_settings() -> None:
    from service import cli, gunicorn_conf

    options = cli.gunicorn_options(cli.build_parser().parse_args(["serve"]), Settings.load())
    assert options["on_starting"] is gunicorn_conf.on_starting
    assert options["child_exit"] is gunicorn_conf.child_exit
    assert options["on_exit"] is gunicorn_conf.on_exit


def test_on_starting_makes_a_temporary_directory_and_on_exit_deletes_it(monkeypatch: pytest.MonkeyPatch) -> None:
    from service import gunicorn_conf

    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", "placeholder")  # restored after the test
    monkeypatch.delenv("PROMETHEUS_MULTIPROC_DIR")
    server = FakeServer()
    gunicorn_conf.on_starting(server)
    directory = Path(os.environ["PROMETHEUS_MULTIPROC_DIR"])
    assert directory.is_dir()
    assert f"Prometheus multiprocess directory: {directory}" in server.messages
    (directory / "counter_123.db").write_bytes(b"")
    gunicorn_conf.child_exit(server, type("Worker", (), {"pid": 123})())
    gunicorn_conf.on_exit(server)
    assert not directory.exists()


def test_on_starting_empties_a_configured_directory_of_old_metric_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from service import gunicorn_conf

    directory = tmp_path / "prometheus"
    directory.mkdir()
    for name in ("counter_11.db", "histogram_11.db", "gauge_livesum_11.db", "notes.txt"):
        (directory / name).write_bytes(b"")
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(directory))
    server = FakeServer()
    gunicorn_conf.on_starting(server)
    assert sorted(path.name for path in directory.iterdir()) == ["notes.txt"]
    assert os.environ["PROMETHEUS_MULTIPROC_DIR"] == str(directory)
    gunicorn_conf.on_exit(server)
    assert directory.is_dir(), "a configured directory is not deleted"
