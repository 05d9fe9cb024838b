"""The health server's operational surface: where it binds, the token, and slow clients.

A real daemon on the test's Postgres with a recording provider; slow clients come from
``bench/idle_clients.py`` in a process of their own, so that the descriptors counted in
``/proc/self/fd`` are the daemon's (and this test's), not the clients'.
"""

from __future__ import annotations

import asyncio
import json
import os
import resource
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import pytest
from loguru import logger
from support import RecordingProvider, counts, fast_settings, make_table

from listener.app import Daemon, raise_open_files_limit
from listener.ops.health import COOKIE_NAME
from listener.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
IDLE_CLIENTS = ROOT / "bench" / "idle_clients.py"
TOKEN = "tok-" + "Zq7uX2pL9vR4sK8w" * 2
"""A token made of parts that appear nowhere else, so a leak of any 8 of its bytes shows."""


@pytest.fixture
def log_lines() -> Iterator[list[str]]:
    """Every loguru line written while the test runs."""
    lines: list[str] = []
    sink = logger.add(lambda message: lines.append(str(message)), level="DEBUG")
    try:
        yield lines
    finally:
        logger.remove(sink)


def leaks(text: str) -> bool:
    """True when any 8 consecutive characters of ``TOKEN`` appear in ``text``."""
    return any(TOKEN[i : i + 8] in text for i in range(len(TOKEN) - 7))


def fds() -> int:
    """Descriptors this process holds now."""
    return len(os.listdir("/proc/self/fd"))


async def test_binds_loopback_by_default_and_logs_the_bound_address(
    database_url: str, log_lines: list[str]
) -> None:
    assert Settings(_env_file=None).health_host == "127.0.0.1"  # type: ignore[call-arg]
    settings = fast_settings(database_url, health_host="127.0.0.1")
    async with Daemon(settings, providers=[RecordingProvider()]) as daemon:
        assert daemon.health is not None
        port = daemon.health.port
        assert daemon.health.bound == f"127.0.0.1:{port}"
    running = [line for line in log_lines if "listener running" in line]
    assert running and f"health=http://127.0.0.1:{port} (no token" in running[0]
    assert any("open files limit" in line for line in log_lines)


async def test_wildcard_bind_is_logged_as_bound_with_a_warning(
    database_url: str, log_lines: list[str]
) -> None:
    settings = fast_settings(database_url, health_host="0.0.0.0")
    async with Daemon(settings, providers=[RecordingProvider()]) as daemon:
        assert daemon.health is not None
        port = daemon.health.port
        assert daemon.health.bound == f"0.0.0.0:{port}"
    running = next(line for line in log_lines if "listener running" in line)
    # The log says what was bound, not a loopback address it was not limited to.
    assert f"health=http://0.0.0.0:{port}" in running
    assert any("without a token" in line for line in log_lines)


@asynccontextmanager
async def one_row_finished(
    conn: asyncpg.Connection, settings: Settings, table: str, owner: str | None = None
) -> AsyncIterator[Daemon]:
    """A daemon of ``settings`` (a ``RecordingProvider``, its health server up) once it has
    connected its LISTEN and finished a row inserted into ``table`` (url ``a``, ``owner``)."""
    async with Daemon(settings, providers=[RecordingProvider()]) as daemon:
        assert daemon.health is not None and daemon.notifier is not None
        await daemon.notifier.wait_connected(1)
        await conn.execute(f"INSERT INTO {table} (url, owner_id) VALUES ('a', $1)", owner)
        await daemon.signals.wait("finished", 1, timeout=10)
        yield daemon


