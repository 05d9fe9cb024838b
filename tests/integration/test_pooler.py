"""Through a real PgBouncer in transaction mode, as users run listener behind one (Supabase's
pooler on port 6543 behaves the same for prepared statements and LISTEN).

The CLI and the daemon run as subprocesses with ``LISTENER_DATABASE_URL`` on the pooler and
``LISTENER_LISTEN_DATABASE_URL`` direct, as docs/guides/poolers.md advises. PgBouncer has 5 server
connections per database, so concurrent clients share them, which is where named prepared
statements and session state break.
"""

from __future__ import annotations

import asyncio
import json
import secrets
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import pytest
from pgbouncer_process import PgBouncer, pgbouncer_binary
from support import cli, cli_async, listener_run, make_table, wait_until

from listener.db.connect import detect_transaction_pooling, resolve_database


@pytest.fixture
def pooled_env(
    env_for_subprocess: dict[str, str], pooler_url: str, database_url: str
) -> dict[str, str]:
    """The documented advice: database URL on the pooler, LISTEN URL direct; no LISTENER_POOLER
    (auto), so the pooler must be detected."""
    env = dict(env_for_subprocess)
    env.pop("LISTENER_POOLER", None)
    env["LISTENER_DATABASE_URL"] = pooler_url
    env["DATABASE_URL"] = pooler_url
    env["LISTENER_LISTEN_DATABASE_URL"] = database_url
    return env


def _problems(log: str) -> list[str]:
    """The ERROR and WARNING lines of a daemon's log, but the warning that it runs as a
    superuser (these tests' pooler knows the cluster's superuser only)."""
    return [
        line
        for line in log.splitlines()
        if (" ERROR " in line or " WARNING " in line) and "the daemon runs as" not in line
    ]


@pytest.fixture
async def empty_database(pg_admin_dsn: str, dsn_for: object) -> AsyncIterator[str]:
    """A database with no listener schema (``listener migrate`` has everything to do)."""
    name = f"p_{secrets.token_hex(6)}"
    admin = await asyncpg.connect(pg_admin_dsn)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
        yield dsn_for(name)  # type: ignore[operator]
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()


async def _count(conn: asyncpg.Connection, sql: str) -> int:
    return int(await conn.fetchval(sql))


# -- detection --------------------------------------------------------------------------------


async def test_the_probe_tells_transaction_pooling_from_direct_and_session_mode(
    database_url: str, pooler_url: str, pg_admin_dsn: str
) -> None:
    assert await detect_transaction_pooling(pooler_url) is True
    assert await detect_transaction_pooling(database_url) is False
    # A session-mode pooler keeps one backend per client: prepared statements and LISTEN work.
    with PgBouncer(pg_admin_dsn, pool_mode="session", pool_size=5) as session_mode:
        assert await detect_transaction_pooling(session_mode.dsn_for(database_url)) is False


async def test_a_hint_makes_auto_probe() -> None:
    # Nothing listens on port 1: the OSError shows that a probe ran.
    # A LISTEN URL set apart, or PgBouncer's port: worth a probe (which fails here).
    with pytest.raises(OSError):
        await resolve_database(
            "postgresql://u@127.0.0.1:1/db",
            "auto",
            listen_dsn="postgresql://postgres@db.abcd.supabase.co:5432/postgres",
        )
    with pytest.raises(OSError):
        await resolve_database("postgresql://u@127.0.0.1:6432/db", "auto")


# -- the command line ---------------------------------------------------------------------------


async def test_migrate_through_the_pooler_concurrently(
    empty_database: str, pgbouncer: PgBouncer, pooled_env: dict[str, str]
) -> None:
    env = {
        **pooled_env,
        "LISTENER_DATABASE_URL": pgbouncer.dsn_for(empty_database),
        "DATABASE_URL": pgbouncer.dsn_for(empty_database),
        "LISTENER_LISTEN_DATABASE_URL": empty_database,
    }
    runs = await asyncio.gather(*(cli_async(env, "migrate") for _ in range(3)))
    assert [r.returncode for r in runs] == [0, 0, 0], [r.stderr for r in runs]
    # The transaction-scoped advisory lock serialized them: one applied everything.
    assert sum("applied: 0001_init" in r.stdout for r in runs) == 1, [r.stdout for r in runs]
    assert sum("schema is up to date" in r.stdout for r in runs) == 2
    conn = await asyncpg.connect(empty_database)
    try:
        versions = await conn.fetch("SELECT version FROM listener.schema_migrations")
        assert len(versions) >= 13
    finally:
        await conn.close()


