"""Reads from the CDS client's FHIR server (for prefetch keys the client did not satisfy).

Short timeouts, a byte cap on every response, no redirects, and paging only within the FHIR server's
own origin: the service must never become a proxy into the hospital network.
"""

from __future__ import annotations

import ipaddress
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import orjson
import requests

FHIR_JSON = "application/fhir+json"


class FhirFetchError(Exception):
    """Data could not be obtained from the FHIR server. The message names no patient data."""


@dataclass(frozen=True)
class FhirServer:
    """A FHIR base URL with the bearer token the CDS client granted for this request."""

    base_url: str
    access_token: str | None
    timeout_seconds: float
    max_response_bytes: int
    max_pages: int
    deadline: float  # time.monotonic() value after which no further call is started

    def contains(self, url: str) -> bool:
        """True when ``url`` is on this server's origin and under its base path (segment-wise, no ``..``)."""
        return _within(self.base_url, url)

    def url_for(self, relative: str) -> str:
        return self.base_url.rstrip("/") + "/" + relative.lstrip("/")

    def get_json(self, url: str, session: requests.Session) -> dict[str, Any] | None:
        """GET one URL; None for 404/410 on a read, error for anything else that is not a JSON 200."""
        if not self.contains(url):
            raise FhirFetchError("FHIR server returned a link outside its own base URL")
        remaining = self.deadline - time.monotonic()
        if remaining <= 0:
            raise FhirFetchError("FHIR fetch deadline exceeded")
        headers = {"Accept": FHIR_JSON}
        if self.access_token:
            headers["Authorization"] = f"Bearer {self.access_token}"
        timeout = min(self.timeout_seconds, remaining)
        try:
            with session.get(url, headers=headers, timeout=timeout, allow_redirects=False, stream=True) as resp:
                if resp.status_code in (404, 410):
                    return None
                if resp.status_code != 200:
                    raise FhirFetchError(f"FHIR server answered HTTP {resp.status_code}")
                body = _read_capped(resp, self.max_response_bytes, self.deadline)
        except requests.RequestException as exc:
            raise FhirFetchError(f"FHIR server unreachable ({type(exc).__name__})") from exc
        try:
            parsed = orjson.loads(body)
        except orjson.JSONDecodeError as exc:
            raise FhirFetchError("FHIR server returned a body that is not JSON") from exc
        if not isinstance(parsed, dict) or not isinstance(parsed.get("resourceType"), str):
            raise FhirFetchError("FHIR server returned JSON that is not a FHIR resource")
        if parsed["resourceType"] == "OperationOutcome":
            raise FhirFetchError("FHIR server returned an OperationOutcome")
        return parsed

    def search(self, start_url: str, session: requests.Session) -> list[dict[str, Any]]:
        """Run a search from an absolute URL on this server and follow ``link[next]`` up to
        ``max_pages``; return the matched resources."""
        url: str | None = start_url
        resources: list[dict[str, Any]] = []
        pages = 0
        while url:
            pages += 1
            if pages > self.max_pages:
                raise FhirFetchError(f"search result has more than {self.max_pages} pages")
            bundle = self.get_json(url, session)
            if bundle is None:
                raise FhirFetchError("FHIR server answered 404 to a search")
            if bundle.get("resourceType") != "Bundle":
                raise FhirFetchError("FHIR search did not return a Bundle")
            resources.extend(bundle_resources(bundle))
            url = next_link(bundle)
        return resources


_DEFAULT_PORTS = {"http": 80, "https": 443}


def _origin(url: str) -> tuple[str, str, int | None] | None:
    """(scheme, host, port with the scheme's default); None for a URL that does not parse."""
    try:
        parts = urlsplit(url)
        scheme = parts.scheme.lower()
        return scheme, (parts.hostname or "").lower(), parts.port or _DEFAULT_PORTS.get(scheme)
    except ValueError:
        return None


def _within(base: str, url: str) -> bool:
    origin = _origin(url)
    if origin is None or origin != _origin(base):
        return False
    base_segments = [s for s in urlsplit(base).path.split("/") if s]
    segments = urlsplit(url).path.split("/")
    if any(s in ("..", ".") or "%2e" in s.lower() for s in segments):
        return False
    segments = [s for s in segments if s]
    return segments[: len(base_segments)] == base_segments


@dataclass(frozen=True)
class FhirAccessPolicy:
    """Which fhirServer URLs the service may contact for this request (an SSRF guard).

    - https only; plain http only to a loopback host, and only when authentication is off (local use);
    - with an allowlist (global, or the calling issuer's own), the URL must lie under one of its prefixes;
    - with no allowlist, any https server is allowed only when authentication is off; otherwise none.
    """

    prefixes: tuple[str, ...]
    auth_required: bool

    def refusal(self, url: str) -> str | None:
        """Why ``url`` may not be contacted, or None when it may."""
        if _origin(url) is None:
            return "fhirServer is not a valid URL"
        parts = urlsplit(url)
        scheme = parts.scheme.lower()
        if scheme == "http":
            if self.auth_required or not _is_loopback(parts.hostname or ""):
                return "fhirServer must use https (plain http only to a loopback host with auth off)"
        elif scheme != "https":
            return "fhirServer must be an https URL"
        if self.prefixes:
            if not any(_within(prefix, url) for prefix in self.prefixes):
                return "fhirServer is not on the FHIR server allowlist"
        elif self.auth_required:
            return "no FHIR server allowlist is configured (CMV_CDS_FHIR_SERVER_ALLOWLIST)"
        return None


def _is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _read_capped(resp: requests.Response, cap: int, deadline: float) -> bytes:
    chunks: list[bytes] = []
    size = 0
    for chunk in resp.iter_content(chunk_size=65536):
        size += len(chunk)
        if size > cap:
            raise FhirFetchError(f"FHIR response larger than {cap} bytes")
        if time.monotonic() > deadline:
            raise FhirFetchError("FHIR fetch deadline exceeded")
        chunks.append(chunk)
    return b"".join(chunks)


def bundle_resources(bundle: dict[str, Any]) -> list[dict[str, Any]]:
    """The resources of a Bundle's entries, skipping search-outcome entries and malformed ones."""
    entries = bundle.get("entry")
    if not isinstance(entries, list):
        return []
    found = []
    for entry in entries:
        if not isinstance(entry, dict):
            continue
        search = entry.get("search")
        if isinstance(search, dict) and search.get("mode") == "outcome":
            continue
        resource = entry.get("resource")
        if isinstance(resource, dict) and isinstance(resource.get("resourceType"), str):
            if resource["resourceType"] == "OperationOutcome":
                continue
            found.append(resource)
    return found


def next_link(bundle: dict[str, Any]) -> str | None:
    """The ``link[relation=next].url`` of a Bundle, if any."""
    links = bundle.get("link")
    if not isinstance(links, list):
        return None
    for link in links:
        if isinstance(link, dict) and link.get("relation") == "next" and isinstance(link.get("url"), str):
            return str(link["url"])
    return None
