"""``cmv-cds demo``: send an example CDS Hooks request to a running service and print its cards readably.

The example is a path, or the name of a file in ``examples/`` (with or without ``.json``). The service id
comes from the request's ``hook`` (the first hosted service for that hook). Output: one block per card,
with its indicator (coloured on a terminal, unless ``NO_COLOR`` is set), summary, the detail Markdown as
plain text, each suggestion with its actions (type, resource type, medication, dose and timing), and the
source. Any failure is one line on stderr and a non-zero exit status.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import textwrap
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TextIO

import requests

EXAMPLES_DIR = Path(__file__).resolve().parents[1] / "examples"
DEFAULT_URL = "http://127.0.0.1:8080"
EXIT_FAILED = 1  # the service could not be reached, or answered an error
EXIT_USAGE = 2  # the example cannot be used
CONNECT_TIMEOUT_SECONDS = 5.0
READ_TIMEOUT_SECONDS = 60.0

_COLOURS = {"critical": "\033[1;31m", "warning": "\033[1;33m", "info": "\033[1;36m"}
_BOLD = "\033[1m"
_RESET = "\033[0m"
_UNITS = {"s": "second", "min": "minute", "h": "hour", "d": "day", "wk": "week", "mo": "month", "a": "year"}


class DemoError(Exception):
    """A failure to report as one line; ``status`` is the exit status."""

    def __init__(self, message: str, status: int = EXIT_FAILED) -> None:
        super().__init__(message)
        self.status = status


def resolve_example(name: str) -> Path:
    """A path to an existing file, else ``examples/<name>`` (``.json`` added when missing)."""
    candidates = [Path(name)]
    if os.sep not in name and "/" not in name:
        candidates += [EXAMPLES_DIR / name, EXAMPLES_DIR / f"{name}.json"]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    known = ", ".join(sorted(path.name for path in EXAMPLES_DIR.glob("*.json"))) or "none"
    raise DemoError(f"no example '{name}': not a file, nor in {EXAMPLES_DIR} ({known})", EXIT_USAGE)


def load_request(path: Path) -> tuple[str, dict[str, Any]]:
    """(service id, request body) of an example file."""
    from service.registry import SERVICES

    try:
        body = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DemoError(f"cannot read {path}: {exc}".splitlines()[0], EXIT_USAGE) from exc
    if not isinstance(body, dict) or not isinstance(body.get("hook"), str):
        raise DemoError(f"{path} is not a CDS Hooks request (no 'hook')", EXIT_USAGE)
    service_id = next((service.id for service in SERVICES.values() if service.hook == body["hook"]), None)
    if service_id is None:
        raise DemoError(f"{path}: no service here handles the hook '{body['hook'][:64]}'", EXIT_USAGE)
    return service_id, body


def call_service(base_url: str, service_id: str, body: Mapping[str, Any], token: str | None) -> dict[str, Any]:
    """POST the request; the JSON answer, or DemoError with one line saying what went wrong."""
    endpoint = f"{base_url.rstrip('/')}/cds-services/{service_id}"
    headers = {"Accept": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    try:
        response = requests.post(
            endpoint,
            json=body,
            headers=headers,
            timeout=(CONNECT_TIMEOUT_SECONDS, READ_TIMEOUT_SECONDS),
            allow_redirects=False,
        )
    except requests.exceptions.InvalidURL as exc:
        raise DemoError(f"invalid service URL {base_url!r}", EXIT_USAGE) from exc
    except (requests.exceptions.MissingSchema, requests.exceptions.InvalidSchema) as exc:
        raise DemoError(f"invalid service URL {base_url!r} (use http://host:port)", EXIT_USAGE) from exc
    except requests.Timeout as exc:
        raise DemoError(f"no answer from {endpoint} (timed out)") from exc
    except requests.ConnectionError as exc:
        reason = "connection refused" if "refused" in str(exc).lower() else "cannot connect"
        raise DemoError(f"cannot reach the service at {endpoint}: {reason}") from exc
    except requests.RequestException as exc:
        raise DemoError(f"request to {endpoint} failed ({type(exc).__name__})") from exc
    if response.status_code >= 300:
        raise DemoError(f"HTTP {response.status_code} from {endpoint}: {_diagnostics(response)}")
    try:
        answer = response.json()
    except ValueError as exc:
        raise DemoError(f"{endpoint} answered {response.status_code} with a body that is not JSON") from exc
    if not isinstance(answer, dict) or not isinstance(answer.get("cards"), list):
        raise DemoError(f"{endpoint} answered without a 'cards' list")
    return answer


def _diagnostics(response: requests.Response) -> str:
    """The OperationOutcome's first diagnostics, else the reason phrase; always one short line."""
    text = response.reason or "error"
    try:
        body = response.json()
        issue = body["issue"][0]
        text = issue.get("diagnostics") or issue.get("code") or text
    except (ValueError, KeyError, IndexError, TypeError, AttributeError):
        pass
    return " ".join(str(text).split())[:300]


