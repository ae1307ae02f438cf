"""Structured JSON logging that cannot carry patient data.

Only an allowlist of ``extra`` fields is ever written (ids of the request and the service, counts,
timings, rule ids, status codes, reasons we write ourselves). Anything else passed in ``extra`` is
dropped, so a careless ``extra={"patient": ...}`` cannot leak a name or a resource into the log.
Messages themselves are fixed strings written in this code base, never formatted with request data.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Mapping
from typing import Any, TextIO

import orjson

ALLOWED_FIELDS = frozenset(
    {
        "request_id",
        "issuer",
        "service_id",
        "hook",
        "hook_instance",
        "status",
        "latency_ms",
        "card_count",
        "rules",
        "indicators",
        "error_id",
        "reason",
        "prefetch_key",
        "fhir_status",
        "fetch_count",
        "feedback_count",
        "unknown_cards",
        "setting",
        "method",
        "path",
        "extension_keys",
        "unidentified_medications",
    }
)

_RESERVED = frozenset(logging.makeLogRecord({}).__dict__) | {"message", "asctime"}
_PLAIN = (str, int, float, bool, list, type(None))


def log_entry(created: float, level: str, logger: str, message: Any, fields: Mapping[str, Any]) -> dict[str, Any]:
    """One log line's object: time, level, logger, message, then the allowlisted ``fields`` in their order
    (anything else is dropped; values that are not plain JSON are written as their ``str``)."""
    entry: dict[str, Any] = {
        "time": _iso_time(created),
        "level": level,
        "logger": logger,
        "message": message if isinstance(message, str) else "log record",
    }
    for key, value in fields.items():
        if key in ALLOWED_FIELDS and key not in _RESERVED:
            entry[key] = value if isinstance(value, _PLAIN) else str(value)
    return entry


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message and allowlisted fields."""

    def format(self, record: logging.LogRecord) -> str:
        entry = log_entry(record.created, record.levelname, record.name, record.msg, record.__dict__)
        if record.exc_info and record.exc_info[0] is not None:
            # The exception type and traceback frames only: exception messages may quote input.
            entry["exception"] = record.exc_info[0].__name__
            entry["traceback"] = _frames_only(record.exc_info[2])
        return orjson.dumps(entry, default=str).decode()


# The formatted seconds of the last time written: a log line's time costs a strftime once per second only.
_last_second: tuple[int, str] = (-1, "")


def _iso_time(created: float) -> str:
    """``created`` as ``datetime.fromtimestamp(created, UTC).isoformat(timespec="milliseconds")`` writes it
    (microseconds rounded half to even as ``fromtimestamp`` does, then cut to milliseconds), without
    building a datetime."""
    global _last_second
    second = int(created // 1)
    micros = round((created - second) * 1e6)
    if micros >= 1_000_000:
        second, micros = second + 1, micros - 1_000_000
    cached_second, text = _last_second
    if cached_second != second:
        text = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        _last_second = (second, text)
    return f"{text}.{micros // 1000:03d}+00:00"


def _frames_only(tb: Any) -> list[str]:
    frames = []
    while tb is not None:
        code = tb.tb_frame.f_code
        frames.append(f"{code.co_filename}:{tb.tb_lineno} in {code.co_name}")
        tb = tb.tb_next
    return frames


class JsonLineHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """The service's handler: JSON lines to a stream, and a line ``log_request`` formatted, as it is."""

    def __init__(self, stream: TextIO) -> None:
        super().__init__(stream)
        self.setFormatter(JsonFormatter())

    def emit_line(self, line: str) -> None:
        """Write one formatted line (``log_request``), under the handler's lock as ``emit`` is."""
        self.acquire()
        try:
            self.stream.write(line + self.terminator)
            self.flush()
        except Exception:  # as logging does: a failing log write never fails the request
            self.handleError(logging.makeLogRecord({"name": REQUEST_LOGGER.name, "msg": "request"}))
        finally:
            self.release()


REQUEST_LOGGER = logging.getLogger("cmv_cds.app")


def log_request(fields: Mapping[str, Any]) -> None:
    """The per-request line (message ``request``, level INFO, logger ``cmv_cds.app``), written as
    ``REQUEST_LOGGER.info("request", extra=fields)`` would write it, without building a LogRecord for the
    handlers that take a formatted line (``emit_line``: the service's own, and the test suite's log guard).

    The same rules hold: the logger's level (and ``logging.disable``), each handler's level, propagation to
    the parent loggers' handlers, the allowlist. A handler without ``emit_line`` (pytest's caplog, any handler
    an operator adds) gets an ordinary LogRecord; with a filter on the logger itself (the only logger filter
    logging applies, as it does not apply the parents' on propagation) the ordinary path is taken entirely.
    """
    logger = REQUEST_LOGGER
    if not logger.isEnabledFor(logging.INFO):
        return
    if logger.filters:
        logger.info("request", extra=dict(fields))
        return
    line: str | None = None
    record: logging.LogRecord | None = None
    current: logging.Logger | None = logger
    while current is not None:
        for handler in current.handlers:
            if handler.level > logging.INFO:
                continue
            emit_line = getattr(handler, "emit_line", None)
            if emit_line is not None and not handler.filters:
                if line is None:
                    line = orjson.dumps(
                        log_entry(time.time(), "INFO", logger.name, "request", fields), default=str
                    ).decode()
                emit_line(line)
            else:
                if record is None:
                    path, lineno, function, _ = logger.findCaller(stacklevel=2)
                    record = logger.makeRecord(
                        logger.name, logging.INFO, path, lineno, "request", (), None, function, dict(fields)
                    )
                handler.handle(record)
        current = current.parent if current.propagate else None


def configure_logging(level: str) -> None:
    """Route the ``cmv_cds`` loggers to stderr as JSON lines (idempotent)."""
    logger = logging.getLogger("cmv_cds")
    logger.setLevel(level.upper())
    logger.propagate = True
    if not any(isinstance(h.formatter, JsonFormatter) for h in logger.handlers):
        logger.addHandler(JsonLineHandler(sys.stderr))
        # Propagation stays on so test harnesses (pytest caplog) see the records too; the root
        # logger has no handler in production, so nothing is written twice.
