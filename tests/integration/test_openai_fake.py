"""``listener.testing.FakeOpenAI`` through the real ``openai`` SDK, over real HTTP on 127.0.0.1.

What the SDK makes of each answer is pinned here, since the OpenAI provider is written
against it: exception classes, ``.code`` / ``.type`` / ``.body``, headers, finish reasons.
"""

from __future__ import annotations

import asyncio
import base64
import enum
import io
import json
import math
import re
import time
from collections.abc import AsyncIterator
from typing import Any, Literal, cast

import aiohttp
import openai
import pytest
from openai.types.chat import ChatCompletionMessageParam
from openai.types.shared_params import ResponseFormatJSONSchema
from PIL import Image
from pydantic import BaseModel, Field
from support import fake_on_command_line

from listener.testing.openai_fake import FakeOpenAI, Fault, format_duration, image_tokens

FAKE = FakeOpenAI  # the class of the ``fake`` fixture (conftest.py)

FAKE_MODULE = "listener.testing.openai_fake"
PROMPT = "Describe this image for the catalogue."
DURATION = re.compile(r"^(\d+h)?(\d+m)?(\d+(\.\d+)?s|\d+ms)$")


class Setting(enum.StrEnum):
    """An enum field, as ``to_strict_json_schema`` turns it into ``$defs`` + ``$ref``."""

    indoor = "indoor"
    outdoor = "outdoor"
    studio = "studio"


class DetectedObject(BaseModel):
    label: str
    confidence: float = Field(ge=0, le=1)
    count: int = Field(ge=1, le=20)


class Analysis(BaseModel):
    kind: Literal["photo", "drawing", "screenshot"]
    setting: Setting
    quality: int = Field(ge=0, le=10)
    objects: list[DetectedObject] = Field(min_length=1, max_length=4)
    caption: str | None
    tags: list[str]
    has_text: bool


class Node(BaseModel):
    """A recursive model: ``$ref: "#/$defs/Node"`` inside itself."""

    name: str
    children: list[Node]


def data_url(image: Image.Image, fmt: str = "PNG") -> str:
    """``image`` as a base64 data URL."""
    buffer = io.BytesIO()
    image.save(buffer, fmt)
    mime = "jpeg" if fmt == "JPEG" else fmt.lower()
    return f"data:image/{mime};base64,{base64.b64encode(buffer.getvalue()).decode()}"


def solid(width: int, height: int, color: tuple[int, int, int] = (90, 140, 200)) -> str:
    return data_url(Image.new("RGB", (width, height), color))


def checkerboard(size: int = 256, cell: int = 32) -> str:
    image = Image.new("L", (size, size), 0)
    for y in range(0, size, cell):
        for x in range((y // cell) % 2 * cell, size, 2 * cell):
            image.paste(255, (x, y, x + cell, y + cell))
    return data_url(image.convert("RGB"))


def messages(
    url: str, detail: str = "high", text: str = PROMPT
) -> list[ChatCompletionMessageParam]:
    """A system message and a user message with ``text`` and one image."""
    conversation: list[dict[str, Any]] = [
        {"role": "system", "content": "You analyse images."},
        {
            "role": "user",
            "content": [
                {"type": "text", "text": text},
                {"type": "image_url", "image_url": {"url": url, "detail": detail}},
            ],
        },
    ]
    return cast("list[ChatCompletionMessageParam]", conversation)


def custom_format(schema: dict[str, Any]) -> ResponseFormatJSONSchema:
    """A strict ``json_schema`` response_format for a hand-written schema."""
    return {
        "type": "json_schema",
        "json_schema": {"name": "custom", "schema": schema, "strict": True},
    }


def text_tokens(*texts: str) -> int:
    return math.ceil(sum(len(t) for t in texts) / 4)


def sdk(fake: FakeOpenAI, **kwargs: Any) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=fake.base_url, api_key="sk-test", max_retries=0, **kwargs)


@pytest.fixture
async def client(fake: FakeOpenAI) -> AsyncIterator[openai.AsyncOpenAI]:
    async with sdk(fake) as c:
        yield c


async def analyse(client: openai.AsyncOpenAI, url: str, detail: str = "high") -> Any:
    return await client.chat.completions.parse(
        model="gpt-4o", messages=messages(url, detail), response_format=Analysis
    )


# --- pure helpers -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("width", "height", "detail", "tokens"),
    [
        (1024, 1024, "high", 765),  # the guide's examples
        (2048, 4096, "high", 1105),
        (4096, 8192, "low", 85),
        (512, 512, "high", 255),
        (128, 64, "auto", 255),  # never scaled up
        (1920, 1080, "high", 1105),  # 1365x768: 3x2 tiles
    ],
)
def test_image_tokens_follow_the_vision_guide(
    width: int, height: int, detail: str, tokens: int
) -> None:
    assert image_tokens(width, height, detail) == tokens


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(0, "0s"), (0.12, "120ms"), (0.0004, "1ms"), (1, "1s"), (1.5, "1.5s"), (360, "6m0s")],
)
def test_durations_are_written_like_openai_headers(seconds: float, text: str) -> None:
    assert format_duration(seconds) == text


