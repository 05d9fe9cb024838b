"""OpenAI's Batch API path: `backfill --batch`, partial errors, expiry, crashes, restarts."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from awaiting import jobs_finished
from pydantic import SecretStr
from support import StaticServer, all_finished, counts, fast_settings, make_table, wait_until

from listener.app import Daemon
from listener.app_side.backfill import enqueue_backfill
from listener.db.queries import Queries
from listener.settings import BatchSettings, OpenAISettings, RateLimit, Settings, TierSettings
from listener.testing.cluster import TemporaryCluster
from listener.testing.openai_fake import FakeOpenAI

# The bundled photos the ``photos`` fixture (conftest.py) serves.
PHOTOS = ("rocket.jpg",)


def batch_settings(database_url: str, fake: FakeOpenAI, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "pipeline": "tiered",
        "tiers": TierSettings(tier1=["openai"], tier2=["openai"], tier2_min_quality=-1),
        "openai": OpenAISettings(
            api_key=SecretStr("sk-test"), base_url=fake.base_url, image_transport="inline"
        ),
        "batch": BatchSettings(min_requests=20, max_wait_s=1.0, poll_interval_s=0.3),
        "rate_limits": {"openai": RateLimit(rps=100, burst=10, concurrency=8)},
    }
    values.update(overrides)
    return fast_settings(database_url, **values)


async def load_rows(conn: asyncpg.Connection, base_url: str, n: int) -> str:
    table = await make_table(conn, attach=False)
    await conn.execute(
        f"INSERT INTO {table} (url) SELECT $1 || g FROM generate_series(1, $2) g",
        f"{base_url}/rocket.jpg?n=",
        n,
    )
    await conn.execute("SELECT listener.attach($1, 'id', 'url')", table)
    return table


async def backfill_batch(database_url: str, table: str) -> int:
    pool = await asyncpg.create_pool(database_url, min_size=1, max_size=2)
    try:
        report = await enqueue_backfill(Queries(pool), table, batch=True)
    finally:
        await pool.close()
    return report.enqueued


async def test_backfill_batch_runs_every_tier_through_batches(
    database_url: str, conn: asyncpg.Connection, photos: StaticServer
) -> None:
    table = await load_rows(conn, photos.base_url, 45)
    async with FakeOpenAI() as fake:
        fake.batch_duration_s = 0.5
        async with Daemon(batch_settings(database_url, fake)) as daemon:
            assert await backfill_batch(database_url, table) == 45
            await jobs_finished(daemon, conn, 45, timeout=60)
        realtime = len(fake.requests)
        provider_batches = len(fake.batches)
    assert await counts(conn) == {"complete": 45}
    steps = await conn.fetch(
        "SELECT step, count(*) AS n, sum(cost_usd) AS usd FROM listener.results GROUP BY 1"
    )
    assert {r["step"]: r["n"] for r in steps} == {"openai.tier1": 45, "openai.tier2": 45}
    assert realtime == 0  # nothing went through the realtime API
    batches = await conn.fetch("SELECT status, requests, applied_at FROM listener.batches")
    assert len(batches) == provider_batches >= 2  # tier 1, then tier 2
    assert all(b["status"] == "completed" and b["applied_at"] is not None for b in batches)
    assert sum(b["requests"] for b in batches) == 90
    # Costs at batch prices: half of what the same tokens cost realtime.
    row = await conn.fetchrow(
        "SELECT sum(input_tokens) AS i, sum(output_tokens) AS o, sum(cost_usd) AS usd "
        "FROM listener.results"
    )
    realtime_usd = (row["i"] * 0.15 + row["o"] * 0.60) / 1e6
    assert float(row["usd"]) == pytest.approx(realtime_usd / 2, rel=0.01)


async def test_failed_lines_and_expired_batches_fall_back_to_per_image(
    database_url: str, conn: asyncpg.Connection, photos: StaticServer
) -> None:
    table = await load_rows(conn, photos.base_url, 30)
    async with FakeOpenAI() as fake:
        fake.batch_fail_every = 6  # 5 of the 30 tier-1 requests fail
        fake.batch_next_outcome = ["completed", "expired"]  # tier 2's batch expires half done
        settings = batch_settings(database_url, fake)
        async with Daemon(settings) as daemon:
            await backfill_batch(database_url, table)
            await jobs_finished(daemon, conn, 30, timeout=60)
        realtime = len(fake.requests)
    assert await counts(conn) == {"complete": 30}
    assert await conn.fetchval("SELECT count(*) FROM listener.results") == 60
    assert realtime > 0  # the failed and expired ones ran per image
    statuses = sorted(r["status"] for r in await conn.fetch("SELECT status FROM listener.batches"))
    assert "expired" in statuses
    assert (
        await conn.fetchval("SELECT count(*) FROM listener.batches WHERE applied_at IS NULL") == 0
    )


async def test_batch_survives_sigkill_and_postgres_restart(
    database_url: str,
    conn: asyncpg.Connection,
    photos: StaticServer,
    env_for_subprocess: dict[str, str],
    pg_cluster: TemporaryCluster | None,
    tmp_path: Path,
) -> None:
    if pg_cluster is None:
        pytest.skip("needs the throwaway cluster (DATABASE_URL given)")
    table = await load_rows(conn, photos.base_url, 200)
    async with FakeOpenAI() as fake:
        fake.batch_duration_s = 3.0
        env = {
            **env_for_subprocess,
            "LISTENER_PIPELINE": "tiered",
            "LISTENER_TIERS__TIER1": '["openai"]',
            "LISTENER_OPENAI__API_KEY": "sk-test",
            "LISTENER_OPENAI__BASE_URL": fake.base_url,
            "LISTENER_OPENAI__IMAGE_TRANSPORT": "inline",
            "LISTENER_BATCH__POLL_INTERVAL_S": "0.3",
            "LISTENER_BATCH__MAX_WAIT_S": "1",
            "LISTENER_FETCH__ALLOWED_HOSTS": '["127.0.0.1"]',
            "LISTENER_HEALTH_PORT": "0",
            "LISTENER_POLL_INTERVAL_S": "0.2",
            "LISTENER_LEASE_S": "2",
            # A batch the killed daemon was still preparing is handed back quickly.
            "LISTENER_BATCH__ABANDON_AFTER_S": "3",
        }
        log = (tmp_path / "daemon.log").open("wb")
        first = subprocess.Popen(
            [sys.executable, "-m", "listener", "run"], env=env, stdout=log, stderr=log
        )
        try:
            assert await backfill_batch(database_url, table) == 200
            await wait_until(lambda: _batch_in_flight(conn), timeout=60)
            os.kill(first.pid, signal.SIGKILL)
            first.wait()
            await conn.close()
            await asyncio.to_thread(pg_cluster.restart)
            second = subprocess.Popen(
                [sys.executable, "-m", "listener", "run"], env=env, stdout=log, stderr=log
            )
            try:
                again = await asyncpg.connect(database_url)
                try:
                    try:
                        await wait_until(lambda: all_finished(again, 200), timeout=90)
                    except TimeoutError:
                        state = await counts(again)
                        rows = await again.fetch("SELECT * FROM listener.batches")
                        log.flush()
                        tail = (tmp_path / "daemon.log").read_text()[-6000:]
                        raise AssertionError(
                            f"{state}\n{[dict(r) for r in rows]}\n{tail}"
                        ) from None
                    final = await counts(again)
                    batches = await again.fetch(
                        "SELECT id, provider_batch_id, status, applied_at FROM listener.batches"
                    )
                    results = await again.fetchval("SELECT count(*) FROM listener.results")
                finally:
                    await again.close()
            finally:
                second.send_signal(signal.SIGTERM)
                await asyncio.to_thread(second.wait, 30)
        finally:
            if first.poll() is None:
                first.kill()
            log.close()
        provider_batches = set(fake.batches)
    assert final == {"complete": 200}, (tmp_path / "daemon.log").read_text()[-3000:]
    assert results == 200  # one tier-1 result per image, none twice
    assert all(b["applied_at"] is not None for b in batches)
    # Every batch OpenAI ran is one of ours, applied once; none was created twice. A batch the
    # killed daemon was still preparing never reached OpenAI: it was closed as abandoned.
    created = [b for b in batches if b["provider_batch_id"] is not None]
    assert {b["provider_batch_id"] for b in created} == provider_batches
    assert len(created) == len(provider_batches)
    assert {b["status"] for b in batches if b["provider_batch_id"] is None} <= {
        "abandoned",
        "empty",
    }
    assert len(fake.requests) == 0


async def _batch_in_flight(conn: asyncpg.Connection) -> bool:
    return bool(
        await conn.fetchval(
            "SELECT count(*) FROM listener.batches WHERE provider_batch_id IS NOT NULL "
            "AND applied_at IS NULL"
        )
    )
