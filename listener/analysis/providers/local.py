"""The offline ``local`` provider: classic computer-vision measurements, no network, no model.

``analyze_bytes`` is a pure function run in a pool of worker processes (started with
``spawn``: forking a process that runs an asyncio loop and threads is unsafe). It measures
size, EXIF metadata, sharpness, exposure, contrast, a perceptual hash and frontal faces, and
combines them into a 0-10 quality score. The ``faces`` step (``faces_bytes`` in the workers,
then a search of the owner's faces in Postgres) embeds each face and matches it to the
owner's people offline (``listener.analysis.providers.local_faces``). OpenCV, NumPy and dlib
are imported inside the workers only, so the daemon process does not pay for them.
"""

from __future__ import annotations

import asyncio
import io
import math
import multiprocessing
import os
import signal
import time
import uuid
import warnings
from collections.abc import Callable, Sequence
from concurrent.futures.process import BrokenProcessPool
from datetime import datetime, timedelta, timezone
from typing import TYPE_CHECKING, Any, Final, TypeVar

from pebble import ProcessExpired, ProcessFuture, ProcessPool
from PIL import ExifTags, Image, UnidentifiedImageError

from listener.analysis.faces import (
    FaceIndex,
    IndexedFace,
    NearFace,
    collection_id,
    decide_by_embedding,
    output_faces,
)
from listener.analysis.probe import bytes_per_pixel, describe_bytes, scan_structure
from listener.analysis.providers.base import ImageInput, StepContext, StepResult
from listener.analysis.providers.local_faces import MODEL as FACES_MODEL
from listener.analysis.providers.local_faces import (
    distance_for_similarity,
    embed_faces,
    face_boxes,
    similarity_from_distance,
    upright_rgb,
)
from listener.errors import (
    ImageTooLarge,
    InvalidImage,
    ListenerError,
    ProviderUnavailable,
    StepTimeout,
)

if TYPE_CHECKING:
    from multiprocessing.sharedctypes import Synchronized

    import numpy as np
    from numpy.typing import NDArray

    from listener.settings import LocalSettings

T = TypeVar("T")

STEP: Final = "local.analysis"
FACES_STEP: Final = "local.faces"
#: Laplacian variance below which an image is called blurry: the customary cut-off (Rosebrock,
#: "Blur detection with OpenCV", pyimagesearch, 2015). The variance depends on the image size,
#: which is why it is measured on a copy downscaled to ``analysis_max_side``.
BLUR_THRESHOLD: Final = 100.0
#: Laplacian variance that counts as fully sharp in the quality score.
SHARP_VARIANCE: Final = 1000.0
#: Shorter side, in pixels, below which the quality score is reduced.
MIN_GOOD_SIDE: Final = 480
SHADOW_LEVEL: Final = 5
HIGHLIGHT_LEVEL: Final = 250
#: Fraction of clipped pixels above which an image is under- or over-exposed.
CLIPPED_FRACTION: Final = 0.25
_READY_TIMEOUT_S: Final = 120.0
#: Pillow plugins allowed to parse the bytes (the JPEG plugin also opens MPO). Others, EPS
#: above all (it runs Ghostscript), never see untrusted data.
DECODERS: Final = ("JPEG", "PNG", "GIF", "WEBP", "BMP", "TIFF")
#: Pixels converted at a time to gray (about 4 MB of RGBA), bounding the conversions' memory.
_STRIP_PIXELS: Final = 1 << 20


