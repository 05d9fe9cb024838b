"""A cap on the health server's open connections, so slow clients cannot hold the port down.

aiohttp has no connection limit: every accepted socket gets a ``RequestHandler`` and keeps
its file descriptor until the client sends a request or the keep-alive timer fires. About 250
connections that never finished their headers once exhausted the daemon's descriptors; the
database pool could then not open a socket and ``/readyz`` stopped answering.

Two parts end that:

- The header timeout is aiohttp's own ``keepalive_timeout``: since aiohttp 3.14.4 the timer
  is armed when the connection is made, so a connection that has not completed a request
  within it is closed (``RequestHandler.connection_made``, aio-libs/aiohttp#13681). The
  timer is not reset by partial data, so trickling a header byte by byte does not extend it.
- ``ConnectionCap`` wraps the protocol factory handed to ``loop.create_server`` (aiohttp's
  ``web.Server``) and counts open connections. At the cap, a new connection evicts the oldest
  one that is not running a handler; when every connection is running one, or twice the cap
  are still closing, the new one is closed at once. Evicting the oldest instead of refusing
  the newest keeps the port usable while it is flooded: a probe's connection is the newest
  and answers in milliseconds, while a flood's connections wait for the header timeout.

``CappedTCPSite`` is ``web.TCPSite`` with the factory wrapped; ``ConnectionCap.busy_middleware``
tells the cap which connections are running a handler (those are never evicted).

Descriptors held by the server stay at most ``2 * limit`` (the cap, plus evicted connections
whose close has not completed yet, which is the next loop iteration for idle ones).
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from collections.abc import Callable

from aiohttp import web
from aiohttp.typedefs import Handler, Middleware


class _Refused(asyncio.Protocol):
    """The protocol of a connection over the cap: closed as soon as it is made."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport.close()


class _Counted(asyncio.Protocol):
    """Delegates every call to aiohttp's ``RequestHandler``; tells the cap when it ends.

    aiohttp's handler is a plain ``asyncio.Protocol`` (not a ``BufferedProtocol``), and it
    never looks up its transport's protocol, so a delegate is invisible to it.
    """

    __slots__ = ("_cap", "handler", "made")

    def __init__(self, cap: ConnectionCap, handler: web.RequestHandler) -> None:
        self._cap = cap
        self.handler = handler
        self.made = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.made = True
        self.handler.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        self.handler.data_received(data)

    def eof_received(self) -> None:
        # aiohttp's handler returns None: the transport closes itself on EOF.
        self.handler.eof_received()

    def pause_writing(self) -> None:
        self.handler.pause_writing()

    def resume_writing(self) -> None:
        self.handler.resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cap.forget(self)
        self.handler.connection_lost(exc)


class ConnectionCap:
    """A protocol factory that wraps aiohttp's ``web.Server`` with a cap on connections.

    Args:
        limit: the most connections served at once, at least 1.

    Attributes:
        factory: makes one ``RequestHandler`` per connection: ``runner.server``, set once the
            runner is set up (``CappedTCPSite.start`` does it).
        open: connections being served (made or about to be), oldest first.
        closing: connections evicted whose close has not completed yet.
        busy: handlers running a request handler.
        busy_middleware: the aiohttp middleware that keeps ``busy``: a connection whose
            handler runs is never evicted. Add it to the application.
        refused, evicted: counters since start, for tests and logs.

    Raises:
        ValueError: ``limit`` is below 1.
    """

    def __init__(self, limit: int) -> None:
        if limit < 1:
            raise ValueError("the connection limit must be at least 1")
        self.factory: Callable[[], web.RequestHandler] | None = None
        self.limit = limit
        self.open: OrderedDict[_Counted, None] = OrderedDict()
        self.closing: set[_Counted] = set()
        self.busy: set[web.RequestHandler] = set()
        self.refused = 0
        self.evicted = 0
        self.busy_middleware = self._middleware()

    def __call__(self) -> asyncio.Protocol:
        """The protocol for one new connection: counted, or refused (closed when made)."""
        if len(self.open) >= self.limit and not self._evict_one():
            self.refused += 1
            return _Refused()
        assert self.factory is not None, "CappedTCPSite.start sets the factory"
        counted = _Counted(self, self.factory())
        self.open[counted] = None
        return counted

    def _evict_one(self) -> bool:
        """Close the oldest idle connection (no handler running); False if none may go."""
        if len(self.closing) >= self.limit:
            return False
        for counted in self.open:
            if counted.made and counted.handler not in self.busy:
                del self.open[counted]
                self.closing.add(counted)
                self.evicted += 1
                # The connection is waiting for (the rest of) a request: nothing to finish.
                counted.handler.force_close()
                return True
        return False

    def forget(self, counted: _Counted) -> None:
        """Called when a connection is lost."""
        self.open.pop(counted, None)
        self.closing.discard(counted)
        self.busy.discard(counted.handler)

    @property
    def connections(self) -> int:
        """Descriptors the server holds for connections: open plus closing."""
        return len(self.open) + len(self.closing)

    def _middleware(self) -> Middleware:
        @web.middleware
        async def busy_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
            protocol = request.protocol
            self.busy.add(protocol)
            try:
                return await handler(request)
            finally:
                self.busy.discard(protocol)

        return busy_middleware


class CappedTCPSite(web.BaseSite):
    """``web.TCPSite`` whose connections pass through ``cap``.

    Args:
        runner: a set-up ``web.AppRunner``; ``start`` makes its ``server`` ``cap``'s factory.
        host, port: where to listen; port 0 picks a free one.
        cap: the connection cap.

    Raises (from ``start``):
        OSError: the address cannot be bound.
    """

    __slots__ = ("_cap", "_host", "_port")

    def __init__(self, runner: web.BaseRunner, host: str, port: int, cap: ConnectionCap) -> None:
        super().__init__(runner)
        self._host = host
        self._port = port
        self._cap = cap

    @property
    def name(self) -> str:
        """``http://host:port`` as bound (the requested port before ``start``)."""
        return f"http://{self._host}:{self._port}"

    async def start(self) -> None:
        """Bind and listen."""
        await super().start()
        self._cap.factory = self._runner.server
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            self._cap, self._host, self._port, backlog=self._backlog
        )
        sockets = self._server.sockets
        if sockets:
            self._port = int(sockets[0].getsockname()[1])
