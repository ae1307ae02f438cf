"""Clinical time of medications: when an order could have been given, and the courses orders form.

The rule (docs/policy.md §7, "Clinical time of medications"): a MedicationRequest counts as given from its
start — ``dosageInstruction[].timing.repeat.boundsPeriod.start``, else ``authoredOn`` — to its end —
``boundsPeriod.end``, else the start plus ``boundsDuration``, else ``dispenseRequest.validityPeriod.end``. An
order with no end date is ongoing while its status is active, on-hold, draft or missing; a stopped, completed
or cancelled order with no end date counts on its start date only (the record shows it active then and on no
later date). ``entered-in-error`` never counts, and an order with no date at all cannot be placed in time.
So a stopped nephrotoxic drug that started within the last 7 days still bars cidofovir, and a completed
21-day valganciclovir induction counts as 21 days of therapy.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from cards.fhir_in import parse_date

Route = Literal["iv", "oral", "other", "unknown"]

# Statuses whose orders may still be running when they carry no end date.
ONGOING_STATUSES = frozenset({"active", "on-hold", "draft", "unknown"})
NEVER_GIVEN_STATUSES = frozenset({"entered-in-error"})
# Orders that are not therapy given: drafts (not yet signed) and orders withdrawn before any administration.
NOT_GIVEN_STATUSES = frozenset({"entered-in-error", "cancelled", "draft"})
# Orders of (val)ganciclovir belong to one course when each starts within this many days of the end of the
# one before (docs/policy.md §8: a weekend between induction and maintenance does not end the course).
COURSE_GAP_DAYS = 3
# "At least 2 continuous weeks" of therapy before resistance is suspected (Kotton 2025): no day off.
CONTINUOUS_GAP_DAYS = 1
_DAYS_PER_UNIT = {"d": 1.0, "day": 1.0, "days": 1.0, "wk": 7.0, "week": 7.0, "weeks": 7.0, "mo": 30.0, "h": 1 / 24}


@dataclass(slots=True, init=False)  # a written __init__: native constructors, see cards/model.py above Coding
class MedicationFact:
    """A medication order (prefetched, or another draft of this call) with the code sets its medication is in
    and the window in which it could have been given (``end`` None: ongoing)."""

    source: str
    name: str
    sets: frozenset[str]
    status: str
    start: dt.date | None
    end: dt.date | None
    route: Route
    draft: bool
    authored: dt.date | None  # authoredOn: when the order was written (a draft's session)

    def __init__(
        self,
        source: str,
        name: str,
        sets: frozenset[str],
        status: str,
        start: dt.date | None,
        end: dt.date | None,
        route: Route,
        draft: bool,
        authored: dt.date | None = None,
    ) -> None:
        self.source = source
        self.name = name
        self.sets = sets
        self.status = status
        self.start = start
        self.end = end
        self.route = route
        self.draft = draft
        self.authored = authored

    @property
    def given(self) -> bool:
        """Counts as therapy given (courses, completed induction, resistance): not a draft, nor an order that was
        never carried out (cancelled, entered in error) — unlike exposure, which counts a cancelled order on its
        start date to be safe (docs/policy.md §7)."""
        return not self.draft and self.status not in NOT_GIVEN_STATUSES

    def active_on(self, day: dt.date) -> bool:
        """Could have been given on ``day``."""
        return self.exposed_between(day, day)

    def exposed_between(self, first: dt.date, last: dt.date) -> bool:
        """Could have been given on some day of [first, last]."""
        if self.status in NEVER_GIVEN_STATUSES:
            return False
        if self.start is None:
            # No date at all: an ongoing order is taken as running; a finished one cannot be placed in time.
            return self.status in ONGOING_STATUSES and self.end is None
        if self.start > last:
            return False
        return self.end is None or self.end >= first


def _duration_days(duration: Any) -> float | None:
    if not isinstance(duration, dict):
        return None
    value, unit = duration.get("value"), duration.get("code") or duration.get("unit")
    if isinstance(value, bool) or not isinstance(value, int | float) or value < 0 or not isinstance(unit, str):
        return None
    factor = _DAYS_PER_UNIT.get(unit.strip().lower())
    return value * factor if factor is not None else None


def _after(start: dt.date, days: float) -> dt.date | None:
    """``start`` plus a course of ``days`` days (a 21-day course ends on its 21st day); None when the sum leaves
    the calendar (a malformed duration, or a sentinel date such as 9999-12-31)."""
    try:
        return start + dt.timedelta(days=max(0, int(days + 0.5) - 1))
    except (OverflowError, ValueError):
        return None


def exposure_window(order: Mapping[str, Any], status: str) -> tuple[dt.date | None, dt.date | None]:
    """(start, end) of a MedicationRequest under the module's rule; end None means ongoing."""
    bounds_start = bounds_end = None
    duration: float | None = None
    dosages = order.get("dosageInstruction")
    for dosage in dosages if isinstance(dosages, list) else ():
        timing = dosage.get("timing") if isinstance(dosage, dict) else None
        repeat = timing.get("repeat") if isinstance(timing, dict) else None
        if not isinstance(repeat, dict):
            continue
        period = repeat.get("boundsPeriod")
        if isinstance(period, dict):
            bounds_start = bounds_start or parse_date(period.get("start"))
            bounds_end = bounds_end or parse_date(period.get("end"))
        duration = duration if duration is not None else _duration_days(repeat.get("boundsDuration"))
    dispense = order.get("dispenseRequest")
    validity = dispense.get("validityPeriod") if isinstance(dispense, dict) else None
    validity = validity if isinstance(validity, dict) else {}
    start = bounds_start or parse_date(order.get("authoredOn")) or parse_date(validity.get("start"))
    end = bounds_end
    if end is None and start is not None and duration is not None:
        end = _after(start, duration)
    if end is None:
        end = parse_date(validity.get("end"))
    if end is None and status not in ONGOING_STATUSES:
        end = start  # stopped / completed / cancelled with no end date: its start date only
    if start is not None and end is not None and end < start:
        end = start
    return start, end


