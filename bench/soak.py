"""Soak: an hour of single-row inserts into an attached table; the daemon keeps up, every row
is finished and written back, no outbox grows, and the daemon's memory stays flat.

Usage::

    python bench/soak.py                                  # 800 rows/s for 60 minutes
    python bench/soak.py --rate 400 --minutes 10 --json /tmp/soak.json --plot /tmp/soak.png
    python bench/soak.py --minutes 10 --tracemalloc /tmp/snaps   # what grows, by traceback
    python bench/soak.py --smoke                          # ~20 s at 40 rows/s: runs, not figures

The daemon runs as users run it: ``python -m listener run`` in a subprocess (environment
settings only, in a temporary directory so no ``.env`` is read), on a throwaway cluster with
default durability (``--use-database-url``: the server of ``DATABASE_URL``), against a table
``images`` attached with ``listener attach`` with every write-back column (status, result,
error, analyzed-at). Everything is on:

- the ``noop`` pipeline with ``LISTENER_NOOP_FAILURE_RATE`` (``--failure-rate``, default 0.1):
  that share of calls fails as retryable, so jobs retry (backoff, then failed after
  ``LISTENER_MAX_ATTEMPTS``, 5);
- webhooks (``LISTENER_WEBHOOK_URL``) to ``bench/webhook_sink.py``, a receiver in its own
  process that answers each delivery after ``--webhook-delay-ms`` (200); the daemon POSTs
  ``--webhook-concurrency`` events at once (512; 16, the daemon's default, carries 80
  events/s at 200 ms a delivery, and a round waits for its slowest answer);
- terminal events (``NOTIFY listener_events``), which this process LISTENs to and counts;
- the health server (on an ephemeral port).

Load: ``--rate`` single-row INSERTs a second (one per transaction) from this process over
``--connections`` asyncpg connections, on an absolute schedule (row ``i`` is due at
``start + i / rate``; a late insert does not move the later ones).

Every ``--sample-s`` seconds (60) it records: the daemon's RSS (``VmRSS`` of its process and
any children, from ``/proc``); the backlog (pending and processing jobs) and the depth of each
outbox (``listener.status_outbox``, ``event_outbox``, ``inserted_rows``, ``deleted_rows``; the
deepest seen is polled every ``--poll-s``); rows inserted and jobs finished in the interval;
the latency from a row's INSERT (its ``created_at``) to its job's ``finished_at`` for the jobs
finished in the interval (p50, p99, max; p99 of the jobs complete at their first attempt);
CPU of the daemon, Postgres, this process and the receiver (percent of one core).

Then it stops inserting, waits (``--drain-timeout``) until nothing is pending, processing or
in any outbox, stops the daemon with SIGTERM and checks:

- ``every row finished``: each row's job is complete, or failed after its attempts;
- ``status columns``: each row carries its job's final status (and analyzed-at for complete
  jobs, the error for failed ones, no error for complete ones);
- ``outboxes drained``: every outbox is empty after the drain (their deepest is reported);
- ``events``: every terminal event was delivered to the webhook (duplicates reported) and
  heard by LISTEN;
- ``RSS flat``: max - min of the daemon's RSS over the last three quarters of the load
  (minutes 15 to 60 of an hour) within ``--rss-tolerance-mb`` (5);
- ``kept up``: the inserts kept their schedule (>= 99% of the rate) and the backlog over
  the second half of the load stayed under 10 s of inserts;
- ``daemon exit``: the daemon ran to the end and exited 0 on SIGTERM.

Exit status 1 when a check fails (2 when the run could not start; 130 when stopped by
SIGTERM or Ctrl+C, after stopping the daemon, the receiver and the cluster). ``--json`` writes every
sample and check; ``--plot`` draws RSS, backlog and p99 per sample as a PNG (Pillow).
``--malloc-trim-interval-s 0`` runs the daemon as it ran before it returned the C heap's free
memory (``LISTENER_MALLOC_TRIM_INTERVAL_S``), to compare the curves. ``--tracemalloc DIR`` runs
the daemon under ``bench/tracemalloc_daemon.py``: a snapshot per sample into DIR, and the
allocations that grew most over the last three quarters of the load printed at the end (RSS
then includes tracemalloc's own memory: the RSS check says nothing).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import platform
import re
import secrets
import signal
import subprocess
import sys
import tempfile
import time
import tracemalloc
from collections.abc import AsyncIterator
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
from bench_queue import (
    QUIET_OTHER_PCT,
    CpuMeter,
    add_server_options,
    bench_server,
    dsn_for,
    percentile,
    postmaster_pid,
)

import listener

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench"
CLK_TCK = os.sysconf("SC_CLK_TCK")

RATE = 800.0
MINUTES = 60.0
CONNECTIONS = 8
SAMPLE_S = 60.0
POLL_S = 10.0
FAILURE_RATE = 0.1
WEBHOOK_DELAY_MS = 200.0
WEBHOOK_CONCURRENCY = 512
DRAIN_TIMEOUT_S = 300.0
RSS_TOLERANCE_MB = 5.0
SCHEDULE_SHARE = 0.99
BACKLOG_SECONDS = 10.0
START_TIMEOUT_S = 60.0

TABLE = "public.images"
TABLE_DDL = """
CREATE TABLE images (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    url         text NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT clock_timestamp(),
    status      text,
    result      jsonb,
    error       text,
    analyzed_at timestamptz
)
"""
ATTACH_ARGS = [
    "attach",
    TABLE,
    "--id-column",
    "id",
    "--url-column",
    "url",
    "--status-column",
    "status",
    "--result-column",
    "result",
    "--error-column",
    "error",
    "--analyzed-at-column",
    "analyzed_at",
]
OUTBOXES = ("status_outbox", "event_outbox", "inserted_rows", "deleted_rows")
DEPTHS_SQL = "SELECT " + ", ".join(
    f"(SELECT count(*) FROM listener.{name}) AS {name}" for name in OUTBOXES
)
# Through the partial indexes (jobs_claim_idx; jobs_lease_idx holds every processing job),
# not a scan of every job.
BACKLOG_SQL = """
SELECT (SELECT count(*) FROM listener.jobs WHERE status = 'pending') AS pending,
       (SELECT count(*) FROM listener.jobs
        WHERE lease_expires_at IS NOT NULL AND status = 'processing') AS processing
"""
# Jobs finished in [$1, $2) (jobs_finished_idx), joined to their rows for the INSERT time.
FINISHED_SQL = """
WITH f AS (
    SELECT j.status, j.attempts,
           extract(epoch FROM j.finished_at - i.created_at) * 1000 AS ms
    FROM listener.jobs AS j
    JOIN public.images AS i ON i.id = j.source_id::bigint
    WHERE j.finished_at >= $1 AND j.finished_at < $2
      AND j.source_table = 'public.images' AND j.status IN ('complete', 'failed')
)
SELECT count(*) AS finished,
       count(*) FILTER (WHERE status = 'complete') AS complete,
       count(*) FILTER (WHERE status = 'failed') AS failed,
       percentile_cont(0.5) WITHIN GROUP (ORDER BY ms) AS p50_ms,
       percentile_cont(0.99) WITHIN GROUP (ORDER BY ms) AS p99_ms,
       max(ms) AS max_ms,
       percentile_cont(0.99) WITHIN GROUP (ORDER BY ms)
           FILTER (WHERE status = 'complete' AND attempts = 1) AS first_attempt_p99_ms
