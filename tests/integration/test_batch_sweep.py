"""No batch at OpenAI that listener has not recorded first, and none left running that it does
not know: a batch's row says what it is before OpenAI is asked to create it, one daemon at a
time creates it, and every daemon sweeps OpenAI's recent batches, adopting one whose id was
never recorded and cancelling one listener has no open batch for. Also the retention of
batches that never reached OpenAI. Real Postgres, the OpenAI fake through the real SDK."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import asyncpg
import openai
from awaiting import loop_signals, when
from support import StaticServer, all_finished, counts, wait_until
from test_batch import backfill_batch, batch_settings, load_rows

from listener.app import Daemon
from listener.settings import BatchSettings, TierSettings
from listener.testing.openai_fake import FakeOpenAI

# The bundled photos the ``photos`` fixture (conftest.py) serves.
PHOTOS = ("rocket.jpg",)
TIER1 = TierSettings(tier1=["openai"])  # one OpenAI step: one batch per image set


async def test_a_batch_is_recorded_before_it_is_created_and_created_once(
    database_url: str, conn: asyncpg.Connection, photos: StaticServer
) -> None:
    table = await load_rows(conn, photos.base_url, 20)
    probe = await asyncpg.create_pool(database_url, min_size=1, max_size=2)
    seen: list[dict[str, Any]] = []
    try:
        async with FakeOpenAI() as fake:

            async def recorded_first(body: dict[str, Any]) -> None:
                # What listener had recorded when the create reached OpenAI.
                local_id = (body.get("metadata") or {}).get("listener_batch")
                row = await probe.fetchrow(
                    "SELECT status, input_file_id, provider_batch_id FROM listener.batches "
                    "WHERE id = $1",
                    local_id,
                )
                seen.append({"id": local_id, "row": dict(row) if row else None, "body": body})
                if len(seen) == 1:
                    # The first create is slow to reach OpenAI: the other daemon polls the
                    # recorded batch meanwhile, and must not create it too.
                    await asyncio.sleep(2.0)

            fake.batch_create_hook = recorded_first
            settings = batch_settings(
                database_url,
                fake,
                tiers=TIER1,
                batch=BatchSettings(
                    min_requests=20, max_wait_s=1.0, poll_interval_s=0.2, abandon_after_s=30.0
                ),
            )
            async with Daemon(settings), Daemon(settings):
                assert await backfill_batch(database_url, table) == 20
                await wait_until(lambda: all_finished(conn, 20), timeout=60)
            at_openai = set(fake.batches)
            files = dict(fake.files_meta)
    finally:
        await probe.close()
    rows = await conn.fetch("SELECT id, provider_batch_id, status FROM listener.batches")
    assert await counts(conn) == {"complete": 20}
    assert await conn.fetchval("SELECT count(*) FROM listener.results") == 20
    # Every create found its batch recorded first, with its file and claimed ("creating").
    assert seen
    for create in seen:
        assert create["row"] is not None, create["id"]
        assert create["row"]["status"] == "creating"
        assert create["row"]["provider_batch_id"] is None
        assert create["row"]["input_file_id"] == create["body"]["input_file_id"]
        assert files[create["body"]["input_file_id"]]["filename"] == f"{create['id']}.jsonl"
    # One create per batch, and every batch at OpenAI is one listener recorded and applied.
    assert len({c["id"] for c in seen}) == len(seen) == len(at_openai)
    assert {r["provider_batch_id"] for r in rows if r["provider_batch_id"]} == at_openai
    assert {r["status"] for r in rows} == {"completed"}


async def _create_at_openai(
    fake: FakeOpenAI, input_file_id: str | None, metadata: dict[str, str] | None
) -> str:
    """A batch made at OpenAI behind listener's back (over ``input_file_id``, or a new file)."""
    async with openai.AsyncOpenAI(
        base_url=fake.base_url, api_key="sk-test", max_retries=0
    ) as client:
        if input_file_id is None:
            line = {
                "custom_id": "x",
                "method": "POST",
                "url": "/v1/chat/completions",
                "body": {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]},
            }
            uploaded = await client.files.create(
                file=("x.jsonl", (json.dumps(line) + "\n").encode(), "application/jsonl"),
                purpose="batch",
            )
            input_file_id = uploaded.id
        batch = await client.batches.create(
            input_file_id=input_file_id,
            endpoint="/v1/chat/completions",
            completion_window="24h",
            metadata=metadata,
        )
    return batch.id


