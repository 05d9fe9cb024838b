"""Preparing a batch: its images are fetched concurrently, no more than the file can take, and
the requests that do not fit wait for the next batch without their images being fetched again.
Real Postgres, the OpenAI fake through the real SDK."""

from __future__ import annotations

import asyncio
import base64
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack

import asyncpg
import pytest
from aiohttp import web
from awaiting import jobs_finished
from support import counts, serving
from test_batch import backfill_batch, batch_settings, load_rows

from listener.app import Daemon
from listener.cli.demo import BUNDLED_IMAGES
from listener.settings import BatchSettings, TierSettings
from listener.testing.openai_fake import FakeOpenAI


class Photos:
    """Serves rocket.jpg at every path and counts fetches per URL. A URL's first fetch is the
    worker's (before it parks the job); the later ones are the batch manager's, which take
    ``delay_s`` each and are counted in flight (``most_at_once``)."""

    def __init__(self, delay_s: float) -> None:
        self.data = (BUNDLED_IMAGES / "rocket.jpg").read_bytes()
        self.delay_s = delay_s
        self.base_url = ""
        self.seen: Counter[str] = Counter()
        self.in_flight = 0
        self.most_at_once = 0
        self._stack = AsyncExitStack()

    async def _image(self, request: web.Request) -> web.Response:
        url = str(request.rel_url)
        self.seen[url] += 1
        if self.seen[url] > 1:
            self.in_flight += 1
            self.most_at_once = max(self.most_at_once, self.in_flight)
            try:
                await asyncio.sleep(self.delay_s)
            finally:
                self.in_flight -= 1
        return web.Response(body=self.data, content_type="image/jpeg")

    async def __aenter__(self) -> Photos:
        app = web.Application()
        app.router.add_get("/{name:.*}", self._image)
        self.base_url = await self._stack.enter_async_context(
            serving(app, access_log=None, shutdown_timeout=0.5)
        )
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._stack.aclose()


@pytest.fixture
async def photos() -> AsyncIterator[Photos]:
    async with Photos(delay_s=0.2) as server:
        yield server


async def test_preparation_fetches_concurrently_and_what_does_not_fit_waits_once(
    database_url: str, conn: asyncpg.Connection, photos: Photos
) -> None:
    n = 12
    table = await load_rows(conn, photos.base_url, n)
    # Each request carries the image inline (base64) plus a few kB of prompt and schema: the
    # file takes three of them, so the twelve go in four batches.
    image_b64 = len(base64.b64encode(photos.data))
    max_bytes = 3 * (image_b64 + 20_000)
    async with FakeOpenAI() as fake:
        fake.batch_duration_s = 0.3
        settings = batch_settings(
            database_url,
            fake,
            tiers=TierSettings(tier1=["openai"]),
            batch=BatchSettings(
                min_requests=n,
                max_wait_s=0.3,
                poll_interval_s=0.2,
                max_bytes=max_bytes,
                fetch_concurrency=4,
            ),
        )
        async with Daemon(settings) as daemon:
            assert await backfill_batch(database_url, table) == n
            await jobs_finished(daemon, conn, n, timeout=90)
        realtime = len(fake.requests)
    assert await counts(conn) == {"complete": n}
    assert realtime == 0
    # The batch manager fetched several images at once.
    assert photos.most_at_once > 1
    # Each image was fetched once by the worker and once for its batch: the requests that did
    # not fit a file waited for the next one without their images being fetched again.
    assert set(photos.seen.values()) == {2}, photos.seen
    batches = await conn.fetch("SELECT status, requests FROM listener.batches ORDER BY created_at")
    assert len(batches) >= 4
    assert all(b["status"] == "completed" and b["requests"] <= 3 for b in batches)
    assert sum(b["requests"] for b in batches) == n
    # Every request was in one batch, and its result landed once.
    assert await conn.fetchval("SELECT count(DISTINCT job_id) FROM listener.batch_requests") == n
    assert await conn.fetchval("SELECT count(*) FROM listener.batch_requests") == n
    results = await conn.fetch("SELECT job_id, count(*) AS n FROM listener.results GROUP BY job_id")
    assert len(results) == n and {r["n"] for r in results} == {1}
