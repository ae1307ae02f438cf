"""The per-request log line (service.logs.log_request): written without a LogRecord for the handlers that take a
formatted line, yet exactly the line the JSON formatter writes for ``log.info("request", extra=...)``, under the
same rules (levels, propagation, filters, the allowlist); and what one request writes."""

from __future__ import annotations

import datetime as dt
import io
import json
import logging
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fhir_fixtures import load, order_select, patient_resources, prefetch_for
from hypothesis import given
from hypothesis import strategies as st
from log_guard import CAPTURE

from service import logs
from service.app import create_app

FIELDS: dict[str, Any] = {
    "request_id": "req-1",
    "method": "POST",
    "path": "/cds-services/<service:service_id>",
    "service_id": "cmv-antiviral-order-select",
    "hook_instance": "d1577c69-dfbe-44ad-ba6d-3e05e953b2ea",
    "status": 200,
    "card_count": 2,
    "rules": ["dose-adjust", "interactions"],
    "latency_ms": 1.23,
    "patient": "Quixotetest",  # not allowlisted: dropped by both paths
    "issuer": {"not": "plain"},  # allowlisted, not plain JSON: written as its str by both paths
}


class RecordOnly(logging.Handler):
    """A handler without emit_line (as pytest's or an operator's): it must get an ordinary record."""

    def __init__(self) -> None:
        super().__init__()
        self.stream = io.StringIO()
        self.setFormatter(logs.JsonFormatter())
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)
        self.stream.write(self.format(record) + "\n")


@pytest.fixture
def handlers(monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[logs.JsonLineHandler, RecordOnly]]:
    """A line-taking and a record-only handler on the ``cmv_cds`` logger, at INFO, with the wall clock fixed."""
    monkeypatch.setattr(time, "time", lambda: 1_796_163_417.123456)
    logger = logging.getLogger("cmv_cds")
    level = logger.level
    line_handler, record_handler = logs.JsonLineHandler(io.StringIO()), RecordOnly()
    logger.addHandler(line_handler)
    logger.addHandler(record_handler)
    logger.setLevel(logging.INFO)
    try:
        yield line_handler, record_handler
    finally:
        logger.removeHandler(line_handler)
        logger.removeHandler(record_handler)
        logger.setLevel(level)


def written(handler: logging.Handler) -> list[str]:
    stream = handler.stream if isinstance(handler, logging.StreamHandler | RecordOnly) else None
    assert stream is not None
    return str(stream.getvalue()).splitlines()


def test_the_line_is_the_formatters_line(handlers: tuple[logs.JsonLineHandler, RecordOnly]) -> None:
    line_handler, record_handler = handlers
    logs.log_request(FIELDS)
    logging.getLogger("cmv_cds.app").info("request", extra=FIELDS)
    fast, (via_record_1, via_record_2) = written(line_handler), written(record_handler)
    # One line per call for each handler; the formatted line equals what the formatter makes of a record.
    assert fast[0] == via_record_1 == via_record_2 == fast[1]
    entry = json.loads(fast[0])
    assert entry == {
        "time": "2026-12-01T22:16:57.123+00:00",
        "level": "INFO",
        "logger": "cmv_cds.app",
        "message": "request",
        **{key: value for key, value in FIELDS.items() if key not in ("patient", "issuer")},
        "issuer": "{'not': 'plain'}",
    }
    assert list(entry)[4:] == [key for key in FIELDS if key != "patient"]  # the order of the fields


