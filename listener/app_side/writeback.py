"""Writes job statuses, results, errors and completion times back to the app's row, outside
every claim.

A job state change (or a stored step, for tables with a result column) only queues the job in
``listener.status_outbox`` (statement triggers on ``listener.jobs`` and ``listener.results``,
see ``sql/migrations/0005_status_writeback.sql`` and ``0011_result_columns.sql``), and every
write-back column an attachment has (status, result, error, analyzed-at) is written in the
same round. ``StatusWriteBack`` drains that outbox every ``interval_s`` (and at once after
``wake``) in short transactions of its own, through ``listener.write_back_status``: app rows
someone else holds are skipped and retried on the next round, and every lock wait is bounded
by a ``lock_timeout`` shorter than the server's ``deadlock_timeout``. So the app's own writes
never wait for a claim, and the columns are eventually right (a round behind the job, at
most, while nobody holds the row).

Every daemon runs one; ``FOR UPDATE SKIP LOCKED`` on the outbox lets them share the work.
"""

from __future__ import annotations

import time

from listener.db.queries import Queries
from listener.queue.loops import Loop, Ticked
from listener.queue.retry import describe

COALESCE_S = 0.05
"""Seconds a wake-up waits for more wake-ups before the round starts."""


class StatusWriteBack:
    """The status write-back loop of one daemon.

    Flushes at stop (``at_stop="flush"``): once the worker has drained, rounds run until one
    writes nothing (for up to ``flush_s``), so the statuses of the jobs handed back are
    written before exit.

    Args:
        queries: the daemon's queries, bound to a pool (each round is one transaction).
        interval_s: seconds between rounds.
        batch: outbox rows per transaction (the app rows they name stay locked for its
            length: a few milliseconds).
        lock_timeout_ms: longest wait for any lock, milliseconds.
        flush_s: longest time ``run`` spends writing what is left once stopped, seconds.
    """

    def __init__(
        self,
        queries: Queries,
        interval_s: float = 0.5,
        batch: int = 200,
        lock_timeout_ms: int = 250,
        flush_s: float = 5.0,
    ) -> None:
        self._q = queries
        self._batch = batch
        self._lock_timeout_ms = lock_timeout_ms
        # A burst of inserts is a burst of wake-ups: one round for all of them.
        self.loop = Loop(
            "writeback",
            self._round,
            interval_s,
            at_stop="flush",
            flush_s=flush_s,
            coalesce_s=COALESCE_S,
            label="status write-back",
        )
        self.written = 0
        """App rows written since start."""
        self.deferred = 0
        """Rows left queued by the last round (held by the app, or of a failing table)."""

    def wake(self) -> None:
        """Run a round now rather than at the next interval."""
        self.loop.wake()

    def stop(self) -> None:
        """End ``run``: it writes what is left (for up to ``flush_s``) and returns."""
        self.loop.stop()

    async def run(self) -> None:
        """Run rounds until stopped, then flush; errors are logged, never raised."""
        await self.loop.run()

    async def tick(self) -> int:
        """One round (see ``_round``): app rows written. Errors are logged (each distinct one
        once), not raised."""
        return await self.loop.tick()

    async def _round(self) -> Ticked:
        """Sweep the outbox once, in id order, ``batch`` rows per transaction; during the
        flush at stop, until its deadline (the rest waits for the next daemon)."""
        max_s = self.loop.time_left()
        deadline = None if max_s is None else time.monotonic() + max_s
        written = deferred = 0
        errors: set[str] = set()
        after = 0
        try:
            if not await self._q.status_outbox_waiting():
                self.deferred = 0
                return Ticked(0)
            while True:
                r = await self._q.write_back_status(self._batch, after, self._lock_timeout_ms)
                written += r.written
                deferred += r.deferred
                errors.update(r.errors)
                if r.last_job_id is None or r.picked < self._batch:
                    break
                if deadline is not None and time.monotonic() > deadline:
                    break
                after = r.last_job_id
        except Exception as error:
            errors.add(f"status write-back failed: {describe(error)}")
        self.written += written
        self.deferred = deferred
        return Ticked(written, errors)
