"""Faces that users manage: counts, people, suggestions to review, accept, reject, merge, name.

The decisions are SQL functions (``sql/migrations/0015_face_review.sql``) that the app calls
through its own role; this module is the operator's way to the same functions (``listener
faces ...``), plus reads across every owner, which the app's functions never offer.

Every function acts on one owner's rows: ``owner`` is the owner id as text, ``None`` for rows
without one. A face, suggestion or person of another owner is refused as if it did not exist.

Errors from Postgres keep their SQLSTATE (``asyncpg`` raises the matching class):
``NoDataFoundError`` (P0002) for something that is not the owner's,
``ObjectNotInPrerequisiteStateError`` (55000) for rejecting an accepted suggestion,
``InvalidParameterValueError`` (22023), ``StringDataRightTruncationError`` (22001) and
``ProgramLimitExceededError`` (54000) for bad arguments.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import asyncpg

from listener.db.queries import load_queries

_JSON_COLUMNS = ("bounding_box", "candidate_bounding_box", "sample_bounding_box")


class NotFound(LookupError):
    """No face or person with that id (raised by the owner look-ups)."""


class FaceReview:
    """Typed calls of the face review functions and queries.

    Args:
        pool: an ``asyncpg.Pool`` (or one connection).
    """

    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool
        self._sql = {name: q.sql for name, q in load_queries().items()}

    async def _rows(self, name: str, *args: Any) -> list[dict[str, Any]]:
        rows = [dict(r) for r in await self._pool.fetch(self._sql[name], *args)]
        for row in rows:
            for key in _JSON_COLUMNS:
                if isinstance(row.get(key), str):
                    row[key] = json.loads(row[key])
        return rows

    async def counts(self, owner: str | None) -> dict[str, Any]:
        """``{"owner", "people", "faces", "unassigned", "open_suggestions"}`` of ``owner``."""
        row = await self._pool.fetchrow(self._sql["face_counts"], owner)
        return {"owner": owner, **dict(row or {})}

    async def counts_by_owner(self, limit: int) -> list[dict[str, Any]]:
        """The counts of every owner with faces, people or suggestions, at most ``limit``,
        most open suggestions first (then most faces). Reads every face."""
        return await self._rows("face_counts_by_owner", limit)

    async def people(self, owner: str | None, limit: int) -> list[dict[str, Any]]:
        """``owner``'s people, most faces first: ``[{"owner", "person_id", "name", "faces",
        "sample_face_id", "sample_source_table", "sample_source_id", "sample_bounding_box"
        (ratios of the image), "created_at"}]``.

        Raises:
            asyncpg.InvalidParameterValueError: ``limit`` not in 1-1000.
        """
        return await self._rows("face_people", owner, limit)

    async def people_of_every_owner(self, limit: int) -> list[dict[str, Any]]:
        """Like ``people``, across every owner."""
        return await self._rows("face_people_every_owner", limit)

    async def suggestions(self, owner: str | None, limit: int) -> list[dict[str, Any]]:
        """``owner``'s open suggestions, most similar first: ``[{"owner", "face_id",
        "source_table", "source_id", "bounding_box", "candidate_face_id",
        "candidate_source_table", "candidate_source_id", "candidate_bounding_box",
        "person_id" (the candidate's person, or None), "person_name", "similarity" (%),
        "created_at"}]``.

        Raises:
            asyncpg.InvalidParameterValueError: ``limit`` not in 1-1000.
        """
        return await self._rows("open_face_suggestions", owner, limit)

    async def suggestions_of_every_owner(self, limit: int) -> list[dict[str, Any]]:
        """Like ``suggestions``, across every owner."""
        return await self._rows("open_face_suggestions_every_owner", limit)

    async def face_owner(self, face_id: str) -> str | None:
        """The owner of face ``face_id``.

        Raises:
            NotFound: no such face.
        """
        rows = await self._pool.fetch(self._sql["face_owner"], face_id)
        if not rows:
            raise NotFound(f"no face {face_id}")
        owner: str | None = rows[0]["owner"]
        return owner

    async def person_owner(self, person_id: int) -> str | None:
        """The owner of person ``person_id``.

        Raises:
            NotFound: no such person.
        """
        rows = await self._pool.fetch(self._sql["person_owner"], person_id)
        if not rows:
            raise NotFound(f"no person {person_id}")
        owner: str | None = rows[0]["owner"]
        return owner

    async def accept(self, owner: str | None, face_id: str, candidate_face_id: str) -> int:
        """Put ``face_id`` in the person of ``candidate_face_id`` (``listener.accept_suggestion``).

        Returns:
            The person's id (created when neither face had one).

        Raises:
            asyncpg.NoDataFoundError: no such suggestion among ``owner``'s faces.
        """
        return int(
            await self._pool.fetchval(
                self._sql["accept_suggestion"], owner, face_id, candidate_face_id
            )
        )

    async def reject(self, owner: str | None, face_id: str, candidate_face_id: str) -> bool:
        """Record that ``face_id`` is not ``candidate_face_id``'s person.

        Returns:
            True when the suggestion became rejected, False when it already was.

        Raises:
            asyncpg.NoDataFoundError: no such suggestion among ``owner``'s faces.
            asyncpg.ObjectNotInPrerequisiteStateError: the suggestion was accepted.
        """
        return bool(
            await self._pool.fetchval(
                self._sql["reject_suggestion"], owner, face_id, candidate_face_id
            )
        )

    async def merge(self, owner: str | None, into: int, people: Sequence[int]) -> int:
        """Move every face of ``people`` into person ``into`` and delete them.

        Returns:
            The faces moved.

        Raises:
            asyncpg.NoDataFoundError: some id is not one of ``owner``'s people (the message
                lists them; nothing changed).
            asyncpg.InvalidParameterValueError: ``into`` is among ``people``.
        """
        return int(await self._pool.fetchval(self._sql["merge_people"], owner, into, list(people)))

    async def rename(self, owner: str | None, person_id: int, name: str | None) -> str | None:
        """Name person ``person_id`` (``None`` or blank: no name).

        Returns:
            The name stored (trimmed), or None.

        Raises:
            asyncpg.NoDataFoundError: not one of ``owner``'s people.
            asyncpg.InvalidParameterValueError: control characters in ``name``.
            asyncpg.StringDataRightTruncationError: over 200 characters.
        """
        stored: str | None = await self._pool.fetchval(
            self._sql["rename_person"], owner, person_id, name
        )
        return stored
