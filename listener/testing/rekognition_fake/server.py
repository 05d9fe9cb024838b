"""``FakeRekognition``: the aiohttp server, its knobs and what it records.

Every request is checked (authorization, operation, the TPS limit, scripted faults, content
type) here, then answered by an operation: face collections in ``face_collections``,
``DetectLabels`` in ``labels``.
"""

from __future__ import annotations

import asyncio
import functools
import math
import time
from collections import deque
from collections.abc import Awaitable, Callable
from types import TracebackType

from aiohttp import web

from listener.testing.rekognition_fake.face_collections import Collection, FaceCollections
from listener.testing.rekognition_fake.labels import detect_labels
from listener.testing.rekognition_fake.protocol import (
    CONTENT_TYPE,
    MAX_REQUEST_BYTES,
    TARGET_PREFIX,
    Json,
    RekognitionError,
    error_response,
    json_response,
    parse_body,
)
from listener.testing.rekognition_fake.worker import ImageWorker


class FakeRekognition:
    """The fake service on 127.0.0.1 (see the package docstring for behaviour and knobs).

    Attributes:
        endpoint_url: ``http://127.0.0.1:PORT`` once started.
        faults: exception names the next requests fail with, first in first out, one each.
        latency_s: seconds added to every admitted request.
        calls: ``(operation, time.monotonic())`` of every request, in arrival order.
        traceparents: ``(operation, traceparent header or None)`` of every request, same
            order.
        violations: requests refused for exceeding ``tps_limit``.
        collections: collection id -> ``Collection``.
    """

    def __init__(
        self, *, tps_limit: float | None = None, host: str = "127.0.0.1", port: int = 0
    ) -> None:
        if tps_limit is not None and tps_limit <= 0:
            raise ValueError("tps_limit must be positive")
        self.tps_limit = tps_limit
        self.endpoint_url = ""
        self.faults: list[str] = []
        self.latency_s = 0.0
        self.calls: list[tuple[str, float]] = []
        self.traceparents: list[tuple[str, str | None]] = []
        self.violations = 0
        self._worker = ImageWorker()
        self._faces = FaceCollections(self._worker)
        self.collections: dict[str, Collection] = self._faces.collections
        self._host = host
        self._port = port
        self._admitted: deque[float] = deque()
        self._runner: web.AppRunner | None = None
        self._operations: dict[str, Callable[[Json], Awaitable[Json]]] = {
            "CreateCollection": self._faces.create_collection,
            "ListCollections": self._faces.list_collections,
            "DeleteCollection": self._faces.delete_collection,
            "IndexFaces": self._faces.index_faces,
            "ListFaces": self._faces.list_faces,
            "DeleteFaces": self._faces.delete_faces,
            "SearchFaces": self._faces.search_faces,
            "DetectLabels": functools.partial(detect_labels, self._worker),
        }

    async def start(self) -> None:
        """Listen on the host and port given (port 0: a free one) and set ``endpoint_url``."""
        if self._runner is not None:
            raise RuntimeError("already started")
        self._worker.start()
        app = web.Application(client_max_size=MAX_REQUEST_BYTES)
        app.router.add_post("/", self._handle)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        self._runner = runner
        await web.TCPSite(runner, self._host, self._port).start()
        host, port = runner.addresses[0][:2]
        self.endpoint_url = f"http://{host}:{port}"

    async def close(self) -> None:
        """Stop serving and release the worker thread. Idempotent."""
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()
        await self._worker.close()

    async def __aenter__(self) -> FakeRekognition:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    # -- protocol ------------------------------------------------------------------------------

    async def _handle(self, request: web.Request) -> web.Response:
        target = request.headers.get("X-Amz-Target", "")
        operation = target.removeprefix(TARGET_PREFIX)
        now = time.monotonic()
        self.calls.append((operation, now))
        self.traceparents.append((operation, request.headers.get("traceparent")))
        try:
            if "Authorization" not in request.headers:
                raise RekognitionError(
                    "MissingAuthenticationTokenException", "Missing Authentication Token"
                )
            handler = self._operations.get(operation)
            if not target.startswith(TARGET_PREFIX) or handler is None:
                raise RekognitionError("UnknownOperationException", f"Unknown target {target!r}")
            if not self._admit(now):
                self.violations += 1
                raise RekognitionError("ThrottlingException", "Rate exceeded")
            if self.latency_s > 0:
                await asyncio.sleep(self.latency_s)
            if self.faults:
                fault = self.faults.pop(0)
                raise RekognitionError(fault, f"Injected fault: {fault}")
            if request.content_type != CONTENT_TYPE:
                raise RekognitionError(
                    "SerializationException", f"Content-Type must be {CONTENT_TYPE}"
                )
            params = parse_body(await request.read())
            result = await handler(params)
        except RekognitionError as error:
            return error_response(error)
        except Exception as error:  # a bug in the fake: show it to the client, as a 500
            return error_response(RekognitionError("InternalServerError", repr(error)))
        return json_response(200, result)

    def _admit(self, now: float) -> bool:
        """Whether a request at ``now`` fits the sliding window; records it if so."""
        if self.tps_limit is None:
            return True
        capacity = max(1, math.floor(self.tps_limit))
        window = capacity / self.tps_limit
        while self._admitted and self._admitted[0] <= now - window:
            self._admitted.popleft()
        if len(self._admitted) >= capacity:
            return False
        self._admitted.append(now)
        return True
