"""The daemon end to end with a scripted provider: claims, retries, leases, reconnects."""

from __future__ import annotations

import asyncio

import aiohttp
import asyncpg
import pytest
from awaiting import jobs_finished, when_any
from support import (
    RecordingProvider,
    admit,
    all_finished,
    counts,
    fast_settings,
    make_table,
)

from listener.app import Daemon, SchemaNotReady
from listener.errors import FetchTimeout, InvalidImage, RateLimited
from listener.testing.cluster import TemporaryCluster


async def test_rows_inserted_before_and_while_running_all_complete(
    database_url: str, conn: asyncpg.Connection
) -> None:
    table = await make_table(conn, status=True)
    await conn.execute(f"INSERT INTO {table} (url) SELECT 'u' || g FROM generate_series(1, 50) g")
    provider = RecordingProvider()
    settings = fast_settings(database_url, poll_interval_s=30)
    async with Daemon(settings, providers=[provider]) as daemon:
        for i in range(20):
            await conn.execute(f"INSERT INTO {table} (url) VALUES ($1)", f"late{i}")
        await daemon.signals.wait("finished", 70, timeout=20)
    assert await counts(conn) == {"complete": 70}
    assert len(provider.calls) == 70 and not provider.overlaps
    assert await conn.fetchval(f"SELECT count(*) FROM {table} WHERE status = 'complete'") == 70
    results = await conn.fetchval(
        "SELECT count(*) FROM listener.results WHERE step = 'recording.step'"
    )
    assert results == 70


async def test_two_daemons_never_run_a_job_twice(
    database_url: str, conn: asyncpg.Connection
) -> None:
    table = await make_table(conn)
    shared = RecordingProvider(delay_s=0.002)
    settings = fast_settings(database_url, concurrency=20)
    async with (
        Daemon(
            settings.model_copy(update={"worker_id": "a"}), providers=[shared], health=False
        ) as a,
        Daemon(
            settings.model_copy(update={"worker_id": "b"}), providers=[shared], health=False
        ) as b,
    ):
        await conn.execute(
            f"INSERT INTO {table} (url) SELECT 'u' || g FROM generate_series(1, 2000) g"
        )

        async def both_finished() -> bool:
            return a.signals.count("finished") + b.signals.count("finished") >= 2000

        await when_any(both_finished, [(a.signals, "finished"), (b.signals, "finished")], 60)
        assert await all_finished(conn, 2000)
    assert not shared.overlaps
    assert len(shared.calls) == len(set(shared.calls)) == 2000
    workers = await conn.fetch("SELECT worker_id, count(*) AS n FROM listener.jobs GROUP BY 1")
    assert {r["worker_id"] for r in workers} == {"a", "b"}


async def test_concurrent_claims_are_disjoint(database_url: str, conn: asyncpg.Connection) -> None:
    import uuid

    from listener.queue.pg_store import PgJobStore

    table = await make_table(conn)
    await conn.execute(f"INSERT INTO {table} (url) SELECT 'u' || g FROM generate_series(1, 500) g")
    assert await admit(conn) == 500
    pool = await asyncpg.create_pool(database_url, min_size=8, max_size=8)
    try:
        store = PgJobStore(pool)
        batches = await asyncio.gather(
            *(store.claim(40, f"w{i}", 30, uuid.uuid4()) for i in range(16))
        )
    finally:
        await pool.close()
    ids = [j.id for batch in batches for j in batch]
    assert len(ids) == len(set(ids)) == 500


