"""Write-behind of issued cards (service.store.FeedbackStore.record_cards_later), SQLite."""

from __future__ import annotations

import logging
import time
import uuid
from pathlib import Path

import pytest

from service import store as store_module
from service.store import FeedbackStore, IssuedCard

SERVICE = "cmv-antiviral-order-select"


def card() -> IssuedCard:
    return IssuedCard(str(uuid.uuid4()), "dose-adjust", "warning", (str(uuid.uuid4()),))


def issued_count(url: str) -> int:
    reader = FeedbackStore(url)
    try:
        with reader.engine.connect() as conn:
            return int(conn.exec_driver_sql("SELECT count(*) FROM issued_card").scalar_one())
    finally:
        reader.dispose()


@pytest.fixture
def url(tmp_path: Path) -> str:
    database = f"sqlite:///{tmp_path / 'feedback.sqlite3'}"
    FeedbackStore(database).create_schema()
    return database


def test_the_background_writer_writes_without_a_flush(url: str) -> None:
    store = FeedbackStore(url)
    store.record_cards_later(SERVICE, "hook-1", [card(), card()])
    deadline = time.monotonic() + 5
    while issued_count(url) < 2 and time.monotonic() < deadline:
        time.sleep(store_module.WRITE_BEHIND_SECONDS)
    assert issued_count(url) == 2
    store.dispose()


def test_dispose_writes_what_is_queued(url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(store_module, "WRITE_BEHIND_SECONDS", 60.0)  # the writer would wait a minute
    store = FeedbackStore(url)
    store.record_cards_later(SERVICE, "hook-1", [card()])
    store.dispose()
    assert issued_count(url) == 1


def test_feedback_sees_cards_still_queued(url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(store_module, "WRITE_BEHIND_SECONDS", 60.0)
    store = FeedbackStore(url)
    issued = card()
    store.record_cards_later(SERVICE, "hook-1", [issued])
    item = {"card": issued.uuid, "outcome": "overridden", "outcomeTimestamp": "2026-03-01T10:15:30Z"}
    result = store.store_feedback(SERVICE, [item])
    assert (result.stored, result.unknown_cards) == (1, 0)
    store.dispose()


def test_a_full_queue_is_written_by_the_caller(url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(store_module, "WRITE_BEHIND_SECONDS", 60.0)
    monkeypatch.setattr(store_module, "WRITE_BEHIND_MAX_ROWS", 3)
    store = FeedbackStore(url)
    store.record_cards_later(SERVICE, "hook-1", [card(), card()])
    assert issued_count(url) == 0
    store.record_cards_later(SERVICE, "hook-2", [card()])
    assert issued_count(url) == 3
    store.dispose()


def test_a_failed_background_write_is_logged_not_raised(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    store = FeedbackStore(f"sqlite:///{tmp_path / 'missing-dir' / 'feedback.sqlite3'}")
    with caplog.at_level(logging.ERROR, logger="cmv_cds.store"):
        store.record_cards_later(SERVICE, "hook-1", [card()])  # the hook call is answered regardless
        deadline = time.monotonic() + 5
        while not caplog.records and time.monotonic() < deadline:
            time.sleep(store_module.WRITE_BEHIND_SECONDS)
    assert [r.getMessage() for r in caplog.records] == ["issued cards not recorded"]
    store.dispose()  # nothing left to write
