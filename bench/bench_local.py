"""The ``local`` provider end to end on the demo's photographs: where the time goes, and how
it scales with worker processes.

Usage::

    python bench/bench_local.py                        # 10 s per phase, about 1 minute
    python bench/bench_local.py --against dc7f25f      # plus analyze_bytes of another revision
    python bench/bench_local.py --seconds 5 --json bench/results/local.json
    python bench/bench_local.py --smoke                # 1 s per phase: runs, not figures

The photographs are ``listener/demo_images/*`` (``SOURCES.md`` left out), served over HTTP on
127.0.0.1 by an aiohttp static server in a subprocess of the script (``--serve``), and fetched
with listener's own fetcher, ``listener.analysis.fetch.ImageFetcher.fetch`` (what the
dispatcher calls; default ``FetchSettings`` but ``allowed_hosts=["127.0.0.1"]``, since the
SSRF guard refuses loopback otherwise): the GET, the streamed body and the header probe in a
thread.

Phases, each time-boxed to ``--seconds`` after one untimed warm-up pass over the photos; a
phase runs whole rounds (every photo once per round) until its time is up:

1. **fetch**: one fetch at a time, in this process. Per image, in ms.
2. **analysis split**, in this process, pinned to one CPU (``os.sched_setaffinity``) with
   OpenCV on one thread, as in a worker: per photo, the stages of ``analyze_bytes`` timed one
   by one (the same calls, in the same order: ``decode`` is ``local._decode``, i.e. the
   structure scan, EXIF, the JPEG draft to gray and the load; ``gray`` is ``_gray_levels``,
   ``_downscale`` to ``analysis_max_side`` and ``_orient``; ``quality`` is the Laplacian
   variance, exposure, contrast and the score; ``phash``; ``face detection`` is
   ``local_faces.face_boxes``, dlib's HOG detector at ``face_max_side``), then the whole
   ``analyze_bytes`` of the same photo. A stage's figure is the median over the rounds of each
   photo, averaged over the photos, in ms per image; its share is of fetch + the analysis
   stages. The sum of the stages is printed against the measured ``analyze_bytes``, whose
   images/s on one core is 1000 / its ms per image.
3. **faces step** (``local.faces``, optional: ``LISTENER_TIERS__FACES``), same process and
   pinning: ``faces_bytes`` per image, and per face found (its total over the photos divided by
   the faces found in them); split into decode to RGB (``_decode`` + ``upright_rgb``), detection
   (``local_faces.detect``) and alignment + embedding (dlib's 5-point shapes and ResNet) per
   face. The search of the owner's faces in Postgres is not included.
4. **scaling**: ``LocalProvider(LocalSettings(workers=N), max_pixels=..., max_decode_bytes=...)``
   (the default ``FetchSettings`` limits, as the daemon passes them) for N = 1 and 2, started
   (not timed), then 4 x N lanes in this process, each fetching the next photo (round robin)
   and awaiting ``provider.analyze(ImageInput(...))``, until the time is up: images analysed /
   wall time, in images/s. The ratio workers=2 / workers=1 has a target of 1.9 or more. The
   peak RSS of each worker process is ``VmHWM`` of ``/proc/<pid>/status`` (the pool's children:
   processes whose parent is this one and whose command line is multiprocessing's
   ``spawn_main``), read before the pool stops, in MB (MiB).

With ``--against REV`` the revision is checked out with ``git worktree add --detach`` into a
temporary directory (removed afterwards), and this script runs twice more as a subprocess in
``--single-only`` mode, on this interpreter: once with ``PYTHONPATH`` at this work tree, once
at the checkout (as ``compare.py --reuse-venv`` does), each measuring only ``analyze_bytes``
on one CPU for ``--seconds``; each child reports which ``listener`` it imported and the run
is refused if that is not the expected tree. Printed: images/s of each and new / old.

``--json PATH`` writes every figure (``figures``: key, label, value, unit, share of the
total for the stages) and the details (per photo medians, rounds, worker processes). The
machine is shared: the load average before and after is printed, and figures from a busy
machine are low.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

# listener is imported inside the functions: in --single-only mode this script runs against
# another revision's package, which has only what analyze_bytes needs.

ROOT = Path(__file__).resolve().parents[1]
PHOTOS = ROOT / "listener" / "demo_images"
URL_PREFIX = "/photos"
DEFAULT_SECONDS = 10.0
SMOKE_SECONDS = 1.0
SCALING_TARGET = 1.9
LANES_PER_WORKER = 4
STAGES = ("decode", "gray", "quality", "phash", "face detection")
FACE_STAGES = ("decode to RGB", "detection", "align + embed")


# -- helpers ------------------------------------------------------------------------------


def photo_files() -> list[Path]:
    """The demo's photographs, by name (``SOURCES.md`` left out)."""
    return sorted(p for p in PHOTOS.iterdir() if p.is_file() and p.suffix.lower() != ".md")


