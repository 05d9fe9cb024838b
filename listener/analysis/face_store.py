"""Faces in Postgres and in memory: the ``"faces"`` effect's writer (``PgFacesEffect``), and the
records of faces whose job is gone, until they are deleted from their collections.

When a source row is deleted, ``JobStore.forget_rows`` deletes its job and returns the faces
the job's effects recorded (``ForgottenRow.leftovers``: collection, face id); they keep their
records (``listener.faces`` rows with ``job_id`` NULL) until the drain of deleted rows has
deleted them from their collections and calls ``forget_faces`` (``listener.app_side.deletes``,
which reaches this store through a protocol of its own). ``PgFaceStore`` runs over
``sql/queries.sql``; ``MemoryFaceStore`` works on a ``MemoryJobStore``'s leftovers; both pass
``tests/conformance/test_job_store.py``'s tests of deleted rows.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import asyncpg

from listener.analysis.effects import FACES, FacesEffect
from listener.analysis.faces import IndexedFace, NearFace, decide_by_embedding
from listener.analysis.providers.local_faces import (
    distance_for_similarity,
    similarity_from_distance,
)
from listener.db.queries import load_queries
from listener.queue.memory_store import MemoryJobStore
from listener.queue.pg_store import EffectWriter, HeldJob


class FaceStore(Protocol):
    """The face records the analysis side keeps beside the jobs."""

    async def forget_faces(self, face_ids: Sequence[str]) -> int:
        """The faces ``face_ids`` of deleted rows are gone from their collections: delete their
        records (and suggestions about them). A face whose job still exists is kept.

        Returns:
            The faces whose records were deleted.
        """
        ...


class PgFaceStore:
    """The face records in Postgres (``listener.faces``).

    Args:
        pool: an ``asyncpg.Pool``.
    """

    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool
        self._sql = load_queries()["forget_faces"].sql

    async def forget_faces(self, face_ids: Sequence[str]) -> int:
        """See ``FaceStore.forget_faces``: ``listener.forget_faces``."""
        if not face_ids:
            return 0
        return int(await self._pool.fetchval(self._sql, list(face_ids)))


class MemoryFaceStore:
    """The face records of a ``MemoryJobStore`` (the leftovers of its deleted jobs).

    Args:
        jobs: the job store.
    """

    def __init__(self, jobs: MemoryJobStore) -> None:
        self._jobs = jobs

    async def forget_faces(self, face_ids: Sequence[str]) -> int:
        """See ``FaceStore.forget_faces``."""
        return self._jobs.forget_leftovers(face_ids)


class PgFacesEffect(FacesEffect):
    """The ``"faces"`` effect's writer in Postgres (``listener.analysis.effects``).

    A payload whose faces carry embeddings (the local faces step) is decided again here,
    under the owner's faces lock (``listener.lock_owner_faces``), against the faces recorded
    at that moment: the step searched before it was stored, and two images of one person
    analyzed at the same time would each have missed the other. With the lock, the second
    to be stored waits for the first to commit, then finds its faces.
    """

    def __init__(self) -> None:
        queries = load_queries()
        self._sql = queries["apply_face_effects"].sql
        self._nearest = queries["nearest_faces"].sql
        self._forget_intents = queries["forget_face_intents"].sql

    async def write(
        self,
        conn: asyncpg.Connection,
        job: HeldJob,
        payload: Any,
        output: dict[str, Any],
    ) -> dict[str, Any]:
        """Record the faces, people and suggestions (``listener.apply_face_effects``) and put
        each face's person id into ``output["faces"]``; a payload with embeddings is decided
        again first (see the class)."""
        if _searchable(payload):
            payload = await self._decide_again(conn, job, payload, output)
        # The step's IndexFaces requests (and any an earlier claim left) are accounted for.
        await conn.execute(self._forget_intents, job.id)
        people = json.loads(
            await conn.fetchval(
                self._sql,
                job.id,
                job.source_table,
                job.source_id,
                job.owner_id,
                json.dumps(payload),
            )
        )
        if FACES in output:
            output[FACES] = [
                {**f, "person_id": people.get(f["face_id"])}
                if isinstance(f, Mapping) and "face_id" in f
                else f
                for f in output[FACES]
            ]
        return output

    async def _decide_again(
        self, conn: asyncpg.Connection, job: HeldJob, payload: Any, output: dict[str, Any]
    ) -> dict[str, Any]:
        """The payload with each face's decision made against the owner's faces as they are
        now (``nearest_faces``, on this transaction's connection, under the owner's lock);
        ``output["faces"]`` entries of the same face_id get the same decision."""
        await conn.execute("SELECT listener.lock_owner_faces($1)", job.owner_id)
        suggest = float(payload["suggest_similarity"])
        reach = distance_for_similarity(suggest)
        faces = payload["faces"]

        async def nearest(embedding: Sequence[float]) -> list[NearFace]:
            rows = await conn.fetch(
                self._nearest,
                payload["collection_id"],
                [float(v) for v in embedding],
                job.source_table,
                job.source_id,
                reach,
                5,
            )
            return [NearFace(r["face_id"], float(r["distance"])) for r in rows]

        decisions = await decide_by_embedding(
            [IndexedFace(f["face_id"], f["bounding_box"], f["confidence"]) for f in faces],
            {f["face_id"]: f["embedding"] for f in faces},
            nearest,
            similarity_from_distance,
            float(payload["auto_assign_similarity"]),
            suggest,
        )
        by_id = {d["face_id"]: d for d in decisions}
        if isinstance(output.get(FACES), list):
            output[FACES] = [
                {
                    **f,
                    "decision": by_id[f["face_id"]]["decision"],
                    "matched_face_id": by_id[f["face_id"]]["matched_face_id"],
                    "similarity": _rounded(by_id[f["face_id"]]["similarity"]),
                }
                if isinstance(f, Mapping) and f.get("face_id") in by_id
                else f
                for f in output[FACES]
            ]
        return {**payload, "faces": decisions}


def _searchable(payload: Any) -> bool:
    """A faces payload the writer decides again: its faces all carry embeddings, and it
    names its thresholds (the local faces step's)."""
    return (
        isinstance(payload, Mapping)
        and "auto_assign_similarity" in payload
        and "suggest_similarity" in payload
        and isinstance(payload.get("faces"), list)
        and bool(payload["faces"])
        and all(isinstance(f, Mapping) and "embedding" in f for f in payload["faces"])
    )


def _rounded(similarity: float | None) -> float | None:
    return None if similarity is None else round(similarity, 2)


def pg_effect_writers() -> dict[str, EffectWriter]:
    """The effect writers ``PgJobStore`` runs inside a step's fenced transaction."""
    return {FACES: PgFacesEffect()}
