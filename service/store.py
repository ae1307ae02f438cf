"""Feedback store: the cards this service issued and the CDS Hooks 2.0.1 feedback sent about them.

SQLAlchemy 2.x, SQLite (the default: one file in the working directory) or PostgreSQL
(``postgresql+psycopg://``; ``postgresql://`` and ``postgres://`` URLs are mapped to psycopg 3).

Two tables, and no patient data in either: card and suggestion uuids, rule ids, override-reason
codings and the clinician's free-text ``userComment`` (the one field whose content we do not control).

* ``issued_card``: one row per card returned by a service call (uuid, service id, rule id, indicator,
  suggestion uuids as a JSON array, hook instance, time issued).
* ``card_feedback``: one row per distinct feedback item. Whether the card was known (issued by this
  service id), its rule id and the accepted suggestion ids that were not on it are resolved when the
  feedback arrives and stored with the row, so the analysis survives a later purge of ``issued_card``.

Concurrency: several gunicorn workers (and several replicas) may share one database. ``create_schema``
serialises itself (PostgreSQL: a transaction-scoped advisory lock; SQLite: ``BEGIN IMMEDIATE``), SQLite runs in
WAL mode with a busy timeout and opens every write transaction with ``BEGIN IMMEDIATE`` (a deferred transaction
that reads and then writes can fail with SQLITE_BUSY without waiting), and duplicate inserts are resolved by
unique constraints with ``ON CONFLICT DO NOTHING``, never by read-then-write.

Boot and schema: building a store opens no connection, so a worker starts with the database down. The schema
(these two tables and the JWT replay table, ``service.jwt_replay``) is created by ``cmv-cds migrate`` (the
deployment's one-shot step) or ``create_schema``; the app's store (``create_schema_on_use``) also checks once per
process, at its first use of the tables, that they exist, creating them if missing, and until that succeeds
raises ``SchemaUnavailable`` (an ``OperationalError``: the app's 503). ``readiness`` reports the database state
for ``/readyz``.

Errors are not swallowed: a database outage raises from the call (``OperationalError``, which the app's error
edge answers with a 503). Only ``ping``/``readiness`` convert a database error into a state, which is their
purpose. The one exception is ``record_cards_later`` (the hook path): its rows go to the issued-card audit log
(``service.audit_log``): spooled to a local file before the answer, inserted behind by a background thread with
one driver-level ``executemany`` per batch, kept on disk and retried through outages. ``store_feedback`` and
``report`` first insert this process's pending rows (a failure leaves them spooled and raises the 503 error),
and when a card is not found they wait once for the other processes' write-behind delay before calling it
unknown.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import sqlite3
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson
from sqlalchemy import (
    BigInteger,
    Boolean,
    DateTime,
    Dialect,
    Engine,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    create_engine,
    distinct,
    event,
    func,
    select,
    text,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import URL, Connection, make_url
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column
from sqlalchemy.types import TypeDecorator

from service import audit_log, jwt_replay
from service.audit_log import IssuedCardLog, Row
from service.config import ConfigError
from service.errors import InvalidRequest
from service.jwt_replay import SchemaUnavailable

log = logging.getLogger("cmv_cds.store")

# Execution option that makes the SQLite ``begin`` listener emit BEGIN IMMEDIATE (write transactions).
_WRITE = "cmv_cds_write"
# pg_advisory_xact_lock key serialising create_schema across workers (any fixed int64).
_SCHEMA_LOCK_KEY = 0x636D765F636473  # "cmv_cds"
_SQLITE_BUSY_TIMEOUT_SECONDS = 5
# How long store_feedback waits for another process's write-behind before calling a card unknown: one interval of
# the writer and as much again for its insert (0.2 s; a sync worker is held that long by feedback naming an unknown
# card, so no more than that).
WRITE_BEHIND_GRACE_SECONDS = 2 * audit_log.WRITE_BEHIND_SECONDS
# ...and, right after an outage, for this process's spool to be replayed (a card issued during it).
BACKLOG_GRACE_SECONDS = 3.0
# Issued-card spool (service.audit_log): the directory used when none is configured, beside a SQLite file, and
# the size above which new rows are dropped.
DEFAULT_SPOOL_DIR = "cmv-cds-spool"
DEFAULT_SPOOL_MAX_BYTES = 256 * 1024 * 1024
_ISSUED_COLUMNS = ("uuid", "service_id", "rule_id", "indicator", "suggestion_uuids", "hook_instance", "issued_at")


@dataclass(frozen=True)
class IssuedCard:
    """A card as returned to the client: enough to resolve later feedback about it."""

    uuid: str
    rule_id: str
    indicator: str
    suggestion_uuids: tuple[str, ...]


@dataclass(frozen=True)
class FeedbackResult:
    """Outcome of one ``store_feedback`` call.

    ``stored`` counts rows newly inserted by this call; ``unknown_cards`` counts how many of those
    rows reference a card this service id never issued; ``duplicates`` counts items that were not
    inserted because an identical item was already stored (earlier, or earlier in the same call).
    ``stored + duplicates`` is the number of items received.
    """

    stored: int
    unknown_cards: int
    duplicates: int = 0


@dataclass(frozen=True)
class StoredFeedback:
    """One stored feedback row, as returned by ``list_feedback``.

    ``known_card``, ``rule_id`` and ``unknown_suggestions`` are resolved against ``issued_card`` when
    the feedback is received. For an unknown card (never issued, or issued by another service id)
    ``rule_id`` is None and every accepted suggestion id is in ``unknown_suggestions``.
    Timestamps are aware UTC datetimes.
    """

    card_uuid: str
    service_id: str
    outcome: str
    accepted_suggestions: tuple[str, ...]
    override_code: str | None
    override_system: str | None
    override_display: str | None
    user_comment: str | None
    outcome_timestamp: datetime
    received_at: datetime
    known_card: bool
    rule_id: str | None
    unknown_suggestions: tuple[str, ...]


@dataclass(frozen=True)
class OverrideReasonCount:
    """One override reason (a CDS Hooks ``overrideReason.reason`` coding) and how many cards it was given for.
    All three coding fields are None for overrides sent without a reason."""

    system: str | None
    code: str | None
    display: str | None
    count: int


@dataclass(frozen=True)
class RuleReport:
    """Governance figures for one rule id, as returned by ``FeedbackStore.report``.

    ``rule_id`` None stands for feedback on cards this service never issued (unknown cards): such feedback
    cannot be attributed to a rule. ``shown`` counts issued cards (``issued_card`` rows); ``accepted`` and
    ``overridden`` count distinct cards with at least one feedback item of that outcome; the override
    reasons count distinct overridden cards per reason coding (system + code); ``unknown_card_feedback``
    counts feedback items about unknown cards (non-zero only when ``rule_id`` is None).
    """

    rule_id: str | None
    shown: int
    accepted: int
    overridden: int
    override_reasons: tuple[OverrideReasonCount, ...]
    unknown_card_feedback: int

    @property
    def acceptance_rate(self) -> float | None:
        """Accepted cards / cards shown; None when no card of the rule was shown."""
        return self.accepted / self.shown if self.shown else None


class UTCDateTime(TypeDecorator[datetime]):
    """Aware UTC datetimes in, aware UTC datetimes out, on every backend.

    PostgreSQL stores ``timestamptz``; SQLite has no time zones, so the value is stored as naive UTC
    and tagged UTC again on the way out.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("UTCDateTime needs an aware datetime")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


