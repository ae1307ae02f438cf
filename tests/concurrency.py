"""Running test workers at the same instant in threads."""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence

START_TIMEOUT_SECONDS = 10.0
JOIN_TIMEOUT_SECONDS = 60.0


def run_concurrently(workers: Sequence[Callable[[], object]]) -> list[BaseException]:
    """Start the callables together (behind a barrier), one thread each; return what they raised."""
    start = threading.Barrier(len(workers))
    errors: list[BaseException] = []

    def run(work: Callable[[], object]) -> None:
        try:
            start.wait(timeout=START_TIMEOUT_SECONDS)
            work()
        except BaseException as exc:  # a failed assertion or a broken barrier counts too
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(work,)) for work in workers]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=JOIN_TIMEOUT_SECONDS)
    return errors
