"""Runs one job through the pipeline: fetch, then each step under its provider's limits.

For each step of the plan, in order: skip it if a previous attempt already stored its result
(a retry resumes at the first unfinished step) or if its tier's gate says so; check the daily
budget before a paid step; then the provider's semaphore (calls in flight), its limiter
(requests per second and tokens per minute, shared by the fleet when finite), the call
(under the provider's step timeout: a hung call fails as ``StepTimeout``), and the cost from
the price table. With more than one step, each result is stored as soon as it is done, so a
crash after tier 1 never pays for tier 1 again. Before a paid step, deduplication
(``listener.analysis.dedup``) may store a copy of another job's result for the same image at $0
instead.

The dispatcher never raises for a job's failure: it returns an ``Outcome`` decided by the
retry policy. A 429 pauses the provider's limiter for every task (and every daemon), not only
for the job that saw it.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, Protocol

from loguru import logger

from listener.analysis.costs import cost_usd, price_for
from listener.analysis.dedup import DedupPolicy, copy_of, digest_for, reusable, sha256
from listener.analysis.dedup_store import DedupStore
from listener.analysis.effects import InputDigest
from listener.analysis.pipeline import Plan, Step, skip_reason
from listener.analysis.providers.base import (
    BatchBackend,
    EffectUndo,
    ImageInput,
    Provider,
    StepContext,
    StepResult,
)
from listener.analysis.ratelimit import TokenBucket
from listener.errors import LeaseLost, ProviderPaused, RateLimited, StepTimeout
from listener.ops.metrics import Metrics
from listener.ops.tracing import AttributeValue, Tracing
from listener.queue.outcomes import (
    Completed,
    Discarded,
    Job,
    Outcome,
    Parked,
    Snoozed,
)
from listener.queue.retry import RetryPolicy
from listener.redact import redact_url
from listener.settings import BatchSettings, Price, RateLimit

HINT_PAUSE_MIN_S = 1.0
"""A spent window with a reset shorter than this (seconds) does not pause the provider."""

HASH_INLINE_MAX_BYTES = 256 * 1024
"""Images smaller than this (bytes) are hashed on the loop (well under a millisecond)."""


class Fetcher(Protocol):
    """Fetches image bytes (``listener.analysis.fetch.ImageFetcher`` in production)."""

    async def fetch(self, url: str | None) -> FetchResult: ...


class FetchResult(Protocol):
    """What a fetch returns: the final URL, the bytes, and the format and size (pixels) read
    from the header once, by the fetcher (``listener.analysis.fetch.FetchedImage``)."""

    @property
    def url(self) -> str: ...
    @property
    def data(self) -> bytes: ...
    @property
    def format(self) -> str: ...
    @property
    def width(self) -> int: ...
    @property
    def height(self) -> int: ...


class Limiter(Protocol):
    """A provider's rate limiter: per process (``LocalLimiter``) or fleet-wide (Postgres)."""

    async def reserve(self, tokens: int) -> float:
        """Reserve one request and ``tokens`` tokens; returns seconds to wait before it."""
        ...

    async def correct(self, delta_tokens: int) -> None:
        """Charge (positive) or refund (negative) tokens after the actual usage is known."""
        ...

    async def pause(self, seconds: float, reason: str) -> None:
        """Stop all requests for ``seconds``."""
        ...

    def paused_for(self) -> float:
        """Seconds left of a pause this process knows of (0 when none)."""
        ...

    async def give_back(self) -> int:
        """Return reserved request slots this process will not use; returns how many."""
        ...


class ResultStore(Protocol):
    """Where step results live between runs: the job store's two step methods
    (``listener.queue.store.JobStore``)."""

    async def save_step(self, job: Job, record: StepResult) -> bool:
        """Store one step's result (and effects) while the job's lease holds; ``False`` if
        it does not."""
        ...

    async def outputs(self, job_id: int) -> dict[str, dict[str, Any]]:
        """Outputs already stored for the job, by step name."""
        ...


class BudgetGate(Protocol):
    """Stops paid steps once the daily budget is spent (``listener.analysis.budget.Budget``)."""

    async def check(self) -> None:
        """Raise ``BudgetExhausted`` when today's spend has reached the budget."""
        ...

    def add(self, usd: float) -> None:
        """Count a cost just incurred."""
        ...


