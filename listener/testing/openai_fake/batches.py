"""The Batch API: a batch's input file, its requests, and its life by its clock.

See "Batch API" in the package docstring for the phases, outcomes and files. Sources: OpenAI
API reference, "Batch"; "Batch API" guide. There is no background task: the server advances
every batch (``BatchRun.advance``) before answering a request to the Files or Batch API.
"""

from __future__ import annotations

import json
import math
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from listener.testing.openai_fake.answers import chat_completion, finish
from listener.testing.openai_fake.chat import parse_chat
from listener.testing.openai_fake.errors import SERVER_ERROR_MESSAGE, ApiError, invalid
from listener.testing.openai_fake.files import FileStore

# Batch API ("Batch API" guide; API reference, "Files" and "Batch"): a 24 h completion
# window.
BATCH_ENDPOINT = "/v1/chat/completions"  # the only endpoint the fake can run
BATCH_OUTCOMES = frozenset({"completed", "failed", "expired", "cancelled"})
BATCH_WINDOW_S = 24 * 3600
# Where the "validating" and "in_progress" phases end, as fractions of batch_duration_s.
VALIDATING_UNTIL = 0.2
IN_PROGRESS_UNTIL = 0.8
BATCH_EXPIRED_ERROR = {
    "code": "batch_expired",
    "message": "This request could not be executed before the completion window expired.",
}
# Metadata (API reference, "Batch", metadata): at most 16 pairs, keys up to 64 characters,
# string values up to 512.
METADATA_MAX_PAIRS = 16
METADATA_MAX_KEY = 64
METADATA_MAX_VALUE = 512
BATCH_CANCELLED_ERROR = {
    "code": "batch_cancelled",
    "message": "This request was not executed because the batch was cancelled.",
}


@dataclass
class BatchLine:
    """One request of a batch input file, as validated at upload."""

    line: int  # 1-based line number in the file
    custom_id: str
    body: dict[str, Any]


@dataclass
class LineResult:
    """What running one batch request gave: a chat completion (200) or an error body."""

    custom_id: str
    status_code: int
    body: dict[str, Any]
    prompt_tokens: int = 0
    completion_tokens: int = 0

    @property
    def ok(self) -> bool:
        """True for a chat completion, which goes to the output file."""
        return self.status_code == 200


