"""Dosing tables as data: one row per renal band, each with its source.

Band edges are half-open as docs/policy.md §5 reads the labels' integer bands on a continuous scale.
Rows carry the label's dose (mg/kg, or fixed mg for valganciclovir) and its schedule, encoded as FHIR
``timing.repeat`` values (docs/policy.md §13). ``schedule is None`` means "not recommended" in the label.
Each row's ``source`` names the label table it comes from; docs/clinical-basis.md §2-§5 prints every table.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

Drug = Literal["ganciclovir", "valganciclovir", "foscarnet", "cidofovir"]
Phase = Literal["induction", "maintenance"]
PeriodUnit = Literal["h", "d", "wk"]

_HOURS = {"h": 1.0, "d": 24.0, "wk": 168.0}


@dataclass(frozen=True)
class Band:
    """An interval of clearance; ``None`` ends are unbounded."""

    low: float | None
    low_closed: bool
    high: float | None
    high_closed: bool
    unit: str

    def contains(self, value: float) -> bool:
        """Whether ``value`` lies in the band (each edge open or closed as the label writes it)."""
        if self.low is not None and (value < self.low or (value == self.low and not self.low_closed)):
            return False
        return not (self.high is not None and (value > self.high or (value == self.high and not self.high_closed)))

    def label(self) -> str:
        """The band as the card prints it ("≥ 70 mL/min", "50–69 mL/min")."""
        if self.low is None and self.high is not None:
            return f"{'≤' if self.high_closed else '<'} {self.high:g} {self.unit}"
        if self.high is None and self.low is not None:
            return f"{'≥' if self.low_closed else '>'} {self.low:g} {self.unit}"
        left = "[" if self.low_closed else "("
        right = "]" if self.high_closed else ")"
        return f"{left}{self.low:g}, {self.high:g}{right} {self.unit}"


def at_least(low: float, unit: str) -> Band:
    """A band low ≤ x (closed below, unbounded above)."""
    return Band(low, True, None, False, unit)


def above(low: float, unit: str) -> Band:
    """A band low < x (open below, unbounded above)."""
    return Band(low, False, None, False, unit)


def below(high: float, unit: str) -> Band:
    """A band x < high (unbounded below, open above)."""
    return Band(None, False, high, False, unit)


def closed_open(low: float, high: float, unit: str) -> Band:
    """A band low ≤ x < high."""
    return Band(low, True, high, False, unit)


def open_closed(low: float, high: float, unit: str) -> Band:
    """A band low < x ≤ high."""
    return Band(low, False, high, True, unit)


def closed(low: float, high: float, unit: str) -> Band:
    """A band low ≤ x ≤ high."""
    return Band(low, True, high, True, unit)


@dataclass(frozen=True)
class Schedule:
    """FHIR timing.repeat: ``frequency`` doses per ``period`` ``period_unit``."""

    frequency: int
    period: float
    period_unit: PeriodUnit
    text: str
    after_dialysis: bool = False

    @property
    def doses_per_hour(self) -> float:
        return self.frequency / (self.period * _HOURS[self.period_unit])


Q8H = Schedule(1, 8, "h", "every 8 hours")
Q12H = Schedule(1, 12, "h", "every 12 hours")
Q24H = Schedule(1, 24, "h", "every 24 hours")
Q48H = Schedule(1, 48, "h", "every 48 hours")
TWICE_DAILY = Schedule(2, 1, "d", "twice daily")
ONCE_DAILY = Schedule(1, 1, "d", "once daily")
EVERY_2_DAYS = Schedule(1, 2, "d", "every 2 days")
TWICE_WEEKLY = Schedule(2, 1, "wk", "twice weekly")
WEEKLY = Schedule(1, 1, "wk", "once weekly")
EVERY_2_WEEKS = Schedule(1, 2, "wk", "once every 2 weeks")
# docs/policy.md §13: "Three times weekly after dialysis" is frequency 3, period 1, periodUnit "wk".
THRICE_WEEKLY_AFTER_HD = Schedule(3, 1, "wk", "3 times weekly, after each hemodialysis session", after_dialysis=True)


@dataclass(frozen=True)
class DoseRow:
    """One row of a label dosing table."""

    drug: Drug
    phase: Phase
    column: str
    band: Band
    hemodialysis: bool  # this row also applies to any dialysis-dependent patient (docs/policy.md §4)
    mg_per_kg: float | None
    fixed_mg: float | None
    schedule: Schedule | None  # None: "not recommended"
    source: str

    @property
    def recommended(self) -> bool:
        return self.schedule is not None

    def dose_text(self) -> str:
        """The row's dose and schedule as the label writes them ("5 mg/kg every 12 hours")."""
        if self.schedule is None:
            return "not recommended"
        amount = f"{self.mg_per_kg:g} mg/kg" if self.mg_per_kg is not None else f"{self.fixed_mg:g} mg"
        return f"{amount} {self.schedule.text}"