# --- rendering ----------------------------------------------------------------------------------------

_LINK = re.compile(r"\[([^\]]+)\]\(([^)\s]+)\)")
_EMPHASIS = re.compile(r"(\*\*|__)(.+?)\1|(?<![\w*])\*(?!\s)(.+?)(?<!\s)\*(?!\w)")


def markdown_to_text(markdown: str) -> str:
    """CommonMark as CDS Hooks cards use it, flattened to plain text (emphasis, code, links, headings)."""
    lines = []
    for line in markdown.splitlines():
        line = re.sub(r"^\s{0,3}#{1,6}\s+", "", line)
        line = _LINK.sub(lambda m: m.group(1) if m.group(1) == m.group(2) else f"{m.group(1)} ({m.group(2)})", line)
        line = _EMPHASIS.sub(lambda m: m.group(2) or m.group(3), line)
        line = line.replace("`", "")
        line = re.sub(r"^(\s*)[*+]\s+", r"\1- ", line)
        lines.append(line.rstrip())
    return "\n".join(lines).strip("\n")


def _number(value: Any) -> str:
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return str(value)


def _concept_text(concept: Any) -> str | None:
    if not isinstance(concept, dict):
        return None
    if concept.get("text"):
        return str(concept["text"])
    for coding in concept.get("coding") or []:
        if isinstance(coding, dict) and (coding.get("display") or coding.get("code")):
            return str(coding.get("display") or coding.get("code"))
    return None


def _dose(dosage: Mapping[str, Any]) -> str | None:
    for dose_and_rate in dosage.get("doseAndRate") or []:
        quantity = dose_and_rate.get("doseQuantity") if isinstance(dose_and_rate, dict) else None
        if isinstance(quantity, dict) and "value" in quantity:
            return f"{_number(quantity['value'])} {quantity.get('unit') or quantity.get('code') or ''}".strip()
    return None


def _duration(amount: Any, unit: Any) -> str:
    name = _UNITS.get(str(unit), str(unit))
    return f"{_number(amount)} {name}{'' if amount == 1 else 's'}"


def _timing(dosage: Mapping[str, Any]) -> str | None:
    timing = dosage.get("timing")
    if not isinstance(timing, dict):
        return None
    repeat = timing.get("repeat")
    parts = []
    if isinstance(repeat, dict) and repeat.get("period") is not None:
        frequency, period, unit = repeat.get("frequency", 1), repeat["period"], repeat.get("periodUnit", "")
        if period == 1:
            name = _UNITS.get(str(unit), str(unit))
            parts.append(f"every {name}" if frequency == 1 else f"{_number(frequency)} times per {name}")
        else:
            every = f"every {_duration(period, unit)}"
            parts.append(every if frequency == 1 else f"{_number(frequency)} times {every}")
        bounds = repeat.get("boundsDuration")
        if isinstance(bounds, dict) and "value" in bounds:
            parts.append(f"for {_duration(bounds['value'], bounds.get('code') or bounds.get('unit'))}")
    elif _concept_text(timing.get("code")):
        parts.append(str(_concept_text(timing.get("code"))))
    return " ".join(parts) or None