class Base(DeclarativeBase):
    metadata = MetaData(
        naming_convention={
            "ix": "ix_%(table_name)s_%(column_0_N_name)s",
            "uq": "uq_%(table_name)s_%(column_0_N_name)s",
            "pk": "pk_%(table_name)s",
        }
    )


class IssuedCardRow(Base):
    __tablename__ = "issued_card"

    uuid: Mapped[str] = mapped_column(String(128), primary_key=True)
    service_id: Mapped[str] = mapped_column(String(128))
    rule_id: Mapped[str] = mapped_column(String(128))
    indicator: Mapped[str] = mapped_column(String(16))
    suggestion_uuids: Mapped[str] = mapped_column(Text)  # JSON array of strings
    hook_instance: Mapped[str] = mapped_column(String(256))
    issued_at: Mapped[datetime] = mapped_column(UTCDateTime())

    __table_args__ = (
        Index(None, "service_id", "issued_at"),
        Index(None, "hook_instance"),
    )


class FeedbackRow(Base):
    __tablename__ = "card_feedback"

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer(), "sqlite"), primary_key=True)
    # sha256 of (service id, card uuid, outcome, UTC outcome timestamp, sorted accepted suggestion ids).
    dedupe_key: Mapped[str] = mapped_column(String(64), unique=True)
    service_id: Mapped[str] = mapped_column(String(128))
    card_uuid: Mapped[str] = mapped_column(String(128))
    outcome: Mapped[str] = mapped_column(String(16))
    accepted_suggestions: Mapped[str] = mapped_column(Text)  # JSON array of strings
    override_code: Mapped[str | None] = mapped_column(String(256))
    override_system: Mapped[str | None] = mapped_column(String(1024))
    override_display: Mapped[str | None] = mapped_column(String(1024))
    user_comment: Mapped[str | None] = mapped_column(Text)
    outcome_timestamp: Mapped[datetime] = mapped_column(UTCDateTime())
    received_at: Mapped[datetime] = mapped_column(UTCDateTime())
    known_card: Mapped[bool] = mapped_column(Boolean())
    rule_id: Mapped[str | None] = mapped_column(String(128))
    unknown_suggestions: Mapped[str] = mapped_column(Text)  # JSON array of strings

    __table_args__ = (
        Index(None, "service_id", "received_at"),
        Index(None, "card_uuid"),
    )


