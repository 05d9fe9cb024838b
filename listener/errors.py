"""The error hierarchy that decides what happens to a job that failed.

::

    ListenerError
    ├── Deferred                the job waits, without using an attempt: not its fault
    │   ├── BudgetExhausted     the daily budget for paid providers is spent
    │   ├── ProviderPaused      the provider is paused (quota exhausted, key rejected)
    │   └── OperatorPaused      an operator ran `listener pause [provider]`
    ├── RetryableError          the job goes back to pending after a backoff
    │   ├── RateLimited         a provider said 429 / throttled (may carry retry_after): the
    │   │                       job is snoozed without using an attempt
    │   ├── ProviderUnavailable connection refused or reset, 5xx
    │   ├── FetchTimeout        connect or read timeout
    │   └── StepTimeout         a step's provider call ran past its timeout (it hung)
    └── PermanentError          the job is failed at once; retrying cannot help
        ├── InvalidURL          NULL, empty, whitespace, unsupported scheme
        ├── FetchRefused        the URL resolves to a refused address (SSRF guard)
        ├── ImageNotFound       HTTP 404 / 410, or a missing local file
        ├── ImageTooLarge       over the byte limit or Pillow's pixel limit
        ├── InvalidImage        not an image, empty, truncated, undecodable
        └── RejectedByProvider  the provider refused the request (4xx other than 404/429)

Any other exception raised while a job runs is treated as retryable: the job is retried
until its attempts run out and then failed, with the exception's text as its reason.
"""

from __future__ import annotations


class LeaseLost(RuntimeError):
    """The job's lease expired and another worker took it: stop working on it (nothing more
    is written or sent for it by this worker)."""


class ListenerError(Exception):
    """Base class of every error listener raises on purpose.

    ``str(error)`` is the reason stored in ``listener.jobs.last_error``: it must say what went
    wrong in words a user can act on, and never contain a secret.
    """


class Deferred(ListenerError):
    """The job cannot run now for a reason that is not its own; it waits without using an attempt.

    Args:
        message: the reason recorded on the job (and shown in status).
        retry_after: seconds until the job is tried again.
        held_by: what holds the job, when ``listener resume`` can end the wait early (a
            paused provider, ``"*"``, ``"budget"``); recorded on the snoozed job.
    """

    def __init__(
        self, message: str, *, retry_after: float = 60.0, held_by: str | None = None
    ) -> None:
        super().__init__(message)
        self.retry_after = retry_after
        self.held_by = held_by


class BudgetExhausted(Deferred):
    """``LISTENER_BUDGET_USD_PER_DAY`` is spent: paid providers wait for the next UTC day."""

    def __init__(self, message: str, *, retry_after: float = 60.0) -> None:
        super().__init__(message, retry_after=retry_after, held_by="budget")


class OperatorPaused(Deferred):
    """An operator paused the provider (or the whole pipeline, ``"*"``) with ``listener pause``.

    Args:
        provider: the paused provider, or ``"*"``.
        reason: the operator's reason, if given.
        retry_after: seconds until the pause ends (a day for a pause without an end:
            ``listener resume`` wakes the jobs it holds).
    """

    def __init__(self, provider: str, reason: str | None, *, retry_after: float) -> None:
        what = "the pipeline" if provider == "*" else provider
        super().__init__(
            f"paused by operator: {what}" + (f" ({reason})" if reason else ""),
            retry_after=retry_after,
            held_by=provider,
        )
        self.provider = provider


class ProviderPaused(Deferred):
    """The provider must not be called for a while, by any daemon.

    Args:
        message: the reason, shown in status (e.g. "OpenAI: insufficient_quota").
        pause_s: how long the provider is paused fleet-wide, seconds.
    """

    def __init__(self, message: str, *, pause_s: float) -> None:
        super().__init__(message, retry_after=pause_s)
        self.pause_s = pause_s


class RetryableError(ListenerError):
    """A failure that may go away by itself; the job is retried after a backoff.

    Args:
        message: the reason recorded on the job.
        retry_after: seconds the remote side asked us to wait, if it said so; the retry
            policy never schedules the next attempt sooner than this.
    """

    def __init__(self, message: str, *, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class RateLimited(RetryableError):
    """The provider answered 429 / throttling: the job waits (``retry_after`` or a backoff)
    without using an attempt, since the provider asked it to."""


class ProviderUnavailable(RetryableError):
    """Connection refused or reset, DNS failure, or a 5xx answer."""


class FetchTimeout(RetryableError):
    """A connect or read timeout while fetching the image or calling a provider."""


class StepTimeout(RetryableError):
    """A step's provider call did not finish within its timeout (``LISTENER_STEP_TIMEOUTS``).

    The call is abandoned (a hung local analysis process is killed) and the attempt is
    retried, so a hang never keeps a job's lease forever.

    Args:
        step: the step's name, e.g. ``"local.analysis"``.
        timeout_s: the timeout that ran out, seconds.
    """

    def __init__(self, step: str, timeout_s: float) -> None:
        super().__init__(f"step {step} timed out after {timeout_s:g}s")
        self.step = step
        self.timeout_s = timeout_s

    def __reduce__(self) -> tuple[type[StepTimeout], tuple[str, float]]:
        return (type(self), (self.step, self.timeout_s))


class PermanentError(ListenerError):
    """A failure that retrying cannot fix; the job is failed at once."""


class InvalidURL(PermanentError):
    """The row's image URL is NULL, empty, malformed, or of a scheme that is not allowed."""


class FetchRefused(PermanentError):
    """The URL points at an address listener refuses to fetch (loopback, private, metadata)."""


class ImageNotFound(PermanentError):
    """HTTP 404 or 410, or a local file that does not exist."""


class ImageTooLarge(PermanentError):
    """The image exceeds the byte limit or Pillow's decompression-bomb pixel limit."""


class InvalidImage(PermanentError):
    """The bytes are not a decodable image: empty, HTML, truncated, or an unknown format."""


class RejectedByProvider(PermanentError):
    """The provider refused the request for a reason that will not change on retry."""