def limits() -> dict[str, int]:
    """The sizes the daemon uses by default: ``LocalSettings`` and ``FetchSettings``."""
    from listener.settings import FetchSettings, LocalSettings

    local, fetch = LocalSettings(), FetchSettings()
    return {
        "max_side": local.analysis_max_side,
        "face_max_side": local.face_max_side,
        "max_faces": local.max_faces,
        "max_pixels": fetch.max_pixels,
        "max_decode_bytes": fetch.max_decode_bytes,
    }


@contextlib.contextmanager
def one_cpu() -> Iterator[int | None]:
    """This process pinned to one CPU (the lowest it may use), OpenCV on one thread; the
    previous affinity restored on the way out. Yields the CPU (None where Linux's affinity
    calls are missing)."""
    import cv2

    cv2.setNumThreads(1)
    if not hasattr(os, "sched_setaffinity"):
        yield None
        return
    before = os.sched_getaffinity(0)
    cpu = min(before)
    os.sched_setaffinity(0, {cpu})
    try:
        yield cpu
    finally:
        os.sched_setaffinity(0, before)


def timed_rounds(seconds: float, run_round: Callable[[], None]) -> int:
    """``run_round()`` once untimed (warm-up), then again until ``seconds`` have passed
    (at least once). Returns the timed rounds."""
    run_round()
    deadline = time.perf_counter() + seconds
    rounds = 0
    while rounds == 0 or time.perf_counter() < deadline:
        run_round()
        rounds += 1
    return rounds


def medians(samples: dict[str, list[float]]) -> dict[str, float]:
    """Per photo, the median of its samples, seconds -> ms."""
    return {name: statistics.median(values) * 1000 for name, values in samples.items()}


def mean_ms(samples: dict[str, list[float]]) -> float:
    """The per photo medians averaged over the photos, in ms per image."""
    return statistics.fmean(medians(samples).values())


def load_average() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "?"


def cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "?"


def listener_dir() -> str:
    import listener

    return str(Path(listener.__file__).resolve().parent)


# -- the HTTP server ----------------------------------------------------------------------


async def serve(directory: Path) -> None:
    """``--serve``: the photos at ``http://127.0.0.1:<port>/photos/<name>``; prints the port,
    serves until SIGTERM."""
    from aiohttp import web

    app = web.Application()
    app.router.add_static(URL_PREFIX, directory)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen(128)
    await web.SockSite(runner, sock).start()
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    print(sock.getsockname()[1], flush=True)
    await stop.wait()
    await runner.cleanup()