@dataclass
class BatchRun:
    """A created batch: its wire object (shared with ``FakeOpenAI.batches``) and its plan.

    ``results`` are computed at creation but only published (files, counts, usage) as the
    batch's clock advances; ``done_at_cancel`` is how many requests had run when it was
    cancelled.
    """

    batch: dict[str, Any]
    results: list[LineResult]
    outcome: str
    duration_s: float
    started: float  # time.monotonic() at creation
    created_at: float  # time.time() at creation
    cancel_requested: float | None = None  # time.monotonic() of the cancel
    cancel_requested_at: float = 0.0  # time.time() of the cancel
    cancel_s: float = 0.0  # how long it stays "cancelling"
    done_at_cancel: int = 0
    finished: bool = False

    def advance(self, now: float, files: FileStore, usage_total: dict[str, int]) -> None:
        """validating -> in_progress -> finalizing -> completed (or failed/expired/cancelled)."""
        if self.finished:
            return
        batch, results, total = self.batch, self.results, len(self.results)
        if self.cancel_requested is not None:
            if now - self.cancel_requested >= self.cancel_s:
                at = self.cancel_requested_at + self.cancel_s
                self._finish("cancelled", self.done_at_cancel, at, files, usage_total)
            return
        elapsed, duration = now - self.started, self.duration_s
        if self.outcome == "failed":
            if elapsed >= duration:
                self._fail()
            return
        if elapsed < VALIDATING_UNTIL * duration:
            return
        batch["status"] = "in_progress"
        if batch["in_progress_at"] is None:
            batch["in_progress_at"] = int(self.created_at + VALIDATING_UNTIL * duration)
        if self.outcome == "cancelled":  # stuck until cancelled
            batch["request_counts"] = request_counts([], total)
            return
        if self.outcome == "expired":
            half = total // 2
            if elapsed >= duration:
                self._finish("expired", half, self.created_at + duration, files, usage_total)
            else:
                progress = (elapsed - VALIDATING_UNTIL * duration) / (
                    (1 - VALIDATING_UNTIL) * duration
                )
                batch["request_counts"] = request_counts(results[: int(half * progress)], total)
            return
        if elapsed >= IN_PROGRESS_UNTIL * duration:
            batch["status"] = "finalizing"
            if batch["finalizing_at"] is None:
                batch["finalizing_at"] = int(self.created_at + IN_PROGRESS_UNTIL * duration)
            batch["request_counts"] = request_counts(results, total)
            if elapsed >= duration:
                self._finish("completed", total, self.created_at + duration, files, usage_total)
            return
        progress = (elapsed - VALIDATING_UNTIL * duration) / (
            (IN_PROGRESS_UNTIL - VALIDATING_UNTIL) * duration
        )
        batch["request_counts"] = request_counts(results[: int(total * progress)], total)

    def cancel(self, cancel_s: float) -> None:
        """Cancel: "validating"/"in_progress"/"finalizing" become "cancelling" for ``cancel_s``.

        Raises:
            ApiError: 409 for a batch "completed", "failed" or "expired".
        """
        batch = self.batch
        status = batch["status"]
        if status in ("completed", "failed", "expired"):
            raise ApiError(409, f"Cannot cancel a batch with status '{status}'.")
        if status in ("validating", "in_progress", "finalizing"):
            counts = batch["request_counts"]
            self.cancel_requested = time.monotonic()
            self.cancel_requested_at = time.time()
            self.cancel_s = max(0.0, cancel_s)
            self.done_at_cancel = counts["completed"] + counts["failed"]
            batch["status"] = "cancelling"
            batch["cancelling_at"] = int(self.cancel_requested_at)

    def _fail(self) -> None:
        """The "failed" outcome: no request runs, ``errors`` says why."""
        batch = self.batch
        model = batch["model"] or "the model"
        batch["status"] = "failed"
        batch["failed_at"] = int(self.created_at + self.duration_s)
        batch["errors"] = {
            "object": "list",
            "data": [
                {
                    "code": "token_limit_exceeded",
                    "message": f"Enqueued token limit reached for {model} in organization "
                    "org-fake. Limit: 90,000 enqueued tokens. Please try submitting this "
                    "batch again later.",
                    "param": None,
                    "line": None,
                }
            ],
        }
        self.finished = True

    def _finish(
        self, status: str, done: int, at: float, files: FileStore, usage_total: dict[str, int]
    ) -> None:
        """Write the output and error files of a batch whose first ``done`` requests ran."""
        batch, total = self.batch, len(self.results)
        ran = self.results[:done]
        outputs: list[dict[str, Any]] = []
        errors: list[dict[str, Any]] = []
        for result in ran:
            entry = {
                "id": f"batch_req_{uuid.uuid4().hex}",
                "custom_id": result.custom_id,
                "response": {
                    "status_code": result.status_code,
                    "request_id": f"req_{uuid.uuid4().hex}",
                    "body": result.body,
                },
                "error": None,
            }
            (outputs if result.ok else errors).append(entry)
        unrun_error = BATCH_EXPIRED_ERROR if status == "expired" else BATCH_CANCELLED_ERROR
        errors += [
            {
                "id": f"batch_req_{uuid.uuid4().hex}",
                "custom_id": result.custom_id,
                "response": None,
                "error": dict(unrun_error),
            }
            for result in self.results[done:]
        ]
        if outputs or status == "completed":
            output = files.store(jsonl(outputs), f"{batch['id']}_output.jsonl", "batch_output")
            batch["output_file_id"] = output["id"]
        if errors:
            error = files.store(jsonl(errors), f"{batch['id']}_error.jsonl", "batch_output")
            batch["error_file_id"] = error["id"]
        counts = request_counts(ran, total)
        counts["failed"] = total - counts["completed"]  # requests never run count as failed
        batch["request_counts"] = counts
        batch["usage"] = batch_usage(ran)
        usage_total["prompt_tokens"] += batch["usage"]["input_tokens"]
        usage_total["completion_tokens"] += batch["usage"]["output_tokens"]
        batch["status"] = status
        batch[f"{status}_at"] = int(at)
        self.finished = True


