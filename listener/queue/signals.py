"""Counters of what the worker did, which tests (and embedders) can await.

As River's ``testSignals``: a test waits for "3 jobs completed" instead of polling the
database or sleeping. Every count only grows; ``wait`` returns as soon as a count reaches the
wanted value. Emitting costs a counter increment while nobody waits.
"""

from __future__ import annotations

import asyncio
import collections
from typing import Generic, Literal, TypeVar

Signal = Literal[
    "claimed",
    "completed",
    "retried",
    "snoozed",
    "discarded",
    "parked",
    "released",
    "finished",
    "listening",
    "forgotten",
]
"""``finished`` counts jobs that reached a final state through this worker (completed or
discarded); ``listening`` counts LISTEN (re)connections; ``forgotten`` counts deleted rows
whose clean-up (job, results, external records) is done (``listener.app_side.deletes``)."""


N = TypeVar("N", bound=str)


class Counters(Generic[N]):
    """Monotonic counters, one per name, with waiters."""

    def __init__(self) -> None:
        self._counts: collections.Counter[str] = collections.Counter()
        self._waiters: list[tuple[str, int, asyncio.Future[None]]] = []

    def count(self, name: N) -> int:
        """How many times ``name`` was emitted."""
        return self._counts[name]

    def emit(self, name: N, n: int = 1) -> None:
        """Add ``n`` to ``name`` and wake the waiters it satisfies."""
        if n <= 0:
            return
        self._counts[name] += n
        if not self._waiters:
            return
        waiting = []
        for waiter in self._waiters:
            wanted, at_least, future = waiter
            if wanted == name and self._counts[name] >= at_least:
                if not future.done():
                    future.set_result(None)
            else:
                waiting.append(waiter)
        self._waiters = waiting

    async def wait(self, name: N, at_least: int, timeout: float = 30.0) -> int:
        """Wait until ``name`` was emitted ``at_least`` times; returns the count.

        Raises:
            TimeoutError: not within ``timeout`` seconds.
        """
        if self._counts[name] < at_least:
            future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            waiter = (name, at_least, future)
            self._waiters.append(waiter)
            try:
                async with asyncio.timeout(timeout):
                    await future
            finally:
                if waiter in self._waiters:
                    self._waiters.remove(waiter)
        return self._counts[name]


class Signals(Counters[Signal]):
    """The worker's counters, one per ``Signal``."""
