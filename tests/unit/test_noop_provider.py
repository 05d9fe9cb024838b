"""The ``noop`` provider's injected failures (``LISTENER_NOOP_FAILURE_RATE``): at the rate
asked, retryable, and the same for the same job and claim."""

from __future__ import annotations

import pytest

from listener.analysis.providers.base import ImageInput, StepContext
from listener.analysis.providers.noop import INJECTED_FAILURE, NoopProvider, injected_draw
from listener.app import PROVIDERS, SharedResources
from listener.errors import ProviderUnavailable, RetryableError
from listener.ops.tracing import Tracing
from listener.settings import Settings


def image(job_id: int) -> ImageInput:
    return ImageInput(job_id, "public.images", str(job_id), None, "https://x.invalid/1", b"", "")


async def fails(provider: NoopProvider, job_id: int, claims: int) -> bool:
    try:
        await provider.run("step", image(job_id), StepContext("noop.step", {}, claims))
    except ProviderUnavailable as error:
        assert str(error) == INJECTED_FAILURE
        return True
    return False


async def test_failures_at_the_rate_asked_and_retryable() -> None:
    provider = NoopProvider(failure_rate=0.1)
    failed = [await fails(provider, job_id, 1) for job_id in range(1, 20_001)]
    assert 0.09 < sum(failed) / len(failed) < 0.11
    assert issubclass(ProviderUnavailable, RetryableError)


async def test_the_same_job_and_claim_draw_the_same() -> None:
    provider = NoopProvider(failure_rate=0.5)
    first = [await fails(provider, job_id, 1) for job_id in range(1, 201)]
    assert first == [await fails(provider, job_id, 1) for job_id in range(1, 201)]
    # The next claim draws again: not every job that failed fails again.
    second = [await fails(provider, job_id, 2) for job_id in range(1, 201)]
    assert first != second
    assert all(0.0 <= injected_draw(job_id, 3) < 1.0 for job_id in range(1, 201))


async def test_no_rate_never_fails_and_the_whole_rate_always_does() -> None:
    assert not any([await fails(NoopProvider(), job_id, 1) for job_id in range(1, 1001)])
    assert all([await fails(NoopProvider(failure_rate=1.0), j, 1) for j in range(1, 101)])
    with pytest.raises(ValueError):
        NoopProvider(failure_rate=1.5)


def test_the_setting_reaches_the_provider() -> None:
    settings = Settings(
        _env_file=None,  # type: ignore[call-arg]
        database_url="postgresql://u@localhost/db",
        pipeline="noop",
        noop_failure_rate=0.25,
    )
    provider = PROVIDERS["noop"](settings, SharedResources(None, Tracing()))  # type: ignore[arg-type]
    assert isinstance(provider, NoopProvider) and provider.failure_rate == 0.25
