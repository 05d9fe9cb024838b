"""``listener run`` with tracemalloc on, recording what its memory is made of over time: for
``soak.py --tracemalloc``, to find what grows in the daemon.

Usage (``soak.py`` starts it in place of ``python -m listener run``)::

    SOAK_TRACEMALLOC_DIR=/tmp/snaps SOAK_TRACEMALLOC_INTERVAL_S=60 \\
        python bench/tracemalloc_daemon.py

Environment:

- ``SOAK_TRACEMALLOC_DIR`` (required): where the records go.
- ``SOAK_TRACEMALLOC_INTERVAL_S`` (default 60): every interval, one line of ``stats.jsonl``:
  the memory tracemalloc sees (``traced_mb``: Python's allocations), its own
  (``tracemalloc_mb``), the process's ``VmRSS`` and ``RssAnon``, its threads, the objects the
  garbage collector tracks and their count by type (``types``). RSS growing while
  ``traced_mb`` does not is growth outside Python's allocations (C extensions, the C
  allocator); a type whose count grows is what leaks.
- ``SOAK_TRACEMALLOC_SNAPSHOT_EVERY`` (default 5): every that many intervals (and the first),
  also ``snapshot-NNNN.pickle`` (``NNNN``: the stats line's ``n``), for ``compare_to`` by
  traceback. Taking one copies every live trace while holding the GIL: seconds in a large
  heap, during which the daemon stands still.
- ``SOAK_TRACEMALLOC_FRAMES`` (default 8): frames kept per allocation. Tracing slows every
  allocation (the daemon sustains a few hundred jobs a second under it, not thousands) and
  costs memory of its own, so RSS measured meanwhile is not the daemon's: ``soak.py`` says so.
  0: no tracing and no snapshots, only the statistics of the allocators below, at full speed.

Each stats line also has the allocators' own view, whatever the frames: ``pymalloc`` (Python's
small-object allocator, from ``sys._debugmallocstats``: arenas, bytes in used and free blocks)
and ``malloc`` (glibc's ``mallinfo2``: ``arena`` bytes of the heap, ``uordblks`` in use,
``fordblks`` free in it, ``hblkhd`` in mmapped blocks). Memory freed but kept by an allocator
(fragmentation) shows as its free bytes growing, not its used ones.
"""

from __future__ import annotations

import collections
import ctypes
import gc
import json
import os
import re
import sys
import tempfile
import threading
import time
import tracemalloc
from pathlib import Path
from typing import Any


class _MallInfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in (
            "arena",
            "ordblks",
            "smblks",
            "hblks",
            "hblkhd",
            "usmblks",
            "fsmblks",
            "uordblks",
            "fordblks",
            "keepcost",
        )
    ]


def malloc_stats() -> dict[str, float]:
    """glibc's ``mallinfo2`` in MiB (empty where it is missing: another C library)."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallinfo2.restype = _MallInfo2
        info = libc.mallinfo2()
    except (OSError, AttributeError):
        return {}
    return {
        name: round(getattr(info, name) / 2**20, 2)
        for name in ("arena", "uordblks", "fordblks", "hblkhd", "keepcost")
    }


_PYMALLOC = {
    "arenas": r"# arenas allocated current\s*=\s*([\d,]+)",
    "used_mb": r"# bytes in allocated blocks\s*=\s*([\d,]+)",
    "free_mb": r"# bytes in available blocks\s*=\s*([\d,]+)",
    "total_mb": r"^Total\s*=\s*([\d,]+)",
}


def pymalloc_stats() -> dict[str, float]:
    """Python's small-object allocator, from ``sys._debugmallocstats`` (which writes to file
    descriptor 2: borrowed for the call, so a log line written at that moment is lost)."""
    with tempfile.TemporaryFile(mode="w+") as out:
        saved = os.dup(2)
        try:
            os.dup2(out.fileno(), 2)
            sys._debugmallocstats()
        finally:
            os.dup2(saved, 2)
            os.close(saved)
        out.seek(0)
        text = out.read()
    found: dict[str, float] = {}
    for key, pattern in _PYMALLOC.items():
        match = re.search(pattern, text, re.MULTILINE)
        if match:
            value = int(match.group(1).replace(",", ""))
            found[key] = value if key == "arenas" else round(value / 2**20, 2)
    return found


def stats(n: int, t_s: float) -> dict[str, Any]:
    """Line ``n`` of ``stats.jsonl`` (sizes in MiB), ``t_s`` seconds after start."""
    traced, peak = tracemalloc.get_traced_memory()
    status = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        status[key] = value.split()[0] if value.split() else ""
    types = collections.Counter(type(o).__qualname__ for o in gc.get_objects())
    return {
        "n": n,
        "t_s": round(t_s, 1),
        "traced_mb": round(traced / 2**20, 2),
        "traced_peak_mb": round(peak / 2**20, 2),
        "tracemalloc_mb": round(tracemalloc.get_tracemalloc_memory() / 2**20, 2),
        "rss_mb": round(int(status.get("VmRSS", 0)) / 1024, 2),
        "rss_anon_mb": round(int(status.get("RssAnon", 0)) / 1024, 2),
        "threads": int(status.get("Threads", 0)),
        "gc_objects": sum(types.values()),
        "types": dict(types.most_common(200)),
        "pymalloc": pymalloc_stats(),
        "malloc": malloc_stats(),
    }


def record(directory: Path, interval_s: float, snapshot_every: int) -> None:
    """Write a stats line every ``interval_s`` seconds, and a snapshot every
    ``snapshot_every`` lines, forever."""
    ignore = [
        tracemalloc.Filter(False, tracemalloc.__file__),
        tracemalloc.Filter(False, "<frozen importlib._bootstrap>"),
        tracemalloc.Filter(False, "<frozen importlib._bootstrap_external>"),
        tracemalloc.Filter(False, "<unknown>"),
    ]
    began = time.monotonic()
    n = 0
    while True:
        time.sleep(max(0.0, began + (n + 1) * interval_s - time.monotonic()))
        n += 1
        line = stats(n, time.monotonic() - began)
        if tracemalloc.is_tracing() and (n == 1 or n % snapshot_every == 0):
            taken = time.monotonic()
            snapshot = tracemalloc.take_snapshot().filter_traces(ignore)
            path = directory / f"snapshot-{n:04d}.pickle"
            snapshot.dump(str(path.with_suffix(".tmp")))
            path.with_suffix(".tmp").rename(path)
            del snapshot
            line["snapshot_s"] = round(time.monotonic() - taken, 2)
        with (directory / "stats.jsonl").open("a") as out:
            out.write(json.dumps(line) + "\n")


def main() -> None:
    """Start tracing and the recording thread, then run ``listener run``."""
    directory = Path(os.environ["SOAK_TRACEMALLOC_DIR"])
    directory.mkdir(parents=True, exist_ok=True)
    interval_s = float(os.environ.get("SOAK_TRACEMALLOC_INTERVAL_S", "60"))
    every = int(os.environ.get("SOAK_TRACEMALLOC_SNAPSHOT_EVERY", "5"))
    frames = int(os.environ.get("SOAK_TRACEMALLOC_FRAMES", "8"))
    if frames > 0:
        tracemalloc.start(frames)
    threading.Thread(
        target=record, args=(directory, interval_s, every), name="tracemalloc", daemon=True
    ).start()
    from listener.cli import main as listener_main

    sys.argv = ["listener", "run"]
    listener_main()


if __name__ == "__main__":
    main()
