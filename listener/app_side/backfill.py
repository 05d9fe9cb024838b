"""Backfill: enqueue the rows of an attached table that never got a job, and follow them.

Enqueueing is chunked ``INSERT ... SELECT`` in id order (``listener.backfill_chunk``), so memory
stays flat whatever the table's size and each chunk is one short transaction. Rows that
already have a job are skipped, so running it again is safe. Backfilled jobs get a lower
priority than fresh uploads, which keep flowing while a backfill drains.

With ``--where`` (a predicate on the app table) or ``--limit-per-owner``, the rows are chosen
first by ``select_rows``, in a READ ONLY transaction with the operator's own rights (the
predicate is parsed by Postgres and cannot write, whatever it contains), then enqueued by id,
in chunks, through ``listener.backfill_ids`` (``ON CONFLICT DO NOTHING``: a row that got a job
meanwhile keeps it).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime

import asyncpg

from listener.db.queries import Attachment, Queries, TableProgress


class SelectionError(ValueError):
    """The selection cannot be used (e.g. ``--limit-per-owner`` on a table without owners)."""


@dataclass(frozen=True, slots=True)
class SelectedRow:
    """A row chosen for backfill: its id and owner, as text."""

    id: str
    owner: str | None


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
    max_attempts: int | None = None,
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
        max_attempts: attempts each job is allowed; ``None`` (the default): the daemon's
            ``LISTENER_MAX_ATTEMPTS``, filled in at the job's first claim as for the jobs the
            triggers enqueue, so both get the same.
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


async def select_rows(
    pool: asyncpg.Pool,
    attachment: Attachment,
    *,
    where: str | None = None,
    owner: str | None = None,
    limit_per_owner: int | None = None,
    limit: int | None = None,
) -> list[SelectedRow]:
    """The rows of ``attachment``'s table without a job that the selection names, in id order.

    ``where`` is the operator's SQL predicate on the table (alias ``s`` or plain column names),
    run in a READ ONLY transaction; ``limit_per_owner`` keeps the first N rows (by id) of each
    owner; ``limit`` caps the total.

    Raises:
        SelectionError: ``owner`` or ``limit_per_owner`` on a table without an owner column,
            or a limit below 1.
        asyncpg.PostgresError: the predicate is not valid SQL, or tried to write
            (``ReadOnlySQLTransactionError``).
    """
    if (owner is not None or limit_per_owner is not None) and attachment.owner_column is None:
        raise SelectionError(f"{attachment.source_table} was attached without --owner-column")
    if (limit_per_owner is not None and limit_per_owner < 1) or (limit is not None and limit < 1):
        raise SelectionError("limits must be at least 1")
    async with pool.acquire() as conn, conn.transaction(readonly=True):
        id_col = await conn.fetchval("SELECT quote_ident($1)", attachment.id_column)
        owner_expr = "NULL::text"
        if attachment.owner_column is not None:
            owner_col = await conn.fetchval("SELECT quote_ident($1)", attachment.owner_column)
            owner_expr = f"s.{owner_col}::text"
        query = f"""
            SELECT q.id, q.owner FROM (
                SELECT s.{id_col}::text AS id, {owner_expr} AS owner, s.{id_col} AS sort_key,
                       row_number() OVER (PARTITION BY {owner_expr} ORDER BY s.{id_col}) AS n
                FROM {attachment.source_table} AS s
                WHERE NOT EXISTS (
                        SELECT 1 FROM listener.jobs AS j
                        WHERE j.source_table = $1 AND j.source_id = s.{id_col}::text)
                  AND ($2::text IS NULL OR {owner_expr} = $2)
                  AND ({where or "true"})
            ) AS q
            WHERE ($3::bigint IS NULL OR q.n <= $3)
            ORDER BY q.sort_key
            LIMIT $4"""
        rows = await conn.fetch(query, attachment.source_table, owner, limit_per_owner, limit)
    return [SelectedRow(r["id"], r["owner"]) for r in rows]


async def enqueue_rows(
    queries: Queries,
    table: str,
    ids: Sequence[str],
    *,
    chunk_size: int = 5000,
    priority: int = 100,
    max_attempts: int | None = None,
    batch: bool | None = None,
    on_chunk: Callable[[int, int], None] | None = None,
    stop: asyncio.Event | None = None,
) -> dict[str | None, int]:
    """Enqueue rows ``ids`` of ``table`` that have no job, ``chunk_size`` per statement;
    ``max_attempts`` as in ``enqueue_backfill``.

    Returns:
        Jobs created per owner (rows that got a job meanwhile are not counted).
    """
    created: dict[str | None, int] = {}
    for start in range(0, len(ids), chunk_size):
        chunk = await queries.backfill_ids(
            table, ids[start : start + chunk_size], priority, max_attempts, batch
        )
        for owner, n in chunk.items():
            created[owner] = created.get(owner, 0) + n
        if on_chunk is not None:
            on_chunk(min(start + chunk_size, len(ids)), sum(created.values()))
        if stop is not None and stop.is_set():
            break
    return created
