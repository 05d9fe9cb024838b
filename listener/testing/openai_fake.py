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
  validates against the schema (see ``_SchemaFaker`` for the keywords understood);
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
- ``POST /v1/batches`` answers a Batch object in status "validating" with total 0; ``GET
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
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import binascii
import contextlib
import hashlib
import io
import json
import math
import re
import signal
import sys
import time
import uuid
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, cast

from aiohttp import BodyPartReader, web
from PIL import Image, ImageStat

# Real API: "up to 50 MB total payload size per request" (Images and vision guide).
MAX_BODY_BYTES = 50 * 1024 * 1024
# Reported in the x-ratelimit-* headers when there is no limit.
UNLIMITED_REQUESTS = 1_000_000
UNLIMITED_TOKENS = 100_000_000
# The size the fake assumes for an http(s) image, which it never fetches.
ASSUMED_URL_IMAGE_SIZE = (1024, 1024)
SUPPORTED_IMAGE_FORMATS = frozenset({"PNG", "JPEG", "GIF", "WEBP"})
MESSAGE_ROLES = frozenset({"system", "developer", "user", "assistant", "tool", "function"})
DETAILS = frozenset({"low", "high", "auto"})
SCHEMA_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
SERVER_ERROR_MESSAGE = "The server had an error while processing your request. Sorry about that!"

# Batch API ("Batch API" guide; API reference, "Files" and "Batch"): a 24 h completion
# window, batch files kept 30 days.
BATCH_ENDPOINT = "/v1/chat/completions"  # the only endpoint the fake can run
BATCH_OUTCOMES = frozenset({"completed", "failed", "expired", "cancelled"})
BATCH_WINDOW_S = 24 * 3600
BATCH_FILE_TTL_S = 30 * 24 * 3600
# Where the "validating" and "in_progress" phases end, as fractions of batch_duration_s.
VALIDATING_UNTIL = 0.2
IN_PROGRESS_UNTIL = 0.8
BATCH_EXPIRED_ERROR = {
    "code": "batch_expired",
    "message": "This request could not be executed before the completion window expired.",
}
BATCH_CANCELLED_ERROR = {
    "code": "batch_cancelled",
    "message": "This request was not executed because the batch was cancelled.",
}


@dataclass
class Fault:
    """One scripted failure; ``FakeOpenAI.faults`` is consumed FIFO, one per chat request.

    Attributes:
        status: HTTP status to answer: 429, 500, 503, 400, 401, ...
        code: the error body's ``code``. None picks the usual one for the status:
            429 ``rate_limit_exceeded``, 401 ``invalid_api_key``, others null. With
            ``insufficient_quota`` the body's ``type`` is ``insufficient_quota`` too.
        retry_after_s: when set, sent as the ``retry-after`` header (seconds).
        message: the error body's ``message``; empty picks a realistic default.
    """

    status: int
    code: str | None = None
    retry_after_s: float | None = None
    message: str = ""


class _ApiError(Exception):
    """An answer in OpenAI's error format: ``{"error": {message, type, param, code}}``."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type_: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type_
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        """The JSON body of the answer."""
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }


# --- pure helpers -----------------------------------------------------------------------


def image_tokens(width: int, height: int, detail: str) -> int:
    """Prompt tokens of one image for GPT-4o-class models (gpt-4o, gpt-4-turbo, gpt-4.5, o1).

    Source: OpenAI "Images and vision" guide, "Calculating costs": ``detail: low`` costs 85
    tokens. ``high`` images are scaled to fit within a 2048 x 2048 square (keeping the aspect
    ratio), then scaled so that the shortest side is 768 px; each 512 px tile of the result
    costs 170 tokens, plus 85. The guide's examples: 1024 x 1024 high = 765 and
    2048 x 4096 high = 1105. Images are only ever scaled down (a 128 x 64 image is one tile,
    as measured on the real API). ``auto`` is counted as ``high``, the worst case.
    """
    if detail == "low":
        return 85
    w, h = float(width), float(height)
    if max(w, h) > 2048:
        scale = 2048 / max(w, h)
        w, h = round(w * scale), round(h * scale)
    if min(w, h) > 768:
        scale = 768 / min(w, h)
        w, h = round(w * scale), round(h * scale)
    tiles = math.ceil(w / 512) * math.ceil(h / 512)
    return 85 + 170 * tiles


def format_duration(seconds: float) -> str:
    """``seconds`` as OpenAI's reset headers write it (Go ``time.Duration``): "120ms", "6m0s".

    Rounded up to the millisecond so that waiting the announced time is always enough.
    """
    ms = max(0, math.ceil(seconds * 1000 - 1e-6))
    if ms == 0:
        return "0s"
    if ms < 1000:
        return f"{ms}ms"
    hours, rest = divmod(ms, 3_600_000)
    minutes, rest = divmod(rest, 60_000)
    secs = f"{rest / 1000:.3f}".rstrip("0").rstrip(".")
    if hours:
        return f"{hours}h{minutes}m{secs}s"
    if minutes:
        return f"{minutes}m{secs}s"
    return f"{secs}s"


def _format_seconds(seconds: float) -> str:
    """A ``retry-after`` value: whole seconds as an integer, else up to 3 decimals."""
    if float(seconds).is_integer():
        return str(int(seconds))
    return f"{seconds:.3f}".rstrip("0").rstrip(".")


def _bearer(header: str | None) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` header, None if absent or empty."""
    if not header:
        return None
    scheme, _, token = header.partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        return None
    return token