# --- structured outputs -----------------------------------------------------------------


async def test_parse_returns_a_valid_deterministic_object(
    fake: FakeOpenAI, client: openai.AsyncOpenAI
) -> None:
    url = solid(1024, 1024)
    first = await analyse(client, url)
    again = await analyse(client, url)
    other = await analyse(client, solid(1024, 1024, (10, 200, 30)))

    parsed = first.choices[0].message.parsed
    assert isinstance(parsed, Analysis)
    assert 1 <= len(parsed.objects) <= 4 and 0 <= parsed.quality <= 10
    assert parsed == again.choices[0].message.parsed
    assert parsed != other.choices[0].message.parsed
    assert first.choices[0].finish_reason == "stop"
    assert first.choices[0].message.refusal is None

    # A second server answers the same: nothing depends on the instance or the clock.
    async with FakeOpenAI() as fresh, sdk(fresh) as fresh_client:
        assert (await analyse(fresh_client, url)).choices[0].message.parsed == parsed

    content = first.choices[0].message.content
    assert first.usage.prompt_tokens == text_tokens("You analyse images.", PROMPT) + 765
    assert first.usage.completion_tokens == math.ceil(len(content) / 4)
    assert first.usage.total_tokens == first.usage.prompt_tokens + first.usage.completion_tokens
    assert fake.usage_total == {
        "prompt_tokens": 3 * first.usage.prompt_tokens,
        "completion_tokens": sum(r.usage.completion_tokens for r in (first, again, other)),
    }

    request = fake.requests[0]
    assert request["api_key"] == "sk-test"
    assert request["response_format"]["type"] == "json_schema"
    assert request["response_format"]["json_schema"]["strict"] is True
    assert request["received_at"] <= fake.requests[1]["received_at"] <= time.monotonic()


async def test_quality_follows_contrast_and_exposure(client: openai.AsyncOpenAI) -> None:
    sharp = (await analyse(client, checkerboard())).choices[0].message.parsed
    flat = (await analyse(client, solid(256, 256, (128, 128, 128)))).choices[0].message.parsed
    dark = (await analyse(client, solid(256, 256, (0, 0, 0)))).choices[0].message.parsed
    assert (sharp.quality, flat.quality, dark.quality) == (10, 5, 0)


