"""CDS Hooks client JWT verification (service/auth.py, service/jwt_replay.py).

Real keys (EC P-384, RSA 2048) are generated here; JWK Sets are served by a loopback HTTP server
that counts requests, so "no network call" and "one refresh only" are observed, not assumed.
"""

from __future__ import annotations

import base64
import dataclasses
import importlib
import json
import logging
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jwt
import pytest
import sqlalchemy as sa
from concurrency import run_concurrently
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt_support import (
    AUDIENCE,
    ISSUER,
    FakeClock,
    JwksServer,
    claims,
    ec_p384_key,
    forge,
    hs384_with,
    jwks,
    mint,
    public_jwk,
    public_pem,
    replace_payload,
    rsa_2048_key,
    running_jwks_server,
)
from pg_cluster import PgCluster
from pg_cluster import postgres_cluster as postgres_cluster  # fixture, requested by name

from service.auth import (
    GENERIC_FAILURE,
    JwtAuthenticator,
    NoTrustedIssuers,
    build_authenticator,
    load_trusted_issuers,
)
from service.config import ConfigError, Settings
from service.errors import Unauthorized
from service.jwt_replay import JtiReplayCache, jti_key
from service.logs import JsonFormatter

JWKS_PATH = "/ehr/jwks.json"
OTHER_ISSUER = "https://other-ehr.example.net"


@pytest.fixture(scope="module")
def ec_key() -> ec.EllipticCurvePrivateKey:
    return ec_p384_key()


@pytest.fixture(scope="module")
def rsa_key() -> rsa.RSAPrivateKey:
    return rsa_2048_key()


@pytest.fixture(scope="module")
def rsa_static_key() -> rsa.RSAPrivateKey:
    return rsa_2048_key()


@pytest.fixture
def server(monkeypatch: pytest.MonkeyPatch) -> Iterator[JwksServer]:
    for name in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)
    with running_jwks_server() as running:
        yield running


@dataclasses.dataclass
class Env:
    """One trusted EHR: EC P-384 ("ec-1") and RSA ("rsa-jku") keys at a jku, RSA ("rsa-static") static."""

    server: JwksServer
    jku: str
    ec_key: ec.EllipticCurvePrivateKey
    rsa_key: rsa.RSAPrivateKey
    rsa_static_key: rsa.RSAPrivateKey
    db_path: Path

    def issuers(self, **extra: Any) -> dict[str, Any]:
        return {
            ISSUER: {
                "jku": [self.jku],
                "jwks": jwks(public_jwk(self.rsa_static_key, "rsa-static", "RS384")),
                **extra,
            },
            OTHER_ISSUER: {"jwks": jwks(public_jwk(self.rsa_static_key, "other-static"))},
        }

    def settings(self, issuers: dict[str, Any] | None = None, **overrides: Any) -> Settings:
        config = {"trusted_issuers": json.dumps(issuers or self.issuers()), **overrides}
        return Settings.load(config, environ={})

    def engine(self) -> sa.Engine:
        return sa.create_engine(f"sqlite:///{self.db_path}")

    def authenticator(self, issuers: dict[str, Any] | None = None, **overrides: Any) -> Any:
        return build_authenticator(self.settings(issuers, **overrides), self.engine())

    def es384(self, **payload: Any) -> str:
        return mint(self.ec_key, alg="ES384", kid="ec-1", jku=self.jku, payload=claims(**payload))


@pytest.fixture
def env(
    server: JwksServer,
    ec_key: ec.EllipticCurvePrivateKey,
    rsa_key: rsa.RSAPrivateKey,
    rsa_static_key: rsa.RSAPrivateKey,
    tmp_path: Path,
) -> Env:
    jku = server.serve(JWKS_PATH, jwks(public_jwk(ec_key, "ec-1", "ES384"), public_jwk(rsa_key, "rsa-jku")))
    return Env(server, jku, ec_key, rsa_key, rsa_static_key, tmp_path / "a.db")


def bearer(token: str) -> str:
    return f"Bearer {token}"


def refused(authenticator: Any, token: str | None, endpoint: str = AUDIENCE) -> None:
    with pytest.raises(Unauthorized) as info:
        authenticator.authenticate(bearer(token) if token is not None else None, endpoint)
    assert info.value.message == GENERIC_FAILURE
    assert info.value.status == 401


def header_of(token: str) -> dict[str, Any]:
    header: dict[str, Any] = json.loads(base64.urlsafe_b64decode(token.split(".")[0] + "=="))
    return header


