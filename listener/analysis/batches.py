"""OpenAI's Batch API: bulk steps at half price, never lost, never run unrecorded.

Jobs whose next step is an OpenAI step and that go through batches wait as ``batched`` (see
``Dispatcher.batches``). The ``BatchManager`` of every daemon:

- **submits**: once ``min_requests`` steps wait (or the oldest has waited ``max_wait_s``), it
  takes them into a new batch in one short statement (``BatchStore.take_for_batch``: the batch
  is recorded ``preparing`` and the jobs get its id; SKIP LOCKED, so daemons never share a
  job) and commits. Then, outside any transaction, it fetches the images, ``fetch_concurrency``
  at a time, and writes one JSONL request per step (``custom_id`` = the step's key) while they
  fit the API's limits (50,000 requests, 200 MB): once the file is full no further image is
  fetched, the rest wait for the next batch, and the requests written but left out are kept
  for this daemon's next batch of the step, so no image is fetched twice. Jobs whose image
  cannot be read (or whose request alone is over the size limit) go to the per-image path,
  which records why. It uploads the file (named after the batch) and records it with the
  requests (``submitting``) *before* anything is created at OpenAI.
- **creates** a recorded batch under a claim (``Queries.claim_batch_create``: ``creating``
  since now, one daemon at a time, taken over after ``abandon_after_s`` of silence), with
  listener's batch id and the installation's id in its metadata, then records OpenAI's id
  (``Queries.batch_submitted``, which a row takes once: a batch whose row was closed or holds
  another batch meanwhile is cancelled at once). A refusal drops the claim (tried again on the
  next poll); an answer that never came keeps it, and whoever takes it over first looks for
  the batch OpenAI may have made (``_find``) before creating it.
- **sweeps** OpenAI's recent batches (at start, then every ``sweep_interval_s``; the first
  sweep reads back 25 hours, a batch's 24-hour window and a margin, the next ones back to the
  sweep before, with an hour of overlap): a batch of this installation whose row has no
  provider id yet is adopted (its creator died before recording it, or the answer was lost),
  and one whose row is gone, closed, or holds another batch is cancelled (a duplicate no one
  would poll, apply or pay for). Batches of other installations sharing the account are never
  touched.
- **polls** open batches every ``poll_interval_s``. On ``completed`` (and ``expired``, which
  keeps what finished) it downloads the output and error files and applies them with
  ``BatchStore.apply_batch_result``: in one statement under the batch's row lock, each line's
  result is stored at batch prices and the jobs are handed back as pending (they continue
  with their next step; a job whose line failed leaves batch mode and runs per image, with
  the error recorded), and the batch is marked applied, so it is applied exactly once
  whatever crashes or restarts. ``failed`` and ``cancelled`` batches hand their jobs back to
  the per-image path. A crash while preparing leaves a ``preparing`` batch whose heartbeat
  stops: after ``abandon_after_s`` any daemon hands its jobs back
  (``sweep_abandoned_batches``).
- **fences** every write about a job in a batch by ``(id, batch id, status 'batched',
  step)``: a job cancelled while its batch runs, or reset by a new URL (which takes it out of
  its batch), gets nothing from it. A batch that no job is left in is cancelled at OpenAI
  and closed, and nothing is written to jobs.
- **prunes** batches that never reached OpenAI (``empty``, ``abandoned``) ``prune_after_days``
  after they were closed, on the sweep's schedule.

This module writes no job state itself: every change goes through the ``BatchStore``; the
``listener.batches`` bookkeeping (provider ids, claims, progress) goes through ``Queries``.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import json
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from datetime import datetime
from typing import Any

from loguru import logger

from listener.analysis.batch_store import BatchJob, BatchStore
from listener.analysis.costs import cost_usd, price_for
from listener.analysis.dispatch import FetchResult
from listener.analysis.providers.base import (
    BatchBackend,
    ImageInput,
    ProviderBatch,
    StepResult,
)
from listener.db.queries import Queries
from listener.errors import ListenerError, ProviderPaused, RateLimited, RejectedByProvider
from listener.queue.loops import Loop, Ticked
from listener.queue.retry import describe
from listener.redact import redact_text
from listener.settings import BatchSettings, Price

OPEN = ("submitting", "creating", "validating", "in_progress", "finalizing", "cancelling")
"""Batch statuses that are not final yet."""

CANCELLABLE = ("validating", "in_progress", "finalizing")
"""Provider statuses a batch can be cancelled in."""

MARKER = "listener_batch"
"""The metadata key of listener's batch id on the provider's batch."""

INSTALLATION = "listener_installation"
"""The metadata key of the installation's id (``listener.installation``)."""

