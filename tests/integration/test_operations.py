"""Operator controls: backfill --where / --limit-per-owner, pause / resume, prune."""

from __future__ import annotations

import asyncio
import json
import shutil
from datetime import UTC, datetime, timedelta
from pathlib import Path

import asyncpg
from awaiting import jobs_finished, loop_signals, when
from support import (
    RecordingProvider,
    StaticServer,
    admit,
    cli,
    counts,
    fast_settings,
    make_table,
    wait_until,
)
from test_openai_provider import tiered

from listener.app import Daemon
from listener.cli.demo import BUNDLED_IMAGES
from listener.queue.pg_store import PgJobStore
from listener.testing.openai_fake import FakeOpenAI

FAKE = FakeOpenAI  # the class of the ``fake`` fixture (conftest.py)


async def job_rows(conn: asyncpg.Connection) -> list[tuple[object, ...]]:
    """Every job's identity and version: xmin changes with any write to the row."""
    rows = await conn.fetch(
        "SELECT id, xmin::text, updated_at, status FROM listener.jobs ORDER BY id"
    )
    return [tuple(r) for r in rows]


# -- backfill ------------------------------------------------------------------------------


async def test_backfill_where_and_limit_per_owner(
    conn: asyncpg.Connection, env_for_subprocess: dict[str, str]
) -> None:
    table = await make_table(conn, attach=False)
    # status 'done': analyzed by the old system, must not be paid again.
    await conn.execute(
        f"INSERT INTO {table} (url, owner_id, status) VALUES "
        "('a1', 'alice', NULL), ('a2', 'alice', 'done'), ('a3', 'alice', NULL), "
        "('a4', 'alice', NULL), ('b1', 'bob', NULL), ('b2', 'bob', 'done')"
    )
    await conn.execute("SELECT listener.attach($1, 'id', 'url', 'owner_id')", table)
    args = ["backfill", table, "--where", "status IS NULL", "--limit-per-owner", "2", "--json"]

    dry = json.loads(cli(env_for_subprocess, *args, "--dry-run", ok=True).stdout)
    assert dry["selected"] == 3 and dry["dry_run"] is True
    assert {r["owner"]: r["selected"] for r in dry["by_owner"]} == {"alice": 2, "bob": 1}
    assert await counts(conn) == {}

    done = json.loads(cli(env_for_subprocess, *args, ok=True).stdout)
    assert done["enqueued"] == 3
    by_owner = {r["owner_id"]: r for r in done["by_owner"]}
    assert by_owner["alice"]["enqueued"] == 2 and by_owner["alice"]["remaining"] == 2
    assert by_owner["bob"]["jobs"] == 1 and done["failures"] == []
    urls = await conn.fetch("SELECT image_url FROM listener.jobs ORDER BY image_url")
    assert [r[0] for r in urls] == ["a1", "a3", "b1"]

    # Again: rows with a job are not selected; alice's next row is (the limit is per run).
    again = json.loads(cli(env_for_subprocess, *args, ok=True).stdout)
    assert again["enqueued"] == 1
    assert await conn.fetchval("SELECT count(*) FROM listener.jobs") == 4


async def test_a_backfill_predicate_that_writes_fails_without_writing(
    conn: asyncpg.Connection, env_for_subprocess: dict[str, str]
) -> None:
    table = await make_table(conn, attach=False)
    await conn.execute(f"INSERT INTO {table} (url, owner_id) VALUES ('a', 'alice')")
    await conn.execute("SELECT listener.attach($1, 'id', 'url', 'owner_id')", table)
    await conn.execute("CREATE SEQUENCE public.side_effect")
    for predicate in (
        f"listener.reanalyze('{table}', ARRAY['1'], 0) > 0",
        "nextval('public.side_effect') > 0",
    ):
        bad = cli(env_for_subprocess, "backfill", table, "--where", predicate)
        assert bad.returncode == 2 and "read-only" in bad.stderr, bad.stderr
    assert await counts(conn) == {}
    assert await conn.fetchval("SELECT last_value FROM public.side_effect") == 1
    assert not await conn.fetchval("SELECT is_called FROM public.side_effect")
    # --limit-per-owner needs an owner column.
    other = await make_table(conn, "plain")
    bad = cli(env_for_subprocess, "backfill", other, "--limit-per-owner", "1")
    assert bad.returncode == 2 and "owner" in bad.stderr


