"""One runner for the daemon's side loops: each loop is a tick; how it wakes, how it stops and
how it reports errors is stated once, here.

A side loop (status write-back, deleted rows, webhooks, counters' rollup, retention, batches)
is a ``Loop``: a name, an async ``tick`` that returns how much it did (rows written, entries
cleaned up, events delivered), an interval, and a stop policy. The runner

- ticks at once, then every ``interval_s`` seconds, or as soon as ``wake`` is called (a
  NOTIFY); wake-ups during a tick are kept, so the next wait returns at once;
- on ``stop`` lets the tick under way finish (ticks that drain in batches read ``stopping``
  to end early), then follows ``at_stop``:

  - ``"return"``: nothing more;
  - ``"last_tick"``: one more tick;
  - ``"flush"``: ticks until one does nothing or ``flush_s`` has passed (ticks read
    ``time_left`` to bound themselves);

- reports errors once: a tick that raises, or returns ``Ticked`` with errors, logs each
  message (through ``listener.redact``) the first time it is seen, stays quiet while it
  repeats, and logs "<label> recovered" once a tick ends without errors;
- after a tick that raised, waits ``backoff(n)`` seconds (n: failures in a row) instead of
  the interval, when a backoff is given;
- counts what happened in ``signals`` (``LoopSignals``), so tests await "a tick did
  something" or "a tick that began after now found nothing" instead of polling.

The shape follows River's maintenance services (``rivershared/startstop`` and a ticker with an
initial tick around ``runOnce``, each with its ``TestSignals``) and Oban's plugins (one
``handle_info`` per interval).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
from collections.abc import Awaitable, Callable, Collection
from typing import Literal

from loguru import logger

from listener.queue.retry import describe
from listener.queue.signals import Counters
from listener.redact import redact_text

StopPolicy = Literal["return", "last_tick", "flush"]
"""What a loop does once stopped, after the tick under way: nothing, one more tick, or ticks
until one does nothing (within ``flush_s``)."""

LoopSignal = Literal["ticked", "active", "done", "idle", "error", "stopped"]
"""``ticked``: ticks finished; ``active``: ticks that did something (n > 0); ``done``: the
sum of their n; ``idle``: ticks that did nothing and met no error; ``error``: ticks that
raised or reported errors; ``stopped``: ``run`` returned."""


@dataclasses.dataclass(frozen=True)
class Ticked:
    """What a tick did when it also met errors it did not raise (a failing table, an
    unreachable receiver): ``n`` things done, and the errors' messages."""

    n: int
    errors: Collection[str] = ()


Tick = Callable[[], Awaitable["int | Ticked"]]


class LoopSignals(Counters[LoopSignal]):
    """A loop's counters (``LoopSignal``), with waits for what tests ask most."""

    async def next(self, name: LoopSignal, timeout: float = 30.0) -> int:
        """Wait until ``name`` is emitted once more than now; returns the count.

        Raises:
            TimeoutError: not within ``timeout`` seconds.
        """
        return await self.wait(name, self.count(name) + 1, timeout)

    async def settled(self, timeout: float = 30.0) -> None:
        """Wait for an idle tick that began after this call: everything the loop had to do
        when called is done (or waits for a reason the loop knows, as a locked row).

        The first idle tick from now may have begun before; the second began after it ended.

        Raises:
            TimeoutError: not within ``timeout`` seconds.
        """
        await self.wait("idle", self.count("idle") + 2, timeout)


