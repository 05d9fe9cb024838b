"""The one thread image work runs on, and the face analyzer it owns."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from listener.testing.rekognition_fake.faces import Analysis, FaceAnalyzer
from listener.testing.rekognition_fake.protocol import Json, RekognitionError, image_bytes

_T = TypeVar("_T")


class ImageWorker:
    """Runs image work off the event loop, on one thread between ``start`` and ``close``.

    One thread: the event loop stays free to accept (and time) requests, and the OpenCV
    objects are never used from two threads at once.
    """

    def __init__(self) -> None:
        self._executor: ThreadPoolExecutor | None = None
        self._analyzer = FaceAnalyzer()

    def start(self) -> None:
        """Start the worker thread."""
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fake-rekognition")

    async def close(self) -> None:
        """Stop the worker thread, dropping work not started. Idempotent."""
        executor, self._executor = self._executor, None
        if executor is not None:
            await asyncio.to_thread(executor.shutdown, wait=True, cancel_futures=True)

    async def run(self, func: Callable[..., _T], *args: Any) -> _T:
        """``func(*args)`` on the worker thread.

        Raises:
            RekognitionError: ``ServiceUnavailableException`` when the worker is not started.
        """
        if self._executor is None:
            raise RekognitionError("ServiceUnavailableException", "the fake is not running")
        return await asyncio.get_running_loop().run_in_executor(self._executor, func, *args)

    async def analyze(self, params: Json) -> Analysis:
        """The faces of a request's ``Image`` (see ``FaceAnalyzer.analyze`` for its errors)."""
        return await self.run(self._analyzer.analyze, image_bytes(params.get("Image")))