# -- pause / resume ------------------------------------------------------------------------


async def _jobs_exist(conn: asyncpg.Connection, n: int) -> bool:
    return bool(await conn.fetchval("SELECT count(*) FROM listener.jobs") == n)


async def test_pause_openai_stops_claims_without_rewriting_jobs(
    database_url: str,
    conn: asyncpg.Connection,
    env_for_subprocess: dict[str, str],
    fake: FakeOpenAI,
    tmp_path: Path,
) -> None:
    table = await make_table(conn)
    shutil.copy(BUNDLED_IMAGES / "astronaut.png", tmp_path / "a.png")
    photos = await StaticServer(str(tmp_path)).__aenter__()
    cli(env_for_subprocess, "pause", "openai", "--reason", "quota review", ok=True)
    status = json.loads(cli(env_for_subprocess, "status", "--json", ok=True).stdout)
    assert status["operator_pauses"] == [
        {"provider": "openai", "reason": "quota review", "remaining_s": None}
    ]
    settings = tiered(database_url, fake)
    async with Daemon(settings, health=False) as daemon:
        await conn.execute(
            f"INSERT INTO {table} (url) VALUES ($1), ($1)", f"{photos.base_url}/a.png"
        )
        # Not claiming, the daemon still admits the rows: their jobs exist, pending.
        await wait_until(lambda: _jobs_exist(conn, 2), timeout=10)
        before = await job_rows(conn)
        for _ in range(4):  # several poll intervals (0.2 s)
            await asyncio.sleep(settings.poll_interval_s * 2)
            assert await job_rows(conn) == before
        assert daemon.signals.count("claimed") == 0
        assert daemon.worker is not None and "openai" in (daemon.worker.claims_paused or "")
        assert {r[3] for r in before} == {"pending"}
        resumed = cli(env_for_subprocess, "resume", "openai", ok=True)
        assert "resumed openai" in resumed.stdout
        await jobs_finished(daemon, conn, 2, timeout=30)
    await photos.__aexit__()
    assert await counts(conn) == {"complete": 2}
    assert await conn.fetchval("SELECT count(*) FROM listener.pauses") == 0


async def test_a_paused_provider_holds_its_jobs_once_and_resume_wakes_them(
    database_url: str, conn: asyncpg.Connection, env_for_subprocess: dict[str, str]
) -> None:
    table = await make_table(conn)
    first, second = RecordingProvider(), RecordingProvider()
    second.name = "second"
    await conn.execute("INSERT INTO listener.pauses (provider, reason) VALUES ('second', 'x')")
    settings = fast_settings(database_url)
    async with Daemon(settings, providers=[first, second], health=False) as daemon:
        await conn.execute(f"INSERT INTO {table} (url) VALUES ('a'), ('b')")
        await daemon.signals.wait("snoozed", 2)
        held = await job_rows(conn)
        rows = await conn.fetch("SELECT held_by, run_after - now() AS wait FROM listener.jobs")
        assert {r["held_by"] for r in rows} == {"second"}
        assert all(r["wait"] > timedelta(hours=23) for r in rows)
        for _ in range(4):
            await asyncio.sleep(settings.poll_interval_s * 2)
            assert await job_rows(conn) == held  # one write per job per pause
        assert sorted(first.calls) == ["1", "2"] and second.calls == []
        cli(env_for_subprocess, "resume", "second", ok=True)
        await daemon.signals.wait("finished", 2)
    assert sorted(second.calls) == ["1", "2"]
    assert sorted(first.calls) == ["1", "2"]  # the first step was stored, not run again
    assert await counts(conn) == {"complete": 2}


async def test_pausing_the_pipeline_stops_claiming(
    database_url: str, conn: asyncpg.Connection, env_for_subprocess: dict[str, str]
) -> None:
    table = await make_table(conn)
    cli(env_for_subprocess, "pause", "--for", "1h", ok=True)
    provider = RecordingProvider()
    settings = fast_settings(database_url)
    async with Daemon(settings, providers=[provider], health=False) as daemon:
        await conn.execute(f"INSERT INTO {table} (url) VALUES ('a')")
        await wait_until(lambda: _jobs_exist(conn, 1), timeout=10)  # admitted, not claimed
        before = await job_rows(conn)
        await asyncio.sleep(settings.poll_interval_s * 4)
        assert await job_rows(conn) == before and provider.calls == []
        cli(env_for_subprocess, "resume", ok=True)
        await daemon.signals.wait("finished", 1)
    assert provider.calls == ["1"]