ML_MIN = "mL/min"
ML_MIN_KG = "mL/min/kg"

_BANDS = "band edges: CMV CDS product policy §5"
_GCV = "ganciclovir label §2.5 Table 1"
_VGC = "Valcyte label §2.5 Table 2"
_FOS_IND = "foscarnet label Table 13, induction"
_FOS_MAINT = "foscarnet label Table 13, maintenance"
_FOS_HD = "foscarnet label Table 13: < 0.4 mL/min/kg not recommended; hemodialysis has no label dose"

GANCICLOVIR_ROWS: tuple[DoseRow, ...] = (
    DoseRow(
        "ganciclovir",
        "induction",
        "label",
        at_least(70, ML_MIN),
        False,
        5.0,
        None,
        Q12H,
        f"{_GCV}, CrCl ≥ 70 mL/min; {_BANDS}",
    ),
    DoseRow(
        "ganciclovir",
        "induction",
        "label",
        closed_open(50, 70, ML_MIN),
        False,
        2.5,
        None,
        Q12H,
        f"{_GCV}, CrCl 50–69 mL/min; {_BANDS}",
    ),
    DoseRow(
        "ganciclovir",
        "induction",
        "label",
        closed_open(25, 50, ML_MIN),
        False,
        2.5,
        None,
        Q24H,
        f"{_GCV}, CrCl 25–49 mL/min; {_BANDS}",
    ),
    DoseRow(
        "ganciclovir",
        "induction",
        "label",
        closed_open(10, 25, ML_MIN),
        False,
        1.25,
        None,
        Q24H,
        f"{_GCV}, CrCl 10–24 mL/min; {_BANDS}",
    ),
    DoseRow(
        "ganciclovir",
        "induction",
        "label",
        below(10, ML_MIN),
        True,
        1.25,
        None,
        THRICE_WEEKLY_AFTER_HD,
        f"{_GCV}, CrCl < 10 mL/min (hemodialysis); {_BANDS}",
    ),
    DoseRow(
        "ganciclovir",
        "maintenance",
        "label",
        at_least(70, ML_MIN),
        False,
        5.0,
        None,
        Q24H,
        f"{_GCV}, CrCl ≥ 70 mL/min; {_BANDS}",
    ),
    DoseRow(
        "ganciclovir",
        "maintenance",
        "label",
        closed_open(50, 70, ML_MIN),
        False,
        2.5,
        None,
        Q24H,
        f"{_GCV}, CrCl 50–69 mL/min; {_BANDS}",
    ),
    DoseRow(
        "ganciclovir",
        "maintenance",
        "label",
        closed_open(25, 50, ML_MIN),
        False,
        1.25,
        None,
        Q24H,
        f"{_GCV}, CrCl 25–49 mL/min; {_BANDS}",
    ),
    DoseRow(
        "ganciclovir",
        "maintenance",
        "label",
        closed_open(10, 25, ML_MIN),
        False,
        0.625,
        None,
        Q24H,
        f"{_GCV}, CrCl 10–24 mL/min; {_BANDS}",
    ),
    DoseRow(
        "ganciclovir",
        "maintenance",
        "label",
        below(10, ML_MIN),
        True,
        0.625,
        None,
        THRICE_WEEKLY_AFTER_HD,
        f"{_GCV}, CrCl < 10 mL/min (hemodialysis); {_BANDS}",
    ),
)

