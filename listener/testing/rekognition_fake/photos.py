"""Test photos: a known face (``"a"``, ``"b"``, ``"a_borderline"``) or none, on a seeded
background. See "Test faces" in the package docstring."""

from __future__ import annotations

from importlib import resources

import cv2
import numpy as np

from listener.testing.rekognition_fake.images import Image

TILE_SIDE = 167
"""Side in pixels of the face tile that ``face_photo`` pastes at ``scale=1``."""
_ASTRONAUT_TILE = (140, 30)  # top-left of the TILE_SIDE square tile in astronaut.png
_VEIL_TOP = 0.62  # "a_borderline": veil from this fraction of the tile's height down
_VEIL_OPACITY = 0.7


def face_tile(face: str) -> Image:
    """The ``TILE_SIDE`` square BGR tile of ``face``: "a", "b" or "a_borderline"."""
    raw = resources.files("listener").joinpath("demo_images/astronaut.png").read_bytes()
    source = cv2.imdecode(np.frombuffer(raw, np.uint8), cv2.IMREAD_COLOR)
    if source is None:
        raise RuntimeError("listener/demo_images/astronaut.png did not decode")
    x, y = _ASTRONAUT_TILE
    tile = np.asarray(source[y : y + TILE_SIDE, x : x + TILE_SIDE], dtype=np.uint8).copy()
    if face == "a":
        return tile
    if face == "b":
        return np.asarray(cv2.flip(tile, 1), dtype=np.uint8)
    if face == "a_borderline":
        top = int(TILE_SIDE * _VEIL_TOP)
        lower = tile[top:].astype(np.float32)
        tile[top:] = np.clip(lower * (1 - _VEIL_OPACITY) + 128 * _VEIL_OPACITY, 0, 255)
        return tile
    raise ValueError(f"unknown face {face!r}: use 'a', 'b' or 'a_borderline'")


def _background(size: tuple[int, int], seed: int) -> Image:
    """A seeded two-colour linear gradient with fine pixel noise (no face-like blobs)."""
    width, height = size
    rng = np.random.default_rng(seed)
    first, second = rng.uniform(60, 200, 3), rng.uniform(60, 200, 3)
    angle = rng.uniform(0, 2 * np.pi)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    ramp = xx * np.cos(angle) + yy * np.sin(angle)
    ramp = (ramp - ramp.min()) / max(1e-6, float(ramp.max() - ramp.min()))
    image = first * (1 - ramp[..., None]) + second * ramp[..., None]
    image += rng.normal(0, 6, (height, width, 3))
    return np.asarray(np.clip(image, 0, 255), dtype=np.uint8)


def _jpeg(image: Image) -> bytes:
    ok, encoded = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, 92])
    if not ok:
        raise RuntimeError("JPEG encoding failed")
    return bytes(encoded.tobytes())


def face_photo(
    face: str,
    *,
    size: tuple[int, int] = (640, 480),
    position: tuple[int, int] | None = None,
    scale: float = 1.0,
    brightness: float = 1.0,
    seed: int = 0,
    blur: float = 0.0,
) -> bytes:
    """JPEG bytes of a photo of ``face`` ("a", "b" or "a_borderline") on a seeded background.

    Args:
        size: (width, height) of the photo in pixels.
        position: (x, y) of the face tile's top-left corner; None centres it. The tile is
            ``round(TILE_SIDE * scale)`` px square, the face about 56% of that, centred.
        scale: tile scale (0.7-1.3 is what the calibration covered).
        brightness: factor applied to the tile's pixels.
        seed: picks the background's colours, direction and noise.
        blur: Gaussian sigma (tile pixels) applied to the tile, to make a soft face; 10 gets
            ``LOW_SHARPNESS`` under ``QualityFilter="AUTO"`` (the cascade still finds it).

    Raises:
        ValueError: an unknown ``face``, or a tile that does not fit at ``position``.
    """
    tile = face_tile(face)
    if blur > 0:
        tile = np.asarray(cv2.GaussianBlur(tile, (0, 0), blur), dtype=np.uint8)
    side = max(1, round(TILE_SIDE * scale))
    interpolation = cv2.INTER_AREA if scale < 1 else cv2.INTER_CUBIC
    tile = np.asarray(cv2.resize(tile, (side, side), interpolation=interpolation), np.uint8)
    tile = np.clip(tile.astype(np.float32) * brightness, 0, 255).astype(np.uint8)
    width, height = size
    x, y = position if position is not None else ((width - side) // 2, (height - side) // 2)
    if x < 0 or y < 0 or x + side > width or y + side > height:
        raise ValueError(f"a {side} px tile at {(x, y)} does not fit in {size}")
    photo = _background(size, seed)
    photo[y : y + side, x : x + side] = tile
    return _jpeg(photo)


def no_face_photo(*, size: tuple[int, int] = (640, 480), seed: int = 0) -> bytes:
    """JPEG bytes of a photo without faces: a seeded background with a few flat shapes."""
    photo = _background(size, seed)
    rng = np.random.default_rng(seed + 1)
    width, height = size
    for _ in range(6):
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        x, y = int(rng.integers(0, width)), int(rng.integers(0, height))
        extent = int(rng.integers(20, max(21, min(width, height) // 3)))
        if rng.random() < 0.5:
            cv2.circle(photo, (x, y), extent, colour, thickness=-1)
        else:
            cv2.rectangle(photo, (x, y), (x + extent, y + extent // 2), colour, thickness=-1)
    return _jpeg(photo)
