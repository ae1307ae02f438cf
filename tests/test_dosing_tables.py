"""Every row of every dosing table: the label's numbers, the band edges, and the dose the card proposes.

The literal tables below are typed from docs/clinical-basis.md §2.2, §2.2, §3.2 and §4 (and docs/policy.md §5 band
edges) independently of ``cards/dosing.py``, so a change to the data fails here.
"""

from __future__ import annotations

import datetime as dt
import math
import re
from typing import Any

import pytest
from clinical_builders import condition, draft, normal_counts, observation, patient, proposed, run

from cards import dosing
from cards.dosing import DoseRow
from cards.regimen import Regimen, compute

TODAY = dt.date(2026, 11, 22)

FOSCARNET_BANDS = (  # docs/clinical-basis.md §4.2 Table 13, the recommended bands of every column
    "> 1.4 mL/min/kg",
    "(1, 1.4] mL/min/kg",
    "(0.8, 1] mL/min/kg",
    "(0.6, 0.8] mL/min/kg",
    "(0.5, 0.6] mL/min/kg",
    "[0.4, 0.5] mL/min/kg",
)


def _foscarnet_column(phase: str, column: str, doses: list[tuple[int, int]]) -> list[tuple[Any, ...]]:
    """One column of Table 13: (mg/kg, every N hours) per band of ``FOSCARNET_BANDS``, then < 0.4 not recommended."""
    rows: list[tuple[Any, ...]] = [
        (phase, column, band, mg_per_kg, 1, hours, "h")
        for band, (mg_per_kg, hours) in zip(FOSCARNET_BANDS, doses, strict=True)
    ]
    return [*rows, (phase, column, "< 0.4 mL/min/kg", None, None, None, None)]


# (phase, column, band label, mg/kg or fixed mg, frequency, period, periodUnit) — None schedule: not recommended.
LABEL_TABLES: dict[str, list[tuple[Any, ...]]] = {
    "ganciclovir": [  # docs/clinical-basis.md §2.2 Table 1
        ("induction", "label", "≥ 70 mL/min", 5.0, 1, 12, "h"),
        ("induction", "label", "[50, 70) mL/min", 2.5, 1, 12, "h"),
        ("induction", "label", "[25, 50) mL/min", 2.5, 1, 24, "h"),
        ("induction", "label", "[10, 25) mL/min", 1.25, 1, 24, "h"),
        ("induction", "label", "< 10 mL/min", 1.25, 3, 1, "wk"),
        ("maintenance", "label", "≥ 70 mL/min", 5.0, 1, 24, "h"),
        ("maintenance", "label", "[50, 70) mL/min", 2.5, 1, 24, "h"),
        ("maintenance", "label", "[25, 50) mL/min", 1.25, 1, 24, "h"),
        ("maintenance", "label", "[10, 25) mL/min", 0.625, 1, 24, "h"),
        ("maintenance", "label", "< 10 mL/min", 0.625, 3, 1, "wk"),
    ],
    "valganciclovir": [  # docs/clinical-basis.md §3.2 Table 2 (fixed mg)
        ("induction", "label", "≥ 60 mL/min", 900, 2, 1, "d"),
        ("induction", "label", "[40, 60) mL/min", 450, 2, 1, "d"),
        ("induction", "label", "[25, 40) mL/min", 450, 1, 1, "d"),
        ("induction", "label", "[10, 25) mL/min", 450, 1, 2, "d"),
        ("induction", "label", "< 10 mL/min", None, None, None, None),
        ("maintenance", "label", "≥ 60 mL/min", 900, 1, 1, "d"),
        ("maintenance", "label", "[40, 60) mL/min", 450, 1, 1, "d"),
        ("maintenance", "label", "[25, 40) mL/min", 450, 1, 2, "d"),
        ("maintenance", "label", "[10, 25) mL/min", 450, 2, 1, "wk"),
        ("maintenance", "label", "< 10 mL/min", None, None, None, None),
    ],
    "foscarnet": [  # docs/clinical-basis.md §4.2 Table 13, mL/min/kg
        *_foscarnet_column("induction", dosing.FOS_IND_60, [(60, 8), (45, 8), (50, 12), (40, 12), (60, 24), (50, 24)]),
        *_foscarnet_column(
            "induction", dosing.FOS_IND_90, [(90, 12), (70, 12), (50, 12), (80, 24), (60, 24), (50, 24)]
        ),
        *_foscarnet_column(
            "maintenance", dosing.FOS_MAINT_90, [(90, 24), (70, 24), (50, 24), (80, 48), (60, 48), (50, 48)]
        ),
        *_foscarnet_column(
            "maintenance", dosing.FOS_MAINT_120, [(120, 24), (90, 24), (65, 24), (105, 48), (80, 48), (65, 48)]
        ),
    ],
    "cidofovir": [  # docs/clinical-basis.md §5
        ("induction", "label", "> 55 mL/min", 5.0, 1, 1, "wk"),
        ("maintenance", "label", "> 55 mL/min", 5.0, 1, 2, "wk"),
    ],
}

