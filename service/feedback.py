"""Feedback items as CDS clients send them, read into the CDS Hooks 2.0.1 shape the store keeps.

The spec's override is ``overrideReason`` (``reason``: a Coding from the card's ``overrideReasons``;
``userComment``). Epic sends ``overrideReasons`` (plural) as one object instead (fhir.epic.com, CDS Hooks
Tutorial, "Feedback"), holding either

- ``reason`` (a Coding) and ``userComment``, when the service sent the override reasons; or
- ``extension`` with ``com.epic.cdshooks.feedback.overrideReason.reasonCategory``, ``…reasonDisplay`` and
  ``…reasonTitle``, and ``userComment``, when the health system built the reasons in Epic.

Both become ``overrideReason``: the Coding as it is; an Epic-built reason as a Coding in the system
``EPIC_BUILT_IN_REASON_SYSTEM`` whose code is the reason category (else its title, else its display) and
whose display is the reason's display (else its title), so the governance report counts it like any other.
When an item carries both forms, the spec's ``overrideReason`` wins if it has a reason.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Final

EPIC_REASON_EXTENSION: Final = "com.epic.cdshooks.feedback.overrideReason."
# The code system under which reasons built in Epic are stored and reported (the extension keys' namespace).
EPIC_BUILT_IN_REASON_SYSTEM: Final = "urn:com.epic.cdshooks.feedback.overrideReason.reasonCategory"
# The store's column widths (service.store.FeedbackRow).
_CODE_CHARS, _TEXT_CHARS = 256, 1024


def read_feedback(items: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """Schema-valid feedback items with Epic's ``overrideReasons`` read into ``overrideReason``."""
    return [_read_item(item) for item in items]


def _read_item(item: Mapping[str, Any]) -> Mapping[str, Any]:
    epic = item.get("overrideReasons")
    if epic is None:
        return item
    spec: Mapping[str, Any] = item.get("overrideReason") or {}
    read = {key: value for key, value in item.items() if key != "overrideReasons"}
    if spec.get("reason"):
        return read
    candidates = [c for c in (epic if isinstance(epic, list) else [epic]) if isinstance(c, dict)]
    reasons = [(c, c.get("reason") or _built_in_reason(c.get("extension"))) for c in candidates]
    chosen, reason = next(((c, r) for c, r in reasons if r), reasons[0] if reasons else ({}, None))
    override: dict[str, Any] = {}
    if reason:
        override["reason"] = reason
    comments = [c.get("userComment") for c in (spec, chosen, *candidates) if c.get("userComment")]
    comment = comments[0] if comments else None
    if comment:
        override["userComment"] = comment
    if override:
        read["overrideReason"] = override
    return read


def _text(value: Any) -> str | None:
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        return None
    text = str(value).strip()
    return text or None


def _built_in_reason(extension: Any) -> dict[str, str] | None:
    """A reason built in Epic (its extension keys) as a Coding; None when the extension names none."""
    if not isinstance(extension, dict):
        return None
    names = ("reasonCategory", "reasonDisplay", "reasonTitle")
    category, display, title = (_text(extension.get(EPIC_REASON_EXTENSION + name)) for name in names)
    code = category or title or display
    if code is None:
        return None
    coding = {"system": EPIC_BUILT_IN_REASON_SYSTEM, "code": code[:_CODE_CHARS]}
    if display or title:
        coding["display"] = str(display or title)[:_TEXT_CHARS]
    return coding
