"""``listener.analysis.phash``: the same hashes as ImageHash's ``phash`` (SciPy's DCT), with
OpenCV's."""

from __future__ import annotations

import random
from pathlib import Path

import imagehash
import pytest
from PIL import Image

from listener.analysis.phash import phash

DEMO = Path(__file__).resolve().parents[2] / "listener" / "demo_images"
PHOTOS = sorted(p for p in DEMO.iterdir() if p.suffix in (".png", ".jpg"))


@pytest.mark.parametrize("path", PHOTOS, ids=lambda p: p.name)
def test_the_hash_of_each_demo_photo_is_imagehash_phash(path: Path) -> None:
    with Image.open(path) as image:
        image.load()
    assert phash(image) == str(imagehash.phash(image))
    gray = image.convert("L")
    assert phash(gray) == str(imagehash.phash(gray))


def test_crops_and_resizes_hash_like_imagehash() -> None:
    rng = random.Random(20240501)
    images = []
    for path in PHOTOS:
        with Image.open(path) as image:
            images.append(image.convert("RGB"))
    for _ in range(600):
        image = rng.choice(images)
        left, top = rng.randrange(image.width // 2), rng.randrange(image.height // 2)
        right = rng.randrange(left + 8, image.width + 1)
        bottom = rng.randrange(top + 8, image.height + 1)
        crop = image.crop((left, top, right, bottom))
        if rng.random() < 0.5:
            crop = crop.resize((rng.randrange(16, 400), rng.randrange(16, 400)))
        assert phash(crop) == str(imagehash.phash(crop)), (left, top, right, bottom)


def test_alike_images_are_near_and_different_images_far() -> None:
    with Image.open(DEMO / "coffee.png") as coffee, Image.open(DEMO / "brick.png") as brick:
        coffee.load()
        brick.load()
    original = imagehash.hex_to_hash(phash(coffee))
    smaller = imagehash.hex_to_hash(phash(coffee.resize((300, 200))))
    assert original - smaller <= 4
    assert original - imagehash.hex_to_hash(phash(brick)) > 16


def test_a_flat_image_has_a_defined_hash() -> None:
    # All AC coefficients are zero: only the DC term is above the median.
    assert phash(Image.new("L", (50, 40), 128)) == "8000000000000000"
    assert phash(Image.new("L", (50, 40), 0)) == "0000000000000000"