async def test_token_guards_status_metrics_and_page(
    database_url: str, conn: asyncpg.Connection, log_lines: list[str]
) -> None:
    table = await make_table(conn)
    settings = fast_settings(database_url, health_token=TOKEN)
    async with one_row_finished(conn, settings, table) as daemon:
        bodies: list[str] = []
        async with aiohttp.ClientSession(daemon.health.url) as http:
            # Probes stay open.
            for path in ("/healthz", "/readyz"):
                async with http.get(path) as r:
                    assert r.status == 200, path
            # No token, a wrong one, a prefix of the right one, the wrong scheme: 401.
            wrong = {
                "none": {},
                "wrong": {"Authorization": "Bearer not-the-token"},
                "prefix": {"Authorization": f"Bearer {TOKEN[:-1]}"},
                "longer": {"Authorization": f"Bearer {TOKEN}x"},
                "basic": {"Authorization": f"Basic {TOKEN}"},
                "empty": {"Authorization": "Bearer "},
            }
            # Every path but the probes is guarded, including ones no route serves.
            for path in ("/", "/status", "/metrics", "/status/", "/%73tatus", "/nope"):
                for label, headers in wrong.items():
                    async with http.get(path, headers=headers) as r:
                        assert r.status == 401, (path, label)
                        assert r.headers["WWW-Authenticate"].startswith("Bearer")
                        body = await r.text()
                        bodies.append(body + str(r.headers))
                        # As docs/explanations/security.md says: only / tells how to
                        # authenticate; the others answer the same JSON.
                        if path == "/":
                            assert "Authorization: Bearer <token>" in body
                        else:
                            assert json.loads(body) == {"error": "unauthorized"}, path
            async with http.get("/?token=not-the-token", allow_redirects=False) as r:
                assert r.status == 401 and "Set-Cookie" not in r.headers
                bodies.append(await r.text() + str(r.headers))
            # The right bearer token.
            auth = {"Authorization": f"Bearer {TOKEN}"}
            async with http.get("/status", headers=auth) as r:
                assert r.status == 200 and (await r.json())["complete"] == 1
                bodies.append(await r.text())
            async with http.get("/metrics", headers=auth) as r:
                assert r.status == 200 and "listener_queue_jobs" in await r.text()
            async with http.get("/", headers=auth) as r:
                assert r.status == 200 and "listener status" in await r.text()

        # A browser: /?token= sets the cookie and redirects to / without the query string.
        jar = aiohttp.CookieJar(unsafe=True)  # cookies for an IP address host
        async with aiohttp.ClientSession(daemon.health.url, cookie_jar=jar) as browser:
            async with browser.get(f"/?token={TOKEN}", allow_redirects=False) as r:
                assert r.status == 303 and r.headers["Location"] == "/"
                assert r.headers["Referrer-Policy"] == "no-referrer"
                cookie = r.cookies[COOKIE_NAME]
                assert cookie["httponly"] is True and cookie["samesite"] == "Strict"
                assert cookie["path"] == "/"
                assert not leaks(cookie.value), "the cookie holds the token itself"
            for _ in range(2):  # the first load, then the <meta refresh> reload
                async with browser.get("/") as r:
                    page = await r.text()
                    assert r.status == 200 and 'http-equiv="refresh"' in page
                    assert not leaks(page)
            async with browser.get("/status") as r:
                assert r.status == 200
        # A forged cookie is refused.
        forged = aiohttp.ClientSession(daemon.health.url, cookies={COOKIE_NAME: "0" * 64})
        async with forged, forged.get("/") as r:
            assert r.status == 401
    for body in bodies[:-1]:  # every 401
        assert not leaks(body), body
    assert not any(leaks(line) for line in log_lines)
    running = next(line for line in log_lines if "listener running" in line)
    assert "token required" in running


