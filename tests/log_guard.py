"""Whole-suite guard: no patient data in any log line written by the service during the test run.

conftest installs ``CAPTURE`` on the ``cmv_cds`` logger for the whole session, formatting records
exactly as production does (and taking the per-request line as the service writes it, already
formatted); at the end of the session ``leaks()`` looks for every fixture patient's names, identifiers
and birth date, and for raw FHIR resources.
"""

from __future__ import annotations

import datetime as dt
import logging
import re
from pathlib import Path
from typing import Any

from service.logs import JsonFormatter

FIXTURES = Path(__file__).resolve().parent / "fixtures"
# A FHIR resource embedded in a log line, as a JSON object or as an escaped JSON string.
_RAW_RESOURCE = re.compile(r'\\?"resourceType\\?"\s*:')


class Capture(logging.Handler):
    def __init__(self) -> None:
        super().__init__(level=logging.DEBUG)
        self.lines: list[str] = []
        self.formatter_ = JsonFormatter()

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.formatter_.format(record))

    def emit_line(self, line: str) -> None:
        """A line the service formatted itself (service.logs.log_request: the per-request line)."""
        self.lines.append(line)


CAPTURE = Capture()


def sensitive_strings(today: dt.date | None = None) -> set[str]:
    """Names, identifiers and birth dates of every Patient in the fixture files (and the request fixtures)."""
    from fhir_fixtures import load

    found: set[str] = set()
    for path in sorted(FIXTURES.glob("*.json")) + sorted(FIXTURES.glob("ehr/*.json")):
        data: Any = load(str(path.relative_to(FIXTURES)), today)
        if "hook" in data:  # a request fixture (fixtures/ehr): its prefetched Patient
            data = (data.get("prefetch") or {}).get("patient") or {}
        resources = [e["resource"] for e in data.get("entry", [])] if data.get("resourceType") == "Bundle" else [data]
        for resource in resources:
            if resource.get("resourceType") != "Patient":
                continue
            for name in resource.get("name", []):
                found.update(name.get("given", []))
                if name.get("family"):
                    found.add(name["family"])
            found.update(i["value"] for i in resource.get("identifier", []) if i.get("value"))
            if resource.get("birthDate"):
                found.add(resource["birthDate"])
    return found


def leaks(lines: list[str], sensitive: set[str] | frozenset[str]) -> list[str]:
    """Log lines that carry a sensitive string or a raw FHIR resource."""
    bad = []
    for line in lines:
        if any(value in line for value in sensitive) or _RAW_RESOURCE.search(line):
            bad.append(line)
    return bad
