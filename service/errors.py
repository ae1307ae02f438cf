"""Typed protocol errors and the single edge that turns them into HTTP responses.

Every non-2xx body is a FHIR OperationOutcome in JSON. Unexpected exceptions become a 500 whose body
carries only an opaque error id; the same id is logged with the traceback. A database that does not answer
is a 503 (``transient``: the client may retry), not a 500: it is an outage, not a bug.
"""

from __future__ import annotations

import logging
import uuid
from typing import Any

import orjson
from flask import Flask, Response, g, request
from sqlalchemy.exc import OperationalError
from werkzeug.exceptions import HTTPException

log = logging.getLogger("cmv_cds.errors")


class CdsError(Exception):
    """Base class: a status code, a FHIR issue code and an optional FHIRPath-like location.

    ``message`` goes to the client and may quote its input. The log gets only ``refusal`` (a fixed phrase
    per class), the field path and ``log_reason``, a fixed string written by this code base (for a 401, why
    the token was refused), so no patient data or token can reach it.
    """

    status = 400
    issue_code = "invalid"
    refusal = "invalid request"

    def __init__(self, message: str, *, expression: str | None = None, log_reason: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.expression = expression
        self.log_reason = log_reason

    def log_text(self) -> str:
        """What the log says about this refusal, e.g. ``invalid request at context.draftOrders``."""
        text = self.refusal if self.expression is None else f"{self.refusal} at {self.expression}"
        return text if self.log_reason is None else f"{text}: {self.log_reason}"


class InvalidRequest(CdsError):
    """The request body is not a valid CDS Hooks call for this service (400)."""

    status = 400
    issue_code = "invalid"
    refusal = "invalid request"


class Unauthorized(CdsError):
    """Missing or invalid client JWT (401). The message is deliberately generic."""

    status = 401
    issue_code = "login"
    refusal = "authentication failed"


class NotFound(CdsError):
    """Unknown CDS service id or route (404)."""

    status = 404
    issue_code = "not-found"
    refusal = "not found"


class PreconditionFailed(CdsError):
    """Required FHIR data could not be obtained from prefetch or the FHIR server (412)."""

    status = 412
    issue_code = "incomplete"
    refusal = "required FHIR data unavailable"


class PayloadTooLarge(CdsError):
    """The request body exceeds the configured cap (413)."""

    status = 413
    issue_code = "too-costly"
    refusal = "request body over CMV_CDS_MAX_BODY_BYTES"


class UnsupportedMediaType(CdsError):
    """The request is not JSON (415)."""

    status = 415
    issue_code = "not-supported"
    refusal = "request body not declared as JSON"


def operation_outcome(
    message: str, *, issue_code: str, severity: str = "error", expression: str | None = None
) -> dict[str, Any]:
    """A minimal FHIR R4 OperationOutcome with one issue."""
    issue: dict[str, Any] = {"severity": severity, "code": issue_code, "diagnostics": message}
    if expression:
        issue["expression"] = [expression]
    return {"resourceType": "OperationOutcome", "issue": [issue]}


def json_response(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    """Serialise with orjson (fast, and rejects NaN) into a JSON response."""
    response = Response(orjson.dumps(body), status=status, mimetype="application/json")
    for name, value in (headers or {}).items():
        response.headers[name] = value
    return response


def error_response(error: CdsError) -> Response:
    """The HTTP response for a CdsError: an OperationOutcome, with WWW-Authenticate on 401."""
    headers = {"WWW-Authenticate": 'Bearer realm="cds-services"'} if error.status == 401 else None
    body = operation_outcome(error.message, issue_code=error.issue_code, expression=error.expression)
    return json_response(body, status=error.status, headers=headers)


def register_error_handlers(app: Flask) -> None:
    """Install the one error edge: typed errors, HTTP errors and unexpected exceptions."""

    @app.errorhandler(CdsError)
    def _cds_error(error: CdsError) -> Response:
        # The message may quote client input (it goes back to the client); the log gets only fixed phrases
        # and the field path (CdsError.log_text), which never carry patient data.
        log.info(
            "request refused",
            extra={
                "request_id": g.get("request_id"),
                "method": request.method,
                "path": request.url_rule.rule if request.url_rule else "unmatched",
                "status": error.status,
                "reason": error.log_text(),
            },
        )
        return error_response(error)

    @app.errorhandler(HTTPException)
    def _http_error(error: HTTPException) -> Response:
        status = error.code or 500
        code = {404: "not-found", 405: "not-supported", 413: "too-costly"}.get(status, "invalid")
        body = operation_outcome(error.description or error.name, issue_code=code)
        response = json_response(body, status=status)
        if status == 405 and error.get_response().headers.get("Allow"):
            response.headers["Allow"] = error.get_response().headers["Allow"]
        return response

    @app.errorhandler(OperationalError)
    def _database_unavailable(error: OperationalError) -> Response:
        # The feedback database, which also holds the JWT replay table, is down, unreachable or locked past
        # its busy timeout (DB-API OperationalError). The log gets the exception type and frames only (the
        # formatter drops messages): SQLAlchemy's message quotes the statement and its parameters.
        return _logged_failure(
            error, "database unavailable", "the service's database is unavailable; retry later", "transient", 503
        )

    @app.errorhandler(Exception)
    def _unexpected(error: Exception) -> Response:
        return _logged_failure(error, "unexpected error", "internal error", "exception", 500)


def _logged_failure(error: Exception, log_message: str, diagnostics: str, issue_code: str, status: int) -> Response:
    """A failure the client cannot fix: logged with its traceback under an opaque id the answer also carries."""
    error_id = str(uuid.uuid4())
    log.error(log_message, exc_info=error, extra={"error_id": error_id, "status": status})
    body = operation_outcome(f"{diagnostics} (id {error_id})", issue_code=issue_code)
    return json_response(body, status=status)