ALL_ROWS = [row for rows in dosing.TABLES.values() for row in rows]


def _row_id(row: DoseRow) -> str:
    return f"{row.drug}-{row.phase}-{row.column}-{row.band.label()}"


@pytest.mark.parametrize("drug", list(LABEL_TABLES))
def test_table_data_matches_the_label(drug: str) -> None:
    rows = dosing.TABLES[drug]  # type: ignore[index]
    actual = [
        (
            r.phase,
            r.column,
            r.band.label(),
            r.mg_per_kg if r.mg_per_kg is not None else r.fixed_mg,
            *((r.schedule.frequency, r.schedule.period, r.schedule.period_unit) if r.schedule else (None, None, None)),
        )
        for r in rows
    ]
    expected = [
        (p, c, b, d, f, per, u) if f is not None else (p, c, b, None, None, None, None)
        for p, c, b, d, f, per, u in LABEL_TABLES[drug]
    ]
    assert actual == expected


def test_every_row_cites_its_source() -> None:
    """Each row names the label table it comes from (docs/clinical-basis.md §2-§5 prints the tables)."""
    for row in ALL_ROWS:
        assert re.search(r"label,? (§2\.5 Table [12]|Table 13|Dosage and Administration)", row.source), row.source


def test_hemodialysis_rows() -> None:
    """docs/policy.md §4/§4: dialysis → the < 10 row (ganciclovir 3×/week after HD; valganciclovir and foscarnet
    not recommended), whatever the CrCl."""
    gcv = dosing.select_row("ganciclovir", "induction", 95.0, on_dialysis=True)
    assert (gcv.mg_per_kg, gcv.schedule and gcv.schedule.frequency, gcv.schedule and gcv.schedule.period_unit) == (
        1.25,
        3,
        "wk",
    )
    assert gcv.schedule is not None
    assert gcv.schedule.after_dialysis
    assert dosing.select_row("ganciclovir", "maintenance", 95.0, on_dialysis=True).mg_per_kg == 0.625
    assert dosing.select_row("valganciclovir", "induction", 95.0, on_dialysis=True).schedule is None
    assert dosing.select_row("foscarnet", "induction", 1.6, on_dialysis=True, column=dosing.FOS_IND_90).schedule is None


def _edges(row: DoseRow) -> list[tuple[float, bool]]:
    """(value, belongs to this row) for both edges and an interior point."""
    band = row.band
    points: list[tuple[float, bool]] = []
    if band.low is not None:
        points += [(band.low, band.low_closed), (math.nextafter(band.low, math.inf), True)]
    if band.high is not None:
        points += [(band.high, band.high_closed), (math.nextafter(band.high, -math.inf), True)]
    return points


@pytest.mark.parametrize("row", ALL_ROWS, ids=_row_id)
def test_band_edges(row: DoseRow) -> None:
    """docs/policy.md §5 half-open edges: each edge value lands in exactly the row the policy says."""
    for value, inside in _edges(row):
        if value < 0:
            continue
        try:
            chosen: DoseRow | None = dosing.select_row(row.drug, row.phase, value, on_dialysis=False, column=row.column)
        except LookupError:  # cidofovir has one band: below it is the start contraindication, not a row
            chosen = None
        assert (chosen == row) is inside, f"{value} {row.band.label()}"