def line_error(line: int, message: str, code: str) -> ApiError:
    return ApiError(
        400, f"Invalid batch input file, line {line}: {message}", param="file", code=code
    )


def parse_batch_file(data: bytes) -> list[BatchLine]:
    """Validate a batch input file (JSONL of chat requests). Raises ``ApiError`` (400).

    Blank lines are skipped. Each other line must be a JSON object with a non-empty string
    ``custom_id`` unique in the file, ``method`` "POST", ``url`` "/v1/chat/completions" and
    an object ``body``; the bodies' ``model`` values must all be the same. The bodies are
    not validated further here: an invalid body fails as its own request (400 in the
    error file), as on the real API.
    """
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ApiError(
            400,
            "Invalid file format for Batch API: the file must be UTF-8 encoded JSONL.",
            param="file",
            code="invalid_file_format",
        ) from exc
    lines: list[BatchLine] = []
    seen: set[str] = set()
    model: str | None = None
    for number, raw in enumerate(text.split("\n"), start=1):
        if not raw.strip():
            continue
        try:
            item = json.loads(raw)
        except ValueError as exc:
            raise line_error(number, "the line is not valid JSON.", "invalid_json_line") from exc
        if not isinstance(item, dict):
            raise line_error(number, "expected a JSON object.", "invalid_json_line")
        custom_id = item.get("custom_id")
        if not isinstance(custom_id, str) or not custom_id:
            raise line_error(number, "'custom_id' must be a non-empty string.", "missing_custom_id")
        if custom_id in seen:
            raise line_error(
                number,
                f"The custom_id '{custom_id}' is a duplicate of another request. The "
                "custom_id parameter must be unique for each request in a batch.",
                "duplicate_custom_id",
            )
        method = item.get("method")
        if method != "POST":
            raise line_error(
                number, f"Invalid method {method!r}: only 'POST' is supported.", "invalid_method"
            )
        url = item.get("url")
        if url != BATCH_ENDPOINT:
            raise line_error(
                number,
                f"Invalid url {url!r}: this fake only supports '{BATCH_ENDPOINT}'.",
                "invalid_url",
            )
        body = item.get("body")
        if not isinstance(body, dict):
            raise line_error(number, "'body' must be a JSON object.", "invalid_body")
        body_model = body.get("model")
        if isinstance(body_model, str):
            if model is None:
                model = body_model
            elif body_model != model:
                raise line_error(
                    number,
                    f"The model '{body_model}' differs from the model '{model}' of the "
                    "earlier lines: a batch input file can only include requests to a "
                    "single model.",
                    "mismatched_model",
                )
        seen.add(custom_id)
        lines.append(BatchLine(number, custom_id, body))
    if not lines:
        raise ApiError(
            400,
            "The batch input file is empty: it must contain at least one request.",
            param="file",
            code="empty_file",
        )
    return lines


def run_batch_line(line: BatchLine, fail: bool) -> LineResult:
    """One batch request through the chat logic (no faults, overrides or rate limits)."""
    if fail:
        error = ApiError(500, SERVER_ERROR_MESSAGE, type_="server_error")
        return LineResult(line.custom_id, 500, error.body())
    try:
        chat = parse_chat(line.body)
        content, finish_reason = finish(chat, None)
    except ApiError as error:
        return LineResult(line.custom_id, error.status, error.body())
    prompt_tokens = chat.prompt_tokens
    completion_tokens = math.ceil(len(content or "") / 4)
    body = chat_completion(chat, content, finish_reason, prompt_tokens, completion_tokens)
    return LineResult(line.custom_id, 200, body, prompt_tokens, completion_tokens)


