"""The faces step's writes are fenced by the lease, and its AWS side effects are idempotent.

Real Postgres (``PgJobStore``), the real ``aioboto3`` client against the Rekognition fake; the
dispatcher's two moves (run the provider, then ``save_step``) are made by hand so that a lost
lease or a crash can fall between them.

The lease's fence holds for both back ends of the faces step: the lost-lease test runs for
Rekognition (the fake's synthetic faces) and for the offline ``local`` step (real
photographs, ``tests/people.py``: a1 and a2 Barack Obama, "border" a blurred third photograph
of him, 87 % against a1). The local step indexes nothing outside Postgres, so its crash and
retry test checks only that the records are not doubled; the tests of IndexFaces, ListFaces
and DeleteFaces calls are Rekognition's alone.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import aioboto3
import asyncpg
import pytest
from awaiting import jobs_finished
from people import local_faces_provider, obama_borderline, photo
from support import StaticServer, fast_settings, make_table

from listener.analysis.face_store import pg_effect_writers
from listener.analysis.faces import PgFaceIntents, PgKnownFaces, external_image_id
from listener.analysis.providers.base import ImageInput, Provider, StepContext, StepResult
from listener.analysis.providers.rekognition import RekognitionProvider
from listener.app import Daemon
from listener.db.queries import Queries
from listener.errors import LeaseLost
from listener.queue.outcomes import Job
from listener.queue.pg_store import PgJobStore
from listener.settings import RateLimit, RekognitionSettings, TierSettings
from listener.testing.rekognition_fake import FakeRekognition, face_photo

pytestmark = pytest.mark.usefixtures("aws_env")
FAKE = FakeRekognition  # the class of the ``fake`` fixture (conftest.py)

TABLE = "public.images"
PHOTOS = {
    "a1": face_photo("a", seed=1, scale=1.0),
    "a2": face_photo("a", seed=2, scale=1.25, position=(40, 60), brightness=1.05),
    "border": face_photo("a_borderline", seed=3, scale=0.9),
}
LOCAL_PHOTOS = {
    "a1": photo("obama_1.jpg"),
    "a2": photo("obama_2.jpg"),
    "border": obama_borderline(),
}


@pytest.fixture
async def provider(fake: FakeRekognition, pool: asyncpg.Pool) -> AsyncIterator[RekognitionProvider]:
    # One face per ListFaces page: the clean-up has to follow NextToken.
    p = RekognitionProvider(
        RekognitionSettings(endpoint_url=fake.endpoint_url, region="us-east-1"),
        PgKnownFaces(Queries(pool)),
        page_size=1,
        intents=PgFaceIntents(Queries(pool)),
    )
    await p.start()
    try:
        yield p
    finally:
        await p.close()


@dataclass(frozen=True)
class FacesStep:
    """A started faces step of one back end, and the photos it is shown by row id."""

    provider: Provider
    step: str
    photos: Mapping[str, bytes]

    async def run(self, job: Job) -> StepResult:
        """Run the step on the job's photo, as the dispatcher does under the job's claim."""
        image = ImageInput(
            job.id,
            job.source_table,
            job.source_id,
            job.owner_id,
            job.image_url or "",
            self.photos[job.source_id],
            "JPEG",
            640,
            480,
        )
        context = StepContext(self.step, {}, job.claims, job.lease_token)
        result = await self.provider.run("faces", image, context)
        assert result is not None and result.step == self.step
        return result


@pytest.fixture(params=("rekognition", "local"))
async def faces_step(
    request: pytest.FixtureRequest, pool: asyncpg.Pool
) -> AsyncIterator[FacesStep]:
    """The faces step of each back end in turn: Rekognition (the fake), then the local step."""
    if request.param == "local":
        async with local_faces_provider(pool) as local:
            yield FacesStep(local, "local.faces", LOCAL_PHOTOS)
        return
    async with FakeRekognition() as fake:
        provider = RekognitionProvider(
            RekognitionSettings(endpoint_url=fake.endpoint_url, region="us-east-1"),
            PgKnownFaces(Queries(pool)),
            intents=PgFaceIntents(Queries(pool)),
        )
        await provider.start()
        try:
            yield FacesStep(provider, "rekognition.faces", PHOTOS)
        finally:
            await provider.close()


async def claim(store: PgJobStore, source_id: str) -> Job:
    worker = f"worker-{uuid.uuid4().hex[:6]}"
    (job,) = await store.claim(1, worker, 30.0, uuid.uuid4(), admit=True)
    assert job.source_id == source_id
    return job


async def enqueue_and_claim(store: PgJobStore, name: str) -> Job:
    await store.enqueue(TABLE, name, f"http://photos/{name}.jpg", "owner-1")
    return await claim(store, name)


async def lose_lease(conn: asyncpg.Connection, store: PgJobStore, job: Job) -> None:
    """The worker froze past its lease and the reaper handed the job back."""
    await conn.execute(
        "UPDATE listener.jobs SET lease_expires_at = now() - interval '1 second' WHERE id = $1",
        job.id,
    )
    assert await store.reap() == {job.id: "pending"}


async def run_faces(
    provider: RekognitionProvider, job: Job, data: bytes | None = None
) -> StepResult:
    image = ImageInput(
        job.id,
        job.source_table,
        job.source_id,
        job.owner_id,
        job.image_url or "",
        PHOTOS[job.source_id] if data is None else data,
        "JPEG",
        640,
        480,
    )
    context = StepContext("rekognition.faces", {}, job.claims, job.lease_token)
    return await provider.run("faces", image, context)


async def table_counts(conn: asyncpg.Connection) -> dict[str, int]:
    row = await conn.fetchrow(
        "SELECT (SELECT count(*) FROM listener.faces) AS faces, "
        "(SELECT count(*) FROM listener.people) AS people, "
        "(SELECT count(*) FROM listener.face_suggestions) AS suggestions, "
        "(SELECT count(*) FROM listener.results) AS results"
    )
    assert row is not None
    return dict(row)


def collection_faces(fake: FakeRekognition, source_id: str) -> list[str]:
    ext = external_image_id(TABLE, source_id)
    return [
        f.face_id
        for f in fake.collections["listener-owner-1"].faces.values()
        if f.external_image_id == ext
    ]


async def test_a_lost_lease_writes_no_faces_people_or_suggestions(
    conn: asyncpg.Connection, pool: asyncpg.Pool, faces_step: FacesStep
) -> None:
    store = PgJobStore(pool, effects=pg_effect_writers())
    first = await enqueue_and_claim(store, "a1")
    assert await store.save_step(first, await faces_step.run(first))
    before = await table_counts(conn)
    assert before == {"faces": 1, "people": 0, "suggestions": 0, "results": 1}

    await store.enqueue(TABLE, "a2", "http://photos/a2.jpg", "owner-1")
    await store.enqueue(TABLE, "border", "http://photos/border.jpg", "owner-1")
    jobs = await store.claim(2, "frozen-worker", 30.0, uuid.uuid4())
    results = [await faces_step.run(job) for job in jobs]
    # The steps had something to write: a person, a suggestion.
    assert [f["decision"] for r in results for f in r.effects["faces"]["faces"]] == [
        "assigned",
        "suggested",
    ]
    for job in jobs:
        await lose_lease(conn, store, job)
    for job, result in zip(jobs, results, strict=True):
        assert not await store.save_step(job, result)
    assert await table_counts(conn) == before

    # The same step under a held lease writes it all, and the person goes into the output.
    a2 = await claim(store, "a2")
    result = await faces_step.run(a2)
    assert await store.save_step(a2, result)
    person = await conn.fetchval(
        "SELECT person_id FROM listener.faces WHERE source_id = 'a1' AND source_table = $1", TABLE
    )
    assert person is not None
    stored = json.loads(
        await conn.fetchval("SELECT output FROM listener.results WHERE job_id = $1", a2.id)
    )
    assert [(f["decision"], f["person_id"]) for f in stored["faces"]] == [("assigned", person)]
    assert await table_counts(conn) == {"faces": 2, "people": 1, "suggestions": 0, "results": 2}


async def test_a_crash_after_index_faces_leaves_one_copy_of_each_face(
    conn: asyncpg.Connection,
    pool: asyncpg.Pool,
    fake: FakeRekognition,
    provider: RekognitionProvider,
) -> None:
    store = PgJobStore(pool, effects=pg_effect_writers())
    first = await enqueue_and_claim(store, "a1")
    assert await store.save_step(first, await run_faces(provider, first))
    job = await enqueue_and_claim(store, "a2")
    assert job.claims == 1
    crashed = await run_faces(provider, job)  # IndexFaces done; the step is never stored
    assert len(collection_faces(fake, "a2")) == 1
    await lose_lease(conn, store, job)

    retry = await claim(store, "a2")
    assert retry.claims == 2
    fake.calls.clear()
    result = await run_faces(provider, retry)
    assert await store.save_step(retry, result)

    # The orphan was listed (two faces, one per page), deleted, then the image indexed again.
    operations = [op for op, _ in fake.calls]
    assert operations[:5] == ["ListFaces", "ListFaces", "DeleteFaces", "IndexFaces", "SearchFaces"]
    assert result.output["removed_faces"] == 1
    (orphan,) = [f["face_id"] for f in crashed.effects["faces"]["faces"]]
    (face,) = [f["face_id"] for f in result.effects["faces"]["faces"]]
    assert collection_faces(fake, "a2") == [face] and face != orphan
    # The recorded face of the other image is left alone.
    assert len(collection_faces(fake, "a1")) == 1
    rows = await conn.fetch(
        "SELECT face_id, person_id FROM listener.faces WHERE source_table = $1 AND source_id = $2",
        TABLE,
        "a2",
    )
    assert [r["face_id"] for r in rows] == [face] and rows[0]["person_id"] is not None
    assert await table_counts(conn) == {"faces": 2, "people": 1, "suggestions": 0, "results": 2}


async def row_faces(conn: asyncpg.Connection, source_id: str) -> list[asyncpg.Record]:
    """The faces recorded for row ``source_id`` of ``TABLE``."""
    rows: list[asyncpg.Record] = await conn.fetch(
        "SELECT face_id, person_id, matched_face, cardinality(embedding) AS floats "
        "FROM listener.faces WHERE source_table = $1 AND source_id = $2",
        TABLE,
        source_id,
    )
    return rows


async def test_a_local_faces_step_run_again_under_a_new_claim_records_each_face_once(
    conn: asyncpg.Connection, pool: asyncpg.Pool
) -> None:
    """The local step writes nothing before its fenced store, so a run that died leaves
    nothing; a run stored, then run again under a new claim (a daemon killed after storing the
    step, before completing the job), replaces the row's face rather than adding one, and the
    new face is matched to the owner's other photo, not to the face it replaces."""
    async with local_faces_provider(pool) as provider:
        step = FacesStep(provider, "local.faces", LOCAL_PHOTOS)
        store = PgJobStore(pool, effects=pg_effect_writers())
        first = await enqueue_and_claim(store, "a1")
        assert await store.save_step(first, await step.run(first))
        (a1,) = await row_faces(conn, "a1")

        # Killed before storing: nothing of that run is anywhere.
        job = await enqueue_and_claim(store, "a2")
        crashed = await step.run(job)
        (orphan,) = crashed.effects["faces"]["faces"]
        assert await row_faces(conn, "a2") == []
        await lose_lease(conn, store, job)

        retry = await claim(store, "a2")
        assert retry.claims == 2
        result = await step.run(retry)
        assert result.output["removed_faces"] == 0
        assert await store.save_step(retry, result)
        (face,) = result.effects["faces"]["faces"]
        assert face["face_id"] != orphan["face_id"]
        assert (face["decision"], face["matched_face_id"]) == ("assigned", a1["face_id"])
        (recorded,) = await row_faces(conn, "a2")
        person = recorded["person_id"]
        assert (recorded["face_id"], recorded["floats"]) == (face["face_id"], 128)
        assert person is not None

        # Stored, then the job handed back before it completed: the step runs again.
        await lose_lease(conn, store, retry)
        again = await claim(store, "a2")
        rerun = await step.run(again)
        (face2,) = rerun.effects["faces"]["faces"]
        # Its own earlier face (the same photo, distance 0) is left out of the search.
        assert (face2["decision"], face2["matched_face_id"]) == ("assigned", a1["face_id"])
        assert not await store.save_step(retry, result)  # the old claim is fenced out
        assert await store.save_step(again, rerun)
        assert [(r["face_id"], r["person_id"]) for r in await row_faces(conn, "a2")] == [
            (face2["face_id"], person)
        ]
    assert await table_counts(conn) == {"faces": 2, "people": 1, "suggestions": 0, "results": 2}
    assert (
        await conn.fetchval(
            "SELECT count(*) FROM listener.faces WHERE face_id = ANY($1::text[])",
            [orphan["face_id"], face["face_id"]],
        )
        == 0
    )


