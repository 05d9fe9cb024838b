"""Postgres for the whole test suite: one server per session, one database per test.

``DATABASE_URL``, when set, is the admin DSN of an existing server (PostgreSQL 13+, a role
that may ``CREATE DATABASE``); otherwise a ``TemporaryCluster(fast=True)`` is started for the
session. The schema is migrated once into a template database; each test that asks for
``database_url`` gets ``CREATE DATABASE ... TEMPLATE`` (a file copy, milliseconds), dropped
``WITH (FORCE)`` after the test.

Fixtures:
    pg_cluster: the session's ``TemporaryCluster``, or None when ``DATABASE_URL`` was given
        (tests that restart Postgres skip then).
    pg_admin_dsn: DSN of the server's maintenance database, for CREATE/DROP DATABASE.
    dsn_for: ``dsn_for(name)``, the admin DSN with the database name swapped for ``name``.
    template_db: name of the migrated template database.
    database_url: DSN of a fresh, migrated database of this test's own.
    env_for_subprocess: ``os.environ`` copy pointing ``listener`` subprocesses at it.
    pgbouncer: the session's PgBouncer (``pool_mode = transaction``) in front of the server;
        tests that use it skip only when pgbouncer is not installed.
    pooler_url: ``database_url`` through that PgBouncer.
    aws_env: AWS credentials and region of no account, for boto3 clients of a fake.
    fake: the fake provider server (``FakeOpenAI``, ``FakeRekognition``) a test module names
        in ``FAKE``.
    photos: a ``StaticServer`` of the demo's bundled photos a test module names in ``PHOTOS``.

Session setup runs synchronously (each step in its own short-lived event loop): async
session fixtures do not mix well with pytest-asyncio's per-test loops.
"""

from __future__ import annotations

import asyncio
import os
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import parse_qsl, quote, urlencode, urlsplit, urlunsplit

import asyncpg
import pytest
from pgbouncer_process import PgBouncer, pgbouncer_binary
from support import StaticServer, serve_photos

from listener.testing.cluster import TemporaryCluster

_T = TypeVar("_T")


def _run(coro: Coroutine[Any, Any, _T]) -> _T:
    """Run ``coro`` to completion in a private event loop.

    Unlike ``asyncio.run``, this leaves the thread's "current event loop" alone, which
    pytest-asyncio manages for the tests.
    """
    with asyncio.Runner(loop_factory=asyncio.new_event_loop) as runner:
        return runner.run(coro)


def _dsn_for_database(dsn: str, database: str) -> str:
    """``dsn`` (a ``postgresql://`` URL) with its database replaced by ``database``."""
    parts = urlsplit(dsn)
    query = parts.query
    pairs = parse_qsl(query, keep_blank_values=True)
    if any(key in ("dbname", "database") for key, _ in pairs):
        query = urlencode([(k, v) for k, v in pairs if k not in ("dbname", "database")])
    return urlunsplit(parts._replace(path="/" + quote(database, safe=""), query=query))


async def _admin_execute(admin_dsn: str, sql: str) -> None:
    conn = await asyncpg.connect(admin_dsn)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


async def _create_template(admin_dsn: str, name: str) -> None:
    from listener.db.migrate import migrate

    await _admin_execute(admin_dsn, f'CREATE DATABASE "{name}"')
    try:
        conn = await asyncpg.connect(_dsn_for_database(admin_dsn, name))
        try:
            await migrate(conn)
        finally:
            await conn.close()
    except BaseException:
        await _admin_execute(admin_dsn, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        raise


@pytest.fixture(scope="session")
def pg_cluster() -> Iterator[TemporaryCluster | None]:
    """The session's throwaway cluster, or None when ``DATABASE_URL`` is set."""
    if os.environ.get("DATABASE_URL"):
        yield None
        return
    cluster = TemporaryCluster(fast=True)
    cluster.start()
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="session")
def pg_admin_dsn(pg_cluster: TemporaryCluster | None) -> str:
    """``DATABASE_URL`` when set, else the session cluster's DSN (database ``postgres``)."""
    if pg_cluster is None:
        return os.environ["DATABASE_URL"]
    return pg_cluster.dsn


@pytest.fixture(scope="session")
def dsn_for(pg_admin_dsn: str) -> Callable[[str], str]:
    """``dsn_for(name)``: the admin DSN (same server and credentials) for database ``name``."""

    def dsn_for(database: str) -> str:
        return _dsn_for_database(pg_admin_dsn, database)

    return dsn_for


