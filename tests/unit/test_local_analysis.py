"""``listener.analysis.providers.local``: ``analyze_bytes`` on real photographs, and the provider.

``analyze_bytes`` runs in this process; the ``LocalProvider`` tests start real worker
processes (one or two each, to stay light), and make one hang or die.
"""

from __future__ import annotations

import asyncio
import functools
import io
import json
import os
import pickle
import signal
import time
from pathlib import Path
from typing import Any

import imagehash
import numpy as np
import pytest
from hostile_images import app1_bomb_jpeg, rgba16_8k_png, rgba_8k_png
from PIL import ExifTags, Image, ImageFilter, TiffImagePlugin

from listener.analysis.providers.base import ImageInput, Provider, StepResult
from listener.analysis.providers.local import LocalProvider, analyze_bytes
from listener.errors import (
    ImageTooLarge,
    InvalidImage,
    ListenerError,
    ProviderUnavailable,
    RateLimited,
    RetryableError,
    StepTimeout,
)
from listener.settings import LocalSettings

DEMO = Path(__file__).resolve().parents[2] / "listener" / "demo_images"
MAX_SIDE = 1024
MAX_PIXELS = 64_000_000
SIZES = {
    "astronaut.png": (512, 512, "PNG"),
    "brick.png": (512, 512, "PNG"),
    "camera.png": (512, 512, "PNG"),
    "chelsea.png": (451, 300, "PNG"),
    "coffee.png": (600, 400, "PNG"),
    "hubble_deep_field.jpg": (1000, 872, "JPEG"),
    "rocket.jpg": (640, 427, "JPEG"),
}


def demo(name: str) -> bytes:
    return (DEMO / name).read_bytes()


def analyze(data: bytes, **overrides: Any) -> dict[str, Any]:
    options: dict[str, Any] = {"max_side": MAX_SIDE, "max_pixels": MAX_PIXELS}
    options.update(overrides)
    return analyze_bytes(data, **options)


def encode(image: Image.Image, image_format: str = "PNG", **params: Any) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, image_format, **params)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def results() -> dict[str, dict[str, Any]]:
    return {name: analyze(demo(name)) for name in SIZES}


# --- measurements on the demo photos --------------------------------------------------------


@pytest.mark.parametrize("name", sorted(SIZES))
def test_demo_photos(results: dict[str, dict[str, Any]], name: str) -> None:
    result = results[name]
    width, height, image_format = SIZES[name]
    assert (result["width"], result["height"], result["format"]) == (width, height, image_format)
    assert 0.0 <= result["quality"] <= 10.0
    assert result["quality"] == round(result["quality"], 1)
    assert 0.0 <= result["exposure"]["mean_brightness"] <= 1.0
    assert 0.0 <= result["contrast"] <= 1.0
    assert len(result["phash"]) == 16
    assert json.loads(json.dumps(result)) == result  # plain JSON types only
    for x, y, w, h in result["faces"]["boxes"]:
        assert x >= 0 and y >= 0 and x + w <= width and y + h <= height


def test_astronaut_has_a_face(results: dict[str, dict[str, Any]]) -> None:
    faces = results["astronaut.png"]["faces"]
    assert faces["count"] >= 1
    x, y, w, h = faces["boxes"][0]
    # Eileen Collins's face is in the upper middle of the 512x512 portrait.
    assert 120 < x + w / 2 < 320 and 40 < y + h / 2 < 200
    assert results["astronaut.png"]["mode"] == "RGB"


def test_face_boxes_are_in_original_pixel_coordinates() -> None:
    astronaut = Image.open(DEMO / "astronaut.png")
    small = analyze(demo("astronaut.png"), max_side=512)["faces"]["boxes"][0]
    large = analyze(encode(astronaut.resize((1024, 1024))), max_side=512)
    assert (large["width"], large["height"]) == (1024, 1024)
    box = large["faces"]["boxes"][0]
    assert box == pytest.approx([2 * v for v in small], abs=4)


def test_sharp_photos_are_not_blurry(results: dict[str, dict[str, Any]]) -> None:
    for name in ("brick.png", "coffee.png", "astronaut.png", "rocket.jpg"):
        assert results[name]["blur"]["is_blurry"] is False, name


def test_blurred_copy_scores_lower(results: dict[str, dict[str, Any]]) -> None:
    sharp = results["astronaut.png"]
    astronaut = Image.open(DEMO / "astronaut.png")
    blurred = analyze(encode(astronaut.filter(ImageFilter.GaussianBlur(radius=4))))
    assert blurred["blur"]["is_blurry"] is True
    assert blurred["blur"]["laplacian_variance"] < sharp["blur"]["laplacian_variance"] / 20
    assert blurred["quality"] <= sharp["quality"] - 2.0


