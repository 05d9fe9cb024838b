"""Faces offline, end to end: ``listener run`` with ``LISTENER_PIPELINE=local`` and
``LISTENER_TIERS__FACES=true``, as a user runs it, on real photographs served over HTTP.

The photographs (``listener/demo_images``, ``tests/people.py``): three different photographs
of Barack Obama (95-97 % similar to each other for the local step: assigned), one of Joe Biden
and one of the astronaut Eileen Collins (under 40 % against anyone else: new faces). Each
daemon runs several jobs at once (two analysis processes, four jobs in flight): two
photographs of one person whose steps search at the same moment miss each other there, and
the job store's second decision, under the owner's lock, is what makes them one person.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from aiohttp import web
from people import OBAMA, OTHERS, photo
from support import all_finished, cli, counts, listener_run, make_table, serving, wait_until

PHOTOS = (*OBAMA, *OTHERS)
OWNERS = ("alice", "bob")


def daemon_env(env: Mapping[str, str], **more: str) -> dict[str, str]:
    """``env`` for a daemon of the local pipeline with the faces step, four jobs at a time on
    two analysis processes, fetching from 127.0.0.1."""
    return {
        **env,
        "LISTENER_PIPELINE": "local",
        "LISTENER_TIERS__FACES": "true",
        "LISTENER_LOCAL__WORKERS": "2",
        "LISTENER_CONCURRENCY": "4",
        "LISTENER_FETCH__ALLOWED_HOSTS": '["127.0.0.1"]',
        **{f"LISTENER_{k.upper()}": v for k, v in more.items()},
    }


class Photos:
    """Serves the bundled photographs of ``PHOTOS`` on 127.0.0.1; a request for a name in
    ``held`` waits until ``release`` (a daemon is then mid-job: its fetch is under way)."""

    def __init__(self, held: tuple[str, ...] = ()) -> None:
        self.base_url = ""
        self.held = set(held)
        self.requested: list[str] = []
        self.released = asyncio.Event()

    async def handle(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        self.requested.append(name)
        if name not in PHOTOS:
            raise web.HTTPNotFound()
        if name in self.held:
            await self.released.wait()
        content_type = "image/png" if name.endswith(".png") else "image/jpeg"
        return web.Response(body=photo(name), content_type=content_type)

    def release(self) -> None:
        self.held.clear()
        self.released.set()


@asynccontextmanager
async def serve(photos: Photos) -> AsyncIterator[Photos]:
    """``photos`` served until the block ends."""
    app = web.Application()
    app.router.add_get("/{name}", photos.handle)
    async with serving(app, access_log=None, shutdown_timeout=0.5) as url:
        photos.base_url = url
        yield photos


@pytest.fixture
async def served() -> AsyncIterator[Photos]:
    async with serve(Photos()) as photos:
        yield photos


async def insert(conn: asyncpg.Connection, table: str, base_url: str, owner: str) -> None:
    await conn.executemany(
        f"INSERT INTO {table} (url, owner_id) VALUES ($1, $2)",
        [(f"{base_url}/{name}", owner) for name in PHOTOS],
    )


async def faces_by_photo(
    conn: asyncpg.Connection, table: str
) -> dict[tuple[str, str], dict[str, Any]]:
    """Each recorded face by (owner, photo name), with its row's url and embedding size."""
    rows = await conn.fetch(
        "SELECT f.*, cardinality(f.embedding) AS floats, array_ndims(f.embedding) AS dims, "
        f"i.url FROM listener.faces f JOIN {table} i ON i.id::text = f.source_id "
        "ORDER BY f.face_id"
    )
    found: dict[tuple[str, str], dict[str, Any]] = {}
    for r in rows:
        key = (r["owner_id"], r["url"].rsplit("/", 1)[1])
        assert key not in found, f"two faces recorded for {key}"
        found[key] = dict(r)
    return found


async def stop(proc: subprocess.Popen[bytes], log: Path) -> None:
    proc.send_signal(signal.SIGTERM)
    code = await asyncio.to_thread(proc.wait, 30)
    assert code == 0, log.read_text()


