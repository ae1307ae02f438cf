"""What the FHIR reads take from the process environment (service.fhir_client.environment_settings): the proxies
and CA bundle requests would use, read once per FHIR server; never ``~/.netrc``, whose Basic credentials would
replace the CDS client's bearer token."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import responses

from service.fhir_client import FetchBudget, FhirServer, environment_settings, fhir_session

BASE = "https://ehr.example.org/fhir"
PATIENT = {"resourceType": "Patient", "id": "p1"}
ENVIRONMENT = (
    "HTTPS_PROXY",
    "https_proxy",
    "HTTP_PROXY",
    "http_proxy",
    "ALL_PROXY",
    "all_proxy",
    "NO_PROXY",
    "no_proxy",
)


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[None]:
    for name in (*ENVIRONMENT, "REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    environment_settings.cache_clear()
    yield
    environment_settings.cache_clear()


def _read() -> Any:
    """One read of Patient/p1 with the token "client-token"; the request as requests sent it."""
    server = FhirServer(BASE, "client-token", 5.0, 1_000_000, 5, FetchBudget(5.0))
    with responses.RequestsMock() as mock:
        mock.get(f"{BASE}/Patient/p1", json=PATIENT)
        with fhir_session() as session:
            assert server.get_json(f"{BASE}/Patient/p1", session) == PATIENT
        return mock.calls[0].request


def test_a_netrc_entry_for_the_fhir_host_does_not_replace_the_clients_bearer_token(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    netrc = tmp_path / "netrc"
    netrc.write_text("machine ehr.example.org login operator password secret\n")
    netrc.chmod(0o600)
    monkeypatch.setenv("NETRC", str(netrc))
    assert _read().headers["Authorization"] == "Bearer client-token"


def test_the_proxy_the_environment_names_is_used(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.hospital.internal:3128")
    assert _read().req_kwargs["proxies"].get("https") == "http://proxy.hospital.internal:3128"


def test_no_proxy_exempts_the_fhir_host(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.hospital.internal:3128")
    monkeypatch.setenv("NO_PROXY", "localhost,.example.org")
    assert not _read().req_kwargs["proxies"].get("https")


def test_the_ca_bundle_the_environment_names_is_used(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    bundle = tmp_path / "hospital-ca.pem"
    bundle.write_text("")
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(bundle))
    assert _read().req_kwargs["verify"] == str(bundle)


def test_without_a_ca_bundle_certificates_are_verified() -> None:
    assert _read().req_kwargs["verify"] is True


def test_no_proxy_with_a_port_is_decided_per_url_as_written(monkeypatch: pytest.MonkeyPatch) -> None:
    """requests matches a NO_PROXY entry with a port against the port the URL writes: the decision is cached per
    origin as written, not per FHIR server, so a link written with :443 keeps requests' own answer."""
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.hospital.internal:3128")
    monkeypatch.setenv("NO_PROXY", "ehr.example.org:443")
    server = FhirServer(BASE, "client-token", 5.0, 1_000_000, 5, FetchBudget(5.0))
    with responses.RequestsMock() as mock:
        mock.get(f"{BASE}/Patient/p1", json=PATIENT)
        mock.get("https://ehr.example.org:443/fhir/Patient/p1", json=PATIENT)
        with fhir_session() as session:
            server.get_json(f"{BASE}/Patient/p1", session)
            server.get_json("https://ehr.example.org:443/fhir/Patient/p1", session)
        requests_sent: list[Any] = [call.request for call in mock.calls]  # responses adds req_kwargs to each
    written_without_port, written_with_port = (sent.req_kwargs["proxies"] for sent in requests_sent)
    assert written_without_port.get("https") == "http://proxy.hospital.internal:3128"
    assert not written_with_port.get("https")