@pytest.mark.parametrize(
    ("drug", "value", "expected_band"),
    [
        ("ganciclovir", 70.0, "≥ 70 mL/min"),
        ("ganciclovir", 69.99, "[50, 70) mL/min"),
        ("ganciclovir", 50.0, "[50, 70) mL/min"),
        ("ganciclovir", 25.0, "[25, 50) mL/min"),
        ("ganciclovir", 10.0, "[10, 25) mL/min"),
        ("ganciclovir", 9.99, "< 10 mL/min"),
        ("valganciclovir", 60.0, "≥ 60 mL/min"),
        ("valganciclovir", 40.0, "[40, 60) mL/min"),
        ("valganciclovir", 39.99, "[25, 40) mL/min"),
        ("valganciclovir", 10.0, "[10, 25) mL/min"),
        ("foscarnet", 1.4, "(1, 1.4] mL/min/kg"),
        ("foscarnet", 1.41, "> 1.4 mL/min/kg"),
        ("foscarnet", 1.0, "(0.8, 1] mL/min/kg"),
        ("foscarnet", 0.5, "[0.4, 0.5] mL/min/kg"),
        ("foscarnet", 0.4, "[0.4, 0.5] mL/min/kg"),
        ("foscarnet", 0.3999, "< 0.4 mL/min/kg"),
    ],
)
def test_named_edge_values(drug: Any, value: float, expected_band: str) -> None:
    column = dosing.FOS_IND_90 if drug == "foscarnet" else "label"
    assert dosing.select_row(drug, "induction", value, on_dialysis=False, column=column).band.label() == expected_band


# --- the dose the card proposes, for every recommended row and several weights -------------------------------

AGE = 60  # (140 − 60) = 80 keeps the arithmetic readable
WEIGHTS = (50.0, 72.4, 118.0)
RXNORM = {"ganciclovir": "310442", "valganciclovir": "313566", "foscarnet": "1734377", "cidofovir": "199388"}


def _target(row: DoseRow) -> float | None:
    """A clearance inside the band (None: use a dialysis Condition)."""
    band = row.band
    if row.hemodialysis and row.drug != "foscarnet":
        return None
    if band.low is None:
        return (band.high or 0) * 0.75
    if band.high is None:
        return band.low * 1.25
    return (band.low + band.high) / 2


def _resources(row: DoseRow, weight: float, target: float | None, sex: str = "male") -> list[dict[str, Any]]:
    if target is None:
        scr, extra = 6.0, [condition("End stage renal disease on hemodialysis", TODAY, snomed="105502003")]
    else:
        per_kg = dosing.CLEARANCE_UNIT[row.drug] == dosing.ML_MIN_KG
        scr = (140 - AGE) / (72 * target) if per_kg else (140 - AGE) * weight / (72 * target)
        extra = []
    resources = [
        patient(AGE, sex, TODAY),
        observation("29463-7", weight, "kg", TODAY),
        observation("2160-0", scr, "mg/dL", TODAY),
        *normal_counts(TODAY),
        *extra,
    ]
    if row.drug == "cidofovir":
        resources.append(observation("2888-6", 20, "mg/dL", TODAY))
    return resources


def _expected_mg(row: DoseRow, weight: float) -> float:
    if row.fixed_mg is not None:
        return row.fixed_mg
    assert row.mg_per_kg is not None
    step = {"ganciclovir": 5, "cidofovir": 5, "foscarnet": 50}[row.drug]  # docs/policy.md §6
    return math.floor(row.mg_per_kg * weight / step + 0.5) * step


DEFAULT_COLUMNS = {"label", dosing.FOS_IND_90, dosing.FOS_MAINT_90}
CARD_ROWS = [r for r in ALL_ROWS if r.recommended and r.column in DEFAULT_COLUMNS]


