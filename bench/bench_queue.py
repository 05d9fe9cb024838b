"""Queue benchmarks for listener: throughput, latency, overlap, trigger cost, memory.

Usage::

    python bench/bench_queue.py [--only a,b,...] [--json out.json] [--use-database-url]
    python bench/bench_queue.py --smoke    # tiny sizes: checks that it runs, not its figures

Scenarios (targets are for a 2-core machine):

- ``a`` throughput: 20,000 rows inserted into an attached table of a fresh install in one
  statement (nothing admitted, nothing analyzed), then one daemon, noop pipeline, concurrency
  10; the clock runs from the daemon's start to the last job finished. A second line drains
  the same jobs admitted and analyzed beforehand (a queue no new user has).
- ``b`` latency: rows inserted one per transaction at 200/s for 10 s by another process;
  time from the INSERT's commit returning to the provider being called.
- ``c`` overlap: 2,000 rows inserted as in (a), whose provider sleeps 50 ms, concurrency 50.
- ``d`` trigger cost: single-row autocommit INSERT rate, attached table vs plain table.
- ``e`` memory: peak RSS of a ``listener run`` subprocess draining 100,000 rows inserted as
  in (a).
- ``f`` backlog: 1,000,000 rows inserted in one statement before the daemon starts, drained as
  in (a); and the cost of admitting 1,000 rows (``listener.admit_entries``) over the last
  tenth of the rows admitted against the first tenth.
- ``g`` stream: 200,000 rows inserted at full speed (100-row INSERTs, autocommit, from a
  spawned process) while the daemon runs; the same two figures.

``f`` and ``g`` take minutes: run them with ``--only f,g`` (the default is a to e).

Each scenario gets a fresh database. Without ``--use-database-url`` the script starts its own
``TemporaryCluster`` with default durability (``fsync``, ``synchronous_commit`` and
``full_page_writes`` on): ``fast=True`` would flatter every figure that commits.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import multiprocessing
import os
import platform
import secrets
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Literal
from urllib.parse import quote, urlsplit, urlunsplit

import asyncpg
from pydantic import SecretStr

from listener.app import Daemon
from listener.db.migrate import migrate
from listener.settings import Settings

try:
    from listener.analysis.providers.base import ImageInput, StepContext, StepResult
    from listener.ops.logs import configure_logging
    from listener.testing.cluster import TemporaryCluster
except ImportError:  # a commit before the package's layout by role (compare.py runs those)
    from listener.db.cluster import TemporaryCluster  # type: ignore[no-redef]
    from listener.logs import configure_logging  # type: ignore[no-redef]
    from listener.providers.base import (  # type: ignore[no-redef]
        ImageInput,
        StepContext,
        StepResult,
    )

# (a)
THROUGHPUT_JOBS = 20_000
THROUGHPUT_TARGET = 5_000.0
# (b)
LATENCY_RATE = 200.0
LATENCY_DURATION_S = 10.0
LATENCY_P50_TARGET_MS = 2.0
LATENCY_P99_TARGET_MS = 2.5
# (c)
OVERLAP_JOBS = 2_000
OVERLAP_DELAY_S = 0.050
OVERLAP_CONCURRENCY = 50
OVERLAP_TARGET = 970.0
# (d)
INSERT_ROWS = 3_000
INSERT_ROUNDS = 7
INSERT_WARMUP_ROWS = 200
INSERT_RATIO_TARGET = 0.85
# (e)
RSS_JOBS = 100_000
RSS_TARGET_MB = 150.0
# (f), (g)
BACKLOG_ROWS = 1_000_000
STREAM_ROWS = 200_000
STREAM_BATCH = 100
BACKLOG_TARGET = 10_000.0
ADMISSION_GROWTH_TARGET = 1.5
# Seconds between two reads of the admission's cumulative function statistics.
ADMISSION_SAMPLE_S = 0.5

POLL_S = 0.020
# Before each scenario, wait up to QUIET_WAIT_S for other processes to use under
# QUIET_OTHER_PCT of the CPUs (the machine may be shared).
QUIET_OTHER_PCT = 15.0
QUIET_WAIT_S = 10.0
DRAIN_TIMEOUT_S = 120.0

TABLE_DDL = "CREATE TABLE {name} (id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY, url text)"
LOAD_SQL = (
    "INSERT INTO images (url) "
    "SELECT 'https://example.invalid/' || g || '.jpg' FROM generate_series(1, $1) AS g"
)
# Whether any job is unfinished or any row inserted is not admitted as a job yet (0019): two
# partial-index probes (jobs_claim_idx, jobs_lease_idx) and one of inserted_rows, so the poll
# that detects the end costs next to nothing (a count(*) of every job every 20 ms took a
# core's worth of the server's CPU at 200,000 jobs).
UNFINISHED_SQL = (
    "SELECT EXISTS (SELECT FROM listener.jobs WHERE status = 'pending') "
    "OR EXISTS (SELECT FROM listener.jobs WHERE status = 'processing') "
    "OR EXISTS (SELECT FROM listener.inserted_rows)"
)
# The same before 0019, when the app's trigger made the jobs itself and there was no
# inserted_rows (bench/compare.py runs this script against older revisions).
UNFINISHED_BEFORE_0019_SQL = (
    "SELECT EXISTS (SELECT FROM listener.jobs WHERE status = 'pending') "
    "OR EXISTS (SELECT FROM listener.jobs WHERE status = 'processing')"
)


@dataclass(frozen=True)
class Sizes:
    """How much work each scenario does; the defaults are the measured sizes.

    ``smoke()`` is a few hundred jobs and about a second per scenario: it shows that every
    scenario runs and reports, and its figures mean nothing (fixed costs dominate them).
    """

    throughput_jobs: int = THROUGHPUT_JOBS
    latency_duration_s: float = LATENCY_DURATION_S
    overlap_jobs: int = OVERLAP_JOBS
    insert_rows: int = INSERT_ROWS
    insert_rounds: int = INSERT_ROUNDS
    insert_warmup_rows: int = INSERT_WARMUP_ROWS
    rss_jobs: int = RSS_JOBS
    backlog_rows: int = BACKLOG_ROWS
    stream_rows: int = STREAM_ROWS
    fdatasync_probe_s: float = 2.0

    @classmethod
    def smoke(cls) -> Sizes:
        return cls(
            throughput_jobs=300,
            latency_duration_s=1.0,
            overlap_jobs=200,
            insert_rows=100,
            insert_rounds=2,
            insert_warmup_rows=20,
            rss_jobs=300,
            backlog_rows=3000,
            stream_rows=2000,
            fdatasync_probe_s=0.2,
        )


# -- results ------------------------------------------------------------------------------


@dataclass
class Figure:
    """One measured figure; ``target`` None means informational.

    Attributes:
        scenario: ``a`` .. ``e``.
        name: what was measured.
        value: the measurement, in ``unit``; None when the scenario failed.
        unit: ``jobs/s``, ``ms``, ``rows/s``, ``%``, ``MB`` ...
        target: the bound to meet, or None.
        better: ``higher`` (value >= target passes) or ``lower`` (value <= target passes).
        note: method or caveat, printed under the table.
    """

    scenario: str
    name: str
    value: float | None
    unit: str
    target: float | None = None
    better: Literal["higher", "lower"] = "higher"
    note: str = ""

    @property
    def verdict(self) -> str:
        if self.value is None:
            return "ERROR"
        if self.target is None:
            return "info"
        ok = self.value >= self.target if self.better == "higher" else self.value <= self.target
        return "PASS" if ok else "MISS"


@dataclass
class Report:
    """Everything one run measured, as printed and as written by ``--json``."""

    machine: dict[str, Any] = field(default_factory=dict)
    figures: list[Figure] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)
    load: dict[str, dict[str, float]] = field(default_factory=dict)
    elapsed_s: float = 0.0

    def as_json(self) -> dict[str, Any]:
        return {
            "machine": self.machine,
            "figures": [asdict(f) | {"verdict": f.verdict} for f in self.figures],
            "details": self.details,
            "errors": self.errors,
            "cpu_load_pct": self.load,
            "elapsed_s": round(self.elapsed_s, 1),
        }


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (``q`` in 0..100) of a non-empty list."""
    ordered = sorted(values)
    rank = max(1, min(len(ordered), round(q / 100 * len(ordered) + 0.5)))
    return ordered[rank - 1]


