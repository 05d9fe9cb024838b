"""``listener run`` with tracemalloc on, a snapshot dumped every interval: for ``soak.py
--tracemalloc``, to find what grows in the daemon.

Usage (``soak.py`` starts it in place of ``python -m listener run``)::

    SOAK_TRACEMALLOC_DIR=/tmp/snaps SOAK_TRACEMALLOC_INTERVAL_S=60 \\
        python bench/tracemalloc_daemon.py

Environment: ``SOAK_TRACEMALLOC_DIR`` (required) receives ``snapshot-NNNN.pickle`` every
``SOAK_TRACEMALLOC_INTERVAL_S`` seconds (default 60), ``NNNN`` counting from 0 at start, and
one line per snapshot in ``stats.jsonl``: the memory tracemalloc sees (``traced_mb``), its own
(``tracemalloc_mb``), the process's ``VmRSS`` and ``RssAnon``, its threads and the objects the
garbage collector tracks, so growth outside Python's allocations (C extensions, the C
allocator's arenas) shows as RSS growing while ``traced_mb`` does not.
``SOAK_TRACEMALLOC_FRAMES`` frames are kept per allocation (default 8). A daemon thread takes
the snapshots: it holds the GIL while it copies the traces, so the daemon pauses for that
long (tens of milliseconds). Tracing costs memory of its own, growing with the live
allocations, so RSS measured meanwhile is not the daemon's: ``soak.py`` says so.
"""

from __future__ import annotations

import gc
import json
import os
import sys
import threading
import time
import tracemalloc
from pathlib import Path


def stats(n: int, t_s: float) -> dict[str, float]:
    """Snapshot ``n``'s line of ``stats.jsonl`` (sizes in MiB)."""
    traced, peak = tracemalloc.get_traced_memory()
    status = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        status[key] = value.split()[0] if value.split() else ""
    return {
        "n": n,
        "t_s": round(t_s, 1),
        "traced_mb": round(traced / 2**20, 2),
        "traced_peak_mb": round(peak / 2**20, 2),
        "tracemalloc_mb": round(tracemalloc.get_tracemalloc_memory() / 2**20, 2),
        "rss_mb": round(int(status.get("VmRSS", 0)) / 1024, 2),
        "rss_anon_mb": round(int(status.get("RssAnon", 0)) / 1024, 2),
        "threads": int(status.get("Threads", 0)),
        "gc_objects": len(gc.get_objects()),
    }


def snapshots(directory: Path, interval_s: float) -> None:
    """Dump a filtered snapshot into ``directory`` every ``interval_s`` seconds, forever."""
    ignore = [
        tracemalloc.Filter(False, tracemalloc.__file__),
        tracemalloc.Filter(False, "<frozen importlib._bootstrap>"),
        tracemalloc.Filter(False, "<frozen importlib._bootstrap_external>"),
        tracemalloc.Filter(False, "<unknown>"),
    ]
    began = time.monotonic()
    n = 0
    while True:
        snapshot = tracemalloc.take_snapshot().filter_traces(ignore)
        path = directory / f"snapshot-{n:04d}.pickle"
        snapshot.dump(str(path.with_suffix(".tmp")))
        path.with_suffix(".tmp").rename(path)
        with (directory / "stats.jsonl").open("a") as out:
            out.write(json.dumps(stats(n, time.monotonic() - began)) + "\n")
        n += 1
        time.sleep(max(0.0, began + n * interval_s - time.monotonic()))


def main() -> None:
    """Start tracing and the snapshot thread, then run ``listener run``."""
    directory = Path(os.environ["SOAK_TRACEMALLOC_DIR"])
    directory.mkdir(parents=True, exist_ok=True)
    interval_s = float(os.environ.get("SOAK_TRACEMALLOC_INTERVAL_S", "60"))
    tracemalloc.start(int(os.environ.get("SOAK_TRACEMALLOC_FRAMES", "8")))
    threading.Thread(
        target=snapshots, args=(directory, interval_s), name="tracemalloc", daemon=True
    ).start()
    from listener.cli import main as listener_main

    sys.argv = ["listener", "run"]
    listener_main()


if __name__ == "__main__":
    main()
