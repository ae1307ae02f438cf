"""A tiny FHIR server stub on loopback: the six prefetch queries of the service, each after a fixed delay.

It answers exactly the queries the service's prefetch templates render for the benchmark patient (query
parameters compared after decoding, in any order) with the fixture's resources; anything else is a 404
OperationOutcome and is counted as a miss. A threaded ``http.server``: requests are served concurrently,
so the delay shows whether the service fetches in parallel. It also records the peak number of requests
in flight at once.

The benchmark runs it in its own process (``python -m bench.fhir_stub``), so that neither the stub's
Python work nor the driver's shares a GIL with the other; ``GET /_stats`` and ``POST /_reset`` read and
reset its counters.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import orjson

from bench import fixture
from bench.procs import LOOPBACK

BASE_PATH = "/fhir"


def _key(path: str, query: str) -> tuple[str, tuple[tuple[str, str], ...]]:
    return path, tuple(sorted(parse_qsl(query, keep_blank_values=True)))


def expected_queries(patient_id: str = fixture.PATIENT_ID) -> dict[str, str]:
    """prefetch key → the relative FHIR query the service sends for it (from the service's own templates)."""
    from service.prefetch import render
    from service.registry import prefetch_templates

    return {t.key: render(t.query, {"patientId": patient_id}) for t in prefetch_templates()}


class FhirStub:
    """Start with :meth:`start`, stop with :meth:`stop` (also a context manager)."""

    def __init__(self, delay_seconds: float = 0.05) -> None:
        self.delay_seconds = delay_seconds
        self.queries = expected_queries()
        resources = fixture.resources_by_key()
        self._routes: dict[tuple[str, tuple[tuple[str, str], ...]], bytes] = {}
        for key, relative in self.queries.items():
            parts = urlsplit(relative)
            found = resources[key]
            payload: Any = found[0] if key == "patient" else fixture.searchset(found, self.base_url_placeholder)
            self._routes[_key(f"{BASE_PATH}/{parts.path}", parts.query)] = orjson.dumps(payload)
        self.hits = 0
        self.misses = 0
        self.in_flight = 0
        self.peak_in_flight = 0
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    base_url_placeholder = f"http://{LOOPBACK}{BASE_PATH}"

    @property
    def port(self) -> int:
        assert self._server is not None
        return int(self._server.server_address[1])

    @property
    def base_url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}{BASE_PATH}"

    def url_for(self, key: str) -> str:
        return f"{self.base_url}/{self.queries[key]}"

    def reset_counters(self) -> None:
        with self._lock:
            self.hits = self.misses = self.peak_in_flight = 0

    def start(self) -> FhirStub:
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                if self.path != "/_reset":
                    self.send_error(404)
                    return
                stub.reset_counters()
                self._send(200, b"{}")

            def _send(self, status: int, payload: bytes) -> None:
                self.send_response(status)
                self.send_header("Content-Type", "application/fhir+json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def do_GET(self) -> None:
                if self.path == "/_stats":
                    with stub._lock:
                        stats = {"hits": stub.hits, "misses": stub.misses, "peak_in_flight": stub.peak_in_flight}
                    self._send(200, orjson.dumps(stats))
                    return
                with stub._lock:
                    stub.in_flight += 1
                    stub.peak_in_flight = max(stub.peak_in_flight, stub.in_flight)
                try:
                    time.sleep(stub.delay_seconds)
                    parts = urlsplit(self.path)
                    payload = stub._routes.get(_key(parts.path, parts.query))
                    with stub._lock:
                        if payload is None:
                            stub.misses += 1
                        else:
                            stub.hits += 1
                    status = 200
                    if payload is None:
                        status = 404
                        payload = orjson.dumps(
                            {
                                "resourceType": "OperationOutcome",
                                "issue": [{"severity": "error", "code": "not-found", "diagnostics": "not in stub"}],
                            }
                        )
                    self._send(status, payload)
                finally:
                    with stub._lock:
                        stub.in_flight -= 1

            def log_message(self, format: str, *args: Any) -> None:
                return

        self._server = ThreadingHTTPServer((LOOPBACK, 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="fhir-stub", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def __enter__(self) -> FhirStub:
        return self.start()

    def __exit__(self, *_exc: object) -> None:
        self.stop()


@dataclass
class RemoteStub:
    """The driver's handle on a stub running in another process (``python -m bench.fhir_stub``)."""

    base_url: str
    delay_seconds: float
    queries: dict[str, str] = field(default_factory=expected_queries)

    def url_for(self, key: str) -> str:
        return f"{self.base_url}/{self.queries[key]}"

    def _origin(self) -> str:
        return self.base_url[: -len(BASE_PATH)]

    def stats(self) -> dict[str, int]:
        import requests

        stats: dict[str, int] = requests.get(f"{self._origin()}/_stats", timeout=5).json()
        return stats

    def reset_counters(self) -> None:
        import requests

        requests.post(f"{self._origin()}/_reset", timeout=5).raise_for_status()


def main() -> None:
    """``python -m bench.fhir_stub DELAY_SECONDS``: serve until killed; print the base URL first."""
    import sys

    stub = FhirStub(delay_seconds=float(sys.argv[1]) if len(sys.argv) > 1 else 0.05).start()
    print(stub.base_url, flush=True)
    try:
        threading.Event().wait()
    finally:
        stub.stop()


if __name__ == "__main__":
    main()
