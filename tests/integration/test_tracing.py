"""OpenTelemetry traces: one trace per job (job -> fetch, steps), its context in the requests.

The daemon runs the tiered pipeline (local, Rekognition, OpenAI) against the fakes, with an
``InMemorySpanExporter`` behind the tracing; the fakes record the ``traceparent`` header each
request arrived with, as sent by the real ``openai`` and ``aioboto3`` clients.
"""

from __future__ import annotations

import shutil
from collections import defaultdict
from pathlib import Path

import asyncpg
import pytest
from awaiting import jobs_finished
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import StatusCode
from pydantic import SecretStr
from support import StaticServer, fast_settings, make_table

from listener.app import Daemon
from listener.cli.demo import BUNDLED_IMAGES
from listener.ops.otel import OtelTracing
from listener.settings import OpenAISettings, RateLimit, RekognitionSettings, TierSettings
from listener.testing import FakeOpenAI, FakeRekognition

pytestmark = pytest.mark.usefixtures("aws_env")
STEPS = ("local.analysis", "rekognition.labels", "openai.tier1")
PHOTOS = ("brick.png", "chelsea.png", "rocket.jpg")  # under 1 MiB once base64-encoded


def traceparent(span: ReadableSpan) -> str:
    """The W3C ``traceparent`` of ``span`` without its flags: ``00-<trace id>-<span id>``."""
    assert span.context is not None
    return f"00-{span.context.trace_id:032x}-{span.context.span_id:016x}"


def without_flags(header: str | None) -> str:
    """A ``traceparent`` header without its trailing flags (sampled, random trace id)."""
    assert header is not None
    return header.rsplit("-", 1)[0]


async def test_each_job_is_a_trace_carried_into_the_provider_requests(
    database_url: str, conn: asyncpg.Connection, tmp_path: Path
) -> None:
    for name in PHOTOS:
        shutil.copy(BUNDLED_IMAGES / name, tmp_path / name)
    (tmp_path / "not-an-image.png").write_bytes(b"plain text, not a PNG")
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    table = await make_table(conn, owner=True)
    async with (
        FakeOpenAI() as openai_fake,
        FakeRekognition() as rekognition_fake,
        StaticServer(str(tmp_path)) as photos,
    ):
        settings = fast_settings(
            database_url,
            pipeline="tiered",
            tiers=TierSettings(tier1=["local", "rekognition", "openai"]),
            openai=OpenAISettings(
                api_key=SecretStr("sk-test"),
                base_url=openai_fake.base_url,
                image_transport="inline",
            ),
            rekognition=RekognitionSettings(
                endpoint_url=rekognition_fake.endpoint_url, region="us-east-1"
            ),
            rate_limits={
                "openai": RateLimit(rps=100, burst=10, concurrency=4),
                "rekognition": RateLimit(rps=100, burst=10, concurrency=4),
            },
            max_attempts=1,
        )
        async with Daemon(settings, tracing=OtelTracing(provider)) as daemon:
            await conn.executemany(
                f"INSERT INTO {table} (url, owner_id) VALUES ($1, 'owner-1')",
                [(f"{photos.base_url}/{name}?token=secret-token",) for name in PHOTOS]
                + [(f"{photos.base_url}/not-an-image.png?token=secret-token",)],
            )
            await jobs_finished(daemon, conn, len(PHOTOS) + 1, timeout=60)
        openai_requests = list(openai_fake.requests)
        rekognition_headers = list(rekognition_fake.traceparents)
    provider.shutdown()

    spans = exporter.get_finished_spans()
    jobs = [s for s in spans if s.name == "listener.job"]
    assert len(jobs) == len(PHOTOS) + 1
    assert all(job.parent is None for job in jobs)  # each job is a trace of its own
    assert len({job.context.trace_id for job in jobs if job.context}) == len(jobs)
    children: dict[int, list[ReadableSpan]] = defaultdict(list)
    for span in spans:
        if span.parent is not None:
            children[span.parent.span_id].append(span)

    by_name: dict[str, list[ReadableSpan]] = defaultdict(list)
    for job in jobs:
        assert job.context is not None
        kids = children[job.context.span_id]
        names = [kid.name for kid in kids]
        assert all(kid.context and kid.context.trace_id == job.context.trace_id for kid in kids)
        for kid in kids:
            by_name[kid.name].append(kid)
        outcome = (job.attributes or {})["listener.job.outcome"]
        if outcome == "completed":
            assert names == ["listener.fetch", *(f"listener.step {s}" for s in STEPS)]
            assert job.status.status_code == StatusCode.UNSET
        else:  # the text file: the fetch rejects it, for good, and no step runs
            assert outcome == "discarded" and job.status.status_code == StatusCode.ERROR
            assert names == ["listener.fetch"]
            assert kids[0].status.status_code == StatusCode.ERROR
            assert [event.name for event in kids[0].events] == ["exception"]
    assert sorted(str((j.attributes or {})["listener.job.outcome"]) for j in jobs) == [
        "completed",
        "completed",
        "completed",
        "discarded",
    ]
    # Redacted, as in logs: no attribute, status or exception event holds the URL's token.
    exported = [
        (s.attributes, s.status.description, [(e.name, e.attributes) for e in s.events])
        for s in spans
    ]
    assert "secret-token" not in repr(exported)
    assert any("/not-an-image.png" in repr(item) for item in exported)
    openai_steps = by_name["listener.step openai.tier1"]
    assert all((s.attributes or {})["listener.provider"] == "openai" for s in openai_steps)
    assert all(int((s.attributes or {})["listener.tokens.input"]) > 0 for s in openai_steps)  # type: ignore[arg-type]

    # The real SDKs carried each step's trace context to the (fake) services.
    assert sorted(without_flags(r["traceparent"]) for r in openai_requests) == sorted(
        traceparent(s) for s in openai_steps
    )
    labels = {traceparent(s) for s in by_name["listener.step rekognition.labels"]}
    sent = [without_flags(h) for operation, h in rekognition_headers if operation == "DetectLabels"]
    assert len(sent) == len(PHOTOS) and set(sent) == labels
