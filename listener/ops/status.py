"""The queue's state as users see it: ``listener status`` and the health server's ``/status``.

Every text in the document that may hold a secret (a failed job's URL and error, failure
reasons, pause reasons) passes ``listener.redact`` here, so the JSON, the status page and the
CLI all show the redacted form: reasons stored before redaction existed included.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable
from datetime import UTC, datetime
from typing import Any

import asyncpg

from listener.analysis.budget import utc_midnight
from listener.db.queries import Queries
from listener.redact import redact_text, redact_url

STATUSES = ("pending", "processing", "complete", "failed", "cancelled", "batched")
RATE_WINDOW_S = 300.0
"""Throughput and ETA are measured over the last five minutes."""
TOP_OWNERS = 20
TOP_REASONS = 10
RECENT_FAILURES = 20


async def queue_status(queries: Queries, budget_usd_per_day: float | None) -> dict[str, Any]:
    """Counts by status, spend, deduplication savings, budget, paused providers and tables.

    Every part is bounded, whatever the number of jobs: counts and spend come from the
    counters of ``sql/migrations/0008_status_counts.sql``, deduplication savings from those of
    ``0016_dedup.sql`` and open face suggestions from those of ``0015_face_review.sql`` (each
    exact: folded counts plus the deltas not folded yet), failures from the newest entries of
    ``jobs_failed_idx``, throughput and rate from the last hour's range of
    ``jobs_finished_idx``; failure reasons are those of the last 500 failures, and
    ``oldest_pending_s`` is how long the longest-waiting runnable pending job has waited (now -
    its ``run_after``). ``outboxes`` are the queues beside the jobs (``Queries.outboxes``: one
    statement, at most ``listener.db.queries.OUTBOX_EXACT_UP_TO`` + 1 index entries read per
    outbox).

    Returns:
        ``{"pending": n, "processing": n, "complete": n, "failed": n, "cancelled": n,
        "batched": n, "oldest_pending_s": s,
        "spend_usd_today": usd, "spend_usd_total": usd, "spend_by_provider_today": {...},
        "dedup_saved_usd_today": usd, "dedup_saved_usd_total": usd (what the reused results
        cost when first paid), "dedup_reused_steps_today": n, "dedup_reused_steps_total": n,
        "dedup_by_provider": {name: {"reused_steps_total": n, "saved_usd_total": usd}},
        "budget_usd_per_day": usd | None, "budget_exhausted": bool,
        "paused_providers": {name: {"remaining_s": s, "reason": text}},
        "operator_pauses": [{"provider": name or "*", "reason": text, "remaining_s": s | None}],
        "tables": [...],
        "by_table": [{"table", counts...}], "by_owner": [{"table", "owner", counts...}],
        "failure_reasons": [{"reason", "count"}] (URLs folded to ``<url>``, redacted),
        "recent_failures": [{"job_id", "table", "source_id", "url", "error", "at"}] (``url``
        without user info or query string, ``error`` redacted),
        "throughput_per_minute": [{"minute", "complete", "failed"}] (last hour),
        "rate_per_s": jobs finished per second (last 5 minutes), "eta_s": s | None,
        "open_batches": [{"id", "provider", "step", "status", "requests", ...}],
        "face_suggestions_open": n (face suggestions waiting for review, every owner),
        "face_suggestions_by_owner": [{"owner", "suggestions"}] (the owners with the most),
        "outboxes": {name: {"table": "listener.<table>", "depth": rows waiting,
        "depth_exact": bool (false: more than ``OUTBOX_EXACT_UP_TO`` (10,000) rows, ``depth``
        is the planner's estimate), "oldest_age_s": seconds the oldest has waited, 0 when
        none}} for each name of ``listener.db.queries.OUTBOXES`` (``status``, ``events``,
        ``deleted``, ``inserted``), in that order}``

    Raises:
        asyncpg.PostgresError, OSError: the database failed.
    """
    # Bounds the deltas the reads below add up, when no daemon has folded them lately; a
    # standby (read-only) database is read as it is.
    with contextlib.suppress(asyncpg.ReadOnlySQLTransactionError):
        await queries.roll_up_job_counts()
        await queries.roll_up_face_review_counts()
    today = utc_midnight(datetime.now(UTC)).date()
    reads: list[Awaitable[Any]] = [
        queries.counts_by_table(),
        queries.oldest_pending(),
        queries.spend_totals(today),
        queries.provider_pauses(),
        queries.list_attachments(),
        queries.recent_rate(RATE_WINDOW_S),
        queries.counts_by_owner(TOP_OWNERS),
        queries.failure_reasons(TOP_REASONS),
        queries.recent_failures(RECENT_FAILURES),
        queries.throughput_per_minute(),
        queries.open_batches(),
        queries.active_pauses(),
        queries.face_review_waiting(TOP_OWNERS),
        queries.dedup_totals(today),
        queries.outboxes(),
    ]
    # A dozen small reads: on a pool they run side by side (one round trip's latency, not
    # twelve); on a single connection, one after the other.
    if queries.pooled:
        results = await asyncio.gather(*reads)
    else:
        results = [await read for read in reads]
    (
        by_table,
        oldest,
        spend,
        pauses,
        attachments,
        rate,
        by_owner,
        reasons,
        recent,
        throughput,
        batches,
        operator_pauses,
        (suggestions_open, suggestions_by_owner),
        dedup,
        outboxes,
    ) = results
    # Totals are the sum of the per-table counts: one snapshot, so they always agree.
    doc: dict[str, Any] = {s: sum(int(row[s]) for row in by_table) for s in STATUSES}
    doc["oldest_pending_s"] = round(oldest, 3)
    spent_today = sum(since for since, _ in spend.values())
    remaining = doc["pending"] + doc["processing"] + doc["batched"]
    doc.update(
        {
            "spend_usd_today": round(spent_today, 6),
            "spend_usd_total": round(sum(total for _, total in spend.values()), 6),
            "spend_by_provider_today": {
                name: round(since, 6) for name, (since, _) in spend.items() if since > 0
            },
            "dedup_saved_usd_today": round(sum(d["usd_since"] for d in dedup.values()), 6),
            "dedup_saved_usd_total": round(sum(d["usd_total"] for d in dedup.values()), 6),
            "dedup_reused_steps_today": sum(int(d["steps_since"]) for d in dedup.values()),
            "dedup_reused_steps_total": sum(int(d["steps_total"]) for d in dedup.values()),
            "dedup_by_provider": {
                name: {
                    "reused_steps_total": d["steps_total"],
                    "saved_usd_total": round(d["usd_total"], 6),
                }
                for name, d in dedup.items()
            },
            "budget_usd_per_day": budget_usd_per_day,
            "budget_exhausted": budget_usd_per_day is not None
            and spent_today >= budget_usd_per_day,
            "paused_providers": {
                name: {**pause, "reason": _text(pause.get("reason"))}
                for name, pause in pauses.items()
            },
            "operator_pauses": [
                {"provider": p.provider, "reason": _text(p.reason), "remaining_s": p.remaining_s}
                for p in operator_pauses
            ],
            "tables": [a.source_table for a in attachments],
            "by_table": by_table,
            "by_owner": by_owner,
            "failure_reasons": [{**row, "reason": _text(row["reason"])} for row in reasons],
            "recent_failures": [
                {**row, "url": _url(row["url"]), "error": _text(row["error"])}
                for row in _iso(recent)
            ],
            "throughput_per_minute": _iso(throughput),
            "rate_per_s": round(rate, 3),
            "eta_s": round(remaining / rate, 1) if rate > 0 and remaining else None,
            "open_batches": _iso(batches),
            "face_suggestions_open": suggestions_open,
            "face_suggestions_by_owner": suggestions_by_owner,
            "outboxes": {o.outbox: o.as_dict() for o in outboxes},
        }
    )
    return doc


def _text(value: str | None) -> str | None:
    return None if value is None else redact_text(value)


def _url(value: str | None) -> str | None:
    return None if value is None else redact_url(value)


def _iso(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Datetimes as ISO 8601 strings, so the document is JSON."""
    return [
        {k: v.isoformat() if isinstance(v, datetime) else v for k, v in row.items()} for row in rows
    ]
