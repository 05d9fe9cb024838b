"""Analyzed once, paid once: resume follows stored state, restarts and faults never re-bill,
settings hold on every path, and a failed start claims nothing."""

from __future__ import annotations

import asyncio
import socket
from typing import Any

import aiohttp
import asyncpg
import pytest
from awaiting import jobs_finished, when
from pydantic import SecretStr
from support import (
    RecordingProvider,
    StaticServer,
    admit,
    counts,
    fast_settings,
    make_table,
    random_faults,
    wait_until,
)

from listener.app import Daemon
from listener.errors import ProviderUnavailable
from listener.settings import OpenAISettings, RateLimit, Settings, TierSettings
from listener.testing.openai_fake import FakeOpenAI

FAKE = FakeOpenAI  # the class of the ``fake`` fixture (conftest.py)
# The bundled photos the ``photos`` fixture (conftest.py) serves.
PHOTOS = ("astronaut.png", "rocket.jpg", "coffee.png", "chelsea.png")

TIERS = {"tier1": "camera angle", "tier2": "parts and components", "tier3": "expert"}


def three_tiers(database_url: str, fake: FakeOpenAI, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "pipeline": "tiered",
        "tiers": TierSettings(
            tier1=["openai"],
            tier2=["openai"],
            tier3=["openai"],
            tier2_min_quality=-1,
            tier3_min_side=1,
        ),
        "openai": OpenAISettings(
            api_key=SecretStr("sk-test"),
            base_url=fake.base_url,
            image_transport="inline",
            timeout_s=10.0,
        ),
        "rate_limits": {"openai": RateLimit(rps=200, burst=20, concurrency=8)},
    }
    values.update(overrides)
    return fast_settings(database_url, **values)


def tier_of(body: dict[str, Any]) -> str:
    """Which tier a chat request is, from its prompt."""
    for message in body["messages"]:
        content = message["content"]
        parts = [content] if isinstance(content, str) else [p.get("text", "") for p in content]
        for text in parts:
            for tier, marker in TIERS.items():
                if marker in (text or ""):
                    return tier
    return "?"


def billed(fake: FakeOpenAI) -> dict[str, int]:
    out: dict[str, int] = {}
    for body in fake.answered:
        out[tier_of(body)] = out.get(tier_of(body), 0) + 1
    return out


async def test_graceful_restart_during_tier2_does_not_pay_tier1_again(
    database_url: str, conn: asyncpg.Connection, fake: FakeOpenAI, photos: StaticServer
) -> None:
    table = await make_table(conn)
    settings = three_tiers(database_url, fake, shutdown_grace_s=0.1)
    fake.latency_s = 1.0
    async with Daemon(settings):
        await conn.execute(
            f"INSERT INTO {table} (url) VALUES ($1)", f"{photos.base_url}/rocket.jpg"
        )
        # Tier 1 answered and stored, tier 2 in flight: then a graceful stop (SIGTERM).
        await wait_until(lambda: _answered(fake, 1), timeout=30)
        await wait_until(lambda: _received(fake, 2), timeout=30)
    job = await conn.fetchrow("SELECT status, attempts FROM listener.jobs")
    assert dict(job) == {"status": "pending", "attempts": 0}  # handed back, attempt returned
    fake.latency_s = 0.0
    async with Daemon(settings) as daemon:
        await jobs_finished(daemon, conn, 1, timeout=30)
    assert billed(fake)["tier1"] == 1
    rows = await conn.fetch("SELECT step, calls, input_tokens FROM listener.results ORDER BY step")
    assert [(r["step"], r["calls"]) for r in rows] == [
        ("openai.tier1", 1),
        ("openai.tier2", 1),
        ("openai.tier3", 1),
    ]


async def test_faults_and_restarts_end_complete_with_no_step_billed_twice(
    database_url: str, conn: asyncpg.Connection, fake: FakeOpenAI, photos: StaticServer
) -> None:
    rows = 40
    table = await make_table(conn)
    # The rows repeat images: every step of every row is billed once, none is a copy.
    settings = three_tiers(database_url, fake, max_attempts=25, shutdown_grace_s=5.0, dedup="off")
    fake.fault_plan = random_faults(7)
    fake.latency_s = 0.02
    names = ("astronaut.png", "rocket.jpg", "coffee.png", "chelsea.png")
    await conn.executemany(
        f"INSERT INTO {table} (url) VALUES ($1)",
        [(f"{photos.base_url}/{names[i % 4]}?row={i}",) for i in range(rows)],
    )
    for finished_before_stop in (10, 25):
        # Two graceful stops (as on SIGTERM) in the middle of the work, then a restart.
        async with Daemon(settings) as daemon:
            await when(
                lambda n=finished_before_stop: _complete(conn, n),
                daemon.signals,
                "finished",
                timeout=60,
            )
    async with Daemon(settings) as daemon:
        await jobs_finished(daemon, conn, rows, timeout=90)
    assert await counts(conn) == {"complete": rows}
    assert billed(fake) == {"tier1": rows, "tier2": rows, "tier3": rows}
    assert await conn.fetchval("SELECT max(calls) FROM listener.results") == 1
    # Spend counted once: the tokens stored are the tokens the provider billed.
    stored = await conn.fetchval("SELECT sum(input_tokens + output_tokens) FROM listener.results")
    assert stored == fake.usage_total["prompt_tokens"] + fake.usage_total["completion_tokens"]


