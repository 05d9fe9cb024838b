"""Results, errors and completion time written back to the app's row (--result-column,
--error-column, --analyzed-at-column), and upgrades that regenerate the triggers of tables
attached before them. Real Postgres, real daemon (scripted providers)."""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import datetime
from typing import Any

import asyncpg
import pytest
from awaiting import when_written
from support import (
    RecordingProvider,
    admit,
    cli,
    create_extension_or_skip,
    fast_settings,
)

from listener.analysis.providers.base import ImageInput, StepContext, StepResult
from listener.app import Daemon
from listener.db.migrate import migrate
from listener.errors import InvalidImage, ListenerError, ProviderUnavailable

COLUMNS = "status text, ai_scan_metadata jsonb, processing_error text, ai_last_scanned timestamptz"


class StepProvider(RecordingProvider):
    """A ``RecordingProvider`` named ``name`` whose calls wait while ``gate`` is clear; for a
    source id in ``hold``, only its calls from the ``hold[id]``-th on wait."""

    def __init__(self, name: str, failures: dict[str, list[ListenerError]] | None = None) -> None:
        super().__init__(0.0, failures)
        self.name = name
        self.gate = asyncio.Event()
        self.gate.set()
        self.hold: dict[str, int] = {}

    async def run(self, kind: str, image: ImageInput, context: StepContext) -> StepResult:
        """Wait for the gate when told to, then answer ``{"by": name, "source_id": id}``."""
        key = image.source_id
        nth = self.calls.count(key) + 1
        held_from = self.hold.get(key)
        if held_from is None or nth >= held_from:
            await self.gate.wait()
        await super().run(kind, image, context)  # records the call, raises scripted failures
        return StepResult(
            self.name, f"{self.name}.step", {"by": self.name, "source_id": key}, "test", 0.0
        )


async def make_app_table(conn: asyncpg.Connection, name: str = "vehicle_images") -> str:
    """``public.<name>`` with the four write-back columns, attached with all of them."""
    await conn.execute(
        f"CREATE TABLE public.{name} (id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY, "
        f"url text, {COLUMNS})"
    )
    table: str = await conn.fetchval(
        "SELECT listener.attach($1, 'id', 'url', NULL, 'status', 'ai_scan_metadata', "
        "'processing_error', 'ai_last_scanned')",
        f"public.{name}",
    )
    return table


async def app_rows(conn: asyncpg.Connection, table: str) -> dict[str, dict[str, Any]]:
    """``{url: {status, result, error, analyzed_at}}`` for every row of ``table``."""
    rows = await conn.fetch(
        f"SELECT url, status, ai_scan_metadata AS result, processing_error AS error, "
        f"ai_last_scanned AS analyzed_at FROM {table}"
    )
    return {
        r["url"]: {
            "status": r["status"],
            "result": json.loads(r["result"]) if r["result"] is not None else None,
            "error": r["error"],
            "analyzed_at": r["analyzed_at"],
        }
        for r in rows
    }


def step_output(name: str, row_id: str) -> dict[str, Any]:
    return {"by": name, "source_id": row_id}


