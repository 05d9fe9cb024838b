"""The job counters (0008): exact under concurrent writers, before and after a rollup; the
status document and ``/metrics`` read them and report every status; the health server's
status cache shares one computation between concurrent requests."""

from __future__ import annotations

import asyncio
import random
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path

import aiohttp
import asyncpg
import pytest
from awaiting import loop_signals, when
from support import RecordingProvider, admit, fast_settings, make_table

from listener.app import Daemon
from listener.db.queries import Queries
from listener.errors import InvalidImage, RateLimited
from listener.ops.health import StatusCache
from listener.ops.status import STATUSES, queue_status

Key = tuple[str, str | None, str]

MIGRATIONS = Path(__file__).resolve().parents[2] / "sql" / "migrations"


async def exact(conn: asyncpg.Connection) -> Counter[Key]:
    """Jobs per (table, owner, status), counted the slow way."""
    rows = await conn.fetch(
        "SELECT source_table, owner_id, status, count(*) AS n FROM listener.jobs GROUP BY 1, 2, 3"
    )
    return Counter({(r["source_table"], r["owner_id"], r["status"]): r["n"] for r in rows})


async def counted(conn: asyncpg.Connection) -> Counter[Key]:
    """Jobs per (table, owner, status) as the counters say: folded counts plus deltas, in one
    statement (what every reader does)."""
    rows = await conn.fetch(
        """
        SELECT source_table, owner_id, status, sum(n)::bigint AS n
        FROM (SELECT source_table, owner_id, status, n FROM listener.job_counts
              UNION ALL
              SELECT source_table, owner_id, status, delta FROM listener.job_count_deltas) AS c
        GROUP BY 1, 2, 3
        HAVING sum(n) <> 0
        """
    )
    return Counter({(r["source_table"], r["owner_id"], r["status"]): r["n"] for r in rows})


async def by_table_counted(conn: asyncpg.Connection) -> Counter[tuple[str, str]]:
    rows = await conn.fetch(
        """
        SELECT source_table, status, sum(n)::bigint AS n
        FROM (SELECT source_table, status, n FROM listener.job_counts_by_table
              UNION ALL
              SELECT source_table, status, delta FROM listener.job_count_deltas) AS c
        GROUP BY 1, 2
        HAVING sum(n) <> 0
        """
    )
    return Counter({(r["source_table"], r["status"]): r["n"] for r in rows})


async def assert_exact(conn: asyncpg.Connection) -> None:
    """The counters equal a GROUP BY of listener.jobs, per owner and per table, in one
    snapshot (a repeatable-read transaction: concurrent writers may be running)."""
    async with conn.transaction(isolation="repeatable_read", readonly=True):
        truth = await exact(conn)
        assert await counted(conn) == truth
        per_table: Counter[tuple[str, str]] = Counter()
        for (table, _, status), n in truth.items():
            per_table[table, status] += n
        assert await by_table_counted(conn) == per_table