def test_phash_is_stable_and_tells_images_apart(results: dict[str, dict[str, Any]]) -> None:
    assert analyze(demo("coffee.png"))["phash"] == results["coffee.png"]["phash"]
    hashes = {name: imagehash.hex_to_hash(result["phash"]) for name, result in results.items()}
    names = sorted(hashes)
    for i, first in enumerate(names):
        for second in names[i + 1 :]:
            assert hashes[first] - hashes[second] > 10, (first, second)
    # A perceptual hash survives re-encoding: the same photo as a JPEG is (nearly) the same.
    as_jpeg = encode(Image.open(DEMO / "coffee.png"), "JPEG", quality=80)
    assert imagehash.hex_to_hash(analyze(as_jpeg)["phash"]) - hashes["coffee.png"] <= 4


@pytest.mark.parametrize(
    ("level", "verdict"),
    [(0, "under"), (255, "over"), (128, "ok")],
)
def test_exposure_verdicts(level: int, verdict: str) -> None:
    result = analyze(encode(Image.new("RGB", (640, 480), (level, level, level))))
    assert result["exposure"]["verdict"] == verdict
    assert result["contrast"] == 0.0
    assert result["blur"]["laplacian_variance"] == 0.0
    assert 0.0 <= result["quality"] <= 10.0
    if level == 0:
        assert result["exposure"]["shadows_clipped"] == 1.0
    if level == 255:
        assert result["exposure"]["highlights_clipped"] == 1.0


def test_small_images_lose_quality_points() -> None:
    coffee = Image.open(DEMO / "coffee.png")
    full = analyze(encode(coffee))
    thumb = analyze(encode(coffee.resize((150, 100), Image.Resampling.LANCZOS)))
    assert thumb["quality"] < full["quality"]


# --- EXIF -----------------------------------------------------------------------------------


def jpeg_with_exif() -> bytes:
    exif = Image.Exif()
    exif[ExifTags.Base.Make] = "Canon"
    exif[ExifTags.Base.Model] = "Canon EOS 5D Mark IV"
    exif[ExifTags.Base.Orientation] = 6  # rotated 90 degrees: width and height swap
    exif[ExifTags.Base.DateTime] = "2022:01:01 00:00:00"
    details = exif.get_ifd(ExifTags.IFD.Exif)
    details[ExifTags.Base.DateTimeOriginal] = "2021:06:01 12:34:56"
    details[ExifTags.Base.OffsetTimeOriginal] = "+10:00"
    gps = exif.get_ifd(ExifTags.IFD.GPSInfo)
    rational = TiffImagePlugin.IFDRational
    # The Sydney Opera House: 33 deg 51' 30.6" S, 151 deg 12' 40.8" E.
    gps[ExifTags.GPS.GPSLatitudeRef] = "S"
    gps[ExifTags.GPS.GPSLatitude] = (rational(33, 1), rational(51, 1), rational(306, 10))
    gps[ExifTags.GPS.GPSLongitudeRef] = "E"
    gps[ExifTags.GPS.GPSLongitude] = (rational(151, 1), rational(12, 1), rational(408, 10))
    return encode(Image.new("RGB", (300, 200), (90, 120, 150)), "JPEG", exif=exif)


def test_exif_capture_time_camera_and_gps() -> None:
    result = analyze(jpeg_with_exif())
    assert (result["width"], result["height"]) == (200, 300)
    exif = result["exif"]
    assert exif["taken_at"] == "2021-06-01T12:34:56+10:00"
    assert exif["camera_make"] == "Canon"
    assert exif["camera_model"] == "Canon EOS 5D Mark IV"
    assert exif["gps"] == pytest.approx({"lat": -33.8585, "lon": 151.2113333})


def test_exif_falls_back_to_datetime_and_is_empty_without_exif(
    results: dict[str, dict[str, Any]],
) -> None:
    exif = Image.Exif()
    exif[ExifTags.Base.DateTime] = "2020:02:29 23:59:58"
    result = analyze(encode(Image.new("RGB", (64, 64)), "JPEG", exif=exif))
    assert result["exif"]["taken_at"] == "2020-02-29T23:59:58"
    assert results["astronaut.png"]["exif"] == {
        "taken_at": None,
        "camera_make": None,
        "camera_model": None,
        "gps": None,
    }