@pytest.mark.timeout(300)
async def test_a_daemon_groups_each_owners_photos_of_one_person(
    conn: asyncpg.Connection,
    env_for_subprocess: dict[str, str],
    tmp_path: Path,
    served: Photos,
) -> None:
    table = await make_table(conn, owner=True)
    for owner in OWNERS:
        await insert(conn, table, served.base_url, owner)
    rows = len(OWNERS) * len(PHOTOS)
    log = tmp_path / "listener.log"
    with listener_run(daemon_env(env_for_subprocess), log) as proc:

        async def finished() -> bool:
            assert proc.poll() is None, log.read_text()
            return await all_finished(conn, rows)

        await wait_until(finished, timeout=240, interval=0.2)
        await stop(proc, log)
    assert await counts(conn) == {"complete": rows}, log.read_text()

    faces = await faces_by_photo(conn, table)
    # One face per photograph, each with its 128-float embedding, in its owner's collection.
    assert sorted(faces) == sorted((o, p) for o in OWNERS for p in PHOTOS)
    for (owner, _), face in faces.items():
        assert (face["floats"], face["dims"]) == (128, 1)
        assert face["collection_id"] == f"listener-local-{owner}"
    people = await conn.fetch("SELECT id, owner_id, collection_id FROM listener.people")
    assert sorted(p["owner_id"] for p in people) == sorted(OWNERS)
    for person in people:
        owner = person["owner_id"]
        assert person["collection_id"] == f"listener-local-{owner}"
        members = {p for (o, p), f in faces.items() if f["person_id"] == person["id"]}
        # Per owner exactly one person: the three photographs of Obama.
        assert members == set(OBAMA), (owner, members)
    for name in OTHERS:
        for owner in OWNERS:
            face = faces[owner, name]
            # Biden and the astronaut match no one: new faces, in no person.
            assert (face["person_id"], face["matched_face"]) == (None, None), (owner, name)
    # A match never crosses owners.
    owner_of = {f["face_id"]: f["owner_id"] for f in faces.values()}
    matched = [f for f in faces.values() if f["matched_face"] is not None]
    assert len(matched) == 2 * len(OWNERS)  # the second and third Obama of each owner
    assert all(owner_of[f["matched_face"]] == f["owner_id"] for f in matched)
    assert await conn.fetchval("SELECT count(*) FROM listener.face_suggestions") == 0

    # The step's stored output names the same faces, each with its person as it was then
    # (the first photograph of Obama was in no person until the second matched it).
    outputs = await conn.fetch(
        "SELECT j.owner_id, r.output FROM listener.results r "
        "JOIN listener.jobs j ON j.id = r.job_id WHERE r.step = 'local.faces'"
    )
    assert len(outputs) == rows
    stored = [(o["owner_id"], f) for o in outputs for f in json.loads(o["output"])["faces"]]
    by_id = {f["face_id"]: f for f in faces.values()}
    assert sorted(f["face_id"] for _, f in stored) == sorted(by_id)
    for owner, f in stored:
        if f["decision"] == "assigned":
            assert f["similarity"] >= 95 and owner_of[f["matched_face_id"]] == owner
            assert f["person_id"] == by_id[f["face_id"]]["person_id"] is not None
        else:
            assert (f["decision"], f["matched_face_id"], f["person_id"]) == ("new", None, None)

    # The operator's view: one person of three faces, two faces in no person.
    listing = cli(env_for_subprocess, "faces", "people", "--owner", "alice", ok=True)
    assert "faces per owner" in listing.stdout and "people, most faces first" in listing.stdout
    alice_person = faces["alice", "obama_1.jpg"]["person_id"]
    listed = json.loads(
        cli(env_for_subprocess, "faces", "people", "--owner", "alice", "--json", ok=True).stdout
    )
    assert listed["counts"] == [
        {"owner": "alice", "people": 1, "faces": 5, "unassigned": 2, "open_suggestions": 0}
    ]
    (person,) = listed["people"]
    assert (person["person_id"], person["faces"]) == (alice_person, 3)
    sample = {faces["alice", name]["source_id"] for name in OBAMA}
    assert person["sample_source_id"] in sample
    line = next(x for x in listing.stdout.splitlines() if person["sample_face_id"] in x)
    cells = [c.strip() for c in line.strip("│ ").split("│")]
    # person, name (none yet), faces, sample face, its row
    assert cells == [
        str(alice_person),
        "-",
        "3",
        person["sample_face_id"],
        f"public.images {person['sample_source_id']}",
    ]


@pytest.mark.timeout(300)
async def test_a_daemon_killed_mid_job_leaves_each_face_recorded_once(
    conn: asyncpg.Connection, env_for_subprocess: dict[str, str], tmp_path: Path
) -> None:
    """The daemon is SIGKILLed while a job is under way (its photo's download held open);
    another daemon takes the job over once its lease ends and runs the faces step again.
    The local step records nothing before its fenced store, so the killed run leaves no face:
    each photograph has one face, and the Obama photographs are still one person."""
    table = await make_table(conn, owner=True)
    held = "obama_2.jpg"
    log = tmp_path / "listener.log"
    async with serve(Photos(held=(held,))) as photos:
        await insert(conn, table, photos.base_url, "carol")
        held_id = await conn.fetchval(
            f"SELECT id::text FROM {table} WHERE url = $1", f"{photos.base_url}/{held}"
        )
        env = daemon_env(env_for_subprocess, lease_s="3")
        with listener_run(env, log, worker_id="victim") as victim:

            async def mid_job() -> bool:
                assert victim.poll() is None, log.read_text()
                job = await conn.fetchrow(
                    "SELECT status, worker_id FROM listener.jobs WHERE source_id = $1", held_id
                )
                return (
                    held in photos.requested
                    and job is not None
                    and (job["status"], job["worker_id"]) == ("processing", "victim")
                )

            await wait_until(mid_job, timeout=120, interval=0.1)
            os.kill(victim.pid, signal.SIGKILL)
            await asyncio.to_thread(victim.wait, 10)
        photos.release()
        with listener_run(env, log, worker_id="rescuer") as rescuer:

            async def finished() -> bool:
                assert rescuer.poll() is None, log.read_text()
                return await all_finished(conn, len(PHOTOS))

            await wait_until(finished, timeout=180, interval=0.2)
            await stop(rescuer, log)

    assert await counts(conn) == {"complete": len(PHOTOS)}, log.read_text()
    job = await conn.fetchrow(
        "SELECT claims, worker_id FROM listener.jobs WHERE source_id = $1", held_id
    )
    assert (job["claims"], job["worker_id"]) == (2, "rescuer")
    faces = await faces_by_photo(conn, table)
    assert sorted(faces) == sorted(("carol", p) for p in PHOTOS)
    (person,) = {faces["carol", name]["person_id"] for name in OBAMA}
    assert person is not None
    assert await conn.fetchval("SELECT count(*) FROM listener.people") == 1
    # Exactly the faces the stored steps name: nothing of the killed run.
    stored = await conn.fetch(
        "SELECT jsonb_array_elements(r.output->'faces')->>'face_id' AS face_id "
        "FROM listener.results r WHERE r.step = 'local.faces'"
    )
    assert sorted(r["face_id"] for r in stored) == sorted(f["face_id"] for f in faces.values())
