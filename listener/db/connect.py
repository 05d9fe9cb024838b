"""Where every connection of listener comes from, and how a transaction-mode pooler is handled.

A pooler in transaction mode (PgBouncer ``pool_mode = transaction``, Supabase's pooler on port
6543) gives a client a server connection for one transaction at a time. Three things of a
session do not survive that:

- Named prepared statements. asyncpg caches every statement under a name
  (``__asyncpg_stmt_1__``); through the pooler the next client on that server connection
  collides with it (``prepared statement ... already exists``) or misses it (``... does not
  exist``). With ``statement_cache_size=0`` asyncpg uses only unnamed statements, re-parsed in
  the message sequence that runs them (asyncpg 0.29+, MagicStack/asyncpg#1065), which every
  PgBouncer version handles. PgBouncer 1.21+ can also track named statements
  (``max_prepared_statements``); turning the cache off works with and without it.
- LISTEN: the registration stays on a server connection the client no longer holds, and its
  notifications reach whichever client holds it next, or nobody. LISTEN therefore runs on
  ``listen_database_url`` (a direct connection), and the daemon refuses to start when that URL
  goes through a transaction-mode pooler too.
- Session settings, session advisory locks, temporary tables. listener uses none through such
  a pooler: migrations lock inside their one transaction, the status write-back sets
  ``lock_timeout`` with ``set_config(..., true)`` (transaction-local), and pooled connections
  are reset by a ``ROLLBACK`` only. On a direct connection the pool sets ``plan_cache_mode``
  for the session (``plan_each_execution``). (asyncpg itself sets ``jit`` for the session while it
  introspects a type it has no codec for; listener's queries use built-in types only.)

``LISTENER_POOLER`` says which case applies: ``transaction``, ``none`` (a direct connection or
a session-mode pooler), or ``auto`` (the default), which decides from

1. the URL: port 6543, Supabase's transaction-mode pooler port (both ``*.pooler.supabase.com``
   and the older ``db.<ref>.supabase.co``), means a transaction-mode pooler;
2. a probe (``detect_transaction_pooling``) when a hint makes one worth its two connections:
   the daemon always, a CLI command when ``listen_database_url`` is set apart from
   ``database_url`` (the advice for poolers) or the port is 6432 (PgBouncer's default).

There is no query a client can send PgBouncer to learn its pool mode (``SHOW`` on a normal
connection goes to Postgres; the admin console needs an admin user), so the probe watches the
one thing transaction pooling does: a client's backend (``pg_backend_pid()``) changes between
transactions while another client holds the backend it had. A direct connection and a
session-mode pooler never change it, so the probe never takes a direct connection for a pooler.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass
from typing import Any, Literal
from urllib.parse import urlsplit

import asyncpg
from loguru import logger

from listener.settings import Settings

PoolerMode = Literal["auto", "transaction", "none"]
"""``LISTENER_POOLER``: what sits between listener and Postgres on ``database_url``."""

SUPABASE_TRANSACTION_PORT = 6543
"""Supabase's transaction-mode pooler port (Supavisor; PgBouncer before it)."""

PGBOUNCER_DEFAULT_PORT = 6432
"""PgBouncer's default ``listen_port``; its pool mode may be session or transaction."""

_PROBE_ROUNDS = 3
_PROBE_TIMEOUT_S = 5.0

NO_CACHE: dict[str, Any] = {"statement_cache_size": 0}
"""asyncpg options for a transaction-mode pooler: unnamed prepared statements only."""


class PoolerError(ValueError):
    """The configured URLs cannot work with a transaction-mode pooler (LISTEN through one, or
    no direct URL for LISTEN). The message names the settings, never a URL."""


def port_of(dsn: str) -> int | None:
    """The TCP port of a ``postgresql://`` URL, or None when it names none (or is a DSN of
    another form)."""
    try:
        return urlsplit(dsn).port
    except ValueError:
        return None


def url_says_transaction_pooler(dsn: str) -> bool:
    """Whether the URL alone shows a transaction-mode pooler: port 6543 (Supabase's).

    A host under ``pooler.supabase.com`` on port 5432 is Supabase's session-mode pooler,
    which keeps sessions, so the host alone decides nothing.
    """
    return port_of(dsn) == SUPABASE_TRANSACTION_PORT


