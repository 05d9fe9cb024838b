"""OpenAI's Batch API: bulk steps at half price, never lost.

Jobs whose next step is an OpenAI step and that go through batches wait as ``batched`` (see
``Dispatcher.batches``). The ``BatchManager`` of every daemon:

- **submits**: once ``min_requests`` steps wait (or the oldest has waited ``max_wait_s``), it
  locks them (SKIP LOCKED), writes one JSONL request per step (``custom_id`` = the step's
  key), splits at the API's limits (50,000 requests, 200 MB), uploads the file, and records
  the batch, its requests and its jobs in one transaction *before* creating the batch at
  OpenAI (status ``submitting``, with our id in the batch's metadata). A crash before the
  record leaves the jobs waiting; after it, the next poll adopts the batch OpenAI has for our
  id, or creates it.
- **polls** open batches every ``poll_interval_s``. On ``completed`` (and ``expired``, which
  keeps what finished) it downloads the output and error files and, in one transaction under
  the batch's row lock, stores each line's result at batch prices, hands the jobs back as
  pending (they continue with their next step; a job whose line failed leaves batch mode and
  runs per image, with the error recorded) and marks the batch applied, so a batch is
  applied exactly once whatever crashes or restarts. ``failed`` and ``cancelled`` batches
  hand their jobs back to the per-image path.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import uuid
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import asyncpg
from loguru import logger

from listener.costs import cost_usd, price_for
from listener.db.queries import Queries
from listener.dispatch import FetchResult, image_size
from listener.errors import ListenerError
from listener.estimate import BATCH_DISCOUNT
from listener.providers.base import ImageInput
from listener.providers.openai import OpenAIProvider
from listener.queue.outcomes import Job
from listener.queue.retry import describe
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

    Args:
        pool: the daemon's pool (transactions need their own connection).
        provider: the OpenAI provider (request bodies, parsing, the Batch API calls).
        fetch: fetches an image (``ImageFetcher.fetch``).
        steps: the OpenAI steps of the plan (``openai.tier1``...).
        settings: thresholds, intervals and limits.
        prices: the price table (batch results cost half the realtime price).
    """

    def __init__(
        self,
        pool: asyncpg.Pool,
        provider: OpenAIProvider,
        fetch: Callable[[str | None], Any],
        steps: Sequence[str],
        settings: BatchSettings,
        prices: Mapping[str, Price],
    ) -> None:
        self._pool = pool
        self._q = Queries(pool)
        self._provider = provider
        self._fetch = fetch
        self._steps = list(steps)
        self._s = settings
        self._prices = dict(prices)
        self._stop = asyncio.Event()
        self.applied = 0

    def stop(self) -> None:
        """End ``run`` after the current round."""
        self._stop.set()

    async def run(self) -> None:
        """Submit and poll every ``poll_interval_s`` until stopped; errors are logged."""
        while not self._stop.is_set():
            await self.tick()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), self._s.poll_interval_s)

    async def tick(self) -> None:
        """One round: submit what is ready, then poll and apply open batches."""
        for step in self._steps:
            try:
                await self.submit_ready(step)
            except Exception as error:
                logger.warning("batch submission for {} failed: {}", step, describe(error))
        try:
            await self.poll_open()
        except Exception as error:
            logger.warning("polling batches failed: {}", describe(error))

    async def submit_ready(self, step: str) -> int:
        """Submit batches for ``step`` if enough steps wait; returns the batches submitted."""
        submitted = 0
        while not self._stop.is_set():
            row = await self._q.rows("batch_waiting", step)
            waiting, oldest = row[0]["waiting"], row[0]["oldest_s"]
            if not waiting or (waiting < self._s.min_requests and oldest < self._s.max_wait_s):
                return submitted
            if not await self._submit(step):
                return submitted
            submitted += 1
        return submitted

    async def _submit(self, step: str) -> bool:
        kind = step.split(".", 1)[1]
        local_id = f"lb_{uuid.uuid4().hex}"
        async with self._pool.acquire() as conn, conn.transaction():
            q = Queries(conn)
            rows = await q.rows("take_for_batch", step, self._s.max_requests)
            if not rows:
                return False
            lines: list[bytes] = []
            ids: list[int] = []
            customs: list[str] = []
            unusable: list[tuple[int, str]] = []
            for r in rows:
                job = Job(
                    r["id"],
                    r["source_table"],
                    r["source_id"],
                    r["image_url"],
                    r["owner_id"],
                    r["priority"],
                    r["attempts"],
                    r["max_attempts"],
                    uuid.uuid4(),
                )
                try:
                    body = await self._body(q, kind, job)
                except ListenerError as error:
                    unusable.append((job.id, str(error)))
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
            for job_id, reason in unusable:
                # The image cannot be read: the per-image path records why.
                await conn.execute(
                    "UPDATE listener.jobs SET status = 'pending', batch_mode = false, "
                    "batch_step = NULL, run_after = now(), last_error = $2 WHERE id = $1",
                    job_id,
                    reason,
                )
            if not lines:
                return True
            group = split_requests(lines, self._s.max_requests, self._s.max_bytes)[0]
            data = b"\n".join(lines[i] for i in group) + b"\n"
            file_id = await self._provider.upload_batch_file(data)
            await q.execute(
                "record_batch",
                local_id,
                "openai",
                step,
                file_id,
                [customs[i] for i in group],
                [ids[i] for i in group],
            )
        logger.info("batch {} recorded: {} requests for {}", local_id, len(group), step)
        await self._create(local_id, file_id)
        return True

    async def _body(self, q: Queries, kind: str, job: Job) -> dict[str, Any]:
        fetched: FetchResult = await self._fetch(job.image_url)
        width, height = image_size(fetched.data)
        image = ImageInput(
            job.id,
            job.source_table,
            job.source_id,
            job.owner_id,
            fetched.url,
            fetched.data,
            fetched.format,
            width,
            height,
        )
        previous = {r["step"]: json.loads(r["output"]) for r in await q.rows("job_outputs", job.id)}
        return await self._provider.request_body(kind, image, previous)

    async def _create(self, local_id: str, file_id: str) -> None:
        try:
            batch_id, status = await self._provider.create_batch(file_id, local_id)
        except Exception as error:
            logger.warning(
                "creating batch {} failed (retried on the next poll): {}", local_id, describe(error)
            )
            return
        await self._q.execute("batch_submitted", local_id, batch_id, status)

    async def poll_open(self) -> None:
        """Check every open batch; apply the ones that finished."""
        for row in await self._q.rows("open_batch_rows"):
            local_id = row["id"]
            if row["provider_batch_id"] is None:
                found = await self._provider.find_batch(local_id)
                if found is None:
                    await self._create(local_id, row["input_file_id"])
                else:
                    await self._q.execute("batch_submitted", local_id, *found)
                continue
            state = await self._provider.retrieve_batch(row["provider_batch_id"])
            await self._q.execute(
                "batch_progress",
                local_id,
                state["status"],
                state["completed"],
                state["failed"],
                state["output_file_id"],
                state["error_file_id"],
                state["error"],
            )
            if state["status"] not in OPEN:
                await self.apply(local_id, row["step"], state)

    async def apply(self, local_id: str, step: str, state: Mapping[str, Any]) -> bool:
        """Apply a finished batch once; returns False when it was applied already."""
        kind = step.split(".", 1)[1]
        output = await self._lines(state.get("output_file_id"))
        errors = await self._lines(state.get("error_file_id"))
        async with self._pool.acquire() as conn, conn.transaction():
            q = Queries(conn)
            if await q.rows("lock_batch", local_id) == []:
                return False
            requests = {r["custom_id"]: r for r in await q.rows("batch_request_jobs", local_id)}
            done: set[int] = set()
            failed: dict[int, str] = {}
            for line in output:
                request = requests.get(line.get("custom_id", ""))
                if request is None:
                    continue
                job_id = request["job_id"]
                response = line.get("response") or {}
                if response.get("status_code") != 200:
                    failed[job_id] = _line_error(line)
                    continue
                try:
                    result = self._provider.parse_body(kind, response.get("body") or {})
                except ListenerError as error:
                    failed[job_id] = str(error)
                    continue
                price = price_for(self._prices, "openai", result.model)
                cost = BATCH_DISCOUNT * cost_usd(
                    price,
                    input_tokens=result.input_tokens or 0,
                    output_tokens=result.output_tokens or 0,
                )
                await q.execute(
                    "save_batch_result",
                    job_id,
                    step,
                    "openai",
                    json.dumps(result.output),
                    result.model,
                    result.input_tokens,
                    result.output_tokens,
                    _decimal(cost),
                )
                done.add(job_id)
            for line in errors:
                request = requests.get(line.get("custom_id", ""))
                if request is not None and request["job_id"] not in done:
                    failed[request["job_id"]] = _line_error(line)
            status = state.get("status")
            unfinished = {r["job_id"] for r in requests.values()} - done - set(failed)
            reason = f"batch {local_id} {status}" + (
                f": {state['error']}" if state.get("error") else ""
            )
            for job_id in unfinished:
                failed[job_id] = reason
            all_jobs = [r["job_id"] for r in requests.values()]
            # One statement per distinct reason keeps the jobs' last_error exact.
            by_reason: dict[str, list[int]] = {}
            for job_id, text in failed.items():
                by_reason.setdefault(text[:1000], []).append(job_id)
            for text, ids in by_reason.items():
                await q.execute("release_batch_jobs", local_id, ids, ids, text)
            await q.execute("release_batch_jobs", local_id, all_jobs, [], None)
            await q.execute("batch_applied", local_id)
            await q.execute("notify_jobs")
        self.applied += 1
        logger.info(
            "batch {} {}: {} results stored, {} back to the per-image path",
            local_id,
            status,
            len(done),
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


def _decimal(value: float) -> Any:
    from decimal import Decimal

    return Decimal(f"{value:.9f}")
