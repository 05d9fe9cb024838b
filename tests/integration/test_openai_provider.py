"""The OpenAI provider through the real SDK against the fake server, and in the daemon."""

from __future__ import annotations

import json
from typing import Any

import asyncpg
import pytest
from awaiting import jobs_finished, when
from loguru import logger
from pydantic import SecretStr
from support import StaticServer, counts, fast_settings, make_table, wait_until

from listener.analysis.providers.base import ImageInput, StepContext
from listener.analysis.providers.openai import OpenAIProvider
from listener.app import Daemon
from listener.cli.demo import BUNDLED_IMAGES
from listener.errors import (
    FetchTimeout,
    ProviderPaused,
    ProviderUnavailable,
    RateLimited,
    RejectedByProvider,
)
from listener.settings import BatchSettings, OpenAISettings, RateLimit, Settings, TierSettings
from listener.testing.openai_fake import FakeOpenAI, Fault

FAKE = FakeOpenAI  # the class of the ``fake`` fixture (conftest.py)
# The bundled photos the ``photos`` fixture (conftest.py) serves.
PHOTOS = ("astronaut.png", "rocket.jpg", "coffee.png", "chelsea.png")

API_KEY = "sk-test-Very-Secret-Key-123"


def openai_settings(fake: FakeOpenAI, **overrides: Any) -> OpenAISettings:
    values: dict[str, Any] = {
        "api_key": SecretStr(API_KEY),
        "base_url": fake.base_url,
        "image_transport": "inline",
        "timeout_s": 5.0,
    }
    values.update(overrides)
    return OpenAISettings(**values)


def tiered(database_url: str, fake: FakeOpenAI, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "pipeline": "tiered",
        "tiers": TierSettings(tier1=["openai"], tier2=["openai"], tier3=["openai"]),
        "openai": openai_settings(fake),
        "rate_limits": {"openai": RateLimit(rps=50, burst=5, concurrency=8)},
    }
    values.update(overrides)
    return fast_settings(database_url, **values)


def astronaut() -> ImageInput:
    data = (BUNDLED_IMAGES / "astronaut.png").read_bytes()
    return ImageInput(1, "public.t", "1", None, "http://x/a.png", data, "PNG", 512, 512)


async def test_structured_tiers_are_parsed_and_costed(
    database_url: str, conn: asyncpg.Connection, fake: FakeOpenAI, photos: StaticServer
) -> None:
    table = await make_table(conn)
    settings = tiered(
        database_url,
        fake,
        tiers=TierSettings(
            tier1=["openai"],
            tier2=["openai"],
            tier3=["openai"],
            tier2_min_quality=-1,
            tier3_min_side=400,
        ),
    )
    async with Daemon(settings) as daemon:
        await conn.execute(
            f"INSERT INTO {table} (url) VALUES ($1), ($2)",
            f"{photos.base_url}/astronaut.png",
            f"{photos.base_url}/chelsea.png",
        )
        await jobs_finished(daemon, conn, 2, timeout=30)
    rows = await conn.fetch(
        "SELECT j.image_url, r.step, r.output, r.model, r.input_tokens, r.output_tokens, "
        "r.calls, r.cost_usd FROM listener.results r JOIN listener.jobs j ON j.id = r.job_id "
        "ORDER BY j.id, r.step"
    )
    by = {(r["image_url"].rsplit("/", 1)[1], r["step"]): r for r in rows}
    # chelsea.png is 451x300: below the tier-3 gate of 400 px on the shorter side.
    assert sorted(by) == [
        ("astronaut.png", "openai.tier1"),
        ("astronaut.png", "openai.tier2"),
        ("astronaut.png", "openai.tier3"),
        ("chelsea.png", "openai.tier1"),
        ("chelsea.png", "openai.tier2"),
    ]
    tier1 = json.loads(by[("astronaut.png", "openai.tier1")]["output"])
    assert tier1["angle"] in OpenAISettings().angles
    assert 0 <= tier1["quality"] <= 10 and tier1["description"]
    parts = json.loads(by[("astronaut.png", "openai.tier2")]["output"])["parts"]
    assert parts and {"name", "condition", "notes"} <= set(parts[0])
    expert = json.loads(by[("astronaut.png", "openai.tier3")]["output"])
    assert {"paint_quality", "modifications", "damage", "summary"} <= set(expert)
    for r in rows:
        assert r["model"] == "gpt-4o-mini" or r["model"] == "gpt-4o"
        assert r["input_tokens"] > 85 and r["output_tokens"] > 0 and r["calls"] == 1
        assert float(r["cost_usd"]) > 0
    # The fake saw exactly one request per step, each with the key and the image inline.
    assert len(fake.requests) == 5
    assert all(req["api_key"] == API_KEY for req in fake.requests)


