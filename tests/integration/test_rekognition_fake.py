"""``listener.testing.FakeRekognition`` through the real ``aioboto3`` client.

Everything goes over real HTTP on 127.0.0.1, so botocore validates the requests and parses
the answers against Rekognition's service model, as it would against AWS.
"""

from __future__ import annotations

import asyncio
import io
import re
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import aioboto3
import aiohttp
import cv2
import numpy as np
import pytest
from botocore.config import Config
from botocore.exceptions import ClientError
from PIL import Image
from support import fake_on_command_line

from listener.testing.rekognition_fake import (
    TILE_SIDE,
    FaceAnalyzer,
    FakeRekognition,
    face_photo,
    face_similarity,
    face_tile,
    no_face_photo,
)

FAKE = FakeRekognition  # the class of the ``fake`` fixture (conftest.py)

FAKE_MODULE = "listener.testing.rekognition_fake"
UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


ONE_ATTEMPT = Config(retries={"total_max_attempts": 1, "mode": "standard"})


@asynccontextmanager
async def rekognition_client(endpoint_url: str, config: Config = ONE_ATTEMPT) -> AsyncIterator[Any]:
    """A real aioboto3 Rekognition client for ``endpoint_url``, one attempt per call.

    ``retries={"max_attempts": 1}`` would mean one *retry* (botocore's legacy meaning, see
    ``test_max_attempts_1_means_one_retry``); ``total_max_attempts`` counts the first try.
    """
    session = aioboto3.Session(
        aws_access_key_id="testing", aws_secret_access_key="testing", region_name="us-east-1"
    )
    async with session.client("rekognition", endpoint_url=endpoint_url, config=config) as client:
        yield client


@pytest.fixture
async def client(fake: FakeRekognition) -> AsyncIterator[Any]:
    async with rekognition_client(fake.endpoint_url) as rekognition:
        yield rekognition


def error_code(error: ClientError) -> str:
    return str(error.response["Error"]["Code"])


async def index_one(client: Any, photo: bytes, external_id: str) -> str:
    """Index ``photo`` into "people"; the FaceId of its one face."""
    answer = await client.index_faces(
        CollectionId="people", Image={"Bytes": photo}, ExternalImageId=external_id
    )
    assert len(answer["FaceRecords"]) == 1, answer
    return str(answer["FaceRecords"][0]["Face"]["FaceId"])


async def similarity_to(client: Any, probe: bytes, reference_id: str) -> float | None:
    """Index ``probe`` and search with it: its similarity to ``reference_id``, if listed."""
    probe_id = await index_one(client, probe, "probe")
    found = await client.search_faces(
        CollectionId="people", FaceId=probe_id, FaceMatchThreshold=0, MaxFaces=10
    )
    assert found["SearchedFaceId"] == probe_id
    assert probe_id not in [m["Face"]["FaceId"] for m in found["FaceMatches"]]
    for match in found["FaceMatches"]:
        if match["Face"]["FaceId"] == reference_id:
            return float(match["Similarity"])
    return None


# -- collections ---------------------------------------------------------------------------------


async def test_collection_lifecycle(client: Any, fake: FakeRekognition) -> None:
    created = await client.create_collection(CollectionId="people")
    assert created["StatusCode"] == 200
    assert created["CollectionArn"].endswith(":collection/people")
    assert created["FaceModelVersion"] == "7.0"

    with pytest.raises(ClientError) as caught:
        await client.create_collection(CollectionId="people")
    assert error_code(caught.value) == "ResourceAlreadyExistsException"
    assert isinstance(caught.value, client.exceptions.ResourceAlreadyExistsException)

    listed = await client.list_collections()
    assert listed["CollectionIds"] == ["people"]
    assert listed["FaceModelVersions"] == ["7.0"]
    assert fake.collections["people"].faces == {}
    with pytest.raises(ClientError) as caught:
        await client.list_faces(CollectionId="nobody")
    assert error_code(caught.value) == "ResourceNotFoundException"


async def test_list_collections_pages(client: Any) -> None:
    for name in ("c1", "c2", "c3"):
        await client.create_collection(CollectionId=name)
    first = await client.list_collections(MaxResults=2)
    assert first["CollectionIds"] == ["c1", "c2"]
    second = await client.list_collections(MaxResults=2, NextToken=first["NextToken"])
    assert second["CollectionIds"] == ["c3"]
    assert "NextToken" not in second


