"""The process's FHIR fetch threads (service.fetch_pool): kept between hook calls, bounded, every wait within the
call's budget, and started afresh in a forked child."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import responses
from fhir_fixtures import by_reference
from fhir_fixtures import ganciclovir_draft as gcv_draft
from flask.testing import FlaskClient
from test_ehr_shapes import FHIR, REFERENCE_PATH, medication, request

from service import fetch_pool as fetch_pool_module
from service.app import create_app
from service.fetch_pool import GRACE_SECONDS, fetch_pool, run_within_budget
from service.fhir_client import FetchBudget


def test_reads_run_in_parallel_and_keep_their_order() -> None:
    budget = FetchBudget(5.0)
    barrier = threading.Barrier(3, timeout=2.0)  # passes only if the three reads run at the same time

    def read(item: int) -> int:
        barrier.wait()
        return item * 10

    futures = run_within_budget(read, [1, 2, 3], 3, budget)
    assert [future.result() for future in futures] == [10, 20, 30]
    budget.close()


def test_the_threads_are_kept_from_one_call_to_the_next() -> None:
    """Five calls of twenty reads each run on the same four threads (a pool of its own size, so no other test's
    threads count); a thread per read, or per call, would show up to twenty different ones."""

    def thread_of(_: int) -> threading.Thread:  # the object itself: an ident can be reused by a later thread
        time.sleep(0.002)  # long enough for the reads of a call to overlap
        return threading.current_thread()

    threads = {
        future.result() for _ in range(5) for future in run_within_budget(thread_of, range(20), 4, FetchBudget(5.0))
    }
    assert 1 <= len(threads) <= 4


def test_a_read_stuck_past_the_budget_is_left_and_the_ones_that_never_started_are_cancelled() -> None:
    """One thread, held by a read the watchdog cannot end (as a DNS lookup): the call returns after its budget and
    the grace, the second read never runs, and the next call is served at once by new threads while the stuck
    read still holds the old one."""
    release = threading.Event()
    ran: list[str] = []

    def read(item: str) -> str:
        ran.append(item)
        if item == "stuck":
            release.wait(10)
        return item

    budget = FetchBudget(0.3)
    started = time.monotonic()
    stuck, queued = run_within_budget(read, ["stuck", "queued"], 1, budget)
    elapsed = time.monotonic() - started
    try:
        assert 0.3 <= elapsed < 0.3 + GRACE_SECONDS + 0.5
        assert budget.expired
        assert not stuck.done()
        assert queued.cancelled()
        started = time.monotonic()
        (following,) = run_within_budget(read, ["next"], 1, FetchBudget(2.0))
        assert following.result(timeout=0) == "next"
        assert time.monotonic() - started < 0.5, "the next call waited for the stuck read"
        assert not stuck.done()
    finally:
        release.set()
    assert stuck.result(timeout=2) == "stuck"
    assert ran == ["stuck", "next"], "the cancelled read ran after its call"


@pytest.mark.skipif(not hasattr(os, "fork"), reason="fork only")
def test_a_forked_child_starts_threads_of_its_own() -> None:
    """Threads do not survive fork: a child that inherited the parent's pool would queue reads no thread runs."""
    assert run_within_budget(str, [1], 1, FetchBudget(5.0))[0].result() == "1"  # the parent's pool has its thread
    pid = os.fork()
    if pid == 0:  # the child: exit 0 only if its read ran within the budget, and never return into pytest
        code = 1
        try:
            (future,) = run_within_budget(str, [2], 1, FetchBudget(2.0))
            code = 0 if future.done() and not future.cancelled() and future.result() == "2" else 1
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0


def test_a_call_that_took_a_pool_just_retired_by_another_call_uses_the_new_one(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """With a threaded server, one call can look the pool up just before another retires it (a stuck read)."""
    retired = fetch_pool(5)
    fetch_pool_module._retire(5, retired)
    lookups = iter([retired])
    monkeypatch.setattr(fetch_pool_module, "fetch_pool", lambda n: next(lookups, None) or fetch_pool(n))
    assert [future.result() for future in run_within_budget(str, [1, 2], 5, FetchBudget(2.0))] == ["1", "2"]


def test_the_pool_has_as_many_threads_as_asked() -> None:
    assert fetch_pool(3) is fetch_pool(3)
    assert fetch_pool(3)._max_workers == 3
    assert fetch_pool(2) is not fetch_pool(3)


@pytest.fixture
def client(tmp_path: Path) -> Iterator[FlaskClient]:
    app = create_app(
        {
            "require_auth": False,
            "database_url": f"sqlite:///{tmp_path / 'feedback.sqlite3'}",
            "fhir_deadline_seconds": 0.5,
            "fhir_max_workers": 1,
        }
    )
    yield app.test_client()
    app.extensions["cmv_cds"]["store"].dispose()


def test_medication_reads_wait_no_longer_than_the_budget(client: FlaskClient) -> None:
    """The reads of a selected order's Medications are awaited within the call's budget like the prefetch fetches:
    with the only fetch thread held, the call answers 412 naming the reference, in about the budget."""
    body = request([by_reference(gcv_draft(), "Medication/med-gcv")], with_server=True)
    with responses.RequestsMock() as mock:  # a first call, so that the one timed below pays no first-use costs
        mock.get(f"{FHIR}/Medication/med-gcv", json=medication("med-gcv"))
        assert client.post("/cds-services/cmv-antiviral-order-select", json=body).status_code == 200
    release = threading.Event()
    holder = fetch_pool(1).submit(release.wait, 10)
    try:
        with responses.RequestsMock(assert_all_requests_are_fired=False) as mock:
            mock.get(f"{FHIR}/Medication/med-gcv", json=medication("med-gcv"))
            started = time.monotonic()
            response = client.post("/cds-services/cmv-antiviral-order-select", json=body)
            elapsed = time.monotonic() - started
            assert len(mock.calls) == 0, "the read ran although its call had given up"
    finally:
        release.set()
        holder.result(timeout=2)
    assert response.status_code == 412
    assert elapsed < 0.5 + GRACE_SECONDS + 0.5
    issue = response.get_json()["issue"][0]
    assert issue["expression"] == [REFERENCE_PATH]
    assert "FHIR fetch deadline exceeded" in issue["diagnostics"]
