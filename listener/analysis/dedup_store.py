"""Stored results another job may reuse: the deduplication side of the results table.

The dispatcher asks a ``DedupStore`` for a stored result of a step for the same image as a
job's (same SHA-256, or a perceptual hash within a few bits) before paying for the step; a
match is stored as the job's result through the job store's fenced ``save_step`` with a
``Reuse`` marker (``listener.analysis.dedup``). Reading is all this store does.
``PgDedupStore`` runs over ``sql/queries.sql``; ``MemoryDedupStore`` reads a
``MemoryJobStore``'s rows; both pass ``tests/conformance/test_dedup_store.py``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any, Protocol

import asyncpg

from listener.analysis.effects import InputDigest, Reusable
from listener.db.queries import load_queries
from listener.queue.memory_store import MemoryJobStore, MemoryRow
from listener.queue.outcomes import Job

_SCOPES = ("owner", "table", "global")

DEDUP_CANDIDATES = 200
"""Stored results with the same digest read, at most, before the scope's filter."""


class DedupStore(Protocol):
    """Finds stored results to reuse. See the module docstring."""

    async def find_reusable(
        self,
        job: Job,
        step: str,
        digest: InputDigest,
        scope: str,
        max_distance: int | None = None,
    ) -> Reusable | None:
        """A stored result of ``step`` for the same input as ``job``'s, from another job in
        ``scope``; read only (the copy is stored with ``JobStore.save_step``).

        Same input: a result whose ``digest.sha256`` is equal (kind ``"sha256"``), else, when
        ``max_distance`` is given and ``digest.phash`` known, one whose perceptual hash is
        within ``max_distance`` bits (kind ``"phash"``, the nearest). Scope: ``"owner"``:
        jobs of the same source table and owner (``None`` owners form one scope);
        ``"table"``: of the same table; ``"global"``: any job. A result that is itself a copy
        names its origin, so copies never chain.

        Postgres reads at most ``DEDUP_CANDIDATES`` results with the same digest before the
        scope filter (``PgDedupStore``), so a digest shared by very many rows of
        other owners may go unmatched; nothing else is scanned.

        Raises:
            ValueError: ``scope`` is not one of the three.
        """
        ...


class PgDedupStore:
    """The dedup store on Postgres.

    Args:
        pool: an ``asyncpg.Pool`` (each call takes one connection).
    """

    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool
        self._sql = {name: q.sql for name, q in load_queries().items()}

    async def find_reusable(
        self,
        job: Job,
        step: str,
        digest: InputDigest,
        scope: str,
        max_distance: int | None = None,
    ) -> Reusable | None:
        """See ``DedupStore.find_reusable``: ``find_same_image``, then ``find_similar_image``."""
        if scope not in _SCOPES:
            raise ValueError(f"dedup scope is one of {', '.join(_SCOPES)}, not {scope!r}")
        where = (scope, job.source_table, job.owner_id)
        r = await self._pool.fetchrow(
            self._sql["find_same_image"], step, digest.sha256, job.id, *where, DEDUP_CANDIDATES
        )
        if r is not None:
            return self._reusable(r, "sha256", 0)
        if max_distance is None or digest.phash is None:
            return None
        r = await self._pool.fetchrow(
            self._sql["find_similar_image"],
            step,
            digest.phash,
            max_distance,
            job.id,
            *where,
            DEDUP_CANDIDATES,
        )
        return None if r is None else self._reusable(r, "phash", r["distance"])

    @staticmethod
    def _reusable(r: Mapping[str, Any], kind: str, distance: int) -> Reusable:
        return Reusable(
            provider=r["provider"],
            output=json.loads(r["output"]),
            model=r["model"],
            origin_job_id=r["origin_job_id"],
            saved_usd=float(r["saved_usd"]),
            kind=kind,
            distance=distance,
        )


class MemoryDedupStore:
    """The dedup store over a ``MemoryJobStore``'s results.

    Args:
        jobs: the job store whose stored results are looked at.
    """

    def __init__(self, jobs: MemoryJobStore) -> None:
        self._jobs = jobs

    async def find_reusable(
        self,
        job: Job,
        step: str,
        digest: InputDigest,
        scope: str,
        max_distance: int | None = None,
    ) -> Reusable | None:
        """See ``DedupStore.find_reusable`` (every job is looked at: no candidate limit)."""
        if scope not in _SCOPES:
            raise ValueError(f"dedup scope is one of {', '.join(_SCOPES)}, not {scope!r}")
        candidates: list[tuple[MemoryRow, dict[str, Any], InputDigest]] = []
        for r in self._jobs.rows.values():
            stored = r.results.get(step)
            if r.id == job.id or stored is None or stored["digest"] is None:
                continue
            if scope != "global" and (
                r.source_table != job.source_table
                or (scope == "owner" and r.owner_id != job.owner_id)
            ):
                continue
            candidates.append((r, stored, stored["digest"]))
        for r, stored, d in candidates:
            if d.sha256 == digest.sha256:
                return self._reusable(r, stored, "sha256", 0)
        if max_distance is None or digest.phash is None:
            return None
        best: tuple[int, MemoryRow, dict[str, Any]] | None = None
        for r, stored, d in candidates:
            if d.phash is None:
                continue
            distance = ((d.phash ^ digest.phash) & ((1 << 64) - 1)).bit_count()
            if distance <= max_distance and (best is None or distance < best[0]):
                best = (distance, r, stored)
        return None if best is None else self._reusable(best[1], best[2], "phash", best[0])

    @staticmethod
    def _reusable(r: MemoryRow, stored: dict[str, Any], kind: str, distance: int) -> Reusable:
        reused = stored["reused"]
        return Reusable(
            provider=stored["provider"],
            output=dict(stored["output"]),
            model=stored["model"],
            origin_job_id=r.id if reused is None else reused.origin_job_id,
            saved_usd=stored["cost_usd"] if reused is None else reused.saved_usd,
            kind=kind,
            distance=distance,
        )
