"""`listener backfill --dry-run` estimates cost; on the fakes the run then costs about that."""

from __future__ import annotations

import asyncio
import re

import asyncpg
import pytest
from awaiting import jobs_finished
from support import (
    StaticServer,
    cli,
    cli_async,
    fast_settings,
    make_table,
)

from listener.app import Daemon
from listener.settings import BatchSettings, RateLimit, TierSettings
from listener.testing.openai_fake import FakeOpenAI

# The bundled photos the ``photos`` fixture (conftest.py) serves.
PHOTOS = ("astronaut.png", "rocket.jpg", "coffee.png", "hubble_deep_field.jpg")


def dry_run_usd(env: dict[str, str]) -> tuple[float, float, str]:
    out = cli(env, "backfill", "images", "--dry-run", ok=True)
    total = re.search(r"total\s*│.*?│\s*([\d.]+)\s*│\s*([\d.]+)", out.stdout)
    assert total is not None, out.stdout
    return float(total.group(1)), float(total.group(2)), out.stdout


async def test_dry_run_estimate_matches_recorded_cost(
    database_url: str, env_for_subprocess: dict[str, str], photos: StaticServer
) -> None:
    conn = await asyncpg.connect(database_url)
    names = ["astronaut.png", "rocket.jpg", "coffee.png", "hubble_deep_field.jpg"]
    await make_table(conn, attach=False)
    await conn.execute(
        "INSERT INTO images (url) SELECT $1 || (ARRAY[$2, $3, $4, $5])[1 + g % 4] || '?n=' || g "
        "FROM generate_series(1, 40) g",
        f"{photos.base_url}/",
        *names,
    )
    await conn.execute("SELECT listener.attach('images', 'id', 'url')")
    async with FakeOpenAI() as fake:
        tiers = TierSettings(
            tier1=["openai"], tier2=["openai"], tier3=["openai"], tier3_min_side=600
        )
        env = {
            **env_for_subprocess,
            "LISTENER_PIPELINE": "tiered",
            "LISTENER_TIERS__TIER1": '["openai"]',
            "LISTENER_TIERS__TIER2": '["openai"]',
            "LISTENER_TIERS__TIER3": '["openai"]',
            "LISTENER_TIERS__TIER3_MIN_SIDE": "600",
            "LISTENER_OPENAI__DETAIL": "high",
            "LISTENER_OPENAI__IMAGE_TRANSPORT": "inline",
            "LISTENER_OPENAI__API_KEY": "sk-test",
            "LISTENER_OPENAI__BASE_URL": fake.base_url,
            "LISTENER_FETCH__ALLOWED_HOSTS": '["127.0.0.1"]',
            # The 40 rows are 4 images over and over: every one is paid, as estimated.
            "LISTENER_DEDUP": "off",
        }
        realtime, batch, text = await asyncio.to_thread(dry_run_usd, env)
        assert "openai.tier3" in text and batch == pytest.approx(realtime / 2, rel=0.01)
        assert "priors (no history yet)" in text
        settings = fast_settings(
            database_url,
            pipeline="tiered",
            tiers=tiers,
            openai=fast_settings(database_url).openai.model_copy(
                update={
                    "api_key": __import__("pydantic").SecretStr("sk-test"),
                    "base_url": fake.base_url,
                    "detail": "high",
                    "image_transport": "inline",
                }
            ),
            rate_limits={"openai": RateLimit(rps=200, burst=20, concurrency=8)},
            # Backfilled jobs go through the Batch API: checked often, submitted quickly.
            batch=BatchSettings(poll_interval_s=0.3, max_wait_s=1.0),
            dedup="off",
        )
        # Phase 1: the first 8 images, with the priors' estimate.
        async with Daemon(settings) as daemon:
            await conn.execute(
                "WITH first AS (SELECT id FROM images ORDER BY id LIMIT 8) "
                "UPDATE images SET url = url || '&first' WHERE id IN (SELECT id FROM first)"
            )
            await jobs_finished(daemon, conn, 8, timeout=60)
        first_cost = float(await conn.fetchval("SELECT sum(cost_usd) FROM listener.results"))
        # Phase 2: with that history, estimate the other 32, then run them.
        realtime2, batch2, text2 = await asyncio.to_thread(dry_run_usd, env)
        assert "history of" in text2
        async with Daemon(settings) as daemon:
            await cli_async(env, "backfill", "images", "--no-wait", ok=True)
            await jobs_finished(daemon, conn, 40, timeout=120)
        total = float(await conn.fetchval("SELECT sum(cost_usd) FROM listener.results"))
    await conn.close()
    second_cost = total - first_cost
    # The backfill went through batches (its priority is a backfill's): the batch column.
    assert second_cost == pytest.approx(batch2, rel=0.10), (batch2, second_cost)
    assert realtime2 == pytest.approx(2 * batch2, rel=0.01)
    # The priors, with no history at all, for the record (printed on failure above).
    print(f"priors estimate for 40: {realtime:.5f}; recorded for 40: {total:.5f}")