@pytest.mark.parametrize("weight", WEIGHTS)
@pytest.mark.parametrize("row", CARD_ROWS, ids=_row_id)
def test_card_proposes_the_row_dose(row: DoseRow, weight: float) -> None:
    """Through the engine: a draft without dose → an update with doseQuantity (mg) and timing.repeat."""
    # Cidofovir also needs SCr ≤ 1.5 mg/dL (docs/policy.md §5): SCr 1.0 gives CrCl > 55 for every weight here.
    target = (140 - AGE) * weight / 72 if row.drug == "cidofovir" else _target(row)
    text = "maintenance" if row.phase == "maintenance" else None
    route = "oral" if row.drug == "valganciclovir" else "IV"
    order = draft(row.drug, RXNORM[row.drug], route=route, text=text)
    cards = run([order], _resources(row, weight, target), TODAY)
    main = cards[0] if cards[0].rule_id == "dose-adjust" else next(c for c in cards if c.rule_id == "dose-adjust")
    (resource,) = [r for r in proposed(main) if r["id"] == order["id"]]
    dosage = resource["dosageInstruction"][0]
    assert dosage["doseAndRate"][0]["doseQuantity"] == {
        "value": _expected_mg(row, weight),
        "unit": "mg",
        "system": "http://unitsofmeasure.org",
        "code": "mg",
    }
    assert row.schedule is not None
    repeat = dosage["timing"]["repeat"]
    assert (repeat["frequency"], repeat["period"], repeat["periodUnit"]) == (
        row.schedule.frequency,
        row.schedule.period,
        row.schedule.period_unit,
    )
    if row.phase == "induction":
        assert repeat["boundsDuration"]["value"] == dosing.INDUCTION_DAYS[row.drug]
    route_code = "26643006" if row.drug == "valganciclovir" else "47625008"  # docs/policy.md §13
    assert dosage["route"]["coding"][0]["code"] == route_code


@pytest.mark.parametrize(
    ("drug", "mg_per_kg", "weight", "expected"),
    [
        ("ganciclovir", 5.0, 72.4, 360),  # 362 → nearest 5
        ("ganciclovir", 2.5, 72.4, 180),  # 181
        ("ganciclovir", 1.25, 72.4, 90),  # 90.5 → 90 (nearest 5: 90.5 is closer to 90)
        ("ganciclovir", 5.0, 50.5, 255),  # 252.5 → half up to 255
        ("foscarnet", 90.0, 72.4, 6500),  # 6516 → nearest 50
        ("foscarnet", 70.0, 80.0, 5600),
        ("cidofovir", 5.0, 72.4, 360),
    ],
)
def test_rounding_literal(drug: Any, mg_per_kg: float, weight: float, expected: float) -> None:
    """docs/policy.md §6 rounding, on hand-computed values."""
    assert dosing.round_dose(drug, mg_per_kg * weight) == expected


@pytest.mark.parametrize("column", [dosing.FOS_IND_60, dosing.FOS_MAINT_120])
@pytest.mark.parametrize("target", [1.6, 1.2, 0.9, 0.7, 0.55, 0.45])
def test_foscarnet_alternative_columns(column: str, target: float) -> None:
    """The non-default columns compute too (named as the alternative on the card)."""
    phase = "induction" if column == dosing.FOS_IND_60 else "maintenance"
    row = dosing.select_row("foscarnet", phase, target, on_dialysis=False, column=column)  # type: ignore[arg-type]
    from cards.facts import build_facts

    facts = build_facts(_resources(row, 72.4, target), [], "pat-t", TODAY)
    regimen = compute("foscarnet", phase, facts, "actual", column=column)  # type: ignore[arg-type]
    assert isinstance(regimen, Regimen)
    assert regimen.row == row
    assert regimen.dose_mg == _expected_mg(row, 72.4)


@pytest.mark.parametrize(
    ("scr_value", "scr_unit", "weight_value", "weight_unit"),
    [
        (1.0, "mg/dL", 80.0, "kg"),
        (88.4, "umol/L", 80.0, "kg"),  # ÷ 88.4 (docs/policy.md §2)
        (1.0, "mg/dL", 80000.0, "g"),
        (1.0, "mg/dL", 80.0 / 0.45359237, "[lb_av]"),
    ],
)
def test_unit_conversions_give_the_same_dose(
    scr_value: float, scr_unit: str, weight_value: float, weight_unit: str
) -> None:
    """Age 60, 80 kg, SCr 1.0 mg/dL, male: CrCl 88.9 → 5 mg/kg q12h = 400 mg, whatever the units."""
    resources = [
        patient(60, "male", TODAY),
        observation("29463-7", weight_value, weight_unit, TODAY),
        observation("2160-0", scr_value, scr_unit, TODAY),
        *normal_counts(TODAY),
    ]
    cards = run([draft("ganciclovir", "310442", route="IV")], resources, TODAY)
    (resource,) = proposed(cards[0])
    assert resource["dosageInstruction"][0]["doseAndRate"][0]["doseQuantity"]["value"] == 400
