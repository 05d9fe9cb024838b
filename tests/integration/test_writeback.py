"""The status write-back never makes the app's own writes wait or fail; attach refuses setups
that would stop every claim. Real Postgres, real daemon (scripted provider)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import asyncpg
import pytest
from awaiting import jobs_finished, when, when_written
from support import (
    GatedProvider,
    RecordingProvider,
    admit,
    all_finished,
    cli,
    create_extension_or_skip,
    fast_settings,
    make_table,
    wait_until,
)

from listener.app import Daemon
from listener.db.migrate import migrate
from listener.errors import InvalidImage


async def app_statuses(conn: asyncpg.Connection, table: str) -> dict[str, str | None]:
    """``{url: status column}`` of every row of ``table``."""
    return {r["url"]: r["status"] for r in await conn.fetch(f"SELECT url, status FROM {table}")}


async def blocked_by(conn: asyncpg.Connection, pid: int) -> bool:
    """True when some backend waits for a lock that backend ``pid`` holds."""
    return bool(
        await conn.fetchval(
            "SELECT EXISTS (SELECT 1 FROM pg_stat_activity WHERE $1 = ANY(pg_blocking_pids(pid)))",
            pid,
        )
    )


async def test_app_update_racing_a_claim_succeeds(
    database_url: str, conn: asyncpg.Connection
) -> None:
    """The app touches its row, the daemon claims the row's job, the app changes the URL.

    With the write-back inside the claim, the claim waited for the app's row lock and the
    app's URL change waited for the claim's job lock: a deadlock, in which the app's
    transaction was the one cancelled (it waited last, so its deadlock check ran first).
    """
    table = await make_table(conn, status=True)
    row_id = await conn.fetchval(f"INSERT INTO {table} (url) VALUES ('old') RETURNING id")
    await conn.execute(f"INSERT INTO {table} (url) SELECT 'o' || g FROM generate_series(1, 5) g")
    deadlock_timeout_s = await conn.fetchval(
        "SELECT setting::float8 / 1000 FROM pg_settings WHERE name = 'deadlock_timeout'"
    )
    app = await asyncpg.connect(database_url)
    try:
        app_pid = app.get_server_pid()
        provider = RecordingProvider(delay_s=0.3)
        settings = fast_settings(database_url)
        tx = app.transaction()
        await tx.start()
        await app.execute(f"UPDATE {table} SET owner_id = 'touched' WHERE id = $1", row_id)
        async with Daemon(settings, providers=[provider], health=False) as daemon:

            async def claimed_or_blocked() -> bool:
                status = await conn.fetchval(
                    "SELECT status FROM listener.jobs WHERE source_id = $1", str(row_id)
                )
                return status != "pending" or await blocked_by(conn, app_pid)

            await when(claimed_or_blocked, daemon.signals, "claimed", timeout=10)
            # Longer than deadlock_timeout: a waiting claim has run its deadlock check by now,
            # so a deadlock would be detected by (and cancel) the app's statement below.
            await asyncio.sleep(deadlock_timeout_s + 0.3)
            await app.execute(f"UPDATE {table} SET url = 'new' WHERE id = $1", row_id)
            await tx.commit()

            async def done() -> bool:
                job = await conn.fetchrow(
                    "SELECT status, image_url FROM listener.jobs WHERE source_id = $1",
                    str(row_id),
                )
                row = await conn.fetchrow(f"SELECT status FROM {table} WHERE id = $1", row_id)
                return (job["status"], job["image_url"], row["status"]) == (
                    "complete",
                    "new",
                    "complete",
                )

            await when_written(daemon, done, timeout=20)
            await when(lambda: all_finished(conn, 6), daemon.signals, "finished", timeout=20)
    finally:
        await app.close()
    row = await conn.fetchrow(f"SELECT url, owner_id, status FROM {table} WHERE id = $1", row_id)
    assert dict(row) == {"url": "new", "owner_id": "touched", "status": "complete"}
    # The job ran for the new URL after the reset (the first run's result was fenced out).
    assert provider.calls.count(str(row_id)) >= 2
    assert set((await app_statuses(conn, table)).values()) == {"complete"}


async def test_app_row_lock_stalls_no_claim(database_url: str, conn: asyncpg.Connection) -> None:
    """An app transaction holding its row for seconds: every other job (and its status column)
    completes meanwhile; the locked row's column catches up once the lock is released."""
    table = await make_table(conn, status=True)
    await conn.execute(f"INSERT INTO {table} (url) SELECT 'u' || g FROM generate_series(1, 20) g")
    locked_id = await conn.fetchval(f"SELECT id FROM {table} WHERE url = 'u7'")
    app = await asyncpg.connect(database_url)
    try:
        tx = app.transaction()
        await tx.start()
        await app.execute(f"SELECT * FROM {table} WHERE id = $1 FOR UPDATE", locked_id)
        provider = RecordingProvider()
        async with Daemon(
            fast_settings(database_url), providers=[provider], health=False
        ) as daemon:

            async def others_complete() -> bool:
                statuses = await app_statuses(conn, table)
                return all(s == "complete" for url, s in statuses.items() if url != "u7")

            try:
                # The lock is still held: claims and completions go on around it.
                await jobs_finished(daemon, conn, 20, timeout=10)
                await when_written(daemon, others_complete, timeout=10)
                locked_job = await conn.fetchval(
                    "SELECT status FROM listener.jobs WHERE source_id = $1", str(locked_id)
                )
                assert locked_job == "complete"
                assert (await app_statuses(conn, table))["u7"] != "complete"
                await asyncio.sleep(1.0)
                assert (await app_statuses(conn, table))["u7"] != "complete"
            finally:
                # Released in any case, so that a failure cannot hang the daemon's stop.
                await tx.rollback()

            async def locked_row_complete() -> bool:
                return (await app_statuses(conn, table))["u7"] == "complete"

            await when_written(daemon, locked_row_complete, timeout=10)
    finally:
        await app.close()
    assert set((await app_statuses(conn, table)).values()) == {"complete"}


