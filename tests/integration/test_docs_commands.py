"""The walk-throughs of docs/ run as documented, against a real database.

Every block marked ``<!-- tested -->`` (``tests/docs_blocks.py``) is run, a page's blocks in
order, against a fresh database of its own (not migrated: the walk-through's ``listener
migrate`` does it) holding the table the walk-throughs attach, ``public.vehicle_images``, with
three rows from before. ``export DATABASE_URL=...`` points at that database instead of the
documented one; every ``listener`` command must exit 0 and print the lines the page shows
after it. ``listener run`` is started in the background: once it runs, a row is inserted, and
the daemon must analyze it (and every job enqueued before) before SIGTERM stops it, exit
status 0.

What the walk-throughs leave out, since it is about this test's machine: the photos are served
from 127.0.0.1, so the daemon may fetch from there (``LISTENER_FETCH__ALLOWED_HOSTS``), and
its health server takes a free port.
"""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import asyncpg
import pytest
from docs_blocks import Block, Command, commands, marked_blocks, shows
from support import StaticServer, cli_async, wait_until

PHOTOS = ["brick.png", "camera.png", "astronaut.png", "coffee.png"]
PAGES = sorted({block.page for block in marked_blocks()})
MACHINE = {
    "LISTENER_FETCH__ALLOWED_HOSTS": '["127.0.0.1"]',
    "LISTENER_HEALTH_PORT": "0",
    "LISTENER_POLL_INTERVAL_S": "0.2",
}


def test_the_walk_throughs_are_marked() -> None:
    assert {p.name for p in PAGES} >= {"getting-started.md", "attaching.md"}


@pytest.fixture
async def fresh_database(pg_admin_dsn: str, dsn_for: Callable[[str], str]) -> AsyncIterator[str]:
    """DSN of a new, empty database (no listener schema), dropped after the test."""
    name = f"docs_{secrets.token_hex(6)}"
    admin = await asyncpg.connect(pg_admin_dsn)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
        try:
            yield dsn_for(name)
        finally:
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await admin.close()


@pytest.mark.parametrize("page", PAGES, ids=[p.name for p in PAGES])
async def test_a_walk_through_runs_as_documented(
    page: Path, fresh_database: str, photos: StaticServer, tmp_path: Path
) -> None:
    conn = await asyncpg.connect(fresh_database)
    try:
        await conn.execute(
            "CREATE TABLE public.vehicle_images (id bigint GENERATED ALWAYS AS IDENTITY "
            "PRIMARY KEY, vehicle_id uuid NOT NULL, image_url text NOT NULL, "
            "processing_status text)"
        )
        for photo in PHOTOS[:3]:
            await insert(conn, f"{photos.base_url}/{photo}")
        env = {k: v for k, v in os.environ.items() if "DATABASE_URL" not in k}
        env.update(MACHINE)
        daemons: list[tuple[subprocess.Popen[bytes], Path]] = []
        try:
            for block in marked_blocks():
                if block.page != page:
                    continue
                for command in commands(block):
                    await run(block, command, env, fresh_database, daemons, tmp_path)
            assert daemons, f"{page.name}: the walk-through starts no daemon"
            # The daemon analyzes a row inserted now, and whatever was enqueued before.
            new = await insert(conn, f"{photos.base_url}/{PHOTOS[3]}")
            await wait_until(lambda: analyzed(conn, new), timeout=60)
        finally:
            for proc, _ in daemons:
                if proc.poll() is None:
                    proc.terminate()
                    try:
                        proc.wait(20)
                    except subprocess.TimeoutExpired:
                        proc.kill()
                        proc.wait()
        for proc, log in daemons:
            assert proc.returncode == 0, log.read_text()
    finally:
        await conn.close()


async def run(
    block: Block,
    command: Command,
    env: dict[str, str],
    database: str,
    daemons: list[tuple[subprocess.Popen[bytes], Path]],
    tmp_path: Path,
) -> None:
    """Run one documented command as a shell would, in ``env``; check what it prints.

    ``export`` sets variables of ``env`` (``DATABASE_URL``: ``database``); ``listener run`` is
    started in the background and added to ``daemons``, its output logged in ``tmp_path``.
    """
    argv = command.argv
    where = f"{block}: {' '.join(argv)}"
    if argv[0] == "export":
        for assignment in argv[1:]:
            name, _, value = assignment.partition("=")
            env[name] = database if name == "DATABASE_URL" else value
        return
    assert argv[0] == "listener", f"{where}: only listener and export are run"
    if argv[1:] == ["run"]:
        log = tmp_path / f"run-{len(daemons)}.log"
        with log.open("wb") as out:
            proc = subprocess.Popen(
                [sys.executable, "-m", "listener", "run"],
                env={**env, "COLUMNS": "200", "NO_COLOR": "1"},
                cwd=tmp_path,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        daemons.append((proc, log))

        async def started() -> bool:
            assert proc.poll() is None, f"{where} exited:\n{log.read_text()}"
            return "listener running" in log.read_text()

        await wait_until(started, timeout=60, interval=0.1)
        printed = log.read_text()
    else:
        # As wide as the documented tables: Rich cuts no cell.
        result = await cli_async(env, *argv[1:], columns=200, cwd=tmp_path)
        printed = result.stdout + result.stderr
        assert result.returncode == 0, f"{where} exited {result.returncode}:\n{printed}"
    for line in command.shown:
        assert shows(printed, line), f"{where} did not print {line!r}; it printed:\n{printed}"


async def insert(conn: asyncpg.Connection, url: str) -> int:
    """Insert a row as the app does; its id."""
    return int(
        await conn.fetchval(
            "INSERT INTO public.vehicle_images (vehicle_id, image_url) VALUES ($1, $2) "
            "RETURNING id",
            uuid.UUID(int=7),
            url,
        )
    )


async def analyzed(conn: asyncpg.Connection, row: int) -> bool:
    """Row ``row`` is analyzed and no job is left unfinished."""
    done = await conn.fetchval(
        "SELECT status = 'complete' FROM listener.jobs WHERE source_id = $1", str(row)
    )
    unfinished = await conn.fetchval(
        "SELECT count(*) FROM listener.jobs WHERE status IN ('pending', 'processing', 'batched')"
    )
    return bool(done) and unfinished == 0
