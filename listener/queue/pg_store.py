"""``PgJobStore``: the ``JobStore`` over Postgres, one named query of ``sql/queries.sql`` per
state change. Batch operations (``executemany``-free: arrays through ``unnest``) keep group
commits to one statement per kind of outcome."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from decimal import Decimal
from typing import Any
from uuid import UUID

import asyncpg

from listener.db.queries import load_queries
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
    check_effects,
)
from listener.queue.store import (
    DeletedRow,
    FaceRef,
    ForgottenRow,
    JobFilter,
    JobSnapshot,
)

_FINISHED = ("failed", "cancelled", "complete")
_SCOPES = ("owner", "table", "global")

DEDUP_CANDIDATES = 200
# Rows the app inserted admitted as jobs by one claim (into its room, 0021) or by one
# admission outside a claim (0019), at most. One admission of 1,000 rows takes tens of
# milliseconds.
ADMIT_BATCH = 1_000
ADMIT_ALL = 2**31 - 1
"""Stored results with the same digest read, at most, before the scope's filter."""


def usd(value: float) -> Decimal:
    """``value`` (USD) as the ``numeric(16, 9)`` the results table stores."""
    return Decimal(f"{value:.9f}")


def _job(r: Mapping[str, Any], token: UUID) -> Job:
    return Job(
        id=r["id"],
        source_table=r["source_table"],
        source_id=r["source_id"],
        image_url=r["image_url"],
        owner_id=r["owner_id"],
        priority=r["priority"],
        attempts=r["attempts"],
        max_attempts=r["max_attempts"],
        lease_token=token,
        batch_mode=r["batch_mode"],
        done_steps=tuple(r["done_steps"]),
        claims=r["claims"],
    )


