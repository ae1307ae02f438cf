"""Unit conversion for the values the rules read (docs/policy.md §3: an unknown unit is missing, never guessed).

Units are recognised by UCUM code first, then by the printed unit. Each table maps a unit to the
factor that converts it to the canonical unit of the quantity.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any, Final

# Serum creatinine → mg/dL. µmol/L ÷ 88.4 (docs/policy.md §3; docs/clinical-basis.md §6).
CREATININE_UMOL_PER_MG_DL = 88.4
CREATININE_TO_MG_DL: dict[str, float] = {
    "mg/dl": 1.0,
    "mg/l": 0.1,
    "umol/l": 1.0 / CREATININE_UMOL_PER_MG_DL,
}

# Body weight → kg: kg, g or lb ([lb_av]) per docs/policy.md §3. 0.45359237 kg is the UCUM definition of
# [lb_av] (the international avoirdupois pound); the reference names the unit, not the factor.
KG_PER_LB = 0.45359237
WEIGHT_TO_KG: dict[str, float] = {
    "kg": 1.0,
    "g": 0.001,
    "[lb_av]": KG_PER_LB,
    "lb": KG_PER_LB,
    "lbs": KG_PER_LB,
}

# Body height → cm (only for the optional adjusted-weight policy, docs/policy.md §4). 2.54 cm per inch is
# the UCUM definition of [in_i].
CM_PER_INCH = 2.54
HEIGHT_TO_CM: dict[str, float] = {"cm": 1.0, "m": 100.0, "[in_i]": CM_PER_INCH, "in": CM_PER_INCH}

# Blood counts → cells/µL: /uL, 10*3/uL or 10*9/L (docs/policy.md §3). 10^9/L = 10^3/µL.
COUNT_TO_PER_UL: dict[str, float] = {
    "/ul": 1.0,
    "{cells}/ul": 1.0,
    "cells/ul": 1.0,
    "/mm3": 1.0,
    "10*3/ul": 1000.0,
    "10^3/ul": 1000.0,
    "x10*3/ul": 1000.0,
    "x10^3/ul": 1000.0,
    "x10e3/ul": 1000.0,
    "10e3/ul": 1000.0,
    "10*3/mm3": 1000.0,
    "k/ul": 1000.0,
    "thou/ul": 1000.0,
    "10*9/l": 1000.0,
    "10^9/l": 1000.0,
    "x10*9/l": 1000.0,
    "x10^9/l": 1000.0,
    "x10e9/l": 1000.0,
    "10e9/l": 1000.0,
}

# Hemoglobin → g/dL: g/dL or g/L (docs/policy.md §3).
HEMOGLOBIN_TO_G_DL: dict[str, float] = {"g/dl": 1.0, "g/l": 0.1}

# Urine protein → mg/dL: the cidofovir label's unit (docs/clinical-basis.md §5.2, "< 100 mg/dL"); g/L is
# the SI unit some laboratories report (1 g/L = 100 mg/dL).
URINE_PROTEIN_TO_MG_DL: dict[str, float] = {"mg/dl": 1.0, "g/l": 100.0, "mg/l": 0.1}

# Urine protein by test strip (docs/clinical-basis.md §9): the printed grades and the nominal concentration each
# stands for on the strip's colour chart, in mg/dL. The cidofovir limit "urine protein < 100 mg/dL (< 2+)"
# (docs/policy.md §5) puts 2+ at the limit (the label: "equivalent to < 2+ proteinuria"); the nominal values
# are only used to compare with it.
URINE_PROTEIN_STRIP_MG_DL: dict[str, float] = {
    "negative": 0.0,
    "trace": 15.0,
    "1+": 30.0,
    "2+": 100.0,
    "3+": 300.0,
    "4+": 1000.0,
}
# The same grades as SNOMED CT answer codes (docs/clinical-basis.md §9: IHE mAPS "Presence in urine" value set).
URINE_PROTEIN_STRIP_SNOMED: dict[str, str] = {
    "167273002": "negative",
    "167274008": "trace",
    "167275009": "1+",
    "167276005": "2+",
    "167277001": "3+",
    "167278006": "4+",
}
_STRIP_SYNONYMS = {
    "neg": "negative",
    "nil": "negative",
    "tr": "trace",
    "+": "1+",
    "++": "2+",
    "+++": "3+",
    "++++": "4+",
}


_STRIP_GRADE = re.compile(r"^\s*(negative|neg|nil|trace|tr|[1-4]\s*\+|\+\s*[1-4]|\+{1,4})(?![\w+])", re.IGNORECASE)
_STRIP_AMOUNT = re.compile(r"^\s*(<=|>=|≤|≥|<|>)?\s*(\d+(?:\.\d+)?)\s*(mg/dl|mg/l|g/l)\b", re.IGNORECASE)


def normalise_strip_reading(text: str) -> str:
    """A test-strip reading as the scale keys write it, from its leading grade: "2 +", "++", "+2",
    "2+ (100 mg/dL)" → "2+"; "Trace" → "trace". Text with no leading grade is returned lower-cased."""
    match = _STRIP_GRADE.match(text)
    if match is None:
        return " ".join(text.strip().lower().split())
    key = "".join(match.group(1).lower().split())
    if key.startswith("+") and key[1:].isdigit():
        key = key[1:] + "+"  # "+2" → "2+"
    return _STRIP_SYNONYMS.get(key, key)


def strip_amount(text: str) -> tuple[str, float] | None:
    """A urine protein amount written as text with its unit (">= 300 mg/dL", "30 mg/dL", "0.3 g/L"): the
    comparator ("" when exact) and the value in mg/dL; None when the text carries no amount with a known unit."""
    match = _STRIP_AMOUNT.match(text)
    if match is None:
        return None
    comparator = {"≤": "<=", "≥": ">="}.get(match.group(1) or "", match.group(1) or "")
    return comparator, float(match.group(2)) * URINE_PROTEIN_TO_MG_DL[match.group(3).lower()]


# CMV DNA → IU/mL (docs/clinical-basis.md §9: WHO IU/mL calibrated assays).
VIRAL_LOAD_TO_IU_ML: dict[str, float] = {"[iu]/ml": 1.0, "iu/ml": 1.0}
VIRAL_LOAD_COPIES: dict[str, float] = {"{copies}/ml": 1.0, "copies/ml": 1.0, "1/ml": 1.0}  # UCUM 1/mL: a count per mL


# Units already keyed, across calls: every result of a laboratory spells its unit the same way, and keying one costs
# six string operations. Bounded, as units are the client's text: emptied when full (so junk cannot keep the real
# spellings out for good), and a spelling longer than any unit is keyed without being kept.
_UNIT_KEYS: Final[dict[str, str]] = {}  # Final: compiled, a C static, no module-dict lookup
_UNIT_KEYS_MAX = 1024
_CACHEABLE_UNIT = 64


def unit_key(unit: str) -> str:
    """A unit as the tables write it: lower case, no spaces, micro as "u" ("µmol/L", "μmol/L" → "umol/l"),
    a multiplication sign as "x" ("×10^9/L" → "x10^9/l")."""
    key = _UNIT_KEYS.get(unit)
    if key is None:
        key = "".join(unit.split()).lower().replace("µ", "u").replace("μ", "u").replace("×", "x")
        if len(unit) <= _CACHEABLE_UNIT:
            if len(_UNIT_KEYS) >= _UNIT_KEYS_MAX:
                _UNIT_KEYS.clear()  # a dict's single operations are atomic under the GIL: threads may share it
            _UNIT_KEYS[unit] = key
    return key


def quantity_in(quantity: Any, table: Mapping[str, float]) -> float | None:
    """The value of a FHIR Quantity converted by ``table``; None if absent, non-numeric or unknown unit."""
    if not isinstance(quantity, dict):
        return None
    value = quantity.get("value")
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        return None
    try:
        number = float(value)
    except ValueError:
        return None
    if number != number or number in (float("inf"), float("-inf")):
        return None
    for key in (quantity.get("code"), quantity.get("unit")):
        if isinstance(key, str):
            factor = table.get(unit_key(key))
            if factor is not None:
                return number * factor
    return None


def unit_label(quantity: Any) -> str:
    """The unit as the source wrote it, for a card that says which unit was not recognised."""
    if isinstance(quantity, dict):
        for key in ("unit", "code"):
            if isinstance(quantity.get(key), str) and quantity[key].strip():
                return str(quantity[key])[:32]
    return "no unit"
