"""Deleting an app row cancels its job, removes its results and deletes its faces.

Real Postgres; Rekognition is the fake (``listener.testing.FakeRekognition``) reached through
the real ``aioboto3`` client; photos are served over HTTP to the real daemon.

The tests of a deleted or re-analysed row's faces run for both back ends of the faces step
(the ``backend`` fixture's parameter): ``rekognition`` (the fake, the fake's synthetic
faces) and ``local`` (the offline step, ``pipeline=local`` with faces, on real photographs
of two men: ``tests/people.py``). The local step keeps its faces only in ``listener.faces``
(the embeddings ``nearest_faces`` searches), so there "recognisable" means recorded there;
its drain deletes nothing remotely (``LocalProvider.delete_faces`` checks the collection is
its own) and forgets the records.

Rekognition only, as they test what only a remote collection has:
``test_a_faces_step_in_flight_for_a_deleted_row_leaves_no_face`` (IndexFaces happens before
the step's result is stored, so a refused result must be undone at Rekognition; the local step
records nothing before its fenced store, which ``test_faces_effects`` covers for it) and
``test_a_collection_deleted_outside_listener_is_created_again``. The local drain's own case,
faces of another provider's collection, is
``test_a_local_drain_forgets_its_own_faces_and_keeps_rekognitions``.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aioboto3
import asyncpg
import pytest
from awaiting import loop_signals, when
from people import photo
from support import (
    StaticServer,
    admit,
    faces_settings,
    fast_settings,
    make_table,
    serve_photos,
    wait_until,
)

from listener.analysis.face_store import PgFaceStore
from listener.analysis.faces import PgKnownFaces, external_image_id
from listener.analysis.providers.base import ImageInput, StepContext
from listener.analysis.providers.local import LocalProvider
from listener.analysis.providers.rekognition import RekognitionProvider
from listener.app import Daemon
from listener.app_side.deletes import DeleteDrain
from listener.db.migrate import migrate
from listener.db.queries import Queries
from listener.queue.pg_store import PgJobStore
from listener.queue.store import DeletedRow
from listener.settings import LocalSettings, RekognitionSettings, Settings, TierSettings
from listener.testing import FakeRekognition, face_photo

pytestmark = pytest.mark.usefixtures("aws_env")
FAKE = FakeRekognition  # the class of the ``fake`` fixture (conftest.py)

TABLE = "public.images"
COLLECTION = "listener-owner-1"
LOCAL_COLLECTION = "listener-local-owner-1"


def synthetic_shots() -> dict[str, bytes]:
    """The fake's photos: a1 and a2 one person, b another."""
    return {
        "a1.jpg": face_photo("a", seed=1, scale=1.0),
        "a2.jpg": face_photo("a", seed=2, scale=1.25, position=(40, 60), brightness=1.05),
        "b.jpg": face_photo("b", seed=4),
    }


@pytest.fixture
async def photos(tmp_path: Path) -> AsyncIterator[StaticServer]:
    async with serve_photos(tmp_path, files=synthetic_shots()) as server:
        yield server


def tiered(database_url: str, fake: FakeRekognition, **overrides: Any) -> Settings:
    """``faces_settings`` with the deletes handled every 0.2 s."""
    return faces_settings(database_url, fake, **{"deletes_interval_s": 0.2, **overrides})


@dataclass
class Backend:
    """A back end of the faces step: its daemon's settings, the photos it is shown (a1.jpg
    and a2.jpg one person, b.jpg another), and where it keeps the faces a person can be
    recognised by."""

    name: str
    photos: StaticServer
    fake: FakeRekognition | None
    conn: asyncpg.Connection

    def settings(self, database_url: str) -> Settings:
        """A daemon whose pipeline has this back end's faces step; deletes every 0.2 s."""
        if self.fake is not None:
            return tiered(database_url, self.fake)
        return fast_settings(
            database_url,
            pipeline="local",
            tiers=TierSettings(faces=True),
            local=LocalSettings(workers=1),
            deletes_interval_s=0.2,
        )

    async def searchable(self, row_id: int) -> list[str]:
        """The faces of the row owner-1's later photos are matched against: in the fake's
        collection (Rekognition), or recorded with an embedding (the local step searches
        ``listener.faces``)."""
        if self.fake is not None:
            return faces_in_collection(self.fake, row_id)
        rows = await self.conn.fetch(
            "SELECT face_id FROM listener.faces WHERE collection_id = $1 AND source_table = $2 "
            "AND source_id = $3 AND cardinality(embedding) = 128 ORDER BY face_id",
            LOCAL_COLLECTION,
            TABLE,
            str(row_id),
        )
        return [r["face_id"] for r in rows]


