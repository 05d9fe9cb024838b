"""``MemoryJobStore``: the ``JobStore`` in memory, with an injected clock.

It passes the same conformance suite as ``PgJobStore`` (``tests/conformance``), so the worker's
prefetch, lease cap, drain and retry decisions are unit-tested on it with a fake clock, in
milliseconds. One asyncio loop only; every method completes without awaiting, so each is
atomic like the SQL statement it stands for.

The app's tables are stood in for by ``insert_row`` and ``delete_row``: an inserted row waits
for admission (as an entry of ``listener.inserted_rows`` does) and is admitted by ``admit`` or
by a claim with ``admit``, as in Postgres (0019, 0021); a deleted row lets ``prune`` take its
job. The analysis side's in-memory stores (batches, reuse, records of effects) work on this
store's rows (``rows``), as their Postgres twins work on the same tables.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any
from uuid import UUID

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
from listener.queue.pauses import BUDGET
from listener.queue.store import (
    DeletedRow,
    ForgottenRow,
    JobFilter,
    JobSnapshot,
)

_FINISHED = ("failed", "cancelled", "complete")

ADMIT_BATCH = 1_000
"""Rows admitted by one admission at most, as ``listener.queue.pg_store.ADMIT_BATCH``."""


@dataclass(slots=True)
class MemoryRow:
    """One job as this store keeps it (a row of ``listener.jobs`` and its results), for the
    analysis side's in-memory stores; fields as the columns of ``listener.jobs``."""

    id: int
    source_table: str
    source_id: str
    image_url: str | None
    owner_id: str | None
    priority: int
    max_attempts: int | None
    run_after: float
    status: str = "pending"
    attempts: int = 0
    claims: int = 0
    lease_token: UUID | None = None
    lease_expires_at: float | None = None
    worker_id: str | None = None
    last_error: str | None = None
    batch_mode: bool | None = None
    batch_step: str | None = None
    batch_id: str | None = None
    parked_at: float = 0.0  # when it started waiting for a batch (the take order)
    held_by: str | None = None
    finished_at: float | None = None
    results: dict[str, dict[str, Any]] = field(default_factory=dict)
    effects: dict[str, dict[str, Any]] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class _Entry:
    """A row the app inserted, waiting for admission (``listener.inserted_rows``)."""

    id: int
    source_table: str
    source_id: str


