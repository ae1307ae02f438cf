"""What the FHIR reads take from the process environment (service.fhir_client.environment_settings): the proxies
and CA bundle requests would use, read once per FHIR server; never ``~/.netrc``, whose Basic credentials would
replace the CDS client's bearer token."""

from __future__ import annotations

import contextlib
import datetime as dt
import ipaddress
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
import responses
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from processes import LOOPBACK
from responses import matchers

from service.fhir_client import (
    FetchBudget,
    FhirDeadlineExceeded,
    FhirFetchError,
    FhirServer,
    environment_settings,
    fhir_session,
)
from service.metrics import fetch_error_kind

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


def test_no_cookie_is_kept_or_sent_between_reads() -> None:
    """The FHIR server is called with the client's bearer token only: a cookie it sets (a load balancer's, a
    session id) is neither kept nor sent with the next page or the next read of the same hook call, whose reads
    share one session (service.fhir_client.fhir_session)."""
    server = FhirServer(BASE, "client-token", 5.0, 1_000_000, 5, FetchBudget(5.0))
    first_page = {
        "resourceType": "Bundle",
        "type": "searchset",
        "link": [{"relation": "next", "url": f"{BASE}/Observation?patient=p1&page=2"}],
        "entry": [{"resource": {"resourceType": "Observation", "id": "o1"}}],
    }
    last_page = {"resourceType": "Bundle", "type": "searchset", "entry": []}
    with responses.RequestsMock() as mock:
        mock.get(
            f"{BASE}/Observation",
            json=first_page,
            headers={"Set-Cookie": "AWSALB=sticky-node-3; Path=/"},
            match=[matchers.query_param_matcher({"patient": "p1"})],
        )
        mock.get(
            f"{BASE}/Observation", json=last_page, match=[matchers.query_param_matcher({"patient": "p1", "page": "2"})]
        )
        mock.get(f"{BASE}/Patient/p1", json=PATIENT)
        with fhir_session() as session:
            found = server.search(f"{BASE}/Observation?patient=p1", session)
            assert server.get_json(f"{BASE}/Patient/p1", session) == PATIENT
            assert not list(session.cookies)
        sent = [call.request.headers.get("Cookie") for call in mock.calls]
    assert [resource["id"] for resource in found] == ["o1"]
    assert sent == [None, None, None]


def test_a_callers_session_contributes_no_cookie_or_header() -> None:
    """A caller's own session (not fhir_session) lends only its transport: its cookies and default headers are not
    sent to the FHIR server."""
    server = FhirServer(BASE, "client-token", 5.0, 1_000_000, 5, FetchBudget(5.0))
    with responses.RequestsMock() as mock, requests.Session() as session:
        mock.get(f"{BASE}/Patient/p1", json=PATIENT)
        session.cookies.set("JSESSIONID", "someone-elses", domain="ehr.example.org")
        session.headers["X-Api-Key"] = "not-for-the-fhir-server"
        assert server.get_json(f"{BASE}/Patient/p1", session) == PATIENT
        (call,) = mock.calls
    assert "Cookie" not in call.request.headers
    assert "X-Api-Key" not in call.request.headers
    assert call.request.headers["Authorization"] == "Bearer client-token"


def test_reads_accept_compressed_bodies_and_name_their_client() -> None:
    """What a requests session sends by default, though the reads are prepared without one: FHIR JSON compresses
    several-fold, and a slow link to the EHR should carry it compressed."""
    sent = _read().headers
    assert "gzip" in sent["Accept-Encoding"]
    assert sent["Accept"] == "application/fhir+json"
    assert sent["User-Agent"].startswith("python-requests/")


def test_a_redirect_is_an_error_and_nothing_of_it_is_read(monkeypatch: pytest.MonkeyPatch) -> None:
    """A 3xx is refused without preparing its next request: requests would read the whole body of the 3xx (no cap)
    and look up ~/.netrc credentials for the target."""

    def no_netrc(*_: Any, **__: Any) -> None:
        raise AssertionError("~/.netrc was consulted")

    monkeypatch.setattr(requests.sessions, "get_netrc_auth", no_netrc)
    server = FhirServer(BASE, "client-token", 5.0, 1_000_000, 5, FetchBudget(5.0))
    with responses.RequestsMock() as mock, fhir_session() as session:
        mock.get(f"{BASE}/Patient/p1", status=302, headers={"Location": "https://elsewhere.example.com/Patient/p1"})
        with pytest.raises(FhirFetchError, match="answered HTTP 302"):
            server.get_json(f"{BASE}/Patient/p1", session)
        assert len(mock.calls) == 1


