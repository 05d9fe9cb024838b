"""Helpers shared by the tests: settings for fast tests, attached tables, fake providers,
local HTTP servers (photos, any aiohttp app), the ``listener`` command line and
``listener run`` as subprocesses."""

from __future__ import annotations

import asyncio
import random
import shutil
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping
from contextlib import AsyncExitStack, asynccontextmanager, contextmanager, suppress
from pathlib import Path
from typing import TYPE_CHECKING, Any

import asyncpg
import pytest
from aiohttp import web

from listener.analysis.providers.base import ImageInput, StepContext, StepResult
from listener.errors import ListenerError
from listener.settings import (
    FetchSettings,
    RateLimit,
    RekognitionSettings,
    Settings,
    TierSettings,
)

if TYPE_CHECKING:
    from listener.testing.openai_fake import Fault
    from listener.testing.rekognition_fake import FakeRekognition


def fast_settings(dsn: str, **overrides: Any) -> Settings:
    """Settings with short timers so tests finish in seconds, health on a free port."""
    values: dict[str, Any] = {
        "database_url": dsn,
        "health_port": 0,
        "health_host": "127.0.0.1",
        "poll_interval_s": 0.2,
        "probe_interval_s": 0.5,
        "reconnect_base_s": 0.05,
        "reconnect_cap_s": 0.5,
        "backoff_base_s": 0.05,
        "backoff_cap_s": 0.2,
        "lease_s": 3.0,
        "shutdown_grace_s": 2.0,
        "pool_min_size": 1,
        "pool_max_size": 4,
        "fetch": FetchSettings(allowed_hosts=["127.0.0.1"]),
    }
    values.update(overrides)
    return Settings(**values)


async def make_table(
    conn: asyncpg.Connection,
    name: str = "images",
    *,
    owner: bool = False,
    status: bool = False,
    attach: bool = True,
) -> str:
    """Create ``public.<name>(id bigint identity, url text, owner_id text, status text)``."""
    await conn.execute(
        f"CREATE TABLE public.{name} (id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY, "
        "url text, owner_id text, status text)"
    )
    if attach:
        await conn.execute(
            "SELECT listener.attach($1, 'id', 'url', $2, $3)",
            f"public.{name}",
            "owner_id" if owner else None,
            "status" if status else None,
        )
    return f"public.{name}"


async def admit(conn: asyncpg.Connection) -> int:
    """Admit every row the app inserted into an attached table, as a daemon does after each
    wake-up (``listener.admit_inserted_rows``).

    Returns:
        The rows taken from ``listener.inserted_rows``.
    """
    return int(await conn.fetchval("SELECT listener.admit_inserted_rows(1000000)"))


async def create_extension_or_skip(conn: asyncpg.Connection, name: str) -> None:
    """``CREATE EXTENSION IF NOT EXISTS name``, or skip the test when the server does not ship
    it (the embedded wheel's PostgreSQL 18 has no contrib modules such as citext)."""
    available = await conn.fetchval(
        "SELECT EXISTS (SELECT FROM pg_available_extensions WHERE name = $1)", name
    )
    if not available:
        pytest.skip(f"extension {name} is not installed on this PostgreSQL server")
    await conn.execute(f'CREATE EXTENSION IF NOT EXISTS "{name}"')


async def wait_until(
    check: Callable[[], Awaitable[bool]], timeout: float = 30.0, interval: float = 0.05
) -> None:
    """Poll ``check`` until it returns true.

    Raises:
        TimeoutError: it did not within ``timeout`` seconds.
    """
    deadline = time.monotonic() + timeout
    while not await check():
        if time.monotonic() > deadline:
            raise TimeoutError(f"condition not met within {timeout}s")
        await asyncio.sleep(interval)


async def counts(conn: asyncpg.Connection) -> dict[str, int]:
    """Jobs by status."""
    rows = await conn.fetch("SELECT status, count(*) AS n FROM listener.jobs GROUP BY status")
    return {r["status"]: r["n"] for r in rows}


async def jobs_and_waiting(conn: asyncpg.Connection) -> int:
    """Jobs plus rows inserted but not admitted yet, in one snapshot: what the jobs will
    number once a daemon has admitted them all."""
    return int(
        await conn.fetchval(
            "SELECT (SELECT count(*) FROM listener.jobs) "
            "+ (SELECT count(*) FROM listener.inserted_rows)"
        )
    )


async def all_finished(conn: asyncpg.Connection, expected: int) -> bool:
    """True when ``expected`` jobs exist and none is pending, processing or batched."""
    c = await counts(conn)
    return sum(c.values()) >= expected and not any(
        c.get(s) for s in ("pending", "processing", "batched")
    )


async def beat(gaps: list[float], every_s: float = 0.01) -> None:
    """Sleeps ``every_s`` again and again, forever, appending to ``gaps`` how long each sleep
    really took: a stall of the event loop shows as a long gap. Run it as a task; cancel it
    when done."""
    loop = asyncio.get_running_loop()
    last = loop.time()
    while True:
        await asyncio.sleep(every_s)
        now = loop.time()
        gaps.append(now - last)
        last = now


