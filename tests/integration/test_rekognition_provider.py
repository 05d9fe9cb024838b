"""The Rekognition provider through aioboto3 against the fake: labels, faces, people, errors."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import pytest
from awaiting import jobs_finished
from support import (
    StaticServer,
    faces_settings,
    make_table,
    serve_photos,
)

from listener.analysis.providers.base import ImageInput, StepContext
from listener.analysis.providers.rekognition import RekognitionProvider
from listener.app import Daemon
from listener.errors import (
    ImageTooLarge,
    InvalidImage,
    ProviderUnavailable,
    RateLimited,
    RejectedByProvider,
)
from listener.settings import RateLimit, RekognitionSettings, TierSettings
from listener.testing.rekognition_fake import FakeRekognition, face_photo, no_face_photo

pytestmark = pytest.mark.usefixtures("aws_env")
FAKE = FakeRekognition  # the class of the ``fake`` fixture (conftest.py)


@pytest.fixture
async def photos(tmp_path: Path) -> AsyncIterator[StaticServer]:
    shots = {
        "a1.jpg": face_photo("a", seed=1, scale=1.0),
        "a2.jpg": face_photo("a", seed=2, scale=1.25, position=(40, 60), brightness=1.05),
        "border.jpg": face_photo("a_borderline", seed=3, scale=0.9),
        "b.jpg": face_photo("b", seed=4),
        "none.jpg": no_face_photo(seed=5),
    }
    async with serve_photos(tmp_path, files=shots) as server:
        yield server


async def insert_and_wait(
    daemon: Daemon, conn: asyncpg.Connection, table: str, url: str, owner: str, expected: int
) -> None:
    await conn.execute(f"INSERT INTO {table} (url, owner_id) VALUES ($1, $2)", url, owner)
    await jobs_finished(daemon, conn, expected, timeout=30)


async def test_faces_become_people_suggestions_and_new_faces(
    database_url: str, conn: asyncpg.Connection, fake: FakeRekognition, photos: StaticServer
) -> None:
    table = await make_table(conn, owner=True)
    base = photos.base_url
    async with Daemon(faces_settings(database_url, fake)) as daemon:
        # In order: matching depends on which faces are already in the collection.
        for n, name in enumerate(("a1", "a2", "border", "b", "none"), start=1):
            await insert_and_wait(daemon, conn, table, f"{base}/{name}.jpg", "owner-1", n)
        await insert_and_wait(daemon, conn, table, f"{base}/a1.jpg", "owner-2", 6)
    faces = {
        (r["owner_id"], r["url"].rsplit("/", 1)[1]): r
        for r in await conn.fetch(
            "SELECT f.*, i.url FROM listener.faces f "
            "JOIN public.images i ON i.id::text = f.source_id"
        )
    }
    assert sorted(faces) == [
        ("owner-1", "a1.jpg"),
        ("owner-1", "a2.jpg"),
        ("owner-1", "b.jpg"),
        ("owner-1", "border.jpg"),
        ("owner-2", "a1.jpg"),
    ]
    a1, a2 = faces[("owner-1", "a1.jpg")], faces[("owner-1", "a2.jpg")]
    # The same person in two photos: assigned automatically, one person for both faces.
    assert a2["person_id"] is not None and a2["person_id"] == a1["person_id"]
    assert a2["matched_face"] == a1["face_id"] and a2["similarity"] >= 95
    # A borderline match is a suggestion for review, not an assignment.
    border = faces[("owner-1", "border.jpg")]
    assert border["person_id"] is None
    suggestion = await conn.fetchrow(
        "SELECT * FROM listener.face_suggestions WHERE face_id = $1", border["face_id"]
    )
    assert suggestion is not None and 80 <= suggestion["similarity"] < 95
    assert suggestion["person_id"] == a1["person_id"]
    # A stranger is a new, unassigned face; another owner's collection knows nobody.
    assert faces[("owner-1", "b.jpg")]["person_id"] is None
    assert faces[("owner-2", "a1.jpg")]["person_id"] is None
    assert faces[("owner-2", "a1.jpg")]["collection_id"] == "listener-owner-2"
    assert await conn.fetchval("SELECT count(*) FROM listener.people") == 1
    assert await conn.fetchval("SELECT count(*) FROM listener.face_suggestions") == 1

    outputs = {
        (r["url"].rsplit("/", 1)[1], r["owner_id"], r["step"]): r
        for r in await conn.fetch(
            "SELECT i.url, i.owner_id, r.step, r.output, r.calls, r.cost_usd "
            "FROM listener.results r JOIN listener.jobs j ON j.id = r.job_id "
            "JOIN public.images i ON i.id::text = j.source_id"
        )
    }
    labels = json.loads(outputs[("a1.jpg", "owner-1", "rekognition.labels")]["output"])
    assert labels["labels"] and labels["sharpness"] is not None
    first = outputs[("a1.jpg", "owner-1", "rekognition.faces")]
    # CreateCollection + IndexFaces + one SearchFaces, at $0.001 a call.
    assert first["calls"] == 3 and float(first["cost_usd"]) == pytest.approx(0.003)
    decisions = json.loads(outputs[("a2.jpg", "owner-1", "rekognition.faces")]["output"])
    assert [f["decision"] for f in decisions["faces"]] == ["assigned"]
    # The person assigned when the store wrote the step is in the stored output.
    assert [f["person_id"] for f in decisions["faces"]] == [a1["person_id"]]
    border_output = json.loads(outputs[("border.jpg", "owner-1", "rekognition.faces")]["output"])
    assert [(f["decision"], f["person_id"]) for f in border_output["faces"]] == [
        ("suggested", None)
    ]
    none = json.loads(outputs[("none.jpg", "owner-1", "rekognition.faces")]["output"])
    assert none["faces"] == []


def image(data: bytes, fmt: str = "JPEG") -> ImageInput:
    return ImageInput(1, "public.images", "1", "owner", "http://x/a.jpg", data, fmt, 640, 480)


@pytest.mark.parametrize(
    ("fault", "expected"),
    [
        ("ThrottlingException", RateLimited),
        ("ProvisionedThroughputExceededException", RateLimited),
        ("InvalidImageFormatException", InvalidImage),
        ("ImageTooLargeException", ImageTooLarge),
        ("InvalidParameterException", RejectedByProvider),
        ("InternalServerError", ProviderUnavailable),
    ],
)
async def test_errors_are_classified_and_never_retried_by_botocore(
    fake: FakeRekognition, fault: str, expected: type[Exception]
) -> None:
    provider = RekognitionProvider(
        RekognitionSettings(endpoint_url=fake.endpoint_url, region="us-east-1")
    )
    await provider.start()
    try:
        fake.faults.append(fault)
        with pytest.raises(expected, match=fault):
            await provider.run("labels", image(face_photo("a")), StepContext("rekognition.labels"))
    finally:
        await provider.close()
    assert len(fake.calls) == 1  # listener owns retries: botocore made one attempt


async def test_gif_is_converted_and_big_images_shrunk(fake: FakeRekognition) -> None:
    import io

    from PIL import Image

    provider = RekognitionProvider(
        RekognitionSettings(endpoint_url=fake.endpoint_url, region="us-east-1")
    )
    await provider.start()
    try:
        gif = io.BytesIO()
        Image.open(io.BytesIO(face_photo("a"))).save(gif, format="GIF")
        result = await provider.run("labels", image(gif.getvalue(), "GIF"), StepContext("x"))
        assert result.output["labels"]
    finally:
        await provider.close()


async def test_bucket_keeps_rekognition_within_its_tps(
    database_url: str, conn: asyncpg.Connection, photos: StaticServer
) -> None:
    table = await make_table(conn, owner=True)
    async with FakeRekognition(tps_limit=5) as fake:
        settings = faces_settings(
            database_url,
            fake,
            tiers=TierSettings(tier1=["rekognition"]),
            concurrency=10,
            # A margin under the fake's 5 TPS for the event loop's jitter under load.
            rate_limits={"rekognition": RateLimit(rps=4, burst=1, concurrency=10)},
            dedup="off",  # the rows repeat images: every one is a request
        )
        async with Daemon(settings) as daemon:
            await conn.execute(
                f"INSERT INTO {table} (url, owner_id) SELECT $1 || g, 'o' "
                "FROM generate_series(1, 12) g",
                f"{photos.base_url}/a1.jpg?v=",
            )
            await jobs_finished(daemon, conn, 12, timeout=60)
        assert fake.violations == 0
        assert len(fake.calls) == 12