async def test_status_column_follows_the_job(database_url: str, conn: asyncpg.Connection) -> None:
    """pending, then processing, then complete (or failed) reach the app's column."""
    table = await make_table(conn, status=True)
    provider = GatedProvider()
    provider.gate.clear()
    bad = "will-fail"
    settings = fast_settings(database_url, concurrency=1, prefetch=0)
    async with Daemon(settings, providers=[provider], health=False) as daemon:
        await conn.execute(f"INSERT INTO {table} (url) VALUES ('a'), ('b'), ('c')")
        bad_id = await conn.fetchval(
            f"INSERT INTO {table} (url) VALUES ($1) RETURNING id::text", bad
        )
        provider.failures[bad_id] = [InvalidImage("not an image")]

        async def one_running_rest_pending() -> bool:
            statuses = sorted(str(s) for s in (await app_statuses(conn, table)).values())
            return statuses == ["pending", "pending", "pending", "processing"]

        await when_written(daemon, one_running_rest_pending, timeout=10)
        provider.gate.set()

        async def finished() -> bool:
            return await app_statuses(conn, table) == {
                "a": "complete",
                "b": "complete",
                "c": "complete",
                bad: "failed",
            }

        await when_written(daemon, finished, timeout=20)


async def test_statuses_are_written_by_the_time_the_daemon_stops(
    database_url: str, conn: asyncpg.Connection
) -> None:
    table = await make_table(conn, status=True)
    await conn.execute(f"INSERT INTO {table} (url) SELECT 'u' || g FROM generate_series(1, 30) g")
    async with Daemon(
        fast_settings(database_url), providers=[RecordingProvider()], health=False
    ) as daemon:
        await jobs_finished(daemon, conn, 30, timeout=20)
    assert set((await app_statuses(conn, table)).values()) == {"complete"}


# The write-back function itself.


async def write_back(conn: asyncpg.Connection, limit: int = 100) -> asyncpg.Record:
    """One call of listener.write_back_status from the start of the outbox."""
    row = await conn.fetchrow("SELECT * FROM listener.write_back_status($1)", limit)
    assert row is not None
    return row