# -- prune ---------------------------------------------------------------------------------


async def prune_fixture(conn: asyncpg.Connection) -> tuple[str, dict[str, int]]:
    """Six rows, each with a job in a chosen state; rows 'old-gone*' and 'new-gone' deleted."""
    table = await make_table(conn)
    cases = {
        "old-gone-complete": ("complete", 40),
        "old-gone-failed": ("failed", 40),
        "old-gone-cancelled": ("cancelled", 40),
        "new-gone": ("complete", 1),
        "old-kept": ("complete", 40),  # its row exists: the app reads its result
        "pending-gone": ("pending", None),
    }
    ids = {}
    for url, (status, days) in cases.items():
        row_id = await conn.fetchval(f"INSERT INTO {table} (url) VALUES ($1) RETURNING id", url)
        assert await admit(conn) == 1
        job_id = await conn.fetchval(
            "UPDATE listener.jobs SET status = $2, finished_at = now() - make_interval(days => $3)"
            " WHERE source_id = $1 RETURNING id",
            str(row_id),
            status,
            days,
        )
        await conn.execute(
            "INSERT INTO listener.results (job_id, step, provider, output) "
            "VALUES ($1, 's', 'p', '{}')",
            job_id,
        )
        ids[url] = job_id
    await conn.execute(f"DELETE FROM {table} WHERE url LIKE '%gone%'")
    # As rows deleted while no delete trigger queued them (before 0014, or while detached),
    # which is what prune is for: a queued delete is cleaned up by the daemon (test_deletes).
    await conn.execute("DELETE FROM listener.deleted_rows")
    return table, ids


async def test_prune_deletes_old_finished_jobs_of_deleted_rows_only(
    conn: asyncpg.Connection, env_for_subprocess: dict[str, str]
) -> None:
    _, ids = await prune_fixture(conn)
    dry = cli(env_for_subprocess, "prune", "--older-than", "30d", "--dry-run", "--json", ok=True)
    assert json.loads(dry.stdout) == {"pruned": 3, "dry_run": True}
    assert await conn.fetchval("SELECT count(*) FROM listener.jobs") == 6
    done = cli(env_for_subprocess, "prune", "--older-than", "30d", "--json", ok=True)
    assert json.loads(done.stdout) == {"pruned": 3, "dry_run": False}
    left = {r[0] for r in await conn.fetch("SELECT id FROM listener.jobs")}
    assert left == {ids["new-gone"], ids["old-kept"], ids["pending-gone"]}
    results = {r[0] for r in await conn.fetch("SELECT job_id FROM listener.results")}
    assert results == left


async def test_prune_in_small_batches(database_url: str, conn: asyncpg.Connection) -> None:
    await prune_fixture(conn)
    pool = await asyncpg.create_pool(database_url, min_size=1, max_size=2)
    try:
        store = PgJobStore(pool)
        before = datetime.now(UTC) - timedelta(days=30)
        assert await store.prune(before, 2) == 2
        assert await store.prune(before, 0, dry_run=True) == 1
        assert await store.prune(before, 2) == 1
        assert await store.prune(before, 2) == 0
    finally:
        await pool.close()


async def test_the_daemon_prunes_by_itself(database_url: str, conn: asyncpg.Connection) -> None:
    _, ids = await prune_fixture(conn)
    settings = fast_settings(database_url, prune_after_days=30, prune_batch=1)
    async with Daemon(settings, providers=[RecordingProvider()], health=False) as daemon:

        async def pruned() -> bool:
            return bool(await conn.fetchval("SELECT count(*) FROM listener.jobs") == 3)

        await when(pruned, loop_signals(daemon, "prune"), "ticked", timeout=10)
    assert ids["old-kept"] in {r[0] for r in await conn.fetch("SELECT id FROM listener.jobs")}
