"""``listener.ops.memory``: freed C heap memory goes back to the system, on the daemon's
interval.

Under a steady load the daemon's C heap filled with freed gaps that glibc kept resident, and
its RSS grew by about a megabyte a minute while what it used stayed flat (``bench/soak.py``).
The first test makes such gaps (blocks over Python's 512-byte small-object limit, so they come
from ``malloc``, nine in ten freed while the last ones keep the heap's top in use) and checks
that a trim returns them.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from listener.ops.memory import MemoryTrim, malloc_trim


def rss_anon_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no RssAnon in /proc/self/status")


def test_a_trim_returns_the_freed_gaps_of_the_heap() -> None:
    if malloc_trim() is None:
        pytest.skip("the C library is not glibc: nothing to trim")
    blocks = [bytes(2048 + (i % 7) * 64) for i in range(30_000)]  # ~66 MB from malloc
    kept = blocks[::10]
    del blocks
    before = rss_anon_mb()
    assert malloc_trim() is True
    after = rss_anon_mb()
    assert before - after > 30, (before, after)
    assert len(kept) == 3_000


async def test_the_loop_trims_every_interval_until_stopped() -> None:
    calls = 0

    def trim() -> bool:
        nonlocal calls
        calls += 1
        return calls % 2 == 1

    loop = MemoryTrim(0.01, trim)
    task = asyncio.create_task(loop.run())
    while calls < 4:
        await asyncio.sleep(0.005)
    loop.stop()
    await asyncio.wait_for(task, 5)
    assert loop.trims == (calls + 1) // 2
