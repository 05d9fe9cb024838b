"""A token bucket per provider. Pure: the clock is injected and waiting is the caller's job.

The bucket holds up to ``burst`` tokens and refills at ``rate`` tokens per second. A caller
*reserves* a token and is told how long to wait before using it; reservations may drive the
balance negative, which queues callers in arrival order without a lock (the same accounting
as the generic cell rate algorithm, ITU-T I.371). ``pause`` stops the bucket until a given
time, for providers that answered "slow down" (429 with Retry-After).

The fleet-wide limit (``listener.analysis.fleet_limits``) keeps the GCRA state of each provider in
one
database row. A daemon leases several request slots per round trip on that row
(``fleet_lease``), as many as its recent rate spends in a short horizon (``LeaseSizer``), spends
them locally at their times, and gives the unused tail back when it can (``fleet_give_back``);
a slot not used by its time lapses, so a crashed daemon's lease expires with its last slot.
Leases of capacity that expire are Doorman's design (YouTube's "global distributed client-side
rate limiting", github.com/youtube/doorman, README "Lease length and refresh interval"); the
slots themselves are GCRA's (ITU-T I.371, virtual scheduling algorithm).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass


class TokenBucket:
    """A token bucket with reservations.

    Args:
        rate: tokens added per second; ``math.inf`` disables the limit.
        burst: capacity, the most tokens usable back to back (>= 1).
        clock: a monotonic clock in seconds, e.g. ``time.monotonic``.

    Raises:
        ValueError: ``rate`` is not positive or ``burst`` < 1.
    """

    def __init__(self, rate: float, burst: int, clock: Callable[[], float]) -> None:
        if rate <= 0 or burst < 1:
            raise ValueError(f"token bucket needs rate > 0 and burst >= 1, got {rate}, {burst}")
        self.rate = rate
        self.burst = burst
        self._clock = clock
        self._tokens = float(burst)
        self._updated = clock()
        self._paused_until = -math.inf

    @property
    def unlimited(self) -> bool:
        """True when the bucket never makes anyone wait (infinite rate, not paused)."""
        return math.isinf(self.rate) and self._paused_until <= self._clock()

    def _refill(self, now: float) -> None:
        if math.isinf(self.rate):
            self._tokens = float(self.burst)
        else:
            self._tokens = min(float(self.burst), self._tokens + (now - self._updated) * self.rate)
        self._updated = now

    def reserve(self, tokens: float = 1.0) -> float:
        """Take ``tokens`` now; returns the seconds to wait before using them (0 if none)."""
        now = self._clock()
        self._refill(now)
        self._tokens -= tokens
        wait = 0.0 if self._tokens >= 0 else -self._tokens / self.rate
        return max(wait, self._paused_until - now, 0.0)

    def pause(self, seconds: float) -> None:
        """Make every reservation wait at least until ``seconds`` from now."""
        self._paused_until = max(self._paused_until, self._clock() + seconds)

    def available(self) -> float:
        """Tokens available now (negative while callers are queued)."""
        self._refill(self._clock())
        return self._tokens


def gcra_start(tat: float, now: float, interval_s: float, capacity_s: float, cost: float) -> float:
    """The earliest start of a request of ``cost`` units under the generic cell rate algorithm.

    GCRA keeps one number per limit, the theoretical arrival time ``tat``: the moment the
    bucket would be empty again. A request of ``cost`` units (each worth ``interval_s`` seconds
    of refill) fits once ``tat + cost * interval_s - capacity_s`` has passed, where
    ``capacity_s`` is the bucket's size in seconds (burst x interval). Source: ITU-T I.371,
    virtual scheduling algorithm.
    """
    return max(now, tat + cost * interval_s - capacity_s)


def gcra_advance(tat: float, start: float, interval_s: float, cost: float) -> float:
    """The new ``tat`` after a request of ``cost`` units starting at ``start``."""
    return max(tat, start) + cost * interval_s


class FleetState:
    """A provider's shared limiter state, as stored in ``listener.provider_limits``.

    Times are seconds on one clock shared by the fleet (the database's).
    """

    __slots__ = ("paused_until", "request_tat", "token_tat")

    def __init__(self, request_tat: float, token_tat: float, paused_until: float) -> None:
        self.request_tat = request_tat
        self.token_tat = token_tat
        self.paused_until = paused_until


# Requests are spaced 4% wider than 1/rps: the moment a request reaches the provider jitters
# by some milliseconds after its reserved start (a busy event loop, a slow connection), and a
# provider that counts requests in a sliding one-second window must never see rps + 1 of
# them. At 10 requests/s this tolerates 40 ms of jitter and leaves 9.6/s of the limit in use.
SPACING_MARGIN = 1.04


def fleet_reserve(
    state: FleetState,
    now: float,
    *,
    rps: float,
    burst: int,
    tokens: int = 0,
    tokens_per_minute: int | None = None,
) -> float:
    """Reserve one request (and ``tokens`` tokens) on ``state``; returns its start time.

    ``state`` is updated in place. The start is the latest of: the request limit's GCRA start,
    the token limit's (a bucket of one minute's tokens), and the end of a pause.

    Args:
        state: the provider's shared state.
        now: the shared clock's time, seconds.
        rps: requests per second (finite).
        burst: requests allowed back to back.
        tokens: tokens this request is estimated to use.
        tokens_per_minute: the token limit; ``None`` for none.
    """
    r_interval = SPACING_MARGIN / rps
    start = gcra_start(state.request_tat, now, r_interval, burst * r_interval, 1)
    t_interval = 0.0
    if tokens_per_minute and tokens > 0:
        t_interval = 60.0 / tokens_per_minute
        cost = min(tokens, tokens_per_minute)
        start = max(start, gcra_start(state.token_tat, now, t_interval, 60.0, cost))
    start = max(start, state.paused_until)
    state.request_tat = gcra_advance(state.request_tat, start, r_interval, 1)
    if t_interval:
        state.token_tat = gcra_advance(state.token_tat, start, t_interval, tokens)
    return start


def fleet_correct(state: FleetState, delta_tokens: int, tokens_per_minute: int | None) -> None:
    """Charge (or refund) the difference between the tokens used and those estimated."""
    if tokens_per_minute:
        state.token_tat += delta_tokens * 60.0 / tokens_per_minute


def fleet_pause(state: FleetState, now: float, seconds: float) -> None:
    """Stop every request until ``now + seconds`` (a pause never shortens another)."""
    state.paused_until = max(state.paused_until, now + seconds)


def fleet_lease(
    state: FleetState, now: float, *, rps: float, burst: int, slots: int
) -> list[float]:
    """Reserve ``slots`` request slots at once (no tokens); returns their start times.

    Each slot is one ``fleet_reserve``, so a lease is exactly what that many requests reserved
    one by one at ``now`` would have got: start times ascending, spaced ``SPACING_MARGIN / rps``
    apart once the burst is spent, none before a pause ends. ``state`` is updated in place;
    its ``request_tat`` is then the end of the lease.

    Raises:
        ValueError: ``slots`` < 1.
    """
    if slots < 1:
        raise ValueError(f"a lease needs at least one slot, got {slots}")
    return [fleet_reserve(state, now, rps=rps, burst=burst) for _ in range(slots)]


def fleet_give_back(state: FleetState, lease_end: float, unused: int, *, rps: float) -> int:
    """Give back the ``unused`` last slots of a lease, if nobody leased after it.

    A lease is a run of slots on the fleet's one timeline; its tail can return to the fleet
    only while the lease still ends the timeline (``state.request_tat == lease_end``): the next
    lease then starts where the used part ended. Once another daemon leased after it, those
    slots stay where they are and lapse at their time (at most one lease length later).

    Returns:
        The slots given back (0 or ``unused``).
    """
    if unused <= 0 or state.request_tat != lease_end:
        return 0
    state.request_tat -= unused * SPACING_MARGIN / rps
    return unused


@dataclass(frozen=True)
class LeasePolicy:
    """How a daemon sizes its leases of a fleet-wide limit.

    Attributes:
        horizon_s: a lease covers the daemon's recent rate for this long (seconds): long
            enough that round trips to the shared row are few (at 75 ms, a daemon spending
            1,000 slots/s leases 75 per round trip: ~13 round trips/s instead of 1,000), short
            enough that slots a daemon stops needing lapse soon.
        max_share_s: no lease holds more than this many seconds of the whole fleet's limit
            (``rps * max_share_s`` slots), so one daemon cannot take every slot of the next
            moment; at 10/s (0.1 s) that is one slot, i.e. one round trip per request as before.
        rate_window_s: time constant of the rate estimate (seconds).
        late_grace_s: a slot may still be used this long after its time; later it lapses.
            Well within the 4% spacing margin (40 ms per second), so a late slot never puts
            more than the limit into a sliding second.
    """

    horizon_s: float = 0.075
    max_share_s: float = 0.1
    rate_window_s: float = 0.5
    late_grace_s: float = 0.02

    def max_slots(self, rps: float) -> int:
        """The largest lease for a limit of ``rps`` requests/s (at least 1)."""
        return max(1, int(rps * self.max_share_s))


class LeaseSizer:
    """The size of a daemon's next lease, from its recent rate and the callers waiting.

    The rate is an exponentially weighted estimate of the slots this daemon spent (events per
    second with time constant ``policy.rate_window_s``: r <- r * exp(-dt / tau) + n / tau,
    which converges to the true rate of a steady stream). Pure: the clock is injected.

    Args:
        rps: the fleet-wide limit, requests per second (finite).
        policy: the lease policy.
        clock: a monotonic clock in seconds.
    """

    def __init__(self, rps: float, policy: LeasePolicy, clock: Callable[[], float]) -> None:
        self._rps = rps
        self._policy = policy
        self._clock = clock
        self._rate = 0.0
        self._at = clock()

    @property
    def rate(self) -> float:
        """Slots spent per second, recently (decayed to now)."""
        now = self._clock()
        return self._rate * math.exp(-(now - self._at) / self._policy.rate_window_s)

    def spent(self, slots: int = 1) -> None:
        """Count ``slots`` slots used now."""
        now = self._clock()
        tau = self._policy.rate_window_s
        self._rate = self._rate * math.exp(-(now - self._at) / tau) + slots / tau
        self._at = now

    def size(self, waiting: int) -> int:
        """Slots to lease now, with ``waiting`` callers queued for one (counting the asker):
        enough for the waiting callers and for the recent rate over the horizon, at least 1,
        at most ``policy.max_slots(rps)``."""
        want = max(1, waiting, math.ceil(self.rate * self._policy.horizon_s))
        return min(want, self._policy.max_slots(self._rps))
