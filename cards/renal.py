"""Creatinine clearance by Cockcroft-Gault (docs/policy.md §4; docs/clinical-basis.md §6) and the dosing weight.

CrCl (mL/min) = (140 − age) × weight / (72 × SCr), × 0.85 if female, with actual body weight, age in
completed years, SCr in mg/dL; no rounding before the band is chosen. The foscarnet table uses the
label's per-kilogram form (140 − age) / (72 × SCr) [× 0.85] in mL/min/kg (docs/clinical-basis.md §4.2).
For sex other than male/female, both are computed and the lower (female) value is used.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from cards.facts import Sex
from cards.units import CM_PER_INCH

CG_AGE_CONSTANT = 140.0  # docs/clinical-basis.md §6: (140 − age)
CG_SCR_FACTOR = 72.0  # docs/clinical-basis.md §6: 72 × SCr
CG_FEMALE_FACTOR = 0.85  # docs/clinical-basis.md §6: × 0.85 if female

# Adjusted body weight (docs/policy.md §4, optional): Devine IBW and AdjBW = IBW + 0.4 × (TBW − IBW),
# applied when BMI ≥ 30 (the labels name no weight: docs/clinical-basis.md §6).
ADJUSTED_WEIGHT_BMI_THRESHOLD = 30.0
DEVINE_BASE_KG = {"male": 50.0, "female": 45.5}  # docs/policy.md §4: male 50, female 45.5
DEVINE_KG_PER_INCH = 2.3  # docs/policy.md §4: + 2.3 × (height in inches − 60)
DEVINE_BASE_INCHES = 60.0
ADJUSTED_WEIGHT_FACTOR = 0.4  # docs/policy.md §4: IBW + 0.4 × (TBW − IBW)


# Clearance and DosingWeight, built on every call, spell out their __init__ (init=False): native constructors, see
# cards/model.py above Coding.
@dataclass(frozen=True, init=False)
class Clearance:
    """CrCl in mL/min and mL/min/kg, and how sex was handled."""

    ml_min: float
    ml_min_kg: float
    sex_basis: Literal["male", "female", "lower of male and female"]

    def __init__(
        self, ml_min: float, ml_min_kg: float, sex_basis: Literal["male", "female", "lower of male and female"]
    ) -> None:
        object.__setattr__(self, "ml_min", ml_min)
        object.__setattr__(self, "ml_min_kg", ml_min_kg)
        object.__setattr__(self, "sex_basis", sex_basis)


def cockcroft_gault(age_years: int, weight_kg: float, scr_mg_dl: float, sex: Sex) -> Clearance:
    """Cockcroft-Gault clearance; requires SCr > 0 and weight > 0 (callers check)."""
    per_kg_male = (CG_AGE_CONSTANT - age_years) / (CG_SCR_FACTOR * scr_mg_dl)
    if sex == "male":
        factor, basis = 1.0, "male"
    elif sex == "female":
        factor, basis = CG_FEMALE_FACTOR, "female"
    else:
        # docs/policy.md §4: compute both, use the lower (the female value, since 0.85 < 1).
        factor, basis = min(1.0, CG_FEMALE_FACTOR), "lower of male and female"
    per_kg = per_kg_male * factor
    return Clearance(ml_min=per_kg * weight_kg, ml_min_kg=per_kg, sex_basis=basis)  # type: ignore[arg-type]


@dataclass(frozen=True, init=False)
class DosingWeight:
    """The weight used for mg/kg doses, and why."""

    kg: float
    basis: str

    def __init__(self, kg: float, basis: str) -> None:
        object.__setattr__(self, "kg", kg)
        object.__setattr__(self, "basis", basis)


def dosing_weight(
    actual_kg: float, height_cm: float | None, sex: Sex, policy: Literal["actual", "adjusted"]
) -> DosingWeight:
    """Actual body weight, or adjusted body weight when the option is on and BMI ≥ 30 (docs/policy.md §4)."""
    if policy == "actual":
        return DosingWeight(actual_kg, "actual body weight (product policy §4)")
    if height_cm is None or height_cm <= 0:
        return DosingWeight(actual_kg, "actual body weight: adjusted weight needs a height, none recorded")
    bmi = actual_kg / (height_cm / 100.0) ** 2
    if bmi < ADJUSTED_WEIGHT_BMI_THRESHOLD:
        return DosingWeight(actual_kg, f"actual body weight (BMI {bmi:.1f} < {ADJUSTED_WEIGHT_BMI_THRESHOLD:g})")
    # Unknown sex: the female IBW is lower, the conservative choice as for CrCl.
    base = DEVINE_BASE_KG["male"] if sex == "male" else DEVINE_BASE_KG["female"]
    ibw = base + DEVINE_KG_PER_INCH * (height_cm / CM_PER_INCH - DEVINE_BASE_INCHES)
    if ibw >= actual_kg:
        return DosingWeight(actual_kg, f"actual body weight (BMI {bmi:.1f}; IBW {ibw:.1f} kg not lower)")
    adjusted = ibw + ADJUSTED_WEIGHT_FACTOR * (actual_kg - ibw)
    return DosingWeight(adjusted, f"adjusted body weight (BMI {bmi:.1f} ≥ 30; IBW {ibw:.1f} kg, product policy §4)")
