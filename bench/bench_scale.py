"""Scale benchmark: backfill a 1,000,000-row table, then drain the million jobs.

Usage::

    python bench/bench_scale.py [--rows N] [--json out.json] [--drain-timeout S]
    python bench/bench_scale.py --chunk-sizes 1000,5000,20000   # enqueue only, per chunk size

On a throwaway ``TemporaryCluster`` with default durability (``fsync``, ``synchronous_commit``
and ``full_page_writes`` on), a table ``images(id, url, owner_id)`` is filled with ``--rows``
rows (one ``INSERT ... SELECT generate_series``, owners spread over 1,000 values) and only
then attached, so none of its rows has a job. Then:

1. ``python -m listener backfill public.images --no-wait`` runs as a subprocess: its wall time
   and peak RSS (``VmHWM`` polled every 50 ms, ``ru_maxrss`` after exit); exactly ``--rows``
   jobs must exist afterwards, and a second run must enqueue none. Targets (2-core machine):
   under 60 s and under 200 MB.
2. ``python -m listener run`` (noop pipeline, concurrency 50, health on port 0) drains them;
   a separate connection counts complete jobs every second. Drain time, jobs/s, and peak RSS
   (``VmHWM`` read just before SIGTERM). ``--drain-timeout`` bounds it; partial progress is
   reported when it runs out.

Helpers (CPU meter, machine description, fsync probe, result types) come from
``bench_queue.py`` beside this file.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import resource
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import asyncpg

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_queue import (
    QUIET_OTHER_PCT,
    CpuMeter,
    Figure,
    Report,
    describe_machine,
    dsn_for,
    fdatasync_probe,
    percentile,
    print_figures,
    print_load_and_errors,
)

from listener.db.migrate import migrate
from listener.ops.logs import configure_logging
from listener.testing.cluster import TemporaryCluster

ROWS = 1_000_000
OWNERS = 1_000
ENQUEUE_TARGET_S = 60.0
ENQUEUE_RSS_TARGET_MB = 200.0
# The daemon's memory budget, as in bench_queue.py (e).
DAEMON_RSS_TARGET_MB = 150.0
CONCURRENCY = 50
HWM_POLL_S = 0.050
COUNT_POLL_S = 1.0
DRAIN_TIMEOUT_S = 420.0
BACKFILL_TIMEOUT_S = 600.0
QUIET_WAIT_S = 10.0
CLK_TCK = os.sysconf("SC_CLK_TCK")
RU_MAXRSS_NOTE = (
    "ru_maxrss is at least the benchmark's own RSS when it spawned the child ({mb:.0f} MB): "
    "subprocess forks with vfork and Linux keeps the pre-exec high-water mark, so VmHWM is "
    "the figure; ru_maxrss only catches a peak in the last 50 ms"
)

TABLE_DDL = (
    "CREATE TABLE images (id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY, url text, "
    "owner_id text)"
)
LOAD_SQL = (
    "INSERT INTO images (url, owner_id) "
    "SELECT 'https://example.invalid/' || g || '.jpg', 'owner-' || (g % $2) "
    "FROM generate_series(1, $1) AS g"
)
ATTACH_SQL = "SELECT listener.attach('public.images', 'id', 'url', 'owner_id')"
COUNTS_SQL = (
    "SELECT count(*) FILTER (WHERE status = 'complete') AS complete, "
    "count(*) FILTER (WHERE status IN ('pending', 'processing')) AS unfinished, "
    "count(*) FILTER (WHERE status = 'processing') AS processing, "
    "count(*) FILTER (WHERE status = 'failed') AS failed FROM listener.jobs"
)
# The longest-running statement of the daemon's connections (the benchmark's own excluded):
# a completion or claim that takes seconds shows up here.
LONGEST_SQL = (
    "SELECT extract(epoch FROM clock_timestamp() - query_start) AS age, "
    "left(regexp_replace(query, '\\s+', ' ', 'g'), 70) AS query "
    "FROM pg_stat_activity WHERE datname = current_database() AND pid <> pg_backend_pid() "
    "AND backend_type = 'client backend' AND state = 'active' ORDER BY query_start LIMIT 1"
)
ENQUEUED_RE = re.compile(r"enqueued (\d+) jobs \((\d+) rows scanned, ([\d.]+)s\)")
# log_min_duration_statement = 0 logs "<time> [pid] LOG:  duration: 12.345 ms  execute <name>:
# <statement>", the statement over as many lines as it has (its leading comment included).
LOG_RECORD_RE = re.compile(r"^\d{4}-\d\d-\d\d ", re.MULTILINE)
DURATION_RE = re.compile(r"duration: ([\d.]+) ms\s+execute ")


# -- processes ----------------------------------------------------------------------------


def _status_kb(pid: int, key: str) -> int | None:
    """``key`` (``VmHWM``, ``VmRSS``) from /proc/<pid>/status in KiB; None once it is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except (OSError, ValueError):
        return None
    return None  # a zombie has no Vm* lines