async def test_columns_follow_the_job_step_by_step(
    database_url: str, conn: asyncpg.Connection
) -> None:
    """pending, then processing with the first step's output merged in, then complete with
    both steps and the completion time; a failing row gets its error and 'failed'."""
    table = await make_app_table(conn)
    first, second = StepProvider("first"), StepProvider("second")
    second.gate.clear()
    settings = fast_settings(database_url, concurrency=1, prefetch=0)
    async with Daemon(settings, providers=[first, second], health=False) as daemon:
        await conn.execute(f"INSERT INTO {table} (url) VALUES ('a'), ('b')")
        bad_id = await conn.fetchval(f"INSERT INTO {table} (url) VALUES ('bad') RETURNING id")
        first.failures[str(bad_id)] = [InvalidImage("not an image")]

        async def a_half_done() -> bool:
            rows = await app_rows(conn, table)
            return rows["a"]["status"] == "processing" and rows["a"]["result"] is not None

        await when_written(daemon, a_half_done, timeout=10)
        rows = await app_rows(conn, table)
        # One step stored, the next one running: its output is in the row already.
        assert rows["a"] == {
            "status": "processing",
            "result": {"first.step": step_output("first", "1")},
            "error": None,
            "analyzed_at": None,
        }
        assert rows["b"]["status"] == "pending" and rows["b"]["result"] is None
        second.gate.set()

        async def finished() -> bool:
            rows = await app_rows(conn, table)
            return [rows[u]["status"] for u in ("a", "b", "bad")] == [
                "complete",
                "complete",
                "failed",
            ] and rows["bad"]["error"] is not None

        await when_written(daemon, finished, timeout=20)
    rows = await app_rows(conn, table)
    jobs = {
        r["source_id"]: r
        for r in await conn.fetch("SELECT source_id, finished_at, last_error FROM listener.jobs")
    }
    for url, row_id in (("a", "1"), ("b", "2")):
        assert rows[url] == {
            "status": "complete",
            "result": {
                "first.step": step_output("first", row_id),
                "second.step": step_output("second", row_id),
            },
            "error": None,
            "analyzed_at": jobs[row_id]["finished_at"],
        }
    bad = rows["bad"]
    assert bad["status"] == "failed" and bad["result"] is None and bad["analyzed_at"] is None
    assert "not an image" in bad["error"]
    assert bad["error"] == jobs[str(bad_id)]["last_error"]


async def test_error_is_cleared_when_a_retry_or_a_reanalysis_succeeds(
    database_url: str, conn: asyncpg.Connection
) -> None:
    table = await make_app_table(conn)
    # Row 1 fails once (retryable), and its retry waits for the gate: the error is in the
    # row meanwhile. Row 2 fails for good, then is re-analyzed.
    provider = StepProvider(
        "only",
        failures={
            "1": [ProviderUnavailable("provider down for a moment")],
            "2": [InvalidImage("not an image")],
        },
    )
    provider.hold.update({"1": 2, "2": 3})
    provider.gate.clear()
    async with Daemon(fast_settings(database_url), providers=[provider], health=False) as daemon:
        await conn.execute(f"INSERT INTO {table} (url) VALUES ('retried'), ('reanalyzed')")

        async def both_errors_shown() -> bool:
            rows = await app_rows(conn, table)
            return (
                "provider down" in (rows["retried"]["error"] or "")
                and rows["reanalyzed"]["status"] == "failed"
                and "not an image" in (rows["reanalyzed"]["error"] or "")
            )

        await when_written(daemon, both_errors_shown, timeout=10)
        assert (await app_rows(conn, table))["retried"]["status"] in ("pending", "processing")
        provider.gate.set()
        assert await conn.fetchval("SELECT listener.reanalyze($1, ARRAY['2'], 0)", table) == 1

        async def both_complete() -> bool:
            rows = await app_rows(conn, table)
            return all(
                r["status"] == "complete" and r["error"] is None and r["analyzed_at"] is not None
                for r in rows.values()
            )

        await when_written(daemon, both_complete, timeout=20)
    rows = await app_rows(conn, table)
    assert rows["retried"]["result"] == {"only.step": step_output("only", "1")}
    assert rows["reanalyzed"]["result"] == {"only.step": step_output("only", "2")}