def reasons(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [str(getattr(r, "reason", "")) for r in caplog.records if r.getMessage() == "authentication failed"]


@pytest.fixture(autouse=True)
def _auth_logs(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="cmv_cds")


# --- accepted -----------------------------------------------------------------------------------


def test_accepts_es384_via_jku(env: Env) -> None:
    env.authenticator().authenticate(bearer(env.es384()), AUDIENCE)
    assert env.server.requests[JWKS_PATH] == 1


def test_accepts_spec_example_header_shape(env: Env) -> None:
    """The spec's header is {"alg":"ES384","typ":"JWT","kid":…,"jku":…}; its payload adds tenant."""
    token = env.es384(tenant="2ddd6c3a-8e9a-44c6-a305-52111ad302a2")
    header = header_of(token)
    assert header == {"alg": "ES384", "typ": "JWT", "kid": "ec-1", "jku": env.jku}
    env.authenticator().authenticate(bearer(token), AUDIENCE)


def test_accepts_rs384_via_static_jwks_without_network(env: Env) -> None:
    token = mint(env.rsa_static_key, alg="RS384", kid="rsa-static")
    env.authenticator().authenticate(bearer(token), AUDIENCE)
    assert env.server.total_requests == 0


def test_accepts_array_aud(env: Env) -> None:
    token = env.es384(aud=["https://elsewhere.example.org/cds-services", AUDIENCE])
    env.authenticator().authenticate(bearer(token), AUDIENCE)


def test_accepts_epic_shaped_token_rs384_jku_sub_nbf(env: Env) -> None:
    """Epic: RS384, jku, sub (client id), nbf 5 min before iat, exp − iat = 900 s."""
    now = int(time.time())
    payload = claims(sub="epic-client-id", nbf=now - 300, iat=now, exp=now + 900)
    token = mint(env.rsa_key, alg="RS384", kid="rsa-jku", jku=env.jku, payload=payload)
    env.authenticator().authenticate(bearer(token), AUDIENCE)


def test_accepts_token_without_typ(env: Env) -> None:
    token = mint(env.rsa_static_key, alg="RS384", kid="rsa-static", headers={"typ": None})
    assert "typ" not in header_of(token)
    env.authenticator().authenticate(bearer(token), AUDIENCE)


def test_jwks_is_cached_between_calls_and_refetched_after_its_lifetime(env: Env, tmp_path: Path) -> None:
    clock = FakeClock()
    authenticator = JwtAuthenticator(
        load_trusted_issuers(json.dumps(env.issuers())),
        JtiReplayCache(env.engine()),
        jwks_cache_seconds=300,
        monotonic=clock,
    )
    for _ in range(5):
        authenticator.authenticate(bearer(env.es384()), AUDIENCE)
    assert env.server.requests[JWKS_PATH] == 1
    clock.advance(301)
    authenticator.authenticate(bearer(env.es384()), AUDIENCE)
    assert env.server.requests[JWKS_PATH] == 2


def test_es256_only_when_configured(env: Env) -> None:
    p256 = ec.generate_private_key(ec.SECP256R1())
    env.server.serve(JWKS_PATH, jwks(public_jwk(env.ec_key, "ec-1"), public_jwk(p256, "p256")))
    token = mint(p256, alg="ES256", kid="p256", jku=env.jku)
    refused(env.authenticator(), token)
    configured = env.issuers(algorithms=["ES256", "ES384"])
    env.authenticator(configured).authenticate(bearer(mint(p256, alg="ES256", kid="p256", jku=env.jku)), AUDIENCE)


# --- refused: algorithm attacks -----------------------------------------------------------------


@pytest.mark.parametrize("alg", ["none", "None", "NONE"])
def test_refuses_alg_none(env: Env, alg: str) -> None:
    token = forge({"alg": alg, "typ": "JWT", "kid": "ec-1", "jku": env.jku}, claims(), None)
    refused(env.authenticator(), token)
    assert env.server.total_requests == 0


@pytest.mark.parametrize("kid", ["rsa-static", "rsa-jku"])
def test_refuses_hs384_signed_with_the_public_key_pem(env: Env, kid: str) -> None:
    """Algorithm confusion: HMAC keyed with the RSA public key PEM the service holds."""
    key = env.rsa_static_key if kid == "rsa-static" else env.rsa_key
    header = {"alg": "HS384", "typ": "JWT", "kid": kid}
    if kid == "rsa-jku":
        header["jku"] = env.jku
    token = forge(header, claims(), hs384_with(public_pem(key)))
    refused(env.authenticator(), token)
    assert env.server.total_requests == 0


def test_refuses_key_of_the_wrong_type_for_alg(env: Env, caplog: pytest.LogCaptureFixture) -> None:
    """A token claiming RS384 under the EC key's kid (and ES384 under an RSA kid)."""
    token = mint(env.rsa_key, alg="RS384", kid="ec-1", jku=env.jku)
    refused(env.authenticator(), token)
    token = mint(env.ec_key, alg="ES384", kid="rsa-jku", jku=env.jku)
    refused(env.authenticator(), token)
    assert reasons(caplog) == ["key does not match alg", "key does not match alg"]


@pytest.mark.filterwarnings("ignore::jwt.warnings.InsecureKeyLengthWarning")
def test_refuses_rsa_key_shorter_than_2048_bits(env: Env) -> None:
    weak = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    issuers = {ISSUER: {"jwks": jwks(public_jwk(weak, "weak"))}}
    refused(env.authenticator(issuers), mint(weak, alg="RS384", kid="weak"))


# --- refused: claims ----------------------------------------------------------------------------


def test_refuses_wrong_aud(env: Env, caplog: pytest.LogCaptureFixture) -> None:
    authenticator = env.authenticator()
    refused(authenticator, env.es384(aud="https://cds.example.org/cds-services/other-service"))
    refused(authenticator, env.es384(), endpoint="https://cds.example.org/cds-services")
    assert reasons(caplog) == ["audience mismatch", "audience mismatch"]


def test_refuses_expired(env: Env, caplog: pytest.LogCaptureFixture) -> None:
    now = int(time.time())
    refused(env.authenticator(), env.es384(iat=now - 400, exp=now - 100))
    assert reasons(caplog) == ["token expired"]


def test_accepts_exp_within_leeway(env: Env) -> None:
    now = int(time.time())
    env.authenticator().authenticate(bearer(env.es384(iat=now - 300, exp=now - 10)), AUDIENCE)


def test_refuses_future_iat(env: Env, caplog: pytest.LogCaptureFixture) -> None:
    now = int(time.time())
    refused(env.authenticator(), env.es384(iat=now + 600, exp=now + 900))
    assert len(reasons(caplog)) == 1
    assert reasons(caplog)[0] in {"issued in the future", "token not yet valid"}


def test_refuses_future_iat_even_if_pyjwt_ignored_it(env: Env, caplog: pytest.LogCaptureFixture) -> None:
    """The service checks iat itself (older PyJWT versions only checked it was a number)."""
    service_now = time.time() - 600  # the service's own clock is 10 minutes behind PyJWT's
    authenticator = JwtAuthenticator(
        load_trusted_issuers(json.dumps(env.issuers())),
        JtiReplayCache(env.engine()),
        clock=lambda: service_now,
    )
    refused(authenticator, env.es384())
    assert reasons(caplog) == ["issued in the future"]


def test_refuses_lifetime_too_long(env: Env, caplog: pytest.LogCaptureFixture) -> None:
    now = int(time.time())
    refused(env.authenticator(), env.es384(iat=now, exp=now + 7200))
    refused(env.authenticator(jwt_max_lifetime_seconds=600), env.es384(iat=now, exp=now + 900))
    env.authenticator(jwt_max_lifetime_seconds=900).authenticate(bearer(env.es384(iat=now, exp=now + 900)), AUDIENCE)
    assert reasons(caplog) == ["lifetime too long", "lifetime too long"]


def test_refuses_exp_not_after_iat(env: Env) -> None:
    now = int(time.time())
    refused(env.authenticator(), env.es384(iat=now, exp=now))


@pytest.mark.parametrize("claim", ["iss", "aud", "exp", "iat", "jti"])
def test_refuses_missing_required_claim(env: Env, claim: str, caplog: pytest.LogCaptureFixture) -> None:
    refused(env.authenticator(), env.es384(**{claim: None}))
    expected = "untrusted issuer" if claim == "iss" else f"missing claim {claim}"
    assert reasons(caplog) == [expected]


@pytest.mark.parametrize("jti", [123, "", ["a"]])
def test_refuses_non_string_or_empty_jti(env: Env, jti: Any) -> None:
    refused(env.authenticator(), env.es384(jti=jti))


def test_refuses_tampered_payload(env: Env, caplog: pytest.LogCaptureFixture) -> None:
    token = env.es384()
    forged = claims(sub="someone-else", tenant="other-tenant")
    refused(env.authenticator(), replace_payload(token, forged))
    assert reasons(caplog) == ["bad signature"]


def test_refuses_tampered_signature(env: Env) -> None:
    token = mint(env.rsa_static_key, alg="RS384", kid="rsa-static")
    head, payload, signature = token.split(".")
    flipped = ("A" if signature[10] != "A" else "B").join([signature[:10], signature[11:]])
    refused(env.authenticator(), f"{head}.{payload}.{flipped}")


def test_refuses_signature_by_a_key_not_in_the_jwks(env: Env) -> None:
    attacker = ec_p384_key()
    refused(env.authenticator(), mint(attacker, alg="ES384", kid="ec-1", jku=env.jku))


def test_refuses_tenant_not_allowed(env: Env, caplog: pytest.LogCaptureFixture) -> None:
    authenticator = env.authenticator(env.issuers(tenants=["hospital-a"]))
    refused(authenticator, env.es384(tenant="hospital-b"))
    refused(authenticator, env.es384())  # no tenant at all
    authenticator.authenticate(bearer(env.es384(tenant="hospital-a")), AUDIENCE)
    assert reasons(caplog) == ["tenant not allowed", "tenant not allowed"]


# --- refused: header ----------------------------------------------------------------------------


def test_refuses_missing_kid(env: Env) -> None:
    refused(env.authenticator(), mint(env.ec_key, alg="ES384", kid=None, jku=env.jku))
    assert env.server.total_requests == 0


def test_refuses_typ_other_than_jwt(env: Env) -> None:
    token = mint(env.ec_key, kid="ec-1", jku=env.jku, headers={"typ": "at+jwt"})
    refused(env.authenticator(), token)


def test_refuses_crit_header(env: Env) -> None:
    token = mint(env.ec_key, kid="ec-1", jku=env.jku, headers={"crit": ["exp"], "exp": 1})
    refused(env.authenticator(), token)


@pytest.mark.parametrize("value", ["", "Bearer", "Bearer ", "Basic abc", "Bearer not-a-jwt", "Bearer a.b.c"])
def test_refuses_missing_or_malformed_bearer(env: Env, value: str) -> None:
    with pytest.raises(Unauthorized):
        env.authenticator().authenticate(value, AUDIENCE)


def test_refuses_oversized_token(env: Env) -> None:
    refused(env.authenticator(), env.es384(padding="x" * 20000))


# --- refused: trust (issuer, jku, kid) ----------------------------------------------------------


def test_refuses_untrusted_iss_before_any_network_call(env: Env, caplog: pytest.LogCaptureFixture) -> None:
    attacker = ec_p384_key()
    evil_jku = env.server.serve("/evil/jwks.json", jwks(public_jwk(attacker, "evil")))
    token = mint(attacker, kid="evil", jku=evil_jku, payload=claims(iss="https://evil.example.com"))
    refused(env.authenticator(), token)
    assert env.server.total_requests == 0
    assert reasons(caplog) == ["untrusted issuer"]


def test_refuses_untrusted_jku_before_any_network_call(env: Env, caplog: pytest.LogCaptureFixture) -> None:
    """A trusted iss with the attacker's own JWKS URL (even on the same host) is refused unfetched."""
    attacker = ec_p384_key()
    evil_jku = env.server.serve("/evil/jwks.json", jwks(public_jwk(attacker, "ec-1")))
    refused(env.authenticator(), mint(attacker, kid="ec-1", jku=evil_jku))
    refused(env.authenticator(), mint(attacker, kid="ec-1", jku=env.jku + "?x=1"))
    assert env.server.total_requests == 0
    assert reasons(caplog) == ["untrusted jku", "untrusted jku"]


def test_refuses_jku_of_another_trusted_issuer(env: Env) -> None:
    """jku allowlists are per issuer: issuer B cannot point at issuer A's JWKS."""
    token = mint(env.ec_key, kid="ec-1", jku=env.jku, payload=claims(iss=OTHER_ISSUER))
    refused(env.authenticator(), token)
    assert env.server.total_requests == 0


def test_refuses_no_jku_when_issuer_has_no_static_jwks(env: Env, caplog: pytest.LogCaptureFixture) -> None:
    issuers = {ISSUER: {"jku": [env.jku]}}
    refused(env.authenticator(issuers), mint(env.ec_key, kid="ec-1"))
    assert env.server.total_requests == 0
    assert reasons(caplog) == ["no jku and no static jwks for issuer"]


def test_unknown_kid_refreshes_at_most_once_per_cooldown(env: Env, caplog: pytest.LogCaptureFixture) -> None:
    clock = FakeClock()
    authenticator = JwtAuthenticator(
        load_trusted_issuers(json.dumps(env.issuers())), JtiReplayCache(env.engine()), monotonic=clock
    )
    authenticator.authenticate(bearer(env.es384()), AUDIENCE)  # warm the cache
    assert env.server.requests[JWKS_PATH] == 1

    rotated = ec_p384_key()
    for _ in range(10):
        refused(authenticator, mint(rotated, kid="ec-2", jku=env.jku))
    assert env.server.requests[JWKS_PATH] == 1, "the warm-up fetch started the cooldown"

    clock.advance(31)
    for _ in range(10):
        refused(authenticator, mint(rotated, kid="ec-2", jku=env.jku))
    assert env.server.requests[JWKS_PATH] == 2, "one refresh after the cooldown, not one per request"

    # The EHR rotates: the next refresh after the cooldown finds the new key.
    env.server.serve(JWKS_PATH, jwks(public_jwk(env.ec_key, "ec-1"), public_jwk(rotated, "ec-2")))
    clock.advance(31)
    authenticator.authenticate(bearer(mint(rotated, kid="ec-2", jku=env.jku)), AUDIENCE)
    authenticator.authenticate(bearer(mint(rotated, kid="ec-2", jku=env.jku)), AUDIENCE)
    assert env.server.requests[JWKS_PATH] == 3
    assert set(reasons(caplog)) == {"unknown kid"}


def test_unknown_kid_on_a_cold_cache_fetches_once(env: Env) -> None:
    authenticator = env.authenticator()
    for _ in range(5):
        refused(authenticator, mint(env.ec_key, kid="no-such-kid", jku=env.jku))
    assert env.server.requests[JWKS_PATH] == 1


def test_unreachable_jwks_is_refused_and_not_hammered(env: Env, caplog: pytest.LogCaptureFixture) -> None:
    missing = env.server.url("/gone.json")
    issuers = {ISSUER: {"jku": [missing]}}
    authenticator = env.authenticator(issuers)
    for _ in range(5):
        refused(authenticator, mint(env.ec_key, kid="ec-1", jku=missing))
    assert env.server.requests["/gone.json"] == 1
    assert "unknown kid" in reasons(caplog)


def test_stale_jwks_is_used_while_the_jku_is_down(env: Env) -> None:
    clock = FakeClock()
    authenticator = JwtAuthenticator(
        load_trusted_issuers(json.dumps(env.issuers())), JtiReplayCache(env.engine()), monotonic=clock
    )
    authenticator.authenticate(bearer(env.es384()), AUDIENCE)
    del env.server.documents[JWKS_PATH]  # the EHR's JWKS endpoint now answers 404
    clock.advance(301)
    authenticator.authenticate(bearer(env.es384()), AUDIENCE)
    assert env.server.requests[JWKS_PATH] == 2


def test_no_trusted_issuers_fails_closed(env: Env) -> None:
    authenticator = build_authenticator(Settings.load({}, environ={}), env.engine())
    assert isinstance(authenticator, NoTrustedIssuers)
    refused(authenticator, env.es384())
    assert env.server.total_requests == 0


# --- replay -------------------------------------------------------------------------------------


def test_refuses_replayed_jti_and_accepts_a_new_one(env: Env, caplog: pytest.LogCaptureFixture) -> None:
    authenticator = env.authenticator()
    token = env.es384()
    authenticator.authenticate(bearer(token), AUDIENCE)
    refused(authenticator, token)
    authenticator.authenticate(bearer(env.es384()), AUDIENCE)  # a different jti
    assert reasons(caplog) == ["replayed jti"]


def test_replay_is_refused_by_another_worker_sharing_the_database(env: Env) -> None:
    worker_a, worker_b = env.authenticator(), env.authenticator()
    token = env.es384()
    worker_a.authenticate(bearer(token), AUDIENCE)
    refused(worker_b, token)


def test_same_jti_from_two_issuers_is_not_a_replay(env: Env) -> None:
    authenticator = env.authenticator()
    jti = str(uuid.uuid4())
    authenticator.authenticate(bearer(env.es384(jti=jti)), AUDIENCE)
    token = mint(env.rsa_static_key, alg="RS384", kid="other-static", payload=claims(iss=OTHER_ISSUER, jti=jti))
    authenticator.authenticate(bearer(token), AUDIENCE)


def test_replay_cache_stores_only_a_hash(tmp_path: Path) -> None:
    engine = sa.create_engine(f"sqlite:///{tmp_path / 'r.db'}")
    cache = JtiReplayCache(engine)
    now = time.time()
    assert cache.check_and_store(ISSUER, "the-jti", now + 60)
    assert not cache.check_and_store(ISSUER, "the-jti", now + 60)
    assert cache.check_and_store(OTHER_ISSUER, "the-jti", now + 60)
    with engine.connect() as conn:
        rows = conn.execute(sa.text("SELECT jti_hash, expires_at FROM jwt_replay")).all()
    assert {row[0] for row in rows} == {jti_key(ISSUER, "the-jti"), jti_key(OTHER_ISSUER, "the-jti")}
    assert all("the-jti" not in row[0] and len(row[0]) == 64 for row in rows)
    JtiReplayCache(engine)  # creating the table again is harmless


def test_replay_cache_purges_expired_rows_and_reclaims_expired_ids(tmp_path: Path) -> None:
    engine = sa.create_engine(f"sqlite:///{tmp_path / 'r.db'}")
    now = [1_000_000.0]
    cache = JtiReplayCache(engine, purge_every=3, clock=lambda: now[0])
    assert cache.check_and_store(ISSUER, "a", now[0] + 10)
    assert cache.check_and_store(ISSUER, "b", now[0] + 1000)
    now[0] += 100  # "a" has expired, "b" has not
    assert cache.check_and_store(ISSUER, "a", now[0] + 10), "an expired id can be claimed again"
    assert not cache.check_and_store(ISSUER, "b", now[0] + 10)
    now[0] += 100
    assert cache.purge() == 1  # "a" again
    with engine.connect() as conn:
        assert conn.execute(sa.text("SELECT count(*) FROM jwt_replay")).scalar_one() == 1


def replay_engine(backend: str, url: str) -> sa.Engine:
    if backend == "sqlite-feedback-store":  # the engine the app will pass in: WAL, SQLAlchemy-managed BEGIN
        try:
            store = importlib.import_module("service.store").FeedbackStore(url)
        except ImportError as exc:
            pytest.skip(f"service.store is not importable: {exc}")
        engine: sa.Engine = store.engine
        return engine
    return sa.create_engine(url)


@pytest.mark.parametrize(
    "backend", ["sqlite", "sqlite-feedback-store", pytest.param("postgres", marks=pytest.mark.postgres)]
)
def test_replay_claim_is_atomic_across_workers(backend: str, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    """Six "workers" (own engine each) create the table and claim the same jti at once: one wins."""
    if backend == "postgres":
        cluster: PgCluster = request.getfixturevalue("postgres_cluster")
        url = cluster.create_database()
    else:
        url = f"sqlite:///{tmp_path / 'replay.db'}"
    engines = [replay_engine(backend, url) for _ in range(6)]
    claim = threading.Barrier(len(engines))  # a second start line: every table made, then all claim at once
    outcomes: list[bool] = []
    exp = time.time() + 300

    def worker(engine: sa.Engine) -> Callable[[], None]:
        def work() -> None:
            cache = JtiReplayCache(engine)
            claim.wait(timeout=10)
            outcomes.append(cache.check_and_store(ISSUER, "same-jti", exp))
            outcomes.append(cache.check_and_store(ISSUER, f"own-{uuid.uuid4()}", exp))

        return work

    errors = run_concurrently([worker(engine) for engine in engines])
    for engine in engines:
        engine.dispose()
    assert errors == []
    assert sorted(outcomes) == [False] * 5 + [True] * 7


# --- configuration ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("{not json", "not valid JSON"),
        ("[]", "JSON object"),
        ("{}", "JSON object"),
        ('{"https://ehr": {}}', "needs 'jku'"),
        ('{"https://ehr": []}', "must be an object"),
        ('{"https://ehr": {"jku": "https://ehr/jwks"}}', "list of non-empty strings"),
        ('{"https://ehr": {"jku": []}}', "must not be empty"),
        ('{"https://ehr": {"jku": ["http://ehr.example.org/jwks"]}}', "must be https"),
        ('{"https://ehr": {"jku": ["file:///etc/passwd"]}}', "absolute URL"),
        ('{"https://ehr": {"jku": ["https://ehr/jwks"], "algorithms": ["HS384"]}}', "forbidden"),
        ('{"https://ehr": {"jku": ["https://ehr/jwks"], "algorithms": ["HS256", "RS384"]}}', "forbidden"),
        ('{"https://ehr": {"jku": ["https://ehr/jwks"], "algorithms": ["none"]}}', "forbidden"),
        ('{"https://ehr": {"jku": ["https://ehr/jwks"], "algorithms": ["XS999"]}}', "unsupported algorithm"),
        ('{"https://ehr": {"jku": ["https://ehr/jwks"], "algorithms": []}}', "must not be empty"),
        ('{"https://ehr": {"jku": ["https://ehr/jwks"], "tenants": []}}', "must not be empty"),
        ('{"https://ehr": {"jku": ["https://ehr/jwks"], "jwks_uri": "x"}}', "unknown field"),
        ('{"https://ehr": {"jwks": {"keys": []}}}', "non-empty 'keys'"),
        ('{"https://ehr": {"jwks": {"keys": [{"kty": "oct", "kid": "k", "k": "c2VjcmV0"}]}}}', "private or"),
        ('{"https://ehr": {"jwks": {"keys": [{"kty": "EC", "crv": "P-384"}]}}}', "needs a 'kid'"),
        (
            '{"https://ehr": {"jwks": {"keys": [{"kty": "EC", "kid": "k", "crv": "P-384"}]}}}',
            "not a valid EC",
        ),
        ("/no/such/trusted-issuers.json", "cannot be read"),
    ],
)
def test_bad_trusted_issuers_is_a_config_error(value: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        Settings.load({"trusted_issuers": value}, environ={})


def test_private_key_in_static_jwks_is_a_config_error(rsa_key: rsa.RSAPrivateKey) -> None:
    from jwt.algorithms import RSAAlgorithm

    private = RSAAlgorithm.to_jwk(rsa_key, as_dict=True) | {"kid": "k"}
    with pytest.raises(ConfigError, match="private"):
        Settings.load({"trusted_issuers": json.dumps({ISSUER: {"jwks": jwks(private)}})}, environ={})


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("jwt_leeway_seconds", -1),
        ("jwt_leeway_seconds", 301),
        ("jwt_max_lifetime_seconds", 0),
        ("jwks_cache_seconds", 0),
    ],
)
def test_bad_jwt_numbers_are_config_errors(name: str, value: int) -> None:
    with pytest.raises(ConfigError):
        Settings.load({name: value}, environ={})