@pytest.fixture(params=("rekognition", "local"))
async def backend(
    request: pytest.FixtureRequest, tmp_path: Path, conn: asyncpg.Connection
) -> AsyncIterator[Backend]:
    """Each back end of the faces step in turn, with its photos served: the fake's synthetic
    faces for Rekognition, photographs of Barack Obama (a1, a2) and Joe Biden (b) for the
    local step."""
    if request.param == "local":
        shots = {
            "a1.jpg": photo("obama_1.jpg"),
            "a2.jpg": photo("obama_2.jpg"),
            "b.jpg": photo("biden_1.jpg"),
        }
        async with serve_photos(tmp_path, files=shots) as server:
            yield Backend("local", server, None, conn)
        return
    async with FakeRekognition() as fake, serve_photos(tmp_path, files=synthetic_shots()) as server:
        yield Backend("rekognition", server, fake, conn)


def faces_in_collection(fake: FakeRekognition, row_id: int) -> list[str]:
    """FaceIds of the row's ``ExternalImageId`` in owner-1's collection of the fake."""
    ext = external_image_id(TABLE, str(row_id))
    collection = fake.collections.get(COLLECTION)
    if collection is None:
        return []
    return [f.face_id for f in collection.faces.values() if f.external_image_id == ext]


async def insert(
    conn: asyncpg.Connection, url: str, owner: str = "owner-1", *, admitted: bool = True
) -> int:
    """Insert a row and admit it (as a daemon's next claim would): its job exists. Before
    0019 (``admitted=False``) the insert trigger made the job itself."""
    row_id: int = await conn.fetchval(
        f"INSERT INTO {TABLE} (url, owner_id) VALUES ($1, $2) RETURNING id", url, owner
    )
    if admitted:
        await admit(conn)
    return row_id


async def job_status(conn: asyncpg.Connection, row_id: int) -> str | None:
    status: str | None = await conn.fetchval(
        "SELECT status FROM listener.jobs WHERE source_table = $1 AND source_id = $2",
        TABLE,
        str(row_id),
    )
    return status


async def complete(daemon: Daemon, conn: asyncpg.Connection, *row_ids: int) -> None:
    """Wait until the rows' jobs are complete, looking each time the daemon finishes a job."""

    async def done() -> bool:
        return all([await job_status(conn, r) == "complete" for r in row_ids])

    await when(done, daemon.signals, "finished", timeout=30)


async def outbox(conn: asyncpg.Connection) -> list[tuple[str, int | None, bool]]:
    rows = await conn.fetch(
        "SELECT source_id, job_id, reinserted FROM listener.deleted_rows ORDER BY id"
    )
    return [(r["source_id"], r["job_id"], r["reinserted"]) for r in rows]


async def test_deleting_a_pending_row_cancels_its_job_and_never_waits_for_listener(
    conn: asyncpg.Connection, pool: asyncpg.Pool, database_url: str
) -> None:
    await make_table(conn, owner=True)
    row_id = await insert(conn, "http://127.0.0.1:9/never.jpg")
    job_id = await conn.fetchval("SELECT id FROM listener.jobs")
    events: list[dict[str, Any]] = []
    heard = asyncio.Event()

    def on_event(*a: Any) -> None:
        events.append(json.loads(a[3]))
        heard.set()

    await conn.add_listener("listener_events", on_event)

    # A daemon's transaction holds the job row: the app's DELETE does not wait for it.
    holder = await asyncpg.connect(database_url)
    try:
        lock = holder.transaction()
        await lock.start()
        await holder.execute("SELECT 1 FROM listener.jobs WHERE id = $1 FOR UPDATE", job_id)
        app = await asyncpg.connect(database_url)
        try:
            await app.execute("SET lock_timeout = '1s'")
            deleted = await asyncio.wait_for(
                app.execute(f"DELETE FROM {TABLE} WHERE id = $1", row_id), timeout=5
            )
            assert deleted == "DELETE 1"
        finally:
            await app.close()
        # Queued with the job the row had; the job itself is untouched so far.
        assert await outbox(conn) == [(str(row_id), job_id, False)]
        assert await job_status(conn, row_id) == "pending"
        await lock.rollback()
    finally:
        await holder.close()

    drain = DeleteDrain(Queries(pool), PgJobStore(pool), None)
    assert await drain.tick() == 1
    assert await outbox(conn) == []
    assert await conn.fetchval("SELECT count(*) FROM listener.jobs") == 0
    assert await conn.fetchval("SELECT count(*) FROM listener.results") == 0
    await asyncio.wait_for(heard.wait(), 5)
    assert events == [{"table": TABLE, "status": "cancelled", "job_id": job_id}]
    # The same id inserted again gets a fresh job.
    await conn.execute(
        f"INSERT INTO {TABLE} (id, url, owner_id) OVERRIDING SYSTEM VALUE VALUES ($1, 'u2', 'o')",
        row_id,
    )
    assert await admit(conn) == 1
    fresh = await conn.fetchrow("SELECT id, image_url, status FROM listener.jobs")
    assert fresh is not None and fresh["id"] != job_id
    assert (fresh["image_url"], fresh["status"]) == ("u2", "pending")