async def test_a_row_held_by_the_app_delays_only_its_own_columns(
    database_url: str, conn: asyncpg.Connection
) -> None:
    table = await make_app_table(conn)
    await conn.execute(f"INSERT INTO {table} (url) SELECT 'u' || g FROM generate_series(1, 12) g")
    app = await asyncpg.connect(database_url)
    try:
        tx = app.transaction()
        await tx.start()
        await app.execute(f"SELECT 1 FROM {table} WHERE url = 'u5' FOR UPDATE")
        async with Daemon(
            fast_settings(database_url), providers=[StepProvider("only")], health=False
        ) as daemon:

            async def others_written() -> bool:
                rows = await app_rows(conn, table)
                return all(
                    r["status"] == "complete" and r["result"] and r["analyzed_at"]
                    for url, r in rows.items()
                    if url != "u5"
                )

            try:
                await when_written(daemon, others_written, timeout=15)
                job = await conn.fetchval("SELECT status FROM listener.jobs WHERE source_id = '5'")
                assert job == "complete"
                held = (await app_rows(conn, table))["u5"]
                assert held == {
                    "status": None,
                    "result": None,
                    "error": None,
                    "analyzed_at": None,
                }
            finally:
                await tx.rollback()

            async def held_row_written() -> bool:
                row = (await app_rows(conn, table))["u5"]
                return row["status"] == "complete" and row["result"] is not None

            await when_written(daemon, held_row_written, timeout=10)
    finally:
        await app.close()
    row = (await app_rows(conn, table))["u5"]
    assert row["result"] == {"only.step": step_output("only", "5")}
    assert row["analyzed_at"] is not None


# The write-back function itself: merge, truncation, columns configured alone.


async def write_back(conn: asyncpg.Connection) -> asyncpg.Record:
    row = await conn.fetchrow("SELECT * FROM listener.write_back_status(100)")
    assert row is not None
    return row


async def store_result(conn: asyncpg.Connection, job_id: int, step: str, output: object) -> None:
    await conn.execute(
        "INSERT INTO listener.results (job_id, step, provider, output) VALUES ($1, $2, 'x', $3)",
        job_id,
        step,
        json.dumps(output),
    )


async def test_result_merges_into_the_apps_object_and_errors_fit_the_column(
    conn: asyncpg.Connection,
) -> None:
    """Keys the app wrote itself stay; a varchar error column gets the error cut to fit."""
    await conn.execute(
        "CREATE TABLE public.imgs (id int PRIMARY KEY, url text, meta jsonb, "
        "err varchar(200), at timestamp)"
    )
    await conn.execute(
        "SELECT listener.attach('imgs', 'id', 'url', NULL, NULL, 'meta', 'err', 'at')"
    )
    await conn.execute(
        "INSERT INTO public.imgs VALUES (1, 'a', '{\"tier_1_analysis\": {\"old\": true}}')"
    )
    assert await admit(conn) == 1
    job_id = await conn.fetchval("SELECT id FROM listener.jobs")
    await write_back(conn)
    assert await conn.fetchval("SELECT count(*) FROM listener.status_outbox") == 0
    # A step stored while the job runs is queued by the results trigger alone.
    await store_result(conn, job_id, "local.analysis", {"quality": 7})
    assert await conn.fetchval("SELECT count(*) FROM listener.status_outbox") == 1
    assert (await write_back(conn))["written"] == 1
    meta = json.loads(await conn.fetchval("SELECT meta FROM public.imgs"))
    assert meta == {"tier_1_analysis": {"old": True}, "local.analysis": {"quality": 7}}
    # A failure longer than the column: cut to 200 characters. A change of last_error alone
    # queues the job (the status stays pending while it waits for its retry).
    await conn.execute("UPDATE listener.jobs SET last_error = repeat('x', 500)")
    await write_back(conn)
    assert await conn.fetchval("SELECT length(err) FROM public.imgs") == 200
    assert await conn.fetchval("SELECT at FROM public.imgs") is None
    await conn.execute(
        "UPDATE listener.jobs SET status = 'complete', last_error = NULL, "
        "finished_at = '2026-01-02 03:04:05+00'"
    )
    await write_back(conn)
    row = await conn.fetchrow(
        "SELECT err, at, at = (SELECT finished_at FROM listener.jobs) AS same FROM public.imgs"
    )
    assert row["err"] is None and isinstance(row["at"], datetime) and row["same"]
    # Nothing differs: nothing written.
    await conn.execute("UPDATE listener.jobs SET status = 'processing'")
    await conn.execute("UPDATE listener.jobs SET status = 'complete'")
    assert (await write_back(conn))["written"] == 0