async def test_counters_stay_exact_under_a_daemon_and_direct_sql(
    database_url: str, conn: asyncpg.Connection
) -> None:
    """Inserts, claims, completions, retries, failures, cancels, requeues, URL re-enqueues
    (with an owner change), deletes of app rows and of jobs, from a running daemon and from
    concurrent SQL; compared before any rollup, during, and after one."""
    await make_table(conn, "photos", owner=True, status=True)
    await make_table(conn, "scans")  # no owner column: owner_id NULL
    # Jobs before the daemon starts, nothing folded yet: the deltas alone are exact.
    await conn.execute(
        "INSERT INTO photos (url, owner_id) "
        "SELECT 'http://img/p' || g || '.jpg', 'owner-' || (g % 7) FROM generate_series(1, 60) g"
    )
    await conn.execute(
        "INSERT INTO scans (url) SELECT 'http://img/s' || g || '.jpg' FROM generate_series(1, 30) g"
    )
    assert await conn.fetchval("SELECT count(*) FROM listener.job_counts") == 0
    await assert_exact(conn)

    failures: dict[str, list[InvalidImage | RateLimited]] = {
        str(i): [InvalidImage("not an image")] for i in range(1, 200, 9)
    }
    for i in range(2, 200, 11):
        failures[str(i)] = [RateLimited("slow down", retry_after=0.05)]
    provider = RecordingProvider(delay_s=0.01, failures=failures)
    settings = fast_settings(database_url, concurrency=6, counts_rollup_interval_s=0.05)
    rng = random.Random(8)

    async def direct_sql(writer: asyncpg.Connection) -> None:
        for round_ in range(25):
            step = round_ % 6
            if step == 0:
                await writer.execute(
                    "INSERT INTO photos (url, owner_id) SELECT 'http://img/n' || g || '.jpg', "
                    "'owner-' || (g % 5) FROM generate_series($1::int, $1::int + 4) g",
                    round_ * 10,
                )
            elif step == 1:  # URL re-enqueue, and the owner moves
                await writer.execute(
                    "UPDATE photos SET url = url || '?v2', owner_id = 'moved' "
                    "WHERE id IN (SELECT id FROM photos ORDER BY random() LIMIT 3)"
                )
            elif step == 2:  # cancel some of one owner's work
                await writer.execute(
                    "UPDATE listener.jobs SET status = 'cancelled', finished_at = now(), "
                    "lease_token = NULL, lease_expires_at = NULL "
                    "WHERE id IN (SELECT id FROM listener.jobs WHERE status = 'pending' "
                    "AND owner_id = $1 LIMIT 2)",
                    f"owner-{rng.randrange(7)}",
                )
            elif step == 3:  # requeue finished jobs, as `listener retry` does
                await writer.execute(
                    "UPDATE listener.jobs SET status = 'pending', attempts = 0, finished_at = NULL "
                    "WHERE id IN (SELECT id FROM listener.jobs "
                    "WHERE status IN ('failed', 'cancelled', 'complete') LIMIT 3)"
                )
            elif step == 4:  # delete jobs, and app rows (their jobs stay)
                await writer.execute(
                    "DELETE FROM listener.jobs WHERE id IN "
                    "(SELECT id FROM listener.jobs WHERE source_table = 'public.scans' LIMIT 2)"
                )
                await writer.execute(
                    "DELETE FROM photos WHERE id IN (SELECT id FROM photos ORDER BY id LIMIT 1)"
                )
            else:  # park and un-park as the batch path does
                await writer.execute(
                    "UPDATE listener.jobs SET status = 'batched', batch_step = 'x' "
                    "WHERE id IN (SELECT id FROM listener.jobs WHERE status = 'pending' LIMIT 2)"
                )
                await writer.execute(
                    "INSERT INTO scans (url) SELECT 'http://img/t' || g || '.jpg' "
                    "FROM generate_series(1, 3) g"
                )
            await asyncio.sleep(0.01)

    async with Daemon(settings, providers=[provider], health=False) as daemon:
        assert daemon.counts_rollup is not None
        writer = await asyncpg.connect(database_url)
        try:
            sql_task = asyncio.create_task(direct_sql(writer))
            while not sql_task.done():
                await assert_exact(conn)
                await asyncio.sleep(0.02)
            await sql_task
        finally:
            await writer.close()
        await conn.execute(
            "UPDATE listener.jobs SET status = 'pending', batch_step = NULL "
            "WHERE status = 'batched'"
        )
        await when(lambda: _settled(conn), daemon.signals, "finished", timeout=60)
        await assert_exact(conn)
        await when(lambda: _folded(conn), loop_signals(daemon, "rollup"), "ticked", timeout=10)
    assert daemon.counts_rollup.folded > 0
    # After the daemon's last rollup: everything folded, still exact.
    assert await conn.fetchval("SELECT count(*) FROM listener.job_count_deltas") == 0
    await assert_exact(conn)
    statuses = {status for _, _, status in await exact(conn)}
    assert {"complete", "failed", "cancelled"} <= statuses
    assert any(owner == "moved" for _, owner, _ in await exact(conn))

    # The readers: the status document and the typed queries agree with the slow count.
    truth = await exact(conn)
    doc = await queue_status(Queries(conn), None)  # type: ignore[arg-type]
    for status in STATUSES:
        assert doc[status] == sum(n for (_, _, s), n in truth.items() if s == status)
    tables = {row["table"]: row for row in doc["by_table"]}
    assert tables["public.scans"]["complete"] == truth["public.scans", None, "complete"]
    owners = {(row["table"], row["owner"]): row for row in doc["by_owner"]}
    for (table, owner, status), n in truth.items():
        if (table, owner) in owners and status in ("pending", "processing", "complete", "failed"):
            assert owners[table, owner][status] == n


async def _settled(conn: asyncpg.Connection) -> bool:
    return not await conn.fetchval(
        "SELECT count(*) FROM listener.jobs WHERE status IN ('pending', 'processing', 'batched')"
    )


async def _folded(conn: asyncpg.Connection) -> bool:
    return not await conn.fetchval("SELECT count(*) FROM listener.job_count_deltas")