@dataclass(slots=True)
class Course:
    """Consecutive orders of the same therapy: first day, last day (None: ongoing) and days given."""

    start: dt.date
    end: dt.date | None
    days_given: int

    def ongoing(self, today: dt.date) -> bool:
        """Whether the course is still running on ``today``."""
        return self.end is None or self.end >= today


def current_course(
    medications: Iterable[MedicationFact], sets: Sequence[str], today: dt.date, gap_days: int
) -> Course | None:
    """The course of the drugs in ``sets`` that is ongoing, or ended at most ``gap_days`` ago: orders linked
    when each starts within ``gap_days`` of the previous end. Only therapy given counts (``MedicationFact.given``),
    and a stopped order whose planned end is still ahead counts to its start date only: when it stopped is unknown."""
    spans = sorted(
        (
            (m.start, _given_end(m, today))
            for m in medications
            if m.given and m.start is not None and not m.sets.isdisjoint(sets)
        ),
        key=lambda span: span[0],  # by start only: an ongoing order's end is None, not comparable with a date
    )
    courses: list[Course] = []
    for start, end in spans:
        last = courses[-1] if courses else None
        if last is not None and (last.end is None or start <= last.end + dt.timedelta(days=gap_days)):
            last.end = None if last.end is None or end is None else max(last.end, end)
        else:
            courses.append(Course(start, end, 0))
    if not courses:
        return None
    course = courses[-1]
    if course.end is not None and course.end < today - dt.timedelta(days=gap_days):
        return None
    course.days_given = _days_covered(
        (start, min(end or today, today)) for start, end in spans if course.start <= start <= today
    )
    return course


def _given_end(order: MedicationFact, today: dt.date) -> dt.date | None:
    """The last day an order is known to have been given: a stopped or completed order whose planned end is still
    ahead ended on a day the record does not give, so only its start is known."""
    if order.status in ("stopped", "completed") and (order.end is None or order.end > today):
        return order.start
    return order.end


def _days_covered(intervals: Iterable[tuple[dt.date, dt.date]]) -> int:
    """Days in the union of closed date intervals (orders that overlap are not counted twice)."""
    total = 0
    reach: dt.date | None = None
    for first, last in sorted(intervals):
        if reach is not None and first <= reach:
            first = reach + dt.timedelta(days=1)
        if last >= first:
            total += (last - first).days + 1
        reach = last if reach is None else max(reach, last)
    return total