async def test_collection_id_pattern_is_checked_by_the_server(client: Any) -> None:
    with pytest.raises(ClientError) as caught:
        await client.create_collection(CollectionId="no spaces allowed")
    assert error_code(caught.value) == "ValidationException"


# -- faces ---------------------------------------------------------------------------------------


async def test_index_faces_returns_one_record(client: Any, fake: FakeRekognition) -> None:
    await client.create_collection(CollectionId="people")
    answer = await client.index_faces(
        CollectionId="people",
        Image={"Bytes": face_photo("a")},
        ExternalImageId="row-42",
        MaxFaces=5,
        QualityFilter="AUTO",
        DetectionAttributes=["DEFAULT"],
    )
    assert answer["FaceModelVersion"] == "7.0"
    assert answer["UnindexedFaces"] == []
    [record] = answer["FaceRecords"]
    face = record["Face"]
    assert UUID.fullmatch(face["FaceId"]) and UUID.fullmatch(face["ImageId"])
    assert face["ExternalImageId"] == "row-42"
    box = face["BoundingBox"]
    assert 0 < box["Left"] < box["Left"] + box["Width"] <= 1
    assert 0 < box["Top"] < box["Top"] + box["Height"] <= 1
    # The tile is centred in 640x480 and the face fills about 56% of its 167 px.
    assert box["Width"] * 640 == pytest.approx(0.56 * TILE_SIDE, rel=0.15)
    assert face["Confidence"] > 90
    detail = record["FaceDetail"]
    assert 0 < detail["Quality"]["Brightness"] <= 100
    assert 0 < detail["Quality"]["Sharpness"] <= 100
    assert detail["BoundingBox"] == box
    assert list(fake.collections["people"].faces) == [face["FaceId"]]

    listed = await client.list_faces(CollectionId="people")
    assert [f["FaceId"] for f in listed["Faces"]] == [face["FaceId"]]
    deleted = await client.delete_faces(CollectionId="people", FaceIds=[face["FaceId"]])
    assert deleted["DeletedFaces"] == [face["FaceId"]]
    assert fake.collections["people"].faces == {}


async def test_index_faces_into_missing_collection(client: Any) -> None:
    with pytest.raises(ClientError) as caught:
        await client.index_faces(CollectionId="nobody", Image={"Bytes": face_photo("a")})
    assert error_code(caught.value) == "ResourceNotFoundException"


async def test_same_face_in_another_photo_matches_at_97_or_more(client: Any) -> None:
    await client.create_collection(CollectionId="people")
    first = await index_one(client, face_photo("a", seed=1), "first")
    second_photo = face_photo("a", position=(420, 250), scale=1.25, brightness=0.92, seed=2)
    second = await index_one(client, second_photo, "second")
    found = await client.search_faces(CollectionId="people", FaceId=second)
    assert found["SearchedFaceId"] == second
    [match] = found["FaceMatches"]  # never the searched face itself
    assert match["Face"]["FaceId"] == first
    assert match["Face"]["ExternalImageId"] == "first"
    assert match["Similarity"] >= 97


async def test_borderline_face_lands_between_85_and_93(client: Any) -> None:
    await client.create_collection(CollectionId="people")
    reference = await index_one(client, face_photo("a", seed=1), "a")
    probe = face_photo("a_borderline", position=(30, 40), scale=0.8, brightness=1.05, seed=3)
    similarity = await similarity_to(client, probe, reference)
    assert similarity is not None
    assert 85 <= similarity <= 93


async def test_different_face_stays_below_70(client: Any) -> None:
    await client.create_collection(CollectionId="people")
    reference = await index_one(client, face_photo("a", seed=1), "a")
    similarity = await similarity_to(client, face_photo("b", scale=1.1, seed=4), reference)
    assert similarity is not None
    assert similarity < 70

    probe = await index_one(client, face_photo("b", scale=0.9, seed=5), "b2")
    found = await client.search_faces(CollectionId="people", FaceId=probe, FaceMatchThreshold=80)
    # Only the other photo of "b" is similar enough; "a" is absent.
    assert [m["Face"]["ExternalImageId"] for m in found["FaceMatches"]] == ["probe"]


