"""The card classes (cards.model) behave as the frozen dataclasses they are declared as, though their ``__init__`` is
written out (so that, compiled, it is native): fields by position or keyword, defaults, the frozen guard, equality,
``dataclasses.replace``, and the card invariants checked at construction, for ``Card`` and Epic's ``EpicCard``."""

from __future__ import annotations

import dataclasses
import datetime as dt
from typing import Any

import pytest

from cards.model import Action, Card, Coding, Link, Source, Suggestion
from cards.profiles import EpicCard

SOURCE = Source("Valcyte label", "https://example.org/label")
ACTION = Action("delete", "Remove the selected order", resource_id="MedicationRequest/1")
SUGGESTION = Suggestion("Remove", (ACTION,), is_recommended=True, uuid="suggestion-1")

# (class, positional arguments, the same as keywords, the fields left to their defaults and those defaults)
CASES: list[tuple[type[Any], tuple[Any, ...], dict[str, Any], dict[str, Any]]] = [
    (Coding, ("http://loinc.org", "2160-0"), {"system": "http://loinc.org", "code": "2160-0"}, {"display": None}),
    (Source, ("label",), {"label": "label"}, {"url": None}),
    (Action, ("create", "Order"), {"type": "create", "description": "Order"}, {"resource": None, "resource_id": None}),
    (Link, ("label", "https://example.org"), {"label": "label", "url": "https://example.org"}, {}),
    (Suggestion, ("Remove", (ACTION,)), {"label": "Remove", "actions": (ACTION,)}, {"is_recommended": False}),
    (
        Card,
        ("dose-adjust", "Adjust the dose", "warning", "detail", SOURCE),
        {"rule_id": "dose-adjust", "summary": "Adjust the dose", "indicator": "warning", "detail": "detail",
         "source": SOURCE},
        {"suggestions": (), "selection_behavior": None, "links": ()},
    ),
    (
        EpicCard,
        ("dose-adjust", "Adjust the dose", "warning", "detail", SOURCE),
        {"rule_id": "dose-adjust", "summary": "Adjust the dose", "indicator": "warning", "detail": "detail",
         "source": SOURCE},
        {"suggestions": (), "selection_behavior": None, "links": ()},
    ),
]  # fmt: skip
IDS = [case[0].__name__ for case in CASES]


def _without_ids(value: Any) -> dict[str, Any]:
    return {k: v for k, v in dataclasses.asdict(value).items() if k != "uuid"}


@pytest.mark.parametrize(("cls", "positional", "keywords", "defaults"), CASES, ids=IDS)
def test_fields_by_position_or_keyword_and_their_defaults(
    cls: type[Any], positional: tuple[Any, ...], keywords: dict[str, Any], defaults: dict[str, Any]
) -> None:
    by_position, by_keyword = cls(*positional), cls(**keywords)
    assert _without_ids(by_position) == _without_ids(by_keyword)
    for name, value in {**keywords, **defaults}.items():
        assert getattr(by_position, name) == value
    assert {f.name for f in dataclasses.fields(cls)} == set(keywords) | set(defaults) | (
        {"uuid"} if hasattr(by_position, "uuid") else set()
    )


@pytest.mark.parametrize(("cls", "positional", "keywords", "defaults"), CASES, ids=IDS)
def test_frozen_and_replaceable(
    cls: type[Any], positional: tuple[Any, ...], keywords: dict[str, Any], defaults: dict[str, Any]
) -> None:
    value = cls(*positional)
    name = next(iter(keywords))
    with pytest.raises(dataclasses.FrozenInstanceError):
        setattr(value, name, "changed")
    changed = dataclasses.replace(value, **{name: "changed"})
    assert type(changed) is cls
    assert getattr(changed, name) == "changed"
    assert getattr(value, name) == keywords[name]
    assert dataclasses.replace(value) == value  # the uuid too is kept


@pytest.mark.parametrize("cls", [Card, EpicCard])
def test_each_card_and_suggestion_gets_its_own_uuid_unless_given(cls: type[Card]) -> None:
    first, second = cls("rule", "summary", "info", "", SOURCE), cls("rule", "summary", "info", "", SOURCE)
    assert first.uuid != second.uuid
    assert cls("rule", "summary", "info", "", SOURCE, uuid="given").uuid == "given"
    assert Suggestion("a", ()).uuid != Suggestion("a", ()).uuid
    assert SUGGESTION.uuid == "suggestion-1"


