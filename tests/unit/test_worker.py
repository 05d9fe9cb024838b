"""The worker's decisions on the in-memory store: prefetch, lease cap, outcomes, drain.

No database: ``MemoryJobStore`` passes the same conformance suite as the Postgres store, so
what the worker does to it is what it does to Postgres. Tests wait on the worker's signals.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager

from listener.ops.metrics import Metrics
from listener.queue.memory_store import MemoryJobStore
from listener.queue.outcomes import (
    Completed,
    Discarded,
    Job,
    Outcome,
    Parked,
    Retry,
    Snoozed,
)
from listener.queue.worker import UNRECORDED_FACTOR, Worker, WorkerConfig

T = "public.images"


class GatedRunner:
    """Runs each job until its gate opens; ``decide`` picks the outcome."""

    def __init__(self, decide: Callable[[Job], Outcome] | None = None) -> None:
        self.decide = decide or (lambda job: Completed(job))
        self.started: list[int] = []
        self.gates: dict[int, asyncio.Event] = {}
        self.open_all = False

    def gate(self, job_id: int) -> asyncio.Event:
        return self.gates.setdefault(job_id, asyncio.Event())

    def release(self, job_id: int) -> None:
        self.gate(job_id).set()

    async def run(self, job: Job) -> Outcome:
        self.started.append(job.id)
        if not self.open_all:
            await self.gate(job.id).wait()
        return self.decide(job)


async def statuses(store: MemoryJobStore, ids: Sequence[int]) -> dict[int, tuple[str, int]]:
    out = {}
    for job_id in ids:
        snap = await store.snapshot(job_id)
        assert snap is not None
        out[job_id] = (snap.status, snap.attempts)
    return out


@asynccontextmanager
async def running(
    store: MemoryJobStore, runner: GatedRunner, **config: float
) -> AsyncIterator[Worker]:
    values = {
        "concurrency": 3,
        "prefetch": 2,
        "poll_interval_s": 0.01,
        "shutdown_grace_s": 1.0,
        "prefetch_window_s": 0.0,
        "max_prefetch": 1000,
    }
    values.update(config)
    worker = Worker(
        store,
        runner,
        WorkerConfig(
            worker_id="w",
            concurrency=int(values["concurrency"]),
            prefetch=int(values["prefetch"]),
            poll_interval_s=values["poll_interval_s"],
            shutdown_grace_s=values["shutdown_grace_s"],
            prefetch_window_s=values["prefetch_window_s"],
            max_prefetch=int(values["max_prefetch"]),
        ),
        Metrics(time.monotonic),
        lambda: 0.5,
    )
    task = asyncio.create_task(worker.run())
    try:
        yield worker
    finally:
        worker.stop()
        await asyncio.wait_for(task, 10)


async def enqueue(store: MemoryJobStore, n: int) -> list[int]:
    return [await store.enqueue(T, str(i), f"http://x/{i}") or 0 for i in range(n)]


async def test_claims_no_more_than_concurrency_plus_prefetch() -> None:
    store = MemoryJobStore(time.monotonic)
    ids = await enqueue(store, 20)
    runner = GatedRunner()
    async with running(store, runner) as worker:
        await worker.signals.wait("claimed", 5)
        for _ in range(20):  # many polls: none may claim beyond the bound
            await asyncio.sleep(0.01)
        assert worker.signals.count("claimed") == 5
        assert worker.in_flight == 3 and worker.held == 5
        runner.release(runner.started[0])
        await worker.signals.wait("completed", 1)
        await worker.signals.wait("claimed", 6)
        runner.open_all = True
        for gate in runner.gates.values():
            gate.set()
        await worker.signals.wait("completed", 20)
    assert set((await statuses(store, ids)).values()) == {("complete", 1)}


async def test_each_outcome_lands_in_its_state() -> None:
    store = MemoryJobStore(time.monotonic)
    done, retried, snoozed, discarded, parked = await enqueue(store, 5)
    kinds: dict[int, Callable[[Job], Outcome]] = {
        done: lambda j: Completed(j),
        retried: lambda j: Retry(j, "HTTP 500", 3600),
        snoozed: lambda j: Snoozed(j, "429", 3600),
        discarded: lambda j: Discarded(j, "HTTP 404"),
        parked: lambda j: Parked(j, "openai.tier1"),
    }
    runner = GatedRunner(lambda job: kinds[job.id](job))
    runner.open_all = True
    async with running(store, runner) as worker:
        for signal in ("completed", "retried", "snoozed", "discarded", "parked"):
            await worker.signals.wait(signal, 1)  # type: ignore[arg-type]
    assert await statuses(store, [done, retried, snoozed, discarded, parked]) == {
        done: ("complete", 1),
        retried: ("pending", 1),
        snoozed: ("pending", 0),
        discarded: ("failed", 1),
        parked: ("batched", 0),
    }


async def test_drain_finishes_running_jobs_and_hands_buffered_ones_back() -> None:
    store = MemoryJobStore(time.monotonic)
    ids = await enqueue(store, 5)
    runner = GatedRunner()
    async with running(store, runner) as worker:
        await worker.signals.wait("claimed", 5)
        while worker.in_flight < 3:
            await asyncio.sleep(0.005)
        worker.stop()
        for job_id in list(runner.started):
            runner.release(job_id)
    states = await statuses(store, ids)
    ran = set(runner.started)
    assert {states[i] for i in ran} == {("complete", 1)}
    # Never started: handed back with the attempt given back, runnable at once.
    assert {states[i] for i in set(ids) - ran} == {("pending", 0)}
    assert worker.signals.count("released") == 2


async def test_jobs_that_outlive_the_grace_period_are_released_not_charged() -> None:
    store = MemoryJobStore(time.monotonic)
    ids = await enqueue(store, 2)
    runner = GatedRunner()  # never released
    async with running(store, runner, shutdown_grace_s=0.05) as worker:
        while worker.in_flight < 2:
            await asyncio.sleep(0.005)
    assert set((await statuses(store, ids)).values()) == {("pending", 0)}


class StalledStore(MemoryJobStore):
    """A store whose completions hang, like a database that stopped answering writes."""

    def __init__(self) -> None:
        super().__init__(time.monotonic)
        self.unstall = asyncio.Event()

    async def complete(self, done: Sequence[Completed]) -> set[int]:
        await self.unstall.wait()
        return await super().complete(done)


async def test_claiming_stops_while_writes_stall() -> None:
    store = StalledStore()
    ids = await enqueue(store, 200)
    runner = GatedRunner()
    runner.open_all = True
    bound = UNRECORDED_FACTOR * (3 + 2)
    async with running(store, runner) as worker:
        await worker.signals.wait("claimed", bound)
        for _ in range(30):
            await asyncio.sleep(0.01)
        # Leases held in memory stay bounded while nothing can be recorded.
        assert worker.held <= bound and worker.signals.count("claimed") <= bound
        store.unstall.set()
        await worker.signals.wait("completed", 200)
    assert set((await statuses(store, ids)).values()) == {("complete", 1)}


async def test_an_outcome_whose_lease_was_lost_is_not_recorded() -> None:
    store = MemoryJobStore(time.monotonic)
    (job_id,) = await enqueue(store, 1)
    runner = GatedRunner()
    async with running(store, runner) as worker:
        await worker.signals.wait("claimed", 1)
        from listener.queue.store import JobFilter

        assert await store.cancel(JobFilter(())) == [job_id]
        runner.release(job_id)
        while worker.held:
            await asyncio.sleep(0.005)
        assert worker.signals.count("completed") == 0
    assert await statuses(store, [job_id]) == {job_id: ("cancelled", 1)}


class ClaimSizes(MemoryJobStore):
    """Records how many jobs each claim asked for."""

    def __init__(self) -> None:
        super().__init__(time.monotonic)
        self.asked: list[int] = []

    async def claim(
        self, limit: int, worker_id: str, lease_s: float, token: uuid.UUID, *, admit: bool = False
    ) -> list[Job]:
        self.asked.append(limit)
        return await super().claim(limit, worker_id, lease_s, token, admit=admit)


async def test_quick_jobs_grow_the_prefetch_up_to_its_bound() -> None:
    """Jobs that finish in no time: claims grow past concurrency + prefetch (fewer, larger
    claims, each one commit) but never past concurrency + max_prefetch."""
    store = ClaimSizes()
    ids = await enqueue(store, 3000)
    runner = GatedRunner()
    runner.open_all = True
    async with running(store, runner, max_prefetch=40, prefetch_window_s=1.0) as worker:
        await worker.signals.wait("completed", 3000)
    assert set((await statuses(store, ids)).values()) == {("complete", 1)}
    assert max(store.asked) > 3 + 2
    assert max(store.asked) <= 3 + 40


async def test_slow_jobs_keep_the_configured_prefetch() -> None:
    """Jobs that wait on their gate: the worker never holds more than concurrency +
    prefetch, however long it polls."""
    store = ClaimSizes()
    await enqueue(store, 100)
    runner = GatedRunner()
    async with running(store, runner, prefetch_window_s=1.0) as worker:
        await worker.signals.wait("claimed", 5)
        for _ in range(30):
            await asyncio.sleep(0.01)
        assert worker.prefetch == 2
        assert worker.held == 5
        runner.open_all = True
        for gate in runner.gates.values():
            gate.set()


class CompletesSlowly(MemoryJobStore):
    """A store whose completion commits, then takes its time to answer: as a flush whose
    first statement has committed while the next ones run."""

    def __init__(self) -> None:
        super().__init__(time.monotonic)
        self.committed = asyncio.Event()
        self.answer = asyncio.Event()

    async def complete(self, done: Sequence[Completed]) -> set[int]:
        ids = await super().complete(done)
        self.committed.set()
        await self.answer.wait()
        return ids


@asynccontextmanager
async def warnings() -> AsyncIterator[list[str]]:
    """The worker's warnings logged meanwhile."""
    from loguru import logger

    lines: list[str] = []
    sink = logger.add(lambda m: lines.append(str(m.record["message"])), level="WARNING")
    try:
        yield lines
    finally:
        logger.remove(sink)


