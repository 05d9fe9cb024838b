"""Duplicate images are not paid twice: the daemon on real Postgres, OpenAI through the real SDK
against the fake server. The same bytes under another URL reuse the stored results at $0,
recorded as copies; the spend report and the dry run show what that saved."""

from __future__ import annotations

import hashlib
import io
import json
import re
import shutil
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from awaiting import jobs_finished
from PIL import Image
from pydantic import SecretStr
from support import (
    StaticServer,
    cli_async,
    fast_settings,
    jobs_and_waiting,
    make_table,
)

from listener.app import Daemon
from listener.cli.demo import BUNDLED_IMAGES
from listener.db.queries import Queries
from listener.ops.status import queue_status
from listener.ops.status_page import render
from listener.settings import OpenAISettings, RateLimit, Settings, TierSettings
from listener.testing import FakeOpenAI

FAKE = FakeOpenAI  # the class of the ``fake`` fixture (conftest.py)

ASTRONAUT = (BUNDLED_IMAGES / "astronaut.png").read_bytes()


@pytest.fixture
async def photos(tmp_path: Path) -> AsyncIterator[StaticServer]:
    """astronaut.png twice under other names (the same bytes), chelsea.png (other bytes),
    and the astronaut's pixels saved again with another compression (other bytes, the same
    picture)."""
    shutil.copy(BUNDLED_IMAGES / "astronaut.png", tmp_path / "astronaut.png")
    shutil.copy(BUNDLED_IMAGES / "astronaut.png", tmp_path / "copy-of-astronaut.png")
    shutil.copy(BUNDLED_IMAGES / "astronaut.png", tmp_path / "third-astronaut.png")
    shutil.copy(BUNDLED_IMAGES / "chelsea.png", tmp_path / "chelsea.png")
    out = io.BytesIO()
    Image.open(io.BytesIO(ASTRONAUT)).save(out, "PNG", compress_level=1)
    assert out.getvalue() != ASTRONAUT
    (tmp_path / "recompressed-astronaut.png").write_bytes(out.getvalue())
    async with StaticServer(str(tmp_path)) as server:
        yield server


def settings_for(database_url: str, fake: FakeOpenAI, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "pipeline": "tiered",
        "tiers": TierSettings(tier1=["openai"], tier2=["openai"], tier2_min_quality=-1),
        "openai": OpenAISettings(
            api_key=SecretStr("sk-test"),
            base_url=fake.base_url,
            image_transport="inline",
            timeout_s=5.0,
        ),
        "rate_limits": {"openai": RateLimit(rps=50, burst=5, concurrency=4)},
    }
    values.update(overrides)
    return fast_settings(database_url, **values)


async def analyze(
    daemon: Daemon, conn: asyncpg.Connection, table: str, url: str, owner: str | None = None
) -> int:
    """Insert one row and wait until its job is finished; its job id. One at a time: two
    identical images analyzed at the same moment would both pay (see listener.dedup)."""
    row = await conn.fetchval(
        f"INSERT INTO {table} (url, owner_id) VALUES ($1, $2) RETURNING id", url, owner
    )
    total = await jobs_and_waiting(conn)
    await jobs_finished(daemon, conn, total, timeout=30)
    job_id: int = await conn.fetchval(
        "SELECT id FROM listener.jobs WHERE source_table = $1 AND source_id = $2",
        table,
        str(row),
    )
    assert await conn.fetchval("SELECT status FROM listener.jobs WHERE id = $1", job_id) == (
        "complete"
    )
    return job_id


async def results(conn: asyncpg.Connection, job_id: int) -> dict[str, asyncpg.Record]:
    rows = await conn.fetch(
        "SELECT step, provider, output, model, input_tokens, output_tokens, calls, "
        "cost_usd::float8 AS cost_usd, image_sha256, image_phash, reused_from, reuse_kind, "
        "saved_usd::float8 AS saved_usd FROM listener.results WHERE job_id = $1",
        job_id,
    )
    return {r["step"]: r for r in rows}


