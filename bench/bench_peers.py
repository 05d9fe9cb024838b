"""Listener side by side with peer Postgres queues: pgqueuer, and graphile-worker when node is.

Usage::

    python bench/bench_peers.py [--runs 3] [--only drain-20k,...] [--json out.json]
    python bench/bench_peers.py --smoke --no-graphile    # tiny sizes: runs, not figures

Every queue runs on the same Postgres server (a temporary cluster with default durability, or
``--use-database-url``), each run in a fresh database, noop work, and the runs alternate:
listener, pgqueuer, graphile-worker, listener, pgqueuer, ... so a slow drift of the machine
hits every queue alike. Scenarios:

- ``drain-20k``: 20,000 jobs present before the worker starts, one worker, drained; the clock
  runs from the worker's start to the last job finished.
- ``drain-2-daemons``: the same with two worker processes.
- ``latency``: one job per transaction at 200/s from another process; time from the enqueue's
  commit returning to the worker's handler being called (listener and pgqueuer).

The drains' verdict is listener's median rate over pgqueuer's: target >= 3x, required >= 2x.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import multiprocessing
import os
import secrets
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta
from multiprocessing.connection import Connection
from multiprocessing.context import SpawnProcess
from pathlib import Path
from typing import Any

import asyncpg
from bench_queue import (
    POLL_S,
    QUIET_OTHER_PCT,
    UNFINISHED_SQL,
    CpuMeter,
    Server,
    add_server_options,
    bench_server,
    daemon_settings,
    describe_machine,
    drain,
    drained,
    dsn_for,
    load_rows,
    percentile,
    postmaster_pid,
    scenario_latency,
)
from bench_queue import Report as QueueReport
from bench_queue import Sizes as QueueSizes
from fleet_daemon import RecordingNoop
from pgqueuer import AsyncpgDriver, Job, Queries, QueueManager
from pgqueuer.errors import FailingListenerError

from listener.app import Daemon
from listener.ops.logs import configure_logging

BENCH = Path(__file__).resolve().parent
DRAIN_JOBS = 20_000
LISTENER_CONCURRENCY = 10
LATENCY_RATE = 200.0
LATENCY_DURATION_S = 10.0
TARGET_RATIO = 3.0
REQUIRED_RATIO = 2.0
DRAIN_TIMEOUT_S = 180.0
WORKER_START_TIMEOUT_S = 60.0

GRAPHILE_VERSION = "0.17.3"  # the newest release that runs on node 20 (0.18 needs 22.18)
GRAPHILE_CONCURRENCY = 10
GRAPHILE_CACHE = Path.home() / ".cache" / "listener-bench" / f"graphile-worker-{GRAPHILE_VERSION}"

PEERS = ("listener", "pgqueuer", "graphile")
SCENARIOS = ("drain-20k", "drain-2-daemons", "latency")

SETTINGS_NOTES = {
    "listener": (
        f"Daemon (listener.app), noop pipeline, concurrency {LISTENER_CONCURRENCY} (jobs in "
        "flight per daemon), other settings default, health server off; rows inserted into an "
        "attached table of a fresh install (the daemon admits them as jobs)"
    ),
    "pgqueuer": (
        "QueueManager.run() defaults: batch_size=10, max_concurrent_tasks=None (no cap on "
        "jobs in flight), dequeue_timeout=30 s, heartbeat_timeout=30 s; entrypoint "
        "concurrency_limit=0 (unlimited); AsyncpgDriver over one connection (its quick start); "
        "schema from Queries.install(), durability=durable (every table logged); the standard "
        "asyncio loop, like listener (`pgq run` would use uvloop); jobs from one "
        "Queries.enqueue() call of lists"
    ),
    "graphile": (
        f"graphile-worker {GRAPHILE_VERSION} on node, run() defaults but concurrency "
        f"{GRAPHILE_CONCURRENCY}: LISTEN/NOTIFY plus pollInterval 2 s, localQueue off, "
        "completeJobBatchDelay off (each completion its own statement); jobs from one "
        "addJobs() call after runMigrations()"
    ),
}


@dataclass(frozen=True)
class Sizes:
    """How much work each run does; ``smoke()`` checks that it runs, its figures mean nothing."""

    drain_jobs: int = DRAIN_JOBS
    latency_duration_s: float = LATENCY_DURATION_S

    @classmethod
    def smoke(cls) -> Sizes:
        return cls(drain_jobs=300, latency_duration_s=1.0)


@dataclass
class Sample:
    """One run of one queue in one scenario.

    Attributes:
        figures: ``jobs_per_s`` (drains) or ``p50_ms`` / ``p99_ms`` (latency), plus
            informational figures.
        details: how it was measured (times in seconds, counts).
        load: the CPU shares of ``CpuMeter.usage`` during the run, in %.
    """

    scenario: str
    peer: str
    run: int
    figures: dict[str, float] = field(default_factory=dict)
    details: dict[str, Any] = field(default_factory=dict)
    load: dict[str, float] = field(default_factory=dict)


@dataclass
class Summary:
    """The medians of one figure over the runs, per queue, and listener's advantage.

    ``advantage[peer]`` is listener's median rate over the peer's (higher is better), or the
    peer's median latency over listener's (lower is better): above 1, listener is ahead.
    """

    scenario: str
    figure: str
    unit: str
    better: str
    median: dict[str, float | None]
    advantage: dict[str, float | None]
    verdict_target: str = ""
    verdict_required: str = ""


@dataclass
class Results:
    """Everything the run measured, as printed and as written by ``--json``."""

    machine: dict[str, Any] = field(default_factory=dict)
    settings: dict[str, str] = field(default_factory=dict)
    sizes: dict[str, Any] = field(default_factory=dict)
    samples: list[Sample] = field(default_factory=list)
    summaries: list[Summary] = field(default_factory=list)
    errors: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    elapsed_s: float = 0.0

    def as_json(self) -> dict[str, Any]:
        return {
            "machine": self.machine,
            "settings": self.settings,
            "sizes": self.sizes,
            "targets": {"ratio_target": TARGET_RATIO, "ratio_required": REQUIRED_RATIO},
            "samples": [asdict(s) for s in self.samples],
            "summary": [asdict(s) for s in self.summaries],
            "errors": self.errors,
            "notes": self.notes,
            "elapsed_s": round(self.elapsed_s, 1),
        }


# -- databases ----------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def fresh_database(server: Server, label: str) -> AsyncIterator[str]:
    """An empty database (no listener schema) for a peer queue; yields its DSN, then drops it.

    A CHECKPOINT first, as ``Server.database`` does for listener's runs.
    """
    name = f"bench_{label}_{secrets.token_hex(3)}"
    await server.admin(f'CREATE DATABASE "{name}"')
    dsn = dsn_for(server.admin_dsn, name)
    try:
        with contextlib.suppress(asyncpg.PostgresError):
            await server.admin("CHECKPOINT")
        yield dsn
    finally:
        await server.admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


async def pgqueuer_load(dsn: str, jobs: int) -> None:
    """Install pgqueuer's schema and enqueue ``jobs`` noop jobs in one ``enqueue`` call."""
    conn = await asyncpg.connect(dsn)
    try:
        queries = Queries(AsyncpgDriver(conn))
        await queries.install()
        if jobs:
            await queries.enqueue(["noop"] * jobs, [None] * jobs, [0] * jobs)
    finally:
        await conn.close()


