"""The one place that builds concrete objects and runs the daemon.

``Daemon`` wires the pool, the job store, the named queries, the providers, the fetcher, the
dispatcher, the worker, the LISTEN notifier and the health server from ``Settings``. Start
builds everything and binds the health port *before* any loop runs, so a start that fails
(port taken, provider that cannot start) has claimed no job. Then one ``asyncio.TaskGroup``
owns every loop (worker, notifier, batches, retention, status write-back, counters' rollup,
deleted rows, webhooks); stop ends them in order: stop claiming, drain and hand leases back,
stop the others (each as its ``listener.queue.loops`` stop policy says), close.

``start`` reads as the list of what runs; each part is built in one ``_build_*`` or
``_start_*`` method, and providers come from ``PROVIDERS``, a registry of factories by name.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import random
import resource
import signal
import socket
import time
from collections.abc import Callable, Mapping, Sequence
from datetime import timedelta
from typing import TYPE_CHECKING, Protocol

import asyncpg
from loguru import logger

from listener.analysis.batch_store import PgBatchStore
from listener.analysis.budget import Budget
from listener.analysis.dedup import DedupPolicy
from listener.analysis.dedup_store import PgDedupStore
from listener.analysis.dispatch import (
    Dispatcher,
    Limiter,
    LocalLimiter,
    ProviderSlot,
    paid_providers,
)
from listener.analysis.face_store import PgFaceStore, pg_effect_writers
from listener.analysis.fetch import ImageFetcher
from listener.analysis.fleet_limits import FleetLimiter
from listener.analysis.pipeline import Plan, Step, build_plan
from listener.analysis.providers.base import BatchBackend, Provider
from listener.app_side.deletes import DeleteDrain, FaceRemover
from listener.app_side.webhooks import WebhookSender
from listener.app_side.writeback import StatusWriteBack
from listener.db.connect import check_listen_dsn, open_database
from listener.db.migrate import applied_versions, load_migrations
from listener.db.queries import Queries
from listener.ops.health import HealthServer, HealthSources
from listener.ops.memory import MemoryTrim
from listener.ops.metrics import Metrics
from listener.ops.tracing import Tracing, build_tracing
from listener.queue.notify import INSERTED, PAUSES, Notifier
from listener.queue.pauses import PauseBoard
from listener.queue.pg_store import PgJobStore
from listener.queue.prune import Pruner
from listener.queue.retry import RetryPolicy
from listener.queue.rollup import CountsRollup
from listener.queue.signals import Signals
from listener.queue.worker import Worker, WorkerConfig
from listener.settings import Settings

if TYPE_CHECKING:
    from listener.analysis.batches import BatchManager


class _Loop(Protocol):
    """A side loop of the daemon (each runs a ``listener.queue.loops.Loop``): runs until told
    to stop."""

    async def run(self) -> None: ...

    def stop(self) -> None: ...


class SchemaNotReady(RuntimeError):
    """The database has not been migrated to this listener's schema."""


@dataclasses.dataclass(frozen=True)
class SharedResources:
    """What a provider may use besides its settings: the daemon's queries (known faces) and
    its tracing (cloud providers send its trace headers with each request)."""

    queries: Queries
    tracing: Tracing


ProviderFactory = Callable[[Settings, SharedResources], Provider]
"""Builds one provider from the settings and the shared resources. Each factory imports its
provider's module itself: a pipeline that does not use a provider never loads its SDK."""


def _noop_provider(settings: Settings, _: SharedResources) -> Provider:
    from listener.analysis.providers.noop import NoopProvider

    return NoopProvider(settings.noop_delay_s, settings.noop_failure_rate)


def _local_provider(settings: Settings, shared: SharedResources) -> Provider:
    from listener.analysis.faces import PgFaceIndex
    from listener.analysis.providers.local import LocalProvider

    return LocalProvider(
        settings.local,
        max_pixels=settings.fetch.max_pixels,
        max_decode_bytes=settings.fetch.max_decode_bytes,
        timeout_s=settings.step_timeout("local"),
        faces=PgFaceIndex(shared.queries),
    )


def _openai_provider(settings: Settings, shared: SharedResources) -> Provider:
    from listener.analysis.providers.openai import OpenAIProvider

    return OpenAIProvider(settings.openai, tracing=shared.tracing)


