"""Authentication of CDS clients (CDS Hooks 2.0.1 "Trusting CDS Clients").

The seam: when ``CMV_CDS_REQUIRE_AUTH`` is true, every request (discovery included) must carry
``Authorization: Bearer <JWT>`` that the configured authenticator accepts. Failures are a 401 with a
generic message and a ``WWW-Authenticate`` header; the reason goes to the log only.

With ``CMV_CDS_TRUSTED_ISSUERS`` configured, the JWT is verified as CDS Hooks 2.0.1 asks ("Security and Safety"
→ "Trusting CDS Clients", https://cds-hooks.hl7.org/2.0.1/#trusting-cds-clients), in this order, and nothing
reaches the network before the issuer and the ``jku`` are known to be trusted:

1. header: ``alg`` in the issuer's allowed list (default ES384, RS384; ``none`` and HS* never),
   ``kid`` present, ``typ`` if present is ``JWT``, no ``crit``/``b64`` extensions;
2. unverified ``iss`` in the allowlist; ``jku`` (if sent) in that issuer's ``jku`` list;
3. the key by ``kid``: a key pinned in the issuer's static ``jwks`` first, whatever the ``jku`` header
   says (Epic and the CDS Hooks sandbox always send one, and a deployment without outbound internet pins
   their keys), so a pinned ``kid`` never causes a fetch; otherwise from the ``jku``'s JWKS (cached for
   ``CMV_CDS_JWKS_CACHE_SECONDS``; an unknown ``kid`` triggers at most one refetch per ``jku`` per cooldown
   window); of a type matching ``alg``;
4. signature, ``aud`` == the endpoint URL (string or array), ``iss``, ``exp``/``iat``/``nbf`` with
   leeway, required ``iss aud exp iat jti``; ``iat`` not in the future; ``exp - iat`` at most
   ``CMV_CDS_JWT_MAX_LIFETIME_SECONDS``; ``tenant`` in the issuer's allowlist when it has one;
5. ``jti`` not seen before (``service.jwt_replay``, shared by all workers through the database).

The token and claim values are never logged; the failure reason is (``reason``), and the issuer
when it is a configured one (``issuer``; written once ``logs.py`` allowlists that field).
"""

from __future__ import annotations

import dataclasses
import http.client
import json
import logging
import threading
import time
import urllib.request
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Protocol
from urllib.error import URLError
from urllib.parse import urlsplit

import jwt
import sqlalchemy as sa
from jwt.algorithms import ECAlgorithm, RSAAlgorithm

from cards.profiles import CDS_HOOKS_2, PROFILES
from service.config import ConfigError, Settings, parse_preference_list_items
from service.errors import Unauthorized
from service.jwt_replay import JtiReplayCache

log = logging.getLogger("cmv_cds.auth")

GENERIC_FAILURE = "authentication required: a valid CDS Hooks client JWT is needed"

# The spec RECOMMENDS ES384 and RS384; others only when an issuer's configuration lists them.
DEFAULT_ALGORITHMS: tuple[str, ...] = ("ES384", "RS384")
# Asymmetric algorithms an issuer may be configured with: alg -> (kty, EC curve or None).
SUPPORTED_ALGORITHMS: Mapping[str, tuple[str, str | None]] = {
    "ES256": ("EC", "P-256"),
    "ES384": ("EC", "P-384"),
    "ES512": ("EC", "P-521"),
    "RS256": ("RSA", None),
    "RS384": ("RSA", None),
    "RS512": ("RSA", None),
    "PS256": ("RSA", None),
    "PS384": ("RSA", None),
    "PS512": ("RSA", None),
}
REQUIRED_CLAIMS = ("iss", "aud", "exp", "iat", "jti")
ISSUER_FIELDS = frozenset({"jku", "jwks", "algorithms", "tenants", "fhirServers", "profile", "preferenceListItems"})

MAX_TOKEN_CHARS = 16 * 1024
MAX_JWKS_BYTES = 256 * 1024
JWKS_FETCH_TIMEOUT_SECONDS = 3.0
# An unknown kid refetches a jku's JWKS at most once per this many seconds (and a failed fetch is not
# retried sooner), so a flood of bad tokens cannot turn into a flood of fetches.
JWKS_REFRESH_COOLDOWN_SECONDS = 30.0
# While a jku cannot be fetched, its last good JWKS stays usable this long past its cache lifetime.
JWKS_STALE_GRACE_SECONDS = 3600.0

