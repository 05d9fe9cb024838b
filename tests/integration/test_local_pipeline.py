"""The default pipeline on real photographs: fetch over HTTP, local analysis, bad inputs."""

from __future__ import annotations

import io
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import pytest
from awaiting import jobs_finished
from PIL import Image
from support import fast_settings, make_table, serve_photos

from listener.app import Daemon
from listener.cli.demo import BUNDLED_IMAGES


@pytest.fixture
async def photo_server(tmp_path: Path) -> AsyncIterator[str]:
    """Serves real photos and broken files on 127.0.0.1."""
    jpeg = (BUNDLED_IMAGES / "rocket.jpg").read_bytes()
    bomb = io.BytesIO()
    Image.new("1", (20_000, 20_000)).save(bomb, format="PNG")
    files = {
        "truncated.jpg": jpeg[: len(jpeg) // 2],
        "empty.jpg": b"",
        "page.jpg": b"<!DOCTYPE html><html><body>Login</body></html>",
        "bomb.png": bomb.getvalue(),
    }
    bundled = ("astronaut.png", "rocket.jpg", "coffee.png")
    async with serve_photos(tmp_path, *bundled, files=files) as server:
        yield server.base_url


async def test_photos_analyzed_and_bad_rows_fail_alone(
    database_url: str, photo_server: str
) -> None:
    conn = await asyncpg.connect(database_url)
    try:
        table = await make_table(conn, status=True)
        base = photo_server
        rows: dict[str, str | None] = {
            "astronaut": f"{base}/astronaut.png",
            "rocket": f"{base}/rocket.jpg",
            "missing": f"{base}/missing.jpg",
            "html": f"{base}/page.jpg",
            "truncated": f"{base}/truncated.jpg",
            "empty": f"{base}/empty.jpg",
            "bomb": f"{base}/bomb.png",
            "null": None,
            "spaces": f"{base}/my photo.jpg",
            "unicode": f"{base}/фото-č.jpg",
            "metadata": "http://169.254.169.254/latest/meta-data/iam",
            "private": "http://10.1.2.3/a.jpg",
            # Loopback, but not the allowed 127.0.0.1: refused before any connection.
            "loopback": f"http://127.0.0.2:{base.rsplit(':', 1)[1]}/astronaut.png",
        }
        settings = fast_settings(database_url, concurrency=4)
        async with Daemon(settings) as daemon:
            for key, url in rows.items():
                await conn.execute(f"INSERT INTO {table} (url, owner_id) VALUES ($1, $2)", url, key)
            await jobs_finished(daemon, conn, len(rows), timeout=60)
            # The daemon keeps going after all of that.
            await conn.execute(
                f"INSERT INTO {table} (url, owner_id) VALUES ($1, 'after')", f"{base}/coffee.png"
            )
            await jobs_finished(daemon, conn, len(rows) + 1, timeout=30)
            assert daemon.worker is not None and daemon.worker.in_flight == 0
        found = {
            r["owner_id"]: r
            for r in await conn.fetch(
                f"SELECT i.owner_id, i.status AS row_status, j.status, j.attempts, "
                f"j.last_error, r.output FROM {table} i "
                "JOIN listener.jobs j ON j.source_id = i.id::text "
                "LEFT JOIN listener.results r ON r.job_id = j.id"
            )
        }
    finally:
        await conn.close()

    import json

    for key in ("astronaut", "rocket", "after"):
        assert found[key]["status"] == "complete", found[key]["last_error"]
        assert found[key]["row_status"] == "complete"
    astronaut = json.loads(found["astronaut"]["output"])
    assert (astronaut["width"], astronaut["height"], astronaut["format"]) == (512, 512, "PNG")
    assert astronaut["faces"]["count"] >= 1
    assert 0 <= astronaut["quality"] <= 10 and len(astronaut["phash"]) == 16

    expected_reasons = {
        "missing": "404",
        "html": "HTML",
        "truncated": "truncated",
        "empty": "empty",
        "bomb": "pixels",
        "null": "image URL is NULL",
        "spaces": "whitespace",
        "unicode": "404",
        "metadata": "169.254.169.254",
        "private": "10.1.2.3",
        "loopback": "loopback",
    }
    for key, reason in expected_reasons.items():
        job = found[key]
        assert job["status"] == "failed", (key, job["last_error"])
        assert job["row_status"] == "failed"
        assert job["attempts"] == 1, (key, job["last_error"])
        assert reason.lower() in job["last_error"].lower(), (key, job["last_error"])
