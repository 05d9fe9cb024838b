"""The fake as a process: ``python -m listener.testing.openai_fake [--port N] [--rps R]``."""

from __future__ import annotations

import argparse
import asyncio
import signal
from collections.abc import Sequence

from listener.testing.openai_fake.server import FakeOpenAI


async def _serve(fake: FakeOpenAI) -> None:
    """Run ``fake`` until SIGTERM or SIGINT, announcing ``READY <base_url>`` on stdout."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    async with fake:
        print(f"READY {fake.base_url}", flush=True)
        await stop.wait()


def main(argv: Sequence[str]) -> None:
    """``python -m listener.testing.openai_fake [--port N] [--rps R] [--latency S]``.

    Serves until SIGTERM or SIGINT, after printing ``READY <base_url>``.
    """
    parser = argparse.ArgumentParser(
        prog="python -m listener.testing.openai_fake",
        description="A fake OpenAI API on 127.0.0.1 for tests and demos.",
    )
    parser.add_argument("--port", type=int, default=0, help="TCP port; 0 picks a free one")
    parser.add_argument("--rps", type=float, default=None, help="requests per second limit")
    parser.add_argument("--latency", type=float, default=0.0, help="seconds before each answer")
    args = parser.parse_args(list(argv))
    fake = FakeOpenAI(rps_limit=args.rps, latency_s=args.latency, port=args.port)
    asyncio.run(_serve(fake))
