"""Trusting real CDS clients: pinned keys verify whatever ``jku`` the token names, tried with the CDS Hooks
sandbox's own published key and header; and each trusted issuer's client profile shapes its answers.

The sandbox signs every call with the EC P-384 key published in its repository (github.com/cds-hooks/sandbox,
``keys/jwk-keypair.json``: kid ``44823f3d-0b01-4a6c-a80e-b9d3e8a7226f``, ES384, private part included because
"the private key is exposed on the repository as it is an open source client-side project") and the header
``{"alg": "ES384", "typ": "JWT", "kid": ..., "jku": "https://sandbox.cds-hooks.org/.well-known/jwks.json"}``
(``src/retrieve-data-helpers/jwt-generator.js``), with ``iss`` ``https://sandbox.cds-hooks.org``.
"""

from __future__ import annotations

import json
import time
import uuid
from pathlib import Path
from typing import Any

import jwt
import pytest
import sqlalchemy as sa
from cryptography.hazmat.primitives.asymmetric import ec
from fhir_fixtures import load, order_select, patient_resources, prefetch_for
from jwt.algorithms import ECAlgorithm

from service.app import create_app
from service.auth import JwtAuthenticator, PublicJwk, load_trusted_issuers, parse_public_jwk
from service.config import ConfigError, Settings
from service.errors import Unauthorized
from service.jwt_replay import JtiReplayCache

# keys/jwk-keypair.json of github.com/cds-hooks/sandbox, verbatim.
SANDBOX_KEYPAIR = {
    "kty": "EC",
    "d": "yOcYl9QzMKnBFUiPZKBijDV_lsEtn6oWFVOqtFyXbY_-V63WCBYYdxsLo9Pclr84",
    "use": "sig",
    "crv": "P-384",
    "kid": "44823f3d-0b01-4a6c-a80e-b9d3e8a7226f",
    "x": "dw_JGR8nB2I6XveNxUOl2qk699ZPLM2nYI5STSdiEl9avAkrm3CkfYMbrrjr8laB",
    "y": "Sm3mLE-n1zYNla_aiE3cb3nZsL51RbC7ysw3q8aJLxGm-hx79RPMYpITDjp7kgzy",
    "alg": "ES384",
}
SANDBOX_PUBLIC = {k: v for k, v in SANDBOX_KEYPAIR.items() if k != "d"}
SANDBOX_ISS = "https://sandbox.cds-hooks.org"
SANDBOX_JKU = "https://sandbox.cds-hooks.org/.well-known/jwks.json"
ENDPOINT = "https://cds.example.org/cds-services/cmv-antiviral-order-select"


def private_key(keypair: dict[str, Any]) -> ec.EllipticCurvePrivateKey:
    key = ECAlgorithm.from_jwk(keypair)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    return key


def sandbox_token(audience: str = ENDPOINT, kid: str = SANDBOX_KEYPAIR["kid"], jku: str = SANDBOX_JKU) -> str:
    """A token exactly as the sandbox's jwt-generator.js makes one (payload: iss, aud, exp, iat, jti)."""
    now = int(time.time())
    payload = {"iss": SANDBOX_ISS, "aud": audience, "exp": now + 300, "iat": now, "jti": str(uuid.uuid4())}
    header = {"alg": "ES384", "typ": "JWT", "kid": kid, "jku": jku}
    return jwt.encode(payload, private_key(SANDBOX_KEYPAIR), algorithm="ES384", headers=header)


class Fetches:
    """A jku fetcher that counts its calls (and has nothing to offer)."""

    def __init__(self) -> None:
        self.urls: list[str] = []

    def __call__(self, url: str, timeout: float) -> dict[str, PublicJwk]:
        self.urls.append(url)
        return {}


def authenticator(tmp_path: Path, issuer: dict[str, Any], fetch: Fetches) -> JwtAuthenticator:
    engine = sa.create_engine(f"sqlite:///{tmp_path / 'jti.sqlite3'}")
    return JwtAuthenticator(
        load_trusted_issuers(json.dumps({SANDBOX_ISS: issuer})), JtiReplayCache(engine), fetch=fetch
    )


def test_pinned_sandbox_key_verifies_its_token_despite_the_jku_without_any_fetch(tmp_path: Path) -> None:
    fetch = Fetches()
    auth = authenticator(tmp_path, {"jku": [SANDBOX_JKU], "jwks": {"keys": [SANDBOX_PUBLIC]}}, fetch)
    assert auth.authenticate(f"Bearer {sandbox_token()}", ENDPOINT) == SANDBOX_ISS
    assert fetch.urls == []


def test_a_kid_that_is_not_pinned_is_looked_up_at_the_jku(tmp_path: Path) -> None:
    fetch = Fetches()
    auth = authenticator(tmp_path, {"jku": [SANDBOX_JKU], "jwks": {"keys": [SANDBOX_PUBLIC]}}, fetch)
    with pytest.raises(Unauthorized):
        auth.authenticate(f"Bearer {sandbox_token(kid='rotated-key')}", ENDPOINT)
    assert fetch.urls == [SANDBOX_JKU]