async def poll_until(conn: asyncpg.Connection, sql: str, timeout_s: float) -> float:
    """Run ``sql`` every ``POLL_S`` until it returns 0; returns ``time.monotonic()`` then.

    Raises:
        TimeoutError: still non-zero after ``timeout_s``.
    """
    async with asyncio.timeout(timeout_s):
        while await conn.fetchval(sql):
            await asyncio.sleep(POLL_S)
    return time.monotonic()


async def pgqueuer_finish(conn: asyncpg.Connection, t0: datetime, jobs: int) -> dict[str, Any]:
    """Postgres-clock times of a pgqueuer drain from its log table, in seconds from ``t0``.

    Raises:
        RuntimeError: fewer than ``jobs`` successful completions were logged.
    """
    row = await conn.fetchrow(
        "SELECT count(*) FILTER (WHERE status = 'successful') AS complete, "
        "max(created) FILTER (WHERE status = 'successful') AS last, "
        "min(created) FILTER (WHERE status = 'picked') AS first FROM pgqueuer_log"
    )
    if row["complete"] != jobs:
        raise RuntimeError(f"only {row['complete']} of {jobs} pgqueuer jobs completed")
    return {
        "jobs": jobs,
        "from_start_s": (row["last"] - t0).total_seconds(),
        "from_first_claim_s": (row["last"] - row["first"]).total_seconds(),
    }