async def test_recursive_and_hand_written_schemas(client: openai.AsyncOpenAI) -> None:
    tree = await client.chat.completions.parse(
        model="gpt-4o", messages=messages(solid(64, 64)), response_format=Node
    )
    assert isinstance(tree.choices[0].message.parsed, Node)

    schema = {
        "type": "object",
        "properties": {
            "score": {"type": "number", "minimum": 2, "maximum": 3},
            "label": {"anyOf": [{"$ref": "#/$defs/Label"}, {"type": "null"}]},
            "ids": {"type": "array", "items": {"type": "integer"}, "minItems": 2, "maxItems": 2},
        },
        "required": ["score", "label", "ids"],
        "additionalProperties": False,
        "$defs": {"Label": {"type": "string", "enum": ["a", "b"]}},
    }
    completion = await client.chat.completions.create(
        model="gpt-4o",
        messages=messages(solid(64, 64)),
        response_format=custom_format(schema),
    )
    value = json.loads(completion.choices[0].message.content or "")
    assert set(value) == {"score", "label", "ids"}
    assert 2 <= value["score"] <= 3 and value["label"] in ("a", "b", None)
    assert len(value["ids"]) == 2 and all(isinstance(i, int) for i in value["ids"])

    schema["additionalProperties"] = True
    with pytest.raises(openai.BadRequestError) as caught:
        await client.chat.completions.create(
            model="gpt-4o",
            messages=messages(solid(64, 64)),
            response_format=custom_format(schema),
        )
    assert caught.value.param == "response_format"
    assert "additionalProperties" in caught.value.message


async def test_plain_text_without_response_format(client: openai.AsyncOpenAI) -> None:
    completion = await client.chat.completions.create(
        model="gpt-4o-mini", messages=messages(solid(32, 32), "low")
    )
    assert completion.choices[0].message.content.startswith("The image ")  # type: ignore[union-attr]
    assert completion.model == "gpt-4o-mini"


# --- tokens -----------------------------------------------------------------------------


async def test_image_tokens_low_vs_high(client: openai.AsyncOpenAI) -> None:
    text = text_tokens("You analyse images.", PROMPT)
    square = solid(1024, 1024)

    async def prompt_tokens(url: str, detail: str) -> int:
        completion = await analyse(client, url, detail)
        return int(completion.usage.prompt_tokens)

    assert await prompt_tokens(square, "low") == text + 85
    assert await prompt_tokens(square, "high") == text + 765
    assert await prompt_tokens(square, "auto") == text + 765
    assert await prompt_tokens(solid(2048, 4096), "high") == text + 1105
    # The fake never fetches http(s) images; it bills them as 1024x1024.
    assert await prompt_tokens("https://example.com/cat.jpg", "high") == text + 765


# --- faults -----------------------------------------------------------------------------


async def test_429_with_retry_after(fake: FakeOpenAI, client: openai.AsyncOpenAI) -> None:
    fake.faults.append(Fault(429, retry_after_s=2))
    with pytest.raises(openai.RateLimitError) as caught:
        await analyse(client, solid(32, 32))
    error = caught.value
    assert error.status_code == 429
    assert error.response.headers["retry-after"] == "2"
    assert error.code == "rate_limit_exceeded" and error.type == "requests"
    assert error.body == {
        "message": "Rate limit reached for requests. Please try again later.",
        "type": "requests",
        "param": None,
        "code": "rate_limit_exceeded",
    }
    assert error.request_id is not None and error.request_id.startswith("req_")
    # The fault was consumed: the next request succeeds, and both were recorded.
    await analyse(client, solid(32, 32))
    assert len(fake.requests) == 2 and not fake.faults


async def test_insufficient_quota(fake: FakeOpenAI, client: openai.AsyncOpenAI) -> None:
    fake.faults.append(Fault(429, code="insufficient_quota", message="No more money."))
    with pytest.raises(openai.RateLimitError) as caught:
        await analyse(client, solid(32, 32))
    error = caught.value
    assert error.code == "insufficient_quota" and error.type == "insufficient_quota"
    assert isinstance(error.body, dict) and error.body["code"] == "insufficient_quota"
    assert error.message == "Error code: 429 - No more money."
    assert "retry-after" not in error.response.headers


async def test_server_errors(fake: FakeOpenAI, client: openai.AsyncOpenAI) -> None:
    fake.faults += [Fault(500), Fault(503, retry_after_s=1.5)]
    with pytest.raises(openai.InternalServerError) as caught:
        await analyse(client, solid(32, 32))
    assert caught.value.status_code == 500 and caught.value.type == "server_error"
    assert caught.value.code is None
    with pytest.raises(openai.InternalServerError) as caught:
        await analyse(client, solid(32, 32))
    assert caught.value.status_code == 503
    assert caught.value.response.headers["retry-after"] == "1.5"


