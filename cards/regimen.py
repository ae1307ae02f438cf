"""From patient facts to a regimen: clearance, table row, dose in mg — or why not.

The result is one of ``Regimen`` (a dose to propose), ``NotRecommended`` (what the available data proves: the
label's table says so, or a cidofovir start criterion fails) or ``Missing`` (data the decision needs is
absent or unusable, docs/policy.md §2: no dose is proposed). What is known outranks what is missing
(docs/policy.md §10): ``compute`` first looks for a "not recommended" that the available values already prove,
and only then asks for what is missing; a ``NotRecommended`` still names the inputs that were missing.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from typing import Literal

from cards import dosing
from cards.dosing import DoseRow, Drug, Phase, Schedule
from cards.facts import FAMILY_BY_FACT, NEPHROTOXIC_LOOKBACK_DAYS, Measurement, PatientFacts, Unusable, days
from cards.renal import Clearance, DosingWeight, cockcroft_gault, dosing_weight

ROUTE: dict[Drug, Literal["iv", "oral"]] = {
    "ganciclovir": "iv",
    "valganciclovir": "oral",
    "foscarnet": "iv",
    "cidofovir": "iv",
}
# docs/clinical-basis.md §5.4: serum creatinine and urine protein within 48 hours before each cidofovir dose. Results
# carry a date, not always a time: one dated today or yesterday is within 48 hours at any hour today; one from
# the day before may be up to 72 hours old, so it is stale (used, flagged, a repeat offered).
CIDOFOVIR_LAB_WINDOW_DAYS = 1
_CIDOFOVIR_CRITERIA = "Vistide label, Contraindications and Dosage and Administration (docs/clinical-basis.md §5.2)"


@dataclass(slots=True)
class MissingItem:
    """A value a decision needs: what it is, why it cannot be used, and the lab to order (if a lab)."""

    label: str
    reason: str
    lab_set: str | None  # ValueSet name of the LOINC code to order, None if not a lab


@dataclass(slots=True)
class Missing:
    drug: Drug
    items: tuple[MissingItem, ...]


@dataclass(slots=True)
class NotRecommended:
    drug: Drug
    reason: str
    source: str
    inputs: tuple[str, ...]
    missing: tuple[MissingItem, ...] = ()  # inputs not available, named on the card all the same


@dataclass(slots=True)
class StaleInput:
    label: str
    measurement: Measurement
    lab_set: str | None
    window_days: int


# Regimen and RenalInputs, built on every call, spell out their __init__ (init=False): native constructors, see
# cards/model.py above Coding.
@dataclass(slots=True, init=False)
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
    colitis_course: bool = False  # docs/policy.md §6: CMV colitis 21–28 days

    def __init__(
        self,
        drug: Drug,
        phase: Phase,
        row: DoseRow,
        dose_mg: float,
        exact_mg: float,
        route: Literal["iv", "oral"],
        schedule: Schedule,
        duration_days: int | None,
        count: int | None,
        weight: DosingWeight | None,
        clearance: Clearance | None,
        on_dialysis: bool,
        inputs: tuple[str, ...],
        stale: tuple[StaleInput, ...],
        colitis_course: bool = False,
    ) -> None:
        self.drug = drug
        self.phase = phase
        self.row = row
        self.dose_mg = dose_mg
        self.exact_mg = exact_mg
        self.route = route
        self.schedule = schedule
        self.duration_days = duration_days
        self.count = count
        self.weight = weight
        self.clearance = clearance
        self.on_dialysis = on_dialysis
        self.inputs = inputs
        self.stale = stale
        self.colitis_course = colitis_course

    @property
    def band_text(self) -> str:
        if self.on_dialysis and self.row.hemodialysis:
            return "dialysis-dependent: hemodialysis row (docs/policy.md §4)"
        return self.row.band.label()

    @property
    def hemodialysis_row_without_dialysis(self) -> bool:
        """The label's < 10 mL/min row assumes hemodialysis; the patient has no dialysis on record."""
        return self.row.hemodialysis and not self.on_dialysis and self.row.schedule is not None

    def summary_text(self) -> str:
        """The regimen in a few words ("ganciclovir 400 mg IV every 12 hours")."""
        return f"{self.drug} {self.dose_mg:g} mg {'IV' if self.route == 'iv' else 'PO'} {self.schedule.text}"