class _SlidingWindow:
    """Amounts admitted at monotonic times, forgotten ``length_s`` seconds later."""

    def __init__(self, length_s: float, capacity: float) -> None:
        self.length_s = length_s
        self.capacity = capacity
        self._entries: deque[tuple[float, float]] = deque()

    def _expire(self, now: float) -> None:
        while self._entries and self._entries[0][0] <= now - self.length_s:
            self._entries.popleft()

    def used(self, now: float) -> float:
        """The sum of the amounts admitted during the last ``length_s`` seconds."""
        self._expire(now)
        return sum(amount for _, amount in self._entries)

    def add(self, now: float, amount: float) -> None:
        """Record ``amount`` admitted at ``now``."""
        self._entries.append((now, amount))

    def wait_for(self, now: float, amount: float) -> float:
        """Seconds until ``amount`` more fits; ``math.inf`` if it never can."""
        if amount > self.capacity:
            return math.inf
        excess = self.used(now) + amount - self.capacity
        for at, admitted in self._entries:
            if excess <= 0:
                break
            excess -= admitted
            if excess <= 0:
                return at + self.length_s - now
        return 0.0

    def reset_in(self, now: float) -> float:
        """Seconds until the window is empty again (the headers' "reset" meaning)."""
        self._expire(now)
        if not self._entries:
            return 0.0
        return self._entries[-1][0] + self.length_s - now


# --- the request ------------------------------------------------------------------------


@dataclass
class _Image:
    """One ``image_url`` part: what identifies it, its size and how it is billed."""

    key: bytes  # the decoded bytes of a data URL, or the URL itself
    width: int
    height: int
    detail: str
    luminance: tuple[float, float] | None  # (mean, stddev) of the pixels; None if not decoded


@dataclass
class _Chat:
    """The parts of a valid chat request the fake's answer depends on."""

    model: str
    text_chars: int
    images: list[_Image]
    text: str
    response_format: dict[str, Any] | None
    max_tokens: int | None

    @property
    def prompt_tokens(self) -> int:
        """ceil(text characters / 4) plus each image's ``image_tokens``."""
        return math.ceil(self.text_chars / 4) + sum(
            image_tokens(image.width, image.height, image.detail) for image in self.images
        )

    @property
    def seed(self) -> bytes:
        """A digest of the images (of the text when there is none): answers derive from it."""
        digest = hashlib.sha256()
        if self.images:
            for image in self.images:
                digest.update(hashlib.sha256(image.key).digest())
        else:
            digest.update(self.text.encode())
        return digest.digest()


def _invalid(message: str, param: str | None, code: str | None = "invalid_value") -> _ApiError:
    return _ApiError(400, message, param=param, code=code)


def _decode_image(url: str, param: str) -> tuple[bytes, int, int, tuple[float, float] | None]:
    """Key, width, height and luminance of an ``image_url``: data URLs are decoded.

    Raises:
        _ApiError: 400 ``invalid_image`` (undecodable or unsupported data URL) or
            ``invalid_image_url`` (neither http(s) nor data).
    """
    if url.startswith(("https://", "http://")):
        width, height = ASSUMED_URL_IMAGE_SIZE
        return url.encode(), width, height, None
    if not url.startswith("data:"):
        raise _invalid(
            "Invalid image URL: expected an http(s) URL or a base64 data URL.",
            param,
            "invalid_image_url",
        )
    header, sep, payload = url.partition(",")
    bad = _invalid(
        "You uploaded an unsupported image. Please make sure your image is valid "
        "(PNG, JPEG, WEBP or non-animated GIF).",
        param,
        "invalid_image",
    )
    if not sep or not header.endswith(";base64"):
        raise bad
    try:
        data = base64.b64decode(payload, validate=True)
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            if image.format not in SUPPORTED_IMAGE_FORMATS:
                raise bad
            stat = ImageStat.Stat(image.convert("L"))
            return data, image.width, image.height, (stat.mean[0], stat.stddev[0])
    except (binascii.Error, ValueError, OSError, Image.DecompressionBombError) as exc:
        raise bad from exc


def _parse_content(content: Any, role: str, where: str, texts: list[str]) -> list[_Image]:
    """Collect a message's text into ``texts``; return its images. Raises ``_ApiError``."""
    if content is None:
        if role in ("assistant", "function"):
            return []
        raise _invalid(f"Invalid value for '{where}': expected a string or an array.", where)
    if isinstance(content, str):
        texts.append(content)
        return []
    if not isinstance(content, list):
        raise _invalid(
            f"Invalid type for '{where}': expected a string or an array.", where, "invalid_type"
        )
    images = []
    for j, part in enumerate(content):
        at = f"{where}[{j}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text":
            if not isinstance(part.get("text"), str):
                raise _invalid(f"Missing required parameter: '{at}.text'.", f"{at}.text")
            texts.append(part["text"])
        elif kind == "image_url":
            if role != "user":
                raise _invalid(
                    f"Invalid '{at}': image_url parts are only allowed for messages with "
                    "role 'user'.",
                    at,
                )
            spec = part.get("image_url")
            if not isinstance(spec, dict) or not isinstance(spec.get("url"), str):
                raise _invalid(
                    f"Missing required parameter: '{at}.image_url.url'.",
                    f"{at}.image_url.url",
                    "missing_required_parameter",
                )
            detail = spec.get("detail", "auto")
            if detail not in DETAILS:
                raise _invalid(
                    f"Invalid value: '{detail}'. Supported values are: 'low', 'high', and 'auto'.",
                    f"{at}.image_url.detail",
                )
            key, width, height, luminance = _decode_image(spec["url"], f"{at}.image_url.url")
            images.append(_Image(key, width, height, detail, luminance))
        else:
            raise _invalid(f"Invalid value: '{kind}'. Supported values are: 'text', ...", at)
    return images


