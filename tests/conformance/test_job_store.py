"""What every ``JobStore`` guarantees, run against the Postgres and the in-memory store."""

from __future__ import annotations

import asyncio
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from conftest import DEFAULT_MAX_ATTEMPTS, StoreEnv

from listener.analysis.effects import InputDigest, Reuse
from listener.queue.outcomes import (
    Completed,
    Discarded,
    Job,
    Leftover,
    Parked,
    Retry,
    Snoozed,
)
from listener.queue.store import DeletedRow, JobFilter, JobStore

T = "public.images"


@dataclass(frozen=True)
class Rec:
    """A step record (the fields of ``StepRecord``)."""

    step: str
    cost_usd: float = 0.01
    provider: str = "p"
    output: dict[str, Any] = field(default_factory=lambda: {"ok": True})
    model: str | None = "m"
    duration_s: float = 0.1
    input_tokens: int | None = 10
    output_tokens: int | None = 5
    calls: int = 1
    effects: dict[str, Any] = field(default_factory=dict)
    digest: InputDigest | None = None
    reused: Reuse | None = None


async def enqueue(store: JobStore, n: int, **kwargs: Any) -> list[int]:
    ids = []
    for i in range(n):
        job_id = await store.enqueue(T, str(i + 1), f"http://img/{i + 1}", **kwargs)
        assert job_id is not None
        ids.append(job_id)
    return ids


async def claim(store: JobStore, limit: int = 10, lease_s: float = 30.0) -> list[Job]:
    return await store.claim(limit, "w1", lease_s, uuid.uuid4())


async def status(store: JobStore, job_id: int) -> tuple[str, int]:
    snap = await store.snapshot(job_id)
    assert snap is not None
    return snap.status, snap.attempts


async def test_enqueue_once_per_source_row(store_env: StoreEnv) -> None:
    store = store_env.store
    assert await store.enqueue(T, "1", "http://a") is not None
    assert await store.enqueue(T, "1", "http://b") is None
    assert await store.enqueue("public.other", "1", "http://a") is not None


async def test_claim_order_limit_and_default_max_attempts(store_env: StoreEnv) -> None:
    store = store_env.store
    low = await store.enqueue(T, "low", "u", priority=100)
    first, second = await enqueue(store, 2)
    explicit = await store.enqueue(T, "explicit", "u", priority=100, max_attempts=9)
    jobs = await claim(store, limit=3)
    assert [j.id for j in jobs] == [first, second, low]
    assert all(j.attempts == 1 and j.claims == 1 for j in jobs)
    # Rows enqueued without max_attempts take the daemon's setting at their claim.
    assert {j.max_attempts for j in jobs} == {DEFAULT_MAX_ATTEMPTS}
    (last,) = await claim(store)
    assert last.id == explicit and last.max_attempts == 9
    assert await claim(store) == []


async def test_concurrent_claims_never_share_a_job(store_env: StoreEnv) -> None:
    store = store_env.store
    await enqueue(store, 60)
    batches = await asyncio.gather(*(claim(store, limit=7) for _ in range(12)))
    ids = [j.id for batch in batches for j in batch]
    assert len(ids) == len(set(ids)) == 60


async def test_every_write_is_fenced_by_the_lease_token(store_env: StoreEnv) -> None:
    store = store_env.store
    (job_id,) = await enqueue(store, 1)
    (job,) = await claim(store)
    stale = Job(**{**_fields(job), "lease_token": uuid.uuid4()})
    assert await store.save_step(stale, Rec("a")) is False
    assert await store.complete([Completed(stale, [Rec("a")])]) == set()
    assert await store.retry([Retry(stale, "x", 0)]) == set()
    assert await store.snooze([Snoozed(stale, "x", 0)]) == set()
    assert await store.discard([Discarded(stale, "x")]) == set()
    assert await store.park([Parked(stale, "s")]) == set()
    assert await store.release([stale]) == set()
    assert await store.renew([stale], 30) == set()
    snap = await store.snapshot(job_id)
    assert snap is not None and snap.status == "processing" and snap.steps == {}
    assert await store.complete([Completed(job, [Rec("a")])]) == {job_id}
    # Once recorded, the same lease writes nothing more.
    assert await store.retry([Retry(job, "late", 0)]) == set()
    assert await status(store, job_id) == ("complete", 1)