class FeedbackStore:
    """Persistence for issued cards and feedback. One engine per store; one session per call."""

    def __init__(
        self,
        database_url: str,
        spool_dir: str | Path | None = None,
        max_spool_bytes: int = DEFAULT_SPOOL_MAX_BYTES,
        *,
        create_schema_on_use: bool = False,
    ) -> None:
        """No connection is opened here. ``spool_dir``: the issued-card spool (service.audit_log); None puts it
        beside a SQLite database file (``<file>.spool``), else ``cmv-cds-spool`` in the working directory.
        ``create_schema_on_use``: the app's store creates missing tables on first use (``ensure_schema``); other
        users (``cmv-cds report``, a read-only tool) call ``create_schema`` themselves or not at all."""
        url = _normalise_url(database_url)
        self._dialect = url.get_backend_name()
        if self._dialect == "sqlite":
            self._engine = create_engine(url, connect_args={"timeout": _SQLITE_BUSY_TIMEOUT_SECONDS})
            _configure_sqlite(self._engine)
        elif self._dialect == "postgresql":
            connect_args = {} if "connect_timeout" in url.query else {"connect_timeout": 10}
            self._engine = create_engine(url, pool_pre_ping=True, connect_args=connect_args)
        else:
            raise ConfigError(f"unsupported feedback database {url.drivername!r}: use sqlite or postgresql")
        self._schema_ready = not create_schema_on_use
        self._schema_lock = threading.Lock()
        spool = Path(spool_dir) if spool_dir else _default_spool_dir(url)
        self._audit = IssuedCardLog(self._insert_issued, spool, max_spool_bytes, prepare=self.ensure_schema)

    @property
    def engine(self) -> Engine:
        return self._engine

    def create_schema(self) -> None:
        """Create the tables and indexes if absent (``cmv-cds migrate``). Idempotent; safe with workers and
        replicas starting at once."""
        with self._engine.connect() as conn:
            conn.execution_options(**{_WRITE: True})
            with conn.begin():
                if self._dialect == "postgresql":
                    conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _SCHEMA_LOCK_KEY})
                Base.metadata.create_all(conn, checkfirst=True)
                jwt_replay.METADATA.create_all(conn, checkfirst=True)
        self._schema_ready = True

    def ensure_schema(self) -> None:
        """With ``create_schema_on_use``: make sure the tables exist (created if missing), once per process, and
        raise ``SchemaUnavailable`` (a 503) until that succeeds. Otherwise nothing."""
        if self._schema_ready:
            return
        with self._schema_lock:
            if self._schema_ready:
                return
            try:
                self.create_schema()
            except SQLAlchemyError as exc:
                raise SchemaUnavailable(exc) from exc

    def readiness(self) -> str:
        """The database as ``/readyz`` reports it: ``ok``, ``unavailable`` (does not answer) or
        ``schema-missing`` (answers, but the tables neither exist nor can be created)."""
        if not self.ping():
            return "unavailable"
        try:
            self.ensure_schema()
        except SchemaUnavailable:
            return "schema-missing"
        return "ok"

    def start_background_writer(self) -> None:
        """Start the issued-card writer now: it replays rows earlier processes left in the spool."""
        self._audit.start()

    def record_cards(self, service_id: str, hook_instance: str, cards: Sequence[IssuedCard]) -> None:
        """Remember the cards returned by one call. A uuid already recorded is left as it is."""
        if cards:
            self._insert_issued(_issued_rows(service_id, hook_instance, cards))

    def record_cards_later(self, service_id: str, hook_instance: str, cards: Sequence[IssuedCard]) -> None:
        """``record_cards`` through the audit log (see the module docstring): spooled before this returns,
        inserted by a background thread; the hook call does not wait for the database."""
        if cards:
            self._audit.append(_issued_rows(service_id, hook_instance, cards))

    def _insert_issued(self, rows: Sequence[Row]) -> None:
        """One driver-level ``executemany`` in one transaction (SQLite, 16-row batches: about 20 % less CPU per row
        than the SQLAlchemy Core insert it replaces, which bound and processed every row in Python).
        Database errors are raised as SQLAlchemy's (``OperationalError`` when the database is unavailable)."""
        self.ensure_schema()
        params: list[tuple[str | datetime, ...]]
        if self._dialect == "postgresql":
            placeholders = ", ".join(["%s"] * len(_ISSUED_COLUMNS))
            params = [(*row[:6], datetime.fromisoformat(row[6])) for row in rows]
        else:  # SQLite: naive UTC text in SQLAlchemy's DATETIME storage format, as UTCDateTime writes it
            placeholders = ", ".join(["?"] * len(_ISSUED_COLUMNS))
            params = [(*row[:6], row[6][:26].replace("T", " ")) for row in rows]
        statement = (
            f"INSERT INTO issued_card ({', '.join(_ISSUED_COLUMNS)}) VALUES ({placeholders}) "  # noqa: S608 (constants)
            "ON CONFLICT (uuid) DO NOTHING"
        )
        with self._engine.connect() as conn:
            conn.execution_options(**{_WRITE: True})
            with conn.begin():
                conn.exec_driver_sql(statement, params)

    def _await_other_writers(self, service_id: str, card_uuids: set[str]) -> None:
        """When this process writes issued cards behind, so do its sibling workers: a card issued by one of
        them a moment ago may still be in its queue. Wait once for that delay before any card is unknown."""
        statement = select(IssuedCardRow.uuid).where(
            IssuedCardRow.uuid.in_(card_uuids), IssuedCardRow.service_id == service_id
        )
        with Session(self._engine) as session:
            known = set(session.scalars(statement))
        if known != card_uuids:
            if self._audit.has_backlog:
                self._audit.settle(BACKLOG_GRACE_SECONDS)
            else:
                time.sleep(WRITE_BEHIND_GRACE_SECONDS)

    def store_feedback(self, service_id: str, items: Sequence[Mapping[str, Any]]) -> FeedbackResult:
        """Store CDS Hooks 2.0.1 feedback items (already schema-validated) for ``service_id``.

        Idempotent: an item with the same (service id, card uuid, outcome, outcome timestamp as an
        instant, set of accepted suggestion ids) as a stored one is a duplicate, not an error, and is
        not stored again (the first copy's override reason and comment are kept). ``stored`` counts
        only rows inserted by this call, so replaying a request returns ``stored == 0`` and
        ``duplicates == len(items)``. ``unknown_cards`` counts the inserted rows whose card uuid was
        never issued by this service id (they are stored anyway with ``known_card=False``).

        All items are parsed before anything is written: an unparseable ``outcomeTimestamp`` (one the
        schema pattern admits but the calendar does not, e.g. February 30) raises ``InvalidRequest``
        and nothing is stored. Database errors propagate.
        """
        now = datetime.now(UTC)
        rows: dict[str, dict[str, Any]] = {}
        for index, item in enumerate(items):
            row = _feedback_row(service_id, item, index)
            row["received_at"] = now
            rows.setdefault(row["dedupe_key"], row)
        if not rows:
            return FeedbackResult(stored=0, unknown_cards=0)
        self.ensure_schema()
        if self._audit.has_pending:
            self._audit.write_pending()  # this process's latest rows; on failure they stay spooled (503)
        if self._audit.started:
            self._await_other_writers(service_id, {row["card_uuid"] for row in rows.values()})

        with self._write_session() as session:
            card_uuids = {row["card_uuid"] for row in rows.values()}
            issued = {
                card.uuid: card
                for card in session.scalars(
                    select(IssuedCardRow).where(
                        IssuedCardRow.uuid.in_(card_uuids), IssuedCardRow.service_id == service_id
                    )
                )
            }
            for row in rows.values():
                card = issued.get(row["card_uuid"])
                accepted: list[str] = json.loads(row["accepted_suggestions"])
                if card is None:
                    row.update(known_card=False, rule_id=None, unknown_suggestions=_dump(accepted))
                else:
                    on_card = set(json.loads(card.suggestion_uuids))
                    unknown = [sid for sid in accepted if sid not in on_card]
                    row.update(known_card=True, rule_id=card.rule_id, unknown_suggestions=_dump(unknown))
            statement = (
                self._insert(FeedbackRow)
                .on_conflict_do_nothing(index_elements=["dedupe_key"])
                .returning(FeedbackRow.dedupe_key)
            )
            inserted = set(session.scalars(statement, list(rows.values())).all())
            session.commit()

        unknown_cards = sum(1 for key in inserted if not rows[key]["known_card"])
        return FeedbackResult(stored=len(inserted), unknown_cards=unknown_cards, duplicates=len(items) - len(inserted))

    def list_feedback(self, service_id: str | None = None) -> list[StoredFeedback]:
        """All stored feedback (optionally for one service id), oldest received first."""
        self.ensure_schema()
        statement = select(FeedbackRow).order_by(FeedbackRow.received_at, FeedbackRow.id)
        if service_id is not None:
            statement = statement.where(FeedbackRow.service_id == service_id)
        with Session(self._engine) as session:
            return [_stored(row) for row in session.scalars(statement)]

    def report(self, service_id: str | None = None, since: datetime | None = None) -> list[RuleReport]:
        """Governance summary of issued cards and feedback, one ``RuleReport`` per rule id (see there).

        ``service_id`` limits both tables to one service; ``since`` (an aware datetime) keeps the cards
        issued and the feedback received at or after it (each table by its own time column, so in a window
        a rule can have feedback on cards issued before the window). Rules in order of cards shown (most
        first), then rule id; the unknown-card entry (``rule_id`` None), if any, last. Cards queued for
        write-behind in this process are written first. Database errors propagate.
        """
        if since is not None and since.tzinfo is None:
            raise ValueError("report(since=...) needs an aware datetime")
        self.ensure_schema()
        if self._audit.has_pending:
            self._audit.write_pending()
        issued = select(IssuedCardRow.rule_id, func.count()).group_by(IssuedCardRow.rule_id)
        outcomes = select(
            FeedbackRow.rule_id, FeedbackRow.outcome, func.count(distinct(FeedbackRow.card_uuid)), func.count()
        ).group_by(FeedbackRow.rule_id, FeedbackRow.outcome)
        reasons = (
            select(
                FeedbackRow.rule_id,
                FeedbackRow.override_system,
                FeedbackRow.override_code,
                func.max(FeedbackRow.override_display),
                func.count(distinct(FeedbackRow.card_uuid)),
            )
            .where(FeedbackRow.outcome == "overridden")
            .group_by(FeedbackRow.rule_id, FeedbackRow.override_system, FeedbackRow.override_code)
        )
        if service_id is not None:
            issued = issued.where(IssuedCardRow.service_id == service_id)
            outcomes = outcomes.where(FeedbackRow.service_id == service_id)
            reasons = reasons.where(FeedbackRow.service_id == service_id)
        if since is not None:
            issued = issued.where(IssuedCardRow.issued_at >= since)
            outcomes = outcomes.where(FeedbackRow.received_at >= since)
            reasons = reasons.where(FeedbackRow.received_at >= since)

        figures: dict[str | None, dict[str, Any]] = {}

        def entry(rule_id: str | None) -> dict[str, Any]:
            return figures.setdefault(
                rule_id, {"shown": 0, "accepted": 0, "overridden": 0, "reasons": [], "unknown": 0}
            )

        with Session(self._engine) as session:
            for issued_rule, count in session.execute(issued):
                entry(issued_rule)["shown"] = count
            for feedback_rule, outcome, cards, items in session.execute(outcomes):
                if outcome in ("accepted", "overridden"):
                    entry(feedback_rule)[outcome] = cards
                if feedback_rule is None:
                    entry(None)["unknown"] += items
            for reason_rule, system, code, display, cards in session.execute(reasons):
                entry(reason_rule)["reasons"].append(OverrideReasonCount(system, code, display, cards))

        reports = [
            RuleReport(
                rule_id=rule_id,
                shown=values["shown"],
                accepted=values["accepted"],
                overridden=values["overridden"],
                override_reasons=tuple(
                    sorted(values["reasons"], key=lambda r: (-r.count, r.code is None, r.code or "", r.system or ""))
                ),
                unknown_card_feedback=values["unknown"],
            )
            for rule_id, values in figures.items()
        ]
        return sorted(reports, key=lambda r: (r.rule_id is None, -r.shown, r.rule_id or ""))

    def ping(self) -> bool:
        """True if the database answers a trivial query; False (logged) if it does not."""
        try:
            with self._engine.connect() as conn:
                conn.execute(text("SELECT 1"))
        except SQLAlchemyError as exc:
            log.warning("feedback database unreachable", extra={"error": type(exc).__name__})
            return False
        return True

    def dispose(self) -> None:
        """Stop the issued-card writer after a last attempt to insert its rows (what cannot be inserted stays
        in the spool), and close pooled connections (at shutdown, or in a worker after fork)."""
        try:
            self._audit.close()
        finally:
            self._engine.dispose()

    @contextmanager
    def _write_session(self) -> Iterator[Session]:
        with Session(self._engine) as session:
            session.connection(execution_options={_WRITE: True})
            yield session

    def _insert(self, model: type[Base]) -> postgresql.Insert | sqlite.Insert:
        """A Core INSERT (not an ORM bulk insert) on the model's table, with ON CONFLICT support."""
        table = Base.metadata.tables[model.__tablename__]
        if self._dialect == "postgresql":
            return postgresql.insert(table)
        return sqlite.insert(table)


