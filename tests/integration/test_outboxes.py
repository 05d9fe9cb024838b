"""The outboxes beside the jobs (status write-back, webhook events, deleted rows, inserted rows)
are visible: their depth and the age of their oldest row in ``/metrics``, ``/status``, the
status page and ``listener status``, read by one bounded query (``outboxes`` in
``sql/queries.sql``).

Rows are held in their outboxes by a transaction that locks them (every drain takes its rows
``FOR UPDATE SKIP LOCKED``, so it passes over them), with their times set an hour back; once
the transaction ends, the daemon drains them and every reading goes back to 0.
"""

from __future__ import annotations

import json
import re
from typing import Any

import aiohttp
import asyncpg
from aiohttp import web
from awaiting import loop_signals, when_any
from support import (
    RecordingProvider,
    admit,
    all_finished,
    cli_async,
    fast_settings,
    make_table,
    serving,
    wait_until,
)

from listener.app import Daemon
from listener.db.queries import OUTBOX_EXACT_UP_TO, OUTBOXES, Queries, load_queries

SECRET = "whsec_outbox_test_Zq7uX2pL9vR4"
HOUR_S = 3600.0

# Each outbox's table and the column its age is read from.
TABLES = {
    "status": ("listener.status_outbox", "queued_at"),
    "events": ("listener.event_outbox", "created_at"),
    "deleted": ("listener.deleted_rows", "deleted_at"),
    "inserted": ("listener.inserted_rows", "inserted_at"),
}
HELD = {"status": 2, "events": 2, "deleted": 1, "inserted": 3}
"""The rows the test holds in each outbox."""


def metric(text: str, name: str, outbox: str) -> float:
    """The value of ``name{outbox="..."}`` in a Prometheus exposition."""
    match = re.search(rf'^{name}{{outbox="{outbox}"}} (\S+)$', text, re.MULTILINE)
    assert match is not None, f"{name} of {outbox} not in /metrics"
    return float(match.group(1))


async def outbox_rows(conn: asyncpg.Connection) -> dict[str, int]:
    """Rows in each outbox, counted the slow way."""
    return {
        name: int(await conn.fetchval(f"SELECT count(*) FROM {table}"))
        for name, (table, _) in TABLES.items()
    }


async def fill_outboxes(conn: asyncpg.Connection) -> str:
    """An attached table with a status column and rows in every outbox (``HELD``), each row
    dated an hour back.

    Rows 1 and 2 have complete jobs whose status is not written back (the status outbox) and
    whose events are not delivered (the events outbox); row 2 is then deleted (the deleted
    rows); rows 3 to 5 are inserted and not admitted (the inserted rows).
    """
    table = await make_table(conn, "photos", status=True)
    await Queries(conn).enable_webhooks()  # type: ignore[arg-type]
    await conn.execute(f"INSERT INTO {table} (url) VALUES ('u1'), ('u2')")
    assert await admit(conn) == 2
    await conn.execute(
        "UPDATE listener.jobs SET status = 'complete', finished_at = now(), attempts = 1"
    )
    await conn.execute(f"DELETE FROM {table} WHERE id = 2")
    await conn.execute(f"INSERT INTO {table} (url) VALUES ('u3'), ('u4'), ('u5')")
    for outbox, column in TABLES.values():
        await conn.execute(f"UPDATE {outbox} SET {column} = {column} - interval '1 hour'")
    assert await outbox_rows(conn) == HELD
    return table


