"""The app's INSERT only appends to listener.inserted_rows (0019); the daemon admits the jobs.

What the app's transaction does, what admission makes of each entry (the row as it is then),
and the race of an admission with the app deleting the row. Real Postgres throughout.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable

import asyncpg
import pytest
from support import RecordingProvider, admit, fast_settings, make_table
from test_status_counts import assert_exact

from listener.app import Daemon
from listener.app_side.deletes import DeleteDrain
from listener.db.migrate import migrate
from listener.db.queries import Queries
from listener.queue.pg_store import PgJobStore


async def entries(conn: asyncpg.Connection) -> list[tuple[str, str]]:
    rows = await conn.fetch(
        "SELECT source_table, source_id FROM listener.inserted_rows ORDER BY id"
    )
    return [(r["source_table"], r["source_id"]) for r in rows]


async def jobs(conn: asyncpg.Connection) -> list[tuple[str, str | None, str | None, str]]:
    rows = await conn.fetch(
        "SELECT source_id, image_url, owner_id, status FROM listener.jobs ORDER BY source_id"
    )
    return [(r["source_id"], r["image_url"], r["owner_id"], r["status"]) for r in rows]


async def test_an_insert_appends_entries_and_one_notify_per_statement(
    database_url: str, conn: asyncpg.Connection
) -> None:
    table = await make_table(conn, "photos", owner=True)
    heard: list[str] = []
    listener = await asyncpg.connect(database_url)
    try:
        await listener.add_listener("listener_jobs", lambda *args: heard.append(args[3]))
        await conn.execute(
            "INSERT INTO photos (url, owner_id) "
            "SELECT 'http://img/' || g || '.jpg', 'ann' FROM generate_series(1, 3) g"
        )
        await conn.execute("INSERT INTO photos (url) VALUES ('http://img/4.jpg')")
        await asyncio.sleep(0.3)
    finally:
        await listener.close()
    # No job is written in the app's transaction: the entries wait for a daemon.
    assert await entries(conn) == [(table, "1"), (table, "2"), (table, "3"), (table, "4")]
    assert await conn.fetchval("SELECT count(*) FROM listener.jobs") == 0
    assert heard == ["inserted", "inserted"]  # wakes the claim only
    # Status counts them as pending before any daemon ran, per table too.
    queries = Queries(conn)  # type: ignore[arg-type]
    assert (await queries.queue_counts()).pending == 4
    assert [(r["table"], r["pending"]) for r in await queries.counts_by_table()] == [(table, 4)]

    assert await admit(conn) == 4
    assert await entries(conn) == []
    assert await jobs(conn) == [
        ("1", "http://img/1.jpg", "ann", "pending"),
        ("2", "http://img/2.jpg", "ann", "pending"),
        ("3", "http://img/3.jpg", "ann", "pending"),
        ("4", "http://img/4.jpg", None, "pending"),
    ]
    assert (await queries.queue_counts()).pending == 4
    await assert_exact(conn)


async def test_admission_takes_each_row_as_it_is_then(conn: asyncpg.Connection) -> None:
    table = await make_table(conn, "photos", owner=True, status=True)
    await conn.execute(
        "INSERT INTO photos (url, owner_id) "
        "SELECT 'http://img/' || g || '.jpg', 'ann' FROM generate_series(1, 4) g"
    )
    # Row 1 deleted before admission: no job, and nothing left to do for its entry.
    await conn.execute("DELETE FROM photos WHERE id = 1")
    # Row 2's URL changed before admission: the URL-change trigger made its job; admission
    # leaves that newer job alone (one job, the new URL, not queued as reinserted).
    await conn.execute("UPDATE photos SET url = 'http://img/2b.jpg' WHERE id = 2")
    # Row 3's owner changed: admission reads the owner the row has now.
    await conn.execute("UPDATE photos SET owner_id = 'bob' WHERE id = 3")
    assert await admit(conn) == 4
    assert await jobs(conn) == [
        ("2", "http://img/2b.jpg", "ann", "pending"),
        ("3", "http://img/3.jpg", "bob", "pending"),
        ("4", "http://img/4.jpg", "ann", "pending"),
    ]
    assert await conn.fetchval("SELECT count(*) FROM listener.deleted_rows WHERE reinserted") == 0
    # The status column of each admitted row says pending (the write-back outbox).
    assert await conn.fetchval(
        "SELECT array_agg(DISTINCT j.source_id ORDER BY j.source_id) FROM listener.status_outbox o "
        "JOIN listener.jobs j ON j.id = o.job_id WHERE j.source_id IN ('3', '4')"
    ) == ["3", "4"]
    await assert_exact(conn)
    # Entries of a table no longer attached are dropped.
    await conn.execute("INSERT INTO photos (url) VALUES ('http://img/5.jpg')")
    await conn.execute("SELECT listener.detach($1)", table)
    jobs_before = await jobs(conn)
    assert await admit(conn) == 1
    assert await entries(conn) == []
    assert await jobs(conn) == jobs_before


async def test_a_row_inserted_again_while_its_old_job_holds_the_key_is_requeued(
    pool: asyncpg.Pool, conn: asyncpg.Connection
) -> None:
    table = await make_table(conn, "photos", owner=True)
    await conn.execute("INSERT INTO photos (url, owner_id) VALUES ('http://old/1.jpg', 'ann')")
    assert await admit(conn) == 1
    old_job = await conn.fetchval("SELECT id FROM listener.jobs")
    await conn.execute("DELETE FROM photos WHERE id = 1")
    await conn.execute(
        "INSERT INTO photos (id, url, owner_id) OVERRIDING SYSTEM VALUE "
        "VALUES (1, 'http://new/1.jpg', 'bob')"
    )
    assert await admit(conn) == 1  # queued as reinserted: the old job still holds the key
    rows = await conn.fetch(
        "SELECT source_table, source_id, job_id, reinserted FROM listener.deleted_rows ORDER BY id"
    )
    assert [tuple(r) for r in rows] == [(table, "1", old_job, False), (table, "1", old_job, True)]
    drain = DeleteDrain(Queries(pool), PgJobStore(pool), None)
    assert await drain.tick() == 2
    assert await jobs(conn) == [("1", "http://new/1.jpg", "bob", "pending")]
    await assert_exact(conn)


async def test_a_delete_racing_an_admission_leaves_no_job(
    database_url: str, pool: asyncpg.Pool, conn: asyncpg.Connection
) -> None:
    """The admission has read the row and inserted its job, not yet committed, when the app
    deletes the row: the delete trigger sees no job. The drain waits for the admission and
    forgets the job it made."""
    await make_table(conn, "photos")
    await conn.execute("INSERT INTO photos (url) VALUES ('http://img/1.jpg')")
    admission = await asyncpg.connect(database_url)
    try:
        tx = admission.transaction()
        await tx.start()
        assert await admission.fetchval("SELECT listener.admit_inserted_rows(10)") == 1
        # The app's DELETE does not wait for the admission.
        async with asyncio.timeout(5):
            await conn.execute("DELETE FROM photos WHERE id = 1")
        assert await conn.fetchval("SELECT job_id FROM listener.deleted_rows") is None
        drain = DeleteDrain(Queries(pool), PgJobStore(pool), None)
        cleaning = asyncio.create_task(drain.tick())
        await asyncio.sleep(0.5)
        assert not cleaning.done()  # waits for the admission's lock
        await tx.commit()
        assert await asyncio.wait_for(cleaning, 10) == 1
    finally:
        await admission.close()
    assert await conn.fetchval("SELECT count(*) FROM listener.jobs") == 0
    assert await conn.fetchval("SELECT count(*) FROM listener.deleted_rows") == 0
    await assert_exact(conn)


async def test_a_table_that_cannot_be_read_holds_up_only_its_own_rows(
    conn: asyncpg.Connection,
) -> None:
    """Its entries stay for a later admission (with a warning naming the reason); the other
    tables' rows are admitted, and once the table is fixed its rows are too."""
    photos = await make_table(conn, "photos")
    await make_table(conn, "scans")
    await conn.execute("INSERT INTO photos (url) VALUES ('http://img/p.jpg')")
    await conn.execute("INSERT INTO scans (url) VALUES ('http://img/s.jpg')")
    await conn.execute("ALTER TABLE photos RENAME COLUMN url TO link")
    warnings: list[str] = []
    conn.add_log_listener(lambda _c, message: warnings.append(str(message)))
    assert await admit(conn) == 2  # both taken, the photo's put back
    assert await entries(conn) == [(photos, "1")]
    assert [j[:2] for j in await jobs(conn)] == [("1", "http://img/s.jpg")]
    assert any("public.photos" in w and "url" in w for w in warnings), warnings
    await conn.execute("ALTER TABLE photos RENAME COLUMN link TO url")
    assert await admit(conn) == 1
    assert await entries(conn) == []
    await assert_exact(conn)