def describe(label: str, m: Measurement, today: dt.date, window: int | None) -> str:
    """One computation line: value, unit, date, source, code used, and staleness (docs/policy.md §2)."""
    old = window is not None and m.age_days(today) > window
    stale = f" — STALE: {m.age_days(today)} days old (window {days(window or 0)})" if old else ""
    reading = f"{m.reading} (≈ {m.value:g} {m.unit})" if m.reading else f"{m.comparator}{m.value:.4g} {m.unit}"
    code = f"; {m.code}" if m.code else ""
    return f"{label}: {reading} on {m.date.isoformat()} ({m.source}{code}){stale}"


@dataclass(slots=True, init=False)
class RenalInputs:
    """The inputs of Cockcroft-Gault, each a Measurement or why it is missing, and what follows from them."""

    weight: Measurement | MissingItem
    scr: Measurement | MissingItem
    age: int | None
    clearance: Clearance | None  # needs weight, SCr and age
    per_kg: float | None  # mL/min/kg: needs SCr and age only (the foscarnet form)
    lines: list[str] = field(default_factory=list)

    def __init__(
        self,
        weight: Measurement | MissingItem,
        scr: Measurement | MissingItem,
        age: int | None,
        clearance: Clearance | None,
        per_kg: float | None,
        lines: list[str] | None = None,
    ) -> None:
        self.weight = weight
        self.scr = scr
        self.age = age
        self.clearance = clearance
        self.per_kg = per_kg
        self.lines = [] if lines is None else lines


def _input(
    facts: PatientFacts, fact: str, lab_set: str | None, zero_allowed: bool = False
) -> Measurement | MissingItem:
    """A measured input, or why it is missing. Only urine protein may be 0 (none detected)."""
    value: Measurement | Unusable | None = facts.lab(fact)
    label = FAMILY_BY_FACT[fact].label
    if value is None:
        return MissingItem(label, "no result on record", lab_set)
    if isinstance(value, Unusable):
        return MissingItem(
            label, f"latest result ({value.date.isoformat()}, {value.source}) unusable: {value.reason}", lab_set
        )
    if value.value < 0 or (value.value == 0 and not zero_allowed):
        return MissingItem(label, f"latest result ({value.date.isoformat()}) is not a positive number", lab_set)
    if value.comparator and not zero_allowed:
        # A dose is computed from a value, not a bound: "< 0.3 mg/dL" does not say how high the clearance is.
        return MissingItem(
            label,
            f"latest result ({value.date.isoformat()}, {value.source}) is a bound, "
            f"'{value.shown()} {value.unit}', not a value",
            lab_set,
        )
    return value


def renal_inputs(facts: PatientFacts) -> RenalInputs:
    """Weight, serum creatinine, age and the clearances they give (docs/clinical-basis.md §6)."""
    weight = _input(facts, "weight", None)
    scr = _input(facts, "creatinine", "SerumCreatinine")
    lines = []
    if facts.age_years is not None:
        lines.append(f"Age: {facts.age_years} years; sex: {facts.sex}")
    if isinstance(weight, Measurement):
        lines.append(describe("Weight", weight, facts.today, FAMILY_BY_FACT["weight"].freshness_days))
    if isinstance(scr, Measurement):
        lines.append(describe("Serum creatinine", scr, facts.today, FAMILY_BY_FACT["creatinine"].freshness_days))
    clearance = per_kg = None
    if isinstance(scr, Measurement) and facts.age_years is not None:
        unit_weight = cockcroft_gault(facts.age_years, 1.0, scr.value, facts.sex)
        per_kg = unit_weight.ml_min_kg
        if isinstance(weight, Measurement):
            clearance = cockcroft_gault(facts.age_years, weight.value, scr.value, facts.sex)
            lines.append(
                f"CrCl (Cockcroft-Gault, actual weight, {clearance.sex_basis}): {clearance.ml_min:.1f} mL/min "
                f"= {clearance.ml_min_kg:.3f} mL/min/kg"
            )
        else:
            lines.append(
                f"CrCl per kg (Cockcroft-Gault, {unit_weight.sex_basis}): {per_kg:.3f} mL/min/kg "
                "(no weight: the mL/min value is not known)"
            )
    if facts.dialysis is not None:
        lines.append(f"Dialysis dependence: {facts.dialysis.label} ({facts.dialysis.source})")
    return RenalInputs(weight, scr, facts.age_years, clearance, per_kg, lines)


