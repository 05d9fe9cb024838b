"""Deduplication: digests stored with results by every ``JobStore``, reusable results found by
every ``DedupStore`` by bytes or perceptual hash within a scope, copies stored fenced and
marked."""

from __future__ import annotations

import dataclasses
import hashlib
import uuid

import pytest
from conftest import StoreEnv
from test_job_store import Rec

from listener.analysis.effects import InputDigest, Reuse
from listener.queue.outcomes import Completed, Job
from listener.queue.store import JobStore

T = "public.images"
STEP = "openai.tier1"


def sha(name: str) -> bytes:
    return hashlib.sha256(name.encode()).digest()


async def job(store: JobStore, table: str, row: str, owner: str | None) -> Job:
    job_id = await store.enqueue(table, row, f"http://img/{table}/{row}", owner)
    assert job_id is not None
    (claimed,) = await store.claim(1, "w1", 30.0, uuid.uuid4())
    assert claimed.id == job_id
    return claimed


async def test_same_bytes_found_within_the_scope_only(store_env: StoreEnv) -> None:
    store, dedup = store_env.store, store_env.dedup
    origin = await job(store, T, "1", "alice")
    same_owner = await job(store, T, "2", "alice")
    other_owner = await job(store, T, "3", "bob")
    other_table = await job(store, "public.other", "1", "alice")
    digest = InputDigest(sha("photo"))
    assert await store.save_step(origin, Rec(STEP, cost_usd=0.02, digest=digest, output={"q": 7}))

    found = await dedup.find_reusable(same_owner, STEP, digest, "owner")
    assert found is not None
    assert (found.origin_job_id, found.kind, found.distance) == (origin.id, "sha256", 0)
    assert found.saved_usd == pytest.approx(0.02)
    assert dict(found.output) == {"q": 7} and found.provider == "p" and found.model == "m"

    assert await dedup.find_reusable(other_owner, STEP, digest, "owner") is None
    assert await dedup.find_reusable(other_owner, STEP, digest, "table") is not None
    assert await dedup.find_reusable(other_table, STEP, digest, "table") is None
    assert await dedup.find_reusable(other_table, STEP, digest, "global") is not None
    # Another step, other bytes, or the job itself: nothing.
    assert await dedup.find_reusable(same_owner, "openai.tier2", digest, "global") is None
    assert await dedup.find_reusable(same_owner, STEP, InputDigest(sha("x")), "global") is None
    assert await dedup.find_reusable(origin, STEP, digest, "global") is None
    with pytest.raises(ValueError, match="scope"):
        await dedup.find_reusable(same_owner, STEP, digest, "everyone")


async def test_rows_without_owner_share_one_scope(store_env: StoreEnv) -> None:
    store, dedup = store_env.store, store_env.dedup
    first = await job(store, T, "1", None)
    second = await job(store, T, "2", None)
    owned = await job(store, T, "3", "carol")
    digest = InputDigest(sha("photo"))
    assert await store.save_step(first, Rec(STEP, digest=digest))
    assert await dedup.find_reusable(second, STEP, digest, "owner") is not None
    assert await dedup.find_reusable(owned, STEP, digest, "owner") is None


async def test_a_copy_is_stored_at_zero_and_names_the_origin(store_env: StoreEnv) -> None:
    store, dedup = store_env.store, store_env.dedup
    origin = await job(store, T, "1", None)
    copy = await job(store, T, "2", None)
    third = await job(store, T, "3", None)
    digest = InputDigest(sha("photo"))
    assert await store.save_step(origin, Rec(STEP, cost_usd=0.03, digest=digest))
    found = await dedup.find_reusable(copy, STEP, digest, "owner")
    assert found is not None
    reused = Reuse(found.origin_job_id, found.kind, found.saved_usd)
    record = Rec(
        STEP,
        cost_usd=0.0,
        calls=0,
        input_tokens=None,
        output_tokens=None,
        output=dict(found.output),
        digest=digest,
        reused=reused,
    )
    assert await store.save_step(copy, record)
    snap = await store.snapshot(copy.id)
    assert snap is not None
    assert snap.steps[STEP] == {"cost_usd": 0.0, "calls": 0, "reused_from": origin.id}
    origin_snap = await store.snapshot(origin.id)
    assert origin_snap is not None and "reused_from" not in origin_snap.steps[STEP]
    # Whichever of the two a third job finds, it names the job that paid, and what it paid.
    again = await dedup.find_reusable(third, STEP, digest, "owner")
    assert again is not None
    assert (again.origin_job_id, again.saved_usd) == (origin.id, pytest.approx(0.03))


async def test_a_copy_is_fenced_and_never_stored_by_complete(store_env: StoreEnv) -> None:
    store = store_env.store
    origin = await job(store, T, "1", None)
    copy = await job(store, T, "2", None)
    digest = InputDigest(sha("photo"))
    record = Rec(STEP, cost_usd=0.0, digest=digest, reused=Reuse(origin.id, "sha256", 0.01))
    with pytest.raises(ValueError, match="copy"):
        await store.complete([Completed(copy, [record])])
    with pytest.raises(ValueError, match="reuse kind"):
        await store.save_step(copy, Rec(STEP, reused=Reuse(origin.id, "guess", 0.01)))
    with pytest.raises(ValueError, match="32 bytes"):
        await store.save_step(copy, Rec(STEP, digest=InputDigest(b"short")))
    stale = dataclasses.replace(copy, lease_token=uuid.uuid4())
    assert await store.save_step(stale, record) is False
    snap = await store.snapshot(copy.id)
    assert snap is not None and snap.steps == {}


async def test_digests_stored_by_complete_are_found(store_env: StoreEnv) -> None:
    store, dedup = store_env.store, store_env.dedup
    origin = await job(store, T, "1", None)
    later = await job(store, T, "2", None)
    digest = InputDigest(sha("photo"))
    assert await store.complete([Completed(origin, [Rec(STEP, cost_usd=0.05, digest=digest)])])
    found = await dedup.find_reusable(later, STEP, digest, "owner")
    assert found is not None and found.origin_job_id == origin.id


async def test_near_duplicates_by_perceptual_hash(store_env: StoreEnv) -> None:
    store, dedup = store_env.store, store_env.dedup
    origin = await job(store, T, "1", None)
    near = await job(store, T, "2", None)
    # A hash with the sign bit set (a negative bigint), and one 3 bits away, one bit in each
    # of three 16-bit quarters: only the top quarter is left for the index to find it by.
    phash = -0x3F00_1234_5678_9ABC
    assert await store.save_step(origin, Rec(STEP, digest=InputDigest(sha("a"), phash)))
    three_off = phash ^ (1 | 1 << 16 | 1 << 32)
    probe = InputDigest(sha("b"), three_off)
    found = await dedup.find_reusable(near, STEP, probe, "owner", max_distance=3)
    assert found is not None
    assert (found.kind, found.distance, found.origin_job_id) == ("phash", 3, origin.id)
    assert await dedup.find_reusable(near, STEP, probe, "owner", max_distance=2) is None
    # Exact bytes only unless a distance is given; no hash, no near match.
    assert await dedup.find_reusable(near, STEP, probe, "owner") is None
    no_hash = InputDigest(sha("b"))
    assert await dedup.find_reusable(near, STEP, no_hash, "owner", max_distance=3) is None
    # The same bytes win over a near match.
    exact = InputDigest(sha("a"), three_off)
    found = await dedup.find_reusable(near, STEP, exact, "owner", max_distance=3)
    assert found is not None and found.kind == "sha256"