async def test_a_row_inserted_again_before_the_clean_up_gets_a_fresh_job(
    conn: asyncpg.Connection, pool: asyncpg.Pool
) -> None:
    await make_table(conn, owner=True)
    row_id = await insert(conn, "http://old/1.jpg")
    old_job = await conn.fetchval("SELECT id FROM listener.jobs")
    await conn.execute(f"DELETE FROM {TABLE} WHERE id = $1", row_id)
    await conn.execute(
        f"INSERT INTO {TABLE} (id, url, owner_id) OVERRIDING SYSTEM VALUE "
        "VALUES ($1, 'http://new/1.jpg', 'owner-2')",
        row_id,
    )
    # The old job still held the key: admission queues the insert as reinserted.
    assert await admit(conn) == 1
    assert await outbox(conn) == [(str(row_id), old_job, False), (str(row_id), old_job, True)]
    drain = DeleteDrain(Queries(pool), PgJobStore(pool), None)
    assert await drain.tick() == 2
    jobs = await conn.fetch("SELECT id, image_url, owner_id, status, attempts FROM listener.jobs")
    assert [(j["image_url"], j["owner_id"], j["status"], j["attempts"]) for j in jobs] == [
        ("http://new/1.jpg", "owner-2", "pending", 0)
    ]
    assert jobs[0]["id"] != old_job
    # Draining the same entries again (a daemon killed before acknowledging) changes nothing.
    store = PgJobStore(pool)
    again = await store.forget_rows([DeletedRow(TABLE, str(row_id), old_job, True)])
    assert again[0].restarted is None
    assert [r["id"] for r in await conn.fetch("SELECT id FROM listener.jobs")] == [jobs[0]["id"]]


async def test_deleting_a_completed_row_deletes_its_faces_and_results(
    database_url: str, conn: asyncpg.Connection, pool: asyncpg.Pool, backend: Backend
) -> None:
    await make_table(conn, owner=True)
    base = backend.photos.base_url
    async with Daemon(backend.settings(database_url)) as daemon:
        a1 = await insert(conn, f"{base}/a1.jpg")
        await complete(daemon, conn, a1)
        a2 = await insert(conn, f"{base}/a2.jpg")
        b = await insert(conn, f"{base}/b.jpg")
        await complete(daemon, conn, a2, b)
        (a1_face,) = await backend.searchable(a1)
        assert len(await backend.searchable(b)) == 1
        # a2 is the same person as a1.
        assert await conn.fetchval(
            "SELECT matched_face FROM listener.faces WHERE source_id = $1", str(a2)
        ) == (a1_face)

        await conn.execute(f"DELETE FROM {TABLE} WHERE id = ANY($1::bigint[])", [a1, b])
        await daemon.signals.wait("forgotten", 2, timeout=20)

    # Gone from the collection and from listener: the user is no longer recognisable there.
    assert await backend.searchable(a1) == [] and await backend.searchable(b) == []
    left = await conn.fetch("SELECT source_id, matched_face FROM listener.faces")
    assert [(r["source_id"], r["matched_face"]) for r in left] == [(str(a2), None)]
    assert len(await backend.searchable(a2)) == 1
    jobs = await conn.fetch("SELECT source_id FROM listener.jobs")
    assert [r["source_id"] for r in jobs] == [str(a2)]
    assert (
        await conn.fetchval(
            "SELECT count(*) FROM listener.results r JOIN listener.jobs j ON j.id = r.job_id "
            "WHERE j.source_id <> $1",
            str(a2),
        )
        == 0
    )
    assert await conn.fetchval("SELECT count(*) FROM listener.results") == 2  # a2's
    assert await outbox(conn) == []


