"""The dedicated LISTEN connection: wake-ups, liveness probe, jittered reconnect.

One plain connection, never from the pool: a pooled connection is handed to other work and a
transaction-mode pooler (PgBouncer, Supabase's) cannot LISTEN at all, which is why its DSN is
a separate setting. A notification only sets the worker's wake-up; every claim goes through
SQL. When the connection is lost (the server terminated it, the network dropped, a probe
timed out) the notifier reconnects with jittered exponential backoff and then calls
``on_connected``, which makes the worker reconcile: claim everything pending, including what
was inserted while nobody was listening.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import asyncpg
from loguru import logger

from listener.queue.loops import Loop
from listener.queue.retry import full_jitter_backoff
from listener.redact import redact_text

CHANNEL = "listener_jobs"
"""The NOTIFY channel the enqueue triggers signal on."""

INSERTED = "inserted"
"""The payload of the insert trigger's NOTIFY (0019): rows wait for admission, and nothing
else (a deleted row, a status to write back) needs a look. Other payloads ('' from the other
triggers and from the store) wake every loop."""

PAUSES = "pauses"
"""The payload of ``listener pause`` and ``listener resume`` (``JobStore.pause``, ``resume``):
the operator pauses changed; a daemon reads them again (``PauseBoard.invalidate``) before its
next claim."""


class Notifier:
    """Keeps one LISTEN connection alive.

    A side loop (``listener.queue.loops``) whose tick connects when there is no connection
    and probes it otherwise, every ``probe_interval_s``, or at once when the server closes
    it. A tick that fails closes the connection; the next one reconnects after a
    full-jitter backoff over the failures in a row. Stops after the tick under way
    (``at_stop="return"``) and closes the connection.

    Args:
        dsn: the connection string (``listen_database_url`` or ``database_url``).
        on_notify: called for each notification with its payload (``INSERTED``,
            ``PAUSES``, or '').
        on_connected: called after every successful (re)connect, the first one included.
        probe_interval_s: seconds between ``SELECT 1`` liveness probes.
        reconnect_base_s: first reconnect delay's upper bound, seconds (full jitter).
        reconnect_cap_s: the largest reconnect delay, seconds.
        rng: uniform floats in [0, 1).
        clock: monotonic clock, seconds.
    """

    def __init__(
        self,
        dsn: str,
        on_notify: Callable[[str], None],
        on_connected: Callable[[], None],
        *,
        probe_interval_s: float = 5.0,
        reconnect_base_s: float = 0.25,
        reconnect_cap_s: float = 10.0,
        rng: Callable[[], float],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._dsn = dsn
        self._on_notify = on_notify
        self._on_connected = on_connected
        self._probe_interval = probe_interval_s
        self._clock = clock
        self._conn: asyncpg.Connection | None = None
        self._lost = False
        self._changed = asyncio.Event()
        self.loop = Loop(
            "notify",
            self._tick,
            probe_interval_s,
            at_stop="return",
            backoff=lambda n: full_jitter_backoff(n, reconnect_base_s, reconnect_cap_s, rng),
            label="LISTEN connection",
        )
        self.connected = False
        self.generation = 0
        """Successful connections so far; 2 or more means it reconnected."""
        self.last_probe_ok: float | None = None
        self.last_error: str | None = None

    def stop(self) -> None:
        """Close the connection and end ``run``."""
        self.loop.stop()

    async def wait_connected(self, generation: int = 1, timeout: float = 30.0) -> None:
        """Wait until connection number ``generation`` is listening.

        Raises:
            TimeoutError: it did not happen within ``timeout`` seconds.
        """
        async with asyncio.timeout(timeout):
            while not (self.connected and self.generation >= generation):
                self._changed.clear()
                await self._changed.wait()

    def healthy(self, now: float | None = None) -> bool:
        """Connected and probed successfully within the last three probe intervals."""
        now = self._clock() if now is None else now
        return (
            self.connected
            and self.last_probe_ok is not None
            and now - self.last_probe_ok <= 3 * self._probe_interval
        )

    async def run(self) -> None:
        """Listen until ``stop``; reconnect on any loss."""
        try:
            await self.loop.run()
        finally:
            self._close()

    async def _tick(self) -> int:
        """Connect (1: a connection made) or probe (0).

        Raises:
            Exception: the connection failed or was lost (it is closed; ``last_error`` says
                why).
        """
        try:
            if self._conn is None:
                await self._connect()
                return 1
            await self._probe(self._conn)
            return 0
        except Exception as error:
            self.last_error = redact_text(f"{type(error).__name__}: {error}")
            self._close()
            raise

    async def _connect(self) -> None:
        self._conn = await asyncpg.connect(self._dsn, timeout=10)
        self._lost = False
        self._conn.add_termination_listener(self._terminated)
        await self._conn.add_listener(CHANNEL, self._notified)
        self.connected = True
        self.generation += 1
        self.last_probe_ok = self._clock()
        self.last_error = None
        if self.generation > 1:
            logger.info("LISTEN connection re-established (connection {})", self.generation)
        self._signal()
        self._on_connected()

    async def _probe(self, conn: asyncpg.Connection) -> None:
        if self._lost or conn.is_closed():
            raise ConnectionError("the server closed the LISTEN connection")
        await conn.fetchval("SELECT 1", timeout=max(1.0, self._probe_interval))
        self.last_probe_ok = self._clock()

    def _close(self) -> None:
        """Drop the connection (if any); the next tick reconnects."""
        conn, self._conn = self._conn, None
        self.connected = False
        self._signal()
        if conn is not None:
            # Its termination is ours, not a loss to react to.
            conn.remove_termination_listener(self._terminated)
            conn.terminate()

    def _notified(self, _conn: Any, _pid: int, _channel: str, payload: str) -> None:
        self._on_notify(payload)

    def _terminated(self, conn: Any) -> None:
        if conn is self._conn:
            self._lost = True
            self.loop.wake()

    def _signal(self) -> None:
        self._changed.set()
