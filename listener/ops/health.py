"""The health server: liveness, readiness, status JSON and Prometheus metrics over aiohttp.

- ``GET /healthz``: 200 while the event loop answers (liveness; a container restarts on 5xx
  or no answer).
- ``GET /readyz``: 200 when the pool answers ``SELECT 1``, the LISTEN connection is up and
  was probed recently, and claims are not failing; 503 with the reasons otherwise.
- ``GET /status``: JSON: counts by status, oldest pending age, the outboxes' depths and
  oldest ages, in flight, per-provider rates.
- ``GET /metrics``: Prometheus text exposition.
- ``GET /``: the status page, HTML that refreshes itself (``listener.ops.status_page``).

Access: ``/healthz`` and ``/readyz`` are open (probes carry no credentials and say nothing
about the data). When a token is configured (``LISTENER_HEALTH_TOKEN``), ``/``, ``/status``
and ``/metrics`` require ``Authorization: Bearer <token>`` or the page's cookie; anything else
gets 401 with a body that names no part of the token. For a browser, ``GET /?token=<token>``
sets the cookie (HttpOnly, SameSite=Strict, holding an HMAC of the token, never the token)
and redirects to ``/``, whose ``<meta refresh>`` then reloads with the cookie. Tokens are
compared in constant time (``hmac.compare_digest`` of SHA-256 digests, so not even the length
leaks).

Without a token, ``/``, ``/status`` and ``/metrics`` answer only requests whose ``Host``
header names the server by an IP address, ``localhost`` or a name the operator allowed
(``LISTENER_HEALTH_ALLOWED_HOSTS``); anything else gets 403. This stops DNS rebinding: a web
page whose own name is re-pointed at this address would otherwise read them from a visitor's
browser (``HostCheck``).

Slow clients: connections are capped and a header timeout closes those that never finish a
request (``listener.ops.http_limits``).

``/status`` and ``/`` share one document, computed at most once per ``status_cache_s`` (1 s
by default) however many clients ask: concurrent requests wait for the same computation, so
a wall of open status pages refreshing every 5 s cannot load the database. ``/metrics``
reads the job counters (``sql/migrations/0008_status_counts.sql``) at each scrape, never the
jobs table, and the outboxes (``Queries.outboxes``, up to 10,000 index entries each) through
a cache of its own with the same lifetime, so any number of scrapers costs one read of them
per ``status_cache_s``.

Nothing here prints a DSN, the token or any other secret.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import ipaddress
import re
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import asyncpg
from aiohttp import web
from aiohttp.typedefs import Handler, Middleware
from loguru import logger
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from listener.db.queries import Queries
from listener.ops.http_limits import CappedTCPSite, ConnectionCap
from listener.ops.metrics import Metrics
from listener.ops.status import STATUSES, queue_status
from listener.queue.notify import Notifier
from listener.queue.worker import Worker


@dataclass(frozen=True, slots=True)
class HealthSources:
    """What the health endpoints read from."""

    pool: asyncpg.Pool
    queries: Queries
    notifier: Notifier
    worker: Worker
    metrics: Metrics
    providers: list[str]
    started_at: float
    budget_usd_per_day: float | None = None
    status_cache_s: float = 1.0
    """Seconds a computed ``/status`` document (and the page rendered from it) is served."""


class StatusCache:
    """The ``/status`` document and the page rendered from it, computed at most once per
    ``ttl_s`` seconds and shared by every request meanwhile.

    A request that finds the document older than ``ttl_s`` starts one computation; requests
    arriving while it runs await that same computation instead of starting their own. A failed
    computation is not cached: its error goes to the requests that waited for it, and the next
    request tries again.

    Args:
        compute: builds a fresh document (``status_document``).
        ttl_s: how long a document is served, seconds.
        clock: monotonic seconds.
    """

    def __init__(
        self,
        compute: Callable[[], Awaitable[dict[str, Any]]],
        ttl_s: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._compute = compute
        self._ttl_s = ttl_s
        self._clock = clock
        self._doc: dict[str, Any] | None = None
        self._at = 0.0
        self._running: asyncio.Task[dict[str, Any]] | None = None
        self._page: tuple[dict[str, Any], str] | None = None
        self.computed = 0
        """Documents computed so far (each one a round of queries)."""

    async def document(self) -> dict[str, Any]:
        """The current document (at most ``ttl_s`` old).

        Raises:
            Exception: what the computation raised.
        """
        if self._doc is not None and self._clock() - self._at < self._ttl_s:
            return self._doc
        if self._running is None:
            self._running = asyncio.create_task(self._refresh())
        # shield: a client that disconnects cancels its handler, not the shared computation.
        return await asyncio.shield(self._running)

    async def page(self) -> str:
        """The status page of the current document, rendered once per document."""
        from listener.ops.status_page import render

        doc = await self.document()
        if self._page is None or self._page[0] is not doc:
            self._page = (doc, render(doc))
        return self._page[1]

    async def _refresh(self) -> dict[str, Any]:
        try:
            doc = await self._compute()
            self.computed += 1
            self._doc, self._at = doc, self._clock()
            return doc
        finally:
            self._running = None


SOURCES = web.AppKey("sources", HealthSources)
STATUS_CACHE = web.AppKey("status_cache", StatusCache)
OUTBOX_CACHE = web.AppKey("outbox_cache", StatusCache)

CLAIM_FAILURES_NOT_READY = 3
"""Claims failing this many times in a row make ``/readyz`` answer 503 (the pool may answer
``SELECT 1`` while every claim fails, e.g. on a trigger error)."""


async def _healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def _readyz(request: web.Request) -> web.Response:
    src = request.app[SOURCES]
    problems: list[str] = []
    try:
        async with asyncio.timeout(2.0):
            await src.pool.fetchval("SELECT 1")
    except Exception as error:
        problems.append(f"database pool: {type(error).__name__}")
    if not src.notifier.healthy():
        problems.append("LISTEN connection down or not probed recently")
    if src.worker.claim_failures >= CLAIM_FAILURES_NOT_READY:
        problems.append(
            f"claims failing ({src.worker.claim_failures} in a row): {src.worker.last_claim_error}"
        )
    body = {"ready": not problems, "problems": problems}
    return web.json_response(body, status=200 if not problems else 503)


async def status_document(src: HealthSources) -> dict[str, Any]:
    """The ``/status`` JSON body.

    Raises:
        Exception: whatever the database raised while counting.
    """
    doc = await queue_status(src.queries, src.budget_usd_per_day)
    doc.update(
        {
            "in_flight": src.worker.in_flight,
            "held_leases": src.worker.held,
            "worker_id": src.worker.config.worker_id,
            "concurrency": src.worker.config.concurrency,
            "providers": src.providers,
            "provider_rates_per_s": src.metrics.provider_rates(),
            "listen_connected": src.notifier.connected,
            "listen_reconnects": max(src.notifier.generation - 1, 0),
            "uptime_s": round(time.monotonic() - src.started_at, 1),
        }
    )
    return doc


async def outbox_figures(src: HealthSources) -> dict[str, Any]:
    """What ``/metrics`` reports of the outboxes: ``{name: OutboxDepth}`` for each name of
    ``listener.db.queries.OUTBOXES`` (rows waiting, and seconds the oldest has waited).

    Raises:
        Exception: whatever the database raised.
    """
    return {outbox.outbox: outbox for outbox in await src.queries.outboxes()}


async def _status(request: web.Request) -> web.Response:
    try:
        doc = await request.app[STATUS_CACHE].document()
    except Exception as error:
        return web.json_response({"error": f"database: {type(error).__name__}"}, status=503)
    return web.json_response(doc)


async def _page(request: web.Request) -> web.Response:
    try:
        page = await request.app[STATUS_CACHE].page()
    except Exception as error:
        return web.Response(
            text=f"listener: database unavailable ({type(error).__name__})", status=503
        )
    return web.Response(text=page, content_type="text/html")


async def _metrics(request: web.Request) -> web.Response:
    src = request.app[SOURCES]
    try:
        counts = await src.queries.queue_counts()
    except Exception:
        counts = None
    if counts is not None:
        for status in STATUSES:
            src.metrics.queue_jobs.labels(status).set(getattr(counts, status))
        src.metrics.oldest_pending.set(counts.oldest_pending_s)
    try:
        outboxes = await request.app[OUTBOX_CACHE].document()
    except Exception:
        outboxes = None
    if outboxes is not None:
        for name, outbox in outboxes.items():
            src.metrics.outbox_depth.labels(name).set(outbox.depth)
            src.metrics.outbox_oldest_age.labels(name).set(outbox.oldest_age_s)
    body = generate_latest(src.metrics.registry)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


OPEN_PATHS = frozenset({"/healthz", "/readyz"})
"""Paths that never need the token. Every other path does when one is set (``/``,
``/status``, ``/metrics``, and any route added later), so a new route is guarded by default."""

COOKIE_NAME = "listener_status"
"""The status page's cookie: ``HMAC-SHA256(token, COOKIE_CONTEXT)`` in hex, never the token."""
COOKIE_CONTEXT = b"listener status page cookie v1"