async def test_a_table_that_cannot_be_read_does_not_stop_the_drain_of_deleted_rows(
    pool: asyncpg.Pool, conn: asyncpg.Connection
) -> None:
    """Deleted rows whose delete saw no job are looked up in their table; one that cannot be
    read is cleaned up as such, and the others still are."""
    await make_table(conn, "photos")
    await make_table(conn, "scans")
    await conn.execute("INSERT INTO photos (url) VALUES ('http://img/p.jpg')")
    await conn.execute("INSERT INTO scans (url) VALUES ('http://img/s.jpg')")
    await conn.execute("DELETE FROM photos")
    await conn.execute("DELETE FROM scans")
    await conn.execute("ALTER TABLE photos RENAME COLUMN id TO photo_id")
    drain = DeleteDrain(Queries(pool), PgJobStore(pool), None)
    assert await drain.tick() == 2
    assert await conn.fetchval("SELECT count(*) FROM listener.deleted_rows") == 0


async def test_an_admission_killed_before_its_commit_loses_nothing(
    database_url: str, conn: asyncpg.Connection
) -> None:
    """Its entries' deletion goes with its jobs: the server rolls both back, and the next
    admission makes the jobs."""
    await make_table(conn, "photos")
    await conn.execute(
        "INSERT INTO photos (url) SELECT 'http://img/' || g || '.jpg' FROM generate_series(1, 3) g"
    )
    doomed = await asyncpg.connect(database_url)
    pid = doomed.get_server_pid()
    try:
        await doomed.execute("BEGIN")
        assert await doomed.fetchval("SELECT listener.admit_inserted_rows(10)") == 3
        # pg_terminate_backend waits (timeout in ms) until the backend has exited.
        assert await conn.fetchval("SELECT pg_terminate_backend($1, 10000)", pid)
    finally:
        await doomed.close()
    assert len(await entries(conn)) == 3
    assert await conn.fetchval("SELECT count(*) FROM listener.jobs") == 0
    assert await admit(conn) == 3
    assert [j[0] for j in await jobs(conn)] == ["1", "2", "3"]
    await assert_exact(conn)


