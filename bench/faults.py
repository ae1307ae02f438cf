"""``python -m bench --faults``: the long variants of the fault suite (tests/test_faults.py, marked ``long``).

A 60 s PostgreSQL outage under load (0 audit rows lost) and a 60 s soak at c=8 (no errors, memory and file
descriptors flat) take several minutes in all, too long for the test command (CI), which runs the short
variants of the same tests. They need the test dependencies (``pip install -e '.[test]'``) and PostgreSQL's
server binaries, as the test suite does.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# Generous: the variants take about three minutes on the machine of bench/README.md.
TIMEOUT_SECONDS = 900


def run_faults() -> int:
    """Run the long fault variants with pytest; its exit status."""
    if importlib.util.find_spec("pytest") is None:
        print("python -m bench --faults needs the test dependencies: pip install -e '.[test]'", file=sys.stderr)
        return 2
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "long", "tests/test_faults.py"]
    env = os.environ | {"CMV_CDS_LONG_TESTS": "1"}
    print("long fault variants: " + " ".join(command[1:]), flush=True)
    try:
        return subprocess.run(command, cwd=REPO, env=env, timeout=TIMEOUT_SECONDS, check=False).returncode
    except subprocess.TimeoutExpired:
        print(f"the long fault variants did not finish within {TIMEOUT_SECONDS} s", file=sys.stderr)
        return 1