async def test_retryable_failures_back_off_then_complete(
    database_url: str, conn: asyncpg.Connection
) -> None:
    table = await make_table(conn)
    await conn.execute(f"INSERT INTO {table} (url) VALUES ('flaky'), ('fine')")
    flaky_id = await conn.fetchval(f"SELECT id::text FROM {table} WHERE url = 'flaky'")
    provider = RecordingProvider(
        failures={flaky_id: [FetchTimeout("read timed out"), RateLimited("429", retry_after=0.3)]}
    )
    async with Daemon(fast_settings(database_url), providers=[provider], health=False) as d:
        await jobs_finished(d, conn, 2, timeout=20)
    job = await conn.fetchrow(
        "SELECT status, attempts, last_error FROM listener.jobs WHERE source_id = $1", flaky_id
    )
    # The timeout spent an attempt; the 429 did not (the provider asked to wait).
    assert dict(job) == {"status": "complete", "attempts": 2, "last_error": None}
    assert provider.calls.count(flaky_id) == 3


async def test_retry_after_is_honoured(database_url: str, conn: asyncpg.Connection) -> None:
    table = await make_table(conn)
    await conn.execute(f"INSERT INTO {table} (url) VALUES ('x')")
    job_id = await conn.fetchval(f"SELECT id::text FROM {table}")
    provider = RecordingProvider(failures={job_id: [RateLimited("slow down", retry_after=30)]})
    async with Daemon(fast_settings(database_url), providers=[provider], health=False) as d:
        await d.signals.wait("snoozed", 1, timeout=10)
        delay = await conn.fetchval(
            "SELECT extract(epoch FROM run_after - updated_at) FROM listener.jobs"
        )
    assert 29 <= float(delay) <= 31
    # A 429 is the provider asking to wait: the attempt is given back.
    assert await _status_is(conn, "pending", attempts=0)
    assert await conn.fetchval("SELECT last_error FROM listener.jobs") == "slow down"


async def _status_is(conn: asyncpg.Connection, status: str, attempts: int) -> bool:
    row = await conn.fetchrow("SELECT status, attempts FROM listener.jobs")
    return bool(row and row["status"] == status and row["attempts"] == attempts)


async def test_dead_letter_after_max_attempts(database_url: str, conn: asyncpg.Connection) -> None:
    table = await make_table(conn)
    await conn.execute(f"INSERT INTO {table} (url) VALUES ('doomed')")
    key = await conn.fetchval(f"SELECT id::text FROM {table}")
    provider = RecordingProvider(failures={key: [FetchTimeout(f"timeout {i}") for i in range(9)]})
    async with Daemon(fast_settings(database_url, max_attempts=3), providers=[provider]) as d:
        await d.signals.wait("finished", 1, timeout=20)
    job = await conn.fetchrow("SELECT status, attempts, last_error FROM listener.jobs")
    assert job["status"] == "failed"
    assert job["attempts"] == 3
    assert job["last_error"] == "timeout 2 (gave up after 3 attempts)"


async def test_permanent_error_fails_at_once(database_url: str, conn: asyncpg.Connection) -> None:
    table = await make_table(conn, status=True)
    await conn.execute(f"INSERT INTO {table} (url) VALUES ('bad'), ('good')")
    key = await conn.fetchval(f"SELECT id::text FROM {table} WHERE url = 'bad'")
    provider = RecordingProvider(failures={key: [InvalidImage("not an image: looks like HTML")]})
    async with Daemon(fast_settings(database_url), providers=[provider], health=False) as d:
        await d.signals.wait("finished", 2, timeout=20)
    rows = await conn.fetch(
        f"SELECT i.url, i.status, j.attempts, j.last_error FROM {table} i "
        "JOIN listener.jobs j ON j.source_id = i.id::text ORDER BY i.url"
    )
    assert [tuple(r) for r in rows] == [
        ("bad", "failed", 1, "not an image: looks like HTML"),
        ("good", "complete", 1, None),
    ]