async def detect_transaction_pooling(
    dsn: str, *, rounds: int = _PROBE_ROUNDS, timeout_s: float = _PROBE_TIMEOUT_S
) -> bool:
    """Whether connections to ``dsn`` go through a transaction-mode (or statement-mode) pooler.

    Two connections A and B (unnamed statements only, so the probe itself works through any
    pooler). A reads its backend pid; B opens a transaction and reads its own, which a pooler
    most likely serves from the backend A just released; A reads its pid again. Postgres, or a
    session-mode pooler, gives A one backend for its whole life; a transaction-mode pooler
    has to give it another one while B holds it. Up to ``rounds`` rounds; a read of A that
    waits ``timeout_s`` seconds (a pooler with one server connection, held by B) counts as
    pooling too.

    Returns:
        True when A's backend changed (or A had to wait for B's transaction).

    Raises:
        OSError, asyncpg.PostgresError: the database cannot be reached.
    """
    a = await asyncpg.connect(dsn, **NO_CACHE)
    try:
        b = await asyncpg.connect(dsn, **NO_CACHE)
        try:
            first = await a.fetchval("SELECT pg_backend_pid()", timeout=timeout_s)
            for _ in range(rounds):
                # A's read first, so its backend is the one a pooler released last (PgBouncer
                # reuses server connections last in, first out) and B's BEGIN likely gets it.
                if await a.fetchval("SELECT pg_backend_pid()", timeout=timeout_s) != first:
                    return True
                async with b.transaction():
                    held = await b.fetchval("SELECT pg_backend_pid()", timeout=timeout_s)
                    try:
                        now = await a.fetchval("SELECT pg_backend_pid()", timeout=timeout_s)
                    except TimeoutError:
                        return True
                if now != first:
                    return True
                if held == first:
                    # B held A's backend and A still got it: impossible through a pooler.
                    return False
            return False
        finally:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(b.close(), timeout_s)
    finally:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(a.close(), timeout_s)


async def plan_each_execution(conn: asyncpg.Connection) -> None:
    """Pool connection hook: ``plan_cache_mode = force_custom_plan`` for the session.

    asyncpg prepares every statement under a name, and after five executions Postgres may
    switch a prepared statement to a generic plan that it keeps for the connection's life.
    Made while ``listener.jobs`` was empty (every fresh install), that plan can read jobs by a
    sequential scan, or through the index of every processing job, at any size later: a
    claim or a completion of 20 jobs then reads all of them. Planned for each execution, a
    statement sees the parameters and the table sizes of the moment; listener's statements
    are small, so planning costs little next to a wrong plan. The functions listener calls
    keep generic plans that read through indexes whatever the sizes (0021). Not used through
    a transaction-mode pooler: there every statement is unnamed, so planned for each
    execution anyway, and a session setting would reach other clients.
    """
    await conn.execute("SET plan_cache_mode = force_custom_plan")


async def reset_connection(conn: asyncpg.Connection) -> None:
    """Pool release hook: roll back a transaction left open, and nothing else.

    asyncpg's default reset runs ``SELECT pg_advisory_unlock_all(); CLOSE ALL; UNLISTEN *;
    RESET ALL`` on every release, a round trip on every query's critical path, and through a
    transaction-mode pooler it would run on some other client's server connection. Pooled
    connections here never LISTEN (the notifier has its own connection) and never change
    session state, so only an open transaction needs undoing.
    """
    if conn.is_in_transaction():
        await conn.execute("ROLLBACK")


@dataclass(frozen=True, slots=True)
class Database:
    """``database_url`` and how to talk to it: the only builder of asyncpg connections
    (the LISTEN connection aside, ``listener.queue.notify``).

    Attributes:
        dsn: the checked URL (a secret: never logged).
        transaction_pooler: it goes through a transaction-mode pooler, so no statement cache.
        reason: how that was decided, for the log and errors
            (``"LISTENER_POOLER=transaction"``, ``"port 6543"``, ``"probe: ..."``, ...).
        probed: decided by ``detect_transaction_pooling``.
    """

    dsn: str
    transaction_pooler: bool = False
    reason: str = "default"
    probed: bool = False

    def options(self) -> dict[str, Any]:
        """asyncpg ``connect``/``create_pool`` keyword arguments for this database."""
        return dict(NO_CACHE) if self.transaction_pooler else {}

    def pool_options(self) -> dict[str, Any]:
        """``options()`` plus, on a direct connection, ``plan_each_execution`` as the pool's
        ``init`` hook."""
        if self.transaction_pooler:
            return self.options()
        return self.options() | {"init": plan_each_execution}

    async def connect(self) -> asyncpg.Connection:
        """One connection (a command that runs its reads one after the other).

        Raises:
            OSError, asyncpg.PostgresError: the database cannot be reached.
        """
        return await asyncpg.connect(self.dsn, **self.options())

    async def create_pool(self, min_size: int, max_size: int) -> asyncpg.Pool:
        """A pool whose release only rolls back an open transaction (``reset_connection``).

        Raises:
            OSError, asyncpg.PostgresError: the database cannot be reached.
        """
        return await asyncpg.create_pool(
            self.dsn,
            min_size=min_size,
            max_size=max_size,
            reset=reset_connection,
            **self.pool_options(),
        )


