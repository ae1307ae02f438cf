"""``cmv-cds token``: short-lived CDS Hooks client JWTs from a local development key, to try the service with
authentication on (its default) in a minute.

The key pair (EC P-384, for ES384, which CDS Hooks 2.0.1 recommends) is made on first use in a directory of the
caller's choosing (``.cmv-cds-dev`` in the working directory by default): the private key readable by its owner
only, and a ``.gitignore`` that keeps the directory out of any git repository. The service never reads the
private key: it trusts the public half through ``CMV_CDS_TRUSTED_ISSUERS`` as a static ``jwks``, the value
``cmv-cds token --trusted-issuers`` prints. Each token names one endpoint as its ``aud`` (the service checks
it), lives a few minutes, and carries a fresh ``jti`` (the service accepts it once).

For local development only: whoever holds the key can call the service as this issuer.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import time
import uuid
from pathlib import Path
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from jwt.algorithms import ECAlgorithm

DEV_ISSUER = "urn:cmv-cds:local-dev-client"
DEFAULT_KEY_DIR = ".cmv-cds-dev"
KEY_FILE = "client-key.pem"
ALGORITHM = "ES384"
DEFAULT_LIFETIME_SECONDS = 300
MAX_LIFETIME_SECONDS = 3600  # the service's default CMV_CDS_JWT_MAX_LIFETIME_SECONDS


class DevKeyError(Exception):
    """The key directory or key file cannot be used."""


def load_or_create_key(directory: Path) -> tuple[ec.EllipticCurvePrivateKey, bool]:
    """The development key in ``directory``, made there first if absent; and whether it was just made."""
    path = directory / KEY_FILE
    if path.exists():
        try:
            key = serialization.load_pem_private_key(path.read_bytes(), password=None)
        except (OSError, ValueError, TypeError) as exc:
            raise DevKeyError(f"{path} is not a readable PEM private key ({type(exc).__name__})") from exc
        if not isinstance(key, ec.EllipticCurvePrivateKey) or not isinstance(key.curve, ec.SECP384R1):
            raise DevKeyError(f"{path} is not an EC P-384 key; remove it to make a new one")
        return key, False
    try:
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        ignore = directory / ".gitignore"
        if not ignore.exists():  # the key never belongs in a repository (a user's own .gitignore is kept)
            ignore.write_text("# cmv-cds token: a local development key, never committed\n*\n")
        key = ec.generate_private_key(ec.SECP384R1())
        pem = key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        # O_EXCL: never overwrite a key another invocation has just written.
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(descriptor, "wb") as handle:
            handle.write(pem)
    except FileExistsError:
        return load_or_create_key(directory)
    except OSError as exc:
        raise DevKeyError(f"cannot create the development key in {directory}: {exc.strerror or exc}") from exc
    return key, True


def public_jwk(key: ec.EllipticCurvePrivateKey) -> dict[str, Any]:
    """The public half as a JWK, its ``kid`` the RFC 7638 thumbprint (stable for the key)."""
    jwk: dict[str, Any] = ECAlgorithm.to_jwk(key.public_key(), as_dict=True)
    required = {name: jwk[name] for name in ("crv", "kty", "x", "y")}
    digest = hashlib.sha256(json.dumps(required, separators=(",", ":"), sort_keys=True).encode()).digest()
    kid = base64.urlsafe_b64encode(digest).rstrip(b"=").decode()
    return {**required, "kid": kid, "use": "sig", "alg": ALGORITHM}


def trusted_issuers(key: ec.EllipticCurvePrivateKey) -> dict[str, Any]:
    """The ``CMV_CDS_TRUSTED_ISSUERS`` document that trusts this key (and nothing else)."""
    return {DEV_ISSUER: {"jwks": {"keys": [public_jwk(key)]}, "algorithms": [ALGORITHM]}}


def endpoint_url(base_url: str, target: str) -> str:
    """The URL a token is for (its ``aud``): ``target`` is a full URL, a path (``/cds-services``), or the id
    of a hosted service (its hook endpoint)."""
    if target.startswith(("http://", "https://")):
        return target
    path = target if target.startswith("/") else f"/cds-services/{target}"
    return base_url.rstrip("/") + path


def mint(key: ec.EllipticCurvePrivateKey, audience: str, lifetime_seconds: int, now: float | None = None) -> str:
    """A CDS Hooks client JWT (2.0.1 "Trusting CDS Clients"): ``iss``, ``sub``, ``aud``, ``iat``, ``exp``,
    ``jti``, signed ES384 with ``kid`` and ``typ: JWT`` in the header."""
    issued = int(time.time() if now is None else now)
    claims = {
        "iss": DEV_ISSUER,
        "sub": DEV_ISSUER,
        "aud": audience,
        "iat": issued,
        "exp": issued + lifetime_seconds,
        "jti": str(uuid.uuid4()),
    }
    return jwt.encode(claims, key, algorithm=ALGORITHM, headers={"typ": "JWT", "kid": public_jwk(key)["kid"]})


__all__ = [
    "DEFAULT_KEY_DIR",
    "DEFAULT_LIFETIME_SECONDS",
    "DEV_ISSUER",
    "MAX_LIFETIME_SECONDS",
    "DevKeyError",
    "endpoint_url",
    "load_or_create_key",
    "mint",
    "public_jwk",
    "trusted_issuers",
]
