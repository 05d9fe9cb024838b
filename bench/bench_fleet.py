"""Fleet-wide rate limit: several daemons share one provider's budget through Postgres.

Usage::

    python bench/bench_fleet.py [--daemons 3] [--rps 10] [--seconds 60] [--json out.json]

Starts a throwaway cluster, the fake OpenAI server (in this process, counting every request
it receives and every request above its limit), a static server with a photo, and N
``listener run`` processes whose pipeline is one OpenAI step limited to ``--rps`` requests
per second. With far more pending jobs than the window can drain, it measures, over the
window after a 5 s warm-up: the requests per second the fake received, the most requests in
any sliding one-second window, the fake's violations (requests that found floor(rps) others
in the second before them) and the gaps between requests. Target: no more than ``rps``
requests per second together over the window, and at least 95% of it when there is work.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import asyncpg
from PIL import Image

from listener.db.cluster import TemporaryCluster
from listener.db.migrate import migrate
from listener.demo import BUNDLED_IMAGES
from listener.testing.openai_fake import FakeOpenAI

WARMUP_S = 5.0


def max_in_window(times: list[float], window_s: float = 1.0) -> int:
    """The most timestamps in any half-open window ``[t, t + window_s)``."""
    best, lo = 0, 0
    for hi, t in enumerate(times):
        while times[lo] <= t - window_s:
            lo += 1
        best = max(best, hi - lo + 1)
    return best


async def run(daemons: int, rps: float, seconds: float) -> dict[str, Any]:
    """Run the scenario and return its figures."""
    cluster = TemporaryCluster()
    dsn = await asyncio.to_thread(cluster.start)
    photos = Path(tempfile.mkdtemp(prefix="listener-bench-photos-"))
    # A small photo: the measurement is the request schedule, not image transfer.
    with Image.open(BUNDLED_IMAGES / "rocket.jpg") as img:
        img.resize((320, 213)).save(photos / "rocket.jpg", quality=85)
    procs: list[subprocess.Popen[bytes]] = []
    try:
        conn = await asyncpg.connect(dsn)
        await migrate(conn)
        await conn.execute(
            "CREATE TABLE images (id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY, url text)"
        )
        await conn.execute("SELECT listener.attach('public.images', 'id', 'url')")
        jobs = int(rps * (seconds + WARMUP_S) * 2)
        async with FakeOpenAI(rps_limit=rps) as fake:
            env = {
                **os.environ,
                "DATABASE_URL": dsn,
                "LISTENER_DATABASE_URL": dsn,
                "LISTENER_PIPELINE": "tiered",
                "LISTENER_TIERS__TIER1": '["openai"]',
                "LISTENER_OPENAI__API_KEY": "sk-bench",
                "LISTENER_OPENAI__BASE_URL": fake.base_url,
                "LISTENER_OPENAI__IMAGE_TRANSPORT": "inline",
                "LISTENER_RATE_LIMITS": json.dumps(
                    {"openai": {"rps": rps, "burst": 1, "concurrency": 32}}
                ),
                # Files, not a local HTTP server: this process's event loop belongs to the
                # fake, whose arrival times are the measurement.
                "LISTENER_FETCH__ALLOW_FILE_URLS": "true",
                "LISTENER_CONCURRENCY": "32",
                "LISTENER_HEALTH_PORT": "0",
                "LISTENER_LOG_LEVEL": "WARNING",
            }
            for i in range(daemons):
                env_i = {**env, "LISTENER_WORKER_ID": f"bench-{i}"}
                procs.append(subprocess.Popen([sys.executable, "-m", "listener", "run"], env=env_i))
            await conn.execute(
                "INSERT INTO images (url) SELECT $1 || g FROM generate_series(1, $2) g",
                f"file://{photos}/rocket.jpg#",
                jobs,
            )
            started = time.monotonic()
            await asyncio.sleep(WARMUP_S + seconds)
            for proc in procs:
                proc.send_signal(signal.SIGTERM)
            for proc in procs:
                await asyncio.to_thread(proc.wait, 60)
            times = sorted(
                r["received_at"]
                for r in fake.requests
                if started + WARMUP_S <= r["received_at"] < started + WARMUP_S + seconds
            )
            violations = fake.violations
            workers = await conn.fetch(
                "SELECT worker_id, count(*) AS n FROM listener.jobs "
                "WHERE status = 'complete' GROUP BY 1 ORDER BY 1"
            )
        await conn.close()
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
        await asyncio.to_thread(cluster.stop)
        shutil.rmtree(photos, ignore_errors=True)
    rate = len(times) / seconds
    gaps = sorted(b - a for a, b in itertools.pairwise(times))
    return {
        "gap_ms_min": round(gaps[0] * 1000, 1) if gaps else None,
        "gap_ms_p5": round(gaps[len(gaps) // 20] * 1000, 1) if gaps else None,
        "gap_ms_p50": round(gaps[len(gaps) // 2] * 1000, 1) if gaps else None,
        "daemons": daemons,
        "limit_rps": rps,
        "window_s": seconds,
        "requests": len(times),
        "rate_rps": round(rate, 3),
        "max_in_any_1s": max_in_window(times),
        "violations": violations,
        "completed_by_worker": {r["worker_id"]: r["n"] for r in workers},
        "pass_ceiling": rate <= rps,
        "pass_floor": rate >= 0.95 * rps,
    }


def main(argv: list[str] | None = None) -> int:
    """Parse arguments, run, print; exit status 0 when both targets are met."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--daemons", type=int, default=3)
    parser.add_argument("--rps", type=float, default=10.0)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    figures = asyncio.run(run(args.daemons, args.rps, args.seconds))
    print(
        f"{figures['daemons']} daemons, limit {figures['limit_rps']:g} requests/s, "
        f"{figures['window_s']:g} s window after {WARMUP_S:g} s warm-up\n"
        f"  requests received     {figures['requests']}\n"
        f"  rate                  {figures['rate_rps']:.2f}/s   "
        f"(target <= {args.rps:g}: {'PASS' if figures['pass_ceiling'] else 'MISS'}; "
        f">= {0.95 * args.rps:g}: {'PASS' if figures['pass_floor'] else 'MISS'})\n"
        f"  most in any 1 s       {figures['max_in_any_1s']}\n"
        f"  fake's violations     {figures['violations']}\n"
        f"  gaps between requests min {figures['gap_ms_min']} ms, p5 {figures['gap_ms_p5']} ms, "
        f"p50 {figures['gap_ms_p50']} ms\n"
        f"  jobs per daemon       {figures['completed_by_worker']}"
    )
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))
    return 0 if figures["pass_ceiling"] and figures["pass_floor"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