class RecordingProvider:
    """Records every call and checks no job runs twice at the same time.

    Args:
        delay_s: sleep per call, seconds.
        failures: ``{source_id: [exceptions to raise on successive calls]}``.
    """

    name = "recording"
    needs_image = False

    def __init__(
        self, delay_s: float = 0.0, failures: dict[str, list[ListenerError]] | None = None
    ) -> None:
        self.delay_s = delay_s
        self.failures = failures or {}
        self.calls: list[str] = []
        self.running: set[str] = set()
        self.overlaps: list[str] = []
        self.started = asyncio.Event()

    async def start(self) -> None:
        """Nothing to start."""

    async def close(self) -> None:
        """Nothing to close."""

    def estimate_tokens(self, kind: str, image: ImageInput) -> int:
        """Not token-priced."""
        return 0

    async def run(self, kind: str, image: ImageInput, context: StepContext) -> StepResult:
        """Record the call; raise the next scripted failure, if any."""
        key = image.source_id
        if key in self.running:
            self.overlaps.append(key)
        self.running.add(key)
        self.calls.append(key)
        self.started.set()
        try:
            if self.delay_s:
                await asyncio.sleep(self.delay_s)
            scripted = self.failures.get(key)
            if scripted:
                raise scripted.pop(0)
            return StepResult("recording", "recording.step", {"source_id": key}, "test", 0.0)
        finally:
            self.running.discard(key)


class GatedProvider(RecordingProvider):
    """A ``RecordingProvider`` whose calls wait while ``gate`` is clear (jobs stay running);
    ``held`` counts the calls waiting."""

    def __init__(
        self, delay_s: float = 0.0, failures: dict[str, list[ListenerError]] | None = None
    ) -> None:
        super().__init__(delay_s, failures)
        self.gate = asyncio.Event()
        self.gate.set()
        self.held = 0

    async def run(self, kind: str, image: ImageInput, context: StepContext) -> StepResult:
        """Wait for the gate, then record the call as ``RecordingProvider`` does."""
        if not self.gate.is_set():
            self.held += 1
            try:
                await self.gate.wait()
            finally:
                self.held -= 1
        return await super().run(kind, image, context)


def faces_settings(database_url: str, fake: FakeRekognition, **overrides: Any) -> Settings:
    """``fast_settings`` of a daemon whose one step is Rekognition with faces, at ``fake``
    (up to 100 requests a second, 4 at a time); ``overrides`` win."""
    values: dict[str, Any] = {
        "pipeline": "tiered",
        "tiers": TierSettings(tier1=["rekognition"], faces=True),
        "rekognition": RekognitionSettings(endpoint_url=fake.endpoint_url, region="us-east-1"),
        "rate_limits": {"rekognition": RateLimit(rps=100, burst=10, concurrency=4)},
    }
    values.update(overrides)
    return fast_settings(database_url, **values)


def random_faults(seed: int) -> Callable[[], Fault | None]:
    """A ``fault_plan`` for ``FakeOpenAI``: of its requests, about one in five answers 500 and
    one in ten 429 (retry after 0.05 s), drawn from ``random.Random(seed)``."""
    from listener.testing.openai_fake import Fault

    rng = random.Random(seed)

    def faults() -> Fault | None:
        draw = rng.random()
        if draw < 0.2:
            return Fault(500)
        if draw < 0.3:
            return Fault(429, retry_after_s=0.05)
        return None

    return faults


async def fake_on_command_line(
    module: str, *options: str, stderr: int | None = None
) -> tuple[asyncio.subprocess.Process, str]:
    """Starts a fake's command line, ``python -W error -m <module> --port 0 <options>``, and
    reads the first line it prints (``READY <url>`` once it serves). Warnings are errors: a
    fake that warns as it starts (runpy's "found in sys.modules") fails before ``READY``.

    Args:
        module: ``listener.testing.openai_fake``, say.
        options: its other options.
        stderr: ``asyncio.subprocess.PIPE`` to capture it; inherited when None.

    Returns:
        The process (stdout piped) and that line.
    """
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-W",
        "error",
        "-m",
        module,
        "--port",
        "0",
        *options,
        stdout=asyncio.subprocess.PIPE,
        stderr=stderr,
    )
    assert process.stdout is not None
    try:
        line = (await asyncio.wait_for(process.stdout.readline(), timeout=30)).decode()
    except BaseException:
        process.kill()
        await process.wait()
        raise
    return process, line