async def test_identical_bytes_are_analyzed_once_and_billed_once(
    database_url: str,
    env_for_subprocess: dict[str, str],
    conn: asyncpg.Connection,
    fake: FakeOpenAI,
    photos: StaticServer,
) -> None:
    table = await make_table(conn)
    async with Daemon(settings_for(database_url, fake)) as daemon:
        first = await analyze(daemon, conn, table, f"{photos.base_url}/astronaut.png")
        assert len(fake.requests) == 2  # tier 1 and tier 2
        copy = await analyze(daemon, conn, table, f"{photos.base_url}/copy-of-astronaut.png")
        assert len(fake.requests) == 2  # the same bytes: nothing more was asked
        other = await analyze(daemon, conn, table, f"{photos.base_url}/chelsea.png")
        assert len(fake.requests) == 4  # other bytes: paid

    paid, copied, chelsea = (
        await results(conn, first),
        await results(conn, copy),
        await results(conn, other),
    )
    assert set(paid) == set(copied) == set(chelsea) == {"openai.tier1", "openai.tier2"}
    digest = hashlib.sha256(ASTRONAUT).digest()
    for step, original in paid.items():
        reused = copied[step]
        # The right result on the row: the same analysis, stored as the row's own.
        assert json.loads(reused["output"]) == json.loads(original["output"])
        assert (reused["provider"], reused["model"]) == (original["provider"], original["model"])
        # Recorded as a copy, at $0, naming the job that paid and what it paid.
        assert original["cost_usd"] > 0 and original["calls"] == 1
        assert original["reused_from"] is None and original["reuse_kind"] is None
        assert reused["cost_usd"] == 0 and reused["calls"] == 0
        assert reused["input_tokens"] is None and reused["output_tokens"] is None
        assert (reused["reused_from"], reused["reuse_kind"]) == (first, "sha256")
        assert reused["saved_usd"] == pytest.approx(original["cost_usd"])
        assert original["image_sha256"] == reused["image_sha256"] == digest
        assert chelsea[step]["reuse_kind"] is None and chelsea[step]["cost_usd"] > 0

    # Billed once: what the provider counted is what the results record, copies add nothing.
    recorded_in = await conn.fetchval("SELECT sum(input_tokens) FROM listener.results")
    assert fake.usage_total["prompt_tokens"] == recorded_in
    paid_usd = sum(r["cost_usd"] for r in [*paid.values(), *chelsea.values()])
    saved_usd = sum(r["cost_usd"] for r in paid.values())

    # The spend report: the JSON status, the CLI and the status page.
    doc = await queue_status(Queries(conn), None)
    assert doc["spend_usd_total"] == pytest.approx(paid_usd, abs=1e-6)
    assert doc["dedup_reused_steps_total"] == 2
    assert doc["dedup_reused_steps_today"] == 2
    assert doc["dedup_saved_usd_total"] == pytest.approx(saved_usd, abs=1e-6)
    assert doc["dedup_by_provider"] == {
        "openai": {"reused_steps_total": 2, "saved_usd_total": pytest.approx(saved_usd, abs=1e-6)}
    }
    page = render(doc)
    assert 'id="dedup-reused" data-value="2"' in page
    status = await cli_async(env_for_subprocess, "status", ok=True)
    assert re.search(r"deduplication saved: .*in all \(2 steps\)", status.stdout), status.stdout

    # The dry run of a backfill shows the savings so far and, from the history (2 of the 6
    # recent OpenAI results were copies), what the next images may save.
    await conn.execute(
        f"ALTER TABLE {table} DISABLE TRIGGER USER; "
        f"INSERT INTO {table} (url) VALUES ('{photos.base_url}/third-astronaut.png'); "
        f"ALTER TABLE {table} ENABLE TRIGGER USER"
    )
    env = {
        **env_for_subprocess,
        "LISTENER_PIPELINE": "tiered",
        "LISTENER_TIERS__TIER1": '["openai"]',
        "LISTENER_TIERS__TIER2": '["openai"]',
        "LISTENER_OPENAI__API_KEY": "sk-test",
        "LISTENER_OPENAI__BASE_URL": fake.base_url,
        "LISTENER_FETCH__ALLOWED_HOSTS": '["127.0.0.1"]',
    }
    dry = await cli_async(env, "backfill", "images", "--dry-run", ok=True)
    assert "1 rows would be enqueued" in dry.stdout, dry.stdout
    found = re.search(r"so far 2 steps reused, \$([\d.]+) saved", dry.stdout)
    assert found is not None, dry.stdout
    assert float(found.group(1)) == pytest.approx(saved_usd, abs=1e-6)
    expected = re.search(r"would save about \$([\d.]+) \((\d+)% of the realtime", dry.stdout)
    assert expected is not None and float(expected.group(1)) > 0, dry.stdout
    # One tier-1 result of three, and one tier-2 of three, were copies.
    assert expected.group(2) == "33", dry.stdout


