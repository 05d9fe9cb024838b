"""Provider batches (OpenAI's Batch API): the jobs a batch holds and its bookkeeping.

A job whose next step waits for a batch is parked by the job store (``JobStore.park``:
``batched``, no lease). From then on every write about it is made here, fenced by ``(id,
batch id, status 'batched')`` and the batch's step instead of a lease, until it goes back to
pending (``apply_batch_result``, ``batch_to_per_image``) or waits again::

    batched (waiting) --take_for_batch--> batched in batch B --apply_batch_result--> pending
                       <--return_to_wait / sweep_abandoned_batches--|
                          batched in batch B --batch_to_per_image--> pending (batch mode off)

A job cancelled, or reset by a new URL, while its batch runs leaves the batch, and so gets
nothing from it. ``PgBatchStore`` runs over ``sql/queries.sql``; ``MemoryBatchStore`` works on
a ``MemoryJobStore``'s rows; both pass ``tests/conformance/test_batch_store.py``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import asyncpg

from listener.db.queries import load_queries
from listener.queue.memory_store import MemoryJobStore, MemoryRow
from listener.queue.outcomes import StepRecord
from listener.queue.pg_store import usd


@dataclass(frozen=True, slots=True)
class BatchJob:
    """A job taken into a provider batch (``BatchStore.take_for_batch``): what its request
    needs.

    It holds no lease: every later write about it is fenced by ``(id, batch id, status
    'batched')`` instead.

    Attributes:
        id, source_table, source_id, image_url, owner_id: as in
            ``listener.queue.outcomes.Job``.
        outputs: the job's stored step outputs by step name (earlier tiers), which the
            request's prompt builds on.
    """

    id: int
    source_table: str
    source_id: str
    image_url: str | None
    owner_id: str | None
    outputs: Mapping[str, Mapping[str, Any]]


class BatchStore(Protocol):
    """The jobs of provider batches, every write fenced by the batch. See the module
    docstring."""

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


class PgBatchStore:
    """The batch store on Postgres.

    Args:
        pool: an ``asyncpg.Pool`` (each call takes one connection).
    """

    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool
        self._sql = {name: q.sql for name, q in load_queries().items()}

    async def take_for_batch(self, step: str, limit: int, batch_id: str) -> list[BatchJob]:
        """See ``BatchStore.take_for_batch``; the batch's provider is the step's prefix."""
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
        """See ``BatchStore.keep_preparing``."""
        return bool(await self._pool.fetchval(self._sql["keep_preparing"], batch_id))

    async def record_batch_file(
        self, batch_id: str, file_id: str, requests: Mapping[str, int]
    ) -> bool:
        """See ``BatchStore.record_batch_file``."""
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
        """See ``BatchStore.batch_to_per_image``; wakes the daemons when a job changed."""
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
        """See ``BatchStore.return_to_wait``."""
        if not job_ids:
            return set()
        rows = await self._pool.fetch(self._sql["return_to_wait"], batch_id, list(job_ids))
        return {r["id"] for r in rows}

    async def sweep_abandoned_batches(self, idle_s: float) -> list[int]:
        """See ``BatchStore.sweep_abandoned_batches``."""
        rows = await self._pool.fetch(self._sql["sweep_abandoned_batches"], idle_s)
        return sorted(r["id"] for r in rows)

    async def jobs_in_batch(self, batch_id: str) -> int:
        """See ``BatchStore.jobs_in_batch``."""
        return int(await self._pool.fetchval(self._sql["jobs_in_batch"], batch_id))

    async def apply_batch_result(
        self,
        batch_id: str,
        step: str,
        results: Mapping[int, StepRecord],
        failures: Mapping[int, str],
    ) -> set[int] | None:
        """See ``BatchStore.apply_batch_result``: one statement, then a wake-up of the daemons
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


@dataclass(slots=True)
class _Batch:
    step: str
    touched_at: float  # the preparation's heartbeat
    status: str = "preparing"
    file_id: str | None = None
    requests: dict[str, int] = field(default_factory=dict)
    applied: bool = False