async def test_every_outbox_shows_its_rows_and_their_age_then_drains_to_zero(
    database_url: str, conn: asyncpg.Connection, env_for_subprocess: dict[str, str]
) -> None:
    await fill_outboxes(conn)
    holder = await asyncpg.connect(database_url)
    held = holder.transaction()
    await held.start()
    for outbox, _ in TABLES.values():
        await holder.execute(f"SELECT 1 FROM {outbox} FOR UPDATE")

    delivered: list[bytes] = []

    async def receive(request: web.Request) -> web.Response:
        delivered.append(await request.read())
        return web.Response(status=200)

    hooks = web.Application()
    hooks.router.add_post("/hooks", receive)
    async with serving(hooks, access_log=None, shutdown_timeout=0.1) as hooks_url:
        settings = fast_settings(
            database_url,
            webhook_url=f"{hooks_url}/hooks?token={SECRET}",
            webhook_secret=SECRET,
            webhook_interval_s=0.1,
            status_writeback_interval_s=0.1,
            deletes_interval_s=0.1,
        )
        async with (
            Daemon(settings, providers=[RecordingProvider()]) as daemon,
            aiohttp.ClientSession() as http,
        ):
            assert daemon.health is not None
            base = daemon.health.url
            try:
                # Held: every reading shows the rows and an age of an hour or more.
                async with http.get(f"{base}/metrics") as r:
                    metrics = await r.text()
                async with http.get(f"{base}/status") as r:
                    status = await r.json()
                async with http.get(f"{base}/") as r:
                    page = await r.text()
                shown = await cli_async(env_for_subprocess, "status", "--json", ok=True)
                table = await cli_async(env_for_subprocess, "status", ok=True)
                for name, depth in HELD.items():
                    assert metric(metrics, "listener_outbox_depth", name) == depth, name
                    assert metric(metrics, "listener_outbox_oldest_age_seconds", name) >= HOUR_S
                    for doc in (status, json.loads(shown.stdout)):
                        outbox = doc["outboxes"][name]
                        assert outbox["table"] == TABLES[name][0]
                        assert outbox["depth"] == depth and outbox["depth_exact"] is True
                        assert outbox["oldest_age_s"] >= HOUR_S
                    row = re.search(
                        rf'<tr data-outbox="{name}" data-depth="(\d+)" '
                        r'data-depth-exact="true" data-oldest-age-s="([0-9.]+)">',
                        page,
                    )
                    assert row is not None, name
                    assert int(row.group(1)) == depth and float(row.group(2)) >= HOUR_S
                assert list(status["outboxes"]) == list(OUTBOXES)
                assert re.search(
                    r"inserted rows to admit\s*│\s*listener\.inserted_rows\s*│\s*3 ", table.stdout
                )
                for text in (metrics, json.dumps(status), page, shown.stdout, table.stdout):
                    assert SECRET not in text
            finally:
                await held.rollback()
                await holder.close()

            # Released: the daemon admits, runs, writes back, delivers and cleans up.
            # Rows 1, 3, 4 and 5 keep their jobs (row 2's goes with its clean-up), all
            # finished: no job can queue anything any more.
            async def drained() -> bool:
                return await all_finished(conn, 4) and not any((await outbox_rows(conn)).values())

            await when_any(
                drained,
                [
                    (daemon.signals, "finished"),
                    *((loop_signals(daemon, n), "ticked") for n in ("writeback", "deletes")),
                    (loop_signals(daemon, "webhooks"), "ticked"),
                ],
                timeout=60,
            )
            assert len(delivered) >= HELD["events"]

            # /status and /metrics serve a reading up to status_cache_s old: the next one
            # after the drain says 0 everywhere.
            async def status_empty() -> bool:
                async with http.get(f"{base}/status") as r:
                    doc: dict[str, Any] = await r.json()
                return all(o["depth"] == 0 for o in doc["outboxes"].values())

            async def metrics_empty() -> bool:
                async with http.get(f"{base}/metrics") as r:
                    text = await r.text()
                return all(metric(text, "listener_outbox_depth", n) == 0 for n in OUTBOXES)

            await wait_until(status_empty, timeout=30, interval=0.2)
            await wait_until(metrics_empty, timeout=30, interval=0.2)
            async with http.get(f"{base}/metrics") as r:
                metrics = await r.text()
            async with http.get(f"{base}/status") as r:
                status = await r.json()
    shown = await cli_async(env_for_subprocess, "status", "--json", ok=True)
    for name in OUTBOXES:
        assert metric(metrics, "listener_outbox_oldest_age_seconds", name) == 0
        for doc in (status, json.loads(shown.stdout)):
            assert doc["outboxes"][name]["depth"] == 0
            assert doc["outboxes"][name]["oldest_age_s"] == 0


