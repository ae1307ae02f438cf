"""``python -m bench``: the service against a no-op Flask app under the same gunicorn configuration.

See bench/README.md. Everything runs on 127.0.0.1; every server started here is stopped at the end (its
process group, by id), also on an error or Ctrl-C; every wait has a timeout.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import orjson
import requests

from bench import ceiling_app, fixture, peer
from bench.fhir_stub import RemoteStub
from bench.load import WRK_INSTALL, LoadResult, RssSampler, find_wrk, run_wrk, timed_post, write_lua
from bench.procs import LOOPBACK, BenchError, Processes, Server, free_port, interrupt_on_termination, wait_for
from cards.compiled import MANIFEST_NAME

ROOT = Path(__file__).resolve().parents[1]
WORKERS = 2
SERVICE_PATH = f"/cds-services/{fixture.SERVICE_ID}"
SERVICE_APP = "service.wsgi:app"
NOOP_APP = "bench.noop_app:app"
# Logged by service.gunicorn_conf.post_worker_init once a worker has built the app and warmed up.
WORKER_READY = ('"worker warmed"', '"worker warm-up failed"')

TARGETS = {
    "throughput_vs_noop": 0.50,  # full-prefetch req/s at c=8 ≥ 50 % of the no-op floor
    "p99_c8_ms": 15.0,
    "fhir_ratio": 1.3,  # hook total ≤ 1.3 × the slowest single FHIR round trip
    "rss_mb": 150.0,
    "first_request_ms": 300.0,
}


def _gunicorn_argv(app: str, recycle: bool) -> list[str]:
    # `gunicorn -c python:service.gunicorn_conf <app>` (what `cmv-cds serve` runs), from this venv. Unless
    # asked for, workers are not recycled during the measurement (max_requests 0): the no-op app reaches
    # max_requests (10,000 ± 1,000) within seconds, both workers at about the same time, and a 1 s reboot
    # would be charged to the floor only; the service does not get there within a run.
    argv = [sys.executable, "-m", "gunicorn", "-c", "python:service.gunicorn_conf"]
    return [*argv, app] if recycle else [*argv, "--max-requests", "0", app]


def _env(port: int, database: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CMV_CDS_")}
    env.update(
        CMV_CDS_REQUIRE_AUTH="false",  # benchmark only: no JWTs to mint, and loopback http fhirServer allowed
        CMV_CDS_DATABASE_URL=f"sqlite:///{database}",
        CMV_CDS_HOST=LOOPBACK,
        CMV_CDS_PORT=str(port),
        CMV_CDS_WORKERS=str(WORKERS),
    )
    return env


def _start(procs: Processes, tmp: Path, name: str, app: str, recycle: bool, root: Path = ROOT) -> Server:
    port = free_port()
    log = tmp / f"{name}-{port}.log"
    argv = _gunicorn_argv(app, recycle)
    return procs.start(name, argv, env=_env(port, tmp / f"{name}-{port}.sqlite3"), cwd=root, log_path=log, port=port)


# What the compiled copy of the tree needs: the packages and their data (the --ceiling variants, from bench/, run
# on the sources only: see CEILING_NEEDS_SOURCES).
_TREE = ("service", "cards", "fhir_profiles")
CEILING_NEEDS_SOURCES = (
    "--ceiling needs --interpreted: its variants (bench/ceiling_app.py) replace functions of the service at run "
    "time, and compiled modules call each other directly, so a compiled service would bypass the replacements and "
    "still run its evaluation"
)
_COMPILE_TIMEOUT_S = 900


def compiled_tree(tmp: Path) -> Path:
    """A copy of the service's packages compiled with mypyc (scripts/compile_hot_path.py), as the container image ships
    them; the service is started from it (its working directory comes first on the import path). The
    repository's own tree is left as it is."""
    tree = tmp / "compiled"
    skip = shutil.ignore_patterns("__pycache__", "*.so", MANIFEST_NAME)
    for name in _TREE:
        shutil.copytree(ROOT / name, tree / name, ignore=skip)
    try:
        done = subprocess.run(
            [sys.executable, str(ROOT / "scripts" / "compile_hot_path.py"), "--root", str(tree)],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=_COMPILE_TIMEOUT_S,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        raise BenchError(f"compiling with mypyc took over {_COMPILE_TIMEOUT_S} s; --interpreted skips it") from exc
    if done.returncode != 0:
        tail = (done.stdout + done.stderr).strip().splitlines()[-15:]
        raise BenchError(
            "compiling with mypyc failed (it needs the test extra's mypy and a C compiler; --interpreted measures "
            "the sources as they are):\n  " + "\n  ".join(tail)
        )
    return tree


def _ready_workers(server: Server) -> int:
    text = server.log_text()
    return sum(text.count(marker) for marker in WORKER_READY)


def _accepts(server: Server) -> bool:
    try:
        return requests.get(f"{server.base_url}/healthz", timeout=2).status_code == 200
    except requests.RequestException:
        return False


def _wait_service(server: Server) -> float:
    """Wait until every worker has logged its warm-up; the seconds from spawn to that point."""
    wait_for(lambda: _ready_workers(server) >= WORKERS, 90, f"{server.name} workers to boot", server)
    return time.perf_counter() - server.started_at


def _wait_noop(server: Server) -> None:
    wait_for(lambda: _accepts(server) and len(server.worker_pids()) >= WORKERS, 90, "no-op app", server)


def _cards(data: bytes) -> list[dict[str, Any]]:
    cards: list[dict[str, Any]] = orjson.loads(data)["cards"]
    return cards


def _describe_cards(cards: list[dict[str, Any]]) -> list[str]:
    out = []
    for card in cards:
        actions = sorted({a["type"] for s in card.get("suggestions", []) for a in s.get("actions", [])})
        rule = card["source"].get("topic", {}).get("code", "?")
        out.append(f"{rule} [{card['indicator']}]" + (f" ({'/'.join(actions)})" if actions else ""))
    return out


def check_answer(status: int, data: bytes, what: str) -> list[dict[str, Any]]:
    """The service answered 200 with a dose card carrying an update suggestion (the benchmark's request)."""
    if status != 200:
        raise BenchError(f"{what}: HTTP {status}: {data[:500]!r}")
    cards = _cards(data)
    dose = [c for c in cards if c["source"].get("topic", {}).get("code") == "dose-adjust"]
    updates = [a for c in dose for s in c.get("suggestions", []) for a in s.get("actions", []) if a["type"] == "update"]
    if not updates:
        raise BenchError(f"{what}: no dose card with an update suggestion: {_describe_cards(cards)}")
    return cards


def first_requests(
    procs: Processes, tmp: Path, body: bytes, boots: int, recycle: bool, root: Path = ROOT
) -> dict[str, Any]:
    """Fresh service each time: time to boot, then the first, second and warm request latencies."""
    samples = []
    for _ in range(boots):
        server = _start(procs, tmp, "service-boot", SERVICE_APP, recycle, root)
        try:
            boot_s = _wait_service(server)
            time.sleep(0.3)  # let both workers reach their accept loop after the warm-up log line
            first, status, data = timed_post(server.port, SERVICE_PATH, body)
            check_answer(status, data, "first request")
            second, status, data = timed_post(server.port, SERVICE_PATH, body)
            check_answer(status, data, "second request")
            warm = [timed_post(server.port, SERVICE_PATH, body)[0] for _ in range(20)]
            samples.append(
                {
                    "boot_s": round(boot_s, 2),
                    "first_ms": round(first * 1000, 1),
                    "second_ms": round(second * 1000, 1),
                    "warm_median_ms": round(statistics.median(warm) * 1000, 2),
                }
            )
        finally:
            procs.stop(server.process)
    return {"samples": samples, "first_ms_max": max(s["first_ms"] for s in samples)}


def _single_round_trips(stub: RemoteStub, repeats: int) -> dict[str, float]:
    """Median seconds per prefetch query, each GET on a new requests.Session and connection, as a call with one key
    makes it."""
    medians = {}
    for key in stub.queries:
        times = []
        for _ in range(repeats):
            started = time.perf_counter()
            with requests.Session() as session:
                response = session.get(
                    stub.url_for(key),
                    headers={"Accept": "application/fhir+json", "Authorization": "Bearer bench-token"},
                    timeout=5,
                )
                response.content  # noqa: B018 (read the whole body)
            times.append(time.perf_counter() - started)
            if response.status_code != 200:
                raise BenchError(f"FHIR stub: {key} answered {response.status_code}")
        medians[key] = statistics.median(times)
    return medians


def start_stub(procs: Processes, tmp: Path, delay_seconds: float) -> RemoteStub:
    """The FHIR stub in its own process (and process group); its first output line is its base URL."""
    server = procs.start(
        "fhir-stub",
        [sys.executable, "-m", "bench.fhir_stub", str(delay_seconds)],
        env=dict(os.environ),
        cwd=ROOT,
        log_path=tmp / "fhir-stub.log",
        port=0,
    )
    wait_for(lambda: server.log_text().startswith("http://"), 30, "the FHIR stub", server)
    return RemoteStub(base_url=server.log_text().split()[0], delay_seconds=delay_seconds)


def fhir_scenario(server: Server, stub: RemoteStub, calls: int, expected: list[str]) -> dict[str, Any]:
    """No prefetch: the service fetches the six queries from the stub; compare with a single round trip."""
    _single_round_trips(stub, 1)  # warm the stub and the driver's HTTP stack
    singles = _single_round_trips(stub, 5)
    slowest_key = max(singles, key=lambda k: singles[k])
    body = orjson.dumps(fixture.order_select(with_prefetch=False, fhir_server=stub.base_url))
    for _ in range(3):  # warm: the first fetches build thread pools, sessions, imports
        _, status, data = timed_post(server.port, SERVICE_PATH, body)
        cards = check_answer(status, data, "fhirServer scenario")
        if _describe_cards(cards) != expected:
            raise BenchError(f"fhirServer scenario gave other cards: {_describe_cards(cards)} != {expected}")
    stub.reset_counters()
    totals = sorted(timed_post(server.port, SERVICE_PATH, body)[0] for _ in range(calls))
    median = statistics.median(totals)
    stats = stub.stats()
    return {
        "stub_delay_ms": round(stub.delay_seconds * 1000, 1),
        "queries": len(singles),
        "single_ms": {k: round(v * 1000, 1) for k, v in singles.items()},
        "slowest_single_ms": round(singles[slowest_key] * 1000, 1),
        "calls": calls,
        "total_median_ms": round(median * 1000, 1),
        "total_p90_ms": round(totals[int(0.9 * (len(totals) - 1))] * 1000, 1),
        "total_max_ms": round(totals[-1] * 1000, 1),
        "ratio": round(median / singles[slowest_key], 2),
        "peak_concurrent_fetches": stats["peak_in_flight"],
        "stub_misses": stats["misses"],
        "stub_hits": stats["hits"],
    }


def load_app(
    procs: Processes,
    tmp: Path,
    *,
    name: str,
    app: str,
    wrk: str,
    lua: Path,
    body: bytes,
    seconds: float,
    recycle: bool,
    extra: Any = None,
    peer_build: peer.Peer | None = None,
    root: Path = ROOT,
) -> dict[str, Any]:
    """Start one app (``peer_build``: the HealthChain peer, else ``app`` under gunicorn from the tree ``root``),
    check its answer, warm it, run wrk at c=1 and c=8 while sampling worker RSS."""
    is_service = peer_build is None and app != NOOP_APP  # the service, or a --ceiling variant of it
    path = SERVICE_PATH if peer_build is None else peer.PATH
    server = (
        _start(procs, tmp, name, app, recycle, root) if peer_build is None else peer.start(procs, tmp, peer_build, name)
    )
    try:
        if is_service:
            _wait_service(server)
        elif peer_build is None:
            _wait_noop(server)
        _, status, data = timed_post(server.port, path, body)
        if status != 200:
            raise BenchError(f"{name}: HTTP {status}: {data[:500]!r}")
        cards = check_answer(status, data, name) if is_service else _cards(data)
        run_wrk(wrk, server, path, lua, connections=8, seconds=min(2.0, seconds), label="warm-up")
        result: dict[str, Any] = {"cards": _describe_cards(cards), "response_bytes": len(data)}
        with RssSampler(server) as rss:
            loads: list[LoadResult] = [
                run_wrk(wrk, server, path, lua, connections=c, seconds=seconds, label=name) for c in (1, 8)
            ]
            if extra is not None:
                result.update(extra(server, result["cards"]))
        result["load"] = [asdict(load) for load in loads]
        result["peak_rss_mb"] = {str(pid): round(kb / 1024, 1) for pid, kb in sorted(rss.peak_kb.items())}
        return result
    finally:
        procs.stop(server.process)


def source_revision(root: Path = ROOT) -> str:
    """The commit measured, with ``+changes`` when tracked files differ from it (so a result says what it measured);
    empty outside a git checkout or without git."""
    try:
        git = ["git", "-C", str(root)]
        head = subprocess.run([*git, "rev-parse", "--short=12", "HEAD"], capture_output=True, text=True, timeout=10)
        status = subprocess.run(
            [*git, "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.TimeoutExpired):
        return ""
    if head.returncode != 0 or status.returncode != 0:
        return ""
    return head.stdout.strip() + ("+changes" if status.stdout.strip() else "")


def _machine() -> dict[str, Any]:
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    wrk_version = ""
    wrk = find_wrk()
    if wrk:
        try:
            out = subprocess.run([wrk, "--version"], capture_output=True, text=True, check=False, timeout=10).stdout
        except (OSError, subprocess.TimeoutExpired):
            out = ""  # the version is only recorded; the load runs find out whether wrk works
        wrk_version = out.split("[")[0].strip()
    from importlib.metadata import version

    return {
        "cores": os.cpu_count(),
        "cpu": model,
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
        "python": platform.python_version(),
        "gunicorn": version("gunicorn"),
        "flask": version("flask"),
        "wrk": wrk_version,
    }


def _fmt_row(cells: list[str], widths: list[int]) -> str:
    return "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths, strict=True)))


def report(results: dict[str, Any]) -> str:
    m = results["machine"]
    noop, svc = results["noop"], results["service"]
    lines = [
        f"CMV CDS benchmark  {results['started']}  commit: {results.get('commit') or '-'}  "
        f"label: {results['label'] or '-'}",
        f"machine: {m['cores']} cores ({m['cpu']}), load average at start {m['load_average_at_start']}; "
        f"Python {m['python']}, gunicorn {m['gunicorn']}, Flask {m['flask']}, {m['wrk']}",
        f"servers: gunicorn -c python:service.gunicorn_conf <app>, {WORKERS} sync workers, 127.0.0.1 only, "
        + ("max_requests as configured" if results["recycle"] else "max_requests 0 (no worker recycling)"),
        "AUTHENTICATION OFF: CMV_CDS_REQUIRE_AUTH=false for the benchmark (no client JWT is verified); "
        "feedback in a temporary SQLite file",
        f"request: order-select with {results['request']['resources']} resources "
        f"({results['request']['bytes']} bytes); service answer: {', '.join(svc['cards'])}",
        f"service build: {results.get('service_build', 'interpreted')}",
        "",
        f"Load (wrk -t1, {results['seconds']:g} s per run, POST {SERVICE_PATH}):",
    ]
    ceiling: dict[str, Any] = results.get("ceiling") or {}
    widths = [13, 5, 8, 7, 7, 7, 7, 10, 7]
    lines.append(
        _fmt_row(["app", "conns", "req/s", "p50 ms", "p95 ms", "p99 ms", "max ms", "CPU ms/req", "errors"], widths)
    )
    peer_last = [results["peer"]["rounds"][-1]["peer"]] if results.get("peer") else []
    for block in (noop, *peer_last, svc, *ceiling.values()):
        for load in block["load"]:
            lines.append(
                _fmt_row(
                    [
                        load["app"],
                        str(load["connections"]),
                        f"{load['rps']:.0f}",
                        f"{load['p50_ms']:.2f}",
                        f"{load['p95_ms']:.2f}",
                        f"{load['p99_ms']:.2f}",
                        f"{load['max_ms']:.1f}",
                        f"{load['cpu_ms_per_request']:.2f}",
                        str(sum(load["errors"].values())),
                    ],
                    widths,
                )
            )
    for c_index, conns in enumerate((1, 8)):
        ratio = svc["load"][c_index]["rps"] / noop["load"][c_index]["rps"]
        lines.append(f"service / no-op throughput at c={conns}: {ratio:.0%}")
    for variant, block in ceiling.items():
        ratio = block["load"][1]["rps"] / noop["load"][1]["rps"]
        lines.append(f"{variant} / no-op throughput at c=8: {ratio:.0%} (bench/ceiling_app.py)")
    recycled = [
        b["load"][-1]["app"]
        for b in (noop, svc, *ceiling.values())
        if any(ld["workers_seen"] > WORKERS for ld in b["load"])
    ]
    if recycled:
        lines.append(f"note: gunicorn recycled workers during the run of {', '.join(recycled)} (max_requests)")
    lines += [
        "",
        "Peak RSS per worker (VmHWM, MB): service "
        + ", ".join(f"{v:.1f}" for v in svc["peak_rss_mb"].values())
        + "; no-op "
        + ", ".join(f"{v:.1f}" for v in noop["peak_rss_mb"].values()),
    ]
    boot = results["first_request"]
    lines.append("First request after boot (fresh service each time; boot = spawn until both workers warmed):")
    for s in boot["samples"]:
        lines.append(
            f"  boot {s['boot_s']:.2f} s; first request {s['first_ms']:.1f} ms, second {s['second_ms']:.1f} ms, "
            f"then median {s['warm_median_ms']:.2f} ms"
        )
    f = svc["fhir"]
    lines += [
        "",
        f"fhirServer scenario (no prefetch; stub answers each of the {f['queries']} queries after "
        f"{f['stub_delay_ms']:g} ms):",
        f"  slowest single FHIR round trip {f['slowest_single_ms']:.1f} ms (median of 5 per query: "
        + ", ".join(f"{k} {v:.1f}" for k, v in f["single_ms"].items())
        + ")",
        f"  hook call total: median {f['total_median_ms']:.1f} ms, p90 {f['total_p90_ms']:.1f} ms, "
        f"max {f['total_max_ms']:.1f} ms over {f['calls']} calls = {f['ratio']:.2f}x the slowest single round trip; "
        f"peak concurrent FHIR requests {f['peak_concurrent_fetches']}, unmatched queries {f['stub_misses']}",
    ]
    if results.get("peer"):
        lines += ["", *peer_report(results["peer"])]
    lines += ["", "Targets:"]
    c8 = svc["load"][1]
    checks = [
        (
            f"throughput at c=8 >= {TARGETS['throughput_vs_noop']:.0%} of the no-op floor",
            c8["rps"] / noop["load"][1]["rps"] >= TARGETS["throughput_vs_noop"],
        ),
        (f"p99 at c=8 <= {TARGETS['p99_c8_ms']:g} ms", c8["p99_ms"] <= TARGETS["p99_c8_ms"]),
        (
            f"fhirServer total <= {TARGETS['fhir_ratio']}x slowest single round trip",
            f["ratio"] <= TARGETS["fhir_ratio"],
        ),
        (f"peak RSS <= {TARGETS['rss_mb']:g} MB per worker", max(svc["peak_rss_mb"].values()) <= TARGETS["rss_mb"]),
        (
            f"first request after boot <= {TARGETS['first_request_ms']:g} ms",
            boot["first_ms_max"] <= TARGETS["first_request_ms"],
        ),
    ]
    lines += [f"  [{'PASS' if ok else 'MISS'}] {text}" for text, ok in checks]
    return "\n".join(lines)


# Issue 15's bar for the service against the peer and the floor, at c=8 (medians of the rounds).
PEER_TARGETS = {"vs_peer": 1.0, "vs_floor": 0.40, "p99_vs_floor": 3.0}


def _median_of(rounds: list[dict[str, Any]], app: str, key: str) -> tuple[float, list[float]]:
    values = [float(r[app]["load"][1][key]) for r in rounds]
    return statistics.median(values), values


# A worker doing this share of its app's CPU or more did (nearly) all the work: the app ran on one core.
ONE_WORKER_SHARE = 0.8


def _balance_lines(rounds: list[dict[str, Any]]) -> list[str]:
    """How the work was spread over each app's workers, and what the peer's throughput was where both of its
    workers worked. uvicorn's workers share one listening socket, and the first to wake may accept all 8 of wrk's
    keep-alive connections; gunicorn's sync workers take one connection per request, so they stay even."""
    shares = {app: [r[app]["load"][1].get("busiest_worker_share") for r in rounds] for app in ("peer", "service")}
    if any(share is None for values in shares.values() for share in values):
        return []  # runs recorded before the share was measured

    def listed(values: list[Any]) -> str:
        return ", ".join(f"{v:.2f}" for v in values)

    lines = [
        f"busiest worker's share of the workers' CPU at c=8 (0.50 = even): peer [{listed(shares['peer'])}], "
        f"service [{listed(shares['service'])}]"
    ]
    one_core = [number for number, share in enumerate(shares["peer"], 1) if share >= ONE_WORKER_SHARE]
    if not one_core:
        return lines
    balanced = [r for r, share in zip(rounds, shares["peer"], strict=True) if share < ONE_WORKER_SHARE]
    lines.append(
        f"  the peer ran on one of its workers in round(s) {', '.join(map(str, one_core))}: one uvicorn worker "
        "accepted all of wrk's keep-alive connections"
    )
    if balanced:
        ratios = [r["service"]["load"][1]["rps"] / r["peer"]["load"][1]["rps"] for r in balanced]
        lines.append(
            f"  service / peer throughput in the rounds where both peer workers worked: "
            f"{statistics.median(ratios):.0%} [{', '.join(f'{v:.0%}' for v in ratios)}]"
        )
    else:
        lines.append("  no round had both peer workers working: the peer's throughput above is one core's")
    return lines


def peer_report(block: dict[str, Any]) -> list[str]:
    """The three-way table (c=8, median and each round) and issue 15's bar."""
    rounds = block["rounds"]
    versions = block["versions"]
    lines = [
        f"Peer: HealthChain {versions['healthchain']} CDS Hooks scaffold (`healthchain new peer -t cds-hooks`, its "
        f"app.py with the hook id changed to ours): one fixed card, no clinical logic; FastAPI {versions['fastapi']}, "
        f"uvicorn {versions['uvicorn']} with {block['workers']} workers, POST {block['path']}",
        f"  {block['note']}",
        f"Three-way comparison at c=8, {len(rounds)} alternating round(s) of floor, peer, service: median [each round]",
    ]
    rows = [
        ("no-op floor (Flask, gunicorn)", "noop"),
        (f"HealthChain {versions['healthchain']} (1 fixed card)", "peer"),
        ("this service (full evaluation)", "service"),
    ]
    widths = [34, 26, 26, 26]
    lines.append(_fmt_row(["app", "req/s", "p99 ms", "CPU ms/req"], widths))
    for label, app in rows:
        cells = [label]
        for key, fmt in (("rps", "{:.0f}"), ("p99_ms", "{:.1f}"), ("cpu_ms_per_request", "{:.2f}")):
            median, values = _median_of(rounds, app, key)
            cells.append(f"{fmt.format(median)} [{', '.join(fmt.format(v) for v in values)}]")
        lines.append(_fmt_row(cells, widths))

    def per_round(numerator: str, denominator: str, key: str) -> tuple[float, list[float]]:
        values = [r[numerator]["load"][1][key] / r[denominator]["load"][1][key] for r in rounds]
        return statistics.median(values), values

    vs_peer = per_round("service", "peer", "rps")
    vs_floor = per_round("service", "noop", "rps")
    p99 = per_round("service", "noop", "p99_ms")
    lines += _balance_lines(rounds)
    lines += [
        f"service / peer throughput: {vs_peer[0]:.0%} [{', '.join(f'{v:.0%}' for v in vs_peer[1])}]",
        f"service / floor throughput: {vs_floor[0]:.0%} [{', '.join(f'{v:.0%}' for v in vs_floor[1])}]",
        f"service p99 / floor p99: {p99[0]:.1f}x [{', '.join(f'{v:.1f}' for v in p99[1])}]",
        "Peer targets (issue 15; c=8, medians of the per-round ratios):",
    ]
    checks = [
        ("service throughput >= the peer's", vs_peer[0] >= PEER_TARGETS["vs_peer"]),
        (f"service throughput >= {PEER_TARGETS['vs_floor']:.0%} of the floor", vs_floor[0] >= PEER_TARGETS["vs_floor"]),
        (f"service p99 <= {PEER_TARGETS['p99_vs_floor']:g}x the floor's", p99[0] <= PEER_TARGETS["p99_vs_floor"]),
    ]
    lines += [f"  [{'PASS' if ok else 'MISS'}] {text}" for text, ok in checks]
    return lines


def _run(args: argparse.Namespace, wrk: str, procs: Processes, tmp: Path) -> dict[str, Any]:
    seconds = args.duration or (3.0 if args.quick else 10.0)
    boots = args.boots or (1 if args.quick else 3)
    calls = 10 if args.quick else 20
    body_json = fixture.order_select()
    body = orjson.dumps(body_json)
    body_path = tmp / "order-select.json"
    body_path.write_bytes(body)
    lua = write_lua(tmp, body_path)
    results: dict[str, Any] = {
        "started": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "label": args.label,
        "commit": source_revision(),
        "machine": _machine(),
        "seconds": seconds,
        "recycle": args.recycle,
        "request": {"resources": fixture.resource_count(body_json), "bytes": len(body)},
    }
    rounds = args.rounds or (3 if args.peer else 1)
    apps = (4 if args.ceiling else 2) + (3 * rounds - 2 if args.peer else 0)
    compile_s = 0 if args.interpreted else 100  # mypyc and gcc on 2 cores
    print(
        f"benchmark: {seconds:g} s per load run, {boots} fresh boot(s); "
        f"about {int(apps * (2 * seconds + 5) + 12 * boots + 10 + (60 if args.peer else 0) + compile_s)} s",
        flush=True,
    )
    print("AUTHENTICATION OFF for the benchmark: CMV_CDS_REQUIRE_AUTH=false", flush=True)
    if args.interpreted:
        service_root = ROOT
        results["service_build"] = "interpreted (the repository's sources, --interpreted)"
    else:
        print(
            "  compiling the service's hot path with mypyc in a copy of the tree (scripts/compile_hot_path.py)",
            flush=True,
        )
        service_root = compiled_tree(tmp)
        results["service_build"] = "compiled with mypyc (scripts/compile_hot_path.py), as the container image ships it"
    peer_build = None
    if args.peer:
        print(f"  building the peer: pip install {peer.HEALTHCHAIN} in a throwaway venv, its scaffold", flush=True)
        peer_build = peer.build(tmp)
        print(f"  {peer.NODELAY_NOTE}", flush=True)
    results["first_request"] = first_requests(procs, tmp, body, boots, args.recycle, service_root)
    print("  first request after boot: done", flush=True)
    stub = start_stub(procs, tmp, delay_seconds=0.05)

    def scenario(server: Server, cards: list[str]) -> dict[str, Any]:
        return {"fhir": fhir_scenario(server, stub, calls, cards)}

    common: dict[str, Any] = {"wrk": wrk, "lua": lua, "body": body, "seconds": seconds, "recycle": args.recycle}
    peer_rounds = []
    # With --peer, the floor, the peer and the service are loaded in turn, `rounds` times (alternating, so that
    # a change of the machine's load touches all three alike); the last round's blocks feed the rest of the report.
    for number in range(1, rounds + 1):
        last = number == rounds
        suffix = f" #{number}" if rounds > 1 else ""
        results["noop"] = load_app(procs, tmp, name="no-op" + suffix, app=NOOP_APP, **common)
        print(f"  no-op app{suffix}: done", flush=True)
        if peer_build is not None:
            peer_block = load_app(procs, tmp, name="peer" + suffix, app="", peer_build=peer_build, **common)
            print(f"  HealthChain peer{suffix}: done", flush=True)
        results["service"] = load_app(
            procs,
            tmp,
            name="service" + suffix,
            app=SERVICE_APP,
            extra=scenario if last else None,
            root=service_root,
            **common,
        )
        print(f"  service{suffix}: done", flush=True)
        if peer_build is not None:
            peer_rounds.append({"noop": results["noop"], "peer": peer_block, "service": results["service"]})
    if peer_build is not None:
        results["peer"] = {
            "package": peer.HEALTHCHAIN,
            "versions": peer_build.versions,
            "path": peer.PATH,
            "workers": peer.WORKERS,
            "note": peer.NODELAY_NOTE,
            "rounds": peer_rounds,
        }
    if args.ceiling:
        results["ceiling"] = {}
        for variant in ceiling_app.VARIANTS:  # the service with parts taken out
            results["ceiling"][variant] = block = load_app(
                procs,
                tmp,
                name=variant,
                app=f"bench.ceiling_app:build({variant!r})",
                wrk=wrk,
                lua=lua,
                body=body,
                seconds=seconds,
                recycle=args.recycle,
                root=service_root,
            )
            if block["cards"] != results["service"]["cards"]:
                raise BenchError(f"ceiling variant {variant} gave other cards: {block['cards']}")
            print(f"  ceiling {variant}: done", flush=True)
    print("", flush=True)
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="3 s per load run and one boot (about 40 s in all)")
    parser.add_argument("--duration", type=float, help="seconds per wrk run (default 10; 3 with --quick)")
    parser.add_argument("--boots", type=int, help="fresh starts for the first-request latency (default 3)")
    parser.add_argument(
        "--recycle",
        action="store_true",
        help="keep gunicorn_conf's max_requests recycling during the runs (default: off, see bench/README.md)",
    )
    parser.add_argument(
        "--ceiling",
        action="store_true",
        help="also load the service without its clinical evaluation, and with only the protocol work "
        "(bench/ceiling_app.py): what bounds the throughput",
    )
    parser.add_argument(
        "--peer",
        action="store_true",
        help=f"also load a Python peer, the HealthChain CDS Hooks scaffold ({peer.HEALTHCHAIN}, uvicorn, "
        f"{peer.WORKERS} workers; bench/peer.py), built in a throwaway venv; floor, peer and service alternate "
        "for --rounds rounds and a three-way table is printed",
    )
    parser.add_argument(
        "--rounds", type=int, help="with --peer: alternating rounds of floor, peer and service (default 3)"
    )
    parser.add_argument(
        "--interpreted",
        action="store_true",
        help="load the service from the repository's sources as they are, instead of a copy compiled with mypyc "
        "(scripts/compile_hot_path.py; the container image's form, the default)",
    )
    parser.add_argument("--label", default="", help="a label printed with the results (e.g. before/after)")
    parser.add_argument("--json", type=Path, help="also write the results as JSON to this file")
    parser.add_argument(
        "--faults",
        action="store_true",
        help="instead of the load benchmark, run the long fault variants (60 s outage, 60 s soak; bench/faults.py)",
    )
    args = parser.parse_args(argv)
    if args.faults:
        from bench.faults import run_faults

        return run_faults()
    if args.rounds is not None and (not args.peer or args.rounds < 1):
        parser.error("--rounds needs --peer and must be at least 1")
    if args.ceiling and not args.interpreted:
        parser.error(CEILING_NEEDS_SOURCES)

    wrk = find_wrk()
    if wrk is None:
        print(
            f"python -m bench needs wrk (the HTTP load generator). Install it with:\n  {WRK_INSTALL}", file=sys.stderr
        )
        return 2
    interrupt_on_termination()
    procs = Processes()
    tmp = Path(tempfile.mkdtemp(prefix="cmv-cds-bench-"))
    try:
        results = _run(args, wrk, procs, tmp)
    except KeyboardInterrupt:
        print("\ninterrupted: stopping every server started", file=sys.stderr)
        return 130
    except BenchError as exc:
        print(f"benchmark failed: {exc}", file=sys.stderr)
        return 1
    finally:
        procs.stop_all()
        shutil.rmtree(tmp, ignore_errors=True)
    print(report(results))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
        print(f"\nresults written to {args.json}")
    return 0