def _age_missing() -> MissingItem:
    return MissingItem("age", "patient birth date not available or implausible", None)


def _renal_missing(renal: RenalInputs, needs_renal: bool) -> list[MissingItem]:
    missing = [item for item in (renal.weight,) if isinstance(item, MissingItem)]
    if needs_renal:
        if isinstance(renal.scr, MissingItem):
            missing.append(renal.scr)
        if renal.age is None:
            missing.append(_age_missing())
    return missing


@dataclass(slots=True)
class CidofovirCheck:
    """The cidofovir start criteria on the available data: which fail, which cannot be checked, which hold."""

    failed: list[str]
    missing: list[MissingItem]
    met: list[str]


def cidofovir_criteria(facts: PatientFacts, renal: RenalInputs) -> CidofovirCheck:
    """docs/policy.md §5: SCr ≤ 1.5 mg/dL, CrCl > 55 mL/min, urine protein < 100 mg/dL (< 2+), no nephrotoxic
    agent in the last 7 days, not dialysis-dependent. Each criterion is judged on what is known."""
    check = CidofovirCheck([], [], [])
    if facts.dialysis is not None:
        check.failed.append(f"dialysis-dependent ({facts.dialysis.source}): CrCl > 55 mL/min cannot be met")
    scr = facts.lab("creatinine")  # a bound (> 2 mg/dL) proves this criterion though it cannot dose
    if isinstance(scr, Measurement) and scr.above(dosing.CIDOFOVIR_MAX_SCR_MG_DL):
        shown = f"{scr.comparator} {scr.value:.2f}".strip()
        check.failed.append(f"serum creatinine {shown} mg/dL > {dosing.CIDOFOVIR_MAX_SCR_MG_DL} mg/dL")
    elif isinstance(renal.scr, MissingItem):
        check.missing.append(renal.scr)
    if renal.clearance is not None:
        if renal.clearance.ml_min <= dosing.CIDOFOVIR_MIN_CRCL_ML_MIN:
            check.failed.append(
                f"CrCl {renal.clearance.ml_min:.1f} mL/min ≤ {dosing.CIDOFOVIR_MIN_CRCL_ML_MIN:g} mL/min"
            )
    elif renal.age is None:
        check.missing.append(_age_missing())
    protein = _input(facts, "urine_protein", "UrineProtein", zero_allowed=True)
    limit = dosing.CIDOFOVIR_MAX_URINE_PROTEIN_MG_DL
    below = protein.below(limit) if isinstance(protein, Measurement) else None
    if isinstance(protein, Measurement) and below is False:
        shown = f"{protein.reading} (test strip)" if protein.reading else f"{protein.shown()} mg/dL"
        check.failed.append(f"urine protein {shown} ≥ {limit:g} mg/dL (2+)")
    elif isinstance(protein, Measurement) and below:
        check.met.append(describe("Urine protein", protein, facts.today, CIDOFOVIR_LAB_WINDOW_DAYS))
    elif isinstance(protein, Measurement):
        reason = (
            f"latest result ({protein.date.isoformat()}, {protein.source}) '{protein.shown()} mg/dL' does not say "
            f"whether it is below {limit:g} mg/dL"
        )
        check.missing.append(MissingItem(FAMILY_BY_FACT["urine_protein"].label, reason, "UrineProtein"))
    else:
        check.missing.append(protein)
    # The label: such agents "must be discontinued at least seven days prior": given today-6 .. today bars cidofovir.
    lookback = facts.today - dt.timedelta(days=NEPHROTOXIC_LOOKBACK_DAYS - 1)
    recent = [
        m
        for m in facts.medications
        if "NephrotoxicDrugs" in m.sets and "Cidofovir" not in m.sets and m.exposed_between(lookback, facts.today)
    ]
    if recent:
        names = ", ".join(sorted({f"{m.name} ({m.status}, {m.source})" for m in recent}))
        check.failed.append(f"nephrotoxic agent within the last {NEPHROTOXIC_LOOKBACK_DAYS} days: {names}")
    return check


