"""A misbehaving FHIR server for fault tests: a real TCP server on loopback, one behaviour per URL path prefix.

``http://127.0.0.1:PORT/<mode>/fhir`` is a FHIR base URL whose every answer misbehaves as ``mode`` says (see
``MODES``); ``/ok/fhir`` answers well (an empty searchset, a 404 for reads). Each connection is served in its own
thread, for at most ``MAX_CONNECTION_SECONDS``; ``hits`` counts requests per mode, so a test can check that a
host was never contacted. Stopped (all connections closed) when the context manager exits.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections import Counter
from collections.abc import Iterator
from typing import Any

import orjson
from fhir_fixtures import load, order_select, patient_resources, prefetch_for
from processes import LOOPBACK

MAX_CONNECTION_SECONDS = 30.0
TRICKLE_INTERVAL_SECONDS = 1.0  # slow-loris: one byte per second

MODES = {
    "ok": "an empty searchset Bundle for searches, 404 for reads",
    "slow-body": "headers at once, then the body one byte per second",
    "slow-headers": "the status line and headers one byte per second",
    "silent": "accepts the connection and never answers",
    "sleep": "answers correctly after 20 s",
    "error": "HTTP 500 with an OperationOutcome",
    "garbage": "HTTP 200 with a body that is not JSON",
    "huge": "HTTP 200 with a 50 MB body",
    "redirect": "HTTP 302 to another host",
    "foreign-next": "a searchset whose next link is on another host",
}

_EMPTY_BUNDLE = {"resourceType": "Bundle", "type": "searchset", "total": 0, "entry": []}


class FaultServer:
    """The running server: ``base(mode)`` is a FHIR base URL; ``hits[mode]`` the requests received."""

    def __init__(self, foreign_base: str = f"http://{LOOPBACK}:9/fhir") -> None:
        # Where redirects and next links point: another origin, on loopback (by default the discard port, where
        # nothing listens; a test passes a second FaultServer to count what reaches it).
        self.foreign_base = foreign_base
        self.hits: Counter[str] = Counter()
        self._listener = socket.create_server((LOOPBACK, 0))
        self.port: int = self._listener.getsockname()[1]
        self._stop = threading.Event()
        self._connections: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._serve, name="fault-fhir-server", daemon=True)

    def base(self, mode: str) -> str:
        assert mode in MODES, mode
        return f"http://{LOOPBACK}:{self.port}/{mode}/fhir"

    def _serve(self) -> None:
        self._listener.settimeout(0.2)
        while not self._stop.is_set():
            try:
                conn, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with self._lock:
                self._connections.add(conn)
            threading.Thread(target=self._handle, args=(conn,), daemon=True).start()

    def _handle(self, conn: socket.socket) -> None:
        try:
            conn.settimeout(MAX_CONNECTION_SECONDS)
            request = b""
            while b"\r\n\r\n" not in request:
                chunk = conn.recv(4096)
                if not chunk:
                    return
                request += chunk
            path = request.split(b" ", 2)[1].decode()
            mode = path.split("/")[1]
            with self._lock:
                self.hits[mode] += 1
            self._answer(conn, mode, path)
        except OSError:
            pass
        finally:
            with self._lock:
                self._connections.discard(conn)
            conn.close()

    def _answer(self, conn: socket.socket, mode: str, path: str) -> None:
        deadline = time.monotonic() + MAX_CONNECTION_SECONDS
        if mode == "silent":
            self._stop.wait(MAX_CONNECTION_SECONDS)
            return
        if mode == "sleep":
            self._stop.wait(20)
        if mode == "slow-headers":
            for byte in b"HTTP/1.1 200 OK\r\nContent-Type: application/fhir+json\r\n":
                if self._stop.wait(TRICKLE_INTERVAL_SECONDS) or time.monotonic() > deadline:
                    return
                conn.sendall(bytes([byte]))
            return
        if mode == "slow-body":
            conn.sendall(_head(200, 1_000_000))
            while not self._stop.wait(TRICKLE_INTERVAL_SECONDS) and time.monotonic() < deadline:
                conn.sendall(b" ")
            return
        if mode == "huge":
            size = 50 * 1024 * 1024
            conn.sendall(_head(200, size))
            block = b" " * 65536
            with contextlib.suppress(OSError):  # the client hangs up after its cap
                for _ in range(size // len(block)):
                    conn.sendall(block)
            return
        if mode == "redirect":
            conn.sendall(_head(302, 0, location=self.foreign_base + "/Patient"))
            return
        if mode == "error":
            outcome = {"resourceType": "OperationOutcome", "issue": [{"severity": "error", "code": "exception"}]}
            body = orjson.dumps(outcome)
            conn.sendall(_head(500, len(body)) + body)
            return
        if mode == "garbage":
            body = b"<html>not FHIR</html>"
            conn.sendall(_head(200, len(body)) + body)
            return
        if "?" not in path:  # a read: no such resource here
            conn.sendall(_head(404, 0))
            return
        bundle = dict(_EMPTY_BUNDLE)
        if mode == "foreign-next":
            bundle["link"] = [{"relation": "next", "url": self.foreign_base + "/Observation?page=2"}]
        body = orjson.dumps(bundle)
        conn.sendall(_head(200, len(body)) + body)

    def __enter__(self) -> FaultServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._listener.close()
        with self._lock:
            connections = list(self._connections)
        for conn in connections:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
        self._thread.join(timeout=5)


def _head(status: int, length: int, *, location: str | None = None) -> bytes:
    reason = {200: "OK", 302: "Found", 404: "Not Found", 500: "Internal Server Error"}[status]
    lines = [f"HTTP/1.1 {status} {reason}", "Content-Type: application/fhir+json", f"Content-Length: {length}"]
    if location:
        lines.append(f"Location: {location}")
    return ("\r\n".join(lines) + "\r\nConnection: close\r\n\r\n").encode()


@contextlib.contextmanager
def fault_servers() -> Iterator[tuple[FaultServer, FaultServer]]:
    """A misbehaving server whose redirects and next links point at a second one (which must see no request)."""
    with FaultServer() as foreign, FaultServer(foreign.base("ok")) as server:
        yield server, foreign


def request_fetching(base: str, *missing: str) -> dict[str, Any]:
    """A ganciclovir order-select whose prefetch lacks the ``missing`` keys, to be fetched from ``base``."""
    prefetch = prefetch_for(patient_resources())
    for key in missing:
        del prefetch[key]
    return order_select(
        [load("draft-ganciclovir.json")],
        prefetch=prefetch,
        fhirServer=base,
        fhirAuthorization={
            "access_token": "opaque-token",
            "token_type": "Bearer",
            "expires_in": 300,
            "scope": "patient/*.read",
            "subject": "cmv-cds",
        },
    )