# -- machine load ------------------------------------------------------------------------


def _machine_jiffies() -> tuple[int, int, int]:
    """(busy, total, steal) jiffies summed over every CPU, from the first line of /proc/stat."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    idle = fields[3] + fields[4]  # idle + iowait
    total = sum(fields)
    return total - idle, total, fields[7]


def _tree_jiffies(roots: list[int]) -> int:
    """CPU jiffies of ``roots`` and all their live descendants, plus the reaped ones.

    Each live process counts its own time (utime, stime) and that of the children it has
    reaped (cutime, cstime), so every jiffy of the tree is counted once.
    """
    parent: dict[int, int] = {}
    cpu: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        pid = int(stat.parent.name)
        parent[pid] = int(fields[1])
        cpu[pid] = sum(int(v) for v in fields[11:15])
    ours = set(roots) & cpu.keys()
    grew = True
    while grew:
        more = {pid for pid, ppid in parent.items() if ppid in ours} - ours
        grew = bool(more)
        ours |= more
    return sum(cpu[pid] for pid in ours)


class CpuMeter:
    """How much of the machine's CPU this benchmark used, and how much other processes did.

    The machine may be shared (other test runs, builds): CPU they burn during a scenario
    competes with the daemon and Postgres and lowers the figures. ``roots`` are this process
    and, for a temporary cluster, its postmaster; a server given by DATABASE_URL counts as
    "other" when it runs on this machine.
    """

    def __init__(self, roots: list[int]) -> None:
        self.roots = roots
        self.ncpu = os.cpu_count() or 1

    def snapshot(self) -> tuple[int, int, int, int]:
        busy, total, steal = _machine_jiffies()
        return busy, total, steal, _tree_jiffies(self.roots)

    def usage(self, before: tuple[int, int, int, int]) -> dict[str, float]:
        """Percent of all CPUs since ``before``: ours, others', and hypervisor steal."""
        busy, total, steal, ours = (b - a for a, b in zip(before, self.snapshot(), strict=True))
        total = max(total, 1)
        return {
            "ours_pct": 100 * ours / total,
            "other_pct": 100 * max(0, busy - ours) / total,
            "steal_pct": 100 * steal / total,
        }

    async def wait_quiet(self, max_other_pct: float, timeout_s: float) -> dict[str, float]:
        """Sample 0.5 s at a time until other processes use under ``max_other_pct`` of the
        CPUs, or ``timeout_s`` passes; returns the last sample."""
        deadline = time.monotonic() + timeout_s
        while True:
            before = self.snapshot()
            await asyncio.sleep(0.5)
            sample = self.usage(before)
            if sample["other_pct"] < max_other_pct or time.monotonic() > deadline:
                return sample


def fdatasync_probe(directory: Path, seconds: float = 2.0) -> dict[str, float]:
    """Latency of ``fdatasync`` after an 8 KiB write, every 5 ms for ``seconds``, in ms.

    A commit waits for one such flush of the WAL, so its tail shows up in every figure that
    commits; virtual disks often stall for tens or hundreds of milliseconds now and then.
    """
    path = directory / "bench-fsync-probe"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        os.write(fd, bytes(1024 * 1024))
        os.fsync(fd)
        block = b"x" * 8192
        samples: list[float] = []
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            os.pwrite(fd, block, (len(samples) % 128) * 8192)
            started = time.perf_counter()
            os.fdatasync(fd)
            samples.append((time.perf_counter() - started) * 1000)
            time.sleep(0.005)
    finally:
        os.close(fd)
        path.unlink()
    return {
        "p50_ms": percentile(samples, 50),
        "p99_ms": percentile(samples, 99),
        "max_ms": max(samples),
        "samples": len(samples),
    }


# -- databases ----------------------------------------------------------------------------


