"""Deduplication's decisions, no I/O: the dispatcher over the in-memory job store, a fake paid
provider and fetcher; the hash conversion; the estimate's expected saving."""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass

import pytest

from listener.analysis.dedup import DedupPolicy, phash_int
from listener.analysis.dedup_store import MemoryDedupStore
from listener.analysis.dispatch import Dispatcher, LocalLimiter, ProviderSlot
from listener.analysis.estimate import StepHistory, estimate
from listener.analysis.pipeline import Plan, Step
from listener.analysis.providers.base import ImageInput, StepContext, StepResult
from listener.errors import BudgetExhausted
from listener.ops.metrics import Metrics
from listener.queue.memory_store import MemoryJobStore
from listener.queue.outcomes import Completed, Job
from listener.queue.retry import RetryPolicy
from listener.settings import Price, RateLimit, Settings

T = "public.t"
SHA256 = DedupPolicy()


@dataclass(frozen=True)
class Fetched:
    url: str
    data: bytes
    format: str = "PNG"
    width: int = 10
    height: int = 10


class Fetcher:
    """``http://img/<name>?...`` -> the bytes ``<name>``."""

    async def fetch(self, url: str | None) -> Fetched:
        assert url is not None
        return Fetched(url, url.split("/")[-1].split("?")[0].encode())


class Paid:
    """A provider that counts its calls; its output names the bytes it saw."""

    needs_image = True

    def __init__(self, name: str) -> None:
        self.name = name
        self.calls: list[bytes] = []

    async def start(self) -> None:
        """Nothing to start."""

    async def close(self) -> None:
        """Nothing to close."""

    def estimate_tokens(self, kind: str, image: ImageInput) -> int:
        return 0

    async def run(self, kind: str, image: ImageInput, context: StepContext) -> StepResult:
        self.calls.append(image.data)
        return StepResult(self.name, "", {"saw": image.data.decode()}, "m1", calls=1)


class SpentBudget:
    async def check(self) -> None:
        raise BudgetExhausted("spent")

    def add(self, usd: float) -> None:
        raise AssertionError("nothing is paid")


def make(
    steps: list[Step], *, prices: dict[str, Price], dedup: DedupPolicy | None = SHA256
) -> tuple[Dispatcher, MemoryJobStore, dict[str, Paid]]:
    store = MemoryJobStore(time.monotonic)
    providers = {s.provider: Paid(s.provider) for s in steps}
    slots = {
        name: ProviderSlot.build(p, RateLimit(), LocalLimiter(RateLimit(), time.monotonic))
        for name, p in providers.items()
    }
    run = Dispatcher(
        Plan(tuple(steps)),
        slots,
        Fetcher(),
        store,
        RetryPolicy(5, 600),
        Metrics(time.monotonic),
        lambda: 0.5,
        prices=prices,
        dedup=dedup,
        reuse=MemoryDedupStore(store),
    )
    return run, store, providers


async def analyze(run: Dispatcher, store: MemoryJobStore, row: str, url: str) -> Job:
    assert await store.enqueue(T, row, url) is not None
    (job,) = await store.claim(1, "w", 30.0, uuid.uuid4())
    outcome = await run.run(job)
    assert isinstance(outcome, Completed), outcome
    assert await store.complete([outcome]) == {job.id}
    return job


TIER1 = Step("paid.tier1", "paid", "tier1", 1)
PRICE = {"paid": Price(per_call_usd=0.01)}


async def test_the_same_bytes_are_paid_once_and_copied_at_zero() -> None:
    run, store, providers = make([TIER1], prices=PRICE)
    first = await analyze(run, store, "1", "http://img/a.png")
    copy = await analyze(run, store, "2", "http://img/a.png?other-url")
    other = await analyze(run, store, "3", "http://img/b.png")
    assert providers["paid"].calls == [b"a.png", b"b.png"]
    assert await store.outputs(copy.id) == await store.outputs(first.id)
    snap = await store.snapshot(copy.id)
    assert snap is not None
    assert snap.steps == {"paid.tier1": {"cost_usd": 0.0, "calls": 0, "reused_from": first.id}}
    other_snap = await store.snapshot(other.id)
    assert other_snap is not None
    assert other_snap.steps == {"paid.tier1": {"cost_usd": 0.01, "calls": 1}}
    assert store.dedup_saved == [("paid", 0.01)]


async def test_off_free_steps_and_faces_always_run() -> None:
    faces = Step("rekognition.faces", "rekognition", "faces", 1)
    free = Step("free.tier1", "free", "tier1", 1)
    prices = {**PRICE, "rekognition": Price(per_call_usd=0.001)}
    run, store, providers = make([faces, free], prices=prices)
    await analyze(run, store, "1", "http://img/a.png")
    await analyze(run, store, "2", "http://img/a.png?2")
    assert len(providers["rekognition"].calls) == 2 and len(providers["free"].calls) == 2
    run, store, providers = make([TIER1], prices=PRICE, dedup=None)
    await analyze(run, store, "1", "http://img/a.png")
    await analyze(run, store, "2", "http://img/a.png?2")
    assert len(providers["paid"].calls) == 2 and store.dedup_saved == []


async def test_a_copy_needs_no_budget() -> None:
    run, store, providers = make([TIER1], prices=PRICE)
    await analyze(run, store, "1", "http://img/a.png")
    run._budget = SpentBudget()
    copy = await analyze(run, store, "2", "http://img/a.png?2")
    assert len(providers["paid"].calls) == 1
    assert (await store.outputs(copy.id)) == {"paid.tier1": {"saw": "a.png"}}


def test_phash_hex_becomes_a_signed_bigint() -> None:
    assert phash_int("0000000000000001") == 1
    assert phash_int("ffffffffffffffff") == -1
    assert phash_int("8000000000000000") == -(1 << 63)
    assert phash_int("7fffffffffffffff") == (1 << 63) - 1
    for bad in (None, "", "xyz", "00", "g" * 16, 12):
        assert phash_int(bad) is None
    with pytest.raises(ValueError, match="0 to 3"):
        DedupPolicy("phash", max_distance=4)
    assert DedupPolicy("phash", max_distance=2).near == 2
    assert DedupPolicy("sha256").near is None


def test_estimate_expects_the_reuse_rate_of_the_history() -> None:
    step = Step("rekognition.labels", "rekognition", "labels", 1)
    faces = Step("rekognition.faces", "rekognition", "faces", 1)
    plan = Plan((step, faces))
    history = {
        step.name: StepHistory(100, 0, 0, 1.0, 1.0, reuse_rate=0.25),
        faces.name: StepHistory(100, 0, 0, 2.0, 1.0, reuse_rate=0.25),
    }
    settings = Settings(prices={"rekognition": Price(per_call_usd=0.001)})
    got = estimate(plan, 1000, [], history, settings, {}, dedup=True)
    labels, faced = got.steps
    assert labels.realtime_usd == pytest.approx(1.0)
    assert labels.dedup_usd == pytest.approx(0.25)
    assert faced.dedup_usd == 0  # faces always run
    assert got.dedup_usd == pytest.approx(0.25)
    assert estimate(plan, 1000, [], history, settings, {}).dedup_usd == 0
    # A history of copies only says nothing about calls: the priors stand in.
    only_copies = {step.name: StepHistory(10, 0, 0, 0.0, 1.0, reuse_rate=1.0)}
    labels = estimate(Plan((step,)), 1000, [], only_copies, settings, {}).steps[0]
    assert labels.calls == 1000