def analyze_bytes(
    data: bytes,
    *,
    max_side: int,
    max_pixels: int,
    max_decode_bytes: int | None = None,
    face_max_side: int = 512,
    face_upsample: int = 0,
) -> dict[str, Any]:
    """Measure one image. CPU-bound, no I/O: meant to run in a worker process.

    Memory: the decoded image (width x height x bytes per pixel, at most
    ``max_decode_bytes``; a JPEG is decoded at 1/2, 1/4 or 1/8 scale when that still
    covers ``max_side``, with libjpeg's DCT scaling through Pillow's ``Image.draft``), plus
    one 8-bit gray plane of width x height bytes, plus strips of about 1 M pixels for the
    conversions. An 8000x8000 RGBA PNG thus needs about 256 + 64 MB, not the 1.2 GiB a
    whole-image conversion took.

    It sets Pillow's process-wide ``Image.MAX_IMAGE_PIXELS`` to ``max_pixels`` for the
    duration of the call and restores it afterwards, so do not run it in several threads of
    one process at once (worker processes run one call at a time).

    Args:
        data: the encoded image: JPEG, MPO, PNG, GIF, WebP, BMP or TIFF (the first frame
            of animations).
        max_side: the grayscale copy used for blur, exposure, contrast, hash and faces is
            downscaled to this longest side (pixels), so scores do not depend on resolution.
        max_pixels: Pillow's decompression-bomb limit (width x height).
        max_decode_bytes: the largest decoded image accepted, in bytes
            (``listener.analysis.probe.ImageInfo.decode_bytes``); ``None`` for no limit.
        face_max_side: faces are detected on the gray copy downscaled further to this
            longest side (pixels); faces smaller than about 80 / face_max_side of the image's
            longest side are not found.
        face_upsample: times the detector doubles that copy first (0-2): faces half as
            small are found per doubling, at about four times the detection time.

    Returns:
        A JSON-serializable dict::

            width, height: int          pixels, after EXIF orientation
            format: str | None          Pillow's format name, e.g. "JPEG"
            mode: str                   Pillow's mode of the decoded file, e.g. "RGB"
            exif: {taken_at: ISO 8601 str | None, camera_make: str | None,
                   camera_model: str | None, gps: {"lat": float, "lon": float} | None}
            blur: {laplacian_variance: float, is_blurry: bool}
            exposure: {mean_brightness: 0..1, shadows_clipped: 0..1,
                       highlights_clipped: 0..1, verdict: "under" | "over" | "ok"}
            contrast: float             RMS contrast, std of the gray levels / 255
            quality: float              0..10, one decimal (see ``quality_score``)
            phash: str                  64-bit perceptual hash, 16 hex digits
            faces: {count: int, boxes: [[x, y, w, h], ...]}  original pixel coordinates

        Sources: the variance of the Laplacian as a focus measure is from Pech-Pacheco et
        al., "Diatom autofocusing in brightfield microscopy: a comparative study", ICPR 2000;
        the perceptual hash (DCT of a 32x32 gray image) is ImageHash's ``phash`` after Zauner,
        "Implementation and Benchmarking of Perceptual Image Hash Functions", 2010, computed
        with OpenCV's DCT (``listener.analysis.phash``); faces come
        from dlib's HOG frontal face detector (Dalal & Triggs, CVPR 2005;
        ``listener.analysis.providers.local_faces.face_boxes``); it finds faces seen from the
        front, not in profile. Exposure thresholds (levels <= 5 and >= 250, a quarter of the pixels)
        and the quality score are listener's own.

    Raises:
        InvalidImage: empty, not an image, truncated or undecodable, or over a structure
            cap of ``listener.analysis.probe.scan_structure`` (millions of JPEG segments...).
        ImageTooLarge: more than ``max_pixels`` pixels (a possible decompression bomb), or
            more than ``max_decode_bytes`` bytes once decoded.
    """
    import cv2
    import numpy as np

    from listener.analysis.phash import phash

    if not data:
        raise InvalidImage("empty image: 0 bytes")
    image, orientation, info = _decode(
        data, max_side=max_side, max_pixels=max_pixels, max_decode_bytes=max_decode_bytes
    )
    width, height = info["width"], info["height"]

    levels = _gray_levels(image)
    del image  # the decoded pixels: the largest object of the analysis
    gray = _orient(_downscale(levels, max_side), orientation)
    del levels
    laplacian_variance = float(cv2.Laplacian(gray, cv2.CV_64F).var())
    mean_brightness = float(gray.mean()) / 255.0
    shadows = float(np.count_nonzero(gray <= SHADOW_LEVEL)) / gray.size
    highlights = float(np.count_nonzero(gray >= HIGHLIGHT_LEVEL)) / gray.size
    contrast = float(gray.std()) / 255.0
    scale = width / gray.shape[1]

    return {
        "width": width,
        "height": height,
        "format": info["format"],
        "mode": info["mode"],
        "exif": info["exif"],
        "blur": {
            "laplacian_variance": round(laplacian_variance, 3),
            "is_blurry": laplacian_variance < BLUR_THRESHOLD,
        },
        "exposure": {
            "mean_brightness": round(mean_brightness, 4),
            "shadows_clipped": round(shadows, 4),
            "highlights_clipped": round(highlights, 4),
            "verdict": exposure_verdict(mean_brightness, shadows, highlights),
        },
        "contrast": round(contrast, 4),
        "quality": quality_score(
            laplacian_variance=laplacian_variance,
            mean_brightness=mean_brightness,
            shadows_clipped=shadows,
            highlights_clipped=highlights,
            contrast=contrast,
            width=width,
            height=height,
        ),
        "phash": phash(Image.fromarray(gray)),
        "faces": face_boxes(
            gray,
            max_side=face_max_side,
            scale=scale,
            width=width,
            height=height,
            upsample=face_upsample,
        ),
    }


