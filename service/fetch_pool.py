"""The worker process's FHIR fetch threads, kept from one hook call to the next.

A hook call that fetches (prefetch keys the client did not satisfy, Medication reads) runs its reads in parallel.
It used to start a thread per read: about 0.2 ms of CPU each on the benchmark machine (bench/README.md, round 9),
paid one after the other before the call's last request could leave. The threads are now started once per
process, on first use (so after gunicorn's fork; a forked child starts its own), and shared by every call of the
process: ``CMV_CDS_FHIR_MAX_WORKERS`` of them, which with gunicorn's sync workers (one call at a time) is the
call's parallelism, as before.

A read the FHIR budget's watchdog cannot end (a DNS lookup, ``service.fhir_client``) outlives its call: the
call then retires its pool, and the next call starts a new one, so that no call waits for another's stuck read
(one EHR's DNS failure must not take the FHIR reads of every other caller of the worker down with it). The old
pool's threads end with their reads, as the threads per call did. A call whose reads cannot start within its
budget cancels them, so no read runs after its call (``prefetch._fetch_all`` answers 412 naming the keys, and
counts them).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor, wait
from typing import TypeVar

from service.fhir_client import FetchBudget

_Item = TypeVar("_Item")
_Result = TypeVar("_Result")

# After the budget, how long the reads are still awaited: the watchdog has shut every socket down by then, so the
# threads return within milliseconds; this covers the thread switch, not the network.
GRACE_SECONDS = 0.25

_pools: dict[int, ThreadPoolExecutor] = {}
_lock = threading.Lock()


def fetch_pool(max_workers: int) -> ThreadPoolExecutor:
    """The process's pool of ``max_workers`` FHIR fetch threads, created on first use. Callers never shut it down;
    they cancel their own reads that have not started (``Future.cancel``)."""
    pool = _pools.get(max_workers)
    if pool is None:
        with _lock:
            pool = _pools.get(max_workers)
            if pool is None:
                pool = _pools[max_workers] = ThreadPoolExecutor(max_workers, thread_name_prefix="cmv-cds-fetch")
    return pool


def run_within_budget(
    read: Callable[[_Item], _Result], items: Iterable[_Item], max_workers: int, budget: FetchBudget
) -> list[Future[_Result]]:
    """``read`` every item on the process's fetch threads, in parallel; return their futures once all are done, or
    once the budget is spent: its watchdog then ends the reads still blocked (``GRACE_SECONDS`` more), and those
    that never started (the threads busy past the budget) are cancelled, so none runs after its call. Even one
    read goes to a thread, so that nothing holds the request thread past the budget."""
    futures: list[Future[_Result]] = []
    pools: list[ThreadPoolExecutor] = []  # the pool each read went to
    try:
        for item in items:
            pool, future = _submit(read, item, max_workers)
            pools.append(pool)
            futures.append(future)
        _, pending = wait(futures, timeout=max(0.0, budget.remaining()))
        if pending:
            budget.expire()
            wait(pending, timeout=GRACE_SECONDS)
    finally:
        # Never wait for a thread stuck where the watchdog cannot reach (a DNS lookup): it ends on its own.
        for future in futures:
            future.cancel()
        for pool in {pool for pool, future in zip(pools, futures, strict=True) if not future.done()}:
            _retire(max_workers, pool)
    return futures


def _submit(
    read: Callable[[_Item], _Result], item: _Item, max_workers: int
) -> tuple[ThreadPoolExecutor, Future[_Result]]:
    while True:
        pool = fetch_pool(max_workers)
        try:
            return pool, pool.submit(read, item)
        except RuntimeError:  # shut down, or no thread could be started
            if _pools.get(max_workers) is pool:
                raise  # not by _retire: the interpreter's exit, or the process out of threads
            # Another call (a threaded server's) retired this pool after it was looked up: use the new one.


def _retire(max_workers: int, pool: ThreadPoolExecutor) -> None:
    """A read outlived its call in ``pool``: the pool is replaced (if it is still the current one), so that the next
    call does not wait for the stuck thread. Its other threads end once they have run what is queued there; the
    stuck one when its read does."""
    with _lock:
        if _pools.get(max_workers) is pool:
            del _pools[max_workers]
    pool.shutdown(wait=False)


def _forget_after_fork() -> None:
    # A forked child has none of its parent's threads: a pool it inherited would queue reads that no thread runs.
    global _lock
    _pools.clear()
    _lock = threading.Lock()


os.register_at_fork(after_in_child=_forget_after_fork)