async def test_tiers_skipped_by_quality_and_resolution(
    database_url: str, conn: asyncpg.Connection, fake: FakeOpenAI, photos: StaticServer
) -> None:
    table = await make_table(conn)
    settings = tiered(
        database_url,
        fake,
        tiers=TierSettings(
            tier1=["openai"],
            tier2=["openai"],
            tier3=["openai"],
            tier2_min_quality=10,
            tier3_min_side=4000,
        ),
    )
    async with Daemon(settings) as daemon:
        await conn.execute(
            f"INSERT INTO {table} (url) VALUES ($1)", f"{photos.base_url}/coffee.png"
        )
        await jobs_finished(daemon, conn, 1, timeout=30)
    steps = await conn.fetch("SELECT step FROM listener.results")
    assert [r["step"] for r in steps] == ["openai.tier1"]
    assert await counts(conn) == {"complete": 1}
    assert len(fake.requests) == 1


async def test_retry_resumes_after_tier1_without_paying_twice(
    database_url: str, conn: asyncpg.Connection, fake: FakeOpenAI, photos: StaticServer
) -> None:
    table = await make_table(conn)
    settings = tiered(
        database_url,
        fake,
        tiers=TierSettings(tier1=["openai"], tier2=["openai"], tier2_min_quality=-1),
    )
    # Tier 1 succeeds (slowly, so the test can script what follows), then tier 2 fails
    # twice, with a 500 and a 503, before it succeeds.
    fake.latency_s = 0.5
    async with Daemon(settings) as daemon:
        await conn.execute(
            f"INSERT INTO {table} (url) VALUES ($1)", f"{photos.base_url}/rocket.jpg"
        )
        await wait_until(lambda: _requests_seen(fake, 1), timeout=30)
        fake.faults.extend([Fault(500), Fault(503)])
        fake.latency_s = 0.0
        await jobs_finished(daemon, conn, 1, timeout=30)
    job = await conn.fetchrow("SELECT status, attempts FROM listener.jobs")
    assert dict(job) == {"status": "complete", "attempts": 3}
    prompts = [_first_text(r) for r in fake.requests]
    assert sum("camera angle" in p for p in prompts) == 1  # tier 1 paid once
    assert sum("parts and components" in p for p in prompts) == 3


def _first_text(request: dict[str, Any]) -> str:
    for message in request["messages"]:
        content = message["content"]
        if isinstance(content, str):
            return content
        for part in content:
            if part.get("type") == "text":
                return str(part["text"])
    return ""


@pytest.mark.parametrize(
    ("fault", "expected", "text"),
    [
        (Fault(429, retry_after_s=7), RateLimited, "429"),
        (Fault(429, code="insufficient_quota"), ProviderPaused, "insufficient_quota"),
        (Fault(500), ProviderUnavailable, "500"),
        (Fault(503), ProviderUnavailable, "503"),
        (Fault(400, message="Invalid image."), RejectedByProvider, "Invalid image"),
        (Fault(401), ProviderPaused, "API key"),
    ],
)
async def test_errors_are_classified(
    fake: FakeOpenAI, fault: Fault, expected: type[Exception], text: str
) -> None:
    provider = OpenAIProvider(openai_settings(fake))
    await provider.start()
    try:
        fake.faults.append(fault)
        with pytest.raises(expected, match=text) as info:
            await provider.run("tier1", astronaut(), StepContext("openai.tier1"))
    finally:
        await provider.close()
    if isinstance(info.value, RateLimited):
        assert info.value.retry_after == 7
    assert API_KEY not in str(info.value)


