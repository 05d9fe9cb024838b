"""``PgJobStore``: the ``JobStore`` over Postgres, one named query of ``sql/queries.sql`` per
state change. Batch operations (``executemany``-free: arrays through ``unnest``) keep group
commits to one statement per kind of outcome."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Any, Protocol
from uuid import UUID

import asyncpg

from listener.db.queries import load_queries
from listener.queue.outcomes import (
    Completed,
    Discarded,
    EffectKind,
    Job,
    Leftover,
    Parked,
    Retry,
    Snoozed,
    StepRecord,
    check_effects,
)
from listener.queue.store import (
    DeletedRow,
    ForgottenRow,
    JobFilter,
    JobSnapshot,
)

_FINISHED = ("failed", "cancelled", "complete")

ADMIT_BATCH = 1_000
"""Rows the app inserted admitted as jobs by one claim (into its room, 0021) or by one
admission outside a claim (0019), at most. One admission of 1,000 rows takes tens of
milliseconds."""
ADMIT_ALL = 2**31 - 1


@dataclass(frozen=True, slots=True)
class HeldJob:
    """A job locked while its lease holds, as an effect writer sees it (``lock_leased_job``).

    Attributes:
        id, source_table, source_id, owner_id: as in ``listener.jobs``.
    """

    id: int
    source_table: str
    source_id: str
    owner_id: str | None


class EffectWriter(EffectKind, Protocol):
    """An effect kind that writes its payload in Postgres (supplied by the wiring).

    ``write`` runs inside the transaction that stores the step, after the job's row was locked
    with its lease verified and before the result is stored: the effect and the step commit
    together or not at all, under the same lease fence as every other change of the job.
    """

    async def write(
        self,
        conn: asyncpg.Connection,
        job: HeldJob,
        payload: Any,
        output: dict[str, Any],
    ) -> dict[str, Any]:
        """Write the effect on ``conn``; returns the output to store (``output``, possibly
        added to)."""
        ...


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
        effects: the effect kinds a step may carry, by name, with their writers (the
            analysis side's, given by the wiring); a step with any other is refused.
    """

    def __init__(
        self,
        pool: asyncpg.Pool,
        default_max_attempts: int = 5,
        *,
        effects: Mapping[str, EffectWriter] | None = None,
    ) -> None:
        self._pool = pool
        self._sql = {name: q.sql for name, q in load_queries().items()}
        self._default_max_attempts = default_max_attempts
        self._effects = dict(effects or {})

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
        lease holds (``lock_leased_job``), each effect's writer writes it (and may add to the
        output), then the result is stored; a lost lease writes nothing.

        Raises:
            ValueError: ``record.effects`` names an effect this store was not given, or its
                kind refuses the payload.
        """
        check_effects(record, self._effects)
        if not record.effects:
            return bool(
                await self._pool.fetchval(self._sql["save_step"], *self._step_args(job, record))
            )
        async with self._pool.acquire() as conn, conn.transaction():
            held = await conn.fetchrow(self._sql["lock_leased_job"], job.id, job.lease_token)
            if held is None:
                return False
            target = HeldJob(held["id"], held["source_table"], held["source_id"], held["owner_id"])
            output = dict(record.output)
            for name, payload in record.effects.items():
                output = await self._effects[name].write(conn, target, payload, output)
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
            None if digest is None else digest.exact,
            None if digest is None else digest.near,
            None if reused is None else reused.origin_job_id,
            None if reused is None else reused.kind,
            None if reused is None else usd(reused.saved_usd),
        )

    async def outputs(self, job_id: int) -> dict[str, dict[str, Any]]:
        """See ``JobStore.outputs``."""
        rows = await self._pool.fetch(self._sql["job_outputs"], job_id)
        return {r["step"]: json.loads(r["output"]) for r in rows}

    async def complete(self, done: Sequence[Completed]) -> set[int]:
        """See ``JobStore.complete``. Of several completions of one job, only the newest
        claim's is written.

        Raises:
            ValueError: a result carries effects or is a copy (both are saved one by one
                with ``save_step``, which writes effects in the same transaction and counts
                a copy's savings).
        """
        if not done:
            return set()
        # One completion per job, its newest claim's: an older claim's lease cannot match, and
        # its results would collide with the newer ones in one INSERT (a batch that failed so
        # would stay buffered, and block every later flush).
        newest: dict[int, Completed] = {}
        for c in done:
            if c.job.id not in newest or c.job.claims > newest[c.job.id].job.claims:
                newest[c.job.id] = c
        done = list(newest.values())
        columns: list[list[Any]] = [[] for _ in range(12)]
        for c in done:
            for r in c.results:
                if r.effects:
                    raise ValueError(f"step {r.step} has effects: store it with save_step")
                if r.reused is not None:
                    raise ValueError(f"step {r.step} is a copy: store it with save_step")
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
                    None if r.digest is None else r.digest.exact,
                    None if r.digest is None else r.digest.near,
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

    async def pause(self, provider: str, reason: str | None, until: datetime | None) -> None:
        """See ``JobStore.pause``: the row of ``listener.pauses``, and a ``"pauses"``
        notification in the same transaction."""
        async with self._pool.acquire() as conn, conn.transaction():
            await conn.execute(self._sql["set_pause"], provider, reason, until)
            await conn.execute(self._sql["notify_pauses"])

    async def resume(self, held_by: str) -> tuple[bool, int]:
        """See ``JobStore.resume``: one read-committed transaction that deletes the pause's
        row (waiting for the snoozes that locked it to commit), then, in a snapshot taken
        after that, wakes the jobs held by it, and notifies ``"pauses"``."""
        async with (
            self._pool.acquire() as conn,
            conn.transaction(isolation="read_committed"),
        ):
            lifted = bool(await conn.fetchval(self._sql["delete_pause"], held_by))
            rows = await conn.fetch(self._sql["wake_held_jobs"], held_by)
            await conn.execute(self._sql["notify_pauses"])
        return lifted, len(rows)

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
            leftovers = tuple(
                Leftover(container, ref_id) for container, ref_id in json.loads(rec["leftovers"])
            )
            out.append(
                ForgottenRow(
                    row=row,
                    running_s=rec["running_s"],
                    leftovers=leftovers,
                    sweep=rec["sweep"],
                    owner_id=rec["owner_id"],
                    restarted=rec["restarted"],
                )
            )
        return out

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
