"""The Batch API path fenced by batch: no transaction while a batch is prepared, nothing
written to a job that left its batch (cancelled, new URL), empty batches cancelled at OpenAI,
abandoned preparations handed back. Real Postgres, the OpenAI fake through the real SDK."""

from __future__ import annotations

import asyncio
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from typing import Any

import asyncpg
import pytest
from aiohttp import web
from awaiting import jobs_finished, loop_signals, when
from support import counts, make_table, serving
from test_batch import backfill_batch, batch_settings

from listener.analysis.batch_store import PgBatchStore
from listener.app import Daemon
from listener.cli.demo import BUNDLED_IMAGES
from listener.queue.loops import LoopSignals
from listener.queue.outcomes import Parked
from listener.queue.pg_store import PgJobStore
from listener.queue.store import JobFilter
from listener.settings import BatchSettings
from listener.testing.openai_fake import FakeOpenAI

STEP = "openai.tier1"


class Images:
    """Serves one JPEG at every path; with ``hold`` set, the second and later fetches of a
    URL (the batch manager's: the worker fetched it once before parking the job) wait for
    ``release``."""

    def __init__(self) -> None:
        self.data = (BUNDLED_IMAGES / "rocket.jpg").read_bytes()
        self.base_url = ""
        self.hold = False
        self.held = asyncio.Event()
        self.release = asyncio.Event()
        self.seen: Counter[str] = Counter()
        self._stack = AsyncExitStack()

    async def _image(self, request: web.Request) -> web.Response:
        self.seen[str(request.rel_url)] += 1
        if self.hold and self.seen[str(request.rel_url)] > 1:
            self.held.set()
            await self.release.wait()
        return web.Response(body=self.data, content_type="image/jpeg")

    async def __aenter__(self) -> Images:
        app = web.Application()
        app.router.add_get("/{name:.*}", self._image)
        self.base_url = await self._stack.enter_async_context(
            serving(app, access_log=None, shutdown_timeout=0.5)
        )
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.release.set()
        await self._stack.aclose()


@pytest.fixture
async def images() -> AsyncIterator[Images]:
    async with Images() as server:
        yield server


async def load(conn: asyncpg.Connection, base_url: str, n: int, bob: int = 0) -> str:
    """``n`` rows of ``public.images`` (the first ``bob`` owned by bob), attached."""
    table = await make_table(conn, owner=True, attach=False)
    await conn.execute(
        f"INSERT INTO {table} (url, owner_id) "
        "SELECT $1 || g, CASE WHEN g <= $3 THEN 'bob' ELSE 'alice' END "
        "FROM generate_series(1, $2) g",
        f"{base_url}/rocket.jpg?n=",
        n,
        bob,
    )
    await conn.execute("SELECT listener.attach($1, 'id', 'url', 'owner_id')", table)
    return table


async def in_flight(conn: asyncpg.Connection) -> list[dict[str, Any]]:
    rows = await conn.fetch(
        "SELECT id, provider_batch_id FROM listener.batches "
        "WHERE provider_batch_id IS NOT NULL AND applied_at IS NULL"
    )
    return [dict(r) for r in rows]


async def bob_jobs(conn: asyncpg.Connection) -> list[asyncpg.Record]:
    return list(
        await conn.fetch(
            "SELECT j.id, j.status, (SELECT count(*) FROM listener.results AS r "
            "WHERE r.job_id = j.id) AS results FROM listener.jobs AS j WHERE owner_id = 'bob'"
        )
    )


def batch_loop(daemon: Daemon) -> LoopSignals:
    """The signals of the daemon's batch loop (submits, polls, applies)."""
    return loop_signals(daemon, "batches")


