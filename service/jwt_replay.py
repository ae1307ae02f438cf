"""Short-term storage of client JWT ids (``jti``), so a captured token cannot be replayed.

CDS Hooks best practice: "Ensure that the ``jti`` value doesn't exist in the short-term storage of
JWTs previously processed by this CDS Service", keeping each one for the token's lifetime.

The store is a table (``jwt_replay``) in the service database, so several gunicorn workers (or
hosts) sharing that database agree on what has been seen: the claim is an ``INSERT`` on the primary
key, and the database, not the process, decides who was first. Only a SHA-256 of ``iss|jti`` and an
expiry time are stored, never the token or any other claim. Expired rows are purged cheaply every
``purge_every`` calls (and at most every ``purge_interval_seconds``).

The table is created by ``cmv-cds migrate`` with the feedback store's tables (``METADATA``); a cache checks
once, at its first claim rather than when it is built (so a worker boots with the database down), that the
table exists, and creates it if it does not. While the database is down a claim raises its
``OperationalError``: the app answers 503, it never accepts a token it could not record (fail closed).
"""

from __future__ import annotations

import hashlib
import logging
import math
import random
import threading
import time
from collections.abc import Callable

import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError, OperationalError, SQLAlchemyError

log = logging.getLogger("cmv_cds.auth")

TABLE_NAME = "jwt_replay"
CREATE_RETRY_SECONDS = 15.0


class SchemaUnavailable(OperationalError):
    """A table is missing and could not be created (database down, or no right to create it). An
    ``OperationalError``, so the app answers 503 (``service.errors``)."""

    def __init__(self, cause: BaseException) -> None:
        super().__init__("database schema not available (run cmv-cds migrate)", None, cause)


METADATA = sa.MetaData()
TABLE = sa.Table(
    TABLE_NAME,
    METADATA,
    sa.Column("jti_hash", sa.String(64), primary_key=True),
    # Epoch seconds after which the token is refused anyway (its exp plus leeway).
    sa.Column("expires_at", sa.BigInteger, nullable=False),
    sa.Index("ix_jwt_replay_expires_at", "expires_at"),
)


def jti_key(iss: str, jti: str) -> str:
    """The stored key of a token id: hex SHA-256 of ``iss + "|" + jti`` (ids are per issuer)."""
    return hashlib.sha256(f"{iss}|{jti}".encode()).hexdigest()


class JtiReplayCache:
    """Remembers ``(iss, jti)`` pairs until their token expires; a pair is accepted only once."""

    def __init__(
        self,
        engine: sa.Engine,
        *,
        purge_every: int = 256,
        purge_interval_seconds: float = 300.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._engine = engine
        self._clock = clock
        self._purge_every = max(1, purge_every)
        self._purge_interval = purge_interval_seconds
        self._lock = threading.Lock()
        self._calls_since_purge = 0
        self._last_purge: float | None = None
        self.table = TABLE
        self._table_ready = False

    def _ensure_table(self) -> None:
        """CREATE TABLE/INDEX if absent, in one transaction; idempotent; once per cache.

        Several workers starting at once race here: on PostgreSQL the loser's CREATE fails with a
        unique violation, on SQLite its check-then-create transaction fails with "database is
        locked" (a deferred transaction cannot wait to upgrade). Both are retried briefly; by then
        the winner has committed and the check finds the table.
        """
        if self._table_ready:
            return
        deadline = time.monotonic() + CREATE_RETRY_SECONDS
        while True:
            try:
                METADATA.create_all(self._engine, checkfirst=True)
                self._table_ready = True
                return
            except SQLAlchemyError as exc:
                if not _lost_race(exc) or time.monotonic() >= deadline:
                    # The database is down, or refuses (no right to create the table): the caller's 503, at once.
                    raise SchemaUnavailable(exc) from exc
                time.sleep(0.02 + random.random() * 0.05)  # noqa: S311 - jitter, not security

    def check_and_store(self, iss: str, jti: str, exp: float) -> bool:
        """Claim ``(iss, jti)`` until ``exp`` (epoch seconds). False if it was already claimed.

        Atomic across processes sharing the database. A row whose expiry has passed can be claimed
        again (its token can no longer be accepted, so reuse of the nonce is not a replay of it).
        """
        key = jti_key(iss, jti)
        expires_at = math.ceil(exp)
        now = self._clock()
        self._ensure_table()
        self._maybe_purge(now)
        try:
            with self._engine.begin() as conn:
                conn.execute(sa.insert(self.table).values(jti_hash=key, expires_at=expires_at))
            return True
        except IntegrityError:
            pass
        with self._engine.begin() as conn:
            result = conn.execute(
                sa.update(self.table)
                .where(self.table.c.jti_hash == key, self.table.c.expires_at < now)
                .values(expires_at=expires_at)
            )
            return result.rowcount == 1

    def purge(self) -> int:
        """Delete expired rows; the number deleted."""
        self._ensure_table()
        now = self._clock()
        with self._engine.begin() as conn:
            result = conn.execute(sa.delete(self.table).where(self.table.c.expires_at < now))
        return result.rowcount

    def _maybe_purge(self, now: float) -> None:
        with self._lock:
            self._calls_since_purge += 1
            due = (
                self._last_purge is None
                or self._calls_since_purge >= self._purge_every
                or now - self._last_purge >= self._purge_interval
            )
            if not due:
                return
            self._calls_since_purge = 0
            self._last_purge = now
        try:
            self.purge()
        except SQLAlchemyError:
            # Housekeeping only: a failed purge must not refuse a valid token. The claim that follows
            # still needs the database and fails loudly if it is really unavailable.
            log.warning("jwt replay purge failed", extra={"reason": "database error during purge"})


def _lost_race(exc: SQLAlchemyError) -> bool:
    """Another process created the table at the same moment (retried): PostgreSQL's unique violation or
    "already exists", SQLite's "database is locked" or "already exists". Anything else is an outage."""
    reason = str(getattr(exc, "orig", "") or "").lower()
    return isinstance(exc, IntegrityError) or "locked" in reason or "already exists" in reason
