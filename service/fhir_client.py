"""Reads from the CDS client's FHIR server (for prefetch keys the client did not satisfy).

Short timeouts, a byte cap on every response, no redirects, and paging only within the FHIR server's
own origin: the service must never become a proxy into the hospital network.

**One wall-clock budget per hook call** (``FetchBudget``, ``CMV_CDS_FHIR_DEADLINE_SECONDS``) bounds the total time of
every read made for that call: connecting, TLS, headers, every page and every body byte. A per-read socket
timeout cannot do that (a server sending one byte per second never trips it), so the budget keeps a watchdog:
every socket opened or reused for the call is registered with it, and when the budget runs out the watchdog
shuts those sockets down, which ends a blocked read at once, in whichever thread it runs. The call then fails
with ``FhirDeadlineExceeded``. The watchdog is a timer thread that lives at most until the deadline.
"""

from __future__ import annotations

import contextlib
import functools
import http.cookiejar
import ipaddress
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import orjson
import requests
from requests.adapters import HTTPAdapter
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool

from service.bundles import bundle_resources, next_link

FHIR_JSON = "application/fhir+json"
# What a requests session sends by default (compressed bodies accepted: FHIR JSON compresses several-fold), with
# FHIR's media type; get_json's requests are prepared without a session, so they are written out here.
_HEADERS = {
    "User-Agent": requests.utils.default_user_agent(),
    "Accept-Encoding": requests.utils.DEFAULT_ACCEPT_ENCODING,
    "Accept": FHIR_JSON,
    "Connection": "keep-alive",
}


class FhirFetchError(Exception):
    """Data could not be obtained from the FHIR server. The message names no patient data."""


class FhirDeadlineExceeded(FhirFetchError):
    """The hook call's FHIR budget (``CMV_CDS_FHIR_DEADLINE_SECONDS``) ran out before the data arrived."""

    def __init__(self) -> None:
        super().__init__("FHIR fetch deadline exceeded")