def dsn_for(dsn: str, database: str) -> str:
    """``dsn`` (a ``postgresql://`` URL) pointed at ``database``."""
    return urlunsplit(urlsplit(dsn)._replace(path="/" + quote(database, safe="")))


class Server:
    """The Postgres server the scenarios run on: one fresh database per scenario."""

    def __init__(self, admin_dsn: str) -> None:
        self.admin_dsn = admin_dsn

    async def admin(self, sql: str) -> None:
        conn = await asyncpg.connect(self.admin_dsn)
        try:
            await conn.execute(sql)
        finally:
            await conn.close()

    @contextlib.asynccontextmanager
    async def database(self, label: str, *, plain_table: bool = False) -> AsyncIterator[str]:
        """A fresh migrated database with ``images`` attached; yields its DSN, then drops it.

        A CHECKPOINT first, so the previous scenario's dirty pages are not written during this
        one (ignored where the role may not checkpoint).
        """
        name = f"bench_{label}_{secrets.token_hex(3)}"
        await self.admin(f'CREATE DATABASE "{name}"')
        dsn = dsn_for(self.admin_dsn, name)
        try:
            conn = await asyncpg.connect(dsn)
            try:
                await migrate(conn)
                await conn.execute(TABLE_DDL.format(name="images"))
                if plain_table:
                    await conn.execute(TABLE_DDL.format(name="plain"))
                await conn.execute(
                    "SELECT listener.attach('public.images', 'id', 'url', NULL, NULL)"
                )
                with contextlib.suppress(asyncpg.PostgresError):
                    await conn.execute("CHECKPOINT")
            finally:
                await conn.close()
            yield dsn
        finally:
            await self.admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


async def load_rows(conn: asyncpg.Connection, n: int, *, admitted: bool = False) -> None:
    """Insert ``n`` rows into the attached table in one statement, as the app does: the
    trigger records ``n`` rows in ``listener.inserted_rows`` and nothing else happens until a
    daemon starts (no job exists, nothing is analyzed: a fresh install).

    With ``admitted``, the second line of (a): the rows are also admitted as ``n`` pending
    jobs and ``listener.jobs`` is analyzed before the daemon starts, a queue no new user has.
    """
    await conn.execute(LOAD_SQL, n)
    if not admitted:
        return
    # Before 0019 the trigger made the jobs itself: nothing to admit.
    if await conn.fetchval("SELECT to_regclass('listener.inserted_rows') IS NOT NULL"):
        await conn.execute("SELECT listener.admit_inserted_rows($1)", n)
    await conn.execute("ANALYZE listener.jobs")
    jobs = await conn.fetchval("SELECT count(*) FROM listener.jobs WHERE status = 'pending'")
    if jobs != n:
        raise RuntimeError(f"expected {n} pending jobs after the load, found {jobs}")


async def unfinished_sql(conn: asyncpg.Connection) -> str:
    """``UNFINISHED_SQL``, or its form for a schema before 0019 (no inserted_rows)."""
    if await conn.fetchval("SELECT to_regclass('listener.inserted_rows') IS NOT NULL"):
        return UNFINISHED_SQL
    return UNFINISHED_BEFORE_0019_SQL


async def wait_drained(conn: asyncpg.Connection, timeout_s: float = DRAIN_TIMEOUT_S) -> None:
    """Poll every ``POLL_S`` until no job is pending or processing.

    Raises:
        TimeoutError: jobs are still unfinished after ``timeout_s``.
    """
    async with asyncio.timeout(timeout_s):
        sql = await unfinished_sql(conn)
        while await conn.fetchval(sql):
            await asyncio.sleep(POLL_S)


def daemon_settings(dsn: str, *, concurrency: int, delay_s: float = 0.0) -> Settings:
    """In-process daemon settings; ``.env`` is not read so a developer's file cannot leak in."""
    return Settings(
        _env_file=None,  # type: ignore[call-arg]
        database_url=SecretStr(dsn),
        pipeline="noop",
        noop_delay_s=delay_s,
        concurrency=concurrency,
        health_port=0,
        log_level="WARNING",
    )


# -- (a) and (c): drain a preloaded queue -------------------------------------------------


@dataclass
class Drain:
    """A preloaded queue drained by one in-process daemon; times are Postgres clock seconds."""

    jobs: int
    complete: int
    from_start_s: float
    from_first_claim_s: float

    @property
    def rate(self) -> float:
        return self.complete / self.from_start_s

    @property
    def rate_from_claim(self) -> float:
        return self.complete / self.from_first_claim_s


async def drained(conn: asyncpg.Connection, jobs: int, t0: datetime) -> Drain:
    """The drain of ``jobs`` jobs whose clock started at ``t0`` (Postgres time), read once
    every job finished: to ``max(finished_at)``, and from ``min(started_at)``.

    Raises:
        RuntimeError: fewer than ``jobs`` jobs completed.
    """
    row = await conn.fetchrow(
        "SELECT count(*) FILTER (WHERE status = 'complete') AS complete, "
        "max(finished_at) AS last, min(started_at) AS first FROM listener.jobs"
    )
    if row["complete"] != jobs:
        raise RuntimeError(f"only {row['complete']} of {jobs} jobs completed")
    return Drain(
        jobs=jobs,
        complete=row["complete"],
        from_start_s=(row["last"] - t0).total_seconds(),
        from_first_claim_s=(row["last"] - row["first"]).total_seconds(),
    )


async def drain(
    server: Server,
    label: str,
    jobs: int,
    concurrency: int,
    delay_s: float,
    *,
    admitted: bool = False,
) -> Drain:
    """Load ``jobs`` pending jobs, start a daemon, wait until all are done.

    The clock is Postgres's: ``clock_timestamp()`` just before ``Daemon.start`` (so pool
    creation and the first claim are included) to ``max(finished_at)``, which the 20 ms poll
    cannot blur.
    """
    async with server.database(label) as dsn:
        conn = await asyncpg.connect(dsn)
        try:
            await load_rows(conn, jobs, admitted=admitted)
            daemon = Daemon(
                daemon_settings(dsn, concurrency=concurrency, delay_s=delay_s), health=False
            )
            t0: datetime = await conn.fetchval("SELECT clock_timestamp()")
            async with daemon:
                await wait_drained(conn)
            return await drained(conn, jobs, t0)
        finally:
            await conn.close()


