"""``WebhookSender`` POSTs a whole round at once, however large ``concurrency`` is.

A receiver that takes its time (here: until every POST of the round has arrived) sees each
round's events in flight together; with aiohttp's default connector (100 connections) a
round of 150 was sent in two waves, so a slow receiver got at most 100 / its answer time
events a second whatever ``LISTENER_WEBHOOK_CONCURRENCY`` said.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

from aiohttp import web

from listener.app_side.webhooks import WebhookSender
from listener.db.queries import OutboxEvent


class Outbox:
    """The four outbox queries of ``Queries`` the sender uses, over a list."""

    def __init__(self, n: int) -> None:
        self.due = [OutboxEvent(i, f'{{"status":"complete","job_id":{i}}}', 1) for i in range(n)]
        self.delivered: list[int] = []
        self.failed: list[Any] = []

    async def events_due(self) -> bool:
        return bool(self.due)

    async def claim_events(self, limit: int, lease_s: float) -> list[OutboxEvent]:
        claimed, self.due = self.due[:limit], self.due[limit:]
        return claimed

    async def events_delivered(self, ids: Sequence[int]) -> None:
        self.delivered += ids

    async def events_failed(self, failed: Sequence[Any]) -> None:
        self.failed += failed


async def test_a_round_of_150_is_in_flight_at_once() -> None:
    round_size = 150
    in_flight = 0
    most = 0
    everyone = asyncio.Event()

    async def hook(request: web.Request) -> web.Response:
        nonlocal in_flight, most
        await request.read()
        in_flight += 1
        most = max(most, in_flight)
        if in_flight == round_size:
            everyone.set()
        try:
            # Answer once the whole round has arrived, or after 2 s when it never does.
            await asyncio.wait_for(everyone.wait(), 2.0)
        except TimeoutError:
            pass
        finally:
            in_flight -= 1
        return web.Response(status=204)

    app = web.Application()
    app.router.add_post("/hook", hook)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, backlog=512)
    await site.start()
    port = runner.addresses[0][1]
    try:
        outbox = Outbox(round_size)
        sender = WebhookSender(
            outbox,  # type: ignore[arg-type]
            f"http://127.0.0.1:{port}/hook",
            "secret",
            concurrency=round_size,
            timeout_s=10.0,
        )
        assert await sender.tick() == round_size
    finally:
        await runner.cleanup()
    assert sorted(outbox.delivered) == list(range(round_size)) and not outbox.failed
    assert most == round_size