async def test_rollup_is_exact_and_skips_while_another_runs(
    database_url: str, conn: asyncpg.Connection
) -> None:
    await make_table(conn, owner=True)
    await conn.execute(
        "INSERT INTO images (url, owner_id) SELECT 'http://img/' || g, 'o' || (g % 3) "
        "FROM generate_series(1, 50) g"
    )
    assert await admit(conn) == 50
    await conn.execute("UPDATE listener.jobs SET status = 'complete' WHERE id % 2 = 0")
    await conn.execute("DELETE FROM listener.jobs WHERE id % 5 = 0")
    other = await asyncpg.connect(database_url)
    try:
        async with other.transaction():
            # A rollup holding the lock: a second one returns at once, folding nothing.
            assert await other.fetchval("SELECT listener.roll_up_job_counts()") > 0
            await conn.execute("UPDATE listener.jobs SET status = 'failed' WHERE id = 1")
            assert await conn.fetchval("SELECT listener.roll_up_job_counts()") == 0
            await assert_exact(conn)
        await assert_exact(conn)
    finally:
        await other.close()
    assert await conn.fetchval("SELECT listener.roll_up_job_counts()") > 0
    await assert_exact(conn)
    assert await conn.fetchval("SELECT count(*) FROM listener.job_count_deltas") == 0
    # Lease renewals and other updates that leave (table, owner, status) alone append nothing.
    await conn.execute("UPDATE listener.jobs SET updated_at = now(), priority = 3")
    assert await conn.fetchval("SELECT count(*) FROM listener.job_count_deltas") == 0
    await conn.execute("TRUNCATE listener.jobs CASCADE")
    assert await counted(conn) == Counter()
    assert await conn.fetchval("SELECT count(*) FROM listener.job_counts_by_table") == 0


async def test_spend_counters_match_the_results(conn: asyncpg.Connection) -> None:
    await make_table(conn)
    await conn.execute(
        "INSERT INTO images (url) SELECT 'http://img/' || g FROM generate_series(1, 6) g"
    )
    await conn.execute(
        "INSERT INTO listener.results (job_id, step, provider, output, cost_usd, created_at) "
        "SELECT id, 's', CASE WHEN id % 2 = 0 THEN 'openai' ELSE 'rekognition' END, '{}', "
        "0.25, now() - (id % 3) * interval '1 day' FROM listener.jobs"
    )
    # Stored again (the upsert adds the cost and moves the row to today); one removed.
    await conn.execute(
        "UPDATE listener.results SET cost_usd = cost_usd + 0.5, created_at = now() "
        "WHERE job_id = (SELECT min(id) FROM listener.jobs)"
    )
    await conn.execute(
        "DELETE FROM listener.results WHERE job_id = (SELECT max(id) FROM listener.jobs)"
    )
    queries = Queries(conn)  # type: ignore[arg-type]
    today = await conn.fetchval("SELECT (now() AT TIME ZONE 'UTC')::date")
    for roll_up in (False, True):
        if roll_up:
            await queries.roll_up_job_counts()
        truth = {
            r["provider"]: (float(r["today"]), float(r["total"]))
            for r in await conn.fetch(
                "SELECT provider, coalesce(sum(cost_usd) FILTER (WHERE "
                "(created_at AT TIME ZONE 'UTC')::date >= $1), 0) AS today, "
                "sum(cost_usd) AS total FROM listener.results GROUP BY 1",
                today,
            )
        }
        got = await queries.spend_totals(today)
        assert set(got) == set(truth)
        for provider, (since, total) in truth.items():
            assert got[provider] == (pytest.approx(since), pytest.approx(total))


async def test_migration_counts_the_jobs_already_there(
    database_before: Callable[[int], Awaitable[str]], tmp_path: Path
) -> None:
    """0008 on a database that has jobs and results: the counters start from them."""
    from listener.db.migrate import migrate

    conn = await asyncpg.connect(await database_before(8))
    try:
        await conn.execute(
            "INSERT INTO listener.jobs (source_table, source_id, owner_id, status) "
            "SELECT 'public.t', g::text, "
            "CASE WHEN g % 4 = 0 THEN NULL ELSE 'o' || (g % 3) END, "
            "(ARRAY['pending','processing','complete','failed','cancelled','batched'])"
            "[1 + g % 6] FROM generate_series(1, 500) g"
        )
        await conn.execute(
            "INSERT INTO listener.results (job_id, step, provider, output, cost_usd) "
            "SELECT id, 's', 'openai', '{}', 0.001 FROM listener.jobs WHERE id <= 100"
        )
        assert (await migrate(conn))[0] == "0008_status_counts"
        assert await conn.fetchval("SELECT count(*) FROM listener.job_count_deltas") == 0
        await assert_exact(conn)
        spend = await Queries(conn).spend_totals(  # type: ignore[arg-type]
            await conn.fetchval("SELECT (now() AT TIME ZONE 'UTC')::date")
        )
        assert spend == {"openai": (pytest.approx(0.1), pytest.approx(0.1))}
    finally:
        await conn.close()


