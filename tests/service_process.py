"""The service as users run it, for fault tests: `cmv-cds serve` (gunicorn, sync workers) in its own process group
on a free loopback port, and a load generator that records every request's fate (answered, or reset).
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from processes import LOOPBACK, free_loopback_port, stop_process_group

REPO = Path(__file__).resolve().parents[1]
START_SECONDS = 30.0
REQUEST_TIMEOUT_SECONDS = 30.0


@dataclass
class Service:
    """A running `cmv-cds serve`: its master process, port, log file and spool directory."""

    process: subprocess.Popen[bytes]
    port: int
    log_path: Path
    env: dict[str, str]

    @property
    def base_url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    def request(
        self, method: str, path: str, body: Any = None, headers: dict[str, str] | None = None, timeout: float = 10.0
    ) -> tuple[int, Any]:
        """One request on a new connection: (status, parsed JSON body or None)."""
        return http_request(self.port, method, path, body, headers, timeout)

    def workers(self) -> list[int]:
        """Pids of the master's worker processes."""
        out = subprocess.run(
            ["ps", "-o", "pid=", "--ppid", str(self.process.pid)], capture_output=True, text=True, check=False
        ).stdout
        return [int(pid) for pid in out.split()]

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def kill_all(self) -> None:
        """SIGKILL to master and workers at once, as the OOM killer or a node failure would."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(timeout=10)


def http_request(
    port: int,
    method: str,
    path: str,
    body: Any = None,
    headers: dict[str, str] | None = None,
    timeout: float = 10.0,
) -> tuple[int, Any]:
    conn = http.client.HTTPConnection(LOOPBACK, port, timeout=timeout)
    try:
        payload = None if body is None else json.dumps(body).encode()
        all_headers = {"Content-Type": "application/json"} if payload is not None else {}
        conn.request(method, path, body=payload, headers=all_headers | (headers or {}))
        response = conn.getresponse()
        data = response.read()
        return response.status, json.loads(data) if data else None
    finally:
        conn.close()


def service_env(tmp_path: Path, **settings: str) -> dict[str, str]:
    """The environment of a service: nothing inherited of CMV_CDS_*, auth off unless given, SQLite in tmp_path."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CMV_CDS_") and k != "GUNICORN_CMD_ARGS"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env["CMV_CDS_REQUIRE_AUTH"] = "false"
    env["CMV_CDS_DATABASE_URL"] = f"sqlite:///{tmp_path / 'feedback.sqlite3'}"
    env["CMV_CDS_SPOOL_DIR"] = str(tmp_path / "spool")
    env.update({f"CMV_CDS_{name.upper()}": value for name, value in settings.items()})
    return env


def start_service(env: dict[str, str], log_path: Path, *, workers: int = 2, port: int | None = None) -> Service:
    """Start `cmv-cds serve` and wait until /healthz answers (liveness: the database may be down)."""
    port = port or free_loopback_port()
    command = [sys.executable, "-m", "service.cli", "serve", "--host", LOOPBACK, "--port", str(port)]
    with log_path.open("ab") as log:
        process = subprocess.Popen(
            [*command, "--workers", str(workers)],
            cwd=REPO,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    service = Service(process, port, log_path, env)
    deadline = time.monotonic() + START_SECONDS
    while True:
        if process.poll() is not None:
            raise AssertionError(f"service exited with {process.returncode}:\n{service.log()[-4000:]}")
        with contextlib.suppress(OSError):
            if service.request("GET", "/healthz", timeout=2)[0] == 200:
                return service
        if time.monotonic() > deadline:
            stop_process_group(process)
            raise AssertionError(f"no /healthz within {START_SECONDS} s:\n{service.log()[-4000:]}")
        time.sleep(0.1)


@contextlib.contextmanager
def running_service(env: dict[str, str], log_path: Path, **kwargs: Any) -> Iterator[Service]:
    service = start_service(env, log_path, **kwargs)
    try:
        yield service
    finally:
        stop_process_group(service.process)


def wait_until(condition: Callable[[], bool], seconds: float, message: str) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {seconds} s: {message}")
        time.sleep(0.1)


# --- load -----------------------------------------------------------------------------------------------


@dataclass
class Outcome:
    """One request of the load: when it was sent and what became of it."""

    path: str
    started: float
    finished: float
    status: int | None  # None: no HTTP answer
    error: str | None
    body: Any = None


@dataclass
class Load:
    """``concurrency`` clients, each sending ``make_request()`` in a loop on a new connection, until ``stop()`` or
    ``seconds``; every outcome recorded."""

    port: int
    make_request: Callable[[], tuple[str, str, Any]]
    concurrency: int = 8
    seconds: float = 60.0
    timeout: float = REQUEST_TIMEOUT_SECONDS
    outcomes: list[Outcome] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _threads: list[threading.Thread] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def start(self) -> Load:
        deadline = time.monotonic() + self.seconds
        for n in range(self.concurrency):
            thread = threading.Thread(target=self._client, args=(deadline,), name=f"load-{n}", daemon=True)
            thread.start()
            self._threads.append(thread)
        return self

    def stop_starting(self) -> None:
        """No new request after this (those under way go on)."""
        self._stop.set()

    def stop(self) -> list[Outcome]:
        """No new request after this; wait for those under way. All outcomes."""
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=self.timeout + 5)
        assert not any(thread.is_alive() for thread in self._threads), "a client did not finish"
        return list(self.outcomes)

    def _client(self, deadline: float) -> None:
        while not self._stop.is_set() and time.monotonic() < deadline:
            method, path, body = self.make_request()
            started = time.monotonic()
            try:
                status, answer = http_request(self.port, method, path, body, timeout=self.timeout)
                outcome = Outcome(path, started, time.monotonic(), status, None, answer)
            except (OSError, http.client.HTTPException) as exc:
                outcome = Outcome(path, started, time.monotonic(), None, type(exc).__name__)
            with self._lock:
                self.outcomes.append(outcome)
