"""Feedback as Epic sends it: ``overrideReasons`` (one object) with a reason Coding, or with Epic's extension
keys naming a reason built in Epic (fhir.epic.com, CDS Hooks Tutorial, "Feedback"). Both are stored as the
spec's ``overrideReason`` and counted by the governance report, next to the spec's own form.
"""

from __future__ import annotations

from typing import Any

import pytest
from fhir_fixtures import load, order_select, patient_resources, prefetch_for
from flask.testing import FlaskClient

from service.feedback import EPIC_BUILT_IN_REASON_SYSTEM, read_feedback

SERVICE = "cmv-antiviral-order-select"

# The three feedback messages of Epic's tutorial, verbatim (its card id "123456" was never issued here).
EPIC_OVERRIDDEN_WITH_REASON: dict[str, Any] = {
    "card": "123456",
    "outcome": "overridden",
    "outcomeTimestamp": "2022-05-19T19:44:04Z",
    "overrideReasons": {
        "reason": {
            "code": "contraindicated",
            "display": "bad",
            "system": "http: //example.org/cds-services/fhir/CodeSystem/override-reasons",
        },
        "userComment": "User Entered Free Text",
    },
}
EPIC_OVERRIDDEN_WITH_EXTENSION: dict[str, Any] = {
    "card": "123456",
    "outcome": "overridden",
    "outcomeTimestamp": "2022-05-19T19:44:04Z",
    "overrideReasons": {
        "extension": {
            "com.epic.cdshooks.feedback.overrideReason.reasonCategory": "45",
            "com.epic.cdshooks.feedback.overrideReason.reasonDisplay": "Does not meet criteria",
            "com.epic.cdshooks.feedback.overrideReason.reasonTitle": "Does not meet criteria",
        },
        "userComment": "User Entered Free Text",
    },
}
EPIC_ACCEPTED: dict[str, Any] = {
    "acceptedSuggestions": [{"id": "replaceWithGUID"}],
    "card": "123456",
    "outcome": "accepted",
    "outcomeTimestamp": "2022-05-19T19:48:34Z",
}
SPEC_REASON = {
    "system": "http://terminology.hl7.org/CodeSystem/non-adherence-reason-codes",
    "code": "risk-benefit-ratio",
    "display": "Benefit outweighs the risk for this patient",
}


def issue_card(client: FlaskClient) -> str:
    """A dose-adjust card (warning, with override reasons) for the fixture patient; its uuid."""
    body = order_select([load("draft-ganciclovir.json")], prefetch=prefetch_for(patient_resources()))
    response = client.post(f"/cds-services/{SERVICE}", json=body)
    assert response.status_code == 200
    (card,) = [c for c in response.get_json()["cards"] if c["source"]["topic"]["code"] == "dose-adjust"]
    return str(card["uuid"])


def post_feedback(client: FlaskClient, items: list[dict[str, Any]]) -> Any:
    response = client.post(f"/cds-services/{SERVICE}/feedback", json={"feedback": items})
    return response.status_code, response.get_json()


@pytest.mark.parametrize("item", [EPIC_OVERRIDDEN_WITH_REASON, EPIC_OVERRIDDEN_WITH_EXTENSION, EPIC_ACCEPTED])
def test_epic_feedback_examples_are_accepted(client: FlaskClient, item: dict[str, Any]) -> None:
    assert post_feedback(client, [item]) == (200, {"stored": 1, "unknownCards": 1})


def test_report_counts_epic_and_spec_override_reasons(client: FlaskClient) -> None:
    cards = [issue_card(client) for _ in range(4)]
    items: list[dict[str, Any]] = [
        EPIC_OVERRIDDEN_WITH_REASON | {"card": cards[0]},
        EPIC_OVERRIDDEN_WITH_EXTENSION | {"card": cards[1]},
        EPIC_OVERRIDDEN_WITH_EXTENSION | {"card": cards[2], "outcomeTimestamp": "2022-05-19T19:45:00Z"},
        {"card": cards[3], "outcome": "overridden", "outcomeTimestamp": "2022-05-19T19:46:00Z"}
        | {"overrideReason": {"reason": SPEC_REASON}},
    ]
    assert post_feedback(client, items) == (200, {"stored": 4, "unknownCards": 0})
    report = client.get(f"/cds-services/report?service={SERVICE}").get_json()
    (rule,) = [r for r in report["rules"] if r["ruleId"] == "dose-adjust"]
    assert rule["overridden"] == 4
    reasons = {(r["system"], r["code"]): (r["display"], r["count"]) for r in rule["overrideReasons"]}
    assert reasons == {
        (EPIC_BUILT_IN_REASON_SYSTEM, "45"): ("Does not meet criteria", 2),
        ("http: //example.org/cds-services/fhir/CodeSystem/override-reasons", "contraindicated"): ("bad", 1),
        (SPEC_REASON["system"], SPEC_REASON["code"]): (SPEC_REASON["display"], 1),
    }


EXTENSION = "com.epic.cdshooks.feedback.overrideReason."


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        # Epic-built reason without a category: the title names it.
        (
            {"extension": {EXTENSION + "reasonTitle": "Patient declined"}},
            {
                "reason": {
                    "system": EPIC_BUILT_IN_REASON_SYSTEM,
                    "code": "Patient declined",
                    "display": "Patient declined",
                }
            },
        ),
        # A numeric category, as a lenient reading of the string Epic shows.
        (
            {"extension": {EXTENSION + "reasonCategory": 45}, "userComment": "c"},
            {"reason": {"system": EPIC_BUILT_IN_REASON_SYSTEM, "code": "45"}, "userComment": "c"},
        ),
        # An array of reasons: the first that names one.
        (
            [{"userComment": "no reason"}, {"reason": SPEC_REASON}],
            {"reason": SPEC_REASON, "userComment": "no reason"},
        ),
        # Only a comment.
        ({"userComment": "only a comment"}, {"userComment": "only a comment"}),
        # Nothing usable: no overrideReason at all.
        ({"extension": {"com.example.other": "x"}}, None),
    ],
)
def test_epic_override_reasons_read_into_the_spec_shape(override: Any, expected: dict[str, Any] | None) -> None:
    item = {
        "card": "c1",
        "outcome": "overridden",
        "outcomeTimestamp": "2022-05-19T19:44:04Z",
        "overrideReasons": override,
    }
    (read,) = read_feedback([item])
    assert "overrideReasons" not in read
    assert read.get("overrideReason") == expected


def test_the_spec_form_wins_when_both_are_sent() -> None:
    item = EPIC_OVERRIDDEN_WITH_EXTENSION | {"overrideReason": {"reason": SPEC_REASON}}
    (read,) = read_feedback([item])
    assert read["overrideReason"] == {"reason": SPEC_REASON}


@pytest.mark.parametrize(
    ("override", "field"),
    [
        ({"reason": {"code": "x"}}, "feedback[0].overrideReasons"),  # a reason Coding needs its system
        ({"extension": {EXTENSION + "reasonDisplay": "x" * 1025}}, "feedback[0].overrideReasons"),
        ("patient refused", "feedback[0].overrideReasons"),
    ],
)
def test_unreadable_epic_override_is_400(client: FlaskClient, override: Any, field: str) -> None:
    item = EPIC_ACCEPTED | {"outcome": "overridden", "overrideReasons": override}
    del item["acceptedSuggestions"]
    status, payload = post_feedback(client, [item])
    assert status == 400
    assert payload["issue"][0]["expression"][0].startswith(field)
