"""The CDS governance report: how often each rule's cards are shown, accepted and overridden, and why.

The figures come from the feedback store (``FeedbackStore.report``); this module parses the report's
parameters and renders it, as JSON (``GET /cds-services/report``, ``cmv-cds report --format json``) or as a
text table (``cmv-cds report``). The report holds no patient data: rule ids, counts and override-reason
codings only (never the clinicians' free-text comments).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from datetime import UTC, date, datetime, time
from typing import Any

from service.errors import InvalidRequest
from service.registry import SERVICES
from service.store import RuleReport

# ``YYYY-MM-DD`` (midnight UTC), or a date-time with an optional UTC offset (UTC when absent).
SINCE_PATTERN = r"^\d{4}-\d{2}-\d{2}(T\d{2}:\d{2}(:\d{2}(\.\d{1,6})?)?(Z|[+-]\d{2}:\d{2})?)?$"
_SINCE = re.compile(SINCE_PATTERN)
UNKNOWN_CARDS_LABEL = "(cards never issued)"


def parse_since(raw: str) -> datetime:
    """``since`` as an aware UTC datetime. Raises InvalidRequest (expression ``since``) when unusable."""
    value = raw.strip()
    parsed: datetime | None = None
    if _SINCE.fullmatch(value):
        try:
            parsed = (
                datetime.combine(date.fromisoformat(value), time(), UTC)
                if len(value) == 10
                else datetime.fromisoformat(value)
            )
        except ValueError:
            parsed = None
    if parsed is None:
        raise InvalidRequest(
            "since must be a date (YYYY-MM-DD) or a date-time (YYYY-MM-DDThh:mm[:ss][Z|±hh:mm])",
            expression="since",
        )
    return (parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)).astimezone(UTC)


def check_service_id(service_id: str) -> str:
    """``service_id`` if this service hosts it; InvalidRequest (expression ``service``) otherwise."""
    if service_id not in SERVICES:
        raise InvalidRequest(
            f"unknown service '{service_id[:64]}' (one of: {', '.join(sorted(SERVICES))})", expression="service"
        )
    return service_id


def _rate(accepted: int, shown: int) -> float | None:
    return round(accepted / shown, 4) if shown else None


def report_json(rules: Sequence[RuleReport], service_id: str | None, since: datetime | None) -> dict[str, Any]:
    """The report as JSON (the ``GovernanceReport`` schema of service/openapi.json)."""
    known = [rule for rule in rules if rule.rule_id is not None]
    shown = sum(rule.shown for rule in known)
    accepted = sum(rule.accepted for rule in known)
    return {
        "generatedAt": datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z"),
        "serviceId": service_id,
        "since": since.isoformat().replace("+00:00", "Z") if since else None,
        "rules": [
            {
                "ruleId": rule.rule_id,
                "shown": rule.shown,
                "accepted": rule.accepted,
                "overridden": rule.overridden,
                "acceptanceRate": _rate(rule.accepted, rule.shown),
                "overrideReasons": [
                    {"system": r.system, "code": r.code, "display": r.display, "count": r.count}
                    for r in rule.override_reasons
                ],
                "unknownCardFeedback": rule.unknown_card_feedback,
            }
            for rule in rules
        ],
        "totals": {
            "shown": shown,
            "accepted": accepted,
            "overridden": sum(rule.overridden for rule in known),
            "acceptanceRate": _rate(accepted, shown),
            "unknownCardFeedback": sum(rule.unknown_card_feedback for rule in rules),
        },
    }


def _percent(rate: float | None) -> str:
    return "-" if rate is None else f"{rate * 100:.1f}%"


def _reason(code: str | None, display: str | None) -> str:
    if code is None:
        return "(no reason given)"
    return f"{code} ({display})" if display else code


def report_text(document: dict[str, Any]) -> str:
    """The JSON report (``report_json``) as a text table for a terminal."""
    scope = document["serviceId"] or "all services"
    window = f"since {document['since']}" if document["since"] else "all time"
    lines = [f"CDS governance report: {scope}, {window} (generated {document['generatedAt']})", ""]
    rules = document["rules"]
    if not rules:
        lines.append("No cards issued and no feedback received.")
        return "\n".join(lines) + "\n"
    width = max(len("rule"), len(UNKNOWN_CARDS_LABEL), *(len(r["ruleId"] or "") for r in rules))
    header = f"{'rule':<{width}}  {'shown':>7}  {'accepted':>8}  {'overridden':>10}  {'acceptance':>10}"
    lines += [header, "-" * len(header)]
    for rule in rules:
        name = rule["ruleId"] or UNKNOWN_CARDS_LABEL
        shown = str(rule["shown"]) if rule["ruleId"] else "-"
        lines.append(
            f"{name:<{width}}  {shown:>7}  {rule['accepted']:>8}  {rule['overridden']:>10}  "
            f"{_percent(rule['acceptanceRate']):>10}"
        )
        for index, reason in enumerate(rule["overrideReasons"]):
            lead = "override reasons:" if index == 0 else ""
            lines.append(f"    {lead:<17} {reason['count']:>5} × {_reason(reason['code'], reason['display'])}")
    totals = document["totals"]
    lines += [
        "-" * len(header),
        f"{'total':<{width}}  {totals['shown']:>7}  {totals['accepted']:>8}  {totals['overridden']:>10}  "
        f"{_percent(totals['acceptanceRate']):>10}",
        "",
        "shown: cards issued; accepted / overridden: cards with at least one such feedback item;",
        "acceptance: accepted / shown. Override reasons count overridden cards.",
        f"Feedback items on cards this service never issued: {totals['unknownCardFeedback']}",
    ]
    return "\n".join(lines) + "\n"


__all__ = ["SINCE_PATTERN", "check_service_id", "parse_since", "report_json", "report_text"]
