"""The audit trail of issued cards: journaled by the request, written to the database behind it, kept on disk
through database outages and process deaths.

Every hook call's cards (``issued_card`` rows) are appended, before the answer is sent, to this process's spool
segment: a JSON-lines file in the spool directory (``CMV_CDS_SPOOL_DIR``), one ``write`` of a few hundred bytes.
A background thread inserts what was appended every ``WRITE_BEHIND_SECONDS`` with one driver-level
``executemany`` and then deletes the segment. So:

* the request never waits for the database: its cost is one file append, not an insert;
* a database outage loses nothing: a failed insert leaves its segment on disk, the writer retries with back-off
  (``RETRY_FIRST_SECONDS`` doubling up to ``RETRY_MAX_SECONDS``) and then replays every segment left in the
  directory. Inserts are ``ON CONFLICT DO NOTHING``, so a segment replayed twice is harmless;
* a process killed with SIGKILL (or by the OOM killer) loses no row of a hook call it answered: the rows were in
  the file before the answer left. A segment being written is held under ``flock``; the kernel releases the lock
  of a dead process, and the next writer to scan the directory (a replacement worker, a sibling, the restarted
  service) adopts the segment;
* a crash of the machine itself can lose what the kernel had not yet written to disk: there is no ``fsync`` per
  request (it would cost milliseconds each);
* bounded: above ``CMV_CDS_SPOOL_MAX_BYTES`` on disk, new rows are dropped and counted. When the spool directory
  cannot be written at all (a read-only file system without a volume), rows are kept in memory instead, at most
  ``MEMORY_MAX_ROWS`` (beyond that, dropped and counted), and an error is logged once.

Every outcome is counted in ``/metrics`` (``cmv_cds_audit_rows_total{outcome}``: written, spilled, replayed,
dropped; ``cmv_cds_audit_write_retries_total``; ``cmv_cds_audit_spool_bytes``).
"""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import logging
import os
import threading
import time
import weakref
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import orjson
from sqlalchemy.exc import DataError, IntegrityError

from service import metrics

log = logging.getLogger("cmv_cds.store")

# The issued_card columns in insert order; issued_at as ISO 8601 UTC text with microseconds.
Row = tuple[str, str, str, str, str, str, str]
Insert = Callable[[Sequence[Row]], None]

# How long the writer gathers appended rows into one insert. Per row, a transaction of two workers' SQLite writes
# costs less the more rows it carries (0.05 s → 0.1 s: about a fifth less writer CPU at 700 calls/s, round 5).
WRITE_BEHIND_SECONDS = 0.1
# Back-off after a failed insert: the first retry, doubled per failure up to the last.
RETRY_FIRST_SECONDS = 0.5
RETRY_MAX_SECONDS = 5.0
# How often an idle writer looks for segments that another process left behind.
RESCAN_SECONDS = 30.0
# A segment larger than this is closed and a new one begun (bounded replays, bounded reads).
SEGMENT_MAX_BYTES = 4 * 1024 * 1024
# Rows of the active segment also kept in memory (beyond that they are read back from the file), and the cap
# of the in-memory queue used when the spool directory cannot be written.
MEMORY_MAX_ROWS = 20_000
REPLAY_CHUNK_ROWS = 2_000
# The most rows write_pending (a feedback call) inserts itself.
WRITE_PENDING_MAX_ROWS = 1_000
# How long close() waits for the writer thread.
JOIN_SECONDS = 10.0

SEGMENT_PREFIX = "cards-"
SEGMENT_SUFFIX = ".jsonl"


@dataclass
class _Segment:
    """This process's open, locked spool file, and the rows written to it (None once too many to keep)."""

    path: Path
    fd: int
    rows: list[Row] | None
    size: int = 0