def _rekognition_provider(settings: Settings, shared: SharedResources) -> Provider:
    from listener.analysis.faces import PgFaceIntents, PgKnownFaces
    from listener.analysis.providers.rekognition import RekognitionProvider

    return RekognitionProvider(
        settings.rekognition,
        PgKnownFaces(shared.queries),
        tracing=shared.tracing,
        intents=PgFaceIntents(shared.queries),
    )


PROVIDERS: Mapping[str, ProviderFactory] = {
    "noop": _noop_provider,
    "local": _local_provider,
    "openai": _openai_provider,
    "rekognition": _rekognition_provider,
}
"""Every provider a pipeline can name, by name."""


def build_providers(
    settings: Settings, plan: Plan, queries: Queries, tracing: Tracing | None = None
) -> list[Provider]:
    """One provider object per provider the plan uses, configured from ``settings``
    (``PROVIDERS``).

    ``tracing``: the cloud providers send its trace headers with each request.

    Raises:
        ValueError: the plan names a provider ``PROVIDERS`` lacks.
    """
    shared = SharedResources(queries, tracing or Tracing())
    providers: list[Provider] = []
    for name in plan.providers:
        factory = PROVIDERS.get(name)
        if factory is None:
            raise ValueError(f"unknown provider {name!r}")
        providers.append(factory(settings, shared))
    return providers


def plan_for(settings: Settings, providers: Sequence[Provider] | None) -> Plan:
    """The settings' plan; for injected providers (tests), one tier-1 ``step`` each."""
    if providers is None:
        return build_plan(settings.pipeline, settings.tiers)
    return Plan(tuple(Step(f"{p.name}.step", p.name, "step", 1) for p in providers))


def build_limiter(settings: Settings, provider: str, queries: Queries) -> Limiter:
    """Fleet-wide (Postgres) when the provider's rate is finite, else per process."""
    limit = settings.rate_limit(provider)
    if limit.fleet_wide:
        tpm = settings.openai.tokens_per_minute if provider == "openai" else None
        return FleetLimiter(queries, provider, limit, tpm)
    return LocalLimiter(limit, time.monotonic)


