"""The retry policy: what happens to a job whose attempt failed. Pure: no I/O, no clock.

Exponential backoff with full jitter: the n-th retry waits a uniformly random time in
``[0, min(cap, base * 2**(n-1)))`` seconds. Full jitter spreads retries of jobs that failed
together (a provider outage) instead of bringing them back in a wave. Source: Marc Brooker,
"Exponential Backoff And Jitter", AWS Architecture Blog, 2015.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass

from listener.errors import Deferred, ListenerError, PermanentError, RateLimited, RetryableError
from listener.queue.outcomes import Discarded, Failure, Job, Retry, Snoozed
from listener.redact import redact_text

_MAX_REASON = 1000


def full_jitter_backoff(
    attempt: int, base_s: float, cap_s: float, rng: Callable[[], float]
) -> float:
    """Seconds to wait before retry number ``attempt`` (1 for the first retry).

    Args:
        attempt: the retry's number, >= 1.
        base_s: the first retry's upper bound, seconds.
        cap_s: the largest upper bound, seconds.
        rng: a source of uniform floats in [0, 1), e.g. ``random.random``.
    """
    exponent = min(max(attempt - 1, 0), 62)
    return rng() * min(cap_s, base_s * (2.0**exponent))


def describe(error: BaseException) -> str:
    """A one-line reason for ``last_error``: listener errors as they are, others with their type.

    Every reason passes ``listener.redact.redact_text`` (URL credentials and query strings,
    bearer tokens, keys and signatures masked) before it is cut to 1,000 characters, so no
    stored reason holds a secret, whatever raised it.
    """
    if isinstance(error, ListenerError):
        text = str(error)
    elif isinstance(error, TimeoutError | asyncio.TimeoutError):
        text = f"timed out ({type(error).__name__})"
    else:
        text = f"{type(error).__name__}: {error}".rstrip(": ")
    text = " ".join(redact_text(text).split())
    return text[:_MAX_REASON]


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """Decides between retry (with a delay) and dead letter for a failed attempt.

    Attributes:
        base_s: backoff base, seconds.
        cap_s: backoff cap, seconds.
    """

    base_s: float = 5.0
    cap_s: float = 600.0

    def decide(self, job: Job, error: BaseException, rng: Callable[[], float]) -> Failure:
        """The outcome of ``job``'s failed attempt.

        - ``Deferred`` (budget spent, provider paused): ``Snoozed`` for its ``retry_after``,
          the attempt given back, held by the error's ``held_by``.
        - ``RateLimited`` (the provider answered 429 or throttled): ``Snoozed`` too, as River's
          snooze: the provider asked to wait, the job did nothing wrong. The delay is the
          provider's ``retry_after`` when given, else a full-jitter backoff.
        - ``PermanentError``: ``Discarded`` at once.
        - anything else (5xx, timeouts, unknown errors): ``Retry`` after a full-jitter backoff
          (never sooner than a ``retry_after`` the remote side asked for) until the job has
          used ``max_attempts`` attempts; then ``Discarded`` with the last reason.
        """
        reason = describe(error)
        if isinstance(error, Deferred):
            return Snoozed(job, reason, max(error.retry_after, 0.0), error.held_by)
        backoff = full_jitter_backoff(job.attempts, self.base_s, self.cap_s, rng)
        if isinstance(error, RateLimited):
            wait = error.retry_after if error.retry_after is not None else backoff
            return Snoozed(job, reason, max(wait, 0.0))
        if isinstance(error, PermanentError):
            return Discarded(job, reason)
        if job.attempts >= job.max_attempts:
            return Discarded(job, f"{reason} (gave up after {job.attempts} attempts)")
        if isinstance(error, RetryableError) and error.retry_after is not None:
            backoff = max(backoff, error.retry_after)
        return Retry(job, reason, backoff)
