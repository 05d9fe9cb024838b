"""Status read latency at 1,000,000 jobs: ``/status``, ``/``, ``/metrics``, ``listener status``.

Usage::

    python bench/bench_status.py                  # 1,000,000 jobs, about 1 to 2 minutes
    python bench/bench_status.py --jobs 200000 --requests 100 --json out.json
    python bench/bench_status.py --smoke          # tiny sizes: checks that it runs
    DATABASE_URL=postgresql://... python bench/bench_status.py --use-database-url

One fresh database (own ``TemporaryCluster`` with default durability, or the server of
``DATABASE_URL``): three attached tables, then ``--jobs`` jobs written straight into
``listener.jobs`` with one ``INSERT ... SELECT generate_series`` (85% complete, 5% failed with
20 reasons, 1% cancelled, 1% batched, 6% pending, 2% processing; 1,000 owners; finished over
the last 7 days), a result per complete job (a tenth of them priced), the counters folded
(the migration's triggers saw the inserts), ``VACUUM ANALYZE``. A daemon (noop provider) serves
the health endpoints; the pending jobs are due tomorrow, so it claims nothing and the figures
measure reads only.

Figures (p50 / p95 over ``--requests`` calls each, after 3 warm-up calls):

- ``/status document (DB)``: ``status_document`` called directly: the cache bypassed, every
  query run (the rollup included).
- ``/ page (DB + render)``: the same plus rendering the HTML.
- ``/metrics (DB)``: the counters' query ``queue_counts``.
- ``listener status --json (DB)``: what the command does after Python has started: a new
  connection, ``queue_status`` (its reads one after the other), the connection closed.
- ``GET /status``, ``GET /``, ``GET /metrics`` as served over HTTP (one client, back to back;
  ``/status`` and ``/`` come from the 1 s cache but for the first request of each second).
- ``listener status --json`` as a subprocess (5 runs, info: mostly Python's start-up).

Target: <= 10 ms for the DB figures and the served ones at 1,000,000 jobs.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import statistics
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit, urlunsplit

import aiohttp
import asyncpg
from bench_queue import bench_server

from listener.analysis.providers.noop import NoopProvider
from listener.app import Daemon
from listener.db.migrate import migrate
from listener.db.queries import Queries
from listener.ops.health import HealthSources, status_document
from listener.ops.logs import configure_logging
from listener.ops.status import queue_status
from listener.ops.status_page import render
from listener.settings import Settings

TARGET_MS = 10.0
TABLES = ("public.images", "public.photos", "public.scans")
OWNERS = 1_000

BUILD_SQL = """
INSERT INTO listener.jobs (source_table, source_id, image_url, owner_id, status, priority,
                           attempts, max_attempts, run_after, lease_token, lease_expires_at,
                           worker_id, last_error, created_at, started_at, finished_at,
                           batch_step)
SELECT t.source_table, g::text, 'https://img.example.com/' || g || '.jpg',
       'owner-' || (g % $2), s.status, CASE WHEN g % 10 = 0 THEN 100 ELSE 0 END,
       1, 5,
       CASE WHEN s.status = 'pending' THEN now() + interval '1 day' ELSE now() END,
       CASE WHEN s.status = 'processing' THEN gen_random_uuid() END,
       CASE WHEN s.status = 'processing' THEN now() + interval '1 day' END,
       CASE WHEN s.status = 'processing' THEN 'bench' END,
       CASE WHEN s.status = 'failed'
            THEN 'reason ' || (g % 20) || ': HTTP 404 from https://img.example.com/' || g END,
       f.at - interval '1 minute', f.at - interval '2 seconds',
       CASE WHEN s.status IN ('complete', 'failed', 'cancelled') THEN f.at END,
       CASE WHEN s.status = 'batched' THEN 'openai.tier1' END
