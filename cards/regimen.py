"""From patient facts to a regimen: clearance, table row, dose in mg — or what is missing.

The result is one of ``Regimen`` (a dose to propose), ``Missing`` (data the dose needs is absent,
unusable; policy.md §2: no dose is proposed) or ``NotRecommended`` (the label's table says so, or the
cidofovir start criteria are not met).
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Literal

from cards import dosing
from cards.dosing import DoseRow, Drug, Phase, Schedule
from cards.facts import FRESHNESS_DAYS, NEPHROTOXIC_LOOKBACK_DAYS, Measurement, PatientFacts, Unusable
from cards.renal import Clearance, DosingWeight, cockcroft_gault, dosing_weight

ROUTE: dict[Drug, Literal["iv", "oral"]] = {
    "ganciclovir": "iv",
    "valganciclovir": "oral",
    "foscarnet": "iv",
    "cidofovir": "iv",
}


@dataclass(frozen=True)
class MissingItem:
    """A value the dose needs: what it is, why it cannot be used, and the lab to order (if a lab)."""

    label: str
    reason: str
    lab_set: str | None  # ValueSet name of the LOINC code to order, None if not a lab


@dataclass(frozen=True)
class Missing:
    drug: Drug
    items: tuple[MissingItem, ...]


@dataclass(frozen=True)
class NotRecommended:
    drug: Drug
    reason: str
    source: str
    inputs: tuple[str, ...]


@dataclass(frozen=True)
class StaleInput:
    label: str
    measurement: Measurement
    lab_set: str | None
    window_days: int


@dataclass(frozen=True)
class Regimen:
    drug: Drug
    phase: Phase
    row: DoseRow
    dose_mg: float
    exact_mg: float
    route: Literal["iv", "oral"]
    schedule: Schedule
    duration_days: int | None
    count: int | None
    weight: DosingWeight | None
    clearance: Clearance | None
    on_dialysis: bool
    inputs: tuple[str, ...]  # one line per input, for the card's computation section
    stale: tuple[StaleInput, ...]
    colitis_course: bool = False  # policy.md §5: CMV colitis 21–28 days

    @property
    def band_text(self) -> str:
        if self.on_dialysis and self.row.hemodialysis:
            return "dialysis-dependent: hemodialysis row (policy.md §3)"
        return self.row.band.label()

    def summary_text(self) -> str:
        return (
            f"{self.drug} {self.dose_mg:g} mg {self.route.upper() if self.route == 'iv' else 'PO'} {self.schedule.text}"
        )


def _measurement(value: Measurement | Unusable | None, label: str, lab_set: str | None) -> Measurement | MissingItem:
    if value is None:
        return MissingItem(label, "no result on record", lab_set)
    if isinstance(value, Unusable):
        return MissingItem(
            label,
            f"latest result ({value.date.isoformat()}, {value.source}) unusable: {value.reason}",
            lab_set,
        )
    if value.value <= 0:
        return MissingItem(label, f"latest result ({value.date.isoformat()}) is not a positive number", lab_set)
    return value


def describe(label: str, m: Measurement, today: dt.date, window: int | None) -> str:
    """One computation line: value, unit, date, source, and staleness (policy.md §2)."""
    stale = f" — STALE: {m.age_days(today)} days old (window {window} days)" if window is not None and m.stale else ""
    return f"{label}: {m.value:.4g} {m.unit} on {m.date.isoformat()} ({m.source}){stale}"


def compute(
    drug: Drug,
    phase: Phase,
    facts: PatientFacts,
    weight_policy: Literal["actual", "adjusted"],
    column: str | None = None,
    colitis: bool = False,
) -> Regimen | Missing | NotRecommended:
    """The regimen of ``drug`` for this patient, per the label table and policy.md §3-§5."""
    on_dialysis = facts.dialysis is not None
    missing: list[MissingItem] = []
    inputs: list[str] = []
    stale: list[StaleInput] = []

    weight = _measurement(facts.weight, "body weight", None)
    needs_renal = not (on_dialysis and drug in ("ganciclovir", "valganciclovir", "foscarnet"))
    scr = _measurement(facts.creatinine, "serum creatinine", "SerumCreatinine") if needs_renal else None
    if isinstance(weight, MissingItem):
        missing.append(weight)
    if isinstance(scr, MissingItem):
        missing.append(scr)
    if needs_renal and facts.age_years is None:
        missing.append(MissingItem("age", "patient birth date not available or implausible", None))
    if missing:
        return Missing(drug, tuple(missing))
    assert isinstance(weight, Measurement)

    if facts.age_years is not None:
        inputs.append(f"Age: {facts.age_years} years; sex: {facts.sex}")
    inputs.append(describe("Weight", weight, facts.today, FRESHNESS_DAYS["weight"]))
    if weight.stale:
        stale.append(StaleInput("body weight", weight, None, FRESHNESS_DAYS["weight"]))
    clearance: Clearance | None = None
    if isinstance(scr, Measurement):
        inputs.append(describe("Serum creatinine", scr, facts.today, FRESHNESS_DAYS["creatinine"]))
        if scr.stale:
            stale.append(StaleInput("serum creatinine", scr, "SerumCreatinine", FRESHNESS_DAYS["creatinine"]))
        assert facts.age_years is not None
        clearance = cockcroft_gault(facts.age_years, weight.value, scr.value, facts.sex)
        inputs.append(
            f"CrCl (Cockcroft-Gault, actual weight, {clearance.sex_basis}): {clearance.ml_min:.1f} mL/min "
            f"= {clearance.ml_min_kg:.3f} mL/min/kg (policy.md §3)"
        )
    if on_dialysis and facts.dialysis is not None:
        inputs.append(f"Dialysis dependence: {facts.dialysis.label} ({facts.dialysis.source})")

    if drug == "cidofovir":
        verdict = cidofovir_eligibility(facts, clearance, scr if isinstance(scr, Measurement) else None)
        if isinstance(verdict, Missing | NotRecommended):
            return verdict
        inputs.extend(verdict)

    column = column or (dosing.FOSCARNET_DEFAULT_COLUMN[phase] if drug == "foscarnet" else "label")
    renal_value = None
    if clearance is not None:
        renal_value = clearance.ml_min_kg if dosing.CLEARANCE_UNIT[drug] == dosing.ML_MIN_KG else clearance.ml_min
    row = dosing.select_row(drug, phase, renal_value, on_dialysis and drug != "cidofovir", column)
    if row.schedule is None:
        return NotRecommended(drug, f"{row.source}", row.source, tuple(inputs))

    dosing_wt = dosing_weight(weight.value, _height_cm(facts), facts.sex, weight_policy)
    if row.mg_per_kg is not None:
        exact = row.mg_per_kg * dosing_wt.kg
        inputs.append(f"Dosing weight: {dosing_wt.kg:.1f} kg, {dosing_wt.basis}")
    else:
        assert row.fixed_mg is not None
        exact = row.fixed_mg
    dose = dosing.round_dose(drug, exact)
    duration: int | None = None
    count: int | None = None
    colitis_course = phase == "induction" and colitis and drug in ("ganciclovir", "foscarnet")
    if phase == "induction":
        duration = dosing.COLITIS_DAYS[0] if colitis_course else dosing.INDUCTION_DAYS[drug]
        if drug == "cidofovir":
            count = dosing.CIDOFOVIR_INDUCTION_DOSES
    return Regimen(
        drug=drug,
        phase=phase,
        row=row,
        dose_mg=dose,
        exact_mg=exact,
        route=ROUTE[drug],
        schedule=row.schedule,
        duration_days=duration,
        count=count,
        weight=dosing_wt if row.mg_per_kg is not None else None,
        clearance=clearance,
        on_dialysis=on_dialysis,
        inputs=tuple(inputs),
        stale=tuple(stale),
        colitis_course=colitis_course,
    )


def _height_cm(facts: PatientFacts) -> float | None:
    return facts.height.value if isinstance(facts.height, Measurement) else None


def cidofovir_eligibility(
    facts: PatientFacts, clearance: Clearance | None, scr: Measurement | None
) -> tuple[str, ...] | Missing | NotRecommended:
    """policy.md §4 / clinical.md §4: SCr ≤ 1.5, CrCl > 55, urine protein < 100 mg/dL (< 2+), and no
    nephrotoxic agent in the last 7 days. Returns the lines that show eligibility, or why not."""
    source = "clinical.md §4 (Vistide label contraindications); policy.md §4"
    if facts.dialysis is not None:
        return NotRecommended(
            "cidofovir", "dialysis-dependent: the start criteria (CrCl > 55 mL/min) cannot be met", source, ()
        )
    protein = _measurement(facts.urine_protein, "urine protein", "UrineProtein")
    if isinstance(protein, MissingItem):
        return Missing("cidofovir", (protein,))
    assert scr is not None
    assert clearance is not None
    reasons = []
    if scr.value > dosing.CIDOFOVIR_MAX_SCR_MG_DL:
        reasons.append(f"serum creatinine {scr.value:.2f} mg/dL > {dosing.CIDOFOVIR_MAX_SCR_MG_DL} mg/dL")
    if clearance.ml_min <= dosing.CIDOFOVIR_MIN_CRCL_ML_MIN:
        reasons.append(f"CrCl {clearance.ml_min:.1f} mL/min ≤ {dosing.CIDOFOVIR_MIN_CRCL_ML_MIN:g} mL/min")
    if protein.value >= dosing.CIDOFOVIR_MAX_URINE_PROTEIN_MG_DL:
        reasons.append(f"urine protein {protein.value:g} mg/dL ≥ {dosing.CIDOFOVIR_MAX_URINE_PROTEIN_MG_DL:g} mg/dL")
    lookback = facts.today.toordinal() - NEPHROTOXIC_LOOKBACK_DAYS
    recent = [
        m
        for m in facts.medications
        if "NephrotoxicDrugs" in m.sets
        and "Cidofovir" not in m.sets
        and (m.active_on(facts.today) or (m.end is not None and m.end.toordinal() >= lookback))
    ]
    if recent:
        names = ", ".join(sorted({m.name for m in recent}))
        reasons.append(f"nephrotoxic agent active within {NEPHROTOXIC_LOOKBACK_DAYS} days ({names})")
    protein_line = f"Urine protein: {protein.value:g} mg/dL on {protein.date.isoformat()} ({protein.source})"
    if reasons:
        return NotRecommended("cidofovir", "; ".join(reasons), source, (protein_line,))
    return (protein_line, f"Cidofovir start criteria met ({source})")