def _json_type(value: Any) -> str:
    """How OpenAI's validation names a JSON value's type ("an integer", "null"...)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a number"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "an object"
    return "a string"


def check_metadata(metadata: Any) -> dict[str, str] | None:
    """A request's ``metadata`` as OpenAI validates it: ``null``, or an object of at most 16
    string values, keys up to 64 and values up to 512 characters. Raises ``ApiError`` (400
    ``invalid_request_error``, ``param`` the offending field, as the real API does)."""
    if metadata is None:
        return None
    if not isinstance(metadata, dict):
        raise invalid(
            f"Invalid type for 'metadata': expected a metadata object, but got "
            f"{_json_type(metadata)} instead.",
            "metadata",
            "invalid_type",
        )
    if len(metadata) > METADATA_MAX_PAIRS:
        raise invalid(
            "Invalid 'metadata': too many properties. Expected an object with at most "
            f"{METADATA_MAX_PAIRS} properties, but got an object with {len(metadata)} "
            "properties instead.",
            "metadata",
            "object_above_max_properties",
        )
    for key, value in metadata.items():
        if len(key) > METADATA_MAX_KEY:
            raise invalid(
                f"Invalid property name in 'metadata': '{key}' is too long. Expected a string "
                f"with maximum length {METADATA_MAX_KEY}, but got a string with length "
                f"{len(key)} instead.",
                f"metadata.{key}",
                "string_above_max_length",
            )
        if not isinstance(value, str):
            raise invalid(
                f"Invalid type for 'metadata.{key}': expected a string, but got "
                f"{_json_type(value)} instead.",
                f"metadata.{key}",
                "invalid_type",
            )
        if len(value) > METADATA_MAX_VALUE:
            raise invalid(
                f"Invalid 'metadata.{key}': string too long. Expected a string with maximum "
                f"length {METADATA_MAX_VALUE}, but got a string with length {len(value)} "
                "instead.",
                f"metadata.{key}",
                "string_above_max_length",
            )
    return dict(metadata)


def request_counts(results: Sequence[LineResult], total: int) -> dict[str, int]:
    """``request_counts`` once ``results`` have run, out of ``total``."""
    completed = sum(1 for result in results if result.ok)
    return {"total": total, "completed": completed, "failed": len(results) - completed}


def batch_usage(results: Sequence[LineResult]) -> dict[str, Any]:
    """A batch's ``usage`` (Batch object, Responses-style names) over its successes."""
    input_tokens = sum(result.prompt_tokens for result in results if result.ok)
    output_tokens = sum(result.completion_tokens for result in results if result.ok)
    return {
        "input_tokens": input_tokens,
        "input_tokens_details": {"cached_tokens": 0},
        "output_tokens": output_tokens,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": input_tokens + output_tokens,
    }


def jsonl(entries: Sequence[dict[str, Any]]) -> bytes:
    return "".join(json.dumps(entry) + "\n" for entry in entries).encode()