def _fields(job: Job) -> dict[str, Any]:
    return {name: getattr(job, name) for name in job.__slots__}


async def test_retry_uses_the_attempt_snooze_and_release_give_it_back(
    store_env: StoreEnv,
) -> None:
    store = store_env.store
    retried, snoozed, released = await enqueue(store, 3)
    jobs = {j.id: j for j in await claim(store)}
    assert await store.retry([Retry(jobs[retried], "HTTP 500", 0)]) == {retried}
    assert await store.snooze([Snoozed(jobs[snoozed], "429", 0)]) == {snoozed}
    assert await store.release([jobs[released]]) == {released}
    assert await status(store, retried) == ("pending", 1)
    assert await status(store, snoozed) == ("pending", 0)
    assert await status(store, released) == ("pending", 0)
    snap = await store.snapshot(snoozed)
    assert snap is not None and snap.last_error == "429"


async def test_a_delay_holds_the_job_back(store_env: StoreEnv) -> None:
    store = store_env.store
    later, now = await enqueue(store, 2)
    jobs = {j.id: j for j in await claim(store)}
    await store.retry([Retry(jobs[later], "wait", 3600), Retry(jobs[now], "go", 0)])
    await store_env.advance(0.01)
    assert [j.id for j in await claim(store)] == [now]
    snap = await store.snapshot(later)
    assert snap is not None and 3500 < snap.run_after_s <= 3600


async def test_discard_is_a_dead_letter(store_env: StoreEnv) -> None:
    store = store_env.store
    (job_id,) = await enqueue(store, 1)
    (job,) = await claim(store)
    assert await store.discard([Discarded(job, "HTTP 404")]) == {job_id}
    snap = await store.snapshot(job_id)
    assert snap is not None and (snap.status, snap.last_error) == ("failed", "HTTP 404")
    assert await claim(store) == []


async def test_reap_returns_expired_leases_and_fails_spent_jobs(store_env: StoreEnv) -> None:
    store = store_env.store
    fresh, spent = await enqueue(store, 1) + [
        await store.enqueue(T, "spent", "u", max_attempts=1) or 0
    ]
    expired = await store.claim(10, "dead-worker", 0.0, uuid.uuid4())
    assert {j.id for j in expired} == {fresh, spent}
    await store_env.advance(0.01)
    assert await store.reap() == {fresh: "pending", spent: "failed"}
    snap = await store.snapshot(fresh)
    assert snap is not None and "dead-worker" in (snap.last_error or "")
    # The dead worker's late writes are fenced out.
    assert await store.complete([Completed(j) for j in expired]) == set()
    (again,) = await claim(store)
    assert again.id == fresh and again.attempts == 2 and again.claims == 2


async def test_a_completion_of_a_superseded_claim_in_the_same_batch_is_ignored(
    store_env: StoreEnv,
) -> None:
    """A worker's buffer can hold two completions of one job: one of a claim whose lease
    expired (the job was claimed again, by the same worker) and one of the new claim. The
    batch records the new claim's, with its results, and the stale one changes nothing; the
    batch does not fail (a failing batch would stay buffered and block every later flush)."""
    store = store_env.store
    (job_id,) = await enqueue(store, 1)
    (stale,) = await store.claim(1, "w1", 0.0, uuid.uuid4())
    await store_env.advance(0.01)
    assert await store.reap() == {job_id: "pending"}
    (fresh,) = await claim(store)
    assert fresh.id == job_id and fresh.claims == 2
    recorded = await store.complete(
        [
            Completed(stale, [Rec("a", output={"run": 1})]),
            Completed(fresh, [Rec("a", output={"run": 2})]),
        ]
    )
    assert recorded == {job_id}
    assert (await status(store, job_id))[0] == "complete"
    assert await store.outputs(job_id) == {"a": {"run": 2}}


