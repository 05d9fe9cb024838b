"""Cleans up after rows the app deletes: their jobs, results and faces.

The delete trigger ``attach`` installs (``sql/migrations/0014_deletes.sql``) only appends the
deleted rows to ``listener.deleted_rows``, with the job each row had, so the app's DELETE never
waits for listener or fails because of it. ``DeleteDrain`` drains that outbox every
``interval_s`` (and at once after ``wake``: the trigger sends a NOTIFY) in short transactions
of its own, at least once, as ``listener.app_side.webhooks`` drains its outbox:

1. claim up to ``batch`` due entries (``FOR UPDATE SKIP LOCKED``: daemons share the work) and
   lease them for ``lease_s``;
2. ``JobStore.forget_rows``: a job still running is cancelled (its worker's fenced writes fail,
   so no result lands on the deleted row) and the entry comes back once the lease it had would
   have ended; any other job is cancelled if unfinished and deleted with its results; a row
   inserted again meanwhile gets a fresh job;
3. the row's recorded faces are deleted from the owner's Rekognition collection
   (``FaceRemover.delete_faces``), and, for a job that had run without completing, every face
   of the row's ``ExternalImageId`` (``FaceRemover.delete_row_faces``);
4. ``FaceRecords.forget_faces`` (the analysis side's face store) deletes the faces' rows
   (suggestions cascade), then the entry.

A daemon killed anywhere in between leaves the entry to come due when its lease ends, and
every step is idempotent (a job already gone, a face already deleted), so nothing is lost and
nothing is done twice that matters. A step that fails (Rekognition unreachable) is retried
with a full-jitter backoff; nothing is dropped.

What is guaranteed about faces: once an entry is done, no face indexed from the row is in its
owner's collection, whichever way it got there:

- recorded faces: deleted in step 3 before their rows go;
- a faces step in flight when the row was deleted: its result is refused by the store (the
  job was cancelled), and the worker deletes the faces it just indexed
  (``EffectUndo.undo``); a worker killed between IndexFaces and that refusal is covered by
  the sweep of step 3, which runs only after the cancelled job's lease would have ended.
"""

from __future__ import annotations

import random
from collections import defaultdict
from collections.abc import Callable, Sequence
from typing import Protocol, runtime_checkable

from loguru import logger

from listener.db.queries import DeletedRowEntry
from listener.queue.loops import Loop, Ticked
from listener.queue.retry import describe, full_jitter_backoff
from listener.queue.signals import Signals
from listener.queue.store import DeletedRow, ForgottenRow

LEASE_MARGIN_S = 2.0
"""Seconds added to a running job's remaining lease before its row is forgotten again."""


class DeletedRowsQueue(Protocol):
    """The outbox of deleted rows (``listener.db.queries.Queries``)."""

    async def deleted_rows_due(self) -> bool: ...

    async def claim_deleted_rows(self, limit: int, lease_s: float) -> list[DeletedRowEntry]: ...

    async def deleted_rows_done(self, entries: Sequence[DeletedRowEntry]) -> None: ...

    async def deleted_rows_later(
        self, later: Sequence[tuple[DeletedRowEntry, float, str | None]]
    ) -> None: ...


class ForgetStore(Protocol):
    """The job store's method for deleted rows (``listener.queue.store.JobStore``)."""

    async def forget_rows(self, rows: Sequence[DeletedRow]) -> list[ForgottenRow]: ...


class FaceRecords(Protocol):
    """The records of faces (``listener.analysis.face_store.FaceStore``)."""

    async def forget_faces(self, face_ids: Sequence[str]) -> int: ...


@runtime_checkable
class FaceRemover(Protocol):
    """Deletes faces of deleted rows from the owners' face collections (a provider with face
    collections implements it: ``listener.analysis.providers.rekognition``)."""

    async def delete_faces(self, collection_id: str, face_ids: list[str]) -> int:
        """Delete ``face_ids`` from ``collection_id``; faces (or a collection) already gone
        count as deleted.

        Returns:
            API calls made.

        Raises:
            listener.errors.ListenerError: the provider refused or could not be reached.
        """
        ...

    async def delete_row_faces(
        self, owner_id: str | None, source_table: str, source_id: str
    ) -> tuple[int, int]:
        """Delete every face indexed from a source row in its owner's collection, recorded or
        not (a run that died after indexing left some no one recorded).

        Returns:
            (faces deleted, API calls made).

        Raises:
            listener.errors.ListenerError: the provider refused or could not be reached.
        """
        ...


class NoFaceRemover(RuntimeError):
    """A deleted row has recorded faces, but this daemon has no provider to delete them."""


