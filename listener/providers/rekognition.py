"""The AWS Rekognition provider: labels and faces through ``aioboto3``.

- ``labels``: DetectLabels with ``GENERAL_LABELS`` and ``IMAGE_PROPERTIES`` (labels, and the
  image's sharpness, brightness and contrast).
- ``faces``: a collection per owner (created on first use), IndexFaces with
  ``ExternalImageId`` = the source row's id, then SearchFaces for each new face; the matches
  become people, suggestions or new faces (``listener.faces``).

Images go as bytes: Rekognition takes PNG or JPEG up to 5 MB
(https://docs.aws.amazon.com/rekognition/latest/dg/limits.html), so other formats are
converted to JPEG and larger images are downscaled and re-encoded to fit. botocore's retries
are off (one attempt): listener owns retries and the fleet-wide rate limit.

Errors (https://docs.aws.amazon.com/rekognition/latest/APIReference/CommonErrors.html):
``ThrottlingException`` / ``ProvisionedThroughputExceededException`` /
``LimitExceededException`` -> ``RateLimited`` (the provider pauses for everyone);
``InvalidImageFormatException``, ``ImageTooLargeException``, ``InvalidParameterException`` ->
permanent; ``AccessDeniedException`` and missing credentials -> ``ProviderPaused``; other
errors and connection failures -> ``ProviderUnavailable``.
"""

from __future__ import annotations

import asyncio
import io
import time
from contextlib import AsyncExitStack
from typing import Any

import aioboto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError
from PIL import Image

from listener.errors import (
    FetchTimeout,
    ImageTooLarge,
    InvalidImage,
    ProviderPaused,
    ProviderUnavailable,
    RateLimited,
    RejectedByProvider,
)
from listener.faces import FaceMatch, FaceStore, IndexedFace, collection_id, safe_id
from listener.providers.base import ImageInput, StepContext, StepResult
from listener.settings import RekognitionSettings

MAX_BYTES = 5 * 1024 * 1024
"""Rekognition's limit for image bytes sent in the request."""

_THROTTLED = {
    "ThrottlingException",
    "ProvisionedThroughputExceededException",
    "LimitExceededException",
}
_PERMANENT = {
    "InvalidImageFormatException": InvalidImage,
    "ImageTooLargeException": ImageTooLarge,
    "InvalidParameterException": RejectedByProvider,
}


def prepare_image(data: bytes, image_format: str, max_bytes: int = MAX_BYTES) -> bytes:
    """``data`` as PNG or JPEG of at most ``max_bytes`` bytes.

    PNG and JPEG under the limit pass unchanged; other formats are converted to JPEG; larger
    images are downscaled (by the square root of the size ratio, then 10% steps) and
    re-encoded as JPEG at quality 85.

    Raises:
        InvalidImage: the bytes cannot be decoded.
        ImageTooLarge: even a 320 px version does not fit (never for real photos).
    """
    if image_format in ("JPEG", "PNG") and len(data) <= max_bytes:
        return data
    try:
        with Image.open(io.BytesIO(data)) as img:
            rgb = img.convert("RGB")
    except Exception as error:
        raise InvalidImage(f"cannot convert the image for Rekognition: {error}") from None
    scale = 1.0 if len(data) <= max_bytes else (max_bytes / len(data)) ** 0.5
    while True:
        size = (max(1, int(rgb.width * scale)), max(1, int(rgb.height * scale)))
        out = io.BytesIO()
        rgb.resize(size, Image.Resampling.LANCZOS).save(out, format="JPEG", quality=85)
        if out.tell() <= max_bytes:
            return out.getvalue()
        if max(size) <= 320:
            raise ImageTooLarge("the image does not fit Rekognition's 5 MB limit")
        scale *= 0.9


