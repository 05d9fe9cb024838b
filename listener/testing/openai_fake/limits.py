"""The request rate limit: a sliding window, and the durations OpenAI's headers write.

The limit is enforced over a sliding window of 1 s (not a minute as on the real API, so tests
stay short); see the package docstring for the headers it feeds.
"""

from __future__ import annotations

import math
from collections import deque

# Reported in the x-ratelimit-* headers when there is no limit.
UNLIMITED_REQUESTS = 1_000_000
UNLIMITED_TOKENS = 100_000_000


def format_duration(seconds: float) -> str:
    """``seconds`` as OpenAI's reset headers write it (Go ``time.Duration``): "120ms", "6m0s".

    Rounded up to the millisecond so that waiting the announced time is always enough.
    """
    ms = max(0, math.ceil(seconds * 1000 - 1e-6))
    if ms == 0:
        return "0s"
    if ms < 1000:
        return f"{ms}ms"
    hours, rest = divmod(ms, 3_600_000)
    minutes, rest = divmod(rest, 60_000)
    secs = f"{rest / 1000:.3f}".rstrip("0").rstrip(".")
    if hours:
        return f"{hours}h{minutes}m{secs}s"
    if minutes:
        return f"{minutes}m{secs}s"
    return f"{secs}s"


def format_seconds(seconds: float) -> str:
    """A ``retry-after`` value: whole seconds as an integer, else up to 3 decimals."""
    if float(seconds).is_integer():
        return str(int(seconds))
    return f"{seconds:.3f}".rstrip("0").rstrip(".")


class SlidingWindow:
    """Amounts admitted at monotonic times, forgotten ``length_s`` seconds later."""

    def __init__(self, length_s: float, capacity: float) -> None:
        self.length_s = length_s
        self.capacity = capacity
        self._entries: deque[tuple[float, float]] = deque()

    def _expire(self, now: float) -> None:
        while self._entries and self._entries[0][0] <= now - self.length_s:
            self._entries.popleft()

    def used(self, now: float) -> float:
        """The sum of the amounts admitted during the last ``length_s`` seconds."""
        self._expire(now)
        return sum(amount for _, amount in self._entries)

    def add(self, now: float, amount: float) -> None:
        """Record ``amount`` admitted at ``now``."""
        self._entries.append((now, amount))

    def wait_for(self, now: float, amount: float) -> float:
        """Seconds until ``amount`` more fits; ``math.inf`` if it never can."""
        if amount > self.capacity:
            return math.inf
        excess = self.used(now) + amount - self.capacity
        for at, admitted in self._entries:
            if excess <= 0:
                break
            excess -= admitted
            if excess <= 0:
                return at + self.length_s - now
        return 0.0

    def reset_in(self, now: float) -> float:
        """Seconds until the window is empty again (the headers' "reset" meaning)."""
        self._expire(now)
        if not self._entries:
            return 0.0
        return self._entries[-1][0] + self.length_s - now