def _cpu_s(pid: int) -> float:
    """User + system CPU seconds of a live process (itself, not its children)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def _pg_cpu_s(meter: CpuMeter) -> float:
    """CPU seconds used so far by the postmaster's tree (the meter's roots)."""
    return meter.snapshot()[3] / CLK_TCK


def _child_env(dsn: str, extra: dict[str, str]) -> dict[str, str]:
    """The environment for a ``listener`` subprocess: no inherited ``LISTENER_*`` variable."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("LISTENER_")}
    return env | {"DATABASE_URL": dsn, "LISTENER_LOG_LEVEL": "WARNING"} | extra


@dataclass
class Exited:
    """A reaped subprocess: exit code, wall time, peak RSS by two measures, CPU, output."""

    code: int
    wall_s: float
    hwm_kb: int | None
    maxrss_kb: int
    cpu_s: float
    output: str
    parent_rss_kb: int | None


async def run_to_exit(argv: list[str], env: dict[str, str], cwd: str, timeout_s: float) -> Exited:
    """Run ``argv`` to completion, polling its VmHWM every 50 ms; reap it with ``os.wait4``.

    The last poll can come up to 50 ms before the exit; ``ru_maxrss`` (the kernel's own
    high-water mark, from ``wait4``) covers that window.
    """
    out_path = Path(cwd) / "out.log"
    parent_rss = _status_kb(os.getpid(), "VmRSS")
    with out_path.open("wb") as out:
        started = time.perf_counter()
        # cwd: a temporary directory, so no stray .env file is read.
        proc = subprocess.Popen(
            argv, env=env, cwd=cwd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT
        )
    hwm: int | None = None
    deadline = time.monotonic() + timeout_s
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            wall = time.perf_counter() - started
            proc.returncode = os.waitstatus_to_exitcode(status)
            break
        sample = _status_kb(proc.pid, "VmHWM")
        if sample is not None:
            hwm = max(hwm or 0, sample)
        if time.monotonic() > deadline:
            proc.kill()
        await asyncio.sleep(HWM_POLL_S)
    return Exited(
        code=proc.returncode,
        wall_s=wall,
        hwm_kb=hwm,
        maxrss_kb=usage.ru_maxrss,
        cpu_s=usage.ru_utime + usage.ru_stime,
        output=out_path.read_text(errors="replace"),
        parent_rss_kb=parent_rss,
    )


async def reap(proc: subprocess.Popen[bytes], timeout_s: float) -> tuple[int, int]:
    """Wait for ``proc`` (killing it after ``timeout_s``); returns (exit code, ru_maxrss KiB)."""
    deadline = time.monotonic() + timeout_s
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            proc.returncode = os.waitstatus_to_exitcode(status)
            return proc.returncode, usage.ru_maxrss
        if time.monotonic() > deadline:
            proc.kill()
        await asyncio.sleep(0.05)


# -- the database ---------------------------------------------------------------------------


async def create_database(admin_dsn: str, rows: int) -> tuple[str, dict[str, float]]:
    """A fresh database with ``rows`` rows in ``images``, attached after the load.

    VACUUM ANALYZE stands for the autovacuum a table that old would have had (visibility map,
    hint bits), and a CHECKPOINT keeps the load's dirty pages out of the backfill's figures.
    """
    admin = await asyncpg.connect(admin_dsn)
    try:
        await admin.execute("DROP DATABASE IF EXISTS bench_scale WITH (FORCE)")
        await admin.execute("CREATE DATABASE bench_scale")
    finally:
        await admin.close()
    dsn = dsn_for(admin_dsn, "bench_scale")
    conn = await asyncpg.connect(dsn)
    timings: dict[str, float] = {}
    try:
        await migrate(conn)
        await conn.execute(TABLE_DDL)
        t = time.perf_counter()
        await conn.execute(LOAD_SQL, rows, OWNERS)
        timings["load_s"] = time.perf_counter() - t
        t = time.perf_counter()
        await conn.execute("VACUUM (ANALYZE) images")
        timings["vacuum_s"] = time.perf_counter() - t
        await conn.execute(ATTACH_SQL)
        jobs = await conn.fetchval("SELECT count(*) FROM listener.jobs")
        if jobs:
            raise RuntimeError(f"{jobs} jobs exist before the backfill; expected none")
        await conn.execute("CHECKPOINT")
    finally:
        await conn.close()
    return dsn, timings


