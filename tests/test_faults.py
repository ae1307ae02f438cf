"""The fault suite: each fault of issue 14's table, against the real service under gunicorn (`cmv-cds serve`, 2 sync
workers) and a real PostgreSQL (tests/pg_cluster.py), with the figures the issue asks for asserted.

| fault | asserted |
|---|---|
| kill -9 of master and workers under load | 0 acknowledged feedback rows, 0 audit rows of answered calls lost |
| PostgreSQL down under load (auth off) | hook calls all 200, feedback 503 then 2xx, 0 audit rows lost; counted |
| PostgreSQL down while a worker restarts | the new worker boots, the service stays up and serves; ready again after |
| a slow-loris FHIR server | every hook call answered within CMV_CDS_FHIR_DEADLINE_SECONDS + 1 s (412) |
| FHIR server sleeping, 500, garbage, 50 MB, redirect, foreign next link | 412 within the budget; no foreign host |
| SIGTERM to the master at c=8 | 0 resets; /readyz unready first |
| 60 s outage, 60 s soak | (long variants, marked ``long``: ``python -m bench --faults``) |

Marked ``faults``: they involve no date, so the test command's second run (the clock 400 days ahead) leaves them
out (tests/conftest.py).
"""

from __future__ import annotations

import itertools
import os
import signal
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fault_fhir_server import FaultServer, fault_servers, request_fetching
from fhir_fixtures import load, order_select, patient_resources, prefetch_for
from pg_cluster import PgCluster
from pg_cluster import postgres_cluster as postgres_cluster  # fixture, requested by name
from processes import stop_process_group
from service_process import Load, Outcome, Service, running_service, service_env, start_service, wait_until

pytestmark = [pytest.mark.faults]

SELECT = "/cds-services/cmv-antiviral-order-select"
FEEDBACK = SELECT + "/feedback"
OUTAGE_SECONDS = 5.0
LONG_OUTAGE_SECONDS = 60.0
SOAK_SECONDS = 60.0
DEADLINE_SECONDS = 2.0
# The audit rows of an outage are written within the writer's longest back-off (5 s) and a replay after it.
REPLAY_SECONDS = 20.0


def hook_body() -> dict[str, Any]:
    return order_select([load("draft-ganciclovir.json")], prefetch=prefetch_for(patient_resources()))


HOOK_BODY = hook_body()
_timestamps = itertools.count()


def hook_call() -> tuple[str, str, Any]:
    return "POST", SELECT, HOOK_BODY | {"hookInstance": str(uuid.uuid4())}


def card_uuids(outcomes: list[Outcome]) -> set[str]:
    """The cards of every answered hook call: the audit trail must hold each of them."""
    return {
        card["uuid"]
        for outcome in outcomes
        if outcome.status == 200 and isinstance(outcome.body, dict) and "cards" in outcome.body
        for card in outcome.body["cards"]
    }


def mixed_load(service: Service, concurrency: int = 4, seconds: float = 120.0) -> Load:
    """Hook calls, and every third request a feedback item about a card answered earlier (a new timestamp each,
    so each acknowledged item is one new row)."""
    counter = itertools.count()
    load_: Load

    def next_request() -> tuple[str, str, Any]:
        answered = card_uuids(load_.outcomes[-20:])
        if next(counter) % 3 == 2 and answered:
            n = next(_timestamps)
            item = {
                "card": sorted(answered)[0],
                "outcome": "overridden",
                "outcomeTimestamp": f"2026-03-01T{n // 3600 % 24:02d}:{n // 60 % 60:02d}:{n % 60:02d}Z",
            }
            return "POST", FEEDBACK, {"feedback": [item]}
        return hook_call()

    load_ = Load(service.port, next_request, concurrency=concurrency, seconds=seconds)
    return load_


def feedback_outcomes(outcomes: list[Outcome]) -> list[Outcome]:
    return [o for o in outcomes if o.path == FEEDBACK]


def hook_outcomes(outcomes: list[Outcome]) -> list[Outcome]:
    return [o for o in outcomes if o.path == SELECT]


def db_rows(cluster: PgCluster, database: str, query: str) -> list[tuple[Any, ...]]:
    with cluster.connect(database) as conn:
        return list(conn.execute(query).fetchall())


def issued_in_db(cluster: PgCluster, database: str) -> set[str]:
    return {row[0] for row in db_rows(cluster, database, "SELECT uuid FROM issued_card")}


@pytest.fixture
def pg(postgres_cluster: PgCluster) -> tuple[PgCluster, str, str]:
    url = postgres_cluster.create_database()
    return postgres_cluster, url, url.rsplit("/", 1)[1]


def ready(service: Service) -> bool:
    return service.request("GET", "/readyz", timeout=5)[0] == 200