def test_settings_defaults() -> None:
    settings = Settings.load({}, environ={})
    assert settings.trusted_issuers == ""
    assert settings.jwt_leeway_seconds == 30
    assert settings.jwt_max_lifetime_seconds == 3600
    assert settings.jwks_cache_seconds == 300


def test_trusted_issuers_from_a_file_and_from_the_environment(env: Env, tmp_path: Path) -> None:
    path = tmp_path / "issuers.json"
    path.write_text(json.dumps(env.issuers()), encoding="utf-8")
    settings = Settings.load(environ={"CMV_CDS_TRUSTED_ISSUERS": str(path), "CMV_CDS_JWT_LEEWAY_SECONDS": "5"})
    assert settings.jwt_leeway_seconds == 5
    build_authenticator(settings, env.engine()).authenticate(bearer(env.es384()), AUDIENCE)


def test_default_algorithms_are_es384_and_rs384(env: Env) -> None:
    issuer = load_trusted_issuers(json.dumps(env.issuers()))[ISSUER]
    assert issuer.algorithms == {"ES384", "RS384"}


# --- logging ------------------------------------------------------------------------------------


def test_log_records_the_reason_but_never_the_token(env: Env, caplog: pytest.LogCaptureFixture) -> None:
    authenticator = env.authenticator()
    secret_tenant = "tenant-" + uuid.uuid4().hex
    good = env.es384(tenant=secret_tenant)
    authenticator.authenticate(bearer(good), AUDIENCE)
    refused(authenticator, good)  # replay
    expired = env.es384(iat=int(time.time()) - 900, exp=int(time.time()) - 600, tenant=secret_tenant)
    refused(authenticator, expired)
    untrusted = mint(env.ec_key, kid="ec-1", jku=env.jku, payload=claims(iss="https://evil.example.com"))
    refused(authenticator, untrusted)

    assert reasons(caplog) == ["replayed jti", "token expired", "untrusted issuer"]
    formatter = JsonFormatter()
    forbidden = [good, expired, untrusted, secret_tenant, "https://evil.example.com"]
    forbidden += [part for token in (good, expired, untrusted) for part in token.split(".")]
    forbidden += [claims_of(good)["jti"], claims_of(expired)["jti"]]
    for record in caplog.records:
        rendered = formatter.format(record) + repr(record.__dict__)
        for secret in forbidden:
            assert secret not in rendered
    trusted = [getattr(r, "issuer", None) for r in caplog.records if getattr(r, "reason", "") == "token expired"]
    assert trusted == [ISSUER], "a configured issuer may be logged (once logs.py allowlists 'issuer')"