def _issued_rows(service_id: str, hook_instance: str, cards: Sequence[IssuedCard]) -> list[Row]:
    at = datetime.now(UTC).isoformat(timespec="microseconds")  # "…T04:10:00.000000+00:00": microseconds always
    return [
        (card.uuid, service_id, card.rule_id, card.indicator, _dump(card.suggestion_uuids), hook_instance, at)
        for card in cards
    ]


def _default_spool_dir(url: URL) -> Path:
    """Beside a SQLite database file; otherwise in the working directory."""
    database = url.database or ""
    if url.get_backend_name() == "sqlite" and database not in ("", ":memory:") and not database.startswith("file:"):
        return Path(database + ".spool")
    return Path(DEFAULT_SPOOL_DIR)


def _normalise_url(database_url: str) -> URL:
    url = make_url(database_url)
    if url.drivername in ("postgresql", "postgres"):
        url = url.set(drivername="postgresql+psycopg")
    return url


def _configure_sqlite(engine: Engine) -> None:
    """WAL + busy timeout, and SQLAlchemy (not sqlite3) in charge of BEGIN (see module docstring)."""

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.isolation_level = None  # sqlite3 must not emit its own BEGIN
        _enable_wal(dbapi_connection)
        dbapi_connection.execute("PRAGMA synchronous=NORMAL")

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Connection) -> None:
        conn.exec_driver_sql("BEGIN IMMEDIATE" if conn.get_execution_options().get(_WRITE) else "BEGIN")


