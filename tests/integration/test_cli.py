"""The command line as a user runs it: migrate, attach, detach, backfill, status."""

from __future__ import annotations

import asyncio
import json
import re

import asyncpg
import pytest
from support import RecordingProvider, admit, cli, fast_settings, make_table

from listener.app import Daemon


async def test_migrate_attach_status_detach(
    conn: asyncpg.Connection, env_for_subprocess: dict[str, str]
) -> None:
    env = env_for_subprocess
    assert "up to date" in cli(env, "migrate").stdout
    await make_table(conn, owner=True, status=True, attach=False)

    missing = cli(env, "attach", "public.images", "--id-column", "id", "--url-column", "nope")
    assert missing.returncode == 2
    assert "column nope does not exist in table public.images" in missing.stderr
    no_table = cli(env, "attach", "ghosts", "--id-column", "id", "--url-column", "url")
    assert no_table.returncode == 2 and "table ghosts does not exist" in no_table.stderr

    ok = cli(
        env,
        "attach",
        "images",
        "--id-column",
        "id",
        "--url-column",
        "url",
        "--owner-column",
        "owner_id",
        "--status-column",
        "status",
    )
    assert ok.returncode == 0, ok.stderr
    assert "attached to public.images" in ok.stdout
    await conn.execute("INSERT INTO images (url) VALUES ('a'), ('b')")

    status = cli(env, "status", "--json")
    assert status.returncode == 0, status.stderr
    doc = json.loads(status.stdout)
    assert {k: doc[k] for k in ("pending", "processing", "complete", "failed")} == {
        "pending": 2,
        "processing": 0,
        "complete": 0,
        "failed": 0,
    }
    assert doc["tables"] == ["public.images"]
    table = cli(env, "status")
    assert "pending" in table.stdout and "2" in table.stdout

    assert "detached from images" in cli(env, "detach", "images").stdout
    assert "was not attached" in cli(env, "detach", "images").stdout