@pytest.fixture(scope="session")
def template_db(pg_admin_dsn: str) -> Iterator[str]:
    """Name of a database migrated once per session; per-test databases are copied from it.

    Nothing may stay connected to it: ``CREATE DATABASE ... TEMPLATE`` fails while it has
    other sessions.
    """
    name = f"listener_template_{secrets.token_hex(6)}"
    _run(_create_template(pg_admin_dsn, name))
    try:
        yield name
    finally:
        _run(_admin_execute(pg_admin_dsn, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


@pytest.fixture
def database_url(pg_admin_dsn: str, template_db: str) -> Iterator[str]:
    """DSN of a fresh database copied from the migrated template, dropped after the test.

    The drop uses ``WITH (FORCE)``, so connections the test left open (a ``listener run``
    subprocess, say) are terminated rather than failing the teardown.
    """
    name = f"t_{secrets.token_hex(8)}"
    _run(_admin_execute(pg_admin_dsn, f'CREATE DATABASE "{name}" TEMPLATE "{template_db}"'))
    try:
        yield _dsn_for_database(pg_admin_dsn, name)
    finally:
        _run(_admin_execute(pg_admin_dsn, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


@pytest.fixture
def env_for_subprocess(database_url: str) -> dict[str, str]:
    """A copy of ``os.environ`` that points ``listener`` subprocesses at this test's database.

    Sets ``DATABASE_URL`` and ``LISTENER_DATABASE_URL`` (the latter wins in Settings, so one
    inherited from the developer's shell or ``.env`` cannot redirect the daemon) and removes
    ``LISTENER_LISTEN_DATABASE_URL``.
    """
    env = dict(os.environ)
    env["DATABASE_URL"] = database_url
    env["LISTENER_DATABASE_URL"] = database_url
    env.pop("LISTENER_LISTEN_DATABASE_URL", None)
    return env


@pytest.fixture
async def conn(database_url: str) -> AsyncIterator[asyncpg.Connection]:
    """A connection to this test's database, closed after the test."""
    c = await asyncpg.connect(database_url)
    try:
        yield c
    finally:
        await c.close()


@pytest.fixture
async def database_before(
    pg_admin_dsn: str, dsn_for: Callable[[str], str]
) -> AsyncIterator[Callable[[int], Awaitable[str]]]:
    """``await database_before(N)``: the DSN of a fresh database holding every migration
    before version N, recorded as ``listener migrate`` of that release left it: a database
    of an earlier release, for upgrade tests. Each is dropped after the test."""
    from listener.db.migrate import load_migrations

    created: list[str] = []

    async def make(version: int) -> str:
        name = f"before{version}_{secrets.token_hex(6)}"
        await _admin_execute(pg_admin_dsn, f'CREATE DATABASE "{name}"')
        created.append(name)
        conn = await asyncpg.connect(dsn_for(name))
        try:
            await conn.execute(
                "CREATE SCHEMA listener; CREATE TABLE listener.schema_migrations ("
                "version integer PRIMARY KEY, name text NOT NULL, "
                "applied_at timestamptz NOT NULL DEFAULT now())"
            )
            for m in load_migrations():
                if m.version < version:
                    await conn.execute(m.sql)
                    await conn.execute(
                        "INSERT INTO listener.schema_migrations (version, name) VALUES ($1, $2)",
                        m.version,
                        m.name,
                    )
        finally:
            await conn.close()
        return dsn_for(name)

    try:
        yield make
    finally:
        for name in created:
            await _admin_execute(pg_admin_dsn, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="session")
def pgbouncer(pg_admin_dsn: str) -> Iterator[PgBouncer]:
    """A PgBouncer of the session's own in ``pool_mode = transaction`` (5 server connections
    per database), in front of the session's server; skips when pgbouncer is not installed."""
    if pgbouncer_binary() is None:
        pytest.skip("pgbouncer is not installed (apt-get install pgbouncer; .ci/run installs it)")
    with PgBouncer(pg_admin_dsn, pool_mode="transaction", pool_size=5) as bouncer:
        yield bouncer


@pytest.fixture
def pooler_url(pgbouncer: PgBouncer, database_url: str) -> str:
    """This test's database reached through the session's transaction-mode PgBouncer."""
    return pgbouncer.dsn_for(database_url)


@pytest.fixture
async def pool(database_url: str) -> AsyncIterator[asyncpg.Pool]:
    """A pool of up to four connections to this test's database."""
    p = await asyncpg.create_pool(database_url, min_size=1, max_size=4)
    try:
        yield p
    finally:
        await p.close()


@pytest.fixture
def aws_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """AWS credentials and a region of no account, and no ``AWS_PROFILE`` from the developer's
    shell: what boto3 needs to sign requests to a fake Rekognition (which takes any).

    A module whose every test needs it says ``pytestmark = pytest.mark.usefixtures("aws_env")``.
    """
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.delenv("AWS_PROFILE", raising=False)


@pytest.fixture
async def fake(request: pytest.FixtureRequest) -> AsyncIterator[Any]:
    """A fake provider server of this test's own on 127.0.0.1, stopped after the test: the
    class the test module names in ``FAKE`` (``FakeOpenAI`` or ``FakeRekognition`` of
    ``listener.testing``), started with its defaults."""
    server_class = getattr(request.module, "FAKE", None)
    if server_class is None:
        pytest.fail(f"{request.module.__name__} uses the fake fixture but sets no FAKE")
    async with server_class() as server:
        yield server


@pytest.fixture
async def photos(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[StaticServer]:
    """A ``StaticServer`` on 127.0.0.1 of this test's own folder, holding copies of the demo's
    bundled photos (``listener.cli.demo.BUNDLED_IMAGES``) the test module names in
    ``PHOTOS``; a module that serves other files defines a ``photos`` fixture of its own."""
    names = getattr(request.module, "PHOTOS", None)
    if names is None:
        pytest.fail(f"{request.module.__name__} uses the photos fixture but sets no PHOTOS")
    async with serve_photos(tmp_path, *names) as server:
        yield server
