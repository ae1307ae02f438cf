"""A throwaway PostgreSQL cluster for tests: ``initdb`` into a temporary directory, start ``postgres`` on a
free loopback port, hand out fresh databases, stop it and delete everything afterwards. No mocks.

Use the module-scoped ``postgres_cluster`` fixture (import it into the test module) or the
``running_cluster()`` context manager. Each test should take its own database from
``PgCluster.create_database()``, which returns a SQLAlchemy URL. For code that runs on both backends,
the ``database_url`` and ``store`` fixtures give a SQLite file, then a fresh PostgreSQL database.

PostgreSQL refuses to run as root (``initdb``: "cannot be run as root"). When the tests run as root,
as they do on the development machines and in CI, the server commands are started as an unprivileged
user (``postgres`` if it exists, else ``nobody``) through ``subprocess``'s ``user=``/``group=``
(setuid/setgid in the child before exec: no runuser/su/setpriv, no PAM, no intermediate process, so
the ``Popen`` handle is the postmaster itself). The temporary directory is created directly under the
system temp dir (not pytest's root-only ``tmp_path``) and chowned to that user.

The binaries are looked up on PATH, then in ``/usr/lib/postgresql/<version>/bin`` (the Debian layout);
without ``initdb`` the requesting test is skipped.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import psycopg
import pytest
from processes import free_loopback_port
from psycopg import sql

if TYPE_CHECKING:
    from service.store import FeedbackStore

HOST = "127.0.0.1"
SUPERUSER = "postgres"
STARTUP_TIMEOUT_SECONDS = 20.0
SHUTDOWN_TIMEOUT_SECONDS = 10.0
_UNPRIVILEGED_USERS = ("postgres", "nobody")
_START_ATTEMPTS = 3  # a new port each time, in case another process grabbed the free one
INITDB_OPTIONS = ("-A", "trust", "-U", SUPERUSER, "--no-sync", "-E", "UTF8", "--locale=C")
# Throwaway data: durability off for speed.
SERVER_SETTINGS = {
    "listen_addresses": HOST,
    "fsync": "off",
    "synchronous_commit": "off",
    "full_page_writes": "off",
    "max_connections": "50",
}


@dataclass(frozen=True)
class PgCluster:
    """A running throwaway cluster (trust authentication, superuser ``postgres``)."""

    host: str
    port: int
    base_dir: Path

    def conninfo(self, dbname: str = "postgres") -> str:
        return f"host={self.host} port={self.port} user={SUPERUSER} dbname={dbname} connect_timeout=5"

    def url(self, dbname: str = "postgres") -> str:
        """SQLAlchemy URL (psycopg 3 driver) of one database."""
        return f"postgresql+psycopg://{SUPERUSER}@{self.host}:{self.port}/{dbname}"

    def connect(self, dbname: str = "postgres") -> psycopg.Connection[Any]:
        """A plain psycopg connection in autocommit mode (for set-up and inspection in tests)."""
        return psycopg.connect(self.conninfo(dbname), autocommit=True)

    def terminate_connections(self, dbname: str) -> None:
        """Drop every client connection to one database, as a server restart or a failover would, and return once
        the backends have exited (PostgreSQL 14+: the timeout argument, in ms, waits for each). Without the wait a
        backend could still be exiting when the caller's next statement reached it, a different case: a connection
        lost in the middle of a statement (psycopg then reports it in a state SQLAlchemy's pre-ping cannot reset)."""
        with self.connect() as admin:
            admin.execute(
                "SELECT pg_terminate_backend(pid, 5000) FROM pg_stat_activity WHERE datname = %s "
                "AND pid <> pg_backend_pid()",
                (dbname,),
            )

    @contextlib.contextmanager
    def outage(self, dbname: str) -> Iterator[None]:
        """A real outage of one database: connections dropped and refused until the block ends."""
        with self.connect() as admin:
            admin.execute(sql.SQL("ALTER DATABASE {} ALLOW_CONNECTIONS false").format(sql.Identifier(dbname)))
            try:
                self.terminate_connections(dbname)
                yield
            finally:
                admin.execute(sql.SQL("ALTER DATABASE {} ALLOW_CONNECTIONS true").format(sql.Identifier(dbname)))

    def create_database(self, name: str | None = None) -> str:
        """Create an empty database (a fresh name unless given) and return its SQLAlchemy URL."""
        name = name or f"test_{uuid.uuid4().hex[:16]}"
        with self.connect() as conn:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        return self.url(name)


def find_binary(name: str) -> str | None:
    """``name`` on PATH, else in the newest ``/usr/lib/postgresql/*/bin``."""
    found = shutil.which(name)
    if found:
        return found
    candidates = sorted(
        glob.glob(f"/usr/lib/postgresql/*/bin/{name}"),
        key=lambda path: [int(part) if part.isdigit() else 0 for part in Path(path).parts[-3].split(".")],
    )
    return candidates[-1] if candidates else None


@contextlib.contextmanager
def running_cluster() -> Iterator[PgCluster]:
    """Start a cluster, yield it, then stop it (fast shutdown) and remove its directory.

    Calls ``pytest.skip`` if ``initdb`` cannot be found; raises ``RuntimeError`` (with the server log)
    if the server does not start within ``STARTUP_TIMEOUT_SECONDS``.
    """
    initdb = find_binary("initdb")
    if initdb is None:
        pytest.skip("PostgreSQL server binaries not found (initdb is not on PATH nor in /usr/lib/postgresql)")
    postgres = find_binary("postgres") or str(Path(initdb).with_name("postgres"))

    run_as = _unprivileged_user() if os.geteuid() == 0 else None
    base_dir = Path(tempfile.mkdtemp(prefix="pgtest-"))
    try:
        if run_as is not None:
            os.chown(base_dir, run_as.pw_uid, run_as.pw_gid)
        data_dir = base_dir / "data"
        socket_dir = base_dir / "sock"
        socket_dir.mkdir()
        if run_as is not None:
            os.chown(socket_dir, run_as.pw_uid, run_as.pw_gid)
        _run([initdb, "-D", str(data_dir), *INITDB_OPTIONS], run_as=run_as, cwd=base_dir)
        process, port = _start_server(postgres, data_dir, socket_dir, base_dir, run_as)
        try:
            yield PgCluster(host=HOST, port=port, base_dir=base_dir)
        finally:
            _stop_server(process)
    finally:
        shutil.rmtree(base_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def postgres_cluster() -> Iterator[PgCluster]:
    """One throwaway cluster per test module."""
    with running_cluster() as cluster:
        yield cluster


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """The URL of an empty database on each backend: a SQLite file, then a database on ``postgres_cluster``.

    Import ``postgres_cluster`` into the test module too: it is requested by name, only for the second.
    """
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'feedback.sqlite3'}"
    cluster: PgCluster = request.getfixturevalue("postgres_cluster")
    return cluster.create_database()


@pytest.fixture
def store(database_url: str, tmp_path: Path) -> Iterator[FeedbackStore]:
    """A feedback store with its schema, on ``database_url`` (its issued-card spool in ``tmp_path``)."""
    from service.store import FeedbackStore  # imported here: test_auth uses this module and copes without it

    feedback_store = FeedbackStore(database_url, tmp_path / "spool")
    feedback_store.create_schema()
    yield feedback_store
    feedback_store.dispose()


def _unprivileged_user() -> pwd.struct_passwd:
    for name in _UNPRIVILEGED_USERS:
        with contextlib.suppress(KeyError):
            return pwd.getpwnam(name)
    raise RuntimeError(f"running as root, and none of {_UNPRIVILEGED_USERS} exists to run PostgreSQL as")


def _privileges(run_as: pwd.struct_passwd | None) -> dict[str, Any]:
    if run_as is None:
        return {}
    return {"user": run_as.pw_uid, "group": run_as.pw_gid, "extra_groups": []}


def _environment() -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if not key.startswith("PG")}
    env["LC_ALL"] = "C"
    return env


