"""``MemoryJobStore``: the ``JobStore`` in memory, with an injected clock.

It passes the same conformance suite as ``PgJobStore`` (``tests/conformance``), so the worker's
prefetch, lease cap, drain and retry decisions are unit-tested on it with a fake clock, in
milliseconds. One asyncio loop only; every method completes without awaiting, so each is
atomic like the SQL statement it stands for.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any
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


@dataclass(slots=True)
class _Row:
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


@dataclass(slots=True)
class _Batch:
    step: str
    touched_at: float  # the preparation's heartbeat
    status: str = "preparing"
    file_id: str | None = None
    requests: dict[str, int] = field(default_factory=dict)
    applied: bool = False


class MemoryJobStore:
    """The job store in a dict.

    Args:
        clock: seconds, monotonic (a fake clock in tests).
        default_max_attempts: as ``PgJobStore``'s.
    """

    def __init__(self, clock: Callable[[], float], default_max_attempts: int = 5) -> None:
        self._clock = clock
        self._default_max_attempts = default_max_attempts
        self._rows: dict[int, _Row] = {}
        self._keys: set[tuple[str, str]] = set()
        self._ids = itertools.count(1)
        self._batches: dict[str, _Batch] = {}
        self._deleted_rows: set[tuple[str, str]] = set()
        # Faces of jobs deleted since (listener.faces rows with job_id NULL), by source row.
        self._orphan_faces: dict[tuple[str, str], dict[str, FaceRef]] = {}
        self.dedup_saved: list[tuple[str, float]] = []
        """Every copy stored (``StepRecord.reused``): (provider, USD not paid)."""

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
        self._keys.add((source_table, source_id))
        row = _Row(
            next(self._ids),
            source_table,
            source_id,
            image_url,
            owner_id,
            priority,
            max_attempts,
            self._clock(),
        )
        self._rows[row.id] = row
        return row.id

    async def admit(self, claiming: int = 0) -> int:
        """See ``JobStore.admit``: jobs here are only enqueued directly, nothing waits."""
        return 0

    async def claim(
        self, limit: int, worker_id: str, lease_s: float, token: UUID, *, admit: bool = False
    ) -> list[Job]:
        """See ``JobStore.claim`` (nothing waits for admission here)."""
        now = self._clock()
        ready = sorted(
            (r for r in self._rows.values() if r.status == "pending" and r.run_after <= now),
            key=lambda r: (r.priority, r.run_after, r.id),
        )[: max(limit, 0)]
        jobs: list[Job] = []
        for r in ready:
            r.status = "processing"
            r.attempts += 1
            r.claims += 1
            if r.max_attempts is None:
                r.max_attempts = self._default_max_attempts
            r.worker_id = worker_id
            r.lease_token = token
            r.lease_expires_at = now + lease_s
            jobs.append(
                Job(
                    r.id,
                    r.source_table,
                    r.source_id,
                    r.image_url,
                    r.owner_id,
                    r.priority,
                    r.attempts,
                    r.max_attempts,
                    token,
                    batch_mode=r.batch_mode,
                    done_steps=tuple(r.results),
                    claims=r.claims,
                )
            )
        return jobs

    def _held(self, job: Job) -> _Row | None:
        """The job's row when ``job``'s lease still holds (the fence)."""
        r = self._rows.get(job.id)
        if r is None or r.status != "processing" or r.lease_token != job.lease_token:
            return None
        return r

    def _end_lease(self, r: _Row) -> None:
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

    def _store(self, r: _Row, rec: StepRecord) -> None:
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

        Effects are kept as given, by step (``effects``): no faces, people or suggestions
        logic here.

        Raises:
            ValueError: ``record.effects`` names an effect no store knows.
        """
        check_effects(record)
        r = self._held(job)
        if r is None:
            return False
        self._store(r, record)
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

    async def find_reusable(
        self,
        job: Job,
        step: str,
        digest: InputDigest,
        scope: str,
        max_distance: int | None = None,
    ) -> Reusable | None:
        """See ``JobStore.find_reusable`` (every job is looked at: no candidate limit)."""
        if scope not in _SCOPES:
            raise ValueError(f"dedup scope is one of {', '.join(_SCOPES)}, not {scope!r}")
        candidates: list[tuple[_Row, dict[str, Any], InputDigest]] = []
        for r in self._rows.values():
            stored = r.results.get(step)
            if r.id == job.id or stored is None or stored["digest"] is None:
                continue
            if scope != "global" and (
                r.source_table != job.source_table
                or (scope == "owner" and r.owner_id != job.owner_id)
            ):
                continue
            candidates.append((r, stored, stored["digest"]))
        for r, stored, d in candidates:
            if d.sha256 == digest.sha256:
                return self._reusable(r, stored, "sha256", 0)
        if max_distance is None or digest.phash is None:
            return None
        best: tuple[int, _Row, dict[str, Any]] | None = None
        for r, stored, d in candidates:
            if d.phash is None:
                continue
            distance = ((d.phash ^ digest.phash) & ((1 << 64) - 1)).bit_count()
            if distance <= max_distance and (best is None or distance < best[0]):
                best = (distance, r, stored)
        return None if best is None else self._reusable(best[1], best[2], "phash", best[0])

    @staticmethod
    def _reusable(r: _Row, stored: dict[str, Any], kind: str, distance: int) -> Reusable:
        reused = stored["reused"]
        return Reusable(
            provider=stored["provider"],
            output=dict(stored["output"]),
            model=stored["model"],
            origin_job_id=r.id if reused is None else reused.origin_job_id,
            saved_usd=stored["cost_usd"] if reused is None else reused.saved_usd,
            kind=kind,
            distance=distance,
        )

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
                check_effects(rec)
        ids: set[int] = set()
        for c in done:
            r = self._held(c.job)
            if r is None:
                continue
            for rec in c.results:
                self._store(r, rec)
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
            if self._back_to_pending(f.job, f.error, f.delay_s, True, f.held_by)
        }

    async def wake_held(self, held_by: str) -> int:
        """See ``JobStore.wake_held``."""
        n = 0
        for r in self._rows.values():
            if r.status == "pending" and r.held_by == held_by:
                r.run_after, r.held_by = self._clock(), None
                n += 1
        return n

    def delete_row(self, source_table: str, source_id: str) -> None:
        """Tests: the app deleted this source row (what ``prune`` reads in Postgres)."""
        self._deleted_rows.add((source_table, source_id))

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
                and (r.source_table, r.source_id) in self._deleted_rows
            ),
            key=lambda r: (r.finished_at or 0.0, r.id),
        )
        if dry_run:
            return len(doomed)
        for r in doomed[:limit]:
            self._drop(r)
        return min(len(doomed), limit)

    def _drop(self, r: _Row) -> None:
        """Delete a job; its recorded faces stay, without a job (as ON DELETE SET NULL)."""
        del self._rows[r.id]
        self._keys.discard((r.source_table, r.source_id))
        orphans = self._orphan_faces.setdefault((r.source_table, r.source_id), {})
        for effects in r.effects.values():
            faces = effects.get("faces") or {}
            for face in faces.get("faces", []):
                orphans[face["face_id"]] = FaceRef(faces["collection_id"], face["face_id"])

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
            faces = tuple(sorted(self._orphan_faces.get(key, {}).values(), key=lambda f: f.face_id))
            if row.reinserted and r is not None:
                restarted = await self.enqueue(row.source_table, row.source_id, r.image_url, owner)
            out.append(ForgottenRow(row, None, faces, sweep, owner, restarted))
        return out

    async def forget_faces(self, face_ids: Sequence[str]) -> int:
        """See ``JobStore.forget_faces``."""
        wanted = set(face_ids)
        n = 0
        for orphans in self._orphan_faces.values():
            for face_id in wanted & set(orphans):
                del orphans[face_id]
                n += 1
        return n

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

    def _matches(self, r: _Row, which: JobFilter, statuses: Sequence[str]) -> bool:
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
        """See ``JobStore.cancel``."""
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

    def _in_batch(self, batch_id: str, job_id: int) -> _Row | None:
        """The job's row when it is still in ``batch_id`` (the batch fence)."""
        r = self._rows.get(job_id)
        if r is None or r.status != "batched" or r.batch_id != batch_id:
            return None
        return r

    async def take_for_batch(self, step: str, limit: int, batch_id: str) -> list[BatchJob]:
        """See ``JobStore.take_for_batch``."""
        waiting = sorted(
            (
                r
                for r in self._rows.values()
                if r.status == "batched" and r.batch_id is None and r.batch_step == step
            ),
            key=lambda r: (r.priority, r.parked_at, r.id),
        )[: max(limit, 0)]
        if not waiting:
            return []
        self._batches[batch_id] = _Batch(step, self._clock())
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
        """See ``JobStore.keep_preparing``."""
        b = self._preparing(batch_id)
        if b is None:
            return False
        b.touched_at = self._clock()
        return True

    async def record_batch_file(
        self, batch_id: str, file_id: str, requests: Mapping[str, int]
    ) -> bool:
        """See ``JobStore.record_batch_file``."""
        b = self._preparing(batch_id)
        if b is None:
            return False
        b.status, b.file_id, b.touched_at = "submitting", file_id, self._clock()
        b.requests = {c: j for c, j in requests.items() if j in self._rows}
        return True

    async def batch_to_per_image(self, batch_id: str, errors: Mapping[int, str]) -> set[int]:
        """See ``JobStore.batch_to_per_image``."""
        ids: set[int] = set()
        for job_id, reason in errors.items():
            r = self._in_batch(batch_id, job_id)
            if r is not None:
                r.status, r.batch_id, r.batch_step, r.batch_mode = "pending", None, None, False
                r.run_after, r.last_error = self._clock(), reason[:1000]
                ids.add(r.id)
        return ids

    async def return_to_wait(self, batch_id: str, job_ids: Sequence[int]) -> set[int]:
        """See ``JobStore.return_to_wait``."""
        ids: set[int] = set()
        for job_id in job_ids:
            r = self._in_batch(batch_id, job_id)
            if r is not None:
                r.batch_id = None
                ids.add(r.id)
        return ids

    async def sweep_abandoned_batches(self, idle_s: float) -> list[int]:
        """See ``JobStore.sweep_abandoned_batches``."""
        now = self._clock()
        stale = {
            batch_id
            for batch_id, b in self._batches.items()
            if b.status == "preparing" and not b.applied and now - b.touched_at > idle_s
        }
        for batch_id in stale:
            self._batches[batch_id].status = "abandoned"
            self._batches[batch_id].applied = True
        ids: list[int] = []
        for r in self._rows.values():
            if r.status == "batched" and r.batch_id in stale:
                r.batch_id = None
                ids.append(r.id)
        return sorted(ids)

    async def jobs_in_batch(self, batch_id: str) -> int:
        """See ``JobStore.jobs_in_batch``."""
        return sum(
            1 for r in self._rows.values() if r.status == "batched" and r.batch_id == batch_id
        )

    async def apply_batch_result(
        self,
        batch_id: str,
        step: str,
        results: Mapping[int, StepRecord],
        failures: Mapping[int, str],
    ) -> set[int] | None:
        """See ``JobStore.apply_batch_result``.

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
        for r in self._rows.values():
            if r.status != "batched" or r.batch_id != batch_id or r.batch_step != step:
                continue
            rec = results.get(r.id)
            if rec is not None:
                # A batch result replaces an earlier one of the step (as PgJobStore's upsert).
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
            r.status, r.batch_id, r.batch_step, r.run_after = "pending", None, None, self._clock()
            if r.id in failures:
                r.batch_mode, r.last_error = False, failures[r.id][:1000]
        b.applied = True
        return stored