async def test_triggers_exist_only_while_a_column_needs_them(conn: asyncpg.Connection) -> None:
    async def triggers() -> set[str]:
        rows = await conn.fetch(
            "SELECT tgname FROM pg_trigger WHERE tgrelid IN "
            "('listener.jobs'::regclass, 'listener.results'::regclass) "
            "AND tgname LIKE '%outbox%'"
        )
        return {r["tgname"] for r in rows}

    await conn.execute(f"CREATE TABLE public.imgs (id int PRIMARY KEY, url text, {COLUMNS})")
    assert await triggers() == set()
    await conn.execute(
        "SELECT listener.attach('imgs', 'id', 'url', NULL, NULL, NULL, 'processing_error', NULL)"
    )
    assert await triggers() == {"jobs_status_outbox_insert", "jobs_status_outbox_update"}
    await conn.execute(
        "SELECT listener.attach('imgs', 'id', 'url', NULL, NULL, 'ai_scan_metadata', NULL, NULL)"
    )
    assert await triggers() == {
        "jobs_status_outbox_insert",
        "jobs_status_outbox_update",
        "results_outbox_insert",
        "results_outbox_update",
    }
    # The five-argument form still attaches, without the write-back columns.
    await conn.execute("SELECT listener.attach('imgs', 'id', 'url')")
    assert await triggers() == set()
    a = await conn.fetchrow("SELECT * FROM listener.attachments")
    assert (a["result_column"], a["error_column"], a["analyzed_at_column"]) == (None, None, None)
    await conn.execute("SELECT listener.detach('imgs')")
    assert await triggers() == set()


# attach refuses columns listener cannot write.


@pytest.fixture
async def typed(conn: asyncpg.Connection) -> AsyncIterator[Callable[[str], Any]]:
    async def make(column_type: str) -> None:
        await conn.execute("DROP TABLE IF EXISTS public.typed")
        await conn.execute(
            f"CREATE TABLE public.typed (id bigint PRIMARY KEY, url text, c {column_type})"
        )

    yield make


ATTACH_AS = {
    "result": "SELECT listener.attach('typed', 'id', 'url', NULL, NULL, 'c', NULL, NULL)",
    "error": "SELECT listener.attach('typed', 'id', 'url', NULL, NULL, NULL, 'c', NULL)",
    "analyzed_at": "SELECT listener.attach('typed', 'id', 'url', NULL, NULL, NULL, NULL, 'c')",
}


@pytest.mark.parametrize(
    ("role", "column_type"),
    [
        ("result", "jsonb"),
        ("error", "text"),
        ("error", "varchar"),
        ("error", "varchar(200)"),
        ("error", "citext"),
        ("analyzed_at", "timestamptz"),
        ("analyzed_at", "timestamp"),
    ],
)
async def test_attach_accepts_writable_columns(
    conn: asyncpg.Connection, typed: Callable[[str], Any], role: str, column_type: str
) -> None:
    if column_type == "citext":
        await create_extension_or_skip(conn, "citext")
    await typed(column_type)
    assert await conn.fetchval(ATTACH_AS[role]) == "public.typed"


@pytest.mark.parametrize(
    ("role", "column_type", "reason"),
    [
        ("result", "json", "result column c of public.typed is json; listener writes jsonb"),
        ("result", "text", "result column c of public.typed is text; listener writes jsonb"),
        ("error", "varchar(80)", "error column c of public.typed holds at most 80 characters"),
        ("error", "char(300)", "error column c of public.typed is character(300)"),
        ("error", "integer", "error column c of public.typed is integer; listener writes text"),
        ("analyzed_at", "date", "analyzed-at column c of public.typed is date"),
        ("analyzed_at", "text", "analyzed-at column c of public.typed is text"),
    ],
)
async def test_attach_refuses_columns_it_cannot_write(
    conn: asyncpg.Connection,
    typed: Callable[[str], Any],
    role: str,
    column_type: str,
    reason: str,
) -> None:
    await typed(column_type)
    # Attached before: a refused re-attach leaves it as it was.
    await conn.execute("SELECT listener.attach('typed', 'id', 'url')")
    with pytest.raises(asyncpg.InvalidParameterValueError, match=re.escape(reason)):
        await conn.execute(ATTACH_AS[role])
    assert await conn.fetchval("SELECT count(*) FROM listener.attachments") == 1
    await conn.execute("INSERT INTO public.typed (id, url) VALUES (1, 'a')")
    assert await admit(conn) == 1
    assert await conn.fetchval("SELECT count(*) FROM listener.jobs") == 1