@pytest.mark.parametrize("cls", [Card, EpicCard])
@pytest.mark.parametrize(
    ("summary", "suggestions", "behavior", "message"),
    [
        ("", (), None, "card summary must be 1-139 characters"),
        ("x" * 140, (), None, "card summary must be 1-139 characters"),
        ("summary", (SUGGESTION,), None, "has suggestions but no selectionBehavior"),
    ],
    ids=["empty-summary", "summary-140", "suggestions-without-behavior"],
)
def test_card_invariants_are_checked_at_construction(
    cls: type[Card], summary: str, suggestions: tuple[Suggestion, ...], behavior: Any, message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        cls("rule", summary, "warning", "", SOURCE, suggestions, behavior)
    assert cls("rule", "x" * 139, "warning", "", SOURCE, (SUGGESTION,), "at-most-one").summary == "x" * 139


def test_epic_card_differs_only_in_its_topic_code() -> None:
    card = EpicCard("dose-adjust", "Adjust the dose", "warning", "detail", SOURCE, uuid="u")
    plain = Card("dose-adjust", "Adjust the dose", "warning", "detail", SOURCE, uuid="u")
    assert card.topic.code == "CmvDoseAdjust"
    assert plain.topic.code == "dose-adjust"
    assert {**card.to_json(), "source": None} == {**plain.to_json(), "source": None}


# The other classes built on every call with a written __init__ (cards.renal, .facts, .orders, .regimen, .fhir_out,
# .engine, .rules.common, service.draft_orders): every init field given, by keyword.
def _constructed() -> list[tuple[type[Any], dict[str, Any]]]:
    from cards.dosing import GANCICLOVIR_ROWS
    from cards.engine import ClinicalOptions, HookRequest
    from cards.facts import Evidence, Measurement, PatientFacts, Unusable, ViralLoad
    from cards.fhir_out import DoseSpec
    from cards.orders import DraftDose, OrderFact
    from cards.regimen import MissingItem, Regimen, RenalInputs
    from cards.renal import Clearance, DosingWeight
    from cards.rules.common import Context, Options
    from cards.therapy import MedicationFact
    from service.draft_orders import DraftOrders

    row = next(row for row in GANCICLOVIR_ROWS if row.schedule is not None)
    assert row.schedule is not None
    clearance = Clearance(ml_min=72.5, ml_min_kg=1.04, sex_basis="female")
    weight = DosingWeight(kg=70.0, basis="actual body weight")
    facts = PatientFacts(today=dt.date(2026, 3, 1), patient_source="Patient/1", age_years=54, sex="female")
    options = Options(dosing_weight="actual", high_viral_load_iu_ml=100000.0)
    missing = MissingItem("body weight", "no result on record", "BodyWeight")
    day = dt.date(2026, 2, 27)
    dose = DraftDose(mg=500.0, invalid=None, per_hour=None, route="iv")
    order = OrderFact({"resourceType": "MedicationRequest", "id": "d1"}, "d1", "ganciclovir", dose, "induction")
    tacrolimus = MedicationFact(
        "MedicationRequest/m1", "tacrolimus", frozenset({"Calcineurin"}), "active", day, None, "oral", False, day
    )

    def lab(value: float, unit: str) -> Measurement:
        return Measurement(value, unit, day, f"Observation/{unit}", False, "LOINC 1-8 lab", "", "")

    def evidence(label: str) -> Evidence:
        return Evidence(f"Condition/{label}", day, label)

    return [
        (Clearance, {"ml_min": 72.5, "ml_min_kg": 1.04, "sex_basis": "female"}),
        (
            PatientFacts,
            {"today": dt.date(2026, 3, 1), "patient_source": "Patient/1", "age_years": 54, "sex": "female",
             "weight": lab(70.0, "kg"), "height": lab(165.0, "cm"), "creatinine": lab(1.1, "mg/dL"),
             "anc": lab(900.0, "/uL"), "platelets": lab(40000.0, "/uL"), "hemoglobin": lab(7.5, "g/dL"),
             "urine_protein": Unusable("unit 'mmol/L' not recognised", "Observation/u", day),
             "viral_loads": (ViralLoad(day, "Observation/v", 25000.0, False),), "pregnancy": evidence("pregnancy"),
             "dialysis": evidence("dialysis"), "transplant": evidence("transplant"), "hiv": evidence("hiv"),
             "malabsorption": evidence("malabsorption"), "dic": evidence("dic"), "resistance": evidence("UL97"),
             "severe": evidence("severe"), "cmv_disease": evidence("colitis"),
             "manifestations": {"colitis": evidence("colitis")}, "medications": (tacrolimus,), "orders": (order,)},
        ),
        (OrderFact, {"resource": {"id": "d2"}, "id": "d2", "drug": "foscarnet", "dose": dose, "text_phase": None}),
        (DraftDose, {"mg": 450.0, "invalid": "a zero dose", "per_hour": 0.5, "route": "oral"}),
        (DraftOrders, {"selected": ({"id": "d1"},), "others": ({"id": "d2"},), "selected_paths": ("entry[0]",)}),
        (DosingWeight, {"kg": 70.0, "basis": "actual body weight"}),
        (Options, {"dosing_weight": "adjusted", "high_viral_load_iu_ml": 50000.0}),
        (ClinicalOptions, {"dosing_weight": "adjusted", "high_viral_load_iu_ml": 50000.0}),
        (
            HookRequest,
            {"hook": "order-select", "patient_id": "1", "today": dt.date(2026, 3, 1), "selected_orders": [{}],
             "other_draft_orders": [], "resources": [{"resourceType": "Patient"}]},
        ),
        (
            DoseSpec,
            {"text": "350 mg IV every 12 hours", "amount": 350.0, "amount_unit": "mg", "schedule": row.schedule,
             "route": "iv", "duration_days": 21, "count": 42, "sequence": 1},
        ),
        (Context, {"facts": facts, "options": options, "patient_id": "1", "selected_drugs": frozenset({"foscarnet"})}),
        (
            RenalInputs,
            {"weight": missing, "scr": missing, "age": 54, "clearance": clearance, "per_kg": 1.04,
             "lines": ["Age: 54 years"]},
        ),
        (
            Regimen,
            {"drug": "ganciclovir", "phase": "induction", "row": row, "dose_mg": 350.0, "exact_mg": 348.0,
             "route": "iv", "schedule": row.schedule, "duration_days": 21, "count": None, "weight": weight,
             "clearance": clearance, "on_dialysis": False, "inputs": ("Weight: 70 kg",), "stale": (),
             "colitis_course": True},
        ),
    ]  # fmt: skip


CONSTRUCTED = _constructed()


@pytest.mark.parametrize(("cls", "values"), CONSTRUCTED, ids=[cls.__name__ for cls, _ in CONSTRUCTED])
def test_the_written_constructors_set_every_field_and_keep_the_defaults(cls: type[Any], values: dict[str, Any]) -> None:
    init_fields = [f for f in dataclasses.fields(cls) if f.init]
    assert [f.name for f in init_fields] == list(values)  # every init field, in declaration order
    by_keyword, by_position = cls(**values), cls(*values.values())
    for name, value in values.items():
        assert getattr(by_keyword, name) == value
    assert by_position == by_keyword
    assert dataclasses.replace(by_keyword) == by_keyword
    for field in init_fields:  # a field left out takes its declared default (a fresh one from a factory)
        if field.default is not dataclasses.MISSING:
            expected = field.default
        elif field.default_factory is not dataclasses.MISSING:
            expected = field.default_factory()
        else:
            continue
        assert getattr(cls(**{k: v for k, v in values.items() if k != field.name}), field.name) == expected
    if cls.__dataclass_params__.frozen:
        with pytest.raises(dataclasses.FrozenInstanceError):
            setattr(by_keyword, init_fields[0].name, values[init_fields[0].name])


def test_each_context_and_renal_inputs_gets_its_own_containers() -> None:
    by_name = {cls.__name__: (cls, values) for cls, values in CONSTRUCTED}
    (context_cls, context_values), (renal_cls, renal_values) = by_name["Context"], by_name["RenalInputs"]
    first, second = context_cls(**context_values), context_cls(**context_values)
    assert first._regimens == first._phases == {}
    assert first._regimens is not second._regimens
    assert first._phases is not second._phases
    without_lines = {k: v for k, v in renal_values.items() if k != "lines"}
    assert renal_cls(**without_lines).lines is not renal_cls(**without_lines).lines
