"""The issued-card audit log (service/audit_log.py, through FeedbackStore.record_cards_later), SQLite and PostgreSQL.

Outages are real: a SQLite file that cannot be opened, a PostgreSQL database that refuses connections
(tests/pg_cluster.py). The spool is a real directory; a process death is a real SIGKILL of a child process.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
import pytest
from pg_cluster import PgCluster
from pg_cluster import postgres_cluster as postgres_cluster  # fixture, requested by name
from sqlalchemy.exc import OperationalError, ProgrammingError

from service import audit_log, metrics
from service import store as store_module
from service.store import FeedbackStore, IssuedCard

SERVICE = "cmv-antiviral-order-select"
REPO = Path(__file__).resolve().parents[1]
WAIT_SECONDS = 15.0


def card() -> IssuedCard:
    return IssuedCard(str(uuid.uuid4()), "dose-adjust", "warning", (str(uuid.uuid4()),))


def issued_uuids(url: str) -> set[str]:
    """The uuids in issued_card; none while the database or the table does not exist yet."""
    reader = FeedbackStore(url)
    try:
        with reader.engine.connect() as conn:
            return {row[0] for row in conn.exec_driver_sql("SELECT uuid FROM issued_card")}
    except (OperationalError, ProgrammingError):
        return set()
    finally:
        reader.dispose()


def wait_for(condition: Callable[[], bool], seconds: float = WAIT_SECONDS) -> bool:
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def audit_count(outcome: str) -> float:
    value: float = metrics.AUDIT_ROWS.labels(outcome)._value.get()
    return value


def spool_segments(spool: Path) -> list[Path]:
    return sorted(spool.glob("cards-*.jsonl")) if spool.exists() else []


@pytest.fixture
def url(tmp_path: Path) -> str:
    database = f"sqlite:///{tmp_path / 'feedback.sqlite3'}"
    FeedbackStore(database).create_schema()
    return database


@pytest.fixture
def spool(tmp_path: Path) -> Path:
    return tmp_path / "spool"


@pytest.fixture
def fast_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(audit_log, "RETRY_FIRST_SECONDS", 0.1)
    monkeypatch.setattr(audit_log, "RETRY_MAX_SECONDS", 0.2)


def test_the_background_writer_writes_and_removes_the_spool(url: str, spool: Path) -> None:
    store = FeedbackStore(url, spool)
    cards = [card(), card()]
    store.record_cards_later(SERVICE, "hook-1", cards)
    assert spool_segments(spool), "the rows are on disk before record_cards_later returns"
    assert wait_for(lambda: issued_uuids(url) == {c.uuid for c in cards})
    assert wait_for(lambda: not spool_segments(spool)), "a written segment is deleted"
    store.dispose()


def test_the_rows_are_in_the_database_in_the_stored_form(url: str, spool: Path) -> None:
    """The driver-level insert writes what SQLAlchemy reads back: suggestion ids and an aware UTC time."""
    store = FeedbackStore(url, spool)
    issued = card()
    store.record_cards_later(SERVICE, "hook-1", [issued])
    store.dispose()
    item: dict[str, Any] = {"card": issued.uuid, "outcome": "accepted", "outcomeTimestamp": "2026-03-01T10:15:30Z"}
    item["acceptedSuggestions"] = [{"id": issued.suggestion_uuids[0]}, {"id": "not-on-the-card"}]
    reader = FeedbackStore(url)
    result = reader.store_feedback(SERVICE, [item])
    [row] = reader.list_feedback()
    [report] = reader.report()
    reader.dispose()
    assert (result.stored, result.unknown_cards) == (1, 0)
    assert (row.rule_id, row.unknown_suggestions) == ("dose-adjust", ("not-on-the-card",))
    assert (report.rule_id, report.shown, report.accepted) == ("dose-adjust", 1, 1)


def test_dispose_writes_what_is_queued(url: str, spool: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(audit_log, "WRITE_BEHIND_SECONDS", 60.0)  # the writer would wait a minute
    store = FeedbackStore(url, spool)
    issued = card()
    store.record_cards_later(SERVICE, "hook-1", [issued])
    store.dispose()
    assert issued_uuids(url) == {issued.uuid}
    assert not spool_segments(spool)


def test_feedback_sees_cards_still_queued(url: str, spool: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(audit_log, "WRITE_BEHIND_SECONDS", 60.0)
    store = FeedbackStore(url, spool)
    issued = card()
    store.record_cards_later(SERVICE, "hook-1", [issued])
    item = {"card": issued.uuid, "outcome": "overridden", "outcomeTimestamp": "2026-03-01T10:15:30Z"}
    result = store.store_feedback(SERVICE, [item])
    assert (result.stored, result.unknown_cards) == (1, 0)
    store.dispose()


def test_an_outage_loses_nothing_and_the_rows_are_replayed(
    tmp_path: Path, spool: Path, fast_retries: None, caplog: pytest.LogCaptureFixture
) -> None:
    """SQLite that cannot be opened (its directory does not exist yet) is an outage; once it exists, the rows
    queued meanwhile are written, each exactly once."""
    directory = tmp_path / "later"
    url = f"sqlite:///{directory / 'feedback.sqlite3'}"
    store = FeedbackStore(url, spool, create_schema_on_use=True)
    retries_before = metrics.AUDIT_RETRIES._value.get()
    spilled_before = audit_count("spilled")
    cards = [card() for _ in range(30)]
    with caplog.at_level(logging.WARNING, logger="cmv_cds.store"):
        for n, issued in enumerate(cards[:20]):
            store.record_cards_later(SERVICE, f"hook-{n}", [issued])  # the hook call is answered regardless
        assert wait_for(lambda: metrics.AUDIT_RETRIES._value.get() >= retries_before + 2)
    assert "issued cards not written; kept for retry" in caplog.messages
    assert audit_count("spilled") > spilled_before
    assert spool_segments(spool), "the rows wait on disk"

    directory.mkdir()  # the database is back
    for n, issued in enumerate(cards[20:]):
        store.record_cards_later(SERVICE, f"hook-late-{n}", [issued])
    assert wait_for(lambda: issued_uuids(url) == {c.uuid for c in cards})
    assert wait_for(lambda: not spool_segments(spool))
    store.dispose()


def test_feedback_during_an_outage_is_a_503_and_loses_no_card(
    tmp_path: Path, spool: Path, fast_retries: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The old write-behind queue was emptied before its insert, so a feedback call during an outage flushed the
    other requests' cards into a failing insert and lost them. Now they stay spooled."""
    monkeypatch.setattr(audit_log, "WRITE_BEHIND_SECONDS", 60.0)  # only the feedback call writes
    directory = tmp_path / "later"
    url = f"sqlite:///{directory / 'feedback.sqlite3'}"
    store = FeedbackStore(url, spool, create_schema_on_use=True)
    cards = [card() for _ in range(5)]
    store.record_cards_later(SERVICE, "hook-1", cards)
    item = {"card": cards[0].uuid, "outcome": "accepted", "outcomeTimestamp": "2026-03-01T10:15:30Z"}
    with pytest.raises(OperationalError):
        store.store_feedback(SERVICE, [item])
    directory.mkdir()
    result = store.store_feedback(SERVICE, [item])
    assert (result.stored, result.unknown_cards) == (1, 0), "the card was kept and is known"
    store.dispose()
    assert issued_uuids(url) == {c.uuid for c in cards}


