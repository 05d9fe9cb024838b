"""Faces per owner: turning Rekognition's matches into people, suggestions and new faces.

Each owner has a collection. For each face indexed from an image, the best match among the
owner's earlier faces decides (thresholds in settings, percent similarity):

- ``>= auto_assign_similarity`` (95): the face joins the matched face's person, created then
  if the matched face had none;
- ``>= suggest_similarity`` (80): a suggestion is recorded for a person to review;
- below: a new, unassigned face.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from listener.db.queries import Queries
from listener.providers.base import ImageInput
from listener.settings import RekognitionSettings

Decision = Literal["assigned", "suggested", "new"]

_NOT_ALLOWED = re.compile(r"[^a-zA-Z0-9_.\-]")


def safe_id(text: str, *, max_len: int = 255) -> str:
    """``text`` made to match ``[a-zA-Z0-9_.\\-]+`` (Rekognition ids), unambiguously.

    Characters outside the set become ``_``; when anything was replaced, or the result is too
    long, a short SHA-256 of the original is appended so distinct inputs stay distinct.
    """
    cleaned = _NOT_ALLOWED.sub("_", text) or "_"
    if cleaned == text and len(cleaned) <= max_len:
        return cleaned
    digest = hashlib.sha256(text.encode()).hexdigest()[:16]
    return f"{cleaned[: max_len - 17]}-{digest}"


def collection_id(prefix: str, owner_id: str | None) -> str:
    """The collection of an owner: ``<prefix>-<owner>`` (``<prefix>-shared`` without owner)."""
    return safe_id(f"{prefix}-{owner_id if owner_id is not None else 'shared'}")


def classify(similarity: float | None, auto: float, suggest: float) -> Decision:
    """What a face's best match (percent similarity, ``None``: no match) means."""
    if similarity is None or similarity < suggest:
        return "new"
    return "assigned" if similarity >= auto else "suggested"


@dataclass(frozen=True, slots=True)
class IndexedFace:
    """A face Rekognition indexed: its FaceId, bounding box (ratios) and confidence (%)."""

    face_id: str
    bounding_box: Mapping[str, float]
    confidence: float


@dataclass(frozen=True, slots=True)
class FaceMatch:
    """One match of a face against the collection: the other FaceId and the similarity (%)."""

    face_id: str
    similarity: float


class FaceStore:
    """Records faces and their people in the ``listener`` schema.

    Args:
        queries: the named queries.
        settings: the thresholds.
    """

    def __init__(self, queries: Queries, settings: RekognitionSettings) -> None:
        self._q = queries
        self._auto = settings.auto_assign_similarity
        self._suggest = settings.suggest_similarity

    async def record(
        self,
        collection: str,
        image: ImageInput,
        faces: Sequence[IndexedFace],
        matches: Mapping[str, Sequence[FaceMatch]],
    ) -> list[dict[str, Any]]:
        """Store ``faces`` and act on their best matches.

        Returns:
            One dict per face: ``face_id``, ``decision`` (assigned | suggested | new),
            ``matched_face_id``, ``similarity``, ``person_id``.
        """
        for face in faces:
            await self._q.execute(
                "insert_face",
                face.face_id,
                collection,
                image.owner_id,
                image.job_id,
                image.source_table,
                image.source_id,
                json.dumps(dict(face.bounding_box)),
                face.confidence,
            )
        candidates = {m.face_id for ms in matches.values() for m in ms}
        known = set(await self._q.column("known_face_ids", sorted(candidates)))
        new_ids = {f.face_id for f in faces}
        out: list[dict[str, Any]] = []
        for face in faces:
            usable = [
                m
                for m in matches.get(face.face_id, [])
                if m.face_id in known and m.face_id not in new_ids
            ]
            best = max(usable, key=lambda m: m.similarity, default=None)
            decision = classify(best.similarity if best else None, self._auto, self._suggest)
            person: int | None = None
            if best is not None and decision == "assigned":
                person = await self._q.value(
                    "assign_face", face.face_id, best.face_id, best.similarity
                )
            elif best is not None and decision == "suggested":
                await self._q.execute("suggest_face", face.face_id, best.face_id, best.similarity)
            out.append(
                {
                    "face_id": face.face_id,
                    "decision": decision,
                    "matched_face_id": best.face_id if best else None,
                    "similarity": round(best.similarity, 2) if best else None,
                    "person_id": person,
                }
            )
        return out
