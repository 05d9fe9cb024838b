"""The OpenAI vision provider: tiered structured analysis through ``openai.AsyncOpenAI``.

Each tier asks a model for a JSON object that follows a pydantic model (structured outputs,
``client.chat.completions.parse``): tier 1 angle / category / quality / description, tier 2
parts and their condition, tier 3 an expert assessment. The SDK's own retries are off
(``max_retries=0``): listener owns retries, backoff and the fleet-wide rate limit, and needs
to see every 429 to pause the provider for everyone.

Errors, as the API documents them (https://platform.openai.com/docs/guides/error-codes):
429 ``rate_limit_exceeded`` -> ``RateLimited`` (retry after ``retry-after`` or
``x-ratelimit-reset-*``); 429 ``insufficient_quota``, 401 and 403 -> ``ProviderPaused``
(no job can succeed until someone acts); 400 and refusals, content-filter and length
finishes -> ``RejectedByProvider``; timeouts -> ``FetchTimeout``; connection errors and
5xx -> ``ProviderUnavailable``.
"""

from __future__ import annotations

import asyncio
import base64
import io
import re
import time
from collections.abc import AsyncIterator, Mapping
from typing import Any, Literal

import openai
from pydantic import BaseModel, Field, create_model

from listener.analysis.costs import image_tokens, text_tokens
from listener.analysis.providers.base import (
    BATCH_BACKENDS,
    ImageInput,
    ProviderBatch,
    RateHints,
    StepContext,
    StepResult,
)
from listener.errors import (
    FetchTimeout,
    ProviderPaused,
    ProviderUnavailable,
    RateLimited,
    RejectedByProvider,
)
from listener.ops.tracing import Tracing
from listener.redact import redact_text
from listener.settings import OpenAISettings

_INLINE_MIME = {"JPEG": "image/jpeg", "PNG": "image/png", "GIF": "image/gif", "WEBP": "image/webp"}
_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h)")


class Part(BaseModel):
    """A part or component seen in the photo."""

    name: str = Field(description="the part, e.g. 'front bumper', 'driver seat'")
    condition: Literal["excellent", "good", "fair", "poor", "damaged"]
    notes: str = Field(description="what about it shows its condition, one short sentence")


class Tier2Parts(BaseModel):
    """Tier 2: the parts and components visible, each with its condition."""

    parts: list[Part]


class Damage(BaseModel):
    """One damaged area."""

    area: str
    severity: Literal["minor", "moderate", "severe"]
    description: str


class Tier3Assessment(BaseModel):
    """Tier 3: an expert's assessment of a high-resolution photo."""

    paint_quality: int = Field(ge=0, le=10, description="0 ruined to 10 flawless")
    paint_notes: str
    modifications: list[str] = Field(description="aftermarket or non-original changes seen")
    damage: list[Damage]
    summary: str = Field(description="two sentences an appraiser would write")


def tier1_model(angles: list[str]) -> type[BaseModel]:
    """The tier-1 model, with ``angle`` restricted to the configured vocabulary."""
    angle_type: Any = Literal[tuple(angles)]  # a Literal of runtime values
    model: type[BaseModel] = create_model(
        "Tier1Analysis",
        angle=(angle_type, Field(description="the camera angle")),
        category=(str, Field(description="what the photo shows, in one or two words")),
        quality=(int, Field(ge=0, le=10, description="photo quality, 0 unusable to 10 ideal")),
        description=(str, Field(description="one line describing the photo")),
    )
    return model


def parse_duration(text: str | None) -> float | None:
    """Seconds in a duration header such as ``"1s"``, ``"6m0s"``, ``"120ms"`` or ``"20"``."""
    if not text:
        return None
    try:
        return float(text)
    except ValueError:
        pass
    parts = _DURATION.findall(text)
    if not parts:
        return None
    scale = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
    return sum(float(value) * scale[unit] for value, unit in parts)


def rate_hints(headers: Mapping[str, str]) -> RateHints:
    """The ``x-ratelimit-*`` headers of an answer (missing ones are ``None``)."""

    def number(name: str) -> int | None:
        value = headers.get(name)
        return int(value) if value is not None and value.isdigit() else None

    return RateHints(
        remaining_requests=number("x-ratelimit-remaining-requests"),
        remaining_tokens=number("x-ratelimit-remaining-tokens"),
        reset_requests_s=parse_duration(headers.get("x-ratelimit-reset-requests")),
        reset_tokens_s=parse_duration(headers.get("x-ratelimit-reset-tokens")),
    )


