"""Secrets never reach logs, errors or the health endpoint."""

from __future__ import annotations

import os
from urllib.parse import urlsplit, urlunsplit

import aiohttp
import asyncpg
from awaiting import jobs_finished
from loguru import logger
from support import RecordingProvider, cli, fast_settings, make_table

from listener.app import Daemon

SECRET = "hunter2-Sup3rSecret"


def with_password(dsn: str, password: str) -> str:
    parts = urlsplit(dsn)
    netloc = f"{parts.username}:{password}@{parts.hostname}:{parts.port}"
    return urlunsplit(parts._replace(netloc=netloc))


async def test_password_never_logged_nor_served(database_url: str) -> None:
    dsn = with_password(database_url, SECRET)  # the test cluster trusts local connections
    conn = await asyncpg.connect(database_url)
    lines: list[str] = []
    sink = logger.add(lines.append, level="DEBUG", format="{message} {extra}")
    try:
        table = await make_table(conn)
        settings = fast_settings(dsn, listen_database_url=dsn)
        bodies: list[str] = []
        async with Daemon(settings, providers=[RecordingProvider()]) as daemon:
            assert daemon.health is not None and daemon.notifier is not None
            await conn.execute(f"INSERT INTO {table} (url) VALUES ('a')")
            await jobs_finished(daemon, conn, 1, timeout=10)
            await conn.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE query LIKE 'LISTEN%' AND pid <> pg_backend_pid()"
            )
            await daemon.notifier.wait_connected(2, timeout=10)
            async with aiohttp.ClientSession(daemon.health.url) as http:
                for path in ("/healthz", "/readyz", "/status", "/metrics"):
                    async with http.get(path) as resp:
                        bodies.append(await resp.text())
        lines.append(repr(settings))
    finally:
        logger.remove(sink)
        await conn.close()
    assert len(lines) > 3
    assert not [line for line in lines + bodies if SECRET in line]


def test_cli_connection_error_hides_the_password() -> None:
    env = {k: v for k, v in os.environ.items() if "DATABASE_URL" not in k}
    env["DATABASE_URL"] = f"postgresql://app:{SECRET}@127.0.0.1:1/app"
    result = cli(env, "status")
    assert result.returncode == 2
    assert "cannot reach the database" in result.stderr
    assert SECRET not in result.stderr + result.stdout
