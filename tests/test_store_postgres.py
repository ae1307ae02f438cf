"""Feedback store behaviour that only PostgreSQL can show, on a real throwaway cluster (no mocks).

The behaviour shared with SQLite runs on both backends in test_store.py (its ``postgres`` parameter).
Here: several workers creating the schema and writing the same feedback at once, connections dropped
by the server (``pool_pre_ping``), a database that refuses connections, column types and time zones.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from typing import Any

import pytest
from concurrency import run_concurrently
from pg_cluster import PgCluster
from pg_cluster import postgres_cluster as postgres_cluster  # fixture, requested by name
from processes import free_loopback_port
from psycopg import sql
from sqlalchemy import inspect
from sqlalchemy.exc import OperationalError

from service.store import FeedbackResult, FeedbackStore, IssuedCard

pytestmark = pytest.mark.postgres

SERVICE = "cmv-antiviral-order-select"


@pytest.fixture
def database(request: pytest.FixtureRequest) -> tuple[PgCluster, str]:
    """A fresh database on the module's cluster: (cluster, database name)."""
    cluster: PgCluster = request.getfixturevalue("postgres_cluster")
    url = cluster.create_database()
    return cluster, url.rsplit("/", 1)[1]


@pytest.fixture
def store(database: tuple[PgCluster, str]) -> Iterator[FeedbackStore]:
    cluster, name = database
    feedback_store = FeedbackStore(cluster.url(name))
    feedback_store.create_schema()
    yield feedback_store
    feedback_store.dispose()


def overridden(card: str, at: str = "2026-03-01T10:15:30Z") -> dict[str, Any]:
    return {"card": card, "outcome": "overridden", "outcomeTimestamp": at}


def test_cluster_is_a_real_postgresql_15_or_later(postgres_cluster: PgCluster) -> None:
    with postgres_cluster.connect() as conn:
        row = conn.execute("SELECT current_setting('server_version_num')::int, current_user").fetchone()
    assert row is not None
    assert row[0] >= 150000
    assert row[1] == "postgres"


def test_workers_creating_the_schema_at_once(database: tuple[PgCluster, str]) -> None:
    cluster, name = database
    stores = [FeedbackStore(cluster.url(name)) for _ in range(6)]

    errors = run_concurrently([store.create_schema for store in stores])

    assert errors == []
    assert {"issued_card", "card_feedback"} <= set(inspect(stores[0].engine).get_table_names())
    for store in stores:
        store.dispose()


def test_workers_storing_the_same_feedback_at_once(store: FeedbackStore, database: tuple[PgCluster, str]) -> None:
    cluster, name = database
    others = [FeedbackStore(cluster.url(name)) for _ in range(3)]
    card = str(uuid.uuid4())
    store.record_cards(SERVICE, "hook-1", [IssuedCard(card, "rule-a", "warning", ())])
    batch = [overridden(card, at=f"2026-03-01T10:00:{n:02d}Z") for n in range(20)]
    results: list[FeedbackResult] = []

    def send(target: FeedbackStore) -> Callable[[], None]:
        return lambda: results.append(target.store_feedback(SERVICE, batch))

    errors = run_concurrently([send(target) for target in [store, *others]])

    assert errors == []
    assert sum(result.stored for result in results) == 20
    assert sum(result.duplicates for result in results) == 3 * 20
    assert len(store.list_feedback(SERVICE)) == 20
    for other in others:
        other.dispose()


def test_connections_dropped_by_the_server_are_replaced(store: FeedbackStore, database: tuple[PgCluster, str]) -> None:
    cluster, name = database
    assert store.ping()  # a pooled connection now exists
    cluster.terminate_connections(name)

    # pool_pre_ping notices the dead connection and opens a new one: no error reaches the caller.
    assert store.store_feedback(SERVICE, [overridden(str(uuid.uuid4()))]).stored == 1
    assert len(store.list_feedback()) == 1


def test_a_database_outage_raises_and_recovers(store: FeedbackStore, database: tuple[PgCluster, str]) -> None:
    cluster, name = database
    card = str(uuid.uuid4())
    with cluster.outage(name):
        assert store.ping() is False
        with pytest.raises(OperationalError):
            store.store_feedback(SERVICE, [overridden(card)])
        with pytest.raises(OperationalError):
            store.record_cards(SERVICE, "hook-1", [IssuedCard(card, "rule-a", "info", ())])
        with pytest.raises(OperationalError):
            store.list_feedback()

    assert store.ping() is True
    assert store.store_feedback(SERVICE, [overridden(card)]).stored == 1


def test_no_server_at_all() -> None:
    store = FeedbackStore(f"postgresql+psycopg://postgres@127.0.0.1:{free_loopback_port()}/feedback?connect_timeout=2")
    assert store.ping() is False
    with pytest.raises(OperationalError):
        store.create_schema()
    with pytest.raises(OperationalError):
        store.store_feedback(SERVICE, [overridden(str(uuid.uuid4()))])
    store.dispose()


def test_plain_postgresql_url_works(database: tuple[PgCluster, str]) -> None:
    cluster, name = database
    store = FeedbackStore(f"postgresql://postgres@{cluster.host}:{cluster.port}/{name}")
    store.create_schema()
    assert store.store_feedback(SERVICE, [overridden(str(uuid.uuid4()))]).stored == 1
    store.dispose()


def test_timestamps_are_timestamptz_and_read_back_in_utc(database: tuple[PgCluster, str]) -> None:
    cluster, name = database
    with cluster.connect() as admin:  # a session time zone far from UTC
        admin.execute(sql.SQL("ALTER DATABASE {} SET timezone TO 'Asia/Kathmandu'").format(sql.Identifier(name)))
    store = FeedbackStore(cluster.url(name))
    store.create_schema()
    card = str(uuid.uuid4())
    store.store_feedback(SERVICE, [overridden(card, at="2026-03-01T23:30:00-05:00")])

    [row] = store.list_feedback()
    assert row.outcome_timestamp == datetime(2026, 3, 2, 4, 30, tzinfo=UTC)
    assert row.outcome_timestamp.tzinfo is UTC
    assert row.received_at.tzinfo is UTC
    with cluster.connect(name) as conn:
        types = dict(
            conn.execute(
                "SELECT column_name, data_type FROM information_schema.columns WHERE table_name = %s",
                ("card_feedback",),
            ).fetchall()
        )
    assert types["outcome_timestamp"] == "timestamp with time zone"
    assert types["received_at"] == "timestamp with time zone"
    assert types["known_card"] == "boolean"
    assert types["id"] == "bigint"
    store.dispose()
