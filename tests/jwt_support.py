"""Test helpers for CDS Hooks client JWTs: real keys, token minting, a loopback JWKS server.

PyJWKClient-style fetches go through urllib, which ``responses`` cannot intercept, so the JWK Sets are
served by a real ``http.server`` on 127.0.0.1 (a free port) that counts the requests it answers.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import http.server
import json
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import ECAlgorithm, RSAAlgorithm

ISSUER = "https://ehr.example.org/fhir"
AUDIENCE = "https://cds.example.org/cds-services/cmv-antiviral"

SigningKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey


def ec_p384_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP384R1())


def rsa_2048_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def public_jwk(private_key: SigningKey, kid: str, alg: str | None = None) -> dict[str, Any]:
    """The public half of ``private_key`` as a JWK dict with ``kid``, ``use`` and (optionally) ``alg``."""
    if isinstance(private_key, ec.EllipticCurvePrivateKey):
        jwk: dict[str, Any] = ECAlgorithm.to_jwk(private_key.public_key(), as_dict=True)
    else:
        jwk = RSAAlgorithm.to_jwk(private_key.public_key(), as_dict=True)
    jwk.update({"kid": kid, "use": "sig"})
    if alg:
        jwk["alg"] = alg
    return jwk


def jwks(*keys: dict[str, Any]) -> dict[str, Any]:
    return {"keys": list(keys)}


def claims(**overrides: Any) -> dict[str, Any]:
    """A valid CDS Hooks payload (spec shape) for ``ISSUER``/``AUDIENCE``; ``None`` values drop a claim."""
    now = int(time.time())
    payload: dict[str, Any] = {
        "iss": ISSUER,
        "aud": AUDIENCE,
        "exp": now + 300,
        "iat": now,
        "jti": str(uuid.uuid4()),
    }
    payload.update(overrides)
    return {name: value for name, value in payload.items() if value is not None}


def mint(
    private_key: SigningKey | str | bytes,
    *,
    alg: str = "ES384",
    kid: str | None = "key-1",
    jku: str | None = None,
    payload: Mapping[str, Any] | None = None,
    headers: Mapping[str, Any] | None = None,
) -> str:
    """Sign ``payload`` (default: ``claims()``) with the CDS Hooks header (``typ: JWT``, kid, jku)."""
    header: dict[str, Any] = {"typ": "JWT"}
    if kid is not None:
        header["kid"] = kid
    if jku is not None:
        header["jku"] = jku
    header.update(headers or {})
    return jwt.encode(dict(payload if payload is not None else claims()), private_key, algorithm=alg, headers=header)


class JwksServer:
    """A loopback HTTP server answering GET <path> with the JWK Set registered for that path."""

    def __init__(self) -> None:
        self.documents: dict[str, Any] = {}
        self.requests: Counter[str] = Counter()
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                server.requests[self.path] += 1
                document = server.documents.get(self.path)
                body = json.dumps(document).encode() if document is not None else b"{}"
                self.send_response(200 if document is not None else 404)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(target=self._httpd.serve_forever, args=(0.05,), daemon=True)

    @property
    def base_url(self) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host!s}:{port}"

    def url(self, path: str) -> str:
        return self.base_url + path

    def serve(self, path: str, document: Any) -> str:
        """Serve ``document`` at ``path``; its full URL."""
        self.documents[path] = document
        return self.url(path)

    @property
    def total_requests(self) -> int:
        return sum(self.requests.values())

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)


@contextmanager
def running_jwks_server() -> Iterator[JwksServer]:
    server = JwksServer()
    server.start()
    try:
        yield server
    finally:
        server.stop()


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def forge(header: Mapping[str, Any], payload: Mapping[str, Any], sign: Callable[[bytes], bytes] | None) -> str:
    """A compact JWS built by hand (for tokens PyJWT refuses to make: alg none, HMAC with a PEM)."""
    signing_input = f"{b64url(json.dumps(header).encode())}.{b64url(json.dumps(payload).encode())}"
    signature = sign(signing_input.encode()) if sign is not None else b""
    return f"{signing_input}.{b64url(signature)}"


def hs384_with(secret: bytes) -> Callable[[bytes], bytes]:
    return lambda message: hmac.new(secret, message, hashlib.sha384).digest()


def replace_payload(token: str, payload: Mapping[str, Any]) -> str:
    """``token`` with its payload segment swapped for ``payload`` (header and signature kept)."""
    header, _, signature = token.split(".")
    return f"{header}.{b64url(json.dumps(payload).encode())}.{signature}"


def public_pem(private_key: SigningKey) -> bytes:
    return private_key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


class FakeClock:
    """A monotonic clock the test moves by hand."""

    def __init__(self, start: float = 1000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds
