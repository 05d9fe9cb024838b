"""Migrations, attach/detach and the enqueue triggers, against a real Postgres."""

from __future__ import annotations

import asyncio
import io
import secrets
from collections.abc import AsyncIterator, Callable

import asyncpg
import pytest
from support import admit, counts, make_table

from listener.db.migrate import MigrationError, applied_versions, load_migrations, migrate
from listener.queue.notify import CHANNEL


@pytest.fixture
async def empty_db(pg_admin_dsn: str, dsn_for: Callable[[str], str]) -> AsyncIterator[str]:
    name = f"empty_{secrets.token_hex(6)}"
    admin = await asyncpg.connect(pg_admin_dsn)
    await admin.execute(f'CREATE DATABASE "{name}"')
    try:
        yield dsn_for(name)
    finally:
        await admin.execute(f'DROP DATABASE "{name}" WITH (FORCE)')
        await admin.close()


class NotifyCounter:
    """Counts notifications on the jobs channel, from a separate connection."""

    def __init__(self) -> None:
        self.count = 0
        self.event = asyncio.Event()

    def __call__(self, *_: object) -> None:
        self.count += 1
        self.event.set()

    async def settle(self, conn: asyncpg.Connection) -> int:
        """Round-trip on the listening connection so every delivered NOTIFY is processed."""
        await conn.execute("SELECT pg_sleep(0.05)")
        await conn.fetchval("SELECT 1")
        return self.count


async def test_migrate_twice_applies_once(empty_db: str) -> None:
    conn = await asyncpg.connect(empty_db)
    try:
        first = await migrate(conn)
        second = await migrate(conn)
        assert first == [f"{m.version:04d}_{m.name}" for m in load_migrations()]
        assert second == []
        assert await applied_versions(conn) == [m.version for m in load_migrations()]
        assert await conn.fetchval("SELECT to_regclass('listener.jobs') IS NOT NULL")
    finally:
        await conn.close()


async def test_concurrent_migrations_serialize(empty_db: str) -> None:
    conns = [await asyncpg.connect(empty_db) for _ in range(3)]
    try:
        results = await asyncio.gather(*(migrate(c) for c in conns))
        assert sorted(len(r) for r in results) == [0, 0, len(load_migrations())]
    finally:
        for c in conns:
            await c.close()


async def test_newer_database_is_refused(conn: asyncpg.Connection) -> None:
    await conn.execute("INSERT INTO listener.schema_migrations (version, name) VALUES (9999, 'x')")
    with pytest.raises(MigrationError, match="newer"):
        await migrate(conn)


async def test_attach_errors_name_the_problem(conn: asyncpg.Connection) -> None:
    await make_table(conn, attach=False)
    with pytest.raises(asyncpg.UndefinedTableError, match="table nope does not exist"):
        await conn.execute("SELECT listener.attach('nope', 'id', 'url')")
    with pytest.raises(asyncpg.UndefinedColumnError, match="column missing does not exist"):
        await conn.execute("SELECT listener.attach('images', 'id', 'missing')")
    with pytest.raises(asyncpg.UndefinedColumnError, match="picture"):
        await conn.execute("SELECT listener.attach('images', 'id', 'url', 'picture')")
    assert await conn.fetchval("SELECT count(*) FROM listener.attachments") == 0


async def test_hostile_identifiers_are_quoted(conn: asyncpg.Connection) -> None:
    table = 'Robert"); DROP TABLE listener.jobs;--'
    await conn.execute(
        'CREATE TABLE "Robert""); DROP TABLE listener.jobs;--" '
        '("the id" bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY, '
        '"url; DELETE FROM x" text, "Owner" text, "st""at" text)'
    )
    quoted = '"Robert""); DROP TABLE listener.jobs;--"'
    name = await conn.fetchval(
        "SELECT listener.attach($1, 'the id', 'url; DELETE FROM x', 'Owner', 'st\"at')", quoted
    )
    assert name == f"public.{quoted}"
    await conn.execute(
        f'INSERT INTO {quoted} ("url; DELETE FROM x", "Owner") VALUES ($1, $2)', "http://a/1", "o"
    )
    assert await admit(conn) == 1  # admission reads the row through the quoted names
    row = await conn.fetchrow("SELECT source_table, image_url, owner_id, status FROM listener.jobs")
    assert dict(row) == {
        "source_table": f"public.{quoted}",
        "image_url": "http://a/1",
        "owner_id": "o",
        "status": "pending",
    }
    await conn.execute("SELECT listener.write_back_status(100)")
    assert await conn.fetchval(f'SELECT "st""at" FROM {quoted}') == "pending"
    assert await conn.fetchval("SELECT to_regclass('listener.jobs') IS NOT NULL")
    assert await conn.fetchval("SELECT listener.detach($1)", quoted)
    await conn.execute(f'INSERT INTO {quoted} ("url; DELETE FROM x") VALUES ($1)', "http://a/2")
    assert await conn.fetchval("SELECT count(*) FROM listener.jobs") == 1
    assert table  # the raw name, for readers: what a hostile app could call its table


async def test_detach_stops_enqueueing_and_keeps_jobs(conn: asyncpg.Connection) -> None:
    table = await make_table(conn)
    await conn.execute(f"INSERT INTO {table} (url) VALUES ('http://a/1')")
    assert await admit(conn) == 1
    assert await conn.fetchval("SELECT listener.detach('images')") is True
    assert await conn.fetchval("SELECT listener.detach('images')") is False
    await conn.execute(f"INSERT INTO {table} (url) VALUES ('http://a/2')")
    assert await counts(conn) == {"pending": 1}
    triggers = await conn.fetchval(
        "SELECT count(*) FROM pg_trigger WHERE tgrelid = 'public.images'::regclass "
        "AND NOT tgisinternal"
    )
    assert triggers == 0


@pytest.mark.parametrize("how", ["single", "multi", "copy", "insert_select"])
async def test_each_insert_enqueues_every_row_once_with_one_notify(
    database_url: str, conn: asyncpg.Connection, how: str
) -> None:
    table = await make_table(conn)
    function = f"enqueue_insert_{await conn.fetchval('SELECT $1::regclass::oid', table)}"
    listener_conn = await asyncpg.connect(database_url)
    counter = NotifyCounter()
    await listener_conn.add_listener(CHANNEL, counter)
    try:
        # The statement in a transaction of its own that counts the calls of the table's
        # trigger function: Postgres folds identical notifications of a transaction into one,
        # so one NOTIFY heard would not tell a per-row trigger from a per-statement one.
        async with conn.transaction():
            await conn.execute("SET LOCAL track_functions = 'all'")
            if how == "single":
                await conn.execute(f"INSERT INTO {table} (url) VALUES ('http://a/0')")
                expected = 1
            elif how == "multi":
                await conn.execute(
                    f"INSERT INTO {table} (url) "
                    "VALUES ('http://a/0'), ('http://a/1'), ('http://a/2')"
                )
                expected = 3
            elif how == "copy":
                data = "".join(f"http://a/{i}\n" for i in range(500)).encode()
                await conn.copy_to_table(
                    "images", schema_name="public", columns=["url"], source=io.BytesIO(data)
                )
                expected = 500
            else:
                await conn.execute(
                    f"INSERT INTO {table} (url) "
                    "SELECT 'http://a/' || g FROM generate_series(1, 10000) g"
                )
                expected = 10000
            calls = await conn.fetchval(
                "SELECT calls FROM pg_stat_xact_user_functions "
                "WHERE schemaname = 'listener' AND funcname = $1",
                function,
            )
        assert calls == 1
        await asyncio.wait_for(counter.event.wait(), 5)
        assert await counter.settle(listener_conn) == 1
        # The statement recorded its rows; a daemon's claim makes their jobs.
        assert await conn.fetchval("SELECT count(*) FROM listener.jobs") == 0
        assert await admit(conn) == expected
        stats = await conn.fetchrow(
            "SELECT count(*) AS jobs, count(DISTINCT source_id) AS rows FROM listener.jobs"
        )
        assert (stats["jobs"], stats["rows"]) == (expected, expected)
        assert (
            await conn.fetchval(
                f"SELECT count(*) FROM {table} i JOIN listener.jobs j ON j.source_id = i.id::text"
            )
            == expected
        )
    finally:
        await listener_conn.close()


async def test_url_update_reenqueues_and_other_updates_do_not(conn: asyncpg.Connection) -> None:
    table = await make_table(conn, status=True)
    row_id = await conn.fetchval(f"INSERT INTO {table} (url) VALUES ('http://a/1') RETURNING id")
    assert await admit(conn) == 1
    await conn.execute("UPDATE listener.jobs SET status = 'failed', attempts = 5, last_error = 'x'")
    await conn.execute(f"UPDATE {table} SET owner_id = 'someone' WHERE id = $1", row_id)
    assert await counts(conn) == {"failed": 1}
    await conn.execute(f"UPDATE {table} SET url = 'http://a/2' WHERE id = $1", row_id)
    job = await conn.fetchrow("SELECT status, attempts, image_url, last_error FROM listener.jobs")
    assert dict(job) == {
        "status": "pending",
        "attempts": 0,
        "image_url": "http://a/2",
        "last_error": None,
    }
    await conn.execute("SELECT listener.write_back_status(100)")
    assert await conn.fetchval(f"SELECT status FROM {table}") == "pending"


