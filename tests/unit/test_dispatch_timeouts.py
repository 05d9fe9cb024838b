"""The dispatcher's step timeout: a provider call that never returns fails the attempt.

No I/O: a fake provider, an in-memory result store, a per-process limiter.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any

from listener.analysis.dispatch import Dispatcher, FetchResult, LocalLimiter, ProviderSlot
from listener.analysis.pipeline import Plan, Step
from listener.analysis.providers.base import ImageInput, StepContext, StepResult
from listener.ops.metrics import Metrics
from listener.queue.outcomes import Completed, Discarded, Job, Retry
from listener.queue.retry import RetryPolicy
from listener.settings import RateLimit

TIMEOUT_S = 0.2


class HangingProvider:
    """``run`` never returns (unless ``hang`` is off); records whether it was cancelled."""

    name = "hang"
    needs_image = False

    def __init__(self, *, hang: bool = True, raise_own_timeout: bool = False) -> None:
        self.hang = hang
        self.raise_own_timeout = raise_own_timeout
        self.cancelled = False

    async def start(self) -> None:
        """Nothing to start."""

    async def close(self) -> None:
        """Nothing to close."""

    def estimate_tokens(self, kind: str, image: ImageInput) -> int:
        return 0

    async def run(self, kind: str, image: ImageInput, context: StepContext) -> StepResult:
        if self.raise_own_timeout:
            raise TimeoutError("the SDK's own read timeout")
        if self.hang:
            try:
                await asyncio.Event().wait()
            except asyncio.CancelledError:
                self.cancelled = True
                raise
        return StepResult("hang", "hang.step", {"ok": True}, "test")


class NoFetch:
    async def fetch(self, url: str | None) -> FetchResult:
        raise AssertionError("the provider does not need the image")


class NoStore:
    async def save_step(self, job: Job, result: StepResult) -> bool:
        raise AssertionError("a one-step plan saves with the completion")

    async def outputs(self, job_id: int) -> dict[str, dict[str, Any]]:
        return {}


def dispatcher(provider: HangingProvider, timeout_s: float | None) -> tuple[Dispatcher, Metrics]:
    metrics = Metrics(time.monotonic)
    slot = ProviderSlot.build(
        provider, RateLimit(), LocalLimiter(RateLimit(), time.monotonic), timeout_s
    )
    plan = Plan((Step("hang.step", "hang", "step", 1),))
    return (
        Dispatcher(
            plan, {"hang": slot}, NoFetch(), NoStore(), RetryPolicy(5, 600), metrics, lambda: 0.5
        ),
        metrics,
    )


def job(attempts: int = 1, max_attempts: int = 5) -> Job:
    return Job(7, "public.t", "7", "http://x/a.jpg", None, 0, attempts, max_attempts, uuid.uuid4())


async def test_a_call_that_never_returns_fails_as_retryable_with_the_reason() -> None:
    provider = HangingProvider()
    run, metrics = dispatcher(provider, TIMEOUT_S)
    # A generous bound: this checks the call is abandoned at all, not how fast.
    outcome = await asyncio.wait_for(run.run(job()), timeout=30)
    assert isinstance(outcome, Retry)
    assert outcome.error == "step hang.step timed out after 0.2s"
    assert provider.cancelled
    errors = metrics.provider_errors.labels("hang", "StepTimeout")._value.get()
    assert errors == 1


async def test_the_last_attempt_fails_the_job_with_the_timeout_reason() -> None:
    run, _ = dispatcher(HangingProvider(), TIMEOUT_S)
    outcome = await asyncio.wait_for(run.run(job(attempts=5)), timeout=30)
    assert isinstance(outcome, Discarded)
    assert outcome.error == "step hang.step timed out after 0.2s (gave up after 5 attempts)"


async def test_a_providers_own_timeout_error_is_not_reported_as_the_step_timeout() -> None:
    run, _ = dispatcher(HangingProvider(raise_own_timeout=True), TIMEOUT_S)
    outcome = await run.run(job())
    assert isinstance(outcome, Retry)
    assert outcome.error == "timed out (TimeoutError)"  # describe()'s text, not a StepTimeout


async def test_calls_within_the_timeout_or_without_one_complete() -> None:
    for timeout_s in (TIMEOUT_S, None):
        run, _ = dispatcher(HangingProvider(hang=False), timeout_s)
        outcome = await run.run(job())
        assert isinstance(outcome, Completed)
        assert [r.output for r in outcome.results] == [{"ok": True}]