def test_feedback_right_after_an_outage_finds_a_card_issued_during_it(
    tmp_path: Path, spool: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The card's row is in a spool segment whose insert failed; the writer would retry only 30 s later. The
    feedback does not call the card unknown: it has the writer retry now and waits (bounded) for the replay."""
    monkeypatch.setattr(audit_log, "RETRY_FIRST_SECONDS", 30.0)
    monkeypatch.setattr(audit_log, "RETRY_MAX_SECONDS", 30.0)
    directory = tmp_path / "later"
    url = f"sqlite:///{directory / 'feedback.sqlite3'}"
    store = FeedbackStore(url, spool, create_schema_on_use=True)
    retries_before = metrics.AUDIT_RETRIES._value.get()
    issued = card()
    store.record_cards_later(SERVICE, "hook-1", [issued])
    assert wait_for(lambda: metrics.AUDIT_RETRIES._value.get() > retries_before), "the first insert failed"
    directory.mkdir()
    started = time.monotonic()
    item = {"card": issued.uuid, "outcome": "overridden", "outcomeTimestamp": "2026-03-01T10:15:30Z"}
    result = store.store_feedback(SERVICE, [item])
    assert (result.stored, result.unknown_cards) == (1, 0)
    assert time.monotonic() - started < store_module.BACKLOG_GRACE_SECONDS + 1
    store.dispose()


def test_a_spool_that_cannot_be_written_falls_back_to_memory(
    url: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    not_a_directory = tmp_path / "file"
    not_a_directory.write_text("")
    store = FeedbackStore(url, not_a_directory / "spool")
    issued = card()
    with caplog.at_level(logging.ERROR, logger="cmv_cds.store"):
        store.record_cards_later(SERVICE, "hook-1", [issued])
    assert "issued-card spool not writable; rows kept in memory only" in caplog.messages
    assert wait_for(lambda: issued_uuids(url) == {issued.uuid})
    store.dispose()


def test_a_full_spool_drops_and_counts(url: str, spool: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(audit_log, "WRITE_BEHIND_SECONDS", 60.0)
    row_bytes = len(orjson.dumps(store_module._issued_rows(SERVICE, "hook-0", [card()])[0])) + 1
    store = FeedbackStore(url, spool, max_spool_bytes=2 * row_bytes + row_bytes // 2)  # room for two rows
    dropped_before = audit_count("dropped")
    for n in range(4):
        store.record_cards_later(SERVICE, f"hook-{n}", [card()])
    assert audit_count("dropped") == dropped_before + 2
    store.dispose()
    assert len(issued_uuids(url)) == 2


# --- process death ------------------------------------------------------------------------------------

_CHILD = """
import sys, time, uuid
from service import audit_log
audit_log.WRITE_BEHIND_SECONDS = 3600  # the writer never writes: only the spool has the rows
from service.store import FeedbackStore, IssuedCard
store = FeedbackStore(sys.argv[1], sys.argv[2])
for n in range(int(sys.argv[3])):
    issued = [IssuedCard(str(uuid.uuid4()), "r", "info", ())]
    store.record_cards_later("cmv-antiviral-order-select", f"hook-{n}", issued)
    print(n, flush=True)  # acknowledged: as a hook call answers after record_cards_later
time.sleep(60)
"""


def test_rows_of_a_killed_process_are_adopted_by_the_next(url: str, spool: Path) -> None:
    child = subprocess.Popen(
        [sys.executable, "-c", _CHILD, url, str(spool), "25"],
        cwd=REPO,
        stdout=subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    try:
        assert child.stdout is not None
        acknowledged = [child.stdout.readline() for _ in range(25)]
        assert all(acknowledged)
        [segment] = spool_segments(spool)
        survivor = FeedbackStore(url, spool)
        survivor.start_background_writer()
        time.sleep(0.3)
        assert segment.exists(), "a live process's segment is locked: nobody else replays it"
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=10)
        survivor._audit._last_scan = 0.0  # rescan now instead of after RESCAN_SECONDS
        survivor.record_cards_later(SERVICE, "wake-up", [card()])
        assert wait_for(lambda: len(issued_uuids(url)) == 26)
        assert wait_for(lambda: not spool_segments(spool))
        survivor.dispose()
    finally:
        if child.poll() is None:
            child.kill()
            child.wait(timeout=10)


# --- PostgreSQL: a real outage -----------------------------------------------------------------------


@pytest.fixture
def pg(request: pytest.FixtureRequest) -> tuple[PgCluster, str, str]:
    cluster: PgCluster = request.getfixturevalue("postgres_cluster")
    url = cluster.create_database()
    return cluster, url, url.rsplit("/", 1)[1]


@pytest.mark.postgres
def test_postgres_outage_loses_nothing(pg: tuple[PgCluster, str, str], spool: Path, fast_retries: None) -> None:
    cluster, url, name = pg
    store = FeedbackStore(url, spool, create_schema_on_use=True)
    before = [card() for _ in range(10)]
    store.record_cards_later(SERVICE, "hook-before", before)
    assert wait_for(lambda: issued_uuids(url) == {c.uuid for c in before})
    during = [card() for _ in range(40)]
    with cluster.outage(name):
        for n, issued in enumerate(during):
            store.record_cards_later(SERVICE, f"hook-{n}", [issued])
            time.sleep(0.01)
        assert wait_for(lambda: audit_count("spilled") > 0)
    assert wait_for(lambda: issued_uuids(url) == {c.uuid for c in before + during})
    assert wait_for(lambda: not spool_segments(spool))
    store.dispose()


@pytest.mark.postgres
def test_a_row_postgres_refuses_is_dropped_alone(pg: tuple[PgCluster, str, str], spool: Path) -> None:
    """PostgreSQL text cannot hold NUL: a hookInstance with one is refused as invalid data. It must not block the
    other rows of its batch, nor stay in the spool to be retried forever."""
    _, url, _ = pg
    store = FeedbackStore(url, spool, create_schema_on_use=True)
    dropped_before = audit_count("dropped")
    good = [card(), card()]
    store.record_cards_later(SERVICE, "hook-1", good[:1])
    store.record_cards_later(SERVICE, "hook\x00nul", [card()])
    store.record_cards_later(SERVICE, "hook-2", good[1:])
    assert wait_for(lambda: issued_uuids(url) == {c.uuid for c in good})
    assert audit_count("dropped") == dropped_before + 1
    assert wait_for(lambda: not spool_segments(spool))
    store.dispose()
