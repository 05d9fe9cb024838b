"""Typed access to the named queries of ``sql/queries.sql``: one method per query.

The SQL lives in the ``.sql`` file; this module only binds parameters and turns records into
listener's dataclasses. Every method takes its connection from the pool it was given, so a
connection lost to a Postgres restart is replaced on the next call.
"""

from __future__ import annotations

import functools
import json
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import date, datetime
from typing import Any, Protocol, TypeVar
from uuid import UUID

import asyncpg

from listener.db.sqlfiles import NamedQuery, parse_named_queries, sql_dir
from listener.queue.pauses import Pause

T = TypeVar("T")


class LimiterState(Protocol):
    """A provider's shared limiter state as stored in ``listener.provider_limits``: epoch
    seconds on the database's clock (``listener.analysis.ratelimit.FleetState``)."""

    request_tat: float
    token_tat: float
    paused_until: float


S = TypeVar("S", bound=LimiterState)


@dataclass(frozen=True, slots=True)
class QueueCounts:
    """Jobs per status, and the age of the oldest pending job in seconds."""

    pending: int
    processing: int
    complete: int
    failed: int
    oldest_pending_s: float
    cancelled: int = 0
    batched: int = 0

    def as_dict(self) -> dict[str, float | int]:
        """Counts as ``{"pending": n, "processing": n, "complete": n, "failed": n}``.

        Plus ``"oldest_pending_s"``, seconds.
        """
        return {
            "pending": self.pending,
            "processing": self.processing,
            "complete": self.complete,
            "failed": self.failed,
            "cancelled": self.cancelled,
            "batched": self.batched,
            "oldest_pending_s": round(self.oldest_pending_s, 3),
        }


OUTBOXES = ("status", "events", "deleted", "inserted")
"""The outboxes the ``outboxes`` query reports, in its order: the status write-back's
(``listener.status_outbox``), the webhook events' (``listener.event_outbox``), the deleted
rows' (``listener.deleted_rows``) and the inserted rows' (``listener.inserted_rows``)."""

OUTBOX_EXACT_UP_TO = 10_000
"""An outbox's depth is counted exactly up to this many rows; beyond, it is the planner's
estimate (``OutboxDepth.exact`` is false). The ``outboxes`` query holds the same number."""


@dataclass(frozen=True, slots=True)
class OutboxDepth:
    """One outbox listener keeps in Postgres, as the ``outboxes`` query reads it.

    Attributes:
        outbox: its name, one of ``OUTBOXES``.
        table: the table holding it (``listener.status_outbox``, ...).
        depth: rows waiting; exact up to ``OUTBOX_EXACT_UP_TO``, the planner's estimate
            (``pg_class.reltuples``, at least ``OUTBOX_EXACT_UP_TO + 1``) beyond.
        exact: whether ``depth`` was counted (false: estimated).
        oldest_age_s: seconds the oldest waiting row has waited, 0 when none waits.
    """

    outbox: str
    table: str
    depth: int
    exact: bool
    oldest_age_s: float

    def as_dict(self) -> dict[str, Any]:
        """``{"table": name, "depth": n, "depth_exact": bool, "oldest_age_s": s}``, the age
        rounded to milliseconds."""
        return {
            "table": self.table,
            "depth": self.depth,
            "depth_exact": self.exact,
            "oldest_age_s": round(self.oldest_age_s, 3),
        }


@dataclass(frozen=True, slots=True)
class Attachment:
    """One attached table, the columns listener reads from and those it writes back to.

    ``status_column`` gets the job's status, ``result_column`` (jsonb) its step outputs keyed
    by step, ``error_column`` its last error (``NULL`` on success), ``analyzed_at_column`` when
    it completed; each is ``None`` when not configured.
    """

    source_table: str
    id_column: str
    id_type: str
    url_column: str
    owner_column: str | None
    status_column: str | None
    result_column: str | None = None
    error_column: str | None = None
    analyzed_at_column: str | None = None