async def test_preparing_a_batch_holds_no_transaction_or_lock(
    database_url: str, conn: asyncpg.Connection, images: Images
) -> None:
    table = await load(conn, images.base_url, 25, bob=1)
    images.hold = True
    async with FakeOpenAI() as fake:
        async with Daemon(batch_settings(database_url, fake)) as daemon:
            try:
                assert await backfill_batch(database_url, table) == 25
                await asyncio.wait_for(images.held.wait(), 30)
                # The batch manager is fetching images: no session waits inside a
                # transaction, and its jobs are not locked (the lock used to last for the
                # whole upload).
                idle = await conn.fetchval(
                    "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                    "AND state LIKE 'idle in transaction%'"
                )
                assert idle == 0
                async with conn.transaction():
                    locked = await conn.fetch(
                        "SELECT id FROM listener.jobs WHERE status = 'batched' FOR UPDATE NOWAIT"
                    )
                assert len(locked) == 25
                # An operator cancels bob's job meanwhile: it is not waited for, and the
                # batch never writes to it.
                pool = await asyncpg.create_pool(database_url, min_size=1, max_size=1)
                try:
                    cancelled = await asyncio.wait_for(
                        PgJobStore(pool).cancel(JobFilter(statuses=("batched",), owner="bob")), 5
                    )
                finally:
                    await pool.close()
                assert len(cancelled) == 1
            finally:
                images.release.set()  # never leave the daemon waiting on an image
            await jobs_finished(daemon, conn, 25, timeout=60)
        assert len(fake.requests) == 0
    assert await counts(conn) == {"complete": 24, "cancelled": 1}
    assert [(r["status"], r["results"]) for r in await bob_jobs(conn)] == [("cancelled", 0)]


async def test_job_cancelled_while_its_batch_runs_gets_nothing_from_it(
    database_url: str, conn: asyncpg.Connection, images: Images
) -> None:
    table = await load(conn, images.base_url, 20, bob=2)
    async with FakeOpenAI() as fake:
        fake.batch_duration_s = 2.0
        async with Daemon(batch_settings(database_url, fake)) as daemon:
            assert await backfill_batch(database_url, table) == 20
            await when(lambda: _any(in_flight(conn)), batch_loop(daemon), "ticked", timeout=30)
            pool = await asyncpg.create_pool(database_url, min_size=1, max_size=1)
            try:
                store = PgJobStore(pool)
                assert len(await store.cancel(JobFilter(statuses=("batched",), owner="bob"))) == 2
            finally:
                await pool.close()
            await jobs_finished(daemon, conn, 20, timeout=60)
    assert await counts(conn) == {"complete": 18, "cancelled": 2}
    assert [(r["status"], r["results"]) for r in await bob_jobs(conn)] == [("cancelled", 0)] * 2
    assert await conn.fetchval("SELECT count(DISTINCT job_id) FROM listener.results") == 18


async def test_new_url_takes_the_job_out_of_its_batch(
    database_url: str, conn: asyncpg.Connection, images: Images
) -> None:
    table = await load(conn, images.base_url, 20, bob=1)
    async with FakeOpenAI() as fake:
        fake.batch_duration_s = 3.0
        async with Daemon(batch_settings(database_url, fake)) as daemon:
            assert await backfill_batch(database_url, table) == 20
            await when(lambda: _any(in_flight(conn)), batch_loop(daemon), "ticked", timeout=30)
            (first,) = await in_flight(conn)
            fake.batch_duration_s = 600.0  # the next batch (the new image's) stays open
            job_id = await conn.fetchval("SELECT id FROM listener.jobs WHERE owner_id = 'bob'")
            assert (
                await conn.fetchval("SELECT batch_id FROM listener.jobs WHERE id = $1", job_id)
                == first["id"]
            )
            await conn.execute(
                f"UPDATE {table} SET url = $1 WHERE owner_id = 'bob'",
                f"{images.base_url}/rocket.jpg?new=1",
            )

            async def first_applied() -> bool:
                return bool(
                    await conn.fetchval(
                        "SELECT applied_at IS NOT NULL FROM listener.batches WHERE id = $1",
                        first["id"],
                    )
                )

            await when(first_applied, batch_loop(daemon), "ticked", timeout=30)
            job = await conn.fetchrow(
                "SELECT status, batch_id, image_url, (SELECT count(*) FROM listener.results "
                "AS r WHERE r.job_id = j.id) AS results FROM listener.jobs AS j WHERE id = $1",
                job_id,
            )
            others = await conn.fetchval(
                "SELECT count(*) FROM listener.results AS r JOIN listener.jobs AS j "
                "ON j.id = r.job_id WHERE j.owner_id = 'alice'"
            )
    # The old image's answer is not the new image's: the job got nothing from the first
    # batch and runs again (it waits for, or is in, a later batch).
    assert job["results"] == 0
    assert job["image_url"].endswith("?new=1")
    assert job["status"] in ("pending", "processing", "batched")
    assert job["batch_id"] != first["id"]
    assert others == 19