async def test_renew_keeps_a_lease_from_being_reaped(store_env: StoreEnv) -> None:
    store = store_env.store
    (job_id,) = await enqueue(store, 1)
    (job,) = await store.claim(1, "w", 0.0, uuid.uuid4())
    assert await store.renew([job], 60.0) == {job_id}
    await store_env.advance(0.01)
    assert await store.reap() == {}


async def test_stored_steps_come_back_with_the_claim(store_env: StoreEnv) -> None:
    store = store_env.store
    (job_id,) = await enqueue(store, 1)
    (job,) = await claim(store)
    assert job.done_steps == ()
    assert await store.save_step(job, Rec("tier1", output={"quality": 7}))
    await store.release([job])
    (again,) = await claim(store)
    # Resume follows stored state: the attempt was given back, the step stays done.
    assert again.attempts == 1 and again.done_steps == ("tier1",)
    assert await store.outputs(job_id) == {"tier1": {"quality": 7}}


async def test_a_step_stored_twice_counts_both_costs(store_env: StoreEnv) -> None:
    store = store_env.store
    (job_id,) = await enqueue(store, 1)
    (job,) = await claim(store)
    assert await store.save_step(job, Rec("tier1", cost_usd=0.25))
    assert await store.complete([Completed(job, [Rec("tier1", cost_usd=0.5)])]) == {job_id}
    snap = await store.snapshot(job_id)
    assert snap is not None
    assert snap.steps["tier1"]["cost_usd"] == pytest.approx(0.75)
    assert snap.steps["tier1"]["calls"] == 2


async def test_park_gives_the_attempt_back(store_env: StoreEnv) -> None:
    store = store_env.store
    (job_id,) = await enqueue(store, 1)
    (job,) = await claim(store)
    assert await store.park([Parked(job, "openai.tier1")]) == {job_id}
    assert await status(store, job_id) == ("batched", 0)
    assert await claim(store) == []


async def test_cancel_reaches_pending_running_and_batched_jobs(store_env: StoreEnv) -> None:
    store = store_env.store
    ids = await enqueue(store, 3, owner_id="alice")
    other = await store.enqueue(T, "bob-1", "u", owner_id="bob")
    jobs = {j.id: j for j in await claim(store, limit=2)}
    running, parked = sorted(jobs)
    await store.park([Parked(jobs[parked], "openai.tier1")])
    cancelled = await store.cancel(JobFilter((), owner="alice"))
    assert sorted(cancelled) == sorted(ids)
    assert await status(store, running) == ("cancelled", 1)
    # The running job's worker finds its lease gone.
    assert await store.complete([Completed(jobs[running])]) == set()
    assert await store.snapshot(other) is not None
    assert await status(store, other or 0) == ("pending", 0)


async def test_requeue_resumes_failed_and_restarts_complete(store_env: StoreEnv) -> None:
    store = store_env.store
    failed, done = await enqueue(store, 2)
    jobs = {j.id: j for j in await claim(store)}
    await store.save_step(jobs[failed], Rec("tier1"))
    await store.discard([Discarded(jobs[failed], "HTTP 500 (gave up after 3 attempts)")])
    await store.complete([Completed(jobs[done], [Rec("tier1")])])
    with pytest.raises(ValueError, match="processing"):
        await store.requeue(JobFilter(("processing",)))
    assert await store.requeue(JobFilter(("failed",), reason="http 500")) == [failed]
    assert await store.requeue(JobFilter(("complete",))) == [done]
    again = {j.id: j for j in await claim(store)}
    assert again[failed].done_steps == ("tier1",) and again[failed].attempts == 1
    assert again[done].done_steps == ()