def describe_action(action: Mapping[str, Any]) -> str:
    """``update MedicationRequest draft-gcv: ganciclovir 500 mg injection, dose 400 mg, every 12 hours for 21 days``."""
    resource = action.get("resource")
    kind = str(action.get("type", "?"))
    if not isinstance(resource, dict):
        target = action.get("resourceId") or ""
        if isinstance(target, list):
            target = ", ".join(str(item) for item in target)
        return f"{kind} {target}".strip() + (f": {action['description']}" if action.get("description") else "")
    head = f"{kind} {resource.get('resourceType', 'resource')}"
    if kind != "create" and resource.get("id"):
        head += f" {resource['id']}"
    what = _concept_text(resource.get("medicationCodeableConcept")) or _concept_text(resource.get("code"))
    details = [what] if what else []
    dosages = resource.get("dosageInstruction") or []
    if dosages and isinstance(dosages[0], dict):
        dose, timing = _dose(dosages[0]), _timing(dosages[0])
        details += [part for part in (dose and f"dose {dose}", timing) if part]
    if not details and action.get("description"):
        details.append(str(action["description"]))
    return head + (": " + ", ".join(details) if details else "")


def render_cards(answer: Mapping[str, Any], *, colour: bool, width: int = 100) -> str:
    """The cards of a CDS Hooks response as terminal text."""
    cards = answer.get("cards") or []
    if not cards:
        return "No cards: the service has nothing to say about this request.\n"

    def wrap(text: str, indent: str) -> list[str]:
        out: list[str] = []
        for line in text.splitlines() or [""]:
            bullet = re.match(r"^(\s*(?:-|\d+\.)\s+)", line)
            hanging = indent + " " * (len(bullet.group(1)) if bullet else 0)
            out += textwrap.wrap(line, width, initial_indent=indent, subsequent_indent=hanging) or [""]
        return out

    lines: list[str] = [f"{len(cards)} card{'s' if len(cards) != 1 else ''}:"]
    for number, card in enumerate(cards, 1):
        indicator = str(card.get("indicator", "info"))
        tag = f"[{indicator.upper()}]"
        summary = str(card.get("summary", ""))
        if colour:
            tag = f"{_COLOURS.get(indicator, _BOLD)}{tag}{_RESET}"
            summary = f"{_BOLD}{summary}{_RESET}"
        lines += ["", f"{number}. {tag} {summary}"]
        if card.get("detail"):
            lines += ["", *wrap(markdown_to_text(str(card["detail"])), "   ")]
        suggestions = card.get("suggestions") or []
        if suggestions:
            lines += ["", "   Suggestions:"]
            for suggestion in suggestions:
                recommended = " (recommended)" if suggestion.get("isRecommended") else ""
                lines += wrap(f"- {suggestion.get('label', '')}{recommended}", "   ")
                for action in suggestion.get("actions") or []:
                    lines += wrap(f"- {describe_action(action)}", "       ")
        source = card.get("source") or {}
        if source.get("label"):
            link = f" <{source['url']}>" if source.get("url") else ""
            lines += ["", *wrap(f"Source: {source['label']}{link}", "   ")]
    return "\n".join(lines) + "\n"


def use_colour(stream: TextIO) -> bool:
    """Colour only on a terminal, and never when NO_COLOR is set (https://no-color.org)."""
    return stream.isatty() and not os.environ.get("NO_COLOR")


def run(example: str, url: str, token: str | None, out: TextIO, err: TextIO, prog: str = "cmv-cds") -> int:
    """The ``demo`` command: exit status 0 with the cards printed, else one line on ``err``."""
    try:
        service_id, body = load_request(resolve_example(example))
        answer = call_service(url, service_id, body, token)
    except DemoError as exc:
        print(f"{prog} demo: {exc}", file=err)
        return exc.status
    width = max(60, min(shutil.get_terminal_size((100, 24)).columns, 120) - 1)
    out.write(render_cards(answer, colour=use_colour(out), width=width))
    return 0


__all__ = ["DEFAULT_URL", "describe_action", "markdown_to_text", "render_cards", "resolve_example", "run"]