async def test_status_is_written_back_to_the_source_row(conn: asyncpg.Connection) -> None:
    table = await make_table(conn, status=True)
    await conn.execute(f"INSERT INTO {table} (url) VALUES ('http://a/1'), ('http://a/2')")
    assert await admit(conn) == 2
    # Written by the daemon's write-back (listener.write_back_status), outside the insert.
    assert await conn.fetchval(f"SELECT array_agg(DISTINCT status) FROM {table}") == [None]
    await conn.execute("SELECT listener.write_back_status(100)")
    assert await conn.fetchval(f"SELECT array_agg(DISTINCT status) FROM {table}") == ["pending"]
    await conn.execute(
        "UPDATE listener.jobs SET status = 'complete' WHERE image_url = 'http://a/1'"
    )
    await conn.execute("SELECT listener.write_back_status(100)")
    rows = await conn.fetch(f"SELECT url, status FROM {table} ORDER BY url")
    assert [(r["url"], r["status"]) for r in rows] == [
        ("http://a/1", "complete"),
        ("http://a/2", "pending"),
    ]
    # The outbox triggers on listener.jobs go with the last table that needs them.
    jobs_triggers = (
        "SELECT count(*) FROM pg_trigger WHERE tgrelid = 'listener.jobs'::regclass "
        "AND tgname LIKE 'jobs_status_outbox_%'"
    )
    assert await conn.fetchval(jobs_triggers) == 2
    await conn.execute("SELECT listener.detach('images')")
    assert await conn.fetchval(jobs_triggers) == 0


async def test_backfill_functions_enqueue_only_rows_without_jobs(
    conn: asyncpg.Connection,
) -> None:
    await make_table(conn, owner=True, attach=False)
    await conn.execute(
        "INSERT INTO public.images (url, owner_id) "
        "SELECT 'http://a/' || g, CASE WHEN g % 2 = 0 THEN 'even' ELSE 'odd' END "
        "FROM generate_series(1, 25) g"
    )
    await conn.execute("SELECT listener.attach('images', 'id', 'url', 'owner_id')")
    await conn.execute("INSERT INTO public.images (url, owner_id) VALUES ('http://new', 'odd')")
    assert await admit(conn) == 1
    assert await conn.fetchval("SELECT listener.count_unqueued('images')") == 25
    assert await conn.fetchval("SELECT listener.count_unqueued('images', 'even')") == 12
    first = await conn.fetchrow(
        "SELECT * FROM listener.backfill_chunk('images', NULL, 10, NULL, 100, 5, NULL)"
    )
    assert (first["scanned"], first["enqueued"]) == (10, 10)
    rest = await conn.fetchrow(
        "SELECT * FROM listener.backfill_chunk('images', $1, 100, NULL, 100, 5, NULL)",
        first["last_id"],
    )
    assert (rest["scanned"], rest["enqueued"]) == (16, 15)
    again = await conn.fetchrow(
        "SELECT * FROM listener.backfill_chunk('images', NULL, 100, NULL, 100, 5, NULL)"
    )
    assert again["enqueued"] == 0
    prio = await conn.fetch(
        "SELECT priority, count(*) AS n FROM listener.jobs GROUP BY 1 ORDER BY 1"
    )
    assert [(r["priority"], r["n"]) for r in prio] == [(0, 1), (100, 25)]


async def test_a_partitioned_table_is_attached_through_its_parent(
    conn: asyncpg.Connection,
) -> None:
    """Row triggers fire on the partitions they were cloned to (TG_RELID is the partition's):
    the generated functions accept the partitions of their table and no other table."""
    await conn.execute(
        "CREATE TABLE public.shots (id bigint, region text, url text, PRIMARY KEY (id, region))"
        " PARTITION BY LIST (region); "
        "CREATE TABLE public.shots_eu PARTITION OF public.shots FOR VALUES IN ('eu'); "
        "CREATE TABLE public.shots_us PARTITION OF public.shots FOR VALUES IN ('us'); "
        "SELECT listener.attach('public.shots', 'id', 'url')"
    )
    await conn.execute(
        "INSERT INTO public.shots VALUES (1, 'eu', 'a'), (2, 'us', 'b'), (3, 'eu', 'c')"
    )
    assert await admit(conn) == 3
    await conn.execute("UPDATE listener.jobs SET status = 'complete'")
    await conn.execute("UPDATE public.shots SET url = 'b2' WHERE id = 2")  # a partition's row
    assert (
        await conn.fetchval(
            "SELECT image_url || ' ' || status FROM listener.jobs WHERE source_id = '2'"
        )
        == "b2 pending"
    )
    await conn.execute("DELETE FROM public.shots WHERE id = 3")
    assert await conn.fetchval("SELECT source_id FROM listener.deleted_rows") == "3"
