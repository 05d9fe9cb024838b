"""Faces per owner: turning matches (Rekognition's, or the local step's) into decisions, as data.

Each owner has a collection. For each face indexed from an image, the best match among the
owner's earlier faces decides (thresholds in settings, percent similarity):

- ``>= auto_assign_similarity`` (95): the face joins the matched face's person, created then
  if the matched face had none;
- ``>= suggest_similarity`` (80): a suggestion is recorded for a person to review;
- below: a new, unassigned face.

This module only decides and reads: the faces, people and suggestions are written by the
``"faces"`` effect's writer (``listener.analysis.face_store.PgFacesEffect``,
``listener.apply_face_effects``), which the job store runs in the transaction that stores the
step (``PgJobStore.save_step``), fenced by the job's lease.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Awaitable, Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, Protocol

if TYPE_CHECKING:
    from uuid import UUID

    from listener.db.queries import Queries

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


def external_image_id(source_table: str, source_id: str) -> str:
    """The ``ExternalImageId`` of a source row's faces: ``<schema>.<table>.<id>`` made safe.

    Unique across attached tables: ``source_table`` is a qualified name as ``format('%I.%I')``
    writes it, so the text before the id parses back unambiguously, and ``safe_id`` keeps
    distinct texts distinct. At most 255 characters, pattern ``[a-zA-Z0-9_.\\-:]+``
    (IndexFaces, https://docs.aws.amazon.com/rekognition/latest/APIReference/API_IndexFaces.html).
    """
    return safe_id(f"{source_table}.{source_id}")


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


class KnownFaces(Protocol):
    """Which FaceIds listener has recorded (read only)."""

    async def known(self, face_ids: Collection[str]) -> set[str]:
        """The subset of ``face_ids`` recorded in ``listener.faces``."""
        ...

    async def of_row(self, source_table: str, source_id: str) -> dict[str, list[str]]:
        """The faces recorded for one app row, by collection: ``{collection_id: [face_id]}``
        (empty when none)."""
        ...


class PgKnownFaces:
    """``KnownFaces`` over the ``known_face_ids`` query.

    Args:
        queries: the named queries.
    """

    def __init__(self, queries: Queries) -> None:
        self._q = queries

    async def known(self, face_ids: Collection[str]) -> set[str]:
        """See ``KnownFaces.known``; no query for an empty ``face_ids``."""
        if not face_ids:
            return set()
        return await self._q.known_face_ids(sorted(face_ids))

    async def of_row(self, source_table: str, source_id: str) -> dict[str, list[str]]:
        """See ``KnownFaces.of_row``."""
        return await self._q.row_face_ids(source_table, source_id)


class FaceIntents(Protocol):
    """IndexFaces requests recorded before they are sent (``listener.face_index_intents``).

    A faces step records its request first, fenced by the job's lease, and the job store
    forgets the job's requests when it stores the step. A request left by an earlier claim
    means that claim may have indexed faces no one recorded: only then does a later claim list
    the collection to clean up.
    """

    async def record(
        self, job_id: int, claims: int, lease_token: UUID, collection: str, external_id: str
    ) -> bool:
        """Record that claim ``claims`` of job ``job_id`` is about to send IndexFaces to
        ``collection`` with ``external_id``; ``False`` when the lease is lost (the request
        must then not be sent)."""
        ...

    async def earlier(self, job_id: int, claims: int) -> list[tuple[str, str]]:
        """The requests of claims before ``claims`` that were never stored:
        ``[(collection, ExternalImageId)]``."""
        ...


class PgFaceIntents:
    """``FaceIntents`` over the ``record_face_intent`` and ``earlier_face_intents`` queries.

    Args:
        queries: the named queries.
    """

    def __init__(self, queries: Queries) -> None:
        self._q = queries

    async def record(
        self, job_id: int, claims: int, lease_token: UUID, collection: str, external_id: str
    ) -> bool:
        """See ``FaceIntents.record``."""
        return await self._q.record_face_intent(
            job_id, claims, lease_token, collection, external_id
        )

    async def earlier(self, job_id: int, claims: int) -> list[tuple[str, str]]:
        """See ``FaceIntents.earlier``."""
        return await self._q.earlier_face_intents(job_id, claims)


def legacy_external_image_id(source_id: str) -> str:
    """The ``ExternalImageId`` faces were indexed under before it named the table: the row id
    made safe (``safe_id``). Clean-ups match it too, but delete only faces under it that
    listener never recorded (another table's row may have the same id)."""
    return safe_id(source_id)


@dataclass(frozen=True, slots=True)
class NearFace:
    """A recorded face near a new one: its id and the Euclidean distance of the embeddings."""

    face_id: str
    distance: float


class FaceIndex(Protocol):
    """Search of the embeddings listener records (the local faces step; read only)."""

    async def nearest(
        self,
        collection: str,
        embedding: Sequence[float],
        source_table: str,
        source_id: str,
        max_distance: float,
        limit: int,
    ) -> list[NearFace]:
        """The faces of ``collection`` within ``max_distance`` (Euclidean) of ``embedding``,
        nearest first, at most ``limit``; the faces of app row (``source_table``,
        ``source_id``) are left out, since the step replaces them."""
        ...


class PgFaceIndex:
    """``FaceIndex`` over the ``nearest_faces`` query (``listener.faces.embedding``).

    Args:
        queries: the named queries.
    """

    def __init__(self, queries: Queries) -> None:
        self._q = queries

    async def nearest(
        self,
        collection: str,
        embedding: Sequence[float],
        source_table: str,
        source_id: str,
        max_distance: float,
        limit: int,
    ) -> list[NearFace]:
        """See ``FaceIndex.nearest``."""
        found = await self._q.nearest_faces(
            collection, embedding, source_table, source_id, max_distance, limit
        )
        return [NearFace(face_id, distance) for face_id, distance in found]


Nearest = Callable[[Sequence[float]], Awaitable[Sequence[NearFace]]]
"""The recorded faces near an embedding (``FaceIndex.nearest`` with its other arguments
bound): nearest first."""


async def decide_by_embedding(
    faces: Sequence[IndexedFace],
    embeddings: Mapping[str, Sequence[float]],
    nearest: Nearest,
    similarity: Callable[[float], float],
    auto: float,
    suggest: float,
) -> list[dict[str, Any]]:
    """``decide`` for faces found offline: the faces ``nearest`` finds for each face's
    embedding become its matches, at ``similarity(distance)`` percent; each is a face
    listener recorded (the search reads ``listener.faces``).

    Args:
        faces: the faces found in the image.
        embeddings: each face's embedding, by face id.
        nearest: the search of recorded faces.
        similarity: distance -> 0-100 similarity
            (``listener.analysis.providers.local_faces.similarity_from_distance``).
        auto, suggest: the thresholds, percent.

    Returns:
        ``decide``'s dicts, in order, each with its face's ``embedding`` added.
    """
    matches: dict[str, list[FaceMatch]] = {}
    for face in faces:
        near = await nearest(embeddings[face.face_id])
        matches[face.face_id] = [FaceMatch(n.face_id, similarity(n.distance)) for n in near]
    known = {m.face_id for found in matches.values() for m in found}
    return [
        {**d, "embedding": list(embeddings[d["face_id"]])}
        for d in decide(faces, matches, known, auto, suggest)
    ]


def output_faces(
    decisions: Sequence[Mapping[str, Any]], *, confidence: bool = False
) -> list[dict[str, Any]]:
    """The faces step's output entries for ``decide``'s decisions: ``face_id``, ``decision``,
    ``matched_face_id``, ``similarity`` (percent, two decimals; ``None`` without a match),
    ``bounding_box`` (ratios), and ``confidence`` (percent) when asked."""
    return [
        {
            "face_id": d["face_id"],
            "decision": d["decision"],
            "matched_face_id": d["matched_face_id"],
            "similarity": None if d["similarity"] is None else round(d["similarity"], 2),
            "bounding_box": d["bounding_box"],
            **({"confidence": d["confidence"]} if confidence else {}),
        }
        for d in decisions
    ]


def decide(
    faces: Sequence[IndexedFace],
    matches: Mapping[str, Sequence[FaceMatch]],
    known: Collection[str],
    auto: float,
    suggest: float,
) -> list[dict[str, Any]]:
    """The decision for each of ``faces`` from its best usable match.

    A match is usable when listener recorded the matched face (``known``) and it is not one of
    ``faces`` (two faces of one image are never the same person's match).

    Returns:
        One dict per face, in order: ``face_id``, ``bounding_box`` (ratios), ``confidence``
        (%), ``decision`` (assigned | suggested | new), ``matched_face_id`` and
        ``similarity`` (%, unrounded; ``None`` without a usable match): the ``"faces"``
        effect's entries (``listener.queue.outcomes.StepRecord``).
    """
    new_ids = {f.face_id for f in faces}
    out: list[dict[str, Any]] = []
    for face in faces:
        usable = [
            m
            for m in matches.get(face.face_id, [])
            if m.face_id in known and m.face_id not in new_ids
        ]
        best = max(usable, key=lambda m: m.similarity, default=None)
        out.append(
            {
                "face_id": face.face_id,
                "bounding_box": dict(face.bounding_box),
                "confidence": face.confidence,
                "decision": classify(best.similarity if best else None, auto, suggest),
                "matched_face_id": best.face_id if best else None,
                "similarity": best.similarity if best else None,
            }
        )
    return out