SWEEP_LOOKBACK_S = 25 * 3600.0
"""How far back the first sweep reads: a batch runs at most its 24-hour completion window,
so an older one can no longer be cancelled; an hour of margin."""

CLOCK_MARGIN_S = 3600.0
"""Slack between the clocks compared (the database's, this host's, the provider's)."""

PRUNE_CHUNK = 1000
"""Batch rows deleted per retention statement."""

REFUSED = (RejectedByProvider, RateLimited, ProviderPaused)
"""Answers that say the provider did not create the batch (any other failure leaves it
unknown)."""


@dataclasses.dataclass(frozen=True, slots=True)
class _Request:
    """One job's request, written: its body and the key it is kept under between batches."""

    job: BatchJob
    key: str
    body: Mapping[str, Any]


def _request_key(job: BatchJob, step: str) -> str:
    """What a written request depends on: the job, its step, its image URL and the outputs
    of its earlier steps."""
    outputs = json.dumps(job.outputs, sort_keys=True, default=str)
    digest = hashlib.sha256(f"{job.image_url}\n{outputs}".encode()).hexdigest()
    return f"{job.id}:{step}:{digest}"


class BatchManager:
    """Submits, creates, sweeps and applies OpenAI batches for one daemon (several daemons
    share the work).

    Its poll loop stops after the round under way (``at_stop="return"``): open batches are
    polled again by the next daemon; a preparation cut short hands its jobs back.

    Args:
        queries: the daemon's queries (``listener.batches`` bookkeeping).
        store: the batch store (``listener.analysis.batch_store``: every change of a batched
            job's state, fenced by the batch).
        provider: the batch backend (request bodies, parsing, the Batch API calls).
        fetch: fetches an image (``ImageFetcher.fetch``).
        steps: the provider's steps of the plan (``openai.tier1``...).
        settings: thresholds, intervals and limits.
        prices: the price table (batch results cost ``provider.batch_discount`` of it).
        clock: wall clock, epoch seconds (compared with the provider's ``created_at``).
    """

    def __init__(
        self,
        queries: Queries,
        store: BatchStore,
        provider: BatchBackend,
        fetch: Callable[[str | None], Any],
        steps: Sequence[str],
        settings: BatchSettings,
        prices: Mapping[str, Price],
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._q = queries
        self._store = store
        self._provider = provider
        self._fetch = fetch
        self._steps = list(steps)
        self._s = settings
        self._prices = dict(prices)
        self._clock = clock
        self.loop = Loop(
            "batches", self._round, settings.poll_interval_s, at_stop="return", label="batches"
        )
        self.applied = 0
        self._installation: str | None = None
        # Requests written but left out of their file, by step: the next batch of the step
        # takes them without fetching their images again.
        self._spare: dict[str, dict[str, Mapping[str, Any]]] = {}
        self._next_sweep = 0.0  # time.monotonic() of the next sweep (0: at the first round)
        self._swept_since: float | None = None  # the clock when the last sweep began
        self._next_prune = 0.0
        self._strays: set[str] = set()  # provider batches reported as not listener's

    def stop(self) -> None:
        """End ``run`` after the current round."""
        self.loop.stop()

    async def run(self) -> None:
        """Submit and poll every ``poll_interval_s`` until stopped; errors are logged."""
        await self.loop.run()

    async def tick(self) -> int:
        """One round (see ``_round``): jobs handed back, batches submitted, adopted,
        cancelled and applied. Errors are logged (each distinct one once), never raised."""
        return await self.loop.tick()

    async def _round(self) -> Ticked:
        """Hand back abandoned preparations, sweep the provider's batches and prune (when
        due), submit what is ready, then poll and apply open batches; a part that fails does
        not keep the others from running."""
        errors: list[str] = []
        done = 0
        applied = self.applied
        try:
            swept = await self._store.sweep_abandoned_batches(self._s.abandon_after_s)
            if swept:
                logger.warning(
                    "{} jobs of batches abandoned while being prepared wait again", len(swept)
                )
            done += len(swept)
        except Exception as error:
            errors.append(f"sweeping abandoned batches failed: {describe(error)}")
        if time.monotonic() >= self._next_sweep:
            try:
                done += await self.sweep_provider()
                self._next_sweep = time.monotonic() + self._s.sweep_interval_s
            except Exception as error:
                errors.append(f"sweeping the provider's batches failed: {describe(error)}")
        if self._s.prune_after_days is not None and time.monotonic() >= self._next_prune:
            try:
                done += await self.prune_unsent(self._s.prune_after_days * 86400.0)
                self._next_prune = time.monotonic() + self._s.sweep_interval_s
            except Exception as error:
                errors.append(f"pruning batches failed: {describe(error)}")
        for step in self._steps:
            try:
                done += await self.submit_ready(step)
            except Exception as error:
                errors.append(f"batch submission for {step} failed: {describe(error)}")
        try:
            await self.poll_open()
        except Exception as error:
            errors.append(f"polling batches failed: {describe(error)}")
        return Ticked(done + self.applied - applied, errors)

    # -- submitting -----------------------------------------------------------------------

    async def submit_ready(self, step: str) -> int:
        """Submit batches for ``step`` while enough steps wait; returns the batches submitted.

        Raises:
            ListenerError, asyncpg.PostgresError: the upload or the database failed (the
                batch's jobs were handed back to wait).
        """
        submitted = 0
        while not self.loop.stopping:
            waiting, oldest_s = await self._q.batch_waiting(step)
            if not waiting or (waiting < self._s.min_requests and oldest_s < self._s.max_wait_s):
                return submitted
            if not await self._submit(step):
                return submitted
            submitted += 1
        return submitted

    async def _submit(self, step: str) -> bool:
        """Take waiting jobs into a new batch and submit it; ``False`` when none waited."""
        local_id = f"lb_{uuid.uuid4().hex}"
        jobs = await self._store.take_for_batch(step, self._s.max_requests, local_id)
        if not jobs:
            return False
        preparing = asyncio.create_task(self._prepare(local_id, step, jobs))
        taken_back = asyncio.Event()
        beating = asyncio.create_task(self._keep_alive(local_id, preparing, taken_back))
        try:
            file_id = await preparing
        except BaseException as error:
            # Whatever went wrong before the file was recorded (upload refused, cancelled at
            # shutdown), the jobs wait for the next batch now rather than after the sweep.
            with contextlib.suppress(Exception):
                await self._store.return_to_wait(local_id, [j.id for j in jobs])
                await self._q.close_batch(local_id, "abandoned")
            if isinstance(error, asyncio.CancelledError) and taken_back.is_set():
                return True  # swept by another daemon while we prepared: nothing to submit
            raise
        finally:
            beating.cancel()
        # Recorded: the row says what the batch is before OpenAI knows of it. The claim is
        # free unless another daemon's poll took it since, and then that daemon creates it.
        if file_id is not None and await self._q.claim_batch_create(
            local_id, self._s.abandon_after_s
        ):
            await self._create(local_id, file_id)
        return True

    async def _keep_alive(
        self, local_id: str, preparing: asyncio.Task[str | None], taken_back: asyncio.Event
    ) -> None:
        """Renew the preparing batch's heartbeat every third of ``abandon_after_s`` while
        ``preparing`` runs (image fetches and the upload can each take long); when the batch
        was swept meanwhile, set ``taken_back`` and cancel the preparation."""
        beat_s = max(self._s.abandon_after_s / 3, 0.05)
        while not preparing.done():
            await asyncio.wait({preparing}, timeout=beat_s)
            if preparing.done():
                return
            try:
                alive = await self._store.keep_preparing(local_id)
            except Exception as error:
                logger.warning("batch {} heartbeat failed: {}", local_id, describe(error))
                continue
            if not alive:
                logger.warning("batch {} was taken back while being prepared", local_id)
                taken_back.set()
                preparing.cancel()
                return

    async def _prepare(self, local_id: str, step: str, jobs: Sequence[BatchJob]) -> str | None:
        """Write, upload and record batch ``local_id`` (no transaction is open).

        The requests kept from this daemon's last batch of ``step`` go first; then the other
        jobs' images are fetched ``fetch_concurrency`` at a time while the file has room.
        Jobs left out wait for the next batch (their requests, when written, are kept for it).

        Returns:
            The recorded input file's id; ``None`` when there is nothing to create.
        """
        kind = step.split(".", 1)[1]
        log = logger.bind(batch=local_id, step=step)
        kept = self._spare.pop(step, {})
        spare: dict[str, Mapping[str, Any]] = {}
        lines: list[bytes] = []
        requests: dict[str, int] = {}
        unusable: dict[int, str] = {}
        left: list[int] = []  # not in the file: they wait for the next batch
        size = 0
        full = False

        def add(request: _Request) -> None:
            """Write ``request`` into the file if it has room; else keep it for the next."""
            nonlocal size, full
            job = request.job
            custom_id = f"{job.id}:{step}:{local_id}"
            line = json.dumps(
                {
                    "custom_id": custom_id,
                    "method": "POST",
                    "url": "/v1/chat/completions",
                    "body": request.body,
                }
            ).encode()
            if len(line) + 1 > self._s.max_bytes:
                unusable[job.id] = (
                    f"its batch request is {len(line) + 1} bytes, over the batch file "
                    f"limit of {self._s.max_bytes} bytes"
                )
                return
            if len(lines) >= self._s.max_requests or size + len(line) + 1 > self._s.max_bytes:
                full = True
                left.append(job.id)
                spare[request.key] = request.body
                return
            lines.append(line)
            size += len(line) + 1
            requests[custom_id] = job.id

        to_fetch: list[BatchJob] = []
        for job in jobs:
            key = _request_key(job, step)
            body = kept.get(key)
            if body is None:
                to_fetch.append(job)
            else:
                add(_Request(job, key, body))
        pending: Iterator[BatchJob] = iter(to_fetch)

        async def fetcher() -> None:
            # Jobs are shared through one iterator: a fetcher takes the next one only while
            # the file has room, so no image is fetched for a file that is full.
            for job in pending:
                if full:
                    left.append(job.id)
                    continue
                try:
                    body = await self._body(kind, job)
                except ListenerError as error:
                    unusable[job.id] = str(error)
                    continue
                add(_Request(job, _request_key(job, step), body))

        workers = min(self._s.fetch_concurrency, len(to_fetch))
        if workers:
            try:
                async with asyncio.TaskGroup() as group:
                    for _ in range(workers):
                        group.create_task(fetcher())
            except BaseExceptionGroup as failed:
                raise failed.exceptions[0] from None
        self._spare[step] = spare
        # The image cannot be read: the per-image path records why (redacted: it is stored).
        await self._store.batch_to_per_image(
            local_id, {job_id: redact_text(text) for job_id, text in unusable.items()}
        )
        await self._store.return_to_wait(local_id, left)
        if not lines:
            await self._q.close_batch(local_id, "empty")
            return None
        data = b"\n".join(lines) + b"\n"
        file_id = await self._provider.upload_batch_file(data, f"{local_id}.jsonl")
        if not await self._store.record_batch_file(local_id, file_id, requests):
            log.warning("batch {} was taken back while its file was uploaded", local_id)
            return None
        log.info(
            "batch {} recorded: {} requests for {} ({} wait for the next batch)",
            local_id,
            len(requests),
            step,
            len(left),
        )
        return file_id

    async def _body(self, kind: str, job: BatchJob) -> dict[str, Any]:
        fetched: FetchResult = await self._fetch(job.image_url)
        image = ImageInput(
            job.id,
            job.source_table,
            job.source_id,
            job.owner_id,
            fetched.url,
            fetched.data,
            fetched.format,
            fetched.width,
            fetched.height,
        )
        return await self._provider.request_body(kind, image, job.outputs)

    # -- creating, finding, sweeping ------------------------------------------------------

    async def _installation_id(self) -> str:
        """This installation's id (``listener.installation``), read once."""
        if self._installation is None:
            self._installation = await self._q.installation_id()
        return self._installation

    async def _metadata(self, local_id: str) -> dict[str, str]:
        """What the provider's batch carries: listener's batch id and the installation's."""
        return {MARKER: local_id, INSTALLATION: await self._installation_id()}

    async def _create(self, local_id: str, file_id: str) -> None:
        """Create claimed batch ``local_id`` at the provider and record its id there."""
        metadata = await self._metadata(local_id)
        try:
            batch_id, status = await self._provider.create_batch(file_id, metadata)
        except Exception as error:
            if isinstance(error, REFUSED):
                # Not created: any daemon may try again on its next poll.
                await self._q.release_batch_create(local_id)
                logger.warning(
                    "creating batch {} was refused (retried on the next poll): {}",
                    local_id,
                    describe(error),
                )
            else:
                # It may exist: the sweep adopts it if it does; else the claim lapses after
                # abandon_after_s and whoever takes it looks for it before creating it again.
                logger.warning(
                    "creating batch {} got no answer (adopted if OpenAI made it, else created "
                    "again after {:g}s): {}",
                    local_id,
                    self._s.abandon_after_s,
                    describe(error),
                )
            return
        await self._record(local_id, ProviderBatch(batch_id, status, self._clock(), metadata))

    async def _record(self, local_id: str, batch: ProviderBatch) -> bool:
        """Record ``batch`` as batch ``local_id``'s; a row that will not take it (closed, or
        holding another batch) leaves it no one's: it is cancelled. ``True`` when recorded."""
        if await self._q.batch_submitted(local_id, batch.id, batch.status):
            return True
        await self._cancel_stray(batch, f"batch {local_id} was closed or has another batch")
        return False

    async def _find(self, local_id: str, created_at: datetime) -> ProviderBatch | None:
        """The provider's batch for ``local_id``, if one was created (its creator died, or
        its answer was lost): the provider's batches are read back to the row's creation."""
        installation = await self._installation_id()
        async for batch in self._provider.list_batches(created_at.timestamp() - CLOCK_MARGIN_S):
            # Batches created before 0026_batch_records carry no installation id: their
            # random local id alone names them.
            if (
                batch.metadata.get(MARKER) == local_id
                and batch.metadata.get(INSTALLATION, installation) == installation
            ):
                return batch
        return None

    async def _cancel_stray(self, batch: ProviderBatch, why: str) -> bool:
        """Cancel a provider batch listener will never poll or apply; ``True`` when a cancel
        was sent. One that finished already is reported (its cost is recorded nowhere)."""
        first = batch.id not in self._strays
        self._strays.add(batch.id)
        if batch.status not in CANCELLABLE:
            if first and batch.status not in ("cancelling", "cancelled"):
                logger.warning(
                    "OpenAI batch {} is not listener's ({}) and is {} already: its results "
                    "and cost are not recorded",
                    batch.id,
                    why,
                    batch.status,
                )
            return False
        try:
            status = await self._provider.cancel_batch(batch.id)
        except RejectedByProvider as error:  # it finished (409) or is gone (404) meanwhile
            logger.info("OpenAI batch {} could not be cancelled: {}", batch.id, describe(error))
            return False
        logger.warning("OpenAI batch {} cancelled ({}): {}", batch.id, status, why)
        return True

    async def sweep_provider(self) -> int:
        """Adopt or cancel the provider's batches of this installation that listener does not
        know (see the module docstring); returns how many.

        Raises:
            ListenerError, asyncpg.PostgresError: the listing or the database failed (the
                next round sweeps again).
        """
        installation = await self._installation_id()
        started = self._clock()
        since = started - SWEEP_LOOKBACK_S
        if self._swept_since is not None:
            since = max(since, self._swept_since - CLOCK_MARGIN_S)
        ours: list[ProviderBatch] = []
        async for batch in self._provider.list_batches(since):
            if batch.metadata.get(INSTALLATION) == installation and batch.metadata.get(MARKER):
                ours.append(batch)
        acted = 0
        for start in range(0, len(ours), 500):
            chunk = ours[start : start + 500]
            records = await self._q.batch_records([b.metadata[MARKER] for b in chunk])
            for batch in chunk:
                acted += await self._reconcile(batch, records.get(batch.metadata[MARKER]))
        self._swept_since = started
        return acted

    async def _reconcile(self, batch: ProviderBatch, record: dict[str, Any] | None) -> int:
        """One provider batch of this installation against its row (``record``, updated
        when the batch is adopted): 1 when adopted or cancelled."""
        local_id = batch.metadata[MARKER]
        if record is not None and record["provider_batch_id"] == batch.id:
            return 0  # known
        recorded_first = (
            record is not None
            and record["provider_batch_id"] is None
            and not record["closed"]
            and record["status"] in ("submitting", "creating")
        )
        if recorded_first and await self._q.batch_submitted(local_id, batch.id, batch.status):
            assert record is not None
            record["provider_batch_id"] = batch.id
            logger.bind(batch=local_id).warning(
                "batch {} adopted: OpenAI made it as {} but it was not recorded",
                local_id,
                batch.id,
            )
            return 1
        if record is None:
            why = f"listener has no batch {local_id}"
        elif record["closed"]:
            why = f"batch {local_id} is closed ({record['status']})"
        elif record["provider_batch_id"] is not None:
            why = f"batch {local_id} is OpenAI's {record['provider_batch_id']}"
        else:
            why = f"batch {local_id} took another batch meanwhile"
        return int(await self._cancel_stray(batch, why))

    async def prune_unsent(self, older_than_s: float) -> int:
        """Delete batches that never reached the provider (``empty``, ``abandoned``) closed
        more than ``older_than_s`` seconds ago; returns how many."""
        deleted = 0
        while not self.loop.stopping:
            n = await self._q.prune_unsent_batches(older_than_s, PRUNE_CHUNK)
            deleted += n
            if n < PRUNE_CHUNK:
                break
        if deleted:
            logger.info("pruned {} batches that never reached OpenAI", deleted)
        return deleted

    # -- polling --------------------------------------------------------------------------

    async def poll_open(self) -> None:
        """Check every open batch: create the recorded ones no daemon is creating, apply the
        finished ones, cancel and close the ones no job is left in.

        Raises:
            ListenerError, asyncpg.PostgresError: a provider call or the database failed (the
                batch is checked again on the next poll).
        """
        for row in await self._q.open_batch_rows():
            local_id = row["id"]
            if row["status"] == "preparing":
                continue  # its daemon is at work, or the abandoned sweep takes it back
            if await self._store.jobs_in_batch(local_id) == 0:
                await self._close_empty(local_id, row["provider_batch_id"], row["created_at"])
                continue
            if row["provider_batch_id"] is None:
                await self._resume(local_id, row["input_file_id"], row["created_at"])
                continue
            state = await self._provider.retrieve_batch(row["provider_batch_id"])
            await self._q.batch_progress(local_id, state)
            if state["status"] not in OPEN:
                await self.apply(local_id, row["step"], state)

    async def _resume(self, local_id: str, file_id: str, created_at: datetime) -> None:
        """A recorded batch without a provider id: unless another daemon is creating it,
        claim it, adopt the batch the provider made for it if any, else create it."""
        if not await self._q.claim_batch_create(local_id, self._s.abandon_after_s):
            return
        try:
            found = await self._find(local_id, created_at)
        except BaseException:
            with contextlib.suppress(Exception):
                await self._q.release_batch_create(local_id)
            raise
        if found is None:
            await self._create(local_id, file_id)
        elif await self._record(local_id, found):
            logger.bind(batch=local_id).info("batch {} adopted as {}", local_id, found.id)

    async def _close_empty(
        self, local_id: str, provider_batch_id: str | None, created_at: datetime
    ) -> None:
        """Every job left batch ``local_id`` (cancelled, or a new URL): cancel it at OpenAI
        and close it; nothing is written to jobs. A job never joins a batch after it was
        taken, so an empty batch stays empty. A daemon creating it right now finds it closed
        when it records the provider's id, and cancels what it made."""
        status = "cancelled"
        if provider_batch_id is None:
            found = await self._find(local_id, created_at)
            if found is not None and await self._q.batch_submitted(
                local_id, found.id, found.status
            ):
                provider_batch_id = found.id
        if provider_batch_id is not None:
            state = await self._provider.retrieve_batch(provider_batch_id)
            status = state["status"]
            if status in OPEN and status != "cancelling":
                status = await self._provider.cancel_batch(provider_batch_id)
        if await self._q.close_batch(local_id, status):
            logger.bind(batch=local_id).info(
                "batch {} closed ({}): no job is left in it", local_id, status
            )

    async def apply(self, local_id: str, step: str, state: Mapping[str, Any]) -> bool:
        """Apply a finished batch once (``BatchStore.apply_batch_result``).

        Args:
            local_id: our batch id.
            step: its step.
            state: as ``OpenAIProvider.retrieve_batch`` returns it.

        Returns:
            ``False`` when it was applied already (or another daemon is applying it).

        Raises:
            ListenerError: its output or error file cannot be read.
        """
        kind = step.split(".", 1)[1]
        output = await self._lines(state.get("output_file_id"))
        errors = await self._lines(state.get("error_file_id"))
        requests = await self._q.batch_requests(local_id)
        done: dict[int, StepResult] = {}
        failed: dict[int, str] = {}
        for line in output:
            job_id = requests.get(line.get("custom_id", ""))
            if job_id is None:
                continue
            response = line.get("response") or {}
            if response.get("status_code") != 200:
                failed[job_id] = _line_error(line)
                continue
            try:
                result = self._provider.parse_body(kind, response.get("body") or {})
            except ListenerError as error:
                failed[job_id] = str(error)
                continue
            price = price_for(self._prices, self._provider.name, result.model)
            cost = self._provider.batch_discount * cost_usd(
                price,
                input_tokens=result.input_tokens or 0,
                output_tokens=result.output_tokens or 0,
            )
            done[job_id] = dataclasses.replace(result, calls=1, cost_usd=cost)
        for line in errors:
            job_id = requests.get(line.get("custom_id", ""))
            if job_id is not None and job_id not in done:
                failed[job_id] = _line_error(line)
        status = state.get("status")
        reason = f"batch {local_id} {status}" + (
            f": {state['error']}" if state.get("error") else ""
        )
        for job_id in set(requests.values()) - set(done) - set(failed):
            failed[job_id] = reason
        # The reasons come from OpenAI's error lines: redact them like every stored reason.
        failed = {job_id: redact_text(text) for job_id, text in failed.items()}
        stored = await self._store.apply_batch_result(local_id, step, done, failed)
        if stored is None:
            return False
        self.applied += 1
        logger.bind(batch=local_id).info(
            "batch {} {}: {} results stored, {} back to the per-image path",
            local_id,
            status,
            len(stored),
            len(failed),
        )
        return True

    async def _lines(self, file_id: str | None) -> list[dict[str, Any]]:
        if not file_id:
            return []
        data = await self._provider.file_content(file_id)
        return [json.loads(line) for line in data.splitlines() if line.strip()]


def _line_error(line: Mapping[str, Any]) -> str:
    error = line.get("error") or {}
    if not error:
        body = (line.get("response") or {}).get("body") or {}
        error = body.get("error") or {}
    status = (line.get("response") or {}).get("status_code")
    return (
        f"batch request failed ({status}): "
        f"{error.get('code') or ''} {error.get('message') or ''}".strip()
    )