VALGANCICLOVIR_ROWS: tuple[DoseRow, ...] = (
    DoseRow(
        "valganciclovir",
        "induction",
        "label",
        at_least(60, ML_MIN),
        False,
        None,
        900,
        TWICE_DAILY,
        f"{_VGC}, CrCl ≥ 60 mL/min; {_BANDS}",
    ),
    DoseRow(
        "valganciclovir",
        "induction",
        "label",
        closed_open(40, 60, ML_MIN),
        False,
        None,
        450,
        TWICE_DAILY,
        f"{_VGC}, CrCl 40–59 mL/min; {_BANDS}",
    ),
    DoseRow(
        "valganciclovir",
        "induction",
        "label",
        closed_open(25, 40, ML_MIN),
        False,
        None,
        450,
        ONCE_DAILY,
        f"{_VGC}, CrCl 25–39 mL/min; {_BANDS}",
    ),
    DoseRow(
        "valganciclovir",
        "induction",
        "label",
        closed_open(10, 25, ML_MIN),
        False,
        None,
        450,
        EVERY_2_DAYS,
        f"{_VGC}, CrCl 10–24 mL/min; {_BANDS}",
    ),
    DoseRow(
        "valganciclovir",
        "induction",
        "label",
        below(10, ML_MIN),
        True,
        None,
        None,
        None,
        f"{_VGC}, CrCl < 10 mL/min (on hemodialysis): not recommended",
    ),
    DoseRow(
        "valganciclovir",
        "maintenance",
        "label",
        at_least(60, ML_MIN),
        False,
        None,
        900,
        ONCE_DAILY,
        f"{_VGC}, CrCl ≥ 60 mL/min; {_BANDS}",
    ),
    DoseRow(
        "valganciclovir",
        "maintenance",
        "label",
        closed_open(40, 60, ML_MIN),
        False,
        None,
        450,
        ONCE_DAILY,
        f"{_VGC}, CrCl 40–59 mL/min; {_BANDS}",
    ),
    DoseRow(
        "valganciclovir",
        "maintenance",
        "label",
        closed_open(25, 40, ML_MIN),
        False,
        None,
        450,
        EVERY_2_DAYS,
        f"{_VGC}, CrCl 25–39 mL/min; {_BANDS}",
    ),
    DoseRow(
        "valganciclovir",
        "maintenance",
        "label",
        closed_open(10, 25, ML_MIN),
        False,
        None,
        450,
        TWICE_WEEKLY,
        f"{_VGC}, CrCl 10–24 mL/min; {_BANDS}",
    ),
    DoseRow(
        "valganciclovir",
        "maintenance",
        "label",
        below(10, ML_MIN),
        True,
        None,
        None,
        None,
        f"{_VGC}, CrCl < 10 mL/min (on hemodialysis): not recommended",
    ),
)

# Foscarnet columns (label Table 13; docs/clinical-basis.md §4.2). docs/policy.md §6: a draft matching either
# column is confirmed; the 90 mg/kg q12h induction column is proposed when a change is needed; maintenance
# starts at 90 mg/kg/day ("Most patients start at 90 mg/kg/day", label Dosage and Administration).
FOS_IND_60 = "equivalent to 60 mg/kg q8h"
FOS_IND_90 = "equivalent to 90 mg/kg q12h"
FOS_MAINT_90 = "equivalent to 90 mg/kg/day"
FOS_MAINT_120 = "equivalent to 120 mg/kg/day"
FOSCARNET_DEFAULT_COLUMN: dict[Phase, str] = {"induction": FOS_IND_90, "maintenance": FOS_MAINT_90}
FOSCARNET_ALTERNATIVE_COLUMN: dict[Phase, str] = {"induction": FOS_IND_60, "maintenance": FOS_MAINT_120}

_FOS_BANDS = (
    above(1.4, ML_MIN_KG),
    open_closed(1.0, 1.4, ML_MIN_KG),
    open_closed(0.8, 1.0, ML_MIN_KG),
    open_closed(0.6, 0.8, ML_MIN_KG),
    open_closed(0.5, 0.6, ML_MIN_KG),
    closed(0.4, 0.5, ML_MIN_KG),  # docs/policy.md §5: 0.4 belongs to the 0.4–0.5 band ("< 0.4" is excluded)
)
_FOS_COLUMNS: dict[tuple[Phase, str], tuple[tuple[float, Schedule], ...]] = {
    ("induction", FOS_IND_60): ((60, Q8H), (45, Q8H), (50, Q12H), (40, Q12H), (60, Q24H), (50, Q24H)),
    ("induction", FOS_IND_90): ((90, Q12H), (70, Q12H), (50, Q12H), (80, Q24H), (60, Q24H), (50, Q24H)),
    ("maintenance", FOS_MAINT_90): ((90, Q24H), (70, Q24H), (50, Q24H), (80, Q48H), (60, Q48H), (50, Q48H)),
    ("maintenance", FOS_MAINT_120): (
        (120, Q24H),
        (90, Q24H),
        (65, Q24H),
        (105, Q48H),
        (80, Q48H),
        (65, Q48H),
    ),
}
FOSCARNET_ROWS: tuple[DoseRow, ...] = tuple(
    row
    for (phase, column), doses in _FOS_COLUMNS.items()
    for row in (
        *(
            DoseRow(
                "foscarnet",
                phase,
                column,
                band,
                False,
                mg_per_kg,
                None,
                schedule,
                f"{_FOS_IND if phase == 'induction' else _FOS_MAINT}, {column}, CrCl {band.label()}; {_BANDS}",
            )
            for band, (mg_per_kg, schedule) in zip(_FOS_BANDS, doses, strict=True)
        ),
        DoseRow("foscarnet", phase, column, below(0.4, ML_MIN_KG), True, None, None, None, _FOS_HD),
    )
)