_PRIVATE_JWK_MEMBERS = frozenset({"d", "p", "q", "dp", "dq", "qi", "oth", "k"})
_LOOPBACK_HOSTS = frozenset({"localhost", "127.0.0.1", "::1"})


class Authenticator(Protocol):
    def authenticate(self, authorization_header: str | None, endpoint_url: str) -> str:
        """The verified issuer (``iss``) if the caller is trusted for ``endpoint_url``; else ``Unauthorized``."""


def bearer_token(authorization_header: str | None) -> str:
    """The token of an ``Authorization: Bearer`` header; 401 if absent or malformed."""
    scheme, _, token = (authorization_header or "").partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        log.info("authentication failed", extra={"reason": "missing bearer token"})
        raise Unauthorized(GENERIC_FAILURE, log_reason="missing bearer token")
    return token.strip()


NO_TRUSTED_ISSUERS = "no trusted issuers configured (CMV_CDS_TRUSTED_ISSUERS is empty), so no token can be verified"


class NoTrustedIssuers:
    """Fail-closed authenticator used while no trusted issuer is configured: every call is refused.

    The app warns once at start (service.app); each refusal is then an ordinary authentication failure
    whose reason says why and which setting to change."""

    def authenticate(self, authorization_header: str | None, endpoint_url: str) -> str:
        bearer_token(authorization_header)
        log.info("authentication failed", extra={"reason": NO_TRUSTED_ISSUERS, "setting": "CMV_CDS_TRUSTED_ISSUERS"})
        raise Unauthorized(GENERIC_FAILURE, log_reason=NO_TRUSTED_ISSUERS)


# --- configuration ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class PublicJwk:
    """One verification key: its JWK metadata and the ``cryptography`` public key object."""

    kid: str
    kty: str
    crv: str | None
    alg: str | None
    key: Any

    def fits(self, alg: str) -> bool:
        """Whether this key may verify a signature made with ``alg``."""
        kty, crv = SUPPORTED_ALGORITHMS[alg]
        return self.kty == kty and (crv is None or self.crv == crv) and self.alg in (None, alg)


@dataclasses.dataclass(frozen=True)
class TrustedIssuer:
    """One allowlisted CDS client (``iss``) and how its tokens are verified."""

    iss: str
    jkus: frozenset[str]
    static_keys: Mapping[str, PublicJwk]
    algorithms: frozenset[str]
    tenants: frozenset[str] | None
    # URL prefixes of the FHIR servers this client may send as fhirServer (None: the global allowlist).
    fhir_servers: tuple[str, ...] | None = None
    # How the answer is shaped for this client (cards.profiles: "cds-hooks-2.0" or "epic").
    profile: str = "cds-hooks-2.0"
    # Epic preference-list items by medication name (None: CMV_CDS_PREFERENCE_LIST_ITEMS).
    preference_list_items: Mapping[str, str] | None = None


def load_trusted_issuers(raw: str) -> dict[str, TrustedIssuer]:
    """Parse ``CMV_CDS_TRUSTED_ISSUERS``: inline JSON (starts with ``{``) or a path to a JSON file.

    Shape: ``{"<iss>": {"jku": [urls], "jwks": {"keys": [...]}, "algorithms": [...], "tenants": [...],
    "fhirServers": [...], "profile": "epic", "preferenceListItems": {...}}}`` with at least one of
    ``jku``/``jwks`` per issuer. Raises ``ConfigError`` on any problem. An empty
    value means no trusted issuer (every call refused).
    """
    text = raw.strip()
    if not text:
        return {}
    if text.startswith(("{", "[")):
        source = "CMV_CDS_TRUSTED_ISSUERS"
    else:
        source = f"CMV_CDS_TRUSTED_ISSUERS file {text!r}"
        try:
            text = Path(text).read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigError(f"{source} cannot be read: {exc.strerror or exc}") from exc
    try:
        document = json.loads(text)
    except ValueError as exc:
        raise ConfigError(f"{source} is not valid JSON: {exc}") from exc
    if not isinstance(document, dict) or not document:
        raise ConfigError(f"{source} must be a JSON object mapping each trusted iss to its settings")
    return {iss: _issuer(source, iss, entry) for iss, entry in document.items()}