async def test_writer_skips_locked_rows_and_catches_up(
    database_url: str, conn: asyncpg.Connection
) -> None:
    table = await make_table(conn, status=True)
    await conn.execute(f"INSERT INTO {table} (url) VALUES ('a'), ('b'), ('c')")
    assert await admit(conn) == 3
    assert await app_statuses(conn, table) == {"a": None, "b": None, "c": None}
    app = await asyncpg.connect(database_url)
    try:
        tx = app.transaction()
        await tx.start()
        await app.execute(f"SELECT 1 FROM {table} WHERE url = 'b' FOR UPDATE")
        first = await asyncio.wait_for(write_back(conn), 2)
        assert (first["picked"], first["written"], first["deferred"]) == (3, 2, 1)
        assert await app_statuses(conn, table) == {"a": "pending", "b": None, "c": "pending"}
        again = await asyncio.wait_for(write_back(conn), 2)
        assert (again["picked"], again["written"], again["deferred"]) == (1, 0, 1)
        await tx.commit()
    finally:
        await app.close()
    last = await write_back(conn)
    assert (last["picked"], last["written"], last["deferred"]) == (1, 1, 0)
    assert set((await app_statuses(conn, table)).values()) == {"pending"}
    assert await conn.fetchval("SELECT count(*) FROM listener.status_outbox") == 0
    # Nothing to do: nothing written; a job whose status does not change is not queued.
    await conn.execute("UPDATE listener.jobs SET updated_at = now()")
    idle = await write_back(conn)
    assert (idle["picked"], idle["written"], idle["last_job_id"]) == (0, 0, None)


async def test_change_committed_while_the_writer_holds_the_outbox_row_is_kept(
    database_url: str, conn: asyncpg.Connection
) -> None:
    """The outbox upsert waits for the writer and re-inserts the row it deleted."""
    table = await make_table(conn, status=True)
    await conn.execute(f"INSERT INTO {table} (url) VALUES ('a')")
    assert await admit(conn) == 1
    writer = await asyncpg.connect(database_url)
    try:
        tx = writer.transaction()
        await tx.start()
        await writer.execute("SELECT job_id FROM listener.status_outbox FOR UPDATE")
        change = asyncio.create_task(
            conn.execute("UPDATE listener.jobs SET status = 'complete', finished_at = now()")
        )
        await wait_until(lambda: blocked_by(writer, writer.get_server_pid()), timeout=5)
        await writer.execute("DELETE FROM listener.status_outbox")
        await tx.commit()
        await asyncio.wait_for(change, 5)
    finally:
        await writer.close()
    assert await conn.fetchval("SELECT count(*) FROM listener.status_outbox") == 1
    await write_back(conn)
    assert await app_statuses(conn, table) == {"a": "complete"}


async def test_writer_forgets_rows_that_are_gone_and_tables_without_status(
    conn: asyncpg.Connection,
) -> None:
    table = await make_table(conn, status=True)
    other = await make_table(conn, "plain")
    await conn.execute(f"INSERT INTO {table} (url) VALUES ('a'), ('b')")
    await conn.execute(f"INSERT INTO {other} (url) VALUES ('x')")
    assert await admit(conn) == 3
    assert await conn.fetchval("SELECT count(*) FROM listener.status_outbox") == 2
    await conn.execute(f"DELETE FROM {table} WHERE url = 'a'")
    done = await write_back(conn)
    assert (done["picked"], done["written"], done["deferred"]) == (2, 1, 0)
    await conn.execute("UPDATE listener.jobs SET status = 'cancelled'")
    assert await conn.fetchval("SELECT count(*) FROM listener.status_outbox") == 2
    # Re-attached without a status column: its queued rows are dropped, not written.
    await conn.execute("SELECT listener.attach('images', 'id', 'url')")
    assert (
        await conn.fetchval(
            "SELECT count(*) FROM pg_trigger WHERE tgrelid = 'listener.jobs'::regclass "
            "AND tgname LIKE 'jobs_status_outbox_%'"
        )
        == 0
    )
    gone = await write_back(conn)
    assert (gone["picked"], gone["written"]) == (2, 0)
    assert await conn.fetchval("SELECT count(*) FROM listener.status_outbox") == 0
    assert await app_statuses(conn, table) == {"b": "pending"}


