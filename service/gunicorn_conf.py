"""Gunicorn settings for the CDS service (sync workers; see the README "Deployment").

Used two ways, with the same result:

* ``cmv-cds serve`` (``service.cli``) loads every gunicorn setting defined here, then applies its
  ``--host`` / ``--port`` / ``--workers`` flags on top;
* ``gunicorn -c python:service.gunicorn_conf 'service.wsgi:app'`` reads this module directly.

``bind`` and ``workers`` come from ``CMV_CDS_HOST`` / ``CMV_CDS_PORT`` / ``CMV_CDS_WORKERS`` (defaults in
``service.config.Settings``). Importing this module validates all ``CMV_CDS_*`` settings, so a bad value
stops the master before any worker is forked. The app itself is built in each worker by
``service.app.create_app()`` (``preload_app`` is off), which reads the same environment.
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
import tempfile
import time
from typing import Any, Final

from service.config import ConfigError, Settings

# Sync workers: the work is CPU-bound FHIR parsing (bench/README.md); one request per worker at a time. Gunicorn's
# sync worker, plus a drain on SIGTERM (readiness off, then every queued connection answered before exit).
worker_class: Final = "service.gunicorn_worker.DrainingSyncWorker"
# Seconds a worker may be silent before the master kills and replaces it. The whole-request FHIR budget
# (CMV_CDS_FHIR_DEADLINE_SECONDS, default 8 s) sits well inside it.
timeout: Final = 30
# On SIGTERM, workers drain (service/gunicorn_worker.py) for at most this long less 3 s, then finish their last
# request. Keep it below the orchestrator's stop grace period (docker-compose.yml: stop_grace_period 20s; the
# Kubernetes Deployment: terminationGracePeriodSeconds 30 with a 5 s preStop pause before SIGTERM).
graceful_timeout: Final = 15
# Sync workers close the connection after each response, so this matters only with another worker class
# (e.g. gthread); kept at 2 s for that case.
keepalive: Final = 2
# Recycle each worker after about this many requests (jitter spreads the restarts across workers).
max_requests: Final = 10_000
max_requests_jitter: Final = 1_000
# No access log: the app writes one structured JSON line per request itself (service.app).
accesslog: Final = None
# Build the app in each worker, after the fork (no database connections shared across processes).
preload_app: Final = False
# gunicorn >= 25 opens a control socket under $XDG_RUNTIME_DIR or $HOME/.gunicorn by default. It is not
# needed here, the container user has no home directory, and two instances would fight over the path.
control_socket_disable: Final = True
# The worker heartbeat file: on a RAM-backed filesystem where there is one (containers), so that a slow
# disk cannot stall a worker (gunicorn's "blocking os.fchmod" note).
worker_tmp_dir: Final = "/dev/shm" if os.path.isdir("/dev/shm") else None  # noqa: S108 (not a temp file name)
proc_name: Final = "cmv-cds"


def bind_address(host: str, port: int) -> str:
    """``host:port`` as gunicorn's ``bind`` wants it (IPv6 literals in brackets)."""
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return f"{host}:{port}"


# Room a hook call needs beyond its FHIR budget (validation, evaluation, a slow database write on feedback).
_REQUEST_MARGIN_SECONDS: Final = 5.0


def check_fhir_budget(settings: Settings) -> None:
    """The FHIR budget must end well before gunicorn kills a silent worker (and with it the worker's other work)."""
    if settings.fhir_deadline_seconds + _REQUEST_MARGIN_SECONDS > timeout:
        raise ConfigError(
            f"CMV_CDS_FHIR_DEADLINE_SECONDS ({settings.fhir_deadline_seconds:g}) must be at most "
            f"{timeout - _REQUEST_MARGIN_SECONDS:g}: gunicorn's worker timeout is {timeout} s"
        )


_settings = Settings.load()
check_fhir_budget(_settings)
bind = bind_address(_settings.host, _settings.port)
workers = _settings.workers
loglevel = _settings.log_level.lower()


