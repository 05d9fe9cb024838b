"""The queue's state as users see it: ``listener status`` and the health server's ``/status``.

Every text in the document that may hold a secret (a failed job's URL and error, failure
reasons, pause reasons) passes ``listener.redact`` here, so the JSON, the status page and the
CLI all show the redacted form: reasons stored before redaction existed included.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from listener.budget import utc_midnight
from listener.db.queries import Queries
from listener.redact import redact_text, redact_url

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
RATE_WINDOW_S = 300.0
"""Throughput and ETA are measured over the last five minutes."""
TOP_OWNERS = 20
TOP_REASONS = 10
RECENT_FAILURES = 20


async def queue_status(queries: Queries, budget_usd_per_day: float | None) -> dict[str, Any]:
    """Counts by status, spend, budget, paused providers and attached tables.

    Returns:
        ``{"pending": n, "processing": n, "complete": n, "failed": n, "cancelled": n,
        "batched": n, "oldest_pending_s": s,
        "spend_usd_today": usd, "spend_usd_total": usd, "spend_by_provider_today": {...},
        "budget_usd_per_day": usd | None, "budget_exhausted": bool,
        "paused_providers": {name: {"remaining_s": s, "reason": text}}, "tables": [...],
        "by_table": [{"table", counts...}], "by_owner": [{"table", "owner", counts...}],
        "failure_reasons": [{"reason", "count"}] (URLs folded to ``<url>``, redacted),
        "recent_failures": [{"job_id", "table", "source_id", "url", "error", "at"}] (``url``
        without user info or query string, ``error`` redacted),
        "throughput_per_minute": [{"minute", "complete", "failed"}] (last hour),
        "rate_per_s": jobs finished per second (last 5 minutes), "eta_s": s | None,
        "open_batches": [{"id", "provider", "step", "status", "requests", ...}]}``

    Raises:
        asyncpg.PostgresError, OSError: the database failed.
    """
    doc: dict[str, Any] = (await queries.queue_counts()).as_dict()
    today = await queries.spend_since(utc_midnight(datetime.now(UTC)))
    total = await queries.spend_since(EPOCH)
    spent_today = sum(today.values())
    doc.update(
        {
            "spend_usd_today": round(spent_today, 6),
            "spend_usd_total": round(sum(total.values()), 6),
            "spend_by_provider_today": {k: round(v, 6) for k, v in today.items()},
            "budget_usd_per_day": budget_usd_per_day,
            "budget_exhausted": budget_usd_per_day is not None
            and spent_today >= budget_usd_per_day,
            "paused_providers": {
                name: {**pause, "reason": _text(pause.get("reason"))}
                for name, pause in (await queries.provider_pauses()).items()
            },
            "tables": [a.source_table for a in await queries.list_attachments()],
        }
    )
    rate = await queries.recent_rate(RATE_WINDOW_S)
    remaining = doc["pending"] + doc["processing"] + doc["batched"]
    doc.update(
        {
            "by_table": await queries.counts_by_table(),
            "by_owner": await queries.counts_by_owner(TOP_OWNERS),
            "failure_reasons": [
                {**row, "reason": _text(row["reason"])}
                for row in await queries.failure_reasons(TOP_REASONS)
            ],
            "recent_failures": [
                {**row, "url": _url(row["url"]), "error": _text(row["error"])}
                for row in _iso(await queries.recent_failures(RECENT_FAILURES))
            ],
            "throughput_per_minute": _iso(await queries.throughput_per_minute()),
            "rate_per_s": round(rate, 3),
            "eta_s": round(remaining / rate, 1) if rate > 0 and remaining else None,
            "open_batches": _iso(await queries.open_batches()),
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