# Cidofovir (Vistide label, Dosage and Administration; docs/clinical-basis.md §5): 5 mg/kg once weekly × 2
# (induction), then once every 2 weeks. Renal eligibility is a start/no-start rule, not a band table
# (docs/policy.md §5).
_CDV = "Vistide label, Dosage and Administration"
CIDOFOVIR_ROWS: tuple[DoseRow, ...] = (
    DoseRow(
        "cidofovir",
        "induction",
        "label",
        above(55, ML_MIN),
        False,
        5.0,
        None,
        WEEKLY,
        _CDV + ", induction × 2 doses",
    ),
    DoseRow(
        "cidofovir",
        "maintenance",
        "label",
        above(55, ML_MIN),
        False,
        5.0,
        None,
        EVERY_2_WEEKS,
        _CDV + ", maintenance",
    ),
)
CIDOFOVIR_INDUCTION_DOSES = 2  # Vistide label: "once weekly for 2 consecutive weeks"
# Vistide label start criteria (docs/clinical-basis.md §5.2): SCr ≤ 1.5 mg/dL, CrCl > 55 mL/min, urine protein
# < 100 mg/dL (< 2+).
CIDOFOVIR_MAX_SCR_MG_DL = 1.5
CIDOFOVIR_MIN_CRCL_ML_MIN = 55.0
CIDOFOVIR_MAX_URINE_PROTEIN_MG_DL = 100.0

TABLES: dict[Drug, tuple[DoseRow, ...]] = {
    "ganciclovir": GANCICLOVIR_ROWS,
    "valganciclovir": VALGANCICLOVIR_ROWS,
    "foscarnet": FOSCARNET_ROWS,
    "cidofovir": CIDOFOVIR_ROWS,
}
CLEARANCE_UNIT: dict[Drug, str] = {
    "ganciclovir": ML_MIN,
    "valganciclovir": ML_MIN,
    "foscarnet": ML_MIN_KG,
    "cidofovir": ML_MIN,
}

# docs/policy.md §6 rounding: nearest 5 mg (ganciclovir, cidofovir) or 50 mg (foscarnet); valganciclovir in
# whole 450 mg tablets (its table doses are already whole tablets).
ROUNDING_MG: dict[Drug, float] = {
    "ganciclovir": 5.0,
    "cidofovir": 5.0,
    "foscarnet": 50.0,
    "valganciclovir": 450.0,
}

# docs/policy.md §6 course lengths, in days. Foscarnet: "2–3 weeks depending on clinical response" (label),
# proposed as the same 21-day course as ganciclovir.
INDUCTION_DAYS: dict[Drug, int] = {"ganciclovir": 21, "valganciclovir": 21, "foscarnet": 21, "cidofovir": 14}
COLITIS_DAYS = (21, 28)  # docs/policy.md §6: CMV colitis 21–28 days

# Infusion instructions (labels; docs/clinical-basis.md §2.3, §4.1, §5.1).
INFUSION_TEXT: dict[Drug, str] = {
    "ganciclovir": "infuse over 1 hour (no rapid or bolus injection; final concentration ≤ 10 mg/mL)",
    "foscarnet": (
        "infuse by pump at no more than 1 mg/kg/minute (90–120 mg/kg over 2 hours; 60 mg/kg over at least 1 hour)"
    ),
    "cidofovir": "infuse over 1 hour in 100 mL 0.9% saline",
    "valganciclovir": "take with food; do not break or crush tablets",
}


def round_dose(drug: Drug, exact_mg: float) -> float:
    """Round half up to the drug's increment (docs/policy.md §6)."""
    step = ROUNDING_MG[drug]
    return math.floor(exact_mg / step + 0.5) * step


def select_row(drug: Drug, phase: Phase, clearance: float | None, on_dialysis: bool, column: str = "label") -> DoseRow:
    """The table row for a clearance (or the dialysis row, docs/policy.md §4)."""
    rows = [r for r in TABLES[drug] if r.phase == phase and r.column == column]
    if not rows:
        raise KeyError(f"no {phase} rows for {drug} column {column!r}")
    if on_dialysis:
        dialysis_rows = [r for r in rows if r.hemodialysis]
        if dialysis_rows:
            return dialysis_rows[0]
    if clearance is None:
        raise ValueError("clearance is required when the patient is not dialysis-dependent")
    for row in rows:
        if row.band.contains(clearance):
            return row
    raise LookupError(f"no {drug} {phase} band for clearance {clearance}")