def create_batch(
    body: Any,
    files: FileStore,
    outcomes: list[str],
    fail_every: int | None,
    duration_s: float,
) -> BatchRun:
    """A batch for a ``POST /v1/batches`` body, in status "validating".

    Its requests run at once (``fail_every``: every Nth fails with 500); they are published
    as the batch's clock advances. The outcome is popped from ``outcomes`` ("completed" when
    empty) once the request is valid.

    Raises:
        ApiError: 400 for an invalid body, input file or input line, 404 for an unknown
            input file, 500 for an unknown outcome.
    """
    if not isinstance(body, dict):
        raise ApiError(
            400,
            "We could not parse the JSON body of your request. (HINT: This likely means "
            "you aren't using your HTTP library correctly. The OpenAI API expects a JSON "
            "payload.)",
        )
    for name in ("input_file_id", "endpoint", "completion_window"):
        if body.get(name) is None:
            raise invalid(
                f"Missing required parameter: '{name}'.", name, "missing_required_parameter"
            )
    endpoint = body["endpoint"]
    if endpoint != BATCH_ENDPOINT:
        raise invalid(
            f"Unsupported endpoint '{endpoint}': the fake only runs '{BATCH_ENDPOINT}'.",
            "endpoint",
        )
    if body["completion_window"] != "24h":
        raise invalid(
            f"Invalid value: '{body['completion_window']}'. Supported values are: '24h'.",
            "completion_window",
        )
    metadata = check_metadata(body.get("metadata"))
    input_file = files.get(str(body["input_file_id"]), "input_file_id")
    if input_file["purpose"] != "batch":
        raise invalid(
            f"The input file {input_file['id']} has purpose '{input_file['purpose']}'; "
            "a batch input file must be uploaded with purpose 'batch'.",
            "input_file_id",
        )
    lines = parse_batch_file(files.contents[input_file["id"]])
    outcome = outcomes.pop(0) if outcomes else "completed"
    if outcome not in BATCH_OUTCOMES:
        raise ApiError(
            500,
            f"FakeOpenAI: unknown batch outcome {outcome!r} in batch_next_outcome.",
            type_="server_error",
        )
    results = [
        run_batch_line(line, fail_every is not None and fail_every > 0 and index % fail_every == 0)
        for index, line in enumerate(lines, start=1)
    ]
    models = [line.body["model"] for line in lines if isinstance(line.body.get("model"), str)]
    created_wall = time.time()
    created_at = int(created_wall)
    batch: dict[str, Any] = {
        "id": f"batch_{uuid.uuid4().hex}",
        "object": "batch",
        "endpoint": endpoint,
        "model": models[0] if models else None,
        "errors": None,
        "input_file_id": input_file["id"],
        "completion_window": "24h",
        "status": "validating",
        "output_file_id": None,
        "error_file_id": None,
        "created_at": created_at,
        "in_progress_at": None,
        "expires_at": created_at + BATCH_WINDOW_S,
        "finalizing_at": None,
        "completed_at": None,
        "failed_at": None,
        "expired_at": None,
        "cancelling_at": None,
        "cancelled_at": None,
        "request_counts": {"total": 0, "completed": 0, "failed": 0},
        "usage": None,
        "metadata": metadata,
    }
    return BatchRun(
        batch=batch,
        results=results,
        outcome=outcome,
        duration_s=max(0.0, duration_s),
        started=time.monotonic(),
        created_at=created_wall,
    )


def list_page(runs: Sequence[BatchRun], query: Mapping[str, str]) -> dict[str, Any]:
    """``GET /v1/batches?limit=&after=``: a cursor page of ``runs``' batches, newest first.

    ``runs`` are in creation order. Raises ``ApiError`` (400) for a bad ``limit`` or ``after``.
    """
    raw_limit = query.get("limit", "20")
    try:
        limit = int(raw_limit)
    except ValueError:
        limit = 0
    if not 1 <= limit <= 100:
        raise invalid(
            f"Invalid 'limit': '{raw_limit}'. Expected an integer between 1 and 100.",
            "limit",
        )
    newest_first = [run.batch for run in reversed(runs)]
    start = 0
    after = query.get("after")
    if after is not None:
        ids = [batch["id"] for batch in newest_first]
        if after not in ids:
            raise invalid(f"Invalid 'after': no batch {after}.", "after")
        start = ids.index(after) + 1
    page = newest_first[start : start + limit]
    return {
        "object": "list",
        "data": page,
        "first_id": page[0]["id"] if page else None,
        "last_id": page[-1]["id"] if page else None,
        "has_more": start + limit < len(newest_first),
    }