def metric(service: Service, name: str, labels: str = "") -> float:
    """A sample of GET /metrics (auth off), summed over workers by prometheus_client's multiprocess mode."""
    import urllib.request

    with urllib.request.urlopen(service.base_url + "/metrics", timeout=5) as response:
        text = response.read().decode()
    for line in text.splitlines():
        if line.startswith(name + (("{" + labels + "}") if labels else "")):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


# --- kill -9 -------------------------------------------------------------------------------------------


@pytest.mark.postgres
def test_kill_9_of_master_and_workers_loses_no_acknowledged_row(pg: tuple[PgCluster, str, str], tmp_path: Path) -> None:
    cluster, url, database = pg
    env = service_env(tmp_path, database_url=url)
    service = start_service(env, tmp_path / "service.log")
    wait_until(lambda: ready(service), 20, "ready")
    load_ = mixed_load(service).start()
    time.sleep(2.0)
    service.kill_all()  # master and both workers, at once
    outcomes = load_.stop()

    acknowledged_cards = card_uuids(outcomes)
    acknowledged_feedback = [o for o in feedback_outcomes(outcomes) if o.status == 200]
    assert len(acknowledged_cards) > 20, "the load did not run"
    assert acknowledged_feedback, "no feedback was acknowledged"
    with running_service(env, tmp_path / "service.log"):  # the restarted service replays the dead one's spool
        wait_until(
            lambda: acknowledged_cards <= issued_in_db(cluster, database),
            REPLAY_SECONDS,
            "every card of an answered hook call in issued_card",
        )
    stored = db_rows(cluster, database, "SELECT count(*) FROM card_feedback")[0][0]
    assert stored >= sum(o.body["stored"] for o in acknowledged_feedback)
    assert not list((tmp_path / "spool").glob("cards-*.jsonl")), "the spool is empty once replayed"


# --- PostgreSQL outage ---------------------------------------------------------------------------------


def run_outage(pg: tuple[PgCluster, str, str], tmp_path: Path, outage_seconds: float) -> None:
    cluster, url, database = pg
    env = service_env(tmp_path, database_url=url)
    with running_service(env, tmp_path / "service.log") as service:
        wait_until(lambda: ready(service), 20, "ready")
        load_ = mixed_load(service).start()
        time.sleep(1.0)
        with cluster.outage(database):
            outage_started = time.monotonic()
            time.sleep(outage_seconds)
            outage_ended = time.monotonic()
        time.sleep(2.0)
        outcomes = load_.stop()

        hooks = hook_outcomes(outcomes)
        assert hooks
        assert all(o.status == 200 for o in hooks), {o.status for o in hooks}
        during = [o for o in feedback_outcomes(outcomes) if outage_started + 0.5 < o.started < outage_ended - 0.5]
        assert during
        assert {o.status for o in during} == {503}
        after = [o for o in feedback_outcomes(outcomes) if o.started > outage_ended + 1.0]
        assert after
        assert {o.status for o in after} == {200}
        acknowledged = card_uuids(outcomes)
        wait_until(lambda: acknowledged <= issued_in_db(cluster, database), REPLAY_SECONDS, "0 audit rows lost")
        assert metric(service, "cmv_cds_audit_rows_total", 'outcome="spilled"') > 0
        assert metric(service, "cmv_cds_audit_write_retries_total") > 0
        assert metric(service, "cmv_cds_audit_rows_total", 'outcome="dropped"') == 0


@pytest.mark.postgres
def test_database_outage_under_load_loses_no_audit_row(pg: tuple[PgCluster, str, str], tmp_path: Path) -> None:
    run_outage(pg, tmp_path, OUTAGE_SECONDS)


@pytest.mark.long
@pytest.mark.postgres
def test_a_60_second_outage_loses_no_audit_row(pg: tuple[PgCluster, str, str], tmp_path: Path) -> None:
    run_outage(pg, tmp_path, LONG_OUTAGE_SECONDS)


@pytest.mark.postgres
def test_a_worker_restarting_during_an_outage_keeps_the_service_up(
    pg: tuple[PgCluster, str, str], tmp_path: Path
) -> None:
    """Before: the new worker's create_app failed at create_schema, gunicorn's master saw a boot error and shut
    the whole service down, for good."""
    cluster, url, database = pg
    env = service_env(tmp_path, database_url=url)
    with running_service(env, tmp_path / "service.log") as service:
        wait_until(lambda: ready(service), 20, "ready")
        with cluster.outage(database):
            before = set(service.workers())
            victim = min(before)
            os.kill(victim, signal.SIGKILL)  # a crash; max_requests recycling and the OOM killer look the same
            wait_until(
                lambda: len(set(service.workers()) - before) == 1 and len(service.workers()) == 2,
                20,
                "a new worker",
            )
            for _ in range(6):  # both workers answer: hook calls need no database with auth off
                status, body = service.request("POST", *hook_call()[1:])
                assert status == 200
                assert body["cards"]
            assert service.request("GET", "/healthz")[0] == 200
            assert service.request("GET", "/readyz")[0] == 503
            assert service.process.poll() is None, "the master is still running"
        wait_until(lambda: ready(service), 20, "ready once the database is back")