def drain_figures(details: dict[str, Any]) -> dict[str, float]:
    """``jobs_per_s`` from the worker's start, and from the first claim when known."""
    figures = {"jobs_per_s": details["jobs"] / details["from_start_s"]}
    if details.get("from_first_claim_s"):
        figures["jobs_per_s_from_first_claim"] = details["jobs"] / details["from_first_claim_s"]
    return figures


# -- workers in other processes -----------------------------------------------------------


def peer_worker(kind: str, dsn: str, pipe: Connection) -> None:
    """A worker process (``spawn``): builds its worker, sends ``ready``, starts on ``go``,
    stops on ``stop`` and sends ``{"calls": n, "last_call": monotonic s}``."""
    configure_logging("WARNING")
    logging.getLogger("pgqueuer").setLevel(logging.WARNING)
    run = _listener_worker if kind == "listener" else _pgqueuer_worker
    pipe.send(asyncio.run(run(dsn, pipe)))


async def _listener_worker(dsn: str, pipe: Connection) -> dict[str, Any]:
    provider = RecordingNoop()
    settings = daemon_settings(dsn, concurrency=LISTENER_CONCURRENCY)
    daemon = Daemon(settings, providers=[provider], health=False)
    pipe.send("ready")
    await asyncio.to_thread(pipe.recv)
    async with daemon:
        await asyncio.to_thread(pipe.recv)
    return {"calls": len(provider.calls), "last_call": max(provider.calls, default=None)}


async def _pgqueuer_worker(dsn: str, pipe: Connection) -> dict[str, Any]:
    calls: list[float] = []

    async def noop(job: Job) -> None:
        calls.append(time.monotonic())

    pipe.send("ready")
    await asyncio.to_thread(pipe.recv)
    conn = await asyncpg.connect(dsn)
    try:
        qm = QueueManager(Queries(AsyncpgDriver(conn)))
        qm.entrypoint("noop")(noop)
        task = asyncio.create_task(qm.run())
        await asyncio.to_thread(pipe.recv)
        qm.shutdown.set()
        await task
    finally:
        await conn.close()
    return {"calls": len(calls), "last_call": max(calls, default=None)}


@contextlib.asynccontextmanager
async def python_workers(
    kind: str, dsn: str, count: int
) -> AsyncIterator[tuple[Callable[[], None], list[dict[str, Any]]]]:
    """``count`` spawned ``peer_worker`` processes, all ready; yields ``(go, results)``.

    ``go()`` starts them; on the way out each is told to stop and its result (handler calls,
    last call) is appended to ``results``.
    """
    ctx = multiprocessing.get_context("spawn")
    pipes: list[Connection] = []
    procs: list[SpawnProcess] = []
    for _ in range(count):
        parent, child = ctx.Pipe()
        procs.append(ctx.Process(target=peer_worker, args=(kind, dsn, child), daemon=True))
        procs[-1].start()
        pipes.append(parent)
    results: list[dict[str, Any]] = []

    def go() -> None:
        for pipe in pipes:
            pipe.send("go")

    try:
        for pipe in pipes:
            ready = await asyncio.to_thread(_recv, pipe, WORKER_START_TIMEOUT_S)
            if ready != "ready":
                raise RuntimeError(f"worker said {ready!r}")
        yield go, results
        for pipe in pipes:
            pipe.send("stop")
        for pipe in pipes:
            results.append(await asyncio.to_thread(_recv, pipe, 60))
    finally:
        for proc in procs:
            await asyncio.to_thread(proc.join, 10)
            if proc.is_alive():
                proc.kill()


def _recv(pipe: Connection, timeout_s: float) -> Any:
    if not pipe.poll(timeout_s):
        raise TimeoutError(f"no answer from a worker within {timeout_s:.0f} s")
    return pipe.recv()


# -- graphile-worker ------------------------------------------------------------------------