class MemoryJobStore:
    """The job store in a dict.

    Args:
        clock: seconds, monotonic (a fake clock in tests).
        default_max_attempts: as ``PgJobStore``'s.
        effects: the effect kinds a step may carry, by name (the analysis side's, given by
            the wiring); a step with any other is refused.
    """

    def __init__(
        self,
        clock: Callable[[], float],
        default_max_attempts: int = 5,
        *,
        effects: Mapping[str, EffectKind] | None = None,
    ) -> None:
        self._clock = clock
        self._default_max_attempts = default_max_attempts
        self._effects = dict(effects or {})
        self._rows: dict[int, MemoryRow] = {}
        self._keys: dict[tuple[str, str], int] = {}
        self._ids = itertools.count(1)
        # The app's rows (source table, id) -> (URL, owner), and those waiting for admission.
        self._app_rows: dict[tuple[str, str], tuple[str | None, str | None]] = {}
        self._entries: list[_Entry] = []
        self.reinserted: list[DeletedRow] = []
        """Rows inserted again while an older job held their key, queued for the drain of
        deleted rows (Postgres: ``listener.deleted_rows`` entries with ``reinserted``)."""
        # External records of effects whose job was deleted since, by source row.
        self._leftovers: dict[tuple[str, str], dict[str, Leftover]] = {}
        # Operator pauses in force: provider -> end (clock seconds) or None (until resumed).
        self._pauses: dict[str, float | None] = {}
        self.dedup_saved: list[tuple[str, float]] = []
        """Every copy stored (``StepRecord.reused``): (provider, USD not paid)."""

    @property
    def rows(self) -> dict[int, MemoryRow]:
        """The jobs by id, for the analysis side's in-memory stores (which change them only
        as their Postgres twins change ``listener.jobs``)."""
        return self._rows

    def now(self) -> float:
        """This store's clock, seconds."""
        return self._clock()

    def insert_row(
        self, source_table: str, source_id: str, image_url: str | None, owner_id: str | None
    ) -> None:
        """The app inserted (or updated) a row of an attached table: it waits for admission.

        As the insert trigger (0019): the row's current values are read at admission, not now.
        """
        self._app_rows[(source_table, source_id)] = (image_url, owner_id)
        self._entries.append(_Entry(next(self._ids), source_table, source_id))

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
        if (source_table, source_id) in self._keys:
            return None
        row = MemoryRow(
            next(self._ids),
            source_table,
            source_id,
            image_url,
            owner_id,
            priority,
            max_attempts,
            self._clock(),
        )
        self._add(row)
        return row.id

    def _add(self, row: MemoryRow) -> None:
        self._rows[row.id] = row
        self._keys[(row.source_table, row.source_id)] = row.id

    def _admit(self, limit: int, room: int, worker_id: str, lease_s: float, token: UUID) -> int:
        """Admit up to ``limit`` waiting rows, oldest first, the first ``room`` of their jobs
        claimed at once (as ``listener.admit_entries``); returns the entries taken.

        Of several entries of one key, the newest; a row gone gets no job; a key held by a
        job made after the entry needs nothing (it reflects the row), one held by an older
        job (the row was deleted and inserted again) is queued as reinserted.
        """
        taken, self._entries = self._entries[: max(limit, 0)], self._entries[max(limit, 0) :]
        newest: dict[tuple[str, str], _Entry] = {}
        for e in taken:
            newest[(e.source_table, e.source_id)] = e
        claimed = 0
        for key, e in sorted(newest.items(), key=lambda kv: kv[1].id):
            values = self._app_rows.get(key)
            if values is None:
                continue
            holder = self._keys.get(key)
            if holder is not None:
                if holder < e.id:
                    self.reinserted.append(DeletedRow(key[0], key[1], holder, True))
                continue
            row = MemoryRow(e.id, key[0], key[1], values[0], values[1], 0, None, self._clock())
            if claimed < room:
                self._take(row, worker_id, lease_s, token)
                claimed += 1
            self._add(row)
        return len(taken)

    async def admit(self, claiming: int = 0) -> int:
        """See ``JobStore.admit``: up to ``ADMIT_BATCH`` rows (there are no other workers to
        wake here)."""
        return self._admit(ADMIT_BATCH, 0, "", 0.0, UUID(int=0))

    def _take(self, r: MemoryRow, worker_id: str, lease_s: float, token: UUID) -> None:
        r.status = "processing"
        r.attempts += 1
        r.claims += 1
        if r.max_attempts is None:
            r.max_attempts = self._default_max_attempts
        r.worker_id = worker_id
        r.lease_token = token
        r.lease_expires_at = self._clock() + lease_s

    def _ready(self, limit: int, low: int, high: int) -> list[MemoryRow]:
        now = self._clock()
        return sorted(
            (
                r
                for r in self._rows.values()
                if r.status == "pending" and r.run_after <= now and low <= r.priority <= high
            ),
            key=lambda r: (r.priority, r.run_after, r.id),
        )[: max(limit, 0)]

    async def claim(
        self, limit: int, worker_id: str, lease_s: float, token: UUID, *, admit: bool = False
    ) -> list[Job]:
        """See ``JobStore.claim``: pending jobs of priority 0 or less, then (with ``admit``)
        waiting rows admitted into the room left, then higher priority numbers (0021)."""
        taken = self._ready(limit, -(2**31), 0)
        for r in taken:
            self._take(r, worker_id, lease_s, token)
        room = limit - len(taken)
        if admit and room > 0:
            before = set(self._rows)
            self._admit(min(ADMIT_BATCH, room), room, worker_id, lease_s, token)
            taken += sorted(
                (r for i, r in self._rows.items() if i not in before and r.status == "processing"),
                key=lambda r: r.id,
            )
        rest = self._ready(limit - len(taken), 1, 2**31 - 1)
        for r in rest:
            self._take(r, worker_id, lease_s, token)
        return [self._job(r) for r in taken + rest]

    @staticmethod
    def _job(r: MemoryRow) -> Job:
        assert r.lease_token is not None and r.max_attempts is not None
        return Job(
            r.id,
            r.source_table,
            r.source_id,
            r.image_url,
            r.owner_id,
            r.priority,
            r.attempts,
            r.max_attempts,
            r.lease_token,
            batch_mode=r.batch_mode,
            done_steps=tuple(r.results),
            claims=r.claims,
        )

    def _held(self, job: Job) -> MemoryRow | None:
        """The job's row when ``job``'s lease still holds (the fence)."""
        r = self._rows.get(job.id)
        if r is None or r.status != "processing" or r.lease_token != job.lease_token:
            return None
        return r

    def _end_lease(self, r: MemoryRow) -> None:
        r.lease_token = None
        r.lease_expires_at = None

    async def renew(self, jobs: Sequence[Job], lease_s: float) -> set[int]:
        """See ``JobStore.renew``."""
        kept: set[int] = set()
        for job in jobs:
            r = self._held(job)
            if r is not None:
                r.lease_expires_at = self._clock() + lease_s
                kept.add(r.id)
        return kept

    def store_result(self, r: MemoryRow, rec: StepRecord) -> None:
        """Store one step's result on ``r`` (a second one of the step adds its costs)."""
        old = r.results.get(rec.step)
        stored: dict[str, Any] = {
            "provider": rec.provider,
            "output": dict(rec.output),
            "model": rec.model,
            "input_tokens": rec.input_tokens,
            "output_tokens": rec.output_tokens,
            "calls": rec.calls,
            "cost_usd": rec.cost_usd,
            "digest": rec.digest,
            "reused": rec.reused,
        }
        if old is not None:  # stored twice: costs add up, as in PgJobStore
            for key in ("input_tokens", "output_tokens", "calls", "cost_usd"):
                stored[key] = (old[key] or 0) + (stored[key] or 0)
        r.results[rec.step] = stored
        if rec.reused is not None:
            self.dedup_saved.append((rec.provider, rec.reused.saved_usd))

    async def save_step(self, job: Job, record: StepRecord) -> bool:
        """See ``JobStore.save_step``.

        Effects are kept as given, by step (``effects``); nothing interprets them here.

        Raises:
            ValueError: ``record.effects`` names an effect kind this store was not given, or
                its kind refuses the payload.
        """
        check_effects(record, self._effects)
        r = self._held(job)
        if r is None:
            return False
        self.store_result(r, record)
        if record.effects:
            r.effects[record.step] = dict(record.effects)
        return True

    def effects(self, job_id: int) -> dict[str, dict[str, Any]]:
        """The effects stored with a job's steps: ``{step: {effect name: data}}``."""
        r = self._rows.get(job_id)
        return {} if r is None else {k: dict(v) for k, v in r.effects.items()}

    async def outputs(self, job_id: int) -> dict[str, dict[str, Any]]:
        """See ``JobStore.outputs``."""
        r = self._rows.get(job_id)
        return {} if r is None else {k: dict(v["output"]) for k, v in r.results.items()}

    async def complete(self, done: Sequence[Completed]) -> set[int]:
        """See ``JobStore.complete``.

        Raises:
            ValueError: a result carries effects or is a copy (as ``PgJobStore.complete``).
        """
        for c in done:
            for rec in c.results:
                if rec.effects:
                    raise ValueError(f"step {rec.step} has effects: store it with save_step")
                if rec.reused is not None:
                    raise ValueError(f"step {rec.step} is a copy: store it with save_step")
        ids: set[int] = set()
        for c in done:
            r = self._held(c.job)
            if r is None:
                continue
            for rec in c.results:
                self.store_result(r, rec)
            r.status = "complete"
            r.finished_at = self._clock()
            r.last_error = None
            self._end_lease(r)
            ids.add(r.id)
        return ids

    def _back_to_pending(
        self, job: Job, error: str, delay_s: float, give_back: bool, held_by: str | None = None
    ) -> bool:
        r = self._held(job)
        if r is None:
            return False
        r.status = "pending"
        r.run_after = self._clock() + delay_s
        r.last_error = error
        r.held_by = held_by
        if give_back:
            r.attempts = max(r.attempts - 1, 0)
        self._end_lease(r)
        return True

    async def retry(self, failures: Sequence[Retry]) -> set[int]:
        """See ``JobStore.retry``."""
        return {
            f.job.id for f in failures if self._back_to_pending(f.job, f.error, f.delay_s, False)
        }

    async def snooze(self, snoozed: Sequence[Snoozed]) -> set[int]:
        """See ``JobStore.snooze``."""
        return {
            f.job.id
            for f in snoozed
            if (
                self._back_to_pending(f.job, f.error, f.delay_s, True, f.held_by)
                if self._holds(f.held_by)
                else self._back_to_pending(f.job, f.error, 0.0, True)
            )
        }

    async def pause(self, provider: str, reason: str | None, until: datetime | None) -> None:
        """See ``JobStore.pause``: ``until`` (wall-clock time) is taken as that many seconds
        from now on this store's clock."""
        end = None if until is None else (until - datetime.now(UTC)).total_seconds()
        self._pauses[provider] = None if end is None else self._clock() + end

    async def resume(self, held_by: str) -> tuple[bool, int]:
        """See ``JobStore.resume``."""
        lifted = held_by in self._pauses
        self._pauses.pop(held_by, None)
        n = 0
        for r in self._rows.values():
            if r.status == "pending" and r.held_by == held_by:
                r.run_after, r.held_by = self._clock(), None
                n += 1
        return lifted, n

    def _holds(self, held_by: str | None) -> bool:
        """Whether a snooze held by ``held_by`` holds (see ``JobStore.snooze``)."""
        if held_by is None or held_by == BUDGET:
            return True
        if held_by not in self._pauses:
            return False
        until = self._pauses[held_by]
        return until is None or until > self._clock()

    def delete_row(self, source_table: str, source_id: str) -> None:
        """The app deleted this source row: no job is admitted for it any more, and ``prune``
        may take its job (as Postgres reads the attached table)."""
        self._app_rows.pop((source_table, source_id), None)

    async def prune(self, before: datetime, limit: int, *, dry_run: bool = False) -> int:
        """See ``JobStore.prune``: ``before`` is wall-clock time, compared with
        ``finished_at`` on this store's clock taken as seconds since the epoch."""
        cutoff = before.timestamp()
        doomed = sorted(
            (
                r
                for r in self._rows.values()
                if r.status in _FINISHED
                and r.finished_at is not None
                and r.finished_at < cutoff
                and (r.source_table, r.source_id) not in self._app_rows
            ),
            key=lambda r: (r.finished_at or 0.0, r.id),
        )
        if dry_run:
            return len(doomed)
        for r in doomed[:limit]:
            self._drop(r)
        return min(len(doomed), limit)

    def _drop(self, r: MemoryRow) -> None:
        """Delete a job; the external records of its effects stay, without a job (as the
        records' ON DELETE SET NULL in Postgres)."""
        del self._rows[r.id]
        if self._keys.get((r.source_table, r.source_id)) == r.id:
            del self._keys[(r.source_table, r.source_id)]
        left = self._leftovers.setdefault((r.source_table, r.source_id), {})
        for effects in r.effects.values():
            for name, payload in effects.items():
                for leftover in self._effects[name].leftovers(payload):
                    left[leftover.ref_id] = leftover

    def forget_leftovers(self, ref_ids: Sequence[str]) -> int:
        """The records ``ref_ids`` of deleted rows' effects are gone at their service:
        forget them (the analysis side's in-memory ``FaceStore``). A record whose job still
        exists is kept.

        Returns:
            The records forgotten.
        """
        wanted = set(ref_ids)
        n = 0
        for left in self._leftovers.values():
            for ref_id in wanted & set(left):
                del left[ref_id]
                n += 1
        return n

    async def forget_rows(self, rows: Sequence[DeletedRow]) -> list[ForgottenRow]:
        """See ``JobStore.forget_rows``."""
        now = self._clock()
        out: list[ForgottenRow] = []
        for row in rows:
            key = (row.source_table, row.source_id)
            r = self._rows.get(row.job_id) if row.job_id is not None else None
            if r is not None and (r.source_table, r.source_id) != key:
                r = None
            if (
                r is not None
                and r.status == "processing"
                and r.lease_expires_at is not None
                and r.lease_expires_at > now
            ):
                running_s = r.lease_expires_at - now
                r.status, r.last_error, r.finished_at = "cancelled", "source row deleted", now
                self._end_lease(r)
                out.append(ForgottenRow(row, running_s=running_s))
                continue
            sweep, owner, restarted = False, None, None
            if r is not None:
                sweep, owner = r.claims > 0 and r.status != "complete", r.owner_id
                self._drop(r)
            leftovers = tuple(sorted(self._leftovers.get(key, {}).values(), key=lambda x: x.ref_id))
            if row.reinserted and key in self._app_rows:
                url, owner_id = self._app_rows[key]
                restarted = await self.enqueue(row.source_table, row.source_id, url, owner_id)
            elif row.reinserted and r is not None:
                restarted = await self.enqueue(row.source_table, row.source_id, r.image_url, owner)
            out.append(ForgottenRow(row, None, leftovers, sweep, owner, restarted))
        return out

    async def discard(self, failures: Sequence[Discarded]) -> set[int]:
        """See ``JobStore.discard``."""
        ids: set[int] = set()
        for f in failures:
            r = self._held(f.job)
            if r is not None:
                r.status = "failed"
                r.finished_at = self._clock()
                r.last_error = f.error
                self._end_lease(r)
                ids.add(r.id)
        return ids

    async def park(self, parked: Sequence[Parked]) -> set[int]:
        """See ``JobStore.park``."""
        ids: set[int] = set()
        for p in parked:
            r = self._held(p.job)
            if r is not None:
                r.status = "batched"
                r.batch_step = p.step
                r.batch_id = None
                r.parked_at = self._clock()
                r.attempts = max(r.attempts - 1, 0)
                self._end_lease(r)
                ids.add(r.id)
        return ids

    async def release(self, jobs: Sequence[Job]) -> set[int]:
        """See ``JobStore.release``."""
        ids: set[int] = set()
        for job in jobs:
            r = self._held(job)
            if r is not None:
                r.status = "pending"
                r.attempts = max(r.attempts - 1, 0)
                r.run_after = self._clock()
                self._end_lease(r)
                ids.add(r.id)
        return ids

    async def reap(self, limit: int = 1000) -> dict[int, str]:
        """See ``JobStore.reap``."""
        now = self._clock()
        expired = sorted(
            (
                r
                for r in self._rows.values()
                if r.status == "processing"
                and r.lease_expires_at is not None
                and r.lease_expires_at < now
            ),
            key=lambda r: r.lease_expires_at or 0.0,
        )[:limit]
        out: dict[int, str] = {}
        for r in expired:
            spent = r.attempts >= (r.max_attempts or self._default_max_attempts)
            r.status = "failed" if spent else "pending"
            r.finished_at = self._clock() if spent else None
            r.last_error = (
                f"lease expired: worker {r.worker_id} stopped renewing it "
                f"(attempt {r.attempts} of {r.max_attempts})"
            )
            r.run_after = now
            self._end_lease(r)
            out[r.id] = r.status
        return out

    def _matches(self, r: MemoryRow, which: JobFilter, statuses: Sequence[str]) -> bool:
        return (
            r.status in statuses
            and (which.reason is None or which.reason.lower() in (r.last_error or "").lower())
            and (which.owner is None or r.owner_id == which.owner)
            and (which.table is None or r.source_table == which.table)
        )

    async def requeue(self, which: JobFilter) -> list[int]:
        """See ``JobStore.requeue``."""
        bad = set(which.statuses) - set(_FINISHED)
        if bad:
            raise ValueError(f"only finished jobs can be retried, not {', '.join(sorted(bad))}")
        ids: list[int] = []
        for r in self._rows.values():
            if self._matches(r, which, which.statuses):
                if r.status == "complete":
                    r.results.clear()
                r.status, r.attempts, r.run_after = "pending", 0, self._clock()
                r.last_error, r.batch_step, r.batch_id = None, None, None
                self._end_lease(r)
                ids.append(r.id)
        return ids

    async def cancel(self, which: JobFilter) -> list[int]:
        """See ``JobStore.cancel``: every row waiting for admission is admitted first."""
        while self._entries:
            self._admit(ADMIT_BATCH, 0, "", 0.0, UUID(int=0))
        ids: list[int] = []
        for r in self._rows.values():
            if self._matches(r, which, ("pending", "processing", "batched")):
                r.status, r.last_error = "cancelled", "cancelled by user"
                r.finished_at = self._clock()
                self._end_lease(r)
                ids.append(r.id)
        return ids

    async def reanalyze(self, source_table: str, source_ids: Sequence[str], priority: int) -> int:
        """See ``JobStore.reanalyze`` (existing jobs only: there are no app tables here).

        Raises:
            LookupError: no job of ``source_table`` exists (the table is not attached).
        """
        if not any(r.source_table == source_table for r in self._rows.values()):
            raise LookupError(f"table {source_table} is not attached")
        wanted = set(source_ids)
        n = 0
        for r in self._rows.values():
            if r.source_table == source_table and r.source_id in wanted:
                r.status, r.attempts, r.run_after = "pending", 0, self._clock()
                r.priority, r.last_error = priority, None
                r.batch_id, r.batch_step = None, None
                r.results.clear()
                r.effects.clear()
                self._end_lease(r)
                n += 1
        return n

    async def snapshot(self, job_id: int) -> JobSnapshot | None:
        """See ``JobStore.snapshot``."""
        r = self._rows.get(job_id)
        if r is None:
            return None
        steps: Mapping[str, Mapping[str, Any]] = {
            k: {"cost_usd": v["cost_usd"], "calls": v["calls"]}
            | ({} if v["reused"] is None else {"reused_from": v["reused"].origin_job_id})
            for k, v in r.results.items()
        }
        return JobSnapshot(
            id=r.id,
            status=r.status,
            attempts=r.attempts,
            max_attempts=r.max_attempts,
            last_error=r.last_error,
            claims=r.claims,
            leased=r.lease_token is not None,
            run_after_s=r.run_after - self._clock(),
            steps=steps,
        )