async def scenario_throughput(server: Server, report: Report, sizes: Sizes) -> None:
    d = await drain(server, "a", sizes.throughput_jobs, concurrency=10, delay_s=0.0)
    pre = await drain(
        server, "a2", sizes.throughput_jobs, concurrency=10, delay_s=0.0, admitted=True
    )
    report.details["a"] = asdict(d)
    report.details["a_admitted"] = asdict(pre)
    report.figures += [
        Figure(
            "a",
            "throughput from the app's INSERT, noop, concurrency 10",
            d.rate,
            "jobs/s",
            THROUGHPUT_TARGET,
            note=f"{d.jobs:,} rows inserted into a fresh install, drained in "
            f"{d.from_start_s:.2f} s from Daemon.start() (Postgres clock_timestamp() to "
            "max(finished_at))",
        ),
        Figure("a", "  same, from first claim", d.rate_from_claim, "jobs/s"),
        Figure("a", "  jobs admitted and analyzed beforehand", pre.rate, "jobs/s"),
    ]


async def scenario_overlap(server: Server, report: Report, sizes: Sizes) -> None:
    d = await drain(
        server, "c", sizes.overlap_jobs, concurrency=OVERLAP_CONCURRENCY, delay_s=OVERLAP_DELAY_S
    )
    ideal = OVERLAP_CONCURRENCY / OVERLAP_DELAY_S
    report.details["c"] = asdict(d) | {"ideal_jobs_per_s": ideal}
    report.figures += [
        Figure(
            "c",
            f"overlap, noop {OVERLAP_DELAY_S * 1000:.0f} ms, concurrency {OVERLAP_CONCURRENCY}",
            d.rate,
            "jobs/s",
            OVERLAP_TARGET,
            note=f"ideal {ideal:,.0f} jobs/s; {d.jobs:,} jobs in {d.from_start_s:.2f} s "
            "from Daemon.start()",
        ),
        Figure("c", "  same, from first claim", d.rate_from_claim, "jobs/s"),
    ]


# -- (b) latency ----------------------------------------------------------------------------


class ProbeProvider:
    """Records when each job reaches the provider: ``time.monotonic()`` by source row id.

    ``time.monotonic()`` is CLOCK_MONOTONIC, one clock for every process on Linux, so it can
    be compared with the inserter process's timestamps and no NTP step can skew it.
    """

    name = "probe"
    needs_image = False

    def __init__(self) -> None:
        self.started: dict[str, float] = {}
        self.changed = asyncio.Event()

    async def start(self) -> None:
        """Nothing to acquire."""

    async def close(self) -> None:
        """Nothing to release."""

    def estimate_tokens(self, kind: str, image: ImageInput) -> int:
        """Not token-priced: 0."""
        return 0

    async def run(self, kind: str, image: ImageInput, context: StepContext) -> StepResult | None:
        """Record the moment and nothing else, like the ``noop`` provider."""
        self.started[image.source_id] = time.monotonic()
        self.changed.set()
        return None


def insert_paced(dsn: str, rate: float, duration_s: float) -> dict[str, Any]:
    """Runs in a spawned process: single-row autocommit INSERTs on an absolute schedule.

    Returns ``{"rows": [(id, sent, returned), ...], "lag_p99_ms": ..., "lag_max_ms": ...,
    "elapsed_s": ...}``: monotonic seconds taken just before each INSERT was sent and just
    after its commit returned, and how late the sends were against the schedule.
    """
    return asyncio.run(_insert_paced(dsn, rate, duration_s))


async def _insert_paced(dsn: str, rate: float, duration_s: float) -> dict[str, Any]:
    conn = await asyncpg.connect(dsn)
    try:
        insert = await conn.prepare("INSERT INTO images (url) VALUES ($1) RETURNING id")
        loop = asyncio.get_running_loop()
        count = round(rate * duration_s)
        begin = loop.time() + 0.05
        rows: list[tuple[int, float, float]] = []
        lags: list[float] = []
        for i in range(count):
            due = begin + i / rate
            delay = due - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            lags.append((loop.time() - due) * 1000)
            sent = time.monotonic()
            row_id = await insert.fetchval(f"https://example.invalid/{i}.jpg")
            rows.append((row_id, sent, time.monotonic()))
        return {
            "rows": rows,
            "lag_p99_ms": percentile(lags, 99),
            "lag_max_ms": max(lags),
            "elapsed_s": loop.time() - begin,
        }
    finally:
        await conn.close()


def _ready() -> bool:
    return True


