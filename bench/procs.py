"""Starting and stopping the benchmark's servers: each in its own process group, always stopped.

Every process is started with ``start_new_session=True`` (its own session and process group), so a
Ctrl-C in the terminal reaches only the benchmark driver, which then stops each group it started by its
id: SIGTERM, then SIGKILL after a grace period. Nothing is stopped by name.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType

LOOPBACK = "127.0.0.1"
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


class BenchError(RuntimeError):
    """The benchmark cannot go on (a server did not start, a tool is missing)."""


def free_port() -> int:
    """A TCP port on the loopback interface that is free right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        return int(sock.getsockname()[1])


@dataclass
class Server:
    """A started server: its process (the group leader), its port and its log file."""

    name: str
    process: subprocess.Popen[bytes]
    port: int
    log_path: Path
    started_at: float = field(default_factory=time.perf_counter)

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def base_url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return ""

    def worker_pids(self) -> list[int]:
        """The gunicorn workers: the master's children."""
        return children(self.pid)


class Processes:
    """Every process group the benchmark started; ``stop_all`` ends them all (idempotent)."""

    def __init__(self) -> None:
        self._running: list[subprocess.Popen[bytes]] = []

    def start(
        self, name: str, argv: Sequence[str], *, env: Mapping[str, str], cwd: Path, log_path: Path, port: int
    ) -> Server:
        log = log_path.open("wb")
        try:
            process = subprocess.Popen(
                list(argv),
                cwd=cwd,
                env=dict(env),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        finally:
            log.close()
        self._running.append(process)
        return Server(name=name, process=process, port=port, log_path=log_path)

    def stop(self, process: subprocess.Popen[bytes], grace_seconds: float = 15.0) -> None:
        """SIGTERM the process group, wait, then SIGKILL it. Safe to call twice."""
        if process in self._running:
            self._running.remove(process)
        if process.poll() is None:
            _signal_group(process.pid, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout=grace_seconds)
        # Workers may outlive a master that died abnormally: the group is killed either way.
        _signal_group(process.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=5)

    def stop_all(self) -> None:
        for process in list(reversed(self._running)):
            self.stop(process)


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def interrupt_on_termination() -> None:
    """SIGINT (Ctrl-C), SIGTERM and SIGHUP end the driver with KeyboardInterrupt, so its ``finally`` blocks
    stop every server."""

    def handler(signum: int, _frame: FrameType | None) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, handler)
    # Ctrl-C as KeyboardInterrupt even when started in the background (where the shell ignores SIGINT).
    signal.signal(signal.SIGINT, signal.default_int_handler)


def children(pid: int) -> list[int]:
    """Direct children of ``pid`` (from /proc)."""
    path = Path(f"/proc/{pid}/task/{pid}/children")
    try:
        return [int(p) for p in path.read_text().split()]
    except (OSError, ValueError):
        pass
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry.name))
    return found


def proc_status_kb(pid: int, key: str) -> int | None:
    """A ``kB`` field of /proc/<pid>/status (VmHWM: peak resident set; VmRSS: current)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


def cpu_seconds(pid: int, *, reaped_children: bool = False) -> float:
    """User + system CPU time of one process so far (0 if it is gone); with ``reaped_children``, plus that
    of its children that have exited and been waited for (gunicorn workers recycled by max_requests)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    # After the command name, fields[0] is stat(5) field 3 (state): utime, stime, cutime, cstime are 14-17.
    ticks = int(fields[11]) + int(fields[12])
    if reaped_children:
        ticks += int(fields[13]) + int(fields[14])
    return ticks / CLOCK_TICKS


def wait_for(predicate: object, timeout: float, what: str, server: Server | None = None) -> None:
    """Poll ``predicate()`` every 20 ms until true; BenchError after ``timeout`` or if the server died."""
    assert callable(predicate)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        if server is not None and server.process.poll() is not None:
            raise BenchError(
                f"{server.name} exited with status {server.process.returncode}:\n{server.log_text()[-3000:]}"
            )
        time.sleep(0.02)
    tail = server.log_text()[-3000:] if server is not None else ""
    raise BenchError(f"timed out after {timeout:.0f} s waiting for {what}\n{tail}")