def faces_bytes(
    data: bytes,
    *,
    max_side: int,
    max_pixels: int,
    max_decode_bytes: int | None = None,
    max_faces: int = 10,
    upsample: int = 0,
) -> dict[str, Any]:
    """Detect, align and embed the faces of one image. CPU-bound, no I/O: for a worker.

    Memory: the decoded image (a JPEG at reduced scale, as ``analyze_bytes``), plus an RGB
    copy of at most ``max_side`` x ``max_side`` pixels (3 bytes each), plus dlib's models
    (about 30 MB, loaded once per process).

    Args:
        data: the encoded image (the formats of ``analyze_bytes``).
        max_side: faces are found on a copy downscaled to this longest side (pixels).
        max_pixels, max_decode_bytes: as ``analyze_bytes``.
        max_faces: the most confident faces kept.
        upsample: as ``analyze_bytes``'s ``face_upsample``.

    Returns:
        ``{"width": int, "height": int, "faces": [...]}``: the upright size in pixels and
        ``local_faces.embed_faces``'s faces (bounding box as ratios, confidence 0-100,
        128-float embedding).

    Raises:
        InvalidImage, ImageTooLarge: as ``analyze_bytes``.
        RuntimeError: the face models are not installed.
    """
    if not data:
        raise InvalidImage("empty image: 0 bytes")
    image, orientation, info = _decode(
        data,
        max_side=max_side,
        max_pixels=max_pixels,
        max_decode_bytes=max_decode_bytes,
        draft_mode="RGB",
    )
    rgb = upright_rgb(image, orientation, max_side)
    del image
    return {
        "width": info["width"],
        "height": info["height"],
        "faces": embed_faces(rgb, max_faces, upsample),
    }


def exposure_verdict(mean_brightness: float, shadows_clipped: float, highlights: float) -> str:
    """``"under"``, ``"over"`` or ``"ok"`` (listener's own heuristic).

    Over-exposed when more than a quarter of the pixels are clipped at >= 250 or the mean
    brightness is above 0.85; under-exposed likewise with <= 5 and below 0.15. When both
    ends are clipped, the larger clipped fraction wins.

    Args:
        mean_brightness: mean gray level / 255, 0..1.
        shadows_clipped: fraction of pixels at level <= 5, 0..1.
        highlights: fraction of pixels at level >= 250, 0..1.
    """
    over = highlights > CLIPPED_FRACTION or mean_brightness > 0.85
    under = shadows_clipped > CLIPPED_FRACTION or mean_brightness < 0.15
    if over and under:
        return "over" if highlights >= shadows_clipped else "under"
    return "over" if over else "under" if under else "ok"


def quality_score(
    *,
    laplacian_variance: float,
    mean_brightness: float,
    shadows_clipped: float,
    highlights_clipped: float,
    contrast: float,
    width: int,
    height: int,
) -> float:
    """A 0-10 technical quality score, one decimal (listener's own heuristic, not a standard).

    ``10 * (0.45 * sharpness + 0.25 * exposure + 0.15 * contrast + 0.15 * resolution)``,
    each term in 0..1:

    * sharpness = ``log(1 + laplacian_variance) / log(1 + 1000)``, capped at 1 (the variance
      spans orders of magnitude, so it is log-scaled; 1000 counts as fully sharp);
    * exposure = ``1 - 1.5 * |mean_brightness - 0.5| - shadows_clipped - highlights_clipped``,
      floored at 0;
    * contrast = ``contrast / 0.25``, capped at 1 (a gray-level standard deviation of 64
      counts as full contrast);
    * resolution = ``min(width, height) / 480``, capped at 1.
    """
    sharpness = min(1.0, math.log1p(max(0.0, laplacian_variance)) / math.log1p(SHARP_VARIANCE))
    exposure = 1.0 - 1.5 * abs(mean_brightness - 0.5) - shadows_clipped - highlights_clipped
    exposure = min(1.0, max(0.0, exposure))
    contrast_term = min(1.0, max(0.0, contrast / 0.25))
    resolution = min(1.0, min(width, height) / MIN_GOOD_SIDE)
    score = 10.0 * (0.45 * sharpness + 0.25 * exposure + 0.15 * contrast_term + 0.15 * resolution)
    return round(min(10.0, max(0.0, score)), 1)


