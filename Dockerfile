# syntax=docker/dockerfile:1
# CMV antiviral CDS Hooks service: gunicorn (sync workers) as a non-root user.
#   docker build -t cmv-cds .
#   docker run --rm cmv-cds cmv-cds migrate   # the one-shot schema step (compose's `migrate`, the Kubernetes Job)
#   docker compose up          # with PostgreSQL, see docker-compose.yml

# ---- builder: a virtual environment with the dependencies and the cmv-cds console script ----------
FROM python:3.11-slim AS builder

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /app

# Dependencies first, read from pyproject.toml alone, so this layer stays cached until they change.
# (psycopg[binary] ships its own libpq: no compiler or system libraries are needed.)
COPY pyproject.toml ./
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" \
        > /tmp/requirements.txt \
    && pip install -r /tmp/requirements.txt

# The project itself is installed in editable mode, at /app, the same path the runtime stage uses:
# cards/codes.py reads the ValueSets from fhir_profiles/ next to the packages, and a regular wheel does
# not contain fhir_profiles/. The venv gets only an import hook pointing at /app and the console script.
COPY service/ service/
COPY cards/ cards/
COPY fhir_profiles/ fhir_profiles/
RUN pip install --no-deps -e .

# The request's hot path compiled with mypyc (scripts/compile_hot_path.py): the same code, about a fifth less CPU
# per hook call (bench/README.md, "Round 6"). mypy and gcc are build tools only: mypy is installed beside the venv,
# not in it, and the runtime stage takes the extensions, not the compiler.
ARG MYPY_VERSION=2.4.1
COPY scripts/compile_hot_path.py scripts/compile_hot_path.py
RUN apt-get update \
    && apt-get install -y --no-install-recommends gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/* \
    && pip install --target /opt/mypyc "mypy==${MYPY_VERSION}" \
    && PYTHONPATH=/opt/mypyc python scripts/compile_hot_path.py

# ---- runtime -------------------------------------------------------------------------------------
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PATH=/opt/venv/bin:$PATH

# A system user with a fixed numeric id (Kubernetes runAsNonRoot can check a numeric USER), no home and
# no shell. It owns only the directory of the default SQLite feedback store.
RUN groupadd --system --gid 10001 cmvcds \
    && useradd --system --uid 10001 --gid cmvcds --no-create-home --home-dir /nonexistent \
        --shell /usr/sbin/nologin cmvcds \
    && install -d -o cmvcds -g cmvcds -m 0750 /var/lib/cmv-cds

COPY --from=builder /opt/venv /opt/venv

WORKDIR /app
# Code and data are owned by root and read-only for the service user.
COPY pyproject.toml ./
# The packages as the builder compiled them: sources, C extensions and the manifests that tie them together.
COPY --from=builder /app/service/ service/
COPY --from=builder /app/cards/ cards/
COPY fhir_profiles/ fhir_profiles/
# The synthetic example requests (no real patient data): listed by /preview, run by `cmv-cds demo NAME`.
COPY examples/ examples/
RUN python -m compileall -q service cards

# Listen on all interfaces inside the container. The feedback store defaults to SQLite in the user's
# data directory (the image default, sqlite:///cmv-cds-feedback.sqlite3, would be in read-only /app);
# docker-compose.yml points it at PostgreSQL instead. The issued-card spool (audit rows waiting for the
# database, service/audit_log.py) lives there too: mount a volume at /var/lib/cmv-cds so that it survives the
# container (compose: the `spool` volume; Kubernetes: an emptyDir, which survives container restarts). Beyond it
# only /tmp (the Prometheus multiprocess files) and /dev/shm (worker heartbeats) are written: with a read-only
# root file system, mount a tmpfs at /tmp (deploy/kubernetes does).
ENV CMV_CDS_HOST=0.0.0.0 \
    CMV_CDS_PORT=8080 \
    CMV_CDS_DATABASE_URL=sqlite:////var/lib/cmv-cds/feedback.sqlite3 \
    CMV_CDS_SPOOL_DIR=/var/lib/cmv-cds/spool

USER 10001:10001
EXPOSE 8080

# /healthz answers without a JWT and without touching the database (liveness only; /readyz checks it). The
# service starts without its database (and creates a missing schema on first use); `cmv-cds migrate` creates it
# beforehand where the service's database user may not.
HEALTHCHECK --interval=30s --timeout=5s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8080/healthz', timeout=4)"]

# Exec form: gunicorn's master is PID 1 and gets SIGTERM from `docker stop` directly (graceful shutdown).
CMD ["cmv-cds", "serve"]
