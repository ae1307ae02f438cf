"""Feedback store behaviour, run against SQLite (a file in tmp_path) and a real throwaway PostgreSQL.

The ``postgres`` parameter carries the ``postgres`` marker and is skipped when the PostgreSQL server
binaries are absent. SQLite-only concerns (WAL, relative paths, two workers on one file) are at the end;
PostgreSQL-only ones are in test_store_postgres.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from concurrency import run_concurrently
from pg_cluster import database_url as database_url  # fixtures, requested by name (SQLite, then PostgreSQL)
from pg_cluster import postgres_cluster as postgres_cluster
from pg_cluster import store as store
from sqlalchemy import event, inspect, text
from sqlalchemy.exc import OperationalError

from service.config import ConfigError
from service.errors import InvalidRequest
from service.store import FeedbackResult, FeedbackStore, IssuedCard, _dump

REPO_ROOT = Path(__file__).resolve().parents[1]
SERVICE = "cmv-antiviral-order-select"
OTHER_SERVICE = "cmv-antiviral-order-sign"


def accepted(card: str, *suggestions: str, at: str = "2026-03-01T10:15:30.25Z") -> dict[str, Any]:
    return {
        "card": card,
        "outcome": "accepted",
        "acceptedSuggestions": [{"id": s} for s in suggestions],
        "outcomeTimestamp": at,
    }


def overridden(card: str, at: str = "2026-03-01T10:15:30Z", reason: dict[str, Any] | None = None) -> dict[str, Any]:
    item: dict[str, Any] = {"card": card, "outcome": "overridden", "outcomeTimestamp": at}
    if reason is not None:
        item["overrideReason"] = reason
    return item


def new_id() -> str:
    return str(uuid.uuid4())


# --- shared behaviour (both backends) -------------------------------------------------------------


def test_feedback_on_known_and_unknown_cards(store: FeedbackStore) -> None:
    card, other_card = new_id(), new_id()
    s1, s2 = new_id(), new_id()
    store.record_cards(SERVICE, "hook-1", [IssuedCard(card, "cmv-ganciclovir-renal-dose", "warning", (s1, s2))])
    store.record_cards(OTHER_SERVICE, "hook-2", [IssuedCard(other_card, "cmv-other-rule", "info", ())])
    stray, stray_suggestion = new_id(), new_id()

    result = store.store_feedback(
        SERVICE,
        [
            accepted(card, s1, stray_suggestion),
            accepted(other_card, s1),  # issued, but by another service id
            accepted(stray, stray_suggestion),  # never issued
        ],
    )

    assert result == FeedbackResult(stored=3, unknown_cards=2, duplicates=0)
    rows = {row.card_uuid: row for row in store.list_feedback(SERVICE)}
    assert rows[card].known_card is True
    assert rows[card].rule_id == "cmv-ganciclovir-renal-dose"
    assert rows[card].accepted_suggestions == (s1, stray_suggestion)
    assert rows[card].unknown_suggestions == (stray_suggestion,)
    assert rows[card].service_id == SERVICE
    assert rows[card].outcome == "accepted"
    assert rows[other_card].known_card is False
    assert rows[other_card].rule_id is None
    assert rows[stray].known_card is False
    assert rows[stray].rule_id is None
    # With no issued card to compare against, every accepted id is unknown.
    assert rows[stray].unknown_suggestions == (stray_suggestion,)


def test_timestamps_are_aware_utc(store: FeedbackStore) -> None:
    cards = [new_id() for _ in range(4)]
    before = datetime.now(UTC)
    store.store_feedback(
        SERVICE,
        [
            overridden(cards[0], at="1985-04-12T23:20:50.52Z"),  # the spec's example
            overridden(cards[1], at="1996-12-19T16:39:57-08:00"),  # an offset is converted to UTC
            overridden(cards[2], at="2026-03-01t10:15:30.123456789z"),  # RFC 3339 allows t/z; ns truncated
            overridden(cards[3], at="2016-12-31T23:59:60Z"),  # a leap second
        ],
    )
    after = datetime.now(UTC)

    rows = {row.card_uuid: row for row in store.list_feedback()}
    expected = [
        datetime(1985, 4, 12, 23, 20, 50, 520000, tzinfo=UTC),
        datetime(1996, 12, 20, 0, 39, 57, tzinfo=UTC),
        datetime(2026, 3, 1, 10, 15, 30, 123456, tzinfo=UTC),
        datetime(2017, 1, 1, 0, 0, 0, tzinfo=UTC),
    ]
    for card, when in zip(cards, expected, strict=True):
        stamp = rows[card].outcome_timestamp
        assert stamp == when
        assert stamp.utcoffset() == timedelta(0)
        received = rows[card].received_at
        assert received.utcoffset() == timedelta(0)
        assert before - timedelta(seconds=1) <= received <= after + timedelta(seconds=1)


def test_repeated_feedback_is_stored_once(store: FeedbackStore) -> None:
    card, s1, s2 = new_id(), new_id(), new_id()
    store.record_cards(SERVICE, "hook-1", [IssuedCard(card, "rule-a", "warning", (s1, s2))])
    batch = [accepted(card, s1, s2, at="2026-03-01T10:00:00Z"), overridden(new_id())]

    assert store.store_feedback(SERVICE, batch) == FeedbackResult(stored=2, unknown_cards=1, duplicates=0)
    # The client retries the same request: nothing new, and not an error.
    assert store.store_feedback(SERVICE, batch) == FeedbackResult(stored=0, unknown_cards=0, duplicates=2)
    # Same instant in another offset, suggestions in another order, repeated ids: still the same item.
    same = accepted(card, s2, s1, s2, at="2026-03-01T11:00:00+01:00")
    assert store.store_feedback(SERVICE, [same, same]) == FeedbackResult(stored=0, unknown_cards=0, duplicates=2)
    assert len(store.list_feedback()) == 2

    # Anything that distinguishes the item makes a new row: time, suggestion set, outcome, service.
    different = [
        accepted(card, s1, s2, at="2026-03-01T10:00:01Z"),
        accepted(card, s1, at="2026-03-01T10:00:00Z"),
        overridden(card, at="2026-03-01T10:00:00Z"),
    ]
    assert store.store_feedback(SERVICE, different) == FeedbackResult(stored=3, unknown_cards=0, duplicates=0)
    assert store.store_feedback(OTHER_SERVICE, different[:1]).stored == 1
    assert len(store.list_feedback()) == 6


def test_overridden_with_reason_and_comment(store: FeedbackStore) -> None:
    card = new_id()
    store.record_cards(SERVICE, "hook-1", [IssuedCard(card, "cmv-valganciclovir-cytopenia", "critical", ())])
    reason = {
        "reason": {
            "code": "patient-declined",
            "system": "http://fhir.cmv-cds.org/CodeSystem/override-reason",
            "display": "Patient declined",
        },
        "userComment": "Discussed with ID consult; holding for now.",
    }
    coded_only = {"reason": {"code": "other", "system": "http://fhir.cmv-cds.org/CodeSystem/override-reason"}}
    comment_only = {"userComment": "no reason chosen"}
    second, third = new_id(), new_id()

    result = store.store_feedback(
        SERVICE,
        [
            overridden(card, reason=reason),
            overridden(second, reason=coded_only),
            overridden(third, reason=comment_only),
        ],
    )

    assert result.stored == 3
    rows = {row.card_uuid: row for row in store.list_feedback()}
    row = rows[card]
    assert row.outcome == "overridden"
    assert row.override_code == "patient-declined"
    assert row.override_system == "http://fhir.cmv-cds.org/CodeSystem/override-reason"
    assert row.override_display == "Patient declined"
    assert row.user_comment == "Discussed with ID consult; holding for now."
    assert row.accepted_suggestions == ()
    assert row.unknown_suggestions == ()
    assert row.known_card is True
    assert row.rule_id == "cmv-valganciclovir-cytopenia"
    assert (rows[second].override_code, rows[second].override_display, rows[second].user_comment) == (
        "other",
        None,
        None,
    )
    assert (rows[third].override_code, rows[third].override_system, rows[third].user_comment) == (
        None,
        None,
        "no reason chosen",
    )


def test_list_feedback_filters_by_service(store: FeedbackStore) -> None:
    first, second, third = new_id(), new_id(), new_id()
    store.store_feedback(SERVICE, [overridden(first), overridden(second)])
    store.store_feedback(OTHER_SERVICE, [overridden(third)])

    assert [row.card_uuid for row in store.list_feedback(SERVICE)] == [first, second]
    assert [row.card_uuid for row in store.list_feedback(OTHER_SERVICE)] == [third]
    assert {row.card_uuid for row in store.list_feedback()} == {first, second, third}
    assert store.list_feedback("no-such-service") == []


def test_record_cards(store: FeedbackStore) -> None:
    statements: list[str] = []
    event.listen(store.engine, "before_cursor_execute", lambda *args: statements.append(args[2]))

    store.record_cards(SERVICE, "hook-1", [])
    assert statements == []  # no round trip for an empty response

    card = IssuedCard(new_id(), "rule-a", "info", (new_id(),))
    store.record_cards(SERVICE, "hook-1", [card, IssuedCard(new_id(), "rule-b", "warning", ())])
    store.record_cards(SERVICE, "hook-1", [card])  # recording a uuid again is harmless
    with store.engine.connect() as conn:
        rows = conn.execute(
            text("SELECT service_id, rule_id, indicator, suggestion_uuids, hook_instance FROM issued_card")
        ).all()
    assert len(rows) == 2
    recorded = {row.rule_id: row for row in rows}
    assert recorded["rule-a"].service_id == SERVICE
    assert recorded["rule-a"].indicator == "info"
    assert recorded["rule-a"].hook_instance == "hook-1"
    assert json.loads(recorded["rule-a"].suggestion_uuids) == list(card.suggestion_uuids)
    assert json.loads(recorded["rule-b"].suggestion_uuids) == []


# Every ASCII character (control characters, quote, backslash, DEL), non-ASCII ones (a client's own ids), the
# ids the service makes, and the empty list.
STORED_ID_LISTS = [
    [f"id-{chr(code)}-x" for code in range(128)],
    ["ünïcode-id", "snowman-\u2603", "emoji-\U0001f489", "nbsp\u00a0", "line-sep\u2028", "lone-\ud800"],
    [str(uuid.uuid4()) for _ in range(3)],
    [],
]


@pytest.mark.parametrize("values", STORED_ID_LISTS, ids=["ascii", "non-ascii", "uuids", "empty"])
def test_stored_id_lists_are_written_exactly_as_json_dumps_writes_them(values: list[str]) -> None:
    # The text in the database does not depend on which encoder wrote it (service.store._dump).
    assert _dump(tuple(values)) == json.dumps(values, separators=(",", ":"))


def test_unparseable_timestamp_stores_nothing(store: FeedbackStore) -> None:
    batch = [overridden(new_id()), overridden(new_id(), at="2026-02-30T10:00:00Z")]  # schema-valid shape

    with pytest.raises(InvalidRequest) as caught:
        store.store_feedback(SERVICE, batch)

    assert caught.value.expression == "feedback[1].outcomeTimestamp"
    assert store.list_feedback() == []


def test_schema_is_idempotent_and_indexed(store: FeedbackStore) -> None:
    store.create_schema()  # again: a no-op
    store.create_schema()

    inspector = inspect(store.engine)
    assert {"issued_card", "card_feedback"} <= set(inspector.get_table_names())
    feedback_indexes = {tuple(ix["column_names"]) for ix in inspector.get_indexes("card_feedback")}
    assert {("service_id", "received_at"), ("card_uuid",)} <= feedback_indexes
    card_indexes = {tuple(ix["column_names"]) for ix in inspector.get_indexes("issued_card")}
    assert ("service_id", "issued_at") in card_indexes
    assert inspector.get_pk_constraint("issued_card")["constrained_columns"] == ["uuid"]
    unique = [tuple(uq["column_names"]) for uq in inspector.get_unique_constraints("card_feedback")]
    assert ("dedupe_key",) in unique


def test_ping(store: FeedbackStore) -> None:
    assert store.ping() is True


def test_empty_feedback_list(store: FeedbackStore) -> None:
    assert store.store_feedback(SERVICE, []) == FeedbackResult(stored=0, unknown_cards=0, duplicates=0)


# --- construction -----------------------------------------------------------------------------------


def test_unsupported_database_is_a_configuration_error() -> None:
    with pytest.raises(ConfigError, match="unsupported feedback database"):
        FeedbackStore("mysql://user@localhost/feedback")


@pytest.mark.parametrize("scheme", ["postgresql", "postgres", "postgresql+psycopg"])
def test_postgres_urls_use_psycopg3(scheme: str) -> None:
    store = FeedbackStore(f"{scheme}://cmv@db.invalid:5432/feedback")  # the engine connects lazily
    assert store.engine.url.drivername == "postgresql+psycopg"
    assert store.engine.pool._pre_ping is True
    store.dispose()


# --- SQLite specifics -------------------------------------------------------------------------------


def test_sqlite_runs_in_wal_mode_with_a_busy_timeout(tmp_path: Path) -> None:
    store = FeedbackStore(f"sqlite:///{tmp_path / 'wal.sqlite3'}")
    store.create_schema()
    with store.engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() == 5000
    store.dispose()


def test_relative_sqlite_path_is_relative_to_the_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    store = FeedbackStore("sqlite:///relative-feedback.sqlite3")
    store.create_schema()
    store.dispose()
    assert (tmp_path / "relative-feedback.sqlite3").is_file()


def test_sqlite_outage_raises_and_ping_reports_it(tmp_path: Path) -> None:
    store = FeedbackStore(f"sqlite:///{tmp_path / 'missing-dir' / 'feedback.sqlite3'}")
    assert store.ping() is False
    with pytest.raises(OperationalError):
        store.create_schema()
    with pytest.raises(OperationalError):
        store.store_feedback(SERVICE, [overridden(new_id())])
    with pytest.raises(OperationalError):
        store.record_cards(SERVICE, "hook-1", [IssuedCard(new_id(), "rule-a", "info", ())])
    store.dispose()


def test_two_stores_on_one_sqlite_file_write_concurrently(tmp_path: Path) -> None:
    """Two stores (as two gunicorn workers would have) create the schema at once and interleave writes."""
    url = f"sqlite:///{tmp_path / 'shared.sqlite3'}"
    stores = [FeedbackStore(url), FeedbackStore(url)]
    shared_card = new_id()
    results: list[FeedbackResult] = []
    lock = threading.Lock()

    def worker(store: FeedbackStore, worker_id: int) -> Callable[[], None]:
        def work() -> None:
            store.create_schema()
            for n in range(25):
                card = new_id()
                store.record_cards(SERVICE, f"hook-{worker_id}-{n}", [IssuedCard(card, "rule-a", "info", ())])
                result = store.store_feedback(
                    SERVICE,
                    [overridden(card), overridden(shared_card, at=f"2026-03-01T10:00:{n:02d}Z")],
                )
                with lock:
                    results.append(result)

        return work

    errors = run_concurrently([worker(store, i) for i, store in enumerate(stores)])

    assert errors == []
    assert len(results) == 50
    # Each worker's own card: 2 x 25 rows; the shared card's 25 timestamps are stored once each.
    assert sum(r.stored for r in results) == 75
    assert sum(r.duplicates for r in results) == 25
    assert len(stores[0].list_feedback()) == 75
    for feedback_store in stores:
        feedback_store.dispose()


_WORKER_SCRIPT = """
import sys, time
from service.store import FeedbackStore, IssuedCard
url, worker, start_at = sys.argv[1], sys.argv[2], float(sys.argv[3])
store = FeedbackStore(url)
time.sleep(max(0.0, start_at - time.time()))
store.create_schema()
for n in range(20):
    card = f"{worker}-{n}"
    store.record_cards("svc", f"hook-{card}", [IssuedCard(card, "rule-a", "info", ("s",))])
    at = f"2026-03-01T10:00:{n:02d}Z"
    store.store_feedback("svc", [
        {"card": card, "outcome": "accepted", "acceptedSuggestions": [{"id": "s"}], "outcomeTimestamp": at},
        {"card": "shared", "outcome": "overridden", "outcomeTimestamp": at},
    ])
store.dispose()
"""


def test_two_worker_processes_share_one_sqlite_file(tmp_path: Path) -> None:
    """The same, with two real processes starting at the same instant on a file that does not exist yet."""
    url = f"sqlite:///{tmp_path / 'workers.sqlite3'}"
    start_at = str(time.time() + 1.0)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))}
    workers = [
        subprocess.Popen(
            [sys.executable, "-c", _WORKER_SCRIPT, url, name, start_at],
            cwd=tmp_path,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for name in ("w1", "w2")
    ]
    try:
        outputs = [worker.communicate(timeout=60)[0] for worker in workers]
    finally:
        for worker in workers:  # a worker that timed out must not outlive the test
            if worker.poll() is None:
                worker.kill()
                worker.wait(timeout=10)

    assert [worker.returncode for worker in workers] == [0, 0], outputs
    store = FeedbackStore(url)
    rows = store.list_feedback("svc")
    assert len(rows) == 20 * 2 + 20  # each worker's cards, plus the shared card's 20 timestamps once
    assert all(row.known_card for row in rows if row.card_uuid != "shared")
    store.dispose()
