"""One daemon of ``bench_fleet.py --provider noop``: ``listener``'s daemon with a noop provider
that records when each call reached it.

Usage (the benchmark starts it; settings come from ``LISTENER_*`` like ``listener run``)::

    python bench/fleet_daemon.py CALL_LOG

Runs until SIGTERM, then writes one ``time.monotonic()`` per provider call (seconds, one per
line) to ``CALL_LOG``. CLOCK_MONOTONIC is one clock for every process on Linux, so the
benchmark can merge the logs of several daemons. The provider is named ``noop``, so
``LISTENER_RATE_LIMITS`` limits it like the real ``noop`` provider.
"""

from __future__ import annotations

import asyncio
import sys
import time
from pathlib import Path

from listener.analysis.providers.base import ImageInput, StepContext, StepResult
from listener.app import Daemon, run_until_signalled
from listener.ops.logs import configure_logging
from listener.settings import Settings


class RecordingNoop:
    """The noop provider, recording the monotonic time of every call."""

    name = "noop"
    needs_image = False

    def __init__(self) -> None:
        self.calls: list[float] = []

    async def start(self) -> None:
        """Nothing to acquire."""

    async def close(self) -> None:
        """Nothing to release."""

    def estimate_tokens(self, kind: str, image: ImageInput) -> int:
        """Not token-priced: 0."""
        return 0

    async def run(self, kind: str, image: ImageInput, context: StepContext) -> StepResult | None:
        """Record the call; no result."""
        self.calls.append(time.monotonic())
        return None


async def main(log: Path) -> None:
    settings = Settings()
    configure_logging(settings.log_level)
    provider = RecordingNoop()
    try:
        await run_until_signalled(Daemon(settings, providers=[provider], health=False))
    finally:
        log.write_text("".join(f"{t!r}\n" for t in provider.calls))


if __name__ == "__main__":
    asyncio.run(main(Path(sys.argv[1])))
