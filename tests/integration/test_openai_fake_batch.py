"""The Batch API of ``listener.testing.FakeOpenAI`` through the real ``openai`` SDK.

Upload a JSONL file (``files.create``), create a batch, poll ``batches.retrieve`` until it is
terminal, then read the output and error files (``files.content``): the same calls a batch
provider makes against the real API, over real HTTP on 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import math
import time
from collections.abc import AsyncIterator
from typing import Any, Literal

import openai
import pytest
from openai.lib._parsing import type_to_response_format_param
from openai.types import Batch, FileObject
from openai.types.chat import ChatCompletion
from PIL import Image
from pydantic import BaseModel, Field

from listener.testing.openai_fake import FakeOpenAI

FAKE = FakeOpenAI  # the class of the ``fake`` fixture (conftest.py)

TERMINAL = ("completed", "failed", "expired", "cancelled")
PHASES = ("validating", "in_progress", "finalizing", "completed")
MODEL = "gpt-4o-mini"


class Caption(BaseModel):
    kind: Literal["photo", "drawing", "screenshot"]
    quality: int = Field(ge=0, le=10)
    tags: list[str]
    caption: str | None


def data_url(color: tuple[int, int, int], size: int = 32) -> str:
    buffer = io.BytesIO()
    Image.new("RGB", (size, size), color).save(buffer, "PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def chat_body(i: int, model: str = MODEL) -> dict[str, Any]:
    """A structured-output chat request about image ``i`` (distinct colour per ``i``)."""
    return {
        "model": model,
        "messages": [
            {"role": "system", "content": "You caption images."},
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": f"Caption image {i}."},
                    {"type": "image_url", "image_url": {"url": data_url((i * 40 % 256, 90, 30))}},
                ],
            },
        ],
        "response_format": type_to_response_format_param(Caption),
    }


def line(custom_id: str, body: dict[str, Any] | None = None, **overrides: Any) -> dict[str, Any]:
    item: dict[str, Any] = {
        "custom_id": custom_id,
        "method": "POST",
        "url": "/v1/chat/completions",
        "body": body if body is not None else chat_body(0),
    }
    item.update(overrides)
    return item


def jsonl(*items: Any) -> bytes:
    return "".join(json.dumps(item) + "\n" for item in items).encode()


def requests(n: int) -> bytes:
    return jsonl(*(line(f"req-{i}", chat_body(i)) for i in range(n)))


def parse_jsonl(text: str) -> list[dict[str, Any]]:
    return [json.loads(raw) for raw in text.splitlines() if raw.strip()]


@pytest.fixture
async def client(fake: FakeOpenAI) -> AsyncIterator[openai.AsyncOpenAI]:
    async with openai.AsyncOpenAI(base_url=fake.base_url, api_key="sk-test", max_retries=0) as c:
        yield c


async def upload(client: openai.AsyncOpenAI, data: bytes, name: str = "b.jsonl") -> FileObject:
    return await client.files.create(file=(name, data, "application/jsonl"), purpose="batch")


async def submit(client: openai.AsyncOpenAI, data: bytes, **kwargs: Any) -> Batch:
    uploaded = await upload(client, data)
    return await client.batches.create(
        input_file_id=uploaded.id,
        endpoint="/v1/chat/completions",
        completion_window="24h",
        **kwargs,
    )


async def poll(
    client: openai.AsyncOpenAI, batch_id: str, timeout: float = 10.0
) -> tuple[Batch, list[Batch]]:
    """Retrieve every 20 ms until terminal; return the last and every retrieved Batch."""
    seen: list[Batch] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        batch = await client.batches.retrieve(batch_id)
        seen.append(batch)
        if batch.status in TERMINAL:
            return batch, seen
        await asyncio.sleep(0.02)
    raise AssertionError(f"batch {batch_id} still {seen[-1].status} after {timeout} s")


async def lines_of(client: openai.AsyncOpenAI, file_id: str | None) -> list[dict[str, Any]]:
    assert file_id is not None
    content = await client.files.content(file_id)
    return parse_jsonl(content.text)


# --- the happy path ---------------------------------------------------------------------


async def test_upload_create_poll_and_read_the_output(
    fake: FakeOpenAI, client: openai.AsyncOpenAI
) -> None:
    data = requests(4)
    uploaded = await upload(client, data)
    assert uploaded.id.startswith("file-") and uploaded.object == "file"
    assert (uploaded.bytes, uploaded.filename, uploaded.purpose) == (len(data), "b.jsonl", "batch")
    assert uploaded.status == "processed" and abs(uploaded.created_at - time.time()) < 5
    assert (await client.files.content(uploaded.id)).read() == data == fake.files[uploaded.id]

    created = await client.batches.create(
        input_file_id=uploaded.id,
        endpoint="/v1/chat/completions",
        completion_window="24h",
        metadata={"job": "nightly"},
    )
    assert created.id.startswith("batch_") and created.object == "batch"
    assert created.status == "validating" and created.errors is None
    assert created.input_file_id == uploaded.id and created.endpoint == "/v1/chat/completions"
    assert created.completion_window == "24h" and created.metadata == {"job": "nightly"}
    assert created.output_file_id is None and created.error_file_id is None
    assert created.expires_at == created.created_at + 24 * 3600
    assert created.in_progress_at is None and created.completed_at is None
    assert created.request_counts is not None and created.request_counts.total == 0
    assert fake.usage_total["prompt_tokens"] == 0

    done, seen = await poll(client, created.id)
    statuses = [b.status for b in seen]
    assert statuses == sorted(statuses, key=PHASES.index), statuses  # never goes back
    assert "in_progress" in statuses or "finalizing" in statuses
    assert done.status == "completed" and done.error_file_id is None and done.errors is None
    assert done.request_counts is not None
    assert done.request_counts.model_dump() == {"total": 4, "completed": 4, "failed": 0}
    assert done.created_at <= done.in_progress_at <= done.finalizing_at <= done.completed_at  # type: ignore[operator]
    assert done.failed_at is done.expired_at is done.cancelled_at is None
    assert fake.batches[done.id]["status"] == "completed"

    output = await lines_of(client, done.output_file_id)
    assert [entry["custom_id"] for entry in output] == [f"req-{i}" for i in range(4)]
    prompt_tokens = completion_tokens = 0
    for entry in output:
        assert entry["id"].startswith("batch_req_") and entry["error"] is None
        response = entry["response"]
        assert response["status_code"] == 200 and response["request_id"].startswith("req_")
        completion = ChatCompletion.model_validate(response["body"])
        assert completion.model == MODEL and completion.choices[0].finish_reason == "stop"
        content = completion.choices[0].message.content
        assert content is not None
        Caption.model_validate_json(content)  # follows the schema
        assert completion.usage is not None
        assert completion.usage.completion_tokens == math.ceil(len(content) / 4)
        prompt_tokens += completion.usage.prompt_tokens
        completion_tokens += completion.usage.completion_tokens
    assert (
        len({entry["response"]["body"]["choices"][0]["message"]["content"] for entry in output}) > 1
    )

    assert fake.usage_total == {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
    }
    assert done.usage is not None
    assert (done.usage.input_tokens, done.usage.output_tokens) == (prompt_tokens, completion_tokens)
    output_bytes = (await client.files.content(done.output_file_id or "")).read()
    assert output_bytes == fake.files[done.output_file_id or ""]


async def test_batch_answers_like_the_chat_endpoint_and_ignores_rate_limits() -> None:
    """Same body, same content as POST /v1/chat/completions; no 429 even at 1 rps."""
    async with (
        FakeOpenAI(rps_limit=1) as fake,
        openai.AsyncOpenAI(base_url=fake.base_url, api_key="sk-test", max_retries=0) as client,
    ):
        direct = await client.chat.completions.parse(
            model=MODEL, messages=chat_body(3)["messages"], response_format=Caption
        )
        fake.batch_duration_s = 0.05
        batch = await submit(client, jsonl(*(line(f"same-{i}", chat_body(3)) for i in range(5))))
        done, _ = await poll(client, batch.id)
        assert done.status == "completed"
        output = await lines_of(client, done.output_file_id)
        assert len(output) == 5 and fake.violations == 0
        for entry in output:
            body = entry["response"]["body"]
            assert body["choices"][0]["message"]["content"] == direct.choices[0].message.content
            assert body["usage"]["prompt_tokens"] == direct.usage.prompt_tokens  # type: ignore[union-attr]


async def test_zero_duration_completes_on_the_first_retrieve(
    fake: FakeOpenAI, client: openai.AsyncOpenAI
) -> None:
    fake.batch_duration_s = 0
    created = await submit(client, requests(2))
    assert created.status == "validating"  # the create answer always is
    done = await client.batches.retrieve(created.id)
    assert done.status == "completed" and done.request_counts is not None
    assert done.request_counts.completed == 2


# --- partial failures and outcomes ------------------------------------------------------


async def test_partial_failures_go_to_the_error_file(
    fake: FakeOpenAI, client: openai.AsyncOpenAI
) -> None:
    fake.batch_fail_every = 3  # req-2 and req-5 (the 3rd and 6th requests)
    bad_body = {"model": MODEL, "messages": []}  # rejected as the chat endpoint would
    data = jsonl(*(line(f"req-{i}", chat_body(i)) for i in range(6)), line("bad", bad_body))
    batch = await submit(client, data)
    done, _ = await poll(client, batch.id)

    assert done.status == "completed"
    assert done.request_counts is not None
    assert done.request_counts.model_dump() == {"total": 7, "completed": 4, "failed": 3}
    output = await lines_of(client, done.output_file_id)
    assert [entry["custom_id"] for entry in output] == ["req-0", "req-1", "req-3", "req-4"]

    errors = {entry["custom_id"]: entry for entry in await lines_of(client, done.error_file_id)}
    assert sorted(errors) == ["bad", "req-2", "req-5"]
    for custom_id in ("req-2", "req-5"):
        entry = errors[custom_id]
        assert entry["error"] is None and entry["id"].startswith("batch_req_")
        assert entry["response"]["status_code"] == 500
        assert entry["response"]["request_id"].startswith("req_")
        assert entry["response"]["body"]["error"]["type"] == "server_error"
    invalid = errors["bad"]["response"]
    assert invalid["status_code"] == 400
    assert invalid["body"]["error"]["type"] == "invalid_request_error"
    assert invalid["body"]["error"]["code"] == "empty_array"
    assert done.usage is not None and fake.usage_total["prompt_tokens"] == done.usage.input_tokens


async def test_failed_outcome(fake: FakeOpenAI, client: openai.AsyncOpenAI) -> None:
    fake.batch_next_outcome = ["failed"]
    batch = await submit(client, requests(3))
    done, seen = await poll(client, batch.id)
    assert {b.status for b in seen[:-1]} <= {"validating"}
    assert done.status == "failed" and done.failed_at is not None
    assert done.errors is not None and done.errors.data
    assert done.errors.data[0].code == "token_limit_exceeded"
    assert done.errors.data[0].message
    assert done.output_file_id is None and done.error_file_id is None
    assert done.completed_at is None and fake.batch_next_outcome == []
    assert fake.usage_total["prompt_tokens"] == 0

    # The next batch is back to the default outcome.
    assert (await poll(client, (await submit(client, requests(1))).id))[0].status == "completed"


async def test_expired_outcome_keeps_the_first_half(
    fake: FakeOpenAI, client: openai.AsyncOpenAI
) -> None:
    fake.batch_next_outcome = ["expired"]
    fake.batch_fail_every = 2  # req-1 (req-3 never runs)
    batch = await submit(client, requests(5))
    done, seen = await poll(client, batch.id)
    assert "finalizing" not in {b.status for b in seen}
    assert done.status == "expired" and done.expired_at is not None
    assert done.completed_at is None
    assert done.request_counts is not None
    assert done.request_counts.model_dump() == {"total": 5, "completed": 1, "failed": 4}

    assert [e["custom_id"] for e in await lines_of(client, done.output_file_id)] == ["req-0"]
    errors = await lines_of(client, done.error_file_id)
    assert [e["custom_id"] for e in errors] == ["req-1", "req-2", "req-3", "req-4"]
    assert errors[0]["response"]["status_code"] == 500 and errors[0]["error"] is None
    for entry in errors[1:]:
        assert entry["response"] is None
        assert entry["error"] == {
            "code": "batch_expired",
            "message": "This request could not be executed before the completion window expired.",
        }


async def test_cancel(fake: FakeOpenAI, client: openai.AsyncOpenAI) -> None:
    fake.batch_next_outcome = ["cancelled"]  # stuck "in_progress" until cancelled
    fake.batch_duration_s = 0.05
    batch = await submit(client, requests(3))
    await asyncio.sleep(0.2)
    stuck = await client.batches.retrieve(batch.id)
    assert stuck.status == "in_progress" and stuck.request_counts is not None
    assert stuck.request_counts.total == 3

    cancelling = await client.batches.cancel(batch.id)
    assert cancelling.status == "cancelling" and cancelling.cancelling_at is not None
    assert (await client.batches.cancel(batch.id)).status == "cancelling"  # idempotent
    done, _ = await poll(client, batch.id)
    assert done.status == "cancelled" and done.cancelled_at is not None
    assert done.output_file_id is None
    errors = await lines_of(client, done.error_file_id)
    assert [e["custom_id"] for e in errors] == ["req-0", "req-1", "req-2"]
    assert all(e["response"] is None and e["error"]["code"] == "batch_cancelled" for e in errors)
    assert fake.usage_total["prompt_tokens"] == 0
    assert (await client.batches.cancel(batch.id)).status == "cancelled"


async def test_cancel_while_validating_and_after_completion(
    fake: FakeOpenAI, client: openai.AsyncOpenAI
) -> None:
    fake.batch_duration_s = 5
    fake.batch_cancel_s = 0
    batch = await submit(client, requests(2))
    assert (await client.batches.cancel(batch.id)).status == "cancelling"
    done = await client.batches.retrieve(batch.id)
    assert done.status == "cancelled" and done.request_counts is not None
    assert done.request_counts.model_dump() == {"total": 2, "completed": 0, "failed": 2}

    fake.batch_duration_s = 0
    finished = await submit(client, requests(1))
    assert (await client.batches.retrieve(finished.id)).status == "completed"
    with pytest.raises(openai.ConflictError) as caught:
        await client.batches.cancel(finished.id)
    assert caught.value.status_code == 409
    assert "completed" in caught.value.message

    with pytest.raises(openai.NotFoundError):
        await client.batches.cancel("batch_nope")


async def test_request_counts_only_grow(fake: FakeOpenAI, client: openai.AsyncOpenAI) -> None:
    fake.batch_duration_s = 1.0
    fake.batch_fail_every = 2
    batch = await submit(client, requests(20))
    done, seen = await poll(client, batch.id)
    assert done.status == "completed"
    done_counts = [
        (b.request_counts.completed, b.request_counts.failed) for b in seen if b.request_counts
    ]
    assert done_counts == sorted(done_counts)
    assert any(0 < c + f < 20 for c, f in done_counts)  # seen part-way
    assert done_counts[-1] == (10, 10)


async def test_list_batches_newest_first(fake: FakeOpenAI, client: openai.AsyncOpenAI) -> None:
    ids = [(await submit(client, requests(1))).id for _ in range(3)]
    page = await client.batches.list(limit=2)
    assert [b.id for b in page.data] == ids[::-1][:2] and page.has_more
    assert [b.id async for b in client.batches.list(limit=2)] == ids[::-1]


async def test_list_pages_with_after_and_limit_carry_metadata(
    fake: FakeOpenAI, client: openai.AsyncOpenAI
) -> None:
    ids = [
        (await submit(client, requests(1), metadata={"listener_batch": f"lb_{i}"})).id
        for i in range(5)
    ]
    first = await client.batches.list(limit=2)
    assert [b.id for b in first.data] == [ids[4], ids[3]] and first.has_more
    second = await client.batches.list(limit=2, after=first.data[-1].id)
    assert [b.id for b in second.data] == [ids[2], ids[1]] and second.has_more
    last = await client.batches.list(limit=2, after=second.data[-1].id)
    assert [b.id for b in last.data] == [ids[0]] and not last.has_more
    assert [b.metadata for b in last.data] == [{"listener_batch": "lb_0"}]
    assert all(b.input_file_id.startswith("file-") for b in first.data)
    # The SDK's paginator follows the cursor (after = the last id of each page) to the end.
    listed = [b async for b in client.batches.list(limit=2)]
    assert [b.id for b in listed] == ids[::-1]
    assert [(b.metadata or {})["listener_batch"] for b in listed] == [
        f"lb_{i}" for i in (4, 3, 2, 1, 0)
    ]
    with pytest.raises(openai.BadRequestError) as bad:
        await client.batches.list(limit=101)
    assert bad.value.param == "limit"
    with pytest.raises(openai.BadRequestError) as unknown:
        await client.batches.list(after="batch_nope")
    assert unknown.value.param == "after"


async def test_cancel_a_listed_batch_by_its_metadata(
    fake: FakeOpenAI, client: openai.AsyncOpenAI
) -> None:
    fake.batch_duration_s = 5
    mine = await submit(client, requests(2), metadata={"listener_batch": "lb_x", "k": "v"})
    other = await submit(client, requests(1))
    found = [b async for b in client.batches.list(limit=100) if (b.metadata or {}).get("k")]
    assert [b.id for b in found] == [mine.id]
    assert (await client.batches.cancel(found[0].id)).status == "cancelling"
    assert (await client.batches.retrieve(other.id)).status == "validating"
    listed = {b.id: b.status async for b in client.batches.list()}
    assert listed == {mine.id: "cancelling", other.id: "validating"}


@pytest.mark.parametrize(
    ("metadata", "param", "code", "message"),
    [
        (
            {f"k{i}": "v" for i in range(17)},
            "metadata",
            "object_above_max_properties",
            "Invalid 'metadata': too many properties. Expected an object with at most 16 "
            "properties, but got an object with 17 properties instead.",
        ),
        (
            {"k" * 65: "v"},
            "metadata." + "k" * 65,
            "string_above_max_length",
            f"Invalid property name in 'metadata': '{'k' * 65}' is too long. Expected a "
            "string with maximum length 64, but got a string with length 65 instead.",
        ),
        (
            {"k": "v" * 513},
            "metadata.k",
            "string_above_max_length",
            "Invalid 'metadata.k': string too long. Expected a string with maximum length "
            "512, but got a string with length 513 instead.",
        ),
        (
            {"k": 1},
            "metadata.k",
            "invalid_type",
            "Invalid type for 'metadata.k': expected a string, but got an integer instead.",
        ),
        (
            "x",
            "metadata",
            "invalid_type",
            "Invalid type for 'metadata': expected a metadata object, but got a string instead.",
        ),
    ],
)
async def test_metadata_limits(
    fake: FakeOpenAI,
    client: openai.AsyncOpenAI,
    metadata: Any,
    param: str,
    code: str,
    message: str,
) -> None:
    uploaded = await upload(client, requests(1))
    with pytest.raises(openai.BadRequestError) as caught:
        await client.batches.create(
            input_file_id=uploaded.id,
            endpoint="/v1/chat/completions",
            completion_window="24h",
            metadata=metadata,
        )
    assert caught.value.type == "invalid_request_error"
    assert isinstance(caught.value.body, dict)
    assert (caught.value.param, caught.value.code, caught.value.body["message"]) == (
        param,
        code,
        message,
    )
    assert fake.batches == {}
    # At the limits: 16 pairs, 64-character keys, 512-character values.
    limits = {f"{i:02d}" + "k" * 62: "v" * 512 for i in range(16)}
    batch = await client.batches.create(
        input_file_id=uploaded.id,
        endpoint="/v1/chat/completions",
        completion_window="24h",
        metadata=limits,
    )
    assert batch.metadata == limits
    assert (await client.batches.retrieve(batch.id)).metadata == limits


async def test_batch_create_hook_runs_before_the_batch_exists(
    fake: FakeOpenAI, client: openai.AsyncOpenAI
) -> None:
    seen: list[tuple[dict[str, Any], int]] = []

    async def hook(body: dict[str, Any]) -> None:
        seen.append((body, len(fake.batches)))
        await asyncio.sleep(0.2)  # in flight: not listed yet
        assert [b async for b in client.batches.list()] == []

    fake.batch_create_hook = hook
    uploaded = await upload(client, requests(1), name="lb_1.jsonl")
    created = await client.batches.create(
        input_file_id=uploaded.id,
        endpoint="/v1/chat/completions",
        completion_window="24h",
        metadata={"listener_batch": "lb_1"},
    )
    assert [(b["metadata"], n) for b, n in seen] == [({"listener_batch": "lb_1"}, 0)]
    assert list(fake.batches) == [created.id]
    assert fake.files_meta[uploaded.id]["filename"] == "lb_1.jsonl"


# --- validation -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "code"),
    [
        (jsonl(line("a"), line("a")), "duplicate_custom_id"),
        (jsonl(line("a", url="/v1/embeddings")), "invalid_url"),
        (jsonl(line("a", method="GET")), "invalid_method"),
        (jsonl(line("a"), {**line("b"), "body": []}), "invalid_body"),
        (jsonl({"method": "POST", "url": "/v1/chat/completions", "body": {}}), "missing_custom_id"),
        (jsonl(line("a")) + b"{not json\n", "invalid_json_line"),
        (jsonl(line("a", chat_body(0, "gpt-4o")), line("b")), "mismatched_model"),
        (b"\n\n", "empty_file"),
        (b"\xff\xfe", "invalid_file_format"),
    ],
)
async def test_invalid_batch_files_are_400(
    fake: FakeOpenAI, client: openai.AsyncOpenAI, data: bytes, code: str
) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        await upload(client, data)
    assert caught.value.status_code == 400
    assert caught.value.code == code and caught.value.type == "invalid_request_error"
    assert caught.value.param == "file"
    assert fake.files == {}


async def test_a_batch_file_must_be_jsonl(client: openai.AsyncOpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        await upload(client, jsonl(line("a", {"model": MODEL})), name="b.json")
    assert caught.value.code == "invalid_file_format"


async def test_invalid_batch_creations(fake: FakeOpenAI, client: openai.AsyncOpenAI) -> None:
    uploaded = await upload(client, requests(1))
    with pytest.raises(openai.NotFoundError) as missing:
        await client.batches.create(
            input_file_id="file-nope", endpoint="/v1/chat/completions", completion_window="24h"
        )
    assert missing.value.param == "input_file_id"
    with pytest.raises(openai.BadRequestError) as endpoint:
        await client.batches.create(
            input_file_id=uploaded.id, endpoint="/v1/embeddings", completion_window="24h"
        )
    assert endpoint.value.param == "endpoint"
    with pytest.raises(openai.BadRequestError) as window:
        await client.batches.create(
            input_file_id=uploaded.id,
            endpoint="/v1/chat/completions",
            completion_window="1h",  # type: ignore[arg-type]
        )
    assert window.value.param == "completion_window"

    other = await client.files.create(
        file=("notes.txt", b"hello", "text/plain"), purpose="user_data"
    )
    with pytest.raises(openai.BadRequestError) as purpose:
        await client.batches.create(
            input_file_id=other.id, endpoint="/v1/chat/completions", completion_window="24h"
        )
    assert purpose.value.param == "input_file_id"
    assert fake.batches == {}

    with pytest.raises(openai.NotFoundError):
        await client.files.content("file-nope")
    with pytest.raises(openai.NotFoundError):
        await client.batches.retrieve("batch_nope")


async def test_every_batch_endpoint_wants_a_key(client: openai.AsyncOpenAI) -> None:
    uploaded = await upload(client, requests(1))
    no_key = {"Authorization": openai.Omit()}
    with pytest.raises(openai.AuthenticationError) as caught:
        await client.files.content(uploaded.id, extra_headers=no_key)
    assert caught.value.code == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        await client.files.create(
            file=("b.jsonl", requests(1), "application/jsonl"),
            purpose="batch",
            extra_headers=no_key,
        )
    with pytest.raises(openai.AuthenticationError):
        await client.batches.list(extra_headers=no_key)