async def test_effects_are_stored_with_their_step_never_with_the_completion(
    store_env: StoreEnv,
) -> None:
    store = store_env.store
    await enqueue(store, 1)
    (job,) = await claim(store)
    with pytest.raises(ValueError, match="effects"):
        await store.complete([Completed(job, [Rec("x", effects={"faces": {"faces": []}})])])
    with pytest.raises(ValueError, match="unknown"):
        await store.save_step(job, Rec("x", effects={"webhook": {}}))
    # Nothing was written by the refused calls.
    snap = await store.snapshot(job.id)
    assert snap is not None and snap.status == "processing" and snap.steps == {}


async def test_reanalyze_starts_rows_over_whatever_their_state(store_env: StoreEnv) -> None:
    store = store_env.store
    done, running, parked, waiting = await enqueue(store, 4)
    jobs = {j.id: j for j in await claim(store, limit=3)}
    await store.complete([Completed(jobs[done], [Rec("tier1")])])
    await store.park([Parked(jobs[parked], "openai.tier1")])
    restarted = await store.reanalyze(T, ["1", "2", "3", "4"], 5)
    assert restarted == 4
    for job_id in (done, running, parked, waiting):
        snap = await store.snapshot(job_id)
        assert snap is not None
        assert (snap.status, snap.attempts, snap.steps, snap.leased) == ("pending", 0, {}, False)
    # The run that was in flight writes nothing any more.
    assert await store.complete([Completed(jobs[running], [Rec("tier1")])]) == set()
    again = await claim(store, limit=10)
    assert {j.id for j in again} == {done, running, parked, waiting}
    assert {j.priority for j in again} == {5} and all(j.done_steps == () for j in again)


async def test_a_snooze_held_by_a_pause_is_woken_by_resume(store_env: StoreEnv) -> None:
    store = store_env.store
    held, other, plain, budget = await enqueue(store, 4)
    await store.pause("openai", "quota", None)
    await store.pause("rekognition", None, datetime.now(UTC) + timedelta(hours=1))
    jobs = {j.id: j for j in await claim(store)}
    assert await store.snooze(
        [
            Snoozed(jobs[held], "paused by operator: openai", 86400, "openai"),
            Snoozed(jobs[other], "paused by operator: rekognition", 3600, "rekognition"),
            Snoozed(jobs[plain], "429", 86400),
            Snoozed(jobs[budget], "daily budget spent", 86400, "budget"),
        ]
    ) == {held, other, plain, budget}
    assert await claim(store) == []
    assert await store.resume("openai") == (True, 1)
    assert await store.resume("openai") == (False, 0)  # lifted, and held no more
    await store_env.advance(0.01)
    assert [j.id for j in await claim(store)] == [held]
    for job_id in (other, budget):
        snap = await store.snapshot(job_id)
        assert snap is not None and snap.status == "pending" and snap.run_after_s > 3000
    assert await store.resume("budget") == (False, 1)
    await store_env.advance(0.01)
    assert [j.id for j in await claim(store)] == [budget]


async def test_a_snooze_by_a_pause_already_lifted_does_not_hold(store_env: StoreEnv) -> None:
    """A daemon whose reading of the pauses predates ``resume`` snoozes a job held by the
    pause: the job is runnable at once, not held for the day ``resume`` already ended."""
    store = store_env.store
    gone, never, ended = await enqueue(store, 3)
    await store.pause("openai", None, None)
    await store.pause("rekognition", None, datetime.now(UTC) + timedelta(seconds=0.2))
    jobs = {j.id: j for j in await claim(store)}
    assert await store.resume("openai") == (True, 0)  # the jobs were running
    await store_env.advance(0.3)  # rekognition's pause ends
    assert await store.snooze(
        [
            Snoozed(jobs[gone], "paused by operator: openai", 86400, "openai"),
            Snoozed(jobs[never], "paused by operator: the pipeline", 86400, "*"),
            Snoozed(jobs[ended], "paused by operator: rekognition", 86400, "rekognition"),
        ]
    ) == {gone, never, ended}
    await store_env.advance(0.01)
    assert {j.id for j in await claim(store)} == {gone, never, ended}
    assert await store.resume("openai") == (False, 0)  # none was held