def claims_of(token: str) -> dict[str, Any]:
    payload: dict[str, Any] = jwt.decode(token, options={"verify_signature": False})
    return payload


# --- through HTTP (Flask test client) -----------------------------------------------------------


@pytest.fixture
def create_app() -> Callable[..., Any]:
    try:
        factory: Callable[..., Any] = importlib.import_module("service.app").create_app
    except ImportError as exc:  # service.app's own imports are still being finished elsewhere
        pytest.skip(f"service.app.create_app is not importable yet: {exc}")
    return factory


@pytest.fixture
def app_config(env: Env, tmp_path: Path) -> dict[str, Any]:
    return {
        "require_auth": True,
        "trusted_issuers": json.dumps(env.issuers()),
        "database_url": f"sqlite:///{tmp_path / 'app.db'}",
    }


LOCAL_DISCOVERY = "http://localhost/cds-services"


def assert_generic_401(response: Any) -> None:
    assert response.status_code == 401
    assert response.headers["WWW-Authenticate"].startswith("Bearer")
    assert response.mimetype == "application/json"
    body = response.get_json()
    assert body["resourceType"] == "OperationOutcome"
    assert body["issue"][0]["code"] == "login"
    assert body["issue"][0]["diagnostics"] == GENERIC_FAILURE


