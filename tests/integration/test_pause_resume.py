"""`listener resume` runs the jobs a paused provider held at once, on every daemon: a resume
and a snooze of a job by the pause it lifts, at the same time, never leave the job held."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator

import asyncpg
import pytest
from support import admit, make_table

from listener.db.queries import load_queries
from listener.queue.outcomes import Job, Snoozed
from listener.queue.pg_store import PgJobStore

# -- a snooze and a resume at the same time ------------------------------------------------


@pytest.fixture
async def store(database_url: str) -> AsyncIterator[PgJobStore]:
    async with asyncpg.create_pool(database_url, min_size=1, max_size=2) as pool:
        yield PgJobStore(pool)


async def running_job(conn: asyncpg.Connection) -> tuple[int, uuid.UUID]:
    """One job of a new row, leased as a daemon's claim leaves it: (id, lease token)."""
    table = await make_table(conn)
    await conn.execute(f"INSERT INTO {table} (url) VALUES ('a')")
    await admit(conn)
    token = uuid.uuid4()
    job_id = await conn.fetchval(
        "UPDATE listener.jobs SET status = 'processing', lease_token = $1, attempts = 1, "
        "lease_expires_at = now() + interval '1 minute' RETURNING id",
        token,
    )
    return int(job_id), token


async def snooze(conn: asyncpg.Connection, job_id: int, token: uuid.UUID) -> list[int]:
    """The daemon's snooze of the job, held by the pause of ``second`` for a day."""
    rows = await conn.fetch(
        load_queries()["snooze_jobs"].sql,
        [job_id],
        [token],
        [86400.0],
        ["paused by operator: second"],
        ["second"],
    )
    return [r["id"] for r in rows]


async def wait_s(conn: asyncpg.Connection) -> float:
    return float(
        await conn.fetchval("SELECT extract(epoch FROM run_after - now()) FROM listener.jobs")
    )


async def test_a_resume_waits_for_a_snooze_under_way_and_wakes_its_job(
    conn: asyncpg.Connection, store: PgJobStore, database_url: str
) -> None:
    job_id, token = await running_job(conn)
    await store.pause("second", None, None)
    daemon = await asyncpg.connect(database_url)
    try:
        async with daemon.transaction():  # the snooze, not yet committed
            assert await snooze(daemon, job_id, token) == [job_id]
            resuming = asyncio.create_task(store.resume("second"))
            await asyncio.sleep(0.3)
            assert not resuming.done()  # its delete waits for the snooze's lock
        assert await resuming == (True, 1)
    finally:
        await daemon.close()
    assert await wait_s(conn) < 1
    assert await conn.fetchval("SELECT held_by FROM listener.jobs") is None


async def test_a_snooze_after_a_resume_under_way_does_not_hold_its_job(
    conn: asyncpg.Connection, store: PgJobStore
) -> None:
    job_id, token = await running_job(conn)
    await store.pause("second", None, None)
    async with conn.transaction():  # the resume's delete, not yet committed
        await conn.execute("DELETE FROM listener.pauses WHERE provider = 'second'")
        job = Job(job_id, "public.images", "1", "a", None, 0, 1, 5, token)
        held = Snoozed(job, "paused by operator: second", 86400.0, "second")
        snoozing = asyncio.create_task(store.snooze([held]))
        await asyncio.sleep(0.3)
        assert not snoozing.done()  # it waits for the pause's row
    assert await snoozing == {job_id}
    assert await wait_s(conn) < 1
    assert await conn.fetchval("SELECT held_by FROM listener.jobs") is None