async def test_two_photos_of_one_person_analyzed_at_once_become_one_person(
    conn: asyncpg.Connection, pool: asyncpg.Pool
) -> None:
    """Two workers run the local step on two photos of one person at the same moment: each
    searches before the other is stored and finds no one. The job store decides again when
    it stores a step, under the owner's faces lock, so the second stored joins the first:
    one person, and the second step's stored output says so."""
    async with local_faces_provider(pool) as provider:
        step = FacesStep(provider, "local.faces", LOCAL_PHOTOS)
        store = PgJobStore(pool, effects=pg_effect_writers())
        first = await enqueue_and_claim(store, "a1")
        second = await enqueue_and_claim(store, "a2")
        results = [await step.run(first), await step.run(second)]
        for result in results:
            assert [f["decision"] for f in result.effects["faces"]["faces"]] == ["new"]
        assert await store.save_step(first, results[0])
        assert await store.save_step(second, results[1])
    (a1,) = await row_faces(conn, "a1")
    (a2,) = await row_faces(conn, "a2")
    assert a1["person_id"] is not None and a2["person_id"] == a1["person_id"]
    assert a2["matched_face"] == a1["face_id"]
    stored = json.loads(
        await conn.fetchval(
            "SELECT output FROM listener.results WHERE job_id = $1 AND step = 'local.faces'",
            second.id,
        )
    )
    (face,) = stored["faces"]
    assert (face["decision"], face["matched_face_id"]) == ("assigned", a1["face_id"])
    assert face["similarity"] >= 95.0 and face["person_id"] == a1["person_id"]