def test_http_discovery_without_token_is_401(create_app: Callable[..., Any], app_config: dict[str, Any]) -> None:
    client = create_app(app_config).test_client()
    assert_generic_401(client.get("/cds-services"))


def test_http_discovery_with_valid_token_is_200(
    create_app: Callable[..., Any], app_config: dict[str, Any], env: Env
) -> None:
    client = create_app(app_config).test_client()
    response = client.get("/cds-services", headers={"Authorization": bearer(env.es384(aud=LOCAL_DISCOVERY))})
    assert response.status_code == 200
    assert "services" in response.get_json()


@pytest.mark.postgres
def test_replay_database_outage_is_a_503_not_a_500(
    create_app: Callable[..., Any], env: Env, postgres_cluster: PgCluster
) -> None:
    """Every accepted token is claimed in the replay table. When PostgreSQL refuses connections the
    service cannot know whether a token is replayed: a 503 ``transient`` (retry), neither a 500 nor a
    401 that would blame the client's token; and it recovers by itself when the database is back."""
    url = postgres_cluster.create_database()
    app = create_app({"require_auth": True, "trusted_issuers": json.dumps(env.issuers()), "database_url": url})
    client = app.test_client()
    try:
        assert (
            client.get("/cds-services", headers={"Authorization": bearer(env.es384(aud=LOCAL_DISCOVERY))}).status_code
            == 200
        )
        with postgres_cluster.outage(url.rsplit("/", 1)[1]):
            response = client.get("/cds-services", headers={"Authorization": bearer(env.es384(aud=LOCAL_DISCOVERY))})
            assert response.status_code == 503
            assert response.mimetype == "application/json"
            issue = response.get_json()["issue"][0]
            assert issue["code"] == "transient"
            assert "database is unavailable" in issue["diagnostics"]
        assert (
            client.get("/cds-services", headers={"Authorization": bearer(env.es384(aud=LOCAL_DISCOVERY))}).status_code
            == 200
        )
    finally:
        app.extensions["cmv_cds"]["store"].dispose()