FROM f
"""
ROWS_SQL = """
SELECT count(*) AS rows,
       count(j.id) AS jobs,
       count(*) FILTER (WHERE j.status = 'complete') AS complete,
       count(*) FILTER (WHERE j.status = 'failed') AS failed,
       count(*) FILTER (WHERE j.status = 'failed' AND j.attempts < j.max_attempts)
           AS failed_early,
       count(*) FILTER (WHERE j.status = 'failed'
                          AND NOT coalesce(starts_with(j.last_error, $1), false))
           AS failed_otherwise,
       count(*) FILTER (WHERE j.id IS NULL OR j.status NOT IN ('complete', 'failed'))
           AS unfinished,
       count(*) FILTER (WHERE i.status IS DISTINCT FROM j.status) AS status_wrong,
       count(*) FILTER (WHERE j.status = 'complete'
                          AND (i.analyzed_at IS DISTINCT FROM j.finished_at
                               OR i.error IS NOT NULL)) AS complete_columns_wrong,
       count(*) FILTER (WHERE j.status = 'failed' AND i.error IS DISTINCT FROM j.last_error)
           AS failed_columns_wrong
FROM public.images AS i
LEFT JOIN listener.jobs AS j ON j.source_table = 'public.images' AND j.source_id = i.id::text
"""


# -- processes ----------------------------------------------------------------------------


def _proc_status(pid: int) -> dict[str, int]:
    """The ``kB`` lines of /proc/<pid>/status (VmRSS, RssAnon, VmHWM...), in KiB."""
    out: dict[str, int] = {}
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            parts = value.split()
            if len(parts) == 2 and parts[1] == "kB":
                out[key] = int(parts[0])
    return out


def _descendants(pid: int) -> list[int]:
    """Live descendants of ``pid`` (from /proc/*/stat's parent pids)."""
    parent: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, IndexError, ValueError):
            parent[int(stat.parent.name)] = int(stat.read_text().rsplit(")", 1)[1].split()[1])
    found: list[int] = []
    frontier = [pid]
    while frontier:
        children = [p for p, pp in parent.items() if pp in frontier]
        found += children
        frontier = children
    return found


def _cpu_jiffies(pid: int, *, with_reaped: bool = False) -> int:
    """utime + stime of ``pid`` (and of its reaped children with ``with_reaped``); 0 once
    gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return 0
    return sum(int(v) for v in fields[11 : 15 if with_reaped else 13])


def memory_of(pid: int) -> dict[str, float]:
    """RSS of ``pid`` and of its live descendants, MiB: ``rss_mb`` (VmRSS of all of them),
    ``rss_anon_mb`` (RssAnon: the heap, not the mapped files), ``hwm_mb`` (the process's
    own VmHWM) and ``children``."""
    own = _proc_status(pid)
    kids = [_proc_status(child) for child in _descendants(pid)]
    rss = own.get("VmRSS", 0) + sum(k.get("VmRSS", 0) for k in kids)
    anon = own.get("RssAnon", 0) + sum(k.get("RssAnon", 0) for k in kids)
    return {
        "rss_mb": rss / 1024,
        "rss_anon_mb": anon / 1024,
        "hwm_mb": own.get("VmHWM", 0) / 1024,
        "children": len(kids),
    }


class CpuClock:
    """CPU used by the run's processes between two readings, percent of one core.

    Args:
        pids: name -> pid; each counts its own time and its live descendants' (the
            postmaster's backends), plus what it reaped.
    """

    def __init__(self, pids: dict[str, int]) -> None:
        self.pids = pids
        self.ncpu = os.cpu_count() or 1
        self._last = self._read()

    def _read(self) -> dict[str, float]:
        now = {
            name: _cpu_jiffies(pid, with_reaped=True)
            + sum(_cpu_jiffies(child) for child in _descendants(pid))
            for name, pid in self.pids.items()
        }
        # This process without its children (the daemon and the receiver are counted apart).
        now["soak"] = _cpu_jiffies(os.getpid())
        fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
        now["machine_busy"] = sum(fields) - fields[3] - fields[4]
        now["wall"] = time.monotonic()
        return {k: float(v) for k, v in now.items()}

    def lap(self) -> dict[str, float]:
        """Percent of one core per process since the last lap; ``other``: the rest of the
        machine's busy time (other work on a shared machine)."""
        now = self._read()
        seconds = max(now["wall"] - self._last["wall"], 1e-6)
        pct = {
            name: 100 * (now[name] - self._last[name]) / CLK_TCK / seconds
            for name in [*self.pids, "soak"]
        }
        busy = 100 * (now["machine_busy"] - self._last["machine_busy"]) / CLK_TCK / seconds
        pct["other"] = max(0.0, busy - sum(pct.values()))
        self._last = now
        return {k: round(v, 1) for k, v in pct.items()}


# -- load -----------------------------------------------------------------------------------


@dataclass
class Inserter:
    """Single-row autocommit INSERTs at ``rate`` a second for ``duration_s`` seconds over
    ``connections`` connections, row ``i`` due at ``start + i / rate``.

    Each connection takes the next due row, sleeps until it is due (not at all when late),
    inserts it and takes the next: so up to ``connections`` inserts are in flight when the
    server is slow, and a late insert does not delay the schedule of the later ones. The load
    ends at ``duration_s`` whatever was sent: rows still due then are not sent (``missed``).
    """

    dsn: str
    rate: float
    duration_s: float
    connections: int
    inserted: int = 0
    errors: int = 0
    last_error: str = ""
    lags_ms: list[float] = field(default_factory=list)
    """Lateness of each send against its schedule since the last ``take``, ms."""
    inserted_since: int = 0
    missed: int = 0
    """Rows of the schedule not sent by its end (the inserts fell behind)."""
    started: float = 0.0
    finished: float = 0.0
    _next: int = 0
    _stop: bool = False

    def take(self) -> tuple[int, list[float]]:
        """Rows inserted and send lags since the last call."""
        taken = self.inserted_since, self.lags_ms
        self.inserted_since, self.lags_ms = 0, []
        return taken

    def stop(self) -> None:
        """Send no more rows (those in flight finish)."""
        self._stop = True

    async def run(self, start_at: float) -> None:
        """Insert on the schedule that starts at loop time ``start_at``."""
        conns = [await asyncpg.connect(self.dsn) for _ in range(self.connections)]
        try:
            total = round(self.rate * self.duration_s)
            self.started = start_at
            await asyncio.gather(*(self._worker(conn, start_at, total) for conn in conns))
            self.finished = asyncio.get_running_loop().time()
            self.missed = total - self._next
        finally:
            for conn in conns:
                await conn.close()

    async def _worker(self, conn: asyncpg.Connection, start_at: float, total: int) -> None:
        loop = asyncio.get_running_loop()
        insert = await conn.prepare("INSERT INTO images (url) VALUES ($1)")
        end = start_at + self.duration_s
        while not self._stop and self._next < total and loop.time() < end:
            i = self._next
            self._next += 1
            due = start_at + i / self.rate
            delay = due - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            self.lags_ms.append((loop.time() - due) * 1000)
            try:
                await insert.fetchval(f"https://img.invalid/{i}.jpg")
            except (asyncpg.PostgresError, OSError) as error:
                self.errors += 1
                self.last_error = f"{type(error).__name__}: {error}"
                continue
            self.inserted += 1
            self.inserted_since += 1


class EventCounter:
    """Counts ``NOTIFY listener_events`` payloads by status on a connection of its own."""

    def __init__(self) -> None:
        self.heard = 0
        self.by_status: dict[str, int] = {}
        self._conn: asyncpg.Connection | None = None

    def _notified(self, _conn: object, _pid: int, _channel: str, payload: str) -> None:
        self.heard += 1
        status = str(json.loads(payload).get("status"))
        self.by_status[status] = self.by_status.get(status, 0) + 1

    async def start(self, dsn: str) -> None:
        """LISTEN from now on."""
        self._conn = await asyncpg.connect(dsn)
        await self._conn.add_listener("listener_events", self._notified)

    async def close(self) -> None:
        """Stop listening."""
        if self._conn is not None:
            await self._conn.close()
            self._conn = None


# -- the run --------------------------------------------------------------------------------


@dataclass
class Config:
    """What the run does; see the options."""

    rate: float
    minutes: float
    connections: int
    sample_s: float
    poll_s: float
    failure_rate: float
    webhook_delay_ms: float
    webhook_concurrency: int
    drain_timeout_s: float
    rss_tolerance_mb: float
    backoff_base_s: float | None
    malloc_trim_interval_s: float | None
    log_level: str
    tracemalloc_dir: Path | None
    tracemalloc_frames: int
    daemon_log: Path | None
    smoke: bool

    @property
    def duration_s(self) -> float:
        return self.minutes * 60


@dataclass
class Check:
    """One verdict of the run: its name, whether it held, and what was measured."""

    name: str
    ok: bool
    detail: str
    values: dict[str, Any] = field(default_factory=dict)


@dataclass
class Run:
    """Everything the run measured (what ``--json`` writes)."""

    config: dict[str, Any]
    machine: dict[str, Any] = field(default_factory=dict)
    samples: list[dict[str, Any]] = field(default_factory=list)
    checks: list[Check] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)
    receiver: dict[str, Any] = field(default_factory=dict)
    daemon: dict[str, Any] = field(default_factory=dict)
    tracemalloc: list[dict[str, Any]] = field(default_factory=list)
    tracemalloc_stats: list[dict[str, Any]] = field(default_factory=list)
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None and bool(self.checks) and all(c.ok for c in self.checks)

    def as_json(self) -> dict[str, Any]:
        doc = asdict(self)
        doc["ok"] = self.ok
        return doc


def child_env(dsn: str, extra: dict[str, str]) -> dict[str, str]:
    """Environment of a ``listener`` subprocess: no inherited ``LISTENER_*`` variable, this
    checkout's package first on the path (the subprocess runs in another directory)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("LISTENER_")}
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in [str(ROOT), os.environ.get("PYTHONPATH", "")] if p
    )
    return env | {"DATABASE_URL": dsn} | extra


async def create_database(admin_dsn: str, workdir: Path) -> str:
    """A fresh database: migrated and ``images`` attached with ``listener`` commands; its
    DSN."""
    name = f"soak_{secrets.token_hex(3)}"
    admin = await asyncpg.connect(admin_dsn)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    dsn = dsn_for(admin_dsn, name)
    env = child_env(dsn, {"LISTENER_LOG_LEVEL": "WARNING"})
    for argv in (["migrate"], None, ATTACH_ARGS):
        if argv is None:
            conn = await asyncpg.connect(dsn)
            try:
                await conn.execute(TABLE_DDL)
            finally:
                await conn.close()
            continue
        proc = await asyncio.to_thread(
            subprocess.run,
            [sys.executable, "-m", "listener", *argv],
            env=env,
            cwd=workdir,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        if proc.returncode != 0:
            raise RuntimeError(f"listener {argv[0]} failed: {proc.stdout}{proc.stderr}")
    return dsn


async def drop_database(admin_dsn: str, dsn: str) -> None:
    """Drop the run's database (``--use-database-url`` leaves the server as it was)."""
    name = dsn.rsplit("/", 1)[1].split("?", 1)[0]
    admin = await asyncpg.connect(admin_dsn)
    try:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await admin.close()


@contextlib.asynccontextmanager
async def receiver(delay_ms: float, secret: str, workdir: Path) -> AsyncIterator[tuple[int, int]]:
    """``bench/webhook_sink.py`` in a subprocess; yields (its pid, its port)."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        str(BENCH / "webhook_sink.py"),
        "--secret",
        secret,
        "--delay-ms",
        str(delay_ms),
        env=child_env("", {}),
        cwd=workdir,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
    )
    try:
        assert proc.stdout is not None
        line = await asyncio.wait_for(proc.stdout.readline(), START_TIMEOUT_S)
        if not line.strip():
            raise RuntimeError("the webhook receiver did not start")
        yield proc.pid, int(line)
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(proc.wait(), 10)
            except TimeoutError:
                proc.kill()
                await proc.wait()


async def receiver_stats(port: int) -> dict[str, Any]:
    """The receiver's counts (``GET /stats``)."""
    async with (
        aiohttp.ClientSession() as http,
        http.get(f"http://127.0.0.1:{port}/stats", timeout=aiohttp.ClientTimeout(total=30)) as r,
    ):
        stats: dict[str, Any] = await r.json()
        return stats


class Daemon:
    """``python -m listener run`` (or ``bench/tracemalloc_daemon.py``) in a subprocess.

    Args:
        env: its environment.
        workdir: its working directory (no ``.env`` there).
        log_path: where its output goes.
        tracemalloc_dir: run it under ``tracemalloc_daemon.py``, snapshots into this
            directory.
    """

    def __init__(
        self, env: dict[str, str], workdir: Path, log_path: Path, tracemalloc_dir: Path | None
    ) -> None:
        self.env = env
        self.workdir = workdir
        self.log_path = log_path
        self.tracemalloc_dir = tracemalloc_dir
        self.proc: subprocess.Popen[bytes] | None = None
        self.health_url: str | None = None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    async def start(self) -> None:
        """Start it and wait for "listener running" in its log.

        Raises:
            RuntimeError: it exited, or did not log that within ``START_TIMEOUT_S``.
        """
        argv = [sys.executable, "-m", "listener", "run"]
        if self.tracemalloc_dir is not None:
            argv = [sys.executable, str(BENCH / "tracemalloc_daemon.py")]
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(
                argv,
                env=self.env,
                cwd=self.workdir,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            text = self.log_path.read_text(errors="replace")
            found = re.search(r"listener running: .*health=(http://[\d.:]+)", text)
            if found:
                self.health_url = found.group(1)
                return
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.proc.kill()
                raise RuntimeError(f"the daemon did not start:\n{self.tail()}")
            await asyncio.sleep(0.1)

    def alive(self) -> bool:
        """It has not exited."""
        return self.proc is not None and self.proc.poll() is None

    async def stop(self, timeout_s: float = 60.0) -> int | None:
        """SIGTERM, then wait; its exit status (``None``: killed after ``timeout_s``)."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + timeout_s
            while self.proc.poll() is None:
                if time.monotonic() > deadline:
                    self.proc.kill()
                    self.proc.wait()
                    return None
                await asyncio.sleep(0.1)
        return self.proc.returncode

    def tail(self, chars: int = 3000) -> str:
        """The end of its log."""
        return self.log_path.read_text(errors="replace")[-chars:]

    def log_summary(self) -> dict[str, Any]:
        """Lines of its log by level, and the first distinct warnings and errors."""
        levels: dict[str, int] = {}
        notable: list[str] = []
        with self.log_path.open(errors="replace") as log:
            for line in log:
                parts = line.split(None, 2)
                level = parts[1] if len(parts) > 2 and ":" in parts[0] else "OTHER"
                levels[level] = levels.get(level, 0) + 1
                if level in ("WARNING", "ERROR", "CRITICAL", "OTHER"):
                    text = line.strip()[:300]
                    if text and text not in notable and len(notable) < 20:
                        notable.append(text)
        return {"lines_by_level": levels, "notable": notable, "path": str(self.log_path)}


class Sampler:
    """Reads the figures of each interval (see the module's docstring).

    Args:
        conn: a connection of its own.
        poll_conn: another, for ``depths`` between samples (the poller is cancelled at the
            end, maybe mid-query).
        daemon: the daemon.
        inserter: the load.
        cpu: CPU per process.
        receiver_port: the webhook receiver's port.
        events: the LISTEN counter.
    """

    def __init__(
        self,
        conn: asyncpg.Connection,
        poll_conn: asyncpg.Connection,
        daemon: Daemon,
        inserter: Inserter,
        cpu: CpuClock,
        receiver_port: int,
        events: EventCounter,
    ) -> None:
        self.conn = conn
        self.poll_conn = poll_conn
        self.daemon = daemon
        self.inserter = inserter
        self.cpu = cpu
        self.port = receiver_port
        self.events = events
        self.depth_max: dict[str, int] = dict.fromkeys(OUTBOXES, 0)
        self.interval_max: dict[str, int] = dict.fromkeys(OUTBOXES, 0)
        self.since: datetime | None = None
        self.t0 = 0.0
        self.delivered = 0

    async def depths(self, conn: asyncpg.Connection | None = None) -> dict[str, int]:
        """Each outbox's depth now (on ``conn``, default the sampler's); the deepest seen is
        kept."""
        row = await (conn or self.conn).fetchrow(DEPTHS_SQL)
        depths = {name: int(row[name]) for name in OUTBOXES}
        for name, n in depths.items():
            self.depth_max[name] = max(self.depth_max[name], n)
            self.interval_max[name] = max(self.interval_max[name], n)
        return depths

    async def backlog(self) -> dict[str, int]:
        """Pending and processing jobs now."""
        row = await self.conn.fetchrow(BACKLOG_SQL)
        return {"pending": int(row["pending"]), "processing": int(row["processing"])}

    async def begin(self, t0: float) -> dict[str, Any]:
        """The sample before the load (minute 0), and the start of the first interval."""
        self.t0 = t0
        self.since = await self.conn.fetchval("SELECT clock_timestamp()")
        self.cpu.lap()
        depths = await self.depths()
        backlog = await self.backlog()
        return {
            "minute": 0.0,
            "t_s": 0.0,
            "phase": "start",
            **memory_of(self.daemon.pid),
            **backlog,
            "backlog": backlog["pending"] + backlog["processing"],
            "outbox": depths,
            "outbox_max": dict(depths),
            "inserted": 0,
            "finished": 0,
        }

    async def sample(self, phase: str) -> dict[str, Any]:
        """The figures of the interval since the previous sample."""
        t = asyncio.get_running_loop().time() - self.t0
        memory = memory_of(self.daemon.pid)
        now: datetime = await self.conn.fetchval("SELECT clock_timestamp()")
        depths = await self.depths()
        backlog = await self.backlog()
        finished = await self.conn.fetchrow(FINISHED_SQL, self.since, now)
        self.since = now
        inserted, lags = self.inserter.take()
        stats = await receiver_stats(self.port)
        delivered = stats["unique"] - self.delivered
        self.delivered = stats["unique"]
        outbox_max, self.interval_max = self.interval_max, dict.fromkeys(OUTBOXES, 0)

        def ms(value: float | None) -> float | None:
            return None if value is None else round(float(value), 1)

        return {
            "minute": round(t / 60, 3),
            "t_s": round(t, 1),
            "phase": phase,
            **memory,
            **backlog,
            "backlog": backlog["pending"] + backlog["processing"],
            "outbox": depths,
            "outbox_max": outbox_max,
            "inserted": inserted,
            "insert_errors": self.inserter.errors,
            "insert_lag_p99_ms": round(percentile(lags, 99), 1) if lags else None,
            "finished": int(finished["finished"]),
            "complete": int(finished["complete"]),
            "failed": int(finished["failed"]),
            "latency_p50_ms": ms(finished["p50_ms"]),
            "latency_p99_ms": ms(finished["p99_ms"]),
            "latency_max_ms": ms(finished["max_ms"]),
            "first_attempt_p99_ms": ms(finished["first_attempt_p99_ms"]),
            "webhooks_delivered": delivered,
            "events_heard": self.events.heard,
            "cpu_pct_of_core": self.cpu.lap(),
        }


def print_sample(s: dict[str, Any]) -> None:
    """One line per sample."""

    def num(value: Any, fmt: str = ",.0f") -> str:
        return "-" if value is None else format(value, fmt)

    cpu = s.get("cpu_pct_of_core") or {}
    print(
        f"{s['minute']:6.2f} min {s['phase']:5} RSS {s['rss_mb']:6.1f} MB "
        f"(anon {s['rss_anon_mb']:5.1f})  backlog {s['backlog']:>7,}  "
        f"outbox max {'/'.join(str(s['outbox_max'][n]) for n in OUTBOXES):>20}  "
        f"ins {s['inserted']:>7,}  fin {s['finished']:>7,}  "
        f"p50/p99 {num(s.get('latency_p50_ms'))}/{num(s.get('latency_p99_ms'))} ms  "
        f"cpu d/pg/soak/rx/other {cpu.get('daemon', 0):.0f}/{cpu.get('postgres', 0):.0f}/"
        f"{cpu.get('soak', 0):.0f}/{cpu.get('receiver', 0):.0f}/{cpu.get('other', 0):.0f}%",
        flush=True,
    )


async def wait_drained(sampler: Sampler, daemon: Daemon, timeout_s: float) -> float | None:
    """Poll every second until no job is pending or processing and every outbox is empty;
    seconds it took, or ``None`` after ``timeout_s``."""
    began = time.monotonic()
    while time.monotonic() - began < timeout_s:
        depths = await sampler.depths()
        backlog = await sampler.backlog()
        if not any(depths.values()) and not any(backlog.values()):
            return time.monotonic() - began
        if not daemon.alive():
            return None
        await asyncio.sleep(1.0)
    return None


def flat_window(samples: list[dict[str, Any]], duration_s: float) -> list[dict[str, Any]]:
    """The load's samples over its last three quarters (minutes 15 to 60 of an hour)."""
    return [s for s in samples if s["phase"] == "load" and s["t_s"] >= duration_s / 4 - 1]


def rss_check(samples: list[dict[str, Any]], cfg: Config) -> Check:
    """RSS flat: max - min of the daemon's RSS over the flat window."""
    window = flat_window(samples, cfg.duration_s)
    if len(window) < 2:
        return Check("RSS flat", False, "fewer than 2 samples in the last three quarters")
    rss = [s["rss_mb"] for s in window]
    spread = max(rss) - min(rss)
    first, last = window[0], window[-1]
    detail = (
        f"{min(rss):.1f} to {max(rss):.1f} MB over minutes {first['minute']:.1f} to "
        f"{last['minute']:.1f} ({len(window)} samples): spread {spread:.1f} MB "
        f"(<= {cfg.rss_tolerance_mb:g}); {first['rss_mb']:.1f} -> {last['rss_mb']:.1f} MB"
    )
    traced = cfg.tracemalloc_dir is not None and cfg.tracemalloc_frames > 0
    if traced:
        detail += " (under tracemalloc: not the daemon's own memory)"
    return Check(
        "RSS flat",
        spread <= cfg.rss_tolerance_mb or traced,
        detail,
        {
            "spread_mb": round(spread, 2),
            "min_mb": round(min(rss), 2),
            "max_mb": round(max(rss), 2),
            "first_mb": first["rss_mb"],
            "last_mb": last["rss_mb"],
            "anon_spread_mb": round(
                max(s["rss_anon_mb"] for s in window) - min(s["rss_anon_mb"] for s in window), 2
            ),
            "from_minute": first["minute"],
            "to_minute": last["minute"],
        },
    )


def kept_up_check(samples: list[dict[str, Any]], cfg: Config, inserter: Inserter) -> Check:
    """The inserts kept their schedule, and the backlog stayed under ``BACKLOG_SECONDS`` of
    inserts over the second half of the load."""
    elapsed = max(inserter.finished - inserter.started, cfg.duration_s, 1e-6)
    achieved = inserter.inserted / elapsed
    half = [s for s in samples if s["phase"] == "load" and s["t_s"] >= cfg.duration_s / 2 - 1]
    backlog = max((s["backlog"] + s["outbox"]["inserted_rows"] for s in half), default=0)
    limit = cfg.rate * BACKLOG_SECONDS
    ok = achieved >= SCHEDULE_SHARE * cfg.rate and backlog <= limit and inserter.errors == 0
    return Check(
        "kept up",
        ok,
        f"{inserter.inserted:,} rows in {elapsed:.0f} s = {achieved:,.1f}/s of {cfg.rate:g}/s "
        f"(>= {SCHEDULE_SHARE:.0%}; {inserter.missed:,} not sent in time), "
        f"{inserter.errors} insert errors; deepest backlog over "
        f"the second half {backlog:,} (<= {limit:,.0f})",
        {
            "achieved_rate": round(achieved, 1),
            "inserted": inserter.inserted,
            "insert_errors": inserter.errors,
            "missed": inserter.missed,
            "last_insert_error": inserter.last_error,
            "second_half_max_backlog": backlog,
        },
    )


async def row_checks(conn: asyncpg.Connection, inserted: int) -> tuple[list[Check], dict[str, Any]]:
    """Every row finished, and its status columns right."""
    from listener.analysis.providers.noop import INJECTED_FAILURE

    r = dict(await conn.fetchrow(ROWS_SQL, INJECTED_FAILURE))
    r["failure_reasons"] = {
        row["last_error"]: row["n"]
        for row in await conn.fetch(
            "SELECT last_error, count(*) AS n FROM listener.jobs WHERE status = 'failed' "
            "GROUP BY last_error ORDER BY n DESC LIMIT 10"
        )
    }
    finished = (
        r["unfinished"] == 0
        and r["rows"] == inserted
        and r["failed_early"] == 0
        and r["failed_otherwise"] == 0
    )
    columns = (
        r["status_wrong"] == 0
        and r["complete_columns_wrong"] == 0
        and r["failed_columns_wrong"] == 0
    )
    return [
        Check(
            "every row finished",
            finished,
            f"{r['rows']:,} rows ({inserted:,} inserted): {r['complete']:,} complete, "
            f"{r['failed']:,} failed after their attempts ({r['failed_early']} before, "
            f"{r['failed_otherwise']} for another reason), {r['unfinished']} unfinished",
            r,
        ),
        Check(
            "status columns",
            columns,
            f"status wrong {r['status_wrong']}, complete rows' analyzed-at/error wrong "
            f"{r['complete_columns_wrong']}, failed rows' error wrong {r['failed_columns_wrong']}",
        ),
    ], r


def diff_snapshots(directory: Path, from_n: int) -> list[dict[str, Any]]:
    """The allocations that grew most from the first snapshot taken at or after stats line
    ``from_n`` (the earliest one when none is) to the last one, by traceback (top 15)."""
    paths = sorted(directory.glob("snapshot-*.pickle"))
    if len(paths) < 2:
        return []
    later = [p for p in paths[:-1] if int(p.stem.split("-")[1]) >= from_n]
    first = later[0] if later else paths[0]
    old = tracemalloc.Snapshot.load(str(first))
    new = tracemalloc.Snapshot.load(str(paths[-1]))
    out = []
    for stat in new.compare_to(old, "traceback")[:15]:
        out.append(
            {
                "size_diff_kb": round(stat.size_diff / 1024, 1),
                "size_kb": round(stat.size / 1024, 1),
                "count_diff": stat.count_diff,
                "traceback": [f"{f.filename}:{f.lineno}" for f in stat.traceback][:8],
                "from": first.name,
                "to": paths[-1].name,
            }
        )
    return out


def types_grown(lines: list[dict[str, Any]], from_n: int) -> dict[str, int]:
    """Objects the garbage collector tracks, by type, that grew most in number from stats
    line ``from_n`` (or the first) to the last (top 15)."""
    if len(lines) < 2:
        return {}
    first = next((s for s in lines if s["n"] >= from_n and s is not lines[-1]), lines[0])
    old, new = first["types"], lines[-1]["types"]
    grown = {name: n - old.get(name, 0) for name, n in new.items()}
    top = sorted(grown.items(), key=lambda kv: -kv[1])[:15]
    return {name: n for name, n in top if n > 0}


async def describe(admin_dsn: str) -> dict[str, Any]:
    """The machine and the server."""
    conn = await asyncpg.connect(admin_dsn)
    try:
        pg = {
            name: await conn.fetchval(f"SHOW {name}")
            for name in ("server_version", "fsync", "synchronous_commit", "shared_buffers")
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
        "postgres": pg,
        "listener": str(Path(listener.__file__).parent),
    }


async def soak(cfg: Config, admin_dsn: str, pg_pid: int | None, quiet_wait_s: float) -> Run:
    """The whole run; never raises for what it measures (``Run.error`` holds a failure to
    run)."""
    run = Run(config={k: str(v) if isinstance(v, Path) else v for k, v in asdict(cfg).items()})
    run.machine = await describe(admin_dsn)
    if quiet_wait_s > 0:
        meter = CpuMeter([os.getpid()] + ([pg_pid] if pg_pid else []))
        run.machine["load_before_pct"] = await meter.wait_quiet(QUIET_OTHER_PCT, quiet_wait_s)
    with tempfile.TemporaryDirectory(prefix="listener-soak-") as tmp:
        workdir = Path(tmp)
        dsn = await create_database(admin_dsn, workdir)
        try:
            await run_against(cfg, run, dsn, workdir, pg_pid)
        finally:
            await drop_database(admin_dsn, dsn)
    return run


async def run_against(cfg: Config, run: Run, dsn: str, workdir: Path, pg_pid: int | None) -> None:
    """The run on a database made for it."""
    secret = secrets.token_hex(16)
    async with receiver(cfg.webhook_delay_ms, secret, workdir) as (receiver_pid, port):
        extra = {
            "LISTENER_PIPELINE": "noop",
            "LISTENER_NOOP_FAILURE_RATE": str(cfg.failure_rate),
            "LISTENER_HEALTH_PORT": "0",
            "LISTENER_WEBHOOK_URL": f"http://127.0.0.1:{port}/hook",
            "LISTENER_WEBHOOK_SECRET": secret,
            "LISTENER_WEBHOOK_CONCURRENCY": str(cfg.webhook_concurrency),
            "LISTENER_LOG_LEVEL": cfg.log_level,
        }
        if cfg.backoff_base_s is not None:
            extra["LISTENER_BACKOFF_BASE_S"] = str(cfg.backoff_base_s)
        if cfg.malloc_trim_interval_s is not None:
            extra["LISTENER_MALLOC_TRIM_INTERVAL_S"] = str(cfg.malloc_trim_interval_s)
        if cfg.tracemalloc_dir is not None:
            extra["SOAK_TRACEMALLOC_DIR"] = str(cfg.tracemalloc_dir)
            extra["SOAK_TRACEMALLOC_INTERVAL_S"] = str(cfg.sample_s)
            extra["SOAK_TRACEMALLOC_FRAMES"] = str(cfg.tracemalloc_frames)
        log_path = cfg.daemon_log or workdir / "daemon.log"
        daemon = Daemon(child_env(dsn, extra), workdir, log_path, cfg.tracemalloc_dir)
        events = EventCounter()
        await events.start(dsn)
        conn = await asyncpg.connect(dsn)
        poll_conn = await asyncpg.connect(dsn)
        try:
            await daemon.start()
            pids = {"daemon": daemon.pid, "receiver": receiver_pid}
            if pg_pid is not None:
                pids["postgres"] = pg_pid
            inserter = Inserter(dsn, cfg.rate, cfg.duration_s, cfg.connections)
            sampler = Sampler(conn, poll_conn, daemon, inserter, CpuClock(pids), port, events)
            try:
                await drive(cfg, run, daemon, inserter, sampler)
            finally:
                code = await daemon.stop()
            run.daemon = {"exit_code": code, "log": daemon.log_summary()}
            run.receiver = await receiver_stats(port)
            if run.error is None:
                await finish(cfg, run, conn, inserter, sampler, events, code)
        finally:
            await conn.close()
            poll_conn.terminate()
            await events.close()
            if daemon.alive():
                await daemon.stop()
        if cfg.tracemalloc_dir is not None:
            window = flat_window(run.samples, cfg.duration_s)
            first = round(window[0]["t_s"] / cfg.sample_s) if window else 1
            run.tracemalloc = diff_snapshots(cfg.tracemalloc_dir, first)
            stats = cfg.tracemalloc_dir / "stats.jsonl"
            if stats.exists():
                run.tracemalloc_stats = [json.loads(x) for x in stats.read_text().splitlines()]
                run.summary["types_grown"] = types_grown(run.tracemalloc_stats, first)


async def drive(
    cfg: Config, run: Run, daemon: Daemon, inserter: Inserter, sampler: Sampler
) -> None:
    """The load with a sample every ``sample_s``, then the drain and its sample."""
    loop = asyncio.get_running_loop()
    t0 = loop.time() + 0.2
    first = await sampler.begin(t0)
    run.samples.append(first)
    print_sample(first)
    load = asyncio.create_task(inserter.run(t0))

    async def poll_depths() -> None:
        while True:
            await asyncio.sleep(cfg.poll_s)
            with contextlib.suppress(asyncpg.PostgresError):
                await sampler.depths(sampler.poll_conn)

    poller = asyncio.create_task(poll_depths())
    try:
        k = 1
        while k * cfg.sample_s <= cfg.duration_s + 1e-6:
            await asyncio.sleep(max(0.0, t0 + k * cfg.sample_s - loop.time()))
            if not daemon.alive():
                run.error = f"the daemon exited during the load:\n{daemon.tail()}"
                inserter.stop()
                break
            if k * cfg.sample_s >= cfg.duration_s - 1e-6:
                await load  # the last interval ends with the last insert
            sample = await sampler.sample("load")
            run.samples.append(sample)
            print_sample(sample)
            k += 1
        await load
    finally:
        inserter.stop()
        poller.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await poller
        with contextlib.suppress(Exception):
            await load
    if run.error is not None:
        return
    drained_s = await wait_drained(sampler, daemon, cfg.drain_timeout_s)
    run.summary["drain_s"] = None if drained_s is None else round(drained_s, 1)
    sample = await sampler.sample("drain")
    run.samples.append(sample)
    print_sample(sample)


async def finish(
    cfg: Config,
    run: Run,
    conn: asyncpg.Connection,
    inserter: Inserter,
    sampler: Sampler,
    events: EventCounter,
    code: int | None,
) -> None:
    """Checks and summary, once the daemon has stopped."""
    depths = await sampler.depths()
    row_results, rows = await row_checks(conn, inserter.inserted)
    run.checks += row_results
    drain_s = run.summary.get("drain_s")
    run.checks.append(
        Check(
            "outboxes drained",
            not any(depths.values()) and drain_s is not None,
            f"after the drain ({'did not end' if drain_s is None else f'{drain_s:g} s'}, "
            f"<= {cfg.drain_timeout_s:g}): "
            + ", ".join(f"{n} {depths[n]}" for n in OUTBOXES)
            + "; deepest "
            + ", ".join(f"{n} {sampler.depth_max[n]:,}" for n in OUTBOXES),
            {"final": depths, "max": dict(sampler.depth_max)},
        )
    )
    jobs = int(rows["complete"]) + int(rows["failed"])
    rx = run.receiver
    events_ok = rx["unique"] == jobs and rx["bad"] == 0 and events.heard == jobs
    run.checks.append(
        Check(
            "events",
            events_ok,
            f"{jobs:,} terminal events: {rx['unique']:,} delivered to the webhook "
            f"({rx['duplicates']} again, {rx['bad']} refused, at most {rx['max_in_flight']} "
            f"at once), {events.heard:,} heard by LISTEN",
            {"jobs": jobs, "receiver": rx, "heard": events.heard, "heard_by": events.by_status},
        )
    )
    run.checks.append(rss_check(run.samples, cfg))
    run.checks.append(kept_up_check(run.samples, cfg, inserter))
    run.checks.append(
        Check("daemon exit", code == 0, f"exit status {code} on SIGTERM", {"exit_code": code})
    )
    load = [s for s in run.samples if s["phase"] == "load"]
    p99 = [s["latency_p99_ms"] for s in load if s.get("latency_p99_ms") is not None]
    first_p99 = [
        s["first_attempt_p99_ms"] for s in load if s.get("first_attempt_p99_ms") is not None
    ]
    run.summary |= {
        "inserted": inserter.inserted,
        "complete": rows["complete"],
        "failed": rows["failed"],
        "rss_first_mb": run.samples[0]["rss_mb"],
        "rss_last_load_mb": load[-1]["rss_mb"] if load else None,
        "rss_max_mb": max(s["rss_mb"] for s in run.samples),
        "latency_p99_ms_median": round(sorted(p99)[len(p99) // 2], 1) if p99 else None,
        "latency_p99_ms_max": max(p99) if p99 else None,
        "first_attempt_p99_ms_median": round(sorted(first_p99)[len(first_p99) // 2], 1)
        if first_p99
        else None,
        "outbox_max": dict(sampler.depth_max),
        "backlog_max": max(s["backlog"] for s in run.samples),
    }


def print_report(run: Run) -> None:
    """The checks and the summary."""
    if run.error:
        print(f"\nERROR: {run.error}")
    if run.tracemalloc_stats:
        print(
            "\nmemory: line, minute, RSS MB, traced MB, tracemalloc's own MB, gc objects, "
            "pymalloc arenas / used / free MB, malloc heap / used / free / mmapped MB"
        )
        for s in run.tracemalloc_stats:
            py, c = s.get("pymalloc", {}), s.get("malloc", {})
            print(
                f"  {s['n']:4d} {s['t_s'] / 60:6.1f} {s['rss_mb']:8.2f} {s['traced_mb']:8.2f} "
                f"{s['tracemalloc_mb']:8.2f} {s['gc_objects']:9,}   "
                f"{py.get('arenas', 0):5} {py.get('used_mb', 0):7.2f} {py.get('free_mb', 0):7.2f}"
                f"   {c.get('arena', 0):7.2f} {c.get('uordblks', 0):7.2f} "
                f"{c.get('fordblks', 0):7.2f} {c.get('hblkhd', 0):7.2f}"
            )
        print(f"object types grown most: {run.summary.get('types_grown')}")
    if run.tracemalloc:
        print("\nallocations that grew most (tracemalloc, by traceback):")
        for stat in run.tracemalloc:
            print(f"  +{stat['size_diff_kb']:,.1f} KiB ({stat['count_diff']:+,} blocks)")
            for frame in stat["traceback"][:5]:
                print(f"      {frame}")
    print()
    for check in run.checks:
        print(f"{'PASS' if check.ok else 'FAIL'}  {check.name}: {check.detail}")
    if run.summary:
        print("\nsummary: " + json.dumps(run.summary, default=str))
    log = run.daemon.get("log", {})
    if log:
        print(f"daemon log: {log.get('lines_by_level')}")
        for line in log.get("notable", [])[:5]:
            print(f"  {line}")


# -- the plot -------------------------------------------------------------------------------


def _nice_step(span: float, ticks: int = 5) -> float:
    """A round tick step (1, 2 or 5 times a power of ten) giving about ``ticks`` ticks."""
    raw = max(span, 1e-9) / ticks
    power = 10 ** math.floor(math.log10(raw))
    for mult in (1, 2, 5, 10):
        if raw <= mult * power:
            return mult * power
    return 10 * power


def plot(run: Run, path: Path) -> None:
    """Three stacked panels against minutes: daemon RSS (MB), backlog (jobs pending and
    processing, and the deepest outbox), latency p99 (ms; scaled to the load's samples, a
    drain sample above them drawn at the top edge with its value); drawn with Pillow."""
    from PIL import Image, ImageDraw, ImageFont

    samples = run.samples
    width, height = 1000, 840
    left, right, top, panel_h, gap = 90, 30, 50, 210, 50
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default(size=13)
    title_font = ImageFont.load_default(size=15)
    cfg = run.config
    title = (
        f"listener soak: {cfg['rate']:g} rows/s for {cfg['minutes']:.3g} min, noop with "
        f"{cfg['failure_rate']:.0%} failures, webhook {cfg['webhook_delay_ms']:g} ms, "
        "status + result columns, events"
        + (", no malloc_trim" if cfg.get("malloc_trim_interval_s") == 0 else "")
    )
    draw.text((left, 15), title, fill="black", font=title_font)
    xs = [s["minute"] for s in samples]
    x_max = max(xs[-1] if xs else 1.0, 1e-3)
    panels: list[tuple[str, list[tuple[str, list[float | None], str]]]] = [
        ("daemon RSS, MB", [("VmRSS", [s["rss_mb"] for s in samples], "#1f77b4")]),
        (
            "backlog, jobs",
            [
                ("pending + processing", [float(s["backlog"]) for s in samples], "#d62728"),
                (
                    "deepest outbox",
                    [float(max(s["outbox_max"].values())) for s in samples],
                    "#2ca02c",
                ),
            ],
        ),
        (
            "insert -> finished, ms",
            [
                ("p99", [s.get("latency_p99_ms") for s in samples], "#9467bd"),
                (
                    "p99, first attempts",
                    [s.get("first_attempt_p99_ms") for s in samples],
                    "#ff7f0e",
                ),
            ],
        ),
    ]
    plot_w = width - left - right
    under_load = [s["phase"] != "drain" for s in samples]
    for index, (label, series) in enumerate(panels):
        y0 = top + index * (panel_h + gap)
        values = [v for _, ys, _ in series for v in ys if v is not None]
        if index == 2:
            # Latency: scaled to the load; the drain's sample holds only the retried tail
            # (tens of seconds) and is drawn at the top edge with its value.
            values = [
                v
                for _, ys, _ in series
                for v, ld in zip(ys, under_load, strict=True)
                if ld and v is not None
            ] or values
        lo = min(values, default=0.0)
        hi = max(values, default=1.0)
        if index == 0:  # RSS: a window around the values, so 1 MB shows
            lo, hi = math.floor(lo - 2), math.ceil(hi + 2)
        else:
            lo = 0.0
            hi = hi * 1.1 if hi > 0 else 1.0
        step = _nice_step(hi - lo)
        lo = math.floor(lo / step) * step
        hi = math.ceil(hi / step) * step

        def sx(x: float) -> float:
            return left + plot_w * x / x_max

        def sy(y: float, lo: float = lo, hi: float = hi, y0: int = y0) -> float:
            return y0 + panel_h - panel_h * (y - lo) / max(hi - lo, 1e-9)

        draw.rectangle([left, y0, left + plot_w, y0 + panel_h], outline="#444444")
        tick = lo
        while tick <= hi + step / 2:
            y = sy(tick)
            draw.line([left, y, left + plot_w, y], fill="#e5e5e5")
            text = f"{tick:,.0f}" if step >= 1 else f"{tick:,.1f}"
            draw.text((left - 8, y), text, fill="black", font=font, anchor="rm")
            tick += step
        xstep = _nice_step(x_max, 10)
        xt = 0.0
        while xt <= x_max + 1e-9:
            draw.line([sx(xt), y0 + panel_h, sx(xt), y0 + panel_h + 4], fill="#444444")
            draw.text((sx(xt), y0 + panel_h + 6), f"{xt:g}", fill="black", font=font, anchor="mt")
            xt += xstep
        draw.text(
            (left + plot_w / 2, y0 + panel_h + 22), "minutes", fill="black", font=font, anchor="mt"
        )
        draw.text((left, y0 - 6), label, fill="black", font=font, anchor="lb")
        legend_x = left + plot_w
        for name, ys, color in reversed(series):
            points = [(sx(x), sy(min(y, hi))) for x, y in zip(xs, ys, strict=True) if y is not None]
            for x, y in zip(xs, ys, strict=True):
                if y is not None and y > hi:
                    draw.text(
                        (sx(x) - 6, sy(hi) + 4), f"{y:,.0f}", fill=color, font=font, anchor="rt"
                    )
            if len(points) > 1:
                draw.line(points, fill=color, width=2)
            for px, py in points:
                draw.ellipse([px - 2, py - 2, px + 2, py + 2], fill=color)
            draw.text((legend_x, y0 - 6), name, fill=color, font=font, anchor="rb")
            legend_x -= draw.textlength(name, font=font) + 20
    image.save(path)


# -- main -----------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rate", type=float, default=RATE, help="rows inserted a second")
    parser.add_argument("--minutes", type=float, default=MINUTES, help="minutes of load")
    parser.add_argument(
        "--connections", type=int, default=CONNECTIONS, help="inserting connections"
    )
    parser.add_argument("--sample-s", type=float, default=SAMPLE_S, help="seconds between samples")
    parser.add_argument(
        "--poll-s", type=float, default=POLL_S, help="seconds between reads of outbox depths"
    )
    parser.add_argument(
        "--failure-rate", type=float, default=FAILURE_RATE, help="LISTENER_NOOP_FAILURE_RATE"
    )
    parser.add_argument(
        "--webhook-delay-ms", type=float, default=WEBHOOK_DELAY_MS, help="receiver's delay"
    )
    parser.add_argument(
        "--webhook-concurrency",
        type=int,
        default=WEBHOOK_CONCURRENCY,
        help="LISTENER_WEBHOOK_CONCURRENCY",
    )
    parser.add_argument(
        "--drain-timeout", type=float, default=DRAIN_TIMEOUT_S, help="seconds, after the load"
    )
    parser.add_argument(
        "--rss-tolerance-mb",
        type=float,
        default=RSS_TOLERANCE_MB,
        help="largest RSS spread over the last three quarters",
    )
    parser.add_argument(
        "--backoff-base-s", type=float, help="LISTENER_BACKOFF_BASE_S (default: the daemon's)"
    )
    parser.add_argument(
        "--malloc-trim-interval-s",
        type=float,
        help="LISTENER_MALLOC_TRIM_INTERVAL_S (default: the daemon's; 0: never, the daemon "
        "before the trim)",
    )
    parser.add_argument("--log-level", default="INFO", help="LISTENER_LOG_LEVEL of the daemon")
    parser.add_argument("--daemon-log", type=Path, help="keep the daemon's log at this path")
    parser.add_argument(
        "--tracemalloc",
        type=Path,
        metavar="DIR",
        help="run the daemon under tracemalloc, a snapshot per sample into DIR",
    )
    parser.add_argument(
        "--tracemalloc-frames",
        type=int,
        default=8,
        help="frames per allocation under --tracemalloc; 0: no tracing, only the allocators' "
        "statistics (the daemon at full speed, its RSS its own)",
    )
    parser.add_argument("--json", type=Path, help="write every sample and check here")
    parser.add_argument("--plot", type=Path, help="draw RSS, backlog and p99 into this PNG")
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="about 20 s at 40 rows/s, a sample every 2 s (backoff 0.2 s): runs, not figures",
    )
    add_server_options(parser, "run")
    args = parser.parse_args(argv)
    if args.smoke:
        args.rate, args.minutes, args.connections = 40.0, 20 / 60, 2
        args.sample_s, args.poll_s, args.drain_timeout = 2.0, 0.5, 60.0
        if args.backoff_base_s is None:
            args.backoff_base_s = 0.2
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cfg = Config(
        rate=args.rate,
        minutes=args.minutes,
        connections=args.connections,
        sample_s=args.sample_s,
        poll_s=args.poll_s,
        failure_rate=args.failure_rate,
        webhook_delay_ms=args.webhook_delay_ms,
        webhook_concurrency=args.webhook_concurrency,
        drain_timeout_s=args.drain_timeout,
        rss_tolerance_mb=args.rss_tolerance_mb,
        backoff_base_s=args.backoff_base_s,
        malloc_trim_interval_s=args.malloc_trim_interval_s,
        log_level=args.log_level,
        tracemalloc_dir=args.tracemalloc,
        tracemalloc_frames=args.tracemalloc_frames,
        daemon_log=args.daemon_log.resolve() if args.daemon_log else None,
        smoke=args.smoke,
    )
    print(
        f"soak: {cfg.rate:g} rows/s for {cfg.minutes:g} min, a sample every {cfg.sample_s:g} s; "
        f"listener from {Path(listener.__file__).parent}",
        flush=True,
    )
    try:
        with bench_server(args.use_database_url) as (admin_dsn, cluster):
            pg_pid = postmaster_pid(cluster) if cluster else None
            run = asyncio.run(soak(cfg, admin_dsn, pg_pid, args.quiet_wait))
    except (RuntimeError, OSError, asyncpg.PostgresError) as error:
        print(f"the soak could not run: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: the daemon, the receiver and the cluster are stopped", file=sys.stderr)
        return 130
    print_report(run)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(run.as_json(), indent=2, default=str) + "\n")
    if args.plot and run.samples:
        args.plot.parent.mkdir(parents=True, exist_ok=True)
        plot(run, args.plot)
    return 0 if run.ok else 1


if __name__ == "__main__":
    sys.exit(main())