async def raw_get(port: int, head: bytes) -> tuple[int, str]:
    """Send ``head`` (a request without body) to 127.0.0.1:``port``; the status and body."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(head)
        await writer.drain()
        async with asyncio.timeout(10):
            answer = (await reader.read()).decode(errors="replace")
    finally:
        writer.close()
    status_line, _, rest = answer.partition("\r\n")
    return int(status_line.split()[1]), rest.partition("\r\n\r\n")[2]


OWNER = "owner-Mx4vT9"
"""An owner name that appears nowhere but in the data, so a leak of it shows."""


async def test_without_a_token_only_known_hosts_are_served(
    database_url: str, conn: asyncpg.Connection, log_lines: list[str]
) -> None:
    """DNS rebinding: with no token, a request whose Host is a DNS name the operator did not
    allow (as a rebinding page's always is) gets 403 and no data on every path but the probes;
    IP addresses, localhost and LISTENER_HEALTH_ALLOWED_HOSTS are served."""
    table = await make_table(conn, "photos_kq2vz", owner=True)
    settings = fast_settings(database_url, health_allowed_hosts=["listener", "Listener.Internal."])
    async with one_row_finished(conn, settings, table, OWNER) as daemon:
        port = daemon.health.port
        assert port is not None
        refused: list[str] = []
        async with aiohttp.ClientSession(daemon.health.url) as http:
            # The status document holds what a rebinding page is after.
            async with http.get("/status") as r:
                assert r.status == 200 and OWNER in await r.text()
            for host in (
                f"evil.example:{port}",
                "evil.example",
                f"EVIL.example.:{port}",
                f"127.0.0.1.evil.example:{port}",
                f"localhost.evil.example:{port}",
                f"listener.evil.example:{port}",
                f"127.1:{port}",
                "",
            ):
                for path in ("/", "/status", "/metrics", "/status/", "/nope"):
                    async with http.get(path, headers={"Host": host}) as r:
                        body = await r.text()
                        assert r.status == 403, (host, path, r.status)
                        assert r.headers["Cache-Control"] == "no-store"
                        assert "LISTENER_HEALTH_ALLOWED_HOSTS" in body, body
                        assert "LISTENER_HEALTH_TOKEN" in body, body
                        refused.append(body + str(r.headers))
                # The probes stay open, whatever the Host.
                for path in ("/healthz", "/readyz"):
                    async with http.get(path, headers={"Host": host}) as r:
                        assert r.status == 200, (host, path)
            async with http.get("/", headers={"Host": "evil.example"}) as r:
                assert r.content_type == "text/plain"
            async with http.get("/status", headers={"Host": "evil.example"}) as r:
                assert (await r.json())["error"] == "host not allowed"

            served = (
                f"127.0.0.1:{port}",
                "127.0.0.1",
                f"localhost:{port}",
                "LOCALHOST",
                "localhost.",
                f"[::1]:{port}",
                "[::1]",
                "192.0.2.10:8080",  # any IP literal: it cannot be rebound
                "listener",
                f"LISTENER:{port}",
                "listener.internal:9999",
            )
            for host in served:
                async with http.get("/status", headers={"Host": host}) as r:
                    assert r.status == 200, host
                    assert (await r.json())["complete"] == 1
                async with http.get("/metrics", headers={"Host": host}) as r:
                    assert r.status == 200 and "listener_queue_jobs" in await r.text(), host
                async with http.get("/", headers={"Host": host}) as r:
                    assert r.status == 200 and "listener status" in await r.text(), host

        # No Host header, or two: refused. aiohttp's parser already answers 400 to an HTTP/1.1
        # request without one and to a repeated one; HTTP/1.0 may omit it, and gets 403.
        for head, expected in (
            (b"GET /status HTTP/1.0\r\n\r\n", 403),
            (b"GET /status HTTP/1.1\r\nConnection: close\r\n\r\n", 400),
            (
                b"GET /status HTTP/1.1\r\nHost: 127.0.0.1\r\nHost: evil.example\r\n"
                b"Connection: close\r\n\r\n",
                400,
            ),
        ):
            status, body = await raw_get(port, head)
            assert status == expected, (head, status)
            refused.append(body)
        status, body = await raw_get(port, b"GET /status HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
        assert status == 200 and OWNER in body

    for text in refused:
        for secret in (OWNER, "photos_kq2vz", "complete", "listener_queue_jobs"):
            assert secret not in text, (secret, text)
    running = next(line for line in log_lines if "listener running" in line)
    assert "no token, Host checked" in running
    warnings = [line for line in log_lines if "refused a request" in line]
    assert len(warnings) == 1 and "evil.example" in warnings[0]


async def test_with_a_token_the_token_is_the_guard_whatever_the_host(
    database_url: str, conn: asyncpg.Connection
) -> None:
    """With a token, the Host is not checked: the token (or the SameSite=Strict cookie, which
    a rebinding page cannot have) is required and enough, as before."""
    table = await make_table(conn)
    settings = fast_settings(database_url, health_token=TOKEN)
    async with (
        one_row_finished(conn, settings, table) as daemon,
        aiohttp.ClientSession(daemon.health.url) as http,
    ):
        for host in ("evil.example:8080", "127.0.0.1", "listener"):
            auth = {"Host": host, "Authorization": f"Bearer {TOKEN}"}
            async with http.get("/status", headers=auth) as r:
                assert r.status == 200 and (await r.json())["complete"] == 1, host
            async with http.get("/metrics", headers=auth) as r:
                assert r.status == 200 and "listener_queue_jobs" in await r.text()
            async with http.get("/", headers=auth) as r:
                assert r.status == 200 and "listener status" in await r.text()
            for path in ("/", "/status", "/metrics"):
                async with http.get(path, headers={"Host": host}) as r:
                    assert r.status == 401, (host, path)
            for path in ("/healthz", "/readyz"):
                async with http.get(path, headers={"Host": host}) as r:
                    assert r.status == 200, (host, path)


async def test_an_empty_token_means_no_token() -> None:
    settings = Settings(_env_file=None, health_token="  ")  # type: ignore[call-arg]
    assert settings.health_token is None and settings.health_token_value() is None


def test_open_files_limit_is_raised_to_the_hard_limit() -> None:
    """In a child process whose soft limit starts at 256 (the hard limit is inherited)."""
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard <= 256:
        pytest.skip(f"hard limit {hard} leaves nothing to raise")
    code = (
        "import resource\n"
        "from listener.app import raise_open_files_limit\n"
        "_, hard = resource.getrlimit(resource.RLIMIT_NOFILE)\n"
        "resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))\n"
        "print(*raise_open_files_limit(), *resource.getrlimit(resource.RLIMIT_NOFILE))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    ).stdout.split()
    before, after, now_soft, now_hard = (int(v) for v in out)
    assert before == 256 and after == now_soft == now_hard == hard
    # Here (soft already raised by the daemon tests, or equal): nothing changes.
    assert raise_open_files_limit()[1] == resource.getrlimit(resource.RLIMIT_NOFILE)[0]


async def read_event(proc: asyncio.subprocess.Process, event: str, timeout: float) -> Any:
    """The next JSON line of ``idle_clients.py`` whose ``event`` is ``event``."""
    assert proc.stdout is not None
    async with asyncio.timeout(timeout):
        while True:
            line = await proc.stdout.readline()
            if not line:
                raise EOFError("idle_clients.py exited")
            doc = json.loads(line)
            if doc["event"] == event:
                return doc


async def test_a_thousand_idle_connections_do_not_hold_the_daemon_down(
    database_url: str, conn: asyncpg.Connection, log_lines: list[str]
) -> None:
    """1,000 connections that send ``GET /readyz HTT`` and stop: /readyz keeps answering,
    rows keep being analyzed, the daemon's descriptors stay bounded by the cap, and the
    server closes every idle connection by the header timeout."""
    header_timeout_s = 3.0
    cap = 64
    table = await make_table(conn)
    provider = RecordingProvider()
    settings = fast_settings(
        database_url,
        health_max_connections=cap,
        health_header_timeout_s=header_timeout_s,
        concurrency=4,
    )
    async with Daemon(settings, providers=[provider]) as daemon:
        assert daemon.health is not None and daemon.notifier is not None
        await daemon.notifier.wait_connected(1)
        baseline = fds()
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            str(IDLE_CLIENTS),
            "127.0.0.1",
            str(daemon.health.port),
            "1000",
            stdout=asyncio.subprocess.PIPE,
        )
        peak = baseline
        try:
            opened = await read_event(proc, "opened", timeout=60)
            assert opened["opened"] + opened["failed"] == 1000
            peak = max(peak, fds())
            # /readyz answers while the flood is open (each probe a new connection).
            async with aiohttp.ClientSession(
                daemon.health.url,
                connector=aiohttp.TCPConnector(force_close=True),
                timeout=aiohttp.ClientTimeout(total=10),
            ) as http:
                for _ in range(5):
                    async with http.get("/readyz") as r:
                        assert r.status == 200 and (await r.json())["ready"] is True
                    peak = max(peak, fds())
            # Work goes on: rows inserted now are analyzed.
            await conn.execute(
                f"INSERT INTO {table} (url) SELECT 'u' || g FROM generate_series(1, 50) g"
            )
            waiter = asyncio.create_task(daemon.signals.wait("finished", 50, timeout=30))
            while not waiter.done():
                peak = max(peak, fds())
                await asyncio.sleep(0.05)
            await waiter
            # Every idle connection is closed by the server within the header timeout.
            closed = await read_event(proc, "closed", timeout=header_timeout_s + 30)
            while closed["open"]:
                closed = await read_event(proc, "closed", timeout=header_timeout_s + 30)
            assert closed["closed"] == 1000
            await asyncio.wait_for(proc.wait(), timeout=10)
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
        cap_state = daemon.health.cap
        assert cap_state.evicted + cap_state.refused > 0, "the flood never reached the cap"
        assert cap_state.connections == 0
    assert await counts(conn) == {"complete": 50}
    assert sorted(provider.calls, key=int) == [str(i) for i in range(1, 51)]
    # The server held at most 2 x cap sockets for the flood, whatever its size.
    assert peak - baseline <= 2 * cap + 16, (baseline, peak)
    assert not any("Too many open files" in line for line in log_lines)