async def test_dedup_off_pays_for_every_copy(
    database_url: str, conn: asyncpg.Connection, fake: FakeOpenAI, photos: StaticServer
) -> None:
    table = await make_table(conn)
    async with Daemon(settings_for(database_url, fake, dedup="off")) as daemon:
        first = await analyze(daemon, conn, table, f"{photos.base_url}/astronaut.png")
        copy = await analyze(daemon, conn, table, f"{photos.base_url}/copy-of-astronaut.png")
    assert len(fake.requests) == 4
    for job_id in (first, copy):
        for r in (await results(conn, job_id)).values():
            assert r["cost_usd"] > 0 and r["reuse_kind"] is None
    doc = await queue_status(Queries(conn), None)
    assert doc["dedup_reused_steps_total"] == 0 and doc["dedup_saved_usd_total"] == 0


async def test_results_are_reused_within_an_owner_by_default(
    database_url: str, conn: asyncpg.Connection, fake: FakeOpenAI, photos: StaticServer
) -> None:
    table = await make_table(conn, owner=True)
    url = f"{photos.base_url}/astronaut.png"
    async with Daemon(settings_for(database_url, fake)) as daemon:
        alice = await analyze(daemon, conn, table, url, "alice")
        bob = await analyze(daemon, conn, table, f"{url}?for=bob", "bob")
        assert len(fake.requests) == 4  # another owner: paid again
        again = await analyze(daemon, conn, table, f"{url}?again", "alice")
        assert len(fake.requests) == 4
    assert {r["reused_from"] for r in (await results(conn, again)).values()} == {alice}
    assert {r["reused_from"] for r in (await results(conn, bob)).values()} == {None}
    # Scope global: any row's results.
    async with Daemon(settings_for(database_url, fake, dedup_scope="global")) as daemon:
        carol = await analyze(daemon, conn, table, f"{url}?for=carol", "carol")
    assert len(fake.requests) == 4
    assert {r["reuse_kind"] for r in (await results(conn, carol)).values()} == {"sha256"}


async def test_near_duplicates_reuse_by_perceptual_hash(
    database_url: str, conn: asyncpg.Connection, fake: FakeOpenAI, photos: StaticServer
) -> None:
    table = await make_table(conn)
    # The local step runs first: its perceptual hash is known before the paid step.
    tiers = TierSettings(tier1=["local", "openai"])
    sha_only = settings_for(database_url, fake, tiers=tiers)
    async with Daemon(sha_only) as daemon:
        first = await analyze(daemon, conn, table, f"{photos.base_url}/astronaut.png")
        other = await analyze(daemon, conn, table, f"{photos.base_url}/recompressed-astronaut.png")
    assert len(fake.requests) == 2  # other bytes: paid, however alike
    async with Daemon(settings_for(database_url, fake, tiers=tiers, dedup="phash")) as daemon:
        near = await analyze(daemon, conn, table, f"{photos.base_url}/recompressed-astronaut.png?2")
    assert len(fake.requests) == 2
    paid, copied = await results(conn, first), await results(conn, near)
    assert paid["openai.tier1"]["image_phash"] is not None
    assert copied["openai.tier1"]["image_phash"] == paid["openai.tier1"]["image_phash"]
    # Its bytes match the recompressed row exactly: same bytes win over a near match.
    assert copied["openai.tier1"]["reuse_kind"] == "sha256"
    assert copied["openai.tier1"]["reused_from"] == other
    # The local step is free: it ran for every row, never copied.
    assert copied["local.analysis"]["reuse_kind"] is None
    # Without the rows of those bytes, only the first row's picture is left: a near match.
    await conn.execute("DELETE FROM listener.results WHERE job_id = ANY($1)", [other, near])
    async with Daemon(settings_for(database_url, fake, tiers=tiers, dedup="phash")) as daemon:
        nearest = await analyze(
            daemon, conn, table, f"{photos.base_url}/recompressed-astronaut.png?3"
        )
    assert len(fake.requests) == 2
    step = (await results(conn, nearest))["openai.tier1"]
    assert (step["reuse_kind"], step["reused_from"], step["cost_usd"]) == ("phash", first, 0)
