"""The daemon against hostile images: each bad row fails alone, the daemon keeps serving.

Rows point at an HTTP server on 127.0.0.1 that serves real photos next to files built to
stall a header parser (millions of JPEG segments or PNG chunks), to take gigabytes once
decoded (8000x8000 16-bit RGBA in 500 KB), or that are no image at all. The test watches
three things while the daemon works: the event loop (a heartbeat task must keep ticking),
``/readyz`` (polled throughout, must answer 200) and the process's peak resident memory
(``VmHWM`` of /proc/self/status, proc(5)).
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import PIL.Image
import pytest
from awaiting import jobs_finished
from hostile_images import (
    app1_bomb_jpeg,
    chunk_bomb_png,
    comment_bomb_gif,
    rgba16_8k_png,
    rgba_8k_png,
)
from support import beat, fast_settings, make_table, serve_photos

from listener.app import Daemon
from listener.cli.demo import BUNDLED_IMAGES
from listener.settings import MB, FetchSettings, LocalSettings


def peak_rss_mb() -> float:
    """This process's peak resident set size (VmHWM), in MB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmHWM in /proc/self/status")


@pytest.fixture
async def hostile_server(tmp_path: Path) -> AsyncIterator[str]:
    jpeg = (BUNDLED_IMAGES / "rocket.jpg").read_bytes()
    files = {
        "app1-bomb.jpg": app1_bomb_jpeg(1_000_000),  # 4 MB; 5 M segments made 19 MiB
        "chunk-bomb.png": chunk_bomb_png(500_000),
        "comment-bomb.gif": comment_bomb_gif(500_000),
        "rgba16-8k.png": rgba16_8k_png(),
        "rgba-8k.png": rgba_8k_png(),
        "truncated.jpg": jpeg[: len(jpeg) // 2],
        "page.jpg": b"<!DOCTYPE html><html><body>Sign in</body></html>",
        "noise.jpg": bytes(range(256)) * 64,
    }
    bundled = ("astronaut.png", "rocket.jpg", "coffee.png")
    async with serve_photos(tmp_path, *bundled, files=files) as server:
        yield server.base_url


@pytest.fixture
def image_opens(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[int]]:
    """The thread ident of every ``PIL.Image.open`` call in this process."""
    calls: list[int] = []
    real_open = PIL.Image.open

    def counting_open(*args: Any, **kwargs: Any) -> PIL.Image.Image:
        calls.append(threading.get_ident())
        return real_open(*args, **kwargs)

    monkeypatch.setattr(PIL.Image, "open", counting_open)
    yield calls


@pytest.mark.timeout(300)
async def test_hostile_images_fail_alone_and_the_daemon_keeps_serving(
    database_url: str, hostile_server: str, image_opens: list[int]
) -> None:
    base = hostile_server
    good = {"astronaut": "astronaut.png", "rocket": "rocket.jpg", "big": "rgba-8k.png"}
    bad = {
        **{f"app1-bomb-{i}": "app1-bomb.jpg" for i in range(4)},
        "chunk-bomb": "chunk-bomb.png",
        "comment-bomb": "comment-bomb.gif",
        "rgba16": "rgba16-8k.png",
        "truncated": "truncated.jpg",
        "html": "page.jpg",
        "noise": "noise.jpg",
    }
    reasons = {
        **{f"app1-bomb-{i}": "more than 1024 JPEG segments" for i in range(4)},
        "chunk-bomb": "more than 1024 PNG chunks",
        "comment-bomb": "more than 1024 GIF extension blocks",
        "rgba16": "8000x8000 pixels of mode RGBA at 8 bytes per pixel = 512000000 bytes",
        "truncated": "truncated",
        "html": "looks like HTML",
        "noise": "is binary data of an unknown format",
    }
    settings = fast_settings(
        database_url,
        concurrency=8,
        fetch=FetchSettings(allowed_hosts=["127.0.0.1"], max_bytes=8 * MB),
        local=LocalSettings(workers=2),
    )
    gaps: list[float] = []
    ready: list[tuple[int, float]] = []

    async def poll_readyz(url: str) -> None:
        async with aiohttp.ClientSession() as http:
            while True:
                started = time.perf_counter()
                async with http.get(url, timeout=aiohttp.ClientTimeout(total=10)) as answer:
                    ready.append((answer.status, time.perf_counter() - started))
                await asyncio.sleep(0.05)

    conn = await asyncpg.connect(database_url)
    try:
        table = await make_table(conn, status=True)
        async with Daemon(settings) as daemon:
            assert daemon.health is not None
            # Ready once LISTENing; from then on it must stay ready through the hostile rows.
            await daemon.signals.wait("listening", 1)
            rss_before = peak_rss_mb()
            watchers = [
                asyncio.create_task(beat(gaps)),
                asyncio.create_task(poll_readyz(f"{daemon.health.url}/readyz")),
            ]
            try:
                for key, name in {**bad, **good}.items():
                    await conn.execute(
                        f"INSERT INTO {table} (url, owner_id) VALUES ($1, $2)",
                        f"{base}/{name}",
                        key,
                    )
                await jobs_finished(daemon, conn, len(bad) + len(good), timeout=240)
            finally:
                for watcher in watchers:
                    watcher.cancel()
            rss_after = peak_rss_mb()
        found = {
            r["owner_id"]: r
            for r in await conn.fetch(
                f"SELECT i.owner_id, j.status, j.attempts, j.last_error, r.output FROM {table} i "
                "JOIN listener.jobs j ON j.source_id = i.id::text "
                "LEFT JOIN listener.results r ON r.job_id = j.id"
            )
        }
    finally:
        await conn.close()

    print(
        f"peak RSS {rss_before:.0f} -> {rss_after:.0f} MB; longest loop gap {max(gaps):.3f} s; "
        f"/readyz answered {len(ready)} times, slowest {max(t for _, t in ready):.3f} s"
    )
    for key in good:
        assert found[key]["status"] == "complete", (key, found[key]["last_error"])
    big = json.loads(found["big"]["output"])
    assert (big["width"], big["height"], big["mode"]) == (8000, 8000, "RGBA")
    for key, reason in reasons.items():
        job = found[key]
        assert job["status"] == "failed", (key, job["last_error"])
        assert job["attempts"] == 1, (key, job["last_error"])
        assert reason in job["last_error"], (key, job["last_error"])
    assert gaps and max(gaps) < 2.0, f"the event loop stalled for {max(gaps):.2f} s"
    assert len(ready) >= 5 and {status for status, _ in ready} == {200}
    assert rss_after - rss_before < 300, f"peak RSS grew from {rss_before} to {rss_after} MB"
    # Headers are read once per fetched image, never on the event loop's thread.
    assert threading.get_ident() not in image_opens
    assert len(image_opens) <= len(bad) + len(good)