async def test_scripted_400_and_401(fake: FakeOpenAI, client: openai.AsyncOpenAI) -> None:
    fake.faults += [Fault(400, code="content_policy_violation"), Fault(401)]
    with pytest.raises(openai.BadRequestError) as bad:
        await analyse(client, solid(32, 32))
    assert bad.value.code == "content_policy_violation"
    assert bad.value.type == "invalid_request_error"
    with pytest.raises(openai.AuthenticationError) as denied:
        await analyse(client, solid(32, 32))
    assert denied.value.code == "invalid_api_key"


async def test_401_without_an_api_key(fake: FakeOpenAI, client: openai.AsyncOpenAI) -> None:
    with pytest.raises(openai.AuthenticationError) as caught:
        await client.chat.completions.create(
            model="gpt-4o",
            messages=messages(solid(32, 32)),
            extra_headers={"Authorization": openai.Omit()},
        )
    assert caught.value.code == "invalid_api_key"
    assert fake.requests[-1]["api_key"] is None


async def test_content_filter_and_length(fake: FakeOpenAI, client: openai.AsyncOpenAI) -> None:
    url = solid(32, 32)
    fake.finish_reason_override += ["content_filter", "length"]
    with pytest.raises(openai.ContentFilterFinishReasonError) as filtered:
        await analyse(client, url)
    assert filtered.value.completion is not None
    assert filtered.value.completion.choices[0].message.content is None
    with pytest.raises(openai.LengthFinishReasonError) as cut:
        await analyse(client, url)
    truncated = cut.value.completion.choices[0].message.content or ""
    assert truncated and not truncated.endswith("}")
    assert cut.value.completion.usage is not None
    assert cut.value.completion.usage.completion_tokens == math.ceil(len(truncated) / 4)

    # create() does not raise: the finish_reason is the only sign.
    fake.finish_reason_override.append("content_filter")
    plain = await client.chat.completions.create(model="gpt-4o", messages=messages(url))
    assert plain.choices[0].finish_reason == "content_filter"
    assert plain.choices[0].message.content is None
    assert not fake.finish_reason_override


async def test_max_completion_tokens_cuts_the_answer(client: openai.AsyncOpenAI) -> None:
    with pytest.raises(openai.LengthFinishReasonError) as caught:
        await client.chat.completions.parse(
            model="gpt-4o",
            messages=messages(solid(32, 32)),
            response_format=Analysis,
            max_completion_tokens=5,
        )
    assert caught.value.completion.usage is not None
    assert caught.value.completion.usage.completion_tokens == 5


