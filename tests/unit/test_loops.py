"""The side loops' runner: wake-ups, stop policies, errors reported once, backoff, signals.

No test sleeps to see whether something happened: each awaits the loop's signals or an event
its tick sets, under a timeout.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest
from loguru import logger

from listener.queue.loops import Loop, Ticked

HOUR = 3600.0


@pytest.fixture
def logged() -> Iterator[list[str]]:
    lines: list[str] = []
    sink = logger.add(lambda m: lines.append(str(m.record["message"])), level="INFO")
    yield lines
    logger.remove(sink)


class Script:
    """A tick that returns (or raises) what it is given, one item a call, then 0."""

    def __init__(self, *results: int | Ticked | Exception) -> None:
        self.results = list(results)
        self.calls = 0
        self.during: list[bool] = []
        self.loop: Loop | None = None

    async def __call__(self) -> int | Ticked:
        self.calls += 1
        if self.loop is not None:
            self.during.append(self.loop.stopping)
        if not self.results:
            return 0
        result = self.results.pop(0)
        if isinstance(result, Exception):
            raise result
        return result


def loop_of(script: Script, **kwargs: object) -> Loop:
    loop = Loop("test", script, kwargs.pop("interval_s", HOUR), **kwargs)  # type: ignore[arg-type]
    script.loop = loop
    return loop


async def test_ticks_at_once_and_counts_what_it_did() -> None:
    script = Script(3, 0)
    loop = loop_of(script)
    task = asyncio.create_task(loop.run())
    await loop.signals.wait("active", 1, timeout=5)
    assert loop.signals.count("done") == 3
    loop.wake()
    await loop.signals.wait("idle", 1, timeout=5)
    loop.stop()
    await asyncio.wait_for(task, 5)
    assert script.calls == 2
    assert loop.signals.count("ticked") == 2
    assert loop.signals.count("stopped") == 1


async def test_a_wake_up_ticks_before_the_interval_ends() -> None:
    script = Script(1, 1, 1)
    loop = loop_of(script)
    task = asyncio.create_task(loop.run())
    await loop.signals.wait("active", 1, timeout=5)
    for n in (2, 3):
        loop.wake()
        await loop.signals.wait("active", n, timeout=5)
    loop.stop()
    await asyncio.wait_for(task, 5)
    assert script.calls == 3


async def test_a_wake_up_during_a_tick_is_kept() -> None:
    release = asyncio.Event()
    calls = 0

    async def tick() -> int:
        nonlocal calls
        calls += 1
        if calls == 1:
            await release.wait()
        return 1

    loop = Loop("test", tick, HOUR)
    task = asyncio.create_task(loop.run())
    await asyncio.sleep(0)
    loop.wake()  # while the first tick runs
    release.set()
    await loop.signals.wait("active", 2, timeout=5)
    loop.stop()
    await asyncio.wait_for(task, 5)


@pytest.mark.parametrize(
    ("policy", "after_stop"),
    [("return", 0), ("last_tick", 1)],
)
async def test_stop_policies_return_or_tick_once_more(policy: str, after_stop: int) -> None:
    script = Script(1, 1, 1)
    loop = loop_of(script, at_stop=policy)
    task = asyncio.create_task(loop.run())
    await loop.signals.wait("ticked", 1, timeout=5)
    loop.stop()
    await asyncio.wait_for(task, 5)
    assert script.calls == 1 + after_stop
    assert script.during == [False] + [True] * after_stop


async def test_flush_ticks_until_a_tick_does_nothing() -> None:
    script = Script(1, 5, 2, 0, 7)
    loop = loop_of(script, at_stop="flush")
    task = asyncio.create_task(loop.run())
    await loop.signals.wait("ticked", 1, timeout=5)
    loop.stop()
    await asyncio.wait_for(task, 5)
    assert script.calls == 4  # 1, then 5, 2, 0 at stop; the 7 is never asked for
    assert loop.signals.count("done") == 8


async def test_flush_is_bounded_by_flush_s_and_ticks_see_the_time_left() -> None:
    left: list[float | None] = []
    loop: Loop

    async def tick() -> int:
        left.append(loop.time_left())
        return 1  # always something: only the deadline ends the flush

    loop = Loop("test", tick, HOUR, at_stop="flush", flush_s=0.0)
    task = asyncio.create_task(loop.run())
    await loop.signals.wait("ticked", 1, timeout=5)
    loop.stop()
    await asyncio.wait_for(task, 5)
    assert left == [None, 0.0]
    assert loop.time_left() is None


async def test_stop_during_a_tick_lets_it_finish_and_skips_the_interval() -> None:
    entered = asyncio.Event()
    release = asyncio.Event()
    seen: list[bool] = []
    loop: Loop

    async def tick() -> int:
        entered.set()
        await release.wait()
        seen.append(loop.stopping)
        return 1

    loop = Loop("test", tick, HOUR)
    task = asyncio.create_task(loop.run())
    await asyncio.wait_for(entered.wait(), 5)
    loop.stop()
    assert not task.done()
    release.set()
    await asyncio.wait_for(task, 5)  # not an hour: the interval is not waited after a stop
    assert seen == [True]
    assert loop.signals.count("done") == 1


async def test_the_same_error_is_logged_once_then_recovery_once(logged: list[str]) -> None:
    boom = ConnectionError("connection refused")
    script = Script(boom, boom, boom, 2, boom)
    loop = loop_of(script, interval_s=0.0, label="the test loop")
    task = asyncio.create_task(loop.run())
    await loop.signals.wait("error", 4, timeout=5)
    loop.stop()
    await asyncio.wait_for(task, 5)
    assert logged == [
        "the test loop: ConnectionError: connection refused",
        "the test loop recovered",
        "the test loop: ConnectionError: connection refused",
    ]


async def test_a_changed_error_is_logged_and_errors_of_a_tick_that_did_something(
    logged: list[str],
) -> None:
    script = Script(Ticked(2, ["table a: locked"]), Ticked(1, ["table a: locked", "b: gone"]), 0)
    loop = loop_of(script)
    for _ in range(3):
        await loop.tick()
    assert logged == ["test: table a: locked", "test: b: gone", "test recovered"]
    assert loop.signals.count("error") == 2
    assert loop.signals.count("active") == 2
    assert loop.signals.count("idle") == 1


async def test_errors_are_redacted(logged: list[str]) -> None:
    secret = "hunter2secret"
    script = Script(
        RuntimeError(f"cannot reach postgresql://app:{secret}@db/app"),
        Ticked(0, [f"POST https://hooks.example/?token={secret} failed"]),
    )
    loop = loop_of(script)
    assert await loop.tick() == 0
    assert await loop.tick() == 0
    assert len(logged) == 2
    assert not any(secret in line for line in logged)
    assert not any(secret in e for e in loop.errors)


async def test_backoff_after_errors_in_a_row_replaces_the_interval() -> None:
    asked: list[int] = []

    def backoff(n: int) -> float:
        asked.append(n)
        return 0.0

    script = Script(OSError("down"), OSError("down"), 1, OSError("down"))
    loop = loop_of(script, backoff=backoff)
    task = asyncio.create_task(loop.run())
    # The first three ticks follow without waiting the hour: the backoff (0 s) replaced it.
    await loop.signals.wait("active", 1, timeout=5)
    assert asked == [1, 2]
    loop.wake()  # after a tick that did not raise, the interval applies again
    await loop.signals.wait("error", 3, timeout=5)
    loop.stop()
    await asyncio.wait_for(task, 5)
    assert asked == [1, 2, 1]  # the count starts again after a tick that did not raise


async def test_a_tick_that_raises_does_not_end_the_loop_nor_does_it_count_as_idle() -> None:
    script = Script(ValueError("bad"))
    loop = loop_of(script)
    assert await loop.tick() == 0
    assert (loop.signals.count("error"), loop.signals.count("idle")) == (1, 0)
    assert await loop.tick() == 0
    assert loop.signals.count("idle") == 1


async def test_settled_waits_for_an_idle_tick_that_began_after_the_call() -> None:
    script = Script(0, 4, 0)
    loop = loop_of(script, interval_s=0.0)
    await loop.tick()  # idle, before the call
    task = asyncio.create_task(loop.run())
    await asyncio.wait_for(loop.signals.settled(), 5)
    assert script.calls >= 3  # the 4 was done before a later tick found nothing
    loop.stop()
    await asyncio.wait_for(task, 5)


async def test_cancellation_propagates() -> None:
    async def tick() -> int:
        await asyncio.Event().wait()
        return 0

    loop = Loop("test", tick, HOUR)
    task = asyncio.create_task(loop.run())
    await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert loop.signals.count("stopped") == 1
