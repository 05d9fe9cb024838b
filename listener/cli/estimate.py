"""The cost estimate of a dry run (``backfill --dry-run``, ``reanalyze --dry-run``)."""

from __future__ import annotations

from datetime import UTC, datetime

from listener.cli import render
from listener.db.queries import Queries
from listener.settings import Settings

ESTIMATE_SAMPLE = 20
"""Images fetched to learn the size distribution for a dry-run estimate."""


async def print_estimate(
    settings: Settings, queries: Queries, table: str, owner: str | None, count: int
) -> None:
    """Per tier and provider: images, calls, tokens, USD realtime and batch, time.

    The image sizes come from up to ``ESTIMATE_SAMPLE`` of ``table``'s unqueued rows (only
    when an OpenAI step bills by size), the tokens and pass rates from the steps' history.
    """
    from listener.analysis.estimate import StepHistory, estimate
    from listener.analysis.fetch import ImageFetcher
    from listener.analysis.pipeline import build_plan
    from listener.analysis.providers.openai import OpenAIProvider

    plan = build_plan(settings.pipeline, settings.tiers)
    sizes: list[tuple[int, int]] = []
    if any(s.provider == "openai" for s in plan.steps) and count:
        fetcher = ImageFetcher(settings.fetch)
        await fetcher.start()
        try:
            for url in await queries.sample_unqueued(table, owner, ESTIMATE_SAMPLE):
                try:
                    fetched = await fetcher.fetch(url)
                except Exception:
                    continue
                sizes.append((fetched.width, fetched.height))
        finally:
            await fetcher.close()
    tier1 = [s.name for s in plan.steps if s.tier == 1]
    history = {
        r["step"]: StepHistory(
            r["results"],
            r["input_tokens"],
            r["output_tokens"],
            r["calls"],
            r["pass_rate"],
            r["reuse_rate"],
        )
        for r in await queries.step_history(tier1)
    }
    prompts = {}
    if any(s.provider == "openai" for s in plan.steps):
        writer = OpenAIProvider(settings.openai)
        prompts = {kind: writer.prompt(kind, {}) for kind in ("tier1", "tier2", "tier3")}
    dedup = settings.dedup != "off"
    result = estimate(plan, count, sizes, history, settings, prompts, dedup=dedup)
    saved = await queries.dedup_totals(datetime.now(UTC).date()) if dedup else None
    render.print_estimate(settings, count, len(sizes), result, saved)