async def test_attach_refuses_shared_generated_and_missing_columns(
    conn: asyncpg.Connection,
) -> None:
    await conn.execute(
        "CREATE TABLE public.t (id int PRIMARY KEY, url text, status text, meta jsonb, "
        "g jsonb GENERATED ALWAYS AS (CASE WHEN url IS NULL THEN '{}'::jsonb END) STORED)"
    )
    with pytest.raises(asyncpg.InvalidParameterValueError, match="is also its status column"):
        await conn.execute(
            "SELECT listener.attach('t', 'id', 'url', NULL, 'status', NULL, 'status', NULL)"
        )
    with pytest.raises(asyncpg.InvalidParameterValueError, match="is also its result column"):
        await conn.execute(
            "SELECT listener.attach('t', 'id', 'url', NULL, NULL, 'meta', 'meta', NULL)"
        )
    with pytest.raises(asyncpg.InvalidParameterValueError, match="generated column"):
        await conn.execute("SELECT listener.attach('t', 'id', 'url', NULL, NULL, 'g', NULL, NULL)")
    with pytest.raises(asyncpg.UndefinedColumnError, match="column nope does not exist"):
        await conn.execute(
            "SELECT listener.attach('t', 'id', 'url', NULL, NULL, NULL, 'nope', NULL)"
        )
    assert await conn.fetchval("SELECT count(*) FROM listener.attachments") == 0


async def test_cli_attaches_every_column_and_explains_refusals(
    conn: asyncpg.Connection, env_for_subprocess: dict[str, str]
) -> None:
    await conn.execute(
        "CREATE TABLE public.vehicle_images (id uuid PRIMARY KEY, image_url text, user_id uuid, "
        "processing_status text, ai_scan_metadata jsonb, processing_error varchar(50), "
        "ai_last_scanned timestamptz)"
    )
    args = [
        "attach",
        "public.vehicle_images",
        "--id-column",
        "id",
        "--url-column",
        "image_url",
        "--owner-column",
        "user_id",
        "--status-column",
        "processing_status",
        "--result-column",
        "ai_scan_metadata",
        "--error-column",
        "processing_error",
        "--analyzed-at-column",
        "ai_last_scanned",
    ]
    refused = await asyncio.to_thread(cli, env_for_subprocess, *args)
    assert refused.returncode == 2
    assert (
        "error column processing_error of public.vehicle_images holds at most 50 characters"
        in refused.stderr
    )
    assert "Use text, or varchar(200) or longer." in refused.stderr
    assert "Traceback" not in refused.stderr
    await conn.execute("ALTER TABLE public.vehicle_images ALTER processing_error TYPE text")
    done = await asyncio.to_thread(cli, env_for_subprocess, *args)
    assert done.returncode == 0, done.stderr
    a = await conn.fetchrow("SELECT * FROM listener.attachments")
    assert (
        a["status_column"],
        a["result_column"],
        a["error_column"],
        a["analyzed_at_column"],
    ) == ("processing_status", "ai_scan_metadata", "processing_error", "ai_last_scanned")


# Upgrades reach attached tables.


@pytest.fixture
async def old_db(database_before: Callable[[int], Awaitable[str]]) -> str:
    """A database migrated up to the version before 0011 (the previous release)."""
    return await database_before(11)


async def enqueue_functions(conn: asyncpg.Connection, table: str) -> dict[str, str]:
    """``{function name: source}`` of the trigger functions attach generated for ``table``."""
    rows = await conn.fetch(
        "SELECT p.proname, p.prosrc FROM pg_proc AS p "
        "JOIN pg_namespace AS n ON n.oid = p.pronamespace "
        "WHERE n.nspname = 'listener' AND p.proname IN "
        "('enqueue_insert_' || $1::regclass::oid, 'enqueue_update_' || $1::regclass::oid)",
        table,
    )
    return {r["proname"]: r["prosrc"] for r in rows}


