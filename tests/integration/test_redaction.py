"""No secret from a row's URL, a provider's error body or the DSN leaves the process.

Rows carry marked secrets in the places real ones hide: basic-auth passwords, S3 presigned
query strings, Supabase signed-URL tokens; the OpenAI fake answers with error bodies that echo
the ``Authorization`` header and the key; the daemon's DSN has a marked password. After the
daemon ran, no byte of any marker may appear in a log line (text or JSON), an HTTP answer
(``/status``, ``/``, ``/metrics``, ``/healthz``, ``/readyz``), the CLI's output (``listener
status`` and ``--json``) or ``listener.jobs.last_error``.
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from urllib.parse import urlsplit, urlunsplit

import aiohttp
import asyncpg
import pytest
from awaiting import jobs_finished
from loguru import logger
from pydantic import SecretStr
from support import StaticServer, cli, fast_settings, make_table

from listener.app import Daemon
from listener.ops.logs import TEXT_FORMAT, configure_logging
from listener.settings import OpenAISettings, RateLimit, TierSettings
from listener.testing.openai_fake import FakeOpenAI, Fault

# The bundled photos the ``photos`` fixture (conftest.py) serves.
PHOTOS = ("rocket.jpg",)

MARKERS = {
    "basic-auth password": "Mk1pAsswd",
    "X-Amz-Signature": "Mk2aMzSig",
    "Supabase token": "Mk3sUpaTok",
    "OpenAI key echoed": "Mk4oPenKey",
    "DSN password": "Mk5dSnPass",
    "X-Amz-Credential": "MK6AMZCRED",
    "access_token": "Mk7aCcTok",
}
M = MARKERS
API_KEY = f"sk-proj-{M['OpenAI key echoed']}abc123"
ECHO = (
    "Invalid request. Headers received: {'Authorization': 'Bearer "
    + API_KEY
    + "', 'X-Api-Key': '"
    + API_KEY
    + "'}; Incorrect API key provided: "
    + API_KEY
)


def with_password(dsn: str, password: str) -> str:
    parts = urlsplit(dsn)
    netloc = f"{parts.username}:{password}@{parts.hostname}:{parts.port}"
    return urlunsplit(parts._replace(netloc=netloc))


def leaks(text: str) -> list[str]:
    """The markers found in ``text`` (any case: a marker must not survive in any form)."""
    lowered = text.lower()
    return [name for name, marker in MARKERS.items() if marker.lower() in lowered]


@pytest.fixture
def logs() -> Iterator[tuple[io.StringIO, io.StringIO, list[str]]]:
    """Logging as ``listener run`` sets it up (JSON lines), plus a text sink and a sink of the
    test's own: the redaction is a patcher, so sinks added by anyone are redacted too."""
    json_lines, text_lines, own = io.StringIO(), io.StringIO(), list[str]()
    configure_logging("DEBUG", json_lines=True, stream=json_lines)
    text_sink = logger.add(text_lines, level="DEBUG", format=TEXT_FORMAT + " {extra}")
    own_sink = logger.add(own.append, level="DEBUG", format=lambda _: "{message} {extra}\n")
    try:
        yield json_lines, text_lines, own
    finally:
        logger.remove(text_sink)
        logger.remove(own_sink)
        configure_logging("INFO")


