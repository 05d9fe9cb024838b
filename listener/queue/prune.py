"""Retention: ``listener prune --older-than 30d`` and ``LISTENER_PRUNE_AFTER_DAYS``.

What goes: finished jobs (complete, failed, cancelled) that finished before the cutoff AND
whose app row no longer exists, with their results (``JobStore.prune``). What stays: every job
of a row that still exists, however old. Results are read by joining ``listener.jobs`` (and
cascade with it), and a row left without a job would be enqueued, and paid for, again by the
next backfill; so a job is pruned only once nothing can read it. Jobs of tables no longer
attached stay too (``detach`` keeps jobs and results).

The daemon prunes once every ``interval_s`` in batches of ``batch`` jobs (one short statement
each, locked rows skipped), so it never holds long locks.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Protocol

from loguru import logger

from listener.queue.loops import Loop

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_age(text: str) -> timedelta:
    """``"30d"`` -> 30 days. Units: s, m, h, d, w; a bare number is days.

    Raises:
        ValueError: not a positive number with one of those units.
    """
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhdw]?)\s*", text)
    if match is None or float(match[1]) <= 0:
        raise ValueError(f"not an age: {text!r} (e.g. 30d, 12h, 2w)")
    return timedelta(seconds=float(match[1]) * _UNITS[match[2] or "d"])


class PruneStore(Protocol):
    """The job store's retention method (``JobStore.prune``)."""

    async def prune(self, before: datetime, limit: int, *, dry_run: bool = False) -> int: ...


async def prune_all(
    store: PruneStore,
    before: datetime,
    *,
    batch: int = 500,
    pause_s: float = 0.05,
    stop: asyncio.Event | None = None,
) -> int:
    """Delete every prunable job finished before ``before``, ``batch`` at a time, with a short
    pause between batches so other writers get the locks. Returns the jobs deleted."""
    total = 0
    while stop is None or not stop.is_set():
        n = await store.prune(before, batch)
        total += n
        if n < batch:
            break
        await asyncio.sleep(pause_s)
    return total


class Pruner:
    """The daemon's retention loop.

    Stops after the statement under way (``at_stop="return"``): what is left waits for the
    next daemon's round.

    Args:
        store: the job store.
        after: how long after finishing a job may be pruned.
        interval_s: seconds between rounds.
        batch: jobs per statement.
        now: wall clock (UTC).
    """

    def __init__(
        self,
        store: PruneStore,
        after: timedelta,
        *,
        interval_s: float = 3600.0,
        batch: int = 500,
        now: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self._store = store
        self._after = after
        self._batch = batch
        self._now = now
        self.loop = Loop("prune", self._prune, interval_s, at_stop="return", label="pruning")

    async def run(self) -> None:
        """Prune once now, then every ``interval_s``, until ``stop``; errors are logged."""
        await self.loop.run()

    def stop(self) -> None:
        """End ``run`` after the current statement."""
        self.loop.stop()

    async def _prune(self) -> int:
        n = await prune_all(
            self._store, self._now() - self._after, batch=self._batch, stop=self.loop.stop_event
        )
        if n:
            logger.info("pruned {} finished jobs of deleted rows", n)
        return n