async def scenario_latency(server: Server, report: Report, sizes: Sizes) -> None:
    """Daemon in this process, inserter in a spawned process with its own event loop.

    A shared event loop would put the inserter's sleeps and round trips in the daemon's queue
    (and vice versa), and a thread would share the GIL; a separate process is how an
    application inserts in production.
    """
    probe = ProbeProvider()
    loop = asyncio.get_running_loop()
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        # Spawn the process and import everything before anything is timed.
        await loop.run_in_executor(pool, _ready)
        async with server.database("b") as dsn:
            daemon = Daemon(daemon_settings(dsn, concurrency=10), providers=[probe], health=False)
            async with daemon:
                assert daemon.notifier is not None
                await daemon.notifier.wait_connected()
                result: dict[str, Any] = await loop.run_in_executor(
                    pool, insert_paced, dsn, LATENCY_RATE, sizes.latency_duration_s
                )
                rows: list[tuple[int, float, float]] = result["rows"]
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(10):
                        while len(probe.started) < len(rows):
                            probe.changed.clear()
                            await probe.changed.wait()
    from_commit = [
        (probe.started[str(i)] - ret) * 1000 for i, _, ret in rows if str(i) in probe.started
    ]
    from_send = [
        (probe.started[str(i)] - sent) * 1000 for i, sent, _ in rows if str(i) in probe.started
    ]
    missing = len(rows) - len(from_commit)
    if missing:
        report.errors["b"] = f"{missing} of {len(rows)} rows never reached the provider"
    if not from_commit:
        raise RuntimeError("no row reached the provider")
    achieved = len(rows) / result["elapsed_s"]
    report.details["b"] = {
        "rows": len(rows),
        "missing": missing,
        "achieved_rate": achieved,
        "inserter_lag_p99_ms": result["lag_p99_ms"],
        "inserter_lag_max_ms": result["lag_max_ms"],
        "negative": sum(1 for v in from_commit if v < 0),
        "from_commit_ms": {q: percentile(from_commit, q) for q in (0, 50, 90, 95, 99, 99.9, 100)},
        "from_send_ms": {q: percentile(from_send, q) for q in (0, 50, 90, 95, 99, 99.9, 100)},
    }
    note = (
        f"{len(rows):,} single-row INSERTs at {achieved:.0f}/s from a spawned process "
        f"(send lag behind schedule p99 {result['lag_p99_ms']:.1f} ms, max "
        f"{result['lag_max_ms']:.1f} ms); latency = provider call minus "
        "the moment the INSERT's commit returned to the client"
    )
    report.figures += [
        Figure(
            "b",
            "insert -> provider p50",
            percentile(from_commit, 50),
            "ms",
            LATENCY_P50_TARGET_MS,
            "lower",
            note,
        ),
        Figure("b", "insert -> provider p95", percentile(from_commit, 95), "ms"),
        Figure(
            "b",
            "insert -> provider p99",
            percentile(from_commit, 99),
            "ms",
            LATENCY_P99_TARGET_MS,
            "lower",
        ),
        Figure("b", "insert -> provider max", max(from_commit), "ms"),
        Figure("b", "  from INSERT sent, p50", percentile(from_send, 50), "ms"),
        Figure("b", "  from INSERT sent, p99", percentile(from_send, 99), "ms"),
    ]


# -- (d) trigger cost ---------------------------------------------------------------------


async def _insert_rows(conn: asyncpg.Connection, table: str, n: int) -> float:
    """``n`` single-row autocommit INSERTs into ``table``; returns rows per second."""
    insert = await conn.prepare(f"INSERT INTO {table} (url) VALUES ($1)")
    started = time.perf_counter()
    for i in range(n):
        await insert.fetchval(f"https://example.invalid/{i}.jpg")
    return n / (time.perf_counter() - started)


async def scenario_insert_cost(server: Server, report: Report, sizes: Sizes) -> None:
    """No daemon runs: the cost of the trigger alone (the row's entry in
    ``listener.inserted_rows`` and the NOTIFY; the daemon makes the job later)."""
    rates: dict[str, list[float]] = {"plain": [], "images": []}
    async with server.database("d", plain_table=True) as dsn:
        conn = await asyncpg.connect(dsn)
        try:
            for table in rates:
                await _insert_rows(conn, table, sizes.insert_warmup_rows)
            for round_no in range(sizes.insert_rounds):
                order = ("plain", "images") if round_no % 2 == 0 else ("images", "plain")
                for table in order:
                    rates[table].append(await _insert_rows(conn, table, sizes.insert_rows))
        finally:
            await conn.close()
    plain = statistics.median(rates["plain"])
    attached = statistics.median(rates["images"])
    paired = [a / p * 100 for a, p in zip(rates["images"], rates["plain"], strict=True)]
    report.details["d"] = {
        "rows_per_run": sizes.insert_rows,
        "rounds": sizes.insert_rounds,
        "ratio_per_round_pct": paired,
    } | rates
    note = (
        f"{sizes.insert_rounds} rounds x {sizes.insert_rows:,} autocommit single-row INSERTs "
        "per table, "
        "alternating order; verdict on the median of the per-round ratios (each round's pair "
        "runs back to back, so slow drifts of the disk cancel out); one asyncpg connection, "
        "prepared statement; "
        "no daemon running (nobody LISTENs)"
    )
    report.figures += [
        Figure("d", "single-row INSERT, plain table", plain, "rows/s", note=note),
        Figure("d", "single-row INSERT, attached table", attached, "rows/s"),
        Figure(
            "d",
            "attached / plain, median of rounds",
            statistics.median(paired),
            "%",
            INSERT_RATIO_TARGET * 100,
        ),
        Figure("d", "  ratio of the medians", attached / plain * 100, "%"),
    ]


# -- (e) memory -----------------------------------------------------------------------------


def _vm_hwm_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmHWM for pid {pid}")


async def _reap(proc: subprocess.Popen[bytes], timeout_s: float) -> tuple[int, int]:
    """Wait for ``proc`` with ``os.wait4``; returns (exit code, its own ru_maxrss in KiB)."""
    deadline = time.monotonic() + timeout_s
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            proc.returncode = os.waitstatus_to_exitcode(status)
            return proc.returncode, usage.ru_maxrss
        if time.monotonic() > deadline:
            proc.kill()
        await asyncio.sleep(0.05)


