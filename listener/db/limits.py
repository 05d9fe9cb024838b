"""The fleet-wide rate limiter: one row per provider in ``listener.provider_limits``.

Every daemon reserves its requests on the same row, under a row lock, with the database's
clock, so N daemons together stay within the provider's limit instead of N times it. The
arithmetic is the pure GCRA of ``listener.ratelimit``; this module only stores its state.
"""

from __future__ import annotations

import asyncio
import time

from listener.db.queries import Queries
from listener.ratelimit import FleetState, fleet_correct, fleet_pause, fleet_reserve
from listener.settings import RateLimit


class FleetLimiter:
    """A provider's limiter shared by every daemon on the database.

    Args:
        queries: the named queries.
        provider: the provider's name (its row).
        limit: requests per second (finite) and burst.
        tokens_per_minute: the provider's token limit, or ``None``.
    """

    def __init__(
        self, queries: Queries, provider: str, limit: RateLimit, tokens_per_minute: int | None
    ) -> None:
        self._q = queries
        self._provider = provider
        self._limit = limit
        self._tpm = tokens_per_minute
        self._paused_until = 0.0
        # Reservations queue on one row lock across the fleet; two at a time per process is
        # plenty and keeps the pool free for claims, completions and heartbeats.
        self._gate = asyncio.Semaphore(2)

    async def reserve(self, tokens: int) -> float:
        """Reserve one request and ``tokens`` tokens; returns seconds to wait before sending."""

        def take(state: FleetState, now: float) -> float:
            return fleet_reserve(
                state,
                now,
                rps=self._limit.rps,
                burst=self._limit.burst,
                tokens=tokens,
                tokens_per_minute=self._tpm,
            )

        async with self._gate:
            start, now, read_at = await self._q.update_provider_limit(self._provider, take)
        # The deadline counts from when the clock was read, not from when the commit returned.
        return max(0.0, read_at + (start - now) - time.monotonic())

    async def correct(self, delta_tokens: int) -> None:
        """Charge or refund the difference between the tokens used and those reserved."""
        if not self._tpm or not delta_tokens:
            return
        tpm = self._tpm
        await self._q.update_provider_limit(
            self._provider, lambda state, now: fleet_correct(state, delta_tokens, tpm)
        )

    async def pause(self, seconds: float, reason: str) -> None:
        """Pause the provider for every daemon for ``seconds``; ``reason`` shows in status."""
        self._paused_until = max(self._paused_until, time.monotonic() + seconds)
        await self._q.update_provider_limit(
            self._provider, lambda state, now: fleet_pause(state, now, seconds), reason
        )

    def paused_for(self) -> float:
        """Seconds left of a pause this process set (others' pauses delay ``reserve``)."""
        return max(0.0, self._paused_until - time.monotonic())