class FetchBudget:
    """The wall-clock budget of all FHIR reads of one hook call (see the module docstring).

    ``remaining()`` is what is left; ``expire()`` ends it early (``service.fetch_pool``, when it stops waiting);
    ``close()`` releases the watchdog when the call is done. Thread-safe: the reads of one call run in parallel.
    """

    def __init__(self, seconds: float, *, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self.seconds = seconds
        self.deadline: float = clock() + seconds
        self._lock = threading.Lock()
        self._sockets: set[socket.socket] = set()
        self._timer: threading.Timer | None = None
        self._expired = False

    def remaining(self) -> float:
        """Seconds left in the hook's FHIR budget (negative once it is spent)."""
        return self.deadline - self._clock()

    @property
    def expired(self) -> bool:
        """True once the deadline has passed (or ``expire`` was called)."""
        return self._expired or self.remaining() <= 0

    def watch(self, sock: socket.socket) -> None:
        """Shut ``sock``'s connection down when the budget runs out (at once if it already has).

        What is kept is a duplicate of its file descriptor: TLS takes a new socket over from the one urllib3
        connected (``ssl.wrap_socket`` detaches it), so a watched plain socket would have no descriptor left by
        the time the budget ran out, and an HTTPS read would go on past it. A shutdown through the duplicate ends
        the connection both descriptors refer to. The duplicates are closed when the budget expires or closes."""
        try:
            duplicate = socket.fromfd(sock.fileno(), sock.family, sock.type)
        except OSError:  # already closed: nothing left to end
            return
        with self._lock:
            if not self._expired:
                self._sockets.add(duplicate)
                if self._timer is None:
                    self._timer = threading.Timer(max(0.0, self.remaining()), self.expire)
                    self._timer.name = "cmv-cds-fhir-deadline"
                    self._timer.daemon = True
                    self._timer.start()
                return
        _shut_down(duplicate)
        duplicate.close()

    def expire(self) -> None:
        """End the budget now: every watched socket is shut down, blocked reads on it return."""
        with self._lock:
            self._expired = True
            sockets, self._sockets = self._sockets, set()
            timer, self._timer = self._timer, None
        if timer is not None and timer is not threading.current_thread():
            timer.cancel()
        for sock in sockets:
            _shut_down(sock)
            sock.close()

    def close(self) -> None:
        """The hook call is done with FHIR: stop the watchdog and close its duplicate descriptors (the connections
        themselves are the sessions' to close)."""
        if self._timer is None and not self._sockets:
            return  # nothing was watched: the call read no FHIR server (its prefetch was complete)
        with self._lock:
            sockets, self._sockets = self._sockets, set()
            timer, self._timer = self._timer, None
        if timer is not None:
            timer.cancel()
        for sock in sockets:
            sock.close()

    @contextlib.contextmanager
    def bound(self) -> Iterator[None]:
        """Within the block, connections this thread opens or reuses are watched by this budget."""
        previous = getattr(_current, "budget", None)
        _current.budget = self
        try:
            yield
        finally:
            _current.budget = previous


def _shut_down(sock: socket.socket) -> None:
    # A plain socket's shutdown (the watched duplicates are plain, also for a TLS connection): no TLS close_notify
    # exchange, just the connection, which makes a recv blocked in another thread return at once.
    with contextlib.suppress(OSError):
        socket.socket.shutdown(sock, socket.SHUT_RDWR)


_current = threading.local()


def _watch_current(sock: socket.socket | None) -> None:
    budget: FetchBudget | None = getattr(_current, "budget", None)
    if budget is not None and sock is not None:
        budget.watch(sock)


class _WatchedNewConnection:
    """Mixin for urllib3 connections: a new socket is watched before TLS and headers (a slow handshake counts)."""

    def _new_conn(self) -> socket.socket:
        sock: socket.socket = super()._new_conn()  # type: ignore[misc]
        _watch_current(sock)
        return sock


class _WatchedReusedConnection:
    """Mixin for urllib3 pools: a kept-alive connection taken from the pool is watched too."""

    def _get_conn(self, timeout: float | None = None) -> Any:
        conn = super()._get_conn(timeout)  # type: ignore[misc]
        _watch_current(getattr(conn, "sock", None))
        return conn


class _WatchedHTTPConnection(_WatchedNewConnection, HTTPConnection):
    pass


class _WatchedHTTPSConnection(_WatchedNewConnection, HTTPSConnection):
    pass


class _WatchedHTTPConnectionPool(_WatchedReusedConnection, HTTPConnectionPool):
    ConnectionCls = _WatchedHTTPConnection


class _WatchedHTTPSConnectionPool(_WatchedReusedConnection, HTTPSConnectionPool):
    ConnectionCls = _WatchedHTTPSConnection


_WATCHED_POOLS = {"http": _WatchedHTTPConnectionPool, "https": _WatchedHTTPSConnectionPool}


class SocksProxyRefused(requests.exceptions.InvalidProxyURL):
    """A SOCKS proxy was named for a FHIR server: refused, since the budget could not end its connections."""


class WatchedAdapter(HTTPAdapter):
    """requests' adapter whose connections register with the current ``FetchBudget`` (``FetchBudget.bound``),
    directly or through an HTTP(S) proxy (``HTTPS_PROXY``). A SOCKS proxy is refused (``SocksProxyRefused``): urllib3's
    SOCKS manager builds connections of its own classes, which the budget's watchdog would not see, so a slow read
    through one could outlast the hook call's FHIR budget."""

    def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
        super().init_poolmanager(*args, **kwargs)
        self.poolmanager.pool_classes_by_scheme = dict(_WATCHED_POOLS)

    def proxy_manager_for(self, proxy: str, **proxy_kwargs: Any) -> Any:
        if proxy.lower().startswith("socks"):
            raise SocksProxyRefused(
                "a SOCKS proxy is configured for the FHIR server (ALL_PROXY/HTTPS_PROXY): not supported, since the "
                "FHIR budget cannot end its connections; use an HTTP(S) proxy, or NO_PROXY for the FHIR host"
            )
        manager = super().proxy_manager_for(proxy, **proxy_kwargs)
        manager.pool_classes_by_scheme = dict(_WATCHED_POOLS)
        return manager


class _FhirSession(requests.Session):
    def get_redirect_target(self, resp: requests.Response) -> str | None:
        # Redirects are never followed (a 3xx is an error, service.fhir_client.FhirServer.get_json). Without this,
        # Session.send would still prepare the next request of a 3xx, reading its whole body, with no cap.
        return None


def fhir_session(max_connections: int = 10) -> requests.Session:
    """A requests session whose connections honour the budget of the ``FhirServer`` using it, and which keeps no
    cookies and reads nothing from the environment. One such session serves every read of a hook call, from all
    its fetch threads (``max_connections`` of them kept open at most): ``get_json`` sends requests prepared on
    their own (``Session.send``), so the session contributes only its adapters, whose urllib3 pools are
    thread-safe, never cookies, headers or ``~/.netrc`` credentials. Share only sessions made here: ``get_json``
    mounts an adapter on any other session it is given."""
    session = _FhirSession()
    session.trust_env = False
    session.cookies.set_policy(_NO_COOKIES)
    session.mount("https://", WatchedAdapter(pool_maxsize=max_connections))
    session.mount("http://", WatchedAdapter(pool_maxsize=max_connections))
    return session


# The FHIR server is called with the client's bearer token only: no cookie is stored, so none can be sent.
_NO_COOKIES = http.cookiejar.DefaultCookiePolicy(allowed_domains=[])


@functools.lru_cache(maxsize=64)
def environment_settings(origin: str) -> tuple[dict[str, str], bool | str]:
    """(proxies, verify) for requests to ``origin`` (``scheme://host[:port]/``, the port as the URL writes it), as
    requests itself reads them from the environment (``HTTPS_PROXY``/``HTTP_PROXY``/``ALL_PROXY``, ``NO_PROXY``,
    ``REQUESTS_CA_BUNDLE``, ``CURL_CA_BUNDLE``), read once per origin and process. Why: the environment does not
    change while the service runs, and requests reads it twice per GET by walking every variable, about 0.3 ms
    each time here (more under Kubernetes, which adds variables for every service in the namespace): a fifth of
    the CPU of a FHIR read (bench/README.md, round 5)."""
    with requests.Session() as probe:
        merged = probe.merge_environment_settings(origin, {}, None, None, None)
    verify = merged["verify"]
    return dict(merged["proxies"]), True if verify is None else verify


@dataclass(frozen=True)
class FhirServer:
    """A FHIR base URL with the bearer token the CDS client granted for this request, and the hook call's
    budget: every ``get_json``/``search`` on it, in any thread, ends by ``budget.deadline``."""

    base_url: str
    access_token: str | None
    timeout_seconds: float
    max_response_bytes: int
    max_pages: int
    budget: FetchBudget = field(compare=False)

    @property
    def deadline(self) -> float:
        """``time.monotonic()`` value after which no read is started and every read under way is ended."""
        return self.budget.deadline

    def contains(self, url: str) -> bool:
        """True when ``url`` is on this server's origin and under its base path (segment-wise, no ``..``)."""
        return _within(self.base_url, url)

    def url_for(self, relative: str) -> str:
        """The absolute URL of a relative FHIR query on this server."""
        return self.base_url.rstrip("/") + "/" + relative.lstrip("/")

    def get_json(self, url: str, session: requests.Session) -> dict[str, Any] | None:
        """GET one URL; None for 404/410 on a read, error for anything else that is not a JSON 200.

        Ends by the budget's deadline whatever the server does (``FhirDeadlineExceeded``). ``session``: best from
        ``fhir_session()``; a plain ``requests.Session`` gets the budget's adapter mounted for this server."""
        if not self.contains(url):
            raise FhirFetchError("FHIR server returned a link outside its own base URL")
        remaining = self.budget.remaining()
        if remaining <= 0 or self.budget.expired:
            raise FhirDeadlineExceeded()
        headers = dict(_HEADERS)
        if self.access_token:
            headers["Authorization"] = f"Bearer {self.access_token}"
        if not isinstance(session.get_adapter(url), WatchedAdapter):
            session.mount(self.base_url, WatchedAdapter())
        timeout = min(self.timeout_seconds, remaining)
        parts = urlsplit(url)  # per origin as written, as requests decides: NO_PROXY "host:443" needs the port
        proxies, verify = environment_settings(f"{parts.scheme}://{parts.netloc}/")
        # Prepared on its own and sent with Session.send: requests merges nothing from the session or the
        # environment (no cookies, no ~/.netrc, whose Basic credentials would replace the client's bearer token);
        # the proxies and CA bundle come from environment_settings. It also skips requests' per-call merging, a
        # sixth of a read's instructions (bench/README.md, round 9), which a call's parallel fetches pay in turn.
        try:
            with (
                self.budget.bound(),
                session.send(
                    requests.Request("GET", url, headers=headers).prepare(),
                    timeout=timeout,
                    allow_redirects=False,
                    stream=True,
                    proxies=proxies,
                    verify=verify,
                ) as resp,
            ):
                if resp.status_code in (404, 410):
                    return None
                if resp.status_code != 200:
                    raise FhirFetchError(f"FHIR server answered HTTP {resp.status_code}")
                body = _read_capped(resp, self.max_response_bytes, self.budget)
        except SocksProxyRefused as exc:
            raise FhirFetchError(str(exc)) from exc  # a transport error in the metrics (its cause)
        except requests.RequestException as exc:
            if self.budget.expired:
                raise FhirDeadlineExceeded() from None
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


def _read_capped(resp: requests.Response, cap: int, budget: FetchBudget) -> bytes:
    """The body, at most ``cap`` bytes; a read blocked past the deadline is ended by the budget's watchdog."""
    chunks: list[bytes] = []
    size = 0
    for chunk in resp.iter_content(chunk_size=65536):
        size += len(chunk)
        if size > cap:
            raise FhirFetchError(f"FHIR response larger than {cap} bytes")
        if budget.expired:
            raise FhirDeadlineExceeded()
        chunks.append(chunk)
    if budget.expired:  # the watchdog shut the socket: what arrived is a truncated body
        raise FhirDeadlineExceeded()
    return b"".join(chunks)