def _issuer(source: str, iss: str, entry: Any) -> TrustedIssuer:
    where = f"{source}, issuer {iss!r}"
    if not iss.strip():
        raise ConfigError(f"{source}: an issuer (iss) must be a non-empty string")
    if not isinstance(entry, dict):
        raise ConfigError(f"{where}: must be an object with 'jku' and/or 'jwks'")
    unknown = sorted(set(entry) - ISSUER_FIELDS)
    if unknown:
        raise ConfigError(f"{where}: unknown field(s) {unknown}; allowed: {sorted(ISSUER_FIELDS)}")
    if "jku" not in entry and "jwks" not in entry:
        raise ConfigError(f"{where}: needs 'jku' (allowed JWKS URLs) and/or 'jwks' (a static JWK Set)")

    jkus = _string_list(where, "jku", entry.get("jku", []), allow_empty="jwks" in entry)
    for url in jkus:
        _check_jku(where, url)

    algorithms = _string_list(where, "algorithms", entry.get("algorithms", list(DEFAULT_ALGORITHMS)))
    for alg in algorithms:
        if alg.lower() == "none" or alg.upper().startswith("HS"):
            raise ConfigError(f"{where}: algorithm {alg!r} is forbidden (CDS Hooks: no 'none', no HMAC)")
        if alg not in SUPPORTED_ALGORITHMS:
            raise ConfigError(f"{where}: unsupported algorithm {alg!r}; use one of {sorted(SUPPORTED_ALGORITHMS)}")

    tenants = None
    if "tenants" in entry:
        tenants = frozenset(_string_list(where, "tenants", entry["tenants"]))

    static_keys: dict[str, PublicJwk] = {}
    if "jwks" in entry:
        jwks = entry["jwks"]
        if not isinstance(jwks, dict) or not isinstance(jwks.get("keys"), list) or not jwks["keys"]:
            raise ConfigError(f"{where}: 'jwks' must be a JWK Set object with a non-empty 'keys' list")
        for member in jwks["keys"]:
            try:
                key = parse_public_jwk(member)
            except ValueError as exc:
                raise ConfigError(f"{where}: bad key in 'jwks': {exc}") from exc
            if key.kid in static_keys:
                raise ConfigError(f"{where}: duplicate kid {key.kid!r} in 'jwks'")
            static_keys[key.kid] = key
    fhir_servers = None
    if "fhirServers" in entry:
        fhir_servers = tuple(_string_list(where, "fhirServers", entry["fhirServers"]))
        if not all(url.startswith(("https://", "http://")) for url in fhir_servers):
            raise ConfigError(f"{where}: 'fhirServers' must be absolute http(s) URL prefixes")
    profile = entry.get("profile", CDS_HOOKS_2)
    if profile not in PROFILES:
        raise ConfigError(f"{where}: 'profile' must be one of {list(PROFILES)}")
    items = None
    if "preferenceListItems" in entry:
        items = parse_preference_list_items(entry["preferenceListItems"], f"{where}: 'preferenceListItems'")
    return TrustedIssuer(
        iss, frozenset(jkus), static_keys, frozenset(algorithms), tenants, fhir_servers, profile, items
    )


def _string_list(where: str, name: str, value: Any, *, allow_empty: bool = False) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(item, str) and item.strip() for item in value):
        raise ConfigError(f"{where}: '{name}' must be a list of non-empty strings")
    if not value and not allow_empty:
        raise ConfigError(f"{where}: '{name}' must not be empty")
    return [str(item) for item in value]


def _check_jku(where: str, url: str) -> None:
    parts = urlsplit(url)
    if not parts.hostname:
        raise ConfigError(f"{where}: jku {url!r} is not an absolute URL")
    if parts.scheme == "https" or (parts.scheme == "http" and parts.hostname in _LOOPBACK_HOSTS):
        return
    raise ConfigError(f"{where}: jku {url!r} must be https (plain http only for a loopback host)")


