"""The walk-throughs of docs/ run as documented, against a real database.

Every block marked ``<!-- tested -->`` (``tests/docs_blocks.py``) is run, a page's blocks in
order, against a fresh database of its own (not migrated: the walk-through's ``listener
migrate`` does it) holding the table the walk-throughs attach, ``public.vehicle_images``, with
three rows from before. A shell would run them the same way:

- ``export NAME=value ...`` sets variables for the commands after it; ``DATABASE_URL`` points
  at that database instead of the documented one.
- ``listener ...`` must exit 0 and print the lines the page shows after it (``console``).
- ``python -m listener.testing.<name>_fake --port N &`` starts a fake in the background; it
  takes a free port instead of ``N``, and ``127.0.0.1:N`` in the commands after it becomes
  that port.
- ``listener run`` is started in the background. Once it runs, a row is inserted, and the
  daemon must analyze it (and every job enqueued before) before SIGTERM stops it, exit status
  0; with ``LISTENER_PIPELINE=tiered`` the row's results must include an OpenAI and a
  Rekognition step (the daemon called the fakes, not only the local provider).

What the walk-throughs leave out, since it is about this test's machine: the photos are served
from 127.0.0.1, so the daemon may fetch from there (``LISTENER_FETCH__ALLOWED_HOSTS``), and
its health server takes a free port.
"""

from __future__ import annotations

import os
import secrets
import socket
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
    assert {p.name for p in PAGES} >= {"getting-started.md", "attaching.md", "testing.md"}


def test_the_readme_shows_the_tested_attach_and_run() -> None:
    """README.md, the front door, repeats the attaching guide's walk-through word for word."""
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text(encoding="utf-8")
    section = readme.split("## Attach and run", 1)[1]
    shown = section.split("```sh\n", 1)[1].split("```", 1)[0]
    [attaching] = [b for b in marked_blocks() if b.page.name == "attaching.md"]
    assert shown == attaching.body


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
    walk = WalkThrough(fresh_database, tmp_path)
    try:
        await conn.execute(
            "CREATE TABLE public.vehicle_images (id bigint GENERATED ALWAYS AS IDENTITY "
            "PRIMARY KEY, vehicle_id uuid NOT NULL, image_url text NOT NULL, "
            "processing_status text)"
        )
        for photo in PHOTOS[:3]:
            await insert(conn, f"{photos.base_url}/{photo}")
        for block in marked_blocks():
            if block.page == page:
                for command in commands(block):
                    await walk.run(block, command)
        assert walk.daemons, f"{page.name}: the walk-through starts no daemon"
        # The daemon analyzes a row inserted now, and whatever was enqueued before.
        new = await insert(conn, f"{photos.base_url}/{PHOTOS[3]}")
        await wait_until(lambda: analyzed(conn, new), timeout=60)
        if walk.env.get("LISTENER_PIPELINE") == "tiered":
            steps = await conn.fetchval(
                "SELECT array_agg(r.step) FROM listener.results r JOIN listener.jobs j "
                "ON j.id = r.job_id WHERE j.source_id = $1",
                str(new),
            )
            assert {s.split(".")[0] for s in steps} >= {"openai", "rekognition"}, steps
    finally:
        walk.stop()
        await conn.close()
    for proc, log in walk.daemons:
        assert proc.returncode == 0, log.read_text()


class WalkThrough:
    """Runs a page's commands, one after the other, as a shell would: see the module's
    docstring."""

    def __init__(self, database: str, tmp_path: Path) -> None:
        self.database = database
        self.tmp_path = tmp_path
        self.env = {k: v for k, v in os.environ.items() if "DATABASE_URL" not in k}
        self.env.update(MACHINE)
        self.ports: dict[str, str] = {}
        self.daemons: list[tuple[subprocess.Popen[bytes], Path]] = []
        self.fakes: list[subprocess.Popen[bytes]] = []

    async def run(self, block: Block, command: Command) -> None:
        """Run one documented command; check what it prints."""
        argv = [self._ported(arg) for arg in command.argv]
        where = f"{block}: {' '.join(argv)}"
        if argv[0] == "export":
            for assignment in argv[1:]:
                name, _, value = assignment.partition("=")
                self.env[name] = self.database if name == "DATABASE_URL" else value
            return
        if argv[0] == "python" and argv[-1] == "&":
            assert argv[1:3] == ["-m", argv[2]], f"{where}: not python -m"
            assert argv[2].startswith("listener.testing."), f"{where}: not a fake"
            await self._start_fake(argv[1:-1], where)
            return
        assert argv[0] == "listener", f"{where}: only listener, export and fakes are run"
        if argv[1:] == ["run"]:
            printed = await self._start_daemon(where)
        else:
            # As wide as the documented tables: Rich cuts no cell.
            result = await cli_async(self.env, *argv[1:], columns=200, cwd=self.tmp_path)
            printed = result.stdout + result.stderr
            assert result.returncode == 0, f"{where} exited {result.returncode}:\n{printed}"
        for line in command.shown:
            assert shows(printed, line), f"{where} did not print {line!r}; it printed:\n{printed}"

    def _ported(self, text: str) -> str:
        for documented, free in self.ports.items():
            text = text.replace(f"127.0.0.1:{documented}", f"127.0.0.1:{free}")
        return text

    async def _start_fake(self, module_and_options: list[str], where: str) -> None:
        options = module_and_options[2:]
        if "--port" in options:
            at = options.index("--port") + 1
            with socket.socket() as probe:
                probe.bind(("127.0.0.1", 0))
                self.ports[options[at]] = options[at] = str(probe.getsockname()[1])
        log = self.tmp_path / f"fake-{len(self.fakes)}.log"
        with log.open("wb") as out:
            proc = subprocess.Popen(
                [sys.executable, *module_and_options[:2], *options],
                env=self.env,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        self.fakes.append(proc)

        async def ready() -> bool:
            assert proc.poll() is None, f"{where} exited:\n{log.read_text()}"
            return "READY " in log.read_text()

        await wait_until(ready, timeout=30, interval=0.1)

    async def _start_daemon(self, where: str) -> str:
        log = self.tmp_path / f"run-{len(self.daemons)}.log"
        with log.open("wb") as out:
            proc = subprocess.Popen(
                [sys.executable, "-m", "listener", "run"],
                env={**self.env, "COLUMNS": "200", "NO_COLOR": "1"},
                cwd=self.tmp_path,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        self.daemons.append((proc, log))

        async def started() -> bool:
            assert proc.poll() is None, f"{where} exited:\n{log.read_text()}"
            return "listener running" in log.read_text()

        await wait_until(started, timeout=60, interval=0.1)
        return log.read_text()

    def stop(self) -> None:
        """SIGTERM the daemons (and wait for them), then the fakes."""
        for proc, _ in self.daemons:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(20)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        for fake in self.fakes:
            fake.terminate()
            fake.wait()


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