class TokenCheck:
    """Checks the bearer token, the page's cookie and ``?token=`` against one secret.

    Args:
        token: the configured token (``LISTENER_HEALTH_TOKEN``), non-empty.

    Every comparison is ``hmac.compare_digest`` of two SHA-256 digests (or two HMACs):
    fixed-length inputs, so neither the content nor the length of the token leaks through
    timing.
    """

    def __init__(self, token: str) -> None:
        if not token:
            raise ValueError("the health token is empty")
        self._digest = hashlib.sha256(token.encode()).digest()
        self.cookie_value = hmac.new(token.encode(), COOKIE_CONTEXT, hashlib.sha256).hexdigest()

    def matches(self, candidate: str) -> bool:
        """True when ``candidate`` is the token."""
        return hmac.compare_digest(hashlib.sha256(candidate.encode()).digest(), self._digest)

    def allows(self, request: web.Request) -> bool:
        """True when ``request`` carries ``Authorization: Bearer <token>`` or the cookie."""
        scheme, _, credentials = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() == "bearer" and self.matches(credentials.strip()):
            return True
        cookie = request.cookies.get(COOKIE_NAME)
        return cookie is not None and hmac.compare_digest(
            cookie.encode(), self.cookie_value.encode()
        )


def _unauthorized(request: web.Request) -> web.Response:
    """401, nothing about the token: for ``/`` a text that says how to authenticate, for
    any other path ``{"error": "unauthorized"}``."""
    headers = {"WWW-Authenticate": 'Bearer realm="listener"', "Cache-Control": "no-store"}
    if request.path == "/":
        return web.Response(
            status=401,
            text="listener: this page needs the health token. Open /?token=<token> once "
            "(it sets a cookie), or send Authorization: Bearer <token>.\n",
            headers=headers,
        )
    return web.json_response({"error": "unauthorized"}, status=401, headers=headers)