def test_http_failures_all_look_the_same(create_app: Callable[..., Any], app_config: dict[str, Any], env: Env) -> None:
    client = create_app(app_config).test_client()
    now = int(time.time())
    valid = env.es384(aud=LOCAL_DISCOVERY)
    assert client.get("/cds-services", headers={"Authorization": bearer(valid)}).status_code == 200
    bad_tokens = [
        valid,  # replayed
        env.es384(aud=AUDIENCE),  # wrong aud
        env.es384(aud=LOCAL_DISCOVERY, iat=now - 900, exp=now - 600),  # expired
        forge({"alg": "none", "typ": "JWT", "kid": "ec-1"}, claims(aud=LOCAL_DISCOVERY), None),
        "garbage",
    ]
    bodies = set()
    for token in bad_tokens:
        response = client.get("/cds-services", headers={"Authorization": bearer(token)})
        assert_generic_401(response)
        bodies.add(response.get_data())
    assert len(bodies) == 1, "the 401 body must not reveal which check failed"


def test_http_aud_is_the_public_base_url_behind_a_proxy(
    create_app: Callable[..., Any], app_config: dict[str, Any], env: Env
) -> None:
    client = create_app({**app_config, "public_base_url": "https://cds.example.org"}).test_client()
    local = env.es384(aud=LOCAL_DISCOVERY)
    assert_generic_401(client.get("/cds-services", headers={"Authorization": bearer(local)}))
    public = env.es384(aud="https://cds.example.org/cds-services")
    assert client.get("/cds-services", headers={"Authorization": bearer(public)}).status_code == 200


