"""SIGKILL instead of SIGTERM: a step is billed twice only when the kill lands between the
provider's answer and the step's commit.

``listener run`` runs as a real process against a fake OpenAI served from this test's event
loop, with faults (500s, 429s) and a latency, so answers are in flight when the process is
killed. Every row shows a different image, sent inline, so each billed request is attributed
to its (row, tier) by the hash of the image bytes and the request's response schema.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import os
import random
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from PIL import Image, ImageDraw
from support import (
    StaticServer,
    all_finished,
    counts,
    listener_run,
    make_table,
    random_faults,
    wait_until,
)

from listener.testing.openai_fake import FakeOpenAI

ROWS = 30
CONCURRENCY = 4
LATENCY_S = 0.25
# The longest a step may take from the provider's answer (sent LATENCY_S after it is decided)
# to its commit: reading the response, parsing it, one short fenced transaction.
COMMIT_MARGIN_S = 1.0
# Kill when this many answers have been billed in all (of about 3 * ROWS without kills).
KILL_AFTER_ANSWERS = (20, 50)
LEASE_S = 2.0
# The answers' response schemas name the tier (listener.providers.openai).
TIER_OF_SCHEMA = {"Tier1Analysis": "tier1", "Tier2Parts": "tier2", "Tier3Assessment": "tier3"}

Step = tuple[str, str]  # (source_id, tier)


@dataclass
class Kill:
    """One SIGKILL: when it landed and the steps whose answer was then decided but unsent."""

    worker_id: str
    at: float
    answered_in_flight: set[Step]
    requests_in_flight: int


def distinct_pngs(folder: Path, n: int) -> dict[str, str]:
    """Write ``n`` small PNGs that all differ; returns {sha256 of the bytes: file name}."""
    rng = random.Random(11)
    by_hash: dict[str, str] = {}
    for i in range(n):
        colour = (i * 37 % 256, i * 91 % 256, i * 151 % 256)
        image = Image.new("RGB", (48, 40), colour)
        draw = ImageDraw.Draw(image)
        stripe = 3 + i % 7
        for x in range(0, 48, 2 * stripe):
            draw.rectangle(
                (x, 0, x + stripe - 1, 39), fill=(255 - colour[0], rng.randrange(256), 128)
            )
        draw.ellipse((i % 20, i % 15, i % 20 + 20, i % 15 + 18), fill=(rng.randrange(256),) * 3)
        name = f"img{i:02d}.png"
        image.save(folder / name, format="PNG")
        digest = hashlib.sha256((folder / name).read_bytes()).hexdigest()
        assert digest not in by_hash, "two generated images are identical"
        by_hash[digest] = name
    return by_hash


def step_of(body: dict[str, Any], row_of_image: dict[str, str]) -> Step:
    """The (source_id, tier) a chat request was for: its inline image and response schema."""
    tier = TIER_OF_SCHEMA[body["response_format"]["json_schema"]["name"]]
    (part,) = [p for p in body["messages"][0]["content"] if p["type"] == "image_url"]
    header, _, data = part["image_url"]["url"].partition(",")
    assert header.startswith("data:") and header.endswith(";base64"), header
    return row_of_image[hashlib.sha256(base64.b64decode(data)).hexdigest()], tier


def daemon_env(env: dict[str, str], fake: FakeOpenAI, worker_id: str) -> dict[str, str]:
    """``listener run``'s settings: three OpenAI tiers at the fake, short lease, fast retries."""
    return {
        **env,
        "LISTENER_WORKER_ID": worker_id,
        "LISTENER_PIPELINE": "tiered",
        "LISTENER_TIERS__TIER1": '["openai"]',
        "LISTENER_TIERS__TIER2": '["openai"]',
        "LISTENER_TIERS__TIER3": '["openai"]',
        "LISTENER_TIERS__TIER2_MIN_QUALITY": "-1",
        "LISTENER_TIERS__TIER3_MIN_SIDE": "1",
        "LISTENER_OPENAI__BASE_URL": fake.base_url,
        "LISTENER_OPENAI__API_KEY": "sk-test",
        "LISTENER_OPENAI__IMAGE_TRANSPORT": "inline",
        "LISTENER_OPENAI__TIMEOUT_S": "20",
        "LISTENER_FETCH__ALLOWED_HOSTS": '["127.0.0.1"]',
        "LISTENER_RATE_LIMITS": json.dumps(
            {"openai": {"rps": 200, "burst": 20, "concurrency": CONCURRENCY}}
        ),
        "LISTENER_CONCURRENCY": str(CONCURRENCY),
        "LISTENER_LEASE_S": str(LEASE_S),
        "LISTENER_MAX_ATTEMPTS": "100",
        "LISTENER_BACKOFF_BASE_S": "0.05",
        "LISTENER_BACKOFF_CAP_S": "0.2",
        "LISTENER_POLL_INTERVAL_S": "0.2",
        "LISTENER_SHUTDOWN_GRACE_S": "10",
        "LISTENER_HEALTH_HOST": "127.0.0.1",
        "LISTENER_HEALTH_PORT": "0",
    }


def in_flight(fake: FakeOpenAI, row_of_image: dict[str, str], now: float) -> tuple[set[Step], int]:
    """Steps answered (billed) whose answer is not sent yet, and requests of any kind waiting.

    Every request, error or answer, is decided when it arrives and sent ``latency_s`` later.
    """
    answered = {
        step_of(body, row_of_image)
        for body, at in zip(fake.answered, fake.answered_at, strict=True)
        if now < at + fake.latency_s
    }
    waiting = sum(1 for r in fake.requests if now < r["received_at"] + fake.latency_s)
    return answered, waiting


