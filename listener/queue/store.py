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
    any --forget_rows (its source row was deleted)--> cancelled, then deleted

A job parked for a provider batch (``batched``) is taken over by the analysis side's batch
store (``listener.analysis.batch_store``), which writes about it fenced by ``(id, batch id,
status 'batched')`` instead of a lease, until it hands the job back as pending. Result reuse
and the records of effects (``listener.analysis.dedup_store``, ``face_store``) live there
too: this protocol keeps only the queue's methods.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Protocol
from uuid import UUID

from listener.queue.outcomes import (
    Completed,
    Discarded,
    Job,
    Leftover,
    Parked,
    Retry,
    Snoozed,
    StepRecord,
)


@dataclass(frozen=True, slots=True)
class JobFilter:
    """Which jobs an operator's ``retry`` or ``cancel`` applies to (``None``: any).

    Attributes:
        statuses: job statuses to match.
        reason: text contained in ``last_error`` (case-insensitive).
        owner: the owner id.
        table: the attached table, qualified and quoted (``public.photos``).
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
        steps: stored step results by name: ``{"step": {"cost_usd": usd, "calls": n}}``,
            plus ``"reused_from": origin job id`` on a copy (deduplication).
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


@dataclass(frozen=True, slots=True)
class DeletedRow:
    """A source row the app deleted, or inserted again while its old job held its key.

    Attributes:
        source_table, source_id: the row.
        job_id: the row's job when it was deleted (``None``: it had none). Only this job is
            forgotten, never a newer one of a row inserted again since.
        reinserted: the row was inserted again while ``job_id`` held its key: once that job
            is forgotten, the row gets a fresh one.
    """

    source_table: str
    source_id: str
    job_id: int | None
    reinserted: bool = False


@dataclass(frozen=True, slots=True)
class ForgottenRow:
    """What ``JobStore.forget_rows`` did for one ``DeletedRow`` and what is left to undo.

    Attributes:
        row: the deleted row.
        running_s: the job was running: it was cancelled (its worker's fenced writes fail from
            now on) but not deleted; forget the row again once these seconds (what its lease
            had left) have passed, when no run of it can still leave external records behind.
            ``None`` otherwise.
        leftovers: the external records of the row's effects whose job is gone, to remove at
            their service (then forget their records: the analysis side's ``FaceStore``).
        sweep: the job had been claimed without completing: a run may have left external
            records it never recorded; every one of the row at its owner's must go.
        owner_id: the forgotten job's owner (whose records to sweep).
        restarted: the fresh job of a reinserted row (``None``: none was created).
    """

    row: DeletedRow
    running_s: float | None = None
    leftovers: tuple[Leftover, ...] = ()
    sweep: bool = False
    owner_id: str | None = None
    restarted: int | None = None


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

    async def admit(self, claiming: int = 0) -> int:
        """Make the jobs of rows enqueued outside the store that wait for admission.

        In Postgres, an attached table's insert trigger only records the row
        (``listener.inserted_rows``); admission reads the row and inserts its job. A worker
        admits in its next claim after each wake-up (a NOTIFY, a poll, a reconnect: see
        ``claim``); it calls this while it is not claiming (paused, or its buffer full), so
        new rows still get their job. The memory store's rows wait from
        ``MemoryJobStore.insert_row``. Of several waiting entries of one row, the newest
        counts; a row deleted since gets no job; a row whose key a job already holds gets
        none (a job older than the entry is of a row deleted and inserted again: the row is
        queued for the drain of deleted rows, which restarts it).

        Args:
            claiming: jobs the caller is about to claim; when more jobs than that were made,
                or as many rows were taken as one admission takes, other workers are woken.

        Returns:
            Rows taken from the waiting list (0: none waited).
        """
        ...

    async def claim(
        self, limit: int, worker_id: str, lease_s: float, token: UUID, *, admit: bool = False
    ) -> list[Job]:
        """Claim up to ``limit`` runnable pending jobs, leased for ``lease_s`` seconds.

        Runnable: ``run_after`` has passed; order: priority, then ``run_after``, then id.
        Each claim counts an attempt and fills in a missing ``max_attempts`` with the
        store's default. Concurrent claimers never get the same job. With ``admit``, rows
        waiting for admission (see ``admit``) are admitted in the same transaction as jobs
        claimed at once, as many as the claim has room for after the pending jobs of
        priority 0 or less (before those of higher numbers); the rest wait for the next
        claim.
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

        ``record.digest`` is stored with the result; a ``record.reused`` copy also counts
        its ``saved_usd`` in the savings of reuse.

        Returns:
            ``False`` when the lease no longer holds; nothing was written then.

        Raises:
            ValueError: ``record.effects`` names an effect kind the store was not given, or a
                kind refuses its payload (``check_effects``; nothing is written).
        """
        ...

    async def outputs(self, job_id: int) -> dict[str, dict[str, Any]]:
        """The stored step outputs of a job, by step name."""
        ...

    async def complete(self, done: Sequence[Completed]) -> set[int]:
        """Mark jobs complete, storing their unsaved results (with their digests); fenced by
        lease. Results with effects or copies (``reused``) are stored with ``save_step``: a
        store raises ``ValueError`` for them here. ``done`` may name a job twice (a worker's
        buffer holding the completion of a claim whose lease expired and of the job's next
        claim): only the newest claim's is written, and the batch does not fail.

        Returns:
            The ids recorded (the others' leases no longer held; nothing was written).
        """
        ...

    async def retry(self, failures: Sequence[Retry]) -> set[int]:
        """Put jobs back to pending after their delay; the attempt stays used. Fenced."""
        ...

    async def snooze(self, snoozed: Sequence[Snoozed]) -> set[int]:
        """Put jobs back to pending after their delay and give the attempt back. Fenced.

        A job held by an operator pause (``held_by`` a provider or ``"*"``) is held only
        while that pause is in force: when it was lifted already (``resume``; a daemon's
        reading of the pauses may predate it) the job is pending, runnable now, held by
        nothing. A hold by ``"budget"`` is kept as given.
        """
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

    async def reanalyze(self, source_table: str, source_ids: Sequence[str], priority: int) -> int:
        """Start rows over from scratch, whatever their jobs' state (complete included).

        Each job goes back to pending, runnable now, attempts reset, its stored results
        removed, its lease and batch cleared: a worker or batch still at work on the old run
        writes nothing. Rows of ``source_table`` that never had a job get one (Postgres: read
        from the attached table; the memory store has no app tables and restarts only
        existing jobs).

        Returns:
            The jobs restarted or created.

        Raises:
            LookupError (memory) / asyncpg.UndefinedObjectError (Postgres): the table is not
                attached.
        """
        ...

    async def pause(self, provider: str, reason: str | None, until: datetime | None) -> None:
        """``listener pause``: pause ``provider`` (``"*"``: the pipeline) until ``until``
        (``None``: until ``resume``); pausing again replaces the reason and the end. Daemons
        hear of it at once (Postgres: a ``"pauses"`` notification)."""
        ...

    async def resume(self, held_by: str) -> tuple[bool, int]:
        """``listener resume``: lift the pause ``held_by`` (a provider, ``"*"``), if any, and
        make the pending jobs snoozed with ``held_by`` (``Snoozed.held_by``; ``"budget"``
        too) runnable now, held no more. Daemons hear of it at once, and re-read the pauses
        before they claim.

        Against ``snooze``: a job held by a pause is never left held once the pause is
        lifted, whatever a daemon's cached reading said. A snooze that commits first is
        woken here; one that comes after finds the pause gone and does not hold the job.

        Returns:
            Whether a pause was lifted, and how many jobs were woken.
        """
        ...

    async def prune(self, before: datetime, limit: int, *, dry_run: bool = False) -> int:
        """Retention: delete (with their results) up to ``limit`` finished jobs (complete,
        failed, cancelled) finished before ``before`` whose source row no longer exists, so
        nothing an app reads goes. Locked rows are skipped; ``dry_run`` counts every job that
        would go (no limit) and deletes nothing.

        Whether a source row exists: Postgres reads the attached table (jobs of tables no
        longer attached are kept); the memory store reads the rows given to
        ``MemoryJobStore.insert_row`` and not deleted since (``delete_row``).

        Returns:
            The jobs deleted (or, with ``dry_run``, that would be).
        """
        ...

    async def forget_rows(self, rows: Sequence[DeletedRow]) -> list[ForgottenRow]:
        """The app deleted these source rows: their jobs and results go, in one transaction.

        For each row, in order: a job still running (leased, lease not expired) is cancelled
        and kept (``ForgottenRow.running_s``); any other job of ``DeletedRow.job_id`` is
        cancelled if unfinished (a terminal event) and deleted with its results. The row's
        effects' external records (``Leftover``) whose job is gone are returned, and stay
        recorded until the analysis side forgets them. A ``reinserted`` row then gets a fresh
        pending job from its current values (Postgres: read from its attached table, none
        when the row is gone or the table is detached; the memory store reads the rows given
        to ``MemoryJobStore.insert_row``, else re-enqueues the forgotten job's URL and owner).
        Idempotent: forgetting a row again deletes nothing more.

        Returns:
            One ``ForgottenRow`` per row, in order.
        """
        ...

    async def snapshot(self, job_id: int) -> JobSnapshot | None:
        """The job as stored, ``None`` when there is none."""
        ...
