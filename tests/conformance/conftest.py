"""The store conformance suites run every test against both implementations.

``store_env`` gives a ``StoreEnv``: the job store and the analysis side's stores over the same
jobs (batches, reuse, face records), ``advance(seconds)`` that lets time pass (a fake clock for
the memory stores; a real, short sleep for Postgres, whose clock is ``now()``), and the app's
table (``insert_row``, ``delete_row``: rows of ``public.images``, which is attached in
Postgres).

Every store is wrapped in a ``Recorder``, which notes each method the tests call:
``test_coverage.py`` checks, once the suites have run, that every method of each protocol was
called on both implementations.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar, cast

import asyncpg
import pytest

from listener.analysis.batch_store import BatchStore, MemoryBatchStore, PgBatchStore
from listener.analysis.dedup_store import DedupStore, MemoryDedupStore, PgDedupStore
from listener.analysis.effects import effect_kinds
from listener.analysis.face_store import FaceStore, MemoryFaceStore, PgFaceStore, pg_effect_writers
from listener.queue.memory_store import MemoryJobStore
from listener.queue.pg_store import PgJobStore
from listener.queue.store import JobStore

DEFAULT_MAX_ATTEMPTS = 3
T = "public.images"

CALLED: dict[tuple[str, str], set[str]] = {}
"""Methods called through a ``Recorder``: ``{(protocol, store kind): {method, ...}}``."""

_S = TypeVar("_S")


class Recorder(Generic[_S]):
    """Passes every attribute through to ``inner``, noting the methods called."""

    def __init__(self, inner: _S, protocol: str, kind: str) -> None:
        self._inner = inner
        self._called = CALLED.setdefault((protocol, kind), set())

    def __getattr__(self, name: str) -> Any:
        value = getattr(self._inner, name)
        if callable(value) and not name.startswith("_"):
            self._called.add(name)
        return value


def recorded(inner: _S, protocol: type[Any], kind: str) -> _S:
    return cast(_S, Recorder(inner, protocol.__name__, kind))


SUITES = ("test_job_store.py", "test_batch_store.py", "test_dedup_store.py")
"""The conformance modules whose calls ``test_coverage.py`` counts."""

COMPLETE: list[bool] = [False]
"""Whether this session runs every test of ``SUITES`` (then the coverage check applies)."""


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Run the coverage check last, and only judge it when every suite test is collected."""
    last = [i for i in items if i.path.name == "test_coverage.py"]
    rest = [i for i in items if i.path.name != "test_coverage.py"]
    items[:] = rest + last
    modules = {i.path.name for i in rest if i.path.parent.name == "conformance"}
    COMPLETE[0] = set(SUITES) <= modules and not (
        config.getoption("keyword") or config.getoption("markexpr") or config.getoption("lf")
    )


class FakeClock:
    """Seconds that move only when told."""

    def __init__(self) -> None:
        self.now = 1_000.0

    def __call__(self) -> float:
        return self.now


@dataclass
class StoreEnv:
    """The stores under test.

    Attributes:
        store: the job store.
        batches, dedup, faces: the analysis side's stores over the same jobs.
        advance: let ``seconds`` pass (the memory store's fake clock; a real short sleep
            for Postgres, whose clock is ``now()``).
        idle: let ``seconds`` pass without a heartbeat from any preparing provider batch
            (Postgres: the batches' heartbeats are moved back, as ``now()`` cannot move).
        insert_row: the app inserts (id, url, owner) into ``public.images`` (ids are
            integers: the Postgres table's key is a bigint); the row waits for admission.
        delete_row: the app deletes a row of ``public.images``.
    """

    store: JobStore
    advance: Callable[[float], Awaitable[None]]
    kind: str
    idle: Callable[[float], Awaitable[None]]
    batches: BatchStore
    dedup: DedupStore
    faces: FaceStore
    insert_row: Callable[[int, str | None, str | None], Awaitable[None]]
    delete_row: Callable[[int], Awaitable[None]]


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
    kind, database_url = store_kind
    if database_url is None:
        clock = FakeClock()
        jobs = MemoryJobStore(clock, DEFAULT_MAX_ATTEMPTS, effects=effect_kinds())

        async def advance_clock(seconds: float) -> None:
            clock.now += seconds

        async def insert_memory(row_id: int, url: str | None, owner: str | None) -> None:
            jobs.insert_row(T, str(row_id), url, owner)

        async def delete_memory(row_id: int) -> None:
            jobs.delete_row(T, str(row_id))

        yield StoreEnv(
            recorded(jobs, JobStore, kind),
            advance_clock,
            kind,
            advance_clock,
            recorded(MemoryBatchStore(jobs), BatchStore, kind),
            recorded(MemoryDedupStore(jobs), DedupStore, kind),
            recorded(MemoryFaceStore(jobs), FaceStore, kind),
            insert_memory,
            delete_memory,
        )
        return
    pool = await asyncpg.create_pool(database_url, min_size=1, max_size=4)
    # The app table the tests' jobs belong to (public.images), attached; the tests enqueue
    # through the store, or insert rows for admission.
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

        async def insert_pg(row_id: int, url: str | None, owner: str | None) -> None:
            await pool.execute(
                "INSERT INTO public.images (id, url, owner_id) VALUES ($1, $2, $3)",
                row_id,
                url,
                owner,
            )

        async def delete_pg(row_id: int) -> None:
            await pool.execute("DELETE FROM public.images WHERE id = $1", row_id)

        yield StoreEnv(
            recorded(
                PgJobStore(pool, DEFAULT_MAX_ATTEMPTS, effects=pg_effect_writers()), JobStore, kind
            ),
            sleep,
            kind,
            age_batches,
            recorded(PgBatchStore(pool), BatchStore, kind),
            recorded(PgDedupStore(pool), DedupStore, kind),
            recorded(PgFaceStore(pool), FaceStore, kind),
            insert_pg,
            delete_pg,
        )
    finally:
        await pool.close()