class RekognitionProvider:
    """AWS Rekognition behind the ``Provider`` protocol; kinds ``labels`` and ``faces``.

    Args:
        settings: region, endpoint, label and face settings.
        faces: where faces and people are recorded (needed for the ``faces`` kind).
    """

    name = "rekognition"
    needs_image = True

    def __init__(self, settings: RekognitionSettings, faces: FaceStore | None = None) -> None:
        self._s = settings
        self._faces = faces
        self._stack: AsyncExitStack | None = None
        self._client: Any = None
        self._collections: set[str] = set()

    async def start(self) -> None:
        """Open the client (credentials and region from the standard AWS chain)."""
        self._stack = AsyncExitStack()
        session = aioboto3.Session(region_name=self._s.region)
        config = Config(
            # total_max_attempts counts the first try; max_attempts would allow one retry.
            retries={"total_max_attempts": 1, "mode": "standard"},
            connect_timeout=self._s.timeout_s,
            read_timeout=self._s.timeout_s,
            region_name=self._s.region or session.region_name or "us-east-1",
        )
        self._client = await self._stack.enter_async_context(
            session.client("rekognition", endpoint_url=self._s.endpoint_url, config=config)
        )

    async def close(self) -> None:
        """Close the client."""
        if self._stack is not None:
            await self._stack.aclose()
            self._stack = None
            self._client = None

    def estimate_tokens(self, kind: str, image: ImageInput) -> int:
        """Not token-priced: 0."""
        return 0

    async def run(self, kind: str, image: ImageInput, context: StepContext) -> StepResult:
        """Run the ``labels`` or ``faces`` step.

        Raises:
            RateLimited, ProviderPaused, InvalidImage, ImageTooLarge, RejectedByProvider,
            FetchTimeout, ProviderUnavailable: see the module docstring.
        """
        if self._client is None:
            raise RuntimeError("RekognitionProvider.start() must be called before run()")
        data = await asyncio.to_thread(prepare_image, image.data, image.content_type)
        started = time.perf_counter()
        try:
            if kind == "labels":
                output, calls = await self._labels(data), 1
            elif kind == "faces":
                output, calls = await self._index_and_match(data, image)
            else:
                raise ValueError(f"rekognition has no step kind {kind!r}")
        except ClientError as error:
            raise self._translate(error) from None
        except NoCredentialsError:
            raise ProviderPaused("Rekognition: no AWS credentials found", pause_s=300.0) from None
        except BotoCoreError as error:
            if "timeout" in type(error).__name__.lower():
                raise FetchTimeout(f"Rekognition: {error}") from None
            raise ProviderUnavailable(f"Rekognition: {error}") from None
        return StepResult(
            provider=self.name,
            step=f"{self.name}.{kind}",
            output=output,
            model=output.get("model_version"),
            duration_s=time.perf_counter() - started,
            calls=calls,
        )

    async def _labels(self, data: bytes) -> dict[str, Any]:
        answer = await self._client.detect_labels(
            Image={"Bytes": data},
            MaxLabels=self._s.max_labels,
            MinConfidence=self._s.min_confidence,
            Features=["GENERAL_LABELS", "IMAGE_PROPERTIES"],
        )
        quality = answer.get("ImageProperties", {}).get("Quality", {})
        return {
            "labels": [
                {
                    "name": label["Name"],
                    "confidence": round(float(label["Confidence"]), 2),
                    "parents": [p["Name"] for p in label.get("Parents", [])],
                    "instances": len(label.get("Instances", [])),
                }
                for label in answer.get("Labels", [])
            ],
            "sharpness": quality.get("Sharpness"),
            "brightness": quality.get("Brightness"),
            "contrast": quality.get("Contrast"),
            "model_version": answer.get("LabelModelVersion"),
        }

    async def _ensure_collection(self, collection: str) -> int:
        if collection in self._collections:
            return 0
        try:
            await self._client.create_collection(CollectionId=collection)
        except ClientError as error:
            if error.response.get("Error", {}).get("Code") != "ResourceAlreadyExistsException":
                raise
        self._collections.add(collection)
        return 1

    async def _index_and_match(self, data: bytes, image: ImageInput) -> tuple[dict[str, Any], int]:
        if self._faces is None:
            raise RuntimeError("the faces step needs a FaceStore")
        collection = collection_id(self._s.collection_prefix, image.owner_id)
        calls = await self._ensure_collection(collection)
        indexed = await self._client.index_faces(
            CollectionId=collection,
            Image={"Bytes": data},
            ExternalImageId=safe_id(image.source_id),
            MaxFaces=self._s.max_faces,
            QualityFilter="AUTO",
            DetectionAttributes=["DEFAULT"],
        )
        calls += 1
        faces = [
            IndexedFace(
                face_id=r["Face"]["FaceId"],
                bounding_box={k: float(v) for k, v in r["Face"]["BoundingBox"].items()},
                confidence=float(r["Face"].get("Confidence", 0.0)),
            )
            for r in indexed.get("FaceRecords", [])
        ]
        matches: dict[str, list[FaceMatch]] = {}
        for face in faces:
            found = await self._client.search_faces(
                CollectionId=collection,
                FaceId=face.face_id,
                FaceMatchThreshold=self._s.suggest_similarity,
                MaxFaces=5,
            )
            calls += 1
            matches[face.face_id] = [
                FaceMatch(m["Face"]["FaceId"], float(m["Similarity"]))
                for m in found.get("FaceMatches", [])
            ]
        decisions = await self._faces.record(collection, image, faces, matches)
        unindexed = [
            {
                "reasons": u.get("Reasons", []),
                "bounding_box": u.get("FaceDetail", {}).get("BoundingBox"),
            }
            for u in indexed.get("UnindexedFaces", [])
        ]
        by_id = {f.face_id: f for f in faces}
        return (
            {
                "collection_id": collection,
                "faces": [
                    {**d, "bounding_box": dict(by_id[d["face_id"]].bounding_box)} for d in decisions
                ],
                "unindexed": unindexed,
                "model_version": indexed.get("FaceModelVersion"),
            },
            calls,
        )

    def _translate(self, error: ClientError) -> Exception:
        info = error.response.get("Error", {})
        code = str(info.get("Code", "Unknown"))
        message = f"Rekognition {code}: {info.get('Message', '')}".strip().rstrip(":")[:300]
        if code in _THROTTLED:
            return RateLimited(message, retry_after=1.0)
        if code in _PERMANENT:
            return _PERMANENT[code](message)
        if code in ("AccessDeniedException", "UnrecognizedClientException"):
            return ProviderPaused(f"Rekognition refused the credentials ({code})", pause_s=300.0)
        return ProviderUnavailable(message)