# --- unusual modes --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("image", "image_format"),
    [
        (
            Image.fromarray(np.linspace(0, 65535, 256 * 128, dtype=np.uint16).reshape(128, 256)),
            "PNG",
        ),
        (Image.new("RGBA", (100, 80), (255, 0, 0, 0)), "PNG"),
        (Image.new("P", (100, 80), 3), "GIF"),
        (Image.new("CMYK", (100, 80), (0, 50, 100, 0)), "JPEG"),
        (Image.new("1", (100, 80), 1), "BMP"),
        (Image.new("RGB", (1, 1)), "WEBP"),
        (Image.new("RGB", (90, 60), (10, 200, 30)), "TIFF"),
    ],
)
def test_unusual_modes_and_formats(image: Image.Image, image_format: str) -> None:
    result = analyze(encode(image, image_format))
    assert (result["width"], result["height"]) == image.size
    assert result["format"] == image_format
    assert 0.0 <= result["quality"] <= 10.0


# --- errors ---------------------------------------------------------------------------------


@functools.cache
def bomb_png() -> bytes:
    """A 20000x20000 1-bit PNG: about 50 KB on disk, 400 million pixels once decoded."""
    return encode(Image.new("1", (20000, 20000)))


def test_empty_bytes() -> None:
    with pytest.raises(InvalidImage, match="empty"):
        analyze(b"")


def test_html_is_not_an_image() -> None:
    with pytest.raises(InvalidImage, match=r"cannot decode image: .*looks like HTML"):
        analyze(b"<!DOCTYPE html>\n<html><body>404 Not Found</body></html>")


def test_random_bytes_are_not_an_image() -> None:
    with pytest.raises(InvalidImage, match=r"cannot decode image: .*supported format") as caught:
        analyze(bytes(range(256)))
    assert "00 01 02" not in str(caught.value)


def test_formats_outside_the_allowed_decoders_are_refused() -> None:
    with pytest.raises(InvalidImage, match="supported format"):
        analyze(encode(Image.new("RGB", (32, 32)), "ICO"))