async def test_listen_connection_killed_reconnects_and_reconciles(
    database_url: str, conn: asyncpg.Connection
) -> None:
    table = await make_table(conn)
    provider = RecordingProvider()
    # A long poll interval: only NOTIFY or the reconnect's reconcile can pick jobs up quickly.
    settings = fast_settings(database_url, poll_interval_s=60)
    async with Daemon(settings, providers=[provider], health=False) as daemon:
        assert daemon.notifier is not None
        await daemon.notifier.wait_connected(1)
        await conn.execute(f"INSERT INTO {table} (url) VALUES ('before')")
        await daemon.signals.wait("finished", 1, timeout=10)

        # Kill the LISTEN backend; insert while nobody listens.
        killed = await conn.fetchval(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
            "WHERE query LIKE 'LISTEN%' AND pid <> pg_backend_pid()"
        )
        assert killed == 1
        await conn.execute(
            f"INSERT INTO {table} (url) SELECT 'while-down-' || g FROM generate_series(1, 25) g"
        )
        await daemon.notifier.wait_connected(2, timeout=10)
        await daemon.signals.wait("finished", 26, timeout=10)
        assert daemon.notifier.generation >= 2
    assert len(provider.calls) == 26


async def test_postgres_restart_loses_nothing(
    database_url: str, conn: asyncpg.Connection, pg_cluster: TemporaryCluster | None
) -> None:
    if pg_cluster is None:
        pytest.skip("needs the throwaway cluster (DATABASE_URL given)")
    table = await make_table(conn)
    provider = RecordingProvider(delay_s=0.01)
    async with Daemon(fast_settings(database_url, concurrency=5), providers=[provider]) as d:
        assert d.notifier is not None
        await conn.execute(
            f"INSERT INTO {table} (url) SELECT 'a' || g FROM generate_series(1, 300) g"
        )
        await provider.started.wait()
        await asyncio.to_thread(pg_cluster.restart)
        await d.notifier.wait_connected(2, timeout=20)
        writer = await asyncpg.connect(database_url)
        try:
            await writer.execute(
                f"INSERT INTO {table} (url) SELECT 'b' || g FROM generate_series(1, 100) g"
            )
            await jobs_finished(d, writer, 400, timeout=60)
            final = await counts(writer)
        finally:
            await writer.close()
    assert final == {"complete": 400}
    assert set(provider.calls) >= {str(i) for i in range(1, 401)}


async def test_health_endpoints(database_url: str, conn: asyncpg.Connection) -> None:
    table = await make_table(conn)
    provider = RecordingProvider()
    async with Daemon(fast_settings(database_url), providers=[provider]) as daemon:
        assert daemon.health is not None and daemon.notifier is not None
        await daemon.notifier.wait_connected(1)
        await conn.execute(f"INSERT INTO {table} (url) VALUES ('a'), ('b'), ('c')")
        await daemon.signals.wait("finished", 3, timeout=10)
        async with aiohttp.ClientSession(daemon.health.url) as http:
            async with http.get("/healthz") as r:
                assert r.status == 200
            async with http.get("/readyz") as r:
                assert r.status == 200 and (await r.json())["ready"] is True
            async with http.get("/status") as r:
                status = await r.json()
            async with http.get("/metrics") as r:
                metrics = await r.text()
            daemon.notifier.stop()
            await daemon.notifier.loop.signals.wait("stopped", 1, timeout=5)
            assert not daemon.notifier.connected
            async with http.get("/readyz") as r:
                assert r.status == 503
                assert "LISTEN" in (await r.json())["problems"][0]
    assert status["complete"] == 3 and status["pending"] == 0 and status["failed"] == 0
    assert status["in_flight"] == 0 and status["providers"] == ["recording"]
    assert "recording" in status["provider_rates_per_s"]
    assert 'listener_jobs_finished_total{outcome="complete"} 3.0' in metrics
    assert 'listener_queue_jobs{status="complete"} 3.0' in metrics


async def test_unmigrated_database_is_refused(pg_admin_dsn: str) -> None:
    settings = fast_settings(pg_admin_dsn)
    with pytest.raises(SchemaNotReady, match="listener migrate"):
        await Daemon(settings, providers=[RecordingProvider()], health=False).start()
