"""A token bucket per provider. Pure: the clock is injected and waiting is the caller's job.

The bucket holds up to ``burst`` tokens and refills at ``rate`` tokens per second. A caller
*reserves* a token and is told how long to wait before using it; reservations may drive the
balance negative, which queues callers in arrival order without a lock (the same accounting
as the generic cell rate algorithm, ITU-T I.371). ``pause`` stops the bucket until a given
time, for providers that answered "slow down" (429 with Retry-After).
"""

from __future__ import annotations

import math
from collections.abc import Callable


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
