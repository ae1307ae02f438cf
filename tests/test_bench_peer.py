"""``python -m bench --peer`` (bench/peer.py, bench/run.py): the three-way table and issue 15's bar computed from
the rounds as documented (medians of the per-round figures and ratios), and the launcher's TCP_NODELAY fix doing
only what it says. The peer itself is built from PyPI by the benchmark, never by the tests."""

from __future__ import annotations

import socket
from typing import Any

from bench import peer
from bench.run import peer_report


def block(rps: float, p99: float, cpu: float) -> dict[str, Any]:
    c1 = {"rps": rps / 3, "p99_ms": p99 / 3, "cpu_ms_per_request": cpu}
    return {"load": [c1, {"rps": rps, "p99_ms": p99, "cpu_ms_per_request": cpu}]}


def peer_block(rounds: list[tuple[float, float, float]]) -> dict[str, Any]:
    """Rounds of (floor, peer, service) c=8 throughputs; p99 = 10 000 / rps ms, CPU = 2 000 / rps ms."""
    return {
        "versions": {"healthchain": "0.16.1", "fastapi": "0.1", "uvicorn": "0.2", "pydantic": "2"},
        "workers": 2,
        "path": peer.PATH,
        "note": peer.NODELAY_NOTE,
        "rounds": [
            {
                name: block(rps, 10_000 / rps, 2_000 / rps)
                for name, rps in zip(("noop", "peer", "service"), r, strict=True)
            }
            for r in rounds
        ],
    }


def test_the_table_gives_medians_and_each_round() -> None:
    lines = peer_report(peer_block([(2000, 600, 700), (1800, 650, 500), (2200, 640, 900)]))
    text = "\n".join(lines)
    assert "HealthChain 0.16.1 CDS Hooks scaffold" in text
    assert "TCP_NODELAY" in text
    assert "#3149" in text
    floor = next(line for line in lines if line.startswith("no-op floor"))
    assert "2000 [2000, 1800, 2200]" in floor
    service = next(line for line in lines if line.startswith("this service"))
    assert "700 [700, 500, 900]" in service
    assert "14.3 [14.3, 20.0, 11.1]" in service  # p99
    # Ratios are medians of the per-round ratios: 700/600, 500/650, 900/640 → 1.17, 0.77, 1.41.
    assert "service / peer throughput: 117% [117%, 77%, 141%]" in lines
    assert "service / floor throughput: 35% [35%, 28%, 41%]" in lines
    assert "  [PASS] service throughput >= the peer's" in lines
    assert "  [MISS] service throughput >= 40% of the floor" in lines
    assert "  [PASS] service p99 <= 3x the floor's" in lines


def test_a_slow_service_misses_every_bar() -> None:
    lines = peer_report(peer_block([(2000, 600, 300)]))
    assert [line for line in lines if line.startswith("  [")] == [
        "  [MISS] service throughput >= the peer's",
        "  [MISS] service throughput >= 40% of the floor",
        "  [MISS] service p99 <= 3x the floor's",
    ]


class FakeConfig:
    """Stands in for uvicorn's Config: bind_socket as uvicorn's supervisor path makes it (proto 0)."""

    def bind_socket(self) -> socket.socket:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.bind(("127.0.0.1", 0))
        return sock


def test_the_launcher_binds_the_listener_as_ipproto_tcp_and_nothing_else() -> None:
    """Run the launcher's bind_socket over a listener bound as uvicorn's supervisor binds it: same kernel socket
    (same port, still listening-capable), Python-level proto IPPROTO_TCP, so asyncio sets TCP_NODELAY on the
    connections it accepts (uvicorn #3149); its __main__ block does not run on import (spawned workers)."""
    source = peer.LAUNCHER.replace("import uvicorn\nfrom uvicorn.config import Config\n", "")
    namespace: dict[str, Any] = {"Config": FakeConfig, "__name__": "__mp_main__"}
    exec(compile(source, "launcher.py", "exec"), namespace)  # as a spawned worker imports it: no uvicorn.main()
    original = FakeConfig().bind_socket()
    assert original.proto == 0
    original.close()
    sock = namespace["bind_socket"](FakeConfig())
    try:
        assert sock.proto == socket.IPPROTO_TCP
        assert sock.family == socket.AF_INET
        sock.listen()
        port = sock.getsockname()[1]
        with socket.create_connection(("127.0.0.1", port), timeout=5):
            accepted, _ = sock.accept()
            with accepted:
                assert accepted.proto == socket.IPPROTO_TCP  # what asyncio checks before TCP_NODELAY
    finally:
        sock.close()
