"""Face collections: ``CreateCollection``, ``ListCollections``, ``DeleteCollection``,
``IndexFaces``, ``ListFaces``, ``DeleteFaces`` and ``SearchFaces``.

moto does not implement them. Shapes follow botocore's service model (``rekognition``
2016-06-27); see the package docstring for the quality filter, thresholds and limits.
"""

from __future__ import annotations

import re
import time
import uuid
from dataclasses import dataclass, field

from listener.testing.rekognition_fake.faces import QUALITY_BARS, Signature, face_similarity
from listener.testing.rekognition_fake.protocol import (
    Json,
    RekognitionError,
    check_pattern,
    int_param,
    paginate,
    validation,
)
from listener.testing.rekognition_fake.worker import ImageWorker

FACE_MODEL_VERSION = "7.0"
REGION = "us-east-1"
ACCOUNT = "123456789012"
MAX_MATCHES = 4096
COLLECTION_ID = re.compile(r"[a-zA-Z0-9_.\-]{1,255}")
EXTERNAL_IMAGE_ID = re.compile(r"[a-zA-Z0-9_.\-:]{1,255}")


@dataclass
class StoredFace:
    """A face indexed into a collection."""

    face_id: str
    image_id: str
    external_image_id: str | None
    bounding_box: Json
    confidence: float
    signature: Signature = field(repr=False)

    def to_json(self) -> Json:
        """The ``Face`` shape."""
        face: Json = {
            "FaceId": self.face_id,
            "BoundingBox": dict(self.bounding_box),
            "ImageId": self.image_id,
            "Confidence": self.confidence,
            "IndexFacesModelVersion": FACE_MODEL_VERSION,
        }
        if self.external_image_id is not None:
            face["ExternalImageId"] = self.external_image_id
        return face


@dataclass
class Collection:
    """A face collection: faces by id, in the order they were indexed."""

    collection_id: str
    arn: str
    created_at: float
    faces: dict[str, StoredFace] = field(default_factory=dict)


def rank_matches(
    probe: Signature, faces: list[StoredFace], threshold: float, limit: int
) -> list[Json]:
    """``FaceMatches`` for ``probe`` among ``faces``: at least ``threshold``, best first."""
    scored = [(face_similarity(probe, face.signature), face) for face in faces]
    kept = sorted((s for s in scored if s[0] >= threshold), key=lambda s: -s[0])[:limit]
    return [{"Similarity": similarity, "Face": face.to_json()} for similarity, face in kept]


def parse_collection_id(params: Json) -> str:
    return check_pattern("collectionId", params.get("CollectionId"), COLLECTION_ID)


def parse_threshold(params: Json) -> float:
    value = params.get("FaceMatchThreshold", 80.0)
    if not isinstance(value, int | float) or not 0 <= value <= 100:
        raise validation("faceMatchThreshold", value, "be between 0 and 100")
    return float(value)


def parse_quality_filter(params: Json, default: str) -> str:
    value = params.get("QualityFilter", default)
    if value not in QUALITY_BARS and value != "NONE":
        raise validation("qualityFilter", value, "be one of NONE, AUTO, LOW, MEDIUM, HIGH")
    return str(value)