async def test_matches_are_sorted_and_limited(client: Any) -> None:
    await client.create_collection(CollectionId="people")
    probe = await index_one(client, face_photo("a", seed=1), "probe")
    await index_one(client, face_photo("a", scale=0.8, seed=2), "same")
    await index_one(client, face_photo("a_borderline", seed=3), "borderline")
    await index_one(client, face_photo("b", seed=4), "other")
    found = await client.search_faces(CollectionId="people", FaceId=probe, FaceMatchThreshold=0)
    names = [m["Face"]["ExternalImageId"] for m in found["FaceMatches"]]
    assert names == ["same", "borderline", "other"]
    similarities = [m["Similarity"] for m in found["FaceMatches"]]
    assert similarities == sorted(similarities, reverse=True)
    limited = await client.search_faces(
        CollectionId="people", FaceId=probe, FaceMatchThreshold=0, MaxFaces=1
    )
    assert [m["Face"]["ExternalImageId"] for m in limited["FaceMatches"]] == ["same"]


def test_similarity_bands_hold_across_photos() -> None:
    """The calibration, on a spread of positions, scales and brightness (no server)."""
    analyzer = FaceAnalyzer()
    settings: list[dict[str, Any]] = [
        {"scale": 0.7, "brightness": 0.9, "position": (10, 10), "seed": 11},
        {"scale": 1.3, "brightness": 1.1, "position": (400, 250), "seed": 12},
        {"scale": 1.0, "brightness": 1.0, "seed": 13},
        {"scale": 0.85, "brightness": 1.05, "position": (300, 40), "seed": 14},
    ]

    def signatures(face: str) -> list[Any]:
        found = [analyzer.analyze(face_photo(face, **kw)).faces for kw in settings]
        assert [len(faces) for faces in found] == [1] * len(settings), face
        return [faces[0].signature for faces in found]

    same, borderline, other = signatures("a"), signatures("a_borderline"), signatures("b")
    for i, reference in enumerate(same):
        for j, candidate in enumerate(same):
            if i != j:
                assert face_similarity(reference, candidate) >= 97
        for candidate in borderline:
            assert 85 <= face_similarity(reference, candidate) <= 93
        for candidate in other:
            assert face_similarity(reference, candidate) < 70


async def test_no_face_photo_indexes_nothing(client: Any) -> None:
    await client.create_collection(CollectionId="people")
    photo = no_face_photo()
    answer = await client.index_faces(CollectionId="people", Image={"Bytes": photo})
    assert answer["FaceRecords"] == []
    assert answer["UnindexedFaces"] == []


def two_faces_photo() -> bytes:
    """A 640x480 JPEG with face "a" on the left (larger) and face "b" on the right."""
    photo = np.full((480, 640, 3), 150, np.uint8)
    photo[100:300, 20:220] = cv2.resize(face_tile("a"), (200, 200))
    photo[150:300, 400:550] = cv2.resize(face_tile("b"), (150, 150))
    ok, encoded = cv2.imencode(".jpg", photo)
    assert ok
    return bytes(encoded.tobytes())


async def test_max_faces_keeps_the_largest(client: Any) -> None:
    await client.create_collection(CollectionId="people")
    answer = await client.index_faces(
        CollectionId="people", Image={"Bytes": two_faces_photo()}, MaxFaces=1
    )
    [record] = answer["FaceRecords"]
    assert record["Face"]["BoundingBox"]["Left"] < 0.5  # the larger face, on the left
    [unindexed] = answer["UnindexedFaces"]
    assert unindexed["Reasons"] == ["EXCEEDS_MAX_FACES"]
    assert unindexed["FaceDetail"]["BoundingBox"]["Left"] > 0.5


async def test_quality_filter_rejects_small_and_soft_faces(client: Any) -> None:
    await client.create_collection(CollectionId="people")
    small = face_photo("a", scale=0.35)
    answer = await client.index_faces(CollectionId="people", Image={"Bytes": small})
    assert answer["FaceRecords"] == []
    assert answer["UnindexedFaces"][0]["Reasons"] == ["SMALL_BOUNDING_BOX"]
    answer = await client.index_faces(
        CollectionId="people", Image={"Bytes": small}, QualityFilter="NONE"
    )
    assert len(answer["FaceRecords"]) == 1
    soft = face_photo("a", blur=10)
    answer = await client.index_faces(CollectionId="people", Image={"Bytes": soft})
    assert answer["UnindexedFaces"][0]["Reasons"] == ["LOW_SHARPNESS"]


# -- labels --------------------------------------------------------------------------------------