@contextlib.contextmanager
def photo_server() -> Iterator[tuple[str, int]]:
    """The server subprocess; yields its base URL and pid."""
    proc = subprocess.Popen(
        [sys.executable, str(Path(__file__).resolve()), "--serve"],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        if not line.strip().isdigit():
            raise RuntimeError(f"the photo server did not start (exit {proc.poll()})")
        yield f"http://127.0.0.1:{int(line)}{URL_PREFIX}", proc.pid
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def new_fetcher() -> Any:
    """listener's fetcher, as the daemon builds it, with loopback allowed."""
    from listener.analysis.fetch import ImageFetcher
    from listener.settings import FetchSettings

    return ImageFetcher(FetchSettings(allowed_hosts=["127.0.0.1"]))


# -- phase 1: fetch -----------------------------------------------------------------------


async def fetch_phase(base_url: str, names: list[str], seconds: float) -> dict[str, Any]:
    fetcher = new_fetcher()
    await fetcher.start()
    samples: dict[str, list[float]] = {name: [] for name in names}

    async def run_round(record: bool) -> None:
        for name in names:
            started = time.perf_counter()
            fetched = await fetcher.fetch(f"{base_url}/{name}")
            elapsed = time.perf_counter() - started
            if not fetched.data:
                raise RuntimeError(f"empty body for {name}")
            if record:
                samples[name].append(elapsed)

    try:
        await run_round(record=False)
        deadline = time.perf_counter() + seconds
        rounds = 0
        while rounds == 0 or time.perf_counter() < deadline:
            await run_round(record=True)
            rounds += 1
    finally:
        await fetcher.close()
    return {"ms": mean_ms(samples), "rounds": rounds, "per_photo_ms": medians(samples)}


# -- phase 2: the stages of analyze_bytes -------------------------------------------------


def analysis_stages(data: bytes, lim: dict[str, int]) -> list[float]:
    """The stages of ``analyze_bytes`` on ``data``, one by one, as it runs them; the seconds
    each took, in the order of ``STAGES``."""
    import cv2
    import numpy as np
    from PIL import Image

    from listener.analysis.phash import phash
    from listener.analysis.providers import local
    from listener.analysis.providers.local_faces import face_boxes

    t0 = time.perf_counter()
    image, orientation, info = local._decode(
        data,
        max_side=lim["max_side"],
        max_pixels=lim["max_pixels"],
        max_decode_bytes=lim["max_decode_bytes"],
    )
    t1 = time.perf_counter()
    levels = local._gray_levels(image)
    del image
    gray = local._orient(local._downscale(levels, lim["max_side"]), orientation)
    del levels
    t2 = time.perf_counter()
    laplacian_variance = float(cv2.Laplacian(gray, cv2.CV_64F).var())
    mean_brightness = float(gray.mean()) / 255.0
    shadows = float(np.count_nonzero(gray <= local.SHADOW_LEVEL)) / gray.size
    highlights = float(np.count_nonzero(gray >= local.HIGHLIGHT_LEVEL)) / gray.size
    contrast = float(gray.std()) / 255.0
    local.exposure_verdict(mean_brightness, shadows, highlights)
    local.quality_score(
        laplacian_variance=laplacian_variance,
        mean_brightness=mean_brightness,
        shadows_clipped=shadows,
        highlights_clipped=highlights,
        contrast=contrast,
        width=info["width"],
        height=info["height"],
    )
    t3 = time.perf_counter()
    phash(Image.fromarray(gray))
    t4 = time.perf_counter()
    face_boxes(
        gray,
        max_side=lim["face_max_side"],
        scale=info["width"] / gray.shape[1],
        width=info["width"],
        height=info["height"],
    )
    t5 = time.perf_counter()
    return [t1 - t0, t2 - t1, t3 - t2, t4 - t3, t5 - t4]


def analysis_phase(photos: dict[str, bytes], seconds: float) -> dict[str, Any]:
    from listener.analysis.providers.local import analyze_bytes

    lim = limits()
    samples: dict[str, dict[str, list[float]]] = {
        stage: {name: [] for name in photos} for stage in (*STAGES, "analyze_bytes")
    }
    passes = 0

    def run_round() -> None:
        nonlocal passes
        for name, data in photos.items():
            stages = analysis_stages(data, lim)
            started = time.perf_counter()
            analyze_bytes(
                data,
                max_side=lim["max_side"],
                max_pixels=lim["max_pixels"],
                max_decode_bytes=lim["max_decode_bytes"],
                face_max_side=lim["face_max_side"],
            )
            whole = time.perf_counter() - started
            if passes:  # the first pass is the warm-up
                for stage, elapsed in zip(STAGES, stages, strict=True):
                    samples[stage][name].append(elapsed)
                samples["analyze_bytes"][name].append(whole)
        passes += 1

    with one_cpu() as cpu:
        rounds = timed_rounds(seconds, run_round)
    return {
        "ms": {stage: mean_ms(samples[stage]) for stage in samples},
        "per_photo_ms": {stage: medians(samples[stage]) for stage in samples},
        "rounds": rounds,
        "cpu": cpu,
    }


# -- phase 3: the faces step --------------------------------------------------------------


def face_stages(data: bytes, lim: dict[str, int]) -> tuple[list[float], int]:
    """The stages of ``faces_bytes`` on ``data``: seconds per stage (``FACE_STAGES``) and the
    faces embedded."""
    from listener.analysis.providers import local
    from listener.analysis.providers.local_faces import detect, recognition_models, upright_rgb

    t0 = time.perf_counter()
    image, orientation, _ = local._decode(
        data,
        max_side=lim["face_max_side"],
        max_pixels=lim["max_pixels"],
        max_decode_bytes=lim["max_decode_bytes"],
        draft_mode="RGB",
    )
    rgb = upright_rgb(image, orientation, lim["face_max_side"])
    del image
    t1 = time.perf_counter()
    found = detect(rgb, lim["max_faces"])
    t2 = time.perf_counter()
    shapes, embedder = recognition_models()
    for rect, _score in found:
        embedder.compute_face_descriptor(rgb, shapes(rgb, rect))
    t3 = time.perf_counter()
    return [t1 - t0, t2 - t1, t3 - t2], len(found)


def faces_phase(photos: dict[str, bytes], seconds: float) -> dict[str, Any]:
    from listener.analysis.providers.local import faces_bytes

    lim = limits()
    samples: dict[str, dict[str, list[float]]] = {
        stage: {name: [] for name in photos} for stage in (*FACE_STAGES, "faces_bytes")
    }
    faces: dict[str, int] = {}
    passes = 0

    def run_round() -> None:
        nonlocal passes
        for name, data in photos.items():
            stages, count = face_stages(data, lim)
            started = time.perf_counter()
            found = faces_bytes(
                data,
                max_side=lim["face_max_side"],
                max_pixels=lim["max_pixels"],
                max_decode_bytes=lim["max_decode_bytes"],
                max_faces=lim["max_faces"],
            )
            whole = time.perf_counter() - started
            faces[name] = len(found["faces"])
            if count != faces[name]:
                raise RuntimeError(f"{name}: {count} faces by stages, {faces[name]} by faces_bytes")
            if passes:
                for stage, elapsed in zip(FACE_STAGES, stages, strict=True):
                    samples[stage][name].append(elapsed)
                samples["faces_bytes"][name].append(whole)
        passes += 1

    with one_cpu() as cpu:
        rounds = timed_rounds(seconds, run_round)
    per_photo = {stage: medians(samples[stage]) for stage in samples}
    found_faces = sum(faces.values())
    per_face = sum(per_photo["faces_bytes"].values()) / found_faces if found_faces else float("nan")
    embed_per_face = (
        sum(per_photo["align + embed"].values()) / found_faces if found_faces else float("nan")
    )
    return {
        "ms": {stage: mean_ms(samples[stage]) for stage in samples},
        "ms_per_face": per_face,
        "embed_ms_per_face": embed_per_face,
        "faces": found_faces,
        "faces_per_photo": faces,
        "per_photo_ms": per_photo,
        "rounds": rounds,
        "cpu": cpu,
    }


# -- phase 4: scaling ---------------------------------------------------------------------


def pool_workers() -> list[int]:
    """The pids of this process's children started by multiprocessing's ``spawn``."""
    me = os.getpid()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            status = (entry / "status").read_text()
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        ppid = next((ln.split()[1] for ln in status.splitlines() if ln.startswith("PPid:")), "")
        if ppid == str(me) and b"spawn_main" in cmdline:
            found.append(int(entry.name))
    return sorted(found)


def memory_mb(pid: int) -> dict[str, float]:
    """``VmRSS`` and ``VmHWM`` (peak) of ``pid``, in MB (MiB)."""
    values = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            values[key] = int(rest.split()[0]) / 1024
    return {"rss_mb": values["VmRSS"], "peak_rss_mb": values["VmHWM"]}


def cpu_ticks(pid: int | str) -> int:
    """CPU time used by ``pid`` (all its threads, user + system), in clock ticks."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])  # fields 14 and 15: utime, stime


def machine_ticks() -> tuple[int, int]:
    """(busy, total) clock ticks of all CPUs since boot, from ``/proc/stat``."""
    user, nice, system, idle, iowait, irq, softirq, steal = map(
        int, Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]
    )
    busy = user + nice + system + irq + softirq + steal
    return busy, busy + idle + iowait


async def scaling_phase(
    base_url: str,
    server_pid: int,
    names: list[str],
    workers: int,
    seconds: float,
    prefetched: dict[str, bytes] | None = None,
) -> dict[str, Any]:
    """End to end with ``workers`` processes; also the CPU each party used per image and the
    share of the machine's CPU other processes used meanwhile. With ``prefetched`` (photo
    name -> bytes), the images are not fetched: the analysis processes alone, fed from
    memory, without the HTTP server and the fetches sharing the machine's cores."""
    from listener.analysis.providers.base import ImageInput
    from listener.analysis.providers.local import LocalProvider
    from listener.settings import LocalSettings

    lim = limits()
    provider = LocalProvider(
        LocalSettings(workers=workers),
        max_pixels=lim["max_pixels"],
        max_decode_bytes=lim["max_decode_bytes"],
    )
    fetcher = new_fetcher()
    await fetcher.start()
    counter = itertools.count()
    started = time.perf_counter()
    await provider.start()
    start_s = time.perf_counter() - started

    async def one(index: int) -> None:
        name = names[index % len(names)]
        if prefetched is not None:
            data = prefetched[name]
            await provider.analyze(
                ImageInput(index, "public.images", str(index), None, name, data, "", 0, 0)
            )
            return
        fetched = await fetcher.fetch(f"{base_url}/{name}")
        await provider.analyze(
            ImageInput(
                job_id=index,
                source_table="public.images",
                source_id=str(index),
                owner_id=None,
                url=fetched.url,
                data=fetched.data,
                content_type=fetched.format,
                width=fetched.width,
                height=fetched.height,
            )
        )

    done = 0

    async def lane(deadline: float) -> None:
        nonlocal done
        while time.perf_counter() < deadline:
            await one(next(counter))
            done += 1

    try:
        # Warm-up: every photo once through the pool.
        await asyncio.gather(*(one(next(counter)) for _ in names))
        lanes = LANES_PER_WORKER * workers
        pids = pool_workers()
        parties = {"this process": [os.getpid()], "HTTP server": [server_pid], "workers": pids}
        before = {key: sum(map(cpu_ticks, p)) for key, p in parties.items()}
        machine_before = machine_ticks()
        t0 = time.perf_counter()
        await asyncio.gather(*(lane(t0 + seconds) for _ in range(lanes)))
        elapsed = time.perf_counter() - t0
        after = {key: sum(map(cpu_ticks, p)) for key, p in parties.items()}
        machine_after = machine_ticks()
        memory = {pid: memory_mb(pid) for pid in pool_workers()}
    finally:
        await provider.close()
        await fetcher.close()
    tick_ms = 1000 / os.sysconf("SC_CLK_TCK")
    used = {key: after[key] - before[key] for key in parties}
    busy = machine_after[0] - machine_before[0]
    total = max(1, machine_after[1] - machine_before[1])
    return {
        "workers": workers,
        "lanes": lanes,
        "images": done,
        "elapsed_s": elapsed,
        "images_per_s": done / elapsed,
        "start_s": start_s,
        "worker_memory": [{"pid": pid, **mb} for pid, mb in memory.items()],
        "cpu_ms_per_image": {key: ticks * tick_ms / done for key, ticks in used.items()},
        "workers_busy_pct": 100 * used["workers"] * tick_ms / (elapsed * 1000 * workers),
        "others_cpu_pct": 100 * max(0, busy - sum(used.values())) / total,
    }