class PauseGate(Protocol):
    """Operator pauses (``listener.queue.pauses.PauseBoard``)."""

    async def check(self, provider: str) -> None:
        """Raise ``OperatorPaused`` when ``provider`` (or the pipeline) is paused."""
        ...


class LocalLimiter:
    """A per-process token bucket behind the ``Limiter`` interface.

    Args:
        limit: requests per second and burst.
        clock: monotonic clock, seconds.
    """

    def __init__(self, limit: RateLimit, clock: Callable[[], float]) -> None:
        self._bucket = TokenBucket(limit.rps, limit.burst, clock)
        self._clock = clock
        self._paused_until = 0.0

    async def reserve(self, tokens: int) -> float:
        """Seconds to wait for the next request (tokens are not limited per process)."""
        return 0.0 if self._bucket.unlimited else self._bucket.reserve()

    async def correct(self, delta_tokens: int) -> None:
        """Nothing to correct: tokens are not limited per process."""

    async def pause(self, seconds: float, reason: str) -> None:
        """Pause this process's bucket."""
        self._bucket.pause(seconds)
        self._paused_until = max(self._paused_until, self._clock() + seconds)

    def paused_for(self) -> float:
        """Seconds left of the pause."""
        return max(0.0, self._paused_until - self._clock())

    async def give_back(self) -> int:
        """Nothing is reserved ahead in a per-process bucket: 0."""
        return 0


@dataclass(slots=True)
class ProviderSlot:
    """A provider with its concurrency limit, its rate limiter and its step timeout.

    Attributes:
        timeout_s: seconds one call of ``provider.run`` may take; ``None`` for no limit.
    """

    provider: Provider
    semaphore: asyncio.Semaphore
    limiter: Limiter
    timeout_s: float | None = None

    @classmethod
    def build(
        cls,
        provider: Provider,
        limit: RateLimit,
        limiter: Limiter,
        timeout_s: float | None = None,
    ) -> ProviderSlot:
        """Wrap ``provider`` with ``limit.concurrency``, ``limiter`` and ``timeout_s`` (s)."""
        return cls(provider, asyncio.Semaphore(limit.concurrency), limiter, timeout_s)


async def run_with_deadline(
    call: Awaitable[StepResult | None], step: str, timeout_s: float | None
) -> StepResult | None:
    """Await ``call``, cancelling it after ``timeout_s`` seconds (never when ``None``, which
    costs nothing on the hot path).

    Raises:
        StepTimeout: the call ran out of time (``"step <step> timed out after <n>s"``). A
            ``TimeoutError`` the call raised by itself passes through unchanged.
    """
    if timeout_s is None:
        return await call
    deadline = asyncio.timeout(timeout_s)
    try:
        async with deadline:
            return await call
    except TimeoutError:
        if deadline.expired():
            raise StepTimeout(step, timeout_s) from None
        raise


class _ToBatch(Exception):
    """Internal: the job's next step goes to a provider batch."""

    def __init__(self, step: str) -> None:
        super().__init__(step)
        self.step = step


def paid_providers(names: Iterable[str], prices: Mapping[str, Price]) -> frozenset[str]:
    """The providers among ``names`` with a non-zero price (``provider`` or
    ``provider:model`` keys of ``prices``): the daily budget applies to them."""
    return frozenset(
        name
        for name in names
        if any(
            (key == name or key.startswith(f"{name}:"))
            and (p.per_call_usd or p.per_million_input_usd or p.per_million_output_usd)
            for key, p in prices.items()
        )
    )