@pytest.mark.parametrize("finish", ["content_filter", "length"])
async def test_content_filter_and_length_are_permanent(fake: FakeOpenAI, finish: str) -> None:
    provider = OpenAIProvider(openai_settings(fake))
    await provider.start()
    try:
        fake.finish_reason_override.append(finish)
        with pytest.raises(RejectedByProvider):
            await provider.run("tier1", astronaut(), StepContext("openai.tier1"))
    finally:
        await provider.close()


async def test_slow_answer_times_out(fake: FakeOpenAI) -> None:
    provider = OpenAIProvider(openai_settings(fake, timeout_s=0.3))
    await provider.start()
    fake.latency_s = 2.0
    try:
        with pytest.raises(FetchTimeout, match="did not answer"):
            await provider.run("tier1", astronaut(), StepContext("openai.tier1"))
    finally:
        fake.latency_s = 0.0
        await provider.close()


async def test_bucket_keeps_the_fake_within_its_limit_and_429_pauses_everyone(
    database_url: str, conn: asyncpg.Connection, photos: StaticServer
) -> None:
    table = await make_table(conn)
    async with FakeOpenAI(rps_limit=5) as fake:
        settings = tiered(
            database_url,
            fake,
            tiers=TierSettings(tier1=["openai"]),
            concurrency=10,
            # A margin under the fake's 5/s, as with any real limit: requests leave on their
            # slots but reach the server with the event loop's jitter (6 arrivals in 1 s at 4/s
            # need one request delayed 250 ms more than the fifth after it).
            rate_limits={"openai": RateLimit(rps=4, burst=1, concurrency=10)},
            dedup="off",  # the rows repeat images: every one is a request
        )
        fake.faults.append(Fault(429, retry_after_s=1.5))
        async with Daemon(settings) as daemon:
            await conn.execute(
                f"INSERT INTO {table} (url) SELECT $1 || g FROM generate_series(1, 12) g",
                f"{photos.base_url}/rocket.jpg?v=",
            )
            await jobs_finished(daemon, conn, 12, timeout=60)
        times = [r["received_at"] for r in fake.requests]
    assert fake.violations == 0
    assert await counts(conn) == {"complete": 12}
    # After the 429, nobody called for 1.5 s: the pause held every task, not one job.
    assert times[1] - times[0] >= 1.5
    assert len(times) == 13


async def test_insufficient_quota_pauses_provider_and_status_says_so(
    database_url: str, conn: asyncpg.Connection, fake: FakeOpenAI, photos: StaticServer
) -> None:
    from listener.ops.status import queue_status

    table = await make_table(conn)
    settings = tiered(
        database_url,
        fake,
        tiers=TierSettings(tier1=["openai"]),
        openai=openai_settings(fake, quota_pause_s=600),
    )
    fake.faults.append(Fault(429, code="insufficient_quota"))
    async with Daemon(settings) as daemon:
        await conn.execute(
            f"INSERT INTO {table} (url) VALUES ($1)", f"{photos.base_url}/rocket.jpg"
        )
        await when(
            lambda: _last_error_like(conn, "insufficient_quota"),
            daemon.signals,
            "snoozed",
            timeout=20,
        )
        assert daemon.queries is not None
        status = await queue_status(daemon.queries, None)
    job = await conn.fetchrow("SELECT status, attempts FROM listener.jobs")
    assert dict(job) == {"status": "pending", "attempts": 0}  # waiting, not failing
    assert "insufficient_quota" in status["paused_providers"]["openai"]["reason"]
    assert status["paused_providers"]["openai"]["remaining_s"] > 500
    assert len(fake.requests) == 1


async def _last_error_like(conn: asyncpg.Connection, text: str) -> bool:
    error = await conn.fetchval("SELECT last_error FROM listener.jobs LIMIT 1")
    return error is not None and text in error


