"""The worker loop: claim jobs ahead of free capacity, run them, record outcomes, keep leases.

One ``Worker`` runs these loops:

- **claim**: keeps a small buffer of claimed jobs (``prefetch``) ahead of the ``concurrency``
  consumers, so a consumer that finishes a job starts the next one at once instead of waiting
  for a claim round trip. It claims, in one statement, as many jobs as running + buffered falls
  short of ``concurrency + prefetch``, whenever the buffer drops to half, on a NOTIFY, on a
  reconnect, or on the jittered poll timer (NOTIFY is only a hint). When jobs finish faster
  than ``prefetch`` per ``prefetch_window_s``, the buffer grows to what finishes in that
  window (outcomes written per second times the window, up to ``max_prefetch``): fewer,
  larger claims, each one commit, while a backlog of quick jobs drains, and never more than
  a window's work waiting behind a newly claimed job.
- **consumers** (``concurrency`` of them: the global bound on jobs running at once): take the
  next buffered job and run it through the dispatcher.
- **flush**: writes finished outcomes as soon as there are any, batching whatever finished
  while the previous write was in flight (group commit): one statement for completions, one
  for failures.
- **heartbeat**: every third of the lease, renews the leases of every job this worker holds
  (buffered, running or waiting to be recorded) in one statement, and reaps jobs whose lease
  expired, whoever held them.
- **drain** (on stop): stop claiming, hand buffered jobs back, give running jobs
  ``shutdown_grace_s`` to finish, cancel the rest, flush, and hand unfinished jobs back as
  pending.

Database errors in any loop are logged and retried after a short backoff, so the worker rides
out a Postgres restart: outcomes wait in memory and leases are renewed again once it is back.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Protocol, TypeVar

from loguru import logger
from prometheus_client import Counter, Gauge

from listener.queue.outcomes import (
    Completed,
    Discarded,
    Job,
    Outcome,
    Parked,
    Retry,
    Snoozed,
)
from listener.queue.retry import full_jitter_backoff
from listener.queue.signals import Signal, Signals
from listener.queue.store import JobStore
from listener.redact import redact_text

T = TypeVar("T")


class WorkerMetrics(Protocol):
    """The Prometheus metrics the worker updates (``listener.ops.metrics.Metrics`` has them)."""

    jobs_claimed: Counter
    jobs_finished: Counter
    in_flight: Gauge
    db_errors: Counter


class ClaimGate(Protocol):
    """Says when the worker must not claim at all (``listener.queue.pauses.PauseBoard``): cheap
    to call often, it reads the database at most once per poll interval."""

    async def claim_blocked(self) -> str | None:
        """Why claiming is paused now, or ``None``."""
        ...


class Runner(Protocol):
    """Runs one job to an outcome (``listener.analysis.dispatch.Dispatcher`` in production); never
    raises but ``CancelledError``."""

    async def run(self, job: Job) -> Outcome: ...


UNRECORDED_FACTOR = 4
"""A worker holds at most this many times ``concurrency + prefetch`` leases in all."""

RATE_PERIOD_S = 0.1
"""The finish rate that sizes the prefetch is re-measured at most this often, seconds."""


@dataclass(frozen=True, slots=True)
class WorkerConfig:
    """The worker's slice of the settings.

    Attributes:
        worker_id: this daemon's name in ``listener.jobs.worker_id``.
        concurrency: the most jobs running at once (the global semaphore).
        prefetch: jobs claimed ahead of free consumers, so the next job starts without a
            database round trip; 0 claims only for idle consumers (and never more).
        prefetch_window_s: seconds of work the buffer may hold when jobs finish quickly: the
            prefetch in force is the rate of outcomes written (jobs/s, measured over at least
            ``RATE_PERIOD_S``) times this, at least ``prefetch``, at most ``max_prefetch``;
            0 keeps ``prefetch``.
        max_prefetch: the most jobs the buffer holds.
        lease_s: lease length, seconds; renewed every ``lease_s / 3``.
        poll_interval_s: mean seconds between claims when no NOTIFY arrives (jittered ±25%).
        shutdown_grace_s: seconds running jobs get to finish on stop.
    """

    worker_id: str
    concurrency: int = 10
    prefetch: int = 10
    prefetch_window_s: float = 0.05
    max_prefetch: int = 1000
    lease_s: float = 30.0
    poll_interval_s: float = 2.0
    shutdown_grace_s: float = 20.0


class Worker:
    """Claims and runs jobs until stopped.

    Args:
        store: the job store; every state change goes through it.
        runner: runs one job to an outcome (the dispatcher).
        config: the worker's settings.
        metrics: counters to update.
        rng: uniform floats in [0, 1) for jitter.
        clock: monotonic clock, seconds.
        signals: counters tests can await (claimed, completed, retried, ...).
        gate: when it says so, the worker does not claim (operator pause, budget spent); no
            job row is touched meanwhile.
    """

    def __init__(
        self,
        store: JobStore,
        runner: Runner,
        config: WorkerConfig,
        metrics: WorkerMetrics,
        rng: Callable[[], float],
        clock: Callable[[], float] = time.monotonic,
        signals: Signals | None = None,
        gate: ClaimGate | None = None,
    ) -> None:
        self._store = store
        self._gate = gate
        self.claims_paused: str | None = None
        # Rows may wait for admission (JobStore.admit): at start, after a wake-up or a poll,
        # and while the last admission took some.
        self._admission_due = True
        self._runner = runner
        self.signals = signals or Signals()
        self.config = config
        self._metrics = metrics
        self._rng = rng
        self._clock = clock
        self._wake = asyncio.Event()
        self._stopping = asyncio.Event()
        self._outcome_ready = asyncio.Event()
        self._buffer: collections.deque[Job] = collections.deque()
        self._job_ready = asyncio.Event()
        self._running: dict[int, Job] = {}
        self._held: dict[int, Job] = {}
        self._outcomes: list[Outcome] = []
        # Held while a flush writes: the drain takes it before it cancels the flusher, so a
        # write the database may already have committed is never cut off and repeated.
        self._flushing = asyncio.Lock()
        self._more_waiting = False
        # The prefetch in force (see WorkerConfig.prefetch_window_s), sized from the outcomes
        # written since the last measurement: while writes stall, it falls back to prefetch.
        self._prefetch = config.prefetch
        self._finished = 0
        self._rate_mark = (clock(), 0)
        self._log = logger.bind(worker_id=config.worker_id)
        self.claims = 0
        self.last_claim_ok: float | None = None
        self.claim_failures = 0
        self.last_claim_error: str | None = None
        self.db_ok = True

    # -- public surface -------------------------------------------------------------------

    def wake(self) -> None:
        """Ask the claim loop to admit new rows and claim now (NOTIFY arrived, a reconnect
        happened)."""
        self._admission_due = True
        self._wake.set()

    @property
    def in_flight(self) -> int:
        """Jobs running now."""
        return len(self._running)

    @property
    def held(self) -> int:
        """Jobs whose lease this worker holds (buffered, running or waiting to be recorded)."""
        return len(self._held)

    async def run(self) -> None:
        """Run every loop until ``stop`` is called, then drain."""
        flusher = asyncio.create_task(self._flush_loop(), name="listener-flush")
        heart = asyncio.create_task(self._heartbeat_loop(), name="listener-heartbeat")
        consumers = [
            asyncio.create_task(self._consume(), name=f"listener-consumer-{i}")
            for i in range(self.config.concurrency)
        ]
        try:
            await self._claim_loop()
        finally:
            self._buffer.clear()  # never started: released below with the rest
            self._job_ready.set()
            await self._finish_running(consumers)
            # The flusher is stopped before the final flush so the two never write at once,
            # and only between flushes: a write cut off after its commit would be repeated by
            # the final flush and refused by the fence ("not recorded"), though it had landed.
            # A flush that hangs (an unresponsive database) is cut off after the grace period.
            heart.cancel()
            between_flushes = False
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._flushing.acquire(), self.config.shutdown_grace_s)
                between_flushes = True
            flusher.cancel()
            for task in (heart, flusher):
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            if between_flushes:
                self._flushing.release()
            await self._record_and_release()

    def stop(self) -> None:
        """Stop claiming and starting buffered jobs; ``run`` then drains and returns."""
        self._stopping.set()
        self._wake.set()
        self._job_ready.set()

    # -- claim ----------------------------------------------------------------------------

    @property
    def prefetch(self) -> int:
        """The prefetch in force: ``prefetch``, or more while jobs finish quickly."""
        return self._prefetch

    def _resize_prefetch(self) -> None:
        """Size the prefetch to the jobs finished per ``prefetch_window_s`` (see
        ``WorkerConfig``), from the finish rate since the last measurement."""
        config = self.config
        if config.prefetch == 0 or config.prefetch_window_s <= 0:
            return
        now = self._clock()
        since, finished = self._rate_mark
        if now - since < RATE_PERIOD_S:
            return
        rate = (self._finished - finished) / (now - since)
        self._rate_mark = (now, self._finished)
        self._prefetch = max(
            config.prefetch, min(config.max_prefetch, round(rate * config.prefetch_window_s))
        )

    def _shortfall(self) -> int:
        target = self.config.concurrency + self._prefetch
        free = target - len(self._running) - len(self._buffer)
        # Finished jobs waiting to be recorded count against a wider bound: while writes keep
        # up they do not hold claims back, and when writes stall (a slow or restarting
        # database) claiming stops instead of piling up leases in memory.
        return min(free, UNRECORDED_FACTOR * target - len(self._held))

    def _should_claim(self) -> bool:
        """Claim when the buffer is at or below half the prefetch and there is room."""
        return self._shortfall() > 0 and len(self._buffer) <= self._prefetch // 2

    async def _claim_loop(self) -> None:
        failures = 0
        while not self._stopping.is_set():
            self._wake.clear()
            self._resize_prefetch()
            if not self._should_claim():
                # Full: a consumer taking the buffer down to half wakes us. New rows still
                # get their jobs (and the app its pending status) meanwhile.
                await self._admit_quietly()
                await self._wait(self._poll_interval())
                continue
            want = self._shortfall()
            try:
                if await self._claims_blocked():
                    await self._admit_quietly()
                    await self._wait(self._poll_interval())
                    continue
                # After a wake-up, the claim admits new rows first. More than one admission
                # takes wakes every daemon again (a NOTIFY from the claim itself).
                admit, self._admission_due = self._admission_due, False
                jobs = await self._store.claim(
                    want, self.config.worker_id, self.config.lease_s, uuid.uuid4(), admit=admit
                )
            except Exception as error:
                self._admission_due = True
                failures += 1
                self.claim_failures = failures
                self.last_claim_error = redact_text(f"{type(error).__name__}: {error}")[:300]
                self._db_error("claim", error)
                await self._wait(self._backoff(failures))
                continue
            failures = 0
            self.claim_failures = 0
            self.last_claim_error = None
            self.db_ok = True
            self.claims += 1
            self.last_claim_ok = self._clock()
            if self._stopping.is_set():
                for job in jobs:
                    self._held[job.id] = job  # released by the drain
                break
            for job in jobs:
                self._held[job.id] = job
                self._buffer.append(job)
            if jobs:
                self._metrics.jobs_claimed.inc(len(jobs))
                self.signals.emit("claimed", len(jobs))
                self._job_ready.set()
            self._more_waiting = len(jobs) == want
            if admit and self._more_waiting:
                # The admission may have filled the claim's room: more rows may wait, and
                # the next claim admits them without waiting for the NOTIFY that says so.
                self._admission_due = True
            if not self._more_waiting:
                await self._wait(self._poll_interval())

    async def _admit_quietly(self) -> None:
        """Admit waiting rows while not claiming (``JobStore.admit``); errors are logged."""
        if not self._admission_due:
            return
        self._admission_due = False
        try:
            self._admission_due = await self._store.admit() > 0
        except Exception as error:
            self._admission_due = True
            self._db_error("admit", error)

    async def _claims_blocked(self) -> bool:
        """Ask the gate; log when claiming pauses or resumes."""
        reason = None if self._gate is None else await self._gate.claim_blocked()
        if reason != self.claims_paused:
            if reason is None:
                self._log.info("claiming resumed")
            else:
                self._log.info("claiming paused: {}", reason)
            self.claims_paused = reason
        return reason is not None

    async def _consume(self) -> None:
        while True:
            # Once stopping, no buffered job starts: the drain hands them back unrun.
            if self._stopping.is_set():
                return
            if not self._buffer:
                self._job_ready.clear()
                await self._job_ready.wait()
                continue
            job = self._buffer.popleft()
            if self._more_waiting and self._should_claim():
                self._wake.set()
            self._running[job.id] = job
            self._metrics.in_flight.set(len(self._running))
            try:
                outcome = await self._runner.run(job)
            finally:
                del self._running[job.id]
                self._metrics.in_flight.set(len(self._running))
            self._outcomes.append(outcome)
            self._outcome_ready.set()
            if not self._buffer and self._more_waiting:
                self._wake.set()

    async def _wait(self, timeout: float | None) -> None:
        if self._stopping.is_set():
            return
        try:
            await asyncio.wait_for(self._wake.wait(), timeout)
        except TimeoutError:
            self._admission_due = True  # the poll: the backstop of a lost NOTIFY

    def _poll_interval(self) -> float:
        return self.config.poll_interval_s * (0.75 + 0.5 * self._rng())

    def _backoff(self, failures: int) -> float:
        return max(0.05, full_jitter_backoff(failures, 0.2, 5.0, self._rng))

    def _db_error(self, op: str, error: BaseException) -> None:
        self.db_ok = False
        self._metrics.db_errors.labels(op).inc()
        self._log.warning("database error during {}: {}: {}", op, type(error).__name__, error)

    # -- flush ----------------------------------------------------------------------------

    async def _flush_loop(self) -> None:
        failures = 0
        while True:
            await self._outcome_ready.wait()
            self._outcome_ready.clear()
            if not self._outcomes:
                continue
            try:
                async with self._flushing:
                    await self._flush()
                failures = 0
            except Exception as error:
                failures += 1
                self._db_error("flush", error)
                await asyncio.sleep(self._backoff(failures))
                self._outcome_ready.set()

    async def _flush(self) -> None:
        """Write every buffered outcome; on error they stay buffered for the next try."""
        batch = self._outcomes
        self._outcomes = []
        try:
            written = await self._write(batch)
        except BaseException:
            self._outcomes = batch + self._outcomes
            raise
        self._finished += len(batch)
        for outcome in batch:
            if outcome.job.id not in written:
                self._log.warning(
                    "outcome of job {} was not recorded: its lease is no longer ours (expired "
                    "and reclaimed, cancelled, or recorded by an interrupted flush)",
                    outcome.job.id,
                )
            self._held.pop(outcome.job.id, None)
        if self._more_waiting and self._should_claim():
            self._wake.set()

    async def _write(self, batch: list[Outcome]) -> set[int]:
        """One fenced statement per kind of outcome; returns the ids recorded."""
        store = self._store
        return (
            await self._record(
                "complete",
                "completed",
                [o for o in batch if isinstance(o, Completed)],
                store.complete,
            )
            | await self._record(
                "retry", "retried", [o for o in batch if isinstance(o, Retry)], store.retry
            )
            | await self._record(
                "deferred", "snoozed", [o for o in batch if isinstance(o, Snoozed)], store.snooze
            )
            | await self._record(
                "failed",
                "discarded",
                [o for o in batch if isinstance(o, Discarded)],
                store.discard,
            )
            | await self._record(
                "batched", "parked", [o for o in batch if isinstance(o, Parked)], store.park
            )
        )

    async def _record(
        self,
        label: str,
        signal: Signal,
        items: list[T],
        write: Callable[[Sequence[T]], Awaitable[set[int]]],
    ) -> set[int]:
        if not items:
            return set()
        ids = await write(items)
        self._metrics.jobs_finished.labels(label).inc(len(ids))
        self.signals.emit(signal, len(ids))
        if signal in ("completed", "discarded"):
            self.signals.emit("finished", len(ids))
        return ids

    # -- heartbeat ------------------------------------------------------------------------

    async def _heartbeat_loop(self) -> None:
        interval = self.config.lease_s / 3
        while True:
            await asyncio.sleep(interval * (0.9 + 0.2 * self._rng()))
            await self.heartbeat()

    async def heartbeat(self) -> None:
        """Renew this worker's leases and reap expired ones; errors are logged, not raised."""
        held = list(self._held.values())
        try:
            kept = await self._store.renew(held, self.config.lease_s)
            reaped = await self._store.reap()
        except Exception as error:
            self._db_error("heartbeat", error)
            return
        self.db_ok = True
        # Only a job still waiting or running lost its lease: one that finished meanwhile
        # was not renewed because its outcome is being written (the statement that records
        # it may have committed before the renewal, while it is still held until the flush
        # returns); if that outcome's lease was lost, the flush says so.
        unfinished = self._running.keys() | {job.id for job in self._buffer}
        for job in held:
            if job.id not in kept and job.id in unfinished:
                self._log.warning("lease of job {} was lost (expired and reclaimed)", job.id)
        if reaped:
            self._log.info("reaped {} jobs whose lease expired", len(reaped))
            self._wake.set()

    # -- drain ----------------------------------------------------------------------------

    async def _finish_running(self, consumers: list[asyncio.Task[None]]) -> None:
        if self._running:
            self._log.info(
                "stopping: waiting up to {:.0f}s for {} running jobs",
                self.config.shutdown_grace_s,
                len(self._running),
            )
        _, pending = await asyncio.wait(consumers, timeout=self.config.shutdown_grace_s)
        for task in pending:
            task.cancel()
        for task in consumers:
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _record_and_release(self) -> None:
        for attempt in range(1, 6):
            try:
                if self._outcomes:
                    await self._flush()
                unfinished = list(self._held.values())
                released = await self._store.release(unfinished)
                self._held.clear()
                self.signals.emit("released", len(released))
                if released:
                    self._log.info("handed {} unfinished jobs back as pending", len(released))
                return
            except Exception as error:
                self._db_error("drain", error)
                await asyncio.sleep(self._backoff(attempt))
        self._log.error(
            "could not record {} outcomes at shutdown; their leases will expire and the jobs "
            "will run again",
            len(self._held),
        )