async def test_a_first_claim_does_not_list_the_collection(
    pool: asyncpg.Pool, fake: FakeRekognition, provider: RekognitionProvider
) -> None:
    store = PgJobStore(pool, effects=pg_effect_writers())
    job = await enqueue_and_claim(store, "a1")
    result = await run_faces(provider, job)
    assert [op for op, _ in fake.calls] == ["CreateCollection", "IndexFaces", "SearchFaces"]
    assert result.calls == 3 and result.output["removed_faces"] == 0


async def test_a_job_claimed_again_before_its_faces_step_lists_nothing(
    conn: asyncpg.Connection,
    pool: asyncpg.Pool,
    fake: FakeRekognition,
    provider: RekognitionProvider,
) -> None:
    """A claim that ended before the faces step sent IndexFaces (a failed fetch, an expired
    lease) left no request: the next claim indexes at once, without a billed ListFaces."""
    store = PgJobStore(pool, effects=pg_effect_writers())
    first = await enqueue_and_claim(store, "a1")
    await lose_lease(conn, store, first)
    retry = await claim(store, "a1")
    assert retry.claims == 2
    result = await run_faces(provider, retry)
    assert [op for op, _ in fake.calls] == ["CreateCollection", "IndexFaces", "SearchFaces"]
    assert result.output["removed_faces"] == 0
    assert await store.save_step(retry, result)
    assert await conn.fetchval("SELECT count(*) FROM listener.face_index_intents") == 0