def _run(command: list[str], *, run_as: pwd.struct_passwd | None, cwd: Path) -> None:
    result = subprocess.run(
        command,
        cwd=cwd,
        env=_environment(),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        **_privileges(run_as),
    )
    if result.returncode != 0:
        output = result.stdout + result.stderr
        raise RuntimeError(f"{Path(command[0]).name} failed with status {result.returncode}:\n{output}")


def _start_server(
    postgres: str, data_dir: Path, socket_dir: Path, base_dir: Path, run_as: pwd.struct_passwd | None
) -> tuple[subprocess.Popen[bytes], int]:
    log_path = base_dir / "server.log"
    settings = [arg for name, value in SERVER_SETTINGS.items() for arg in ("-c", f"{name}={value}")]
    for attempt in range(1, _START_ATTEMPTS + 1):
        port = free_loopback_port()
        with log_path.open("wb") as log_file:
            process = subprocess.Popen(
                [postgres, "-D", str(data_dir), "-k", str(socket_dir), "-p", str(port), *settings],
                cwd=base_dir,
                env=_environment(),
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # a Ctrl-C at the terminal reaches pytest, which stops us cleanly
                **_privileges(run_as),
            )
        try:
            if _wait_until_ready(process, port):
                return process, port
        except BaseException:
            _stop_server(process)
            raise
        log_text = log_path.read_text(errors="replace")
        if process.poll() is None:
            _stop_server(process)
            raise RuntimeError(f"PostgreSQL not ready after {STARTUP_TIMEOUT_SECONDS} s:\n{log_text}")
        if "already in use" not in log_text or attempt == _START_ATTEMPTS:
            raise RuntimeError(f"PostgreSQL exited with status {process.returncode}:\n{log_text}")
    raise AssertionError("unreachable")


def _wait_until_ready(process: subprocess.Popen[bytes], port: int) -> bool:
    """Poll with psycopg until the server answers (True), exits or the deadline passes (False)."""
    deadline = time.monotonic() + STARTUP_TIMEOUT_SECONDS
    conninfo = f"host={HOST} port={port} user={SUPERUSER} dbname=postgres connect_timeout=2"
    while time.monotonic() < deadline:
        if process.poll() is not None:
            return False
        try:
            with psycopg.connect(conninfo) as conn:
                conn.execute("SELECT 1")
            return True
        except psycopg.OperationalError:
            time.sleep(0.05)
    return False


def _stop_server(process: subprocess.Popen[bytes]) -> None:
    """SIGINT is PostgreSQL's fast shutdown; SIGQUIT (immediate) and SIGKILL if it hangs."""
    for sig in (signal.SIGINT, signal.SIGQUIT, signal.SIGKILL):
        if process.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            process.send_signal(sig)
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=SHUTDOWN_TIMEOUT_SECONDS)