@dataclass(frozen=True, slots=True)
class BackfillChunk:
    """The outcome of one backfill chunk: last id scanned (``None`` at the end), counts."""

    last_id: str | None
    scanned: int
    enqueued: int


@dataclass(frozen=True, slots=True)
class TableProgress:
    """Jobs of a table still to do, those finished since a given time, and their cost (USD)."""

    remaining: int
    complete: int
    failed: int
    spend_usd: float = 0.0


@dataclass(frozen=True, slots=True)
class WriteBackRound:
    """One call of ``listener.write_back_status``.

    Attributes:
        picked: outbox rows taken (at most the limit asked for).
        written: app rows whose write-back columns changed.
        deferred: rows left queued: their app row was held by someone else, or their table
            failed (see ``errors``).
        last_job_id: the last job id taken, where the next call resumes; ``None`` when none
            was taken (the end of the outbox).
        errors: ``"table: message"`` for each table whose write failed.
    """

    picked: int
    written: int
    deferred: int
    last_job_id: int | None
    errors: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class OutboxEvent:
    """One claimed row of ``listener.event_outbox``.

    Attributes:
        id: the outbox id, sent as the body's ``event_id`` (signed; receivers deduplicate on
            it) and as ``X-Listener-Event-Id``.
        body: the event as stored, JSON text (``{"table", "row_id", "status", "job_id"}``);
            ``listener.app_side.webhooks.event_body`` adds ``event_id`` to make the bytes POSTed and
            signed.
        attempts: deliveries started, this one included (>= 1).
    """

    id: int
    body: str
    attempts: int


@dataclass(frozen=True, slots=True)
class DeletedRowEntry:
    """One claimed row of ``listener.deleted_rows`` (0014).

    Attributes:
        id: the outbox id.
        source_table, source_id: the deleted (or re-inserted) app row.
        job_id: the row's job when it was deleted (``None``: it had none).
        reinserted: the row was inserted again while that job held its key.
        attempts: passes started, this one included (>= 1); fences the acknowledgement.
    """

    id: int
    source_table: str
    source_id: str
    job_id: int | None
    reinserted: bool
    attempts: int


@functools.cache
def load_queries() -> dict[str, NamedQuery]:
    """Parse ``sql/queries.sql`` (once per process)."""
    return parse_named_queries((sql_dir() / "queries.sql").read_text(encoding="utf-8"))


