"""``listener run`` with tracemalloc on, a snapshot dumped every interval: for ``soak.py
--tracemalloc``, to find what grows in the daemon.

Usage (``soak.py`` starts it in place of ``python -m listener run``)::

    SOAK_TRACEMALLOC_DIR=/tmp/snaps SOAK_TRACEMALLOC_INTERVAL_S=60 \\
        python bench/tracemalloc_daemon.py

Environment: ``SOAK_TRACEMALLOC_DIR`` (required) receives ``snapshot-NNNN.pickle`` every
``SOAK_TRACEMALLOC_INTERVAL_S`` seconds (default 60), ``NNNN`` counting from 0 at start;
``SOAK_TRACEMALLOC_FRAMES`` frames are kept per allocation (default 15). A daemon thread takes
the snapshots: it holds the GIL while it copies the traces, so the daemon pauses for that
long (tens of milliseconds). Tracing costs memory of its own, growing with the live
allocations, so RSS measured meanwhile is not the daemon's: ``soak.py`` says so.
"""

from __future__ import annotations

import os
import sys
import threading
import time
import tracemalloc
from pathlib import Path


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
        n += 1
        time.sleep(max(0.0, began + n * interval_s - time.monotonic()))


def main() -> None:
    """Start tracing and the snapshot thread, then run ``listener run``."""
    directory = Path(os.environ["SOAK_TRACEMALLOC_DIR"])
    directory.mkdir(parents=True, exist_ok=True)
    interval_s = float(os.environ.get("SOAK_TRACEMALLOC_INTERVAL_S", "60"))
    tracemalloc.start(int(os.environ.get("SOAK_TRACEMALLOC_FRAMES", "15")))
    threading.Thread(
        target=snapshots, args=(directory, interval_s), name="tracemalloc", daemon=True
    ).start()
    from listener.cli import main as listener_main

    sys.argv = ["listener", "run"]
    listener_main()


if __name__ == "__main__":
    main()
