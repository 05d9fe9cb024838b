"""Fleet-wide rate limit: several daemons share one provider's budget through Postgres.

Usage::

    python bench/bench_fleet.py [--daemons 3] [--rps 10] [--seconds 60] [--json out.json]
    python bench/bench_fleet.py --provider noop --daemons 4 --rps 5000 --seconds 20

Starts a throwaway cluster and N daemons sharing one fleet-wide limit of ``--rps`` requests
per second, with far more pending jobs than the window can drain:

* ``--provider openai`` (default): N ``listener run`` processes whose pipeline is one OpenAI
  step, against the fake OpenAI server in this process (it counts every request it receives
  and every request above its limit), images read from files.
* ``--provider noop``: N ``bench/fleet_daemon.py`` processes, listener's daemon with a noop
  provider that records the monotonic time of each call (high rates, where the limiter, not
  a provider, is what is measured).

Over the window after a 5 s warm-up it reports the calls per second as a share of the limit,
the most calls in any sliding one-second window, and the calls that were *early*: a call is
early when the one second ending with it holds more than ``rps`` calls. Targets: the rate
within the limit and at least ``--min-share`` of it (default 95% at 10/s; the issue's 90% at
5,000/s is given with ``--min-share 90``), and at most 1% of the calls of the worst sliding
second early.
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

from listener.cli.demo import BUNDLED_IMAGES
from listener.db.migrate import migrate
from listener.testing.cluster import TemporaryCluster, termination_as_interrupt
from listener.testing.openai_fake import FakeOpenAI

ROOT = Path(__file__).resolve().parents[1]
WARMUP_S = 5.0
EARLY_TARGET_PCT = 1.0


def max_in_window(times: list[float], window_s: float = 1.0) -> int:
    """The most timestamps in any half-open window ``[t, t + window_s)``."""
    best, lo = 0, 0
    for hi, t in enumerate(times):
        while times[lo] <= t - window_s:
            lo += 1
        best = max(best, hi - lo + 1)
    return best


def early_calls(times: list[float], limit: float, window_s: float = 1.0) -> int:
    """How many of the (sorted) ``times`` are early: the window ``(t - window_s, t]`` ending
    with the call holds more than ``limit`` calls."""
    early, lo = 0, 0
    for hi, t in enumerate(times):
        while times[lo] <= t - window_s:
            lo += 1
        if hi - lo + 1 > limit:
            early += 1
    return early


def schedule_figures(times: list[float], rps: float, seconds: float) -> dict[str, Any]:
    """Rate, share of the limit, worst sliding second and early calls of sorted ``times``."""
    rate = len(times) / seconds
    worst = max_in_window(times)
    early_in_worst = max(0, worst - int(rps))
    early = early_calls(times, rps)
    gaps = sorted(b - a for a, b in itertools.pairwise(times))
    return {
        "requests": len(times),
        "rate_rps": round(rate, 3),
        "rate_pct_of_limit": round(rate / rps * 100, 2),
        "max_in_any_1s": worst,
        "early_in_worst_1s": early_in_worst,
        "early_pct_of_worst_1s": round(early_in_worst / worst * 100, 3) if worst else 0.0,
        "early_calls": early,
        "early_pct_of_calls": round(early / len(times) * 100, 3) if times else 0.0,
        "gap_ms_min": round(gaps[0] * 1000, 3) if gaps else None,
        "gap_ms_p5": round(gaps[len(gaps) // 20] * 1000, 3) if gaps else None,
        "gap_ms_p50": round(gaps[len(gaps) // 2] * 1000, 3) if gaps else None,
    }


def daemon_env(dsn: str, concurrency: int) -> dict[str, str]:
    """The environment every daemon shares (no stray ``LISTENER_*`` of the caller's)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("LISTENER_")}
    return env | {
        "DATABASE_URL": dsn,
        "LISTENER_DATABASE_URL": dsn,
        "LISTENER_CONCURRENCY": str(concurrency),
        "LISTENER_HEALTH_PORT": "0",
        "LISTENER_LOG_LEVEL": "WARNING",
    }


async def run(
    daemons: int, rps: float, seconds: float, provider: str = "openai", concurrency: int = 32
) -> dict[str, Any]:
    """Run the scenario and return its figures."""
    if provider == "noop":
        return await run_noop(daemons, rps, seconds, concurrency)
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
            env = daemon_env(dsn, concurrency) | {
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
    return {
        "provider": "openai",
        "daemons": daemons,
        "limit_rps": rps,
        "window_s": seconds,
        **schedule_figures(times, rps, seconds),
        "violations": violations,
        "completed_by_worker": {r["worker_id"]: r["n"] for r in workers},
    }


async def run_noop(daemons: int, rps: float, seconds: float, concurrency: int) -> dict[str, Any]:
    """N ``fleet_daemon.py`` processes (noop provider recording its calls) share ``rps``."""
    cluster = TemporaryCluster()
    dsn = await asyncio.to_thread(cluster.start)
    logs = Path(tempfile.mkdtemp(prefix="listener-bench-fleet-"))
    procs: list[subprocess.Popen[bytes]] = []
    try:
        conn = await asyncpg.connect(dsn)
        await migrate(conn)
        await conn.execute(
            "CREATE TABLE images (id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY, url text)"
        )
        await conn.execute("SELECT listener.attach('public.images', 'id', 'url')")
        jobs = int(rps * (seconds + WARMUP_S) * 1.5) + 1000
        await conn.execute(
            "INSERT INTO images (url) SELECT 'noop://' || g FROM generate_series(1, $1) g", jobs
        )
        await conn.execute("SELECT listener.admit_inserted_rows($1)", jobs)
        await conn.execute("ANALYZE listener.jobs")
        env = daemon_env(dsn, concurrency) | {
            "LISTENER_RATE_LIMITS": json.dumps(
                {"noop": {"rps": rps, "burst": 1, "concurrency": concurrency}}
            ),
        }
        for i in range(daemons):
            procs.append(
                subprocess.Popen(
                    [sys.executable, str(ROOT / "bench" / "fleet_daemon.py"), str(logs / f"{i}")],
                    env=env | {"LISTENER_WORKER_ID": f"bench-{i}"},
                    cwd=logs,
                )
            )
        started = time.monotonic()
        await asyncio.sleep(WARMUP_S + seconds)
        for proc in procs:
            proc.send_signal(signal.SIGTERM)
        for proc in procs:
            await asyncio.to_thread(proc.wait, 60)
        # Every reservation, lease, give-back and pause is one UPDATE of the limiter's row.
        round_trips = await conn.fetchval(
            "SELECT n_tup_upd FROM pg_stat_user_tables "
            "WHERE schemaname = 'listener' AND relname = 'provider_limits'"
        )
        await conn.close()
        per_daemon = {}
        times: list[float] = []
        for i in range(daemons):
            path = logs / f"{i}"
            calls = [float(x) for x in path.read_text().split()] if path.exists() else []
            window = [t for t in calls if started + WARMUP_S <= t < started + WARMUP_S + seconds]
            per_daemon[f"bench-{i}"] = len(window)
            times.extend(window)
        times.sort()
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
        await asyncio.to_thread(cluster.stop)
        shutil.rmtree(logs, ignore_errors=True)
    return {
        "provider": "noop",
        "daemons": daemons,
        "limit_rps": rps,
        "window_s": seconds,
        **schedule_figures(times, rps, seconds),
        "limiter_round_trips": round_trips,
        "calls_by_daemon": per_daemon,
    }


def main(argv: list[str] | None = None) -> int:
    """Parse arguments, run, print; exit status 0 when both targets are met."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--daemons", type=int, default=3)
    parser.add_argument("--rps", type=float, default=10.0)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--provider", choices=["openai", "noop"], default="openai")
    parser.add_argument("--concurrency", type=int, default=32, help="per daemon (default 32)")
    parser.add_argument(
        "--min-share", type=float, default=95.0, help="target: rate >= this %% of the limit"
    )
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    # The cluster starts off the main thread: SIGTERM/SIGHUP must still stop it (Ctrl+C does).
    with termination_as_interrupt():
        f = asyncio.run(run(args.daemons, args.rps, args.seconds, args.provider, args.concurrency))
    f["pass_ceiling"] = f["rate_rps"] <= args.rps
    f["pass_floor"] = f["rate_pct_of_limit"] >= args.min_share
    f["pass_early"] = f["early_pct_of_worst_1s"] <= EARLY_TARGET_PCT
    verdict = {True: "PASS", False: "MISS"}
    per_daemon = f.get("completed_by_worker") or f.get("calls_by_daemon")
    print(
        f"{f['daemons']} daemons, {f['provider']} provider, limit {f['limit_rps']:g} calls/s, "
        f"{f['window_s']:g} s window after {WARMUP_S:g} s warm-up\n"
        f"  calls                 {f['requests']}\n"
        f"  rate                  {f['rate_rps']:.2f}/s = {f['rate_pct_of_limit']:.1f}% of the "
        f"limit (<= 100%: {verdict[f['pass_ceiling']]}; >= {args.min_share:g}%: "
        f"{verdict[f['pass_floor']]})\n"
        f"  worst sliding second  {f['max_in_any_1s']} calls, {f['early_in_worst_1s']} early = "
        f"{f['early_pct_of_worst_1s']:.2f}% (<= {EARLY_TARGET_PCT:g}%: "
        f"{verdict[f['pass_early']]})\n"
        f"  early calls, window   {f['early_calls']} = {f['early_pct_of_calls']:.2f}% of the "
        f"calls (the second ending with each held more than the limit)\n"
        + (f"  fake's violations     {f['violations']}\n" if "violations" in f else "")
        + f"  gaps between calls    min {f['gap_ms_min']} ms, p5 {f['gap_ms_p5']} ms, "
        f"p50 {f['gap_ms_p50']} ms\n"
        f"  per daemon            {per_daemon}"
        + (
            f"\n  limiter round trips   {f['limiter_round_trips']}"
            if "limiter_round_trips" in f
            else ""
        )
    )
    if args.json:
        args.json.write_text(json.dumps(f, indent=2))
    return 0 if f["pass_ceiling"] and f["pass_floor"] and f["pass_early"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
