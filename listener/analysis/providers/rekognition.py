"""The AWS Rekognition provider: labels and faces through ``aioboto3``.

- ``labels``: DetectLabels with ``GENERAL_LABELS`` and ``IMAGE_PROPERTIES`` (labels, and the
  image's sharpness, brightness and contrast).
- ``faces``: a collection per owner (created on first use), IndexFaces with
  ``ExternalImageId`` identifying the source row (``listener.analysis.faces.external_image_id``),
  then
  SearchFaces for each new face; the matches become decisions (assign to a person, suggest,
  new face: ``listener.analysis.faces.decide``) returned as the step's ``"faces"`` effect. The
  provider
  only reads the database (which matched faces listener knows); the job store writes faces,
  people and suggestions with the step, fenced by the lease.

Idempotence of the faces step: a run that indexed faces but never stored its step (killed,
lease lost) leaves faces in the collection that listener never recorded. Each run records its
IndexFaces request before sending it (``FaceIntents.record``, fenced by the lease: a worker
that lost its lease sends nothing and raises ``LeaseLost``); storing the step forgets the
job's requests. When an earlier claim of the job left a request (``FaceIntents.earlier``),
the step first lists that collection (ListFaces, paginated; it cannot filter by
``ExternalImageId``) and deletes (DeleteFaces) the faces with this row's ``ExternalImageId``,
or the row id alone that older versions used, that listener has not recorded, then indexes
again: one copy of each face, whatever the number of attempts. A job claimed again for any
other reason lists nothing. What remains: a worker that recorded its request, then froze past
its lease and sent IndexFaces after the next claim's clean-up; its store is refused and its
faces are deleted at once (``undo``), unless it dies first.

Re-analysis and a changed URL: the faces recorded for the row by an earlier analysis are
deleted from their collection before the image is indexed (the new run replaces them; their
records go when the step is stored, ``listener.apply_face_effects`` of migration 0018), so a
retag does not record each face twice and the faces of a replaced photo do not stay
recognisable.

Collections deleted outside listener: the provider remembers which collections it created, so
a collection deleted at AWS (the console, a script) makes IndexFaces, SearchFaces or ListFaces
answer ``ResourceNotFoundException``. The faces step then forgets it, creates it again and runs
once more from the start (the faces of the deleted collection are gone with it), instead of
failing that owner's jobs until a restart.

Deleted rows (``listener.app_side.deletes``): ``delete_faces`` removes recorded faces (DeleteFaces,
at
most 4096 per call; a face or a collection already gone counts as deleted) and
``delete_row_faces`` every face of a row's ``ExternalImageId`` (ListFaces, then DeleteFaces).
A faces step whose result the job store refused (the job was cancelled, its row deleted, or
its lease taken over) is undone at once (``undo``: DeleteFaces of the faces it indexed).

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
from collections.abc import Mapping
from contextlib import AsyncExitStack
from typing import Any

import aioboto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError
from loguru import logger
from PIL import Image

from listener.analysis.faces import (
    FaceIntents,
    FaceMatch,
    IndexedFace,
    KnownFaces,
    collection_id,
    decide,
    external_image_id,
    legacy_external_image_id,
    output_faces,
)
from listener.analysis.providers.base import ImageInput, StepContext, StepResult
from listener.errors import (
    FetchTimeout,
    ImageTooLarge,
    InvalidImage,
    LeaseLost,
    ProviderPaused,
    ProviderUnavailable,
    RateLimited,
    RejectedByProvider,
)
from listener.ops.tracing import Tracing
from listener.redact import redact_text
from listener.settings import RekognitionSettings

MAX_BYTES = 5 * 1024 * 1024
"""Rekognition's limit for image bytes sent in the request."""

MAX_PAGE = 4096
"""The most faces ListFaces returns per page (``MaxResults``) and DeleteFaces takes per call
(``FaceIds``): botocore's service model, ``PageSize`` and ``FaceIdList`` max."""