def _subschemas(schema: dict[str, Any]) -> list[Any]:
    """The schemas directly nested in ``schema``."""
    nested: list[Any] = []
    for key in ("properties", "$defs", "definitions"):
        if isinstance(schema.get(key), dict):
            nested += schema[key].values()
    for key in ("anyOf", "oneOf", "allOf", "prefixItems"):
        if isinstance(schema.get(key), list):
            nested += schema[key]
    for key in ("items", "additionalProperties"):
        if isinstance(schema.get(key), dict):
            nested.append(schema[key])
    return nested


def _check_strict(schema: Any, where: str) -> None:
    """Raise 400 if ``schema`` breaks the Structured Outputs strict-mode rules on objects.

    Source: "Structured Outputs" guide, "Supported schemas": ``additionalProperties: false``
    must always be set in objects, and all fields must be ``required``.
    """
    if not isinstance(schema, dict):
        return
    properties = schema.get("properties")
    if schema.get("type") == "object" or isinstance(properties, dict):
        if schema.get("additionalProperties") is not False:
            raise _invalid(
                f"Invalid schema for response_format '{where}': In context=(), "
                "'additionalProperties' is required to be supplied and to be false.",
                "response_format",
                None,
            )
        required = schema.get("required", [])
        missing = [key for key in properties or {} if key not in required]
        if missing:
            raise _invalid(
                f"Invalid schema for response_format '{where}': In context=(), 'required' is "
                "required to be supplied and to be an array including every key in "
                f"properties. Missing '{missing[0]}'.",
                "response_format",
                None,
            )
    for sub in _subschemas(schema):
        _check_strict(sub, where)


def _parse_response_format(value: Any) -> dict[str, Any] | None:
    """Validate ``response_format``; return it (None for plain text). Raises ``_ApiError``."""
    if value is None:
        return None
    kind = value.get("type") if isinstance(value, dict) else None
    if kind == "text":
        return None
    if kind != "json_schema":
        raise _invalid(
            f"Invalid value: '{kind}'. The fake supports 'text' and 'json_schema'.",
            "response_format.type",
        )
    spec = value.get("json_schema")
    if not isinstance(spec, dict):
        raise _invalid(
            "Missing required parameter: 'response_format.json_schema'.",
            "response_format.json_schema",
            "missing_required_parameter",
        )
    name = spec.get("name")
    if not isinstance(name, str) or not SCHEMA_NAME.match(name):
        raise _invalid(
            "Invalid 'response_format.json_schema.name': expected 1-64 characters of "
            "a-z, A-Z, 0-9, '_' and '-'.",
            "response_format.json_schema.name",
        )
    schema = spec.get("schema", {})
    if not isinstance(schema, dict):
        raise _invalid(
            "Invalid type for 'response_format.json_schema.schema': expected an object.",
            "response_format.json_schema.schema",
            "invalid_type",
        )
    if spec.get("strict"):
        if schema.get("type") != "object":
            raise _invalid(
                f"Invalid schema for response_format '{name}': schema must be a JSON Schema "
                "of 'type: \"object\"'.",
                "response_format",
                None,
            )
        _check_strict(schema, name)
    return cast(dict[str, Any], value)


def _parse_chat(body: Any) -> _Chat:
    """Validate a chat completions request body. Raises ``_ApiError`` (400)."""
    if not isinstance(body, dict):
        raise _ApiError(
            400,
            "We could not parse the JSON body of your request. (HINT: This likely means you "
            "aren't using your HTTP library correctly. The OpenAI API expects a JSON payload.)",
        )
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise _ApiError(400, "you must provide a model parameter")
    messages = body.get("messages")
    if messages is None:
        raise _invalid(
            "Missing required parameter: 'messages'.", "messages", "missing_required_parameter"
        )
    if not isinstance(messages, list):
        raise _invalid(
            "Invalid type for 'messages': expected an array.", "messages", "invalid_type"
        )
    if not messages:
        raise _invalid(
            "Invalid 'messages': empty array. Expected an array with minimum length 1, but got "
            "an empty array instead.",
            "messages",
            "empty_array",
        )
    texts: list[str] = []
    images: list[_Image] = []
    for i, message in enumerate(messages):
        role = message.get("role") if isinstance(message, dict) else None
        if role not in MESSAGE_ROLES:
            raise _invalid(
                f"Invalid value for 'messages[{i}].role': '{role}'.", f"messages[{i}].role"
            )
        images += _parse_content(message.get("content"), role, f"messages[{i}].content", texts)
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    if max_tokens is not None and (not isinstance(max_tokens, int) or max_tokens < 1):
        raise _invalid("Invalid 'max_completion_tokens': expected an integer >= 1.", "max_tokens")
    return _Chat(
        model=model,
        text_chars=sum(len(text) for text in texts),
        images=images,
        text="\n".join(texts),
        response_format=_parse_response_format(body.get("response_format")),
        max_tokens=max_tokens,
    )


# --- the answer -------------------------------------------------------------------------