async def test_one_broken_table_does_not_stop_the_others(conn: asyncpg.Connection) -> None:
    broken = await make_table(conn, "broken", status=True)
    fine = await make_table(conn, "fine", status=True)
    await conn.execute(f"INSERT INTO {broken} (url) VALUES ('a')")
    await conn.execute(f"INSERT INTO {fine} (url) VALUES ('b')")
    assert await admit(conn) == 2
    # Changed after attach: 'pending' no longer fits.
    await conn.execute(f"ALTER TABLE {broken} ALTER status TYPE varchar(3)")
    result = await write_back(conn)
    assert (result["picked"], result["written"], result["deferred"]) == (2, 1, 1)
    assert "value too long" in result["errors"][0]
    assert await app_statuses(conn, fine) == {"b": "pending"}


# attach refuses what would stop every claim.


async def _status_table(conn: asyncpg.Connection, column_type: str) -> None:
    await conn.execute("DROP TABLE IF EXISTS public.typed")
    await conn.execute(
        f"CREATE TABLE public.typed (id bigint PRIMARY KEY, url text, status {column_type})"
    )


@pytest.mark.parametrize(
    "column_type", ["text", "varchar", "varchar(10)", "character varying(64)", "citext"]
)
async def test_attach_accepts_text_status_columns(
    conn: asyncpg.Connection, column_type: str
) -> None:
    if column_type == "citext":
        await create_extension_or_skip(conn, "citext")
    await _status_table(conn, column_type)
    await conn.execute("SELECT listener.attach('typed', 'id', 'url', NULL, 'status')")
    await conn.execute("INSERT INTO public.typed VALUES (1, 'a')")
    assert await admit(conn) == 1
    await conn.execute("UPDATE listener.jobs SET status = 'processing'")
    await write_back(conn)
    assert await conn.fetchval("SELECT status::text FROM public.typed") == "processing"


@pytest.mark.parametrize(
    ("column_type", "reason"),
    [
        ("varchar(8)", "holds at most 8 characters"),
        ("char(12)", "pads"),
        ("integer", "is integer"),
        ("boolean", "is boolean"),
    ],
)
async def test_attach_refuses_status_columns_that_cannot_hold_statuses(
    conn: asyncpg.Connection, column_type: str, reason: str
) -> None:
    await _status_table(conn, column_type)
    with pytest.raises(asyncpg.InvalidParameterValueError, match=reason):
        await conn.execute("SELECT listener.attach('typed', 'id', 'url', NULL, 'status')")
    assert await conn.fetchval("SELECT count(*) FROM listener.attachments") == 0


async def test_attach_refuses_a_status_column_that_is_another_column(
    conn: asyncpg.Connection,
) -> None:
    await make_table(conn, attach=False)
    with pytest.raises(asyncpg.InvalidParameterValueError, match="url column"):
        await conn.execute("SELECT listener.attach('images', 'id', 'url', NULL, 'url')")
    await conn.execute(
        "ALTER TABLE public.images ADD COLUMN up text GENERATED ALWAYS AS (url) STORED"
    )
    with pytest.raises(asyncpg.InvalidParameterValueError, match="generated"):
        await conn.execute("SELECT listener.attach('images', 'id', 'url', NULL, 'up')")


@pytest.mark.parametrize(
    ("table", "id_column", "url_column"),
    [
        ("listener.jobs", "id", "image_url"),
        ("listener.results", "job_id", "step"),
        ("listener.attachments", "source_table", "url_column"),
    ],
)
async def test_attach_refuses_listener_own_tables(
    conn: asyncpg.Connection, table: str, id_column: str, url_column: str
) -> None:
    with pytest.raises(asyncpg.InvalidParameterValueError, match="listener's own"):
        await conn.execute("SELECT listener.attach($1, $2, $3)", table, id_column, url_column)
    assert await conn.fetchval("SELECT count(*) FROM listener.attachments") == 0
    # And inserts into an attached table still work.
    table_name = await make_table(conn)
    await conn.execute(f"INSERT INTO {table_name} (url) VALUES ('a')")