async def test_invalid_requests(fake: FakeOpenAI, client: openai.AsyncOpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as empty:
        await client.chat.completions.create(model="gpt-4o", messages=[])
    assert (empty.value.code, empty.value.param) == ("empty_array", "messages")

    with pytest.raises(openai.BadRequestError) as no_model:
        await client.chat.completions.create(model="", messages=messages(solid(8, 8)))
    assert "model" in no_model.value.message

    garbage = "data:image/png;base64," + base64.b64encode(b"not an image").decode()
    with pytest.raises(openai.BadRequestError) as broken:
        await analyse(client, garbage)
    assert broken.value.code == "invalid_image"
    assert broken.value.param == "messages[1].content[1].image_url.url"

    with pytest.raises(openai.BadRequestError) as detail:
        await analyse(client, solid(8, 8), detail="ultra")
    assert detail.value.code == "invalid_value"

    async with aiohttp.ClientSession() as session:
        url = f"{fake.base_url}/chat/completions"
        headers = {"Authorization": "Bearer sk-test", "Content-Type": "application/json"}
        async with session.post(url, data=b"{not json", headers=headers) as response:
            assert response.status == 400
            body = await response.json()
            assert body["error"]["type"] == "invalid_request_error"
            assert "x-request-id" in response.headers
    assert fake.requests[-1]["body"] == "{not json"


async def test_unknown_route_is_an_openai_404(client: openai.AsyncOpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as caught:
        await client.models.retrieve("gpt-4o")
    assert caught.value.message.startswith("Error code: 404 - Invalid URL (GET /v1/models/")


async def test_latency_makes_answers_slow(fake: FakeOpenAI, client: openai.AsyncOpenAI) -> None:
    fake.latency_s = 0.3
    started = time.monotonic()
    await analyse(client, solid(8, 8))
    assert time.monotonic() - started >= 0.3
    with pytest.raises(openai.APITimeoutError):
        await client.with_options(timeout=0.1).chat.completions.parse(
            model="gpt-4o", messages=messages(solid(8, 8)), response_format=Analysis
        )


# --- rate limits ------------------------------------------------------------------------


async def test_raw_response_headers(client: openai.AsyncOpenAI) -> None:
    raw = await client.chat.completions.with_raw_response.parse(
        model="gpt-4o", messages=messages(solid(16, 16)), response_format=Analysis
    )
    headers = raw.headers
    assert headers["x-request-id"].startswith("req_")
    for kind in ("requests", "tokens"):
        assert int(headers[f"x-ratelimit-limit-{kind}"]) >= int(
            headers[f"x-ratelimit-remaining-{kind}"]
        )
        assert DURATION.match(headers[f"x-ratelimit-reset-{kind}"])
    completion = raw.parse()
    assert isinstance(completion.choices[0].message.parsed, Analysis)


async def test_rps_limit_rejects_a_burst() -> None:
    async with FakeOpenAI(rps_limit=10) as fake, sdk(fake) as client:
        outcomes = await asyncio.gather(
            *(analyse(client, solid(8, 8)) for _ in range(30)), return_exceptions=True
        )
    limited = [o for o in outcomes if isinstance(o, openai.RateLimitError)]
    answered = [o for o in outcomes if not isinstance(o, BaseException)]
    assert len(limited) + len(answered) == 30
    assert 1 <= len(answered) <= 10
    assert fake.violations == len(limited) > 0
    error = limited[0]
    assert error.code == "rate_limit_exceeded" and error.type == "requests"
    assert 0 < float(error.response.headers["retry-after"]) <= 1
    assert error.response.headers["x-ratelimit-remaining-requests"] == "0"
    assert len(fake.requests) == 30


async def test_rps_limit_accepts_a_paced_client() -> None:
    # Each request leaves at least 1/9 s after the previous one arrived: never 10 in 1 s.
    async with FakeOpenAI(rps_limit=10) as fake, sdk(fake) as client:
        for _ in range(20):
            await analyse(client, solid(8, 8))
            await asyncio.sleep(1 / 9)
    assert fake.violations == 0 and len(fake.requests) == 20
    arrivals = [r["received_at"] for r in fake.requests]
    assert arrivals[-1] - arrivals[0] < 20 / 9 + 1  # and it really went at about 9/s


# --- the command line -------------------------------------------------------------------


async def test_cli_prints_ready_and_serves() -> None:
    process, line = await fake_on_command_line(
        FAKE_MODULE, "--rps", "10", stderr=asyncio.subprocess.PIPE
    )
    try:
        match = re.fullmatch(r"READY (http://127\.0\.0\.1:\d+/v1)\n", line)
        assert match, line
        async with openai.AsyncOpenAI(
            base_url=match.group(1), api_key="sk-test", max_retries=0
        ) as client:
            raw = await client.chat.completions.with_raw_response.parse(
                model="gpt-4o", messages=messages(solid(16, 16)), response_format=Analysis
            )
            assert raw.headers["x-ratelimit-limit-requests"] == "10"
            assert isinstance(raw.parse().choices[0].message.parsed, Analysis)
    finally:
        if process.returncode is None:
            process.terminate()
        _, stderr = await asyncio.wait_for(process.communicate(), timeout=10)
    assert process.returncode == 0, stderr.decode()
    assert b"Warning" not in stderr, stderr.decode()