async def scenario_rss(server: Server, report: Report, sizes: Sizes) -> None:
    """``listener run`` in a subprocess drains 100,000 jobs; VmHWM read just before SIGTERM."""
    async with server.database("e") as dsn:
        conn = await asyncpg.connect(dsn)
        try:
            await load_rows(conn, sizes.rss_jobs)
            env = {k: v for k, v in os.environ.items() if not k.startswith("LISTENER_")}
            env |= {
                "DATABASE_URL": dsn,
                "LISTENER_PIPELINE": "noop",
                "LISTENER_HEALTH_PORT": "0",
                "LISTENER_CONCURRENCY": "10",
                "LISTENER_LOG_LEVEL": "WARNING",
            }
            with tempfile.TemporaryDirectory(prefix="listener-bench-") as tmp:
                log_path = Path(tmp) / "daemon.log"
                with log_path.open("wb") as log:
                    # cwd=tmp: no stray .env file is read.
                    proc = subprocess.Popen(
                        [sys.executable, "-m", "listener", "run"],
                        env=env,
                        cwd=tmp,
                        stdin=subprocess.DEVNULL,
                        stdout=log,
                        stderr=subprocess.STDOUT,
                    )
                started = time.monotonic()
                try:
                    async with asyncio.timeout(DRAIN_TIMEOUT_S):
                        sql = await unfinished_sql(conn)
                        while await conn.fetchval(sql):
                            if proc.poll() is not None:
                                raise RuntimeError(
                                    f"the daemon exited with {proc.returncode}:\n"
                                    + log_path.read_text()[-2000:]
                                )
                            await asyncio.sleep(0.1)
                    drained_s = time.monotonic() - started
                    hwm_kb = _vm_hwm_kb(proc.pid)
                    proc.send_signal(signal.SIGTERM)
                    code, maxrss_kb = await _reap(proc, 30)
                except BaseException:
                    if proc.returncode is None:
                        proc.kill()
                        await _reap(proc, 5)
                    raise
                if code != 0:
                    report.errors["e"] = f"daemon exit code {code}: {log_path.read_text()[-500:]}"
            complete = await conn.fetchval(
                "SELECT count(*) FROM listener.jobs WHERE status = 'complete'"
            )
        finally:
            await conn.close()
    if complete != sizes.rss_jobs:
        raise RuntimeError(f"only {complete} of {sizes.rss_jobs} jobs completed")
    report.details["e"] = {
        "vm_hwm_kb": hwm_kb,
        "ru_maxrss_kb": maxrss_kb,
        "drain_s": drained_s,
        "exit_code": code,
    }
    report.figures += [
        Figure(
            "e",
            f"peak RSS, {sizes.rss_jobs:,} jobs",
            hwm_kb / 1024,
            "MB",
            RSS_TARGET_MB,
            "lower",
            note="`python -m listener run` subprocess, concurrency 10, health on port 0; "
            "VmHWM from /proc just before SIGTERM (MB = MiB)",
        ),
        Figure("e", "  ru_maxrss after exit", maxrss_kb / 1024, "MB"),
        Figure("e", "  drain rate (wall clock, 100 ms poll)", sizes.rss_jobs / drained_s, "jobs/s"),
    ]


# -- (f) and (g): backlogs of any size ----------------------------------------------------


@dataclass
class Admissions:
    """What the admission (``listener.admit_entries``) cost, read every
    ``ADMISSION_SAMPLE_S``: ``(monotonic s, total ms, jobs inserted)`` from
    ``pg_stat_user_functions`` and ``pg_stat_user_tables`` (``n_tup_ins`` of
    ``listener.jobs``: in these scenarios every job is made by an admission). A claim admits as
    many rows as it has room for (0021), so the cost is per 1,000 rows, not per call."""

    samples: list[tuple[float, float, int]] = field(default_factory=list)

    def growth(self) -> tuple[float, float, float] | None:
        """(ms per 1,000 rows admitted over the first tenth of the rows, over the last tenth,
        last/first); None with fewer than 3 sampled steps (too coarse to tell the tenths
        apart)."""
        steps = [
            (r1 - r0, t1 - t0)
            for (_, t0, r0), (_, t1, r1) in zip(self.samples, self.samples[1:], strict=False)
            if r1 > r0
        ]
        total = sum(n for n, _ in steps)
        if total < 20 or len(steps) < 3:
            return None
        tenth = total / 10

        def per_thousand(ordered: list[tuple[int, float]]) -> float:
            rows, ms = 0, 0.0
            for n, spent in ordered:
                if rows >= tenth:
                    break
                rows += n
                ms += spent
            return ms / rows * 1000

        first, last = per_thousand(steps), per_thousand(steps[::-1])
        return first, last, last / first


async def sample_admissions(dsn: str, into: Admissions, stop: asyncio.Event) -> None:
    """Append ``(time, total ms of listener.admit_entries, jobs inserted)`` to ``into`` every
    ``ADMISSION_SAMPLE_S`` until ``stop``, then once more. Backends publish their statistics
    at most once a second (functions and tables together), so a sample may lag the truth by
    that much."""
    conn = await asyncpg.connect(dsn)
    try:
        while True:
            row = await conn.fetchrow(
                "SELECT (SELECT coalesce(sum(total_time), 0)::float8 FROM pg_stat_user_functions "
                "        WHERE schemaname = 'listener' AND funcname = 'admit_entries') AS ms, "
                "       (SELECT coalesce(sum(n_tup_ins), 0)::bigint FROM pg_stat_user_tables "
                "        WHERE schemaname = 'listener' AND relname = 'jobs') AS rows"
            )
            into.samples.append((time.monotonic(), row["ms"], row["rows"]))
            if stop.is_set():
                return
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), ADMISSION_SAMPLE_S)
    finally:
        await conn.close()


def insert_stream(dsn: str, rows: int, batch: int) -> dict[str, float]:
    """Runs in a spawned process: ``rows`` rows as ``batch``-row INSERT statements, each its
    own transaction, one after the other as fast as the server takes them. Returns
    ``{"elapsed_s", "rows_per_s"}``."""
    return asyncio.run(_insert_stream(dsn, rows, batch))


async def _insert_stream(dsn: str, rows: int, batch: int) -> dict[str, float]:
    conn = await asyncpg.connect(dsn)
    try:
        insert = await conn.prepare(
            "INSERT INTO images (url) SELECT 'https://example.invalid/' || g || '.jpg' "
            "FROM generate_series($1::int, $2::int) AS g"
        )
        began = time.monotonic()
        for first in range(1, rows + 1, batch):
            await insert.fetch(first, min(first + batch - 1, rows))
        elapsed = time.monotonic() - began
        return {"elapsed_s": elapsed, "rows_per_s": rows / elapsed}
    finally:
        await conn.close()


