"""One wall-clock budget per hook call (CMV_CDS_FHIR_DEADLINE_SECONDS) against FHIR servers that misbehave on a
real socket (tests/fault_fhir_server.py): slow-loris bodies and headers, silence, sleep. In process, through the
Flask app; the same against gunicorn is in tests/test_faults.py.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
from fault_fhir_server import FaultServer, fault_servers, request_fetching
from flask import Flask
from flask.testing import FlaskClient

from service.app import create_app
from service.fetch_pool import fetch_pool
from service.fhir_client import FetchBudget, FhirDeadlineExceeded, FhirServer, fhir_session

DEADLINE_SECONDS = 1.5
# The per-read timeout is longer than the budget: a byte every second never trips it, the budget must.
READ_TIMEOUT_SECONDS = 5.0
FETCH_THREADS = 4  # the app's fetch pool (service.fetch_pool), set here whatever CMV_CDS_FHIR_MAX_WORKERS says
URL = "/cds-services/cmv-antiviral-order-select"


@pytest.fixture(scope="module")
def servers() -> Iterator[tuple[FaultServer, FaultServer]]:
    with fault_servers() as pair:
        yield pair


@pytest.fixture
def app(tmp_path: Path) -> Iterator[Flask]:
    application = create_app(
        {
            "require_auth": False,
            "database_url": f"sqlite:///{tmp_path / 'feedback.sqlite3'}",
            "fhir_deadline_seconds": DEADLINE_SECONDS,
            "fhir_timeout_seconds": READ_TIMEOUT_SECONDS,
            "fhir_max_workers": FETCH_THREADS,
        }
    )
    yield application
    application.extensions["cmv_cds"]["store"].dispose()


def watchdogs() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("cmv-cds-fhir-deadline")]


def fetch_threads_all_free(max_workers: int = FETCH_THREADS) -> bool:
    """Whether every thread of the process's fetch pool (service.fetch_pool) is free: as many tasks as it has
    threads meet at a barrier, which only happens when none of them is still held by a read."""
    barrier = threading.Barrier(max_workers, timeout=0.5)
    futures = [fetch_pool(max_workers).submit(barrier.wait) for _ in range(max_workers)]
    try:
        return sorted(future.result(timeout=1.0) for future in futures) == list(range(max_workers))
    except (threading.BrokenBarrierError, TimeoutError):
        return False


@pytest.mark.parametrize("mode", ["slow-body", "slow-headers", "silent", "sleep"])
def test_a_slow_server_is_a_412_within_the_budget(
    client: FlaskClient, servers: tuple[FaultServer, FaultServer], mode: str
) -> None:
    server, _ = servers
    started = time.monotonic()
    response = client.post(URL, json=request_fetching(server.base(mode), "labs", "conditions"))
    elapsed = time.monotonic() - started

    assert response.status_code == 412
    assert elapsed < DEADLINE_SECONDS + 1.0, f"answered after {elapsed:.2f} s"
    issue = response.get_json()["issue"][0]
    assert issue["code"] == "incomplete"
    assert "did not answer within the request's budget of 1.5 s" in issue["diagnostics"]
    assert "not obtained: conditions, labs" in issue["diagnostics"]
    # Nothing is left blocking: the watchdog ends with the call, and every fetch thread is free again.
    deadline = time.monotonic() + 1.0
    while watchdogs() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert watchdogs() == []
    assert fetch_threads_all_free()


def test_the_worker_is_free_for_the_next_call(client: FlaskClient, servers: tuple[FaultServer, FaultServer]) -> None:
    server, _ = servers
    assert client.post(URL, json=request_fetching(server.base("slow-body"), "labs")).status_code == 412
    started = time.monotonic()
    response = client.post(URL, json=request_fetching(server.base("ok"), "medications"))
    assert response.status_code == 200
    assert time.monotonic() - started < 1.0


def test_keys_that_arrived_do_not_make_a_partial_answer(
    client: FlaskClient, servers: tuple[FaultServer, FaultServer]
) -> None:
    """Policy: an expired budget is a 412 even though some keys arrived (the rules need them all)."""
    server, _ = servers
    body = request_fetching(server.base("slow-body"), "labs")
    fast = request_fetching(server.base("ok"), "medications")
    assert client.post(URL, json=fast).status_code == 200
    response = client.post(URL, json=body)
    assert response.status_code == 412
    assert "not obtained: labs" in response.get_json()["issue"][0]["diagnostics"]


def test_every_page_counts_against_one_budget(servers: tuple[FaultServer, FaultServer]) -> None:
    """FhirServer used directly (as other readers of the fhirServer do): reads after the first share the budget."""
    server, _ = servers
    budget = FetchBudget(1.0)
    fhir = FhirServer(server.base("ok"), None, READ_TIMEOUT_SECONDS, 1 << 20, 10, budget)
    with fhir_session() as session:
        assert fhir.search(fhir.url_for("Observation?patient=p"), session) == []
        slow = FhirServer(server.base("slow-body"), None, READ_TIMEOUT_SECONDS, 1 << 20, 10, budget)
        started = time.monotonic()
        with pytest.raises(FhirDeadlineExceeded):
            slow.get_json(slow.url_for("Observation?patient=p"), session)
        assert time.monotonic() - started < 1.5
        with pytest.raises(FhirDeadlineExceeded):  # spent: nothing more is started
            fhir.get_json(fhir.url_for("Patient/p"), session)
    budget.close()


def test_a_plain_session_gets_the_budget_too(servers: tuple[FaultServer, FaultServer]) -> None:
    """A caller with its own requests.Session (not fhir_session) is bounded as well."""
    server, _ = servers
    budget = FetchBudget(1.0)
    slow = FhirServer(server.base("slow-headers"), None, READ_TIMEOUT_SECONDS, 1 << 20, 10, budget)
    started = time.monotonic()
    with requests.Session() as session, pytest.raises(FhirDeadlineExceeded):
        slow.get_json(slow.url_for("Patient/p"), session)
    assert time.monotonic() - started < 1.5
    budget.close()
