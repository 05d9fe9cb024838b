"""OpenAI's Batch API: bulk steps at half price, never lost.

Jobs whose next step is an OpenAI step and that go through batches wait as ``batched`` (see
``Dispatcher.batches``). The ``BatchManager`` of every daemon:

- **submits**: once ``min_requests`` steps wait (or the oldest has waited ``max_wait_s``), it
  takes them into a new batch in one short statement (``BatchStore.take_for_batch``: the batch
  is recorded ``preparing`` and the jobs get its id; SKIP LOCKED, so daemons never share a
  job) and commits. Then, outside any transaction, it fetches the images, writes one JSONL
  request per step (``custom_id`` = the step's key), keeps what fits the API's limits (50,000
  requests, 200 MB; the rest waits for the next batch), uploads the file and records it with
  the requests (``submitting``) *before* creating the batch at OpenAI (with our id in its
  metadata). Jobs whose image cannot be read go to the per-image path, which records why. A
  crash while preparing leaves a ``preparing`` batch whose heartbeat stops: after
  ``abandon_after_s`` any daemon hands its jobs back (``sweep_abandoned_batches``). A crash
  after the record: the next poll adopts the batch OpenAI has for our id, or creates it.
- **polls** open batches every ``poll_interval_s``. On ``completed`` (and ``expired``, which
  keeps what finished) it downloads the output and error files and applies them with
  ``BatchStore.apply_batch_result``: in one statement under the batch's row lock, each line's
  result is stored at batch prices and the jobs are handed back as pending (they continue
  with their next step; a job whose line failed leaves batch mode and runs per image, with
  the error recorded), and the batch is marked applied, so it is applied exactly once
  whatever crashes or restarts. ``failed`` and ``cancelled`` batches hand their jobs back to
  the per-image path.
- **fences** every write about a job in a batch by ``(id, batch id, status 'batched',
  step)``: a job cancelled while its batch runs, or reset by a new URL (which takes it out of
  its batch), gets nothing from it. A batch that no job is left in is cancelled at OpenAI
  and closed, and nothing is written to jobs.

This module writes no job state itself: every change goes through the ``BatchStore``; the
``listener.batches`` bookkeeping (provider ids, progress) goes through ``Queries``.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import uuid
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from loguru import logger

from listener.analysis.batch_store import BatchJob, BatchStore
from listener.analysis.costs import cost_usd, price_for
from listener.analysis.dispatch import FetchResult
from listener.analysis.providers.base import BatchBackend, ImageInput, StepResult
from listener.db.queries import Queries
from listener.errors import ListenerError
from listener.queue.loops import Loop, Ticked
from listener.queue.retry import describe
from listener.redact import redact_text
from listener.settings import BatchSettings, Price

OPEN = ("submitting", "validating", "in_progress", "finalizing", "cancelling")
"""Batch statuses that are not final yet."""


def split_requests(lines: Sequence[bytes], max_requests: int, max_bytes: int) -> list[list[int]]:
    """Indices of ``lines`` grouped into files of at most ``max_requests`` lines and
    ``max_bytes`` bytes (each line plus its newline)."""
    groups: list[list[int]] = []
    current: list[int] = []
    size = 0
    for i, line in enumerate(lines):
        length = len(line) + 1
        if current and (len(current) >= max_requests or size + length > max_bytes):
            groups.append(current)
            current, size = [], 0
        current.append(i)
        size += length
    if current:
        groups.append(current)
    return groups


class BatchManager:
    """Submits and applies OpenAI batches for one daemon (several daemons share the work).

    Its poll loop stops after the round under way (``at_stop="return"``): open batches are
    polled again by the next daemon; a preparation cut short hands its jobs back.

    Args:
        queries: the daemon's queries (``listener.batches`` bookkeeping).
        store: the batch store (``listener.analysis.batch_store``: every change of a batched
            job's state, fenced by the batch).
        provider: the OpenAI provider (request bodies, parsing, the Batch API calls).
        fetch: fetches an image (``ImageFetcher.fetch``).
        steps: the OpenAI steps of the plan (``openai.tier1``...).
        settings: thresholds, intervals and limits.
        prices: the price table (batch results cost half the realtime price).
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
    ) -> None:
        self._q = queries
        self._store = store
        self._provider = provider
        self._fetch = fetch
        self._steps = list(steps)
        self._s = settings
        self._prices = dict(prices)
        self.loop = Loop(
            "batches", self._round, settings.poll_interval_s, at_stop="return", label="batches"
        )
        self.applied = 0

    def stop(self) -> None:
        """End ``run`` after the current round."""
        self.loop.stop()

    async def run(self) -> None:
        """Submit and poll every ``poll_interval_s`` until stopped; errors are logged."""
        await self.loop.run()

    async def tick(self) -> int:
        """One round (see ``_round``): jobs handed back, batches submitted and applied.
        Errors are logged (each distinct one once), never raised."""
        return await self.loop.tick()

    async def _round(self) -> Ticked:
        """Hand back abandoned preparations, submit what is ready, then poll and apply open
        batches; a part that fails does not keep the others from running."""
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
        if file_id is not None:
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
        """Fetch, write, upload and record batch ``local_id`` (no transaction is open).

        Returns:
            The recorded input file's id; ``None`` when there is nothing to create.
        """
        kind = step.split(".", 1)[1]
        log = logger.bind(batch=local_id, step=step)
        lines: list[bytes] = []
        ids: list[int] = []
        customs: list[str] = []
        unusable: dict[int, str] = {}
        for job in jobs:
            try:
                body = await self._body(kind, job)
            except ListenerError as error:
                unusable[job.id] = str(error)
                continue
            custom_id = f"{job.id}:{step}:{local_id}"
            lines.append(
                json.dumps(
                    {
                        "custom_id": custom_id,
                        "method": "POST",
                        "url": "/v1/chat/completions",
                        "body": body,
                    }
                ).encode()
            )
            ids.append(job.id)
            customs.append(custom_id)
        # The image cannot be read: the per-image path records why (redacted: it is stored).
        await self._store.batch_to_per_image(
            local_id, {job_id: redact_text(text) for job_id, text in unusable.items()}
        )
        if not lines:
            await self._q.close_batch(local_id, "empty")
            return None
        group = split_requests(lines, self._s.max_requests, self._s.max_bytes)[0]
        taken = set(group)
        await self._store.return_to_wait(
            local_id, [job_id for i, job_id in enumerate(ids) if i not in taken]
        )
        data = b"\n".join(lines[i] for i in group) + b"\n"
        file_id = await self._provider.upload_batch_file(data)
        requests = {customs[i]: ids[i] for i in group}
        if not await self._store.record_batch_file(local_id, file_id, requests):
            log.warning("batch {} was taken back while its file was uploaded", local_id)
            return None
        log.info("batch {} recorded: {} requests for {}", local_id, len(group), step)
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

    async def _create(self, local_id: str, file_id: str) -> None:
        try:
            batch_id, status = await self._provider.create_batch(file_id, local_id)
        except Exception as error:
            logger.warning(
                "creating batch {} failed (retried on the next poll): {}", local_id, describe(error)
            )
            return
        await self._q.batch_submitted(local_id, batch_id, status)

    async def poll_open(self) -> None:
        """Check every open batch: apply the finished ones, cancel and close the ones no job
        is left in.

        Raises:
            ListenerError, asyncpg.PostgresError: a provider call or the database failed (the
                batch is checked again on the next poll).
        """
        for row in await self._q.open_batch_rows():
            local_id = row["id"]
            if row["status"] == "preparing":
                continue  # its daemon is at work, or the abandoned sweep takes it back
            if await self._store.jobs_in_batch(local_id) == 0:
                await self._close_empty(local_id, row["provider_batch_id"])
                continue
            if row["provider_batch_id"] is None:
                found = await self._provider.find_batch(local_id)
                if found is None:
                    await self._create(local_id, row["input_file_id"])
                else:
                    await self._q.batch_submitted(local_id, *found)
                continue
            state = await self._provider.retrieve_batch(row["provider_batch_id"])
            await self._q.batch_progress(local_id, state)
            if state["status"] not in OPEN:
                await self.apply(local_id, row["step"], state)

    async def _close_empty(self, local_id: str, provider_batch_id: str | None) -> None:
        """Every job left batch ``local_id`` (cancelled, or a new URL): cancel it at OpenAI
        and close it; nothing is written to jobs. A job never joins a batch after it was
        taken, so an empty batch stays empty."""
        status = "cancelled"
        if provider_batch_id is None:
            found = await self._provider.find_batch(local_id)
            if found is not None:
                await self._q.batch_submitted(local_id, *found)
                provider_batch_id = found[0]
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