async def test_backfill_dry_run_limit_owner_and_rerun(
    database_url: str, conn: asyncpg.Connection, env_for_subprocess: dict[str, str]
) -> None:
    env = env_for_subprocess
    await make_table(conn, owner=True, attach=False)
    await conn.execute(
        "INSERT INTO images (url, owner_id) SELECT 'u' || g, "
        "CASE WHEN g <= 30 THEN 'alice' ELSE 'bob' END FROM generate_series(1, 100) g"
    )
    await conn.execute("SELECT listener.attach('images', 'id', 'url', 'owner_id')")

    dry = cli(env, "backfill", "images", "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert "100 rows would be enqueued" in dry.stdout
    assert await conn.fetchval("SELECT count(*) FROM listener.jobs") == 0

    alice = cli(env, "backfill", "images", "--owner", "alice", "--no-wait")
    assert "enqueued 30 jobs" in alice.stdout, alice.stderr
    limited = cli(env, "backfill", "images", "--limit", "25", "--no-wait")
    assert "enqueued 25 jobs" in limited.stdout, limited.stderr
    assert "45 rows would be enqueued" in cli(env, "backfill", "images", "--dry-run").stdout

    await conn.execute("INSERT INTO images (url, owner_id) VALUES ('fresh', 'bob')")
    assert await admit(conn) == 1
    priorities = await conn.fetch(
        "SELECT priority, count(*) AS n FROM listener.jobs GROUP BY 1 ORDER BY 1"
    )
    assert [(r["priority"], r["n"]) for r in priorities] == [(0, 1), (100, 55)]

    # Without --no-wait the command follows the jobs until the daemon has finished them all.
    async with Daemon(fast_settings(database_url), providers=[RecordingProvider()], health=False):
        follow = await asyncio.to_thread(cli, env, "backfill", "images")
    assert follow.returncode == 0, follow.stderr
    assert "enqueued 45 jobs" in follow.stdout
    summary = re.search(r"done: (\d+) complete, 0 failed, 0 still queued", follow.stdout)
    assert summary is not None and int(summary.group(1)) >= 45, follow.stdout
    assert (
        await conn.fetchval("SELECT count(*) FROM listener.jobs WHERE status = 'complete'") == 101
    )
    again = cli(env, "backfill", "images", "--no-wait")
    assert "enqueued 0 jobs" in again.stdout


async def test_backfill_of_unattached_table_says_how_to_attach(
    conn: asyncpg.Connection, env_for_subprocess: dict[str, str]
) -> None:
    await make_table(conn, attach=False)
    result = cli(env_for_subprocess, "backfill", "images")
    assert result.returncode == 2
    assert "table images is not attached" in result.stderr
    assert "listener attach" in result.stderr


def test_missing_database_url_is_a_clear_error() -> None:
    import os

    env = {k: v for k, v in os.environ.items() if "DATABASE_URL" not in k}
    result = cli(env, "status", cwd="/")
    assert result.returncode == 2
    assert "set LISTENER_DATABASE_URL or DATABASE_URL" in result.stderr


async def test_status_retry_and_cancel(
    database_url: str, conn: asyncpg.Connection, env_for_subprocess: dict[str, str]
) -> None:
    env = env_for_subprocess
    await make_table(conn, owner=True, status=True)
    await conn.execute(
        "INSERT INTO images (url, owner_id) SELECT 'http://img/' || g || '.jpg', "
        "CASE WHEN g <= 6 THEN 'alice' ELSE 'bob' END FROM generate_series(1, 10) g"
    )
    assert await admit(conn) == 10
    # Three 404s and one timeout for alice, finished now; bob's jobs stay pending.
    await conn.execute(
        "UPDATE listener.jobs SET status = 'failed', finished_at = now(), attempts = 1, "
        "last_error = 'image not found: HTTP 404 from ' || image_url "
        "WHERE owner_id = 'alice' AND source_id::int <= 3"
    )
    await conn.execute(
        "UPDATE listener.jobs SET status = 'failed', finished_at = now(), attempts = 5, "
        "last_error = 'timed out (gave up after 5 attempts)' "
        "WHERE owner_id = 'alice' AND source_id::int = 4"
    )
    await conn.execute(
        "UPDATE listener.jobs SET status = 'complete', finished_at = now() "
        "WHERE owner_id = 'alice' AND source_id::int > 4"
    )
    doc = json.loads(cli(env, "status", "--json").stdout)
    assert doc["failure_reasons"] == [
        {"reason": "image not found: HTTP 404 from <url>", "count": 3},
        {"reason": "timed out (gave up after 5 attempts)", "count": 1},
    ]
    assert doc["by_table"] == [
        {
            "table": "public.images",
            "pending": 4,
            "processing": 0,
            "complete": 2,
            "failed": 4,
            "cancelled": 0,
            "batched": 0,
        }
    ]
    assert doc["by_owner"][0]["owner"] == "bob" and doc["by_owner"][0]["pending"] == 4
    assert sum(m["complete"] + m["failed"] for m in doc["throughput_per_minute"]) == 6
    assert doc["rate_per_s"] == pytest.approx(6 / 300) and doc["eta_s"] == pytest.approx(200)
    assert len(doc["recent_failures"]) == 4 and doc["open_batches"] == []
    text = cli(env, "status").stdout
    assert "image not found: HTTP 404 from <url>" in text and "bob" in text

    # retry: only the 404s, as fresh jobs, with the row's status written back.
    retried = json.loads(cli(env, "retry", "--failed", "--reason", "404", "--json").stdout)
    assert retried["requeued"] == 3
    rows = await conn.fetch(
        "SELECT status, attempts, last_error FROM listener.jobs WHERE source_id::int <= 3"
    )
    assert {tuple(r) for r in rows} == {("pending", 0, None)}
    # No daemon runs here: one round of its status write-back.
    await conn.execute("SELECT listener.write_back_status(1000)")
    assert await conn.fetchval("SELECT count(*) FROM images WHERE status = 'pending'") == 7

    # cancel needs a filter; by owner it takes pending jobs only, and retry brings them back.
    refused = cli(env, "cancel")
    assert refused.returncode == 2 and "--all" in refused.stderr
    cancelled = json.loads(cli(env, "cancel", "--owner", "bob", "--json").stdout)
    assert cancelled["cancelled"] == 4
    await conn.execute("SELECT listener.write_back_status(1000)")
    assert await conn.fetchval("SELECT count(*) FROM images WHERE status = 'cancelled'") == 4
    back = cli(env, "retry", "--cancelled", "--owner", "bob", "--table", "images")
    assert "requeued 4 jobs (owner bob, table images)" in back.stdout, back.stderr
    assert json.loads(cli(env, "status", "--json").stdout)["pending"] == 7