@pytest.mark.parametrize(
    "issuer",
    [
        {"jku": ["https://sandbox.cds-hooks.org/other/jwks.json"], "jwks": {"keys": [SANDBOX_PUBLIC]}},
        {"jwks": {"keys": [SANDBOX_PUBLIC]}},  # pinned, but the jku the token names is on no list
    ],
)
def test_the_jku_must_still_be_on_the_issuers_list(tmp_path: Path, issuer: dict[str, Any]) -> None:
    fetch = Fetches()
    with pytest.raises(Unauthorized):
        authenticator(tmp_path, issuer, fetch).authenticate(f"Bearer {sandbox_token()}", ENDPOINT)
    assert fetch.urls == []


def test_the_published_key_is_a_valid_p384_signing_key() -> None:
    key = parse_public_jwk(SANDBOX_PUBLIC)
    assert (key.kty, key.crv, key.alg) == ("EC", "P-384", "ES384")


# --- the issuer's client profile -----------------------------------------------------------------------


EPIC_ISS = "https://ehr.example.org/api/FHIR/R4"
EPIC_KEYPAIR = {**SANDBOX_KEYPAIR, "kid": "epic-test-key"}  # a second issuer; the key material does not matter


def sign(keypair: dict[str, Any], iss: str, audience: str) -> str:
    now = int(time.time())
    payload = {"iss": iss, "aud": audience, "exp": now + 300, "iat": now, "jti": str(uuid.uuid4()), "sub": "client"}
    headers = {"typ": "JWT", "kid": keypair["kid"]}
    return jwt.encode(payload, private_key(keypair), algorithm="ES384", headers=headers)


@pytest.fixture
def trusting_app(tmp_path: Path) -> Any:
    issuers = {
        SANDBOX_ISS: {"jku": [SANDBOX_JKU], "jwks": {"keys": [SANDBOX_PUBLIC]}},
        EPIC_ISS: {
            "jwks": {"keys": [{k: v for k, v in EPIC_KEYPAIR.items() if k != "d"}]},
            "profile": "epic",
            "preferenceListItems": {"Foscarnet": "FOSCARNET-PREF-1"},
        },
    }
    app = create_app(
        {
            "require_auth": True,
            "trusted_issuers": json.dumps(issuers),
            "database_url": f"sqlite:///{tmp_path / 'app.sqlite3'}",
            "public_base_url": "https://cds.example.org",
        }
    )
    yield app
    app.extensions["cmv_cds"]["store"].dispose()


def test_each_issuer_gets_its_own_profile(trusting_app: Any) -> None:
    """The sandbox (no profile: cds-hooks-2.0) gets the update; the Epic issuer (profile epic) gets Epic's shape."""
    client = trusting_app.test_client()
    body = order_select([load("draft-ganciclovir.json")], prefetch=prefetch_for(patient_resources()))
    answers = {}
    for name, token in (
        ("sandbox", sandbox_token()),
        ("epic", sign(EPIC_KEYPAIR, EPIC_ISS, ENDPOINT)),
    ):
        response = client.post(
            "/cds-services/cmv-antiviral-order-select", json=body, headers={"Authorization": f"Bearer {token}"}
        )
        assert response.status_code == 200, response.get_json()
        answers[name] = response.get_json()["cards"][0]
    assert answers["sandbox"]["source"]["topic"]["code"] == "dose-adjust"
    assert answers["sandbox"]["suggestions"][0]["actions"][0]["type"] == "update"
    assert answers["epic"]["source"]["topic"]["code"] == "CmvDoseAdjust"
    assert answers["epic"]["suggestions"][0]["actions"][0]["type"] == "delete"


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ({"profile": "cerner"}, "'profile' must be one of"),
        ({"profile": "epic", "preferenceListItems": ["foscarnet"]}, "preferenceListItems"),
        ({"preferenceListItems": {"foscarnet": ""}}, "preferenceListItems"),
    ],
)
def test_bad_issuer_profile_settings_fail_at_start(entry: dict[str, Any], message: str) -> None:
    issuers = {SANDBOX_ISS: {"jwks": {"keys": [SANDBOX_PUBLIC]}, **entry}}
    with pytest.raises(ConfigError, match=message):
        Settings.load({"trusted_issuers": json.dumps(issuers)}, environ={})


@pytest.mark.parametrize(
    ("setting", "value"),
    [
        ("client_profile", "Epic"),
        ("preference_list_items", "not json"),
        ("preference_list_items", '{"foscarnet": 5}'),
    ],
)
def test_bad_profile_settings_fail_at_start(setting: str, value: str) -> None:
    with pytest.raises(ConfigError):
        Settings.load({setting: value}, environ={})