def test_truncated_jpeg() -> None:
    photo = demo("rocket.jpg")
    with pytest.raises(InvalidImage, match="truncated"):
        analyze(photo[: len(photo) // 2])


@pytest.mark.parametrize(
    "max_pixels",
    [
        300_000_000,  # 400 M pixels is over the limit: Pillow warns (made an error here)
        1_000_000,  # over twice the limit: Pillow raises DecompressionBombError
    ],
)
def test_decompression_bomb(max_pixels: int) -> None:
    before = Image.MAX_IMAGE_PIXELS
    with pytest.raises(ImageTooLarge, match=f"more than {max_pixels} pixels"):
        analyze(bomb_png(), max_pixels=max_pixels)
    assert before == Image.MAX_IMAGE_PIXELS  # the process-wide limit is restored


@pytest.mark.parametrize(
    ("data", "max_pixels"),
    [
        (b"", MAX_PIXELS),
        (b"<html></html>", MAX_PIXELS),
        (demo("rocket.jpg")[:5000], MAX_PIXELS),
        (bomb_png(), 1_000_000),
    ],
)
def test_errors_survive_pickling(data: bytes, max_pixels: int) -> None:
    with pytest.raises(ListenerError) as caught:
        analyze(data, max_pixels=max_pixels)
    copy = pickle.loads(pickle.dumps(caught.value))
    assert type(copy) is type(caught.value)
    assert str(copy) == str(caught.value)


def test_retryable_errors_keep_retry_after_through_pickling() -> None:
    copy = pickle.loads(pickle.dumps(RateLimited("slow down", retry_after=7.0)))
    assert type(copy) is RateLimited
    assert (str(copy), copy.retry_after) == ("slow down", 7.0)
    timeout = pickle.loads(pickle.dumps(StepTimeout("local.analysis", 2.5)))
    assert type(timeout) is StepTimeout
    assert str(timeout) == "step local.analysis timed out after 2.5s"


# --- LocalProvider --------------------------------------------------------------------------


def image_input(data: bytes, job_id: int = 1) -> ImageInput:
    return ImageInput(
        job_id=job_id,
        source_table='"public"."photos"',
        source_id=str(job_id),
        owner_id=None,
        url="https://example.com/photo.png",
        data=data,
        content_type="PNG",
    )


async def test_provider_end_to_end() -> None:
    provider = LocalProvider(LocalSettings(workers=1), max_pixels=MAX_PIXELS)
    assert isinstance(provider, Provider)
    await provider.start()
    try:
        step = await provider.analyze(image_input(demo("astronaut.png")))
        with pytest.raises(InvalidImage, match="truncated"):
            await provider.analyze(image_input(demo("rocket.jpg")[:20000], job_id=2))
        with pytest.raises(ImageTooLarge):
            await provider.analyze(image_input(bomb_png(), job_id=3))
    finally:
        await provider.close()
    assert isinstance(step, StepResult)
    assert (step.provider, step.step) == ("local", "local.analysis")
    assert step.model is not None and step.model.startswith("listener-local/1 (opencv 4.")
    assert step.duration_s > 0
    assert step.output["faces"]["count"] >= 1
    assert step.output == analyze(demo("astronaut.png"))


# Run in the provider's worker processes (spawned: they import this module by name).


def hang(pid_file: str) -> None:
    """Write this worker's pid to ``pid_file``, then never return (a hung analysis)."""
    Path(pid_file).write_text(str(os.getpid()))
    while True:
        time.sleep(60)


def wait_for(pid_file: str, go_file: str) -> int:
    """Write this worker's pid to ``pid_file``, wait (up to 60 s) for ``go_file``; the pid."""
    Path(pid_file).write_text(str(os.getpid()))
    deadline = time.monotonic() + 60
    while not Path(go_file).exists() and time.monotonic() < deadline:
        time.sleep(0.01)
    return os.getpid()


async def pid_of(pid_file: Path, timeout: float = 60.0) -> int:
    """The pid a worker wrote to ``pid_file``, once it has (the worker has started the task)."""
    deadline = time.monotonic() + timeout
    while not pid_file.exists() or not pid_file.read_text():
        assert time.monotonic() < deadline, f"{pid_file.name} not written in {timeout}s"
        await asyncio.sleep(0.02)
    return int(pid_file.read_text())


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


async def test_provider_recovers_from_a_dead_worker(tmp_path: Path) -> None:
    provider = LocalProvider(LocalSettings(workers=1), max_pixels=MAX_PIXELS)
    await provider.start()
    try:
        running = asyncio.create_task(provider.run_in_worker(hang, str(tmp_path / "w.pid")))
        os.kill(await pid_of(tmp_path / "w.pid"), signal.SIGKILL)  # simulate the OOM killer
        with pytest.raises(ProviderUnavailable, match="worker died"):
            await running
        step = await provider.analyze(image_input(demo("coffee.png")))
        assert step.output["width"] == 600
    finally:
        await provider.close()


def untimed(provider: LocalProvider, function: Any, *args: Any) -> asyncio.Future[Any]:
    """``function(*args)`` on the provider's pool directly, with no timeout of its own."""
    assert provider._pool is not None
    return asyncio.wrap_future(provider._pool.schedule(function, args=args))


async def test_hung_analysis_is_killed_and_replaced_others_go_on(tmp_path: Path) -> None:
    provider = LocalProvider(LocalSettings(workers=2), max_pixels=MAX_PIXELS, timeout_s=2.0)
    await provider.start()
    try:
        hung = asyncio.create_task(provider.run_in_worker(hang, str(tmp_path / "hung.pid")))
        # In flight on the other worker while the hung one is killed; untimed, so that only
        # the kill could fail it, however slow this machine is.
        other = untimed(provider, wait_for, str(tmp_path / "other.pid"), str(tmp_path / "go"))
        hung_pid = await pid_of(tmp_path / "hung.pid")
        other_pid = await pid_of(tmp_path / "other.pid")
        with pytest.raises(StepTimeout, match=r"^step local\.analysis timed out after 2s$"):
            await hung
        assert not alive(hung_pid)
        assert not other.done()
        (tmp_path / "go").touch()
        assert await other == other_pid

        # The pool is back to two workers, one of them new: two tasks run at once.
        (tmp_path / "go").unlink()
        pair = [
            untimed(provider, wait_for, str(tmp_path / f"{i}.pid"), str(tmp_path / "go"))
            for i in range(2)
        ]
        pids = {await pid_of(tmp_path / f"{i}.pid") for i in range(2)}
        (tmp_path / "go").touch()
        assert set(await asyncio.gather(*pair)) == pids
        assert other_pid in pids and hung_pid not in pids and len(pids) == 2

        step = await provider.analyze(image_input(demo("coffee.png")))
        assert step.output["width"] == 600
    finally:
        await provider.close()


async def test_cancelling_the_caller_kills_the_running_analysis(tmp_path: Path) -> None:
    """The dispatcher's own step timeout cancels the call: the process must not live on."""
    provider = LocalProvider(LocalSettings(workers=1), max_pixels=MAX_PIXELS)
    await provider.start()
    try:
        call = asyncio.create_task(provider.run_in_worker(hang, str(tmp_path / "w.pid")))
        pid = await pid_of(tmp_path / "w.pid")
        call.cancel()
        with pytest.raises(asyncio.CancelledError):
            await call
        deadline = time.monotonic() + 30
        while alive(pid):
            assert time.monotonic() < deadline, "the cancelled analysis's process lives on"
            await asyncio.sleep(0.05)
        step = await provider.analyze(image_input(demo("coffee.png")))
        assert step.output["width"] == 600
    finally:
        await provider.close()


# --- bounded decode -------------------------------------------------------------------------


def test_structure_bombs_are_refused_by_the_analysis_too() -> None:
    """The fetcher refuses them first; the worker does not trust its input either."""
    started = time.perf_counter()
    with pytest.raises(InvalidImage, match="more than 1024 JPEG segments"):
        analyze(app1_bomb_jpeg(300_000))
    assert time.perf_counter() - started < 1.0


def test_over_the_decode_limit_is_refused_before_decoding() -> None:
    with pytest.raises(
        ImageTooLarge, match=r"8000x8000 pixels of mode RGBA at 8 bytes per pixel = 512000000"
    ):
        analyze(rgba16_8k_png(), max_decode_bytes=256 * 1024 * 1024)


def peak_of_analysis(data: bytes, max_decode_bytes: int) -> tuple[int, int, dict[str, Any]]:
    """In a worker: (resident kB before, peak resident kB during, output) of one analysis.

    The peak is the kernel's VmHWM, reset first by writing 5 to /proc/self/clear_refs
    (proc(5)), so only this analysis counts.
    """
    Path("/proc/self/clear_refs").write_text("5")

    def status(field: str) -> int:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
        raise AssertionError(field)

    before = status("VmRSS")
    output = analyze_bytes(
        data, max_side=MAX_SIDE, max_pixels=MAX_PIXELS, max_decode_bytes=max_decode_bytes
    )
    return before, status("VmHWM"), output


@pytest.mark.timeout(300)
async def test_an_8k_rgba_analysis_stays_within_the_stated_bound() -> None:
    """8000x8000 RGBA took 1.2 GiB; the bound is the decoded image (256 MB) plus one gray
    plane (64 MB) plus strips; 100 MB more is allowed for allocator slack."""
    provider = LocalProvider(LocalSettings(workers=1), max_pixels=MAX_PIXELS)
    await provider.start()
    try:
        before_kb, peak_kb, output = await provider.run_in_worker(
            peak_of_analysis, rgba_8k_png(), 256 * 1024 * 1024
        )
    finally:
        await provider.close()
    grown_mb = (peak_kb - before_kb) / 1024
    print(f"8000x8000 RGBA analysis: worker peak grew by {grown_mb:.0f} MB")
    assert (output["width"], output["height"], output["mode"]) == (8000, 8000, "RGBA")
    assert output["exposure"]["verdict"] == "over"  # fully transparent, over white
    assert grown_mb < 256 + 64 + 100


async def test_a_killed_worker_fails_only_its_own_analysis(tmp_path: Path) -> None:
    """SIGKILL (what the OOM killer sends) one worker mid-task while the other works."""
    provider = LocalProvider(LocalSettings(workers=2), max_pixels=MAX_PIXELS)
    await provider.start()
    try:
        doomed = asyncio.create_task(provider.run_in_worker(hang, str(tmp_path / "doomed.pid")))
        other = asyncio.create_task(
            provider.run_in_worker(wait_for, str(tmp_path / "other.pid"), str(tmp_path / "go"))
        )
        doomed_pid = await pid_of(tmp_path / "doomed.pid")
        other_pid = await pid_of(tmp_path / "other.pid")
        os.kill(doomed_pid, signal.SIGKILL)
        with pytest.raises(
            ProviderUnavailable, match=r"worker died \(killed by SIGKILL.*will be retried"
        ) as caught:
            await doomed
        assert isinstance(caught.value, RetryableError)
        await asyncio.sleep(0.5)
        assert not other.done()  # the other analysis was not disturbed
        (tmp_path / "go").touch()
        assert await other == other_pid
        # Back to two workers: two analyses at once, on a new process and the old one.
        steps = await asyncio.gather(
            *(provider.analyze(image_input(demo("coffee.png"), job_id=i)) for i in range(2))
        )
        assert [s.output["width"] for s in steps] == [600, 600]
    finally:
        await provider.close()