class Queries:
    """The runtime queries, bound to a pool (or to one connection, inside a transaction).

    Args:
        pool: an ``asyncpg.Pool``, where each call acquires and releases one connection; or
            an ``asyncpg.Connection``, for queries that must share a transaction.
    """

    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool
        self._sql = {name: q.sql for name, q in load_queries().items()}

    @property
    def pooled(self) -> bool:
        """True when bound to a pool: independent reads may then run at the same time."""
        return isinstance(self._pool, asyncpg.Pool)

    # Typed reads only: job state is written by the job store (listener.queue.pg_store).

    async def _dicts(self, name: str, *args: Any) -> list[dict[str, Any]]:
        return [dict(r) for r in await self._pool.fetch(self._sql[name], *args)]

    async def known_face_ids(self, face_ids: Sequence[str]) -> set[str]:
        """Which of ``face_ids`` (Rekognition FaceIds) listener has recorded."""
        rows = await self._pool.fetch(self._sql["known_face_ids"], list(face_ids))
        return {r[0] for r in rows}

    async def record_face_intent(
        self, job_id: int, claims: int, lease_token: UUID, collection: str, external_id: str
    ) -> bool:
        """Record an IndexFaces request before it is sent (``record_face_intent``), fenced by
        the lease; ``False`` when the lease is lost (then it must not be sent)."""
        found = await self._pool.fetchval(
            self._sql["record_face_intent"], job_id, claims, lease_token, collection, external_id
        )
        return found is not None

    async def earlier_face_intents(self, job_id: int, claims: int) -> list[tuple[str, str]]:
        """IndexFaces requests of claims of ``job_id`` before ``claims`` that were never
        stored: ``[(collection, ExternalImageId)]`` (``earlier_face_intents``)."""
        rows = await self._pool.fetch(self._sql["earlier_face_intents"], job_id, claims)
        return [(r["collection_id"], r["external_image_id"]) for r in rows]

    async def nearest_faces(
        self,
        collection: str,
        embedding: Sequence[float],
        source_table: str,
        source_id: str,
        max_distance: float,
        limit: int,
    ) -> list[tuple[str, float]]:
        """The faces of ``collection`` within Euclidean ``max_distance`` of ``embedding``,
        nearest first, at most ``limit``, leaving out the app row's own faces:
        ``[(face_id, distance)]`` (``nearest_faces``)."""
        rows = await self._pool.fetch(
            self._sql["nearest_faces"],
            collection,
            list(embedding),
            source_table,
            source_id,
            max_distance,
            limit,
        )
        return [(r["face_id"], float(r["distance"])) for r in rows]

    async def row_face_ids(self, source_table: str, source_id: str) -> dict[str, list[str]]:
        """The FaceIds recorded for one app row, by collection: ``{collection_id: [face_id]}``."""
        rows = await self._pool.fetch(self._sql["row_face_ids"], source_table, source_id)
        found: dict[str, list[str]] = {}
        for r in rows:
            found.setdefault(r["collection_id"], []).append(r["face_id"])
        return found

    async def status_outbox_waiting(self) -> bool:
        """True when some job's status waits to be written back to its app row."""
        return bool(await self._pool.fetchval(self._sql["status_outbox_waiting"]))

    async def recent_rate(self, window_s: float) -> float:
        """Jobs finished per second over the last ``window_s`` seconds."""
        return float(await self._pool.fetchval(self._sql["recent_rate"], window_s))

    async def counts_by_table(self) -> list[dict[str, Any]]:
        """``[{"table", "pending", "processing", "complete", "failed", "cancelled",
        "batched"}]``, one per table with jobs."""
        return await self._dicts("counts_by_table")

    async def counts_by_owner(self, limit: int) -> list[dict[str, Any]]:
        """``[{"table", "owner", counts...}]`` for the ``limit`` owners with most work left."""
        return await self._dicts("counts_by_owner", limit)

    async def failure_reasons(self, limit: int) -> list[dict[str, Any]]:
        """``[{"reason", "count"}]``: the most common reasons of failed jobs."""
        return await self._dicts("failure_reasons", limit)

    async def recent_failures(self, limit: int) -> list[dict[str, Any]]:
        """``[{"job_id", "table", "source_id", "url", "error", "at"}]``, newest first."""
        return await self._dicts("recent_failures", limit)

    async def throughput_per_minute(self) -> list[dict[str, Any]]:
        """``[{"minute", "complete", "failed"}]`` over the last hour."""
        return await self._dicts("throughput_per_minute")

    async def open_batches(self) -> list[dict[str, Any]]:
        """Provider batches not applied yet, oldest first."""
        return await self._dicts("open_batches")

    async def face_review_waiting(self, limit: int) -> tuple[int, list[dict[str, Any]]]:
        """Open face suggestions: their total, and ``[{"owner", "suggestions"}]`` for the
        ``limit`` owners with the most (from the counters: O(owners with open ones))."""
        rows = await self._dicts("face_review_waiting", limit)
        total = int(rows[0]["total"]) if rows else 0
        return total, [{"owner": r["owner"], "suggestions": int(r["suggestions"])} for r in rows]

    # -- provider batches: bookkeeping of listener.batches only (job state: the JobStore) --

    async def batch_waiting(self, step: str) -> tuple[int, float]:
        """Jobs waiting for a batch of ``step``: how many, and the oldest's wait in seconds."""
        r = await self._pool.fetchrow(self._sql["batch_waiting"], step)
        return int(r["waiting"]), float(r["oldest_s"])

    async def open_batch_rows(self) -> list[dict[str, Any]]:
        """Batches not applied yet, oldest first: ``[{"id", "provider_batch_id", "step",
        "status", "input_file_id", "requests", "created_at"}]``."""
        return await self._dicts("open_batch_rows")

    async def batch_submitted(self, batch_id: str, provider_batch_id: str, status: str) -> bool:
        """Batch ``batch_id`` is ``provider_batch_id`` at the provider (``status``): record it.

        Returns:
            ``False`` when the row does not take it: it was closed, or holds another provider
            batch (then the provider's batch is not listener's and must be cancelled).
        """
        return bool(
            await self._pool.fetchval(
                self._sql["batch_submitted"], batch_id, provider_batch_id, status
            )
        )

    async def claim_batch_create(self, batch_id: str, stale_s: float) -> bool:
        """Claim the creation of recorded batch ``batch_id`` at the provider (``creating``);
        a claim not heard of for ``stale_s`` seconds may be taken over. ``False``: another
        daemon holds it, or the batch has its provider id, or is closed."""
        return bool(await self._pool.fetchval(self._sql["claim_batch_create"], batch_id, stale_s))

    async def release_batch_create(self, batch_id: str) -> None:
        """The provider refused to create ``batch_id``: drop the claim, so it is tried again."""
        await self._pool.execute(self._sql["release_batch_create"], batch_id)

    async def installation_id(self) -> str:
        """This database's listener installation id (``listener.installation``)."""
        return str(await self._pool.fetchval(self._sql["installation_id"]))

    async def batch_records(self, batch_ids: Sequence[str]) -> dict[str, dict[str, Any]]:
        """What listener knows of ``batch_ids`` (its own ids), by id: ``{"provider_batch_id",
        "status", "closed"}``; unknown ids are left out."""
        rows = await self._pool.fetch(self._sql["batch_records"], list(batch_ids))
        return {
            r["id"]: {
                "provider_batch_id": r["provider_batch_id"],
                "status": r["status"],
                "closed": r["closed"],
            }
            for r in rows
        }

    async def prune_unsent_batches(self, older_than_s: float, limit: int) -> int:
        """Delete up to ``limit`` batches that never reached the provider (``empty``,
        ``abandoned``) closed more than ``older_than_s`` seconds ago; returns how many."""
        return int(
            await self._pool.fetchval(self._sql["prune_unsent_batches"], older_than_s, limit)
        )

    async def batch_progress(self, batch_id: str, state: Mapping[str, Any]) -> None:
        """Record a batch's state as the provider reports it (``OpenAIProvider.retrieve_batch``:
        ``{"status", "completed", "failed", "output_file_id", "error_file_id", "error"}``)."""
        await self._pool.execute(
            self._sql["batch_progress"],
            batch_id,
            state["status"],
            state["completed"],
            state["failed"],
            state["output_file_id"],
            state["error_file_id"],
            state["error"],
        )

    async def batch_requests(self, batch_id: str) -> dict[str, int]:
        """The requests of a batch: ``{custom_id: job id}``."""
        rows = await self._pool.fetch(self._sql["batch_request_jobs"], batch_id)
        return {r["custom_id"]: r["job_id"] for r in rows}

    async def close_batch(self, batch_id: str, status: str) -> bool:
        """Close a batch that holds no job any more, with ``status``: marked applied, no job
        touched. ``False`` when it was closed or applied already."""
        return bool(await self._pool.fetchval(self._sql["close_batch"], batch_id, status))

    async def sample_unqueued(self, table: str, owner: str | None, limit: int) -> list[str]:
        """Image URLs of up to ``limit`` rows of ``table`` (of ``owner``) without a job."""
        rows = await self._pool.fetch(self._sql["sample_unqueued"], table, owner, limit)
        return [r[0] for r in rows]

    async def step_history(self, tier1_steps: Sequence[str]) -> list[dict[str, Any]]:
        """Per step: ``{"step", "results", "input_tokens", "output_tokens", "calls",
        "pass_rate", "reuse_rate"}`` over the most recent 5,000 results (token and call
        averages over the paid ones; ``reuse_rate``: the share that were copies)."""
        return await self._dicts("step_history", list(tier1_steps))

    async def spend_since(self, since: datetime) -> dict[str, float]:
        """USD recorded since ``since``, per provider."""
        rows = await self._pool.fetch(self._sql["spend_since"], since)
        return {r["provider"]: float(r["usd"]) for r in rows}

    async def update_provider_limit(
        self,
        provider: str,
        state_type: Callable[[float, float, float], S],
        update: Callable[[S, float], T],
        pause_reason: str | None = None,
    ) -> tuple[T, float, float]:
        """Apply ``update(state, now)`` to a provider's shared limiter state, atomically.

        ``state_type(request_tat, token_tat, paused_until)`` builds the state ``update``
        mutates (``listener.analysis.ratelimit.FleetState``); its three attributes are saved.

        The row is locked for the duration, so daemons reserving at the same moment queue.
        ``now`` is the database clock (epoch seconds), the one clock the fleet shares.

        Returns:
            ``update``'s return value, ``now``, and ``time.monotonic()`` when ``now`` was read
            (so a caller can turn a database time into a local deadline without counting the
            commit's latency).
        """
        async with self._pool.acquire() as conn, conn.transaction():
            row = await conn.fetchrow(self._sql["lock_provider_limit"], provider)
            if row is None:
                await conn.execute(self._sql["ensure_provider_limit"], provider)
                row = await conn.fetchrow(self._sql["lock_provider_limit"], provider)
            read_at = time.monotonic()
            state = state_type(row["request_tat"], row["token_tat"], row["paused_until"])
            now = float(row["now"])
            value = update(state, now)
            await conn.execute(
                self._sql["save_provider_limit"],
                provider,
                state.request_tat,
                state.token_tat,
                state.paused_until,
                pause_reason,
            )
        return value, now, read_at

    async def provider_pauses(self) -> dict[str, dict[str, Any]]:
        """Providers paused now: ``{name: {"remaining_s": s, "reason": text}}``."""
        rows = await self._pool.fetch(self._sql["provider_pauses"])
        return {
            r["provider"]: {"remaining_s": round(r["remaining_s"], 1), "reason": r["pause_reason"]}
            for r in rows
        }

    async def roll_up_job_counts(self) -> int:
        """Fold the counters' deltas into the counts (jobs, spend and deduplication
        savings); delta rows folded, 0 when another rollup is running (it never waits for
        one)."""
        return int(await self._pool.fetchval(self._sql["roll_up_job_counts"]))

    async def roll_up_face_review_counts(self) -> int:
        """Fold the open face suggestions' deltas into their counts; delta rows folded (0 when
        another rollup was running)."""
        return int(await self._pool.fetchval(self._sql["roll_up_face_review_counts"]))

    async def dedup_totals(self, since: date) -> dict[str, dict[str, float | int]]:
        """What deduplication saved, per provider: ``{provider: {"steps_since": n,
        "usd_since": usd, "steps_total": n, "usd_total": usd}}`` (``since``: UTC days from
        that day on)."""
        rows = await self._pool.fetch(self._sql["dedup_totals"], since)
        return {
            r["provider"]: {
                "steps_since": int(r["steps_since"]),
                "usd_since": float(r["usd_since"]),
                "steps_total": int(r["steps_total"]),
                "usd_total": float(r["usd_total"]),
            }
            for r in rows
        }

    async def oldest_pending(self) -> float:
        """Seconds the longest-waiting runnable pending job has waited (now - run_after)."""
        return float(await self._pool.fetchval(self._sql["oldest_pending"]))

    async def spend_totals(self, since: date) -> dict[str, tuple[float, float]]:
        """USD per provider: ``{provider: (on UTC days from since on, in all)}``."""
        rows = await self._pool.fetch(self._sql["spend_totals"], since)
        return {r["provider"]: (float(r["since"]), float(r["total"])) for r in rows}

    async def active_pauses(self) -> list[Pause]:
        """Operator pauses in force now (``listener pause``)."""
        return [
            Pause(r["provider"], r["reason"], r["remaining_s"])
            for r in await self._pool.fetch(self._sql["active_pauses"])
        ]

    async def backfill_ids(
        self,
        table: str,
        ids: Sequence[str],
        priority: int,
        max_attempts: int | None = None,
        batch: bool | None = None,
    ) -> dict[str | None, int]:
        """Enqueue rows ``ids`` of ``table`` that have no job; jobs created per owner.
        ``max_attempts`` ``None``: the daemon's ``LISTENER_MAX_ATTEMPTS`` at the first claim,
        as for the jobs the triggers enqueue."""
        rows = await self._pool.fetch(
            self._sql["backfill_ids"], table, list(ids), priority, max_attempts, batch
        )
        return {r["owner_id"]: r["enqueued"] for r in rows}

    async def backfill_summary(
        self, table: str, ids: Sequence[str] | None, since: datetime
    ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        """Per owner counts (jobs, complete, failed, remaining, faces_found, faces_assigned)
        and failure reasons of the jobs of rows ``ids`` (``None``: created since ``since``)."""
        args = (table, None if ids is None else list(ids), since)
        return (
            await self._dicts("backfill_summary", *args),
            await self._dicts("backfill_failures", *args),
        )

    async def queue_counts(self) -> QueueCounts:
        """Counts by status (from the counters) and the oldest pending job's age."""
        r = await self._pool.fetchrow(self._sql["queue_counts"])
        return QueueCounts(
            pending=r["pending"],
            processing=r["processing"],
            complete=r["complete"],
            failed=r["failed"],
            oldest_pending_s=float(r["oldest_pending_s"]),
            cancelled=r["cancelled"],
            batched=r["batched"],
        )

    async def outboxes(self) -> list[OutboxDepth]:
        """The rows waiting in each outbox and the age of the oldest, one entry per name of
        ``OUTBOXES``, in that order. One statement; bounded by ``OUTBOX_EXACT_UP_TO`` index
        entries per outbox, however many rows wait (see the query in ``sql/queries.sql``)."""
        return [
            OutboxDepth(
                outbox=r["outbox"],
                table=r["table"],
                depth=int(r["depth"]),
                exact=bool(r["exact"]),
                oldest_age_s=float(r["oldest_age_s"]),
            )
            for r in await self._pool.fetch(self._sql["outboxes"])
        ]

    async def attach(
        self,
        table: str,
        id_column: str,
        url_column: str,
        owner_column: str | None = None,
        status_column: str | None = None,
        *,
        result_column: str | None = None,
        error_column: str | None = None,
        analyzed_at_column: str | None = None,
    ) -> str:
        """Install the enqueue triggers and the delete trigger on ``table``; returns its
        qualified, quoted name.

        Re-attaching replaces the previous triggers and settings (a column not given is no
        longer written).

        Raises:
            asyncpg.UndefinedTableError: the table does not exist.
            asyncpg.UndefinedColumnError: a named column does not exist.
            asyncpg.WrongObjectTypeError: the name is not a table.
            asyncpg.InvalidParameterValueError: the table is one of listener's own, or a
                write-back column cannot hold what listener writes (status: text,
                varchar(10) or longer, or citext; result: jsonb; error: text, varchar(200)
                or longer, or citext; analyzed-at: timestamptz or timestamp), is also another
                column, or is generated.
        """
        result: str = await self._pool.fetchval(
            self._sql["attach"],
            table,
            id_column,
            url_column,
            owner_column,
            status_column,
            result_column,
            error_column,
            analyzed_at_column,
        )
        return result

    async def detach(self, table: str) -> bool:
        """Remove the triggers from ``table``; ``False`` when it was not attached."""
        return bool(await self._pool.fetchval(self._sql["detach"], table))

    async def attachment(self, table: str) -> Attachment:
        """The attachment of ``table``.

        Raises:
            asyncpg.UndefinedObjectError: the table is not attached.
        """
        r = await self._pool.fetchrow(self._sql["attachment"], table)
        return _attachment(r)

    async def list_attachments(self) -> list[Attachment]:
        """Every attached table."""
        return [_attachment(r) for r in await self._pool.fetch(self._sql["list_attachments"])]

    async def count_unqueued(self, table: str, owner: str | None) -> int:
        """Rows of ``table`` (of ``owner``, if given) that have no job yet."""
        return int(await self._pool.fetchval(self._sql["count_unqueued"], table, owner))

    async def backfill_chunk(
        self,
        table: str,
        after: str | None,
        chunk: int,
        owner: str | None,
        priority: int,
        max_attempts: int | None = None,
        batch: bool | None = None,
    ) -> BackfillChunk:
        """Enqueue the rows without a job among the next ``chunk`` rows after id ``after``.

        ``max_attempts`` ``None``: the daemon's ``LISTENER_MAX_ATTEMPTS`` at the first claim,
        as for the jobs the triggers enqueue. ``batch``: the jobs' ``batch_mode`` (True:
        OpenAI steps through the Batch API).
        """
        r = await self._pool.fetchrow(
            self._sql["backfill_chunk"], table, after, chunk, owner, priority, max_attempts, batch
        )
        return BackfillChunk(last_id=r["last_id"], scanned=r["scanned"], enqueued=r["enqueued"])

    async def table_progress(self, table: str, owner: str | None, since: datetime) -> TableProgress:
        """Jobs of ``table`` still to do and those finished since ``since``."""
        r = await self._pool.fetchrow(self._sql["table_progress"], table, owner, since)
        return TableProgress(
            remaining=r["remaining"],
            complete=r["complete"],
            failed=r["failed"],
            spend_usd=float(r["spend_usd"]),
        )

    async def write_back_status(
        self, limit: int, after: int, lock_timeout_ms: int
    ) -> WriteBackRound:
        """Write the status, results, error and completion time of up to ``limit`` queued
        jobs (ids above ``after``) to their app rows' write-back columns.

        One short transaction of its own, whose lock waits are bounded by ``lock_timeout_ms``
        milliseconds: app rows held by someone else are skipped and stay queued, so the app
        never waits for (or fails because of) the write-back.

        Raises:
            asyncpg.PostgresError: the outbox could not be read (a failing table is reported
                in ``WriteBackRound.errors`` instead).
        """
        async with self._pool.acquire() as conn, conn.transaction():
            await conn.execute(self._sql["set_lock_timeout"], f"{lock_timeout_ms}ms")
            r = await conn.fetchrow(self._sql["write_back_status"], limit, after)
        return WriteBackRound(
            picked=r["picked"],
            written=r["written"],
            deferred=r["deferred"],
            last_job_id=r["last_job_id"],
            errors=tuple(r["errors"] or ()),
        )

    async def table_jobs(self, table: str, step: str) -> list[dict[str, Any]]:
        """Every job of ``table`` with its ``step`` result decoded, oldest first."""
        rows = await self._pool.fetch(self._sql["table_jobs"], table, step)
        out: list[dict[str, Any]] = []
        for r in rows:
            item = dict(r)
            item["output"] = json.loads(r["output"]) if r["output"] is not None else None
            out.append(item)
        return out

    # -- terminal events for webhooks: listener.event_outbox (0010_events) --

    async def enable_webhooks(self) -> None:
        """Queue terminal events in ``listener.event_outbox`` from now on."""
        await self._pool.execute(self._sql["enable_webhooks"])

    async def webhooks_enabled(self) -> bool:
        """Whether terminal events are queued for webhooks."""
        return bool(await self._pool.fetchval(self._sql["webhooks_enabled"]))

    async def events_due(self) -> bool:
        """True when some event waits for delivery now."""
        return bool(await self._pool.fetchval(self._sql["events_due"]))

    async def claim_events(self, limit: int, lease_s: float) -> list[OutboxEvent]:
        """Take up to ``limit`` due events and lease them for ``lease_s`` seconds, in id order.

        Rows another daemon is taking are skipped (``FOR UPDATE SKIP LOCKED``).
        """
        rows = await self._pool.fetch(self._sql["claim_events"], limit, lease_s)
        events = [OutboxEvent(r["id"], r["event"], r["attempts"]) for r in rows]
        return sorted(events, key=lambda e: e.id)

    async def events_delivered(self, ids: Sequence[int]) -> None:
        """Delete events ``ids``: their receiver answered 2xx."""
        await self._pool.execute(self._sql["events_delivered"], list(ids))

    async def events_failed(self, failed: Sequence[tuple[OutboxEvent, float, str]]) -> None:
        """``(event, delay in seconds, reason)`` each: due again after the delay.

        Fenced by the event's ``attempts``: an event claimed again since is left alone.
        """
        if not failed:
            return
        await self._pool.execute(
            self._sql["events_failed"],
            [e.id for e, _, _ in failed],
            [e.attempts for e, _, _ in failed],
            [delay for _, delay, _ in failed],
            [reason for _, _, reason in failed],
        )

    # -- deleted rows: listener.deleted_rows (0014); job state goes through the job store --

    async def deleted_rows_due(self) -> bool:
        """True when some deleted row waits for its clean-up now."""
        return bool(await self._pool.fetchval(self._sql["deleted_rows_due"]))

    async def claim_deleted_rows(self, limit: int, lease_s: float) -> list[DeletedRowEntry]:
        """Take up to ``limit`` due deleted rows and lease them for ``lease_s`` seconds, in id
        order; rows another daemon is taking are skipped (``FOR UPDATE SKIP LOCKED``)."""
        rows = await self._pool.fetch(self._sql["claim_deleted_rows"], limit, lease_s)
        entries = [
            DeletedRowEntry(
                r["id"],
                r["source_table"],
                r["source_id"],
                r["job_id"],
                r["reinserted"],
                r["attempts"],
            )
            for r in rows
        ]
        return sorted(entries, key=lambda e: e.id)

    async def deleted_rows_done(self, entries: Sequence[DeletedRowEntry]) -> None:
        """``entries`` are cleaned up: delete them (fenced by their ``attempts``)."""
        if entries:
            await self._pool.execute(
                self._sql["deleted_rows_done"],
                [e.id for e in entries],
                [e.attempts for e in entries],
            )

    async def deleted_rows_later(
        self, later: Sequence[tuple[DeletedRowEntry, float, str | None]]
    ) -> None:
        """``(entry, delay in seconds, reason or None)`` each: due again after the delay.

        Fenced by the entry's ``attempts``: an entry claimed again since is left alone.
        """
        if later:
            await self._pool.execute(
                self._sql["deleted_rows_later"],
                [e.id for e, _, _ in later],
                [e.attempts for e, _, _ in later],
                [delay for _, delay, _ in later],
                [reason for _, _, reason in later],
            )


def _attachment(r: Any) -> Attachment:
    return Attachment(
        source_table=r["source_table"],
        id_column=r["id_column"],
        id_type=r["id_type"],
        url_column=r["url_column"],
        owner_column=r["owner_column"],
        status_column=r["status_column"],
        result_column=r["result_column"],
        error_column=r["error_column"],
        analyzed_at_column=r["analyzed_at_column"],
    )
