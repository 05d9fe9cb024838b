"""Folds the job counters' deltas into the counts, every few seconds.

Job state changes only append deltas to ``listener.job_count_deltas`` (statement triggers,
``sql/migrations/0008_status_counts.sql``), so no writer waits on a shared counter row.
``CountsRollup`` runs ``listener.roll_up_job_counts`` (and ``roll_up_face_review_counts``, the
open review suggestions' counters of ``0015_face_review.sql``) every ``interval_s``: readers add
the deltas not folded yet to the counts, so the interval bounds how many rows a read adds up,
never how exact it is. Every daemon runs one; a rollup that finds another running returns at once.
"""

from __future__ import annotations

from listener.db.queries import Queries
from listener.queue.loops import Loop


class CountsRollup:
    """The counters' rollup loop of one daemon.

    Stops with one last rollup (``at_stop="last_tick"``): the counts are exact at exit.

    Args:
        queries: the daemon's queries (each rollup is one short transaction).
        interval_s: seconds between rollups.
    """

    def __init__(self, queries: Queries, interval_s: float = 2.0) -> None:
        self._q = queries
        self.loop = Loop(
            "rollup", self._roll_up, interval_s, at_stop="last_tick", label="job counters' rollup"
        )
        self.folded = 0
        """Delta rows folded since start."""

    def stop(self) -> None:
        """End ``run`` after a last rollup."""
        self.loop.stop()

    async def run(self) -> None:
        """Roll up every ``interval_s`` until stopped, then once more; errors are logged."""
        await self.loop.run()

    async def tick(self) -> int:
        """One rollup: delta rows folded (0 when another daemon's rollup was running, or on
        an error, which is logged)."""
        return await self.loop.tick()

    async def _roll_up(self) -> int:
        folded = await self._q.roll_up_job_counts()
        folded += await self._q.roll_up_face_review_counts()
        self.folded += folded
        return folded