def test_levels_and_filters_are_honoured(handlers: tuple[logs.JsonLineHandler, RecordOnly]) -> None:
    line_handler, record_handler = handlers
    logger = logging.getLogger("cmv_cds")
    logger.setLevel(logging.WARNING)  # CMV_CDS_LOG_LEVEL=WARNING: no request lines
    logs.log_request(FIELDS)
    assert written(line_handler) == written(record_handler) == []
    logger.setLevel(logging.INFO)
    line_handler.setLevel(logging.WARNING)  # a handler's own level
    logs.log_request(FIELDS)
    assert (len(written(line_handler)), len(written(record_handler))) == (0, 1)
    line_handler.setLevel(logging.NOTSET)
    dropped: list[str] = []

    def drop_all(record: logging.LogRecord) -> bool:
        dropped.append(record.getMessage())
        return False

    logs.REQUEST_LOGGER.addFilter(drop_all)  # a logger filter sees the record, as logging would give it
    try:
        logs.log_request(FIELDS)
    finally:
        logs.REQUEST_LOGGER.removeFilter(drop_all)
    assert dropped == ["request"]
    assert (len(written(line_handler)), len(written(record_handler))) == (0, 1)
    # A parent logger's filter is not applied to records propagated from a child (logging's rule), here too.
    parent = logging.getLogger("cmv_cds")
    parent.addFilter(drop_all)
    try:
        logs.log_request(FIELDS)
        logging.getLogger("cmv_cds.app").info("request", extra=FIELDS)
    finally:
        parent.removeFilter(drop_all)
    assert dropped == ["request"]
    assert (len(written(line_handler)), len(written(record_handler))) == (2, 3)
    assert written(line_handler)[0] == written(line_handler)[1] == written(record_handler)[-1]


def test_records_still_reach_handlers_up_the_tree(
    handlers: tuple[logs.JsonLineHandler, RecordOnly], caplog: pytest.LogCaptureFixture
) -> None:
    """pytest's caplog handler sits on the root logger: it gets a record (with the caller's location)."""
    with caplog.at_level(logging.INFO, logger="cmv_cds"):
        logs.log_request(FIELDS)
    (record,) = [r for r in caplog.records if r.name == "cmv_cds.app"]
    assert record.getMessage() == "request"
    assert getattr(record, "card_count", None) == 2
    assert record.pathname == __file__


@given(st.floats(min_value=0, max_value=4_102_444_800, allow_nan=False))
def test_the_time_is_written_as_datetime_writes_it(created: float) -> None:
    expected = dt.datetime.fromtimestamp(created, tz=dt.UTC).isoformat(timespec="milliseconds")
    assert logs._iso_time(created) == expected


@pytest.mark.parametrize("created", [0.0, 0.0005, 1.9999996, 1_796_163_417.9995, 1_796_163_417.9999996])
def test_the_time_at_the_edges(created: float) -> None:
    expected = dt.datetime.fromtimestamp(created, tz=dt.UTC).isoformat(timespec="milliseconds")
    assert logs._iso_time(created) == expected


def test_one_request_writes_one_line_with_its_fields(tmp_path: Path) -> None:
    app = create_app({"require_auth": False, "database_url": f"sqlite:///{tmp_path / 'log.sqlite3'}"})
    try:
        body = order_select([load("draft-ganciclovir.json")], prefetch=prefetch_for(patient_resources()))
        before = len(CAPTURE.lines)
        response = app.test_client().post(
            "/cds-services/cmv-antiviral-order-select", json=body, headers={"X-Request-ID": "trace-42"}
        )
        assert response.status_code == 200
        assert response.headers["X-Request-ID"] == "trace-42"
        cards = response.get_json()["cards"]
        lines = [json.loads(line) for line in CAPTURE.lines[before:]]
        (entry,) = [line for line in lines if line["message"] == "request"]
        assert {key: value for key, value in entry.items() if key not in ("time", "latency_ms")} == {
            "level": "INFO",
            "logger": "cmv_cds.app",
            "message": "request",
            "request_id": "trace-42",
            "method": "POST",
            "path": "/cds-services/<service:service_id>",
            "service_id": "cmv-antiviral-order-select",
            "hook_instance": body["hookInstance"],
            "status": 200,
            "card_count": len(cards),
            "rules": [card["source"]["topic"]["code"] for card in cards],
        }
        assert isinstance(entry["latency_ms"], float)
        assert entry["latency_ms"] > 0
    finally:
        app.extensions["cmv_cds"]["store"].dispose()
