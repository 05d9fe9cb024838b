"""Conformance of the ``BatchStore`` (provider batches): both stores, same tests.

Every write about a job in a batch is fenced by ``(id, batch id, status 'batched')`` and the
batch's step; a batch is applied once; a preparation abandoned by a dead daemon hands its
jobs back.
"""

from __future__ import annotations

import asyncio
import uuid

import pytest
from conftest import StoreEnv

from listener.analysis.providers.base import StepResult
from listener.queue.outcomes import Parked
from listener.queue.store import JobFilter, JobStore

STEP = "openai.tier1"
OTHER_STEP = "openai.tier2"


def result(step: str = STEP, quality: int = 7) -> StepResult:
    return StepResult(
        provider="openai",
        step=step,
        output={"quality": quality},
        model="gpt-4o-mini",
        input_tokens=100,
        output_tokens=20,
        calls=1,
        cost_usd=0.5,
    )


async def waiting(
    store: JobStore,
    n: int,
    step: str = STEP,
    *,
    priority: int = 0,
    prefix: str = "r",
    owner: str | None = None,
) -> list[int]:
    """``n`` jobs parked for a batch of ``step`` (waiting, in no batch yet), by id."""
    ids = [
        await store.enqueue(
            "public.images", f"{prefix}{i}", f"http://x/{prefix}{i}.jpg", owner, priority=priority
        )
        for i in range(n)
    ]
    jobs = await store.claim(n, "w", 60.0, uuid.uuid4())
    assert sorted(j.id for j in jobs) == sorted(i for i in ids if i is not None)
    assert await store.park([Parked(j, step) for j in jobs]) == {j.id for j in jobs}
    return sorted(j.id for j in jobs)


async def status(store: JobStore, job_id: int) -> str:
    snap = await store.snapshot(job_id)
    assert snap is not None
    return snap.status


async def test_take_marks_up_to_limit_of_the_step_and_never_twice(store_env: StoreEnv) -> None:
    store, batches = store_env.store, store_env.batches
    ids = await waiting(store, 5)
    other = await waiting(store, 2, OTHER_STEP, prefix="o")
    first = await batches.take_for_batch(STEP, 3, "b1")
    assert [j.id for j in first] == ids[:3]
    assert first[0].image_url == "http://x/r0.jpg" and first[0].source_table == "public.images"
    second = await batches.take_for_batch(STEP, 10, "b2")
    assert [j.id for j in second] == ids[3:]
    assert await batches.take_for_batch(STEP, 10, "b3") == []
    assert await batches.jobs_in_batch("b1") == 3
    assert await batches.jobs_in_batch("b2") == 2
    assert await batches.jobs_in_batch("b3") == 0
    # The jobs stay batched; the other step's jobs were not taken.
    assert {await status(store, i) for i in ids + other} == {"batched"}
    assert [j.id for j in await batches.take_for_batch(OTHER_STEP, 10, "b4")] == other


async def test_take_orders_by_priority_and_carries_stored_outputs(store_env: StoreEnv) -> None:
    store, batches = store_env.store, store_env.batches
    late = await waiting(store, 1, priority=100, prefix="late")
    # A job with a stored tier-0 step: its request builds on it.
    job_id = await store.enqueue("public.images", "early", "http://x/e.jpg")
    assert job_id is not None
    (job,) = await store.claim(1, "w", 60.0, uuid.uuid4())
    assert await store.save_step(job, result("local.analysis", 3))
    await store.park([Parked(job, STEP)])
    taken = await batches.take_for_batch(STEP, 1, "b1")
    assert [j.id for j in taken] == [job_id]
    assert taken[0].outputs == {"local.analysis": {"quality": 3}}
    assert [j.id for j in await batches.take_for_batch(STEP, 1, "b2")] == late


async def test_concurrent_takes_never_share_a_job(store_env: StoreEnv) -> None:
    store, batches = store_env.store, store_env.batches
    ids = await waiting(store, 40)
    taken = await asyncio.gather(*(batches.take_for_batch(STEP, 7, f"b{i}") for i in range(8)))
    all_ids = [j.id for batch in taken for j in batch]
    assert sorted(all_ids) == ids  # each once