def _decode(
    data: bytes,
    *,
    max_side: int,
    max_pixels: int,
    max_decode_bytes: int | None,
    draft_mode: str = "L",
) -> tuple[Image.Image, int, dict[str, Any]]:
    """Decode ``data`` (JPEGs at reduced scale, straight to ``draft_mode``: gray, or RGB for
    the faces step) and read its facts.

    Returns the decoded image as stored (not rotated), its EXIF orientation (1-8) and the
    facts of ``analyze_bytes``'s output. Nothing larger than the decoded image is allocated
    here: rotating is left to the gray copy (``_orient``), since ``ImageOps.exif_transpose``
    would copy the whole image.
    """
    previous_limit = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = max_pixels
    try:
        declared = scan_structure(data, "the image")
        with warnings.catch_warnings():
            # Pillow only warns between max_pixels and twice that; refuse both.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=DECODERS)
            per_pixel = bytes_per_pixel(image.mode, declared, "transparency" in image.info)
            decoded = image.width * image.height * per_pixel
            if max_decode_bytes is not None and decoded > max_decode_bytes:
                raise ImageTooLarge(
                    f"image too large: {image.width}x{image.height} pixels of mode "
                    f"{image.mode} at {per_pixel} bytes per pixel = {decoded} bytes once "
                    f"decoded, over the limit of {max_decode_bytes} bytes"
                )
            exif = _exif_summary(image)
            orientation = _orientation(image)
            width, height = image.size
            if orientation in (5, 6, 7, 8):
                width, height = height, width
            info: dict[str, Any] = {
                "width": width,
                "height": height,
                "format": image.format,
                "mode": image.mode,
                "exif": exif,
            }
            # JPEG only: let libjpeg decode at 1/2, 1/4 or 1/8 scale, straight to gray.
            image.draft(draft_mode, (max_side, max_side))
            image.load()
    except (Image.DecompressionBombWarning, Image.DecompressionBombError):
        raise ImageTooLarge(
            f"image too large: more than {max_pixels} pixels (a possible decompression bomb)"
        ) from None
    except UnidentifiedImageError:
        raise InvalidImage(f"cannot decode image: the data {_describe_bytes(data)}") from None
    except OSError as exc:
        if "truncated" in str(exc):
            raise InvalidImage(f"truncated image: {exc}") from None
        raise InvalidImage(f"cannot decode image: {exc}") from None
    except (ListenerError, MemoryError):
        raise
    except Exception as exc:  # Pillow's decoders raise SyntaxError, ValueError, EOFError...
        raise InvalidImage(f"cannot decode image: {type(exc).__name__}: {exc}") from None
    finally:
        Image.MAX_IMAGE_PIXELS = previous_limit
    return image, orientation, info


_MARKUP = ("looks like HTML", "looks like XML or SVG", "looks like JSON")


def _describe_bytes(data: bytes) -> str:
    """What undecodable ``data`` looks like: markup or JSON by ``probe.describe_bytes``, else
    the formats this provider decodes."""
    said = describe_bytes(data)
    if said in _MARKUP:
        return said
    # Never the bytes themselves, not even in hex: they may be the start of any local file.
    return f"is not in a supported format ({', '.join(DECODERS)}, MPO)"


def _orientation(image: Image.Image) -> int:
    try:
        value = image.getexif().get(ExifTags.Base.Orientation, 1)
        return int(value)
    except Exception:  # corrupt EXIF must not fail the analysis
        return 1


def _exif_summary(image: Image.Image) -> dict[str, Any]:
    """Capture time, camera make/model and GPS position from EXIF; ``None`` where absent."""
    summary: dict[str, Any] = {
        "taken_at": None,
        "camera_make": None,
        "camera_model": None,
        "gps": None,
    }
    try:
        exif = image.getexif()
        summary["camera_make"] = _exif_text(exif.get(ExifTags.Base.Make))
        summary["camera_model"] = _exif_text(exif.get(ExifTags.Base.Model))
        sub = exif.get_ifd(ExifTags.IFD.Exif)
        summary["taken_at"] = _exif_datetime(
            sub.get(ExifTags.Base.DateTimeOriginal), sub.get(ExifTags.Base.OffsetTimeOriginal)
        ) or _exif_datetime(exif.get(ExifTags.Base.DateTime), sub.get(ExifTags.Base.OffsetTime))
        summary["gps"] = _exif_gps(exif.get_ifd(ExifTags.IFD.GPSInfo))
    except Exception:  # corrupt EXIF must not fail the analysis; keep what was read
        pass
    return summary


def _exif_text(value: object) -> str | None:
    if isinstance(value, bytes):
        value = value.decode("utf-8", errors="replace")
    if not isinstance(value, str):
        return None
    text = value.replace("\x00", "").strip()
    return text[:128] or None