@contextlib.contextmanager
def _dribbling_server(tls: ssl.SSLContext | None = None) -> Iterator[tuple[int, list[socket.socket]]]:
    """A loopback server (TLS with ``tls``) that answers any request with a 100-byte body sent a byte every 0.2 s,
    so no read ever times out; yields its port and the connections it accepted."""
    listener = socket.create_server((LOOPBACK, 0))
    held: list[socket.socket] = []

    def dribble(conn: socket.socket) -> None:
        with contextlib.suppress(OSError), tls.wrap_socket(conn, server_side=True) if tls else conn as stream:
            stream.recv(65536)
            stream.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/fhir+json\r\nContent-Length: 100\r\n\r\n")
            for _ in range(100):
                stream.sendall(b" ")
                time.sleep(0.2)

    def accept() -> None:
        with contextlib.suppress(OSError):
            while True:
                held.append(listener.accept()[0])
                threading.Thread(target=dribble, args=(held[-1],), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    try:
        yield listener.getsockname()[1], held
    finally:
        listener.close()
        for conn in held:
            conn.close()


def _read_ends_by_the_budget(server: FhirServer) -> None:
    """A read of Patient/p1 from a dribbling server ends with the budget (1 s), not after the 20 s of its body."""
    started = time.monotonic()
    with fhir_session() as session, pytest.raises(FhirDeadlineExceeded):
        server.get_json(server.url_for("Patient/p1"), session)
    assert time.monotonic() - started < 2.5


def test_a_read_through_a_proxy_ends_by_the_budget(monkeypatch: pytest.MonkeyPatch) -> None:
    """The budget's watchdog reaches connections made through an HTTP proxy too: a proxy that sends its answer a
    byte every 0.2 s (no read ever times out) is cut off when the budget (1 s) ends, not after the 100 bytes."""
    with _dribbling_server() as (port, held):
        monkeypatch.setenv("HTTP_PROXY", f"http://{LOOPBACK}:{port}")
        _read_ends_by_the_budget(FhirServer("http://ehr.example.org/fhir", None, 5.0, 1_000_000, 5, FetchBudget(1.0)))
        assert held, "the read did not go through the proxy"


@pytest.mark.parametrize("variable", ["ALL_PROXY", "HTTPS_PROXY", "all_proxy"])
def test_a_socks_proxy_is_refused_with_a_reason(monkeypatch: pytest.MonkeyPatch, variable: str) -> None:
    """A SOCKS proxy's connections are urllib3's own classes, which the budget's watchdog cannot end: the read is
    refused, saying why and what to do, and nothing is connected (not the proxy, not the FHIR server)."""
    with _dribbling_server() as (port, held):
        monkeypatch.setenv(variable, f"socks5h://{LOOPBACK}:{port}")
        server = FhirServer(BASE, "client-token", 5.0, 1_000_000, 5, FetchBudget(5.0))
        with fhir_session() as session, pytest.raises(FhirFetchError, match=r"SOCKS proxy .* not supported") as caught:
            server.get_json(f"{BASE}/Patient/p1", session)
        assert "HTTP(S) proxy, or NO_PROXY" in str(caught.value)
        assert fetch_error_kind(caught.value) == "transport"
        time.sleep(0.2)
        assert held == [], "the SOCKS proxy was contacted"


def _self_signed(directory: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 and its key, written to ``directory``."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, LOOPBACK)])
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        # Valid on any day, whatever clock the test runs under: OpenSSL checks against the system's, which the
        # suite's shifted clock (tests/clock_shift) does not move.
        .not_valid_before(dt.datetime(2000, 1, 1, tzinfo=dt.UTC))
        .not_valid_after(dt.datetime(9999, 12, 31, tzinfo=dt.UTC))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(LOOPBACK))]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / "fhir-cert.pem", directory / "fhir-key.pem"
    cert_path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return cert_path, key_path


def test_an_https_read_ends_by_the_budget(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Over TLS too: a server that sends its answer a byte every 0.2 s is cut off when the budget (1 s) ends. (TLS
    takes the connected socket over, so the watchdog must hold the connection by a descriptor of its own.)"""
    cert_path, key_path = _self_signed(tmp_path)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert_path, key_path)
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(cert_path))
    budget = FetchBudget(1.0)
    with _dribbling_server(context) as (port, held):
        try:
            _read_ends_by_the_budget(FhirServer(f"https://{LOOPBACK}:{port}/fhir", None, 5.0, 1_000_000, 5, budget))
        finally:
            budget.close()
        assert held, "the read never reached the server"
