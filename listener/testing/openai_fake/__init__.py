"""A fake OpenAI Chat Completions API: a real aiohttp server the real ``openai`` SDK talks to.

Usage in a test::

    async with FakeOpenAI(rps_limit=10) as fake:
        client = openai.AsyncOpenAI(base_url=fake.base_url, api_key="sk-test", max_retries=0)
        fake.faults.append(Fault(429, retry_after_s=2))
        ...

As a separate process (``listener demo``, or a daemon under test in your CI)::

    python -m listener.testing.openai_fake --port 0 --rps 10   # "READY http://127.0.0.1:N/v1"

then point the SDK (``OpenAI(base_url=...)``) or listener (``LISTENER_OPENAI__BASE_URL``) at
the printed URL, with any non-empty API key.

``POST /v1/chat/completions`` answers in OpenAI's wire format (API reference, "Create chat
completion"; "Structured Outputs" guide; "Error codes" guide; "Rate limits" guide):

- Order of checks: scripted ``faults`` first (one popped per request), then the
  ``Authorization: Bearer`` header (401 ``invalid_api_key``), then the body (400
  ``invalid_request_error``; undecodable data-URL images: 400 ``invalid_image``), then the
  rate limits (429 ``rate_limit_exceeded``, counted in ``violations``), then the answer.
- ``response_format: {"type": "json_schema", ...}``: the content is a JSON object that
  validates against the schema (see ``answers.SchemaFaker`` for the keywords understood);
  ``json_object`` is not supported (400); without ``response_format`` the answer is a line
  of text. Values are
  a deterministic function of the images (or, with no image, of the text): the same image
  gives the same answer whatever the prompt says.
- Usage: ``prompt_tokens`` = ceil(characters of all text / 4) + ``image_tokens`` per image;
  ``completion_tokens`` = ceil(len(content) / 4).
- Every answer, errors included, carries ``x-request-id`` and the ``x-ratelimit-*`` headers.

The request rate limit is enforced over a sliding window of 1 s (not a minute as on the real
API, so tests stay short). The ``x-ratelimit-limit-requests`` header is therefore "per second"
here; ``reset`` is the time until the window is empty again; the token headers always report
an unlimited budget. Only admitted requests take room in the window; rejected and faulted ones
do not. A limit's 429 carries ``retry-after`` (seconds, fractional: the SDK accepts floats)
and ``retry-after-ms``; a scripted ``Fault`` carries ``retry-after`` only, and only when
``retry_after_s`` is set.

Batch API (API reference, "Files" and "Batch"; "Batch API" guide), for chat completions only:

- ``POST /v1/files`` (multipart ``file`` + ``purpose``) answers a File object (``file-...``,
  status "processed"). A ``purpose=batch`` file must be named ``*.jsonl`` and hold at least
  one line, each a JSON object with a unique non-empty ``custom_id``, ``method`` "POST",
  ``url`` "/v1/chat/completions", an object ``body``, and one ``model`` for the whole file.
  Any breach is a 400 at upload (the real API reports most of these later, as a "failed"
  batch), with ``code`` one of ``invalid_file_format``, ``invalid_json_line``,
  ``missing_custom_id``, ``duplicate_custom_id``, ``invalid_method``, ``invalid_url``,
  ``invalid_body``, ``mismatched_model``, ``empty_file``; the message names the line. Bodies
  are not validated at upload: an invalid one fails as its own request (400 in the error
  file). The service's size limits (50,000 requests, 200 MB) are not enforced.
- ``GET /v1/files/{id}/content`` (the raw bytes), for uploaded files and the output/error
  files batches write (purpose ``batch_output``).
- ``POST /v1/batches`` answers a Batch object in status "validating" with total 0. Its
  ``metadata`` (null, or at most 16 pairs: keys up to 64 characters, string values up to 512)
  is validated as the API does: 400 ``invalid_request_error`` with ``param`` the field
  (``metadata`` or ``metadata.<key>``) and ``code`` ``object_above_max_properties``,
  ``string_above_max_length`` or ``invalid_type``; the Batch object carries it back, in
  every answer and listing. ``batch_create_hook`` runs before the batch exists. ``GET
  /v1/batches/{id}``, ``GET /v1/batches`` (newest first, ``limit``/``after``) and ``POST
  /v1/batches/{id}/cancel`` read it as of now: there is no background task, each request
  to these endpoints advances every batch by its clock. With d = ``batch_duration_s`` as
  it was at creation: "validating" until 0.2 d, "in_progress" until 0.8 d (total set,
  completed/failed counting up), "finalizing" until d, then "completed". Timestamps are
  creation time plus those offsets.
- Each batch takes the next ``batch_next_outcome`` at creation (default "completed"):
  "failed" stays "validating" until d, then "failed" with ``errors.data`` =
  [{code "token_limit_exceeded", message, param, line}], no files, no usage; "expired"
  goes "in_progress" and at d "expired": the first total // 2 requests ran (output file,
  plus error-file lines for those that failed), the others are in the error file as
  ``{"response": null, "error": {"code": "batch_expired", "message": ...}}`` (the guide's
  format); "cancelled" stays "in_progress" with nothing done until someone cancels it.
- Requests run through the chat logic above (same content for the same body, same usage)
  without faults, ``finish_reason_override`` or rate limits. Those at positions N, 2N, ...
  for ``batch_fail_every`` = N (read at creation) fail with 500 ``server_error``. Output
  lines are ``{"id": "batch_req_...", "custom_id", "response": {"status_code": 200,
  "request_id", "body": <chat.completion>}, "error": null}``; failed requests go to the
  error file in the same shape with their error status and ``{"error": {...}}`` body.
  Lines keep input order.
  The output file exists once a batch completes (even if empty) or when any request
  succeeded; the error file only when it has lines.
- At the end, ``request_counts`` = {total, completed: successes, failed: total -
  completed} (expired and cancelled requests count as failed), ``usage`` (Batch object,
  input/output tokens) is set and the tokens are added to ``usage_total``.
- Cancel: "validating"/"in_progress"/"finalizing" become "cancelling", then after
  ``batch_cancel_s`` "cancelled": the requests done when cancelled are in the files, the
  rest in the error file with code ``batch_cancelled``. Cancelling a "cancelling" or
  "cancelled" batch answers it unchanged; a "completed", "failed" or "expired" one is a 409.
- Unknown ids are 404 ``No such File object: ...`` / ``No such Batch object: ...``;
  every endpoint wants the bearer key (401 as for chat).

Modules: ``server`` (``FakeOpenAI``: routes, knobs, records, headers), ``chat`` (a request,
validated), ``answers`` (deterministic content, ``chat.completion`` objects), ``files`` and
``batches`` (the Files and Batch APIs), ``limits`` (the sliding window, header durations),
``errors`` (OpenAI's error format, ``Fault``), ``process`` (``python -m``).
"""