def _exif_datetime(value: object, offset: object) -> str | None:
    """EXIF ``"YYYY:MM:DD HH:MM:SS"`` (CIPA DC-008, with ``OffsetTime*`` "+HH:MM") as ISO 8601."""
    text = _exif_text(value)
    if text is None:
        return None
    try:
        moment = datetime.strptime(text[:19], "%Y:%m:%d %H:%M:%S")
    except ValueError:
        try:
            moment = datetime.fromisoformat(text)
        except ValueError:
            return None
    offset_text = _exif_text(offset)
    if moment.tzinfo is None and offset_text is not None:
        try:
            sign = -1 if offset_text.startswith("-") else 1
            hours, minutes = offset_text.lstrip("+-").split(":")
            delta = timedelta(hours=int(hours), minutes=int(minutes))
            moment = moment.replace(tzinfo=timezone(sign * delta))
        except ValueError:
            pass
    return moment.isoformat()


def _exif_gps(gps: dict[int, Any]) -> dict[str, float] | None:
    """Decimal degrees from the GPS IFD's degree/minute/second rationals and N/S/E/W refs."""
    lat = _degrees(gps.get(ExifTags.GPS.GPSLatitude), gps.get(ExifTags.GPS.GPSLatitudeRef), "S")
    lon = _degrees(gps.get(ExifTags.GPS.GPSLongitude), gps.get(ExifTags.GPS.GPSLongitudeRef), "W")
    if lat is None or lon is None or abs(lat) > 90 or abs(lon) > 180:
        return None
    return {"lat": round(lat, 7), "lon": round(lon, 7)}


def _degrees(value: object, ref: object, negative_ref: str) -> float | None:
    if not isinstance(value, tuple | list) or not 1 <= len(value) <= 3:
        return None
    try:
        parts = [float(part) for part in value]
    except (TypeError, ValueError, ZeroDivisionError):
        return None
    degrees = sum(part / 60.0**i for i, part in enumerate(parts))
    if not math.isfinite(degrees):
        return None
    return -degrees if _exif_text(ref) in (negative_ref, negative_ref.lower()) else degrees


def _gray_levels(image: Image.Image) -> NDArray[np.uint8]:
    """8-bit gray levels; transparent areas are composited over white.

    Works in horizontal strips of about ``_STRIP_PIXELS`` pixels, so that besides the decoded
    image only the result (one byte per pixel) and one strip's conversions are in memory:
    converting a whole 8000x8000 RGBA image at once (RGBA copy, white background, composite,
    gray) took over 1 GiB. The levels are the same as converting the whole image at once.
    """
    import numpy as np

    width, height = image.size
    rows = max(1, _STRIP_PIXELS // max(1, width))
    gray = np.empty((height, width), dtype=np.uint8)
    if image.mode in ("I", "F") or image.mode.startswith("I;16"):
        high = image.getextrema()[1]
        scale = 257.0 if isinstance(high, int | float) and high > 255 else 1.0
        for top in range(0, height, rows):
            strip = image.crop((0, top, width, min(height, top + rows)))
            levels = np.asarray(strip, dtype=np.float64) / scale
            gray[top : top + rows] = np.clip(levels, 0, 255).astype(np.uint8)
        return gray
    transparent = image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info
    for top in range(0, height, rows):
        strip = image.crop((0, top, width, min(height, top + rows)))
        if transparent:
            rgba = strip.convert("RGBA")
            background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            strip = Image.alpha_composite(background, rgba)
        gray[top : top + rows] = np.asarray(strip.convert("L"), dtype=np.uint8)
    return gray


def _orient(gray: NDArray[np.uint8], orientation: int) -> NDArray[np.uint8]:
    """``gray`` turned upright per its EXIF orientation (CIPA DC-008, tag 0x0112), as
    ``ImageOps.exif_transpose`` turns the image."""
    import numpy as np

    turned = {
        2: lambda a: a[:, ::-1],  # mirrored
        3: lambda a: a[::-1, ::-1],  # rotated 180
        4: lambda a: a[::-1, :],  # flipped
        5: lambda a: a.T,  # transposed
        6: lambda a: np.rot90(a, -1),  # rotated 90 clockwise to be upright
        7: lambda a: a[::-1, ::-1].T,  # transversed
        8: lambda a: np.rot90(a, 1),  # rotated 90 counter-clockwise to be upright
    }.get(orientation)
    return gray if turned is None else np.ascontiguousarray(turned(gray))


def _downscale(gray: NDArray[np.uint8], max_side: int) -> NDArray[np.uint8]:
    import cv2
    import numpy as np

    height, width = gray.shape
    factor = max_side / max(width, height)
    if factor >= 1.0:
        return gray
    size = (max(1, round(width * factor)), max(1, round(height * factor)))
    return np.asarray(cv2.resize(gray, size, interpolation=cv2.INTER_AREA), dtype=np.uint8)


def _warm_up() -> str:
    """Import the libraries, build the face detector and run one tiny analysis; returns cv2's
    version. The recognition models load on the first ``faces`` step."""
    import cv2

    # One thread per worker: the pool already runs one process per CPU.
    cv2.setNumThreads(1)
    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), (128, 96, 64)).save(buffer, "PNG")
    analyze_bytes(buffer.getvalue(), max_side=64, max_pixels=64 * 64)
    return str(cv2.__version__)