async def backlog_drain(
    server: Server, label: str, rows: int, *, stream: bool
) -> tuple[Drain, Admissions, dict[str, float]]:
    """``rows`` rows inserted into a fresh install, before the daemon starts (``stream``
    False: one statement) or while it runs (``stream`` True: ``insert_stream`` in a spawned
    process, started with the daemon); one daemon, noop, concurrency 10, drained. Function
    statistics are on for the database (``track_functions = 'pl'``, which needs a superuser)
    so the admission's cost can be followed."""
    loop = asyncio.get_running_loop()
    admissions = Admissions()
    inserted: dict[str, float] = {}
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        await loop.run_in_executor(pool, _ready)
        async with server.database(label) as dsn:
            await server.admin(
                f"ALTER DATABASE \"{urlsplit(dsn).path.lstrip('/')}\" SET track_functions = 'pl'"
            )
            conn = await asyncpg.connect(dsn)
            try:
                if not stream:
                    await load_rows(conn, rows)
                stop = asyncio.Event()
                sampler = asyncio.create_task(sample_admissions(dsn, admissions, stop))
                daemon = Daemon(daemon_settings(dsn, concurrency=10), health=False)
                t0: datetime = await conn.fetchval("SELECT clock_timestamp()")
                async with daemon:
                    if stream:
                        inserted = await loop.run_in_executor(
                            pool, insert_stream, dsn, rows, STREAM_BATCH
                        )
                    await wait_drained(conn, timeout_s=max(DRAIN_TIMEOUT_S, rows / 2_000))
                stop.set()
                await sampler
                return await drained(conn, rows, t0), admissions, inserted
            finally:
                await conn.close()


def backlog_figures(key: str, what: str, d: Drain, admissions: Admissions) -> list[Figure]:
    """The drain rate and the admission's growth of one backlog scenario."""
    growth = admissions.growth()
    figures = [
        Figure(
            key,
            f"{what}: drain",
            d.rate,
            "jobs/s",
            BACKLOG_TARGET,
            note=f"{d.jobs:,} rows drained in {d.from_start_s:.1f} s from Daemon.start()",
        )
    ]
    if growth is None:
        # Too few admissions sampled to tell a first tenth from a last (smoke sizes).
        return figures
    first, last, ratio = growth
    figures += [
        Figure(
            key,
            f"{what}: admitting 1,000 rows, last/first tenth",
            ratio,
            "x",
            ADMISSION_GROWTH_TARGET,
            "lower",
            note=f"listener.admit_entries: {first:.1f} ms per 1,000 rows over the first tenth "
            f"of the rows admitted, {last:.1f} ms over the last (pg_stat_user_functions and "
            f"n_tup_ins of listener.jobs every {ADMISSION_SAMPLE_S} s)",
        ),
    ]
    return figures


async def scenario_backlog(server: Server, report: Report, sizes: Sizes) -> None:
    d, admissions, _ = await backlog_drain(server, "f", sizes.backlog_rows, stream=False)
    report.details["f"] = asdict(d) | {"admission_growth": admissions.growth()}
    report.figures += backlog_figures(
        "f", f"{sizes.backlog_rows:,} rows before start", d, admissions
    )


async def scenario_stream(server: Server, report: Report, sizes: Sizes) -> None:
    d, admissions, inserted = await backlog_drain(server, "g", sizes.stream_rows, stream=True)
    report.details["g"] = asdict(d) | {
        "admission_growth": admissions.growth(),
        "inserter": inserted,
    }
    figures = backlog_figures("g", f"{sizes.stream_rows:,} rows while running", d, admissions)
    figures[0].note += (
        f"; inserted in {inserted.get('elapsed_s', 0):.1f} s "
        f"({inserted.get('rows_per_s', 0):,.0f} rows/s, {STREAM_BATCH}-row INSERTs)"
    )
    report.figures += figures


# -- machine and output -------------------------------------------------------------------


async def describe_machine(server: Server) -> dict[str, Any]:
    conn = await asyncpg.connect(server.admin_dsn)
    try:
        pg = {
            name: await conn.fetchval(f"SHOW {name}")
            for name in (
                "server_version",
                "fsync",
                "synchronous_commit",
                "full_page_writes",
                "wal_sync_method",
                "shared_buffers",
            )
        }
    finally:
        await conn.close()
    cpu = "?"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return {
        "nproc": len(os.sched_getaffinity(0)),
        "cpu": cpu,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "asyncpg": asyncpg.__version__,
        "postgres": pg,
        "listener_env": sorted(k for k in os.environ if k.startswith("LISTENER_")),
    }


def print_figures(report: Report, *, name_width: int, target_width: int) -> None:
    """The figures as a table against their targets, then their notes; shared with
    bench_scale.py."""
    header = (
        f"{'':2} {'figure':{name_width}} {'measured':>12} {'':6} "
        f"{'target':>{target_width}}  verdict"
    )
    print(header)
    print("-" * len(header))
    for f in report.figures:
        value = "-" if f.value is None else f"{f.value:,.{1 if abs(f.value) < 100 else 0}f}"
        if f.target is None:
            target = ""
        else:
            digits = 0 if f.target >= 100 else 1
            target = f"{'>=' if f.better == 'higher' else '<='} {f.target:,.{digits}f}"
        print(
            f"{f.scenario:2} {f.name:{name_width}} {value:>12} {f.unit:6} "
            f"{target:>{target_width}}  {f.verdict}"
        )
    print()
    for f in report.figures:
        if f.note:
            print(f"({f.scenario}) {f.note}")


def print_load_and_errors(report: Report, ncpu: Any, label: str) -> None:
    """The CPU share of each scenario (or phase), a warning when the machine was busy, and
    the errors; shared with bench_scale.py."""
    for key, load in report.load.items():
        print(
            f"({key}) CPU over {load['seconds']:.1f} s, % of all {ncpu} CPUs: "
            f"benchmark+listener+Postgres {load['ours_pct']:.0f}%, other processes "
            f"{load['other_pct']:.0f}% (just before: {load['other_pct_before']:.0f}%), "
            f"steal {load['steal_pct']:.0f}%"
        )
    busy = [k for k, v in report.load.items() if v["other_pct"] >= QUIET_OTHER_PCT]
    if busy:
        print(
            f"WARNING: other processes used >= {QUIET_OTHER_PCT:.0f}% of the CPUs during "
            f"{label}(s) {', '.join(busy)}: their figures are low; run again on a quiet machine"
        )
    for key, error in report.errors.items():
        print(f"({key}) ERROR: {error}")