class MemoryBatchStore:
    """The batch store over a ``MemoryJobStore``'s jobs (its clock, its rows).

    Args:
        jobs: the job store whose parked jobs the batches take.
    """

    def __init__(self, jobs: MemoryJobStore) -> None:
        self._jobs = jobs
        self._batches: dict[str, _Batch] = {}

    def _in_batch(self, batch_id: str, job_id: int) -> MemoryRow | None:
        """The job's row when it is still in ``batch_id`` (the batch fence)."""
        r = self._jobs.rows.get(job_id)
        if r is None or r.status != "batched" or r.batch_id != batch_id:
            return None
        return r

    async def take_for_batch(self, step: str, limit: int, batch_id: str) -> list[BatchJob]:
        """See ``BatchStore.take_for_batch``."""
        waiting = sorted(
            (
                r
                for r in self._jobs.rows.values()
                if r.status == "batched" and r.batch_id is None and r.batch_step == step
            ),
            key=lambda r: (r.priority, r.parked_at, r.id),
        )[: max(limit, 0)]
        if not waiting:
            return []
        self._batches[batch_id] = _Batch(step, self._jobs.now())
        for r in waiting:
            r.batch_id = batch_id
        return [
            BatchJob(
                r.id,
                r.source_table,
                r.source_id,
                r.image_url,
                r.owner_id,
                {k: dict(v["output"]) for k, v in r.results.items()},
            )
            for r in sorted(waiting, key=lambda r: r.id)
        ]

    def _preparing(self, batch_id: str) -> _Batch | None:
        b = self._batches.get(batch_id)
        return b if b is not None and b.status == "preparing" and not b.applied else None

    async def keep_preparing(self, batch_id: str) -> bool:
        """See ``BatchStore.keep_preparing``."""
        b = self._preparing(batch_id)
        if b is None:
            return False
        b.touched_at = self._jobs.now()
        return True

    async def record_batch_file(
        self, batch_id: str, file_id: str, requests: Mapping[str, int]
    ) -> bool:
        """See ``BatchStore.record_batch_file``."""
        b = self._preparing(batch_id)
        if b is None:
            return False
        b.status, b.file_id, b.touched_at = "submitting", file_id, self._jobs.now()
        b.requests = {c: j for c, j in requests.items() if j in self._jobs.rows}
        return True

    async def batch_to_per_image(self, batch_id: str, errors: Mapping[int, str]) -> set[int]:
        """See ``BatchStore.batch_to_per_image``."""
        ids: set[int] = set()
        for job_id, reason in errors.items():
            r = self._in_batch(batch_id, job_id)
            if r is not None:
                r.status, r.batch_id, r.batch_step, r.batch_mode = "pending", None, None, False
                r.run_after, r.last_error = self._jobs.now(), reason[:1000]
                ids.add(r.id)
        return ids

    async def return_to_wait(self, batch_id: str, job_ids: Sequence[int]) -> set[int]:
        """See ``BatchStore.return_to_wait``."""
        ids: set[int] = set()
        for job_id in job_ids:
            r = self._in_batch(batch_id, job_id)
            if r is not None:
                r.batch_id = None
                ids.add(r.id)
        return ids

    async def sweep_abandoned_batches(self, idle_s: float) -> list[int]:
        """See ``BatchStore.sweep_abandoned_batches``."""
        now = self._jobs.now()
        stale = {
            batch_id
            for batch_id, b in self._batches.items()
            if b.status == "preparing" and not b.applied and now - b.touched_at > idle_s
        }
        for batch_id in stale:
            self._batches[batch_id].status = "abandoned"
            self._batches[batch_id].applied = True
        ids: list[int] = []
        for r in self._jobs.rows.values():
            if r.status == "batched" and r.batch_id in stale:
                r.batch_id = None
                ids.append(r.id)
        return sorted(ids)

    async def jobs_in_batch(self, batch_id: str) -> int:
        """See ``BatchStore.jobs_in_batch``."""
        return sum(
            1 for r in self._jobs.rows.values() if r.status == "batched" and r.batch_id == batch_id
        )

    async def apply_batch_result(
        self,
        batch_id: str,
        step: str,
        results: Mapping[int, StepRecord],
        failures: Mapping[int, str],
    ) -> set[int] | None:
        """See ``BatchStore.apply_batch_result``.

        Raises:
            ValueError: a result carries effects, or is of another step.
        """
        for job_id, given in results.items():
            if given.effects:
                raise ValueError(f"batch result of job {job_id} has effects")
            if given.step != step:
                raise ValueError(
                    f"batch result of job {job_id} is of step {given.step}, not {step}"
                )
        b = self._batches.get(batch_id)
        if b is None or b.applied or b.step != step:
            return None
        stored: set[int] = set()
        for r in self._jobs.rows.values():
            if r.status != "batched" or r.batch_id != batch_id or r.batch_step != step:
                continue
            rec = results.get(r.id)
            if rec is not None:
                # A batch result replaces an earlier one of the step (as PgBatchStore's upsert).
                r.results[step] = {
                    "provider": rec.provider,
                    "output": dict(rec.output),
                    "model": rec.model,
                    "input_tokens": rec.input_tokens,
                    "output_tokens": rec.output_tokens,
                    "calls": rec.calls,
                    "cost_usd": rec.cost_usd,
                    # As PgJobStore: batch results keep no digest (not reused).
                    "digest": None,
                    "reused": None,
                }
                stored.add(r.id)
            r.status, r.batch_id, r.batch_step, r.run_after = (
                "pending",
                None,
                None,
                self._jobs.now(),
            )
            if r.id in failures:
                r.batch_mode, r.last_error = False, failures[r.id][:1000]
        b.applied = True
        return stored
