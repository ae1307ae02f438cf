"""Moves the wall clock of every Python process of a test run by ``TEST_CLOCK_SHIFT_DAYS`` days.

``scripts/test.sh`` runs the suite a second time with this directory on ``PYTHONPATH`` and the variable set,
so pytest and every Python process the tests start (``cmv-cds serve``, gunicorn and its workers, the demo
CLI) live that many days ahead: a test whose answer depends on the calendar fails here first.

time-machine patches the wall clock only (``time.time``, ``datetime.now``, ``date.today``, …); the monotonic
clock stays real, so timeouts, deadlines and timed waits behave as they do in production. (Debian's
libfaketime 0.9.10 was tried first: it also shifts ``CLOCK_MONOTONIC`` for ``clock_gettime`` but not for
``sem_clockwait``, so every timed ``threading`` wait of Python 3.11 hangs or fails with EINVAL.)
"""

from __future__ import annotations

import datetime as _dt
import os as _os

_days = _os.environ.get("TEST_CLOCK_SHIFT_DAYS", "").strip()
if _days:
    import time_machine as _time_machine

    _time_machine.travel(_dt.datetime.now(_dt.UTC) + _dt.timedelta(days=int(_days)), tick=True).start()
