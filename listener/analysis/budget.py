"""The daily budget for paid providers (``LISTENER_BUDGET_USD_PER_DAY``).

Spend is the sum of ``listener.results.cost_usd`` since midnight UTC, across the fleet. Once
it reaches the budget, paid steps raise ``BudgetExhausted``: their jobs wait (the attempt is
given back) until 00:00 UTC, held by ``"budget"``: one write per job, not one every few
minutes (``listener resume budget`` wakes them early, after the budget was raised). A
pipeline whose providers are all paid stops claiming while the budget is spent
(``listener.queue.pauses.PauseBoard``). Free steps go on.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta

from listener.errors import BudgetExhausted


def utc_midnight(now: datetime) -> datetime:
    """The start of ``now``'s UTC day."""
    return now.astimezone(UTC).replace(hour=0, minute=0, second=0, microsecond=0)


class Budget:
    """Checks today's spend against the budget, reading it at most every ``cache_s`` seconds.

    Args:
        limit_usd: the budget per UTC day, USD.
        spend_since: returns USD per provider recorded since a time (``Queries.spend_since``).
        cache_s: seconds a spend reading is reused.
        clock: monotonic clock, seconds.
        now: wall clock (UTC), for the day boundary.
    """

    def __init__(
        self,
        limit_usd: float,
        spend_since: Callable[[datetime], Awaitable[dict[str, float]]],
        *,
        cache_s: float = 2.0,
        clock: Callable[[], float] = time.monotonic,
        now: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self.limit_usd = limit_usd
        self._spend_since = spend_since
        self._cache_s = cache_s
        self._clock = clock
        self._now = now
        self._read_at = -float("inf")
        self._spent = 0.0

    def add(self, usd: float) -> None:
        """Count a cost this process just incurred, before the database has it.

        Without it, every task starting within one cache period would see the old reading,
        and a fleet could overspend by a period's worth of calls.
        """
        self._spent += usd

    async def spent_today(self) -> float:
        """USD spent since midnight UTC (cached for ``cache_s``)."""
        if self._clock() - self._read_at >= self._cache_s:
            by_provider = await self._spend_since(utc_midnight(self._now()))
            self._spent = sum(by_provider.values())
            self._read_at = self._clock()
        return self._spent

    async def check(self) -> None:
        """Raise when today's spend has reached the budget.

        Raises:
            BudgetExhausted: with the spend, the budget, and when the job will be retried.
        """
        spent = await self.spent_today()
        if spent >= self.limit_usd:
            now = self._now()
            until_midnight = (utc_midnight(now) + timedelta(days=1) - now).total_seconds()
            raise BudgetExhausted(
                f"daily budget reached: ${spent:.4f} spent today of ${self.limit_usd:.2f}; "
                "paid providers wait until 00:00 UTC",
                retry_after=max(until_midnight, 1.0),
            )