async def test_attach_status_backfill_through_the_pooler(
    conn: asyncpg.Connection, pooled_env: dict[str, str]
) -> None:
    env = pooled_env
    await make_table(conn, owner=True, status=True, attach=False)
    await conn.execute(
        "INSERT INTO images (url, owner_id) SELECT 'u' || g, 'o' || (g % 3) "
        "FROM generate_series(1, 550) g"
    )
    attach = cli(env, "attach", "images", "--id-column", "id", "--url-column", "url")
    assert attach.returncode == 0, attach.stderr
    assert "attached to public.images" in attach.stdout
    assert "transaction-mode pooler (probe" in attach.stderr  # what auto decided, logged

    dry = cli(env, "backfill", "images", "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert "550 rows would be enqueued" in dry.stdout
    backfill = cli(env, "backfill", "images", "--no-wait")
    assert backfill.returncode == 0, backfill.stderr
    assert "enqueued 550 jobs" in backfill.stdout
    selected = cli(env, "backfill", "images", "--where", "owner_id = 'o1'", "--json")
    assert selected.returncode == 0, selected.stderr
    assert json.loads(selected.stdout)["enqueued"] == 0  # already queued: nothing twice

    # Run twice: the second run lands on the server connections the first one used.
    for _ in range(2):
        status = cli(env, "status", "--json")
        assert status.returncode == 0, status.stderr
        doc = json.loads(status.stdout)
        assert doc["pending"] == 550 and doc["tables"] == ["public.images"]
    assert await _count(conn, "SELECT count(*) FROM listener.jobs") == 550


async def test_explicit_transaction_mode_needs_no_listen_url_for_the_cli(
    conn: asyncpg.Connection, pooled_env: dict[str, str]
) -> None:
    env = {**pooled_env, "LISTENER_POOLER": "transaction"}
    env.pop("LISTENER_LISTEN_DATABASE_URL")
    await make_table(conn, attach=False)
    for args in (
        ("attach", "images", "--id-column", "id", "--url-column", "url"),
        ("status", "--json"),
        ("status", "--json"),
    ):
        result = cli(env, *args)
        assert result.returncode == 0, result.stderr


async def test_an_undetected_pooler_gets_an_error_that_says_what_to_set(
    conn: asyncpg.Connection, pooled_env: dict[str, str]
) -> None:
    # LISTENER_POOLER=none forces named prepared statements through the pooler: the second
    # command meets the statements the first left on the shared server connection.
    env = {**pooled_env, "LISTENER_POOLER": "none"}
    await make_table(conn)
    runs = [cli(env, "status", "--json") for _ in range(3)]
    failed = [r for r in runs if r.returncode != 0]
    assert failed, "named prepared statements never collided through the pooler"
    for r in failed:
        assert r.returncode == 2
        assert "prepared statement" in r.stderr
        assert "set LISTENER_POOLER=transaction" in r.stderr
        assert "Traceback" not in r.stderr


# -- the daemon ------------------------------------------------------------------------------


async def test_daemon_through_the_pooler_completes_every_row(
    conn: asyncpg.Connection, pooled_env: dict[str, str], tmp_path: Path
) -> None:
    table = await make_table(conn, status=True)
    log = tmp_path / "daemon.log"
    # Polling every 60 s: finishing within the wait below takes the NOTIFY wake-ups, which
    # only arrive on the direct LISTEN connection.
    with listener_run(
        pooled_env, log, stop_grace_s=30, pipeline="noop", poll_interval_s="60", concurrency="20"
    ) as proc:
        await wait_until(lambda: _logged(log, "listener running"), timeout=60)
        for start in range(0, 550, 50):
            await conn.execute(
                f"INSERT INTO {table} (url) SELECT 'u' || g FROM generate_series($1::int, $2) g",
                start + 1,
                start + 50,
            )
        await wait_until(
            lambda: _equals(
                conn, "SELECT count(*) FROM listener.jobs WHERE status = 'complete'", 550
            ),
            timeout=45,
        )
        await wait_until(
            lambda: _equals(conn, f"SELECT count(*) FROM {table} WHERE status = 'complete'", 550),
            timeout=30,
        )
        assert proc.poll() is None, log.read_text()
    text = log.read_text()
    assert "transaction-mode pooler (probe" in text
    assert 'prepared statement "' not in text, text
    assert not _problems(text), text
    assert await _count(conn, "SELECT max(attempts) FROM listener.jobs") == 1


async def test_daemons_and_cli_through_the_pooler_do_not_collide(
    conn: asyncpg.Connection, pooled_env: dict[str, str], tmp_path: Path
) -> None:
    table = await make_table(conn, owner=True, attach=False)
    await conn.execute(
        f"INSERT INTO {table} (url, owner_id) SELECT 'old' || g, 'o' || (g % 4) "
        "FROM generate_series(1, 300) g"
    )
    attach = cli(pooled_env, "attach", "images", "--id-column", "id", "--url-column", "url")
    assert attach.returncode == 0, attach.stderr
    logs = [tmp_path / "a.log", tmp_path / "b.log"]
    noop = {"pipeline": "noop", "poll_interval_s": "0.5", "noop_delay_s": "0.01"}
    with (
        listener_run(pooled_env, logs[0], stop_grace_s=30, worker_id="a", **noop),
        listener_run(pooled_env, logs[1], stop_grace_s=30, worker_id="b", **noop),
    ):

        async def insert_more() -> None:
            for start in range(0, 300, 30):
                await conn.execute(
                    f"INSERT INTO {table} (url) SELECT 'new' || g "
                    "FROM generate_series($1::int, $2) g",
                    start + 1,
                    start + 30,
                )
                await asyncio.sleep(0.05)

        results = await asyncio.gather(
            cli_async(pooled_env, "backfill", "images", "--no-wait"),
            cli_async(pooled_env, "status", "--json"),
            cli_async(pooled_env, "status", "--json"),
            cli_async(pooled_env, "backfill", "images", "--dry-run"),
            insert_more(),
        )
        for result in results[:4]:
            assert result is not None and result.returncode == 0, result and result.stderr
        await wait_until(
            lambda: _equals(
                conn, "SELECT count(*) FROM listener.jobs WHERE status = 'complete'", 600
            ),
            timeout=60,
        )
    rows = await conn.fetch(
        "SELECT worker_id, count(*) AS n, max(attempts) AS most FROM listener.jobs GROUP BY 1"
    )
    assert sum(r["n"] for r in rows) == 600
    assert all(r["most"] == 1 for r in rows), [dict(r) for r in rows]
    for log in logs:
        text = log.read_text()
        assert 'prepared statement "' not in text, text
        assert not _problems(text), text


async def test_listen_through_the_pooler_is_refused_with_a_clear_error(
    pooled_env: dict[str, str], pooler_url: str, database_url: str, tmp_path: Path
) -> None:
    no_direct = dict(pooled_env)
    no_direct.pop("LISTENER_LISTEN_DATABASE_URL")
    listen_on_pooler = {**pooled_env, "LISTENER_LISTEN_DATABASE_URL": pooler_url}
    # The database direct, only the LISTEN URL on the pooler: caught by the probe too.
    only_listen_pooled = {
        **pooled_env,
        "LISTENER_DATABASE_URL": database_url,
        "DATABASE_URL": database_url,
        "LISTENER_LISTEN_DATABASE_URL": pooler_url,
    }
    explicit = {**no_direct, "LISTENER_POOLER": "transaction"}
    cases = [
        (no_direct, "set LISTENER_LISTEN_DATABASE_URL to a direct connection"),
        (listen_on_pooler, "set LISTENER_LISTEN_DATABASE_URL to a direct connection"),
        (only_listen_pooled, "LISTENER_LISTEN_DATABASE_URL goes through a transaction-mode"),
        (explicit, "(LISTENER_POOLER=transaction), where LISTEN cannot work"),
    ]
    for env, message in cases:
        run = await cli_async(env, "run", "--pipeline", "noop", "--health-port", "0")
        assert run.returncode == 2, run.stderr
        assert message in " ".join(run.stderr.split()), run.stderr
        assert "Traceback" not in run.stderr
        assert pooler_url not in run.stderr and database_url not in run.stderr


async def _logged(log: Path, text: str) -> bool:
    return text in log.read_text(errors="replace")


async def _equals(conn: asyncpg.Connection, sql: str, expected: int) -> bool:
    return await _count(conn, sql) == expected


def test_pgbouncer_is_installed_where_ci_runs() -> None:
    """CI installs pgbouncer (.ci/run): there the pooler tests above must run, not skip."""
    import os

    if os.environ.get("CI") != "true":
        pytest.skip("only CI promises pgbouncer")
    assert pgbouncer_binary() is not None