def print_report(report: Report) -> None:
    m = report.machine
    pg = m.get("postgres", {})
    print()
    print(f"machine: nproc={m.get('nproc')} cpu={m.get('cpu')} python={m.get('python')}")
    print(
        f"postgres {pg.get('server_version')}: fsync={pg.get('fsync')} "
        f"synchronous_commit={pg.get('synchronous_commit')} "
        f"full_page_writes={pg.get('full_page_writes')} wal_sync_method="
        f"{pg.get('wal_sync_method')} shared_buffers={pg.get('shared_buffers')}"
    )
    fs = m.get("fdatasync")
    if fs:
        print(
            f"fdatasync of 8 KiB on {m.get('fdatasync_dir')}: p50 {fs['p50_ms']:.2f} ms, "
            f"p99 {fs['p99_ms']:.2f} ms, max {fs['max_ms']:.1f} ms ({fs['samples']} samples)"
        )
    print()
    print_figures(report, name_width=42, target_width=10)
    if "b" in report.load:
        print(
            "(b) the inserter runs in a separate (spawned) process with its own event loop "
            "and connection, so it neither queues behind the daemon's loop nor shares its GIL"
        )
    print()
    print_load_and_errors(report, m.get("nproc"), "scenario")
    print(f"\ntotal time {report.elapsed_s:.1f} s")


SCENARIOS: dict[str, Callable[[Server, Report, Sizes], Awaitable[None]]] = {
    "a": scenario_throughput,
    "b": scenario_latency,
    "c": scenario_overlap,
    "d": scenario_insert_cost,
    "e": scenario_rss,
    "f": scenario_backlog,
    "g": scenario_stream,
}
DEFAULT_SCENARIOS = "a,b,c,d,e"


async def run(
    server: Server,
    only: list[str],
    report: Report,
    meter: CpuMeter,
    quiet_wait_s: float,
    disk: Path,
    sizes: Sizes,
) -> None:
    report.machine = await describe_machine(server)
    report.machine["fdatasync_dir"] = str(disk)
    report.machine["fdatasync"] = await asyncio.to_thread(
        fdatasync_probe, disk, sizes.fdatasync_probe_s
    )
    report.details["sizes"] = asdict(sizes)
    for key in only:
        quiet = await meter.wait_quiet(QUIET_OTHER_PCT, quiet_wait_s)
        print(f"scenario {key} ...", file=sys.stderr, flush=True)
        began = time.monotonic()
        before = meter.snapshot()
        try:
            await SCENARIOS[key](server, report, sizes)
        except Exception as error:
            report.errors[key] = f"{type(error).__name__}: {error}"
            report.figures.append(Figure(key, SCENARIOS[key].__name__, None, ""))
        report.load[key] = meter.usage(before) | {
            "other_pct_before": quiet["other_pct"],
            "seconds": time.monotonic() - began,
        }
        print(f"scenario {key}: {time.monotonic() - began:.1f} s", file=sys.stderr, flush=True)


def add_server_options(parser: argparse.ArgumentParser, unit: str) -> None:
    """``--use-database-url`` and ``--quiet-wait`` (seconds to wait, before each ``unit``,
    for the other processes to quiet down), as every benchmark script here takes them."""
    parser.add_argument(
        "--use-database-url",
        action="store_true",
        help="use the server of DATABASE_URL (a role that may CREATE DATABASE) instead of a "
        "temporary cluster",
    )
    parser.add_argument(
        "--quiet-wait",
        type=float,
        default=QUIET_WAIT_S,
        metavar="SECONDS",
        help=f"before each {unit}, wait up to this long for other processes to use under "
        f"{QUIET_OTHER_PCT:.0f}%% of the CPUs (default {QUIET_WAIT_S:.0f})",
    )


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--only",
        default=DEFAULT_SCENARIOS,
        help=f"comma-separated scenarios of {','.join(SCENARIOS)} (default {DEFAULT_SCENARIOS})",
    )
    parser.add_argument("--json", type=Path, help="also write every figure to this file")
    add_server_options(parser, "scenario")
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="tiny sizes (a few hundred jobs, about a second per scenario): checks that every "
        "scenario runs and reports; its figures mean nothing",
    )
    args = parser.parse_args(argv)
    args.sizes = Sizes.smoke() if args.smoke else Sizes()
    args.only = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = [s for s in args.only if s not in SCENARIOS]
    if unknown:
        parser.error(f"unknown scenario(s): {', '.join(unknown)}")
    return args


def postmaster_pid(cluster: TemporaryCluster) -> int:
    """The pid of ``cluster``'s postmaster (its CPU is counted with the benchmark's)."""
    return int((cluster.data_dir / "postmaster.pid").read_text().split("\n", 1)[0])


@contextlib.contextmanager
def bench_server(use_database_url: bool) -> Iterator[tuple[str, TemporaryCluster | None]]:
    """The server every benchmark script runs on: ``(admin DSN, cluster)``.

    With ``use_database_url``, the server of ``DATABASE_URL`` (cluster ``None``); otherwise a
    throwaway cluster with default durability, stopped on the way out.

    Raises:
        SystemExit: 2, ``use_database_url`` without ``DATABASE_URL``.
    """
    if use_database_url:
        admin_dsn = os.environ.get("DATABASE_URL")
        if not admin_dsn:
            print("--use-database-url given but DATABASE_URL is not set", file=sys.stderr)
            raise SystemExit(2)
        yield admin_dsn, None
        return
    cluster = TemporaryCluster(fast=False)
    admin_dsn = cluster.start()
    try:
        yield admin_dsn, cluster
    finally:
        with contextlib.suppress(Exception):
            cluster.stop()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    configure_logging("WARNING")
    report = Report()
    started = time.monotonic()
    with bench_server(args.use_database_url) as (admin_dsn, cluster):
        roots = [os.getpid()] + ([postmaster_pid(cluster)] if cluster else [])
        # The cluster's own directory is on the data directory's filesystem.
        disk = cluster.directory if cluster else Path(tempfile.gettempdir())
        meter = CpuMeter(roots)
        asyncio.run(
            run(Server(admin_dsn), args.only, report, meter, args.quiet_wait, disk, args.sizes)
        )
    report.elapsed_s = time.monotonic() - started
    print_report(report)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report.as_json(), indent=2, default=str) + "\n")
    return 1 if report.errors else 0


if __name__ == "__main__":
    sys.exit(main())
