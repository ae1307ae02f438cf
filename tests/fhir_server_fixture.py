"""A real FHIR R4 server for the integration tests: Medplum's in-memory router (tests/fhir_server).

``fhir_server`` (module scope) writes the fixture patient Bundle (tests/fixtures/adult-transplant-cmv.json,
relative dates resolved) to a temporary file, starts ``node server.mjs`` on a free loopback port with
``SEED``/``PORT``/``TOKEN``, waits until ``/fhir/R4/metadata`` answers (at most 30 s), yields a
:class:`FhirTestServer` and stops the server's process group at the end. Tests are skipped (with the
command to run) when node is absent or the server's npm packages are not installed.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import requests
from fhir_fixtures import load
from processes import free_loopback_port, stop_process_group

SERVER_DIR = Path(__file__).resolve().parent / "fhir_server"
NODE_MODULES = SERVER_DIR / "node_modules"
FHIR_SCHEMA = NODE_MODULES / "@medplum" / "definitions" / "dist" / "fhir" / "r4" / "fhir.schema.json"
NPM_COMMAND = "npm ci --prefix tests/fhir_server --no-audit --no-fund"
SEED_FIXTURE = "adult-transplant-cmv.json"
STARTUP_TIMEOUT_SECONDS = 30.0
FHIR_JSON = "application/fhir+json"


@dataclass(frozen=True)
class FhirTestServer:
    """A running test FHIR server: its base URL (``http://127.0.0.1:<port>/fhir/R4``) and bearer token."""

    base_url: str
    token: str

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}", "Accept": FHIR_JSON}

    def get(self, relative: str) -> requests.Response:
        """GET ``<base>/<relative>`` with the token (``relative`` may be a search with a query)."""
        return requests.get(f"{self.base_url}/{relative.lstrip('/')}", headers=self.headers, timeout=10)

    def put(self, resource: dict[str, Any]) -> dict[str, Any]:
        """Store a resource under its own id (update-as-create)."""
        response = requests.put(
            f"{self.base_url}/{resource['resourceType']}/{resource['id']}",
            json=resource,
            headers={**self.headers, "Content-Type": FHIR_JSON},
            timeout=10,
        )
        assert response.status_code in (200, 201), response.text
        stored: dict[str, Any] = response.json()
        return stored

    def put_all(self, resources: list[dict[str, Any]]) -> None:
        """Store many resources under their own ids in one batch (POST of a batch Bundle to the base)."""
        batch = {
            "resourceType": "Bundle",
            "type": "batch",
            "entry": [
                {"resource": r, "request": {"method": "PUT", "url": f"{r['resourceType']}/{r['id']}"}}
                for r in resources
            ],
        }
        response = requests.post(
            self.base_url, json=batch, headers={**self.headers, "Content-Type": FHIR_JSON}, timeout=30
        )
        assert response.status_code == 200, response.text
        statuses = [entry["response"]["status"] for entry in response.json()["entry"]]
        assert all(status.startswith(("200", "201")) for status in statuses), statuses


def server_unavailable_reason() -> str | None:
    """Why the test FHIR server cannot start here, or None when it can."""
    if shutil.which("node") is None:
        return "node is not installed; the real-FHIR-server tests need Node 20+"
    if not (NODE_MODULES / "@medplum" / "fhir-router" / "package.json").is_file():
        return f"the test FHIR server's npm packages are not installed; run: {NPM_COMMAND}"
    return None


def _wait_ready(process: subprocess.Popen[bytes], base_url: str, token: str, log_path: Path) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT_SECONDS
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(
                f"test FHIR server exited with {process.returncode}:\n{log_path.read_text(errors='replace')}"
            )
        try:
            response = requests.get(f"{base_url}/metadata", headers={"Authorization": f"Bearer {token}"}, timeout=1)
            if response.status_code == 200 and response.json().get("resourceType") == "CapabilityStatement":
                return
        except requests.RequestException:
            pass
        time.sleep(0.05)
    raise RuntimeError(
        f"test FHIR server did not answer {base_url}/metadata within {STARTUP_TIMEOUT_SECONDS:.0f} s:\n"
        + log_path.read_text(errors="replace")
    )


def start_fhir_server(workdir: Path, seed: dict[str, Any]) -> tuple[subprocess.Popen[bytes], FhirTestServer]:
    """Start ``node server.mjs`` seeded with ``seed``; the caller stops it with ``stop_process_group``."""
    node = shutil.which("node")
    assert node is not None
    seed_path = workdir / "seed-bundle.json"
    seed_path.write_text(json.dumps(seed), encoding="utf-8")
    token = secrets.token_urlsafe(24)
    log_path = workdir / "fhir-server.log"
    for attempt in range(3):  # the free port can be taken between probing it and node binding it
        port = free_loopback_port()
        base_url = f"http://127.0.0.1:{port}/fhir/R4"
        with log_path.open("wb") as log:
            process = subprocess.Popen(
                [node, "server.mjs"],
                cwd=SERVER_DIR,
                env={**os.environ, "SEED": str(seed_path), "PORT": str(port), "TOKEN": token},
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own process group, stopped as a whole
            )
        try:
            _wait_ready(process, base_url, token, log_path)
        except RuntimeError:
            stop_process_group(process, timeout_seconds=5)
            if attempt < 2 and "EADDRINUSE" in log_path.read_text(errors="replace"):
                continue
            raise
        except BaseException:
            stop_process_group(process, timeout_seconds=5)
            raise
        return process, FhirTestServer(base_url, token)
    raise AssertionError("unreachable")


@pytest.fixture(scope="module")
def fhir_server() -> Iterator[FhirTestServer]:
    """The fixture patient (tests/fixtures/adult-transplant-cmv.json) on a real FHIR server."""
    reason = server_unavailable_reason()
    if reason is not None:
        pytest.skip(reason)
    with tempfile.TemporaryDirectory(prefix="cmv-cds-fhir-") as tmp:
        process, server = start_fhir_server(Path(tmp), load(SEED_FIXTURE))
        try:
            yield server
        finally:
            stop_process_group(process, timeout_seconds=5)
