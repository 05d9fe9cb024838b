"""The fleet-wide rate limiter: one row per provider in ``listener.provider_limits``.

Every daemon reserves its requests on the same row, under a row lock, with the database's
clock, so N daemons together stay within the provider's limit instead of N times it. The
arithmetic is the pure GCRA of ``listener.analysis.ratelimit``; this module only stores its state.

A row lock per request would cap the whole fleet at the row's lock rate (about 1,100
requests/s on a 2-core machine, whatever the limit). So requests without a token limit are
served from a *lease*: one round trip reserves several consecutive slots of the fleet's
schedule (sized by ``LeaseSizer``: the daemon's recent rate over 75 ms, at most 100 ms of the
fleet's limit), the daemon's callers take them in order and wait for their times, a slot not
used within ``late_grace_s`` of its time lapses, and the unused tail is given back on a pause
and when the daemon stops. Requests that carry a token estimate under a token limit still
reserve one by one, with their tokens.
"""

from __future__ import annotations

import asyncio
import collections
import time

from listener.analysis.ratelimit import (
    FleetState,
    LeasePolicy,
    LeaseSizer,
    fleet_correct,
    fleet_give_back,
    fleet_lease,
    fleet_pause,
    fleet_reserve,
)
from listener.db.queries import Queries
from listener.settings import RateLimit


class FleetLimiter:
    """A provider's limiter shared by every daemon on the database.

    Args:
        queries: the named queries.
        provider: the provider's name (its row).
        limit: requests per second (finite) and burst.
        tokens_per_minute: the provider's token limit, or ``None``.
        policy: how leases are sized and when a slot lapses.
    """

    def __init__(
        self,
        queries: Queries,
        provider: str,
        limit: RateLimit,
        tokens_per_minute: int | None,
        policy: LeasePolicy | None = None,
    ) -> None:
        self._q = queries
        self._provider = provider
        self._limit = limit
        self._tpm = tokens_per_minute
        self._paused_until = 0.0
        # Reservations queue on one row lock across the fleet; two at a time per process is
        # plenty and keeps the pool free for claims, completions and heartbeats.
        self._gate = asyncio.Semaphore(2)
        self._policy = policy or LeasePolicy()
        self._sizer = LeaseSizer(limit.rps, self._policy, time.monotonic)
        # The leased slots not taken yet, as local monotonic times, ascending; the lease's
        # end on the fleet's timeline (to give its tail back).
        self._slots: collections.deque[float] = collections.deque()
        self._lease_end = 0.0
        self._lease_lock = asyncio.Lock()
        self._waiting = 0
        self.leases = 0
        """Round trips that leased slots (for benchmarks and tests)."""
        self.lapsed = 0
        """Leased slots that lapsed unused."""

    async def reserve(self, tokens: int) -> float:
        """Reserve one request and ``tokens`` tokens; returns seconds to wait before sending.

        Without a token limit (or with no token estimate) the request takes the next slot of
        this daemon's lease, leasing more when none is left.
        """
        if tokens <= 0 or not self._tpm:
            return max(0.0, await self._take_slot() - time.monotonic())

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
            start, now, read_at = await self._q.update_provider_limit(
                self._provider, FleetState, take
            )
        # The deadline counts from when the clock was read, not from when the commit returned.
        return max(0.0, read_at + (start - now) - time.monotonic())

    async def _take_slot(self) -> float:
        """The local monotonic time of this request's slot."""
        self._waiting += 1
        try:
            while True:
                oldest = time.monotonic() - self._policy.late_grace_s
                while self._slots and self._slots[0] < oldest:
                    self._slots.popleft()
                    self.lapsed += 1
                if self._slots:
                    self._sizer.spent()
                    return self._slots.popleft()
                async with self._lease_lock:
                    if not self._slots:
                        await self._lease(self._sizer.size(self._waiting))
        finally:
            self._waiting -= 1

    async def _lease(self, slots: int) -> None:
        """Lease ``slots`` slots in one round trip and queue them locally."""

        def take(state: FleetState, now: float) -> tuple[list[float], float]:
            starts = fleet_lease(
                state, now, rps=self._limit.rps, burst=self._limit.burst, slots=slots
            )
            return starts, state.request_tat

        async with self._gate:
            (starts, end), now, read_at = await self._q.update_provider_limit(
                self._provider, FleetState, take
            )
        # Database times become local deadlines from when the clock was read.
        offset = read_at - now
        self._slots.extend(start + offset for start in starts)
        self._lease_end = end
        self.leases += 1

    async def give_back(self) -> int:
        """Return the slots of this daemon's lease not taken yet, if it still ends the fleet's
        schedule (else they lapse at their times); returns how many went back."""
        unused = len(self._slots)
        self._slots.clear()
        if not unused:
            return 0
        lease_end, rps = self._lease_end, self._limit.rps
        given, _, _ = await self._q.update_provider_limit(
            self._provider,
            FleetState,
            lambda state, now: fleet_give_back(state, lease_end, unused, rps=rps),
        )
        return given

    async def correct(self, delta_tokens: int) -> None:
        """Charge or refund the difference between the tokens used and those reserved."""
        if not self._tpm or not delta_tokens:
            return
        tpm = self._tpm
        await self._q.update_provider_limit(
            self._provider, FleetState, lambda state, now: fleet_correct(state, delta_tokens, tpm)
        )

    async def pause(self, seconds: float, reason: str) -> None:
        """Pause the provider for every daemon for ``seconds``; ``reason`` shows in status."""
        self._paused_until = max(self._paused_until, time.monotonic() + seconds)
        # The lease's slots fall in the pause: give them back with it, in one round trip.
        unused = len(self._slots)
        self._slots.clear()
        lease_end, rps = self._lease_end, self._limit.rps

        def stop(state: FleetState, now: float) -> None:
            fleet_give_back(state, lease_end, unused, rps=rps)
            fleet_pause(state, now, seconds)

        await self._q.update_provider_limit(self._provider, FleetState, stop, reason)

    def paused_for(self) -> float:
        """Seconds left of a pause this process set (others' pauses delay ``reserve``)."""
        return max(0.0, self._paused_until - time.monotonic())
