"""``python -m bench.edge``: the CPU cost of one request in-process, without a server or the network.

Calls the WSGI apps directly (an environ dict, a ``start_response``, the body iterated to the end, as gunicorn
does) a few thousand times and reads ``time.process_time`` (CPU time of the whole process, so the issued-card
writer thread is counted too). Three apps, with the same body (``bench/fixture.py``): the service (auth off, a
temporary SQLite file, its JSON log lines written to /dev/null), the same service without its clinical
evaluation (``bench/ceiling_app.py``, no-evaluation) and the no-op floor (``bench/noop_app.py``); then the
parts of the request edge on their own (the request log line, the metrics, the ids), the way before and the
way now. Used to measure the changes of the request edge (bench/README.md, "The request edge"); the figures
move with the machine's load, so compare runs taken back to back, and read the minimum of the repeats.
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import orjson

from bench import fixture
from bench.procs import BenchError
from bench.run import check_answer

WSGI = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]


def environ(body: bytes, path: str, method: str = "POST") -> dict[str, Any]:
    """An environ as gunicorn builds it (the headers an EHR sends)."""
    return {
        "REQUEST_METHOD": method,
        "SCRIPT_NAME": "",
        "PATH_INFO": path,
        "QUERY_STRING": "",
        "SERVER_NAME": "127.0.0.1",
        "SERVER_PORT": "8080",
        "SERVER_PROTOCOL": "HTTP/1.1",
        "REMOTE_ADDR": "127.0.0.1",
        "CONTENT_TYPE": "application/json",
        "CONTENT_LENGTH": str(len(body)),
        "HTTP_HOST": "127.0.0.1:8080",
        "HTTP_ACCEPT": "application/json",
        "wsgi.version": (1, 0),
        "wsgi.url_scheme": "http",
        "wsgi.input": io.BytesIO(body),
        "wsgi.errors": sys.stderr,
        "wsgi.multithread": False,
        "wsgi.multiprocess": True,
        "wsgi.run_once": False,
    }


def call(app: WSGI, body: bytes, path: str, method: str = "POST") -> tuple[str, bytes]:
    """One request; its status line and body."""
    status: list[str] = []

    def start_response(line: str, headers: list[tuple[str, str]], exc_info: Any = None) -> None:
        status.append(line)

    chunks = app(environ(body, path, method), start_response)
    data = b"".join(chunks)
    close = getattr(chunks, "close", None)
    if close is not None:
        close()
    return status[0], data


def _caller(app: WSGI, body: bytes, path: str, method: str = "POST") -> Callable[[], object]:
    return lambda: call(app, body, path, method)


def per_call_us(work: Callable[[], object], calls: int, repeats: int) -> list[float]:
    """CPU microseconds per call of ``work``, for each of ``repeats`` rounds of ``calls`` calls."""
    rounds = []
    for _ in range(repeats):
        started = time.process_time()
        for _ in range(calls):
            work()
        rounds.append((time.process_time() - started) / calls * 1e6)
    return rounds


def _service_app(directory: Path) -> WSGI:
    from service.app import create_app

    app = create_app({"require_auth": False, "database_url": f"sqlite:///{directory / 'edge.sqlite3'}"})
    wsgi: WSGI = app.wsgi_app
    return wsgi


def _without_evaluation(directory: Path) -> WSGI:
    from bench.ceiling_app import build

    app = build("no-evaluation", {"require_auth": False, "database_url": f"sqlite:///{directory / 'edge2.sqlite3'}"})
    wsgi: WSGI = app.wsgi_app
    return wsgi


def _pieces() -> dict[str, Callable[[], object]]:
    """The request edge's parts on their own, as one request calls them: the way before this change (through
    ``logging``, ``.labels()`` each time, ``uuid4``) next to the way the service does it now."""
    import logging
    import uuid

    from cards import model
    from service import logs, metrics

    route = "/cds-services/<service:service_id>"
    fields: dict[str, Any] = {
        "request_id": "bench-request-0001",
        "method": "POST",
        "path": route,
        "service_id": fixture.SERVICE_ID,
        "hook_instance": "d1577c69-dfbe-44ad-ba6d-3e05e953b2ea",
        "status": 200,
        "card_count": 2,
        "rules": ["dose-adjust", "interactions"],
        "latency_ms": 1.23,
    }
    cards = [("dose-adjust", "warning"), ("interactions", "warning")]
    log = logging.getLogger("cmv_cds.app")

    def metrics_by_labels() -> None:
        metrics.REQUESTS.labels("POST", route, fixture.SERVICE_ID, "200").inc()
        metrics.REQUEST_DURATION.labels("POST", route).observe(0.00123)
        for rule_id, indicator in cards:
            metrics.CARDS.labels(fixture.SERVICE_ID, rule_id, indicator).inc()

    def metrics_now() -> None:
        metrics.observe_request("POST", route, fixture.SERVICE_ID, 200, 0.00123)
        metrics.count_cards(fixture.SERVICE_ID, cards)

    pieces: dict[str, Callable[[], object]] = {
        "log line via a LogRecord": lambda: log.info("request", extra=fields),
        "metrics via .labels()": metrics_by_labels,
        "metrics as the service": metrics_now,
        "4 ids by uuid4()": lambda: [str(uuid.uuid4()) for _ in range(4)],
        "4 ids as the service": lambda: [model.new_uuid() for _ in range(4)],
    }
    log_request = getattr(logs, "log_request", None)
    if log_request is not None:
        pieces["log line as the service"] = lambda: log_request(fields)
    return pieces


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.edge", description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=3000, help="calls per round (default %(default)s)")
    parser.add_argument("--repeats", type=int, default=3, help="rounds per app (default %(default)s)")
    args = parser.parse_args(argv)

    body = orjson.dumps(fixture.order_select())
    path = f"/cds-services/{fixture.SERVICE_ID}"
    real_stderr = sys.stderr
    with tempfile.TemporaryDirectory(prefix="cmv-cds-edge-") as tmp, open(os.devnull, "w") as devnull:
        sys.stderr = devnull  # the service's log handler writes here, as to a pipe nobody reads slowly
        try:
            from bench.noop_app import app as noop

            service = _service_app(Path(tmp))
            status, data = call(service, body, path)
            try:  # the same answer check as the load benchmark: a dose card with an update suggestion
                check_answer(int(status.split()[0]), data, "in-process service")
            except BenchError as error:
                raise SystemExit(str(error)) from None
            floor: WSGI = noop.wsgi_app
            results: dict[str, list[float]] = {}
            for name, app in {"service": service, "no-op floor": floor}.items():
                call(app, body, path)  # warm
                call(app, b"", "/healthz", "GET")
                results[name] = per_call_us(_caller(app, body, path), args.calls, args.repeats)
            # GET /healthz does no work of its own in either app: the difference is the service's request edge
            # (its before/after_request hooks: request id, log line, metrics, headers) over Flask's own.
            for name, app in {"GET /healthz, service": service, "GET /healthz, no-op floor": floor}.items():
                results[name] = per_call_us(_caller(app, b"", "/healthz", "GET"), args.calls * 3, args.repeats)
            # The same service without its clinical evaluation (bench/ceiling_app.py): what is left is the
            # protocol work and the request edge, so a change of the edge shows against less noise.
            edge_app = _without_evaluation(Path(tmp))
            call(edge_app, body, path)
            results["service, no evaluation"] = per_call_us(_caller(edge_app, body, path), args.calls, args.repeats)
            for name, work in _pieces().items():
                work()
                results[name] = per_call_us(work, args.calls * 3, args.repeats)
        finally:
            sys.stderr = real_stderr
    print(f"CPU per call, µs (process_time; {args.repeats} rounds of {args.calls} calls; min, then each round):")
    for name, rounds in results.items():
        print(f"  {name:<30} {min(rounds):8.1f}   ({', '.join(f'{value:.1f}' for value in rounds)})")
    floor_us = min(results["no-op floor"])
    print(f"  {'service − floor':<30} {min(results['service']) - floor_us:8.1f}")
    print(f"  {'no evaluation − floor':<30} {min(results['service, no evaluation']) - floor_us:8.1f}")
    edge_us = min(results["GET /healthz, service"]) - min(results["GET /healthz, no-op floor"])
    print(f"  {'request edge (/healthz − floor)':<30} {edge_us:8.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
