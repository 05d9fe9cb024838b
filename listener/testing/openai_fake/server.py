"""``FakeOpenAI``: the aiohttp server, its routes, the knobs tests turn and what it records.

The chat requests' checks and answers live in ``chat`` and ``answers``, the Files and Batch
APIs in ``files`` and ``batches``, the rate limit's window in ``limits``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from listener.testing.openai_fake.answers import chat_completion, finish
from listener.testing.openai_fake.batches import (
    BatchRun,
    create_batch,
    list_page,
    parse_batch_file,
)
from listener.testing.openai_fake.chat import parse_chat
from listener.testing.openai_fake.errors import (
    ApiError,
    Fault,
    fault_error,
    no_api_key,
    not_found,
)
from listener.testing.openai_fake.files import FileStore, read_upload
from listener.testing.openai_fake.limits import (
    UNLIMITED_REQUESTS,
    UNLIMITED_TOKENS,
    SlidingWindow,
    format_duration,
    format_seconds,
)

# Real API: "up to 50 MB total payload size per request" (Images and vision guide).
MAX_BODY_BYTES = 50 * 1024 * 1024


def bearer(header: str | None) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` header, None if absent or empty."""
    if not header:
        return None
    scheme, _, token = header.partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        return None
    return token


@web.middleware
async def _openai_errors(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """Unknown routes answer in OpenAI's error format, as the real API does."""
    try:
        return await handler(request)
    except (web.HTTPNotFound, web.HTTPMethodNotAllowed) as exc:
        error = ApiError(exc.status, f"Invalid URL ({request.method} {request.path})")
        return web.json_response(error.body(), status=exc.status)


class FakeOpenAI:
    """A fake OpenAI API on 127.0.0.1 with scripted faults, rate limits and latency.

    Attributes (tests read and set them between requests):
        base_url: ``http://127.0.0.1:PORT/v1``, for ``AsyncOpenAI(base_url=...)``.
        faults: scripted failures, one popped per chat request (FIFO), before any check.
        fault_plan: when set, asked for a fault for each chat request the ``faults`` list
            did not fault (``None``: no fault), e.g. a random 20% of 500s.
        answered: the bodies of chat requests answered 200 (billed), in order. A body is
            appended when the answer is decided, before the ``latency_s`` wait: a request is
            billed even if the client goes away before the answer reaches it.
        answered_at: ``time.monotonic()`` of each decision in ``answered``, same order.
        finish_reason_override: finish_reasons for the next successful answers (FIFO):
            "content_filter" answers with null content, "length" with the JSON cut in half.
        requests: every chat request received: its JSON body (or ``{"body": text}`` if not
            a JSON object) plus ``received_at`` (``time.monotonic()``), ``api_key`` (the
            bearer token, or None) and ``traceparent`` (the W3C trace context header, or
            None).
        violations: requests rejected by ``rps_limit``.
        latency_s: every answer, errors included, waits this long first.
        usage_total: ``prompt_tokens`` and ``completion_tokens`` of all successful answers,
            batch requests included (counted when their batch finishes).

    Batch API attributes (see "Batch API" in the module docstring):
        batch_duration_s: how long a batch created from now on takes to finish (default 0.5).
        batch_cancel_s: how long a cancelled batch stays "cancelling" (default 0.1).
        batch_fail_every: every Nth request of a batch (1-based: N, 2N, ...) fails with 500.
        batch_next_outcome: outcomes for the next created batches (FIFO), "completed" when
            empty: "completed", "failed", "expired" or "cancelled".
        batch_create_hook: when set, awaited with the body of each ``POST /v1/batches``
            whose body is a JSON object, before it is validated and the batch created (a
            test's probe of what the caller recorded first, or a delay: the request is in
            flight, nothing exists yet).
        files: the bytes of every file, uploaded or written by a batch, by id.
        files_meta: the File object of every file, by id (its ``filename``, ``purpose``).
        batches: the Batch object of every batch, by id, as last computed.

    Args:
        rps_limit: requests per second; a request that would make more than floor(rps) in a
            sliding 1 s window gets 429 ``rate_limit_exceeded`` with ``retry-after`` (for
            rps < 1: one request per 1/rps seconds). None: unlimited.
        latency_s: initial ``latency_s``.
        port: TCP port to listen on; 0 picks a free one.
    """

    def __init__(
        self,
        *,
        rps_limit: float | None = None,
        latency_s: float = 0.0,
        port: int = 0,
    ) -> None:
        if rps_limit is not None and rps_limit <= 0:
            raise ValueError("rps_limit must be positive")
        self.rps_limit = rps_limit
        self.latency_s = latency_s
        self.faults: list[Fault] = []
        self.fault_plan: Callable[[], Fault | None] | None = None
        self.answered: list[Any] = []
        self.answered_at: list[float] = []
        self.finish_reason_override: list[str] = []
        self.requests: list[dict[str, Any]] = []
        self.violations = 0
        self.usage_total: dict[str, int] = {"prompt_tokens": 0, "completion_tokens": 0}
        self.batch_duration_s = 0.5
        self.batch_cancel_s = 0.1
        self.batch_fail_every: int | None = None
        self.batch_next_outcome: list[str] = []
        self.batch_create_hook: Callable[[dict[str, Any]], Awaitable[None]] | None = None
        self._files = FileStore()
        self.files: dict[str, bytes] = self._files.contents
        self.files_meta: dict[str, dict[str, Any]] = self._files.objects
        self.batches: dict[str, dict[str, Any]] = {}
        self._batch_runs: dict[str, BatchRun] = {}
        self._port = port
        self._base_url: str | None = None
        self._runner: web.AppRunner | None = None
        self._rps: SlidingWindow | None = None
        if rps_limit is not None:
            length = max(1.0, 1.0 / rps_limit)
            self._rps = SlidingWindow(length, max(1, math.floor(rps_limit * length)))

    @property
    def base_url(self) -> str:
        """``http://127.0.0.1:PORT/v1``. Raises RuntimeError before ``start``."""
        if self._base_url is None:
            raise RuntimeError("FakeOpenAI is not started")
        return self._base_url

    async def start(self) -> None:
        """Listen on 127.0.0.1 (port 0: a free one)."""
        app = web.Application(client_max_size=MAX_BODY_BYTES, middlewares=[_openai_errors])
        app.router.add_post("/v1/chat/completions", self._chat_completions)
        app.router.add_post("/v1/files", self._files_create)
        app.router.add_get("/v1/files/{file_id}/content", self._files_content)
        app.router.add_post("/v1/batches", self._batches_create)
        app.router.add_get("/v1/batches", self._batches_list)
        app.router.add_get("/v1/batches/{batch_id}", self._batches_retrieve)
        app.router.add_post("/v1/batches/{batch_id}/cancel", self._batches_cancel)
        runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", self._port)
        try:
            await site.start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        port = runner.addresses[0][1]
        self._base_url = f"http://127.0.0.1:{port}/v1"

    async def close(self) -> None:
        """Stop listening; answers still waiting on ``latency_s`` are cut off."""
        if self._runner is not None:
            runner, self._runner = self._runner, None
            await runner.cleanup()

    async def __aenter__(self) -> FakeOpenAI:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    # -- handlers --

    async def _chat_completions(self, request: web.Request) -> web.Response:
        """``POST /v1/chat/completions``: record, decide at once, then wait ``latency_s``."""
        received_at = time.monotonic()
        api_key = bearer(request.headers.get("Authorization"))
        try:
            raw = await request.read()
        except web.HTTPRequestEntityTooLarge:
            raw = None
        body: Any = None
        if raw is not None:
            with contextlib.suppress(ValueError):
                body = json.loads(raw)
        record = (
            dict(body)
            if isinstance(body, dict)
            else {"body": (raw or b"").decode(errors="replace")}
        )
        record.update(
            received_at=received_at,
            api_key=api_key,
            traceparent=request.headers.get("traceparent"),
        )
        self.requests.append(record)
        try:
            if raw is None:
                raise ApiError(
                    413, "Request body too large (limit 50 MB).", code="request_too_large"
                )
            response = self._answer(body, api_key)
        except ApiError as error:
            headers = {**self._headers(), **error.headers}
            response = web.json_response(error.body(), status=error.status, headers=headers)
        if self.latency_s > 0:
            await asyncio.sleep(self.latency_s)
        return response

    def _answer(self, body: Any, api_key: str | None) -> web.Response:
        """The answer to one request; synchronous so that admission is atomic."""
        if self.faults:
            raise fault_error(self.faults.pop(0))
        if self.fault_plan is not None:
            planned = self.fault_plan()
            if planned is not None:
                raise fault_error(planned)
        if api_key is None:
            raise no_api_key()
        chat = parse_chat(body)
        override = self.finish_reason_override[0] if self.finish_reason_override else None
        content, finish_reason = finish(chat, override)
        prompt_tokens = chat.prompt_tokens
        completion_tokens = math.ceil(len(content or "") / 4)
        self._admit(chat.model)
        if override is not None:
            self.finish_reason_override.pop(0)
        self.usage_total["prompt_tokens"] += prompt_tokens
        self.usage_total["completion_tokens"] += completion_tokens
        completion = chat_completion(chat, content, finish_reason, prompt_tokens, completion_tokens)
        self.answered.append(body)
        self.answered_at.append(time.monotonic())
        return web.json_response(completion, headers=self._headers())

    def _admit(self, model: str) -> None:
        """Take room for one request in ``rps_limit``, or raise 429 and count a violation."""
        if self._rps is None:
            return
        now = time.monotonic()
        wait = self._rps.wait_for(now, 1)
        if wait <= 0:
            self._rps.add(now, 1)
            return
        self.violations += 1
        message = (
            f"Rate limit reached for {model} in organization org-fake on requests per second "
            f"(RPS): Limit {self._rps.capacity:g}, Used {self._rps.used(now):g}, Requested 1. "
            f"Please try again in {format_duration(wait)}."
        )
        wait_ms = math.ceil(wait * 1000)
        headers = {"retry-after": format_seconds(wait_ms / 1000), "retry-after-ms": str(wait_ms)}
        raise ApiError(429, message, type_="requests", code="rate_limit_exceeded", headers=headers)

    # -- the Files and Batch APIs --

    async def _guarded(
        self, request: web.Request, action: Callable[[web.Request], Awaitable[web.Response]]
    ) -> web.Response:
        """``action`` after the API key check and the batches' clock; errors as OpenAI's."""
        try:
            if bearer(request.headers.get("Authorization")) is None:
                raise no_api_key()
            self._advance_batches()
            return await action(request)
        except ApiError as error:
            await request.release()  # drain an unread upload, or the client waits on it
            headers = {**self._headers(), **error.headers}
            return web.json_response(error.body(), status=error.status, headers=headers)

    async def _files_create(self, request: web.Request) -> web.Response:
        """``POST /v1/files``: multipart ``file`` + ``purpose``; batch files are validated."""
        return await self._guarded(request, self._create_file)

    async def _files_content(self, request: web.Request) -> web.Response:
        """``GET /v1/files/{file_id}/content``: the file's bytes."""
        return await self._guarded(request, self._file_content)

    async def _batches_create(self, request: web.Request) -> web.Response:
        """``POST /v1/batches``: a Batch object in status "validating"."""
        return await self._guarded(request, self._create_batch)

    async def _batches_list(self, request: web.Request) -> web.Response:
        """``GET /v1/batches?limit=&after=``: a cursor page, newest first."""
        return await self._guarded(request, self._list_batches)

    async def _batches_retrieve(self, request: web.Request) -> web.Response:
        """``GET /v1/batches/{batch_id}``: the Batch object as of now."""
        return await self._guarded(request, self._retrieve_batch)

    async def _batches_cancel(self, request: web.Request) -> web.Response:
        """``POST /v1/batches/{batch_id}/cancel``: "cancelling", then "cancelled"."""
        return await self._guarded(request, self._cancel_batch)

    async def _create_file(self, request: web.Request) -> web.Response:
        filename, data, purpose = await read_upload(request)
        if purpose == "batch":
            if not filename.endswith(".jsonl"):
                raise ApiError(
                    400,
                    "Invalid file format for Batch API. Must be .jsonl",
                    param="file",
                    code="invalid_file_format",
                )
            parse_batch_file(data)
        file_object = self._files.store(data, filename, purpose)
        return web.json_response(file_object, headers=self._headers())

    async def _file_content(self, request: web.Request) -> web.Response:
        file_object = self._files.get(request.match_info["file_id"], "id")
        return web.Response(
            body=self.files[file_object["id"]],
            content_type="application/octet-stream",
            headers=self._headers(),
        )

    async def _create_batch(self, request: web.Request) -> web.Response:
        body: Any = None
        with contextlib.suppress(ValueError):
            body = json.loads(await request.read())
        if self.batch_create_hook is not None and isinstance(body, dict):
            await self.batch_create_hook(body)
        run = create_batch(
            body,
            self._files,
            self.batch_next_outcome,
            self.batch_fail_every,
            self.batch_duration_s,
        )
        self.batches[run.batch["id"]] = run.batch
        self._batch_runs[run.batch["id"]] = run
        return web.json_response(run.batch, headers=self._headers())

    def _run(self, batch_id: str) -> BatchRun:
        if batch_id not in self._batch_runs:
            raise not_found("Batch", batch_id, "batch_id")
        return self._batch_runs[batch_id]

    async def _retrieve_batch(self, request: web.Request) -> web.Response:
        run = self._run(request.match_info["batch_id"])
        return web.json_response(run.batch, headers=self._headers())

    async def _list_batches(self, request: web.Request) -> web.Response:
        listing = list_page(list(self._batch_runs.values()), request.query)
        return web.json_response(listing, headers=self._headers())

    async def _cancel_batch(self, request: web.Request) -> web.Response:
        run = self._run(request.match_info["batch_id"])
        run.cancel(self.batch_cancel_s)
        return web.json_response(run.batch, headers=self._headers())

    def _advance_batches(self) -> None:
        """Bring every batch's status up to date with its clock."""
        now = time.monotonic()
        for run in self._batch_runs.values():
            run.advance(now, self._files, self.usage_total)

    def _headers(self) -> dict[str, str]:
        """``x-request-id`` and the ``x-ratelimit-*`` headers for the limits' present state."""
        now = time.monotonic()
        headers = {
            "x-request-id": f"req_{uuid.uuid4().hex}",
            "openai-version": "2020-10-01",
            "openai-processing-ms": str(round(self.latency_s * 1000)),
        }
        limit, remaining, reset = UNLIMITED_REQUESTS, UNLIMITED_REQUESTS, 0.0
        if self._rps is not None:
            limit = int(self._rps.capacity)
            remaining = max(0, int(self._rps.capacity - self._rps.used(now)))
            reset = self._rps.reset_in(now)
        headers["x-ratelimit-limit-requests"] = str(limit)
        headers["x-ratelimit-remaining-requests"] = str(remaining)
        headers["x-ratelimit-reset-requests"] = format_duration(reset)
        headers["x-ratelimit-limit-tokens"] = str(UNLIMITED_TOKENS)
        headers["x-ratelimit-remaining-tokens"] = str(UNLIMITED_TOKENS)
        headers["x-ratelimit-reset-tokens"] = "0s"
        return headers
