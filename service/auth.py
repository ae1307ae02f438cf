"""Authentication of CDS clients (CDS Hooks 2.0.1 "Trusting CDS Clients").

The seam: when ``CMV_CDS_REQUIRE_AUTH`` is true, every request (discovery included) must carry
``Authorization: Bearer <JWT>`` that the configured authenticator accepts. Failures are a 401 with a
generic message and a ``WWW-Authenticate`` header; the reason goes to the log only.
"""

from __future__ import annotations

import logging
from typing import Protocol

from service.config import Settings
from service.errors import Unauthorized

log = logging.getLogger("cmv_cds.auth")

GENERIC_FAILURE = "authentication required: a valid CDS Hooks client JWT is needed"


class Authenticator(Protocol):
    def authenticate(self, authorization_header: str | None, endpoint_url: str) -> None:
        """Return if the caller is trusted for ``endpoint_url``; raise ``Unauthorized`` otherwise."""


def bearer_token(authorization_header: str | None) -> str:
    """The token of an ``Authorization: Bearer`` header; 401 if absent or malformed."""
    scheme, _, token = (authorization_header or "").partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        log.info("authentication failed", extra={"reason": "missing bearer token"})
        raise Unauthorized(GENERIC_FAILURE)
    return token.strip()


class NoTrustedIssuers:
    """Fail-closed authenticator used while no trusted issuer is configured: every call is refused."""

    def authenticate(self, authorization_header: str | None, endpoint_url: str) -> None:
        bearer_token(authorization_header)
        log.warning("authentication failed", extra={"reason": "no trusted issuers configured"})
        raise Unauthorized(GENERIC_FAILURE)


def build_authenticator(settings: Settings) -> Authenticator:
    """The authenticator for these settings."""
    return NoTrustedIssuers()
