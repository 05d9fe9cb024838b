"""The fake as a process: ``python -m listener.testing.rekognition_fake --port 0 [--tps N]``."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
from collections.abc import Sequence

from listener.testing.rekognition_fake.server import FakeRekognition


async def _serve(port: int, tps_limit: float | None) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        # Not available on Windows' event loop: there Ctrl+C alone stops the fake.
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(signum, stop.set)
    async with FakeRekognition(tps_limit=tps_limit, port=port) as fake:
        print(f"READY {fake.endpoint_url}", flush=True)
        await stop.wait()


def main(argv: Sequence[str] | None = None) -> None:
    """Serve the fake until SIGTERM or SIGINT, after printing ``READY <endpoint_url>``."""
    parser = argparse.ArgumentParser(
        prog="python -m listener.testing.rekognition_fake",
        description="Fake Amazon Rekognition on 127.0.0.1",
    )
    parser.add_argument("--port", type=int, default=0, help="TCP port; 0 picks a free one")
    parser.add_argument("--tps", type=float, default=None, help="requests per second allowed")
    args = parser.parse_args(argv)
    asyncio.run(_serve(args.port, args.tps))