def _not_recommended(
    drug: Drug, phase: Phase, facts: PatientFacts, renal: RenalInputs, check: CidofovirCheck | None
) -> NotRecommended | None:
    """A "not recommended" the available data proves (docs/policy.md §10), whatever else is missing. ``check``:
    the cidofovir start criteria, for cidofovir."""
    if check is not None:
        if not check.failed:
            return None
        return NotRecommended(
            drug, "; ".join(check.failed), _CIDOFOVIR_CRITERIA, tuple(renal.lines + check.met), tuple(check.missing)
        )
    if drug not in ("valganciclovir", "foscarnet"):
        return None
    # Foscarnet's table is per kilogram, so its clearance needs no weight; valganciclovir's needs one.
    if drug == "foscarnet":
        column, value = dosing.FOSCARNET_DEFAULT_COLUMN[phase], renal.per_kg
    else:
        column, value = "label", renal.clearance.ml_min if renal.clearance is not None else None
    on_dialysis = facts.dialysis is not None
    if not on_dialysis and value is None:
        return None
    row = dosing.select_row(drug, phase, value, on_dialysis, column)
    if row.schedule is not None:
        return None
    missing = _renal_missing(renal, needs_renal=not on_dialysis)
    return NotRecommended(drug, row.source, row.source, tuple(renal.lines), tuple(missing))


def compute(
    drug: Drug,
    phase: Phase,
    facts: PatientFacts,
    weight_policy: Literal["actual", "adjusted"],
    column: str | None = None,
    colitis: bool = False,
) -> Regimen | Missing | NotRecommended:
    """The regimen of ``drug`` for this patient, per the label table and docs/policy.md §4-§6."""
    renal = renal_inputs(facts)
    check = cidofovir_criteria(facts, renal) if drug == "cidofovir" else None
    verdict = _not_recommended(drug, phase, facts, renal, check)
    if verdict is not None:
        return verdict
    on_dialysis = facts.dialysis is not None
    needs_renal = not (on_dialysis and drug in ("ganciclovir", "valganciclovir", "foscarnet"))
    missing = _renal_missing(renal, needs_renal)
    extra_inputs: list[str] = []
    if check is not None:
        missing += [item for item in check.missing if item.label not in {m.label for m in missing}]
        extra_inputs = [*check.met, f"Cidofovir start criteria met ({_CIDOFOVIR_CRITERIA})"]
    if missing:
        return Missing(drug, tuple(missing))
    weight = renal.weight
    assert isinstance(weight, Measurement)
    inputs = list(renal.lines) + extra_inputs
    stale: list[StaleInput] = []
    windows: list[tuple[str, Measurement | MissingItem | Unusable | None, str | None, int | None]] = [
        ("weight", weight, None, FAMILY_BY_FACT["weight"].freshness_days),
        ("creatinine", renal.scr, "SerumCreatinine", FAMILY_BY_FACT["creatinine"].freshness_days),
    ]
    if drug == "cidofovir":  # the label: creatinine and urine protein within 48 hours before each dose
        windows[1] = ("creatinine", renal.scr, "SerumCreatinine", CIDOFOVIR_LAB_WINDOW_DAYS)
        windows.append(("urine_protein", facts.lab("urine_protein"), "UrineProtein", CIDOFOVIR_LAB_WINDOW_DAYS))
    for fact, measured, lab_set, window in windows:
        if (
            isinstance(measured, Measurement)
            and window is not None
            and measured.age_days(facts.today) > window
            and (fact == "weight" or needs_renal)
        ):
            stale.append(StaleInput(FAMILY_BY_FACT[fact].label, measured, lab_set, window))

    column = column or (dosing.FOSCARNET_DEFAULT_COLUMN[phase] if drug == "foscarnet" else "label")
    renal_value = None
    if renal.clearance is not None:
        unit = dosing.CLEARANCE_UNIT[drug]
        renal_value = renal.clearance.ml_min_kg if unit == dosing.ML_MIN_KG else renal.clearance.ml_min
    row = dosing.select_row(drug, phase, renal_value, on_dialysis and drug != "cidofovir", column)
    if row.schedule is None:
        return NotRecommended(drug, row.source, row.source, tuple(inputs))

    height = facts.height.value if isinstance(facts.height, Measurement) else None
    dosing_wt = dosing_weight(weight.value, height, facts.sex, weight_policy)
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
        clearance=renal.clearance,
        on_dialysis=on_dialysis,
        inputs=tuple(inputs),
        stale=tuple(stale),
        colitis_course=colitis_course,
    )
