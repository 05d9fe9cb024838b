"""Runs one job through the pipeline: fetch, then each provider under its limits.

For each provider, in order: its semaphore (calls in flight), then its token bucket (calls
per second), then the call. The dispatcher never raises for a job's failure: it returns an
``Outcome`` (``Completed`` or ``Failed``) decided by the retry policy. The global bound on
running jobs is the worker's, which claims no more jobs than it has free slots.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from loguru import logger

from listener.jobs import Completed, Job, Outcome
from listener.metrics import Metrics
from listener.providers.base import ImageInput, Provider, StepResult
from listener.ratelimit import TokenBucket
from listener.retry import RetryPolicy
from listener.settings import RateLimit


class Fetcher(Protocol):
    """Fetches image bytes (``listener.fetch.ImageFetcher`` in production)."""

    async def fetch(self, url: str | None) -> FetchResult: ...


class FetchResult(Protocol):
    """What a fetch returns: the final URL, the bytes and the sniffed format."""

    @property
    def url(self) -> str: ...
    @property
    def data(self) -> bytes: ...
    @property
    def format(self) -> str: ...


@dataclass(slots=True)
class ProviderSlot:
    """A provider with its own concurrency limit and token bucket."""

    provider: Provider
    semaphore: asyncio.Semaphore
    bucket: TokenBucket

    @classmethod
    def build(
        cls, provider: Provider, limit: RateLimit, clock: Callable[[], float]
    ) -> ProviderSlot:
        """Wrap ``provider`` with the limits of ``limit``."""
        return cls(
            provider=provider,
            semaphore=asyncio.Semaphore(limit.concurrency),
            bucket=TokenBucket(limit.rps, limit.burst, clock),
        )


class Dispatcher:
    """Turns a claimed ``Job`` into an ``Outcome``.

    Args:
        slots: the pipeline's providers, in the order they run, each with its limits.
        fetcher: fetches the image when any provider needs the bytes.
        policy: decides retry or dead letter for a failed attempt.
        metrics: counters and histograms to update.
        rng: uniform floats in [0, 1) for backoff jitter.
    """

    def __init__(
        self,
        slots: Sequence[ProviderSlot],
        fetcher: Fetcher,
        policy: RetryPolicy,
        metrics: Metrics,
        rng: Callable[[], float],
    ) -> None:
        self._slots = list(slots)
        self._fetcher = fetcher
        self._policy = policy
        self._metrics = metrics
        self._rng = rng
        self._needs_image = any(s.provider.needs_image for s in self._slots)

    @property
    def providers(self) -> list[Provider]:
        """The pipeline's providers, in order."""
        return [s.provider for s in self._slots]

    async def run(self, job: Job) -> Outcome:
        """Run ``job`` through the pipeline; never raises except ``CancelledError``."""
        try:
            results = await self._run(job)
        except asyncio.CancelledError:
            raise
        except Exception as error:
            outcome = self._policy.decide(job, error, self._rng)
            log = logger.bind(job_id=job.id, source_id=job.source_id, attempt=job.attempts)
            if outcome.retry_in_s is None:
                log.warning("job failed: {}", outcome.error)
            else:
                log.info("attempt failed, retry in {:.1f}s: {}", outcome.retry_in_s, outcome.error)
            return outcome
        return Completed(job, results)

    async def _run(self, job: Job) -> list[StepResult]:
        if self._needs_image:
            fetched = await self._fetcher.fetch(job.image_url)
            image = ImageInput(
                job_id=job.id,
                source_table=job.source_table,
                source_id=job.source_id,
                owner_id=job.owner_id,
                url=fetched.url,
                data=fetched.data,
                content_type=fetched.format,
            )
        else:
            image = ImageInput(
                job_id=job.id,
                source_table=job.source_table,
                source_id=job.source_id,
                owner_id=job.owner_id,
                url=job.image_url or "",
                data=b"",
                content_type="",
            )
        results: list[StepResult] = []
        for slot in self._slots:
            results.extend(await self._call(slot, image))
        return results

    async def _call(self, slot: ProviderSlot, image: ImageInput) -> list[StepResult]:
        name = slot.provider.name
        async with slot.semaphore:
            if not slot.bucket.unlimited:
                wait = slot.bucket.reserve()
                if wait > 0:
                    await asyncio.sleep(wait)
            self._metrics.provider_called(name)
            started = time.perf_counter()
            try:
                return await slot.provider.analyze(image)
            except Exception as error:
                self._metrics.provider_errors.labels(name, type(error).__name__).inc()
                raise
            finally:
                self._metrics.provider_seconds.labels(name).observe(time.perf_counter() - started)
