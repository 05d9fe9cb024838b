"""The queue's state as users see it: ``listener status`` and the health server's ``/status``."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from listener.budget import utc_midnight
from listener.db.queries import Queries

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


async def queue_status(queries: Queries, budget_usd_per_day: float | None) -> dict[str, Any]:
    """Counts by status, spend, budget, paused providers and attached tables.

    Returns:
        ``{"pending": n, "processing": n, "complete": n, "failed": n, "oldest_pending_s": s,
        "spend_usd_today": usd, "spend_usd_total": usd, "spend_by_provider_today": {...},
        "budget_usd_per_day": usd | None, "budget_exhausted": bool,
        "paused_providers": {name: {"remaining_s": s, "reason": text}}, "tables": [...]}``

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
            "paused_providers": await queries.provider_pauses(),
            "tables": [a.source_table for a in await queries.list_attachments()],
        }
    )
    return doc