async def test_status_and_metrics_report_every_status(
    database_url: str, conn: asyncpg.Connection
) -> None:
    await make_table(conn, owner=True)
    await conn.execute(
        "INSERT INTO images (url, owner_id) SELECT 'http://img/' || g, 'o' FROM "
        "generate_series(1, 12) g"
    )
    assert await admit(conn) == 12
    # Two jobs in each status, set directly: no daemon will claim them (all in the future).
    await conn.execute(
        "UPDATE listener.jobs SET run_after = now() + interval '1 hour', "
        "status = (ARRAY['pending','processing','complete','failed','cancelled','batched'])"
        "[1 + (id % 6)], finished_at = CASE WHEN id % 6 IN (2, 3, 4) THEN now() END, "
        "lease_expires_at = now() + interval '1 hour'"
    )
    settings = fast_settings(database_url, poll_interval_s=30.0)
    async with (
        Daemon(settings, providers=[RecordingProvider()]) as daemon,
        aiohttp.ClientSession() as http,
    ):
        assert daemon.health is not None
        base = daemon.health.url
        async with http.get(f"{base}/status") as r:
            status = await r.json()
        async with http.get(f"{base}/metrics") as r:
            metrics = await r.text()
    for name in STATUSES:
        assert status[name] == 2, (name, status)
        assert f'listener_queue_jobs{{status="{name}"}} 2.0' in metrics, name
    assert status["by_table"][0]["cancelled"] == 2 and status["by_table"][0]["batched"] == 2
    assert status["oldest_pending_s"] == 0  # the pending jobs are not runnable yet


async def test_status_cache_shares_one_computation() -> None:
    now = [0.0]
    calls = 0
    gate = asyncio.Event()

    async def compute() -> dict[str, object]:
        nonlocal calls
        calls += 1
        await gate.wait()
        return {"pending": calls}

    cache = StatusCache(compute, ttl_s=1.0, clock=lambda: now[0])
    waiting = [asyncio.create_task(cache.document()) for _ in range(20)]
    page = asyncio.create_task(cache.page())
    await asyncio.sleep(0)
    gate.set()
    docs = await asyncio.gather(*waiting)
    assert calls == 1 and all(d is docs[0] for d in docs)
    assert 'data-value="1"' in await page
    now[0] = 0.9
    assert (await cache.document())["pending"] == 1 and calls == 1
    now[0] = 1.0
    assert (await cache.document())["pending"] == 2 and calls == 2
    assert cache.computed == 2


async def test_status_cache_does_not_keep_a_failure() -> None:
    attempts = 0

    async def compute() -> dict[str, object]:
        nonlocal attempts
        attempts += 1
        if attempts == 1:
            raise ConnectionError("down")
        return {"ok": True}

    cache = StatusCache(compute, ttl_s=60.0)
    with pytest.raises(ConnectionError):
        await cache.document()
    assert await cache.document() == {"ok": True}


async def test_failure_reasons_fold_urls_and_keep_the_punctuation(
    conn: asyncpg.Connection,
) -> None:
    """A folded URL is the URL only: the colon, comma or bracket after it stays."""
    await make_table(conn)
    await conn.execute(
        "INSERT INTO images (url) SELECT 'http://10.0.0.' || g || '/a.jpg' "
        "FROM generate_series(1, 6) g"
    )
    assert await admit(conn) == 6
    await conn.execute(
        "UPDATE listener.jobs SET status = 'failed', finished_at = now(), last_error = "
        "CASE WHEN id % 2 = 0 THEN 'refusing to fetch ' || image_url || ': 10.0.0.1 is a "
        "private address; add it to fetch.allowed_hosts to allow it' "
        "ELSE 'HTTP 404 (from ' || image_url || '), gave up' END"
    )
    reasons = await Queries(conn).failure_reasons(10)  # type: ignore[arg-type]
    assert reasons == [
        {
            "reason": "HTTP 404 (from <url>), gave up",
            "count": 3,
        },
        {
            "reason": "refusing to fetch <url>: 10.0.0.1 is a private address; "
            "add it to fetch.allowed_hosts to allow it",
            "count": 3,
        },
    ]