def parse_public_jwk(member: Any) -> PublicJwk:
    """A public EC or RSA signing JWK; ``ValueError`` for anything else (private, symmetric, malformed)."""
    if not isinstance(member, dict):
        raise ValueError("a JWK must be an object")
    kid = member.get("kid")
    if not isinstance(kid, str) or not kid:
        raise ValueError("every key needs a 'kid'")
    if _PRIVATE_JWK_MEMBERS & set(member):
        raise ValueError(f"key {kid!r} holds private or symmetric key material; publish public keys only")
    kty = member.get("kty")
    alg = member.get("alg")
    use = member.get("use")
    if use not in (None, "sig"):
        raise ValueError(f"key {kid!r} is not a signing key (use={use!r})")
    if alg is not None and alg not in SUPPORTED_ALGORITHMS:
        raise ValueError(f"key {kid!r} has unsupported alg {alg!r}")
    if kty not in ("EC", "RSA"):
        raise ValueError(f"key {kid!r} has unsupported kty {kty!r} (EC or RSA only)")
    try:
        key: Any = ECAlgorithm.from_jwk(member) if kty == "EC" else RSAAlgorithm.from_jwk(member)
    except (jwt.PyJWTError, ValueError, TypeError, KeyError) as exc:
        raise ValueError(f"key {kid!r} is not a valid {kty} public key") from exc
    crv = member.get("crv") if kty == "EC" else None
    return PublicJwk(kid=kid, kty=kty, crv=crv if isinstance(crv, str) else None, alg=alg, key=key)


# --- JWKS fetching ----------------------------------------------------------------------------


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    """The JWKS URL is allowlisted exactly; a redirect elsewhere is not followed."""

    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


class JwksFetchError(Exception):
    """A JWK Set could not be fetched or parsed."""


def fetch_jwks(url: str, timeout: float = JWKS_FETCH_TIMEOUT_SECONDS) -> dict[str, PublicJwk]:
    """GET a JWK Set and return its usable signing keys by kid (unusable members are skipped)."""
    opener = urllib.request.build_opener(_NoRedirect)
    request = urllib.request.Request(  # noqa: S310 - jku URLs are allowlisted and checked https/loopback
        url, headers={"Accept": "application/json", "User-Agent": "cmv-cds"}
    )
    try:
        with opener.open(request, timeout=timeout) as response:
            if response.status != 200:
                raise JwksFetchError(f"HTTP {response.status}")
            body = response.read(MAX_JWKS_BYTES + 1)
    except (URLError, OSError, http.client.HTTPException) as exc:
        raise JwksFetchError(type(exc).__name__) from exc
    if len(body) > MAX_JWKS_BYTES:
        raise JwksFetchError("JWK Set too large")
    try:
        document = json.loads(body)
    except ValueError as exc:
        raise JwksFetchError("JWK Set is not JSON") from exc
    if not isinstance(document, dict) or not isinstance(document.get("keys"), list):
        raise JwksFetchError("JWK Set has no 'keys' list")
    keys: dict[str, PublicJwk] = {}
    for member in document["keys"]:
        try:
            key = parse_public_jwk(member)
        except ValueError:
            continue  # encryption keys, other key types, private material: never used
        keys.setdefault(key.kid, key)  # kids MUST be unique; on a duplicate the first wins
    return keys


class RemoteJwks:
    """The cached JWK Set of one allowlisted ``jku``.

    Fetched on first use and again once older than ``lifespan``. A kid not in the cached set causes
    one refetch, unless a fetch was attempted less than ``cooldown`` seconds ago. A failed fetch keeps
    the last good set (for up to ``JWKS_STALE_GRACE_SECONDS`` past its lifetime) and is not retried
    within the cooldown, so an unreachable JWKS host costs one timeout per cooldown, not per request.
    """

    def __init__(
        self,
        url: str,
        *,
        lifespan: float,
        cooldown: float = JWKS_REFRESH_COOLDOWN_SECONDS,
        timeout: float = JWKS_FETCH_TIMEOUT_SECONDS,
        monotonic: Callable[[], float] = time.monotonic,
        fetch: Callable[[str, float], dict[str, PublicJwk]] = fetch_jwks,
    ) -> None:
        self.url = url
        self._lifespan = lifespan
        self._cooldown = min(cooldown, lifespan)
        self._timeout = timeout
        self._monotonic = monotonic
        self._fetch = fetch
        self._lock = threading.Lock()
        self._keys: dict[str, PublicJwk] = {}
        self._fetched_at: float | None = None
        self._attempted_at: float | None = None

    def get(self, kid: str) -> PublicJwk | None:
        """The key with this kid, fetching or refreshing the set as the cache rules allow."""
        with self._lock:
            now = self._monotonic()
            if not self._fresh(now) and self._may_fetch(now):
                self._refresh(now)
            key = self._keys.get(kid) if self._usable(now) else None
            if key is None and self._may_fetch(now):
                self._refresh(now)
                key = self._keys.get(kid) if self._usable(now) else None
            return key

    def _fresh(self, now: float) -> bool:
        return self._fetched_at is not None and now - self._fetched_at < self._lifespan

    def _usable(self, now: float) -> bool:
        return self._fetched_at is not None and now - self._fetched_at < self._lifespan + JWKS_STALE_GRACE_SECONDS

    def _may_fetch(self, now: float) -> bool:
        return self._attempted_at is None or now - self._attempted_at >= self._cooldown

    def _refresh(self, now: float) -> None:
        self._attempted_at = now
        try:
            keys = self._fetch(self.url, self._timeout)
        except JwksFetchError as exc:
            log.warning("jwks fetch failed", extra={"reason": f"jwks fetch failed: {exc}"})
            return
        self._keys = keys
        self._fetched_at = now