_NOT_FOUND = "ResourceNotFoundException"

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
        faces: which faces listener has recorded (needed for the ``faces`` kind; read only).
        page_size: faces per ListFaces page, 1 to ``MAX_PAGE`` (smaller in tests).
        tracing: the daemon's tracing (trace headers on each request).
        intents: where the faces step records each IndexFaces request before sending it,
            fenced by the lease (``listener.analysis.faces.FaceIntents``). Without it (a
            direct call), a re-claimed step lists the collection whenever the job was claimed
            before, and nothing fences the request.
    """

    name = "rekognition"
    needs_image = True

    def __init__(
        self,
        settings: RekognitionSettings,
        faces: KnownFaces | None = None,
        *,
        page_size: int = MAX_PAGE,
        tracing: Tracing | None = None,
        intents: FaceIntents | None = None,
    ) -> None:
        if not 1 <= page_size <= MAX_PAGE:
            raise ValueError(f"page_size must be between 1 and {MAX_PAGE}")
        self._s = settings
        self._tracing = tracing or Tracing()
        self._faces = faces
        self._intents = intents
        self._page_size = page_size
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
        if self._tracing.enabled:
            # botocore emits before-send in the calling task: the step's span is current.
            self._client.meta.events.register("before-send.rekognition", self._add_trace_headers)

    def _add_trace_headers(self, request: Any, **_: Any) -> None:
        """botocore ``before-send`` handler: the current span's ``traceparent`` and the rest.

        Returns None, so botocore sends the request (a value would stand for its response).
        """
        for name, value in self._tracing.headers().items():
            request.headers[name] = value

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

        Returns:
            ``labels``: output ``labels`` (name, confidence %, parents, instances),
            ``sharpness``, ``brightness``, ``contrast`` (0-100), ``model_version``.
            ``faces``: output ``collection_id``, ``faces`` (face_id, bounding_box as ratios of
            the image, decision, matched_face_id, similarity % rounded to 2 places),
            ``unindexed`` (reasons, bounding_box), ``model_version``, ``removed_faces`` (count
            of unrecorded faces of an earlier run deleted first); effect ``"faces"`` (see
            ``listener.queue.outcomes.StepRecord``). ``calls`` counts every API call made.

        Raises:
            RateLimited, ProviderPaused, InvalidImage, ImageTooLarge, RejectedByProvider,
            FetchTimeout, ProviderUnavailable: see the module docstring.
        """
        if self._client is None:
            raise RuntimeError("RekognitionProvider.start() must be called before run()")
        data = await asyncio.to_thread(prepare_image, image.data, image.content_type)
        started = time.perf_counter()
        try:
            effects: dict[str, Any] = {}
            if kind == "labels":
                output, calls = await self._labels(data), 1
            elif kind == "faces":
                output, effects, calls = await self._faces_step(data, image, context)
            else:
                raise ValueError(f"rekognition has no step kind {kind!r}")
        except ClientError as error:
            raise self._translate(error) from None
        except NoCredentialsError:
            raise ProviderPaused("Rekognition: no AWS credentials found", pause_s=300.0) from None
        except BotoCoreError as error:
            if "timeout" in type(error).__name__.lower():
                raise FetchTimeout(redact_text(f"Rekognition: {error}")) from None
            raise ProviderUnavailable(redact_text(f"Rekognition: {error}")) from None
        return StepResult(
            provider=self.name,
            step=f"{self.name}.{kind}",
            output=output,
            model=output.get("model_version"),
            duration_s=time.perf_counter() - started,
            calls=calls,
            effects=effects,
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

    async def _faces_of(
        self, collection: str, external_id: str, legacy_id: str | None = None
    ) -> tuple[list[str], list[str], int]:
        """The FaceIds of ``external_id`` in ``collection`` (ListFaces, every page; it cannot
        filter by ``ExternalImageId``), and those of ``legacy_id``
        (``listener.analysis.faces.legacy_external_image_id``), if given.

        Returns:
            (face ids of ``external_id``, face ids of ``legacy_id``, API calls made).
        """
        ours: list[str] = []
        legacy: list[str] = []
        calls = 0
        token: str | None = None
        while True:
            page = await self._client.list_faces(
                CollectionId=collection,
                MaxResults=self._page_size,
                **({"NextToken": token} if token else {}),
            )
            calls += 1
            for face in page.get("Faces", []):
                if face.get("ExternalImageId") == external_id:
                    ours.append(face["FaceId"])
                elif legacy_id is not None and face.get("ExternalImageId") == legacy_id:
                    legacy.append(face["FaceId"])
            token = page.get("NextToken")
            if not token:
                return ours, legacy, calls

    async def _delete(self, collection: str, face_ids: list[str]) -> int:
        """DeleteFaces of ``face_ids``, ``MAX_PAGE`` per call; returns the calls made. Faces
        already gone are reported by the service as unsuccessful deletions and ignored."""
        calls = 0
        for start in range(0, len(face_ids), MAX_PAGE):
            await self._client.delete_faces(
                CollectionId=collection, FaceIds=face_ids[start : start + MAX_PAGE]
            )
            calls += 1
        return calls

    async def _remove_unrecorded(
        self, faces: KnownFaces, collection: str, external_id: str, legacy_id: str | None = None
    ) -> tuple[int, int]:
        """Delete the faces of ``external_id`` (and of ``legacy_id``) in ``collection`` that
        listener never recorded.

        Returns:
            (faces deleted, API calls made).
        """
        ours, legacy, calls = await self._faces_of(collection, external_id, legacy_id)
        found = set(ours) | set(legacy)
        stray = sorted(found - await faces.known(sorted(found)))
        calls += await self._delete(collection, stray)
        return len(stray), calls

    async def _guarded(self, call: Any) -> Any:
        """Await ``call``, translating SDK errors as ``run`` does."""
        try:
            return await call
        except ClientError as error:
            raise self._translate(error) from None
        except NoCredentialsError:
            raise ProviderPaused("Rekognition: no AWS credentials found", pause_s=300.0) from None
        except BotoCoreError as error:
            raise ProviderUnavailable(redact_text(f"Rekognition: {error}")) from None

    async def _delete_or_gone(self, collection: str, face_ids: list[str]) -> int:
        try:
            return await self._delete(collection, face_ids)
        except ClientError as error:
            if _code(error) != _NOT_FOUND:
                raise
            # The collection was deleted, and its faces with it.
            self._collections.discard(collection)
            return 1

    async def delete_faces(self, collection_id: str, face_ids: list[str]) -> int:
        """See ``listener.app_side.deletes.FaceRemover.delete_faces``."""
        if self._client is None:
            raise RuntimeError("RekognitionProvider.start() must be called first")
        if not face_ids:
            return 0
        calls: int = await self._guarded(self._delete_or_gone(collection_id, sorted(face_ids)))
        return calls

    async def delete_row_faces(
        self, owner_id: str | None, source_table: str, source_id: str
    ) -> tuple[int, int]:
        """See ``listener.app_side.deletes.FaceRemover.delete_row_faces``."""
        if self._client is None:
            raise RuntimeError("RekognitionProvider.start() must be called first")
        collection = collection_id(self._s.collection_prefix, owner_id)
        external_id = external_image_id(source_table, source_id)

        async def sweep() -> tuple[int, int]:
            try:
                ours, legacy, calls = await self._faces_of(
                    collection, external_id, legacy_external_image_id(source_id)
                )
            except ClientError as error:
                if _code(error) != _NOT_FOUND:
                    raise
                self._collections.discard(collection)
                return 0, 1
            if legacy and self._faces is not None:
                # Under the old id, only faces no one recorded: another table's row may
                # share the id.
                legacy = sorted(set(legacy) - await self._faces.known(legacy))
            gone = sorted({*ours, *legacy})
            return len(gone), calls + await self._delete_or_gone(collection, gone)

        result: tuple[int, int] = await self._guarded(sweep())
        return result

    async def undo(self, effects: Mapping[str, Any]) -> None:
        """See ``listener.analysis.providers.base.EffectUndo``: the ``"faces"`` effect's faces are
        deleted from its collection."""
        faces = effects.get("faces")
        if not faces or not faces.get("faces"):
            return
        await self.delete_faces(faces["collection_id"], [f["face_id"] for f in faces["faces"]])

    async def _faces_step(
        self, data: bytes, image: ImageInput, context: StepContext
    ) -> tuple[dict[str, Any], dict[str, Any], int]:
        """The faces step; once more from the start when the owner's collection was deleted
        outside listener (``ResourceNotFoundException``): it is created again first."""
        try:
            return await self._index_and_match(data, image, context)
        except ClientError as error:
            if _code(error) != _NOT_FOUND:
                raise
        collection = collection_id(self._s.collection_prefix, image.owner_id)
        logger.warning(
            "Rekognition collection {} was deleted outside listener: creating it again",
            collection,
        )
        self._collections.discard(collection)
        output, effects, calls = await self._index_and_match(data, image, context)
        return output, effects, calls + 1

    async def _index_and_match(
        self, data: bytes, image: ImageInput, context: StepContext
    ) -> tuple[dict[str, Any], dict[str, Any], int]:
        if self._faces is None:
            raise RuntimeError("the faces step needs KnownFaces")
        collection = collection_id(self._s.collection_prefix, image.owner_id)
        external_id = external_image_id(image.source_table, image.source_id)
        calls = await self._ensure_collection(collection)
        # The row's faces from an earlier analysis (a re-analysis, or the image at its old
        # URL): deleted first, so the image's faces are not recorded twice, the new ones cannot
        # match them, and a replaced photo does not stay recognisable. Their records go when
        # this step is stored (listener.apply_face_effects, 0018).
        for old_collection, old_faces in (
            await self._faces.of_row(image.source_table, image.source_id)
        ).items():
            calls += await self._delete_or_gone(old_collection, old_faces)
        removed = 0
        if context.claims > 1:
            # An earlier run of this job may have indexed faces and died before its step was
            # stored: remove them, or this run would add a second copy of each. With the
            # intents, only a run that recorded a request may have: no intent, no listing.
            targets = (
                [(collection, external_id)]
                if self._intents is None
                else await self._intents.earlier(image.job_id, context.claims)
            )
            for target_collection, target_id in targets:
                gone, cleanup_calls = await self._remove_unrecorded(
                    self._faces,
                    target_collection,
                    target_id,
                    legacy_external_image_id(image.source_id),
                )
                removed += gone
                calls += cleanup_calls
        if self._intents is not None and context.lease_token is not None:
            recorded = await self._intents.record(
                image.job_id, context.claims, context.lease_token, collection, external_id
            )
            if not recorded:
                # Another worker holds the job now: IndexFaces is not sent, so no face can be
                # left behind after that worker's clean-up.
                raise LeaseLost(f"lease of job {image.job_id} lost before IndexFaces")
        indexed = await self._client.index_faces(
            CollectionId=collection,
            Image={"Bytes": data},
            ExternalImageId=external_id,
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
        candidates = {m.face_id for ms in matches.values() for m in ms}
        known = await self._faces.known(candidates)
        decisions = decide(
            faces, matches, known, self._s.auto_assign_similarity, self._s.suggest_similarity
        )
        unindexed = [
            {
                "reasons": u.get("Reasons", []),
                "bounding_box": u.get("FaceDetail", {}).get("BoundingBox"),
            }
            for u in indexed.get("UnindexedFaces", [])
        ]
        output = {
            "collection_id": collection,
            "faces": output_faces(decisions),
            "unindexed": unindexed,
            "model_version": indexed.get("FaceModelVersion"),
            "removed_faces": removed,
        }
        return output, {"faces": {"collection_id": collection, "faces": decisions}}, calls

    def _translate(self, error: ClientError) -> Exception:
        info = error.response.get("Error", {})
        code = str(info.get("Code", "Unknown"))
        # Redacted before the cut: a key cut in half is no longer recognisable as one.
        message = redact_text(f"Rekognition {code}: {info.get('Message', '')}")
        message = message.strip().rstrip(":")[:300]
        if code in _THROTTLED:
            return RateLimited(message, retry_after=1.0)
        if code in _PERMANENT:
            return _PERMANENT[code](message)
        if code in ("AccessDeniedException", "UnrecognizedClientException"):
            return ProviderPaused(f"Rekognition refused the credentials ({code})", pause_s=300.0)
        return ProviderUnavailable(message)


def _code(error: ClientError) -> str:
    """The AWS error code of ``error`` (``ResourceNotFoundException``...)."""
    return str(error.response.get("Error", {}).get("Code", ""))
