"""``python -m bench --peer`` (bench/peer.py, bench/run.py): the three-way table and issue 15's bar computed from
the rounds as documented (medians of the per-round figures and ratios), and the launcher's TCP_NODELAY fix doing
only what it says. The peer itself is built from PyPI by the benchmark, never by the tests."""

from __future__ import annotations

import socket
import subprocess
from pathlib import Path
from typing import Any

import pytest

from bench import peer
from bench.run import peer_report, source_revision


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


def with_shares(block_: dict[str, Any], peer_shares: list[float], service_share: float = 0.5) -> dict[str, Any]:
    """The block with each round's busiest-worker share at c=8 (bench/load.py) for the peer and the service."""
    for round_, share in zip(block_["rounds"], peer_shares, strict=True):
        round_["peer"]["load"][1]["busiest_worker_share"] = share
        round_["service"]["load"][1]["busiest_worker_share"] = service_share
    return block_


def test_rounds_where_one_peer_worker_took_every_connection_are_named() -> None:
    rounds: list[tuple[float, float, float]] = [(2000, 300, 700), (2000, 600, 700), (2000, 320, 700)]
    lines = peer_report(with_shares(peer_block(rounds), [1.0, 0.52, 0.99]))
    assert (
        "busiest worker's share of the workers' CPU at c=8 (0.50 = even): peer [1.00, 0.52, 0.99], "
        "service [0.50, 0.50, 0.50]"
    ) in lines
    assert any("the peer ran on one of its workers in round(s) 1, 3" in line for line in lines)
    # Only round 2 had both peer workers working: 700 / 600.
    assert "  service / peer throughput in the rounds where both peer workers worked: 117% [117%]" in lines
    assert "service / peer throughput: 219% [233%, 117%, 219%]" in lines  # all rounds, as before


def test_a_peer_on_one_worker_in_every_round_is_said_so() -> None:
    lines = peer_report(with_shares(peer_block([(2000, 300, 700)]), [0.97]))
    assert "  no round had both peer workers working: the peer's throughput above is one core's" in lines


def test_balanced_rounds_add_only_the_shares_line() -> None:
    lines = peer_report(with_shares(peer_block([(2000, 600, 700)]), [0.55]))
    assert not any("one of its workers" in line for line in lines)
    assert any(line.startswith("busiest worker's share") for line in lines)


def test_runs_recorded_before_the_share_was_measured_still_report() -> None:
    lines = peer_report(peer_block([(2000, 600, 700)]))
    assert not any("busiest worker" in line for line in lines)


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


def test_a_result_names_the_commit_it_measured_and_whether_the_tree_had_changes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("GIT_DIR", "GIT_WORK_TREE", "GIT_INDEX_FILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path.parent))  # a checkout around tmp is not found
    assert source_revision(tmp_path) == ""  # not a checkout
    git = ["git", "-C", str(tmp_path), "-c", "user.name=bench", "-c", "user.email=bench@example.org"]
    git += ["-c", "commit.gpgsign=false"]
    subprocess.run([*git, "init", "-q"], check=True, timeout=30)
    (tmp_path / "app.py").write_text("x = 1\n")
    subprocess.run([*git, "add", "app.py"], check=True, timeout=30)
    subprocess.run([*git, "commit", "-q", "-m", "one"], check=True, timeout=30)
    head = subprocess.run([*git, "rev-parse", "--short=12", "HEAD"], capture_output=True, text=True, timeout=30)
    assert source_revision(tmp_path) == head.stdout.strip()
    (tmp_path / "notes.txt").write_text("untracked files are not the measured code\n")
    assert source_revision(tmp_path) == head.stdout.strip()
    (tmp_path / "app.py").write_text("x = 2\n")
    assert source_revision(tmp_path) == head.stdout.strip() + "+changes"