def ensure_graphile(cache: Path = GRAPHILE_CACHE) -> tuple[Path | None, str]:
    """graphile-worker ``GRAPHILE_VERSION`` installed under ``cache``: (node_modules, note).

    Installs it with ``npm install --prefix`` the first time; (None, why) when node or npm is
    missing or the install fails (no registry, for instance).
    """
    node, npm = shutil.which("node"), shutil.which("npm")
    if not node or not npm:
        return None, "graphile-worker skipped: node and npm are not both on PATH"
    modules = cache / "node_modules"
    package = modules / "graphile-worker" / "package.json"
    with contextlib.suppress(OSError, ValueError):
        if json.loads(package.read_text())["version"] == GRAPHILE_VERSION:
            return modules, f"graphile-worker {GRAPHILE_VERSION} from {cache}"
    cache.mkdir(parents=True, exist_ok=True)
    try:
        subprocess.run(
            [
                npm,
                "install",
                "--prefix",
                str(cache),
                "--no-audit",
                "--no-fund",
                "--no-save",
                f"graphile-worker@{GRAPHILE_VERSION}",
            ],
            check=True,
            capture_output=True,
            timeout=300,
            stdin=subprocess.DEVNULL,
        )
    except (subprocess.SubprocessError, OSError) as error:
        return None, f"graphile-worker skipped: npm install failed ({type(error).__name__})"
    return modules, f"graphile-worker {GRAPHILE_VERSION} installed into {cache}"


def _node_env(dsn: str, modules: Path) -> dict[str, str]:
    return os.environ | {"DATABASE_URL": dsn, "GRAPHILE_WORKER_NODE_MODULES": str(modules)}