def _enable_wal(dbapi_connection: sqlite3.Connection) -> None:
    """``PRAGMA journal_mode=WAL``, retried while another connection holds the lock.

    WAL is persistent, so only the first connection to a new file converts it; but when two workers
    open a new file at once, the conversion fails with SQLITE_BUSY at once, without the busy handler.
    """
    deadline = time.monotonic() + _SQLITE_BUSY_TIMEOUT_SECONDS
    while True:
        try:
            mode = dbapi_connection.execute("PRAGMA journal_mode=WAL").fetchone()
        except sqlite3.OperationalError as exc:
            busy = getattr(exc, "sqlite_errorcode", None) in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED)
            if not busy or time.monotonic() >= deadline:
                raise
            time.sleep(0.01)
            continue
        if mode is None or str(mode[0]).lower() not in ("wal", "memory"):
            log.warning("SQLite feedback database is not in WAL mode", extra={"journal_mode": mode})
        return


_LEAP_SECOND = re.compile(r"^(\d{4}-\d{2}-\d{2}T\d{2}:\d{2}):60(?=[.Z+-])")


def _parse_timestamp(raw: str, index: int) -> datetime:
    """RFC 3339 date-time to an aware UTC datetime (lower-case ``t``/``z`` and a leap second allowed)."""
    value = raw.strip().upper()
    leap = _LEAP_SECOND.match(value)
    if leap:
        value = leap.group(1) + ":59" + value[leap.end() :]
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        parsed = None
    if parsed is None or parsed.tzinfo is None:
        raise InvalidRequest(
            "outcomeTimestamp is not an RFC 3339 date-time with a UTC offset",
            expression=f"feedback[{index}].outcomeTimestamp",
        )
    if leap:
        parsed += timedelta(seconds=1)
    return parsed.astimezone(UTC)