def _init_worker(ready: Synchronized[int]) -> None:
    _warm_up()
    with ready.get_lock():
        ready.value += 1


def _in_worker(function: Callable[..., T], *args: Any) -> T:
    """``function(*args)``, with unexpected errors made safe to send back to the parent."""
    try:
        return function(*args)
    except (ListenerError, MemoryError):
        raise
    except Exception as exc:
        # Some library exceptions (cv2.error) do not survive pickling back to the parent, and
        # a TimeoutError of the function's own must not read as the pool's task timeout.
        raise RuntimeError(f"local analysis failed: {type(exc).__name__}: {exc}") from None


def _death(exitcode: int | None) -> str:
    """``"killed by SIGKILL"`` for a negative exit code (a signal; the OOM killer sends
    SIGKILL), else ``"exit code <n>"``."""
    if exitcode is not None and exitcode < 0:
        try:
            return f"killed by {signal.Signals(-exitcode).name}"
        except ValueError:
            return f"killed by signal {-exitcode}"
    return f"exit code {exitcode}"


def _analyze(
    data: bytes,
    max_side: int,
    max_pixels: int,
    max_decode_bytes: int | None,
    face_max_side: int = 512,
    face_upsample: int = 0,
) -> dict[str, Any]:
    return analyze_bytes(
        data,
        max_side=max_side,
        max_pixels=max_pixels,
        max_decode_bytes=max_decode_bytes,
        face_max_side=face_max_side,
        face_upsample=face_upsample,
    )


def _faces(
    data: bytes,
    max_side: int,
    max_pixels: int,
    max_decode_bytes: int | None,
    max_faces: int,
    upsample: int = 0,
) -> dict[str, Any]:
    return faces_bytes(
        data,
        max_side=max_side,
        max_pixels=max_pixels,
        max_decode_bytes=max_decode_bytes,
        max_faces=max_faces,
        upsample=upsample,
    )


