"""Scale-out: two replicas of the service (each `cmv-cds serve`, as two Kubernetes pods) behind one public URL, on
one PostgreSQL (tests/pg_cluster.py). Everything they must agree on lives in the database: a client JWT used on
one replica is a replay on the other, and feedback sent to either is counted once in the report of either.
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest
from fhir_fixtures import load, order_select, patient_resources, prefetch_for
from jwt_support import ISSUER, claims, ec_p384_key, jwks, mint, public_jwk
from pg_cluster import PgCluster
from pg_cluster import postgres_cluster as postgres_cluster  # fixture, requested by name
from service_process import Service, running_service, service_env, wait_until

from service import cli

pytestmark = [pytest.mark.postgres, pytest.mark.faults]

PUBLIC = "https://cds.example.org"  # the load balancer's URL: the JWT audience on both replicas
SELECT = "/cds-services/cmv-antiviral-order-select"
FEEDBACK = SELECT + "/feedback"
REPORT = "/cds-services/report"
KEY = ec_p384_key()


def bearer(path: str) -> dict[str, str]:
    return {"Authorization": "Bearer " + mint(KEY, kid="k1", payload=claims(aud=PUBLIC + path))}


@pytest.fixture(scope="module")
def replicas(
    postgres_cluster: PgCluster, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Service, Service]]:
    tmp_path = tmp_path_factory.mktemp("replicas")
    url = postgres_cluster.create_database()
    assert cli.main(["migrate", "--database-url", url, "--wait", "0"]) == 0  # the deployment's Job
    settings = {
        "require_auth": "true",
        "trusted_issuers": json.dumps({ISSUER: {"jwks": jwks(public_jwk(KEY, "k1"))}}),
        "public_base_url": PUBLIC,
        "database_url": url,
    }
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    env_a = service_env(tmp_path / "a", **settings)
    env_b = service_env(tmp_path / "b", **settings)
    with (
        running_service(env_a, tmp_path / "a.log", workers=1) as a,
        running_service(env_b, tmp_path / "b.log", workers=1) as b,
    ):
        wait_until(lambda: a.request("GET", "/readyz")[0] == b.request("GET", "/readyz")[0] == 200, 20, "both ready")
        yield a, b


def test_a_token_used_on_one_replica_is_a_replay_on_the_other(replicas: tuple[Service, Service]) -> None:
    a, b = replicas
    body = order_select([load("draft-ganciclovir.json")], prefetch=prefetch_for(patient_resources()))
    headers = bearer(SELECT)
    assert a.request("POST", SELECT, body, headers)[0] == 200
    status, answer = b.request("POST", SELECT, body, headers)
    assert status == 401
    assert answer["issue"][0]["code"] == "login"
    assert '"reason":"replayed jti"' in b.log()
    assert b.request("POST", SELECT, body, bearer(SELECT))[0] == 200, "a fresh token is accepted there"


def test_feedback_sent_to_either_replica_is_counted_once(replicas: tuple[Service, Service]) -> None:
    a, b = replicas
    body = order_select([load("draft-ganciclovir.json")], prefetch=prefetch_for(patient_resources()))
    status, answer = a.request("POST", SELECT, body, bearer(SELECT))
    assert status == 200
    card = answer["cards"][0]
    item = {"card": card["uuid"], "outcome": "overridden", "outcomeTimestamp": "2026-03-01T10:15:30Z"}
    item["overrideReason"] = {"reason": {"code": "patient-refused", "system": "http://example.org/reasons"}}

    # The same item to both replicas (an EHR retrying through the load balancer), the card issued by replica a.
    first = b.request("POST", FEEDBACK, {"feedback": [item]}, bearer(FEEDBACK))
    second = a.request("POST", FEEDBACK, {"feedback": [item]}, bearer(FEEDBACK))
    assert first == (200, {"stored": 1, "unknownCards": 0}), "replica b knows the card replica a issued"
    assert second == (200, {"stored": 0, "unknownCards": 0})

    rule_id = card["source"]["topic"]["code"]
    for replica in (a, b):
        status, report = replica.request("GET", REPORT, headers=bearer(REPORT))
        assert status == 200
        [rule] = [r for r in report["rules"] if r["ruleId"] == rule_id]
        assert rule["shown"] >= 1
        assert rule["overridden"] == 1
        assert report["totals"]["unknownCardFeedback"] == 0
