"""The CDS governance report: ``FeedbackStore.report`` on SQLite and PostgreSQL, ``cmv-cds report`` (text and
JSON) and ``GET /cds-services/report`` (auth off, auth on; as the OpenAPI document says)."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from fhir_fixtures import load, order_select, patient_resources, prefetch_for
from flask import Flask
from flask.testing import FlaskClient
from jwt_support import claims, ec_p384_key, jwks, mint, public_jwk
from pg_cluster import database_url as database_url  # fixtures, requested by name (SQLite, then PostgreSQL)
from pg_cluster import postgres_cluster as postgres_cluster
from pg_cluster import store as store
from sqlalchemy import update
from sqlalchemy.orm import Session
from test_openapi import check_documented

from service import cli
from service.app import create_app
from service.store import FeedbackRow, FeedbackStore, IssuedCard, IssuedCardRow, OverrideReasonCount, RuleReport

SERVICE = "cmv-antiviral-order-select"
OTHER_SERVICE = "cmv-antiviral-order-sign"
REASONS = "http://terminology.hl7.org/CodeSystem/non-adherence-reason-codes"
RISK = {"system": REASONS, "code": "risk-benefit-ratio", "display": "Benefit outweighs the risk for this patient"}
ALTERNATIVE = {"system": REASONS, "code": "alternative-treatment", "display": "Alternative treatment in place"}


def new_id() -> str:
    return str(uuid.uuid4())


def accepted(card: str, suggestion: str, at: str = "2026-03-01T10:15:30Z") -> dict[str, Any]:
    return {"card": card, "outcome": "accepted", "acceptedSuggestions": [{"id": suggestion}], "outcomeTimestamp": at}


def overridden(card: str, reason: dict[str, str] | None = None, at: str = "2026-03-01T10:15:30Z") -> dict[str, Any]:
    item: dict[str, Any] = {"card": card, "outcome": "overridden", "outcomeTimestamp": at}
    if reason is not None:
        item["overrideReason"] = {"reason": reason, "userComment": "Patient-specific comment: never reported"}
    return item


class Issued:
    """Card uuids of ``populate``: dose-adjust a1, a2 (order-select) and a3 (order-sign); monitoring b1."""

    def __init__(self) -> None:
        self.a1, self.a2, self.a3, self.b1 = new_id(), new_id(), new_id(), new_id()
        self.suggestion = new_id()


def populate(store: FeedbackStore) -> Issued:
    ids = Issued()
    store.record_cards(
        SERVICE,
        "hook-1",
        [
            IssuedCard(ids.a1, "dose-adjust", "warning", (ids.suggestion,)),
            IssuedCard(ids.a2, "dose-adjust", "warning", ()),
            IssuedCard(ids.b1, "dose-confirmed-monitoring", "info", ()),
        ],
    )
    store.record_cards(OTHER_SERVICE, "hook-2", [IssuedCard(ids.a3, "dose-adjust", "warning", (ids.suggestion,))])
    store.store_feedback(
        SERVICE,
        [
            accepted(ids.a1, ids.suggestion),
            accepted(ids.a1, ids.suggestion, at="2026-03-01T10:20:00Z"),  # same card again: one accepted card
            overridden(ids.a2, RISK),
            overridden(ids.b1),  # no reason given
            overridden(ids.b1, ALTERNATIVE, at="2026-03-01T11:00:00Z"),
            overridden(ids.b1, ALTERNATIVE, at="2026-03-01T11:00:00Z"),  # an exact repeat: not stored twice
            accepted("never-issued-1", "s-x"),
            overridden("never-issued-2", RISK),
        ],
    )
    store.store_feedback(OTHER_SERVICE, [accepted(ids.a3, ids.suggestion)])
    return ids


# --- FeedbackStore.report (both backends) --------------------------------------------------------------


def test_report_counts_per_rule(store: FeedbackStore) -> None:
    populate(store)
    assert store.report() == [
        RuleReport(
            rule_id="dose-adjust",
            shown=3,
            accepted=2,
            overridden=1,
            override_reasons=(OverrideReasonCount(RISK["system"], RISK["code"], RISK["display"], 1),),
            unknown_card_feedback=0,
        ),
        RuleReport(
            rule_id="dose-confirmed-monitoring",
            shown=1,
            accepted=0,
            overridden=1,
            override_reasons=(
                OverrideReasonCount(ALTERNATIVE["system"], ALTERNATIVE["code"], ALTERNATIVE["display"], 1),
                OverrideReasonCount(None, None, None, 1),
            ),
            unknown_card_feedback=0,
        ),
        RuleReport(
            rule_id=None,
            shown=0,
            accepted=1,
            overridden=1,
            override_reasons=(OverrideReasonCount(RISK["system"], RISK["code"], RISK["display"], 1),),
            unknown_card_feedback=2,
        ),
    ]
    rates = {rule.rule_id: rule.acceptance_rate for rule in store.report()}
    assert rates == {"dose-adjust": pytest.approx(2 / 3), "dose-confirmed-monitoring": 0.0, None: None}


def test_report_for_one_service(store: FeedbackStore) -> None:
    populate(store)
    other = store.report(service_id=OTHER_SERVICE)
    assert [(r.rule_id, r.shown, r.accepted, r.overridden) for r in other] == [("dose-adjust", 1, 1, 0)]
    select = {r.rule_id: (r.shown, r.accepted, r.overridden, r.unknown_card_feedback) for r in store.report(SERVICE)}
    assert select == {"dose-adjust": (2, 1, 1, 0), "dose-confirmed-monitoring": (1, 0, 1, 0), None: (0, 1, 1, 2)}


def test_report_since(store: FeedbackStore) -> None:
    ids = populate(store)
    long_ago = datetime.now(UTC) - timedelta(days=30)
    with Session(store.engine) as session:  # a2 issued, and its override received, a month ago
        session.execute(update(IssuedCardRow).where(IssuedCardRow.uuid == ids.a2).values(issued_at=long_ago))
        session.execute(update(FeedbackRow).where(FeedbackRow.card_uuid == ids.a2).values(received_at=long_ago))
        session.commit()
    recent = {r.rule_id: r for r in store.report(since=datetime.now(UTC) - timedelta(days=1))}
    assert (recent["dose-adjust"].shown, recent["dose-adjust"].overridden) == (2, 0)
    assert recent["dose-adjust"].override_reasons == ()
    everything = {r.rule_id: r for r in store.report(since=long_ago - timedelta(seconds=1))}
    assert (everything["dose-adjust"].shown, everything["dose-adjust"].overridden) == (3, 1)
    assert store.report(since=datetime.now(UTC) + timedelta(days=1)) == []
    with pytest.raises(ValueError, match="aware"):
        store.report(since=datetime(2026, 1, 1))  # naive: refused


def test_report_of_an_empty_store(store: FeedbackStore) -> None:
    assert store.report() == []


def test_report_includes_cards_queued_for_write_behind(store: FeedbackStore) -> None:
    store.record_cards_later(SERVICE, "hook-3", [IssuedCard(new_id(), "pregnancy", "critical", ())])
    [rule] = store.report()
    assert (rule.rule_id, rule.shown) == ("pregnancy", 1)


# --- cmv-cds report ------------------------------------------------------------------------------------


@pytest.fixture
def populated_url(tmp_path: Path) -> str:
    url = f"sqlite:///{tmp_path / 'cli.sqlite3'}"
    feedback_store = FeedbackStore(url)
    feedback_store.create_schema()
    populate(feedback_store)
    feedback_store.dispose()
    return url


def test_cli_text_report(populated_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["report", "--database-url", populated_url]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0].startswith("CDS governance report: all services, all time")
    dose = next(line for line in lines if line.startswith("dose-adjust "))
    assert dose.split() == ["dose-adjust", "3", "2", "1", "66.7%"]
    monitoring = next(line for line in lines if line.startswith("dose-confirmed-monitoring "))
    assert monitoring.split() == ["dose-confirmed-monitoring", "1", "0", "1", "0.0%"]
    assert "override reasons:     1 × risk-benefit-ratio (Benefit outweighs the risk for this patient)" in out
    assert "1 × alternative-treatment (Alternative treatment in place)" in out
    assert "1 × (no reason given)" in out
    unknown = next(line for line in lines if line.startswith("(cards never issued)"))
    assert unknown.split()[-4:] == ["-", "1", "1", "-"]
    assert next(line for line in lines if line.startswith("total ")).split() == ["total", "4", "2", "2", "50.0%"]
    assert "Feedback items on cards this service never issued: 2" in out
    assert "never reported" not in out  # free-text comments are not part of the report


def test_cli_json_report_with_filters(
    populated_url: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CMV_CDS_DATABASE_URL", populated_url)  # the service's own setting, no flag
    assert cli.main(["report", "--service", SERVICE, "--since", "2020-01-01", "--format", "json"]) == 0
    document = json.loads(capsys.readouterr().out)
    assert document["serviceId"] == SERVICE
    assert document["since"] == "2020-01-01T00:00:00Z"
    rules = {rule["ruleId"]: rule for rule in document["rules"]}
    assert rules["dose-adjust"] == {
        "ruleId": "dose-adjust",
        "shown": 2,
        "accepted": 1,
        "overridden": 1,
        "acceptanceRate": 0.5,
        "overrideReasons": [{**RISK, "count": 1}],
        "unknownCardFeedback": 0,
    }
    assert rules[None]["unknownCardFeedback"] == 2
    assert document["totals"] == {
        "shown": 3,
        "accepted": 1,
        "overridden": 2,
        "acceptanceRate": pytest.approx(0.3333),
        "unknownCardFeedback": 2,
    }
    assert [r["ruleId"] for r in document["rules"]] == ["dose-adjust", "dose-confirmed-monitoring", None]


def test_cli_report_of_an_empty_store(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    url = f"sqlite:///{tmp_path / 'empty.sqlite3'}"
    FeedbackStore(url).create_schema()
    assert cli.main(["report", "--database-url", url]) == 0
    assert "No cards issued and no feedback received." in capsys.readouterr().out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["report", "--since", "last week"], "since must be a date"),
        (["report", "--since", "2026-02-30"], "since must be a date"),
        (["report", "--service", "no-such-service"], "unknown service 'no-such-service'"),
        (["report", "--format", "xml"], "invalid choice"),
    ],
)
def test_cli_report_usage_errors(argv: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert "usage: cmv-cds report" in err
    assert message in err


def test_cli_report_without_a_database(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "missing.sqlite3"
    assert cli.main(["report", "--database-url", f"sqlite:///{missing}"]) == 1
    err = capsys.readouterr().err
    assert err == f"cmv-cds report: no feedback database at sqlite:///{missing}\n"
    assert not missing.exists(), "the report must not create a database"


def test_cli_report_database_error_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    not_a_store = tmp_path / "other.sqlite3"
    not_a_store.write_bytes(b"")  # an empty file: a valid SQLite database without the tables
    assert cli.main(["report", "--database-url", f"sqlite:///{not_a_store}"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("cmv-cds report: database error at sqlite:///")
    assert "no such table" in err
    assert err.count("\n") == 1


# --- GET /cds-services/report --------------------------------------------------------------------------


def issue_and_feedback(client: FlaskClient) -> list[dict[str, Any]]:
    body = order_select([load("draft-ganciclovir.json")], prefetch=prefetch_for(patient_resources()))
    cards: list[dict[str, Any]] = client.post(f"/cds-services/{SERVICE}", json=body).get_json()["cards"]
    assert cards
    feedback = [overridden(cards[0]["uuid"], RISK), overridden("never-issued", None)]
    assert client.post(f"/cds-services/{SERVICE}/feedback", json={"feedback": feedback}).status_code == 200
    return cards


def test_http_report(client: FlaskClient) -> None:
    cards = issue_and_feedback(client)
    response = client.get("/cds-services/report")
    document = check_documented("GET", "/cds-services/report", response)
    rule_id = cards[0]["source"]["topic"]["code"]
    rules = {rule["ruleId"]: rule for rule in document["rules"]}
    assert rules[rule_id]["shown"] >= 1
    assert rules[rule_id]["overridden"] == 1
    assert rules[rule_id]["overrideReasons"] == [{**RISK, "count": 1}]
    assert rules[None]["unknownCardFeedback"] == 1
    assert document["serviceId"] is None
    assert document["since"] is None

    filtered = check_documented(
        "GET", "/cds-services/report", client.get(f"/cds-services/report?service={SERVICE}&since=2020-01-01")
    )
    assert filtered["serviceId"] == SERVICE
    assert filtered["since"] == "2020-01-01T00:00:00Z"
    assert filtered["rules"] == document["rules"]
    other = check_documented("GET", "/cds-services/report", client.get(f"/cds-services/report?service={OTHER_SERVICE}"))
    assert other["rules"] == []
    future = client.get("/cds-services/report?since=2999-01-01T00:00:00%2B02:00")
    assert check_documented("GET", "/cds-services/report", future)["rules"] == []


@pytest.mark.parametrize(
    ("query", "expression"),
    [
        ("since=yesterday", "since"),
        ("since=2026-13-01", "since"),
        ("service=report", "service"),
        ("service=", "service"),
    ],
)
def test_http_report_bad_parameters(client: FlaskClient, query: str, expression: str) -> None:
    response = client.get(f"/cds-services/report?{query}")
    assert response.status_code == 400
    body = check_documented("GET", "/cds-services/report", response)
    assert body["issue"][0]["expression"] == [expression]


def test_report_route_does_not_shadow_the_services(client: FlaskClient) -> None:
    """GET /cds-services/report is the report; POST there is a 405 (not a call of a service named "report"),
    and the hook, feedback and discovery routes answer as before."""
    response = client.post("/cds-services/report", json={})
    assert response.status_code == 405
    assert "GET" in response.headers["Allow"]
    assert "POST" not in response.headers["Allow"]
    assert client.get("/cds-services").status_code == 200
    issue_and_feedback(client)  # hook call and feedback: 200
    assert client.post("/cds-services/reports", json={}).status_code == 404  # just another unknown id
    assert client.post("/cds-services/report/feedback", json={"feedback": []}).status_code == 404


@pytest.fixture
def auth_app(tmp_path: Path) -> Iterator[tuple[Flask, Any]]:
    key = ec_p384_key()
    issuer = "https://ehr.example.org"
    trusted = json.dumps({issuer: {"jwks": jwks(public_jwk(key, "k1"))}})
    app = create_app(
        {"require_auth": True, "trusted_issuers": trusted, "database_url": f"sqlite:///{tmp_path / 'auth.sqlite3'}"}
    )

    def token(path: str) -> str:
        return mint(key, kid="k1", payload=claims(iss=issuer, aud=f"http://localhost{path}"))

    yield app, token
    app.extensions["cmv_cds"]["store"].dispose()


def test_http_report_needs_a_token(auth_app: tuple[Flask, Any]) -> None:
    app, token = auth_app
    client = app.test_client()
    response = client.get("/cds-services/report")
    assert response.status_code == 401
    assert response.headers["WWW-Authenticate"].startswith("Bearer ")
    check_documented("GET", "/cds-services/report", response)
    authorised = client.get(
        "/cds-services/report?since=2020-01-01", headers={"Authorization": f"Bearer {token('/cds-services/report')}"}
    )
    assert authorised.status_code == 200
    assert check_documented("GET", "/cds-services/report", authorised)["rules"] == []
