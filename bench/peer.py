"""A Python peer for ``python -m bench --peer``: the HealthChain CDS Hooks scaffold, built in a throwaway venv.

What is built is what HealthChain documents for a new CDS Hooks service, changed only where the benchmark needs
it: ``pip install healthchain==0.16.1`` into a fresh virtual environment, ``healthchain new peer -t cds-hooks``,
and in the generated ``app.py`` the hook and id of its one service changed to ours (``order-select``,
``cmv-antiviral-order-select``), so the same request body is accepted. It answers one fixed card without any
clinical logic. It is served by uvicorn (the version healthchain installs) with 2 worker processes, like the
service's 2 gunicorn workers, on 127.0.0.1.

uvicorn's multi-worker mode turns Nagle's algorithm on for every connection: the supervisor binds the listening
socket with ``proto`` 0, accepted sockets inherit it, and asyncio sets ``TCP_NODELAY`` only on sockets whose
``proto`` is ``IPPROTO_TCP``, so each keep-alive response waits for the client's delayed ACK (~40 ms on Linux;
uvicorn issue #3149, open; the proposed fix passes ``IPPROTO_TCP`` when binding). ``LAUNCHER`` applies that fix
in the supervisor before it binds, and nothing else; the benchmark says so in its output.

Nothing here is imported by the service; the venv and the scaffold live in the benchmark's temporary directory.
"""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from bench.procs import LOOPBACK, BenchError, Processes, Server, children, free_port, wait_for

HEALTHCHAIN = "healthchain==0.16.1"
PROJECT = "peer"
SERVICE_ID = "cmv-antiviral-order-select"
PATH = f"/cds/cds-services/{SERVICE_ID}"  # HealthChainAPI mounts its CDS Hooks routes under /cds
WORKERS = 2
INSTALL_TIMEOUT_SECONDS = 900
# The scaffold's decorator line, and ours.
SCAFFOLD_HOOK = '@cds.hook("patient-view", id="my-service"'
OUR_HOOK = f'@cds.hook("order-select", id="{SERVICE_ID}"'
NODELAY_NOTE = (
    "TCP_NODELAY: set by bench/peer.py's launcher, because uvicorn's multi-worker mode leaves Nagle on for "
    "every connection (uvicorn issue #3149, open: the listener is bound with proto 0)"
)

# `python launcher.py <uvicorn arguments>`: uvicorn's own command line, with the listening socket bound as
# IPPROTO_TCP (the fix proposed for uvicorn #3149) so that asyncio sets TCP_NODELAY on accepted connections.
# The worker processes are spawned and re-import this file as __mp_main__: they must not run uvicorn again.
LAUNCHER = '''"""uvicorn's command line with TCP_NODELAY on accepted connections (see bench/peer.py)."""
import socket
import sys

import uvicorn
from uvicorn.config import Config

_bind_socket = Config.bind_socket


def bind_socket(self):
    sock = _bind_socket(self)
    if sock.family in (socket.AF_INET, socket.AF_INET6) and sock.proto != socket.IPPROTO_TCP:
        sock = socket.socket(sock.family, sock.type, socket.IPPROTO_TCP, fileno=sock.detach())
    return sock


if __name__ == "__main__":
    Config.bind_socket = bind_socket
    sys.exit(uvicorn.main())
'''


@dataclass
class Peer:
    """The built scaffold: its project directory, its venv's python, and what was installed."""

    project: Path
    python: Path
    versions: dict[str, str]


class PeerServer(Server):
    """uvicorn's supervisor and its workers (its spawned children, not multiprocessing's resource tracker)."""

    def worker_pids(self) -> list[int]:
        pids = []
        for pid in children(self.pid):
            try:
                command = Path(f"/proc/{pid}/cmdline").read_bytes()
            except OSError:
                continue
            if b"spawn_main" in command:
                pids.append(pid)
        return pids


def _run(argv: list[str], cwd: Path, what: str, timeout: float) -> str:
    try:
        done = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired as exc:
        raise BenchError(f"{what}: no result within {timeout:.0f} s") from exc
    if done.returncode != 0:
        raise BenchError(f"{what} failed (exit {done.returncode}):\n{(done.stdout + done.stderr)[-3000:]}")
    return done.stdout


def build(directory: Path) -> Peer:
    """A fresh venv with HealthChain, and its CDS Hooks scaffold with our hook id, in ``directory``."""
    venv = directory / "peer-venv"
    _run([sys.executable, "-m", "venv", str(venv)], directory, "creating the peer's venv", 120)
    python = venv / "bin" / "python"
    pip = [str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    _run([*pip, HEALTHCHAIN], directory, f"pip install {HEALTHCHAIN}", INSTALL_TIMEOUT_SECONDS)
    _run([str(venv / "bin" / "healthchain"), "new", PROJECT, "-t", "cds-hooks"], directory, "healthchain new", 120)
    project = directory / PROJECT
    app = project / "app.py"
    source = app.read_text(encoding="utf-8")
    if source.count(SCAFFOLD_HOOK) != 1:
        raise BenchError(f"the scaffold's app.py has no single {SCAFFOLD_HOOK!r}: HealthChain's template changed")
    app.write_text(source.replace(SCAFFOLD_HOOK, OUR_HOOK), encoding="utf-8")
    (project / "launcher.py").write_text(LAUNCHER, encoding="utf-8")
    versions = {}
    for package in ("healthchain", "fastapi", "uvicorn", "pydantic"):
        versions[package] = _run(
            [str(python), "-c", f"from importlib.metadata import version; print(version({package!r}))"],
            directory,
            f"reading the version of {package}",
            60,
        ).strip()
    return Peer(project=project, python=python, versions=versions)


def start(procs: Processes, tmp: Path, peer: Peer, name: str) -> PeerServer:
    """uvicorn with ``WORKERS`` workers on a free loopback port, through the launcher; waits until both
    workers answer."""
    port = free_port()
    argv = [
        str(peer.python),
        "launcher.py",
        "app:app",
        "--host",
        LOOPBACK,
        "--port",
        str(port),
        "--workers",
        str(WORKERS),
    ]
    started = procs.start(name, argv, env=_env(), cwd=peer.project, log_path=tmp / f"{name}-{port}.log", port=port)
    server = PeerServer(
        name=started.name,
        process=started.process,
        port=started.port,
        log_path=started.log_path,
        started_at=started.started_at,
    )
    wait_for(
        lambda: (
            server.log_text().count("Application startup complete") >= WORKERS and len(server.worker_pids()) >= WORKERS
        ),
        90,
        "the peer's uvicorn workers to start",
        server,
    )
    return server


def _env() -> dict[str, str]:
    import os

    # The peer's own environment: none of ours (no CMV_CDS_*, no virtual environment of the service).
    return {k: v for k, v in os.environ.items() if not k.startswith(("CMV_CDS_", "VIRTUAL_ENV", "PYTHON"))}


__all__ = ["HEALTHCHAIN", "NODELAY_NOTE", "PATH", "Peer", "PeerServer", "build", "start"]
