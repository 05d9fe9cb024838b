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
    """The ``"faces"`` effect's writer in Postgres (``listener.analysis.effects``)."""

    def __init__(self) -> None:
        self._sql = load_queries()["apply_face_effects"].sql

    async def write(
        self,
        conn: asyncpg.Connection,
        job: HeldJob,
        payload: Any,
        output: dict[str, Any],
    ) -> dict[str, Any]:
        """Record the faces, people and suggestions (``listener.apply_face_effects``) and put
        each face's person id into ``output["faces"]``."""
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


def pg_effect_writers() -> dict[str, EffectWriter]:
    """The effect writers ``PgJobStore`` runs inside a step's fenced transaction."""
    return {FACES: PgFacesEffect()}