async def test_the_sweep_adopts_batches_never_recorded_and_cancels_strays(
    database_url: str, conn: asyncpg.Connection, photos: StaticServer
) -> None:
    table = await load_rows(conn, photos.base_url, 20)
    installation = await conn.fetchval("SELECT id::text FROM listener.installation")
    async with FakeOpenAI() as fake:
        fake.batch_duration_s = 4.0
        settings = batch_settings(
            database_url,
            fake,
            tiers=TIER1,
            batch=BatchSettings(
                min_requests=20, max_wait_s=1.0, poll_interval_s=0.2, abandon_after_s=30.0
            ),
        )
        async with Daemon(settings) as daemon:
            assert await backfill_batch(database_url, table) == 20

            async def created() -> bool:
                return bool(
                    await conn.fetchval(
                        "SELECT count(*) FROM listener.batches WHERE provider_batch_id IS NOT NULL"
                    )
                )

            await when(created, loop_signals(daemon, "batches"), "ticked", timeout=30)
        # The daemon stops as if it had died right after OpenAI created the batch, before it
        # recorded the id: the row is claimed ("creating") and has no provider id.
        row = await conn.fetchrow(
            "WITH made AS (SELECT id, provider_batch_id FROM listener.batches "
            "WHERE provider_batch_id IS NOT NULL) "
            "UPDATE listener.batches AS b SET provider_batch_id = NULL, status = 'creating', "
            "updated_at = now() FROM made WHERE b.id = made.id "
            "RETURNING b.id, b.input_file_id, made.provider_batch_id AS original"
        )
        local_id, original = row["id"], row["original"]
        ours = {"listener_batch": local_id, "listener_installation": installation}
        # Another creation of the same batch (a second daemon's, before the claims), one for a
        # batch listener has no row of, one of another installation on the same account, and
        # one that is not listener's at all.
        duplicate = await _create_at_openai(fake, row["input_file_id"], ours)
        unknown = await _create_at_openai(
            fake, None, {"listener_batch": "lb_gone", "listener_installation": installation}
        )
        foreign = await _create_at_openai(
            fake,
            None,
            {"listener_batch": local_id, "listener_installation": "another-installation"},
        )
        plain = await _create_at_openai(fake, None, {"job": "nightly"})
        async with Daemon(settings) as daemon:
            await wait_until(lambda: all_finished(conn, 20), timeout=60)
        statuses = {batch_id: batch["status"] for batch_id, batch in fake.batches.items()}
    recorded = await conn.fetchval(
        "SELECT provider_batch_id FROM listener.batches WHERE id = $1", local_id
    )
    # One of the two creations is adopted (the sweep reads the newest first), the other
    # cancelled: nothing runs at OpenAI that listener would never apply.
    assert recorded in (original, duplicate)
    other = duplicate if recorded == original else original
    assert statuses[recorded] == "completed"
    assert statuses[other] in ("cancelling", "cancelled")
    assert statuses[unknown] in ("cancelling", "cancelled")
    # Batches of another installation, or not listener's, are left alone.
    assert statuses[foreign] not in ("cancelling", "cancelled")
    assert statuses[plain] not in ("cancelling", "cancelled")
    assert await counts(conn) == {"complete": 20}
    assert await conn.fetchval("SELECT count(*) FROM listener.results") == 20
    assert await conn.fetchval("SELECT count(DISTINCT job_id) FROM listener.results") == 20


async def test_batches_that_never_reached_openai_are_pruned_after_the_retention(
    database_url: str, conn: asyncpg.Connection
) -> None:
    await conn.execute(
        "INSERT INTO listener.batches (id, provider, step, status, requests, created_at, "
        "updated_at, applied_at, provider_batch_id) "
        "SELECT id, 'openai', 'openai.tier1', status, 0, now() - age, now() - age, "
        "now() - age, pid FROM (VALUES "
        "('old_empty', 'empty', interval '8 days', NULL), "
        "('old_abandoned', 'abandoned', interval '30 days', NULL), "
        "('new_empty', 'empty', interval '6 days', NULL), "
        "('new_abandoned', 'abandoned', interval '1 hour', NULL), "
        "('old_completed', 'completed', interval '90 days', 'batch_a'), "
        "('old_cancelled', 'cancelled', interval '90 days', 'batch_b'), "
        "('old_closed_empty', 'cancelled', interval '90 days', NULL)"
        ") AS v(id, status, age, pid)"
    )
    async with FakeOpenAI() as fake:
        settings = batch_settings(
            database_url,
            fake,
            batch=BatchSettings(poll_interval_s=0.2, prune_after_days=7.0),
        )
        async with Daemon(settings) as daemon:

            async def pruned() -> bool:
                return not await conn.fetchval(
                    "SELECT count(*) FROM listener.batches WHERE id LIKE 'old\\_%' "
                    "AND status IN ('empty', 'abandoned')"
                )

            await when(pruned, loop_signals(daemon, "batches"), "ticked", timeout=30)
    left = {r["id"] for r in await conn.fetch("SELECT id FROM listener.batches")}
    assert left == {
        "new_empty",
        "new_abandoned",
        "old_completed",
        "old_cancelled",
        "old_closed_empty",
    }