# -- --single-only and --against ----------------------------------------------------------


def single_only(seconds: float) -> dict[str, Any]:
    """``analyze_bytes`` alone on one CPU: ms per image (per photo medians averaged) and
    images/s. Uses only what every revision's local provider has."""
    from listener.analysis.providers.local import analyze_bytes
    from listener.settings import FetchSettings, LocalSettings

    max_side = LocalSettings().analysis_max_side
    fetch = FetchSettings()
    photos = {p.name: p.read_bytes() for p in photo_files()}
    samples: dict[str, list[float]] = {name: [] for name in photos}
    passes = 0

    def run_round() -> None:
        nonlocal passes
        for name, data in photos.items():
            started = time.perf_counter()
            analyze_bytes(
                data,
                max_side=max_side,
                max_pixels=fetch.max_pixels,
                max_decode_bytes=fetch.max_decode_bytes,
            )
            if passes:
                samples[name].append(time.perf_counter() - started)
        passes += 1

    with one_cpu() as cpu:
        rounds = timed_rounds(seconds, run_round)
    ms = mean_ms(samples)
    return {
        "listener": listener_dir(),
        "ms": ms,
        "images_per_s": 1000 / ms,
        "rounds": rounds,
        "cpu": cpu,
        "per_photo_ms": medians(samples),
    }


