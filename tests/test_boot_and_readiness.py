"""Workers boot without the database; readiness reports it; `cmv-cds migrate` is the schema step.

Real databases: a PostgreSQL URL on a port where nothing listens, the throwaway cluster (tests/pg_cluster.py),
and SQLite files. The same under gunicorn, with a worker restarting during an outage, is in tests/test_faults.py.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from fhir_fixtures import load, order_select, patient_resources, prefetch_for
from flask import Flask
from jwt_support import ISSUER, claims, ec_p384_key, jwks, mint, public_jwk
from pg_cluster import PgCluster
from pg_cluster import postgres_cluster as postgres_cluster  # fixture, requested by name
from processes import free_loopback_port
from psycopg import sql

from service import cli, lifecycle
from service.app import create_app

SELECT_URL = "/cds-services/cmv-antiviral-order-select"
FEEDBACK_URL = SELECT_URL + "/feedback"
LOCAL = "http://localhost"
KEY = ec_p384_key()


def nowhere() -> str:
    """A PostgreSQL URL where no server listens: connections are refused at once."""
    return f"postgresql+psycopg://postgres@127.0.0.1:{free_loopback_port()}/feedback?connect_timeout=2"


def hook_body() -> dict[str, Any]:
    return order_select([load("draft-ganciclovir.json")], prefetch=prefetch_for(patient_resources()))


def token(path: str) -> dict[str, str]:
    return {"Authorization": "Bearer " + mint(KEY, kid="k1", payload=claims(aud=LOCAL + path))}


def auth_on(database_url: str, tmp_path: Path) -> dict[str, Any]:
    issuers = {ISSUER: {"jwks": jwks(public_jwk(KEY, "k1"))}}
    return {
        "require_auth": True,
        "trusted_issuers": json.dumps(issuers),
        "database_url": database_url,
        "spool_dir": str(tmp_path / "spool"),
    }


def feedback_on(card_uuid: str) -> dict[str, Any]:
    return {"feedback": [{"card": card_uuid, "outcome": "overridden", "outcomeTimestamp": "2026-03-01T10:15:30Z"}]}


@pytest.fixture
def apps() -> Iterator[list[Flask]]:
    built: list[Flask] = []
    yield built
    for app in built:
        app.extensions["cmv_cds"]["store"].dispose()
    lifecycle.reset()


def test_auth_off_serves_hook_calls_with_the_database_down(tmp_path: Path, apps: list[Flask]) -> None:
    app = create_app({"require_auth": False, "database_url": nowhere(), "spool_dir": str(tmp_path / "spool")})
    apps.append(app)
    client = app.test_client()

    response = client.post(SELECT_URL, json=hook_body())
    assert response.status_code == 200
    assert response.get_json()["cards"], "the cards are computed without the database"
    assert client.get("/healthz").status_code == 200
    ready = client.get("/readyz")
    assert ready.status_code == 503
    assert ready.get_json()["issue"][0]["diagnostics"] == "feedback database unreachable"
    feedback = client.post(FEEDBACK_URL, json=feedback_on(response.get_json()["cards"][0]["uuid"]))
    assert feedback.status_code == 503
    assert feedback.get_json()["issue"][0]["code"] == "transient"
    assert list((tmp_path / "spool").glob("cards-*.jsonl")), "the issued cards wait in the spool"


def test_auth_on_fails_closed_with_a_503_while_the_database_is_down(tmp_path: Path, apps: list[Flask]) -> None:
    """A valid token cannot be checked against the replay table: 503 (retry), never accepted unchecked."""
    app = create_app(auth_on(nowhere(), tmp_path))
    apps.append(app)
    client = app.test_client()

    response = client.post(SELECT_URL, json=hook_body(), headers=token(SELECT_URL))
    assert response.status_code == 503
    assert response.get_json()["issue"][0]["code"] == "transient"
    assert client.post(SELECT_URL, json=hook_body()).status_code == 401, "no token is still a 401"
    assert client.get("/healthz").status_code == 200


@pytest.mark.postgres
def test_the_service_recovers_when_the_database_returns(
    tmp_path: Path, postgres_cluster: PgCluster, apps: list[Flask]
) -> None:
    """Booted during an outage (the database refuses connections), it serves once the database is back:
    readiness turns ready, the replay table and the schema are created on first use, the spooled cards
    are written and feedback on them is known."""
    url = postgres_cluster.create_database()
    name = url.rsplit("/", 1)[1]
    with postgres_cluster.outage(name):
        app = create_app(auth_on(url, tmp_path))
        apps.append(app)
        client = app.test_client()
        assert client.post(SELECT_URL, json=hook_body(), headers=token(SELECT_URL)).status_code == 503
        assert client.get("/readyz").status_code == 503

    assert client.get("/readyz").get_json() == {"status": "ready", "database": "ok"}
    response = client.post(SELECT_URL, json=hook_body(), headers=token(SELECT_URL))
    assert response.status_code == 200
    card_uuid = response.get_json()["cards"][0]["uuid"]
    stored = client.post(FEEDBACK_URL, json=feedback_on(card_uuid), headers=token(FEEDBACK_URL))
    assert stored.status_code == 200
    assert stored.get_json() == {"stored": 1, "unknownCards": 0}


def test_readiness_is_off_while_draining(client: Any) -> None:
    assert client.get("/readyz").status_code == 200
    lifecycle.start_draining()
    try:
        response = client.get("/readyz")
        assert response.status_code == 503
        assert response.get_json()["issue"][0]["diagnostics"].startswith("shutting down")
        assert client.get("/healthz").status_code == 200, "still live: it answers what it has"
    finally:
        lifecycle.reset()


# --- cmv-cds migrate ------------------------------------------------------------------------------------

TABLES = {"issued_card", "card_feedback", "jwt_replay"}


def tables(url: str) -> set[str]:
    engine = sa.create_engine(url)
    try:
        return set(sa.inspect(engine).get_table_names())
    finally:
        engine.dispose()


def test_migrate_creates_every_table_and_is_idempotent(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    url = f"sqlite:///{tmp_path / 'feedback.sqlite3'}"
    assert cli.main(["migrate", "--database-url", url]) == 0
    assert cli.main(["migrate", "--database-url", url]) == 0
    assert tables(url) == TABLES
    assert capsys.readouterr().out == f"cmv-cds migrate: schema up to date at {url}\n" * 2


def test_migrate_without_a_database_is_one_line_and_status_1(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["migrate", "--database-url", nowhere(), "--wait", "0"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("cmv-cds migrate: database error at postgresql+psycopg://postgres@127.0.0.1:")
    assert err.count("\n") == 1


def test_migrate_configuration_error_is_status_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["migrate", "--database-url", "mysql://x@y/z"]) == 2
    assert "configuration error" in capsys.readouterr().err


@pytest.mark.postgres
def test_a_service_user_without_ddl_rights_runs_after_migrate(
    tmp_path: Path, postgres_cluster: PgCluster, apps: list[Flask]
) -> None:
    """The deployment's split: `cmv-cds migrate` as the owner creates the tables; the service's own database
    user may only read and write rows. Before the migration that service is not ready (503, saying why)."""
    url = postgres_cluster.create_database()
    name = url.rsplit("/", 1)[1]
    role = f"svc_{name[-8:]}"
    with postgres_cluster.connect(name) as admin:
        admin.execute(sql.SQL("CREATE ROLE {} LOGIN").format(sql.Identifier(role)))
        admin.execute(sql.SQL("REVOKE CREATE ON SCHEMA public FROM PUBLIC"))
        grant = "ALTER DEFAULT PRIVILEGES IN SCHEMA public GRANT SELECT, INSERT, UPDATE, DELETE ON TABLES TO {}"
        admin.execute(sql.SQL(grant).format(sql.Identifier(role)))
    service_url = f"postgresql+psycopg://{role}@{postgres_cluster.host}:{postgres_cluster.port}/{name}"
    app = create_app(auth_on(service_url, tmp_path))
    apps.append(app)
    client = app.test_client()
    not_ready = client.get("/readyz")
    assert not_ready.status_code == 503
    assert "run `cmv-cds migrate`" in not_ready.get_json()["issue"][0]["diagnostics"]
    assert client.post(SELECT_URL, json=hook_body(), headers=token(SELECT_URL)).status_code == 503

    assert cli.main(["migrate", "--database-url", url, "--wait", "0"]) == 0

    assert client.get("/readyz").status_code == 200
    assert client.post(SELECT_URL, json=hook_body(), headers=token(SELECT_URL)).status_code == 200
