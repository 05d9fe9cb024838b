"""The job store conformance suite runs every test against both stores.

``store_env`` gives a ``StoreEnv``: the store, and ``advance(seconds)`` that lets time pass
(a fake clock for the memory store; a real, short sleep for Postgres, whose clock is
``now()``).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

import asyncpg
import pytest

from listener.queue.memory_store import MemoryJobStore
from listener.queue.pg_store import PgJobStore
from listener.queue.store import JobStore

DEFAULT_MAX_ATTEMPTS = 3


class FakeClock:
    """Seconds that move only when told."""

    def __init__(self) -> None:
        self.now = 1_000.0

    def __call__(self) -> float:
        return self.now


@dataclass
class StoreEnv:
    """A store under test.

    Attributes:
        advance: let ``seconds`` pass (the memory store's fake clock; a real short sleep
            for Postgres, whose clock is ``now()``).
        idle: let ``seconds`` pass without a heartbeat from any preparing provider batch
            (Postgres: the batches' heartbeats are moved back, as ``now()`` cannot move).
    """

    store: JobStore
    advance: Callable[[float], Awaitable[None]]
    kind: str
    idle: Callable[[float], Awaitable[None]]


@pytest.fixture(params=["memory", "postgres"])
def store_kind(request: pytest.FixtureRequest) -> tuple[str, str | None]:
    """``("memory", None)`` or ``("postgres", DSN of a fresh migrated database)``.

    Synchronous: the database fixture runs its own event loop, which an async fixture's
    running loop would not allow.
    """
    if request.param == "postgres":
        return "postgres", request.getfixturevalue("database_url")
    return "memory", None


@pytest.fixture
async def store_env(store_kind: tuple[str, str | None]) -> AsyncIterator[StoreEnv]:
    _, database_url = store_kind
    if database_url is None:
        clock = FakeClock()

        async def advance_clock(seconds: float) -> None:
            clock.now += seconds

        yield StoreEnv(
            MemoryJobStore(clock, DEFAULT_MAX_ATTEMPTS), advance_clock, "memory", advance_clock
        )
        return
    pool = await asyncpg.create_pool(database_url, min_size=1, max_size=4)
    # The app table the tests' jobs belong to (public.images), attached; its rows stay empty:
    # the tests enqueue through the store.
    await pool.execute(
        "CREATE TABLE public.images (id bigint PRIMARY KEY, url text, owner_id text);"
        "SELECT listener.attach('public.images', 'id', 'url', 'owner_id')"
    )
    try:

        async def sleep(seconds: float) -> None:
            await asyncio.sleep(seconds)

        async def age_batches(seconds: float) -> None:
            await pool.execute(
                "UPDATE listener.batches SET updated_at = updated_at - make_interval(secs => $1)",
                seconds,
            )

        yield StoreEnv(PgJobStore(pool, DEFAULT_MAX_ATTEMPTS), sleep, "postgres", age_batches)
    finally:
        await pool.close()
