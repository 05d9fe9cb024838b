"""The ``JobStore`` protocol: the one owner of job state.

Every change of a job's state goes through one method here, and every method that touches a
claimed job is fenced by its lease token ``(id, lease_token, status = 'processing')``: a
worker whose lease expired and was taken over can never overwrite the newer run. Nothing
else in listener writes job state (as River's ``Executor`` and procrastinate's connector).

Two implementations pass the same conformance suite (``tests/conformance``):
``listener.queue.pg_store.PgJobStore`` over ``sql/queries.sql``, and
``listener.queue.memory_store.MemoryJobStore``, for fast tests of the worker's decisions
with a fake clock.

State machine (``listener.queue.outcomes.JOB_STATUSES``)::

    pending --claim--> processing --complete--> complete
       ^                  |  |  |---discard---> failed (dead letter)
       |---retry/snooze---|  |  |---park-----> batched (waits for a provider batch)
       |---release/reap------|
    pending | processing | batched --cancel--> cancelled
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol
from uuid import UUID

from listener.queue.outcomes import Completed, Discarded, Job, Parked, Retry, Snoozed, StepRecord


@dataclass(frozen=True, slots=True)
class JobFilter:
    """Which jobs an operator's ``retry`` or ``cancel`` applies to (``None``: any).

    Attributes:
        statuses: job statuses to match.
        reason: text contained in ``last_error`` (case-insensitive).
        owner: the owner id.
        table: the attached table, qualified and quoted (``public.images``).
    """

    statuses: tuple[str, ...]
    reason: str | None = None
    owner: str | None = None
    table: str | None = None


@dataclass(frozen=True, slots=True)
class JobSnapshot:
    """A job as stored, for status and tests.

    Attributes:
        id, status, attempts, max_attempts (``None`` until the first claim fills in the
        default), last_error, claims: as in ``listener.jobs``.
        leased: a lease token is set.
        run_after_s: seconds from now until the job may be claimed (negative: already).
        steps: stored step results by name: ``{"step": {"cost_usd": usd, "calls": n}}``.
    """

    id: int
    status: str
    attempts: int
    max_attempts: int | None
    last_error: str | None
    claims: int
    leased: bool
    run_after_s: float
    steps: Mapping[str, Mapping[str, Any]]


class JobStore(Protocol):
    """Every job state change, each one fenced. See the module docstring."""

    async def enqueue(
        self,
        source_table: str,
        source_id: str,
        image_url: str | None,
        owner_id: str | None = None,
        *,
        priority: int = 0,
        max_attempts: int | None = None,
    ) -> int | None:
        """Add a pending job for a source row (as the attach trigger does).

        ``max_attempts`` ``None`` takes the daemon's default at the first claim.

        Returns:
            The new job's id; ``None`` when the row already has a job.
        """
        ...

    async def claim(self, limit: int, worker_id: str, lease_s: float, token: UUID) -> list[Job]:
        """Claim up to ``limit`` runnable pending jobs, leased for ``lease_s`` seconds.

        Runnable: ``run_after`` has passed; order: priority, then ``run_after``, then id.
        Each claim counts an attempt and fills in a missing ``max_attempts`` with the
        store's default. Concurrent claimers never get the same job.
        """
        ...

    async def renew(self, jobs: Sequence[Job], lease_s: float) -> set[int]:
        """Extend the leases of ``jobs`` to ``lease_s`` seconds from now.

        Returns:
            The ids whose lease still held (the others were reaped or cancelled).
        """
        ...

    async def save_step(self, job: Job, record: StepRecord) -> bool:
        """Store one finished step and its effects while the lease holds.

        The effects (``StepRecord.effects``) are written in the same transaction as the
        step, or not at all. A step stored twice (only after a kill between a provider's
        answer and this write) keeps the newer output and adds the costs: spend counts what
        was paid.

        Returns:
            ``False`` when the lease no longer holds; nothing was written then.

        Raises:
            ValueError: ``record.effects`` names an effect outside
                ``listener.queue.outcomes.KNOWN_EFFECTS`` (nothing is written).
        """
        ...

    async def outputs(self, job_id: int) -> dict[str, dict[str, Any]]:
        """The stored step outputs of a job, by step name."""
        ...

    async def complete(self, done: Sequence[Completed]) -> set[int]:
        """Mark jobs complete, storing their unsaved results; fenced by lease.

        Returns:
            The ids recorded (the others' leases no longer held; nothing was written).
        """
        ...

    async def retry(self, failures: Sequence[Retry]) -> set[int]:
        """Put jobs back to pending after their delay; the attempt stays used. Fenced."""
        ...

    async def snooze(self, snoozed: Sequence[Snoozed]) -> set[int]:
        """Put jobs back to pending after their delay and give the attempt back. Fenced."""
        ...

    async def discard(self, failures: Sequence[Discarded]) -> set[int]:
        """Fail jobs for good (dead letter) with their reason. Fenced."""
        ...

    async def park(self, parked: Sequence[Parked]) -> set[int]:
        """Move jobs to ``batched`` to wait for a provider batch (attempt given back). Fenced."""
        ...

    async def release(self, jobs: Sequence[Job]) -> set[int]:
        """Hand unfinished jobs back as pending, runnable now, attempt given back. Fenced."""
        ...

    async def reap(self, limit: int = 1000) -> dict[int, str]:
        """Return jobs whose lease expired to pending, or fail them when their attempts are
        used up (a job that kills its worker must not loop forever).

        Returns:
            ``{job id: new status}``.
        """
        ...

    async def requeue(self, which: JobFilter) -> list[int]:
        """Operator's retry: matching jobs become pending now, attempts reset.

        Only finished statuses (``failed``, ``cancelled``, ``complete``) may be requeued;
        a running job is never taken from its worker.

        Raises:
            ValueError: ``which.statuses`` names a status that is not finished.
        """
        ...

    async def cancel(self, which: JobFilter) -> list[int]:
        """Cancel matching ``pending``, ``processing`` or ``batched`` jobs.

        A running job's worker finds its lease gone and records nothing; a batched job's
        batch result will find it gone too.
        """
        ...

    async def snapshot(self, job_id: int) -> JobSnapshot | None:
        """The job as stored, ``None`` when there is none."""
        ...