async def apply_settings(dsn: str, settings: list[str]) -> None:
    """``ALTER DATABASE bench_scale SET name = value`` for each ``name=value``."""
    if not settings:
        return
    conn = await asyncpg.connect(dsn)
    try:
        for item in settings:
            name, _, value = item.partition("=")
            if not re.fullmatch(r"[a-z_.]+", name.strip()):
                raise ValueError(f"--db-set {item!r}: expected NAME=VALUE")
            await conn.execute(
                f"ALTER DATABASE bench_scale SET {name.strip()} = {quote_literal(value.strip())}"
            )
    finally:
        await conn.close()


def quote_literal(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


async def job_count(conn: asyncpg.Connection) -> int:
    return int(await conn.fetchval("SELECT count(*) FROM listener.jobs"))


async def table_stats(conn: asyncpg.Connection) -> dict[str, Any]:
    """Sizes of listener.jobs and its indexes, dead tuples, autovacuum activity."""
    row = await conn.fetchrow(
        "SELECT n_live_tup, n_dead_tup, vacuum_count, autovacuum_count, analyze_count, "
        "autoanalyze_count, pg_relation_size('listener.jobs') AS heap_bytes, "
        "pg_indexes_size('listener.jobs') AS index_bytes "
        "FROM pg_stat_user_tables WHERE relid = 'listener.jobs'::regclass"
    )
    indexes = await conn.fetch(
        "SELECT indexrelid::regclass::text AS name, pg_relation_size(indexrelid) AS bytes "
        "FROM pg_index WHERE indrelid = 'listener.jobs'::regclass ORDER BY 1"
    )
    return dict(row) | {"indexes_bytes": {r["name"]: r["bytes"] for r in indexes}}


# -- server log: statement time per chunk ---------------------------------------------------


class StatementLog:
    """Durations of ``backfill_chunk`` statements, from the server log.

    ``log_min_duration_statement = 0`` is set on the benchmark's database only while a
    backfill runs (new sessions pick it up; the backfill opens its own), and the log is read
    from the offset it had before.
    """

    def __init__(self, log_path: Path, dsn: str) -> None:
        self.log_path = log_path
        self.dsn = dsn
        self.offset = 0

    async def _set(self, value: str | None) -> None:
        conn = await asyncpg.connect(self.dsn)
        try:
            if value is None:
                await conn.execute("ALTER DATABASE bench_scale RESET log_min_duration_statement")
            else:
                await conn.execute(
                    f"ALTER DATABASE bench_scale SET log_min_duration_statement = {value}"
                )
        finally:
            await conn.close()

    async def start(self) -> None:
        await self._set("0")
        self.offset = self.log_path.stat().st_size

    async def stop(self) -> list[float]:
        """Stop logging; returns the chunk statements' durations in ms, in log order."""
        await self._set(None)
        with self.log_path.open("rb") as log:
            log.seek(self.offset)
            text = log.read().decode(errors="replace")
        durations: list[float] = []
        for record in LOG_RECORD_RE.split(text):
            m = DURATION_RE.search(record)
            if m and "listener.backfill_chunk(" in record:
                durations.append(float(m.group(1)))
        return durations


# -- (1) backfill ---------------------------------------------------------------------------


@dataclass
class Backfill:
    """One ``listener backfill`` subprocess and what it did."""

    chunk_size: int | None
    wall_s: float
    hwm_kb: int | None
    maxrss_kb: int
    cpu_s: float
    postgres_cpu_s: float
    jobs_after: int
    cli_enqueued: int | None
    cli_scanned: int | None
    cli_seconds: float | None
    parent_rss_kb: int | None
    wal_bytes: int
    chunk_ms: list[float] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        ms = self.chunk_ms
        stats = (
            {
                "chunks": len(ms),
                "chunk_ms_p50": percentile(ms, 50),
                "chunk_ms_p95": percentile(ms, 95),
                "chunk_ms_max": max(ms),
                "chunk_ms_sum": sum(ms),
                "chunk_ms_first10_median": percentile(ms[:10], 50),
                "chunk_ms_last10_median": percentile(ms[-10:], 50),
            }
            if ms
            else {"chunks": 0}
        )
        return {
            "chunk_size": self.chunk_size,
            "wall_s": self.wall_s,
            "vm_hwm_kb": self.hwm_kb,
            "ru_maxrss_kb": self.maxrss_kb,
            "cpu_s": self.cpu_s,
            "postgres_cpu_s": self.postgres_cpu_s,
            "jobs_after": self.jobs_after,
            "cli_enqueued": self.cli_enqueued,
            "cli_scanned": self.cli_scanned,
            "cli_seconds": self.cli_seconds,
            "benchmark_rss_at_spawn_kb": self.parent_rss_kb,
            "wal_bytes": self.wal_bytes,
        } | stats


async def backfill_once(
    dsn: str, conn: asyncpg.Connection, log: StatementLog, pg_meter: CpuMeter, chunk: int | None
) -> Backfill:
    """``python -m listener backfill public.images --no-wait`` in a subprocess."""
    extra = {} if chunk is None else {"LISTENER_BACKFILL_CHUNK_SIZE": str(chunk)}
    await log.start()
    wal_before = await conn.fetchval("SELECT pg_current_wal_lsn()")
    pg_before = _pg_cpu_s(pg_meter)
    with tempfile.TemporaryDirectory(prefix="listener-bench-") as tmp:
        exited = await run_to_exit(
            [sys.executable, "-m", "listener", "backfill", "public.images", "--no-wait"],
            _child_env(dsn, extra),
            tmp,
            BACKFILL_TIMEOUT_S,
        )
    pg_cpu = _pg_cpu_s(pg_meter) - pg_before
    wal_bytes = await conn.fetchval(
        "SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), $1::pg_lsn)::bigint", wal_before
    )
    chunk_ms = await log.stop()
    if exited.code != 0:
        raise RuntimeError(f"listener backfill exited with {exited.code}:\n{exited.output[-2000:]}")
    m = ENQUEUED_RE.search(exited.output)
    return Backfill(
        chunk_size=chunk,
        wall_s=exited.wall_s,
        hwm_kb=exited.hwm_kb,
        maxrss_kb=exited.maxrss_kb,
        cpu_s=exited.cpu_s,
        postgres_cpu_s=pg_cpu,
        jobs_after=await job_count(conn),
        cli_enqueued=int(m.group(1)) if m else None,
        cli_scanned=int(m.group(2)) if m else None,
        cli_seconds=float(m.group(3)) if m else None,
        parent_rss_kb=exited.parent_rss_kb,
        wal_bytes=wal_bytes,
        chunk_ms=chunk_ms,
    )


def _mb(kb: int | None) -> float | None:
    return None if kb is None else kb / 1024


async def phase_backfill(
    dsn: str, rows: int, chunk: int | None, log: StatementLog, pg_meter: CpuMeter, report: Report
) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        first = await backfill_once(dsn, conn, log, pg_meter, chunk)
        second = await backfill_once(dsn, conn, log, pg_meter, chunk)
    finally:
        await conn.close()
    report.details["1"] = {"first": first.summary(), "second": second.summary()}
    size = "listener default" if chunk is None else f"{chunk:,}"
    f = first.summary()
    chunk_note = (
        f"{f['chunks']} backfill_chunk statements (server log, log_min_duration_statement=0): "
        f"p50 {f['chunk_ms_p50']:.0f} ms, p95 {f['chunk_ms_p95']:.0f} ms, max "
        f"{f['chunk_ms_max']:.0f} ms, sum {f['chunk_ms_sum'] / 1000:.1f} s; median of the "
        f"first 10 {f['chunk_ms_first10_median']:.0f} ms, of the last 10 "
        f"{f['chunk_ms_last10_median']:.0f} ms"
        if f["chunks"]
        else "no backfill_chunk statement found in the server log"
    )
    report.figures += [
        Figure(
            "1",
            f"backfill {rows:,} rows, wall time",
            first.wall_s,
            "s",
            ENQUEUE_TARGET_S,
            "lower",
            note="`python -m listener backfill public.images --no-wait` subprocess, chunk size "
            f"{size}; wall time from Popen to exit (interpreter start and imports included)",
        ),
        Figure("1", "  backfill's own report", first.cli_seconds, "s"),
        Figure("1", "  enqueue rate (wall)", rows / first.wall_s, "jobs/s"),
        Figure(
            "1",
            "backfill peak RSS (VmHWM, 50 ms poll)",
            _mb(first.hwm_kb),
            "MB",
            ENQUEUE_RSS_TARGET_MB,
            "lower",
            note=chunk_note,
        ),
        Figure(
            "1",
            "  ru_maxrss (wait4)",
            first.maxrss_kb / 1024,
            "MB",
            note=RU_MAXRSS_NOTE.format(mb=(first.parent_rss_kb or 0) / 1024),
        ),
        Figure("1", "  CPU: backfill process", first.cpu_s, "s"),
        Figure("1", "  CPU: Postgres", first.postgres_cpu_s, "s"),
        Figure("1", "  WAL written", first.wal_bytes / 2**20, "MB"),
        Figure("1", "jobs after the backfill", first.jobs_after, "jobs", rows, "higher"),
        Figure(
            "1",
            "jobs enqueued by a second run",
            second.jobs_after - first.jobs_after,
            "jobs",
            0,
            "lower",
        ),
        Figure("1", "  second run, wall time", second.wall_s, "s"),
        Figure("1", "  second run, peak RSS (VmHWM)", _mb(second.hwm_kb), "MB"),
    ]
    maxrss_children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    report.details["1"]["rusage_children_maxrss_kb"] = maxrss_children
    report.figures.append(
        Figure(
            "1",
            "  getrusage(RUSAGE_CHILDREN) ru_maxrss",
            maxrss_children / 1024,
            "MB",
            note="RUSAGE_CHILDREN is the largest ru_maxrss of every child reaped so far "
            "(initdb, pg_ctl, both backfills)",
        )
    )
    if first.jobs_after != rows:
        report.errors["1"] = f"{first.jobs_after} jobs after the backfill, expected {rows}"
    elif second.jobs_after != first.jobs_after or second.cli_enqueued not in (0, None):
        report.errors["1"] = (
            f"the second run enqueued {second.jobs_after - first.jobs_after} "
            f"(it reported {second.cli_enqueued})"
        )


async def phase_chunk_sweep(
    dsn: str, rows: int, sizes: list[int], log: StatementLog, pg_meter: CpuMeter, report: Report
) -> None:
    """Enqueue only, once per chunk size, from an empty queue each time."""
    conn = await asyncpg.connect(dsn)
    sweep: list[dict[str, Any]] = []
    try:
        for size in sizes:
            await conn.execute("TRUNCATE listener.jobs CASCADE")
            await conn.execute("CHECKPOINT")
            print(f"backfill, chunk size {size:,} ...", file=sys.stderr, flush=True)
            b = await backfill_once(dsn, conn, log, pg_meter, size)
            if b.jobs_after != rows:
                report.errors[f"1/{size}"] = f"{b.jobs_after} jobs, expected {rows}"
            sweep.append(b.summary())
            s = b.summary()
            report.figures += [
                Figure(
                    "1",
                    f"chunk {size:,}: wall time",
                    b.wall_s,
                    "s",
                    ENQUEUE_TARGET_S,
                    "lower",
                ),
                Figure("1", f"  chunk {size:,}: peak RSS", _mb(b.hwm_kb), "MB"),
                Figure("1", f"  chunk {size:,}: statement p50", s.get("chunk_ms_p50"), "ms"),
                Figure(
                    "1",
                    f"  chunk {size:,}: statement time per 1k rows",
                    s["chunk_ms_sum"] / (rows / 1000) if s["chunks"] else None,
                    "ms",
                ),
                Figure("1", f"  chunk {size:,}: Postgres CPU", b.postgres_cpu_s, "s"),
                Figure("1", f"  chunk {size:,}: WAL written", b.wal_bytes / 2**20, "MB"),
            ]
    finally:
        await conn.close()
    report.details["sweep"] = sweep


# -- (2) drain ------------------------------------------------------------------------------


async def phase_drain(
    dsn: str, rows: int, timeout_s: float, pg_meter: CpuMeter, report: Report
) -> None:
    """``listener run`` drains every job; counts polled every second from another connection.

    The drain time is wall clock, from Popen to the poll that finds nothing pending or
    processing (1 s resolution). ``max(finished_at)`` is printed too, but it is the completing
    transaction's ``now()``, i.e. its start: when completions take seconds to commit, it ends
    the drain early, so it is not the figure.
    """
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute("ANALYZE listener.jobs")
        await conn.execute("CHECKPOINT")
        stats_before = await table_stats(conn)
        env = _child_env(
            dsn,
            {
                "LISTENER_PIPELINE": "noop",
                "LISTENER_CONCURRENCY": str(CONCURRENCY),
                "LISTENER_HEALTH_PORT": "0",
            },
        )
        samples: list[dict[str, Any]] = []
        poll_ms: list[float] = []
        timed_out = False
        with tempfile.TemporaryDirectory(prefix="listener-bench-") as tmp:
            log_path = Path(tmp) / "daemon.log"
            t0: datetime = await conn.fetchval("SELECT clock_timestamp()")
            pg_before = _pg_cpu_s(pg_meter)
            parent_rss = _status_kb(os.getpid(), "VmRSS")
            with log_path.open("wb") as out:
                started = time.monotonic()
                proc = subprocess.Popen(
                    [sys.executable, "-m", "listener", "run"],
                    env=env,
                    cwd=tmp,
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                )
            try:
                tick = 0
                while True:
                    tick += 1
                    await asyncio.sleep(max(0.0, started + tick * COUNT_POLL_S - time.monotonic()))
                    q = time.perf_counter()
                    row = await conn.fetchrow(COUNTS_SQL)
                    poll_ms.append((time.perf_counter() - q) * 1000)
                    elapsed = time.monotonic() - started
                    longest = await conn.fetchrow(LONGEST_SQL)
                    if proc.poll() is not None:
                        raise RuntimeError(
                            f"the daemon exited with {proc.returncode}:\n"
                            + log_path.read_text(errors="replace")[-2000:]
                        )
                    rss = _status_kb(proc.pid, "VmRSS") or 0
                    samples.append(
                        dict(row)
                        | {"t": elapsed, "rss_kb": rss}
                        | {
                            "longest_s": float(longest["age"]) if longest else 0.0,
                            "longest_query": longest["query"] if longest else None,
                        }
                    )
                    if tick % 30 == 0:
                        _print_progress(samples)
                    if row["unfinished"] == 0:
                        break
                    if elapsed > timeout_s:
                        timed_out = True
                        break
                wall_s = time.monotonic() - started
                hwm_kb = _status_kb(proc.pid, "VmHWM")
                daemon_cpu = _cpu_s(proc.pid)
                pg_cpu = _pg_cpu_s(pg_meter) - pg_before
                proc.send_signal(signal.SIGTERM)
                code, maxrss_kb = await reap(proc, 60)
            except BaseException:
                if proc.returncode is None:
                    proc.kill()
                    await reap(proc, 5)
                raise
            daemon_log = log_path.read_text(errors="replace")
        final = await conn.fetchrow(
            COUNTS_SQL.replace(
                " FROM listener.jobs",
                ", min(started_at) AS first, max(finished_at) AS last FROM listener.jobs",
            )
        )
        stats_after = await table_stats(conn)
    finally:
        await conn.close()

    # At the last poll: after SIGTERM the daemon flushes what it had finished.
    complete = samples[-1]["complete"] if samples else 0
    rate = complete / wall_s
    finished_s = (final["last"] - t0).total_seconds() if final["last"] else None
    windows = _window_rates(samples, 30.0)
    stuck = [s for s in samples if s["longest_s"] >= 1.0]
    worst = max(samples, key=lambda s: s["longest_s"]) if samples else None
    report.details["2"] = {
        "timed_out": timed_out,
        "wall_s": wall_s,
        "complete_at_last_poll": complete,
        "complete_after_sigterm": final["complete"],
        "failed": final["failed"],
        "unfinished_after_sigterm": final["unfinished"],
        "max_finished_at_minus_start_s": finished_s,
        "vm_hwm_kb": hwm_kb,
        "ru_maxrss_kb": maxrss_kb,
        "benchmark_rss_at_spawn_kb": parent_rss,
        "exit_code": code,
        "daemon_cpu_s": daemon_cpu,
        "postgres_cpu_s": pg_cpu,
        "poll_ms_p50": percentile(poll_ms, 50) if poll_ms else None,
        "poll_ms_max": max(poll_ms) if poll_ms else None,
        "max_processing": max((s["processing"] for s in samples), default=0),
        "polls_with_a_statement_running_1s_or_more": len(stuck),
        "longest_statement_s": worst["longest_s"] if worst else None,
        "longest_statement": worst["longest_query"] if worst else None,
        "rate_per_30s": windows,
        "samples": samples,
        "jobs_table_before": stats_before,
        "jobs_table_after": stats_after,
        "daemon_log_tail": daemon_log[-2000:],
    }
    if code != 0:
        report.errors["2"] = f"daemon exit code {code}: {daemon_log[-500:]}"
    elif timed_out:
        report.errors["2"] = (
            f"drain time-boxed at {timeout_s:.0f} s: {complete:,} of {rows:,} complete "
            f"({complete / rows:.1%}) at the last poll"
        )
    elif complete != rows:
        report.errors["2"] = f"{complete:,} of {rows:,} complete, {final['failed']:,} failed"
    label = "drain time" if not timed_out else f"drain time-boxed ({complete / rows:.0%} done)"
    poll_p50 = report.details["2"]["poll_ms_p50"] or 0.0
    window_figures = (
        [
            Figure(
                "2",
                "  slowest 30 s window",
                min(windows),
                "jobs/s",
                note="30 s window rates, in order: " + ", ".join(f"{r:,.0f}" for r in windows),
            ),
            Figure("2", "  fastest 30 s window", max(windows), "jobs/s"),
        ]
        if windows
        else []
    )
    first_rss = samples[0]["rss_kb"] / 1024 if samples else None
    report.figures += [
        Figure(
            "2",
            label,
            wall_s,
            "s",
            note=f"`python -m listener run` subprocess, noop pipeline, concurrency {CONCURRENCY}, "
            "health on port 0; wall clock from Popen (interpreter start included) to the poll "
            f"that found nothing pending or processing; counts polled every {COUNT_POLL_S:.0f} "
            f"s from another connection (one seq scan of listener.jobs: p50 {poll_p50:.0f} ms)",
        ),
        Figure("2", "drain rate", rate, "jobs/s"),
        *window_figures,
        Figure(
            "2",
            "  max(finished_at) - start",
            finished_s,
            "s",
            note="finished_at is now() of the completing transaction, i.e. its start; a gap to "
            "the wall-clock drain time means completions took that long to commit",
        ),
        Figure("2", "  most jobs 'processing' at once", report.details["2"]["max_processing"], ""),
        Figure(
            "2",
            "  longest statement seen running",
            worst["longest_s"] if worst else None,
            "s",
            note=f"longest statement: {worst['longest_query'] if worst else '-'}; "
            f"{len(stuck)} of {len(samples)} polls found a daemon statement running >= 1 s",
        ),
        Figure(
            "2",
            "daemon peak RSS (VmHWM before SIGTERM)",
            _mb(hwm_kb),
            "MB",
            DAEMON_RSS_TARGET_MB,
            "lower",
            note=f"RSS target {DAEMON_RSS_TARGET_MB:.0f} MB is bench_queue.py (e)'s daemon budget",
        ),
        Figure(
            "2",
            "  ru_maxrss after exit",
            maxrss_kb / 1024,
            "MB",
            note=RU_MAXRSS_NOTE.format(mb=(parent_rss or 0) / 1024),
        ),
        Figure("2", "  RSS at the first 1 s poll", first_rss, "MB"),
        Figure("2", "  CPU: daemon", daemon_cpu, "s"),
        Figure("2", "  CPU: Postgres", pg_cpu, "s"),
    ]


def _print_progress(samples: list[dict[str, Any]]) -> None:
    """One stderr line: progress and the rate over the last 30 polls."""
    last = samples[-1]
    prev = samples[-31] if len(samples) > 30 else {"t": 0.0, "complete": 0}
    rate = (last["complete"] - prev["complete"]) / max(last["t"] - prev["t"], 1e-6)
    print(
        f"  {last['t']:5.0f} s: {last['complete']:,} complete, {last['processing']:,} "
        f"processing, {rate:,.0f} jobs/s over the last 30 s, longest statement "
        f"{last['longest_s']:.1f} s, RSS {last['rss_kb'] / 1024:.0f} MB",
        file=sys.stderr,
        flush=True,
    )


def _window_rates(samples: list[dict[str, Any]], window_s: float) -> list[float]:
    """Completion rates over consecutive ``window_s`` windows of the 1 s samples."""
    rates: list[float] = []
    prev: dict[str, Any] = {"t": 0.0, "complete": 0}
    for s in samples:
        if s["t"] - prev["t"] >= window_s - 0.5:
            rates.append((s["complete"] - prev["complete"]) / (s["t"] - prev["t"]))
            prev = s
    return rates


# -- output ---------------------------------------------------------------------------------


def print_report(report: Report) -> None:
    m = report.machine
    pg = m.get("postgres", {})
    print()
    print(f"machine: nproc={m.get('nproc')} cpu={m.get('cpu')} python={m.get('python')}")
    print(
        f"postgres {pg.get('server_version')}: fsync={pg.get('fsync')} "
        f"synchronous_commit={pg.get('synchronous_commit')} "
        f"full_page_writes={pg.get('full_page_writes')} shared_buffers="
        f"{pg.get('shared_buffers')} max_wal_size={m.get('max_wal_size')}"
    )
    fs = m.get("fdatasync")
    if fs:
        print(
            f"fdatasync of 8 KiB: p50 {fs['p50_ms']:.2f} ms, p99 {fs['p99_ms']:.2f} ms, "
            f"max {fs['max_ms']:.1f} ms"
        )
    setup = report.details.get("setup", {})
    if setup:
        print(
            f"setup: {setup['rows']:,} rows loaded in {setup['load_s']:.1f} s, "
            f"VACUUM ANALYZE {setup['vacuum_s']:.1f} s"
            + (f"; database settings: {', '.join(setup['db_set'])}" if setup["db_set"] else "")
        )
    print()
    print_figures(report, name_width=44, target_width=12)
    drain = report.details.get("2")
    if drain:
        before, after = drain["jobs_table_before"], drain["jobs_table_after"]
        print(
            f"(2) listener.jobs after the drain: heap {after['heap_bytes'] / 2**20:.0f} MB, "
            f"indexes {after['index_bytes'] / 2**20:.0f} MB (before "
            f"{before['index_bytes'] / 2**20:.0f} MB), {after['n_dead_tup']:,} dead tuples, "
            f"autovacuum ran {after['autovacuum_count'] - before['autovacuum_count']} time(s) "
            "during the drain"
        )
    print()
    print_load_and_errors(report, m.get("nproc"), "phase")
    print(f"\ntotal time {report.elapsed_s:.1f} s")


# -- main -----------------------------------------------------------------------------------


async def measured(
    key: str, meter: CpuMeter, quiet_wait_s: float, report: Report, coro_fn: Any
) -> None:
    """Run one phase after waiting for a quiet machine; record its CPU load and any error."""
    quiet = await meter.wait_quiet(QUIET_OTHER_PCT, quiet_wait_s)
    print(f"phase {key} ...", file=sys.stderr, flush=True)
    began = time.monotonic()
    before = meter.snapshot()
    try:
        await coro_fn()
    except Exception as error:
        report.errors[key] = f"{type(error).__name__}: {error}"
    report.load[key] = meter.usage(before) | {
        "other_pct_before": quiet["other_pct"],
        "seconds": time.monotonic() - began,
    }
    print(f"phase {key}: {time.monotonic() - began:.1f} s", file=sys.stderr, flush=True)


async def run(args: argparse.Namespace, cluster: TemporaryCluster, report: Report) -> None:
    admin_dsn = cluster.dsn
    postmaster = int((cluster.data_dir / "postmaster.pid").read_text().split("\n", 1)[0])
    meter = CpuMeter([os.getpid(), postmaster])
    pg_meter = CpuMeter([postmaster])

    class _Server:  # what describe_machine needs
        def __init__(self, dsn: str) -> None:
            self.admin_dsn = dsn

    report.machine = await describe_machine(_Server(admin_dsn))  # type: ignore[arg-type]
    conn = await asyncpg.connect(admin_dsn)
    try:
        report.machine["max_wal_size"] = await conn.fetchval("SHOW max_wal_size")
    finally:
        await conn.close()
    report.machine["fdatasync"] = await asyncio.to_thread(fdatasync_probe, cluster.directory)
    report.machine["git"] = _git_state()

    print(f"setup: loading {args.rows:,} rows ...", file=sys.stderr, flush=True)
    dsn, timings = await create_database(admin_dsn, args.rows)
    report.details["setup"] = {"rows": args.rows, "db_set": args.db_set} | timings
    await apply_settings(dsn, args.db_set)
    log = StatementLog(cluster.log_path, dsn)

    if args.chunk_sizes:
        await measured(
            "1",
            meter,
            args.quiet_wait,
            report,
            lambda: phase_chunk_sweep(dsn, args.rows, args.chunk_sizes, log, pg_meter, report),
        )
        return
    await measured(
        "1",
        meter,
        args.quiet_wait,
        report,
        lambda: phase_backfill(dsn, args.rows, args.chunk_size, log, pg_meter, report),
    )
    if args.skip_drain or "1" in report.errors:
        return
    await measured(
        "2",
        meter,
        args.quiet_wait,
        report,
        lambda: phase_drain(dsn, args.rows, args.drain_timeout, pg_meter, report),
    )


def _git_state() -> dict[str, Any]:
    """HEAD and the files changed in the working tree (others may be editing listener/)."""
    root = Path(__file__).resolve().parents[1]
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "listener", "sql"],
            cwd=root,
            capture_output=True,
            text=True,
        ).stdout.splitlines()
        return {"head": head, "changed": [line.strip() for line in dirty]}
    return {}