async def test_a_worker_that_lost_its_lease_sends_no_index_faces(
    conn: asyncpg.Connection,
    pool: asyncpg.Pool,
    fake: FakeRekognition,
    provider: RekognitionProvider,
) -> None:
    """A worker frozen past its lease wakes up after another worker claimed the job (and
    cleaned up): it cannot record its request, so it sends nothing that no one would clean."""
    store = PgJobStore(pool, effects=pg_effect_writers())
    zombie = await enqueue_and_claim(store, "a1")
    await lose_lease(conn, store, zombie)
    current = await claim(store, "a1")
    with pytest.raises(LeaseLost):
        await run_faces(provider, zombie)
    assert "IndexFaces" not in [op for op, _ in fake.calls]
    assert collection_faces(fake, "a1") == []
    assert await store.save_step(current, await run_faces(provider, current))
    assert len(collection_faces(fake, "a1")) == 1


async def test_the_clean_up_finds_faces_of_the_old_external_image_id(
    conn: asyncpg.Connection,
    pool: asyncpg.Pool,
    fake: FakeRekognition,
    provider: RekognitionProvider,
) -> None:
    """Faces indexed under the row id alone (as older versions named them) that no one
    recorded are deleted with the row's; a recorded face of another table's row with the same
    id is left alone."""
    store = PgJobStore(pool, effects=pg_effect_writers())
    other = "public.other_images"
    await store.enqueue(other, "a1", "http://photos/other-a1.jpg", "owner-1")
    (kept_job,) = await store.claim(1, "worker-o", 30.0, uuid.uuid4(), admit=True)
    kept = await run_faces(provider, kept_job, face_photo("b", seed=4))
    assert await store.save_step(kept_job, kept)
    (kept_face,) = [f["face_id"] for f in kept.effects["faces"]["faces"]]
    # The recorded face of the other table's row now also carries the old id, as if it had
    # been indexed before the id named the table.
    fake.collections["listener-owner-1"].faces[kept_face].external_image_id = "a1"
    # An unrecorded face under the old id: a run of an older version died after IndexFaces.
    session = aioboto3.Session()
    async with session.client(
        "rekognition", endpoint_url=fake.endpoint_url, region_name="us-east-1"
    ) as client:
        indexed = await client.index_faces(
            CollectionId="listener-owner-1",
            Image={"Bytes": PHOTOS["a1"]},
            ExternalImageId="a1",
        )
    (orphan,) = [r["Face"]["FaceId"] for r in indexed["FaceRecords"]]
    gone, _ = await provider.delete_row_faces("owner-1", TABLE, "a1")
    faces = fake.collections["listener-owner-1"].faces
    assert gone == 1 and orphan not in faces and kept_face in faces


