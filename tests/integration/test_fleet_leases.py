"""The fleet-wide limit's leases on a real Postgres: daemons that lease slots on the same
``listener.provider_limits`` row together stay within the limit, in far fewer round trips
than requests; a lease's unused tail goes back; a lease nobody spends lapses."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import asyncpg
import pytest

from listener.analysis.fleet_limits import FleetLimiter
from listener.analysis.ratelimit import SPACING_MARGIN, LeasePolicy
from listener.db.queries import Queries
from listener.settings import RateLimit


@pytest.fixture
async def pools(database_url: str) -> AsyncIterator[list[asyncpg.Pool]]:
    """Two pools: two daemons."""
    made = [await asyncpg.create_pool(database_url, min_size=1, max_size=3) for _ in range(2)]
    try:
        yield made
    finally:
        for pool in made:
            await pool.close()


def most_in_one_second(times: list[float]) -> int:
    times = sorted(times)
    best, lo = 0, 0
    for hi, t in enumerate(times):
        while times[lo] <= t - 1.0:
            lo += 1
        best = max(best, hi - lo + 1)
    return best


async def request_tat(conn: asyncpg.Connection) -> float:
    value = await conn.fetchval(
        "SELECT request_tat FROM listener.provider_limits WHERE provider = 'noop'"
    )
    assert isinstance(value, float)
    return value


async def test_two_daemons_share_the_limit_in_few_round_trips(
    pools: list[asyncpg.Pool], conn: asyncpg.Connection
) -> None:
    limit = RateLimit(rps=400, burst=1)
    limiters = [FleetLimiter(Queries(pool), "noop", limit, None) for pool in pools]
    calls: list[float] = []

    async def caller(limiter: FleetLimiter, n: int) -> None:
        for _ in range(n):
            wait = await limiter.reserve(0)
            calls.append(time.monotonic() + wait)  # when the limiter lets this call go
            await asyncio.sleep(wait)

    started = time.monotonic()
    # 16 callers per daemon, 700 calls in all: about 1.8 s at 400/s.
    await asyncio.gather(*(caller(lim, 700 // 32 + 1) for lim in limiters for _ in range(16)))
    elapsed = time.monotonic() - started

    # The schedule the two daemons were given: never more than the limit in a sliding second.
    # (When a loaded event loop wakes the caller up is not the limiter's doing.)
    assert most_in_one_second(calls) <= 400
    # ...and close to it: 704 calls at 400 / 1.04 per second take about 1.83 s.
    assert elapsed < len(calls) / (400 / SPACING_MARGIN) + 1.0
    # One round trip per lease, not per call.
    round_trips = sum(lim.leases for lim in limiters)
    assert round_trips < len(calls) / 5
    # Every slot the two daemons were given lies on the one schedule: the row's end.
    tat = await request_tat(conn)
    now = await conn.fetchval("SELECT extract(epoch FROM clock_timestamp())::float8")
    assert tat <= now + 0.2


async def test_the_unused_tail_goes_back_and_the_next_daemon_gets_it(
    pools: list[asyncpg.Pool], conn: asyncpg.Connection
) -> None:
    limit = RateLimit(rps=100, burst=1)
    # Leases as long as the limit allows once there is a rate: 100 ms, 10 slots at 100/s.
    policy = LeasePolicy(horizon_s=10.0)
    a = FleetLimiter(Queries(pools[0]), "noop", limit, None, policy)
    b = FleetLimiter(Queries(pools[1]), "noop", limit, None, policy)
    await a.reserve(0)  # no history yet: a lease of one slot
    await a.reserve(0)  # a rate now: a lease of 10, one of them taken
    assert a.leases == 2
    leased_end = await request_tat(conn)
    assert await a.give_back() == 9
    given_back_to = await request_tat(conn)
    assert given_back_to == pytest.approx(leased_end - 9 * SPACING_MARGIN / 100)
    # B's first slot is where A's used slots ended, not after A's whole lease.
    assert await b.reserve(0) < 9 * SPACING_MARGIN / 100

    # Once another daemon leased after it, a lease's tail stays (it would overlap B's slots)
    # and lapses at its time.
    await a.reserve(0)
    await a.reserve(0)  # A holds most of a lease of 10
    await b.reserve(0)
    await b.reserve(0)  # B leased after A
    end = await request_tat(conn)
    assert await a.give_back() == 0
    assert await request_tat(conn) == end


async def test_a_pause_voids_the_lease_and_holds_every_daemon(
    pools: list[asyncpg.Pool],
) -> None:
    limit = RateLimit(rps=200, burst=1)
    a = FleetLimiter(Queries(pools[0]), "noop", limit, None)
    b = FleetLimiter(Queries(pools[1]), "noop", limit, None)
    await asyncio.gather(*(a.reserve(0) for _ in range(5)))
    await a.pause(0.5, "noop: slow down")
    assert a.paused_for() > 0.4
    # The other daemon's next slot is after the pause.
    assert await b.reserve(0) > 0.4
    # So is the paused daemon's: its lease was given back, not kept.
    assert await a.reserve(0) > 0.3


async def test_a_crashed_daemons_lease_lapses_within_its_length(
    pools: list[asyncpg.Pool],
) -> None:
    limit = RateLimit(rps=1000, burst=1)
    crashed = FleetLimiter(Queries(pools[0]), "noop", limit, None)
    # 100 callers at once: a lease of 100 slots (100 ms of the limit), then it "crashes":
    # it never spends them and never gives them back.
    await asyncio.gather(*(crashed.reserve(0) for _ in range(100)))
    survivor = FleetLimiter(Queries(pools[1]), "noop", limit, None)
    # The survivor waits at most for the crashed lease's slots to pass (~104 ms)...
    first = await survivor.reserve(0)
    assert first < 0.104 + 0.05
    # ...and once they have, it gets slots at once.
    await asyncio.sleep(first + 0.01)
    assert await survivor.reserve(0) < 0.01