def face(face_id: str) -> dict[str, Any]:
    """One entry of a ``"faces"`` effect: a new face, no match."""
    return {
        "face_id": face_id,
        "bounding_box": {"Width": 0.2, "Height": 0.2, "Left": 0.1, "Top": 0.1},
        "confidence": 99.0,
        "decision": "new",
        "matched_face_id": None,
        "similarity": None,
    }


async def test_a_deleted_row_loses_its_job_and_results(store_env: StoreEnv) -> None:
    store = store_env.store
    done, waiting = await enqueue(store, 2)
    jobs = {j.id: j for j in await claim(store, limit=1)}
    await store.complete([Completed(jobs[done], [Rec("tier1")])])
    rows = [DeletedRow(T, "1", done), DeletedRow(T, "2", waiting)]
    forgotten = await store.forget_rows(rows)
    assert [f.row for f in forgotten] == rows
    assert [(f.running_s, f.leftovers, f.restarted) for f in forgotten] == [(None, (), None)] * 2
    # A completed job never indexed faces it did not record; a pending one never ran.
    assert [f.sweep for f in forgotten] == [False, False]
    assert await store.snapshot(done) is None and await store.snapshot(waiting) is None
    assert await store.outputs(done) == {}
    # Forgetting again is harmless; the same id inserted again gets a fresh job.
    assert [f.sweep for f in await store.forget_rows(rows)] == [False, False]
    fresh = await store.enqueue(T, "1", "http://img/1")
    assert fresh is not None and fresh not in (done, waiting)


async def test_a_running_job_of_a_deleted_row_is_fenced_then_forgotten(
    store_env: StoreEnv,
) -> None:
    store = store_env.store
    (job_id,) = await enqueue(store, 1, owner_id="alice")
    (job,) = await claim(store, lease_s=30.0)
    (first,) = await store.forget_rows([DeletedRow(T, "1", job_id)])
    assert first.running_s is not None and 20.0 < first.running_s <= 30.0
    assert await status(store, job_id) == ("cancelled", 1)
    # The worker's writes are refused from now on: no result lands on the deleted row.
    assert await store.save_step(job, Rec("tier1")) is False
    assert await store.complete([Completed(job, [Rec("tier1")])]) == set()
    assert await store.renew([job], 30.0) == set()
    # Once its lease would have ended, the job goes; it ran without completing.
    (second,) = await store.forget_rows([DeletedRow(T, "1", job_id)])
    assert (second.running_s, second.sweep, second.owner_id) == (None, True, "alice")
    assert await store.snapshot(job_id) is None


async def test_faces_of_a_deleted_row_stay_recorded_until_gone_from_the_collection(
    store_env: StoreEnv,
) -> None:
    store = store_env.store
    (job_id,) = await enqueue(store, 1, owner_id="alice")
    (job,) = await claim(store)
    effect = {"collection_id": "listener-alice", "faces": [face("f-2"), face("f-1")]}
    assert await store.save_step(job, Rec("rekognition.faces", effects={"faces": effect}))
    await store.complete([Completed(job)])
    expected = (Leftover("listener-alice", "f-1"), Leftover("listener-alice", "f-2"))
    (forgotten,) = await store.forget_rows([DeletedRow(T, "1", job_id)])
    assert forgotten.leftovers == expected
    # Until forget_faces, a second pass (a daemon killed after DeleteFaces) finds them again.
    (again,) = await store.forget_rows([DeletedRow(T, "1", job_id)])
    assert again.leftovers == expected
    assert await store_env.faces.forget_faces(["f-1", "f-2", "unknown"]) == 2
    (last,) = await store.forget_rows([DeletedRow(T, "1", job_id)])
    assert last.leftovers == ()