def auth_middleware(
    check: TokenCheck,
) -> Middleware:
    """An aiohttp middleware that guards every path but ``OPEN_PATHS`` with ``check``.

    ``GET /?token=<token>`` answers 303 to ``/`` with the cookie set (HttpOnly,
    SameSite=Strict, Path=/, for the browser session) and ``Referrer-Policy: no-referrer``;
    a wrong ``?token=`` answers 401.
    """

    @web.middleware
    async def require_token(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path in OPEN_PATHS:
            return await handler(request)
        if request.path == "/" and "token" in request.query:
            if not check.matches(request.query["token"]):
                return _unauthorized(request)
            response = web.Response(
                status=303,
                headers={
                    "Location": "/",
                    "Referrer-Policy": "no-referrer",
                    "Cache-Control": "no-store",
                },
            )
            response.set_cookie(
                COOKIE_NAME, check.cookie_value, path="/", httponly=True, samesite="Strict"
            )
            return response
        if not check.allows(request):
            return _unauthorized(request)
        return await handler(request)

    return require_token


LOCAL_NAMES = frozenset({"localhost"})
"""Host names always allowed by ``HostCheck``: resolved by the machine itself, never by a
DNS server an attacker controls (RFC 6761 §6.3; browsers resolve ``localhost`` to loopback
themselves)."""

_HOST_HEADER = re.compile(r"(?:\[(?P<ipv6>[^\]]*)\]|(?P<name>[^:\[\]]*))(?::[0-9]*)?")
"""``Host: host[:port]`` (RFC 9110 §7.2 and RFC 3986 §3.2.2): an IPv6 address in brackets,
or a name or IPv4 address without a colon; the port, when present, is digits."""


def host_of_header(value: str) -> str | ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """The host a ``Host`` header value names, without its port.

    Returns:
        an IP address when the host is an IP literal (dotted-quad IPv4, or IPv6 in
        brackets); else the name, lowercased, without the trailing dot of a fully qualified
        name (``Localhost.:8080`` gives ``localhost``); None when the value is not a
        well-formed ``host[:port]`` (empty, an IPv6 address without brackets, a port that is
        not digits).
    """
    match = _HOST_HEADER.fullmatch(value.strip().lower())
    if match is None:
        return None
    if match["ipv6"] is not None:
        try:
            return ipaddress.IPv6Address(match["ipv6"])
        except ValueError:
            return None
    name = match["name"].removesuffix(".")
    if not name:
        return None
    try:
        # Strict dotted quad: ``127.1`` or ``0x7f.0.0.1`` stay names, and are refused unless
        # allowed (a browser would have rewritten them to ``127.0.0.1`` before sending).
        return ipaddress.IPv4Address(name)
    except ValueError:
        return name


class HostCheck:
    """Decides whether a request's ``Host`` header names this server in a way no attacker's
    DNS name can: the defence against DNS rebinding when no token guards the server.

    The attack: a page served from ``http://evil.example:8080/`` re-points ``evil.example``
    at ``127.0.0.1`` (or at this server's LAN address), then fetches
    ``http://evil.example:8080/status`` from the visitor's browser. For the browser that is
    the page's own origin, so the page reads the answer, although the server binds loopback
    only. What gives the attack away is the ``Host`` header: the browser always sends the
    name from the URL, ``evil.example:8080``, and a page cannot set it (a forbidden header of
    the Fetch standard). Servers on local addresses therefore validate ``Host``: Jackson et
    al., "Protecting Browsers from DNS Rebinding Attacks" (ACM CCS 2007: a server defends
    itself by refusing requests whose Host it does not recognise); Node.js's inspector since
    CVE-2018-7160 (``localhost``, ``localhost6`` or an IP address); Chromium's DevTools
    HTTP handler (an IP address or ``localhost``).

    Allowed:

    - any IP literal (IPv4 dotted quad, IPv6 in brackets), loopback or not. A rebinding
      attack always uses a DNS name: that is the part the attacker re-points. A URL whose host
      is an IP literal is never resolved, so its origin is that address itself, and a page of
      that origin is served by whatever answers there, i.e. this server, not the attacker. A
      page elsewhere may still *send* a request to ``http://127.0.0.1:8080/status``, but it is
      cross-origin and the browser does not let it read the answer (the server sends no CORS
      headers). Allowing every IP literal, rather than loopback and the bound address only,
      keeps working the clients that reach the server by an address it cannot know: a port
      published from a container (the request names the host's address, not the
      container's), Prometheus scraping a pod or container IP, a LAN address of a server
      bound to ``0.0.0.0``.
    - ``localhost`` (``LOCAL_NAMES``).
    - the names in ``allowed``: the server's own bind name, and
      ``LISTENER_HEALTH_ALLOWED_HOSTS`` (a service name such as ``listener`` that a scraper
      uses). The operator vouches that no attacker controls these names.

    The port in the header is ignored; names compare case-insensitively and without a
    trailing dot. A request without a ``Host`` header, with several, or with a malformed one
    is refused.

    This guards against browsers only: any other client that reaches the port sends the
    ``Host`` it likes. That is what the token (or a loopback bind) is for.

    Args:
        allowed: host names allowed besides ``LOCAL_NAMES`` (any case, trailing dot or
            not; IP addresses among them are allowed anyway).
    """

    def __init__(self, allowed: Iterable[str] = ()) -> None:
        self.names = LOCAL_NAMES | {
            name.strip().lower().removesuffix(".") for name in allowed if name.strip()
        }
        """The host names allowed, lowercased, without trailing dots."""

    def allows(self, request: web.Request) -> bool:
        """True when ``request`` has exactly one ``Host`` header and it names an allowed host."""
        # request.host falls back to the socket's name when the header is missing: read the
        # header itself.
        headers = request.headers.getall("Host", [])
        if len(headers) != 1:
            return False
        host = host_of_header(headers[0])
        if host is None:
            return False
        return not isinstance(host, str) or host in self.names


def _host_refused(request: web.Request) -> web.Response:
    """403 that says how to allow the request, and nothing else (no data, no echo)."""
    how = (
        "without LISTENER_HEALTH_TOKEN, this server answers only requests addressed to an IP "
        "address, localhost, or a name in LISTENER_HEALTH_ALLOWED_HOSTS (a guard against DNS "
        "rebinding). Use http://127.0.0.1:<port>/, add this host name to "
        "LISTENER_HEALTH_ALLOWED_HOSTS, or set LISTENER_HEALTH_TOKEN."
    )
    headers = {"Cache-Control": "no-store"}
    if request.path == "/":
        return web.Response(status=403, text=f"listener: {how}\n", headers=headers)
    return web.json_response({"error": "host not allowed", "how": how}, status=403, headers=headers)


def host_middleware(check: HostCheck) -> Middleware:
    """An aiohttp middleware that serves every path but ``OPEN_PATHS`` only when ``check``
    allows the request's ``Host``; others get 403 (``_host_refused``).

    Used when no token is set (with a token, ``auth_middleware`` is the guard: a rebinding
    page has neither the token nor the cookie, which is SameSite=Strict and bound to the
    host that set it). The first refusal is logged as a warning, later ones at debug level,
    so a misconfigured scraper is noticed without a flood of lines.
    """
    warned = False

    @web.middleware
    async def require_known_host(request: web.Request, handler: Handler) -> web.StreamResponse:
        nonlocal warned
        if request.path in OPEN_PATHS or check.allows(request):
            return await handler(request)
        # Header and path are the client's: logged with repr (no line breaks), cut short.
        refused = repr(",".join(request.headers.getall("Host", []))[:100])
        path = repr(request.path[:100])
        if warned:
            logger.debug("health server: refused Host {} for {}", refused, path)
        else:
            warned = True
            logger.warning(
                "health server: refused a request for {} with Host {}: without a token it "
                "serves /, /status and /metrics only to IP addresses, localhost and "
                "LISTENER_HEALTH_ALLOWED_HOSTS (DNS rebinding guard)",
                path,
                refused,
            )
        return _host_refused(request)

    return require_known_host


def build_app(
    sources: HealthSources,
    *,
    token: str | None = None,
    allowed_hosts: Iterable[str] = (),
    middlewares: Sequence[Middleware] = (),
) -> web.Application:
    """The aiohttp application serving the five routes.

    Args:
        sources: what the endpoints read.
        token: when set, ``/``, ``/status`` and ``/metrics`` require it (see the module doc).
            When not, they require a ``Host`` that ``HostCheck(allowed_hosts)`` allows.
        allowed_hosts: host names allowed besides IP addresses and ``localhost`` when no
            token is set (``LISTENER_HEALTH_ALLOWED_HOSTS``).
        middlewares: run before the token or Host check (the connection cap's).
    """
    chain = list(middlewares)
    if token:
        chain.append(auth_middleware(TokenCheck(token)))
    else:
        chain.append(host_middleware(HostCheck(allowed_hosts)))
    app = web.Application(middlewares=chain)
    app[SOURCES] = sources
    app[STATUS_CACHE] = StatusCache(lambda: status_document(sources), sources.status_cache_s)
    app[OUTBOX_CACHE] = StatusCache(lambda: outbox_figures(sources), sources.status_cache_s)
    app.router.add_get("/", _page)
    app.router.add_get("/healthz", _healthz)
    app.router.add_get("/readyz", _readyz)
    app.router.add_get("/status", _status)
    app.router.add_get("/metrics", _metrics)
    return app


class HealthServer:
    """Serves ``build_app(sources)`` on ``host:port`` (port 0 picks a free one).

    Args:
        sources: what the endpoints read.
        host, port: the address to bind; ``127.0.0.1`` keeps it on this machine.
        token: the token guarding ``/``, ``/status`` and ``/metrics``; None: they answer
            requests whose ``Host`` is an IP address, ``localhost``, ``host`` itself or one
            of ``allowed_hosts`` (``HostCheck``).
        allowed_hosts: ``LISTENER_HEALTH_ALLOWED_HOSTS``; used when no token is set.
        max_connections: connections served at once (``listener.ops.http_limits``).
        header_timeout_s: seconds a connection may take to complete a request (and stay
            idle between requests) before the server closes it.

    Raises (from ``start``):
        OSError: the port is taken.
    """

    def __init__(
        self,
        sources: HealthSources,
        host: str,
        port: int,
        *,
        token: str | None = None,
        allowed_hosts: Sequence[str] = (),
        max_connections: int = 64,
        header_timeout_s: float = 10.0,
    ) -> None:
        self.cap = ConnectionCap(max_connections)
        # The name the operator binds (when a name, not an address) is theirs, so a client may
        # use it; addresses, wildcards included, are allowed by HostCheck anyway.
        names = [*allowed_hosts, host]
        self._runner = web.AppRunner(
            build_app(
                sources,
                token=token,
                allowed_hosts=names,
                middlewares=[self.cap.busy_middleware],
            ),
            access_log=None,
            # aiohttp arms this timer when a connection is made, so it is also the header
            # timeout (see listener.http_limits).
            keepalive_timeout=header_timeout_s,
        )
        self._host = host
        self._port = port
        self.token_required = bool(token)
        self.port: int | None = None
        self.bound: str | None = None

    async def start(self) -> None:
        """Bind and serve; ``bound`` is then the address actually bound (``host:port``)."""
        await self._runner.setup()
        site = CappedTCPSite(self._runner, self._host, self._port, self.cap)
        await site.start()
        host, port = self._runner.addresses[0][:2]
        self.port = int(port)
        self.bound = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        if not self.token_required and not _is_loopback(self._host):
            logger.warning(
                "the health server listens on {} without a token: /status, /metrics and the "
                "status page are open to anyone who can reach it (browsers only by an IP "
                "address, localhost or LISTENER_HEALTH_ALLOWED_HOSTS; set "
                "LISTENER_HEALTH_TOKEN)",
                self.bound,
            )

    @property
    def url(self) -> str:
        """``http://host:port`` as reachable from this machine."""
        host = "127.0.0.1" if self._host in ("0.0.0.0", "::", "") else self._host
        if ":" in host:
            host = f"[{host}]"
        return f"http://{host}:{self.port}"

    async def close(self) -> None:
        """Stop serving."""
        await self._runner.cleanup()


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"
