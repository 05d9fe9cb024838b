"""Slow clients: open N TCP connections that send a partial request line and never finish.

Usage::

    python bench/idle_clients.py HOST PORT N [--payload 'GET /readyz HTT']

Run in a process of its own, so its sockets do not count against the server's descriptors.
Prints one JSON object per line on stdout:

- ``{"event": "opened", "opened": int, "failed": int, "elapsed_s": float}`` once every
  connection was attempted (``failed``: connects refused or reset before the payload went out);
- ``{"event": "closed", "closed": int, "open": int, "elapsed_s": float}`` every second while
  connections are open, and once more when the server has closed all of them.

Exits when every connection is closed by the server, or on SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import sys
import time


def emit(event: str, **fields: float) -> None:
    print(json.dumps({"event": event, **fields}), flush=True)


class Flood:
    """``count`` connections to ``host:port``, each sending ``payload`` and then waiting."""

    def __init__(self, host: str, port: int, count: int, payload: bytes) -> None:
        self.host, self.port, self.count, self.payload = host, port, count, payload
        self.t0 = time.monotonic()
        self.attempted = 0
        self.failed = 0
        self.closed = 0
        self.all_attempted = asyncio.Event()

    def _attempt_done(self, ok: bool) -> None:
        self.attempted += 1
        self.failed += not ok
        if self.attempted == self.count:
            self.all_attempted.set()

    async def hold(self) -> None:
        """Connect, send the payload, wait until the server closes the connection."""
        try:
            reader, writer = await asyncio.open_connection(self.host, self.port)
        except OSError:
            self._attempt_done(False)
            return
        sent = False
        try:
            writer.write(self.payload)
            await writer.drain()
            sent = True
            self._attempt_done(True)
            while await reader.read(4096):
                pass
        except OSError:
            if not sent:
                self._attempt_done(False)
        finally:
            self.closed += 1
            writer.close()


async def main(host: str, port: int, count: int, payload: bytes) -> None:
    flood = Flood(host, port, count, payload)
    tasks = [asyncio.create_task(flood.hold()) for _ in range(count)]
    await flood.all_attempted.wait()
    emit(
        "opened",
        opened=count - flood.failed,
        failed=flood.failed,
        elapsed_s=time.monotonic() - flood.t0,
    )
    while not all(t.done() for t in tasks):
        await asyncio.wait(tasks, timeout=1.0)
        emit(
            "closed",
            closed=flood.closed,
            open=sum(1 for t in tasks if not t.done()),
            elapsed_s=time.monotonic() - flood.t0,
        )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("host")
    parser.add_argument("port", type=int)
    parser.add_argument("count", type=int)
    parser.add_argument("--payload", default="GET /readyz HTT")
    args = parser.parse_args()
    # The clients' own descriptors: 1,000 sockets do not fit a 1,024 soft limit.
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    asyncio.run(main(args.host, args.port, args.count, args.payload.encode()))
    sys.exit(0)
