"""The command line as a user runs it: migrate, attach, detach, backfill, status."""

from __future__ import annotations

import asyncio
import json
import re
from pathlib import Path

import asyncpg
import pytest
from awaiting import jobs_finished
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


async def test_backfilled_and_inserted_jobs_get_the_daemons_max_attempts(
    database_url: str, conn: asyncpg.Connection, env_for_subprocess: dict[str, str]
) -> None:
    # The operator's shell says 9, the daemon's environment 2: one source decides, the daemon
    # that claims the jobs, for the rows it backfills and those the trigger inserts alike.
    await make_table(conn, attach=False)
    await conn.execute("INSERT INTO images (url) VALUES ('old-1'), ('old-2')")
    await conn.execute("SELECT listener.attach('images', 'id', 'url')")
    env = {**env_for_subprocess, "LISTENER_MAX_ATTEMPTS": "9"}
    assert "enqueued 2 jobs" in cli(env, "backfill", "images", "--no-wait", ok=True).stdout
    await conn.execute("INSERT INTO images (url) VALUES ('new-1')")
    assert await conn.fetch("SELECT max_attempts FROM listener.jobs") == [(None,), (None,)]
    settings = fast_settings(database_url, pipeline="noop", max_attempts=2)
    async with Daemon(settings) as daemon:
        await jobs_finished(daemon, conn, 3)
    rows = await conn.fetch(
        "SELECT j.source_id, j.status, j.max_attempts FROM listener.jobs AS j ORDER BY j.id"
    )
    assert [(r["status"], r["max_attempts"]) for r in rows] == [("complete", 2)] * 3


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


def _no_settings(**variables: str) -> dict[str, str]:
    """``os.environ`` without any ``LISTENER_*`` or ``DATABASE_URL`` of the caller's, plus
    ``variables``."""
    import os

    env = {
        k: v
        for k, v in os.environ.items()
        if not k.upper().startswith("LISTENER_") and "DATABASE_URL" not in k
    }
    # This checkout's package, whatever the working directory (PYTHONPATH may be relative).
    root = str(Path(__file__).resolve().parents[2])
    path = os.pathsep.join([root, *filter(None, [env.get("PYTHONPATH")])])
    return env | {"PYTHONPATH": path} | variables


@pytest.mark.parametrize("command", [["status"], ["run"], ["migrate"], ["faces", "people"]])
def test_invalid_values_are_one_line_each_and_exit_2(command: list[str], tmp_path: Path) -> None:
    secret = "s3cretpassw0rd"
    env = _no_settings(
        LISTENER_CONCURRENCY="abc",
        LISTENER_PIPELINE="tierd",
        LISTENER_DEDUP="sha265",
        LISTENER_DATABASE_URL=f"postgresql://app:{secret}@db/app",
        LISTENER_OPENAI=f'{{"api_key": "sk-{secret}", "detail": "medium"}}',
        LISTENER_WEBHOOK_URL=f"https://hooks.example/{secret}",
    )
    result = cli(env, *command, cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert result.stderr.splitlines() == [
        "error: invalid setting LISTENER_CONCURRENCY='abc': expected an integer >= 1",
        "error: invalid setting LISTENER_PIPELINE='tierd': expected one of 'local', 'noop', "
        "'tiered' (did you mean 'tiered'?)",
        "error: invalid setting LISTENER_OPENAI: detail='medium': expected one of 'low', 'high'",
        "error: invalid setting LISTENER_DEDUP='sha265': expected one of 'off', 'sha256', "
        "'phash' (did you mean 'sha256'?)",
    ]
    assert secret not in result.stderr + result.stdout


def test_a_secret_in_an_invalid_value_is_masked(tmp_path: Path) -> None:
    key = "sk-proj-0123456789abcdef"
    env = _no_settings(LISTENER_OPENAI=f'{{"api_key" "{key}"}}')
    result = cli(env, "status", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        "error: invalid setting LISTENER_OPENAI=***: not JSON (Expecting ':' delimiter); "
        "expected a JSON object"
    ]


def test_unknown_names_come_first_when_a_value_is_invalid(tmp_path: Path) -> None:
    """A misspelled name may be why a value is wrong: both are said, each once."""
    env = _no_settings(LISTENER_CONCURENCY="5", LISTENER_PIPELINE="tierd")
    result = cli(env, "run", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        "warning: unknown setting LISTENER_CONCURENCY: did you mean LISTENER_CONCURRENCY?",
        "error: invalid setting LISTENER_PIPELINE='tierd': expected one of 'local', 'noop', "
        "'tiered' (did you mean 'tiered'?)",
    ]


def test_an_invalid_option_is_named_as_the_option(tmp_path: Path) -> None:
    """``listener run`` through its console script, as a user starts it."""
    import subprocess
    import sys

    script = Path(sys.executable).parent / "listener"
    result = subprocess.run(
        [str(script), "run", "--pipeline", "tierd"],
        env=_no_settings(COLUMNS="300", NO_COLOR="1"),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        "error: invalid option --pipeline='tierd': expected one of 'local', 'noop', 'tiered' "
        "(did you mean 'tiered'?)"
    ]


def test_unknown_names_are_warned_about_once(tmp_path: Path) -> None:
    (tmp_path / ".env").write_text(
        "POSTGRES_PASSWORD=compose-only\nLISTENER_FETCH__MAX_BYTE=5\nLISTENER_LOG_LEVEL=INFO\n"
    )
    env = _no_settings(
        LISTENER_CONCURENCY="5",
        LISTENER_OPENAI__API_KEY="sk-proj-0123456789abcdef",
        LISTENER_RATE_LIMITS__OPENAI__RPS="3",
        LISTENER_TIERS__TIER1='["local"]',
        LISTENER_PG_BINDIR="/usr/lib/postgresql/15/bin",
    )
    # No database: the command stops after the warnings, with its own error.
    result = cli(env, "status", cwd=tmp_path)
    assert result.returncode == 2
    warnings = [line for line in result.stderr.splitlines() if "WARNING" in line]
    assert [w.split(" ", 2)[2] for w in warnings] == [
        "unknown setting LISTENER_CONCURENCY: did you mean LISTENER_CONCURRENCY?",
        "unknown setting LISTENER_FETCH__MAX_BYTE in .env: did you mean LISTENER_FETCH__MAX_BYTES?",
    ]
    assert "no database" in result.stderr and "sk-proj" not in result.stderr

    strict = cli(env | {"LISTENER_STRICT_SETTINGS": "1"}, "status", cwd=tmp_path)
    assert strict.returncode == 2
    assert strict.stderr.splitlines() == [
        "error: unknown setting LISTENER_CONCURENCY: did you mean LISTENER_CONCURRENCY? "
        "(LISTENER_STRICT_SETTINGS is on)",
        "error: unknown setting LISTENER_FETCH__MAX_BYTE in .env: did you mean "
        "LISTENER_FETCH__MAX_BYTES? (LISTENER_STRICT_SETTINGS is on)",
    ]


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
