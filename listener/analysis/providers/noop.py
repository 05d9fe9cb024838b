"""The ``noop`` provider: completes a job without analysis, for benchmarks and pipeline tests.

It is a test and benchmark provider only: it looks at no image and records nothing. Besides a
fixed delay (``LISTENER_NOOP_DELAY_S``) it can fail a share of its calls on purpose
(``LISTENER_NOOP_FAILURE_RATE``), so a soak or a retry test meets retries at a known rate.
"""

from __future__ import annotations

import asyncio
import hashlib

from listener.analysis.providers.base import ImageInput, StepContext, StepResult
from listener.errors import ProviderUnavailable

INJECTED_FAILURE = "noop: injected failure (LISTENER_NOOP_FAILURE_RATE)"
"""The reason recorded on a job whose noop call failed on purpose."""


def injected_draw(job_id: int, claims: int) -> float:
    """A number in [0, 1) fixed by the job and its claim: the failure draw of that attempt.

    The same job fails or succeeds the same way each time it is claimed the n-th time, in every
    run, and its next claim draws again (so a job that failed is retried with the same odds).

    Args:
        job_id: ``listener.jobs.id``.
        claims: how many times the job has been claimed, this claim included.
    """
    digest = hashlib.blake2b(f"{job_id}:{claims}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


class NoopProvider:
    """Does nothing, optionally after a fixed delay; records no result.

    Args:
        delay_s: seconds to sleep per call (``LISTENER_NOOP_DELAY_S``), simulating a remote
            call without using CPU.
        failure_rate: share of calls, 0 to 1, that raise ``ProviderUnavailable`` (a retryable
            error: the job is retried after a backoff, and failed once its attempts run out)
            after the delay (``LISTENER_NOOP_FAILURE_RATE``). Which calls fail is
            deterministic per job and claim (``injected_draw``).
    """

    name = "noop"
    needs_image = False

    def __init__(self, delay_s: float = 0.0, failure_rate: float = 0.0) -> None:
        if not 0.0 <= failure_rate <= 1.0:
            raise ValueError(f"failure_rate must be within 0 and 1, not {failure_rate}")
        self.delay_s = delay_s
        self.failure_rate = failure_rate

    async def start(self) -> None:
        """Nothing to acquire."""

    async def close(self) -> None:
        """Nothing to release."""

    def estimate_tokens(self, kind: str, image: ImageInput) -> int:
        """Not token-priced: 0."""
        return 0

    async def run(self, kind: str, image: ImageInput, context: StepContext) -> StepResult | None:
        """Sleep ``delay_s`` seconds and record nothing.

        Raises:
            ProviderUnavailable: this attempt drew a failure (``failure_rate``).
        """
        if self.delay_s > 0:
            await asyncio.sleep(self.delay_s)
        rate = self.failure_rate
        if rate > 0 and injected_draw(image.job_id, context.claims) < rate:
            raise ProviderUnavailable(INJECTED_FAILURE)
        return None