def test_http_no_trusted_issuers_refuses_everything(
    create_app: Callable[..., Any], app_config: dict[str, Any], env: Env
) -> None:
    client = create_app({**app_config, "trusted_issuers": ""}).test_client()
    response = client.get("/cds-services", headers={"Authorization": bearer(env.es384(aud=LOCAL_DISCOVERY))})
    assert_generic_401(response)


# --- what the log says about auth (operator's view) ---------------------------------------------


STARTUP_WARNING = "AUTHENTICATION ON WITH NO TRUSTED ISSUERS"


def _startup_warnings(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.levelno == logging.WARNING and r.getMessage().startswith(STARTUP_WARNING)]


@pytest.mark.parametrize(
    ("overrides", "warned"),
    [({"trusted_issuers": ""}, True), ({}, False), ({"trusted_issuers": "", "require_auth": False}, False)],
    ids=["auth-on-no-issuers", "auth-on-with-issuers", "auth-off"],
)
def test_start_up_warns_when_auth_is_on_with_no_trusted_issuers(
    create_app: Callable[..., Any],
    app_config: dict[str, Any],
    caplog: pytest.LogCaptureFixture,
    overrides: dict[str, Any],
    warned: bool,
) -> None:
    app = create_app({**app_config, **overrides})
    try:
        warnings = _startup_warnings(caplog)
        assert len(warnings) == (1 if warned else 0)
        if warned:
            assert getattr(warnings[0], "setting", None) == "CMV_CDS_TRUSTED_ISSUERS"
            line = JsonFormatter().format(warnings[0])
            assert "every call that needs a client JWT is refused (401)" in line
    finally:
        app.extensions["cmv_cds"]["store"].dispose()


