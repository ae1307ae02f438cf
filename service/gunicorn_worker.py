"""Gunicorn's sync worker with a graceful drain: on SIGTERM it answers every connection that has reached the socket.

Gunicorn's own sync worker stops accepting as soon as SIGTERM arrives and exits after its current request; the
connections still waiting in the listen backlog are then reset when the last process holding the listening
socket closes it (measured: 6 of 8 concurrent requests reset). This worker instead, on SIGTERM:

1. turns readiness false at once (``service.lifecycle``: ``GET /readyz`` answers 503), so a load balancer or a
   Kubernetes Service stops sending it new connections;
2. keeps accepting and answering until no connection has arrived for ``DRAIN_QUIET_SECONDS``: the backlog is
   empty and the balancer has noticed;
3. then exits as gunicorn's does, in any case before gunicorn's ``graceful_timeout`` (minus
   ``DRAIN_MARGIN_SECONDS``, so the master never has to SIGKILL a worker in the middle of a request).

SIGINT and SIGQUIT still stop at once (gunicorn's quick shutdown).
"""

from __future__ import annotations

import time
from typing import Any

from gunicorn.workers.sync import SyncWorker

from service import lifecycle

# A drain ends once no connection has arrived for this long (the backlog is empty and the balancer has stopped
# sending).
DRAIN_QUIET_SECONDS = 1.0
# ...and always this long before gunicorn's graceful_timeout, leaving time to finish the last request.
DRAIN_MARGIN_SECONDS = 3.0


class DrainingSyncWorker(SyncWorker):  # type: ignore[misc]  # gunicorn has no type information
    """Sync worker that drains its listen backlog on SIGTERM (see the module docstring)."""

    draining_since: float | None = None
    last_connection: float = 0.0

    def handle_exit(self, sig: int, frame: Any) -> None:
        """SIGTERM: start draining instead of stopping (``alive`` stays true until the backlog is empty)."""
        if self.draining_since is None:
            lifecycle.start_draining()
            self.draining_since = self.last_connection = time.monotonic()
            self.log.info("Draining: readiness off; answering queued connections before exit")

    def accept(self, listener: Any) -> None:
        super().accept(listener)  # raises when nothing is waiting
        if self.draining_since is not None:
            self.last_connection = time.monotonic()
            if self.last_connection >= self._drain_limit():
                self.alive = False  # connections keep coming past the grace period: stop anyway

    def wait(self, timeout: float) -> Any:
        """Called when no connection is waiting; while draining, decide whether the drain is over."""
        if self.draining_since is None:
            return super().wait(timeout)
        now = time.monotonic()
        limit = self._drain_limit()
        quiet_until = self.last_connection + DRAIN_QUIET_SECONDS
        if now >= quiet_until or now >= limit:
            self.alive = False
            return None
        return super().wait(min(timeout, quiet_until - now, limit - now))

    def _drain_limit(self) -> float:
        assert self.draining_since is not None
        return self.draining_since + max(0.0, float(self.cfg.graceful_timeout) - DRAIN_MARGIN_SECONDS)
