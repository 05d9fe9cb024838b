"""Photographs of real people for the offline faces step (``local.faces``): the bundled ones
(``listener/demo_images``, public domain, see its ``SOURCES.md``) and a deterministic, degraded
copy of one that lands between the suggestion and auto-assign thresholds.

What the step measures on them (dlib's embeddings, ``similarity_from_distance``), with the
default ``LocalSettings`` (faces found on a copy of at most 512 px):

================================  =========================================================
obama_1 - obama_2                 distance 0.386, 96.1 % (assigned)
obama_1 - obama_3                 distance 0.333, 96.7 % (assigned)
obama_2 - obama_3                 distance 0.455, 95.4 % (assigned)
``obama_borderline()`` - obama_1  distance 0.552, 87.2 % (a suggestion)
``obama_borderline()`` - obama_2  distance 0.602, 79.6 % (no match: under 80)
``obama_borderline()`` - biden_1  distance 0.809, 38.1 % (no match)
Obama - biden_1 / astronaut       distance >= 0.82, under 40 % (a new face)
================================  =========================================================

``obama_borderline`` is obama_3 under a Gaussian blur of radius 3.2 px (Pillow), saved as a
JPEG of quality 90. Its neighbours keep it inside 84-91 % of obama_1: radius 3.1 gives
87.5-88.7 %, 3.3 gives 84.7-87.7 % (JPEG quality 80-95), so a small change in a library's
rounding does not move it across 80 or 95. Sharper copies (radius 2.6 and under) score 95 %
or more against obama_1, softer ones (4 and over) under 80 %.
"""

from __future__ import annotations

import io
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any, Final

import asyncpg
from PIL import Image, ImageFilter

from listener.analysis.faces import PgFaceIndex
from listener.analysis.providers.local import LocalProvider
from listener.cli.demo import BUNDLED_IMAGES
from listener.db.queries import Queries
from listener.settings import LocalSettings

OBAMA: Final = ("obama_1.jpg", "obama_2.jpg", "obama_3.jpg")
"""Three different photographs of one man."""
OTHERS: Final = ("biden_1.jpg", "astronaut.png")
"""A photograph each of two other people (a man, a woman)."""
BORDERLINE_BLUR: Final = 3.2
"""The Gaussian blur radius (pixels of obama_3's 492x800) of ``obama_borderline``."""


def photo(name: str) -> bytes:
    """The bytes of bundled photograph ``name`` (``"obama_1.jpg"``, say)."""
    return (BUNDLED_IMAGES / name).read_bytes()


def obama_borderline() -> bytes:
    """obama_3 blurred (``BORDERLINE_BLUR``), JPEG quality 90: about 87 % similar to obama_1
    for the local faces step, a suggestion rather than an automatic assignment."""
    with Image.open(BUNDLED_IMAGES / "obama_3.jpg") as source:
        blurred = source.convert("RGB").filter(ImageFilter.GaussianBlur(BORDERLINE_BLUR))
    out = io.BytesIO()
    blurred.save(out, format="JPEG", quality=90)
    return out.getvalue()


@asynccontextmanager
async def local_faces_provider(pool: asyncpg.Pool, **settings: Any) -> AsyncIterator[LocalProvider]:
    """A started ``LocalProvider`` of one worker process whose ``faces`` step searches the
    faces recorded in ``pool``'s database, as the daemon builds it; closed when the block
    ends. ``settings`` are ``LocalSettings``' (thresholds, say)."""
    provider = LocalProvider(
        LocalSettings(workers=1, **settings),
        max_pixels=64_000_000,
        faces=PgFaceIndex(Queries(pool)),
    )
    await provider.start()
    try:
        yield provider
    finally:
        await provider.close()