def _refusals(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.getMessage() == "request refused"]


def test_each_refusal_logs_its_request_and_a_meaningful_reason(
    create_app: Callable[..., Any], app_config: dict[str, Any], env: Env, caplog: pytest.LogCaptureFixture
) -> None:
    """One "request refused" line per refusal, with the request id and route, and a reason an operator can
    act on: the authentication failure itself, never "Unauthorized at body"."""
    now = int(time.time())
    client = create_app(app_config).test_client()
    expired = env.es384(aud=LOCAL_DISCOVERY, iat=now - 900, exp=now - 600)
    calls = [
        ({}, "authentication failed: missing bearer token"),
        ({"Authorization": bearer(expired)}, "authentication failed: token expired"),
        ({"Authorization": bearer(env.es384(aud=AUDIENCE))}, "authentication failed: audience mismatch"),
    ]
    for number, (headers, reason) in enumerate(calls):
        caplog.clear()
        response = client.get("/cds-services", headers={**headers, "X-Request-ID": f"req-{number}"})
        assert_generic_401(response)
        (refusal,) = _refusals(caplog)
        line = json.loads(JsonFormatter().format(refusal))
        assert {key: line[key] for key in ("request_id", "method", "path", "status", "reason")} == {
            "request_id": f"req-{number}",
            "method": "GET",
            "path": "/cds-services",
            "status": 401,
            "reason": reason,
        }
        assert "Unauthorized" not in line["reason"]


def test_no_trusted_issuers_refusal_says_which_setting(
    create_app: Callable[..., Any], app_config: dict[str, Any], env: Env, caplog: pytest.LogCaptureFixture
) -> None:
    client = create_app({**app_config, "trusted_issuers": ""}).test_client()
    caplog.clear()
    assert_generic_401(client.get("/cds-services", headers={"Authorization": bearer(env.es384(aud=LOCAL_DISCOVERY))}))
    (refusal,) = _refusals(caplog)
    assert getattr(refusal, "reason", "") == (
        "authentication failed: no trusted issuers configured (CMV_CDS_TRUSTED_ISSUERS is empty), "
        "so no token can be verified"
    )
    (failure,) = [r for r in caplog.records if r.getMessage() == "authentication failed"]
    assert failure.levelno == logging.INFO  # the start-up warning is the loud one, not every request
    assert getattr(failure, "setting", None) == "CMV_CDS_TRUSTED_ISSUERS"


def test_other_refusals_name_what_and_where(
    create_app: Callable[..., Any], app_config: dict[str, Any], caplog: pytest.LogCaptureFixture
) -> None:
    client = create_app({**app_config, "require_auth": False}).test_client()
    cases = [
        (client.post("/cds-services/cmv-antiviral-order-select", json={"hook": "x"}), "invalid request at "),
        (client.post("/cds-services/nope", json={}), "not found at id"),
        (client.post("/cds-services/cmv-antiviral-order-select", data="x"), "request body not declared as JSON"),
    ]
    reasons_logged = [str(getattr(r, "reason", "")) for r in _refusals(caplog)]
    assert len(reasons_logged) == len(cases)
    for (response, reason), logged in zip(cases, reasons_logged, strict=True):
        assert response.status_code in (400, 404, 415)
        assert logged.startswith(reason), logged