async def test_only_the_job_a_deleted_row_had_is_forgotten(store_env: StoreEnv) -> None:
    store = store_env.store
    (job_id,) = await enqueue(store, 1)
    (job,) = await claim(store)
    effect = {"collection_id": "c", "faces": [face("live")]}
    assert await store.save_step(job, Rec("rekognition.faces", effects={"faces": effect}))
    # A row deleted before this job existed (it had none, or another one).
    forgotten = await store.forget_rows([DeletedRow(T, "1", None), DeletedRow(T, "1", 10**9)])
    assert [(f.leftovers, f.sweep) for f in forgotten] == [((), False), ((), False)]
    assert await status(store, job_id) == ("processing", 1)
    # A face whose job still exists is never forgotten.
    assert await store_env.faces.forget_faces(["live"]) == 0
    assert await store.save_step(job, Rec("tier1")) is True


# -- rows the app inserts: admission (0019, 0021) --


async def test_admit_makes_one_job_per_inserted_row(store_env: StoreEnv) -> None:
    store = store_env.store
    for i in (1, 2, 3):
        await store_env.insert_row(i, f"http://img/{i}", "alice" if i < 3 else None)
    assert await claim(store) == []  # a claim without admission sees nothing yet
    assert await store.admit() == 3
    assert await store.admit() == 0  # nothing waits any more
    jobs = await claim(store)
    assert [(j.source_id, j.image_url, j.owner_id) for j in jobs] == [
        ("1", "http://img/1", "alice"),
        ("2", "http://img/2", "alice"),
        ("3", "http://img/3", None),
    ]
    assert {(j.priority, j.attempts, j.claims, j.max_attempts) for j in jobs} == {
        (0, 1, 1, DEFAULT_MAX_ATTEMPTS)
    }


async def test_a_row_with_a_job_or_deleted_before_admission_gets_none(
    store_env: StoreEnv,
) -> None:
    store = store_env.store
    # A job made after the row's insert (a backfill, say) already reflects it.
    await store_env.insert_row(1, "http://img/1", None)
    held = await store.enqueue(T, "1", "http://img/1")
    assert held is not None
    # A row deleted before its admission.
    await store_env.insert_row(2, "http://img/2", None)
    await store_env.delete_row(2)
    assert await store.admit() == 2
    assert [j.id for j in await claim(store)] == [held]
    assert await store.enqueue(T, "2", "http://img/2") is not None  # the key was never taken


async def test_a_claim_admits_fresh_rows_after_urgent_jobs_and_before_a_backfill(
    store_env: StoreEnv,
) -> None:
    """As tests/integration/test_inserted_rows.py's test of the same name: pending jobs of
    priority 0 or less, then fresh rows admitted as jobs claimed at once into the room left
    (the rest wait), then higher priority numbers."""
    store = store_env.store
    backfill = [await store.enqueue(T, str(i), f"http://img/{i}", priority=100) for i in (1, 2)]
    urgent = [await store.enqueue(T, str(i), f"http://img/{i}", priority=-1) for i in (3, 4)]
    for i in (5, 6, 7):
        await store_env.insert_row(i, f"http://img/{i}", None)
    first = await store.claim(4, "w", 30.0, uuid.uuid4(), admit=True)
    assert [(j.source_id, j.priority) for j in first] == [("3", -1), ("4", -1), ("5", 0), ("6", 0)]
    assert [j.id for j in first[:2]] == urgent
    assert all(j.attempts == 1 and j.claims == 1 for j in first)
    second = await store.claim(4, "w", 30.0, uuid.uuid4(), admit=True)
    assert [(j.source_id, j.priority) for j in second] == [("7", 0), ("1", 100), ("2", 100)]
    assert [j.id for j in second[1:]] == backfill
    # Admitted jobs are leased like any claimed job: their lease fences their writes.
    admitted = first[2]
    assert await store.complete([Completed(admitted, [Rec("tier1")])]) == {admitted.id}
    assert await status(store, admitted.id) == ("complete", 1)