async def graphile_load(dsn: str, modules: Path, jobs: int) -> None:
    """``runMigrations`` and one ``addJobs`` call of ``jobs`` noop jobs, in a node process."""
    proc = await asyncio.create_subprocess_exec(
        "node",
        str(BENCH / "graphile_peer.cjs"),
        "load",
        str(jobs),
        env=_node_env(dsn, modules),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    _, err = await asyncio.wait_for(proc.communicate(), 120)
    if proc.returncode != 0:
        raise RuntimeError(f"graphile load failed: {err.decode()[-1000:]}")


@contextlib.asynccontextmanager
async def graphile_workers(
    dsn: str, modules: Path, count: int
) -> AsyncIterator[tuple[Callable[[], Awaitable[None]], list[dict[str, Any]]]]:
    """``count`` node workers (``graphile_peer.cjs worker``), all ready; yields
    ``(go, results)`` as ``python_workers`` does."""
    procs = []
    results: list[dict[str, Any]] = []
    for _ in range(count):
        procs.append(
            await asyncio.create_subprocess_exec(
                "node",
                str(BENCH / "graphile_peer.cjs"),
                "worker",
                str(GRAPHILE_CONCURRENCY),
                env=_node_env(dsn, modules),
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
            )
        )

    async def go() -> None:
        for proc in procs:
            assert proc.stdin is not None
            proc.stdin.write(b"go\n")
        for proc in procs:
            assert proc.stdin is not None
            await proc.stdin.drain()

    try:
        for proc in procs:
            assert proc.stdout is not None
            line = await asyncio.wait_for(proc.stdout.readline(), WORKER_START_TIMEOUT_S)
            if line.strip() != b"ready":
                raise RuntimeError(f"graphile worker said {line!r}")
        yield go, results
        for proc in procs:
            assert proc.stdin is not None
            proc.stdin.write(b"stop\n")
            await proc.stdin.drain()
        for proc in procs:
            assert proc.stdout is not None
            line = await asyncio.wait_for(proc.stdout.readline(), 60)
            result = json.loads(line)
            results.append(
                {"calls": result["calls"], "last_call": int(result["last_call_ns"]) / 1e9}
            )
    finally:
        for proc in procs:
            if proc.returncode is None:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(proc.wait(), 10)
            if proc.returncode is None:
                proc.kill()
                await proc.wait()


# -- scenarios ----------------------------------------------------------------------------


@dataclass
class Context:
    """What every run needs: the server, the sizes, and graphile-worker when available."""

    server: Server
    sizes: Sizes
    graphile: Path | None


async def listener_drain_1(ctx: Context, run: int) -> Sample:
    """bench_queue's drain: rows inserted into an attached table, one in-process Daemon."""
    d = await drain(ctx.server, "peers_l", ctx.sizes.drain_jobs, LISTENER_CONCURRENCY, 0.0)
    details = asdict(d)
    return Sample("drain-20k", "listener", run, drain_figures(details), details)


async def pgqueuer_drain_1(ctx: Context, run: int) -> Sample:
    """One in-process QueueManager (its defaults) drains the preloaded queue.

    The clock is Postgres's, as for listener: ``clock_timestamp()`` before the worker's
    connection is opened to the last ``successful`` row of ``pgqueuer_log``.
    """
    jobs = ctx.sizes.drain_jobs
    calls: list[float] = []

    async def noop(job: Job) -> None:
        calls.append(time.monotonic())

    async with fresh_database(ctx.server, "peers_p") as dsn:
        await pgqueuer_load(dsn, jobs)
        conn = await asyncpg.connect(dsn)
        try:
            t0: datetime = await conn.fetchval("SELECT clock_timestamp()")
            worker_conn = await asyncpg.connect(dsn)
            try:
                qm = QueueManager(Queries(AsyncpgDriver(worker_conn)))
                qm.entrypoint("noop")(noop)
                task = asyncio.create_task(qm.run())
                try:
                    await poll_until(conn, "SELECT count(*) FROM pgqueuer", DRAIN_TIMEOUT_S)
                finally:
                    qm.shutdown.set()
                    await task
            finally:
                await worker_conn.close()
            details = await pgqueuer_finish(conn, t0, jobs)
        finally:
            await conn.close()
    details["handler_calls"] = len(calls)
    return Sample("drain-20k", "pgqueuer", run, drain_figures(details), details)


async def graphile_drain(ctx: Context, run: int, scenario: str, workers: int) -> Sample:
    """``workers`` node processes drain the preloaded queue.

    graphile-worker deletes a finished job and keeps no completion time, so the clock is
    ``time.monotonic()``: from just before ``go`` to the first 20 ms poll that finds the jobs
    table empty (at most one poll late).
    """
    assert ctx.graphile is not None
    jobs = ctx.sizes.drain_jobs
    async with fresh_database(ctx.server, "peers_g") as dsn:
        await graphile_load(dsn, ctx.graphile, jobs)
        conn = await asyncpg.connect(dsn)
        try:
            async with graphile_workers(dsn, ctx.graphile, workers) as (go, results):
                started = time.monotonic()
                await go()
                ended = await poll_until(
                    conn, "SELECT count(*) FROM graphile_worker.jobs", DRAIN_TIMEOUT_S
                )
        finally:
            await conn.close()
    calls = [r["calls"] for r in results]
    if sum(calls) != jobs:
        raise RuntimeError(f"graphile-worker ran {sum(calls)} of {jobs} jobs")
    details = {"jobs": jobs, "from_start_s": ended - started, "calls_by_worker": calls}
    return Sample(scenario, "graphile", run, drain_figures(details), details)


async def listener_drain_2(ctx: Context, run: int) -> Sample:
    """Two daemons in two spawned processes, each concurrency 10; clock from ``go``."""
    jobs = ctx.sizes.drain_jobs
    async with ctx.server.database("peers_l2") as dsn:
        conn = await asyncpg.connect(dsn)
        try:
            await load_rows(conn, jobs)
            async with python_workers("listener", dsn, 2) as (go, results):
                t0: datetime = await conn.fetchval("SELECT clock_timestamp()")
                go()
                await poll_until(conn, UNFINISHED_SQL, DRAIN_TIMEOUT_S)
            d = await drained(conn, jobs, t0)
        finally:
            await conn.close()
    details = {
        "jobs": jobs,
        "from_start_s": d.from_start_s,
        "from_first_claim_s": d.from_first_claim_s,
        "calls_by_worker": [r["calls"] for r in results],
    }
    return Sample("drain-2-daemons", "listener", run, drain_figures(details), details)


async def pgqueuer_drain_2(ctx: Context, run: int) -> Sample:
    """Two QueueManagers (defaults) in two spawned processes; clock from ``go``."""
    jobs = ctx.sizes.drain_jobs
    async with fresh_database(ctx.server, "peers_p2") as dsn:
        await pgqueuer_load(dsn, jobs)
        conn = await asyncpg.connect(dsn)
        try:
            async with python_workers("pgqueuer", dsn, 2) as (go, results):
                t0: datetime = await conn.fetchval("SELECT clock_timestamp()")
                go()
                await poll_until(conn, "SELECT count(*) FROM pgqueuer", DRAIN_TIMEOUT_S)
            details = await pgqueuer_finish(conn, t0, jobs)
        finally:
            await conn.close()
    details["calls_by_worker"] = [r["calls"] for r in results]
    return Sample("drain-2-daemons", "pgqueuer", run, drain_figures(details), details)


async def listener_latency(ctx: Context, run: int) -> Sample:
    """bench_queue's scenario (b): an in-process daemon, a spawned inserter at 200/s."""
    report = QueueReport()
    await scenario_latency(
        ctx.server, report, QueueSizes(latency_duration_s=ctx.sizes.latency_duration_s)
    )
    if "b" in report.errors:
        raise RuntimeError(report.errors["b"])
    b = report.details["b"]
    figures = {"p50_ms": b["from_commit_ms"][50], "p99_ms": b["from_commit_ms"][99]}
    return Sample("latency", "listener", run, figures, b)


def pgqueuer_insert_paced(dsn: str, rate: float, duration_s: float) -> dict[str, Any]:
    """Runs in a spawned process: one ``Queries.enqueue`` (one transaction) per job on an
    absolute schedule; returns ``{"rows": [(job id, sent, returned), ...], "elapsed_s": ...}``
    with ``time.monotonic()`` seconds, as bench_queue's ``insert_paced`` does for rows."""
    return asyncio.run(_pgqueuer_insert_paced(dsn, rate, duration_s))


async def _pgqueuer_insert_paced(dsn: str, rate: float, duration_s: float) -> dict[str, Any]:
    conn = await asyncpg.connect(dsn)
    try:
        queries = Queries(AsyncpgDriver(conn))
        loop = asyncio.get_running_loop()
        begin = loop.time() + 0.05
        rows: list[tuple[int, float, float]] = []
        for i in range(round(rate * duration_s)):
            delay = begin + i / rate - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            sent = time.monotonic()
            (job_id,) = await queries.enqueue("noop", None)
            rows.append((int(job_id), sent, time.monotonic()))
        return {"rows": rows, "elapsed_s": loop.time() - begin}
    finally:
        await conn.close()


def _ready() -> bool:
    return True


async def pgqueuer_latency(ctx: Context, run: int) -> Sample:
    """An in-process QueueManager (defaults), a spawned enqueuer at 200/s, one job each."""
    started: dict[int, float] = {}
    changed = asyncio.Event()

    async def noop(job: Job) -> None:
        started[int(job.id)] = time.monotonic()
        changed.set()

    loop = asyncio.get_running_loop()
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        await loop.run_in_executor(pool, _ready)
        async with fresh_database(ctx.server, "peers_pl") as dsn:
            await pgqueuer_load(dsn, 0)
            worker_conn = await asyncpg.connect(dsn)
            try:
                qm = QueueManager(Queries(AsyncpgDriver(worker_conn)))
                qm.entrypoint("noop")(noop)
                task = asyncio.create_task(qm.run())
                try:
                    await _wait_listening(qm)
                    result: dict[str, Any] = await loop.run_in_executor(
                        pool, pgqueuer_insert_paced, dsn, LATENCY_RATE, ctx.sizes.latency_duration_s
                    )
                    rows: list[tuple[int, float, float]] = result["rows"]
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(10):
                            while len(started) < len(rows):
                                changed.clear()
                                await changed.wait()
                finally:
                    qm.shutdown.set()
                    await task
            finally:
                await worker_conn.close()
    from_commit = [(started[i] - ret) * 1000 for i, _, ret in rows if i in started]
    missing = len(rows) - len(from_commit)
    if missing or not from_commit:
        raise RuntimeError(f"{missing} of {len(rows)} pgqueuer jobs never reached the handler")
    details = {
        "rows": len(rows),
        "achieved_rate": len(rows) / result["elapsed_s"],
        "from_commit_ms": {q: percentile(from_commit, q) for q in (0, 50, 90, 95, 99, 100)},
    }
    figures = {"p50_ms": percentile(from_commit, 50), "p99_ms": percentile(from_commit, 99)}
    return Sample("latency", "pgqueuer", run, figures, details)


async def _wait_listening(qm: QueueManager) -> None:
    """Until a NOTIFY round trip through the manager's LISTEN connection succeeds."""
    async with asyncio.timeout(WORKER_START_TIMEOUT_S):
        while True:
            try:
                await qm.listener_healthy(timedelta(seconds=0.5))
                return
            except FailingListenerError:
                continue


Runner = Callable[[Context, int], Awaitable[Sample]]


def runners(scenario: str, ctx: Context) -> dict[str, Runner]:
    """The queues that take part in ``scenario``, in the order they alternate."""
    table: dict[str, dict[str, Runner]] = {
        "drain-20k": {"listener": listener_drain_1, "pgqueuer": pgqueuer_drain_1},
        "drain-2-daemons": {"listener": listener_drain_2, "pgqueuer": pgqueuer_drain_2},
        "latency": {"listener": listener_latency, "pgqueuer": pgqueuer_latency},
    }
    chosen = dict(table[scenario])
    if ctx.graphile is not None and scenario.startswith("drain"):
        workers = 2 if scenario == "drain-2-daemons" else 1

        async def graphile(c: Context, run: int) -> Sample:
            return await graphile_drain(c, run, scenario, workers)

        chosen["graphile"] = graphile
    return chosen


# -- summary and output -------------------------------------------------------------------


def summarize(results: Results, scenarios: list[str]) -> None:
    """Medians per queue and figure; listener's advantage; the drains' verdicts."""
    for scenario in scenarios:
        samples = [s for s in results.samples if s.scenario == scenario]
        if scenario == "latency":
            figures = [("p50_ms", "handler p50", "ms", "lower"), ("p99_ms", "p99", "ms", "lower")]
        else:
            figures = [("jobs_per_s", "drain rate", "jobs/s", "higher")]
        for key, name, unit, better in figures:
            median: dict[str, float | None] = {}
            for peer in PEERS:
                values = [s.figures[key] for s in samples if s.peer == peer and key in s.figures]
                median[peer] = statistics.median(values) if values else None
            advantage: dict[str, float | None] = {}
            ours = median["listener"]
            for peer in PEERS[1:]:
                theirs = median[peer]
                if ours is None or theirs is None or not ours or not theirs:
                    advantage[peer] = None
                else:
                    advantage[peer] = ours / theirs if better == "higher" else theirs / ours
            summary = Summary(scenario, name, unit, better, median, advantage)
            if scenario.startswith("drain"):
                ratio = advantage["pgqueuer"]
                summary.verdict_target = _verdict(ratio, TARGET_RATIO)
                summary.verdict_required = _verdict(ratio, REQUIRED_RATIO)
            results.summaries.append(summary)


def _verdict(ratio: float | None, bound: float) -> str:
    if ratio is None:
        return "ERROR"
    return "PASS" if ratio >= bound else "MISS"


def _num(value: float | None, unit: str) -> str:
    if value is None:
        return "-"
    return f"{value:,.0f}" if unit == "jobs/s" else f"{value:,.2f}"


def _ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def print_results(results: Results, with_graphile: bool) -> None:
    m = results.machine
    pg = m.get("postgres", {})
    print()
    print(f"machine: nproc={m.get('nproc')} cpu={m.get('cpu')} python={m.get('python')}")
    print(
        f"postgres {pg.get('server_version')}: fsync={pg.get('fsync')} "
        f"synchronous_commit={pg.get('synchronous_commit')} "
        f"full_page_writes={pg.get('full_page_writes')}"
    )
    print()
    print("runs (in the order they ran):")
    for s in results.samples:
        shown = ", ".join(
            f"{k} {_num(v, 'ms' if 'ms' in k else 'jobs/s')}" for k, v in s.figures.items()
        )
        other = s.load.get("other_pct", 0.0)
        print(f"  {s.scenario:16} #{s.run + 1} {s.peer:9} {shown}  (other CPU {other:.0f}%)")
    print()
    peers = [p for p in PEERS if with_graphile or p != "graphile"]
    head = f"{'scenario':16} {'figure':12} {'unit':6} " + " ".join(f"{p:>9}" for p in peers)
    head += f" {'L/pgqueuer':>10}"
    if with_graphile:
        head += f" {'L/graphile':>10}"
    head += f"  {'>= 3x':6} {'>= 2x':6}"
    print(head)
    print("-" * len(head))
    for row in results.summaries:
        line = f"{row.scenario:16} {row.figure:12} {row.unit:6} "
        line += " ".join(f"{_num(row.median[p], row.unit):>9}" for p in peers)
        line += f" {_ratio(row.advantage['pgqueuer']):>10}"
        if with_graphile:
            line += f" {_ratio(row.advantage['graphile']):>10}"
        line += f"  {row.verdict_target:6} {row.verdict_required:6}"
        print(line)
    print()
    print(
        "Medians over the runs. L/peer is listener's advantage: its rate over the peer's, or "
        "the peer's latency over listener's (above 1x, listener is ahead). Verdicts: listener "
        f"over pgqueuer, target >= {TARGET_RATIO:g}x, required >= {REQUIRED_RATIO:g}x."
    )
    for peer, note in results.settings.items():
        print(f"{peer}: {note}")
    for note in results.notes:
        print(note)
    busy = sorted({s.scenario for s in results.samples if s.load.get("other_pct", 0) >= 15})
    if busy:
        print(
            f"WARNING: other processes used >= {QUIET_OTHER_PCT:.0f}% of the CPUs during runs "
            f"of {', '.join(busy)}: those figures are low; run again on a quiet machine"
        )
    for key, error in results.errors.items():
        print(f"({key}) ERROR: {error}")
    print(f"\ntotal time {results.elapsed_s:.1f} s")


async def run(
    server: Server,
    results: Results,
    scenarios: list[str],
    runs: int,
    sizes: Sizes,
    graphile: Path | None,
    meter: CpuMeter,
    quiet_wait_s: float,
) -> None:
    """Every scenario, its queues alternating run by run; samples and errors into
    ``results``."""
    results.machine = await describe_machine(server)
    ctx = Context(server, sizes, graphile)
    for scenario in scenarios:
        chosen = runners(scenario, ctx)
        for run_no in range(runs):
            for peer, runner in chosen.items():
                quiet = await meter.wait_quiet(QUIET_OTHER_PCT, quiet_wait_s)
                print(f"{scenario} #{run_no + 1} {peer} ...", file=sys.stderr, flush=True)
                before = meter.snapshot()
                began = time.monotonic()
                try:
                    sample = await runner(ctx, run_no)
                except Exception as error:
                    results.errors[f"{scenario} #{run_no + 1} {peer}"] = (
                        f"{type(error).__name__}: {error}"
                    )
                    continue
                sample.load = meter.usage(before) | {
                    "other_pct_before": quiet["other_pct"],
                    "seconds": time.monotonic() - began,
                }
                results.samples.append(sample)
    summarize(results, scenarios)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--only", default=",".join(SCENARIOS), help=f"comma-separated ({', '.join(SCENARIOS)})"
    )
    parser.add_argument("--runs", type=int, default=3, help="runs per queue and scenario")
    parser.add_argument("--json", type=Path, help="also write every sample to this file")
    add_server_options(parser, "run")
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="tiny sizes and one run: checks that every scenario runs; figures mean nothing",
    )
    parser.add_argument("--no-graphile", action="store_true", help="leave graphile-worker out")
    args = parser.parse_args(argv)
    args.sizes = Sizes.smoke() if args.smoke else Sizes()
    if args.smoke:
        args.runs = 1
    if args.runs < 1:
        parser.error("--runs must be at least 1")
    args.only = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = [s for s in args.only if s not in SCENARIOS]
    if unknown:
        parser.error(f"unknown scenario(s): {', '.join(unknown)}")
    return args