async def test_a_heartbeat_during_a_flush_reports_no_lost_lease() -> None:
    """A job completed (committed) but still held until the flush returns is not renewed:
    that is not a lost lease, and nothing is logged."""
    store = CompletesSlowly()
    (job_id,) = await enqueue(store, 1)
    runner = GatedRunner()
    runner.open_all = True
    async with warnings() as lines, running(store, runner) as worker:
        await asyncio.wait_for(store.committed.wait(), 5)
        assert worker.held == 1
        await worker.heartbeat()
        store.answer.set()
        await worker.signals.wait("completed", 1)
    assert not [line for line in lines if "was lost" in line], lines
    assert await statuses(store, [job_id]) == {job_id: ("complete", 1)}


async def test_a_running_job_whose_lease_was_taken_is_reported() -> None:
    store = MemoryJobStore(time.monotonic)
    (job_id,) = await enqueue(store, 1)
    runner = GatedRunner()
    async with warnings() as lines, running(store, runner) as worker:
        await worker.signals.wait("claimed", 1)
        while worker.in_flight < 1:
            await asyncio.sleep(0.005)
        from listener.queue.store import JobFilter

        assert await store.cancel(JobFilter(())) == [job_id]
        await worker.heartbeat()
        runner.release(job_id)
    assert f"lease of job {job_id} was lost (expired and reclaimed)" in lines
