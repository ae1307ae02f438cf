"""Load generation with wrk (Debian package ``wrk``), plus a plain HTTP client for single timed calls."""

from __future__ import annotations

import http.client
import shutil
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from bench.procs import LOOPBACK, Server, cpu_seconds, proc_status_kb

WRK_INSTALL = "sudo apt-get install -y wrk"

# wrk runs this in each of its threads: POST the body from a file; print one parseable line at the end.
# Latencies are in microseconds (wrk's unit).
_LUA = """
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
local file = assert(io.open(%s, "rb"))
wrk.body = file:read("*a")
file:close()

done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    "BENCH_RESULT requests=%%.0f duration_us=%%.0f p50=%%.1f p95=%%.1f p99=%%.1f max=%%.1f mean=%%.1f " ..
    "connect=%%.0f read=%%.0f write=%%.0f status=%%.0f timeout=%%.0f\\n",
    summary.requests, summary.duration, latency:percentile(50), latency:percentile(95),
    latency:percentile(99), latency.max, latency.mean,
    e.connect, e.read, e.write, e.status, e.timeout))
end
"""


def find_wrk() -> str | None:
    return shutil.which("wrk")


def write_lua(directory: Path, body_path: Path) -> Path:
    script = directory / "post.lua"
    quoted = '"' + str(body_path).replace("\\", "\\\\").replace('"', '\\"') + '"'
    script.write_text(_LUA % quoted, encoding="utf-8")
    return script


@dataclass
class LoadResult:
    """One wrk run: throughput, latency percentiles (ms), errors, and the workers' CPU per request."""

    app: str
    connections: int
    seconds: float
    requests: int
    rps: float
    p50_ms: float
    p95_ms: float
    p99_ms: float
    max_ms: float
    errors: dict[str, int]
    cpu_ms_per_request: float
    workers_seen: int
    # The busiest worker's share of the workers' CPU during the run (1/N: even; 1.0: one worker did all the work,
    # as when one uvicorn worker accepts every one of wrk's keep-alive connections). None: no worker alive
    # throughout the run (all recycled) or no CPU measured.
    busiest_worker_share: float | None = None


@dataclass
class RssSampler:
    """Samples VmHWM/VmRSS of a gunicorn master's workers in the background (workers may be recycled)."""

    server: Server
    interval: float = 0.25
    peak_kb: dict[int, int] = field(default_factory=dict)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def sample(self) -> None:
        for pid in self.server.worker_pids():
            hwm = proc_status_kb(pid, "VmHWM")
            if hwm is not None:
                self.peak_kb[pid] = max(hwm, self.peak_kb.get(pid, 0))

    def __enter__(self) -> RssSampler:
        self.sample()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self.sample()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()


def _workers_cpu(server: Server) -> float:
    """CPU seconds of all the master's workers so far: the live ones, plus those it has reaped (recycled by
    max_requests), which the kernel adds to the master's children times. The master's own time is not in."""
    reaped = cpu_seconds(server.pid, reaped_children=True) - cpu_seconds(server.pid)
    return sum(cpu_seconds(pid) for pid in server.worker_pids()) + reaped


def run_wrk(
    wrk: str, server: Server, path: str, lua: Path, *, connections: int, seconds: float, label: str
) -> LoadResult:
    """``wrk -t1 -cN -dS`` against the server on loopback; CPU of the workers measured around it."""
    workers_before = set(server.worker_pids())
    cpu_before = _workers_cpu(server)
    each_before = {pid: cpu_seconds(pid) for pid in workers_before}
    argv = [
        wrk,
        "-t1",
        f"-c{connections}",
        f"-d{max(1, round(seconds))}s",  # wrk takes whole seconds
        "--timeout",
        "5s",
        "-s",
        str(lua),
        f"http://{LOOPBACK}:{server.port}{path}",
    ]
    process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        out, _ = process.communicate(timeout=seconds + 30)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=5)
    workers_after = set(server.worker_pids())
    cpu = _workers_cpu(server) - cpu_before
    each = [cpu_seconds(pid) - each_before[pid] for pid in sorted(workers_before & workers_after)]
    text = out.decode(errors="replace")
    line = next((ln for ln in text.splitlines() if ln.startswith("BENCH_RESULT ")), None)
    if process.returncode != 0 or line is None:
        raise RuntimeError(f"wrk failed (exit {process.returncode}):\n{text[-2000:]}")
    values = {k: float(v) for k, v in (item.split("=") for item in line.split()[1:])}
    requests = int(values["requests"])
    duration = values["duration_us"] / 1e6
    return LoadResult(
        app=label,
        connections=connections,
        seconds=round(duration, 2),
        requests=requests,
        rps=round(requests / duration, 1) if duration else 0.0,
        p50_ms=round(values["p50"] / 1000, 2),
        p95_ms=round(values["p95"] / 1000, 2),
        p99_ms=round(values["p99"] / 1000, 2),
        max_ms=round(values["max"] / 1000, 2),
        errors={k: int(values[k]) for k in ("connect", "read", "write", "status", "timeout") if values[k]},
        cpu_ms_per_request=round(cpu * 1000 / requests, 3) if requests else 0.0,
        workers_seen=len(workers_before | workers_after),
        busiest_worker_share=round(max(each) / cpu, 2) if each and cpu > 0 else None,
    )


def timed_post(port: int, path: str, body: bytes, timeout: float = 30.0) -> tuple[float, int, bytes]:
    """One POST on a new connection: (seconds from connect to the last byte, status, body)."""
    started = time.perf_counter()
    connection = http.client.HTTPConnection(LOOPBACK, port, timeout=timeout)
    try:
        connection.request("POST", path, body=body, headers={"Content-Type": "application/json"})
        response = connection.getresponse()
        data = response.read()
        return time.perf_counter() - started, response.status, data
    finally:
        connection.close()


def timed_get(port: int, path: str, timeout: float = 30.0) -> tuple[float, int, bytes]:
    started = time.perf_counter()
    connection = http.client.HTTPConnection(LOOPBACK, port, timeout=timeout)
    try:
        connection.request("GET", path, headers={"Accept": "application/fhir+json"})
        response = connection.getresponse()
        data = response.read()
        return time.perf_counter() - started, response.status, data
    finally:
        connection.close()