def retry_after(headers: Mapping[str, str]) -> float | None:
    """Seconds to wait after a 429: ``retry-after``, else the longest ``x-ratelimit-reset-*``."""
    direct = parse_duration(headers.get("retry-after"))
    if direct is not None:
        return direct
    resets = [
        parse_duration(headers.get(h))
        for h in ("x-ratelimit-reset-requests", "x-ratelimit-reset-tokens")
    ]
    known = [r for r in resets if r is not None]
    return max(known) if known else None


def _to_jpeg(data: bytes) -> bytes:
    from PIL import Image

    with Image.open(io.BytesIO(data)) as img:
        out = io.BytesIO()
        img.convert("RGB").save(out, format="JPEG", quality=90)
        return out.getvalue()


class OpenAIProvider:
    """OpenAI vision behind the ``Provider`` protocol; kinds ``tier1``, ``tier2``, ``tier3``.

    Args:
        settings: key, base URL, models, detail, transport, vocabulary, limits.
    """

    name = "openai"
    batch_discount = BATCH_BACKENDS["openai"].discount
    """Batch API requests cost half the realtime price (``BATCH_BACKENDS``)."""
    needs_image = True

    def __init__(self, settings: OpenAISettings, *, tracing: Tracing | None = None) -> None:
        self._s = settings
        self._tracing = tracing or Tracing()
        self._client: openai.AsyncOpenAI | None = None
        self._schemas: dict[str, type[BaseModel]] = {
            "tier1": tier1_model(settings.angles),
            "tier2": Tier2Parts,
            "tier3": Tier3Assessment,
        }
        self._models = {
            "tier1": settings.tier1_model,
            "tier2": settings.tier2_model,
            "tier3": settings.tier3_model,
        }

    async def start(self) -> None:
        """Create the client.

        Raises:
            ValueError: no API key is configured.
        """
        if self._s.api_key is None:
            raise ValueError(
                "the openai provider needs an API key: set LISTENER_OPENAI__API_KEY or "
                "OPENAI_API_KEY"
            )
        self._client = openai.AsyncOpenAI(
            api_key=self._s.api_key.get_secret_value(),
            base_url=self._s.base_url,
            max_retries=0,
            timeout=self._s.timeout_s,
        )

    async def close(self) -> None:
        """Close the client's connections."""
        if self._client is not None:
            await self._client.close()
            self._client = None

    def prompt(self, kind: str, previous: Mapping[str, Mapping[str, Any]]) -> str:
        """The instruction sent with the image for a ``kind`` step."""
        subject = self._s.subject
        if kind == "tier1":
            return (
                f"You review photos of {subject} uploaded to a listing. Give the camera angle "
                f"(one of: {', '.join(self._s.angles)}), a short category, a quality score from "
                "0 (unusable) to 10 (professional), and a one-line description."
            )
        seen = previous.get("openai.tier1", {})
        context = (
            f" The photo was classified as {seen.get('category')!s}, angle {seen.get('angle')!s}."
            if seen
            else ""
        )
        if kind == "tier2":
            return (
                f"List the parts and components of the {subject} visible in this photo, each "
                f"with its condition.{context}"
            )
        return (
            f"As an expert appraiser of {subject}, assess this high-resolution photo: paint "
            f"quality, modifications, and any damage with its severity.{context}"
        )

    def estimate_tokens(self, kind: str, image: ImageInput) -> int:
        """Input (image + prompt) plus the output limit, as OpenAI's rate limiter counts them."""
        return (
            image_tokens(image.width, image.height, self._s.detail)
            + text_tokens(self.prompt(kind, {}))
            + 60
            + self._s.max_output_tokens
        )

    async def _image_url(self, image: ImageInput) -> str:
        if self._s.image_transport == "url":
            return image.url
        data, mime = image.data, _INLINE_MIME.get(image.content_type)
        if mime is None:
            data, mime = await asyncio.to_thread(_to_jpeg, image.data), "image/jpeg"
        return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"

    async def request_body(
        self, kind: str, image: ImageInput, previous: Mapping[str, Mapping[str, Any]]
    ) -> dict[str, Any]:
        """The chat-completions request of a ``kind`` step, as a JSON-ready dict.

        The same request as ``run`` sends, for the Batch API's input file; the response
        format is the pydantic model's strict JSON schema, built by the SDK.
        """
        from openai.lib._parsing._completions import type_to_response_format_param

        return {
            "model": self._models[kind],
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {"type": "text", "text": self.prompt(kind, previous)},
                        {
                            "type": "image_url",
                            "image_url": {
                                "url": await self._image_url(image),
                                "detail": self._s.detail,
                            },
                        },
                    ],
                }
            ],
            "response_format": type_to_response_format_param(self._schemas[kind]),
            "max_completion_tokens": self._s.max_output_tokens,
        }

    def parse_body(self, kind: str, body: Mapping[str, Any]) -> StepResult:
        """A step result from a chat completion body (a Batch API output line's).

        Raises:
            RejectedByProvider: refusal, content filter, length, or content that does not
                follow the schema.
        """
        choice = body["choices"][0]
        finish = choice.get("finish_reason")
        if finish in ("content_filter", "length"):
            raise RejectedByProvider(f"OpenAI's answer ended with finish_reason {finish}")
        message = choice.get("message") or {}
        if message.get("refusal"):
            raise RejectedByProvider(f"OpenAI refused: {message['refusal']}")
        try:
            parsed = self._schemas[kind].model_validate_json(message.get("content") or "")
        except ValueError as error:
            raise RejectedByProvider(
                f"OpenAI's answer does not follow the schema: {error}"
            ) from None
        usage = body.get("usage") or {}
        return StepResult(
            provider=self.name,
            step=f"{self.name}.{kind}",
            output=parsed.model_dump(mode="json"),
            model=body.get("model"),
            input_tokens=usage.get("prompt_tokens"),
            output_tokens=usage.get("completion_tokens"),
            calls=1,
        )

    # -- Batch API (https://platform.openai.com/docs/guides/batch) ---------------------------

    def _batch_client(self) -> openai.AsyncOpenAI:
        if self._client is None:
            raise RuntimeError("OpenAIProvider.start() must be called first")
        return self._client

    async def upload_batch_file(self, data: bytes, name: str) -> str:
        """Upload a JSONL input file named ``name`` with purpose ``batch``; returns its id."""
        try:
            created = await self._batch_client().files.create(
                file=(name, data, "application/jsonl"), purpose="batch"
            )
        except openai.OpenAIError as error:
            raise self._translate(error) from None
        return created.id

    async def create_batch(
        self, input_file_id: str, metadata: Mapping[str, str]
    ) -> tuple[str, str]:
        """Create a batch over ``input_file_id`` (24 h window) carrying ``metadata``.

        Returns:
            The batch's id and status.
        """
        try:
            batch = await self._batch_client().batches.create(
                input_file_id=input_file_id,
                endpoint="/v1/chat/completions",
                completion_window="24h",
                metadata=dict(metadata),
            )
        except openai.OpenAIError as error:
            raise self._translate(error) from None
        return batch.id, batch.status

    async def list_batches(self, since: float) -> AsyncIterator[ProviderBatch]:
        """``GET /v1/batches``, newest first, 100 a page (``after`` = the last id of the page
        before), until a batch created before ``since`` (epoch seconds) or the last page."""
        try:
            async for batch in self._batch_client().batches.list(limit=100):
                if batch.created_at < since:
                    return
                yield ProviderBatch(
                    batch.id,
                    batch.status,
                    float(batch.created_at),
                    {str(k): str(v) for k, v in (batch.metadata or {}).items()},
                    batch.input_file_id,
                )
        except openai.OpenAIError as error:
            raise self._translate(error) from None

    async def retrieve_batch(self, batch_id: str) -> dict[str, Any]:
        """The batch's status, request counts, file ids and errors."""
        try:
            batch = await self._batch_client().batches.retrieve(batch_id)
        except openai.OpenAIError as error:
            raise self._translate(error) from None
        counts = batch.request_counts
        errors = batch.errors.data if batch.errors and batch.errors.data else []
        return {
            "status": batch.status,
            "completed": counts.completed if counts else 0,
            "failed": counts.failed if counts else 0,
            "output_file_id": batch.output_file_id,
            "error_file_id": batch.error_file_id,
            "error": "; ".join(f"{e.code}: {e.message}" for e in errors) or None,
        }

    async def cancel_batch(self, batch_id: str) -> str:
        """Cancel a batch (``POST /v1/batches/{id}/cancel``); returns its status then
        (``cancelling``, or ``cancelled`` when it was already).

        Raises:
            RejectedByProvider: it had finished already (409) or is unknown (404).
            ProviderUnavailable, RateLimited, ProviderPaused: see ``run``.
        """
        try:
            batch = await self._batch_client().batches.cancel(batch_id)
        except openai.OpenAIError as error:
            raise self._translate(error) from None
        return batch.status

    async def file_content(self, file_id: str) -> bytes:
        """The bytes of a file (a batch's output or error file)."""
        try:
            content = await self._batch_client().files.content(file_id)
        except openai.OpenAIError as error:
            raise self._translate(error) from None
        return content.read()

    async def run(self, kind: str, image: ImageInput, context: StepContext) -> StepResult:
        """Ask the ``kind`` tier's model about ``image``.

        Raises:
            RateLimited, ProviderPaused, RejectedByProvider, FetchTimeout, ProviderUnavailable:
                see the module docstring.
        """
        if self._client is None:
            raise RuntimeError("OpenAIProvider.start() must be called before run()")
        schema = self._schemas[kind]
        messages: Any = [
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": self.prompt(kind, context.previous)},
                    {
                        "type": "image_url",
                        "image_url": {
                            "url": await self._image_url(image),
                            "detail": self._s.detail,
                        },
                    },
                ],
            }
        ]
        started = time.perf_counter()
        try:
            raw = await self._client.chat.completions.with_raw_response.parse(
                model=self._models[kind],
                messages=messages,
                response_format=schema,
                max_completion_tokens=self._s.max_output_tokens,
                # The step's trace context (traceparent), when tracing is on.
                extra_headers=self._tracing.headers() or None,
            )
            completion = raw.parse()
        except openai.OpenAIError as error:  # APIError, and the parse errors beside it
            raise self._translate(error) from None
        choice = completion.choices[0]
        if choice.message.refusal:
            raise RejectedByProvider(f"OpenAI refused: {choice.message.refusal}")
        parsed = choice.message.parsed
        if parsed is None:
            raise RejectedByProvider(f"OpenAI returned no {kind} analysis")
        usage = completion.usage
        return StepResult(
            provider=self.name,
            step=f"{self.name}.{kind}",
            output=parsed.model_dump(mode="json"),
            model=completion.model,
            duration_s=time.perf_counter() - started,
            input_tokens=usage.prompt_tokens if usage else None,
            output_tokens=usage.completion_tokens if usage else None,
            calls=1,
            hints=rate_hints(raw.headers),
        )

    def _translate(self, error: openai.OpenAIError) -> Exception:
        if isinstance(error, openai.LengthFinishReasonError):
            return RejectedByProvider("OpenAI's answer was cut off at the output token limit")
        if isinstance(error, openai.ContentFilterFinishReasonError):
            return RejectedByProvider("OpenAI's content filter rejected the request")
        if isinstance(error, openai.APITimeoutError):
            return FetchTimeout(f"OpenAI did not answer within {self._s.timeout_s:g}s")
        if isinstance(error, openai.APIConnectionError):
            return ProviderUnavailable(f"cannot reach OpenAI: {redact_text(error.message)}")
        if isinstance(error, openai.APIStatusError):
            status = error.status_code
            code = error.code or ""
            headers = error.response.headers
            # Redacted before the cut: a key cut in half is no longer recognisable as one.
            detail = f"OpenAI {status} {code}".strip() + f": {redact_text(error.message)}"[:300]
            if status == 429 and code == "insufficient_quota":
                return ProviderPaused(
                    f"OpenAI: insufficient_quota (billing); paused {self._s.quota_pause_s:g}s",
                    pause_s=self._s.quota_pause_s,
                )
            if status == 429:
                return RateLimited(detail, retry_after=retry_after(headers))
            if status in (401, 403):
                return ProviderPaused(f"OpenAI rejected the API key ({status})", pause_s=300.0)
            if status >= 500 or status == 408:
                return ProviderUnavailable(detail, retry_after=retry_after(headers))
            return RejectedByProvider(detail)
        return ProviderUnavailable(redact_text(f"OpenAI: {type(error).__name__}: {error}")[:300])
