"""A deliberately slow webhook receiver for ``soak.py``: answers every event after a delay.

Usage::

    python bench/webhook_sink.py --secret S --delay-ms 200     # prints its port, then serves

``POST /hook`` verifies ``X-Listener-Signature`` (``listener.app_side.webhooks``), sleeps
``--delay-ms``, records the body's ``event_id`` and ``status`` and answers 204 (400 for a bad
signature or body). ``GET /stats`` answers the counts so far as JSON: ``deliveries`` (POSTs
answered 204), ``unique`` (distinct event ids), ``duplicates``, ``bad`` (refused),
``by_status``, ``in_flight`` and ``max_in_flight`` (requests being answered at once). Event ids
are kept in a bitmap (one bit per id), so a run of millions of events holds a few hundred KB.

The first line on stdout is the bound port; the server runs until SIGTERM or SIGINT.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys
from typing import Any

from aiohttp import web

from listener.app_side.webhooks import SIGNATURE_HEADER, verify_signature


class Sink:
    """What the receiver has seen.

    Args:
        secret: the webhook secret the daemon signs with.
        delay_s: seconds to wait before answering each delivery.
    """

    def __init__(self, secret: str, delay_s: float) -> None:
        self.secret = secret
        self.delay_s = delay_s
        self.seen = bytearray()
        self.deliveries = 0
        self.unique = 0
        self.duplicates = 0
        self.bad = 0
        self.by_status: dict[str, int] = {}
        self.in_flight = 0
        self.max_in_flight = 0

    def record(self, event_id: int, status: str) -> None:
        """Count one answered delivery of ``event_id``."""
        byte, bit = divmod(event_id, 8)
        if byte >= len(self.seen):
            self.seen.extend(bytes(max(byte + 1 - len(self.seen), 1 << 16)))
        self.deliveries += 1
        if self.seen[byte] & (1 << bit):
            self.duplicates += 1
            return
        self.seen[byte] |= 1 << bit
        self.unique += 1
        self.by_status[status] = self.by_status.get(status, 0) + 1

    async def hook(self, request: web.Request) -> web.Response:
        """``POST /hook``: verify, wait ``delay_s``, record, answer 204."""
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            body = await request.read()
            if not verify_signature(self.secret, request.headers.get(SIGNATURE_HEADER, ""), body):
                self.bad += 1
                return web.Response(status=400)
            try:
                event = json.loads(body)
                event_id, status = int(event["event_id"]), str(event["status"])
            except (ValueError, KeyError, TypeError):
                self.bad += 1
                return web.Response(status=400)
            await asyncio.sleep(self.delay_s)
            self.record(event_id, status)
            return web.Response(status=204)
        finally:
            self.in_flight -= 1

    async def stats(self, _: web.Request) -> web.Response:
        """``GET /stats``: the counts so far."""
        return web.json_response(self.snapshot())

    def snapshot(self) -> dict[str, Any]:
        """The counts so far (see the module's docstring)."""
        return {
            "deliveries": self.deliveries,
            "unique": self.unique,
            "duplicates": self.duplicates,
            "bad": self.bad,
            "by_status": dict(self.by_status),
            "in_flight": self.in_flight,
            "max_in_flight": self.max_in_flight,
        }


async def serve(secret: str, delay_s: float, host: str, port: int) -> None:
    """Serve until SIGTERM or SIGINT; prints the bound port first."""
    sink = Sink(secret, delay_s)
    app = web.Application()
    app.router.add_post("/hook", sink.hook)
    app.router.add_get("/stats", sink.stats)
    # No access log: at hundreds of deliveries a second it would be most of the work.
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port, backlog=1024)
    await site.start()
    assert runner.addresses
    print(runner.addresses[0][1], flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        await runner.cleanup()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--secret", required=True)
    parser.add_argument("--delay-ms", type=float, default=200.0)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args(argv)
    asyncio.run(serve(args.secret, args.delay_ms / 1000, args.host, args.port))
    return 0


if __name__ == "__main__":
    sys.exit(main())
