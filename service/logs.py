"""Structured JSON logging that cannot carry patient data.

Only an allowlist of ``extra`` fields is ever written (ids of the request and the service, counts,
timings, rule ids, status codes, reasons we write ourselves). Anything else passed in ``extra`` is
dropped, so a careless ``extra={"patient": ...}`` cannot leak a name or a resource into the log.
Messages themselves are fixed strings written in this code base, never formatted with request data.
"""

from __future__ import annotations

import datetime as dt
import logging
import sys
from typing import Any

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


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message and allowlisted fields."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": dt.datetime.fromtimestamp(record.created, tz=dt.UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.msg if isinstance(record.msg, str) else "log record",
        }
        for key, value in record.__dict__.items():
            if key in ALLOWED_FIELDS and key not in _RESERVED:
                entry[key] = value if isinstance(value, str | int | float | bool | list | type(None)) else str(value)
        if record.exc_info and record.exc_info[0] is not None:
            # The exception type and traceback frames only: exception messages may quote input.
            entry["exception"] = record.exc_info[0].__name__
            entry["traceback"] = _frames_only(record.exc_info[2])
        return orjson.dumps(entry, default=str).decode()


def _frames_only(tb: Any) -> list[str]:
    frames = []
    while tb is not None:
        code = tb.tb_frame.f_code
        frames.append(f"{code.co_filename}:{tb.tb_lineno} in {code.co_name}")
        tb = tb.tb_next
    return frames


def configure_logging(level: str) -> None:
    """Route the ``cmv_cds`` loggers to stderr as JSON lines (idempotent)."""
    logger = logging.getLogger("cmv_cds")
    logger.setLevel(level.upper())
    logger.propagate = True
    if not any(isinstance(h.formatter, JsonFormatter) for h in logger.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(JsonFormatter())
        logger.addHandler(handler)
        # Propagation stays on so test harnesses (pytest caplog) see the records too; the root
        # logger has no handler in production, so nothing is written twice.
