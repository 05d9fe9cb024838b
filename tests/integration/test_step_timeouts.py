"""A step that hangs on real Postgres: its job is retried, then failed, and lets go of its lease."""

from __future__ import annotations

import asyncio

import asyncpg
from awaiting import jobs_finished, when
from support import counts, fast_settings, make_table

from listener.analysis.providers.base import ImageInput, StepContext, StepResult
from listener.app import Daemon


class HangingProvider:
    """Never returns for the rows in ``hang``; answers at once for the others.

    Attributes:
        calls: source ids, one per call.
        cancelled: source ids whose hung call was cancelled (abandoned by the dispatcher).
    """

    name = "hanging"
    needs_image = False

    def __init__(self, hang: set[str]) -> None:
        self.hang = hang
        self.calls: list[str] = []
        self.cancelled: list[str] = []
        self.hung = asyncio.Event()

    async def start(self) -> None:
        """Nothing to start."""

    async def close(self) -> None:
        """Nothing to close."""

    def estimate_tokens(self, kind: str, image: ImageInput) -> int:
        """Not token-priced."""
        return 0

    async def run(self, kind: str, image: ImageInput, context: StepContext) -> StepResult:
        """Hang forever for the rows in ``hang``; else a result at once."""
        self.calls.append(image.source_id)
        if image.source_id in self.hang:
            self.hung.set()
            try:
                await asyncio.Event().wait()
            except asyncio.CancelledError:
                self.cancelled.append(image.source_id)
                raise
        return StepResult("hanging", "hanging.step", {"source_id": image.source_id}, "test")


async def test_a_hung_step_is_retried_then_failed_while_other_rows_complete(
    database_url: str, conn: asyncpg.Connection
) -> None:
    table = await make_table(conn, status=True)
    await conn.execute(f"INSERT INTO {table} (url) SELECT 'u' || g FROM generate_series(1, 20) g")
    stuck = await conn.fetchval(f"SELECT id::text FROM {table} WHERE url = 'u7'")
    await conn.execute("UPDATE listener.jobs SET max_attempts = 2")
    provider = HangingProvider({stuck})
    # The timeout is far shorter than the lease, which the heartbeat would renew forever.
    settings = fast_settings(database_url, step_timeouts={"hanging": 0.5}, max_attempts=2)
    async with Daemon(settings, providers=[provider], health=False) as daemon:
        await asyncio.wait_for(provider.hung.wait(), timeout=20)
        # While the stuck job hangs, the others complete.
        await when(lambda: _complete(conn, 19), daemon.signals, "finished", timeout=20)
        await jobs_finished(daemon, conn, 20, timeout=30)
        assert daemon.worker is not None and daemon.worker.in_flight == 0
    assert await counts(conn) == {"complete": 19, "failed": 1}
    job = await conn.fetchrow(
        "SELECT status, attempts, last_error, lease_token, lease_expires_at "
        "FROM listener.jobs WHERE source_id = $1",
        stuck,
    )
    assert dict(job) == {
        "status": "failed",
        "attempts": 2,
        "last_error": "step hanging.step timed out after 0.5s (gave up after 2 attempts)",
        "lease_token": None,
        "lease_expires_at": None,
    }
    assert await conn.fetchval(f"SELECT status FROM {table} WHERE id::text = $1", stuck) == (
        "failed"
    )
    # Each attempt's hung call was abandoned, not left running.
    assert provider.calls.count(stuck) == 2 and provider.cancelled == [stuck, stuck]
    assert len(provider.calls) == 21


async def _complete(conn: asyncpg.Connection, n: int) -> bool:
    return (await counts(conn)).get("complete", 0) >= n