async def test_a_claim_sees_rows_once_admitted(
    pool: asyncpg.Pool, conn: asyncpg.Connection
) -> None:
    await make_table(conn, "photos")
    await conn.execute(
        "INSERT INTO photos (url) SELECT 'http://img/' || g || '.jpg' FROM generate_series(1, 5) g"
    )
    store = PgJobStore(pool)
    assert await store.claim(3, "w", 30.0, uuid.uuid4()) == []
    assert await store.admit(3) == 5
    assert await store.admit(3) == 0
    claimed = await store.claim(3, "w", 30.0, uuid.uuid4())
    assert [j.source_id for j in claimed] == ["1", "2", "3"]
    assert await entries(conn) == []
    assert await conn.fetchval("SELECT count(*) FROM listener.jobs WHERE status = 'pending'") == 2


async def test_a_claim_admits_fresh_rows_after_urgent_jobs_and_before_a_backfill(
    pool: asyncpg.Pool, conn: asyncpg.Connection
) -> None:
    """One claim with admission takes pending jobs of priority 0 or less first, then fresh
    rows (admitted as jobs claimed at once, only as many as there is room for: the rest wait
    as entries), then a backfill's jobs (priority 100) in the room left."""
    await make_table(conn, "photos")
    await conn.execute(
        "INSERT INTO photos (url) SELECT 'http://img/' || g || '.jpg' FROM generate_series(1, 4) g"
    )
    assert await admit(conn) == 4
    await conn.execute(
        "UPDATE listener.jobs SET priority = CASE WHEN source_id IN ('1', '2') THEN 100 ELSE -1 END"
    )
    await conn.execute(
        "INSERT INTO photos (url) SELECT 'http://img/' || g || '.jpg' FROM generate_series(5, 7) g"
    )
    store = PgJobStore(pool)
    first = await store.claim(4, "w", 30.0, uuid.uuid4(), admit=True)
    # Urgent jobs (3, 4), then two of the three fresh rows (5, 6): no room for the backfill.
    assert [(j.source_id, j.priority) for j in first] == [("3", -1), ("4", -1), ("5", 0), ("6", 0)]
    assert await entries(conn) == [("public.photos", "7")]
    assert (
        await conn.fetchval("SELECT count(*) FROM listener.jobs WHERE status = 'processing'") == 4
    )
    second = await store.claim(4, "w", 30.0, uuid.uuid4(), admit=True)
    # The last fresh row, then the backfill's jobs in the room left.
    assert [(j.source_id, j.priority) for j in second] == [("7", 0), ("1", 100), ("2", 100)]
    assert await entries(conn) == []
    await assert_exact(conn)


async def test_a_claim_admits_a_row_the_app_holds_locked_without_waiting(
    pool: asyncpg.Pool, conn: asyncpg.Connection, database_url: str
) -> None:
    """The app holds its row FOR UPDATE in an open transaction: the claim's admission reads
    the row without a lock, so it neither waits nor fails, and the app's transaction
    commits afterwards unharmed."""
    await make_table(conn, "photos")
    await conn.execute("INSERT INTO photos (url) VALUES ('http://img/1.jpg')")
    app = await asyncpg.connect(database_url)
    try:
        tx = app.transaction()
        await tx.start()
        await app.execute("SELECT * FROM photos WHERE id = 1 FOR UPDATE")
        store = PgJobStore(pool)
        async with asyncio.timeout(5):
            claimed = await store.claim(5, "w", 30.0, uuid.uuid4(), admit=True)
        assert [j.source_id for j in claimed] == ["1"]
        await app.execute("UPDATE photos SET url = url WHERE id = 1")
        await tx.commit()
    finally:
        await app.close()


