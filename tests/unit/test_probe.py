"""``listener.analysis.probe``: one bounded header read per image, and the decoded-memory cap."""

from __future__ import annotations

import io
import time
from pathlib import Path

import pytest
from hostile_images import (
    app1_bomb_jpeg,
    chunk_bomb_png,
    comment_bomb_gif,
    fill_bytes_jpeg,
    png_by_hand,
    rgba16_8k_png,
    rgba_8k_png,
)
from PIL import Image

from listener.analysis.probe import (
    MAX_GIF_BLOCKS,
    MAX_JPEG_SEGMENTS,
    MAX_JPEG_SKIPPED_BYTES,
    MAX_PNG_CHUNKS,
    ImageInfo,
    bytes_per_pixel,
    probe_image,
)
from listener.errors import ImageTooLarge, InvalidImage
from listener.settings import MB, FetchSettings

DEMO = Path(__file__).resolve().parents[2] / "listener" / "demo_images"
DEFAULT = FetchSettings()


def probe(data: bytes) -> ImageInfo:
    return probe_image(
        data,
        max_pixels=DEFAULT.max_pixels,
        max_decode_bytes=DEFAULT.max_decode_bytes,
        source="the test image",
    )


def encode(image: Image.Image, image_format: str, **params: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, image_format, **params)
    return buffer.getvalue()


def test_default_decode_limit_is_at_most_512_mb() -> None:
    assert DEFAULT.max_decode_bytes <= 512 * MB


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("rocket.jpg", ImageInfo("JPEG", 640, 427, "RGB", 4)),
        ("astronaut.png", ImageInfo("PNG", 512, 512, "RGB", 4)),
        ("hubble_deep_field.jpg", ImageInfo("JPEG", 1000, 872, "RGB", 4)),
    ],
)
def test_real_photos(name: str, expected: ImageInfo) -> None:
    assert probe((DEMO / name).read_bytes()) == expected


def test_metadata_that_cameras_write_passes_the_caps() -> None:
    # A 1 MB ICC profile is split over 17 APP2 segments; EXIF is one APP1; plus a comment.
    exif = Image.Exif()
    exif[0x010F] = "Canon"
    data = encode(
        Image.new("RGB", (64, 48)),
        "JPEG",
        icc_profile=bytes(1_000_000),
        exif=exif,
        comment=b"x" * 60_000,
    )
    assert probe(data) == ImageInfo("JPEG", 64, 48, "RGB", 4)


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (app1_bomb_jpeg(500_000), f"more than {MAX_JPEG_SEGMENTS} JPEG segments"),
        (fill_bytes_jpeg(1_000_000), f"more than {MAX_JPEG_SKIPPED_BYTES} fill or stray bytes"),
        (chunk_bomb_png(300_000), f"more than {MAX_PNG_CHUNKS} PNG chunks"),
        (comment_bomb_gif(300_000), f"more than {MAX_GIF_BLOCKS} GIF extension blocks"),
    ],
    ids=["app1-bomb-jpeg", "fill-bytes-jpeg", "chunk-bomb-png", "comment-bomb-gif"],
)
def test_structure_bombs_are_refused_quickly_with_the_reason(data: bytes, reason: str) -> None:
    started = time.perf_counter()
    with pytest.raises(InvalidImage, match=reason) as caught:
        probe(data)
    # Bounded work: the walk stops at the cap (milliseconds); 1 s is a generous bound.
    assert time.perf_counter() - started < 1.0
    assert "the test image" in str(caught.value)


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (app1_bomb_jpeg(MAX_JPEG_SEGMENTS - 20), "JPEG"),
        (chunk_bomb_png(MAX_PNG_CHUNKS - 5), "PNG"),
        (comment_bomb_gif(MAX_GIF_BLOCKS - 5), "GIF"),
    ],
)
def test_just_under_the_caps_is_accepted(data: bytes, reason: str) -> None:
    assert probe(data).format == reason


def test_16_bit_rgba_8k_png_is_refused_by_bytes_per_pixel() -> None:
    data = rgba16_8k_png()
    assert len(data) < 1024 * 1024  # small on disk
    with pytest.raises(ImageTooLarge) as caught:
        probe(data)
    message = str(caught.value)
    # 64 M pixels is within max_pixels: only the bytes per pixel refuse it.
    assert "8000x8000 pixels of mode RGBA at 8 bytes per pixel" in message
    assert f"= 512000000 bytes once decoded, over the limit of {256 * MB} bytes" in message


def test_8_bit_rgba_8k_png_fits_the_default_limit() -> None:
    info = probe(rgba_8k_png())
    assert info == ImageInfo("PNG", 8000, 8000, "RGBA", 4)
    assert info.decode_bytes == 256_000_000 <= DEFAULT.max_decode_bytes
    with pytest.raises(ImageTooLarge, match="= 256000000 bytes once decoded"):
        probe_image(rgba_8k_png(), max_decode_bytes=200 * MB)


def test_16_bit_gray_counts_two_bytes_per_pixel() -> None:
    info = probe(png_by_hand(300, 200, bit_depth=16, color_type=0))
    assert (info.mode, info.bytes_per_pixel, info.decode_bytes) == ("I;16", 2, 120_000)


@pytest.mark.parametrize(
    ("mode", "declared", "transparent", "expected"),
    [
        ("1", None, False, 1),
        ("L", None, False, 1),
        ("P", None, False, 1),
        ("P", None, True, 4),  # analysis expands it to RGBA
        ("I;16", None, False, 2),
        ("RGB", None, False, 4),  # Pillow stores RGB in 4 bytes
        ("RGBA", 8, False, 8),  # 16-bit RGBA PNG
        ("CMYK", None, False, 4),
        ("F", None, False, 4),
    ],
)
def test_bytes_per_pixel(mode: str, declared: int | None, transparent: bool, expected: int) -> None:
    assert bytes_per_pixel(mode, declared, transparent) == expected


@pytest.mark.parametrize(
    ("data", "error", "reason"),
    [
        (b"", InvalidImage, "empty image"),
        (b"<!DOCTYPE html><html></html>", InvalidImage, "looks like HTML"),
        (bytes(range(256)), InvalidImage, "is binary data of an unknown format"),
        (b"\xff\xd8\xff", InvalidImage, "not an image: the test image is binary data"),
        (png_by_hand(8, 8)[:20], InvalidImage, "cannot read the image header"),
        (
            encode(Image.new("1", (10_000, 10_000)), "PNG"),
            ImageTooLarge,
            "10000x10000 = 100000000 pixels, over the limit of 64000000 pixels",
        ),
        (
            encode(Image.new("1", (20_000, 20_000)), "PNG"),
            ImageTooLarge,
            "more pixels than Pillow's decompression-bomb limit",
        ),
    ],
    ids=["empty", "html", "binary", "cut-jpeg", "cut-png", "pixel-bomb", "pillow-bomb"],
)
def test_bad_bodies_fail_with_a_clear_reason(
    data: bytes, error: type[Exception], reason: str
) -> None:
    with pytest.raises(error, match=reason):
        probe(data)