def git(*args: str) -> str:
    proc = subprocess.run(
        ["git", *args], cwd=ROOT, capture_output=True, text=True, check=False, timeout=120
    )
    if proc.returncode != 0:
        raise RuntimeError(f"git {' '.join(args)}: {proc.stderr.strip()}")
    return proc.stdout.strip()


@contextlib.contextmanager
def checkout(sha: str) -> Iterator[Path]:
    """``sha`` checked out (detached) in a temporary directory; removed on the way out."""
    with tempfile.TemporaryDirectory(prefix="bench-local-") as directory:
        tree = Path(directory) / "old"
        git("worktree", "add", "--detach", str(tree), sha)
        try:
            yield tree
        finally:
            with contextlib.suppress(RuntimeError):
                git("worktree", "remove", "--force", str(tree))
            with contextlib.suppress(RuntimeError):
                git("worktree", "prune")


def run_single(tree: Path, seconds: float) -> dict[str, Any]:
    """This script in ``--single-only`` mode with ``PYTHONPATH`` at ``tree``; its JSON.

    Raises:
        RuntimeError: it failed, or imported ``listener`` from elsewhere than ``tree``.
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith("LISTENER_")}
    env["PYTHONPATH"] = os.pathsep.join([str(tree), *filter(None, [env.get("PYTHONPATH")])])
    with tempfile.TemporaryDirectory(prefix="bench-local-") as directory:
        out = Path(directory) / "single.json"
        proc = subprocess.run(
            [
                sys.executable,
                str(Path(__file__).resolve()),
                "--single-only",
                "--seconds",
                str(seconds),
                "--json",
                str(out),
            ],
            env=env,
            cwd=directory,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            check=False,
            timeout=600,
        )
        if proc.returncode != 0 or not out.exists():
            raise RuntimeError(f"--single-only at {tree}: exit {proc.returncode}\n{proc.stderr}")
        doc: dict[str, Any] = json.loads(out.read_text())
    if not Path(doc["listener"]).is_relative_to(tree.resolve()):
        raise RuntimeError(f"--single-only imported listener from {doc['listener']}, not {tree}")
    return doc


def against(rev: str, sha: str, seconds: float) -> dict[str, Any]:
    """``analyze_bytes`` images/s of this work tree and of ``rev`` (commit ``sha``), one after
    the other."""
    with checkout(sha) as tree:
        new = run_single(ROOT, seconds)
        old = run_single(tree, seconds)
    return {
        "rev": rev,
        "sha": sha,
        "new": new,
        "old": old,
        "ratio": new["images_per_s"] / old["images_per_s"],
    }


# -- the report ---------------------------------------------------------------------------


def figure(
    key: str, label: str, value: float, unit: str, share: float | None = None
) -> dict[str, Any]:
    row: dict[str, Any] = {"key": key, "label": label, "value": value, "unit": unit}
    if share is not None:
        row["share_pct"] = share
    return row


def build_figures(doc: dict[str, Any]) -> list[dict[str, Any]]:
    fetch_ms = doc["fetch"]["ms"]
    stage_ms = doc["analysis"]["ms"]
    total = fetch_ms + sum(stage_ms[s] for s in STAGES)
    rows = [
        figure("fetch_ms", "fetch (HTTP, ImageFetcher)", fetch_ms, "ms", 100 * fetch_ms / total)
    ]
    for stage in STAGES:
        key = stage.replace(" ", "_") + "_ms"
        rows.append(figure(key, stage, stage_ms[stage], "ms", 100 * stage_ms[stage] / total))
    whole = stage_ms["analyze_bytes"]
    faces = doc["faces"]
    rows += [
        figure("stages_sum_ms", "sum of the analysis stages", total - fetch_ms, "ms"),
        figure("analyze_bytes_ms", "analyze_bytes, measured whole", whole, "ms"),
        figure("fetch_and_analyze_ms", "fetch + analyze_bytes", fetch_ms + whole, "ms"),
        figure("analyze_bytes_images_per_s", "analyze_bytes on one core", 1000 / whole, "images/s"),
        figure("faces_bytes_ms", "faces_bytes per image", faces["ms"]["faces_bytes"], "ms"),
        figure("faces_bytes_ms_per_face", "faces_bytes per face found", faces["ms_per_face"], "ms"),
        figure("faces_found", "faces found in the photos", faces["faces"], "faces"),
        figure("faces_decode_ms", "  decode to RGB", faces["ms"]["decode to RGB"], "ms"),
        figure("faces_detect_ms", "  detection", faces["ms"]["detection"], "ms"),
        figure(
            "faces_embed_ms_per_face", "  align + embed, per face", faces["embed_ms_per_face"], "ms"
        ),
    ]
    for run in doc["scaling"]["runs"]:
        n = run["workers"]
        rows.append(
            figure(
                f"end_to_end_images_per_s_{n}",
                f"fetch + analyze, workers={n}",
                run["images_per_s"],
                "images/s",
            )
        )
        peak = max(w["peak_rss_mb"] for w in run["worker_memory"])
        rows.append(
            figure(f"worker_peak_rss_mb_{n}", f"worker peak RSS, workers={n} (max)", peak, "MB")
        )
    rows.append(figure("scaling_ratio", "workers=2 / workers=1", doc["scaling"]["ratio"], "x"))
    alone = doc["scaling"]["processes_alone"]
    for run in alone["runs"]:
        n = run["workers"]
        rows.append(
            figure(
                f"processes_alone_images_per_s_{n}",
                f"analysis processes alone, workers={n}",
                run["images_per_s"],
                "images/s",
            )
        )
    rows.append(
        figure(
            "processes_alone_ratio",
            "analysis processes alone, workers=2 / workers=1",
            alone["ratio"],
            "x",
        )
    )
    if doc.get("against"):
        a = doc["against"]
        rows += [
            figure(
                "against_new_images_per_s",
                "analyze_bytes, this tree",
                a["new"]["images_per_s"],
                "images/s",
            ),
            figure(
                "against_old_images_per_s",
                f"analyze_bytes, {a['rev']}",
                a["old"]["images_per_s"],
                "images/s",
            ),
            figure("against_ratio", "new / old", a["ratio"], "x"),
        ]
    return rows


def print_report(doc: dict[str, Any]) -> None:
    by_key = {f["key"]: f for f in doc["figures"]}
    settings = doc["settings"]
    print()
    print(
        f"{len(settings['photos'])} photos, {settings['seconds']:g} s per phase; "
        f"max_side {settings['max_side']}, face_max_side {settings['face_max_side']}"
    )
    print(f"{'per image, one core':<44}{'ms':>9}{'share':>9}")
    for f in doc["figures"]:
        if "share_pct" in f:
            print(f"  {f['label']:<42}{f['value']:>9.2f}{f['share_pct']:>8.1f}%")
    for key in ("stages_sum_ms", "analyze_bytes_ms", "fetch_and_analyze_ms"):
        print(f"  {by_key[key]['label']:<42}{by_key[key]['value']:>9.2f}")
    ips = by_key["analyze_bytes_images_per_s"]
    print(f"  {ips['label']:<42}{ips['value']:>9.1f} images/s")
    rounds = doc["analysis"]["rounds"]
    print(f"  ({rounds} rounds; fetch: {doc['fetch']['rounds']} rounds)")
    print()
    faces = doc["faces"]
    print(f"faces step (local.faces), one core, {faces['faces']} faces in the photos")
    for key in (
        "faces_bytes_ms",
        "faces_bytes_ms_per_face",
        "faces_decode_ms",
        "faces_detect_ms",
        "faces_embed_ms_per_face",
    ):
        print(f"  {by_key[key]['label']:<42}{by_key[key]['value']:>9.2f} ms")
    print(f"  ({faces['rounds']} rounds)")
    print()
    print("end to end: fetch + LocalProvider.analyze")
    for run in doc["scaling"]["runs"]:
        memory = ", ".join(
            f"pid {w['pid']} peak {w['peak_rss_mb']:.0f} MB (now {w['rss_mb']:.0f})"
            for w in run["worker_memory"]
        )
        print(
            f"  workers={run['workers']}  {run['images_per_s']:>7.1f} images/s  "
            f"({run['images']} images in {run['elapsed_s']:.1f} s, {run['lanes']} in flight; "
            f"pool start {run['start_s']:.1f} s)"
        )
        print(f"             {memory}")
        cpu = ", ".join(f"{key} {ms:.1f}" for key, ms in run["cpu_ms_per_image"].items())
        print(
            f"             CPU ms per image: {cpu}; workers busy {run['workers_busy_pct']:.0f}%; "
            f"other processes {run['others_cpu_pct']:.0f}% of the machine"
        )
    scaling = doc["scaling"]
    print(
        f"  workers=2 / workers=1 {scaling['ratio']:.2f}x  target >= {SCALING_TARGET}  "
        f"{scaling['verdict']}"
    )
    alone = scaling["processes_alone"]
    print("analysis processes alone (images from memory: no fetch, no HTTP server)")
    for run in alone["runs"]:
        print(
            f"  workers={run['workers']}  {run['images_per_s']:>7.1f} images/s; workers busy "
            f"{run['workers_busy_pct']:.0f}%; this process "
            f"{run['cpu_ms_per_image']['this process']:.1f} CPU ms per image"
        )
    print(
        f"  workers=2 / workers=1 {alone['ratio']:.2f}x  target >= {SCALING_TARGET}  "
        f"{alone['verdict']}"
    )
    if doc.get("against"):
        a = doc["against"]
        print()
        print(f"analyze_bytes on one core, against {a['rev']} ({a['sha'][:10]})")
        print(f"  this tree  {a['new']['images_per_s']:>7.1f} images/s  ({a['new']['ms']:.2f} ms)")
        print(
            f"  {a['rev']:<9}  {a['old']['images_per_s']:>7.1f} images/s  ({a['old']['ms']:.2f} ms)"
        )
        print(f"  new / old  {a['ratio']:.2f}x")
    print()
    machine = doc["machine"]
    print(f"load average: {machine['load_before']} before, {machine['load_after']} after")


# -- main ---------------------------------------------------------------------------------


async def run(args: argparse.Namespace) -> dict[str, Any]:
    seconds = args.seconds
    files = photo_files()
    names = [p.name for p in files]
    photos = {p.name: p.read_bytes() for p in files}
    doc: dict[str, Any] = {
        "machine": {
            "nproc": os.cpu_count(),
            "cpu": cpu_model(),
            "python": platform.python_version(),
            "load_before": load_average(),
        },
        "settings": {
            **limits(),
            "seconds": seconds,
            "smoke": args.smoke,
            "photos": names,
            "fetcher": "listener.analysis.fetch.ImageFetcher, allowed_hosts=['127.0.0.1']",
            "lanes_per_worker": LANES_PER_WORKER,
        },
        "listener": listener_dir(),
    }
    # An unknown revision stops the run before anything is measured.
    sha = git("rev-parse", "--verify", f"{args.against}^{{commit}}") if args.against else ""
    print(f"{len(names)} photos; {os.cpu_count()} CPUs, {cpu_model()}; load {load_average()}")
    with photo_server() as (base_url, server_pid):
        print(f"fetch ({seconds:g} s)...", flush=True)
        doc["fetch"] = await fetch_phase(base_url, names, seconds)
        print(f"analysis stages ({seconds:g} s)...", flush=True)
        doc["analysis"] = analysis_phase(photos, seconds)
        print(f"faces step ({seconds:g} s)...", flush=True)
        doc["faces"] = faces_phase(photos, seconds)
        runs = []
        for workers in (1, 2):
            print(f"end to end, workers={workers} ({seconds:g} s)...", flush=True)
            runs.append(await scaling_phase(base_url, server_pid, names, workers, seconds))
        alone = []
        for workers in (1, 2):
            print(f"analysis processes alone, workers={workers} ({seconds:g} s)...", flush=True)
            alone.append(await scaling_phase(base_url, server_pid, names, workers, seconds, photos))
    ratio = runs[1]["images_per_s"] / runs[0]["images_per_s"]
    alone_ratio = alone[1]["images_per_s"] / alone[0]["images_per_s"]
    doc["scaling"] = {
        "runs": runs,
        "ratio": ratio,
        "target": SCALING_TARGET,
        "verdict": "PASS" if ratio >= SCALING_TARGET else "MISS",
        "processes_alone": {
            "runs": alone,
            "ratio": alone_ratio,
            "verdict": "PASS" if alone_ratio >= SCALING_TARGET else "MISS",
        },
    }
    doc["against"] = None
    if args.against:
        print(f"analyze_bytes against {args.against} ({seconds:g} s each side)...", flush=True)
        doc["against"] = against(args.against, sha, seconds)
    doc["machine"]["load_after"] = load_average()
    doc["figures"] = build_figures(doc)
    return doc


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=DEFAULT_SECONDS, help="per phase")
    parser.add_argument("--smoke", action="store_true", help=f"{SMOKE_SECONDS:g} s per phase")
    parser.add_argument("--json", type=Path, help="write every figure to this file")
    parser.add_argument("--against", metavar="REV", help="also measure analyze_bytes of REV")
    parser.add_argument(
        "--single-only",
        action="store_true",
        help="measure only analyze_bytes on one CPU (what --against runs on each side)",
    )
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.smoke:
        args.seconds = SMOKE_SECONDS
    if args.serve:
        asyncio.run(serve(PHOTOS))
        return 0
    if args.single_only:
        doc = single_only(args.seconds)
        print(
            f"analyze_bytes, one core: {doc['images_per_s']:.1f} images/s "
            f"({doc['ms']:.2f} ms per image, {doc['rounds']} rounds; listener at {doc['listener']})"
        )
    else:
        doc = asyncio.run(run(args))
        print_report(doc)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(doc, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