# --- verification -----------------------------------------------------------------------------


class _Refused(Exception):
    def __init__(self, reason: str, issuer: str | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.issuer = issuer


_DECODE_REASONS: tuple[tuple[type[jwt.PyJWTError], str], ...] = (
    (jwt.ExpiredSignatureError, "token expired"),
    (jwt.ImmatureSignatureError, "token not yet valid"),
    (jwt.InvalidAudienceError, "audience mismatch"),
    (jwt.InvalidIssuerError, "issuer mismatch"),
    (jwt.InvalidSignatureError, "bad signature"),
    (jwt.InvalidAlgorithmError, "algorithm not allowed"),
    (jwt.InvalidKeyError, "key rejected"),
)


class JwtAuthenticator:
    """Verifies CDS Hooks client JWTs against the trusted issuers (see the module docstring)."""

    def __init__(
        self,
        issuers: Mapping[str, TrustedIssuer],
        replay_cache: JtiReplayCache,
        *,
        leeway_seconds: int = 30,
        max_lifetime_seconds: int = 3600,
        jwks_cache_seconds: int = 300,
        jwks_cooldown_seconds: float = JWKS_REFRESH_COOLDOWN_SECONDS,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
        fetch: Callable[[str, float], dict[str, PublicJwk]] = fetch_jwks,
    ) -> None:
        self._issuers = dict(issuers)
        self._replay = replay_cache
        self._leeway = leeway_seconds
        self._max_lifetime = max_lifetime_seconds
        self._clock = clock
        self.remote: dict[str, RemoteJwks] = {
            url: RemoteJwks(
                url,
                lifespan=jwks_cache_seconds,
                cooldown=jwks_cooldown_seconds,
                monotonic=monotonic,
                fetch=fetch,
            )
            for issuer in self._issuers.values()
            for url in sorted(issuer.jkus)
        }

    def authenticate(self, authorization_header: str | None, endpoint_url: str) -> str:
        token = bearer_token(authorization_header)
        try:
            return self._verify(token, endpoint_url)
        except _Refused as refused:
            extra = {"reason": refused.reason}
            if refused.issuer is not None:
                extra["issuer"] = refused.issuer
            log.info("authentication failed", extra=extra)
            raise Unauthorized(GENERIC_FAILURE, log_reason=refused.reason) from None

    def _verify(self, token: str, endpoint_url: str) -> str:
        if len(token) > MAX_TOKEN_CHARS:
            raise _Refused("token too large")
        try:
            unverified = jwt.decode_complete(
                token,
                options={
                    "verify_signature": False,
                    "verify_exp": False,
                    "verify_nbf": False,
                    "verify_iat": False,
                    "verify_aud": False,
                    "verify_iss": False,
                    "verify_sub": False,
                    "verify_jti": False,
                },
            )
        except (jwt.PyJWTError, ValueError, TypeError):
            raise _Refused("malformed token") from None
        header: dict[str, Any] = unverified["header"]
        claims: dict[str, Any] = unverified["payload"]

        # 1. Header, before anything else.
        alg = header.get("alg")
        if not isinstance(alg, str) or alg not in SUPPORTED_ALGORITHMS:
            raise _Refused("algorithm not allowed")
        kid = header.get("kid")
        if not isinstance(kid, str) or not kid:
            raise _Refused("missing kid")
        typ = header.get("typ")
        if typ is not None and (not isinstance(typ, str) or typ.upper() != "JWT"):
            raise _Refused("typ is not JWT")
        if "crit" in header or "b64" in header:
            raise _Refused("unsupported critical header")

        # 2. Issuer and jku allowlists: nothing is fetched for an untrusted issuer or jku.
        iss = claims.get("iss")
        issuer = self._issuers.get(iss) if isinstance(iss, str) else None
        if issuer is None:
            raise _Refused("untrusted issuer")
        if alg not in issuer.algorithms:
            raise _Refused("algorithm not allowed", issuer.iss)
        jku = header.get("jku")
        if jku is not None:
            if not isinstance(jku, str) or jku not in issuer.jkus:
                raise _Refused("untrusted jku", issuer.iss)
            # A pinned key wins: it verifies without any network call; the jku is fetched only for a kid
            # that is not pinned.
            key = issuer.static_keys.get(kid) or self.remote[jku].get(kid)
        elif issuer.static_keys:
            key = issuer.static_keys.get(kid)
        else:
            raise _Refused("no jku and no static jwks for issuer", issuer.iss)

        # 3. The key.
        if key is None:
            raise _Refused("unknown kid", issuer.iss)
        if not key.fits(alg):
            raise _Refused("key does not match alg", issuer.iss)

        # 4. Signature and claims.
        try:
            verified: dict[str, Any] = jwt.decode(
                token,
                key.key,
                algorithms=[alg],
                audience=endpoint_url,
                issuer=issuer.iss,
                leeway=self._leeway,
                options={"require": list(REQUIRED_CLAIMS), "enforce_minimum_key_length": True},
            )
        except jwt.MissingRequiredClaimError as exc:
            raise _Refused(f"missing claim {exc.claim}", issuer.iss) from None
        except jwt.PyJWTError as exc:
            reason = next((text for kind, text in _DECODE_REASONS if isinstance(exc, kind)), "invalid token")
            raise _Refused(reason, issuer.iss) from None
        except (ValueError, TypeError):
            raise _Refused("invalid token", issuer.iss) from None

        iat, exp, jti = verified["iat"], verified["exp"], verified["jti"]
        if not _is_number(iat) or not _is_number(exp):
            raise _Refused("iat or exp not a number", issuer.iss)
        if iat > self._clock() + self._leeway:
            raise _Refused("issued in the future", issuer.iss)
        if exp <= iat:
            raise _Refused("exp not after iat", issuer.iss)
        if exp - iat > self._max_lifetime:
            raise _Refused("lifetime too long", issuer.iss)
        if not isinstance(jti, str) or not jti:
            raise _Refused("jti not a non-empty string", issuer.iss)
        if issuer.tenants is not None:
            tenant = verified.get("tenant")
            if not isinstance(tenant, str) or tenant not in issuer.tenants:
                raise _Refused("tenant not allowed", issuer.iss)

        # 5. Replay, last: only tokens that are otherwise valid are recorded.
        if not self._replay.check_and_store(issuer.iss, jti, exp + self._leeway):
            raise _Refused("replayed jti", issuer.iss)
        return issuer.iss


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def build_authenticator(settings: Settings, engine: sa.Engine | None = None) -> Authenticator:
    """The authenticator for these settings.

    No trusted issuer configured: every call is refused (fail closed). Otherwise a
    ``JwtAuthenticator`` whose ``jti`` replay table lives in ``engine`` (the feedback store's engine;
    ``None`` creates one on ``CMV_CDS_DATABASE_URL``).
    """
    issuers = load_trusted_issuers(settings.trusted_issuers)
    if not issuers:
        return NoTrustedIssuers()
    replay = JtiReplayCache(engine if engine is not None else sa.create_engine(settings.database_url))
    return JwtAuthenticator(
        issuers,
        replay,
        leeway_seconds=settings.jwt_leeway_seconds,
        max_lifetime_seconds=settings.jwt_max_lifetime_seconds,
        jwks_cache_seconds=settings.jwks_cache_seconds,
    )