async def test_no_marker_leaves_the_process(
    database_url: str,
    conn: asyncpg.Connection,
    photos: StaticServer,
    logs: tuple[io.StringIO, io.StringIO, list[str]],
    env_for_subprocess: dict[str, str],
) -> None:
    dsn = with_password(database_url, M["DSN password"])  # the test cluster trusts local users
    host = photos.base_url.removeprefix("http://")
    urls = [
        f"http://user:{M['basic-auth password']}@{host}/private/a.jpg",
        f"http://{host}/bucket/b.jpg?X-Amz-Algorithm=AWS4-HMAC-SHA256"
        f"&X-Amz-Credential={M['X-Amz-Credential']}%2F20250101%2Fus-east-1%2Fs3%2Faws4_request"
        f"&X-Amz-Signature={M['X-Amz-Signature']}",
        f"http://{host}/storage/v1/object/sign/c.jpg?token={M['Supabase token']}",
        f"http://{host}/rocket.jpg?access_token={M['access_token']}",
    ]
    table = await make_table(conn, owner=True)
    async with FakeOpenAI() as fake:
        # The job that reaches OpenAI: a 500 (retried), then a 400 (failed), both echoing the
        # key as a misbehaving proxy or provider would.
        fake.faults.extend([Fault(500, message=ECHO), Fault(400, message=ECHO)])
        settings = fast_settings(
            dsn,
            listen_database_url=dsn,
            pipeline="tiered",
            tiers=TierSettings(tier1=["openai"]),
            openai=OpenAISettings(
                api_key=SecretStr(API_KEY),
                base_url=fake.base_url,
                image_transport="inline",
                timeout_s=5.0,
            ),
            rate_limits={"openai": RateLimit(rps=50, burst=5, concurrency=8)},
        )
        bodies: list[str] = []
        async with Daemon(settings) as daemon:
            assert daemon.health is not None
            await conn.executemany(
                f"INSERT INTO {table} (url, owner_id) VALUES ($1, 'owner-1')",
                [(url,) for url in urls],
            )
            await jobs_finished(daemon, conn, len(urls), timeout=30)
            async with aiohttp.ClientSession(daemon.health.url) as http:
                for path in ("/status", "/", "/metrics", "/healthz", "/readyz"):
                    async with http.get(path) as resp:
                        assert resp.status == 200, path
                        bodies.append(await resp.text())
        assert len(fake.requests) >= 2  # the faults were served

    errors = [r["last_error"] for r in await conn.fetch("SELECT last_error FROM listener.jobs")]
    assert all(errors) and len(errors) == len(urls)
    # The reasons still say what happened, with the URL's host and path.
    assert any("HTTP 404" in e and "/private/a.jpg" in e for e in errors), errors
    assert any("OpenAI 400" in e for e in errors), errors

    env = {
        **env_for_subprocess,
        "DATABASE_URL": dsn,
        "LISTENER_DATABASE_URL": dsn,
        "LISTENER_LOG_LEVEL": "DEBUG",
    }
    outputs: list[str] = []
    for args in (["status", "--json"], ["status"]):
        result = cli(env, *args, ok=True)
        outputs += [result.stdout, result.stderr]
    assert '"recent_failures"' in outputs[0] and "/storage/v1/object/sign/c.jpg" in outputs[0]

    json_lines, text_lines, own = logs
    everything = {
        "JSON log lines": json_lines.getvalue(),
        "text log lines": text_lines.getvalue(),
        "own sink": "\n".join(own),
        "HTTP answers": "\n".join(bodies),
        "CLI output": "\n".join(outputs),
        "last_error": "\n".join(errors),
    }
    assert everything["JSON log lines"].count("\n") > 3
    found = {where: leaks(text) for where, text in everything.items() if leaks(text)}
    assert not found, found


def test_dsn_parse_errors_never_echo_the_password(env_for_subprocess: dict[str, str]) -> None:
    """asyncpg's parse errors quote pieces of a DSN whose password holds '/', '#' or '?'."""
    env = {k: v for k, v in env_for_subprocess.items() if "DATABASE_URL" not in k}
    for password in (
        f"pa/{M['DSN password']}",
        f"12#{M['DSN password']}",
        f"x?{M['DSN password']}",
    ):
        for name in ("DATABASE_URL", "LISTENER_DATABASE_URL"):
            env_one = {**env, name: f"postgresql://app:{password}@127.0.0.1:1/app"}
            result = cli(env_one, "status")
            assert result.returncode == 2, result.stderr
            assert "percent-encode" in result.stderr, result.stderr
            shown = result.stdout + result.stderr
            assert not leaks(shown) and "pa/" not in shown and "12#" not in shown, shown