async def test_a_daemon_killed_mid_clean_up_loses_nothing(
    database_url: str, conn: asyncpg.Connection, pool: asyncpg.Pool, backend: Backend
) -> None:
    await make_table(conn, owner=True)
    async with Daemon(backend.settings(database_url)) as daemon:
        a1 = await insert(conn, f"{backend.photos.base_url}/a1.jpg")
        b = await insert(conn, f"{backend.photos.base_url}/b.jpg")
        await complete(daemon, conn, a1, b)
    # No daemon runs: the deletes wait in the outbox.
    await conn.execute(f"DELETE FROM {TABLE} WHERE id = ANY($1::bigint[])", [a1, b])
    assert len(await outbox(conn)) == 2
    # A daemon claims them, forgets the jobs, and is killed before touching the collection.
    queries, store = Queries(pool), PgJobStore(pool)
    claimed = await queries.claim_deleted_rows(10, 0.5)
    forgotten = await store.forget_rows(
        [DeletedRow(e.source_table, e.source_id, e.job_id, e.reinserted) for e in claimed]
    )
    assert sum(len(f.leftovers) for f in forgotten) == 2
    assert await conn.fetchval("SELECT count(*) FROM listener.jobs") == 0
    assert len(await backend.searchable(a1)) == 1

    # The next daemon finds them once the dead one's lease ends, and finishes the job.
    async with Daemon(backend.settings(database_url)) as daemon:
        await daemon.signals.wait("forgotten", 2, timeout=20)
    assert await backend.searchable(a1) == [] and await backend.searchable(b) == []
    assert await conn.fetchval("SELECT count(*) FROM listener.faces") == 0
    assert await outbox(conn) == []


async def test_a_faces_step_in_flight_for_a_deleted_row_leaves_no_face(
    database_url: str,
    conn: asyncpg.Connection,
    fake: FakeRekognition,
    photos: StaticServer,
) -> None:
    await make_table(conn, owner=True)
    fake.latency_s = 0.4
    async with Daemon(tiered(database_url, fake, tiers=TierSettings(tier1=[], faces=True))) as d:
        await d.signals.wait("listening", 1)
        row_id = await insert(conn, f"{photos.base_url}/a1.jpg")
        await wait_until(lambda: asyncio.sleep(0, any(c == "IndexFaces" for c, _ in fake.calls)))
        # IndexFaces is on its way: the row goes.
        await conn.execute(f"DELETE FROM {TABLE} WHERE id = $1", row_id)
        await when(
            lambda: job_is(conn, row_id, "cancelled"),
            loop_signals(d, "deletes"),
            "ticked",
            timeout=10,
        )
        # The worker's step is refused; it deletes the face it indexed, before any sweep.
        await wait_until(
            lambda: asyncio.sleep(0, any(c == "DeleteFaces" for c, _ in fake.calls)), timeout=10
        )
        await wait_until(lambda: asyncio.sleep(0, not faces_in_collection(fake, row_id)))
        assert d.signals.count("forgotten") == 0
        assert "ListFaces" not in [c for c, _ in fake.calls]  # no sweep yet
        # After the cancelled job's lease would have ended, the row is forgotten for good.
        await d.signals.wait("forgotten", 1, timeout=20)
    assert faces_in_collection(fake, row_id) == []
    assert await conn.fetchval("SELECT count(*) FROM listener.faces") == 0
    assert await conn.fetchval("SELECT count(*) FROM listener.jobs") == 0
    assert await conn.fetchval("SELECT count(*) FROM listener.results") == 0