async def test_a_claim_admits_no_more_than_its_room(store_env: StoreEnv) -> None:
    store = store_env.store
    for i in range(1, 6):
        await store_env.insert_row(i, f"http://img/{i}", None)
    first = await store.claim(2, "w", 30.0, uuid.uuid4(), admit=True)
    assert [j.source_id for j in first] == ["1", "2"]
    # Without admission a claim takes pending jobs only: the other rows still wait.
    assert await claim(store) == []
    assert await store.admit() == 3
    assert [j.source_id for j in await claim(store)] == ["3", "4", "5"]


async def test_rows_inserted_twice_are_enqueued_once(store_env: StoreEnv) -> None:
    store = store_env.store
    await store_env.insert_row(1, "http://img/1", None)
    assert await store.admit() == 1
    (job,) = await claim(store)
    # Deleted and inserted again while its old job holds the key: no second job now (the
    # drain of deleted rows forgets the old one and restarts the row).
    await store_env.delete_row(1)
    await store_env.insert_row(1, "http://img/1b", None)
    assert await store.admit() == 1
    assert await claim(store) == []
    assert await status(store, job.id) == ("processing", 1)


async def test_cancel_reaches_rows_waiting_for_admission(store_env: StoreEnv) -> None:
    store = store_env.store
    await store_env.insert_row(1, "http://img/1", "alice")
    await store_env.insert_row(2, "http://img/2", "bob")
    cancelled = await store.cancel(JobFilter((), owner="alice"))
    assert len(cancelled) == 1
    assert await status(store, cancelled[0]) == ("cancelled", 0)
    # bob's row was admitted too, and waits as a pending job.
    assert [j.owner_id for j in await store.claim(10, "w", 30.0, uuid.uuid4(), admit=True)] == [
        "bob"
    ]


# -- retention --


async def test_prune_deletes_finished_jobs_whose_row_is_gone(store_env: StoreEnv) -> None:
    store = store_env.store
    for i in (1, 2, 3, 4):
        await store_env.insert_row(i, f"http://img/{i}", None)
    await store.admit()
    jobs = {j.source_id: j for j in await claim(store)}
    await store.complete([Completed(jobs[s], [Rec("tier1")]) for s in ("1", "2", "3")])
    await store.discard([Discarded(jobs["4"], "HTTP 404")])
    for i in (1, 2, 4):
        await store_env.delete_row(i)
    await store_env.advance(0.01)
    # Finished, but not before the cut-off: nothing goes.
    assert await store.prune(datetime.fromtimestamp(0, UTC), 10) == 0
    later = datetime.now(UTC) + timedelta(days=1)
    # Row 3 still exists: its job is kept whatever its age.
    assert await store.prune(later, 0, dry_run=True) == 3
    assert await store.prune(later, 2) == 2
    assert await store.prune(later, 2) == 1
    assert await store.prune(later, 2) == 0
    for s in ("1", "2", "4"):
        assert await store.snapshot(jobs[s].id) is None
    assert await status(store, jobs["3"].id) == ("complete", 1)
    assert await store.outputs(jobs["1"].id) == {}


async def test_prune_keeps_unfinished_jobs(store_env: StoreEnv) -> None:
    store = store_env.store
    running, waiting = await enqueue(store, 2)
    (job,) = await claim(store, limit=1)
    later = datetime.now(UTC) + timedelta(days=1)
    assert await store.prune(later, 10) == 0
    assert job.id == running
    assert await status(store, running) == ("processing", 1)
    assert await status(store, waiting) == ("pending", 0)
