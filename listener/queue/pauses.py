"""Operator pauses (``listener pause|resume [PROVIDER]``) as a daemon sees them.

A pause is a row of ``listener.pauses`` (provider ``"*"``: the whole pipeline), read at most
once per ``cache_s`` (the poll interval), and again at once when ``invalidate`` says the pauses
changed. What a daemon does with it:

- ``"*"`` paused, or every provider of its pipeline paused (or paid while the daily budget is
  spent): ``claim_blocked`` says why and the worker does not claim at all: existing jobs
  are untouched, and rows inserted meanwhile are still admitted, their jobs waiting
  ``pending``.
- some providers paused: jobs are claimed; a step of a paused provider raises
  ``OperatorPaused`` (``check``), which the retry policy turns into a snooze lasting until the
  pause ends (``HOLD_S`` for a pause without an end) held by that provider: one write per job
  per pause. ``listener resume`` wakes the held jobs at once (``JobStore.resume``).

How a resumed provider's jobs run at once on every daemon, though each caches its reading:

1. ``pause`` and ``resume`` notify ``"pauses"`` (``listener.queue.notify.PAUSES``) when they
   commit; a daemon then ``invalidate``s its board before it wakes its worker, so the claim
   that follows reads the pauses again. A reconnected LISTEN connection invalidates too:
   notifications may have been missed meanwhile.
2. ``check`` confirms a pause seen in a cached reading with a newer reading before it holds
   a job for the whole pause: a daemon that missed the notification (its LISTEN connection
   down) does not hold a woken job on a stale reading. One read per held job, as the snooze
   is one write; concurrent checks share it.
3. The store holds a job by a pause only while the pause's row is in force, locked against
   ``resume`` (``JobStore.snooze``): a check that raced with the resume leaves the job
   runnable, never held for a day after it.

Pure: no database import; the rows come from a callable (``Queries.active_pauses``).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from listener.errors import OperatorPaused

ALL = "*"
"""The provider name of a pause of the whole pipeline."""

BUDGET = "budget"
"""What holds a job snoozed because the daily budget is spent (``Snoozed.held_by``); not a
pause: ``listener resume budget`` wakes those jobs, and no snooze by it is ever dropped."""

HOLD_S = 86_400.0
"""How long a job waits for a pause without an end (seconds); ``listener resume`` wakes it."""


@dataclass(frozen=True, slots=True)
class Pause:
    """One pause in force.

    Attributes:
        provider: the paused provider, or ``"*"``.
        reason: the operator's reason, if given.
        remaining_s: seconds until it ends; ``None``: until ``listener resume``.
    """

    provider: str
    reason: str | None
    remaining_s: float | None


class SpendGate(Protocol):
    """Today's spend against the budget (``listener.analysis.budget.Budget``)."""

    limit_usd: float

    async def spent_today(self) -> float: ...


class PauseBoard:
    """The pauses in force, cached, and what they mean for claims and steps.

    Args:
        read: returns the pauses in force now.
        providers: the pipeline's providers.
        cache_s: seconds a reading (and a claim decision) is reused: the poll interval.
        budget: the daily budget, if one is set.
        paid: whether a provider has a price (the budget applies to it).
        clock: monotonic clock, seconds.
    """

    def __init__(
        self,
        read: Callable[[], Awaitable[list[Pause]]],
        providers: Sequence[str],
        *,
        cache_s: float,
        budget: SpendGate | None = None,
        paid: Callable[[str], bool] = lambda _: False,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._read = read
        self._providers = tuple(providers)
        self._cache_s = cache_s
        self._budget = budget
        self._paid = paid
        self._clock = clock
        self._read_at = -float("inf")
        """When the cached reading was started (clock seconds)."""
        self._pauses: dict[str, Pause] = {}
        self._blocked_at = -float("inf")
        self._blocked: str | None = None
        self._generation = 0
        self._reading_lock = asyncio.Lock()

    def invalidate(self) -> None:
        """Forget the cached reading and claim decision: the pauses changed (a ``"pauses"``
        notification) or changes may have been missed (a reconnect). A reading under way
        when this is called is not cached: it may predate the change."""
        self._generation += 1
        self._read_at = -float("inf")
        self._blocked_at = -float("inf")

    async def pauses(self) -> dict[str, Pause]:
        """The pauses in force, by provider (read at most every ``cache_s``)."""
        return await self._reading(newer_than=self._clock() - self._cache_s)

    async def _reading(self, newer_than: float) -> dict[str, Pause]:
        """The pauses as of a reading started after ``newer_than`` (clock seconds): the
        cached one, or a new one. One reading at a time: callers waiting for it share it."""
        if self._read_at > newer_than:
            return self._pauses  # the cached reading: no lock on the hot path
        async with self._reading_lock:
            if self._read_at > newer_than:
                return self._pauses
            generation, started = self._generation, self._clock()
            pauses = {p.provider: p for p in await self._read()}
            if generation == self._generation:
                self._pauses, self._read_at = pauses, started
            return pauses

    async def check(self, provider: str) -> None:
        """Raise when ``provider`` (or the whole pipeline) is paused.

        A pause seen in the reading that was cached when this check began is confirmed by a
        newer one: a resume this daemon did not hear of must not hold the job (see the
        module's 2.).

        Raises:
            OperatorPaused: held by the pause's provider (``"*"`` for the pipeline), for the
                seconds left of the pause, ``HOLD_S`` when it has no end.
        """
        cached_at = self._read_at
        pause = _pause_of(await self.pauses(), provider)
        if pause is not None and self._read_at <= cached_at:
            pause = _pause_of(await self._reading(newer_than=cached_at), provider)
        if pause is not None:
            left = HOLD_S if pause.remaining_s is None else max(pause.remaining_s, 1.0)
            raise OperatorPaused(pause.provider, pause.reason, retry_after=left)

    async def claim_blocked(self) -> str | None:
        """Why this daemon must not claim now (``None``: it may), decided at most every
        ``cache_s`` (and again after ``invalidate``): the pipeline is paused, every provider
        of it is paused, or every one is paid and the daily budget is spent."""
        if self._clock() - self._blocked_at < self._cache_s:
            return self._blocked
        generation = self._generation
        blocked = await self._decide()
        if generation == self._generation:
            self._blocked, self._blocked_at = blocked, self._clock()
        return blocked

    async def _decide(self) -> str | None:
        pauses = await self.pauses()
        if ALL in pauses:
            return "the pipeline is paused (listener resume)"
        if self._providers and all(p in pauses for p in self._providers):
            return f"every provider is paused: {', '.join(self._providers)} (listener resume)"
        if (
            self._budget is not None
            and self._providers
            and all(self._paid(p) for p in self._providers)
            and await self._budget.spent_today() >= self._budget.limit_usd
        ):
            return "the daily budget is spent: paid providers wait until 00:00 UTC"
        return None


def _pause_of(pauses: dict[str, Pause], provider: str) -> Pause | None:
    """The pause that stops ``provider``: its own, or the pipeline's."""
    return pauses.get(provider) or pauses.get(ALL)
