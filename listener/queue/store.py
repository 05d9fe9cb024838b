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
    batched (waiting) --take_for_batch--> batched in batch B --apply_batch_result--> pending
                       <--return_to_wait / sweep_abandoned_batches--|
                          batched in batch B --batch_to_per_image--> pending (batch mode off)

A job in a provider batch holds no lease: writes about it are fenced by ``(id, batch id,
status 'batched')`` (and the batch's step), so a job cancelled, or reset by a new URL, while
its batch runs gets nothing from that batch.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Protocol
from uuid import UUID

from listener.queue.outcomes import (
    BatchJob,
    Completed,
    Discarded,
    InputDigest,
    Job,
    Parked,
    Retry,
    Reusable,
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
class FaceRef:
    """A recorded face: its Rekognition collection and FaceId."""

    collection_id: str
    face_id: str


@dataclass(frozen=True, slots=True)
class ForgottenRow:
    """What ``JobStore.forget_rows`` did for one ``DeletedRow`` and what is left to undo.

    Attributes:
        row: the deleted row.
        running_s: the job was running: it was cancelled (its worker's fenced writes fail from
            now on) but not deleted; forget the row again once these seconds (what its lease
            had left) have passed, when no run of it can still index faces. ``None`` otherwise.
        faces: the row's recorded faces whose job is gone, to delete from their collections
            (then ``forget_faces``).
        sweep: the job had been claimed without completing: a run may have indexed faces it
            never recorded; every face of the row in its owner's collection must go.
        owner_id: the forgotten job's owner (whose collection to sweep).
        restarted: the fresh job of a reinserted row (``None``: none was created).
    """

    row: DeletedRow
    running_s: float | None = None
    faces: tuple[FaceRef, ...] = ()
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
        new rows still get their job. A store without such a source returns 0.

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
        its ``saved_usd`` in the deduplication savings.

        Returns:
            ``False`` when the lease no longer holds; nothing was written then.

        Raises:
            ValueError: ``record.effects`` names an effect outside
                ``listener.queue.outcomes.KNOWN_EFFECTS``, or the record's reuse or digest is
                malformed (``check_effects``; nothing is written).
        """
        ...

    async def outputs(self, job_id: int) -> dict[str, dict[str, Any]]:
        """The stored step outputs of a job, by step name."""
        ...

    async def find_reusable(
        self,
        job: Job,
        step: str,
        digest: InputDigest,
        scope: str,
        max_distance: int | None = None,
    ) -> Reusable | None:
        """A stored result of ``step`` for the same input as ``job``'s, from another job in
        ``scope``; read only (the copy is stored with ``save_step``).

        Same input: a result whose ``digest.sha256`` is equal (kind ``"sha256"``), else, when
        ``max_distance`` is given and ``digest.phash`` known, one whose perceptual hash is
        within ``max_distance`` bits (kind ``"phash"``, the nearest). Scope: ``"owner"``:
        jobs of the same source table and owner (``None`` owners form one scope);
        ``"table"``: of the same table; ``"global"``: any job. A result that is itself a copy
        names its origin, so copies never chain.

        Postgres reads at most ``DEDUP_CANDIDATES`` results with the same digest before the
        scope filter (``listener.queue.pg_store``), so a digest shared by very many rows of
        other owners may go unmatched; nothing else is scanned.

        Raises:
            ValueError: ``scope`` is not one of the three.
        """
        ...

    async def complete(self, done: Sequence[Completed]) -> set[int]:
        """Mark jobs complete, storing their unsaved results (with their digests); fenced by
        lease. Results with effects or copies (``reused``) are stored with ``save_step``: a
        store raises ``ValueError`` for them here.

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

    async def wake_held(self, held_by: str) -> int:
        """``listener resume``: pending jobs snoozed with ``held_by`` (``Snoozed.held_by``: a
        paused provider, ``"*"``, ``"budget"``) become runnable now and are held no more.

        Returns:
            How many jobs were woken.
        """
        ...

    async def prune(self, before: datetime, limit: int, *, dry_run: bool = False) -> int:
        """Retention: delete (with their results) up to ``limit`` finished jobs (complete,
        failed, cancelled) finished before ``before`` whose source row no longer exists, so
        nothing an app reads goes. Locked rows are skipped; ``dry_run`` counts every job that
        would go (no limit) and deletes nothing.

        Whether a source row exists: Postgres reads the attached table (jobs of tables no
        longer attached are kept); the memory store has no app tables and takes the rows
        given to ``MemoryJobStore.delete_row``.

        Returns:
            The jobs deleted (or, with ``dry_run``, that would be).
        """
        ...

    async def forget_rows(self, rows: Sequence[DeletedRow]) -> list[ForgottenRow]:
        """The app deleted these source rows: their jobs and results go, in one transaction.

        For each row, in order: a job still running (leased, lease not expired) is cancelled
        and kept (``ForgottenRow.running_s``); any other job of ``DeletedRow.job_id`` is
        cancelled if unfinished (a terminal event) and deleted with its results. The row's
        recorded faces whose job is gone are returned, and stay recorded until
        ``forget_faces``. A ``reinserted`` row then gets a fresh pending job from its current
        values (Postgres: read from its attached table, none when the row is gone or the
        table is detached; the memory store has no app tables and re-enqueues the forgotten
        job's URL and owner). Idempotent: forgetting a row again deletes nothing more.

        Returns:
            One ``ForgottenRow`` per row, in order.
        """
        ...

    async def forget_faces(self, face_ids: Sequence[str]) -> int:
        """The faces ``face_ids`` of deleted rows are gone from their collections: delete their
        records (and suggestions about them). A face whose job still exists is kept.

        Returns:
            The faces whose records were deleted.
        """
        ...

    async def snapshot(self, job_id: int) -> JobSnapshot | None:
        """The job as stored, ``None`` when there is none."""
        ...

    # -- provider batches (OpenAI's Batch API): fenced by (id, batch id, status 'batched') --

    async def take_for_batch(self, step: str, limit: int, batch_id: str) -> list[BatchJob]:
        """Take up to ``limit`` jobs waiting for a batch of ``step`` into new batch ``batch_id``.

        One atomic change: the batch is recorded as ``preparing`` (no input file yet) and the
        jobs (``status = 'batched'``, no batch, ``batch_step = step``; by priority, then how
        long they waited, then id) get its id. Concurrent takers never get the same job.
        Nothing is recorded when no job waits.

        Returns:
            The jobs taken, by id; empty when none waited.
        """
        ...

    async def keep_preparing(self, batch_id: str) -> bool:
        """Heartbeat of a ``preparing`` batch, so ``sweep_abandoned_batches`` leaves it alone.

        Returns:
            ``False`` when the batch is no longer ``preparing`` (it was swept: stop).
        """
        ...

    async def record_batch_file(
        self, batch_id: str, file_id: str, requests: Mapping[str, int]
    ) -> bool:
        """Record the uploaded input file of a ``preparing`` batch and its requests
        (``{custom_id: job id}``); the batch becomes ``submitting``.

        Returns:
            ``False`` when the batch is no longer ``preparing`` (swept): it must not be
            created at the provider.
        """
        ...

    async def batch_to_per_image(self, batch_id: str, errors: Mapping[int, str]) -> set[int]:
        """Send jobs of ``batch_id`` whose request cannot be written (``{job id: reason}``)
        to the per-image path: pending now, batch mode off, the reason in ``last_error``.

        Returns:
            The ids changed (the others had left the batch).
        """
        ...

    async def return_to_wait(self, batch_id: str, job_ids: Sequence[int]) -> set[int]:
        """Jobs taken into ``batch_id`` that did not fit its file wait for the next batch
        again, in their old place.

        Returns:
            The ids changed (the others had left the batch).
        """
        ...

    async def sweep_abandoned_batches(self, idle_s: float) -> list[int]:
        """Close ``preparing`` batches without a heartbeat for ``idle_s`` seconds (their daemon
        died mid-preparation); their jobs wait for a batch again.

        Returns:
            The ids of the jobs handed back.
        """
        ...

    async def jobs_in_batch(self, batch_id: str) -> int:
        """How many jobs ``batch_id`` still holds (cancelled ones and new URLs have left)."""
        ...

    async def apply_batch_result(
        self,
        batch_id: str,
        step: str,
        results: Mapping[int, StepRecord],
        failures: Mapping[int, str],
    ) -> set[int] | None:
        """Apply finished batch ``batch_id`` of ``step``, exactly once, atomically.

        Only the jobs still in the batch (``batch_id``, ``status = 'batched'``,
        ``batch_step = step``) are touched: their ``results`` (``{job id: record}``, costs as
        given, i.e. at batch prices) are stored, and every one of them goes back to pending,
        runnable now, to continue with its next step; those in ``failures``
        (``{job id: reason}``) leave batch mode and record the reason, so they run per image.
        The batch is marked applied.

        Returns:
            The ids whose result was stored; ``None`` when the batch was applied already (or
            another daemon is applying it right now, or it is unknown or of another step).
        """
        ...
