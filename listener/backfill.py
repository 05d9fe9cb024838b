"""Backfill: enqueue the rows of an attached table that never got a job, and follow them.

Enqueueing is chunked ``INSERT ... SELECT`` in id order (``listener.backfill_chunk``), so memory
stays flat whatever the table's size and each chunk is one short transaction. Rows that
already have a job are skipped, so running it again is safe. Backfilled jobs get a lower
priority than fresh uploads, which keep flowing while a backfill drains.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime

from listener.db.queries import Queries, TableProgress


@dataclass(frozen=True, slots=True)
class BackfillReport:
    """Rows scanned and jobs enqueued by one backfill, and how long it took (seconds)."""

    scanned: int
    enqueued: int
    seconds: float


async def enqueue_backfill(
    queries: Queries,
    table: str,
    *,
    owner: str | None = None,
    limit: int | None = None,
    chunk_size: int = 5000,
    priority: int = 100,
    max_attempts: int = 5,
    on_chunk: Callable[[int, int], None] | None = None,
    stop: asyncio.Event | None = None,
    batch: bool | None = None,
) -> BackfillReport:
    """Enqueue jobs for the rows of ``table`` (of ``owner``) that have none.

    Args:
        queries: the named queries.
        table: an attached table (as given to ``listener attach``).
        owner: only rows of this owner (the table must have an owner column).
        limit: enqueue at most this many jobs.
        chunk_size: rows scanned per statement.
        priority: the jobs' priority (lower runs first; fresh uploads are 0).
        max_attempts: attempts each job is allowed.
        on_chunk: called after each chunk with (rows scanned so far, jobs enqueued so far).
        batch: ``True`` sends the jobs' OpenAI steps through the Batch API.
        stop: when set, stop after the current chunk (what was enqueued stays enqueued, and
            running the backfill again continues where this one stopped).

    Raises:
        asyncpg.UndefinedObjectError: the table is not attached.
        asyncpg.RaiseError: ``owner`` was given but the table has no owner column.
    """
    started = time.perf_counter()
    after: str | None = None
    scanned = enqueued = 0
    while limit is None or enqueued < limit:
        size = chunk_size if limit is None else min(chunk_size, limit - enqueued)
        chunk = await queries.backfill_chunk(
            table, after, size, owner, priority, max_attempts, batch
        )
        scanned += chunk.scanned
        enqueued += chunk.enqueued
        if on_chunk is not None:
            on_chunk(scanned, enqueued)
        if chunk.last_id is None or chunk.scanned < size or (stop and stop.is_set()):
            break
        after = chunk.last_id
    return BackfillReport(scanned, enqueued, time.perf_counter() - started)


async def follow(
    queries: Queries,
    table: str,
    owner: str | None,
    since: datetime,
    on_progress: Callable[[TableProgress], None],
    stop: asyncio.Event,
    interval_s: float = 0.5,
) -> TableProgress:
    """Poll the table's progress until nothing is pending or processing, or ``stop`` is set.

    Returns:
        The last progress seen.
    """
    while True:
        progress = await queries.table_progress(table, owner, since)
        on_progress(progress)
        if progress.remaining == 0 or stop.is_set():
            return progress
        try:
            await asyncio.wait_for(stop.wait(), interval_s)
        except TimeoutError:
            continue