class FaceCollections:
    """The collections (``collections``: id -> ``Collection``) and their operations.

    Each operation takes the request's parameters and answers its JSON, or raises
    ``RekognitionError``. Image work runs on ``worker``.
    """

    def __init__(self, worker: ImageWorker) -> None:
        self.collections: dict[str, Collection] = {}
        self._worker = worker

    def _collection(self, params: Json) -> Collection:
        collection_id = parse_collection_id(params)
        collection = self.collections.get(collection_id)
        if collection is None:
            raise RekognitionError(
                "ResourceNotFoundException", f"The collection id: {collection_id} does not exist"
            )
        return collection

    async def create_collection(self, params: Json) -> Json:
        collection_id = parse_collection_id(params)
        if collection_id in self.collections:
            raise RekognitionError(
                "ResourceAlreadyExistsException",
                f"The collection id: {collection_id} already exists",
            )
        arn = f"aws:rekognition:{REGION}:{ACCOUNT}:collection/{collection_id}"
        self.collections[collection_id] = Collection(collection_id, arn, time.time())
        return {"StatusCode": 200, "CollectionArn": arn, "FaceModelVersion": FACE_MODEL_VERSION}

    async def list_collections(self, params: Json) -> Json:
        ids = sorted(self.collections)
        page, token = paginate(ids, params)
        answer: Json = {
            "CollectionIds": page,
            "FaceModelVersions": [FACE_MODEL_VERSION] * len(page),
        }
        if token is not None:
            answer["NextToken"] = token
        return answer

    async def delete_collection(self, params: Json) -> Json:
        # A collection deleted outside listener (the console, another tool): its faces go too.
        collection = self._collection(params)
        del self.collections[collection.collection_id]
        return {"StatusCode": 200}

    async def index_faces(self, params: Json) -> Json:
        collection = self._collection(params)
        external_id = params.get("ExternalImageId")
        if external_id is not None:
            check_pattern("externalImageId", external_id, EXTERNAL_IMAGE_ID)
        max_faces = int_param(params, "MaxFaces", None, 1, None)
        quality_filter = parse_quality_filter(params, "AUTO")
        analysis = await self._worker.analyze(params)
        image_id = str(uuid.uuid4())
        records: list[Json] = []
        unindexed: list[Json] = []
        candidates = []
        for face in analysis.faces:
            reasons = face.quality_reasons(quality_filter)
            if reasons:
                unindexed.append({"Reasons": reasons, "FaceDetail": face.detail()})
            else:
                candidates.append(face)
        for rank, face in enumerate(candidates):  # largest first
            if max_faces is not None and rank >= max_faces:
                unindexed.append({"Reasons": ["EXCEEDS_MAX_FACES"], "FaceDetail": face.detail()})
                continue
            stored = StoredFace(
                face_id=str(uuid.uuid4()),
                image_id=image_id,
                external_image_id=external_id,
                bounding_box=face.bounding_box(),
                confidence=face.confidence,
                signature=face.signature,
            )
            collection.faces[stored.face_id] = stored
            records.append({"Face": stored.to_json(), "FaceDetail": face.detail()})
        return {
            "FaceRecords": records,
            "FaceModelVersion": FACE_MODEL_VERSION,
            "UnindexedFaces": unindexed,
        }

    async def list_faces(self, params: Json) -> Json:
        collection = self._collection(params)
        faces = list(collection.faces.values())
        wanted = params.get("FaceIds")
        if wanted:
            faces = [f for f in faces if f.face_id in set(wanted)]
        page, token = paginate([f.to_json() for f in faces], params)
        answer: Json = {"Faces": page, "FaceModelVersion": FACE_MODEL_VERSION}
        if token is not None:
            answer["NextToken"] = token
        return answer

    async def delete_faces(self, params: Json) -> Json:
        collection = self._collection(params)
        deleted, failed = [], []
        for face_id in params.get("FaceIds") or []:
            if collection.faces.pop(face_id, None) is None:
                failed.append({"FaceId": face_id, "Reasons": ["FACE_NOT_FOUND"]})
            else:
                deleted.append(face_id)
        return {"DeletedFaces": deleted, "UnsuccessfulFaceDeletions": failed}

    async def search_faces(self, params: Json) -> Json:
        collection = self._collection(params)
        face_id = params.get("FaceId")
        probe = collection.faces.get(face_id) if isinstance(face_id, str) else None
        if probe is None:
            raise RekognitionError(
                "InvalidParameterException", f"Face {face_id} is not in the collection"
            )
        threshold = parse_threshold(params)
        limit = int_param(params, "MaxFaces", MAX_MATCHES, 1, MAX_MATCHES)
        others = [f for f in collection.faces.values() if f.face_id != probe.face_id]
        matches = await self._worker.run(rank_matches, probe.signature, others, threshold, limit)
        return {
            "SearchedFaceId": probe.face_id,
            "FaceMatches": matches,
            "FaceModelVersion": FACE_MODEL_VERSION,
        }
