"""Prometheus metrics of one daemon, and per-provider request rates for ``/status``.

Each ``Metrics`` owns its own ``CollectorRegistry``, so two daemons in one process (as in the
tests) do not share counters.
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


class RateMeter:
    """Events per second over a sliding window, in one-second buckets.

    Args:
        window_s: the window, whole seconds.
        clock: a monotonic clock in seconds.
    """

    def __init__(self, clock: Callable[[], float], window_s: int = 60) -> None:
        self._clock = clock
        self._window = window_s
        self._counts = [0] * window_s
        self._seconds = [-1] * window_s

    def add(self, n: int = 1) -> None:
        """Count ``n`` events now."""
        second = int(self._clock())
        slot = second % self._window
        if self._seconds[slot] != second:
            self._seconds[slot] = second
            self._counts[slot] = 0
        self._counts[slot] += n

    def rate(self, over_s: int | None = None) -> float:
        """Mean events per second over the last ``over_s`` complete seconds (default: window)."""
        span = min(over_s or self._window, self._window - 1)
        now = int(self._clock())
        total = sum(
            c for c, s in zip(self._counts, self._seconds, strict=True) if now - span <= s < now
        )
        return total / span if span > 0 else 0.0


class Metrics:
    """The daemon's counters, gauges and histograms.

    Args:
        clock: monotonic clock in seconds, for the rate meters.
    """

    def __init__(self, clock: Callable[[], float]) -> None:
        self._clock = clock
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.jobs_claimed = Counter("listener_jobs_claimed", "Jobs claimed.", registry=r)
        self.jobs_finished = Counter(
            "listener_jobs_finished",
            "Job attempts finished, by outcome (complete, retry, failed).",
            ["outcome"],
            registry=r,
        )
        self.provider_requests = Counter(
            "listener_provider_requests", "Provider calls, by provider.", ["provider"], registry=r
        )
        self.provider_errors = Counter(
            "listener_provider_errors",
            "Provider calls that raised, by provider and error class.",
            ["provider", "error"],
            registry=r,
        )
        self.provider_seconds = Histogram(
            "listener_provider_duration_seconds",
            "Provider call duration, seconds.",
            ["provider"],
            registry=r,
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
        )
        self.dedup_reused = Counter(
            "listener_dedup_reused_steps",
            "Paid steps that reused a stored result of a duplicate image instead of calling "
            "the provider, by provider and match (sha256, phash).",
            ["provider", "kind"],
            registry=r,
        )
        self.dedup_saved_usd = Counter(
            "listener_dedup_saved_usd",
            "USD not spent thanks to deduplication (what the reused results cost), by provider.",
            ["provider"],
            registry=r,
        )
        self.in_flight = Gauge("listener_jobs_in_flight", "Jobs running now.", registry=r)
        self.queue_jobs = Gauge(
            "listener_queue_jobs",
            "Jobs by status (pending, processing, complete, failed, cancelled, batched), "
            "from the job counters.",
            ["status"],
            registry=r,
        )
        self.oldest_pending = Gauge(
            "listener_oldest_pending_seconds",
            "Seconds the longest-waiting runnable pending job has waited (now - run_after).",
            registry=r,
        )
        self.outbox_depth = Gauge(
            "listener_outbox_depth",
            "Rows waiting in each outbox listener keeps in Postgres, by outbox (status: status "
            "write-back, events: webhook events, deleted: deleted rows to clean up, inserted: "
            "inserted rows to admit as jobs); exact up to 10,000, the planner's estimate "
            "beyond.",
            ["outbox"],
            registry=r,
        )
        self.outbox_oldest_age = Gauge(
            "listener_outbox_oldest_age_seconds",
            "Seconds the oldest row waiting in each outbox has waited, by outbox; 0 when none "
            "waits.",
            ["outbox"],
            registry=r,
        )
        self.notifications = Counter(
            "listener_notifications", "NOTIFY wake-ups received.", registry=r
        )
        self.reconnects = Counter(
            "listener_listen_reconnects", "Reconnections of the LISTEN connection.", registry=r
        )
        self.db_errors = Counter(
            "listener_db_errors", "Database errors in the worker loops.", ["op"], registry=r
        )
        self._rates: dict[str, RateMeter] = {}

    def provider_called(self, provider: str) -> None:
        """Count one call to ``provider``."""
        self.provider_requests.labels(provider).inc()
        meter = self._rates.get(provider)
        if meter is None:
            meter = self._rates[provider] = RateMeter(self._clock)
        meter.add()

    def provider_rates(self) -> dict[str, float]:
        """Requests per second of each provider over the last 10 seconds."""
        return {name: round(m.rate(10), 3) for name, m in self._rates.items()}