FROM generate_series(1, $1) AS g
CROSS JOIN LATERAL (SELECT ($3::text[])[1 + g % 3] AS source_table) AS t
CROSS JOIN LATERAL (SELECT CASE
        WHEN g % 100 < 85 THEN 'complete' WHEN g % 100 < 90 THEN 'failed'
        WHEN g % 100 < 91 THEN 'cancelled' WHEN g % 100 < 92 THEN 'batched'
        WHEN g % 100 < 98 THEN 'pending' ELSE 'processing' END AS status) AS s
CROSS JOIN LATERAL (SELECT now() - (g::float8 / $1) * interval '7 days' AS at) AS f
"""

RESULTS_SQL = """
INSERT INTO listener.results (job_id, step, provider, output, calls, cost_usd, created_at)
SELECT id, 'noop.step', CASE WHEN id % 10 = 0 THEN 'openai' ELSE 'local' END, '{}'::jsonb, 1,
       CASE WHEN id % 10 = 0 THEN 0.0004 ELSE 0 END, finished_at
FROM listener.jobs WHERE status = 'complete'
"""


def dsn_for(dsn: str, database: str) -> str:
    """``dsn`` (a ``postgresql://`` URL) pointed at ``database``."""
    return urlunsplit(urlsplit(dsn)._replace(path="/" + quote(database, safe="")))


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (``q`` in 0..100) of a non-empty list."""
    ordered = sorted(values)
    rank = max(1, min(len(ordered), round(q / 100 * len(ordered) + 0.5)))
    return ordered[rank - 1]


async def build(dsn: str, jobs: int) -> dict[str, float]:
    """Tables, jobs, results, counters folded, VACUUM ANALYZE; seconds per phase."""
    conn = await asyncpg.connect(dsn)
    took: dict[str, float] = {}
    try:
        await migrate(conn)
        for table in TABLES:
            name = table.split(".", 1)[1]
            await conn.execute(
                f"CREATE TABLE {table} (id bigint PRIMARY KEY, url text, owner_id text)"
            )
            await conn.execute(
                "SELECT listener.attach($1, 'id', 'url', 'owner_id', NULL)", f"public.{name}"
            )
        began = time.monotonic()
        await conn.execute(BUILD_SQL, jobs, OWNERS, list(TABLES))
        await conn.execute(RESULTS_SQL)
        took["insert_s"] = time.monotonic() - began
        began = time.monotonic()
        await conn.execute("SELECT listener.roll_up_job_counts()")
        took["rollup_s"] = time.monotonic() - began
        began = time.monotonic()
        await conn.execute("VACUUM ANALYZE")
        took["vacuum_s"] = time.monotonic() - began
        took["jobs"] = float(await conn.fetchval("SELECT count(*) FROM listener.jobs"))
    finally:
        await conn.close()
    return took


async def timed(call: Callable[[], Awaitable[Any]], n: int) -> list[float]:
    """Milliseconds per call of ``call``, ``n`` calls after 3 warm-up calls."""
    for _ in range(3):
        await call()
    out: list[float] = []
    for _ in range(n):
        began = time.perf_counter()
        await call()
        out.append((time.perf_counter() - began) * 1000)
    return out


def cli_runs(dsn: str, n: int) -> list[float]:
    """Wall milliseconds of ``python -m listener status --json`` subprocesses."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("LISTENER_")}
    env["DATABASE_URL"] = dsn
    out: list[float] = []
    for _ in range(n):
        began = time.perf_counter()
        proc = subprocess.run(
            [sys.executable, "-m", "listener", "status", "--json"],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        out.append((time.perf_counter() - began) * 1000)
        if proc.returncode != 0:
            raise RuntimeError(f"listener status --json failed: {proc.stderr[-500:]}")
        json.loads(proc.stdout)
    return out


async def measure(dsn: str, requests: int, cli: int) -> dict[str, list[float]]:
    settings = Settings(
        database_url=dsn,
        health_port=0,
        health_host="127.0.0.1",
        poll_interval_s=60.0,
        pool_min_size=2,
        pool_max_size=4,
    )
    samples: dict[str, list[float]] = {}
    async with Daemon(settings, providers=[NoopProvider()]) as daemon:
        assert daemon.health is not None and daemon.pool is not None
        assert daemon.queries is not None and daemon.worker is not None
        assert daemon.notifier is not None
        queries = daemon.queries
        sources = HealthSources(
            pool=daemon.pool,
            queries=queries,
            notifier=daemon.notifier,
            worker=daemon.worker,
            metrics=daemon.metrics,
            providers=["noop"],
            started_at=time.monotonic(),
        )

        async def page() -> None:
            render(await status_document(sources))

        async def cli_db() -> None:
            conn = await asyncpg.connect(dsn)
            try:
                await queue_status(Queries(conn), None)
            finally:
                await conn.close()

        samples["/status document (DB)"] = await timed(lambda: status_document(sources), requests)
        samples["/ page (DB + render)"] = await timed(page, requests)
        samples["/metrics (DB)"] = await timed(queries.queue_counts, requests)
        samples["listener status --json (DB)"] = await timed(cli_db, requests)
        async with aiohttp.ClientSession(daemon.health.url) as http:
            for path in ("/status", "/", "/metrics"):

                async def get(path: str = path) -> None:
                    async with http.get(path) as r:
                        assert r.status == 200, (path, r.status)
                        await r.read()

                samples[f"GET {path} (served)"] = await timed(get, requests)
    if cli:
        samples["listener status --json (subprocess)"] = await asyncio.to_thread(cli_runs, dsn, cli)
    return samples


async def run(admin_dsn: str, jobs: int, requests: int, cli: int) -> dict[str, Any]:
    name = f"bench_status_{secrets.token_hex(3)}"
    admin = await asyncpg.connect(admin_dsn)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    dsn = dsn_for(admin_dsn, name)
    try:
        built = await build(dsn, jobs)
        samples = await measure(dsn, requests, cli)
    finally:
        admin = await asyncpg.connect(admin_dsn)
        try:
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await admin.close()
    figures = []
    for label, values in samples.items():
        info = "subprocess" in label
        p95 = percentile(values, 95)
        figures.append(
            {
                "name": label,
                "p50_ms": round(statistics.median(values), 3),
                "p95_ms": round(p95, 3),
                "max_ms": round(max(values), 3),
                "n": len(values),
                "target_ms": None if info else TARGET_MS,
                "verdict": "info" if info else ("PASS" if p95 <= TARGET_MS else "MISS"),
            }
        )
    return {"jobs": jobs, "build": built, "figures": figures}


def print_report(doc: dict[str, Any]) -> None:
    b = doc["build"]
    print(
        f"{int(b['jobs']):,} jobs built in {b['insert_s']:.1f} s (rollup {b['rollup_s']:.2f} s, "
        f"VACUUM ANALYZE {b['vacuum_s']:.1f} s)"
    )
    print(f"{'figure':42} {'p50 ms':>8} {'p95 ms':>8} {'max ms':>8} {'target':>7}  verdict")
    for f in doc["figures"]:
        target = "" if f["target_ms"] is None else f"<= {f['target_ms']:g}"
        print(
            f"{f['name']:42} {f['p50_ms']:8.2f} {f['p95_ms']:8.2f} {f['max_ms']:8.2f} "
            f"{target:>7}  {f['verdict']}"
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=1_000_000)
    parser.add_argument("--requests", type=int, default=50, help="calls per figure")
    parser.add_argument("--cli-runs", type=int, default=5, help="listener status subprocesses")
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    parser.add_argument(
        "--use-database-url",
        action="store_true",
        help="use the server of DATABASE_URL (a role that may CREATE DATABASE)",
    )
    parser.add_argument(
        "--smoke", action="store_true", help="2,000 jobs, 5 calls each: runs, not figures"
    )
    args = parser.parse_args(argv)
    if args.smoke:
        args.jobs, args.requests, args.cli_runs = 2_000, 5, 1
    configure_logging("WARNING")
    with bench_server(args.use_database_url) as (admin_dsn, _):
        doc = asyncio.run(run(admin_dsn, args.jobs, args.requests, args.cli_runs))
    print_report(doc)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(doc, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