async def test_the_daemon_admits_rows_inserted_while_it_runs_and_before_it_started(
    database_url: str, conn: asyncpg.Connection
) -> None:
    await make_table(conn, "photos")
    await conn.execute("INSERT INTO photos (url) VALUES ('http://img/before.jpg')")
    provider = RecordingProvider()
    settings = fast_settings(database_url, poll_interval_s=30.0)  # only NOTIFY and startup
    async with Daemon(settings, providers=[provider], health=False) as daemon:
        await daemon.signals.wait("finished", 1)
        await conn.execute("INSERT INTO photos (url) VALUES ('http://img/after.jpg')")
        await daemon.signals.wait("finished", 2)
    assert sorted(provider.calls) == ["1", "2"]
    assert await entries(conn) == []


async def test_a_hostile_search_path_cannot_redirect_the_trigger(
    conn: asyncpg.Connection,
) -> None:
    """The trigger runs with its owner's rights and its own search_path (pg_catalog, then
    pg_temp), so functions and tables a caller puts first on its path are never used."""
    table = await make_table(conn, "photos")
    assert await conn.fetchval(
        "SELECT proconfig FROM pg_proc WHERE proname = 'enqueue_insert_' || $1::regclass::oid",
        table,
    ) == ["search_path=pg_catalog, pg_temp"]
    await conn.execute("CREATE SCHEMA hostile")
    await conn.execute(
        "CREATE FUNCTION hostile.pg_notify(text, text) RETURNS void LANGUAGE plpgsql AS "
        "$$ BEGIN RAISE EXCEPTION 'hijacked'; END $$"
    )
    await conn.execute("CREATE TABLE hostile.inserted_rows (source_table text, source_id text)")
    await conn.execute("SET search_path = hostile, pg_catalog, public")
    try:
        await conn.execute("INSERT INTO photos (url) VALUES ('http://img/1.jpg')")
    finally:
        await conn.execute("RESET search_path")
    assert await conn.fetchval("SELECT count(*) FROM hostile.inserted_rows") == 0
    assert await admit(conn) == 1


async def test_other_inserts_of_jobs_are_counted(conn: asyncpg.Connection) -> None:
    await make_table(conn, "photos", owner=True)
    await conn.execute(
        "INSERT INTO listener.jobs (source_table, source_id, owner_id) VALUES ('x', '1', 'o')"
    )
    await conn.execute("INSERT INTO photos (url, owner_id) VALUES ('http://img/1.jpg', 'a')")
    # The URL-change trigger's upsert: a row whose job was deleted gets a new one.
    await conn.execute("UPDATE photos SET url = 'http://img/2.jpg'")
    await conn.execute("DELETE FROM listener.jobs WHERE source_table = 'public.photos'")
    # Backfill of rows without a job.
    await conn.execute(
        "SELECT * FROM listener.backfill_ids('public.photos', "
        "ARRAY(SELECT id::text FROM photos), 100, 5, false)"
    )
    assert await admit(conn) == 1  # taken; the backfilled job is newer than the entry
    assert await conn.fetchval("SELECT count(*) FROM listener.jobs") == 2
    await assert_exact(conn)


@pytest.fixture
async def db_before_0019(database_before: Callable[[int], Awaitable[str]]) -> str:
    """A database migrated with every migration before 0019."""
    return await database_before(19)


async def test_migrate_gives_tables_attached_before_the_outbox_trigger(
    db_before_0019: str,
) -> None:
    conn = await asyncpg.connect(db_before_0019)
    try:
        await make_table(conn, "photos", owner=True)
        await conn.execute(
            "INSERT INTO photos (url, owner_id) SELECT 'http://img/' || g, 'o' || (g % 2) "
            "FROM generate_series(1, 4) g"
        )
        assert await conn.fetchval("SELECT count(*) FROM listener.jobs") == 4

        assert "0019_inserted_rows" in await migrate(conn)

        await conn.execute("INSERT INTO photos (url, owner_id) VALUES ('http://img/x', 'o1')")
        assert await conn.fetchval("SELECT count(*) FROM listener.jobs") == 4
        assert await admit(conn) == 1
        assert await conn.fetchval("SELECT count(*) FROM listener.jobs") == 5
        await assert_exact(conn)
    finally:
        await conn.close()
