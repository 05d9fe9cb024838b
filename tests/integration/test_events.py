"""Terminal events: NOTIFY listener_events and signed webhooks from the outbox, on real Postgres.

A LISTENing client and a local aiohttp receiver (127.0.0.1) watch ``listener run`` processes,
one of them SIGKILLed mid-delivery; the receiver checks every signature with the documented
scheme and deduplicates on the signed body's ``event_id``.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import asyncpg
import pytest
from aiohttp import web
from loguru import logger
from support import admit, all_finished, cli_async, listener_run, make_table, serving, wait_until

from listener.app_side.webhooks import WebhookSender, sign, verify_signature
from listener.db.queries import Queries
from listener.queue.pg_store import PgJobStore
from listener.queue.signals import Counters
from listener.queue.store import JobFilter

SECRET = "whsec_events_test_secret"
CHANNEL = "listener_events"


@dataclass
class Delivery:
    """One POST the receiver got; ``event_id`` is its ``X-Listener-Event-Id`` header."""

    event_id: int
    body: bytes
    signature: str
    at: float

    def body_event_id(self) -> int:
        """The ``event_id`` of the (signed) body."""
        event_id = json.loads(self.body)["event_id"]
        assert isinstance(event_id, int)
        return event_id


@dataclass
class Receiver:
    """A webhook receiver on 127.0.0.1: records every POST, then answers after ``latency_s``
    with the next scripted status (200 once the script is used up)."""

    latency_s: float = 0.0
    script: list[int] = field(default_factory=list)
    deliveries: list[Delivery] = field(default_factory=list)
    in_flight: set[int] = field(default_factory=set)
    url: str = ""
    _stack: AsyncExitStack = field(default_factory=AsyncExitStack)

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        event_id = int(request.headers["X-Listener-Event-Id"])
        self.deliveries.append(
            Delivery(event_id, body, request.headers["X-Listener-Signature"], time.monotonic())
        )
        self.in_flight.add(event_id)
        try:
            if self.latency_s:
                await asyncio.sleep(self.latency_s)
            status = self.script.pop(0) if self.script else 200
            return web.Response(status=status)
        finally:
            self.in_flight.discard(event_id)

    async def __aenter__(self) -> Receiver:
        app = web.Application()
        app.router.add_post("/hooks/listener", self.handle)
        base_url = await self._stack.enter_async_context(
            serving(app, access_log=None, shutdown_timeout=0.1)
        )
        self.url = f"{base_url}/hooks/listener?token=querysecret"
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._stack.aclose()

    def events(self) -> list[dict[str, Any]]:
        return [json.loads(d.body) for d in self.deliveries]

    def deduplicated(self) -> dict[int, dict[str, Any]]:
        """What a receiver that verifies each POST, then deduplicates on the body's
        ``event_id``, stores: the first body of each id, by id."""
        stored: dict[int, dict[str, Any]] = {}
        for d in self.deliveries:
            assert verify_signature(SECRET, d.signature, d.body), d
            event = json.loads(d.body)
            stored.setdefault(event["event_id"], event)
        return stored


def without_id(event: dict[str, Any]) -> dict[str, Any]:
    """``event`` as the trigger queued it: without the ``event_id`` the sender adds."""
    return {k: v for k, v in event.items() if k != "event_id"}


def replayed_as(delivery: Delivery, event_id: int) -> bytes:
    """``delivery``'s body with another ``event_id`` (what an attacker replaying a captured
    delivery as a new event would send, under the captured signature)."""
    event = json.loads(delivery.body)
    assert event["event_id"] != event_id
    return json.dumps({**event, "event_id": event_id}, separators=(",", ":")).encode()


class Listening:
    """A LISTEN listener_events client (its own connection): the payloads, decoded."""

    def __init__(self) -> None:
        self.payloads: list[dict[str, Any]] = []
        self.conn: asyncpg.Connection | None = None
        self.heard: Counters[Literal["heard"]] = Counters()

    def __call__(self, _conn: object, _pid: int, _channel: str, payload: str) -> None:
        self.payloads.append(json.loads(payload))
        self.heard.emit("heard")

    async def wait_heard(self, n: int, timeout: float = 10.0) -> None:
        """Wait until ``n`` payloads arrived (each one is counted as it comes; no polling)."""
        await self.heard.wait("heard", n, timeout)

    async def start(self, dsn: str) -> Listening:
        self.conn = await asyncpg.connect(dsn)
        await self.conn.add_listener(CHANNEL, self)
        return self

    async def settle(self) -> None:
        """A round trip on the LISTEN connection, so notifications already sent are read."""
        assert self.conn is not None
        await self.conn.fetchval("SELECT 1")

    async def close(self) -> None:
        if self.conn is not None:
            await self.conn.close()


async def outbox_size(conn: asyncpg.Connection) -> int:
    return int(await conn.fetchval("SELECT count(*) FROM listener.event_outbox"))


ROWS = 100


# About 15 s on 2 cores.
@pytest.mark.timeout(180)
async def test_listen_and_webhook_get_every_terminal_event_across_a_sigkill(
    database_url: str, conn: asyncpg.Connection, env_for_subprocess: dict[str, str], tmp_path: Path
) -> None:
    table = await make_table(conn)
    listening = await Listening().start(database_url)
    log = tmp_path / "listener.log"
    try:
        async with Receiver(latency_s=0.3) as receiver:
            daemon = {
                "pipeline": "noop",
                "noop_delay_s": "0.05",
                "concurrency": "4",
                "lease_s": "2",
                "webhook_url": receiver.url,
                "webhook_secret": SECRET,
                "webhook_timeout_s": "1",
                "webhook_interval_s": "0.1",
                "webhook_concurrency": "8",
                "webhook_backoff_base_s": "0.1",
                "webhook_backoff_cap_s": "0.5",
            }
            await conn.execute(
                f"INSERT INTO {table} (url) SELECT 'u' || g FROM generate_series(1, {ROWS}) g"
            )
            with listener_run(env_for_subprocess, log, worker_id="victim", **daemon) as victim:

                async def midway() -> bool:
                    assert victim.poll() is None, log.read_text()
                    await listening.settle()
                    return len(listening.payloads) >= 30 and bool(receiver.in_flight)

                await wait_until(midway, timeout=60, interval=0.005)
                os.kill(victim.pid, signal.SIGKILL)
                in_flight_at_kill = set(receiver.in_flight)
                await asyncio.to_thread(victim.wait, 10)
            assert in_flight_at_kill

            with listener_run(env_for_subprocess, log, worker_id="rescuer", **daemon) as proc:

                async def delivered() -> bool:
                    delivered_jobs = {e["job_id"] for e in receiver.events()}
                    return (
                        await all_finished(conn, ROWS)
                        and len(delivered_jobs) == ROWS
                        and await outbox_size(conn) == 0
                    )

                await wait_until(delivered, timeout=90, interval=0.1)
                proc.send_signal(signal.SIGTERM)
                code = await asyncio.to_thread(proc.wait, 30)
            assert code == 0, log.read_text()
            await listening.settle()
    finally:
        await listening.close()

    jobs = await conn.fetch("SELECT id, source_id, status FROM listener.jobs ORDER BY id")
    assert len(jobs) == ROWS and {j["status"] for j in jobs} == {"complete"}
    expected = [
        {"table": table, "row_id": j["source_id"], "status": "complete", "job_id": j["id"]}
        for j in jobs
    ]
    # NOTIFY: sent by Postgres on commit, so each committed terminal change exactly once,
    # whichever daemon committed it and although one was killed; no row id (any role may
    # LISTEN).
    assert sorted(listening.payloads, key=lambda p: p["job_id"]) == [
        {k: v for k, v in e.items() if k != "row_id"} for e in expected
    ]

    # Webhooks: every event, signed, its id in the signed body (the header repeats it);
    # repeats only of the events the killed daemon had claimed and not yet seen answered (at
    # least once), each repeat with the same id and body.
    for d in receiver.deliveries:
        assert verify_signature(SECRET, d.signature, d.body), d
        assert not verify_signature("whsec_wrong", d.signature, d.body)
        assert d.body_event_id() == d.event_id, d
    by_id: dict[int, list[bytes]] = {}
    for d in receiver.deliveries:
        by_id.setdefault(d.body_event_id(), []).append(d.body)
    assert all(len(set(bodies)) == 1 for bodies in by_id.values())
    # A receiver deduplicating on the body's event_id stores each event exactly once.
    stored = receiver.deduplicated()
    assert stored.keys() == by_id.keys()
    assert sorted(map(without_id, stored.values()), key=lambda e: e["job_id"]) == expected
    # A captured delivery replayed under another event's id does not verify.
    first = receiver.deliveries[0]
    other_id = next(i for i in by_id if i != first.body_event_id())
    assert not verify_signature(SECRET, first.signature, replayed_as(first, other_id))
    repeated = {i for i, bodies in by_id.items() if len(bodies) > 1}
    assert in_flight_at_kill <= repeated, (in_flight_at_kill, repeated)
    assert len(repeated) <= 8, repeated  # at most one claim (webhook_concurrency) was cut off
    text = log.read_text()
    assert SECRET not in text and "querysecret" not in text


async def _enable_webhooks(database_url: str) -> None:
    pool = await asyncpg.create_pool(database_url, min_size=1, max_size=1)
    try:
        await Queries(pool).enable_webhooks()
    finally:
        await pool.close()


async def test_a_receiver_failing_twice_gets_the_event_three_times_with_backoff(
    database_url: str, conn: asyncpg.Connection
) -> None:
    table = await make_table(conn)
    await conn.execute(f"INSERT INTO {table} (url) VALUES ('u1')")
    assert await admit(conn) == 1
    lines: list[str] = []
    sink = logger.add(lines.append, level="DEBUG", format="{message}")
    pool = await asyncpg.create_pool(database_url, min_size=1, max_size=2)
    try:
        queries = Queries(pool)
        await queries.enable_webhooks()
        assert await PgJobStore(pool).cancel(JobFilter((), table=table))
        queued = await conn.fetchrow("SELECT id, event FROM listener.event_outbox")
        async with Receiver(script=[500, 500, 200]) as receiver:
            # rng() = 1: the largest full-jitter delay, 0.3 s then 0.6 s.
            sender = WebhookSender(
                queries,
                receiver.url,
                SECRET,
                timeout_s=2.0,
                interval_s=0.02,
                backoff_base_s=0.3,
                backoff_cap_s=5.0,
                rng=lambda: 1.0,
            )
            signals = sender.loop.signals
            task = asyncio.create_task(sender.run())
            try:
                # The first round's POST got a 500; the row is pushed back by its backoff.
                await signals.wait("error", 1, timeout=10)
                assert await _delivered(receiver, 1)
                assert await _row_shows(conn, 1, "HTTP 500")
                # Two rounds later (a 500, then the 200) the event is delivered.
                await signals.wait("active", 1, timeout=10)
                assert await _delivered(receiver, 3)
                assert await _outbox_empty(conn)
            finally:
                sender.stop()
                await task
    finally:
        logger.remove(sink)
        await pool.close()

    assert len(receiver.deliveries) == 3
    first, second, third = receiver.deliveries
    assert first.event_id == second.event_id == third.event_id
    assert first.body == second.body == third.body
    assert json.loads(first.body)["status"] == "cancelled"
    # The id is in the signed body, equal to the header; the body is the stored event plus it.
    assert first.body_event_id() == first.event_id == queued["id"]
    assert json.loads(first.body) == {**json.loads(queued["event"]), "event_id": queued["id"]}
    assert len(receiver.deduplicated()) == 1
    # The signature is over exactly the bytes sent: re-signing them at the header's t gives
    # the header; the same bytes with another event_id do not verify.
    t = int(first.signature.split(",")[0].removeprefix("t="))
    assert sign(SECRET, first.body, t) == first.signature
    assert not verify_signature(
        SECRET, first.signature, replayed_as(first, first.event_id + 1), now=t
    )
    assert second.at - first.at >= 0.3 - 0.02
    assert third.at - second.at >= 0.6 - 0.02
    assert sender.delivered == 1 and sender.failed == 2
    text = "\n".join(lines)
    assert "HTTP 500" in text and "recovered" in text
    assert SECRET not in text and "querysecret" not in text


async def _delivered(receiver: Receiver, n: int) -> bool:
    return len(receiver.deliveries) >= n


async def _row_shows(conn: asyncpg.Connection, attempts: int, error: str) -> bool:
    row = await conn.fetchrow("SELECT attempts, last_error FROM listener.event_outbox")
    return row is not None and row["attempts"] == attempts and row["last_error"] == error


async def _outbox_empty(conn: asyncpg.Connection) -> bool:
    return await outbox_size(conn) == 0


async def test_cancel_emits_cancelled_events(
    database_url: str, conn: asyncpg.Connection, env_for_subprocess: dict[str, str]
) -> None:
    table = await make_table(conn)
    await conn.execute(f"INSERT INTO {table} (url) SELECT 'u' || g FROM generate_series(1, 3) g")
    assert await admit(conn) == 3
    await _enable_webhooks(database_url)
    listening = await Listening().start(database_url)
    try:
        await cli_async(env_for_subprocess, "cancel", "--table", table, "--json", ok=True)
        await listening.wait_heard(3, timeout=10)
    finally:
        await listening.close()
    jobs = await conn.fetch("SELECT id, source_id FROM listener.jobs ORDER BY id")
    assert sorted(listening.payloads, key=lambda p: p["job_id"]) == [
        {"table": table, "status": "cancelled", "job_id": j["id"]} for j in jobs
    ]
    # Webhooks carry the row id: their receiver is the operator's.
    queued = await conn.fetch("SELECT event FROM listener.event_outbox ORDER BY id")
    assert [json.loads(r["event"]) for r in queued] == [
        {"table": table, "row_id": j["source_id"], "status": "cancelled", "job_id": j["id"]}
        for j in jobs
    ]


async def test_trigger_fires_once_per_statement_and_only_for_terminal_changes(
    database_url: str, conn: asyncpg.Connection
) -> None:
    table = await make_table(conn)
    await conn.execute(f"INSERT INTO {table} (url) SELECT 'u' || g FROM generate_series(1, 100) g")
    assert await admit(conn) == 100
    listening = await Listening().start(database_url)
    try:
        # Not terminal: a claim-like change and a touch; the flag is off: no outbox row.
        await conn.execute("UPDATE listener.jobs SET status = 'processing' WHERE id <= 50")
        await conn.execute("UPDATE listener.jobs SET updated_at = now()")
        await listening.settle()
        assert listening.payloads == []
        # One statement finishing 100 jobs: one trigger call, 100 events. (A test's direct
        # write, to count calls; the daemon writes job state only through its JobStore.)
        async with conn.transaction():
            await conn.execute("SET LOCAL track_functions = 'all'")
            await conn.execute("UPDATE listener.jobs SET status = 'complete'")
            calls = await conn.fetchval(
                "SELECT calls FROM pg_stat_xact_user_functions "
                "WHERE schemaname = 'listener' AND funcname = 'emit_terminal_events'"
            )
        assert calls == 1
        # Complete again: no change of status, no event.
        await conn.execute("UPDATE listener.jobs SET status = 'complete' WHERE id <= 10")
        await listening.wait_heard(100, timeout=10)
        await asyncio.sleep(0.1)
        await listening.settle()
        assert len(listening.payloads) == 100
        assert await outbox_size(conn) == 0
    finally:
        await listening.close()


async def test_payload_stays_under_the_notify_limit(
    database_url: str, conn: asyncpg.Connection
) -> None:
    await conn.execute("CREATE TABLE public.docs (id text PRIMARY KEY, url text)")
    await conn.execute("SELECT listener.attach('public.docs', 'id', 'url')")
    await conn.execute("INSERT INTO public.docs VALUES (repeat('x', 9000), 'u'), ('short', 'u')")
    assert await admit(conn) == 2
    await _enable_webhooks(database_url)
    await conn.execute("UPDATE listener.event_settings SET notify_row_ids = true")
    listening = await Listening().start(database_url)
    try:
        pool = await asyncpg.create_pool(database_url, min_size=1, max_size=1)
        try:
            assert len(await PgJobStore(pool).cancel(JobFilter((), table="public.docs"))) == 2
        finally:
            await pool.close()
        await listening.wait_heard(2, timeout=10)
    finally:
        await listening.close()
    by_row = {p["row_id"]: p for p in listening.payloads}
    assert by_row["short"]["status"] == "cancelled"
    assert by_row[None]["row_id_too_long"] is True
    # The outbox has no such limit: the webhook gets the whole id.
    queued = await conn.fetch("SELECT event FROM listener.event_outbox")
    assert sorted(len(json.loads(r["event"])["row_id"]) for r in queued) == [5, 9000]


async def test_a_webhook_url_without_a_secret_is_refused_without_echoing_it(
    env_for_subprocess: dict[str, str], conn: asyncpg.Connection
) -> None:
    env = {
        **env_for_subprocess,
        "LISTENER_WEBHOOK_URL": "https://hooks.example.com/in?token=querysecret",
        "LISTENER_HEALTH_PORT": "0",
    }
    done = await cli_async(env, "run")
    out = done.stdout + done.stderr
    assert done.returncode == 2, out
    assert "LISTENER_WEBHOOK_SECRET" in out and "querysecret" not in out
    # Refused before enabling anything: no events are queued for it.
    assert not await conn.fetchval("SELECT webhooks FROM listener.event_settings")


async def test_a_role_without_rights_on_the_outbox_still_finishes_jobs(
    database_url: str, conn: asyncpg.Connection
) -> None:
    """The trigger queues as its owner: a writer with rights on listener.jobs only (an app
    role's trigger, say) does not fail for lack of rights on the outbox."""
    table = await make_table(conn)
    await conn.execute(f"INSERT INTO {table} (url) VALUES ('u1')")
    assert await admit(conn) == 1
    await _enable_webhooks(database_url)
    role = f"events_writer_{os.getpid()}"
    await conn.execute(f"CREATE ROLE {role}")
    try:
        await conn.execute(f"GRANT USAGE ON SCHEMA listener TO {role}")
        await conn.execute(f"GRANT SELECT, UPDATE ON listener.jobs TO {role}")
        async with conn.transaction():
            await conn.execute(f"SET LOCAL ROLE {role}")
            await conn.execute("UPDATE listener.jobs SET status = 'cancelled'")
        queued = await conn.fetchval("SELECT event FROM listener.event_outbox")
        assert json.loads(queued)["status"] == "cancelled"
    finally:
        await conn.execute("RESET ROLE")
        await conn.execute(f"DROP OWNED BY {role}")
        await conn.execute(f"DROP ROLE {role}")


async def test_an_app_role_with_no_rights_on_listener_inserts_and_gets_analyzed(
    database_url: str, conn: asyncpg.Connection
) -> None:
    """The app writes with a role of its own (Supabase's ``authenticated``, say): its inserts
    and URL changes fire listener's triggers (enqueue, counters, status outbox, events), which
    run as their owner, so the app needs no rights on the listener schema."""
    table = await make_table(conn, status=True)
    await _enable_webhooks(database_url)
    role = f"app_writer_{os.getpid()}"
    await conn.execute(f"CREATE ROLE {role}")
    try:
        await conn.execute(f"GRANT SELECT, INSERT, UPDATE ON {table} TO {role}")
        async with conn.transaction():
            await conn.execute(f"SET LOCAL ROLE {role}")
            await conn.execute(f"INSERT INTO {table} (url) VALUES ('u1'), ('u2')")
            await conn.execute(f"UPDATE {table} SET url = 'u3' WHERE url = 'u2'")
        # A daemon admits the rows: u2's row already has its job (u3).
        assert await admit(conn) == 2
        jobs = await conn.fetch("SELECT image_url, status FROM listener.jobs ORDER BY id")
        assert [(j["image_url"], j["status"]) for j in jobs] == [
            ("u1", "pending"),
            ("u3", "pending"),
        ]
        assert await conn.fetchval("SELECT count(*) FROM listener.status_outbox") == 2
    finally:
        await conn.execute("RESET ROLE")
        await conn.execute(f"DROP OWNED BY {role}")
        await conn.execute(f"DROP ROLE {role}")