class DeleteDrain:
    """The deleted-rows loop of one daemon.

    Stops after the batch under way (``at_stop="return"``): entries left come due for the
    next daemon, as after a crash.

    Args:
        queue: the outbox, bound to a pool.
        store: the job store.
        faces: deletes faces from collections (the Rekognition provider); ``None`` when the
            daemon's pipeline has no faces step: rows with recorded faces then wait, with the
            reason, for a daemon that has one.
        records: the face records, forgotten once their faces are deleted; required with
            ``faces``.
        interval_s: seconds between looks for due entries.
        batch: entries per round trip.
        lease_s: how long a claimed entry is left alone, seconds (longer than a clean-up of
            ``batch`` entries takes).
        backoff_base_s, backoff_cap_s: delays after a failed clean-up, seconds: the n-th
            failure waits ``rng() * min(cap, base * 2**(n-1))``.
        rng: uniform floats in [0, 1).
        signals: ``forgotten`` is emitted for each entry done.

    Raises:
        ValueError: ``faces`` is given without ``records``.
    """

    def __init__(
        self,
        queue: DeletedRowsQueue,
        store: ForgetStore,
        faces: FaceRemover | None,
        *,
        records: FaceRecords | None = None,
        interval_s: float = 1.0,
        batch: int = 100,
        lease_s: float = 300.0,
        backoff_base_s: float = 5.0,
        backoff_cap_s: float = 600.0,
        rng: Callable[[], float] = random.random,
        signals: Signals | None = None,
    ) -> None:
        self._q = queue
        self._store = store
        if faces is not None and records is None:
            raise ValueError("a face remover needs the face records to forget (records)")
        self._faces = faces
        self._records = records
        self._batch = batch
        self._lease_s = lease_s
        self._backoff_base_s = backoff_base_s
        self._backoff_cap_s = backoff_cap_s
        self._rng = rng
        self._signals = signals
        self.loop = Loop("deletes", self._round, interval_s, at_stop="return", label="deleted rows")

    def wake(self) -> None:
        """Look for due entries now rather than at the next interval."""
        self.loop.wake()

    def stop(self) -> None:
        """End ``run`` after the current round."""
        self.loop.stop()

    async def run(self) -> None:
        """Run rounds until stopped; errors are logged, never raised."""
        await self.loop.run()

    async def tick(self) -> int:
        """One round: every due entry, ``batch`` at a time.

        Returns:
            Entries done. Errors are logged (each distinct one once), not raised.
        """
        return await self.loop.tick()

    async def _round(self) -> Ticked:
        done = 0
        errors: set[str] = set()
        try:
            while not self.loop.stopping and await self._q.deleted_rows_due():
                entries = await self._q.claim_deleted_rows(self._batch, self._lease_s)
                if not entries:
                    break
                done += await self._clean(entries, errors)
                if len(entries) < self._batch:
                    break
        except Exception as error:
            errors.add(describe(error))
        return Ticked(done, errors)

    async def _clean(self, entries: list[DeletedRowEntry], errors: set[str]) -> int:
        forgotten = await self._store.forget_rows(
            [DeletedRow(e.source_table, e.source_id, e.job_id, e.reinserted) for e in entries]
        )
        done: list[DeletedRowEntry] = []
        later: list[tuple[DeletedRowEntry, float, str | None]] = []
        for entry, row in zip(entries, forgotten, strict=True):
            if row.running_s is not None:
                # Its worker may still index faces: sweep once its lease would have ended.
                later.append((entry, max(row.running_s, 0.0) + LEASE_MARGIN_S, None))
                continue
            try:
                await self._remove_faces(row)
            except Exception as error:
                reason = describe(error)
                errors.add(reason)
                delay = full_jitter_backoff(
                    entry.attempts, self._backoff_base_s, self._backoff_cap_s, self._rng
                )
                later.append((entry, delay, reason))
                continue
            done.append(entry)
            logger.bind(table=entry.source_table, source_id=entry.source_id).debug(
                "deleted row cleaned up ({} faces)", len(row.leftovers)
            )
        await self._q.deleted_rows_done(done)
        await self._q.deleted_rows_later(later)
        if self._signals is not None:
            self._signals.emit("forgotten", len(done))
        return len(done)

    async def _remove_faces(self, row: ForgottenRow) -> None:
        """Step 3 and 4 for one row.

        Raises:
            NoFaceRemover: the row has recorded faces and no provider can delete them.
            listener.errors.ListenerError: the provider refused or could not be reached.
        """
        if row.leftovers and self._faces is None:
            raise NoFaceRemover(
                f"{len(row.leftovers)} faces of deleted row {row.row.source_id} of "
                f"{row.row.source_table} are in a Rekognition collection, and this daemon's "
                "pipeline has no rekognition provider to delete them"
            )
        if self._faces is None or self._records is None:
            return
        by_collection: dict[str, list[str]] = defaultdict(list)
        for face in row.leftovers:
            by_collection[face.container].append(face.ref_id)
        for collection, face_ids in sorted(by_collection.items()):
            await self._faces.delete_faces(collection, face_ids)
        if row.sweep:
            await self._faces.delete_row_faces(
                row.owner_id, row.row.source_table, row.row.source_id
            )
        if row.leftovers and self._records is not None:
            await self._records.forget_faces([f.ref_id for f in row.leftovers])
