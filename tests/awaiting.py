"""Waits on what a daemon signals (``listener.queue.signals``, ``listener.queue.loops``) instead
of polling the database on a timer.

Each wait has a timeout, and the helpers that stand for a database condition check it in the
database once the signal came: a signal says when to look, the database says what is true.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import asyncpg
from support import all_finished

from listener.app import Daemon
from listener.queue.loops import LoopSignals
from listener.queue.signals import Counters


async def jobs_finished(
    daemon: Daemon, conn: asyncpg.Connection, expected: int, timeout: float = 30.0
) -> None:
    """Wait until ``expected`` jobs exist and none waits (``all_finished``), checking the
    database each time ``daemon``'s worker finishes (completes or fails) a job."""
    await when(lambda: all_finished(conn, expected), daemon.signals, "finished", timeout)


async def when(
    check: Callable[[], Awaitable[bool]],
    signals: Counters[Any],
    name: str,
    timeout: float = 30.0,
) -> None:
    """Wait until ``check`` holds, checking it again each time ``signals`` emits ``name``
    (the event that can make it true), never on a timer.

    Raises:
        TimeoutError: ``check`` did not hold within ``timeout`` seconds.
    """
    await when_any(check, [(signals, name)], timeout)


async def when_any(
    check: Callable[[], Awaitable[bool]],
    sources: Sequence[tuple[Counters[Any], str]],
    timeout: float = 30.0,
) -> None:
    """``when`` over several sources (two daemons' workers): ``check`` is checked again each
    time any of them emits its signal.

    Raises:
        TimeoutError: ``check`` did not hold within ``timeout`` seconds.
    """
    async with asyncio.timeout(timeout):
        while True:
            # Counted before the check: an emission during the check is not missed.
            seen = [signals.count(name) for signals, name in sources]
            if await check():
                return
            waits = [
                asyncio.ensure_future(signals.wait(name, n + 1, timeout))
                for (signals, name), n in zip(sources, seen, strict=True)
            ]
            try:
                await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for wait in waits:
                    wait.cancel()


async def when_written(
    daemon: Daemon, check: Callable[[], Awaitable[bool]], timeout: float = 30.0
) -> None:
    """Wait until ``check`` holds, checking it after each status write-back round that
    wrote something (or found nothing to write)."""
    await when(check, loop_signals(daemon, "writeback"), "ticked", timeout)


def loop_signals(daemon: Daemon, name: str) -> LoopSignals:
    """The signals of ``daemon``'s side loop ``name`` (``writeback``, ``deletes``, ``rollup``,
    ``webhooks``, ``batches``, ``prune``)."""
    loops = {
        "writeback": daemon.status_writeback,
        "deletes": daemon.deletes,
        "rollup": daemon.counts_rollup,
        "webhooks": daemon.webhooks,
        "batches": daemon.batches,
        "prune": daemon.pruner,
    }
    owner = loops[name]
    assert owner is not None, f"the daemon runs no {name} loop"
    return owner.loop.signals
