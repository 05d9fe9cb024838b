"""The pause board: a cached reading, read again when the pauses changed, and a pause
confirmed by a fresh reading before it holds a job."""

from __future__ import annotations

import asyncio

import pytest

from listener.errors import OperatorPaused
from listener.queue.pauses import HOLD_S, Pause, PauseBoard


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Rows:
    """``listener.pauses`` as the board reads it; counts the readings."""

    def __init__(self, *providers: str) -> None:
        self.providers = set(providers)
        self.reads = 0
        self.gate: asyncio.Event | None = None

    async def __call__(self) -> list[Pause]:
        self.reads += 1
        seen = sorted(self.providers)  # the reading's snapshot: taken when it starts
        if self.gate is not None:
            await self.gate.wait()
        return [Pause(p, None, None) for p in seen]


def board(rows: Rows, clock: FakeClock) -> PauseBoard:
    return PauseBoard(rows, ["first", "second"], cache_s=30.0, clock=clock)


async def test_a_pause_is_confirmed_by_a_fresh_reading_before_it_holds_a_job() -> None:
    rows, clock = Rows("second"), FakeClock()
    pauses = board(rows, clock)
    with pytest.raises(OperatorPaused) as held:
        await pauses.check("second")
    assert held.value.retry_after == HOLD_S and held.value.held_by == "second"
    assert rows.reads == 1  # a reading started by this check needs no confirming
    await pauses.check("first")  # not paused: the cached reading answers
    assert rows.reads == 1
    rows.providers.clear()  # resumed, and this board was not told
    clock.now += 1
    await pauses.check("second")  # the cached reading says paused; the fresh one does not
    assert rows.reads == 2
    await pauses.check("second")
    assert rows.reads == 2  # cached again, and not paused


async def test_invalidate_reads_the_pauses_again_for_claims_and_steps() -> None:
    rows, clock = Rows("first", "second"), FakeClock()
    pauses = board(rows, clock)
    assert "every provider is paused" in (await pauses.claim_blocked() or "")
    rows.providers.discard("second")
    clock.now += 1
    assert await pauses.claim_blocked() is not None  # cached for cache_s
    pauses.invalidate()
    assert await pauses.claim_blocked() is None
    assert set(await pauses.pauses()) == {"first"} and rows.reads == 2


async def test_a_reading_under_way_when_invalidated_is_not_cached() -> None:
    rows, clock = Rows("second"), FakeClock()
    pauses = board(rows, clock)
    rows.gate = asyncio.Event()
    reading = asyncio.create_task(pauses.pauses())
    await asyncio.sleep(0)
    assert rows.reads == 1
    rows.providers.clear()
    pauses.invalidate()  # its snapshot predates the resume
    rows.gate.set()
    assert set(await reading) == {"second"}
    assert await pauses.pauses() == {} and rows.reads == 2


async def test_concurrent_checks_share_one_confirming_reading() -> None:
    rows = Rows("second")
    pauses = PauseBoard(rows, ["first", "second"], cache_s=30.0)  # the real clock
    await pauses.pauses()
    rows.gate = asyncio.Event()
    checks = [asyncio.create_task(pauses.check("second")) for _ in range(20)]
    await asyncio.sleep(0)
    rows.gate.set()
    results = await asyncio.gather(*checks, return_exceptions=True)
    assert all(isinstance(r, OperatorPaused) for r in results)
    assert rows.reads == 2  # the cached reading, and one confirming it for all twenty