async def test_detect_labels_with_image_properties(client: Any) -> None:
    answer = await client.detect_labels(
        Image={"Bytes": face_photo("a")},
        MaxLabels=20,
        MinConfidence=50,
        Features=["GENERAL_LABELS", "IMAGE_PROPERTIES"],
    )
    names = [label["Name"] for label in answer["Labels"]]
    assert {"Person", "Face"} <= set(names)
    assert len(names) == len(set(names))
    assert answer["LabelModelVersion"] == "3.0"
    person = next(label for label in answer["Labels"] if label["Name"] == "Person")
    assert len(person["Instances"]) == 1
    face = next(label for label in answer["Labels"] if label["Name"] == "Face")
    assert face["Parents"] == [{"Name": "Person"}]
    confidences = [label["Confidence"] for label in answer["Labels"]]
    assert confidences == sorted(confidences, reverse=True)

    quality = answer["ImageProperties"]["Quality"]
    assert set(quality) == {"Brightness", "Sharpness", "Contrast"}
    assert all(0 < value <= 100 for value in quality.values())


async def test_detect_labels_is_deterministic_and_measures_quality(client: Any) -> None:
    sharp = face_photo("a", seed=7)
    first = await client.detect_labels(Image={"Bytes": sharp}, Features=["IMAGE_PROPERTIES"])
    again = await client.detect_labels(Image={"Bytes": sharp}, Features=["IMAGE_PROPERTIES"])
    assert first["Labels"] == []  # only IMAGE_PROPERTIES was asked for
    assert first["ImageProperties"] == again["ImageProperties"]

    decoded = cv2.imdecode(np.frombuffer(sharp, np.uint8), cv2.IMREAD_COLOR)
    assert decoded is not None
    blurred = cv2.GaussianBlur(decoded, (0, 0), 4)
    dark = decoded // 4
    for image, member in ((blurred, "Sharpness"), (dark, "Brightness")):
        ok, encoded = cv2.imencode(".png", image)
        assert ok
        other = await client.detect_labels(
            Image={"Bytes": encoded.tobytes()}, Features=["IMAGE_PROPERTIES"]
        )
        before = first["ImageProperties"]["Quality"][member]
        assert other["ImageProperties"]["Quality"][member] < before / 2


async def test_detect_labels_without_faces(client: Any) -> None:
    answer = await client.detect_labels(Image={"Bytes": no_face_photo(seed=3)})
    names = {label["Name"] for label in answer["Labels"]}
    assert names
    assert not names & {"Person", "Face"}
    assert "ImageProperties" not in answer  # GENERAL_LABELS is the default feature


# -- errors --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fault", "status"),
    [
        ("ThrottlingException", 400),
        ("ProvisionedThroughputExceededException", 400),
        ("InvalidImageFormatException", 400),
        ("ImageTooLargeException", 400),
        ("InvalidParameterException", 400),
        ("LimitExceededException", 400),
        ("AccessDeniedException", 400),
        ("InternalServerError", 500),
        ("ServiceUnavailableException", 503),
    ],
)
async def test_injected_fault_surfaces_as_client_error(
    client: Any, fake: FakeRekognition, fault: str, status: int
) -> None:
    fake.faults.append(fault)
    with pytest.raises(ClientError) as caught:
        await client.detect_labels(Image={"Bytes": face_photo("a")})
    assert error_code(caught.value) == fault
    assert caught.value.response["ResponseMetadata"]["HTTPStatusCode"] == status
    assert fake.faults == []
    assert (await client.list_collections())["CollectionIds"] == []  # one request per fault


async def test_faults_are_first_in_first_out(client: Any, fake: FakeRekognition) -> None:
    fake.faults.extend(["ThrottlingException", "InternalServerError"])
    codes = []
    for _ in range(2):
        with pytest.raises(ClientError) as caught:
            await client.list_collections()
        codes.append(error_code(caught.value))
    assert codes == ["ThrottlingException", "InternalServerError"]
    await client.list_collections()
    assert [operation for operation, _ in fake.calls] == ["ListCollections"] * 3


async def test_max_attempts_1_means_one_retry(fake: FakeRekognition) -> None:
    """botocore quirk: ``retries={"max_attempts": 1}`` is one retry, two attempts in all."""
    config = Config(retries={"max_attempts": 1, "mode": "standard"})
    async with rekognition_client(fake.endpoint_url, config) as client:
        fake.faults.append("ThrottlingException")
        await client.list_collections()  # the retry succeeds
        assert len(fake.calls) == 2
        fake.faults.extend(["ThrottlingException", "ThrottlingException"])
        with pytest.raises(ClientError) as caught:
            await client.list_collections()
        assert error_code(caught.value) == "ThrottlingException"
        assert len(fake.calls) == 4


