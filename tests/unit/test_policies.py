"""Pure policies: retry decisions, full-jitter backoff, the token bucket, the rate meter."""

from __future__ import annotations

import itertools
import math
import uuid

import pytest

from listener.analysis.ratelimit import TokenBucket
from listener.errors import (
    FetchTimeout,
    ImageNotFound,
    InvalidImage,
    ProviderUnavailable,
    RateLimited,
)
from listener.ops.metrics import RateMeter
from listener.queue.outcomes import Discarded, Job, Retry, Snoozed
from listener.queue.retry import RetryPolicy, describe, full_jitter_backoff


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def job(attempts: int, max_attempts: int = 5) -> Job:
    return Job(1, "public.t", "1", "http://x", None, 0, attempts, max_attempts, uuid.uuid4())


def test_backoff_grows_exponentially_up_to_the_cap() -> None:
    upper = [full_jitter_backoff(n, 5.0, 600.0, lambda: 0.999999) for n in range(1, 12)]
    assert [round(u) for u in upper[:5]] == [5, 10, 20, 40, 80]
    assert max(upper) <= 600.0 and upper[-1] == pytest.approx(600.0, rel=1e-5)
    assert full_jitter_backoff(3, 5.0, 600.0, lambda: 0.0) == 0.0
    assert full_jitter_backoff(10_000, 5.0, 600.0, lambda: 0.5) == 300.0


def test_permanent_errors_fail_at_once() -> None:
    policy = RetryPolicy(5, 600)
    for error in (ImageNotFound("HTTP 404 for http://x/a.jpg"), InvalidImage("empty body")):
        outcome = policy.decide(job(1), error, lambda: 0.5)
        assert isinstance(outcome, Discarded) and outcome.error == str(error)


def test_retryable_errors_retry_until_attempts_run_out() -> None:
    policy = RetryPolicy(5, 600)
    first = policy.decide(job(1), FetchTimeout("read timeout"), lambda: 0.5)
    assert isinstance(first, Retry) and first.delay_s == 2.5 and first.error == "read timeout"
    third = policy.decide(job(3), FetchTimeout("read timeout"), lambda: 0.5)
    assert isinstance(third, Retry) and third.delay_s == 10.0
    last = policy.decide(job(5), FetchTimeout("read timeout"), lambda: 0.5)
    assert isinstance(last, Discarded)
    assert last.error == "read timeout (gave up after 5 attempts)"


def test_retry_after_is_a_floor_and_unknown_errors_retry() -> None:
    policy = RetryPolicy(5, 600)
    outcome = policy.decide(job(1), ProviderUnavailable("503", retry_after=42), lambda: 0.5)
    assert isinstance(outcome, Retry) and outcome.delay_s == 42
    bug = policy.decide(job(1), KeyError("boom"), lambda: 0.5)
    assert isinstance(bug, Retry) and bug.error == "KeyError: 'boom'"


def test_rate_limited_snoozes_without_spending_an_attempt() -> None:
    # The provider asked to wait: even on the last attempt the job is not failed.
    policy = RetryPolicy(5, 600)
    told = policy.decide(job(5), RateLimited("429", retry_after=42), lambda: 0.5)
    assert isinstance(told, Snoozed) and told.delay_s == 42
    untold = policy.decide(job(3), RateLimited("429"), lambda: 0.5)
    assert isinstance(untold, Snoozed) and untold.delay_s == 10.0
    server_error = policy.decide(job(5), ProviderUnavailable("HTTP 500"), lambda: 0.5)
    assert isinstance(server_error, Discarded)


def test_describe_is_one_bounded_line() -> None:
    assert describe(TimeoutError()) == "timed out (TimeoutError)"
    assert describe(ValueError("a\n  b")) == "ValueError: a b"
    assert len(describe(ValueError("x" * 5000))) == 1000


def test_token_bucket_allows_burst_then_paces_at_rate() -> None:
    clock = FakeClock()
    bucket = TokenBucket(rate=10, burst=3, clock=clock)
    waits = [bucket.reserve() for _ in range(5)]
    assert waits[:3] == [0, 0, 0]
    assert waits[3] == pytest.approx(0.1) and waits[4] == pytest.approx(0.2)
    clock.now += 1.0
    assert bucket.available() == pytest.approx(3.0)


def test_token_bucket_sustained_rate_never_exceeds_limit() -> None:
    clock = FakeClock()
    bucket = TokenBucket(rate=10, burst=1, clock=clock)
    start_times = []
    for _ in range(100):
        start_times.append(clock.now + bucket.reserve())
    span = start_times[-1] - start_times[0]
    assert span == pytest.approx(9.9)
    assert all(b - a == pytest.approx(0.1) for a, b in itertools.pairwise(start_times))


def test_token_bucket_pause_and_unlimited() -> None:
    clock = FakeClock()
    bucket = TokenBucket(rate=math.inf, burst=1, clock=clock)
    assert bucket.unlimited and bucket.reserve() == 0
    bucket.pause(7)
    assert not bucket.unlimited and bucket.reserve() == pytest.approx(7)
    clock.now += 7
    assert bucket.unlimited
    with pytest.raises(ValueError):
        TokenBucket(rate=0, burst=1, clock=clock)


def test_rate_meter_counts_complete_seconds() -> None:
    clock = FakeClock()
    meter = RateMeter(clock, window_s=60)
    for _ in range(10):
        for _ in range(5):
            meter.add()
        clock.now += 1
    assert meter.rate(10) == pytest.approx(5.0)
    clock.now += 100
    assert meter.rate(10) == 0.0
