"""Process state shared by the gunicorn worker and the app: whether this worker is draining for shutdown.

``service.gunicorn_worker`` sets it when SIGTERM arrives; ``GET /readyz`` answers 503 from then on, so a load
balancer stops sending new connections while the worker still answers the ones it has.
"""

from __future__ import annotations

import threading

_DRAINING = threading.Event()


def start_draining() -> None:
    """Mark this process as shutting down (readiness turns false at once)."""
    _DRAINING.set()


def is_draining() -> bool:
    """Whether this process is shutting down."""
    return _DRAINING.is_set()


def reset() -> None:
    """Back to serving (tests only: one process runs many apps)."""
    _DRAINING.clear()
