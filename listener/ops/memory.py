"""Gives the C allocator's free memory back to the system every few minutes.

Python hands every allocation over 512 bytes (query results, buffers, large lists and
strings) to the C library's ``malloc``. glibc's heap only shrinks from its top, so memory
freed in its middle stays resident: under a steady load a daemon's heap fills with free gaps
of the sizes it no longer needs, and its RSS creeps up although what it uses does not (an
hour at 800 jobs/s measured the heap's in-use bytes flat at ~15 MB while its free bytes grew
from 5 to 11 MB in 10 minutes, and RSS with them: ``bench/soak.py``,
``docs/explanations/benchmarks.md``). ``malloc_trim(0)`` returns every whole free page of the
heap to the kernel (``madvise(MADV_DONTNEED)``); the daemon calls it every
``LISTENER_MALLOC_TRIM_INTERVAL_S`` seconds (a walk of the heap's free chunks: a few
milliseconds for tens of MB, during which the event loop waits). Where the C library is not
glibc (musl, macOS) it does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
from collections.abc import Callable

from listener.queue.loops import Loop


@functools.cache
def _glibc_trim() -> Callable[[int], int] | None:
    """glibc's ``malloc_trim``, or None where the C library has none."""
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        trim = ctypes.CDLL(name).malloc_trim
    except (OSError, AttributeError):
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return trim


def malloc_trim() -> bool | None:
    """Return the C heap's free pages to the system now.

    Returns:
        True when memory was returned, False when there was none to return, None where the
        C library has no ``malloc_trim`` (not glibc).
    """
    trim = _glibc_trim()
    if trim is None:
        return None
    return bool(trim(0))


class MemoryTrim:
    """The daemon's ``malloc_trim`` loop: a trim every ``interval_s`` seconds.

    Args:
        interval_s: seconds between trims.
        trim: the trim to call (tests count calls).
    """

    def __init__(self, interval_s: float, trim: Callable[[], bool | None] = malloc_trim) -> None:
        self._trim = trim
        self.loop = Loop("trim", self._tick, interval_s, label="memory trim")
        self.trims = 0
        """Trims that returned memory since start."""

    def stop(self) -> None:
        """End ``run`` (no trim at stop)."""
        self.loop.stop()

    async def run(self) -> None:
        """Trim every ``interval_s`` until stopped."""
        await self.loop.run()

    async def _tick(self) -> int:
        returned = 1 if self._trim() else 0
        self.trims += returned
        return returned