# --- FHIR servers --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fhir_faults() -> Iterator[tuple[FaultServer, FaultServer]]:
    with fault_servers() as pair:
        yield pair


@pytest.fixture(scope="module")
def fetching_service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    tmp_path = tmp_path_factory.mktemp("fetching")
    env = service_env(tmp_path, fhir_deadline_seconds=str(DEADLINE_SECONDS), fhir_timeout_seconds="5")
    with running_service(env, tmp_path / "service.log") as service:
        yield service


def fetching_call(base: str) -> tuple[str, str, Any]:
    return "POST", SELECT, request_fetching(base, "labs", "conditions")


def test_every_call_is_answered_within_the_budget_against_a_slow_loris_server(
    fetching_service: Service, fhir_faults: tuple[FaultServer, FaultServer]
) -> None:
    """One client per worker (more would queue behind the sync workers, which is not the budget's to bound)."""
    server, _ = fhir_faults
    load_ = Load(fetching_service.port, lambda: fetching_call(server.base("slow-body")), concurrency=2).start()
    time.sleep(5)
    outcomes = load_.stop()
    assert len(outcomes) >= 4
    assert {o.status for o in outcomes} == {412}
    slowest = max(o.finished - o.started for o in outcomes)
    assert slowest < DEADLINE_SECONDS + 1.0, f"slowest answer {slowest:.2f} s"
    started = time.monotonic()
    assert fetching_service.request("POST", *fetching_call(server.base("ok"))[1:])[0] == 200
    assert time.monotonic() - started < 1.0, "the workers are free again"


@pytest.mark.parametrize("mode", ["sleep", "error", "garbage", "huge", "redirect", "foreign-next", "slow-headers"])
def test_a_misbehaving_fhir_server_is_a_412_and_no_foreign_host_is_contacted(
    fetching_service: Service, fhir_faults: tuple[FaultServer, FaultServer], mode: str
) -> None:
    server, foreign = fhir_faults
    started = time.monotonic()
    status, body = fetching_service.request("POST", *fetching_call(server.base(mode))[1:])
    elapsed = time.monotonic() - started
    assert status == 412
    assert body["issue"][0]["code"] == "incomplete"
    assert elapsed < DEADLINE_SECONDS + 1.0
    assert sum(foreign.hits.values()) == 0


# --- SIGTERM -------------------------------------------------------------------------------------------


def test_sigterm_at_c8_resets_nothing_and_readiness_turns_off_first(tmp_path: Path) -> None:
    env = service_env(tmp_path)
    service = start_service(env, tmp_path / "service.log")
    try:
        load_ = Load(service.port, hook_call, concurrency=8, seconds=30).start()
        time.sleep(1.5)
        os.kill(service.process.pid, signal.SIGTERM)
        signalled = time.monotonic()
        load_.stop_starting()  # no request is started after the signal; those under way must be answered
        time.sleep(0.3)  # the master has passed SIGTERM on to the workers
        readiness = service.request("GET", "/readyz", timeout=10)
        outcomes = load_.stop()
        assert service.process.wait(timeout=20) == 0
    finally:
        stop_process_group(service.process)

    before = [o for o in outcomes if o.started < signalled]
    assert len(before) > 50
    failed = [o for o in before if o.status != 200]
    assert failed == [], f"{len(failed)} of {len(before)} requests not answered: {[o.error for o in failed][:5]}"
    assert readiness[0] == 503, "a draining worker reports itself unready"
    assert "Draining: readiness off" in service.log()


# --- soak ----------------------------------------------------------------------------------------------


def process_footprint(pids: list[int]) -> tuple[int, int]:
    """(total RSS in kB, total open file descriptors) of the processes."""
    rss = fds = 0
    for pid in pids:
        status = Path(f"/proc/{pid}/status").read_text()
        rss += int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmRSS:")))
        fds += len(os.listdir(f"/proc/{pid}/fd"))
    return rss, fds


@pytest.mark.long
def test_a_60_second_soak_at_c8_has_no_errors_and_flat_memory_and_fds(tmp_path: Path) -> None:
    env = service_env(tmp_path)
    with running_service(env, tmp_path / "service.log") as service:
        warm = Load(service.port, hook_call, concurrency=8, seconds=5).start()
        warm.stop()
        pids = [service.process.pid, *service.workers()]
        rss_before, fds_before = process_footprint(pids)
        outcomes = Load(service.port, hook_call, concurrency=8, seconds=SOAK_SECONDS).start()
        time.sleep(SOAK_SECONDS)
        results = outcomes.stop()
        rss_after, fds_after = process_footprint(pids)
    assert {o.status for o in results} == {200}
    assert rss_after < rss_before * 1.10, (rss_before, rss_after)
    assert fds_after <= fds_before + 4, (fds_before, fds_after)