async def test_record_file_is_fenced_by_preparing(store_env: StoreEnv) -> None:
    store, batches = store_env.store, store_env.batches
    ids = await waiting(store, 2)
    await batches.take_for_batch(STEP, 10, "b1")
    assert await batches.keep_preparing("b1")
    requests = {f"{i}:{STEP}:b1": i for i in ids}
    assert await batches.record_batch_file("b1", "file-1", requests)
    # Recorded: no longer preparing, so neither the heartbeat nor a second record holds.
    assert not await batches.record_batch_file("b1", "file-2", requests)
    assert not await batches.keep_preparing("b1")
    assert not await batches.keep_preparing("nope")
    assert not await batches.record_batch_file("nope", "file-3", {})


async def test_abandoned_preparation_hands_its_jobs_back(store_env: StoreEnv) -> None:
    store, batches = store_env.store, store_env.batches
    ids = await waiting(store, 3)
    await batches.take_for_batch(STEP, 10, "dead")
    more = await waiting(store, 2, prefix="m")
    await batches.take_for_batch(STEP, 10, "recorded")
    assert await batches.record_batch_file("recorded", "f", {f"{i}": i for i in more})
    await store_env.idle(60.0)
    assert await batches.sweep_abandoned_batches(900.0) == []  # still within its time
    await store_env.idle(1_000.0)
    assert await batches.sweep_abandoned_batches(900.0) == ids
    assert await batches.jobs_in_batch("dead") == 0
    assert await batches.jobs_in_batch("recorded") == 2  # a recorded batch is never swept
    # The dead daemon, were it to wake up, can no longer record its file.
    assert not await batches.keep_preparing("dead")
    assert not await batches.record_batch_file("dead", "late", {f"{i}": i for i in ids})
    assert await batches.sweep_abandoned_batches(900.0) == []
    # The jobs wait again: the next batch takes them.
    assert [j.id for j in await batches.take_for_batch(STEP, 10, "next")] == ids


async def test_heartbeat_keeps_a_slow_preparation(store_env: StoreEnv) -> None:
    store, batches = store_env.store, store_env.batches
    await waiting(store, 1)
    await batches.take_for_batch(STEP, 10, "slow")
    await store_env.idle(800.0)
    assert await batches.keep_preparing("slow")
    await store_env.idle(800.0)
    assert await batches.sweep_abandoned_batches(900.0) == []
    assert await batches.jobs_in_batch("slow") == 1


async def test_batch_to_per_image_is_fenced(store_env: StoreEnv) -> None:
    store, batches = store_env.store, store_env.batches
    ids = await waiting(store, 3)
    await batches.take_for_batch(STEP, 2, "b1")
    await batches.take_for_batch(STEP, 2, "b2")
    # ids[2] is in b2, not b1: untouched.
    changed = await batches.batch_to_per_image(
        "b1", {ids[0]: "cannot read image", ids[2]: "not this one"}
    )
    assert changed == {ids[0]}
    snap = await store.snapshot(ids[0])
    assert snap is not None and snap.status == "pending" and snap.last_error == "cannot read image"
    assert await status(store, ids[2]) == "batched"
    assert await batches.jobs_in_batch("b1") == 1
    (job,) = await store.claim(10, "w", 60.0, uuid.uuid4())
    assert job.id == ids[0] and job.batch_mode is False  # it runs per image now
    assert await batches.batch_to_per_image("b1", {}) == set()


async def test_return_to_wait_is_fenced(store_env: StoreEnv) -> None:
    store, batches = store_env.store, store_env.batches
    ids = await waiting(store, 3)
    await batches.take_for_batch(STEP, 3, "b1")
    assert await batches.return_to_wait("b1", [ids[1], ids[2]]) == {ids[1], ids[2]}
    assert await batches.return_to_wait("b1", [ids[1]]) == set()  # already out
    assert await batches.return_to_wait("b9", [ids[0]]) == set()  # not in b9
    assert await batches.jobs_in_batch("b1") == 1
    assert [j.id for j in await batches.take_for_batch(STEP, 10, "b2")] == ids[1:]