async def test_unknown_effects_are_refused_before_anything_is_written(
    conn: asyncpg.Connection, pool: asyncpg.Pool
) -> None:
    store = PgJobStore(pool, effects=pg_effect_writers())
    job = await enqueue_and_claim(store, "a1")
    with pytest.raises(ValueError, match="unknown step effects: labels"):
        await store.save_step(job, StepResult("p", "p.s", {"x": 1}, effects={"labels": []}))
    assert await table_counts(conn) == {"faces": 0, "people": 0, "suggestions": 0, "results": 0}


async def test_the_daemon_cleans_up_after_a_worker_that_died_after_index_faces(
    database_url: str,
    conn: asyncpg.Connection,
    pool: asyncpg.Pool,
    fake: FakeRekognition,
    provider: RekognitionProvider,
    tmp_path: Path,
) -> None:
    for name, data in PHOTOS.items():
        (tmp_path / f"{name}.jpg").write_bytes(data)
    table = await make_table(conn, owner=True)
    store = PgJobStore(pool, effects=pg_effect_writers())
    async with StaticServer(str(tmp_path)) as photos:
        await conn.execute(
            f"INSERT INTO {table} (url, owner_id) VALUES ($1, 'owner-1')",
            f"{photos.base_url}/a1.jpg",
        )
        # A worker claims the job, indexes its faces and dies before storing the step.
        job = await claim(store, "1")
        await run_faces(provider, job, PHOTOS["a1"])
        assert len(collection_faces(fake, "1")) == 1
        await conn.execute(
            "UPDATE listener.jobs SET lease_expires_at = now() - interval '1 second' WHERE id = $1",
            job.id,
        )
        settings = fast_settings(
            database_url,
            pipeline="tiered",
            tiers=TierSettings(tier1=["rekognition"], faces=True),
            rekognition=RekognitionSettings(endpoint_url=fake.endpoint_url, region="us-east-1"),
            rate_limits={"rekognition": RateLimit(rps=100, burst=10, concurrency=4)},
        )
        async with Daemon(settings) as daemon:
            await jobs_finished(daemon, conn, 1, timeout=30)
    snapshot = await store.snapshot(job.id)
    assert snapshot is not None and (snapshot.status, snapshot.claims) == ("complete", 2)
    (face,) = collection_faces(fake, "1")
    assert await conn.fetchval("SELECT array_agg(face_id) FROM listener.faces") == [face]
    output = json.loads(
        await conn.fetchval(
            "SELECT output FROM listener.results WHERE job_id = $1 AND step = 'rekognition.faces'",
            job.id,
        )
    )
    assert output["removed_faces"] == 1 and [f["face_id"] for f in output["faces"]] == [face]