class PgJobStore:
    """The job store on Postgres.

    Args:
        pool: an ``asyncpg.Pool`` (each call takes one connection).
        default_max_attempts: attempts allowed to jobs enqueued without ``max_attempts``
            (``LISTENER_MAX_ATTEMPTS``), filled in at their first claim.
    """

    def __init__(self, pool: asyncpg.Pool, default_max_attempts: int = 5) -> None:
        self._pool = pool
        self._sql = {name: q.sql for name, q in load_queries().items()}
        self._default_max_attempts = default_max_attempts

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
        """See ``JobStore.enqueue``."""
        job_id: int | None = await self._pool.fetchval(
            self._sql["enqueue_job"],
            source_table,
            source_id,
            image_url,
            owner_id,
            priority,
            max_attempts,
        )
        return job_id

    async def admit(self, claiming: int = 0) -> int:
        """See ``JobStore.admit``: ``listener.admit_inserted_rows`` (0019), up to
        ``ADMIT_BATCH`` rows in one statement. Its commit does not wait for the WAL flush:
        a crash that loses it loses the entries' deletion with their jobs, so they are
        admitted again, and the claim that follows commits durably, its flush covering the
        admission's WAL."""
        return int(
            await self._pool.fetchval(self._sql["admit_inserted_rows"], ADMIT_BATCH, claiming)
        )

    async def claim(
        self, limit: int, worker_id: str, lease_s: float, token: UUID, *, admit: bool = False
    ) -> list[Job]:
        """See ``JobStore.claim``: ``listener.claim_jobs`` (0021), which admits up to
        ``ADMIT_BATCH`` rows into the claim's room when ``admit`` is set: one round trip,
        one commit."""
        rows = await self._pool.fetch(
            self._sql["claim_jobs"],
            limit,
            worker_id,
            lease_s,
            token,
            self._default_max_attempts,
            ADMIT_BATCH if admit else 0,
        )
        return [_job(r, token) for r in rows]

    async def renew(self, jobs: Sequence[Job], lease_s: float) -> set[int]:
        """See ``JobStore.renew``."""
        if not jobs:
            return set()
        rows = await self._pool.fetch(
            self._sql["renew_leases"],
            [j.id for j in jobs],
            list({j.lease_token for j in jobs}),
            lease_s,
        )
        return {r["id"] for r in rows}

    async def save_step(self, job: Job, record: StepRecord) -> bool:
        """See ``JobStore.save_step``.

        A step with effects is stored in one transaction: the job row is locked while the
        lease holds (``lock_leased_job``), the effects are written (``"faces"``:
        ``listener.apply_face_effects``, whose person ids go into the output, see
        ``StepRecord.effects``), then the result; a lost lease writes nothing.

        Raises:
            ValueError: ``record.effects`` names an effect this store does not know.
        """
        check_effects(record)
        if not record.effects:
            return bool(
                await self._pool.fetchval(self._sql["save_step"], *self._step_args(job, record))
            )
        async with self._pool.acquire() as conn, conn.transaction():
            held = await conn.fetchrow(self._sql["lock_leased_job"], job.id, job.lease_token)
            if held is None:
                return False
            output = dict(record.output)
            faces = record.effects.get("faces")
            if faces is not None:
                people = json.loads(
                    await conn.fetchval(
                        self._sql["apply_face_effects"],
                        job.id,
                        held["source_table"],
                        held["source_id"],
                        held["owner_id"],
                        json.dumps(faces),
                    )
                )
                if "faces" in output:
                    output["faces"] = [
                        {**f, "person_id": people.get(f["face_id"])}
                        if isinstance(f, Mapping) and "face_id" in f
                        else f
                        for f in output["faces"]
                    ]
            return bool(
                await conn.fetchval(self._sql["save_step"], *self._step_args(job, record, output))
            )

    @staticmethod
    def _step_args(
        job: Job, record: StepRecord, output: Mapping[str, Any] | None = None
    ) -> tuple[Any, ...]:
        """The ``save_step`` query's parameters for ``record`` (``output`` replaces its own)."""
        digest, reused = record.digest, record.reused
        return (
            job.id,
            job.lease_token,
            record.step,
            record.provider,
            json.dumps(record.output if output is None else output),
            record.model,
            record.duration_s * 1000.0,
            record.input_tokens,
            record.output_tokens,
            record.calls,
            usd(record.cost_usd),
            None if digest is None else digest.sha256,
            None if digest is None else digest.phash,
            None if reused is None else reused.origin_job_id,
            None if reused is None else reused.kind,
            None if reused is None else usd(reused.saved_usd),
        )

    async def outputs(self, job_id: int) -> dict[str, dict[str, Any]]:
        """See ``JobStore.outputs``."""
        rows = await self._pool.fetch(self._sql["job_outputs"], job_id)
        return {r["step"]: json.loads(r["output"]) for r in rows}

    async def find_reusable(
        self,
        job: Job,
        step: str,
        digest: InputDigest,
        scope: str,
        max_distance: int | None = None,
    ) -> Reusable | None:
        """See ``JobStore.find_reusable``: ``find_same_image``, then ``find_similar_image``."""
        if scope not in _SCOPES:
            raise ValueError(f"dedup scope is one of {', '.join(_SCOPES)}, not {scope!r}")
        where = (scope, job.source_table, job.owner_id)
        r = await self._pool.fetchrow(
            self._sql["find_same_image"], step, digest.sha256, job.id, *where, DEDUP_CANDIDATES
        )
        if r is not None:
            return self._reusable(r, "sha256", 0)
        if max_distance is None or digest.phash is None:
            return None
        r = await self._pool.fetchrow(
            self._sql["find_similar_image"],
            step,
            digest.phash,
            max_distance,
            job.id,
            *where,
            DEDUP_CANDIDATES,
        )
        return None if r is None else self._reusable(r, "phash", r["distance"])

    @staticmethod
    def _reusable(r: Mapping[str, Any], kind: str, distance: int) -> Reusable:
        return Reusable(
            provider=r["provider"],
            output=json.loads(r["output"]),
            model=r["model"],
            origin_job_id=r["origin_job_id"],
            saved_usd=float(r["saved_usd"]),
            kind=kind,
            distance=distance,
        )

    async def complete(self, done: Sequence[Completed]) -> set[int]:
        """See ``JobStore.complete``.

        Raises:
            ValueError: a result carries effects or is a copy (both are saved one by one
                with ``save_step``, which writes effects in the same transaction and counts
                a copy's savings).
        """
        if not done:
            return set()
        columns: list[list[Any]] = [[] for _ in range(12)]
        for c in done:
            for r in c.results:
                if r.effects:
                    raise ValueError(f"step {r.step} has effects: store it with save_step")
                if r.reused is not None:
                    raise ValueError(f"step {r.step} is a copy: store it with save_step")
                check_effects(r)
                values = (
                    c.job.id,
                    r.step,
                    r.provider,
                    json.dumps(r.output),
                    r.model,
                    r.duration_s * 1000.0,
                    r.input_tokens,
                    r.output_tokens,
                    r.calls,
                    usd(r.cost_usd),
                    None if r.digest is None else r.digest.sha256,
                    None if r.digest is None else r.digest.phash,
                )
                for column, value in zip(columns, values, strict=True):
                    column.append(value)
        return await self._fenced("complete_jobs", [c.job for c in done], *columns)

    async def _fenced(self, name: str, jobs: Sequence[Job], *columns: list[Any]) -> set[int]:
        """Run the fenced statement ``name`` over ``jobs`` (ids ``$1``, tokens ``$2``, then
        one array per further column); returns the ids it wrote."""
        if not jobs:
            return set()
        rows = await self._pool.fetch(
            self._sql[name], [j.id for j in jobs], [j.lease_token for j in jobs], *columns
        )
        return {r["id"] for r in rows}

    async def retry(self, failures: Sequence[Retry]) -> set[int]:
        """See ``JobStore.retry``."""
        return await self._fenced(
            "retry_jobs",
            [f.job for f in failures],
            [f.delay_s for f in failures],
            [f.error for f in failures],
        )

    async def snooze(self, snoozed: Sequence[Snoozed]) -> set[int]:
        """See ``JobStore.snooze``."""
        return await self._fenced(
            "snooze_jobs",
            [f.job for f in snoozed],
            [f.delay_s for f in snoozed],
            [f.error for f in snoozed],
            [f.held_by for f in snoozed],
        )

    async def discard(self, failures: Sequence[Discarded]) -> set[int]:
        """See ``JobStore.discard``."""
        return await self._fenced(
            "discard_jobs", [f.job for f in failures], [f.error for f in failures]
        )

    async def park(self, parked: Sequence[Parked]) -> set[int]:
        """See ``JobStore.park``."""
        return await self._fenced("park_jobs", [b.job for b in parked], [b.step for b in parked])

    async def release(self, jobs: Sequence[Job]) -> set[int]:
        """See ``JobStore.release``."""
        return await self._fenced("release_jobs", jobs)

    async def reap(self, limit: int = 1000) -> dict[int, str]:
        """See ``JobStore.reap``."""
        rows = await self._pool.fetch(self._sql["reap_expired_leases"], limit)
        return {r["id"]: r["status"] for r in rows}

    async def requeue(self, which: JobFilter) -> list[int]:
        """See ``JobStore.requeue``."""
        bad = set(which.statuses) - set(_FINISHED)
        if bad:
            raise ValueError(f"only finished jobs can be retried, not {', '.join(sorted(bad))}")
        async with self._pool.acquire() as conn, conn.transaction():
            rows = await conn.fetch(
                self._sql["requeue_jobs"],
                list(which.statuses),
                which.reason,
                which.owner,
                which.table,
            )
            if rows:
                await conn.execute(self._sql["notify_jobs"])
        return [r["id"] for r in rows]

    async def cancel(self, which: JobFilter) -> list[int]:
        """See ``JobStore.cancel`` (``which.statuses`` is not used: every unfinished one).

        Every row inserted before the call is admitted first (all of them, one statement),
        so a row still waiting for its job is cancelled too, not analyzed later.
        """
        await self._pool.fetchval(self._sql["admit_inserted_rows"], ADMIT_ALL, 0)
        rows = await self._pool.fetch(
            self._sql["cancel_jobs"], which.reason, which.owner, which.table
        )
        return [r["id"] for r in rows]

    async def reanalyze(self, source_table: str, source_ids: Sequence[str], priority: int) -> int:
        """See ``JobStore.reanalyze``: ``listener.reanalyze``, which apps call too."""
        return int(
            await self._pool.fetchval(
                self._sql["reanalyze"], source_table, list(source_ids), priority
            )
        )

    async def wake_held(self, held_by: str) -> int:
        """See ``JobStore.wake_held``; wakes the daemons when a job changed."""
        async with self._pool.acquire() as conn, conn.transaction():
            rows = await conn.fetch(self._sql["wake_held_jobs"], held_by)
            if rows:
                await conn.execute(self._sql["notify_jobs"])
        return len(rows)

    async def prune(self, before: datetime, limit: int, *, dry_run: bool = False) -> int:
        """See ``JobStore.prune``: ``listener.prune_jobs`` (one short statement)."""
        return int(await self._pool.fetchval(self._sql["prune_jobs"], before, limit, dry_run))

    async def forget_rows(self, rows: Sequence[DeletedRow]) -> list[ForgottenRow]:
        """See ``JobStore.forget_rows``: ``listener.forget_rows``, one statement."""
        if not rows:
            return []
        records = await self._pool.fetch(
            self._sql["forget_rows"],
            [r.source_table for r in rows],
            [r.source_id for r in rows],
            [r.job_id for r in rows],
            [r.reinserted for r in rows],
        )
        out: list[ForgottenRow] = []
        for rec in records:
            row = rows[rec["ord"] - 1]
            faces = tuple(
                FaceRef(f["collection_id"], f["face_id"]) for f in json.loads(rec["faces"])
            )
            out.append(
                ForgottenRow(
                    row=row,
                    running_s=rec["running_s"],
                    faces=faces,
                    sweep=rec["sweep"],
                    owner_id=rec["owner_id"],
                    restarted=rec["restarted"],
                )
            )
        return out

    async def forget_faces(self, face_ids: Sequence[str]) -> int:
        """See ``JobStore.forget_faces``: ``listener.forget_faces``."""
        if not face_ids:
            return 0
        return int(await self._pool.fetchval(self._sql["forget_faces"], list(face_ids)))

    async def snapshot(self, job_id: int) -> JobSnapshot | None:
        """See ``JobStore.snapshot``."""
        r = await self._pool.fetchrow(self._sql["job_snapshot"], job_id)
        if r is None:
            return None
        return JobSnapshot(
            id=r["id"],
            status=r["status"],
            attempts=r["attempts"],
            max_attempts=r["max_attempts"],
            last_error=r["last_error"],
            claims=r["claims"],
            leased=r["leased"],
            run_after_s=float(r["run_after_s"]),
            steps=json.loads(r["steps"]),
        )

    async def take_for_batch(self, step: str, limit: int, batch_id: str) -> list[BatchJob]:
        """See ``JobStore.take_for_batch``; the batch's provider is the step's prefix."""
        rows = await self._pool.fetch(
            self._sql["take_for_batch"], step, limit, batch_id, step.split(".", 1)[0]
        )
        return [
            BatchJob(
                id=r["id"],
                source_table=r["source_table"],
                source_id=r["source_id"],
                image_url=r["image_url"],
                owner_id=r["owner_id"],
                outputs=json.loads(r["outputs"]),
            )
            for r in rows
        ]

    async def keep_preparing(self, batch_id: str) -> bool:
        """See ``JobStore.keep_preparing``."""
        return bool(await self._pool.fetchval(self._sql["keep_preparing"], batch_id))

    async def record_batch_file(
        self, batch_id: str, file_id: str, requests: Mapping[str, int]
    ) -> bool:
        """See ``JobStore.record_batch_file``."""
        return bool(
            await self._pool.fetchval(
                self._sql["record_batch_file"],
                batch_id,
                file_id,
                list(requests),
                list(requests.values()),
            )
        )

    async def batch_to_per_image(self, batch_id: str, errors: Mapping[int, str]) -> set[int]:
        """See ``JobStore.batch_to_per_image``; wakes the daemons when a job changed."""
        if not errors:
            return set()
        async with self._pool.acquire() as conn, conn.transaction():
            rows = await conn.fetch(
                self._sql["batch_to_per_image"],
                batch_id,
                list(errors),
                [text[:1000] for text in errors.values()],
            )
            if rows:
                await conn.execute(self._sql["notify_jobs"])
        return {r["id"] for r in rows}

    async def return_to_wait(self, batch_id: str, job_ids: Sequence[int]) -> set[int]:
        """See ``JobStore.return_to_wait``."""
        if not job_ids:
            return set()
        rows = await self._pool.fetch(self._sql["return_to_wait"], batch_id, list(job_ids))
        return {r["id"] for r in rows}

    async def sweep_abandoned_batches(self, idle_s: float) -> list[int]:
        """See ``JobStore.sweep_abandoned_batches``."""
        rows = await self._pool.fetch(self._sql["sweep_abandoned_batches"], idle_s)
        return sorted(r["id"] for r in rows)

    async def jobs_in_batch(self, batch_id: str) -> int:
        """See ``JobStore.jobs_in_batch``."""
        return int(await self._pool.fetchval(self._sql["jobs_in_batch"], batch_id))

    async def apply_batch_result(
        self,
        batch_id: str,
        step: str,
        results: Mapping[int, StepRecord],
        failures: Mapping[int, str],
    ) -> set[int] | None:
        """See ``JobStore.apply_batch_result``: one statement, then a wake-up of the daemons
        in the same transaction.

        Raises:
            ValueError: a result carries effects, or is of another step.
        """
        columns: list[list[Any]] = [[] for _ in range(8)]
        for job_id, r in results.items():
            if r.effects:
                raise ValueError(f"batch result of job {job_id} has effects")
            if r.step != step:
                raise ValueError(f"batch result of job {job_id} is of step {r.step}, not {step}")
            values = (
                job_id,
                r.provider,
                json.dumps(r.output),
                r.model,
                r.input_tokens,
                r.output_tokens,
                r.calls,
                usd(r.cost_usd),
            )
            for column, value in zip(columns, values, strict=True):
                column.append(value)
        async with self._pool.acquire() as conn, conn.transaction():
            rows = await conn.fetch(
                self._sql["apply_batch_result"],
                batch_id,
                step,
                *columns,
                list(failures),
                [text[:1000] for text in failures.values()],
            )
            if not rows:
                return None
            if rows[0]["released"]:
                await conn.execute(self._sql["notify_jobs"])
        return {r["job_id"] for r in rows if r["job_id"] is not None}