def _feedback_row(service_id: str, item: Mapping[str, Any], index: int) -> dict[str, Any]:
    card_uuid = str(item["card"])
    outcome = str(item["outcome"])
    timestamp = _parse_timestamp(str(item["outcomeTimestamp"]), index)
    accepted = list(dict.fromkeys(str(s["id"]) for s in item.get("acceptedSuggestions") or ()))
    override = item.get("overrideReason") or {}
    reason = override.get("reason") or {}
    identity = [service_id, card_uuid, outcome, timestamp.isoformat(), sorted(accepted)]
    dedupe_key = hashlib.sha256(json.dumps(identity, separators=(",", ":")).encode()).hexdigest()
    return {
        "dedupe_key": dedupe_key,
        "service_id": service_id,
        "card_uuid": card_uuid,
        "outcome": outcome,
        "accepted_suggestions": _dump(accepted),
        "override_code": reason.get("code"),
        "override_system": reason.get("system"),
        "override_display": reason.get("display"),
        "user_comment": override.get("userComment"),
        "outcome_timestamp": timestamp,
    }


def _stored(row: FeedbackRow) -> StoredFeedback:
    return StoredFeedback(
        card_uuid=row.card_uuid,
        service_id=row.service_id,
        outcome=row.outcome,
        accepted_suggestions=tuple(json.loads(row.accepted_suggestions)),
        override_code=row.override_code,
        override_system=row.override_system,
        override_display=row.override_display,
        user_comment=row.user_comment,
        outcome_timestamp=row.outcome_timestamp,
        received_at=row.received_at,
        known_card=row.known_card,
        rule_id=row.rule_id,
        unknown_suggestions=tuple(json.loads(row.unknown_suggestions)),
    )


def _dump(values: Sequence[str]) -> str:
    """A stored id list as compact JSON text, exactly as ``json.dumps(values, separators=(",", ":"))`` writes it.

    Written by orjson (three per hook call: about a tenth of json.dumps's cost, which builds an encoder each
    call) whenever the two agree byte for byte: text of printable ASCII only. json.dumps escapes DEL and every
    non-ASCII character as ``\\u`` where orjson writes them as they are, so such a list (a client's own
    suggestion ids) is written by json.dumps itself, as is one orjson refuses (a lone surrogate, which json.dumps
    escapes). tests/test_store.py compares the two."""
    items = list(values)
    data: bytes | None
    try:
        data = orjson.dumps(items)
    except TypeError:  # orjson.JSONEncodeError
        data = None
    if data is not None and data.isascii() and b"\x7f" not in data:
        return data.decode()
    return json.dumps(items, separators=(",", ":"))