async def test_max_attempts_setting_holds_for_rows_the_trigger_enqueued(
    database_url: str, conn: asyncpg.Connection
) -> None:
    table = await make_table(conn)
    await conn.execute(f"INSERT INTO {table} (url) VALUES ('broken')")
    source_id = await conn.fetchval(f"SELECT id::text FROM {table}")
    provider = RecordingProvider(
        failures={source_id: [ProviderUnavailable(f"HTTP 500 #{i}") for i in range(10)]}
    )
    settings = fast_settings(database_url, max_attempts=2)
    async with Daemon(settings, providers=[provider], health=False) as daemon:
        await daemon.signals.wait("discarded", 1, timeout=20)
    job = await conn.fetchrow(
        "SELECT status, attempts, max_attempts, last_error FROM listener.jobs"
    )
    assert (job["status"], job["attempts"], job["max_attempts"]) == ("failed", 2, 2)
    assert job["last_error"] == "HTTP 500 #1 (gave up after 2 attempts)"
    assert len(provider.calls) == 2


async def test_a_port_clash_at_start_claims_nothing_and_leaves_nothing_running(
    database_url: str, conn: asyncpg.Connection
) -> None:
    table = await make_table(conn)
    await conn.execute(f"INSERT INTO {table} (url) SELECT 'u' || g FROM generate_series(1, 20) g")
    assert await admit(conn) == 20
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        provider = RecordingProvider()
        daemon = Daemon(
            fast_settings(database_url, health_port=port), providers=[provider], health=True
        )
        before = asyncio.all_tasks()
        with pytest.raises(OSError):
            await daemon.start()
    await asyncio.sleep(0)
    assert asyncio.all_tasks() - before == set()
    assert provider.calls == []
    jobs = await conn.fetch("SELECT status, attempts, lease_token FROM listener.jobs")
    assert {(j["status"], j["attempts"], j["lease_token"]) for j in jobs} == {("pending", 0, None)}


async def test_readiness_reports_claims_that_keep_failing(
    database_url: str, conn: asyncpg.Connection
) -> None:
    table = await make_table(conn)
    # A trigger that breaks every claim, as a mis-set attachment once did.
    await conn.execute(
        """
        CREATE FUNCTION public.break_claims() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN RAISE EXCEPTION 'claims are broken'; END; $$;
        CREATE TRIGGER break_claims BEFORE UPDATE ON listener.jobs
            FOR EACH ROW WHEN (NEW.status = 'processing') EXECUTE FUNCTION public.break_claims();
        """
    )
    await conn.execute(f"INSERT INTO {table} (url) VALUES ('x')")
    assert await admit(conn) == 1  # a pending job: its claim is the UPDATE that fails
    async with Daemon(fast_settings(database_url), providers=[RecordingProvider()]) as daemon:
        assert daemon.health is not None and daemon.worker is not None
        worker = daemon.worker

        async def failing() -> bool:
            return worker.claim_failures >= 3

        await wait_until(failing, timeout=20)
        url = f"{daemon.health.url}/readyz"
        async with aiohttp.ClientSession() as http, http.get(url) as answer:
            body = await answer.json()
            assert answer.status == 503
        assert any("claims failing" in p and "claims are broken" in p for p in body["problems"])
        await conn.execute("DROP TRIGGER break_claims ON listener.jobs")
        await daemon.signals.wait("completed", 1, timeout=20)
        async with aiohttp.ClientSession() as http, http.get(url) as answer:
            assert answer.status == 200


async def _answered(fake: FakeOpenAI, n: int) -> bool:
    return len(fake.answered) >= n


async def _received(fake: FakeOpenAI, n: int) -> bool:
    return len(fake.requests) >= n


async def _complete(conn: asyncpg.Connection, n: int) -> bool:
    return (await counts(conn)).get("complete", 0) >= n