async def test_cli_attach_explains_refusals(
    conn: asyncpg.Connection, env_for_subprocess: dict[str, str]
) -> None:
    await _status_table(conn, "varchar(8)")
    short = await asyncio.to_thread(
        cli,
        env_for_subprocess,
        "attach",
        "typed",
        "--id-column",
        "id",
        "--url-column",
        "url",
        "--status-column",
        "status",
    )
    assert short.returncode == 2
    assert "status column status of public.typed holds at most 8 characters" in short.stderr
    assert short.stderr.count("Use text, or varchar(10) or longer.") == 1
    assert "Traceback" not in short.stderr
    own = await asyncio.to_thread(
        cli,
        env_for_subprocess,
        "attach",
        "listener.jobs",
        "--id-column",
        "id",
        "--url-column",
        "image_url",
    )
    assert own.returncode == 2
    assert "listener.jobs is one of listener's own tables" in own.stderr
    assert "Traceback" not in own.stderr


async def test_upgrade_moves_existing_attachments_to_the_outbox(
    database_before: Callable[[int], Awaitable[str]],
) -> None:
    """A database migrated to 0003, with a status column attached and listener.jobs attached
    by mistake: 0005 swaps the write-back triggers and removes the impossible attachment."""
    conn = await asyncpg.connect(await database_before(4))
    try:
        table = await make_table(conn, status=True)
        await conn.execute("SELECT listener.attach('listener.jobs', 'id', 'image_url')")
        assert "0005_status_writeback" in await migrate(conn)

        triggers = await conn.fetch(
            "SELECT tgname FROM pg_trigger WHERE tgrelid = 'listener.jobs'::regclass "
            "AND NOT tgisinternal ORDER BY tgname"
        )
        names = [r["tgname"] for r in triggers]
        assert "jobs_write_back_insert" not in names and "jobs_write_back_update" not in names
        assert {"jobs_status_outbox_insert", "jobs_status_outbox_update"} <= set(names)
        assert await conn.fetchval("SELECT array_agg(source_table) FROM listener.attachments") == [
            table
        ]
        await conn.execute(f"INSERT INTO {table} (url) VALUES ('a')")
        assert await admit(conn) == 1
        await write_back(conn)
        assert await app_statuses(conn, table) == {"a": "pending"}
    finally:
        await conn.close()


async def test_write_back_loop_logs_errors_and_never_raises(
    database_url: str, conn: asyncpg.Connection
) -> None:
    from loguru import logger

    from listener.app_side.writeback import StatusWriteBack
    from listener.db.queries import Queries

    broken = await make_table(conn, "broken", status=True)
    fine = await make_table(conn, "fine", status=True)
    await conn.execute(f"INSERT INTO {broken} (url) VALUES ('a')")
    await conn.execute(f"INSERT INTO {fine} (url) SELECT 'b' || g FROM generate_series(1, 7) g")
    assert await admit(conn) == 8
    await conn.execute(f"ALTER TABLE {broken} ALTER status TYPE varchar(3)")
    messages: list[str] = []
    sink = logger.add(lambda m: messages.append(str(m)), level="WARNING")
    pool = await asyncpg.create_pool(database_url, min_size=1, max_size=1)
    try:
        loop = StatusWriteBack(Queries(pool), interval_s=0.05, batch=3)
        assert await loop.tick() == 7  # three rounds of at most 3 rows
        assert loop.deferred == 1
        assert await loop.tick() == 0
        assert len(messages) == 1 and "public.broken: value too long" in messages[0]
        await pool.close()
        assert await loop.tick() == 0  # the pool is gone: logged, not raised
        assert "status write-back failed" in messages[-1]
    finally:
        logger.remove(sink)
        await pool.close()
    assert set((await app_statuses(conn, fine)).values()) == {"pending"}