def raise_open_files_limit() -> tuple[int, int]:
    """Raise the soft ``RLIMIT_NOFILE`` to the hard limit, so a burst of sockets (pool, LISTEN,
    fetches, health clients) cannot exhaust descriptors at a low default soft limit (1024).

    Returns:
        ``(before, after)``: the soft limit, in descriptors, before and after;
        ``resource.RLIM_INFINITY`` (-1) stands for no limit. Unchanged when the hard limit
        is infinite and the OS refuses that (macOS caps it at ``OPEN_MAX``), or when the
        soft limit is already the hard one.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == hard:
        return soft, soft
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (ValueError, OSError):
        return soft, soft
    return soft, hard


def default_worker_id() -> str:
    """``host:pid``, unique among daemons running at the same time."""
    return f"{socket.gethostname()}:{os.getpid()}"


async def check_schema(conn: asyncpg.Connection) -> None:
    """Refuse to run on a database that lacks this listener's migrations.

    Raises:
        SchemaNotReady: with the command that fixes it.
    """
    done = set(await applied_versions(conn))
    missing = [m for m in load_migrations() if m.version not in done]
    if missing:
        raise SchemaNotReady(
            f"the database lacks {len(missing)} listener migration(s): run `listener migrate` "
            "(or `listener run --migrate`)"
        )


async def warn_if_privileged(conn: asyncpg.Connection) -> bool:
    """Log a warning when the daemon's role is a superuser or bypasses row-level security.

    The status write-back is an ordinary UPDATE of the app's rows, so a trigger the table's
    owner put on it runs with the daemon's rights: a superuser's, then. The daemon should log
    in as a role of its own in ``listener_worker`` (README, Security in the database).

    Returns:
        True when it warned.
    """
    row = await conn.fetchrow(
        "SELECT current_user AS me, rolsuper, rolbypassrls FROM pg_roles "
        "WHERE rolname = current_user"
    )
    if row is None or not (row["rolsuper"] or row["rolbypassrls"]):
        return False
    logger.warning(
        "the daemon runs as {}, {}: the triggers of attached tables run with those rights "
        "during the status write-back; log in as a role of its own in listener_worker "
        "(CREATE ROLE listener_daemon LOGIN IN ROLE listener_worker)",
        row["me"],
        "a superuser" if row["rolsuper"] else "a role that bypasses row-level security",
    )
    return True


class Daemon:
    """A running listener daemon.

    Args:
        settings: all settings.
        providers: the pipeline; defaults to ``build_providers(settings)`` (tests inject
            their own).
        health: serve the health endpoints on ``settings.health_port``.
        tracing: where job traces go; defaults to ``build_tracing`` from the environment
            (OpenTelemetry when installed and asked for, else none).
    """

    def __init__(
        self,
        settings: Settings,
        *,
        providers: Sequence[Provider] | None = None,
        health: bool = True,
        tracing: Tracing | None = None,
    ) -> None:
        self.settings = settings
        # A tracing built here is the daemon's to shut down; one passed in is the caller's.
        self._owns_tracing = tracing is None
        self.tracing = tracing if tracing is not None else build_tracing(os.environ, settings.otel)
        self._injected = list(providers) if providers is not None else None
        self.plan = plan_for(settings, self._injected)
        self._providers: list[Provider] = []
        self._want_health = health
        self._rng = random.Random()
        self.metrics = Metrics(time.monotonic)
        self.pool: asyncpg.Pool | None = None
        self.worker: Worker | None = None
        self.notifier: Notifier | None = None
        self.health: HealthServer | None = None
        self.queries: Queries | None = None
        self.budget: Budget | None = None
        self.batches: BatchManager | None = None
        self.status_writeback: StatusWriteBack | None = None
        self.counts_rollup: CountsRollup | None = None
        self.memory_trim: MemoryTrim | None = None
        self.pauses: PauseBoard | None = None
        self.pruner: Pruner | None = None
        self.webhooks: WebhookSender | None = None
        self.deletes: DeleteDrain | None = None
        self._fetcher = ImageFetcher(settings.fetch)
        self._loops: asyncio.Task[None] | None = None
        self.store: PgJobStore | None = None
        self.signals = Signals()
        self._started_providers: list[Provider] = []
        self._limiters: list[Limiter] = []
        self.worker_id = settings.worker_id or default_worker_id()

    async def start(self) -> None:
        """Connect, check the schema, start providers and health, then run every loop.

        Raises:
            SchemaNotReady: the database is not migrated.
            PoolerError: LISTEN would go through a transaction-mode pooler (no direct
                ``listen_database_url``); see ``listener.db.connect``.
            OSError, asyncpg.PostgresError: the database cannot be reached, or the health
                port cannot be bound. Nothing was claimed then, and nothing keeps running.
        """
        s = self.settings
        before, after = raise_open_files_limit()
        logger.info("open files limit: {} (soft limit was {})", after, before)
        # A transaction-mode pooler on database_url: no named prepared statements, and LISTEN
        # only on a direct URL (listener.db.connect); refused before anything is built.
        database = await open_database(s, probe=True)
        listen_dsn = await check_listen_dsn(
            database, s.listen_dsn() if s.listen_database_url is not None else None, s.pooler
        )
        self.pool = await database.create_pool(s.pool_min_size, s.pool_max_size)
        try:
            queries = await self._open_store(self.pool)
            await self._start_providers(queries)
            worker = self._build_worker(self._build_dispatcher(queries))
            await self._build_side_loops(queries)
            self.notifier = self._build_notifier(listen_dsn, worker)
            await self._start_health(queries, worker)
        except BaseException:
            await self._close_resources()
            raise
        # Every fallible set-up step is behind us: only now does anything claim.
        self._loops = asyncio.create_task(self._run_loops(), name="listener-loops")
        logger.bind(worker_id=self.worker_id).info(
            "listener running: pipeline={}, concurrency={}, health={}",
            ",".join(p.name for p in self._providers),
            s.concurrency,
            self._health_description(),
        )

    async def _open_store(self, pool: asyncpg.Pool) -> Queries:
        """Check the schema (and the daemon's role), then build the queries and job store."""
        async with pool.acquire() as conn:
            await check_schema(conn)
            await warn_if_privileged(conn)
        self.queries = Queries(pool)
        self.store = PgJobStore(pool, self.settings.max_attempts, effects=pg_effect_writers())
        # The analysis side's stores: result reuse, batched jobs, face records.
        self._reuse = PgDedupStore(pool)
        self._batch_store = PgBatchStore(pool)
        self._face_records = PgFaceStore(pool)
        return self.queries

    async def _start_providers(self, queries: Queries) -> None:
        """Build the providers (unless injected) and start them and the fetcher."""
        self._providers = self._injected or build_providers(
            self.settings, self.plan, queries, self.tracing
        )
        await self._fetcher.start()
        for provider in self._providers:
            await provider.start()
            self._started_providers.append(provider)

    def _batch_backend(self) -> BatchBackend | None:
        """The provider that can also run steps through a batch API, if any."""
        return next((p for p in self._providers if isinstance(p, BatchBackend)), None)

    def _build_dispatcher(self, queries: Queries) -> Dispatcher:
        """The dispatcher, with each provider's slot (rate limit, limiter, timeout), the
        budget and the operator pauses."""
        s = self.settings
        assert self.store is not None
        slots = {
            p.name: ProviderSlot.build(
                p, s.rate_limit(p.name), build_limiter(s, p.name, queries), s.step_timeout(p.name)
            )
            for p in self._providers
        }
        self._limiters = [slot.limiter for slot in slots.values()]
        self.budget = (
            Budget(s.budget_usd_per_day, queries.spend_since)
            if s.budget_usd_per_day is not None
            else None
        )
        # Read at most once per poll interval, and again on a 'pauses' notification (see
        # _build_notifier): a paused pipeline claims nothing, a paused provider's steps
        # snooze once per job until the pause ends (listener.queue.pauses).
        self.pauses = PauseBoard(
            queries.active_pauses,
            [p.name for p in self._providers],
            cache_s=s.poll_interval_s,
            budget=self.budget,
            paid=paid_providers(slots, s.prices).__contains__,
        )
        return Dispatcher(
            self.plan,
            slots,
            self._fetcher,
            self.store,
            RetryPolicy(s.backoff_base_s, s.backoff_cap_s),
            self.metrics,
            self._rng.random,
            prices=s.prices,
            budget=self.budget,
            batch=s.batch if self._batch_backend() is not None else None,
            pauses=self.pauses,
            tracing=self.tracing,
            dedup=None
            if s.dedup == "off"
            else DedupPolicy(s.dedup, s.dedup_scope, s.dedup_max_distance),
            reuse=self._reuse,
        )

    def _build_worker(self, dispatcher: Dispatcher) -> Worker:
        s = self.settings
        assert self.store is not None
        self.worker = Worker(
            self.store,
            dispatcher,
            WorkerConfig(
                worker_id=self.worker_id,
                concurrency=s.concurrency,
                prefetch=s.prefetch_jobs(),
                lease_s=s.lease_s,
                poll_interval_s=s.poll_interval_s,
                shutdown_grace_s=s.shutdown_grace_s,
            ),
            self.metrics,
            self._rng.random,
            signals=self.signals,
            gate=self.pauses,
        )
        return self.worker

    async def _build_side_loops(self, queries: Queries) -> None:
        """Every side loop this daemon runs (each one's stop policy is in its class):
        batches (with a batch backend), retention (with ``prune_after_days``), status
        write-back, deleted rows, counters' rollup, the memory trim (unless its interval is
        0) and webhooks (with ``webhook_url``)."""
        s = self.settings
        assert self.store is not None
        backend = self._batch_backend()
        if backend is not None:
            # Imported here: a pipeline without a batch backend never loads it.
            from listener.analysis.batches import BatchManager

            self.batches = BatchManager(
                queries,
                self._batch_store,
                backend,
                self._fetcher.fetch,
                [st.name for st in self.plan.steps if st.provider == backend.name],
                s.batch,
                s.prices,
            )
        if s.prune_after_days is not None:
            self.pruner = Pruner(
                self.store,
                timedelta(days=s.prune_after_days),
                interval_s=s.prune_interval_s,
                batch=s.prune_batch,
            )
        # Status write-back (--status-column): a loop of its own, outside every claim,
        # so the app's row locks never hold up the queue (see listener/app_side/writeback.py).
        self.status_writeback = StatusWriteBack(
            queries,
            s.status_writeback_interval_s,
            s.status_writeback_batch,
            s.status_writeback_lock_timeout_ms,
        )
        # Rows the app deleted: their jobs, results and faces (listener/app_side/deletes.py).
        self.deletes = DeleteDrain(
            queries,
            self.store,
            self._face_remover(),
            records=self._face_records,
            interval_s=s.deletes_interval_s,
            batch=s.deletes_batch,
            backoff_base_s=s.backoff_base_s,
            backoff_cap_s=s.backoff_cap_s,
            rng=self._rng.random,
            signals=self.signals,
        )
        # Folds the job counters' deltas (0008) so status reads stay a few rows.
        self.counts_rollup = CountsRollup(queries, s.counts_rollup_interval_s)
        # Freed C heap memory back to the system (listener/ops/memory.py).
        if s.malloc_trim_interval_s > 0:
            self.memory_trim = MemoryTrim(s.malloc_trim_interval_s)
        await self._start_webhooks(queries)

    def _build_notifier(self, listen_dsn: str, worker: Worker) -> Notifier:
        """The LISTEN connection: a notification wakes the worker, and the loops that drain
        outboxes the triggers fill (status write-back, deleted rows); ``PAUSES`` (and every
        reconnect) makes the pause board read the pauses again first."""
        s = self.settings
        outboxes = [loop for loop in (self.status_writeback, self.deletes) if loop is not None]

        def notified(payload: str) -> None:
            self.metrics.notifications.inc()
            if payload == PAUSES:
                # Pause or resume: read the pauses again before the claim this wakes, or a
                # resumed provider's jobs would be held again on the cached reading.
                if self.pauses is not None:
                    self.pauses.invalidate()
                worker.wake()
                return
            worker.wake()
            if payload == INSERTED:
                # Rows to admit: the worker's next claim does. The other loops would only
                # find nothing, and their queries would sit beside that claim.
                return
            for loop in outboxes:
                loop.wake()

        connections = 0

        def connected() -> None:
            nonlocal connections
            connections += 1
            if connections > 1:
                self.metrics.reconnects.inc()
                if self.pauses is not None:
                    self.pauses.invalidate()  # a pause or resume may have gone unheard
            self.signals.emit("listening")
            worker.wake()

        return Notifier(
            listen_dsn,
            notified,
            connected,
            probe_interval_s=s.probe_interval_s,
            reconnect_base_s=s.reconnect_base_s,
            reconnect_cap_s=s.reconnect_cap_s,
            rng=self._rng.random,
        )

    async def _start_health(self, queries: Queries, worker: Worker) -> None:
        """Bind the health server (unless turned off); before any loop runs."""
        if not self._want_health:
            return
        s = self.settings
        assert self.pool is not None and self.notifier is not None
        self.health = HealthServer(
            HealthSources(
                pool=self.pool,
                queries=queries,
                notifier=self.notifier,
                worker=worker,
                metrics=self.metrics,
                providers=[p.name for p in self._providers],
                started_at=time.monotonic(),
                budget_usd_per_day=s.budget_usd_per_day,
                status_cache_s=s.status_cache_s,
            ),
            s.health_host,
            s.health_port,
            token=s.health_token_value(),
            allowed_hosts=s.health_allowed_hosts,
            max_connections=s.health_max_connections,
            header_timeout_s=s.health_header_timeout_s,
        )
        await self.health.start()

    async def _start_webhooks(self, queries: Queries) -> None:
        """With ``webhook_url``: build the delivery loop and have the trigger queue terminal
        events, before anything is claimed (so no event of this daemon's jobs is missed).

        Raises:
            ValueError: the URL is not http(s), or no secret is set (messages never repeat
                the URL or the secret).
        """
        s = self.settings
        if s.webhook_url is None:
            if await queries.webhooks_enabled():
                logger.info(
                    "terminal events are queued for webhooks (another daemon has "
                    "LISTENER_WEBHOOK_URL); this one delivers none"
                )
            return
        secret = s.webhook_secret_value()
        if secret is None:
            raise ValueError(
                "LISTENER_WEBHOOK_URL is set but LISTENER_WEBHOOK_SECRET is not: webhooks are "
                "signed with it (README, Events)"
            )
        self.webhooks = WebhookSender(
            queries,
            s.webhook_url.get_secret_value(),
            secret,
            timeout_s=s.webhook_timeout_s,
            interval_s=s.webhook_interval_s,
            concurrency=s.webhook_concurrency,
            backoff_base_s=s.webhook_backoff_base_s,
            backoff_cap_s=s.webhook_backoff_cap_s,
            rng=self._rng.random,
        )
        await queries.enable_webhooks()

    def _face_remover(self) -> FaceRemover | None:
        """The provider of the plan's faces step, which deletes the faces of deleted rows;
        ``None`` without a faces step."""
        for step in self.plan.steps:
            if step.kind == "faces":
                for provider in self._providers:
                    if provider.name == step.provider and isinstance(provider, FaceRemover):
                        return provider
        return None

    def _health_description(self) -> str:
        """The bound address (not the requested one), and whether a token guards it."""
        if self.health is None:
            return "off"
        guard = "token required" if self.health.token_required else "no token, Host checked"
        return (
            f"http://{self.health.bound} ({guard} for /, /status, /metrics; "
            f"{self.settings.health_max_connections} connections max, "
            f"{self.settings.health_header_timeout_s:g} s header timeout)"
        )

    def _side_loops(self) -> list[_Loop]:
        """The side loops this daemon runs, as ``_build_side_loops`` (and the notifier) made
        them. All are told to stop only once the worker has drained, so the statuses and
        events of the jobs it finished or handed back are written and sent too."""
        loops: tuple[_Loop | None, ...] = (
            self.notifier,
            self.batches,
            self.pruner,
            self.status_writeback,
            self.counts_rollup,
            self.deletes,
            self.webhooks,
            self.memory_trim,
        )
        return [loop for loop in loops if loop is not None]

    async def _run_loops(self) -> None:
        """Run the worker and the side loops in one task group. When the worker returns
        (stopped, or crashed), the side loops are told to stop too."""
        assert self.worker is not None
        worker = self.worker
        async with asyncio.TaskGroup() as group:
            main = group.create_task(worker.run(), name="listener-worker")
            for loop in self._side_loops():
                group.create_task(loop.run(), name=f"listener-{type(loop).__name__.lower()}")

            def side_stop(_: asyncio.Task[None]) -> None:
                for loop in self._side_loops():
                    loop.stop()

            main.add_done_callback(side_stop)

    async def wait(self) -> None:
        """Wait until the loops end (``stop`` was called, or the worker crashed).

        Raises:
            ExceptionGroup: what a loop raised.
        """
        if self._loops is not None:
            await asyncio.shield(self._loops)

    async def stop(self) -> None:
        """Stop claiming, let running jobs finish within the grace period, release the rest,
        stop the other loops and close everything."""
        if self.worker is not None:
            self.worker.stop()
        if self._loops is not None:
            try:
                await self._loops
            except Exception as error:
                logger.error("a loop failed: {!r}", error)
            self._loops = None
        await self._close_resources()
        logger.bind(worker_id=self.worker_id).info("listener stopped")

    async def _close_resources(self) -> None:
        # Leased rate-limit slots go back to the fleet while the pool is still open.
        for limiter in self._limiters:
            try:
                await limiter.give_back()
            except Exception as error:
                logger.warning("giving back rate-limit slots failed: {}", error)
        self._limiters = []
        if self.health is not None:
            await self.health.close()
            self.health = None
        for provider in reversed(self._started_providers):
            try:
                await provider.close()
            except Exception as error:
                logger.warning("closing provider {} failed: {}", provider.name, error)
        self._started_providers = []
        await self._fetcher.close()
        if self.pool is not None:
            await self.pool.close()
            self.pool = None
        if self._owns_tracing:
            # Exports what is buffered (bounded by the exporter's timeout) off the loop.
            await asyncio.to_thread(self.tracing.shutdown)
            self.tracing = Tracing()

    async def __aenter__(self) -> Daemon:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()


async def run_until_signalled(daemon: Daemon) -> None:
    """Start ``daemon`` and run it until SIGTERM or SIGINT, then stop it gracefully."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await daemon.start()
    waiter = asyncio.create_task(daemon.wait())
    stopper = asyncio.create_task(stop.wait())
    try:
        await asyncio.wait({waiter, stopper}, return_when=asyncio.FIRST_COMPLETED)
        if stop.is_set():
            logger.info("signal received: stopping gracefully")
    finally:
        stopper.cancel()
        await daemon.stop()
        waiter.cancel()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
