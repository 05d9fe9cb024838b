"""Local fakes of the OpenAI and Amazon Rekognition APIs, for your own tests and CI.

listener stores what OpenAI and Rekognition answered; code that reads those results (your app,
your reports) can be tested end to end, without credentials or cost, by running listener
against these fakes. Each is a real aiohttp server on 127.0.0.1 that speaks the service's wire
protocol, so the real SDKs (``openai``, ``boto3`` / ``aioboto3``) and listener's providers talk
to it unchanged. Answers are deterministic functions of the image: the same photo always gets
the same labels, scores and faces.

In a test (pytest with an asyncio plugin)::

    from listener.testing import FakeOpenAI, FakeRekognition, Fault

    async with FakeOpenAI() as openai_fake, FakeRekognition() as rekognition_fake:
        # OpenAI SDK: base_url; any non-empty key is accepted.
        client = openai.AsyncOpenAI(base_url=openai_fake.base_url, api_key="sk-test")
        # boto3 / aioboto3: endpoint_url; any credentials are accepted (not verified).
        session = aioboto3.Session(aws_access_key_id="testing",
                                   aws_secret_access_key="testing", region_name="us-east-1")
        async with session.client("rekognition",
                                  endpoint_url=rekognition_fake.endpoint_url) as rekognition:
            ...
        openai_fake.faults.append(Fault(429, retry_after_s=1))  # the next request gets a 429
        rekognition_fake.faults.append("ThrottlingException")    # and the next AWS call

As processes, for a daemon under test (each prints ``READY <url>`` on stdout once it listens,
and serves until SIGTERM or SIGINT)::

    python -m listener.testing.openai_fake --port 8001        # READY http://127.0.0.1:8001/v1
    python -m listener.testing.rekognition_fake --port 8002   # READY http://127.0.0.1:8002

    LISTENER_PIPELINE=tiered \\
    LISTENER_OPENAI__API_KEY=sk-test LISTENER_OPENAI__BASE_URL=http://127.0.0.1:8001/v1 \\
    LISTENER_OPENAI__IMAGE_TRANSPORT=inline \\
    LISTENER_REKOGNITION__ENDPOINT_URL=http://127.0.0.1:8002 \\
    AWS_ACCESS_KEY_ID=testing AWS_SECRET_ACCESS_KEY=testing AWS_DEFAULT_REGION=us-east-1 \\
    listener run

(``inline`` sends images as data URLs: the OpenAI fake never fetches a URL, and answers for an
http(s) image from its URL alone.) ``listener demo --providers openai,rekognition`` runs the
daemon against both this way.

What they cover: OpenAI chat completions with structured outputs (``response_format``
``json_schema``), the Files and Batch APIs, a request rate limit with OpenAI's headers;
Rekognition DetectLabels and face collections (CreateCollection, IndexFaces, ListFaces,
DeleteFaces, SearchFaces) with a real face signature, so the same face in two photos matches.
Faults a test can inject: scripted errors (429 with ``retry-after``, ``insufficient_quota``,
5xx, 400, 401; any AWS error name), latency, rate limits, content-filter and truncated answers,
and batches that fail, expire or are cancelled. What each request carried (body, key, the
``traceparent`` header) is recorded for assertions. ``face_photo`` and ``no_face_photo`` make
test photos the Rekognition fake recognises. Each module's docstring has the details.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from listener.testing.openai_fake import FakeOpenAI, Fault
    from listener.testing.rekognition_fake import FakeRekognition, face_photo, no_face_photo

__all__ = ["FakeOpenAI", "FakeRekognition", "Fault", "face_photo", "no_face_photo"]

_HOMES = {
    "FakeOpenAI": "openai_fake",
    "Fault": "openai_fake",
    "FakeRekognition": "rekognition_fake",
    "face_photo": "rekognition_fake",
    "no_face_photo": "rekognition_fake",
}


def __getattr__(name: str) -> Any:
    """The fakes load on first use, so ``listener.testing.cluster`` (the demo's throwaway
    Postgres) costs none of their imports (aiohttp, Pillow, OpenCV).

    Raises:
        AttributeError: ``name`` is not one of ``__all__``.
    """
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"listener.testing.{home}"), name)