async def resolve_database(
    dsn: str, mode: PoolerMode, *, listen_dsn: str | None = None, probe: bool = False
) -> Database:
    """Decide whether ``dsn`` goes through a transaction-mode pooler (see the module doc).

    Args:
        dsn: ``database_url``, checked (``Settings.dsn()``).
        mode: ``LISTENER_POOLER``.
        listen_dsn: ``listen_database_url`` when set; one set apart from ``dsn`` is a hint
            that ``dsn`` is a pooler, worth a probe.
        probe: probe in ``auto`` mode even without a hint (the daemon, once at start).

    Raises:
        OSError, asyncpg.PostgresError: a probe could not reach the database.
    """
    if mode == "transaction":
        return Database(dsn, True, "LISTENER_POOLER=transaction")
    if mode == "none":
        return Database(dsn, False, "LISTENER_POOLER=none")
    if url_says_transaction_pooler(dsn):
        return Database(dsn, True, f"port {SUPABASE_TRANSACTION_PORT}")
    hinted = (listen_dsn is not None and listen_dsn != dsn) or (
        port_of(dsn) == PGBOUNCER_DEFAULT_PORT
    )
    if not (probe or hinted):
        return Database(dsn, False, "no pooler hint")
    pooled = await detect_transaction_pooling(dsn)
    reason = "probe: its backend changes between transactions" if pooled else "probe"
    return Database(dsn, pooled, reason, probed=True)


async def check_listen_dsn(database: Database, listen_dsn: str | None, mode: PoolerMode) -> str:
    """The DSN the daemon may LISTEN on: a direct connection, never a transaction-mode pooler.

    Args:
        database: ``resolve_database``'s answer for ``database_url``.
        listen_dsn: ``listen_database_url`` (checked), or None when unset.
        mode: ``LISTENER_POOLER``; ``none`` trusts the URLs as they are.

    Returns:
        ``listen_dsn``, or ``database.dsn`` when it is unset and that is not a pooler.

    Raises:
        PoolerError: ``database_url`` is a transaction-mode pooler and no other URL is set for
            LISTEN, or the LISTEN URL goes through a transaction-mode pooler (by its port or
            by the probe).
        OSError, asyncpg.PostgresError: the probe could not reach the LISTEN URL.
    """
    if database.transaction_pooler and (listen_dsn is None or listen_dsn == database.dsn):
        raise PoolerError(
            "LISTENER_DATABASE_URL goes through a transaction-mode pooler "
            f"({database.reason}), where LISTEN cannot work: set "
            "LISTENER_LISTEN_DATABASE_URL to a direct connection (Supabase: the direct URL, "
            "or the session pooler on port 5432)"
        )
    target = listen_dsn if listen_dsn is not None else database.dsn
    if mode == "none":
        return target
    if url_says_transaction_pooler(target):
        raise PoolerError(
            f"LISTENER_LISTEN_DATABASE_URL uses port {SUPABASE_TRANSACTION_PORT}, a "
            "transaction-mode pooler, where LISTEN misses notifications: point it at a direct "
            "connection (Supabase: the direct URL, or the session pooler on port 5432)"
        )
    if target == database.dsn and database.probed:
        return target  # probed already, and not a pooler (else the first check raised)
    if await detect_transaction_pooling(target):
        name = "LISTENER_LISTEN_DATABASE_URL" if listen_dsn is not None else "LISTENER_DATABASE_URL"
        raise PoolerError(
            f"{name} goes through a transaction-mode pooler (its backend changes between "
            "transactions), where LISTEN misses notifications: point "
            "LISTENER_LISTEN_DATABASE_URL at a direct connection"
        )
    return target


async def open_database(settings: Settings, *, probe: bool = False) -> Database:
    """``resolve_database`` for ``Settings`` (``database_url``, ``listen_database_url``,
    ``pooler``), logging what was decided when it is a pooler.

    Raises:
        ValueError: no database URL, or one that does not parse.
        OSError, asyncpg.PostgresError: a probe could not reach the database.
    """
    listen = settings.listen_database_url
    database = await resolve_database(
        settings.dsn(),
        settings.pooler,
        listen_dsn=settings.listen_dsn() if listen is not None else None,
        probe=probe,
    )
    if database.transaction_pooler:
        logger.info(
            "LISTENER_DATABASE_URL goes through a transaction-mode pooler ({}): no named "
            "prepared statements, LISTEN on LISTENER_LISTEN_DATABASE_URL",
            database.reason,
        )
    return database