async def test_budget_cap_defers_paid_steps(
    database_url: str, conn: asyncpg.Connection, fake: FakeOpenAI, photos: StaticServer
) -> None:
    from listener.db.queries import Queries
    from listener.ops.status import queue_status

    table = await make_table(conn)
    settings = tiered(
        database_url,
        fake,
        concurrency=1,
        prefetch=0,
        tiers=TierSettings(tier1=["openai"]),
        budget_usd_per_day=0.0000001,
        dedup="off",  # a copy costs nothing, so the budget would not hold it
    )
    async with Daemon(settings) as daemon:
        await conn.execute(
            f"INSERT INTO {table} (url) SELECT $1 || g FROM generate_series(1, 4) g",
            f"{photos.base_url}/rocket.jpg?v=",
        )
        await when(lambda: _deferred(conn, 3), daemon.signals, "snoozed", timeout=30)
        assert daemon.queries is not None
        status = await queue_status(daemon.queries, settings.budget_usd_per_day)
    assert len(fake.requests) == 1  # one paid call, then the budget was spent
    rows = await conn.fetch("SELECT status, attempts, last_error FROM listener.jobs")
    assert sorted(r["status"] for r in rows) == ["complete", "pending", "pending", "pending"]
    for r in rows:
        if r["status"] == "pending":
            assert r["attempts"] == 0 and "daily budget reached" in r["last_error"]
    assert status["budget_exhausted"] is True and status["spend_usd_today"] > 0
    assert Queries  # imported for type checkers reading the test


async def _deferred(conn: asyncpg.Connection, n: int) -> bool:
    return bool(
        await conn.fetchval(
            "SELECT count(*) >= $1 FROM listener.jobs WHERE last_error LIKE 'daily budget%'", n
        )
    )


async def test_api_key_never_logged(
    database_url: str, conn: asyncpg.Connection, fake: FakeOpenAI, photos: StaticServer
) -> None:
    lines: list[str] = []
    sink = logger.add(lines.append, level="DEBUG", format="{message} {extra}")
    table = await make_table(conn)
    fake.faults.extend([Fault(401), Fault(500), Fault(400)])
    try:
        settings = tiered(database_url, fake, tiers=TierSettings(tier1=["openai"]))
        async with Daemon(settings):
            await conn.execute(
                f"INSERT INTO {table} (url) SELECT $1 || g FROM generate_series(1, 3) g",
                f"{photos.base_url}/rocket.jpg?v=",
            )
            await wait_until(lambda: _requests_seen(fake, 1), timeout=20)
        lines.append(repr(settings))
        errors = await conn.fetch("SELECT last_error FROM listener.jobs")
    finally:
        logger.remove(sink)
    text = "\n".join(lines + [str(r["last_error"]) for r in errors])
    assert API_KEY not in text


async def _requests_seen(fake: FakeOpenAI, n: int) -> bool:
    return len(fake.requests) >= n


@pytest.mark.parametrize("batched", [False, True], ids=["realtime", "batch"])
async def test_every_tier_lands_in_the_result_column(
    database_url: str,
    conn: asyncpg.Connection,
    fake: FakeOpenAI,
    photos: StaticServer,
    batched: bool,
) -> None:
    """The app's result column holds each stored tier's output, as listener.results does,
    whether the steps ran realtime or through the Batch API."""
    await conn.execute(
        "CREATE TABLE public.photos (id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY, "
        "url text, analysis jsonb)"
    )
    await conn.execute(
        "SELECT listener.attach('public.photos', 'id', 'url', NULL, NULL, 'analysis', NULL, NULL)"
    )
    batch = BatchSettings(min_priority=0 if batched else 100, max_wait_s=0.2, poll_interval_s=0.2)
    settings = tiered(
        database_url,
        fake,
        tiers=TierSettings(tier1=["openai"], tier2=["openai"], tier2_min_quality=-1),
        batch=batch,
    )
    async with Daemon(settings) as daemon:
        await conn.execute(
            "INSERT INTO public.photos (url) VALUES ($1)", f"{photos.base_url}/astronaut.png"
        )
        await jobs_finished(daemon, conn, 1, timeout=30)
    assert bool(fake.batches) == batched
    stored = {
        r["step"]: json.loads(r["output"])
        for r in await conn.fetch("SELECT step, output FROM listener.results")
    }
    assert set(stored) == {"openai.tier1", "openai.tier2"} and stored["openai.tier2"]["parts"]
    written = json.loads(await conn.fetchval("SELECT analysis FROM public.photos"))
    assert written == stored
