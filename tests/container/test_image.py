"""The image as users run it: the daemon beside Postgres, the CLI through the same image.

One scenario, in the order a user meets it, against an empty database of the session's
Postgres (reached over the host's network, as a database on the same machine would be) and
photos served over HTTP on 127.0.0.1 (allowed with ``LISTENER_FETCH__ALLOWED_HOSTS``):

1. ``podman run IMAGE`` (no arguments: ``listener run --migrate``) migrates and starts;
2. ``podman run IMAGE attach ...`` installs the triggers; rows inserted get analyzed and the
   app's status column reads ``complete``;
3. ``/healthz`` and ``/readyz`` answer 200, the image's HEALTHCHECK passes;
4. ``IMAGE migrate`` and ``IMAGE status --json`` work through the entrypoint;
5. ``podman stop`` (SIGTERM) with jobs in flight: the daemon exits 0 and leaves no job
   ``processing``.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import socket
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import pytest
from support import StaticServer, wait_until

from listener.analysis.providers.local import analyze_bytes
from listener.settings import FetchSettings, LocalSettings

DEMO_IMAGES = Path(__file__).resolve().parents[2] / "listener" / "demo_images"
PHOTOS = sorted(p.name for p in DEMO_IMAGES.iterdir() if p.suffix in (".png", ".jpg"))

pytestmark = pytest.mark.timeout(1800)


class Podman:
    """Runs podman commands (asynchronously: the photo server shares this event loop)."""

    def __init__(self, cmd: list[str], env: dict[str, str], image: str) -> None:
        self.cmd = cmd
        self.env = env
        self.image = image

    async def __call__(self, *args: str, timeout: float = 120.0) -> tuple[int, str]:
        """``podman ARGS``: (exit status, stdout and stderr together)."""
        proc = await asyncio.create_subprocess_exec(
            *self.cmd,
            *args,
            env=self.env,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        try:
            out, _ = await asyncio.wait_for(proc.communicate(), timeout)
        except TimeoutError:
            proc.kill()
            await proc.wait()
            raise
        assert proc.returncode is not None
        return proc.returncode, out.decode(errors="replace")

    async def listener(self, env: dict[str, str], *args: str) -> tuple[int, str]:
        """``podman run --rm IMAGE ARGS``: a one-off ``listener`` command through the image."""
        flags = [f"--env={key}={value}" for key, value in env.items()]
        return await self(
            "run", "--rm", "--network=host", "--no-healthcheck", *flags, self.image, *args
        )


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@pytest.fixture
async def empty_database(pg_admin_dsn: str, dsn_for: Callable[[str], str]) -> AsyncIterator[str]:
    """DSN of a new database with no listener schema (the image migrates it)."""
    name = f"c_{secrets.token_hex(8)}"
    admin = await asyncpg.connect(pg_admin_dsn)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    try:
        yield dsn_for(name)
    finally:
        admin = await asyncpg.connect(pg_admin_dsn)
        try:
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await admin.close()


async def _statuses(conn: asyncpg.Connection) -> dict[str | None, int]:
    rows = await conn.fetch("SELECT status, count(*) AS n FROM public.photos GROUP BY status")
    return {r["status"]: r["n"] for r in rows}


async def _jobs(conn: asyncpg.Connection) -> dict[str, int]:
    rows = await conn.fetch("SELECT status, count(*) AS n FROM listener.jobs GROUP BY status")
    return {r["status"]: r["n"] for r in rows}


async def test_the_image_analyzes_rows_answers_health_checks_and_stops_gracefully(
    image: str,
    podman_cmd: list[str],
    podman_env: dict[str, str],
    empty_database: str,
    tmp_path: Path,
) -> None:
    podman = Podman(podman_cmd, podman_env, image)
    inspected = json.loads((await podman("image", "inspect", image))[1])[0]
    config = inspected["Config"]
    assert config["Entrypoint"] == ["listener"]
    assert config["Cmd"] == ["run", "--migrate"]
    assert config["User"] == "listener"
    # Podman shows the Docker format's HEALTHCHECK beside the config; the OCI format drops it.
    check = inspected.get("Healthcheck") or config.get("Healthcheck") or {}
    assert "/healthz" in " ".join(check.get("Test", [])), "HEALTHCHECK was dropped"
    print(f"image size: {inspected['Size'] / 1e6:.0f} MB")

    health_port = _free_port()
    env = {"DATABASE_URL": empty_database}
    daemon_env = {
        **env,
        # Host networking: the health server shares the host's interfaces, so keep it on
        # loopback and on a free port.
        "LISTENER_HEALTH_HOST": "127.0.0.1",
        "LISTENER_HEALTH_PORT": str(health_port),
        "LISTENER_FETCH__ALLOWED_HOSTS": '["127.0.0.1"]',
        "LISTENER_POLL_INTERVAL_S": "0.5",
        "LISTENER_LOCAL__WORKERS": "2",
        # The faces step offline: its models must be in the image.
        "LISTENER_TIERS__FACES": "true",
    }
    name = f"listener-test-{secrets.token_hex(4)}"
    health = f"http://127.0.0.1:{health_port}"

    async with StaticServer(str(DEMO_IMAGES)) as photos, aiohttp.ClientSession() as http:
        started = time.monotonic()
        # The image's own command (`listener run --migrate`): no arguments after the image.
        # Timers disabled: this machine has no systemd to schedule them;
        # `podman healthcheck run` below runs the image's check on demand.
        status, out = await podman(
            "run",
            "--detach",
            f"--name={name}",
            "--network=host",
            "--health-interval=disable",
            *[f"--env={key}={value}" for key, value in daemon_env.items()],
            image,
        )
        assert status == 0, out
        try:
            await _wait_ready(podman, name, http, health)
            print(f"container start to /readyz 200: {time.monotonic() - started:.1f} s")
            await _scenario(podman, name, env, http, health, photos.base_url, empty_database)
        finally:
            _, logs = await podman("logs", name)
            (tmp_path / "daemon.log").write_text(logs)
            await podman("rm", "--force", name)
    _assert_json_logs(logs)


async def _wait_ready(podman: Podman, name: str, http: aiohttp.ClientSession, health: str) -> None:
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        _, state = await podman("inspect", "--format", "{{.State.Status}}", name)
        if state.strip() != "running":
            _, logs = await podman("logs", name)
            pytest.fail(f"the container is {state.strip()}:\n{logs[-4000:]}")
        try:
            async with http.get(f"{health}/readyz") as response:
                if response.status == 200:
                    return
        except aiohttp.ClientError:
            pass
        await asyncio.sleep(0.5)
    _, logs = await podman("logs", name)
    pytest.fail(f"/readyz never answered 200:\n{logs[-4000:]}")


async def _scenario(
    podman: Podman,
    name: str,
    env: dict[str, str],
    http: aiohttp.ClientSession,
    health: str,
    photos_url: str,
    dsn: str,
) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(
            "CREATE TABLE public.photos (id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,"
            " url text NOT NULL, status text)"
        )
        status, out = await podman.listener(
            env,
            "attach",
            "public.photos",
            "--id-column=id",
            "--url-column=url",
            "--status-column=status",
        )
        assert status == 0 and "attached" in out, out

        started = time.monotonic()
        for photo in PHOTOS:
            await conn.execute(
                "INSERT INTO public.photos (url) VALUES ($1)", f"{photos_url}/{photo}"
            )

        async def all_complete() -> bool:
            return await _statuses(conn) == {"complete": len(PHOTOS)}

        await wait_until(all_complete, timeout=180, interval=0.2)
        print(f"{len(PHOTOS)} photos analyzed in the container: {time.monotonic() - started:.1f} s")
        # The analysis inside the image is the one the unit tests check on this machine.
        rows = await conn.fetch(
            "SELECT p.url, r.output->>'phash' AS phash FROM public.photos p"
            " JOIN listener.jobs j ON j.source_id = p.id::text"
            " JOIN listener.results r ON r.job_id = j.id WHERE r.output ? 'phash'"
        )
        found = {row["url"].rsplit("/", 1)[1]: row["phash"] for row in rows}
        assert found == {photo: _local_phash(photo) for photo in PHOTOS}
        # Faces offline, in the image: the three photographs of one man are one person.
        people = await conn.fetch(
            "SELECT f.person_id, array_agg(p.url ORDER BY p.url) AS urls FROM listener.faces f"
            " JOIN public.photos p ON p.id::text = f.source_id"
            " WHERE f.person_id IS NOT NULL GROUP BY f.person_id"
        )
        assert [[u.rsplit("/", 1)[1] for u in r["urls"]] for r in people] == [
            ["obama_1.jpg", "obama_2.jpg", "obama_3.jpg"]
        ], people

        for path in ("/healthz", "/readyz"):
            async with http.get(f"{health}{path}") as response:
                assert response.status == 200, (path, await response.text())
        status, out = await podman("healthcheck", "run", name)
        assert status == 0, f"HEALTHCHECK failed: {out}"

        status, out = await podman.listener(env, "migrate")
        assert status == 0 and "schema is up to date" in out, out
        status, out = await podman.listener(env, "status", "--json")
        assert status == 0, out
        doc: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
        assert doc["complete"] == len(PHOTOS) and doc["processing"] == 0, doc

        # Jobs in flight when SIGTERM arrives: finished or handed back, none left processing.
        for photo in PHOTOS:
            await conn.execute(
                "INSERT INTO public.photos (url) VALUES ($1)", f"{photos_url}/{photo}"
            )
        stopping = time.monotonic()
        status, out = await podman("stop", "--time=60", name, timeout=90)
        assert status == 0, out
        print(f"podman stop: {time.monotonic() - stopping:.1f} s")
        _, code = await podman("inspect", "--format", "{{.State.ExitCode}}", name)
        assert code.strip() == "0", f"the daemon exited {code.strip()} on SIGTERM"
        jobs = await _jobs(conn)
        assert jobs.get("processing", 0) == 0, jobs
        assert sum(jobs.values()) == 2 * len(PHOTOS), jobs
    finally:
        await conn.close()


def _local_phash(photo: str) -> str:
    """The perceptual hash this process's local analysis gives ``photo``."""
    result = analyze_bytes(
        (DEMO_IMAGES / photo).read_bytes(),
        max_side=LocalSettings().analysis_max_side,
        max_pixels=FetchSettings().max_pixels,
    )
    phash: str = result["phash"]
    return phash


def _assert_json_logs(logs: str) -> None:
    """Every line the daemon logged is a JSON object; the shutdown was logged."""
    lines = [line for line in logs.splitlines() if line.strip()]
    assert lines, "the daemon logged nothing"
    records = []
    for line in lines:
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            pytest.fail(f"a log line is not JSON: {line[:300]}")
    text = json.dumps(records)
    assert "signal received: stopping gracefully" in text
