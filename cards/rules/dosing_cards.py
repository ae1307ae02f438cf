"""Missing data, and dosing: the draft corrected to the computed regimen (`dose-adjust`), or confirmed with the
monitoring it needs (`dose-confirmed-monitoring`, docs/policy.md §12)."""

from __future__ import annotations

from collections.abc import Sequence

from cards import dosing
from cards.dosing import Schedule
from cards.model import Card, Suggestion
from cards.orders import OrderFact
from cards.regimen import Missing, Regimen
from cards.rules.common import (
    FOSCARNET_HYDRATION,
    GCV_VGC_DRUGS,
    Context,
    card,
    computation_lines,
    count_gap_lines,
    count_gap_suggestions,
    count_gaps,
    differences,
    lab_order,
    missing_lab_suggestions,
    missing_lines,
    regimen_text,
    route_text,
    stale_lines,
    stale_suggestions,
    update_action,
)
from cards.sources import LABEL, LABELS, policy, source_line

# docs/policy.md §12 monitoring schedules.
WEEKLY = Schedule(1, 1, "wk", "weekly")  # weekly CMV PCR
TWICE_WEEKLY = Schedule(2, 1, "wk", "twice weekly")  # CBC twice weekly in induction
CHEMISTRY_FOSCARNET = Schedule(2, 1, "wk", "2–3 times weekly")  # foscarnet chemistry (frequencyMax 3)
CHEMISTRY_FOSCARNET_MAX = 3


def missing_data(ctx: Context, order: OrderFact) -> list[Card]:
    """No dose when a value it needs is missing or unusable: a warning naming it, and the lab to order
    (docs/policy.md §2)."""
    missing = ctx.regimen(order.drug, ctx.phase(order.drug, order))
    if not isinstance(missing, Missing):
        return []
    drug = order.drug
    labels = ", ".join(item.label for item in missing.items)
    detail = [
        f"No {drug} dose is proposed: the dose needs values that are missing or unusable.",
        "",
        *missing_lines(missing.items),
        "",
        *(["Record a current body weight."] if any(i.label == "body weight" for i in missing.items) else []),
        *(["The missing labs can be ordered below."] if any(i.lab_set for i in missing.items) else []),
        "",
        source_line(LABEL[drug], policy(2)),
    ]
    return [
        card(
            "dose-missing-data",
            f"{drug.capitalize()} dose not computed: missing {labels}",
            "warning",
            detail,
            LABEL[drug],
            missing_lab_suggestions(ctx, missing.items),
        )
    ]


def _renal_short(regimen: Regimen) -> str:
    if regimen.on_dialysis and regimen.row.hemodialysis:
        return "hemodialysis"
    if regimen.clearance is None:
        return "renal function not used"
    if dosing.CLEARANCE_UNIT[regimen.drug] == dosing.ML_MIN_KG:
        return f"CrCl {regimen.clearance.ml_min_kg:.2f} mL/min/kg"
    return f"CrCl {regimen.clearance.ml_min:.0f} mL/min"


def _foscarnet_columns(ctx: Context, order: OrderFact, regimen: Regimen) -> tuple[Regimen | None, list[str]]:
    """Both label columns of foscarnet's table (docs/policy.md §6): the other column's regimen when the draft
    matches it, and the lines naming the alternative column."""
    other_column = dosing.FOSCARNET_ALTERNATIVE_COLUMN[regimen.phase]
    other = ctx.regimen("foscarnet", regimen.phase, other_column)
    if not isinstance(other, Regimen):
        return None, [FOSCARNET_HYDRATION]
    matches = not differences(order.dose, other)
    lines = [
        FOSCARNET_HYDRATION,
        f"Both label columns are regimens for this band: {regimen.row.dose_text()} ({regimen.row.column}) = "
        f"{regimen.dose_mg:g} mg {regimen.schedule.text}, or {other.row.dose_text()} ({other.row.column}) = "
        f"{other.dose_mg:g} mg {other.schedule.text} ({LABELS['foscarnet'].name}, Table 13; {policy(6)}).",
    ]
    return (other if matches else None), lines