async def test_apply_stores_results_and_hands_back_only_members(store_env: StoreEnv) -> None:
    store, batches = store_env.store, store_env.batches
    fresh = await waiting(store, 3)
    gone = await waiting(store, 1, owner="bob", prefix="bob")
    await batches.take_for_batch(STEP, 10, "b1")
    # bob's job is cancelled while the batch runs.
    assert await store.cancel(JobFilter(statuses=("batched",), owner="bob")) == gone
    stored = await batches.apply_batch_result(
        "b1",
        STEP,
        {fresh[0]: result(), fresh[1]: result(), gone[0]: result()},
        {fresh[2]: "batch request failed (500): server_error"},
    )
    assert stored == {fresh[0], fresh[1]}  # the cancelled job gets nothing
    assert await status(store, gone[0]) == "cancelled"
    assert await store.outputs(gone[0]) == {}
    for job_id in fresh[:2]:
        snap = await store.snapshot(job_id)
        assert snap is not None and snap.status == "pending"
        assert snap.steps == {STEP: {"cost_usd": 0.5, "calls": 1}}
        assert await store.outputs(job_id) == {STEP: {"quality": 7}}
    failed = await store.snapshot(fresh[2])
    assert failed is not None and failed.status == "pending"
    assert failed.last_error == "batch request failed (500): server_error"
    jobs = {j.id: j for j in await store.claim(10, "w", 60.0, uuid.uuid4())}
    assert set(jobs) == set(fresh)
    assert jobs[fresh[2]].batch_mode is False and jobs[fresh[0]].batch_mode is None
    assert STEP in jobs[fresh[0]].done_steps
    # Exactly once.
    assert await batches.apply_batch_result("b1", STEP, {fresh[0]: result(quality=1)}, {}) is None
    assert await store.outputs(fresh[0]) == {STEP: {"quality": 7}}


async def test_apply_hands_back_members_without_a_line(store_env: StoreEnv) -> None:
    store, batches = store_env.store, store_env.batches
    ids = await waiting(store, 2)
    await batches.take_for_batch(STEP, 10, "b1")
    assert await batches.apply_batch_result("b1", STEP, {}, {}) == set()
    assert {await status(store, i) for i in ids} == {"pending"}
    assert await batches.jobs_in_batch("b1") == 0


async def test_apply_of_an_empty_batch_writes_nothing(store_env: StoreEnv) -> None:
    store, batches = store_env.store, store_env.batches
    ids = await waiting(store, 2)
    await batches.take_for_batch(STEP, 10, "b1")
    await store.cancel(JobFilter(statuses=("batched",)))
    assert await batches.jobs_in_batch("b1") == 0
    assert await batches.apply_batch_result("b1", STEP, {ids[0]: result()}, {ids[1]: "x"}) == set()
    assert {await status(store, i) for i in ids} == {"cancelled"}
    assert await store.outputs(ids[0]) == {}


async def test_apply_is_fenced_by_step_and_batch(store_env: StoreEnv) -> None:
    store, batches = store_env.store, store_env.batches
    ids = await waiting(store, 2)
    await batches.take_for_batch(STEP, 1, "b1")
    await batches.take_for_batch(STEP, 1, "b2")
    # The wrong step, an unknown batch: nothing.
    assert await batches.apply_batch_result("b1", OTHER_STEP, {}, {}) is None
    assert await batches.apply_batch_result("nope", STEP, {}, {}) is None
    # b1's answer for b2's job is not stored.
    assert await batches.apply_batch_result(
        "b1", STEP, {ids[0]: result(), ids[1]: result()}, {}
    ) == {ids[0]}
    assert await status(store, ids[1]) == "batched"
    assert await store.outputs(ids[1]) == {}
    with pytest.raises(ValueError):
        await batches.apply_batch_result("b2", STEP, {ids[1]: result(OTHER_STEP)}, {})