# A small, valid R4 MedicationRequest shaped like the draft orders the hooks validate.
_WARM_UP_ORDER: Final[dict[str, Any]] = {
    "resourceType": "MedicationRequest",
    "status": "draft",
    "intent": "proposal",
    "subject": {"reference": "Patient/warm-up"},
    "authoredOn": "2024-01-01",
    "medicationCodeableConcept": {
        "coding": [{"system": "http://www.nlm.nih.gov/research/umls/rxnorm", "code": "0", "display": "warm-up"}],
        "text": "warm-up",
    },
    "dosageInstruction": [
        {
            "text": "warm-up",
            "timing": {"repeat": {"frequency": 2, "period": 1, "periodUnit": "d"}},
            "route": {"text": "oral"},
            "doseAndRate": [
                {
                    "doseQuantity": {
                        "value": 1,
                        "unit": "mg",
                        "system": "http://unitsofmeasure.org",
                        "code": "mg",
                    }
                }
            ],
        }
    ],
}

_log = logging.getLogger("cmv_cds.gunicorn")


def post_worker_init(worker: Any) -> None:
    """Build, in each new worker, what the first request would otherwise pay for: the compiled draft
    MedicationRequest schema (~0.1 s, service.draft_schema), the code sets (41 ValueSet files, their
    regexes and code index) and the compiled request schemas (~25 ms together, bench/README.md).

    A failure here is logged and the worker serves anyway (the first request then builds them).
    """
    started = time.perf_counter()
    try:
        from cards.codes import all_code_sets, coded_set_names
        from service.draft_schema import draft_schema
        from service.validation import SCHEMA_DIR, fast_validator, validator

        if not draft_schema().is_valid(_WARM_UP_ORDER):
            raise ValueError("the warm-up MedicationRequest does not satisfy the draft schema")
        all_code_sets()
        coded_set_names(_WARM_UP_ORDER["medicationCodeableConcept"])
        for schema in sorted(SCHEMA_DIR.glob("*.schema.json")):
            validator(schema.name)
            fast_validator(schema.name)
    except Exception:
        _log.exception("worker warm-up failed")
        return
    _log.info("worker warmed", extra={"latency_ms": round((time.perf_counter() - started) * 1000, 2)})


# --- Prometheus metrics across workers (service/metrics.py) ----------------------------------------------
# prometheus_client's multiprocess mode: every worker writes its metric values to files in this directory
# and GET /metrics adds them up, whichever worker answers. The variable must be set before a worker first
# imports prometheus_client, hence in the master, before the first fork.
_MULTIPROC_ENV: Final = "PROMETHEUS_MULTIPROC_DIR"
_METRIC_FILE_PREFIXES: Final = ("counter_", "gauge_", "histogram_", "summary_")
_created_metric_dirs: list[str] = []


def on_starting(server: Any) -> None:
    """In the master, before any worker exists: a directory for the workers' metric files.

    ``PROMETHEUS_MULTIPROC_DIR`` unset: a fresh temporary directory, deleted again at exit (``on_exit``).
    Set: that directory (created if missing), emptied of the metric files a previous run left there, as
    prometheus_client requires (stale files would add old counts to the new run's).
    """
    path = os.environ.get(_MULTIPROC_ENV)
    if path:
        os.makedirs(path, exist_ok=True)
        for name in os.listdir(path):
            if name.endswith(".db") and name.startswith(_METRIC_FILE_PREFIXES):
                os.remove(os.path.join(path, name))
    else:
        path = tempfile.mkdtemp(prefix="cmv-cds-metrics-")
        os.environ[_MULTIPROC_ENV] = path
        _created_metric_dirs.append(path)
    if "prometheus_client" in sys.modules:  # imported before the variable was set: each worker counts alone
        server.log.warning("prometheus_client was imported before %s was set: /metrics is per worker", _MULTIPROC_ENV)
    server.log.info("Prometheus multiprocess directory: %s", path)


def child_exit(server: Any, worker: Any) -> None:
    """In the master, when a worker has exited: prometheus_client's bookkeeping for a dead process."""
    if os.environ.get(_MULTIPROC_ENV):
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(worker.pid)  # type: ignore[no-untyped-call]


def on_exit(server: Any) -> None:
    """In the master, at shutdown: delete the metrics directory ``on_starting`` created (not a configured one)."""
    while _created_metric_dirs:
        shutil.rmtree(_created_metric_dirs.pop(), ignore_errors=True)
