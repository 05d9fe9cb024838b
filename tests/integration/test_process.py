"""`listener run` as a real process: SIGKILL mid-job (lease recovery) and graceful SIGTERM."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import asyncpg
from awaiting import jobs_finished
from support import (
    RecordingProvider,
    cli,
    fast_settings,
    listener_run,
    make_table,
    wait_until,
)

from listener.app import Daemon


async def test_sigkill_mid_job_lease_expires_and_another_daemon_completes_it(
    database_url: str,
    conn: asyncpg.Connection,
    env_for_subprocess: dict[str, str],
    tmp_path: Path,
) -> None:
    table = await make_table(conn)
    await conn.execute(f"INSERT INTO {table} (url) VALUES ('slow')")
    with listener_run(
        env_for_subprocess,
        tmp_path / "victim.log",
        pipeline="noop",
        noop_delay_s="600",
        lease_s="2",
        worker_id="victim",
    ) as victim:
        await wait_until(lambda: _held_by(conn, "victim"), timeout=30)
        os.kill(victim.pid, signal.SIGKILL)
        victim.wait()
    killed_at = time.monotonic()
    provider = RecordingProvider()
    settings = fast_settings(database_url, lease_s=2.0, worker_id="rescuer")
    async with Daemon(settings, providers=[provider], health=False) as daemon:
        await jobs_finished(daemon, conn, 1, timeout=20)
    recovered_in = time.monotonic() - killed_at
    job = await conn.fetchrow("SELECT status, attempts, worker_id FROM listener.jobs")
    assert dict(job) == {"status": "complete", "attempts": 2, "worker_id": "rescuer"}
    assert recovered_in < 2.0 + 2.0 + 2.0  # lease + one heartbeat interval + slack


async def _held_by(conn: asyncpg.Connection, worker: str) -> bool:
    return bool(
        await conn.fetchval(
            "SELECT count(*) FROM listener.jobs WHERE status = 'processing' AND worker_id = $1",
            worker,
        )
    )


async def test_sigterm_finishes_running_jobs_and_exits_zero(
    conn: asyncpg.Connection, env_for_subprocess: dict[str, str], tmp_path: Path
) -> None:
    table = await make_table(conn)
    await conn.execute(f"INSERT INTO {table} (url) SELECT 'u' || g FROM generate_series(1, 6) g")
    with listener_run(
        env_for_subprocess,
        tmp_path / "graceful.log",
        pipeline="noop",
        noop_delay_s="1",
        concurrency="2",
        worker_id="graceful",
        shutdown_grace_s="10",
    ) as proc:
        # Two jobs recorded complete: by then the consumers have started the next two from
        # the prefetch buffer (a job only claimed, not started, is handed back on SIGTERM, so
        # waiting for the first claim would race the consumers).
        await wait_until(lambda: _complete(conn, at_least=2), timeout=30)
        proc.send_signal(signal.SIGTERM)
        code = await asyncio.to_thread(proc.wait, 20)
    assert code == 0, (tmp_path / "graceful.log").read_text()
    rows = await conn.fetch("SELECT status, count(*) AS n FROM listener.jobs GROUP BY 1")
    by_status = {r["status"]: r["n"] for r in rows}
    assert by_status.get("processing") is None
    # The two running at SIGTERM finished within the grace period.
    assert by_status.get("complete", 0) >= 4
    assert sum(by_status.values()) == 6


async def _complete(conn: asyncpg.Connection, at_least: int) -> bool:
    n = await conn.fetchval("SELECT count(*) FROM listener.jobs WHERE status = 'complete'")
    return int(n) >= at_least


async def test_sigterm_past_grace_hands_jobs_back_without_counting_the_attempt(
    conn: asyncpg.Connection, env_for_subprocess: dict[str, str], tmp_path: Path
) -> None:
    table = await make_table(conn)
    await conn.execute(f"INSERT INTO {table} (url) SELECT 'u' || g FROM generate_series(1, 3) g")
    with listener_run(
        env_for_subprocess,
        tmp_path / "impatient.log",
        pipeline="noop",
        noop_delay_s="600",
        concurrency="3",
        worker_id="impatient",
        shutdown_grace_s="0.5",
        log_json="1",
    ) as proc:
        await wait_until(lambda: _count_held(conn, "impatient", 3), timeout=30)
        proc.send_signal(signal.SIGTERM)
        code = await asyncio.to_thread(proc.wait, 20)
    log = (tmp_path / "impatient.log").read_text()
    assert code == 0, log
    # LISTENER_LOG_JSON=1: every log line is one JSON object.
    messages = [json.loads(line)["message"] for line in log.splitlines() if line]
    assert "handed 3 unfinished jobs back as pending" in messages
    rows = await conn.fetch("SELECT status, attempts, lease_token FROM listener.jobs")
    assert [tuple(r) for r in rows] == [("pending", 0, None)] * 3


async def _count_held(conn: asyncpg.Connection, worker: str, n: int) -> bool:
    return bool(
        await conn.fetchval(
            "SELECT count(*) = $2 FROM listener.jobs WHERE status = 'processing' "
            "AND worker_id = $1",
            worker,
            n,
        )
    )


async def test_backfill_ctrl_c_stops_following_and_prints_a_summary(
    conn: asyncpg.Connection, env_for_subprocess: dict[str, str], tmp_path: Path
) -> None:
    await make_table(conn, attach=False)
    await conn.execute("INSERT INTO images (url) SELECT 'u' || g FROM generate_series(1, 40) g")
    await conn.execute("SELECT listener.attach('images', 'id', 'url')")
    env = {**env_for_subprocess, "COLUMNS": "200", "NO_COLOR": "1"}
    # No daemon runs: the progress bar would wait forever, until Ctrl+C.
    proc = subprocess.Popen(
        [sys.executable, "-m", "listener", "backfill", "images"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        await wait_until(lambda: _jobs_exist(conn, 40), timeout=30)
        proc.send_signal(signal.SIGINT)
        out, err = await asyncio.to_thread(proc.communicate, timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    assert "enqueued 40 jobs" in out
    # Almost always it is following by then; if the signal lands right after the last chunk,
    # it stops before following, which is as correct.
    followed = "stopped following: 0 complete, 0 failed, 40 still queued" in out
    assert followed or "interrupted, run the same command again" in out, out
    # Resumable: the jobs are there, and running it again enqueues nothing new.
    again = cli(env, "backfill", "images", "--no-wait")
    assert "enqueued 0 jobs" in again.stdout


async def _jobs_exist(conn: asyncpg.Connection, n: int) -> bool:
    return bool(await conn.fetchval("SELECT count(*) >= $1 FROM listener.jobs", n))