class Loop:
    """Runs one side loop.

    Args:
        name: short name (task names, signals' owner): ``writeback``, ``deletes``...
        tick: one round; returns how much it did (``int``, or ``Ticked`` with errors met).
            Exceptions it raises are reported, never propagated (``CancelledError`` is).
        interval_s: seconds between the end of a tick and the next one.
        at_stop: what ``run`` does once stopped (``StopPolicy``).
        flush_s: longest time the ``"flush"`` policy ticks, seconds.
        coalesce_s: after a wake-up, wait this long for more before ticking (a burst of
            NOTIFYs makes one tick), seconds; at most ``interval_s``.
        backoff: seconds to wait after the n-th tick in a row that raised (n from 1); the
            interval when ``None``.
        label: how log lines name the loop (default: ``name``).
    """

    def __init__(
        self,
        name: str,
        tick: Tick,
        interval_s: float,
        *,
        at_stop: StopPolicy = "return",
        flush_s: float = 5.0,
        coalesce_s: float = 0.0,
        backoff: Callable[[int], float] | None = None,
        label: str | None = None,
    ) -> None:
        self.name = name
        self.label = label or name
        self._tick = tick
        self.interval_s = interval_s
        self.at_stop: StopPolicy = at_stop
        self._flush_s = flush_s
        self._coalesce_s = coalesce_s
        self._backoff = backoff
        self._stop = asyncio.Event()
        self._wake = asyncio.Event()
        self._deadline: float | None = None
        self.errors: frozenset[str] = frozenset()
        """The errors of the last tick (as logged)."""
        self.signals = LoopSignals()

    @property
    def stopping(self) -> bool:
        """``stop`` was called: a tick that drains in batches ends after the current one
        (the stop policy decides what follows)."""
        return self._stop.is_set()

    @property
    def stop_event(self) -> asyncio.Event:
        """Set once ``stop`` is called (for helpers that take an event)."""
        return self._stop

    def time_left(self) -> float | None:
        """Seconds left to the ``"flush"`` at stop; ``None`` outside it."""
        if self._deadline is None:
            return None
        return max(0.0, self._deadline - time.monotonic())

    def wake(self) -> None:
        """Tick now rather than at the end of the interval."""
        self._wake.set()

    def stop(self) -> None:
        """End ``run``: after the tick under way, and what ``at_stop`` asks."""
        self._stop.set()
        self._wake.set()

    async def run(self) -> None:
        """Tick until stopped, then as ``at_stop`` says; errors are reported, never raised."""
        failures = 0
        try:
            while not self._stop.is_set():
                raised = await self._round()
                failures = failures + 1 if raised else 0
                if self._stop.is_set():
                    break
                if raised and self._backoff is not None:
                    await self._pause(self._backoff(failures), coalesce=False)
                else:
                    await self._pause(self.interval_s, coalesce=True)
            await self._finish()
        finally:
            self.signals.emit("stopped")

    async def tick(self) -> int:
        """One tick now, reported and counted as ``run``'s are; returns how much it did."""
        n, _ = await self._run_tick()
        return n

    async def _round(self) -> bool:
        """One tick; ``True`` when it raised."""
        _, raised = await self._run_tick()
        return raised

    async def _run_tick(self) -> tuple[int, bool]:
        raised = False
        try:
            result = await self._tick()
        except Exception as error:
            n, errors, raised = 0, frozenset({describe(error)}), True
        else:
            if isinstance(result, Ticked):
                n, errors = result.n, frozenset(redact_text(e) for e in result.errors)
            else:
                n, errors = result, frozenset()
        self._report(errors)
        self.signals.emit("ticked")
        if n > 0:
            self.signals.emit("active")
            self.signals.emit("done", n)
        elif not errors:
            self.signals.emit("idle")
        if errors:
            self.signals.emit("error")
        return n, raised

    async def _pause(self, seconds: float, *, coalesce: bool) -> None:
        """Wait ``seconds``, or until woken or stopped."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wake.wait(), seconds)
            if coalesce and self._coalesce_s > 0 and not self._stop.is_set():
                await asyncio.sleep(min(self._coalesce_s, self.interval_s))
        self._wake.clear()

    async def _finish(self) -> None:
        if self.at_stop == "last_tick":
            await self._round()
        elif self.at_stop == "flush":
            self._deadline = time.monotonic() + self._flush_s
            try:
                while True:
                    n, raised = await self._run_tick()
                    if n == 0 or raised or time.monotonic() >= self._deadline:
                        break
            finally:
                self._deadline = None

    def _report(self, errors: frozenset[str]) -> None:
        """Log errors not seen in the previous tick, and recovery once they are gone."""
        for message in sorted(errors - self.errors):
            logger.warning("{}: {}", self.label, message)
        if self.errors and not errors:
            logger.info("{} recovered", self.label)
        self.errors = errors
