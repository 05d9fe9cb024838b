"""Pure parts of the fleet-wide limit's leases: GCRA slots leased at once, the tail given
back, and the lease size from the recent rate."""

from __future__ import annotations

import itertools

import pytest

from listener.analysis.ratelimit import (
    SPACING_MARGIN,
    FleetState,
    LeasePolicy,
    LeaseSizer,
    fleet_give_back,
    fleet_lease,
    fleet_pause,
    fleet_reserve,
)


class FakeClock:
    def __init__(self) -> None:
        self.now = 500.0

    def __call__(self) -> float:
        return self.now


def test_a_lease_is_the_slots_one_by_one_reservations_would_get() -> None:
    leased, single = FleetState(0.0, 0.0, 0.0), FleetState(0.0, 0.0, 0.0)
    slots = fleet_lease(leased, 100.0, rps=1000, burst=3, slots=50)
    assert slots == [fleet_reserve(single, 100.0, rps=1000, burst=3) for _ in range(50)]
    assert leased.request_tat == single.request_tat
    # The burst starts at once, then one slot per 1.04 ms: never more than 1000 in a second.
    assert slots[:3] == pytest.approx([100.0] * 3)
    interval = SPACING_MARGIN / 1000
    assert all(b - a == pytest.approx(interval) for a, b in itertools.pairwise(slots[2:]))
    # The next lease continues where this one ends.
    assert fleet_lease(leased, 100.0, rps=1000, burst=3, slots=1)[0] == pytest.approx(
        slots[-1] + interval
    )


def test_a_lease_waits_for_a_pause_and_needs_a_slot() -> None:
    state = FleetState(0.0, 0.0, 0.0)
    fleet_pause(state, 10.0, 2.0)
    assert fleet_lease(state, 10.0, rps=100, burst=1, slots=2)[0] == 12.0
    with pytest.raises(ValueError, match="at least one slot"):
        fleet_lease(state, 10.0, rps=100, burst=1, slots=0)


def test_the_unused_tail_goes_back_only_while_the_lease_ends_the_schedule() -> None:
    state = FleetState(0.0, 0.0, 0.0)
    mine = fleet_lease(state, 0.0, rps=100, burst=1, slots=10)
    end = state.request_tat
    assert fleet_give_back(state, end, 4, rps=100) == 4
    # The next lease starts right after the 6 slots that were used.
    assert fleet_lease(state, 0.0, rps=100, burst=1, slots=1)[0] == pytest.approx(mine[6])

    other = FleetState(0.0, 0.0, 0.0)
    fleet_lease(other, 0.0, rps=100, burst=1, slots=10)
    end = other.request_tat
    fleet_lease(other, 0.0, rps=100, burst=1, slots=5)  # another daemon leased after it
    after = other.request_tat
    assert fleet_give_back(other, end, 4, rps=100) == 0
    assert other.request_tat == after
    assert fleet_give_back(other, after, 0, rps=100) == 0


def test_lease_size_follows_the_recent_rate_within_bounds() -> None:
    clock = FakeClock()
    policy = LeasePolicy(horizon_s=0.1, max_share_s=0.1, rate_window_s=0.5)
    sizer = LeaseSizer(5000, policy, clock)
    # No history: one slot, or one per caller already waiting.
    assert sizer.size(waiting=0) == 1
    assert sizer.size(waiting=7) == 7
    # A steady 1,000 slots/s for two seconds: about 100 slots per 100 ms lease.
    for _ in range(2000):
        clock.now += 0.001
        sizer.spent()
    assert 1000 * 0.97 < sizer.rate < 1000 * 1.01
    assert 97 <= sizer.size(waiting=1) <= 101
    # Never more than 100 ms of the whole fleet's limit (500 of 5,000/s).
    assert sizer.size(waiting=10_000) == 500
    # Demand stops: the estimate decays, and so do the leases.
    clock.now += 2.0
    assert sizer.size(waiting=1) <= 2


def test_a_low_limit_leases_one_slot_at_a_time() -> None:
    clock = FakeClock()
    sizer = LeaseSizer(10, LeasePolicy(), clock)
    for _ in range(50):
        clock.now += 0.1
        sizer.spent()
    assert LeasePolicy().max_slots(10) == 1
    assert sizer.size(waiting=30) == 1