async def kill_mid_answer(
    proc: subprocess.Popen[bytes],
    fake: FakeOpenAI,
    row_of_image: dict[str, str],
    worker_id: str,
    after_answers: int,
) -> Kill:
    """SIGKILL ``proc`` once ``after_answers`` are billed and a billed answer is still unsent.

    The check and the kill run without yielding to the event loop the fake answers from, so
    the answers seen in flight have certainly not reached the daemon.
    """
    deadline = time.monotonic() + 60
    while True:
        assert proc.poll() is None, f"{worker_id} exited early with {proc.returncode}"
        now = time.monotonic()
        answered, waiting = in_flight(fake, row_of_image, now)
        if len(fake.answered) >= after_answers and answered:
            os.kill(proc.pid, signal.SIGKILL)
            killed_at = time.monotonic()
            break
        if now > deadline:
            raise TimeoutError(f"{after_answers} answers with one in flight never happened")
        await asyncio.sleep(0.005)
    await asyncio.to_thread(proc.wait, 10)
    return Kill(worker_id, killed_at, answered, waiting)


async def _processing_by(conn: asyncpg.Connection, worker_id: str) -> int:
    return int(
        await conn.fetchval(
            "SELECT count(*) FROM listener.jobs WHERE status = 'processing' AND worker_id = $1",
            worker_id,
        )
    )


# About 20 s on 2 cores; the waits inside are generous for slow machines.
@pytest.mark.timeout(300)
async def test_sigkill_bills_a_step_twice_only_between_answer_and_commit(
    conn: asyncpg.Connection, env_for_subprocess: dict[str, str], tmp_path: Path
) -> None:
    images = tmp_path / "images"
    images.mkdir()
    name_of_hash = distinct_pngs(images, ROWS)
    table = await make_table(conn)
    log = tmp_path / "listener.log"
    async with FakeOpenAI(latency_s=LATENCY_S) as fake, StaticServer(str(images)) as static:
        fake.fault_plan = random_faults(5)
        names = sorted(name_of_hash.values())
        ids = await conn.fetch(
            f"INSERT INTO {table} (url) SELECT unnest($1::text[]) RETURNING id, url",
            [f"{static.base_url}/{name}" for name in names],
        )
        row_of_name = {r["url"].rsplit("/", 1)[1]: str(r["id"]) for r in ids}
        row_of_image = {digest: row_of_name[name] for digest, name in name_of_hash.items()}

        kills: list[Kill] = []
        for n, after in enumerate(KILL_AFTER_ANSWERS):
            worker_id = f"killed{n}"
            env = daemon_env(env_for_subprocess, fake, worker_id)
            with listener_run(env, log, console_script=True, cwd=tmp_path) as proc:
                kills.append(await kill_mid_answer(proc, fake, row_of_image, worker_id, after))
            # The killed daemon released nothing: its jobs stay processing until the lease
            # runs out and the next daemon reaps them.
            assert await _processing_by(conn, worker_id) > 0, log.read_text()
        env = daemon_env(env_for_subprocess, fake, "last")
        with listener_run(env, log, console_script=True, cwd=tmp_path) as proc:
            await wait_until(lambda: all_finished(conn, ROWS), timeout=120, interval=0.2)
            proc.send_signal(signal.SIGTERM)
            code = await asyncio.to_thread(proc.wait, 30)
        assert code == 0, log.read_text()

    assert await counts(conn) == {"complete": ROWS}, log.read_text()
    stored = await conn.fetch(
        "SELECT j.source_id, r.step FROM listener.results r JOIN listener.jobs j ON j.id = r.job_id"
    )
    every_step = {
        (row, tier) for row in row_of_name.values() for tier in ("tier1", "tier2", "tier3")
    }
    assert sorted((r["source_id"], r["step"].removeprefix("openai.")) for r in stored) == sorted(
        every_step
    )

    answers: dict[Step, list[float]] = {}
    for body, at in zip(fake.answered, fake.answered_at, strict=True):
        answers.setdefault(step_of(body, row_of_image), []).append(at)
    assert set(answers) == every_step
    twice = {step: times for step, times in answers.items() if len(times) > 1}
    measured = (
        f"{len(twice)} steps billed twice or more ({sum(len(t) - 1 for t in twice.values())} "
        f"extra answers), {len(kills)} kills, {len(fake.answered)} answers billed of "
        f"{len(fake.requests)} requests; in flight at the kills: "
        + ", ".join(
            f"{len(k.answered_in_flight)} answered / {k.requests_in_flight} requests" for k in kills
        )
    )
    print(measured)

    # Not vacuous: each kill cut off at least one answer the provider had already billed, and
    # such a step cannot have been stored by the killed daemon, so it was billed again.
    for kill in kills:
        assert kill.answered_in_flight, measured
        assert kill.answered_in_flight <= set(twice), measured
    # Billed again only for a kill in the window: every answer but the last of a step was
    # decided before some kill and at most (latency + commit margin) before it.
    window = LATENCY_S + COMMIT_MARGIN_S
    for step, times in twice.items():
        for at in times[:-1]:
            assert any(0 < kill.at - at < window for kill in kills), (
                f"{step} answered at {times}, kills at {[k.at for k in kills]}; {measured}"
            )
    # At most the steps in progress at each kill.
    assert sum(len(t) - 1 for t in twice.values()) <= CONCURRENCY * len(kills), measured