def main(argv: list[str] | None = None) -> int:
    """Run, print the table, write ``--json``; exit status 1 when a run failed."""
    args = parse_args(argv)
    configure_logging("WARNING")
    logging.getLogger("pgqueuer").setLevel(logging.WARNING)
    results = Results(sizes=asdict(args.sizes) | {"runs": args.runs})
    results.settings = {p: n for p, n in SETTINGS_NOTES.items() if p != "graphile"}
    graphile: Path | None = None
    if args.no_graphile:
        results.notes.append("graphile-worker left out (--no-graphile)")
    else:
        graphile, note = ensure_graphile()
        results.notes.append(note)
        if graphile is not None:
            results.settings["graphile"] = SETTINGS_NOTES["graphile"]
    print(results.notes[-1], file=sys.stderr)
    started = time.monotonic()
    with bench_server(args.use_database_url) as (admin_dsn, cluster):
        roots = [os.getpid()] + ([postmaster_pid(cluster)] if cluster else [])
        meter = CpuMeter(roots)
        asyncio.run(
            run(
                Server(admin_dsn),
                results,
                args.only,
                args.runs,
                args.sizes,
                graphile,
                meter,
                args.quiet_wait,
            )
        )
    results.elapsed_s = time.monotonic() - started
    print_results(results, graphile is not None)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results.as_json(), indent=2, default=str) + "\n")
    return 1 if results.errors else 0


if __name__ == "__main__":
    sys.exit(main())