class _SchemaFaker:
    """Deterministic JSON values that validate against a (strict-mode) JSON Schema.

    Understood: what pydantic models generate for Structured Outputs: ``type`` (one or a
    list), ``properties``, ``items``, ``enum``, ``anyOf`` (one branch picked), ``$ref`` to
    local JSON pointers (``#/$defs/X``, ``#``), ``minimum`` / ``maximum``, ``minItems`` /
    ``maxItems``. Other keywords (``format``, ``pattern``, string lengths) are ignored.

    Every choice is a hash of the seed (the images) and the value's path, so the same image
    gets the same answer. Strings read "<field> of image <8 hex digits>"; arrays have 1-3
    items (within minItems/maxItems); integers without bounds fall in 0..100, numbers in 0..1.
    An integer or number whose field name contains "quality" and that has both bounds is
    derived from the first decoded image instead: score = (contrast + exposure) / 2 where
    contrast = min(1, luminance stddev / 64) and exposure = 1 - |mean - 128| / 128, mapped
    linearly onto [minimum, maximum]; flat or badly exposed images score low.
    Recursive schemas end at ``max_depth``: optional values become null, arrays minItems.
    """

    def __init__(
        self,
        root: dict[str, Any],
        seed: bytes,
        quality: float | None,
        max_depth: int = 8,
    ) -> None:
        self.root = root
        self.seed = seed
        self.short = seed.hex()[:8]
        self.quality = quality
        self.max_depth = max_depth

    def _hash(self, path: str) -> int:
        return int.from_bytes(hashlib.sha256(self.seed + path.encode()).digest()[:8], "big")

    def _resolve(self, ref: str) -> dict[str, Any]:
        if not ref.startswith("#"):
            raise _invalid(f"Only local $ref are supported, got '{ref}'.", "response_format", None)
        node: Any = self.root
        for token in [t for t in ref[1:].split("/") if t]:
            token = token.replace("~1", "/").replace("~0", "~")
            if not isinstance(node, dict) or token not in node:
                raise _invalid(f"Unresolvable $ref '{ref}'.", "response_format", None)
            node = node[token]
        return cast(dict[str, Any], node)

    def value(
        self, schema: dict[str, Any], path: str = "$", name: str = "value", depth: int = 0
    ) -> Any:
        """A value for ``schema`` at ``path`` (``name``: the nearest property name)."""
        if depth > 8 * self.max_depth:
            raise _invalid("The schema nests too deeply to answer.", "response_format", None)
        deep = depth >= self.max_depth
        if "$ref" in schema:
            merged = {**self._resolve(schema["$ref"]), **schema}
            del merged["$ref"]
            return self.value(merged, path, name, depth + 1)
        if "enum" in schema:
            return schema["enum"][self._hash(path) % len(schema["enum"])]
        if "anyOf" in schema:
            branches = schema["anyOf"]
            nulls = [b for b in branches if b.get("type") == "null"]
            chosen = nulls[0] if deep and nulls else branches[self._hash(path) % len(branches)]
            return self.value(chosen, path, name, depth + 1)
        kind = schema.get("type")
        if isinstance(kind, list):
            kind = (
                "null" if deep and "null" in kind else kind[self._hash(path + "|type") % len(kind)]
            )
        if kind is None:
            kind = (
                "object" if "properties" in schema else "array" if "items" in schema else "string"
            )
        h = self._hash(path)
        if kind == "object":
            properties = schema.get("properties", {})
            return {
                key: self.value(sub, f"{path}.{key}", key, depth + 1)
                for key, sub in properties.items()
            }
        if kind == "array":
            low = int(schema.get("minItems", 0))
            high = int(schema.get("maxItems", max(low, 3)))
            count = low if deep else min(max(1 + h % 3, low), high)
            items = schema.get("items", {})
            return [self.value(items, f"{path}[{i}]", name, depth + 1) for i in range(count)]
        if kind in ("integer", "number"):
            return self._number(schema, h, name, integer=kind == "integer")
        if kind == "boolean":
            return h % 2 == 0
        if kind == "null":
            return None
        return f"{name} of image {self.short}"

    def _number(self, schema: dict[str, Any], h: int, name: str, *, integer: bool) -> float:
        """A number within ``minimum``..``maximum`` (0..100 or 0..1 without bounds)."""
        given = "minimum" in schema and "maximum" in schema
        low = float(schema.get("minimum", 0.0))
        high = float(schema.get("maximum", low + (100 if integer else 1)))
        if given and "quality" in name.lower() and self.quality is not None:
            fraction = self.quality
        else:
            fraction = (h % 9999 + 1) / 10000  # never exactly a bound
        if integer:
            first, last = math.ceil(low), math.floor(high)
            if given and "quality" in name.lower() and self.quality is not None:
                return first + round((last - first) * fraction)
            return first + h % (last - first + 1)
        return round(low + (high - low) * fraction, 3)


def _quality_score(chat: _Chat) -> float | None:
    """A plausible 0..1 image quality from the first decoded image (see ``_SchemaFaker``)."""
    for image in chat.images:
        if image.luminance is not None:
            mean, stddev = image.luminance
            contrast = min(1.0, stddev / 64)
            exposure = 1 - abs(mean - 128) / 128
            return (contrast + exposure) / 2
    return None


def _content(chat: _Chat) -> str:
    """The full answer to ``chat``, before any truncation."""
    seed = chat.seed
    short = seed.hex()[:8]
    if chat.response_format is None:
        if chat.images:
            return f"The image {short} shows a plausible test scene."
        return f"This is a fake answer ({short}) to a {chat.text_chars}-character prompt."
    schema = chat.response_format["json_schema"].get("schema", {})
    faker = _SchemaFaker(schema, seed, _quality_score(chat))
    return json.dumps(faker.value(schema), separators=(",", ":"))