class IssuedCardLog:
    """Issued-card rows: spooled by ``append`` (the request), inserted by a background thread (see the module
    docstring). ``insert`` writes rows to the database and raises its errors; ``prepare``, if given, is run by the
    writer when it starts and before each replay, retried with back-off while it fails."""

    def __init__(
        self, insert: Insert, spool_dir: Path, max_spool_bytes: int, prepare: Callable[[], None] | None = None
    ) -> None:
        self._insert = insert
        self._prepare = prepare  # run by the writer before it replays (the store: create the schema if missing)
        self._dir = spool_dir
        self._max_bytes = max_spool_bytes
        self._lock = threading.Lock()  # guards _active, _memory, _thread, _pid, _backlog_bytes
        self._writing = threading.Lock()  # one writer cycle at a time (the writer thread, close)
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._pid = os.getpid()
        self._active: _Segment | None = None
        self._memory: list[Row] = []  # rows not spooled (the directory cannot be written)
        self._spool_broken = False
        self._backlog = True  # segments on disk to replay; at start, whatever a dead process left
        self._backlog_bytes = 0
        self._last_scan = 0.0
        self._retry_at = 0.0
        self._retry_delay = 0.0
        self.started = False  # this process writes behind (so, under gunicorn, do its sibling workers)
        atexit.register(_close_at_exit, weakref.ref(self))

    # --- the request side ---------------------------------------------------------------------------------

    def append(self, rows: Sequence[Row]) -> None:
        """Spool the rows of one hook call (durable once this returns) and wake the writer. Never raises."""
        data = b"".join(orjson.dumps(row) + b"\n" for row in rows)
        with self._lock:
            self._after_fork()
            self._ensure_writer()
            if self._active_size() + self._backlog_bytes + len(data) > self._max_bytes:
                _dropped(len(rows), "spool full (CMV_CDS_SPOOL_MAX_BYTES)")
                return
            if not self._spool(data, rows):
                if len(self._memory) + len(rows) > MEMORY_MAX_ROWS:
                    _dropped(len(rows), "spool directory not writable and the memory queue is full")
                    return
                self._memory.extend(rows)
        # Set only when clear: Event.set takes its condition's lock and notifies every call, and the writer
        # clears the flag only before it takes the rows (so rows appended while the flag was seen set are taken).
        if not self._wake.is_set():
            self._wake.set()

    @property
    def has_pending(self) -> bool:
        """Rows of this process not yet known to be in the database (spooled or in memory)."""
        active = self._active
        return bool(self._memory) or (active is not None and active.size > 0)

    def write_pending(self) -> None:
        """Insert a copy of this process's rows of the last moments now (feedback and the report need them in the
        database), raising the database error if it fails. The spool is left as it is: the writer inserts the rows
        again (a no-op) and deletes them, and a failure here neither fragments the spool nor waits for the writer
        (feedback during an outage answers its 503 at once; after one, it does not queue behind a replay)."""
        with self._lock:
            active = self._active
            rows = list(self._memory) + (list(active.rows) if active is not None and active.rows is not None else [])
        if rows:
            # The newest only: after a long back-off the active segment can hold thousands, which settle() asks
            # the writer for instead.
            self._insert_checked(rows[-WRITE_PENDING_MAX_ROWS:])

    @property
    def has_backlog(self) -> bool:
        """Rows wait on disk after a failure (or a dead process's): the writer is retrying or replaying."""
        return self._backlog or self._retry_at > time.monotonic()

    def settle(self, timeout: float) -> None:
        """Ask the writer to retry now and wait, at most ``timeout`` seconds, until it has no backlog left."""
        self._retry_at = 0.0
        self._backlog = True
        self._wake.set()
        deadline = time.monotonic() + timeout
        while self.has_backlog and time.monotonic() < deadline:
            time.sleep(WRITE_BEHIND_SECONDS)

    # --- lifecycle ----------------------------------------------------------------------------------------

    def start(self) -> None:
        """Start the background writer now (it replays what earlier processes left), rather than on first use."""
        with self._lock:
            self._after_fork()
            self._ensure_writer()
        self._wake.set()

    def close(self) -> None:
        """Stop the writer and make one last attempt to insert this process's rows, unless the database is in
        back-off; rows not inserted stay in the spool for the next process (rows in memory are lost, counted)."""
        self._stop.set()
        self._wake.set()
        with self._lock:
            thread, self._thread = self._thread, None
        if thread is not None and thread is not threading.current_thread() and self._pid == os.getpid():
            thread.join(timeout=JOIN_SECONDS)
        if self._pid != os.getpid():
            return  # a forked child: the segment belongs to the parent
        with contextlib.suppress(Exception):
            self._write(replay=False)
        with self._lock:
            active, self._active = self._active, None
            lost, self._memory = len(self._memory), []
        if active is not None:
            os.close(active.fd)  # unlocks it: the next writer to scan the directory adopts it
            if active.size == 0:
                with contextlib.suppress(OSError):
                    active.path.unlink()
        if lost:
            _dropped(lost, "in memory at exit, database unavailable")

    # --- the writer ---------------------------------------------------------------------------------------

    def _ensure_writer(self) -> None:
        self.started = True
        if self._thread is not None and self._thread.is_alive():
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="cmv-cds-card-writer", daemon=True)
        self._thread.start()

    def _after_fork(self) -> None:
        """A log built before a fork: the child starts afresh (the open segment and the thread are the parent's)."""
        if self._pid != os.getpid():
            self._pid = os.getpid()
            self._active = None
            self._memory = []
            self._thread = None
            self._backlog = True

    def _run(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(timeout=self._idle_timeout())
            if self._stop.wait(WRITE_BEHIND_SECONDS):  # gather the calls of the next interval
                return
            self._wake.clear()
            try:
                self._write(replay=True)
            except Exception:
                log.exception("issued-card writer failed")

    def _idle_timeout(self) -> float:
        now = time.monotonic()
        if self._retry_at > now:
            return self._retry_at - now
        return RESCAN_SECONDS

    def _write(self, *, replay: bool) -> None:
        """One cycle of the writer: the rows appended since the last, then (``replay``) the backlog on disk.
        Failures are handled here (kept, retried after a back-off), never raised."""
        with self._writing:
            now = time.monotonic()
            if now - self._last_scan >= RESCAN_SECONDS:
                self._backlog = True
            if now < self._retry_at:
                self._close_large_segment()  # in back-off: only keep segments bounded
                return
            segment, memory = self._take()
            rows = memory + (_segment_rows(segment) if segment is not None else [])
            try:
                if rows:
                    self._insert_checked(rows)
            except Exception as exc:
                self._failed(segment, memory, exc)
                return
            if segment is not None:
                _discard(segment)
            if rows:
                metrics.count_audit_rows("written", len(rows))
            self._retry_delay = 0.0
            self._retry_at = 0.0
            if replay and self._backlog:
                self._replay()

    def _take(self) -> tuple[_Segment | None, list[Row]]:
        """The active segment (closed for appends; the next append opens a new one) and the in-memory rows."""
        with self._lock:
            segment = self._active if self._active is not None and self._active.size > 0 else None
            if segment is not None:
                self._active = None
            memory, self._memory = self._memory, []
        return segment, memory

    def _failed(self, segment: _Segment | None, memory: list[Row], exc: Exception) -> None:
        self._retry_delay = min(RETRY_MAX_SECONDS, max(RETRY_FIRST_SECONDS, self._retry_delay * 2))
        self._retry_at = time.monotonic() + self._retry_delay
        metrics.count_audit_retry()
        spilled = 0
        if segment is not None:
            os.close(segment.fd)  # the file stays: a backlog segment, replayed once the database answers
            spilled = len(segment.rows) if segment.rows is not None else _count_lines(segment.path)
            with self._lock:
                self._backlog_bytes += segment.size
            self._backlog = True
            metrics.count_audit_rows("spilled", spilled)
        if memory:
            with self._lock:
                room = max(0, MEMORY_MAX_ROWS - len(self._memory))
                self._memory[:0] = memory[:room]
            if len(memory) > room:
                _dropped(len(memory) - room, "memory queue full during a database outage")
        reason = f"{type(exc).__name__}; next attempt in {self._retry_delay:g} s"
        if spilled or memory:
            log.warning(
                "issued cards not written; kept for retry",
                extra={"card_count": spilled + len(memory), "reason": reason},
            )
        else:
            log.info("issued-card writer: database unavailable", extra={"reason": reason})

    def _close_large_segment(self) -> None:
        with self._lock:
            active = self._active
            if active is None or active.size < SEGMENT_MAX_BYTES:
                return
            self._active = None
            self._backlog_bytes += active.size
        os.close(active.fd)
        self._backlog = True

    def _replay(self) -> None:
        """Insert every unlocked segment of the directory (this process's failed ones, and dead processes')."""
        self._last_scan = time.monotonic()
        if self._prepare is not None:
            try:
                self._prepare()
            except Exception as exc:
                self._failed(None, [], exc)
                return
        with self._lock:
            own = self._active.path if self._active is not None else None
        remaining = 0
        for path in _segments(self._dir):
            if path == own:
                continue
            try:
                size = self._replay_segment(path)
            except Exception as exc:
                self._failed(None, [], exc)
                return
            remaining += size
        with self._lock:
            self._backlog_bytes = remaining
        metrics.set_audit_spool_bytes(remaining)
        self._backlog = False

    def _replay_segment(self, path: Path) -> int:
        """Replay one segment if no live process holds it; the bytes left behind (0 once replayed or taken)."""
        try:
            fd = os.open(path, os.O_RDWR)
        except FileNotFoundError:
            return 0
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return os.fstat(fd).st_size  # a live process's segment, or another replayer's
            if os.fstat(fd).st_nlink == 0:
                return 0  # replayed and deleted by another process meanwhile
            rows, bad = _parse(_read_all(fd))
            for start in range(0, len(rows), REPLAY_CHUNK_ROWS):
                self._insert_checked(rows[start : start + REPLAY_CHUNK_ROWS])
            path.unlink()
        finally:
            os.close(fd)
        if rows:
            metrics.count_audit_rows("replayed", len(rows))
            log.info("issued cards replayed from the spool", extra={"card_count": len(rows)})
        if bad:
            _dropped(bad, "unreadable spool line")
        return 0

    def _insert_checked(self, rows: list[Row]) -> None:
        """Insert; rows the database refuses as invalid (not an outage) are dropped one by one, counted."""
        try:
            self._insert(rows)
        except (DataError, IntegrityError):
            for row in rows:
                try:
                    self._insert([row])
                except (DataError, IntegrityError):
                    _dropped(1, "row refused by the database")

    # --- the spool ----------------------------------------------------------------------------------------

    def _active_size(self) -> int:
        return self._active.size if self._active is not None else 0

    def _spool(self, data: bytes, rows: Sequence[Row]) -> bool:
        """Append to the active segment (opened on demand); False when the directory cannot be written."""
        if self._spool_broken:
            return False
        try:
            if self._active is None:
                self._active = _open_segment(self._dir)
            written = os.write(self._active.fd, data)
            if written != len(data):
                raise OSError(f"short write to the spool ({written} of {len(data)} bytes)")
        except OSError as exc:
            self._spool_broken = True
            log.error(
                "issued-card spool not writable; rows kept in memory only",
                extra={"setting": "CMV_CDS_SPOOL_DIR", "reason": type(exc).__name__},
            )
            return False
        self._active.size += len(data)
        if self._active.rows is not None:
            self._active.rows.extend(rows)
            if len(self._active.rows) > MEMORY_MAX_ROWS:
                self._active.rows = None  # read back from the file when written
        return True


def _open_segment(directory: Path) -> _Segment:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{SEGMENT_PREFIX}{os.getpid()}-{time.time_ns()}{SEGMENT_SUFFIX}"
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # a new file: nobody else holds it
    return _Segment(path=path, fd=fd, rows=[])


def _segments(directory: Path) -> list[Path]:
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        return []
    return [
        directory / name for name in sorted(names) if name.startswith(SEGMENT_PREFIX) and name.endswith(SEGMENT_SUFFIX)
    ]


def _segment_rows(segment: _Segment) -> list[Row]:
    if segment.rows is not None:
        return segment.rows
    rows, bad = _parse(segment.path.read_bytes())
    if bad:
        _dropped(bad, "unreadable spool line")
    return rows


def _discard(segment: _Segment) -> None:
    """A segment whose rows are in the database: delete it, then unlock it (in that order, so no replayer
    can take it in between)."""
    with contextlib.suppress(FileNotFoundError):
        segment.path.unlink()
    os.close(segment.fd)


def _read_all(fd: int) -> bytes:
    chunks = []
    offset = 0
    while chunk := os.pread(fd, 1 << 20, offset):
        chunks.append(chunk)
        offset += len(chunk)
    return b"".join(chunks)


def _parse(data: bytes) -> tuple[list[Row], int]:
    """Rows of a segment, and the number of lines that are not rows (a torn last line, say)."""
    rows: list[Row] = []
    bad = 0
    for line in _lines(data):
        try:
            values = orjson.loads(line)
        except orjson.JSONDecodeError:
            bad += 1
            continue
        if isinstance(values, list) and len(values) == 7 and all(isinstance(v, str) for v in values):
            rows.append(tuple(values))  # checked: seven strings
        else:
            bad += 1
    return rows, bad


def _lines(data: bytes) -> Iterator[bytes]:
    for line in data.split(b"\n"):
        if line.strip():
            yield line


def _count_lines(path: Path) -> int:
    try:
        return path.read_bytes().count(b"\n")
    except OSError:
        return 0


def _dropped(count: int, reason: str) -> None:
    metrics.count_audit_rows("dropped", count)
    log.error("issued cards dropped", extra={"card_count": count, "reason": reason})


def _close_at_exit(ref: weakref.ReferenceType[IssuedCardLog]) -> None:
    audit_log = ref()
    if audit_log is not None:
        try:
            audit_log.close()
        except Exception:
            log.exception("issued cards not recorded at exit")
