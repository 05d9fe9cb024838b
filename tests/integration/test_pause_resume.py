"""`listener resume` runs the jobs a paused provider held at once, on every daemon.

The daemons here poll every 30 s (``POLL_S``), so their cached readings of the pauses outlive
the `listener resume` subprocess: the jobs finish within the tests' few seconds only if the
resume's notification, or for a daemon that missed it a fresh reading before a job is held,
makes them run. Below, a resume and a snooze of a job by the pause it lifts, at the same time,
never leave the job held.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator

import asyncpg
import pytest
from awaiting import jobs_finished, when_any
from support import (
    RecordingProvider,
    admit,
    all_finished,
    cli_async,
    counts,
    fast_settings,
    make_table,
)

from listener.app import Daemon
from listener.db.queries import load_queries
from listener.queue.outcomes import Job, Snoozed
from listener.queue.pg_store import PgJobStore

POLL_S = 30.0
"""The daemons' poll interval (and pause cache), far longer than any wait below."""


def pipeline() -> list[RecordingProvider]:
    """Two steps: ``first``, then ``second`` (the provider paused)."""
    first, second = RecordingProvider(), RecordingProvider()
    first.name, second.name = "first", "second"
    return [first, second]


async def far_held(conn: asyncpg.Connection) -> int:
    """Jobs waiting more than a minute."""
    return int(
        await conn.fetchval(
            "SELECT count(*) FROM listener.jobs WHERE run_after > now() + interval '1 minute'"
        )
    )


async def test_resume_runs_the_held_jobs_at_once(
    database_url: str, conn: asyncpg.Connection, env_for_subprocess: dict[str, str]
) -> None:
    table = await make_table(conn)
    await cli_async(env_for_subprocess, "pause", "second", ok=True)
    providers = pipeline()
    settings = fast_settings(database_url, poll_interval_s=POLL_S)
    async with Daemon(settings, providers=providers, health=False) as daemon:
        await conn.execute(f"INSERT INTO {table} (url) VALUES ('a'), ('b')")
        await daemon.signals.wait("snoozed", 2, timeout=10)
        assert await far_held(conn) == 2 and providers[1].calls == []
        resumed = await cli_async(env_for_subprocess, "resume", "second", ok=True)
        assert "resumed second; 2 jobs woken" in resumed.stdout
        await jobs_finished(daemon, conn, 2, timeout=10)
        assert daemon.signals.count("snoozed") == 2  # none held again
    assert sorted(providers[1].calls) == ["1", "2"]
    assert await counts(conn) == {"complete": 2} and await far_held(conn) == 0


async def test_resume_runs_the_held_jobs_at_once_on_every_daemon(
    database_url: str, conn: asyncpg.Connection, env_for_subprocess: dict[str, str]
) -> None:
    table = await make_table(conn)
    await cli_async(env_for_subprocess, "pause", "second", ok=True)
    settings = fast_settings(database_url, poll_interval_s=POLL_S)
    async with (
        Daemon(settings, providers=pipeline(), health=False) as one,
        Daemon(settings, providers=pipeline(), health=False) as two,
    ):
        daemons = (one, two)
        for daemon in daemons:  # each has read the pause, whichever claims the jobs
            assert daemon.pauses is not None and "second" in await daemon.pauses.pauses()
        await conn.execute(f"INSERT INTO {table} (url) SELECT 'u' FROM generate_series(1, 6)")
        snoozed = [(d.signals, "snoozed") for d in daemons]
        await when_any(
            lambda: asyncio.sleep(0, sum(d.signals.count("snoozed") for d in daemons) == 6),
            snoozed,
            timeout=10,
        )
        await cli_async(env_for_subprocess, "resume", "second", ok=True)
        finished = [(d.signals, "finished") for d in daemons]
        await when_any(lambda: all_finished(conn, 6), finished, timeout=10)
        assert sum(d.signals.count("snoozed") for d in daemons) == 6  # none held again
    assert await counts(conn) == {"complete": 6} and await far_held(conn) == 0


async def test_a_daemon_that_missed_the_resume_runs_the_woken_jobs(
    database_url: str, conn: asyncpg.Connection
) -> None:
    """The jobs are woken with a plain notification, not ``"pauses"`` (as a daemon whose
    LISTEN connection was down finds them on its next poll): its cached reading still says
    paused, and the check reads the pauses again before it holds a job for the day."""
    table = await make_table(conn)
    await conn.execute("INSERT INTO listener.pauses (provider) VALUES ('second')")
    providers = pipeline()
    settings = fast_settings(database_url, poll_interval_s=POLL_S)
    async with Daemon(settings, providers=providers, health=False) as daemon:
        await conn.execute(f"INSERT INTO {table} (url) VALUES ('a'), ('b')")
        await daemon.signals.wait("snoozed", 2, timeout=10)
        async with conn.transaction():
            await conn.execute("DELETE FROM listener.pauses")
            await conn.execute(
                "UPDATE listener.jobs SET run_after = now(), held_by = NULL "
                "WHERE held_by = 'second'"
            )
            await conn.execute("SELECT pg_notify('listener_jobs', '')")
        await jobs_finished(daemon, conn, 2, timeout=10)
        assert daemon.signals.count("snoozed") == 2
    assert sorted(providers[1].calls) == ["1", "2"] and await far_held(conn) == 0


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