async def test_a_local_drain_forgets_its_own_faces_and_keeps_rekognitions(
    conn: asyncpg.Connection, pool: asyncpg.Pool
) -> None:
    """A daemon whose faces step is local makes no call to delete a face: the faces of its own
    collections are forgotten at once. Faces Rekognition indexed (a pipeline switched from
    Rekognition to the local step) wait, with the reason, for a daemon that can delete them
    from their collection."""
    await make_table(conn, owner=True)
    mine = await insert(conn, "http://x/1.jpg")
    theirs = await insert(conn, "http://x/2.jpg")
    for row, collection, face_id, embedding in (
        (mine, LOCAL_COLLECTION, "local-face", [0.01] * 128),
        (theirs, COLLECTION, "rekognition-face", None),
    ):
        face = {"face_id": face_id, "bounding_box": {}, "confidence": 99.0, "decision": "new"}
        if embedding is not None:
            face["embedding"] = embedding
        await conn.execute(
            "SELECT listener.apply_face_effects(NULL, $1, $2, 'owner-1', $3::jsonb)",
            TABLE,
            str(row),
            json.dumps({"collection_id": collection, "faces": [face]}),
        )
    await conn.execute(f"DELETE FROM {TABLE}")
    # delete_faces and delete_row_faces need no worker process: the provider is not started.
    local = LocalProvider(LocalSettings(), max_pixels=64_000_000)
    drain = DeleteDrain(Queries(pool), PgJobStore(pool), local, records=PgFaceStore(pool))
    assert await drain.tick() == 1
    assert await conn.fetchval("SELECT array_agg(face_id) FROM listener.faces") == [
        "rekognition-face"
    ]
    waiting = await conn.fetch("SELECT source_id, last_error FROM listener.deleted_rows")
    assert [r["source_id"] for r in waiting] == [str(theirs)]
    assert "indexed by another provider (Rekognition)" in waiting[0]["last_error"]


async def job_is(conn: asyncpg.Connection, row_id: int, status: str) -> bool:
    return await job_status(conn, row_id) == status


async def test_a_collection_deleted_outside_listener_is_created_again(
    pool: asyncpg.Pool, fake: FakeRekognition
) -> None:
    provider = RekognitionProvider(
        RekognitionSettings(endpoint_url=fake.endpoint_url, region="us-east-1"),
        PgKnownFaces(Queries(pool)),
    )
    await provider.start()
    try:

        async def faces_step(source_id: str) -> dict[str, Any]:
            image = ImageInput(
                1, TABLE, source_id, "owner-1", "u", face_photo("a", seed=1), "JPEG", 640, 480
            )
            result = await provider.run("faces", image, StepContext("rekognition.faces", {}, 1))
            return dict(result.output)

        assert len((await faces_step("1"))["faces"]) == 1
        session = aioboto3.Session(region_name="us-east-1")
        async with session.client("rekognition", endpoint_url=fake.endpoint_url) as client:
            await client.delete_collection(CollectionId=COLLECTION)
        assert COLLECTION not in fake.collections
        # The next job of that owner does not fail: the collection is created again.
        second = await faces_step("2")
        assert len(second["faces"]) == 1
        assert [c for c, _ in fake.calls].count("CreateCollection") == 2
        assert len(fake.collections[COLLECTION].faces) == 1
        # Deleting faces of a collection that is gone counts as done.
        async with session.client("rekognition", endpoint_url=fake.endpoint_url) as client:
            await client.delete_collection(CollectionId=COLLECTION)
        assert await provider.delete_faces(COLLECTION, ["f"]) == 1
        assert await provider.delete_row_faces("owner-1", TABLE, "2") == (0, 1)
    finally:
        await provider.close()


@pytest.fixture
async def db_at_0013(database_before: Callable[[int], Awaitable[str]]) -> str:
    """A database migrated up to 0013 (the release before deletes)."""
    return await database_before(14)


async def test_a_table_attached_before_0014_gets_the_delete_trigger_on_migrate(
    db_at_0013: str,
) -> None:
    conn = await asyncpg.connect(db_at_0013)
    try:
        await make_table(conn, owner=True, status=True)
        kept = await insert(conn, "http://x/kept.jpg", admitted=False)
        gone = await insert(conn, "http://x/gone.jpg", admitted=False)
        # Before 0014 a delete queued nothing (there is nowhere to queue it).
        assert await conn.fetchval("SELECT to_regclass('listener.deleted_rows')") is None

        assert "0014_deletes" in await migrate(conn)

        job_id = await conn.fetchval("SELECT id FROM listener.jobs WHERE source_id = $1", str(gone))
        await conn.execute(f"DELETE FROM {TABLE} WHERE id = $1", gone)
        assert await outbox(conn) == [(str(gone), job_id, False)]
        # Its settings are kept, and detach removes the new trigger too.
        assert (
            await conn.fetchval(
                "SELECT status_column FROM listener.attachments WHERE source_table = $1", TABLE
            )
            == "status"
        )
        assert await conn.fetchval("SELECT listener.detach($1)", TABLE)
        await conn.execute(f"DELETE FROM {TABLE} WHERE id = $1", kept)
        assert len(await outbox(conn)) == 1
        assert (
            await conn.fetchval("SELECT count(*) FROM pg_proc WHERE proname LIKE 'forget_delete_%'")
            == 0
        )
    finally:
        await conn.close()