def _sizes(text: str) -> list[int]:
    sizes = [int(s.replace("_", "")) for s in text.split(",") if s.strip()]
    if not sizes or min(sizes) < 1:
        raise argparse.ArgumentTypeError("chunk sizes must be positive integers")
    return sizes


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=ROWS, help=f"table rows (default {ROWS:,})")
    parser.add_argument("--json", type=Path, help="also write every figure to this file")
    parser.add_argument(
        "--drain-timeout",
        type=float,
        default=DRAIN_TIMEOUT_S,
        metavar="SECONDS",
        help=f"stop the drain after this long and report partial progress "
        f"(default {DRAIN_TIMEOUT_S:.0f})",
    )
    parser.add_argument(
        "--chunk-size",
        type=int,
        help="LISTENER_BACKFILL_CHUNK_SIZE for the backfill (default: listener's own)",
    )
    parser.add_argument(
        "--chunk-sizes",
        type=_sizes,
        help="comma-separated chunk sizes: enqueue once per size from an empty queue, no "
        "second run, no drain",
    )
    parser.add_argument("--skip-drain", action="store_true", help="phase 1 only")
    parser.add_argument(
        "--db-set",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="ALTER DATABASE ... SET NAME = VALUE before phase 1 (repeatable; for experiments "
        "such as plan_cache_mode=force_custom_plan)",
    )
    parser.add_argument(
        "--quiet-wait",
        type=float,
        default=QUIET_WAIT_S,
        metavar="SECONDS",
        help="before each phase, wait up to this long for other processes to use under "
        f"{QUIET_OTHER_PCT:.0f}%% of the CPUs (default {QUIET_WAIT_S:.0f})",
    )
    args = parser.parse_args(argv)
    if args.rows < 1:
        parser.error("--rows must be positive")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    configure_logging("WARNING")
    report = Report()
    started = time.monotonic()
    cluster = TemporaryCluster(fast=False)
    cluster.start()
    try:
        asyncio.run(run(args, cluster, report))
    finally:
        cluster.stop()
    report.elapsed_s = time.monotonic() - started
    print_report(report)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        doc = report.as_json()
        doc["args"] = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
        args.json.write_text(json.dumps(doc, indent=2, default=str) + "\n")
    return 1 if report.errors else 0


if __name__ == "__main__":
    sys.exit(main())