class Dispatcher:
    """Turns a claimed ``Job`` into an ``Outcome``.

    Args:
        plan: the steps, in order, and the tier gates.
        slots: provider name -> provider with its limits; every step's provider must be here.
        fetcher: fetches the image when a step's provider needs the bytes.
        store: loads stored step outputs (resume) and stores each step's result.
        policy: decides retry, deferral or dead letter for a failed attempt.
        metrics: counters and histograms to update.
        rng: uniform floats in [0, 1) for backoff jitter.
        prices: the price table (``provider:model`` or ``provider`` -> price).
        budget: the daily budget gate for paid steps, if a budget is set.
        batch: when given, OpenAI steps of batch-mode jobs (and, with ``batch.auto``, of
            low-priority jobs) are handed to the Batch API instead of run here.
        pauses: operator pauses; a step of a paused provider ends the run with a snooze
            that lasts until the pause ends.
        tracing: each job is a ``listener.job`` span with a ``listener.analysis.fetch`` child and a
            ``listener.step <name>`` child per step run (``listener.ops.tracing``).
        dedup: when given, a paid step first looks for a stored result of the same step for
            the same image (``listener.analysis.dedup``) and stores a copy at $0 instead of calling
            the provider (before the budget check and before a hand-off to a batch).
        reuse: where those stored results are found; required with ``dedup``.

    Raises:
        ValueError: a step's provider has no slot, or ``dedup`` is given without ``reuse``.
    """

    def __init__(
        self,
        plan: Plan,
        slots: Mapping[str, ProviderSlot],
        fetcher: Fetcher,
        store: ResultStore,
        policy: RetryPolicy,
        metrics: Metrics,
        rng: Callable[[], float],
        prices: Mapping[str, Price] | None = None,
        budget: BudgetGate | None = None,
        batch: BatchSettings | None = None,
        pauses: PauseGate | None = None,
        tracing: Tracing | None = None,
        dedup: DedupPolicy | None = None,
        reuse: DedupStore | None = None,
    ) -> None:
        missing = {s.provider for s in plan.steps} - set(slots)
        if missing:
            raise ValueError(f"no provider for steps of: {', '.join(sorted(missing))}")
        if dedup is not None and reuse is None:
            raise ValueError("deduplication needs a store of reusable results (reuse)")
        self._plan = plan
        self._slots = dict(slots)
        self._fetcher = fetcher
        self._store = store
        self._policy = policy
        self._metrics = metrics
        self._rng = rng
        self._prices = dict(prices or {})
        self._budget = budget
        self._batch = batch
        self._pauses = pauses
        self._tracing = tracing or Tracing()
        self._dedup = dedup
        self._reusable = reuse
        self._save_each = len(plan.steps) > 1
        self._batchable = {
            name for name, slot in slots.items() if isinstance(slot.provider, BatchBackend)
        }
        self._paid = paid_providers(slots, self._prices)

    @property
    def providers(self) -> list[Provider]:
        """The plan's providers, in order."""
        return [self._slots[name].provider for name in self._plan.providers]

    def batches(self, job: Job) -> bool:
        """True when ``job``'s OpenAI steps go to the Batch API."""
        if self._batch is None or job.batch_mode is False:
            return False
        return bool(
            job.batch_mode or (self._batch.auto and job.priority >= self._batch.min_priority)
        )

    def paid(self, provider: str) -> bool:
        """True when ``provider`` has a non-zero price (the budget applies to it)."""
        return provider in self._paid

    async def run(self, job: Job) -> Outcome:
        """Run ``job`` through the pipeline; never raises except ``CancelledError``."""
        attributes: dict[str, AttributeValue | None] = {
            "listener.job.id": job.id,
            "listener.job.source_table": job.source_table,
            "listener.job.attempt": job.attempts,
        }
        with self._tracing.span("listener.job", attributes) as span:
            outcome = await self._outcome(job)
            span.set("listener.job.outcome", type(outcome).__name__.lower())
            if isinstance(outcome, Discarded):
                span.fail(outcome.error)
            return outcome

    async def _outcome(self, job: Job) -> Outcome:
        try:
            results = await self._run(job)
        except asyncio.CancelledError:
            raise
        except _ToBatch as handoff:
            return Parked(job, handoff.step)
        except Exception as error:
            outcome = self._policy.decide(job, error, self._rng)
            log = logger.bind(job_id=job.id, source_id=job.source_id, attempt=job.attempts)
            if isinstance(outcome, Discarded):
                log.warning("job failed: {}", outcome.error)
            elif isinstance(outcome, Snoozed):
                log.info("job snoozed for {:.1f}s: {}", outcome.delay_s, outcome.error)
            else:
                log.info("attempt failed, retry in {:.1f}s: {}", outcome.delay_s, outcome.error)
            return outcome
        return Completed(job, results)

    async def _run(self, job: Job) -> list[StepResult]:
        # The claim says which steps are stored (an earlier run, a batch): resume after them,
        # whatever the attempt counter says (deferral, release and batching give attempts
        # back). A job with none skips the query.
        outputs: dict[str, dict[str, Any]] = (
            await self._store.outputs(job.id) if job.done_steps else {}
        )
        todo = [s for s in self._plan.steps if s.name not in outputs]
        image = await self._image(job, todo)
        sha = await self._sha256(image, todo)
        unsaved: list[StepResult] = []
        for step in todo:
            reason = skip_reason(step, self._plan, outputs, image.width, image.height)
            if reason is not None:
                continue
            digest = digest_for(sha, outputs)
            copy = await self._reuse(job, step, digest)
            if copy is not None:
                # A copy is stored at once, whatever the plan: its savings are counted there.
                outputs[step.name] = dict(copy.output)
                if not await self._store.save_step(job, copy):
                    raise LeaseLost(f"lease of job {job.id} lost during step {step.name}")
                continue
            if step.provider in self._batchable and self.batches(job):
                raise _ToBatch(step.name)
            result = await self._step(
                step, image, StepContext(step.name, outputs, job.claims, job.lease_token)
            )
            if result is None:
                continue
            if digest is not None:
                result = replace(result, digest=digest)
            outputs[step.name] = dict(result.output)
            if self._save_each or result.effects:
                if not await self._store.save_step(job, result):
                    await self._undo(job, step, result)
                    raise LeaseLost(f"lease of job {job.id} lost during step {step.name}")
            else:
                unsaved.append(result)
        return unsaved

    async def _undo(self, job: Job, step: Step, result: StepResult) -> None:
        """The store refused ``result`` (lost lease: the job was cancelled, its row deleted,
        or another worker took it): undo its effects at the provider, so that faces no one
        will ever record do not stay in a collection. Failures are logged, not raised."""
        provider = self._slots[step.provider].provider
        if not result.effects or not isinstance(provider, EffectUndo):
            return
        try:
            await provider.undo(result.effects)
        except Exception as error:
            logger.bind(job_id=job.id, step=step.name).warning(
                "could not undo the effects of a step the store refused: {}", error
            )
        else:
            logger.bind(job_id=job.id, step=step.name).info(
                "lease lost: the step's effects were undone at the provider"
            )

    async def _sha256(self, image: ImageInput, todo: Sequence[Step]) -> bytes | None:
        """The SHA-256 of the image when a step to run could be deduplicated (recorded with
        its result even while deduplication is off, so turning it on finds earlier ones);
        ``None`` otherwise. Large images are hashed in a thread (``hashlib`` releases the GIL),
        so the loop is not held for the ~20 ms a 20 MB image takes."""
        if not image.data or not any(reusable(s, self.paid(s.provider)) for s in todo):
            return None
        if len(image.data) < HASH_INLINE_MAX_BYTES:
            return sha256(image.data)
        return await asyncio.to_thread(sha256, image.data)

    async def _reuse(self, job: Job, step: Step, digest: InputDigest | None) -> StepResult | None:
        """The copy of a stored result of ``step`` for the same image, or ``None`` when the
        step runs (deduplication off, a free step or one with effects, no digest, no match).

        An operator pause of the step's provider holds a copy too (``OperatorPaused``); the
        budget does not: a copy costs nothing.
        """
        if (
            self._dedup is None
            or self._reusable is None
            or digest is None
            or not reusable(step, self.paid(step.provider))
        ):
            return None
        if self._pauses is not None:
            await self._pauses.check(step.provider)
        found = await self._reusable.find_reusable(
            job, step.name, digest, self._dedup.scope, self._dedup.near
        )
        if found is None:
            return None
        self._metrics.dedup_reused.labels(step.provider, found.kind).inc()
        self._metrics.dedup_saved_usd.labels(step.provider).inc(max(found.saved_usd, 0.0))
        logger.bind(job_id=job.id, step=step.name).debug(
            "step {} reuses the result of job {} ({}, distance {}): ${:.6f} not paid",
            step.name,
            found.origin_job_id,
            found.kind,
            found.distance,
            found.saved_usd,
        )
        return copy_of(step, found, digest)

    async def _image(self, job: Job, todo: Sequence[Step]) -> ImageInput:
        if any(self._slots[s.provider].provider.needs_image for s in todo):
            url = redact_url(job.image_url) if job.image_url else None
            with self._tracing.span("listener.fetch", {"url.full": url}) as span:
                fetched = await self._fetcher.fetch(job.image_url)
                span.set("listener.image.bytes", len(fetched.data))
                span.set("listener.image.format", fetched.format)
            return ImageInput(
                job_id=job.id,
                source_table=job.source_table,
                source_id=job.source_id,
                owner_id=job.owner_id,
                url=fetched.url,
                data=fetched.data,
                content_type=fetched.format,
                width=fetched.width,
                height=fetched.height,
            )
        return ImageInput(
            job_id=job.id,
            source_table=job.source_table,
            source_id=job.source_id,
            owner_id=job.owner_id,
            url=job.image_url or "",
            data=b"",
            content_type="",
        )

    async def _step(self, step: Step, image: ImageInput, context: StepContext) -> StepResult | None:
        attributes = {"listener.step": step.name, "listener.provider": step.provider}
        with self._tracing.span(f"listener.step {step.name}", attributes) as span:
            result = await self._run_step(step, image, context)
            if result is not None:
                span.set("listener.cost_usd", result.cost_usd)
                span.set("listener.tokens.input", result.input_tokens)
                span.set("listener.tokens.output", result.output_tokens)
                span.set("listener.model", result.model)
            return result

    async def _run_step(
        self, step: Step, image: ImageInput, context: StepContext
    ) -> StepResult | None:
        slot = self._slots[step.provider]
        provider = slot.provider
        if self._pauses is not None:
            await self._pauses.check(step.provider)
        if self._budget is not None and self.paid(step.provider):
            await self._budget.check()
        async with slot.semaphore:
            estimate = provider.estimate_tokens(step.kind, image)
            await self._acquire(slot.limiter, estimate)
            self._metrics.provider_called(step.provider)
            started = time.perf_counter()
            try:
                # A hung call would hold the job's lease forever: the heartbeat renews it.
                result = await run_with_deadline(
                    provider.run(step.kind, image, context), step.name, slot.timeout_s
                )
            except RateLimited as error:
                await slot.limiter.pause(error.retry_after or 1.0, f"{step.provider}: {error}")
                self._count_error(step.provider, error)
                raise
            except ProviderPaused as error:
                await slot.limiter.pause(error.pause_s, str(error))
                self._count_error(step.provider, error)
                raise
            except Exception as error:
                self._count_error(step.provider, error)
                raise
            finally:
                self._metrics.provider_seconds.labels(step.provider).observe(
                    time.perf_counter() - started
                )
        if result is None:
            return None
        used = (result.input_tokens or 0) + (result.output_tokens or 0)
        if estimate and used:
            await slot.limiter.correct(used - estimate)
        await self._apply_hints(slot, step.provider, result)
        price = price_for(self._prices, step.provider, result.model)
        cost = cost_usd(
            price,
            calls=result.calls,
            input_tokens=result.input_tokens or 0,
            output_tokens=result.output_tokens or 0,
        )
        if self._budget is not None and cost:
            self._budget.add(cost)
        return replace(result, step=step.name, cost_usd=cost)

    @staticmethod
    async def _acquire(limiter: Limiter, tokens: int) -> None:
        """Wait for a slot. A pause that began while we waited voids the slot: queue again,
        so requests resume spaced out after the pause instead of all at its end."""
        while True:
            wait = await limiter.reserve(tokens)
            if wait > 0:
                await asyncio.sleep(wait)
            if limiter.paused_for() <= 0:
                return

    async def _apply_hints(self, slot: ProviderSlot, provider: str, result: StepResult) -> None:
        """Pause when the provider says its window is spent for longer than a second.

        Shorter resets are the limiter's own pacing at work (the window refills before the
        next reserved slot); pausing for them would only void slots.
        """
        hints = result.hints
        if hints is None:
            return
        for remaining, reset, what in (
            (hints.remaining_requests, hints.reset_requests_s, "request"),
            (hints.remaining_tokens, hints.reset_tokens_s, "token"),
        ):
            if remaining == 0 and reset is not None and reset > HINT_PAUSE_MIN_S:
                await slot.limiter.pause(reset, f"{provider}: {what} window spent")
                return

    def _count_error(self, provider: str, error: BaseException) -> None:
        self._metrics.provider_errors.labels(provider, type(error).__name__).inc()