class LocalProvider:
    """The ``local`` provider: ``analyze_bytes`` in a pool of spawned worker processes, and
    the offline faces step.

    Args:
        settings: the ``local`` slice of the settings (workers, analysis_max_side, the faces
            step's face_max_side, collection_prefix, thresholds and max_faces).
        max_pixels: Pillow's decompression-bomb limit, in pixels (``fetch.max_pixels``).
        max_decode_bytes: the largest decoded image, in bytes (``fetch.max_decode_bytes``);
            with it one analysis stays within the bound ``analyze_bytes`` states.
        timeout_s: seconds one analysis may run in its worker process (waiting for a free
            worker not included); the process is then killed and replaced. ``None`` for no
            limit (``step_timeouts["local"]`` in production).
        faces: the search of recorded embeddings; needed for the ``faces`` kind.

    ``analyze`` returns one ``StepResult`` with step ``"local.analysis"`` whose output is
    ``analyze_bytes``'s dict. It raises ``InvalidImage`` / ``ImageTooLarge`` for bad images,
    ``StepTimeout`` when the analysis hung, and ``ProviderUnavailable`` when a worker died. In
    both of the last cases only that worker is replaced: the other analyses go on. The pool is
    Pebble's ``ProcessPool`` (https://pebble.readthedocs.io), which terminates the process of
    a task that timed out or was cancelled and starts a new one.

    The ``faces`` kind (step ``local.faces``) embeds each face in a worker (``faces_bytes``),
    searches the owner's collection in Postgres (``faces``), and decides as the Rekognition
    step does (``listener.analysis.faces.decide``). Its faces, with their embeddings, are the
    step's ``"faces"`` effect, recorded by the job store in the fenced transaction that stores
    the step: a run that dies before that leaves nothing behind, so a retry needs no clean-up.
    """

    name: str = "local"
    needs_image: bool = True

    def __init__(
        self,
        settings: LocalSettings,
        *,
        max_pixels: int,
        max_decode_bytes: int | None = None,
        timeout_s: float | None = None,
        faces: FaceIndex | None = None,
    ) -> None:
        self._settings = settings
        self._faces = faces
        self._max_side = settings.analysis_max_side
        self._max_pixels = max_pixels
        self._max_decode_bytes = max_decode_bytes
        self._workers = settings.workers or os.cpu_count() or 1
        self._timeout_s = timeout_s
        self._pool: ProcessPool | None = None
        self._futures: set[ProcessFuture[Any]] = set()
        self._model = "listener-local/1 (opencv, phash)"

    @property
    def model(self) -> str:
        """The version string stored with each result.

        For example ``"listener-local/1 (opencv 4.14, phash)"``; the OpenCV version
        is filled in by ``start``, from the workers.
        """
        return self._model

    async def start(self) -> None:
        """Start the worker processes and wait until each has warmed up (up to 120 s).

        Raises:
            RuntimeError: the workers did not become ready in time, or the pool broke.
        """
        if self._pool is not None:
            return
        loop = asyncio.get_running_loop()
        pool, ready = self._new_pool()
        self._pool = pool
        versions = await asyncio.gather(
            *(asyncio.wrap_future(pool.schedule(_warm_up)) for _ in range(self._workers))
        )
        major_minor = ".".join(versions[0].split(".")[:2])
        self._model = f"listener-local/1 (opencv {major_minor}, phash)"
        deadline = loop.time() + _READY_TIMEOUT_S
        while ready.value < self._workers:
            if loop.time() > deadline:
                raise RuntimeError(
                    f"only {ready.value} of {self._workers} local analysis workers started "
                    f"within {_READY_TIMEOUT_S} s"
                )
            await asyncio.sleep(0.02)

    async def close(self) -> None:
        """Stop the worker processes, cancelling queued and running work. Safe to call twice."""
        pool, self._pool = self._pool, None
        for future in list(self._futures):
            future.cancel()
        if pool is not None:
            pool.stop()
            await asyncio.to_thread(pool.join)

    def estimate_tokens(self, kind: str, image: ImageInput) -> int:
        """The local provider is not token-priced: 0."""
        return 0

    async def run(self, kind: str, image: ImageInput, context: StepContext) -> StepResult:
        """The ``analysis`` step (``analyze(image)``) or the ``faces`` step (``faces``).

        Raises:
            ValueError: an unknown kind.
        """
        if kind == "faces":
            return await self.faces(image)
        if kind != "analysis":
            raise ValueError(f"the local provider has no step kind {kind!r}")
        return await self.analyze(image)

    async def faces(self, image: ImageInput) -> StepResult:
        """The faces step: embed ``image``'s faces and match them to the owner's faces.

        Returns:
            ``StepResult(step="local.faces")`` whose output is ``collection_id``, ``faces``
            (face_id, decision, matched_face_id, similarity %, bounding_box as ratios,
            confidence %), ``model_version`` and ``removed_faces`` (always 0: nothing is left
            at a remote service), as the Rekognition step's; effect ``"faces"``: the
            decisions with each face's ``embedding``.

        Raises:
            InvalidImage, ImageTooLarge, StepTimeout, ProviderUnavailable: as ``analyze``.
            RuntimeError: no ``FaceIndex`` was given, or the models are not installed.
        """
        if self._faces is None:
            raise RuntimeError("the local faces step needs a FaceIndex")
        started = time.perf_counter()
        s = self._settings
        found = await self.run_in_worker(
            _faces,
            image.data,
            s.face_max_side,
            self._max_pixels,
            self._max_decode_bytes,
            s.max_faces,
            s.face_upsample,
        )
        collection = collection_id(s.collection_prefix, image.owner_id)
        reach = distance_for_similarity(s.suggest_similarity)
        faces = [
            IndexedFace(str(uuid.uuid4()), face["bounding_box"], face["confidence"])
            for face in found["faces"]
        ]
        embeddings = {
            indexed.face_id: face["embedding"]
            for indexed, face in zip(faces, found["faces"], strict=True)
        }
        index = self._faces

        async def nearest(embedding: Sequence[float]) -> list[NearFace]:
            return await index.nearest(
                collection, embedding, image.source_table, image.source_id, reach, 5
            )

        decisions = await decide_by_embedding(
            faces,
            embeddings,
            nearest,
            similarity_from_distance,
            s.auto_assign_similarity,
            s.suggest_similarity,
        )
        output = {
            "collection_id": collection,
            "faces": output_faces(decisions, confidence=True),
            "unindexed": [],
            "model_version": FACES_MODEL,
            "removed_faces": 0,
        }
        return StepResult(
            provider=self.name,
            step=FACES_STEP,
            output=output,
            model=FACES_MODEL,
            duration_s=time.perf_counter() - started,
            effects={
                "faces": {
                    "collection_id": collection,
                    "faces": decisions,
                    # The job store decides again with these, under the owner's lock
                    # (listener.analysis.face_store.PgFacesEffect).
                    "auto_assign_similarity": s.auto_assign_similarity,
                    "suggest_similarity": s.suggest_similarity,
                }
            },
        )

    async def delete_faces(self, collection_id: str, face_ids: list[str]) -> int:
        """See ``listener.app_side.deletes.FaceRemover.delete_faces``: the local step keeps its
        faces only in ``listener.faces``, which the drain then forgets; no call is made.

        Raises:
            ProviderUnavailable: ``collection_id`` is not one of the local step's (a
                Rekognition collection from before a switch); a Rekognition provider must
                delete those faces, so the drain keeps them and tries again later.
        """
        self._check_local(collection_id)
        return 0

    async def delete_row_faces(
        self, owner_id: str | None, source_table: str, source_id: str
    ) -> tuple[int, int]:
        """See ``listener.app_side.deletes.FaceRemover.delete_row_faces``: nothing is indexed
        before it is recorded, so nothing else is left: ``(0, 0)``."""
        return 0, 0

    def _check_local(self, collection: str) -> None:
        if not collection.startswith(f"{self._settings.collection_prefix}-"):
            raise ProviderUnavailable(
                f"faces of collection {collection!r} were indexed by another provider "
                "(Rekognition); this daemon's faces step is local and cannot delete them"
            )

    async def analyze(self, image: ImageInput) -> StepResult:
        """Analyze ``image.data`` in a worker process.

        Returns:
            ``StepResult(provider="local", step="local.analysis", output=..., model=...,
            duration_s=...)``; ``duration_s`` is wall time in seconds, queueing included.

        Raises:
            InvalidImage: empty, not an image, truncated or undecodable.
            ImageTooLarge: over the pixel limit.
            StepTimeout, ProviderUnavailable, RuntimeError: as ``run_in_worker``.
        """
        started = time.perf_counter()
        output = await self.run_in_worker(
            _analyze,
            image.data,
            self._max_side,
            self._max_pixels,
            self._max_decode_bytes,
            self._settings.face_max_side,
            self._settings.face_upsample,
        )
        return StepResult(
            provider=self.name,
            step=STEP,
            output=output,
            model=self._model,
            duration_s=time.perf_counter() - started,
        )

    async def run_in_worker(self, function: Callable[..., T], *args: Any) -> T:
        """``function(*args)`` in a worker process, killed once it has run ``timeout_s``.

        ``function`` and ``args`` must pickle (``function`` at module level). Cancelling the
        awaiting task also kills the process running ``function`` (if it started), so the
        dispatcher's own step timeout frees the worker too.

        Raises:
            StepTimeout: ``function`` ran longer than ``timeout_s`` seconds; its process was
                terminated and a new one started, other tasks were not disturbed.
            ProviderUnavailable: the worker died (e.g. OOM-killed), or the whole pool broke
                (then a new pool has been started); the job may be retried.
            ListenerError, MemoryError: raised by ``function``, as they are.
            RuntimeError: ``start`` was not called, or ``function`` raised something else.
        """
        if self._pool is not None and not self._pool.active:
            await self._replace_pool(self._pool)
        pool = self._pool
        if pool is None:
            raise RuntimeError("LocalProvider.start() must be called before run_in_worker()")
        future = pool.schedule(_in_worker, args=(function, *args), timeout=self._timeout_s)
        self._futures.add(future)
        try:
            return await asyncio.wrap_future(future)
        except TimeoutError:
            # Only Pebble's task timeout: _in_worker turns the function's own into RuntimeError.
            raise StepTimeout(STEP, self._timeout_s or 0.0) from None
        except ProcessExpired as exc:
            # Pebble fails only the task of the dead process and starts a new process.
            raise ProviderUnavailable(
                f"a local analysis worker died ({_death(exc.exitcode)}: out of memory or "
                "killed); it was replaced and the analysis will be retried"
            ) from None
        except BrokenProcessPool:
            await self._replace_pool(pool)
            raise ProviderUnavailable(
                "the local analysis worker pool broke; it was restarted"
            ) from None
        finally:
            self._futures.discard(future)

    def _new_pool(self) -> tuple[ProcessPool, Synchronized[int]]:
        context = multiprocessing.get_context("spawn")
        ready: Synchronized[int] = context.Value("i", 0)
        pool = ProcessPool(
            max_workers=self._workers,
            initializer=_init_worker,
            initargs=(ready,),
            context=context,
        )
        return pool, ready

    async def _replace_pool(self, broken: ProcessPool) -> None:
        """Swap in a fresh pool, once per broken pool however many tasks saw it break."""
        if self._pool is broken:
            self._pool, _ = self._new_pool()
            broken.stop()
            await asyncio.to_thread(broken.join)
