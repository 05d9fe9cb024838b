"""Slow clients on the health port: throughput and /readyz latency, quiet vs 1,000 idle clients.

Usage::

    python bench/bench_health.py [--rounds 3] [--json out.json] [--use-database-url]
    python bench/bench_health.py --smoke    # tiny sizes: checks that it runs, not its figures

Scenarios (targets are for a 2-core machine):

- ``q`` quiet: an in-process daemon (noop pipeline, concurrency 10, health server on with its
  defaults: 64 connections, 10 s header timeout) drains 20,000 jobs enqueued by one INSERT,
  while a prober GETs ``/readyz`` on a new connection every 100 ms.
- ``f`` flood: the same, after ``bench/idle_clients.py`` (another process) opened 1,000
  connections that sent ``GET /readyz HTT`` and stopped. Targets: throughput within 10% of
  ``q``'s (ratio of the medians over the rounds), ``/readyz`` answering every probe.

The machine may be shared, so the two alternate over ``--rounds`` rounds (order swapped each
round) and the figures are medians; each run's CPU share of other processes is printed.

Each scenario gets a fresh database (``bench_queue.Server``). Without ``--use-database-url``
the script starts its own ``TemporaryCluster`` with default durability.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
from bench_queue import (
    QUIET_OTHER_PCT,
    QUIET_WAIT_S,
    CpuMeter,
    Figure,
    Report,
    Server,
    bench_server,
    daemon_settings,
    describe_machine,
    percentile,
    postmaster_pid,
    print_figures,
    print_load_and_errors,
    wait_drained,
)

from listener.app import Daemon
from listener.ops.logs import configure_logging

JOBS = 20_000
IDLE_CONNECTIONS = 1_000
PROBE_INTERVAL_S = 0.100
THROUGHPUT_RATIO_TARGET_PCT = 90.0
IDLE_CLIENTS = Path(__file__).resolve().parent / "idle_clients.py"
LOAD_SQL = (
    "INSERT INTO images (url) "
    "SELECT 'https://example.invalid/' || g || '.jpg' FROM generate_series(1, $1) AS g"
)


@dataclass(frozen=True)
class Sizes:
    """Jobs drained per scenario and idle connections opened in ``f``."""

    jobs: int = JOBS
    idle: int = IDLE_CONNECTIONS

    @classmethod
    def smoke(cls) -> Sizes:
        return cls(jobs=300, idle=100)


@dataclass
class Run:
    """One drain with the prober running; times in seconds, latencies in ms."""

    jobs: int
    seconds: float
    probes_ok: int
    probes_failed: int
    readyz_ms: list[float]
    idle_opened: int = 0
    idle_still_open: int | None = None
    evicted: int = 0
    refused: int = 0

    @property
    def rate(self) -> float:
        return self.jobs / self.seconds

    def summary(self) -> dict[str, Any]:
        doc = asdict(self)
        doc.pop("readyz_ms")
        doc["rate_jobs_per_s"] = self.rate
        if self.readyz_ms:
            doc["readyz_p50_ms"] = percentile(self.readyz_ms, 50)
            doc["readyz_p99_ms"] = percentile(self.readyz_ms, 99)
            doc["readyz_max_ms"] = max(self.readyz_ms)
        return doc


async def probe(url: str, stop: asyncio.Event, latencies: list[float]) -> int:
    """GET ``url`` on a new connection every ``PROBE_INTERVAL_S`` until ``stop``; returns the
    failed probes (not 200, or no answer within 5 s)."""
    failed = 0
    connector = aiohttp.TCPConnector(force_close=True)
    async with aiohttp.ClientSession(
        connector=connector, timeout=aiohttp.ClientTimeout(total=5)
    ) as http:
        while not stop.is_set():
            began = time.perf_counter()
            try:
                async with http.get(url) as r:
                    await r.read()
                    ok = r.status == 200
            except (aiohttp.ClientError, TimeoutError):
                ok = False
            if ok:
                latencies.append((time.perf_counter() - began) * 1000)
            else:
                failed += 1
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), PROBE_INTERVAL_S)
    return failed


async def read_event(proc: asyncio.subprocess.Process, event: str) -> dict[str, Any]:
    """The next line of ``idle_clients.py`` with this ``event``."""
    assert proc.stdout is not None
    while True:
        line = await proc.stdout.readline()
        if not line:
            raise RuntimeError("idle_clients.py exited early")
        doc: dict[str, Any] = json.loads(line)
        if doc["event"] == event:
            return doc


async def drain_with_probe(server: Server, label: str, sizes: Sizes, idle: int) -> Run:
    """Start a daemon (health on), optionally open ``idle`` slow connections, enqueue
    ``sizes.jobs`` jobs with one INSERT and time the drain on Postgres's clock (commit of
    the INSERT to ``max(finished_at)``), probing ``/readyz`` meanwhile."""
    async with server.database(label) as dsn:
        conn = await asyncpg.connect(dsn)
        proc: asyncio.subprocess.Process | None = None
        try:
            async with Daemon(daemon_settings(dsn, concurrency=10)) as daemon:
                assert daemon.health is not None and daemon.notifier is not None
                await daemon.notifier.wait_connected(1)
                opened = 0
                if idle:
                    proc = await asyncio.create_subprocess_exec(
                        sys.executable,
                        str(IDLE_CLIENTS),
                        "127.0.0.1",
                        str(daemon.health.port),
                        str(idle),
                        stdout=asyncio.subprocess.PIPE,
                    )
                    opened = int((await read_event(proc, "opened"))["opened"])
                stop = asyncio.Event()
                latencies: list[float] = []
                prober = asyncio.create_task(probe(f"{daemon.health.url}/readyz", stop, latencies))
                await conn.execute(LOAD_SQL, sizes.jobs)
                t0: datetime = await conn.fetchval("SELECT clock_timestamp()")
                await wait_drained(conn)
                stop.set()
                failed = await prober
                last: datetime = await conn.fetchval("SELECT max(finished_at) FROM listener.jobs")
                complete = await conn.fetchval(
                    "SELECT count(*) FROM listener.jobs WHERE status = 'complete'"
                )
                still_open: int | None = None
                if proc is not None and proc.returncode is None:
                    # The flood's state at the end of the drain: its next report.
                    still_open = int((await read_event(proc, "closed"))["open"])
                cap = daemon.health.cap
                evicted, refused = cap.evicted, cap.refused
        finally:
            if proc is not None and proc.returncode is None:
                proc.kill()
                await proc.wait()
            await conn.close()
    if complete != sizes.jobs:
        raise RuntimeError(f"only {complete} of {sizes.jobs} jobs completed")
    return Run(
        jobs=sizes.jobs,
        seconds=(last - t0).total_seconds(),
        probes_ok=len(latencies),
        probes_failed=failed,
        readyz_ms=latencies,
        idle_opened=opened,
        idle_still_open=still_open,
        evicted=evicted,
        refused=refused,
    )


def figures_for(key: str, runs: list[Run], quiet: list[Run], idle: int) -> list[Figure]:
    """The figures of scenario ``key`` over its rounds (``f`` is compared with ``quiet``)."""
    label = "quiet" if key == "q" else f"{idle:,} idle connections"
    rates = [r.rate for r in runs]
    latencies = [ms for r in runs for ms in r.readyz_ms]
    probes = sum(r.probes_ok + r.probes_failed for r in runs)
    figures = [
        Figure(
            key,
            f"throughput, {label}",
            statistics.median(rates),
            "jobs/s",
            note=f"noop, concurrency 10, {runs[0].jobs:,} jobs, INSERT commit to "
            f"max(finished_at); median of {len(runs)} round(s): "
            + ", ".join(f"{r:,.0f}" for r in rates),
        ),
        Figure(key, "/readyz p50", percentile(latencies, 50) if latencies else None, "ms"),
        Figure(key, "/readyz p99", percentile(latencies, 99) if latencies else None, "ms"),
        Figure(
            key,
            "/readyz probes failed",
            float(sum(r.probes_failed for r in runs)),
            "probes",
            0.0,
            better="lower",
            note=f"{probes} probes over all rounds, a new connection every "
            f"{PROBE_INTERVAL_S * 1000:.0f} ms, 5 s timeout",
        ),
    ]
    if key == "f":
        ratios = [100 * f.rate / q.rate for f, q in zip(runs, quiet, strict=False)]
        figures.append(
            Figure(
                key,
                "throughput flood / quiet",
                100 * statistics.median(rates) / statistics.median([q.rate for q in quiet])
                if quiet
                else None,
                "%",
                THROUGHPUT_RATIO_TARGET_PCT,
                note="ratio of the medians; per round: "
                + ", ".join(f"{r:.0f}%" for r in ratios)
                + f". Per round, of {runs[0].idle_opened} idle connections opened, the server "
                f"evicted {'/'.join(str(r.evicted) for r in runs)} and refused "
                f"{'/'.join(str(r.refused) for r in runs)}; "
                f"{'/'.join(str(r.idle_still_open) for r in runs)} were still open after the "
                "drain",
            )
        )
    return figures


async def run_all(
    server: Server,
    report: Report,
    meter: CpuMeter,
    quiet_wait_s: float,
    sizes: Sizes,
    rounds: int,
) -> None:
    """``rounds`` rounds of ``q`` and ``f``, the order swapped each round."""
    report.machine = await describe_machine(server)
    report.details["sizes"] = asdict(sizes)
    idle = {"q": 0, "f": sizes.idle}
    runs: dict[str, list[Run]] = {"q": [], "f": []}
    for number in range(rounds):
        for key in ("q", "f") if number % 2 == 0 else ("f", "q"):
            quiet = await meter.wait_quiet(QUIET_OTHER_PCT, quiet_wait_s)
            print(f"round {number + 1}, scenario {key} ...", file=sys.stderr, flush=True)
            began = time.monotonic()
            before = meter.snapshot()
            try:
                runs[key].append(await drain_with_probe(server, key, sizes, idle[key]))
            except Exception as error:
                report.errors[key] = f"{type(error).__name__}: {error}"
            load = meter.usage(before) | {
                "other_pct_before": quiet["other_pct"],
                "seconds": time.monotonic() - began,
            }
            report.load[f"{key}{number + 1}"] = load
    for key in ("q", "f"):
        report.details[key] = [r.summary() for r in runs[key]]
        if runs[key]:
            report.figures += figures_for(key, runs[key], runs["q"], idle[key])
        else:
            report.figures.append(Figure(key, "drain_with_probe", None, ""))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", type=Path, help="also write every figure to this file")
    parser.add_argument(
        "--use-database-url",
        action="store_true",
        help="use the server of DATABASE_URL instead of a temporary cluster",
    )
    parser.add_argument("--quiet-wait", type=float, default=QUIET_WAIT_S, metavar="SECONDS")
    parser.add_argument(
        "--rounds", type=int, default=3, help="rounds of q and f, order swapped each round"
    )
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="tiny sizes, one round: checks that it runs and reports; its figures mean nothing",
    )
    args = parser.parse_args(argv)
    args.sizes = Sizes.smoke() if args.smoke else Sizes()
    if args.smoke:
        args.rounds = 1
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    configure_logging("WARNING")
    report = Report()
    started = time.monotonic()
    with bench_server(args.use_database_url) as (admin_dsn, cluster):
        meter = CpuMeter([os.getpid()] + ([postmaster_pid(cluster)] if cluster else []))
        asyncio.run(
            run_all(Server(admin_dsn), report, meter, args.quiet_wait, args.sizes, args.rounds)
        )
    report.elapsed_s = time.monotonic() - started
    print()
    print_figures(report, name_width=48, target_width=8)
    print()
    print_load_and_errors(report, report.machine.get("nproc"), "scenario")
    print(f"\ntotal time {report.elapsed_s:.1f} s")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report.as_json(), indent=2, default=str) + "\n")
    return 1 if report.errors else 0


if __name__ == "__main__":
    sys.exit(main())
