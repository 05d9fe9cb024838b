"""The ``noop`` provider: completes a job without analysis, for benchmarks and pipeline tests."""

from __future__ import annotations

import asyncio

from listener.analysis.providers.base import ImageInput, StepContext, StepResult


class NoopProvider:
    """Does nothing, optionally after a fixed delay; records no result.

    Args:
        delay_s: seconds to sleep per call (``LISTENER_NOOP_DELAY_S``), simulating a remote
            call without using CPU.
    """

    name = "noop"
    needs_image = False

    def __init__(self, delay_s: float = 0.0) -> None:
        self.delay_s = delay_s

    async def start(self) -> None:
        """Nothing to acquire."""

    async def close(self) -> None:
        """Nothing to release."""

    def estimate_tokens(self, kind: str, image: ImageInput) -> int:
        """Not token-priced: 0."""
        return 0

    async def run(self, kind: str, image: ImageInput, context: StepContext) -> StepResult | None:
        """Sleep ``delay_s`` seconds and record nothing."""
        if self.delay_s > 0:
            await asyncio.sleep(self.delay_s)
        return None