@asynccontextmanager
async def serving(app: web.Application, **runner_options: Any) -> AsyncIterator[str]:
    """Runs the aiohttp ``app`` on a free port of 127.0.0.1 until the block ends.

    Args:
        app: the application, its routes added.
        runner_options: for ``aiohttp.web.AppRunner`` (``access_log=None``,
            ``shutdown_timeout=0.5``, say).

    Yields:
        Its base URL, ``http://127.0.0.1:<port>``.
    """
    runner = web.AppRunner(app, **runner_options)
    await runner.setup()
    try:
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        yield f"http://127.0.0.1:{runner.addresses[0][1]}"
    finally:
        await runner.cleanup()


class StaticServer:
    """Serves a folder on 127.0.0.1 (the daemon fetches images from it)."""

    def __init__(self, folder: str) -> None:
        self.folder = folder
        self.base_url = ""
        self._stack = AsyncExitStack()

    async def __aenter__(self) -> StaticServer:
        app = web.Application()
        app.router.add_static("/", self.folder)
        self.base_url = await self._stack.enter_async_context(serving(app, access_log=None))
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._stack.aclose()


def serve_photos(
    folder: Path, *bundled: str, files: Mapping[str, bytes] | None = None
) -> StaticServer:
    """A ``StaticServer`` of ``folder`` (enter it to start it), which first gets copies of
    the demo's bundled photos named ``bundled`` (``listener.cli.demo.BUNDLED_IMAGES``) and
    ``files``, name to bytes."""
    from listener.cli.demo import BUNDLED_IMAGES

    for name in bundled:
        shutil.copy(BUNDLED_IMAGES / name, folder / name)
    for name, data in (files or {}).items():
        (folder / name).write_bytes(data)
    return StaticServer(str(folder))


def cli(
    env: Mapping[str, str],
    *args: str,
    columns: int = 300,
    timeout: float = 120,
    ok: bool = False,
    cwd: Path | str | None = None,
) -> subprocess.CompletedProcess[str]:
    """``listener *args`` as a user runs it: ``python -m listener`` in a subprocess with ``env``.

    Its output is captured as text, laid out ``columns`` wide (``COLUMNS``) without colour
    (``NO_COLOR``): wide enough that what a test looks for (a long owner id, a refusal with
    its advice) is not wrapped, and not split by escape codes.

    Args:
        env: the subprocess's whole environment (``env_for_subprocess``, say).
        columns: the terminal width Rich lays tables and messages out for.
        timeout: seconds before ``subprocess.TimeoutExpired``.
        ok: assert that it exited 0 (its stderr is the assertion's message).
        cwd: its working directory (``"/"``: no ``.env`` file to read); this process's when
            None.
    """
    result = subprocess.run(
        [sys.executable, "-m", "listener", *args],
        env={**env, "COLUMNS": str(columns), "NO_COLOR": "1"},
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=cwd,
    )
    if ok:
        assert result.returncode == 0, result.stderr
    return result


async def cli_async(
    env: Mapping[str, str], *args: str, **options: Any
) -> subprocess.CompletedProcess[str]:
    """``cli`` in a worker thread, so the test's event loop (a daemon in it, say) keeps
    running meanwhile; ``options`` are ``cli``'s."""
    return await asyncio.to_thread(cli, env, *args, **options)


@contextmanager
def listener_run(
    env: Mapping[str, str],
    log: Path,
    *,
    console_script: bool = False,
    cwd: Path | None = None,
    stop_grace_s: float | None = None,
    **settings: str,
) -> Iterator[subprocess.Popen[bytes]]:
    """``listener run`` as a subprocess, its stdout and stderr appended to ``log``; stopped
    when the block ends if it still runs.

    The daemon's health server takes a free port and it polls every 0.2 s
    (``LISTENER_HEALTH_PORT=0``, ``LISTENER_POLL_INTERVAL_S=0.2``, over ``env``'s own).

    Args:
        env: the subprocess's environment (``env_for_subprocess``, say).
        log: the file its output is appended to.
        console_script: run the installed ``listener`` script next to this interpreter
            rather than ``python -m listener``.
        cwd: its working directory; this process's when None.
        stop_grace_s: on leaving the block, SIGTERM it and wait this long before SIGKILL;
            None kills it at once.
        settings: more settings, as ``LISTENER_<NAME>`` (``worker_id="a"`` is
            ``LISTENER_WORKER_ID=a``); they win over ``env`` and the defaults above.
    """
    env = {**env, "LISTENER_HEALTH_PORT": "0", "LISTENER_POLL_INTERVAL_S": "0.2"}
    env.update({f"LISTENER_{k.upper()}": v for k, v in settings.items()})
    if console_script:
        command = [str(Path(sys.executable).parent / "listener"), "run"]
    else:
        command = [sys.executable, "-m", "listener", "run"]
    with log.open("ab") as out:
        proc = subprocess.Popen(command, env=env, cwd=cwd, stdout=out, stderr=out)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            if stop_grace_s is not None:
                proc.terminate()
                with suppress(subprocess.TimeoutExpired):
                    proc.wait(stop_grace_s)
            if proc.poll() is None:
                proc.kill()
                proc.wait()