def _finish(chat: _Chat, override: str | None) -> tuple[str | None, str]:
    """The message content and finish_reason, after ``max_tokens`` and any override."""
    content = _content(chat)
    if override == "content_filter":
        return None, override
    if override == "length":
        return content[: max(1, len(content) // 2)], override
    if chat.max_tokens is not None and math.ceil(len(content) / 4) > chat.max_tokens:
        return content[: chat.max_tokens * 4], "length"
    return content, override or "stop"


def _chat_completion(
    chat: _Chat,
    content: str | None,
    finish_reason: str,
    prompt_tokens: int,
    completion_tokens: int,
) -> dict[str, Any]:
    """A ``chat.completion`` object, as ``POST /v1/chat/completions`` answers and as the
    ``response.body`` of a batch output line."""
    return {
        "id": f"chatcmpl-{uuid.uuid4().hex[:24]}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": chat.model,
        "choices": [
            {
                "index": 0,
                "message": {
                    "role": "assistant",
                    "content": content,
                    "refusal": None,
                    "annotations": [],
                },
                "logprobs": None,
                "finish_reason": finish_reason,
            }
        ],
        "usage": {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
            "completion_tokens_details": {
                "reasoning_tokens": 0,
                "audio_tokens": 0,
                "accepted_prediction_tokens": 0,
                "rejected_prediction_tokens": 0,
            },
        },
        "service_tier": "default",
        "system_fingerprint": "fp_fake0000",
    }


def _fault_error(fault: Fault) -> _ApiError:
    """The answer a scripted ``Fault`` stands for."""
    status, code = fault.status, fault.code
    if status == 429:
        code = code or "rate_limit_exceeded"
        quota = code == "insufficient_quota"
        type_ = "insufficient_quota" if quota else "requests"
        default = (
            "You exceeded your current quota, please check your plan and billing details."
            if quota
            else "Rate limit reached for requests. Please try again later."
        )
    elif status == 401:
        code = code or "invalid_api_key"
        type_ = "invalid_request_error"
        default = "Incorrect API key provided: sk-****. You can find your API key at ..."
    elif status >= 500:
        type_ = "server_error"
        default = SERVER_ERROR_MESSAGE
    else:
        type_ = "invalid_request_error"
        default = f"Scripted {status} error."
    headers = {}
    if fault.retry_after_s is not None:
        headers["retry-after"] = _format_seconds(fault.retry_after_s)
    return _ApiError(status, fault.message or default, type_=type_, code=code, headers=headers)


def _no_api_key() -> _ApiError:
    return _ApiError(
        401,
        "You didn't provide an API key. You need to provide your API key in an "
        "Authorization header using Bearer auth (i.e. Authorization: Bearer YOUR_KEY).",
        code="invalid_api_key",
    )


# --- the Batch API ----------------------------------------------------------------------


@dataclass
class _BatchLine:
    """One request of a batch input file, as validated at upload."""

    line: int  # 1-based line number in the file
    custom_id: str
    body: dict[str, Any]


@dataclass
class _LineResult:
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
class _BatchRun:
    """A created batch: its wire object (shared with ``FakeOpenAI.batches``) and its plan.

    ``results`` are computed at creation but only published (files, counts, usage) as the
    batch's clock advances; ``done_at_cancel`` is how many requests had run when it was
    cancelled.
    """

    batch: dict[str, Any]
    results: list[_LineResult]
    outcome: str
    duration_s: float
    started: float  # time.monotonic() at creation
    created_at: float  # time.time() at creation
    cancel_requested: float | None = None  # time.monotonic() of the cancel
    cancel_requested_at: float = 0.0  # time.time() of the cancel
    cancel_s: float = 0.0  # how long it stays "cancelling"
    done_at_cancel: int = 0
    finished: bool = False


def _line_error(line: int, message: str, code: str) -> _ApiError:
    return _ApiError(
        400, f"Invalid batch input file, line {line}: {message}", param="file", code=code
    )


def _parse_batch_file(data: bytes) -> list[_BatchLine]:
    """Validate a batch input file (JSONL of chat requests). Raises ``_ApiError`` (400).

    Blank lines are skipped. Each other line must be a JSON object with a non-empty string
    ``custom_id`` unique in the file, ``method`` "POST", ``url`` "/v1/chat/completions" and
    an object ``body``; the bodies' ``model`` values must all be the same. The bodies are
    not validated further here: an invalid body fails as its own request (400 in the
    error file), as on the real API.
    """
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise _ApiError(
            400,
            "Invalid file format for Batch API: the file must be UTF-8 encoded JSONL.",
            param="file",
            code="invalid_file_format",
        ) from exc
    lines: list[_BatchLine] = []
    seen: set[str] = set()
    model: str | None = None
    for number, raw in enumerate(text.split("\n"), start=1):
        if not raw.strip():
            continue
        try:
            item = json.loads(raw)
        except ValueError as exc:
            raise _line_error(number, "the line is not valid JSON.", "invalid_json_line") from exc
        if not isinstance(item, dict):
            raise _line_error(number, "expected a JSON object.", "invalid_json_line")
        custom_id = item.get("custom_id")
        if not isinstance(custom_id, str) or not custom_id:
            raise _line_error(
                number, "'custom_id' must be a non-empty string.", "missing_custom_id"
            )
        if custom_id in seen:
            raise _line_error(
                number,
                f"The custom_id '{custom_id}' is a duplicate of another request. The "
                "custom_id parameter must be unique for each request in a batch.",
                "duplicate_custom_id",
            )
        method = item.get("method")
        if method != "POST":
            raise _line_error(
                number, f"Invalid method {method!r}: only 'POST' is supported.", "invalid_method"
            )
        url = item.get("url")
        if url != BATCH_ENDPOINT:
            raise _line_error(
                number,
                f"Invalid url {url!r}: this fake only supports '{BATCH_ENDPOINT}'.",
                "invalid_url",
            )
        body = item.get("body")
        if not isinstance(body, dict):
            raise _line_error(number, "'body' must be a JSON object.", "invalid_body")
        body_model = body.get("model")
        if isinstance(body_model, str):
            if model is None:
                model = body_model
            elif body_model != model:
                raise _line_error(
                    number,
                    f"The model '{body_model}' differs from the model '{model}' of the "
                    "earlier lines: a batch input file can only include requests to a "
                    "single model.",
                    "mismatched_model",
                )
        seen.add(custom_id)
        lines.append(_BatchLine(number, custom_id, body))
    if not lines:
        raise _ApiError(
            400,
            "The batch input file is empty: it must contain at least one request.",
            param="file",
            code="empty_file",
        )
    return lines


def _run_batch_line(line: _BatchLine, fail: bool) -> _LineResult:
    """One batch request through the chat logic (no faults, overrides or rate limits)."""
    if fail:
        error = _ApiError(500, SERVER_ERROR_MESSAGE, type_="server_error")
        return _LineResult(line.custom_id, 500, error.body())
    try:
        chat = _parse_chat(line.body)
        content, finish_reason = _finish(chat, None)
    except _ApiError as error:
        return _LineResult(line.custom_id, error.status, error.body())
    prompt_tokens = chat.prompt_tokens
    completion_tokens = math.ceil(len(content or "") / 4)
    body = _chat_completion(chat, content, finish_reason, prompt_tokens, completion_tokens)
    return _LineResult(line.custom_id, 200, body, prompt_tokens, completion_tokens)


def _request_counts(results: Sequence[_LineResult], total: int) -> dict[str, int]:
    """``request_counts`` once ``results`` have run, out of ``total``."""
    completed = sum(1 for result in results if result.ok)
    return {"total": total, "completed": completed, "failed": len(results) - completed}


def _batch_usage(results: Sequence[_LineResult]) -> dict[str, Any]:
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


def _jsonl(entries: Sequence[dict[str, Any]]) -> bytes:
    return "".join(json.dumps(entry) + "\n" for entry in entries).encode()


def _not_found(kind: str, object_id: str, param: str | None = None) -> _ApiError:
    return _ApiError(404, f"No such {kind} object: {object_id}", param=param)


# --- the server -------------------------------------------------------------------------


@web.middleware
async def _openai_errors(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """Unknown routes answer in OpenAI's error format, as the real API does."""
    try:
        return await handler(request)
    except (web.HTTPNotFound, web.HTTPMethodNotAllowed) as exc:
        error = _ApiError(exc.status, f"Invalid URL ({request.method} {request.path})")
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
        files: the bytes of every file, uploaded or written by a batch, by id.
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
        self.files: dict[str, bytes] = {}
        self._file_objects: dict[str, dict[str, Any]] = {}
        self.batches: dict[str, dict[str, Any]] = {}
        self._batch_runs: dict[str, _BatchRun] = {}
        self._port = port
        self._base_url: str | None = None
        self._runner: web.AppRunner | None = None
        self._rps: _SlidingWindow | None = None
        if rps_limit is not None:
            length = max(1.0, 1.0 / rps_limit)
            self._rps = _SlidingWindow(length, max(1, math.floor(rps_limit * length)))

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
        api_key = _bearer(request.headers.get("Authorization"))
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
                raise _ApiError(
                    413, "Request body too large (limit 50 MB).", code="request_too_large"
                )
            response = self._answer(body, api_key)
        except _ApiError as error:
            headers = {**self._headers(), **error.headers}
            response = web.json_response(error.body(), status=error.status, headers=headers)
        if self.latency_s > 0:
            await asyncio.sleep(self.latency_s)
        return response

    def _answer(self, body: Any, api_key: str | None) -> web.Response:
        """The answer to one request; synchronous so that admission is atomic."""
        if self.faults:
            raise _fault_error(self.faults.pop(0))
        if self.fault_plan is not None:
            planned = self.fault_plan()
            if planned is not None:
                raise _fault_error(planned)
        if api_key is None:
            raise _no_api_key()
        chat = _parse_chat(body)
        override = self.finish_reason_override[0] if self.finish_reason_override else None
        content, finish_reason = _finish(chat, override)
        prompt_tokens = chat.prompt_tokens
        completion_tokens = math.ceil(len(content or "") / 4)
        self._admit(chat.model)
        if override is not None:
            self.finish_reason_override.pop(0)
        self.usage_total["prompt_tokens"] += prompt_tokens
        self.usage_total["completion_tokens"] += completion_tokens
        completion = _chat_completion(
            chat, content, finish_reason, prompt_tokens, completion_tokens
        )
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
        headers = {"retry-after": _format_seconds(wait_ms / 1000), "retry-after-ms": str(wait_ms)}
        raise _ApiError(429, message, type_="requests", code="rate_limit_exceeded", headers=headers)

    # -- the Files and Batch APIs --

    async def _guarded(
        self, request: web.Request, action: Callable[[web.Request], Awaitable[web.Response]]
    ) -> web.Response:
        """``action`` after the API key check and the batches' clock; errors as OpenAI's."""
        try:
            if _bearer(request.headers.get("Authorization")) is None:
                raise _no_api_key()
            self._advance_batches()
            return await action(request)
        except _ApiError as error:
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
        if request.content_type != "multipart/form-data":
            raise _ApiError(
                400,
                f"Invalid Content-Type header ({request.content_type}), expected "
                "multipart/form-data.",
            )
        fields: dict[str, str] = {}
        upload: tuple[str, bytes] | None = None
        reader = await request.multipart()
        while (part := await reader.next()) is not None:
            if isinstance(part, BodyPartReader) and part.name == "file":
                upload = (part.filename or "upload", await part.read())
            elif isinstance(part, BodyPartReader) and part.name:
                fields[part.name] = await part.text()
            else:
                await part.release()
        for name, value in (("file", upload), ("purpose", fields.get("purpose"))):
            if value is None:
                raise _invalid(
                    f"Missing required parameter: '{name}'.", name, "missing_required_parameter"
                )
        assert upload is not None
        filename, data = upload
        purpose = fields["purpose"]
        if purpose == "batch":
            if not filename.endswith(".jsonl"):
                raise _ApiError(
                    400,
                    "Invalid file format for Batch API. Must be .jsonl",
                    param="file",
                    code="invalid_file_format",
                )
            _parse_batch_file(data)
        file_object = self._store_file(data, filename, purpose)
        return web.json_response(file_object, headers=self._headers())

    def _store_file(self, data: bytes, filename: str, purpose: str) -> dict[str, Any]:
        """Keep ``data`` as a new file; return its File object."""
        created_at = int(time.time())
        file_object: dict[str, Any] = {
            "id": f"file-{uuid.uuid4().hex[:22]}",
            "object": "file",
            "bytes": len(data),
            "created_at": created_at,
            "expires_at": (
                created_at + BATCH_FILE_TTL_S if purpose in ("batch", "batch_output") else None
            ),
            "filename": filename,
            "purpose": purpose,
            "status": "processed",
            "status_details": None,
        }
        self.files[file_object["id"]] = data
        self._file_objects[file_object["id"]] = file_object
        return file_object

    def _file(self, file_id: str, param: str | None = None) -> dict[str, Any]:
        if file_id not in self._file_objects:
            raise _not_found("File", file_id, param)
        return self._file_objects[file_id]

    async def _file_content(self, request: web.Request) -> web.Response:
        file_object = self._file(request.match_info["file_id"], "id")
        return web.Response(
            body=self.files[file_object["id"]],
            content_type="application/octet-stream",
            headers=self._headers(),
        )

    async def _create_batch(self, request: web.Request) -> web.Response:
        body: Any = None
        with contextlib.suppress(ValueError):
            body = json.loads(await request.read())
        if not isinstance(body, dict):
            raise _ApiError(
                400,
                "We could not parse the JSON body of your request. (HINT: This likely means "
                "you aren't using your HTTP library correctly. The OpenAI API expects a JSON "
                "payload.)",
            )
        for name in ("input_file_id", "endpoint", "completion_window"):
            if body.get(name) is None:
                raise _invalid(
                    f"Missing required parameter: '{name}'.", name, "missing_required_parameter"
                )
        endpoint = body["endpoint"]
        if endpoint != BATCH_ENDPOINT:
            raise _invalid(
                f"Unsupported endpoint '{endpoint}': the fake only runs '{BATCH_ENDPOINT}'.",
                "endpoint",
            )
        if body["completion_window"] != "24h":
            raise _invalid(
                f"Invalid value: '{body['completion_window']}'. Supported values are: '24h'.",
                "completion_window",
            )
        metadata = body.get("metadata")
        input_file = self._file(str(body["input_file_id"]), "input_file_id")
        if input_file["purpose"] != "batch":
            raise _invalid(
                f"The input file {input_file['id']} has purpose '{input_file['purpose']}'; "
                "a batch input file must be uploaded with purpose 'batch'.",
                "input_file_id",
            )
        lines = _parse_batch_file(self.files[input_file["id"]])
        outcome = self.batch_next_outcome.pop(0) if self.batch_next_outcome else "completed"
        if outcome not in BATCH_OUTCOMES:
            raise _ApiError(
                500,
                f"FakeOpenAI: unknown batch outcome {outcome!r} in batch_next_outcome.",
                type_="server_error",
            )
        every = self.batch_fail_every
        results = [
            _run_batch_line(line, every is not None and every > 0 and index % every == 0)
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
        self.batches[batch["id"]] = batch
        self._batch_runs[batch["id"]] = _BatchRun(
            batch=batch,
            results=results,
            outcome=outcome,
            duration_s=max(0.0, self.batch_duration_s),
            started=time.monotonic(),
            created_at=created_wall,
        )
        return web.json_response(batch, headers=self._headers())

    def _run(self, batch_id: str) -> _BatchRun:
        if batch_id not in self._batch_runs:
            raise _not_found("Batch", batch_id, "batch_id")
        return self._batch_runs[batch_id]

    async def _retrieve_batch(self, request: web.Request) -> web.Response:
        run = self._run(request.match_info["batch_id"])
        return web.json_response(run.batch, headers=self._headers())

    async def _list_batches(self, request: web.Request) -> web.Response:
        raw_limit = request.query.get("limit", "20")
        try:
            limit = int(raw_limit)
        except ValueError:
            limit = 0
        if not 1 <= limit <= 100:
            raise _invalid(
                f"Invalid 'limit': '{raw_limit}'. Expected an integer between 1 and 100.",
                "limit",
            )
        newest_first = [run.batch for run in reversed(self._batch_runs.values())]
        start = 0
        after = request.query.get("after")
        if after is not None:
            ids = [batch["id"] for batch in newest_first]
            if after not in ids:
                raise _invalid(f"Invalid 'after': no batch {after}.", "after")
            start = ids.index(after) + 1
        page = newest_first[start : start + limit]
        listing = {
            "object": "list",
            "data": page,
            "first_id": page[0]["id"] if page else None,
            "last_id": page[-1]["id"] if page else None,
            "has_more": start + limit < len(newest_first),
        }
        return web.json_response(listing, headers=self._headers())

    async def _cancel_batch(self, request: web.Request) -> web.Response:
        run = self._run(request.match_info["batch_id"])
        batch = run.batch
        status = batch["status"]
        if status in ("completed", "failed", "expired"):
            raise _ApiError(409, f"Cannot cancel a batch with status '{status}'.")
        if status in ("validating", "in_progress", "finalizing"):
            counts = batch["request_counts"]
            run.cancel_requested = time.monotonic()
            run.cancel_requested_at = time.time()
            run.cancel_s = max(0.0, self.batch_cancel_s)
            run.done_at_cancel = counts["completed"] + counts["failed"]
            batch["status"] = "cancelling"
            batch["cancelling_at"] = int(run.cancel_requested_at)
        return web.json_response(batch, headers=self._headers())

    def _advance_batches(self) -> None:
        """Bring every batch's status up to date with its clock."""
        now = time.monotonic()
        for run in self._batch_runs.values():
            self._advance(run, now)

    def _advance(self, run: _BatchRun, now: float) -> None:
        """validating -> in_progress -> finalizing -> completed (or failed/expired/cancelled)."""
        if run.finished:
            return
        batch, results, total = run.batch, run.results, len(run.results)
        if run.cancel_requested is not None:
            if now - run.cancel_requested >= run.cancel_s:
                self._finish_batch(
                    run, "cancelled", run.done_at_cancel, run.cancel_requested_at + run.cancel_s
                )
            return
        elapsed, duration = now - run.started, run.duration_s
        if run.outcome == "failed":
            if elapsed >= duration:
                self._fail(run)
            return
        if elapsed < VALIDATING_UNTIL * duration:
            return
        batch["status"] = "in_progress"
        if batch["in_progress_at"] is None:
            batch["in_progress_at"] = int(run.created_at + VALIDATING_UNTIL * duration)
        if run.outcome == "cancelled":  # stuck until cancelled
            batch["request_counts"] = _request_counts([], total)
            return
        if run.outcome == "expired":
            half = total // 2
            if elapsed >= duration:
                self._finish_batch(run, "expired", half, run.created_at + duration)
            else:
                progress = (elapsed - VALIDATING_UNTIL * duration) / (
                    (1 - VALIDATING_UNTIL) * duration
                )
                batch["request_counts"] = _request_counts(results[: int(half * progress)], total)
            return
        if elapsed >= IN_PROGRESS_UNTIL * duration:
            batch["status"] = "finalizing"
            if batch["finalizing_at"] is None:
                batch["finalizing_at"] = int(run.created_at + IN_PROGRESS_UNTIL * duration)
            batch["request_counts"] = _request_counts(results, total)
            if elapsed >= duration:
                self._finish_batch(run, "completed", total, run.created_at + duration)
            return
        progress = (elapsed - VALIDATING_UNTIL * duration) / (
            (IN_PROGRESS_UNTIL - VALIDATING_UNTIL) * duration
        )
        batch["request_counts"] = _request_counts(results[: int(total * progress)], total)

    def _fail(self, run: _BatchRun) -> None:
        """The "failed" outcome: no request runs, ``errors`` says why."""
        batch = run.batch
        model = batch["model"] or "the model"
        batch["status"] = "failed"
        batch["failed_at"] = int(run.created_at + run.duration_s)
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
        run.finished = True

    def _finish_batch(self, run: _BatchRun, status: str, done: int, at: float) -> None:
        """Write the output and error files of a batch whose first ``done`` requests ran."""
        batch, total = run.batch, len(run.results)
        ran = run.results[:done]
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
            for result in run.results[done:]
        ]
        if outputs or status == "completed":
            output = self._store_file(
                _jsonl(outputs), f"{batch['id']}_output.jsonl", "batch_output"
            )
            batch["output_file_id"] = output["id"]
        if errors:
            error = self._store_file(_jsonl(errors), f"{batch['id']}_error.jsonl", "batch_output")
            batch["error_file_id"] = error["id"]
        counts = _request_counts(ran, total)
        counts["failed"] = total - counts["completed"]  # requests never run count as failed
        batch["request_counts"] = counts
        batch["usage"] = _batch_usage(ran)
        self.usage_total["prompt_tokens"] += batch["usage"]["input_tokens"]
        self.usage_total["completion_tokens"] += batch["usage"]["output_tokens"]
        batch["status"] = status
        batch[f"{status}_at"] = int(at)
        run.finished = True

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


# --- the command line -------------------------------------------------------------------


async def _serve(fake: FakeOpenAI) -> None:
    """Run ``fake`` until SIGTERM or SIGINT, announcing ``READY <base_url>`` on stdout."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    async with fake:
        print(f"READY {fake.base_url}", flush=True)
        await stop.wait()


def main(argv: Sequence[str]) -> None:
    """``python -m listener.testing.openai_fake [--port N] [--rps R] [--latency S]``.

    Serves until SIGTERM or SIGINT, after printing ``READY <base_url>``.
    """
    parser = argparse.ArgumentParser(
        prog="python -m listener.testing.openai_fake",
        description="A fake OpenAI API on 127.0.0.1 for tests and demos.",
    )
    parser.add_argument("--port", type=int, default=0, help="TCP port; 0 picks a free one")
    parser.add_argument("--rps", type=float, default=None, help="requests per second limit")
    parser.add_argument("--latency", type=float, default=0.0, help="seconds before each answer")
    args = parser.parse_args(list(argv))
    fake = FakeOpenAI(rps_limit=args.rps, latency_s=args.latency, port=args.port)
    asyncio.run(_serve(fake))


if __name__ == "__main__":
    main(sys.argv[1:])
