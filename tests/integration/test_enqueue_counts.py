"""The enqueue trigger counts the jobs it inserts (0017): one statement writes the jobs and
their count, the generic count trigger stays out of its way, and every other insert of jobs
is still counted; migrate brings tables attached before to the new trigger."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import asyncpg
import pytest
from support import make_table
from test_status_counts import assert_exact

from listener.db.migrate import migrate


async def delta_rows(conn: asyncpg.Connection) -> int:
    return int(await conn.fetchval("SELECT count(*) FROM listener.job_count_deltas"))


async def test_enqueued_jobs_are_counted_once_per_statement_and_owner(
    conn: asyncpg.Connection,
) -> None:
    await make_table(conn, "photos", owner=True)
    await make_table(conn, "scans")  # no owner column
    # A single-row insert: one job, one delta row (not a second one from jobs_count_insert).
    await conn.execute("INSERT INTO scans (url) VALUES ('http://img/s.jpg')")
    assert await delta_rows(conn) == 1
    await conn.execute("INSERT INTO photos (url, owner_id) VALUES ('http://img/p.jpg', 'ann')")
    assert await delta_rows(conn) == 2
    # A multi-row insert over three owners (one of them NULL): one delta row per owner.
    await conn.execute(
        "INSERT INTO photos (url, owner_id) SELECT 'http://img/p' || g || '.jpg', "
        "CASE g % 3 WHEN 0 THEN 'ann' WHEN 1 THEN 'bob' END FROM generate_series(1, 30) g"
    )
    assert await delta_rows(conn) == 5
    await conn.execute(
        "INSERT INTO scans (url) SELECT 'http://img/s' || g FROM generate_series(1, 20) g"
    )
    assert await delta_rows(conn) == 6
    await assert_exact(conn)

    # A row whose job already exists (deleted and inserted again with its id): no job, no
    # delta, no NOTIFY.
    await conn.execute("DELETE FROM scans WHERE id = 1")
    await conn.execute(
        "INSERT INTO scans (id, url) OVERRIDING SYSTEM VALUE VALUES (1, 'http://img/again.jpg')"
    )
    assert await delta_rows(conn) == 6
    await assert_exact(conn)


async def test_other_inserts_of_jobs_are_still_counted(conn: asyncpg.Connection) -> None:
    await make_table(conn, "photos", owner=True)
    await conn.execute(
        "INSERT INTO listener.jobs (source_table, source_id, owner_id) VALUES ('x', '1', 'o')"
    )
    # A session that sets the enqueue function's setting by hand is still counted: the
    # setting is only trusted inside a trigger.
    await conn.execute("SET listener.enqueue_counts = 'on'")
    await conn.execute(
        "INSERT INTO listener.jobs (source_table, source_id, owner_id) VALUES ('x', '2', 'o')"
    )
    await conn.execute("INSERT INTO photos (url, owner_id) VALUES ('http://img/1.jpg', 'a')")
    await conn.execute("RESET listener.enqueue_counts")
    # The URL-change trigger's upsert: a row whose job was deleted gets a new one.
    await conn.execute("DELETE FROM listener.jobs WHERE source_table = 'public.photos'")
    await conn.execute("UPDATE photos SET url = 'http://img/2.jpg'")
    # Backfill of rows without a job.
    await conn.execute("DELETE FROM listener.jobs WHERE source_table = 'public.photos'")
    await conn.execute(
        "SELECT * FROM listener.backfill_ids('public.photos', "
        "ARRAY(SELECT id::text FROM photos), 100, 5, false)"
    )
    assert await conn.fetchval("SELECT count(*) FROM listener.jobs") == 3
    await assert_exact(conn)


@pytest.fixture
async def db_before_0017(database_before: Callable[[int], Awaitable[str]]) -> str:
    """A database migrated with every migration before 0017."""
    return await database_before(17)


async def test_migrate_gives_tables_attached_before_the_counting_trigger(
    db_before_0017: str,
) -> None:
    conn = await asyncpg.connect(db_before_0017)
    try:
        table = await make_table(conn, "photos", owner=True)
        await conn.execute(
            "INSERT INTO photos (url, owner_id) SELECT 'http://img/' || g, 'o' || (g % 2) "
            "FROM generate_series(1, 4) g"
        )
        source = "SELECT prosrc FROM pg_proc WHERE proname = 'enqueue_insert_' || $1::regclass::oid"
        assert "job_count_deltas" not in await conn.fetchval(source, table)

        assert "0017_cheaper_enqueue" in await migrate(conn)

        assert "job_count_deltas" in await conn.fetchval(source, table)
        before = await delta_rows(conn)
        await conn.execute("INSERT INTO photos (url, owner_id) VALUES ('http://img/x', 'o1')")
        assert await delta_rows(conn) == before + 1
        await assert_exact(conn)
    finally:
        await conn.close()
