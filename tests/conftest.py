"""Shared fixtures: an app with auth off on a throwaway SQLite store, and request builders."""

from __future__ import annotations

import functools
import logging
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient

sys.path.insert(0, str(Path(__file__).resolve().parent))

from log_guard import CAPTURE, leaks, sensitive_strings

from service.app import create_app

# Installed at import so every service log record of the session passes through the guard.
logging.getLogger("cmv_cds").addHandler(CAPTURE)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Leave out (deselect, not skip) the long fault variants unless CMV_CDS_LONG_TESTS=1 (``python -m bench
    --faults``), and the tests whose outcome cannot depend on the calendar (markers ``faults`` and
    ``calendar_free``) from the clock-shifted run (tests/clock_shift), which repeats the suite only to catch date
    dependence and must keep CI within its time."""
    long_wanted = os.environ.get("CMV_CDS_LONG_TESTS") == "1"
    clock_shifted = bool(os.environ.get("TEST_CLOCK_SHIFT_DAYS"))
    kept: list[pytest.Item] = []
    left_out: list[pytest.Item] = []
    for item in items:
        is_long = item.get_closest_marker("long") is not None
        is_fault = any(item.get_closest_marker(name) is not None for name in ("faults", "calendar_free"))
        (left_out if (is_long and not long_wanted) or (is_fault and clock_shifted) else kept).append(item)
    if left_out:
        config.hook.pytest_deselected(items=left_out)
        items[:] = kept


@functools.cache
def _sensitive() -> frozenset[str]:
    return frozenset(sensitive_strings())


@pytest.fixture(autouse=True)
def _no_patient_data_in_logs() -> Iterator[None]:
    """Fail the test during which the service logged fixture patient data. Per test, so that the guard holds when
    the suite runs in several processes (pytest-xdist); the session check below catches lines logged between
    tests."""
    first = len(CAPTURE.lines)
    yield
    found = leaks(CAPTURE.lines[first:], _sensitive())
    if found:
        pytest.fail(f"patient data in {len(found)} log line(s), e.g.: {found[0][:300]}")


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Fail the run if any log line of the whole suite carries fixture patient data."""
    found = leaks(CAPTURE.lines, sensitive_strings())
    if found:
        sys.stderr.write(f"\nPATIENT DATA IN LOGS ({len(found)} lines), e.g.: {found[0][:300]}\n")
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


SERVICE_URL = "/cds-services/cmv-antiviral-order-select"
SIGN_URL = "/cds-services/cmv-antiviral-order-sign"


@pytest.fixture
def app(tmp_path: Path) -> Iterator[Flask]:
    application = create_app({"require_auth": False, "database_url": f"sqlite:///{tmp_path / 'feedback.sqlite3'}"})
    yield application
    application.extensions["cmv_cds"]["store"].dispose()


@pytest.fixture
def client(app: Flask) -> FlaskClient:
    return app.test_client()


def post_json(client: FlaskClient, url: str, body: Any) -> Any:
    return client.post(url, json=body)
