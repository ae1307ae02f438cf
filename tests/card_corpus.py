"""A corpus of order-select requests for the fixture patient that between them make every kind of card the
rules write today (the scenarios of tests/test_scenarios.py, one request each), for tests that check a
property of every answer whatever the cards say (tests/test_epic_profile.py).

``SCENARIOS`` maps a name to a builder of the request body; ``COVERED_RULES`` is what the corpus is known to
exercise, so a scenario that stops producing its card is noticed.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from typing import Any

from fhir_fixtures import condition, load, observation, order_select, patient_data, prefetch_for
from fhir_fixtures import ganciclovir_draft as _gcv
from fhir_fixtures import medication_order as _med


def _request(drafts: list[dict[str, Any]], resources: list[dict[str, Any]], **kw: Any) -> dict[str, Any]:
    return order_select(drafts, prefetch=prefetch_for(resources), **kw)


def _pediatric() -> dict[str, Any]:
    today = dt.date.today()
    birth = (today - dt.timedelta(days=30)).replace(year=today.year - 15).isoformat()
    return _request([_gcv()], patient_data(birthDate=birth))


def _cidofovir(**change: Any) -> dict[str, Any]:
    extra = [
        observation("obs-scr-c", "2160-0", change.get("scr", 1.0), "mg/dL", 0),
        observation("obs-up", "2888-6", 20, "mg/dL", 0),
    ]
    return _request([load("draft-cidofovir.json")], patient_data(drop=("obs-scr",), add=tuple(extra)))


SCENARIOS: dict[str, Callable[[], dict[str, Any]]] = {
    "dose-adjust": lambda: _request([_gcv(500)], patient_data()),
    "dose-confirmed": lambda: _request([_gcv(400)], patient_data()),
    "missing-weight": lambda: _request([_gcv()], patient_data(drop=("obs-weight",))),
    "missing-creatinine": lambda: _request([_gcv()], patient_data(drop=("obs-scr", "obs-scr-old"))),
    "stale-creatinine": lambda: _request(
        [_gcv()],
        patient_data(drop=("obs-scr", "obs-scr-old"), add=(observation("obs-scr-stale", "2160-0", 1.0, "mg/dL", 9),)),
    ),
    "pediatric": _pediatric,
    "valganciclovir-pneumonitis": lambda: _request(
        [load("draft-valganciclovir.json")], patient_data(add=(condition("cond-pneu", "CMV pneumonitis"),))
    ),
    "valganciclovir-dialysis": lambda: _request(
        [load("draft-valganciclovir.json")],
        patient_data(add=(condition("cond-hd", "ESRD on hemodialysis", snomed="105502003"),)),
    ),
    "myelosuppression": lambda: _request(
        [_gcv()], patient_data(drop=("obs-anc",), add=(observation("obs-anc-low", "751-8", 400, "/uL", 0),))
    ),
    "cns-ganciclovir": lambda: _request([_gcv()], patient_data(add=(condition("cond-cns", "CMV encephalitis"),))),
    "cns-valganciclovir": lambda: _request(
        [load("draft-valganciclovir.json")], patient_data(add=(condition("cond-cns", "CMV encephalitis"),))
    ),
    "resistance": lambda: _request(
        [_gcv()],
        patient_data(
            add=(
                _med("med-gcv", "ganciclovir 400 mg IV q12h", 20, route="IV"),
                observation("obs-vl-0", "72493-0", 5000, "[IU]/mL", 21),
            )
        ),
    ),
    "foscarnet-dose": lambda: _request([load("draft-foscarnet.json")], patient_data()),
    "foscarnet-not-recommended": lambda: _request(
        [load("draft-foscarnet.json")],
        patient_data(drop=("obs-scr",), add=(observation("obs-scr-high", "2160-0", 3.2, "mg/dL", 0),)),
    ),
    "cidofovir-eligible": _cidofovir,
    "cidofovir-contraindicated": lambda: _cidofovir(scr=1.6),
    "step-down": lambda: _request(
        [_gcv(400)],
        patient_data(
            drop=("obs-vl-2",),
            add=(
                _med("med-gcv", "ganciclovir IV", 5, route="IV"),
                observation("obs-vl-3", "72493-0", 3000, "[IU]/mL", 1),
            ),
        ),
    ),
    "pregnancy": lambda: _request(
        [_gcv()],
        patient_data(
            add=(observation("obs-hcg", "2106-3", None, "", 3, valueCodeableConcept={"text": "Positive"}),),
            gender="female",
        ),
    ),
    "interactions": lambda: _request([_gcv()], patient_data(add=(_med("med-x", "imipenem-cilastatin 500 mg IV", 2),))),
    "adjunctive": lambda: _request(
        [_gcv()],
        patient_data(
            add=(
                condition("cond-pneu", "CMV pneumonitis", severe=True),
                condition("cond-ret", "CMV retinitis"),
                condition("cond-hiv", "HIV infection", snomed="86406008"),
            )
        ),
    ),
}

# The rule ids the corpus makes today (the rules are the lead's and will change: this list is checked so a
# scenario that silently stops producing its card is noticed, not to pin the rules).
COVERED_RULES = frozenset(
    {
        "dose-adjust",
        "dose-confirmed-monitoring",
        "dose-missing-data",
        "pediatric",
        "valganciclovir-to-iv",
        "myelosuppression",
        "cns-combination",
        "resistance",
        "foscarnet-not-recommended",
        "cidofovir-contraindicated",
        "cidofovir-probenecid-hydration",
        "iv-to-oral-step-down",
        "pregnancy",
        "interactions",
        "reduce-immunosuppression",
        "art-hiv",
        "ivig-pneumonitis",
        "ophthalmology-retinitis",
    }
)