async def test_batch_every_job_left_is_cancelled_at_openai_and_closed(
    database_url: str, conn: asyncpg.Connection, images: Images
) -> None:
    table = await load(conn, images.base_url, 20, bob=20)
    async with FakeOpenAI() as fake:
        fake.batch_next_outcome = ["cancelled"]  # runs until someone cancels it
        async with Daemon(batch_settings(database_url, fake)) as daemon:
            assert await backfill_batch(database_url, table) == 20
            await when(lambda: _any(in_flight(conn)), batch_loop(daemon), "ticked", timeout=30)
            (batch,) = await in_flight(conn)
            pool = await asyncpg.create_pool(database_url, min_size=1, max_size=1)
            try:
                store = PgJobStore(pool)
                assert len(await store.cancel(JobFilter(statuses=("batched",), owner="bob"))) == 20
            finally:
                await pool.close()

            async def closed() -> bool:
                return not await in_flight(conn)

            await when(closed, batch_loop(daemon), "ticked", timeout=30)
        provider_status = fake.batches[batch["provider_batch_id"]]["status"]
    assert provider_status in ("cancelling", "cancelled")
    row = await conn.fetchrow("SELECT status, applied_at FROM listener.batches")
    assert row["status"] in ("cancelling", "cancelled") and row["applied_at"] is not None
    assert await counts(conn) == {"cancelled": 20}
    assert await conn.fetchval("SELECT count(*) FROM listener.results") == 0


async def test_preparation_abandoned_by_a_dead_daemon_hands_its_jobs_back(
    database_url: str, conn: asyncpg.Connection, images: Images
) -> None:
    table = await load(conn, images.base_url, 5)
    assert await backfill_batch(database_url, table) == 5
    pool = await asyncpg.create_pool(database_url, min_size=1, max_size=2)
    try:
        # A daemon parks the jobs, takes them into a batch, and dies before the upload.
        store = PgJobStore(pool)
        jobs = await store.claim(10, "dead", 60.0, uuid.uuid4())
        assert await store.park([Parked(j, STEP) for j in jobs])
        assert len(await PgBatchStore(pool).take_for_batch(STEP, 100, "lb_dead")) == 5
    finally:
        await pool.close()
    async with FakeOpenAI() as fake:
        settings = batch_settings(
            database_url,
            fake,
            batch=BatchSettings(
                min_requests=5, max_wait_s=0.5, poll_interval_s=0.3, abandon_after_s=1.0
            ),
        )
        async with Daemon(settings) as daemon:
            await jobs_finished(daemon, conn, 5, timeout=60)
    assert await counts(conn) == {"complete": 5}
    dead = await conn.fetchrow(
        "SELECT status, applied_at FROM listener.batches WHERE id = 'lb_dead'"
    )
    assert dead["status"] == "abandoned" and dead["applied_at"] is not None


async def _any(rows: Any) -> bool:
    return bool(await rows)


async def test_a_slow_preparation_keeps_its_batch_alive(
    database_url: str, conn: asyncpg.Connection, images: Images
) -> None:
    table = await load(conn, images.base_url, 5)
    images.hold = True
    async with FakeOpenAI() as fake:
        settings = batch_settings(
            database_url,
            fake,
            batch=BatchSettings(
                min_requests=5, max_wait_s=0.5, poll_interval_s=0.3, abandon_after_s=0.6
            ),
        )
        pool = await asyncpg.create_pool(database_url, min_size=1, max_size=2)
        try:
            async with Daemon(settings) as daemon:
                try:
                    assert await backfill_batch(database_url, table) == 5
                    await asyncio.wait_for(images.held.wait(), 30)
                    # A fetch outlasts abandon_after_s several times over; another daemon's
                    # sweep must still see the preparation alive (its heartbeat runs beside
                    # the fetches and the upload).
                    swept = []
                    for _ in range(10):
                        swept += await PgBatchStore(pool).sweep_abandoned_batches(0.6)
                        await asyncio.sleep(0.2)
                    assert swept == []
                finally:
                    images.release.set()
                await jobs_finished(daemon, conn, 5, timeout=60)
        finally:
            await pool.close()
    assert await counts(conn) == {"complete": 5}
    statuses = await conn.fetch("SELECT status FROM listener.batches")
    assert {r["status"] for r in statuses} == {"completed"}  # none abandoned