def dose(ctx: Context, order: OrderFact) -> list[Card]:
    """The dose card: correction (``update``) when the draft differs from the regimen; else the monitoring card."""
    phase, why = ctx.phase_and_reason(order.drug, order)
    regimen = ctx.regimen(order.drug, phase)
    if not isinstance(regimen, Regimen):
        return []
    extra: list[str] = []
    if regimen.drug == "foscarnet":
        matching_column, extra = _foscarnet_columns(ctx, order, regimen)
        if matching_column is not None:
            regimen = matching_column
    if why:
        extra.append(f"Maintenance dosing: {why} ({policy(8)}).")
    computation = computation_lines(regimen)
    gaps = count_gaps(ctx.facts) if regimen.drug in GCV_VGC_DRUGS else []
    extra += count_gap_lines(gaps)
    diffs = differences(order.dose, regimen)
    if not diffs:
        lines = computation + stale_lines(regimen.stale, ctx.facts.today)
        return [monitoring_card(ctx, regimen, lines, extra, count_gap_suggestions(ctx, gaps))]
    complete = diffs[:2] == ["no dose in mg", "no frequency"]
    written = f"{regimen.dose_mg:g} mg {route_text(regimen.route)} {regimen.schedule.text} ({_renal_short(regimen)})"
    summary = (
        f"{regimen.drug.capitalize()} for this patient: {written}" if complete else f"Adjust {regimen.drug}: {written}"
    )
    detail = [
        f"**Proposed:** {regimen.drug} {regimen_text(regimen)}.",
        "",
        f"**Selected order:** {'; '.join(diffs)}.",
        "",
        "**Computation**",
        *computation,
        *stale_lines(regimen.stale, ctx.facts.today),
        *(["", *extra] if extra else []),
        "",
        source_line(LABEL[regimen.drug], regimen.row.source),
    ]
    suggestions = [
        Suggestion(f"Update order: {regimen.summary_text()}", (update_action(order, regimen),), is_recommended=True),
        *count_gap_suggestions(ctx, gaps),
        *stale_suggestions(ctx, regimen.stale),
    ]
    return [card("dose-adjust", summary, "warning", detail, LABEL[regimen.drug], suggestions)]


def monitoring_suggestions(ctx: Context, regimen: Regimen) -> list[Suggestion]:
    """docs/policy.md §12: weekly CMV PCR; CBC twice weekly in induction; foscarnet chemistry 2–3×/week;
    creatinine + urine protein before each cidofovir dose."""
    days = regimen.duration_days
    note = f"Monitoring during {regimen.drug} therapy ({policy(12)})"
    suggestions = [
        Suggestion(
            "CMV DNA PCR weekly",
            (lab_order(ctx, "CmvViralLoadIU", "CMV DNA viral load (PCR), weekly", note, WEEKLY, days),),
        ),
    ]
    if regimen.drug in ("ganciclovir", "valganciclovir"):
        cbc_schedule = TWICE_WEEKLY if regimen.phase == "induction" else WEEKLY
        suggestions.append(
            Suggestion(
                f"Blood counts {cbc_schedule.text} (neutrophils, platelets, hemoglobin)",
                tuple(
                    lab_order(ctx, lab, f"{label}, {cbc_schedule.text}", note, cbc_schedule, days)
                    for lab, label in (
                        ("NeutrophilCount", "Neutrophil count"),
                        ("PlateletCount", "Platelet count"),
                        ("Hemoglobin", "Hemoglobin"),
                    )
                ),
            )
        )
    if regimen.drug == "foscarnet":
        suggestions.append(
            Suggestion(
                "Creatinine and electrolytes 2–3 times weekly (Ca, Mg, K, phosphate)",
                tuple(
                    lab_order(
                        ctx, lab, f"{label}, 2–3 times weekly", note, CHEMISTRY_FOSCARNET, days, CHEMISTRY_FOSCARNET_MAX
                    )
                    for lab, label in (
                        ("SerumCreatinine", "Serum creatinine"),
                        ("Calcium", "Serum calcium"),
                        ("Magnesium", "Serum magnesium"),
                        ("Potassium", "Serum potassium"),
                        ("Phosphate", "Serum phosphate"),
                    )
                ),
            )
        )
    if regimen.drug == "cidofovir":
        suggestions.append(
            Suggestion(
                "Creatinine and urine protein within 48 h before each dose",
                tuple(
                    lab_order(ctx, lab, f"{label} before each cidofovir dose", note, regimen.schedule, days)
                    for lab, label in (("SerumCreatinine", "Serum creatinine"), ("UrineProtein", "Urine protein"))
                ),
            )
        )
    return suggestions


def monitoring_card(
    ctx: Context, regimen: Regimen, computation: list[str], extra: list[str], first: Sequence[Suggestion] = ()
) -> Card:
    """The card for a draft that matches its regimen: the monitoring the drug needs, as lab orders (``first``:
    suggestions placed before them, such as blood counts not known today)."""
    drug = regimen.drug
    detail = [
        f"The selected order matches the computed regimen: {drug} {regimen_text(regimen)}.",
        "",
        "**Monitoring:** weekly CMV DNA PCR"
        + ("; CBC twice weekly during induction, weekly after" if drug in ("ganciclovir", "valganciclovir") else "")
        + ("; creatinine, Ca, Mg, K, phosphate 2–3 times weekly in induction" if drug == "foscarnet" else "")
        + ("; creatinine and urine protein within 48 h before each dose" if drug == "cidofovir" else "")
        + ("; ophthalmology for CMV retinitis" if "retinitis" in ctx.facts.manifestations else "")
        + ".",
        "",
        "**Computation**",
        *computation,
        *(["", *extra] if extra else []),
        "",
        source_line(LABEL[drug], regimen.row.source, policy(12)),
    ]
    suggestions = [*first, *monitoring_suggestions(ctx, regimen), *stale_suggestions(ctx, regimen.stale)]
    return card(
        "dose-confirmed-monitoring",
        f"{drug.capitalize()} dose fits ({_renal_short(regimen)}); order monitoring labs",
        "info",
        detail,
        LABEL[drug],
        suggestions,
    )
