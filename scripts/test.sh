#!/usr/bin/env bash
# The project's test command (README, .ci/run): installs what the tests need, then lint, types, tests.
set -euo pipefail
cd "$(dirname "$0")/.."

python=$(command -v python3.11 || command -v python3)
[ -x .venv/bin/python ] || "$python" -m venv .venv
.venv/bin/python -m pip install -q --disable-pip-version-check --upgrade pip
.venv/bin/python -m pip install -q --disable-pip-version-check -e ".[test]"

# PostgreSQL server binaries for the real-database tests (tests start their own throwaway cluster).
if ! command -v initdb >/dev/null 2>&1 && ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then
  if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null
  else
    echo "note: PostgreSQL server binaries not found; the PostgreSQL tests will be skipped" >&2
  fi
fi

# Debian's Chromium for the browser test of the preview page (tests/test_preview.py, driven by playwright-core
# from tests/preview; no browser is ever downloaded by npm).
if [ ! -x /usr/bin/chromium ]; then
  if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; } ||
      echo "note: installing chromium failed; the preview browser test will be skipped" >&2
  else
    echo "note: /usr/bin/chromium not found; the preview browser test will be skipped" >&2
  fi
fi

# `npm ci` of one test package (DIR/package-lock.json pins it), only when the lock file is newer than its
# node_modules; on failure, say which tests that affects.
npm_ci_when_stale() {
  local dir=$1 consequence=$2 modules=$1/node_modules
  if [ ! -d "$modules" ] || [ "$dir/package-lock.json" -nt "$modules" ]; then
    if npm ci --prefix "$dir" --no-audit --no-fund --silent; then
      touch "$modules"
    else
      rm -rf "$modules"
      echo "note: npm ci in $dir failed; $consequence" >&2
    fi
  fi
}

# Test-only FHIR server (Medplum, tests/fhir_server) and the FHIR R4 JSON Schema it ships, for the fhirserver
# tests and tests/test_fhir_profiles.py.
if command -v node >/dev/null 2>&1 && command -v npm >/dev/null 2>&1; then
  npm_ci_when_stale tests/fhir_server "the real-FHIR-server tests will be skipped"
else
  echo "note: node/npm not found; the real-FHIR-server tests will be skipped" >&2
fi

# playwright-core for the preview browser test (it drives Debian's Chromium; it downloads no browser).
if command -v npm >/dev/null 2>&1; then
  npm_ci_when_stale tests/preview "the preview browser test will fail"
fi

# The first run tests the sources as they are: no compiled modules left from an earlier second run.
.venv/bin/python scripts/compile_hot_path.py --clean >/dev/null

.venv/bin/ruff check .
.venv/bin/ruff format --check .
.venv/bin/mypy
# The suite on the machine's cores (pytest-xdist; at most 4 processes: every test starts its own servers on free
# ports and tmp directories, so the tests are independent of each other).
PYTEST=(.venv/bin/python -m pytest -q --numprocesses=auto --maxprocesses=4)
"${PYTEST[@]}" "$@"

# The same suite with the wall clock of every Python process a year and a month ahead (tests/clock_shift):
# no test may depend on today's date. The monotonic clock stays real, so deadlines behave as in production.
# This run tests the form the container image ships, too: the request's hot path compiled with mypyc in place
# (scripts/compile_hot_path.py; mypyc also enforces the annotations at run time), removed again when the command ends.
echo "== compiling the hot path with mypyc for the second run" >&2
trap '.venv/bin/python scripts/compile_hot_path.py --clean >/dev/null' EXIT
.venv/bin/python scripts/compile_hot_path.py
echo "== the suite again, compiled, with the clock 400 days ahead" >&2
PYTHONPATH="$PWD/tests/clock_shift${PYTHONPATH:+:$PYTHONPATH}" TEST_CLOCK_SHIFT_DAYS=400 TEST_EXPECT_COMPILED=1 \
  "${PYTEST[@]}" -W "ignore:Module already imported so cannot be rewritten:pytest.PytestAssertRewriteWarning" "$@"