async def test_gif_is_an_invalid_image_format(client: Any) -> None:
    buffer = io.BytesIO()
    Image.new("RGB", (120, 120), (10, 200, 30)).save(buffer, format="GIF")
    with pytest.raises(ClientError) as caught:
        await client.detect_labels(Image={"Bytes": buffer.getvalue()})
    assert error_code(caught.value) == "InvalidImageFormatException"


# aiohttp warns (ResourceWarning) when aiobotocore sends a body over 1 MiB as bytes; the
# suite turns warnings into errors, so this test, and any that sends an image over ~750 kB,
# has to let that one through.
@pytest.mark.filterwarnings("ignore:Sending a large body directly:ResourceWarning")
async def test_six_megabytes_is_too_large(client: Any) -> None:
    too_large = b"\xff\xd8\xff\xe0" + bytes(6 * 1024 * 1024)
    with pytest.raises(ClientError) as caught:
        await client.detect_labels(Image={"Bytes": too_large})
    assert error_code(caught.value) == "ImageTooLargeException"


async def test_images_under_80_pixels_are_rejected(client: Any) -> None:
    ok, encoded = cv2.imencode(".png", np.zeros((60, 200, 3), np.uint8))
    assert ok
    with pytest.raises(ClientError) as caught:
        await client.detect_labels(Image={"Bytes": encoded.tobytes()})
    assert error_code(caught.value) == "InvalidParameterException"


async def test_empty_image_is_an_invalid_parameter(client: Any) -> None:
    with pytest.raises(ClientError) as caught:
        await client.detect_labels(Image={})
    assert error_code(caught.value) == "InvalidParameterException"


async def test_authorization_header_is_required(fake: FakeRekognition) -> None:
    headers = {
        "X-Amz-Target": "RekognitionService.ListCollections",
        "Content-Type": "application/x-amz-json-1.1",
    }
    async with aiohttp.ClientSession() as session:
        async with session.post(fake.endpoint_url, data=b"{}", headers=headers) as response:
            assert response.status == 403
            body = await response.json(content_type=None)
        assert body["__type"] == "MissingAuthenticationTokenException"
        headers["Authorization"] = "AWS4-HMAC-SHA256 Credential=testing/..."
        async with session.post(fake.endpoint_url, data=b"{}", headers=headers) as response:
            assert response.status == 200
            assert await response.json(content_type=None) == {
                "CollectionIds": [],
                "FaceModelVersions": [],
            }
        headers["X-Amz-Target"] = "RekognitionService.CompareFaces"
        async with session.post(fake.endpoint_url, data=b"{}", headers=headers) as response:
            assert response.status == 400
            assert (await response.json(content_type=None))["__type"] == (
                "UnknownOperationException"
            )


# -- rate limit ----------------------------------------------------------------------------------


async def test_tps_limit_throttles_a_burst() -> None:
    async with (
        FakeRekognition(tps_limit=5) as fake,
        rekognition_client(fake.endpoint_url) as client,
    ):
        photo = face_photo("a")

        async def call(i: int) -> str:
            try:
                if i % 2:
                    await client.list_collections()
                else:
                    await client.detect_labels(Image={"Bytes": photo})
            except ClientError as error:
                return error_code(error)
            return "ok"

        started = time.monotonic()
        outcomes = await asyncio.gather(*(call(i) for i in range(30)))
        elapsed = time.monotonic() - started

        assert fake.violations > 0
        assert outcomes.count("ThrottlingException") == fake.violations
        assert outcomes.count("ok") + fake.violations == 30
        assert 1 <= outcomes.count("ok") <= 5 * (int(elapsed) + 1)
        assert len(fake.calls) == 30

        await asyncio.sleep(1.05)  # the window has slid past the burst
        await client.list_collections()


async def test_tps_limit_admits_paced_calls() -> None:
    async with (
        FakeRekognition(tps_limit=5) as fake,
        rekognition_client(fake.endpoint_url) as client,
    ):
        for _ in range(7):
            await client.list_collections()
            await asyncio.sleep(0.21)
        assert fake.violations == 0


# -- command line --------------------------------------------------------------------------------


async def test_cli_prints_ready_and_serves() -> None:
    process, line = await fake_on_command_line(FAKE_MODULE, "--tps", "50")
    try:
        ready = re.fullmatch(r"READY (http://127\.0\.0\.1:\d+)\n", line)
        assert ready, line
        async with rekognition_client(ready.group(1)) as client:
            created = await client.create_collection(CollectionId="from-cli")
            assert created["StatusCode"] == 200
    finally:
        process.terminate()
        assert await asyncio.wait_for(process.wait(), timeout=10) is not None
