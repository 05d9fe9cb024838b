"""Folds the job counters' deltas into the counts, every few seconds.

Job state changes only append deltas to ``listener.job_count_deltas`` (statement triggers,
``sql/migrations/0008_status_counts.sql``), so no writer waits on a shared counter row.
``CountsRollup`` runs ``listener.roll_up_job_counts`` (and ``roll_up_face_review_counts``, the
open review suggestions' counters of ``0015_face_review.sql``) every ``interval_s``: readers add
the deltas not folded yet to the counts, so the interval bounds how many rows a read adds up,
never how exact it is. Every daemon runs one; a rollup that finds another running returns at once.
"""

from __future__ import annotations

import asyncio
import contextlib

from loguru import logger

from listener.db.queries import Queries
from listener.queue.retry import describe


class CountsRollup:
    """The counters' rollup loop of one daemon.

    Args:
        queries: the daemon's queries (each rollup is one short transaction).
        interval_s: seconds between rollups.
    """

    def __init__(self, queries: Queries, interval_s: float = 2.0) -> None:
        self._q = queries
        self._interval_s = interval_s
        self._stop = asyncio.Event()
        self._failing = False
        self.folded = 0
        """Delta rows folded since start."""

    def stop(self) -> None:
        """End ``run`` after a last rollup."""
        self._stop.set()

    async def run(self) -> None:
        """Roll up every ``interval_s`` until stopped, then once more; errors are logged."""
        while not self._stop.is_set():
            await self.tick()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), self._interval_s)
        await self.tick()

    async def tick(self) -> int:
        """One rollup: delta rows folded (0 when another daemon's rollup was running)."""
        try:
            folded = await self._q.roll_up_job_counts()
            folded += await self._q.roll_up_face_review_counts()
        except Exception as error:
            if not self._failing:
                logger.warning("job counters' rollup failed: {}", describe(error))
            self._failing = True
            return 0
        if self._failing:
            logger.info("job counters' rollup recovered")
        self._failing = False
        self.folded += folded
        return folded