async def test_migrate_regenerates_the_triggers_of_tables_attached_before(old_db: str) -> None:
    conn = await asyncpg.connect(old_db)
    try:
        await conn.execute(
            "CREATE TABLE public.vehicle_images (id bigint GENERATED ALWAYS AS IDENTITY "
            f"PRIMARY KEY, url text, {COLUMNS})"
        )
        await conn.execute(
            "SELECT listener.attach('public.vehicle_images', 'id', 'url', NULL, 'status')"
        )
        await conn.execute("INSERT INTO public.vehicle_images (url) VALUES ('before')")
        # What an older listener generated: a trigger function of its own making.
        oid = await conn.fetchval("SELECT 'public.vehicle_images'::regclass::oid")
        insert_fn = f"enqueue_insert_{oid}"
        old_source = (await enqueue_functions(conn, "public.vehicle_images"))[insert_fn]
        await conn.execute(
            f"CREATE OR REPLACE FUNCTION listener.{insert_fn}() RETURNS trigger "
            "LANGUAGE plpgsql AS $$ BEGIN /* generated by an older listener */ "
            f"{old_source.split('BEGIN', 1)[1]}$$"
        )
        # A table attach would refuse now (its status column was narrowed after attaching).
        await conn.execute(
            "CREATE TABLE public.narrow (id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY, "
            "url text, status text)"
        )
        await conn.execute("SELECT listener.attach('public.narrow', 'id', 'url', NULL, 'status')")
        await conn.execute("ALTER TABLE public.narrow ALTER status TYPE varchar(4)")
        narrow_before = await enqueue_functions(conn, "public.narrow")
        created = await conn.fetchval(
            "SELECT created_at FROM listener.attachments "
            "WHERE source_table = 'public.vehicle_images'"
        )

        assert "0011_result_columns" in await migrate(conn)

        after = await enqueue_functions(conn, "public.vehicle_images")
        assert "older listener" not in after[insert_fn]
        # Still the same attachment, with its settings.
        a = await conn.fetchrow(
            "SELECT * FROM listener.attachments WHERE source_table = 'public.vehicle_images'"
        )
        assert (a["created_at"], a["status_column"], a["result_column"]) == (
            created,
            "status",
            None,
        )
        # What a fresh attach generates, with the stored settings.
        await conn.execute(
            "SELECT listener.attach('public.vehicle_images', 'id', 'url', NULL, 'status')"
        )
        assert await enqueue_functions(conn, "public.vehicle_images") == after
        # The table attach refuses keeps what it had, and still enqueues.
        assert await enqueue_functions(conn, "public.narrow") == narrow_before
        await conn.execute("INSERT INTO public.narrow (url) VALUES ('n')")
        assert (
            await conn.fetchval(
                "SELECT count(*) FROM listener.jobs WHERE source_table = 'public.narrow'"
            )
            == 1
        )
        # The new behaviour on the old table: its result, error and time columns.
        await conn.execute(
            "SELECT listener.attach('public.vehicle_images', 'id', 'url', NULL, 'status', "
            "'ai_scan_metadata', 'processing_error', 'ai_last_scanned')"
        )
        job_id = await conn.fetchval(
            "SELECT id FROM listener.jobs WHERE source_table = 'public.vehicle_images'"
        )
        await store_result(conn, job_id, "local.analysis", {"quality": 9})
        await conn.execute(
            "UPDATE listener.jobs SET status = 'complete', finished_at = now() WHERE id = $1",
            job_id,
        )
        await write_back(conn)
        row = await conn.fetchrow("SELECT * FROM public.vehicle_images")
        assert row["status"] == "complete"
        assert json.loads(row["ai_scan_metadata"]) == {"local.analysis": {"quality": 9}}
        assert row["ai_last_scanned"] is not None
        # Migrating again applies nothing and regenerates nothing.
        assert await migrate(conn) == []
    finally:
        await conn.close()