async def test_an_app_role_with_no_rights_on_listener_deletes_and_inserts_again(
    conn: asyncpg.Connection,
) -> None:
    """The delete trigger runs as its owner, like the insert trigger: an app role with rights
    on its own table only deletes rows and inserts them again without an error."""
    await make_table(conn, owner=True)
    row_id = await insert(conn, "u1")
    job_id = await conn.fetchval("SELECT id FROM listener.jobs")
    role = f"app_deleter_{os.getpid()}"
    await conn.execute(f"CREATE ROLE {role}")
    try:
        await conn.execute(f"GRANT SELECT, INSERT, DELETE ON {TABLE} TO {role}")
        async with conn.transaction():
            await conn.execute(f"SET LOCAL ROLE {role}")
            await conn.execute(f"DELETE FROM {TABLE} WHERE id = $1", row_id)
            await conn.execute(
                f"INSERT INTO {TABLE} (id, url) OVERRIDING SYSTEM VALUE VALUES ($1, 'u2')", row_id
            )
        assert await admit(conn) == 1
        assert await outbox(conn) == [(str(row_id), job_id, False), (str(row_id), job_id, True)]
    finally:
        await conn.execute("RESET ROLE")
        await conn.execute(f"DROP OWNED BY {role}")
        await conn.execute(f"DROP ROLE {role}")


async def test_a_reanalyzed_or_replaced_photo_keeps_one_copy_of_its_faces(
    database_url: str, conn: asyncpg.Connection, backend: Backend
) -> None:
    """A retag records each face once; a new image at the row drops the old image's faces.

    The same photo analysed again is its own old face's twin (distance 0 for the local step):
    the step leaves the row's own faces out of the search, so the new face is not matched to
    the face it replaces."""
    await make_table(conn, owner=True)
    base = backend.photos.base_url
    async with Daemon(backend.settings(database_url)) as daemon:
        a1 = await insert(conn, f"{base}/a1.jpg")
        await complete(daemon, conn, a1)
        [first] = await backend.searchable(a1)

        # "Retag with AI": the row runs again from scratch.
        await conn.execute("SELECT listener.reanalyze($1, $2, 0)", TABLE, [str(a1)])
        await when(
            lambda: _recorded_faces_not(conn, a1, first), daemon.signals, "finished", timeout=30
        )
        await complete(daemon, conn, a1)
        [second] = await backend.searchable(a1)
        assert second != first  # indexed again, the old copy deleted first
        recorded = await conn.fetch(
            "SELECT face_id, matched_face, person_id FROM listener.faces WHERE source_id = $1",
            str(a1),
        )
        # One record, of the new face, which did not match the row's own old face.
        assert [(r["face_id"], r["matched_face"], r["person_id"]) for r in recorded] == [
            (second, None, None)
        ]
        output = json.loads(
            await conn.fetchval(
                "SELECT r.output FROM listener.results r JOIN listener.jobs j ON j.id = r.job_id "
                "WHERE j.source_id = $1 AND r.step = $2",
                str(a1),
                f"{backend.name}.faces",
            )
        )
        assert [(f["face_id"], f["decision"], f["matched_face_id"]) for f in output["faces"]] == [
            (second, "new", None)
        ]
        assert await conn.fetchval("SELECT count(*) FROM listener.people") == 0

        # The row now shows another person's photo: the old face must not stay recognisable.
        await conn.execute(f"UPDATE {TABLE} SET url = $1 WHERE id = $2", f"{base}/b.jpg", a1)
        await when(
            lambda: _recorded_faces_not(conn, a1, second), daemon.signals, "finished", timeout=30
        )
        await complete(daemon, conn, a1)
        [third] = await backend.searchable(a1)
        assert third not in (first, second)
        assert await conn.fetchval("SELECT array_agg(face_id) FROM listener.faces") == [third]


async def _recorded_faces_not(conn: asyncpg.Connection, row_id: int, face_id: str) -> bool:
    """True once the row has recorded faces and ``face_id`` is not among them."""
    faces = await conn.fetch("SELECT face_id FROM listener.faces WHERE source_id = $1", str(row_id))
    return bool(faces) and face_id not in {r["face_id"] for r in faces}
