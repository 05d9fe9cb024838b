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