async def test_an_admission_that_fails_keeps_the_rows_insert_time(
    conn: asyncpg.Connection,
) -> None:
    """A table whose rows cannot be read (its URL column renamed since attach) gets its
    entries back, with the time they were inserted: their age keeps growing."""
    table = await make_table(conn)
    await conn.execute(f"INSERT INTO {table} (url) VALUES ('u1')")
    await conn.execute("UPDATE listener.inserted_rows SET inserted_at = now() - interval '1 hour'")
    before = await conn.fetchrow("SELECT id, inserted_at FROM listener.inserted_rows")
    await conn.execute(f"ALTER TABLE {table} RENAME COLUMN url TO image_url")
    assert await admit(conn) == 1  # taken, and put back
    after = await conn.fetchrow("SELECT id, inserted_at FROM listener.inserted_rows")
    assert after == before
    # Read with the daemon's rights (listener_worker), not a superuser's.
    await conn.execute("SET ROLE listener_worker")
    queries = Queries(conn)  # type: ignore[arg-type]
    [inserted] = [o for o in await queries.outboxes() if o.outbox == "inserted"]
    assert inserted.depth == 1 and inserted.oldest_age_s >= HOUR_S


async def test_a_backlog_past_the_cap_is_estimated_and_read_through_the_indexes(
    conn: asyncpg.Connection,
) -> None:
    """Past ``OUTBOX_EXACT_UP_TO`` rows an outbox's depth is the planner's estimate; the
    query reads every outbox through its primary key, never a sequential scan."""
    sql = load_queries()["outboxes"].sql
    assert f"LIMIT {OUTBOX_EXACT_UP_TO + 1})" in sql and f"o.n <= {OUTBOX_EXACT_UP_TO} " in sql
    rows = 2 * OUTBOX_EXACT_UP_TO
    await conn.execute(
        "INSERT INTO listener.jobs (source_table, source_id, status) "
        "SELECT 'public.t', g::text, 'complete' FROM generate_series(1, $1) g",
        rows,
    )
    await conn.execute("INSERT INTO listener.status_outbox (job_id) SELECT id FROM listener.jobs")
    await conn.execute(
        "INSERT INTO listener.event_outbox (event) SELECT '{}' FROM generate_series(1, $1)", rows
    )
    await conn.execute(
        "INSERT INTO listener.deleted_rows (source_table, source_id) "
        "SELECT 'public.t', g::text FROM generate_series(1, $1) g",
        rows,
    )
    await conn.execute(
        "INSERT INTO listener.inserted_rows (source_table, source_id) "
        "SELECT 'public.t', (g + $1)::text FROM generate_series(1, $1) g",
        rows,
    )
    await conn.execute(
        "ANALYZE listener.status_outbox, listener.event_outbox, "
        "listener.deleted_rows, listener.inserted_rows"
    )
    queries = Queries(conn)  # type: ignore[arg-type]
    for outbox in await queries.outboxes():
        assert not outbox.exact, outbox
        assert outbox.depth == rows, outbox  # ANALYZE read every row: the estimate is exact
    await conn.execute("DELETE FROM listener.deleted_rows WHERE id > 5")
    deleted = {o.outbox: o for o in await queries.outboxes()}["deleted"]
    assert deleted.depth == 5 and deleted.exact

    plan = await conn.fetchval(f"EXPLAIN (FORMAT JSON) {sql}")
    scans: list[tuple[str, str, str]] = []

    def walk(node: dict[str, Any]) -> None:
        if "Relation Name" in node:
            scans.append((node["Node Type"], node["Relation Name"], node.get("Index Name", "")))
        for child in node.get("Plans", []):
            walk(child)

    walk(json.loads(plan)[0]["Plan"])
    relations = {relation for _, relation, _ in scans}
    assert {t.removeprefix("listener.") for t, _ in TABLES.values()} <= relations
    for kind, relation, index in scans:
        if relation == "pg_class":
            continue
        assert kind in ("Index Scan", "Index Only Scan"), scans
        assert index.endswith("_pkey"), scans