from __future__ import annotations

from listener.testing.openai_fake.batches import (
    BATCH_CANCELLED_ERROR,
    BATCH_ENDPOINT,
    BATCH_EXPIRED_ERROR,
    BATCH_OUTCOMES,
    BATCH_WINDOW_S,
    IN_PROGRESS_UNTIL,
    VALIDATING_UNTIL,
)
from listener.testing.openai_fake.chat import (
    ASSUMED_URL_IMAGE_SIZE,
    DETAILS,
    MESSAGE_ROLES,
    SCHEMA_NAME,
    SUPPORTED_IMAGE_FORMATS,
    image_tokens,
)
from listener.testing.openai_fake.errors import SERVER_ERROR_MESSAGE, Fault
from listener.testing.openai_fake.files import BATCH_FILE_TTL_S
from listener.testing.openai_fake.limits import (
    UNLIMITED_REQUESTS,
    UNLIMITED_TOKENS,
    format_duration,
)
from listener.testing.openai_fake.process import main
from listener.testing.openai_fake.server import MAX_BODY_BYTES, FakeOpenAI

__all__ = [
    "ASSUMED_URL_IMAGE_SIZE",
    "BATCH_CANCELLED_ERROR",
    "BATCH_ENDPOINT",
    "BATCH_EXPIRED_ERROR",
    "BATCH_FILE_TTL_S",
    "BATCH_OUTCOMES",
    "BATCH_WINDOW_S",
    "DETAILS",
    "IN_PROGRESS_UNTIL",
    "MAX_BODY_BYTES",
    "MESSAGE_ROLES",
    "SCHEMA_NAME",
    "SERVER_ERROR_MESSAGE",
    "SUPPORTED_IMAGE_FORMATS",
    "UNLIMITED_REQUESTS",
    "UNLIMITED_TOKENS",
    "VALIDATING_UNTIL",
    "FakeOpenAI",
    "Fault",
    "format_duration",
    "image_tokens",
    "main",
]
