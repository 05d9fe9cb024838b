"""A fake Amazon Rekognition: a real aiohttp server that the real ``aioboto3`` client talks to.

moto does not implement Rekognition face collections, so tests use this instead::

    async with FakeRekognition(tps_limit=5) as fake:
        session = aioboto3.Session(aws_access_key_id="testing",
                                   aws_secret_access_key="testing", region_name="us-east-1")
        async with session.client("rekognition", endpoint_url=fake.endpoint_url) as client:
            await client.create_collection(CollectionId="people")
            fake.faults.append("ThrottlingException")    # the next request fails with it

botocore quirks met on the way: ``Config(retries={"max_attempts": 1})`` means one *retry*
(two attempts; botocore's legacy meaning), so a single injected ``ThrottlingException`` or 5xx
is retried and the call succeeds; ``{"total_max_attempts": 1}`` is one attempt in all. botocore
validates only ``required``, types, enums and ``min``: ``max`` and ``pattern`` (a 6 MB image, a
CollectionId with a space) reach the server. aiohttp warns (``ResourceWarning: Sending a large
body directly with raw bytes``) for request bodies over 1 MiB, i.e. images over ~750 kB once
base64-encoded; under ``filterwarnings = error`` that warning fails the call. Timestamps
(``CreationTimestamp``) travel as epoch seconds and come back as ``datetime``.

As a process: ``python -m listener.testing.rekognition_fake --port 0 [--tps N]`` prints
``READY http://127.0.0.1:PORT`` (flushed) and serves until SIGTERM or SIGINT. Point boto3 /
aioboto3 (``client("rekognition", endpoint_url=...)``) or listener
(``LISTENER_REKOGNITION__ENDPOINT_URL``) at that URL, with any AWS credentials and region.

Protocol (AWS JSON 1.1, as botocore speaks it for Rekognition): ``POST /`` with
``X-Amz-Target: RekognitionService.<Operation>``, ``Content-Type: application/x-amz-json-1.1``
and a JSON body, blobs (``Image.Bytes``) in base64. Answers are JSON of the same content type.
An error is HTTP 400 (500 for ``InternalServerError``, 503 for ``ServiceUnavailableException``,
403 for a missing ``Authorization`` header) with ``{"__type": "<Code>", "Message": "..."}``:
botocore's JSON parser takes ``__type`` (after any ``#``) as ``Error.Code`` and ``Message`` (or
``message``) as ``Error.Message``, so ``ClientError.response["Error"]["Code"]`` is the exception
name, and ``client.exceptions.<Name>`` matches for names in the service model. SigV4 signatures
are not checked, but an ``Authorization`` header is required.

Operations: CreateCollection, ListCollections, DeleteCollection, IndexFaces, ListFaces,
DeleteFaces, SearchFaces, DetectLabels (what listener calls, and DeleteCollection for tests of a
collection deleted outside listener; any other is ``UnknownOperationException``). Shapes follow
botocore's service model (``rekognition`` 2016-06-27). Behaviour taken from the API reference
and https://docs.aws.amazon.com/rekognition/latest/dg/limits.html:

- ``Image.Bytes``: at most 5 MiB raw (else ``ImageTooLargeException``; botocore does not check
  a blob's ``max``), JPEG or PNG by magic bytes (else ``InvalidImageFormatException``), at
  least 80 px on each side (else ``InvalidParameterException``). ``Image.S3Object`` ->
  ``InvalidS3ObjectException`` (not supported here). No ``Image`` is caught by botocore's
  parameter validation before any request; an empty ``Image`` -> ``InvalidParameterException``.
- ``FaceMatchThreshold`` defaults to 80; ``SearchFaces`` never returns the searched face;
  matches are sorted by similarity, highest first, at most ``MaxFaces`` (default 4096, the
  service's maximum). An unknown ``FaceId`` -> ``InvalidParameterException``.
- ``IndexFaces``: faces failing ``QualityFilter`` (default ``AUTO``; ``NONE`` disables it) go
  to ``UnindexedFaces`` with ``SMALL_BOUNDING_BOX`` (side < 40 px, scaled up for images larger
  than 1920x1080), ``LOW_SHARPNESS`` or ``LOW_BRIGHTNESS``; of the rest the largest
  ``MaxFaces`` are indexed and the others get ``EXCEEDS_MAX_FACES``. A ``FaceDetail`` has
  the DEFAULT members listener reads (BoundingBox, Pose, Quality, Confidence), whatever
  ``DetectionAttributes`` asks for.
- Constraints botocore leaves to the server (``pattern`` and ``max``) -> ``ValidationException``.
- ``CollectionArn`` has the service's ``aws:rekognition:...`` form (no ``arn:`` prefix).

Inspectable state and knobs: ``faults`` (exception names raised by the next requests, FIFO,
one per request), ``latency_s`` (added to every admitted request), ``calls`` ((operation,
``time.monotonic()``) of every request, throttled or not), ``violations`` and
``collections`` (id -> ``Collection``).

TPS limit: every operation counts against one sliding window. With ``tps_limit`` = r, a
request is admitted when fewer than ``c = max(1, floor(r))`` requests were admitted in the last
``c / r`` seconds (1 s for integral r); otherwise it counts as a violation and gets
``ThrottlingException``. Throttled requests do not occupy the window. A client-side token bucket
of rate r and burst b can put about b + r - 1 requests into one 1 s window, so only burst 1
(with a little margin in the rate for arrival jitter) stays clear of violations.

Faces: OpenCV's frontal Haar cascade (``haarcascade_frontalface_default.xml``, scaleFactor 1.1,
minNeighbors 5, minSize 24 px) on the grayscale image downscaled to at most 1024 px and
equalized with CLAHE (clip 2, 8x8 tiles). Global ``equalizeHist`` missed the face in 14 of 80
test photos (the background's histogram reshapes the face's tones), CLAHE in none. Each face's
signature is its square box grown by 25% per side, resampled (anti-aliased) to 48x48 and blurred
(sigma 1). Two signatures are compared by normalized cross-correlation (``TM_CCOEFF_NORMED``):
the central 32x32 of one, taken at 9 scales 0.88-1.12, slid over the other's 48x48, best of both
directions. This absorbs the cascade's box jitter (position, and size within +-12%), brightness
and pixel noise. The correlation c becomes a similarity by a piecewise-linear map, calibrated on
the test photos below: (c, similarity) = (0, 0), (0.80, 70), (0.905, 89), (0.96, 97), (1, 100);
negative c gives 0.

Test faces (``face_photo``): a 167x167 px tile cut from ``listener/demo_images/astronaut.png``
(scikit-image's astronaut, public domain; the cascade finds the face at x 177, y 67, 93 px)
around the face, pasted on a seeded gradient-plus-noise background.

- ``"a"``: the tile.
- ``"b"``: the tile mirrored left-right. The only frontal face in the shipped images is the
  astronaut's; her mirror image has the hair parting and the asymmetries on the other side,
  which this signature sees as another face (the cascade detects it as well).
- ``"a_borderline"``: ``"a"`` with a translucent grey veil (70% opacity) over the lower 38% of
  the tile (mouth and chin): a partial occlusion. Pixel noise was tried first: sigma 25-55
  barely moves the blurred signature (c >= 0.97), and spatially correlated noise stops the
  cascade from finding the face at all.

Measured over 40 photos per kind (640x480, scale 0.7-1.3, brightness 0.9-1.1, random
positions and backgrounds), each compared with 40 photos of ``"a"`` (1600 pairs), as
similarity (correlation): ``"a"`` 98.4-100.0, median 99.5 (0.979-1.000); ``"a_borderline"``
86.7-91.2, median 89.3 (0.892-0.920); ``"b"`` 52.3-61.8, median 59.1 (0.598-0.707). Also
checked: photos of 200x200 up to 2400x1800 (tile scale up to 3), tiles at the corners, blur
up to sigma 4, brightness 0.25-0.5: same bands. No face in 40 ``no_face_photo`` seeds. The
integration test checks these bands on fixed photos.

Labels (``DetectLabels``) are derived from colour statistics, deterministically: "Person",
"Face", "Head" (and "Portrait" when the largest face covers 2% of the image) when faces are
found; "Sky" (blue pixels), "Vegetation" (green), "Monochrome" (little saturation), "Texture"
(many Canny edges), "Backgrounds" (few edges), "Night" (dark), "Art" when nothing else fits;
parents are listed as labels too. ``ImageProperties.Quality`` is measured on the grayscale:
Brightness = mean / 255 * 100, Contrast = min(100, std / 127.5 * 100), Sharpness =
100 * log(1 + var(Laplacian)) / log(1 + 3000) capped at 100 (astronaut.png: 84; blurred
with sigma 2: 31). A face's Quality uses the same formulas on its box resampled to 64x64.
``DominantColors`` is always empty and ``Settings`` filters are ignored.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import binascii
import contextlib
import json
import math
import re
import signal
import time
import uuid
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from importlib import resources
from types import TracebackType
from typing import Any, TypeVar

import cv2
import cv2.data
import numpy as np
import numpy.typing as npt
from aiohttp import web

FACE_MODEL_VERSION = "7.0"
LABEL_MODEL_VERSION = "3.0"
MAX_IMAGE_BYTES = 5 * 1024 * 1024
"""Largest ``Image.Bytes`` the service accepts (raw bytes)."""
MIN_IMAGE_SIDE = 80
"""Smallest width and height the service accepts, in pixels."""
DETECT_MAX_SIDE = 1024
TILE_SIDE = 167
"""Side in pixels of the face tile that ``face_photo`` pastes at ``scale=1``."""

_TARGET_PREFIX = "RekognitionService."
_CONTENT_TYPE = "application/x-amz-json-1.1"
_MAX_REQUEST_BYTES = 64 * 1024 * 1024
_REGION = "us-east-1"
_ACCOUNT = "123456789012"
_DEFAULT_MAX_RESULTS = 1000
_MAX_MATCHES = 4096
_STATUS = {
    "InternalServerError": 500,
    "ServiceUnavailableException": 503,
    "MissingAuthenticationTokenException": 403,
}
_COLLECTION_ID = re.compile(r"[a-zA-Z0-9_.\-]{1,255}")
_EXTERNAL_IMAGE_ID = re.compile(r"[a-zA-Z0-9_.\-:]{1,255}")

# Similarity map: (correlation, similarity) anchors, calibrated as the module docstring says.
_SIMILARITY_ANCHORS = ((0.0, 0.80, 0.905, 0.96, 1.0), (0.0, 70.0, 89.0, 97.0, 100.0))
_SIGNATURE_CORE = 32
_SIGNATURE_MARGIN = 0.25
_SIGNATURE_SIDE = 48
_SIGNATURE_SCALES = (0.88, 0.91, 0.94, 0.97, 1.0, 1.03, 1.06, 1.09, 1.12)
_SHARPNESS_FULL_SCALE = 3000.0
# QualityFilter -> (minimum face sharpness, minimum face brightness); invented bars.
_QUALITY_BARS = {
    "LOW": (15.0, 10.0),
    "AUTO": (25.0, 15.0),
    "MEDIUM": (25.0, 15.0),
    "HIGH": (40.0, 25.0),
}
_T = TypeVar("_T")
Json = dict[str, Any]
Image = npt.NDArray[np.uint8]
Signature = npt.NDArray[np.float32]


class RekognitionError(Exception):
    """An error answer: ``code`` becomes ``__type``, ``status`` the HTTP status."""

    def __init__(self, code: str, message: str, status: int | None = None) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.status = status if status is not None else _STATUS.get(code, 400)


# ---------------------------------------------------------------------------------------------
# Image analysis (pure functions and one class that owns the OpenCV objects)
# ---------------------------------------------------------------------------------------------


def decode_image_bytes(raw: bytes) -> Image:
    """Decode ``raw`` as the service would accept it: a BGR array.

    Raises:
        RekognitionError: ``ImageTooLargeException`` (over 5 MiB),
            ``InvalidImageFormatException`` (not JPEG or PNG, or undecodable),
            ``InvalidParameterException`` (a side under 80 px).
    """
    if len(raw) > MAX_IMAGE_BYTES:
        raise RekognitionError("ImageTooLargeException", "Image size is too large.")
    if not (raw.startswith(b"\xff\xd8\xff") or raw.startswith(b"\x89PNG\r\n\x1a\n")):
        raise RekognitionError("InvalidImageFormatException", "Request has invalid image format")
    image = cv2.imdecode(np.frombuffer(raw, np.uint8), cv2.IMREAD_COLOR)
    if image is None:
        raise RekognitionError("InvalidImageFormatException", "Request has invalid image format")
    height, width = image.shape[:2]
    if min(height, width) < MIN_IMAGE_SIDE:
        raise RekognitionError(
            "InvalidParameterException",
            f"Requested image should have at least {MIN_IMAGE_SIDE} pixels in each dimension",
        )
    return np.asarray(image, dtype=np.uint8)


def _image_bytes(image: Any) -> bytes:
    """The raw bytes of a request's ``Image`` member (base64 in JSON)."""
    if not isinstance(image, dict) or not image:
        raise RekognitionError("InvalidParameterException", "Request has invalid parameters")
    if "S3Object" in image:
        raise RekognitionError(
            "InvalidS3ObjectException", "S3 objects are not supported by the fake"
        )
    encoded = image.get("Bytes")
    if not isinstance(encoded, str) or not encoded:
        raise RekognitionError("InvalidParameterException", "Request has invalid parameters")
    try:
        return base64.b64decode(encoded, validate=True)
    except (binascii.Error, ValueError):
        raise RekognitionError("InvalidParameterException", "Image.Bytes is not base64") from None


def _log_sharpness(laplacian_variance: float) -> float:
    """Sharpness 0-100 from the variance of the Laplacian (log scale, full at 3000)."""
    value = 100.0 * math.log1p(max(0.0, laplacian_variance)) / math.log1p(_SHARPNESS_FULL_SCALE)
    return min(100.0, value)


def gray_quality(gray: npt.NDArray[np.uint8]) -> Json:
    """``{"Brightness", "Sharpness", "Contrast"}`` (0-100) of a grayscale image."""
    values = gray.astype(np.float32)
    laplacian = cv2.Laplacian(values, cv2.CV_32F)
    return {
        "Brightness": float(values.mean()) / 255.0 * 100.0,
        "Sharpness": _log_sharpness(float(laplacian.var())),
        "Contrast": min(100.0, float(values.std()) / 127.5 * 100.0),
    }


def similarity_from_correlation(correlation: float) -> float:
    """Map a signature correlation (-1..1) to a Rekognition-style similarity (0-100)."""
    if correlation <= 0.0:
        return 0.0
    xs, ys = _SIMILARITY_ANCHORS
    return float(np.interp(min(correlation, 1.0), xs, ys))


def _directional_match(a: Signature, b: Signature) -> float:
    """Best correlation of ``a``'s core, at several scales, slid over ``b``."""
    best = -1.0
    centre = _SIGNATURE_SIDE / 2
    core = _SIGNATURE_CORE
    for scale in _SIGNATURE_SCALES:
        k = 1.0 / scale
        matrix = np.array([[k, 0, core / 2 - centre * k], [0, k, core / 2 - centre * k]])
        template = cv2.warpAffine(a, matrix, (core, core), flags=cv2.INTER_LINEAR)
        if float(template.std()) < 1e-3:
            continue  # a flat template correlates with nothing
        scores = cv2.matchTemplate(b, template, cv2.TM_CCOEFF_NORMED)
        best = max(best, float(np.nan_to_num(scores, nan=-1.0).max()))
    return best


def face_correlation(a: Signature, b: Signature) -> float:
    """Normalized cross-correlation of two face signatures, aligned by search (-1..1)."""
    return max(_directional_match(a, b), _directional_match(b, a))


def face_similarity(a: Signature, b: Signature) -> float:
    """Similarity 0-100 of two face signatures, as ``SearchFaces`` reports it."""
    return similarity_from_correlation(face_correlation(a, b))


def _resample_square(
    gray: npt.NDArray[np.uint8], cx: float, cy: float, side: float, out: int
) -> npt.NDArray[np.float32]:
    """The square of ``side`` px centred on (cx, cy), anti-aliased down to ``out`` x ``out``."""
    height, width = gray.shape
    sigma = max(0.0, (side / out - 1.0) / 2.0)
    pad = int(3 * sigma) + 2
    x0 = max(0, int(cx - side / 2) - pad)
    y0 = max(0, int(cy - side / 2) - pad)
    x1 = min(width, int(cx + side / 2) + pad + 1)
    y1 = min(height, int(cy + side / 2) + pad + 1)
    roi = gray[y0:y1, x0:x1].astype(np.float32)
    if sigma > 0.3:
        roi = np.asarray(cv2.GaussianBlur(roi, (0, 0), sigma), dtype=np.float32)
    k = out / side
    matrix = np.array([[k, 0, out / 2 - (cx - x0) * k], [0, k, out / 2 - (cy - y0) * k]])
    return np.asarray(
        cv2.warpAffine(
            roi, matrix, (out, out), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE
        ),
        dtype=np.float32,
    )


@dataclass(frozen=True)
class DetectedFace:
    """A face found in an image: box in pixels of the full image, signature, quality."""

    x: float
    y: float
    width: float
    height: float
    image_width: int
    image_height: int
    confidence: float
    brightness: float
    sharpness: float
    signature: Signature = field(repr=False, compare=False)

    @property
    def area(self) -> float:
        """Box area in pixels."""
        return self.width * self.height

    def bounding_box(self) -> Json:
        """``BoundingBox`` as ratios of the image's width and height."""
        return {
            "Width": self.width / self.image_width,
            "Height": self.height / self.image_height,
            "Left": self.x / self.image_width,
            "Top": self.y / self.image_height,
        }

    def detail(self) -> Json:
        """A ``FaceDetail`` with the members listener reads (a frontal pose)."""
        return {
            "BoundingBox": self.bounding_box(),
            "Pose": {"Roll": 0.0, "Yaw": 0.0, "Pitch": 0.0},
            "Quality": {"Brightness": self.brightness, "Sharpness": self.sharpness},
            "Confidence": self.confidence,
        }

    def quality_reasons(self, quality_filter: str) -> list[str]:
        """``UnindexedFaces`` reasons under ``quality_filter`` (empty: the face passes)."""
        if quality_filter == "NONE":
            return []
        min_sharpness, min_brightness = _QUALITY_BARS[quality_filter]
        # Faces under 40x40 px in 1920x1080 are not detected; larger images need larger faces.
        min_side = 40.0 * max(1.0, self.image_width / 1920, self.image_height / 1080)
        reasons = []
        if min(self.width, self.height) < min_side:
            reasons.append("SMALL_BOUNDING_BOX")
        if self.sharpness < min_sharpness:
            reasons.append("LOW_SHARPNESS")
        if self.brightness < min_brightness:
            reasons.append("LOW_BRIGHTNESS")
        return reasons


@dataclass(frozen=True)
class Analysis:
    """A decoded image: faces (largest first) and its detection-scale grayscale."""

    image: Image
    gray: npt.NDArray[np.uint8]
    faces: list[DetectedFace]

    @property
    def width(self) -> int:
        """Width in pixels of the full image."""
        return int(self.image.shape[1])

    @property
    def height(self) -> int:
        """Height in pixels of the full image."""
        return int(self.image.shape[0])


class FaceAnalyzer:
    """Finds faces and computes their signatures. Not thread-safe: use from one thread."""

    def __init__(self) -> None:
        self._cascade = cv2.CascadeClassifier(
            cv2.data.haarcascades + "haarcascade_frontalface_default.xml"
        )
        if self._cascade.empty():
            raise RuntimeError("OpenCV's frontal face cascade did not load")
        self._clahe = cv2.createCLAHE(clipLimit=2.0, tileGridSize=(8, 8))

    def analyze(self, raw: bytes) -> Analysis:
        """Validate and decode ``raw``, then find its faces (see ``decode_image_bytes``)."""
        image = decode_image_bytes(raw)
        full_gray = np.asarray(cv2.cvtColor(image, cv2.COLOR_BGR2GRAY), dtype=np.uint8)
        height, width = full_gray.shape
        scale = min(1.0, DETECT_MAX_SIDE / max(height, width))
        gray = full_gray
        if scale < 1.0:
            size = (max(1, round(width * scale)), max(1, round(height * scale)))
            gray = np.asarray(
                cv2.resize(full_gray, size, interpolation=cv2.INTER_AREA), dtype=np.uint8
            )
        boxes, neighbours = self._cascade.detectMultiScale2(
            self._clahe.apply(gray), scaleFactor=1.1, minNeighbors=5, minSize=(24, 24)
        )
        faces = [
            self._face(full_gray, [v / scale for v in box], int(n))
            for box, n in zip(boxes, neighbours, strict=True)
        ]
        faces.sort(key=lambda f: f.area, reverse=True)
        return Analysis(image=image, gray=gray, faces=faces)

    @staticmethod
    def _face(gray: npt.NDArray[np.uint8], box: list[float], neighbours: int) -> DetectedFace:
        x, y, w, h = box
        cx, cy = x + w / 2, y + h / 2
        signature = _resample_square(gray, cx, cy, w * (1 + 2 * _SIGNATURE_MARGIN), _SIGNATURE_SIDE)
        signature = np.asarray(cv2.GaussianBlur(signature, (0, 0), 1.0), dtype=np.float32)
        crop = np.clip(_resample_square(gray, cx, cy, w, 64), 0, 255).astype(np.uint8)
        quality = gray_quality(crop)
        # The cascade gives no probability; more neighbouring hits mean a surer face.
        confidence = min(99.99, max(50.0, 99.99 - 10.0 * math.exp(-(neighbours - 5) / 8)))
        return DetectedFace(
            x=x,
            y=y,
            width=w,
            height=h,
            image_width=int(gray.shape[1]),
            image_height=int(gray.shape[0]),
            confidence=confidence,
            brightness=quality["Brightness"],
            sharpness=quality["Sharpness"],
            signature=signature,
        )


def _downscale(image: Image, max_side: int) -> Image:
    height, width = image.shape[:2]
    scale = min(1.0, max_side / max(height, width))
    if scale >= 1.0:
        return image
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    return np.asarray(cv2.resize(image, size, interpolation=cv2.INTER_AREA), dtype=np.uint8)


def _ramp(value: float, start: float, full: float) -> float:
    """Confidence 55-99 rising as ``value`` goes from ``start`` to ``full``."""
    fraction = (value - start) / (full - start)
    return 55.0 + 44.0 * min(1.0, max(0.0, fraction))


def image_labels(analysis: Analysis) -> list[Json]:
    """Deterministic labels from the faces and colour statistics (see the module docstring)."""
    small = _downscale(analysis.image, 256)
    hsv = cv2.cvtColor(small, cv2.COLOR_BGR2HSV)
    hue = hsv[..., 0].astype(np.int32)
    saturation = hsv[..., 1].astype(np.float32) / 255.0
    value = hsv[..., 2].astype(np.float32) / 255.0
    colourful = (saturation > 0.25) & (value > 0.2)
    blue = float(np.mean(colourful & (hue >= 90) & (hue < 130)))
    green = float(np.mean(colourful & (hue >= 35) & (hue < 85)))
    gray = cv2.cvtColor(small, cv2.COLOR_BGR2GRAY)
    edges = float(np.mean(cv2.Canny(gray, 100, 200) > 0))
    brightness = float(value.mean())

    found: list[tuple[str, float, list[str], str]] = []  # name, confidence, parents, category
    if analysis.faces:
        confidence = max(f.confidence for f in analysis.faces)
        found += [
            ("Person", confidence, [], "Person Description"),
            ("Face", confidence, ["Person"], "Person Description"),
            ("Head", confidence, ["Person"], "Person Description"),
        ]
        share = analysis.faces[0].area / (analysis.width * analysis.height)
        if share >= 0.02:
            parents = ["Face", "Head", "Person", "Photography"]
            found.append(("Portrait", _ramp(share, 0.02, 0.2), parents, "Hobbies and Interests"))
    if blue >= 0.15:
        found.append(("Sky", _ramp(blue, 0.15, 0.5), ["Nature", "Outdoors"], "Nature and Outdoors"))
    if green >= 0.15:
        found.append(("Vegetation", _ramp(green, 0.15, 0.5), ["Plant"], "Plants and Flowers"))
    colour_share = float(np.mean(colourful))
    if colour_share < 0.05:
        confidence = _ramp(0.05 - colour_share, 0.0, 0.05)
        found.append(("Monochrome", confidence, [], "Colors and Visual Composition"))
    if edges >= 0.08:
        found.append(("Texture", _ramp(edges, 0.08, 0.25), [], "Patterns and Shapes"))
    elif edges < 0.03:
        found.append(("Backgrounds", _ramp(0.03 - edges, 0.0, 0.03), [], "Patterns and Shapes"))
    if brightness < 0.25:
        confidence = _ramp(0.25 - brightness, 0.0, 0.2)
        found.append(("Night", confidence, ["Nature", "Outdoors"], "Nature and Outdoors"))
    if not found:
        found.append(("Art", 60.0, [], "Hobbies and Interests"))

    labels: dict[str, Json] = {}
    person_instances = [
        {"BoundingBox": f.bounding_box(), "Confidence": f.confidence, "DominantColors": []}
        for f in analysis.faces
    ]
    for name, confidence, parents, category in found:
        labels[name] = _label(name, confidence, parents, category)
        if name == "Person":
            labels[name]["Instances"] = person_instances
    for _name, confidence, parents, category in found:
        for parent in parents:
            if parent not in labels:
                labels[parent] = _label(parent, confidence, [], category)
            labels[parent]["Confidence"] = max(labels[parent]["Confidence"], confidence)
    return sorted(labels.values(), key=lambda label: (-label["Confidence"], label["Name"]))


def _label(name: str, confidence: float, parents: list[str], category: str) -> Json:
    return {
        "Name": name,
        "Confidence": confidence,
        "Instances": [],
        "Parents": [{"Name": p} for p in parents],
        "Aliases": [],
        "Categories": [{"Name": category}],
    }


# ---------------------------------------------------------------------------------------------
# Collections
# ---------------------------------------------------------------------------------------------


@dataclass
class StoredFace:
    """A face indexed into a collection."""

    face_id: str
    image_id: str
    external_image_id: str | None
    bounding_box: Json
    confidence: float
    signature: Signature = field(repr=False)

    def to_json(self) -> Json:
        """The ``Face`` shape."""
        face: Json = {
            "FaceId": self.face_id,
            "BoundingBox": dict(self.bounding_box),
            "ImageId": self.image_id,
            "Confidence": self.confidence,
            "IndexFacesModelVersion": FACE_MODEL_VERSION,
        }
        if self.external_image_id is not None:
            face["ExternalImageId"] = self.external_image_id
        return face


@dataclass
class Collection:
    """A face collection: faces by id, in the order they were indexed."""

    collection_id: str
    arn: str
    created_at: float
    faces: dict[str, StoredFace] = field(default_factory=dict)


def _rank_matches(
    probe: Signature, faces: list[StoredFace], threshold: float, limit: int
) -> list[Json]:
    """``FaceMatches`` for ``probe`` among ``faces``: at least ``threshold``, best first."""
    scored = [(face_similarity(probe, face.signature), face) for face in faces]
    kept = sorted((s for s in scored if s[0] >= threshold), key=lambda s: -s[0])[:limit]
    return [{"Similarity": similarity, "Face": face.to_json()} for similarity, face in kept]


# ---------------------------------------------------------------------------------------------
# The server
# ---------------------------------------------------------------------------------------------


class FakeRekognition:
    """The fake service on 127.0.0.1 (see the module docstring for behaviour and knobs).

    Attributes:
        endpoint_url: ``http://127.0.0.1:PORT`` once started.
        faults: exception names the next requests fail with, first in first out, one each.
        latency_s: seconds added to every admitted request.
        calls: ``(operation, time.monotonic())`` of every request, in arrival order.
        traceparents: ``(operation, traceparent header or None)`` of every request, same
            order.
        violations: requests refused for exceeding ``tps_limit``.
        collections: collection id -> ``Collection``.
    """

    def __init__(
        self, *, tps_limit: float | None = None, host: str = "127.0.0.1", port: int = 0
    ) -> None:
        if tps_limit is not None and tps_limit <= 0:
            raise ValueError("tps_limit must be positive")
        self.tps_limit = tps_limit
        self.endpoint_url = ""
        self.faults: list[str] = []
        self.latency_s = 0.0
        self.calls: list[tuple[str, float]] = []
        self.traceparents: list[tuple[str, str | None]] = []
        self.violations = 0
        self.collections: dict[str, Collection] = {}
        self._host = host
        self._port = port
        self._admitted: deque[float] = deque()
        self._runner: web.AppRunner | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._analyzer = FaceAnalyzer()
        self._operations: dict[str, Callable[[Json], Awaitable[Json]]] = {
            "CreateCollection": self._create_collection,
            "ListCollections": self._list_collections,
            "DeleteCollection": self._delete_collection,
            "IndexFaces": self._index_faces,
            "ListFaces": self._list_faces,
            "DeleteFaces": self._delete_faces,
            "SearchFaces": self._search_faces,
            "DetectLabels": self._detect_labels,
        }

    async def start(self) -> None:
        """Listen on the host and port given (port 0: a free one) and set ``endpoint_url``."""
        if self._runner is not None:
            raise RuntimeError("already started")
        # One worker thread: image work leaves the event loop free to accept (and time)
        # requests, and the OpenCV objects are never used from two threads at once.
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fake-rekognition")
        app = web.Application(client_max_size=_MAX_REQUEST_BYTES)
        app.router.add_post("/", self._handle)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        self._runner = runner
        await web.TCPSite(runner, self._host, self._port).start()
        host, port = runner.addresses[0][:2]
        self.endpoint_url = f"http://{host}:{port}"

    async def close(self) -> None:
        """Stop serving and release the worker thread. Idempotent."""
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()
        executor, self._executor = self._executor, None
        if executor is not None:
            await asyncio.to_thread(executor.shutdown, wait=True, cancel_futures=True)

    async def __aenter__(self) -> FakeRekognition:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    # -- protocol ------------------------------------------------------------------------------

    async def _handle(self, request: web.Request) -> web.Response:
        target = request.headers.get("X-Amz-Target", "")
        operation = target.removeprefix(_TARGET_PREFIX)
        now = time.monotonic()
        self.calls.append((operation, now))
        self.traceparents.append((operation, request.headers.get("traceparent")))
        try:
            if "Authorization" not in request.headers:
                raise RekognitionError(
                    "MissingAuthenticationTokenException", "Missing Authentication Token"
                )
            handler = self._operations.get(operation)
            if not target.startswith(_TARGET_PREFIX) or handler is None:
                raise RekognitionError("UnknownOperationException", f"Unknown target {target!r}")
            if not self._admit(now):
                self.violations += 1
                raise RekognitionError("ThrottlingException", "Rate exceeded")
            if self.latency_s > 0:
                await asyncio.sleep(self.latency_s)
            if self.faults:
                fault = self.faults.pop(0)
                raise RekognitionError(fault, f"Injected fault: {fault}")
            if request.content_type != _CONTENT_TYPE:
                raise RekognitionError(
                    "SerializationException", f"Content-Type must be {_CONTENT_TYPE}"
                )
            params = _parse_body(await request.read())
            result = await handler(params)
        except RekognitionError as error:
            return _error_response(error)
        except Exception as error:  # a bug in the fake: show it to the client, as a 500
            return _error_response(RekognitionError("InternalServerError", repr(error)))
        return _json_response(200, result)

    def _admit(self, now: float) -> bool:
        """Whether a request at ``now`` fits the sliding window; records it if so."""
        if self.tps_limit is None:
            return True
        capacity = max(1, math.floor(self.tps_limit))
        window = capacity / self.tps_limit
        while self._admitted and self._admitted[0] <= now - window:
            self._admitted.popleft()
        if len(self._admitted) >= capacity:
            return False
        self._admitted.append(now)
        return True

    async def _in_worker(self, func: Callable[..., _T], *args: Any) -> _T:
        if self._executor is None:
            raise RekognitionError("ServiceUnavailableException", "the fake is not running")
        return await asyncio.get_running_loop().run_in_executor(self._executor, func, *args)

    async def _analyze(self, params: Json) -> Analysis:
        return await self._in_worker(self._analyzer.analyze, _image_bytes(params.get("Image")))

    def _collection(self, params: Json) -> Collection:
        collection_id = _collection_id(params)
        collection = self.collections.get(collection_id)
        if collection is None:
            raise RekognitionError(
                "ResourceNotFoundException", f"The collection id: {collection_id} does not exist"
            )
        return collection

    # -- collections ---------------------------------------------------------------------------

    async def _create_collection(self, params: Json) -> Json:
        collection_id = _collection_id(params)
        if collection_id in self.collections:
            raise RekognitionError(
                "ResourceAlreadyExistsException",
                f"The collection id: {collection_id} already exists",
            )
        arn = f"aws:rekognition:{_REGION}:{_ACCOUNT}:collection/{collection_id}"
        self.collections[collection_id] = Collection(collection_id, arn, time.time())
        return {"StatusCode": 200, "CollectionArn": arn, "FaceModelVersion": FACE_MODEL_VERSION}

    async def _list_collections(self, params: Json) -> Json:
        ids = sorted(self.collections)
        page, token = _page(ids, params)
        answer: Json = {
            "CollectionIds": page,
            "FaceModelVersions": [FACE_MODEL_VERSION] * len(page),
        }
        if token is not None:
            answer["NextToken"] = token
        return answer

    async def _delete_collection(self, params: Json) -> Json:
        # A collection deleted outside listener (the console, another tool): its faces go too.
        collection = self._collection(params)
        del self.collections[collection.collection_id]
        return {"StatusCode": 200}

    # -- faces ---------------------------------------------------------------------------------

    async def _index_faces(self, params: Json) -> Json:
        collection = self._collection(params)
        external_id = params.get("ExternalImageId")
        if external_id is not None:
            _check_pattern("externalImageId", external_id, _EXTERNAL_IMAGE_ID)
        max_faces = _int_param(params, "MaxFaces", None, 1, None)
        quality_filter = _quality_filter(params, "AUTO")
        analysis = await self._analyze(params)
        image_id = str(uuid.uuid4())
        records: list[Json] = []
        unindexed: list[Json] = []
        candidates = []
        for face in analysis.faces:
            reasons = face.quality_reasons(quality_filter)
            if reasons:
                unindexed.append({"Reasons": reasons, "FaceDetail": face.detail()})
            else:
                candidates.append(face)
        for rank, face in enumerate(candidates):  # largest first
            if max_faces is not None and rank >= max_faces:
                unindexed.append({"Reasons": ["EXCEEDS_MAX_FACES"], "FaceDetail": face.detail()})
                continue
            stored = StoredFace(
                face_id=str(uuid.uuid4()),
                image_id=image_id,
                external_image_id=external_id,
                bounding_box=face.bounding_box(),
                confidence=face.confidence,
                signature=face.signature,
            )
            collection.faces[stored.face_id] = stored
            records.append({"Face": stored.to_json(), "FaceDetail": face.detail()})
        return {
            "FaceRecords": records,
            "FaceModelVersion": FACE_MODEL_VERSION,
            "UnindexedFaces": unindexed,
        }

    async def _list_faces(self, params: Json) -> Json:
        collection = self._collection(params)
        faces = list(collection.faces.values())
        wanted = params.get("FaceIds")
        if wanted:
            faces = [f for f in faces if f.face_id in set(wanted)]
        page, token = _page([f.to_json() for f in faces], params)
        answer: Json = {"Faces": page, "FaceModelVersion": FACE_MODEL_VERSION}
        if token is not None:
            answer["NextToken"] = token
        return answer

    async def _delete_faces(self, params: Json) -> Json:
        collection = self._collection(params)
        deleted, failed = [], []
        for face_id in params.get("FaceIds") or []:
            if collection.faces.pop(face_id, None) is None:
                failed.append({"FaceId": face_id, "Reasons": ["FACE_NOT_FOUND"]})
            else:
                deleted.append(face_id)
        return {"DeletedFaces": deleted, "UnsuccessfulFaceDeletions": failed}

    async def _search_faces(self, params: Json) -> Json:
        collection = self._collection(params)
        face_id = params.get("FaceId")
        probe = collection.faces.get(face_id) if isinstance(face_id, str) else None
        if probe is None:
            raise RekognitionError(
                "InvalidParameterException", f"Face {face_id} is not in the collection"
            )
        threshold = _threshold(params)
        limit = _int_param(params, "MaxFaces", _MAX_MATCHES, 1, _MAX_MATCHES)
        others = [f for f in collection.faces.values() if f.face_id != probe.face_id]
        matches = await self._in_worker(_rank_matches, probe.signature, others, threshold, limit)
        return {
            "SearchedFaceId": probe.face_id,
            "FaceMatches": matches,
            "FaceModelVersion": FACE_MODEL_VERSION,
        }

    # -- labels --------------------------------------------------------------------------------

    async def _detect_labels(self, params: Json) -> Json:
        features = params.get("Features") or ["GENERAL_LABELS"]
        max_labels = _int_param(params, "MaxLabels", 1000, 0, None)
        min_confidence = params.get("MinConfidence", 55.0)
        if not isinstance(min_confidence, int | float) or not 0 <= min_confidence <= 100:
            raise _validation("minConfidence", min_confidence, "be between 0 and 100")
        analysis = await self._analyze(params)
        answer: Json = {"Labels": [], "LabelModelVersion": LABEL_MODEL_VERSION}
        if "GENERAL_LABELS" in features:
            labels = await self._in_worker(image_labels, analysis)
            labels = [label for label in labels if label["Confidence"] >= min_confidence]
            answer["Labels"] = labels[:max_labels]
        if "IMAGE_PROPERTIES" in features:
            answer["ImageProperties"] = {
                "Quality": gray_quality(analysis.gray),
                "DominantColors": [],
            }
        return answer


# ---------------------------------------------------------------------------------------------
# Request helpers
# ---------------------------------------------------------------------------------------------


def _json_response(status: int, body: Json, headers: dict[str, str] | None = None) -> web.Response:
    all_headers = {"Content-Type": _CONTENT_TYPE, "x-amzn-RequestId": str(uuid.uuid4())}
    all_headers.update(headers or {})
    return web.Response(status=status, body=json.dumps(body).encode(), headers=all_headers)


def _error_response(error: RekognitionError) -> web.Response:
    body = {"__type": error.code, "Message": error.message}
    return _json_response(error.status, body, {"x-amzn-ErrorType": error.code})


def _parse_body(body: bytes) -> Json:
    try:
        params = json.loads(body or b"{}")
    except ValueError:
        raise RekognitionError("SerializationException", "The body is not JSON") from None
    if not isinstance(params, dict):
        raise RekognitionError("SerializationException", "The body is not a JSON object")
    return params


def _validation(member: str, value: Any, constraint: str) -> RekognitionError:
    return RekognitionError(
        "ValidationException",
        f"1 validation error detected: Value '{value}' at '{member}' failed to satisfy "
        f"constraint: Member must {constraint}",
    )


def _check_pattern(member: str, value: Any, pattern: re.Pattern[str]) -> str:
    if not isinstance(value, str) or pattern.fullmatch(value) is None:
        raise _validation(member, value, f"satisfy regular expression pattern: {pattern.pattern}")
    return value


def _collection_id(params: Json) -> str:
    return _check_pattern("collectionId", params.get("CollectionId"), _COLLECTION_ID)


def _int_param(
    params: Json, name: str, default: int | None, low: int, high: int | None
) -> int | None:
    value = params.get(name, default)
    if value is None:
        return None
    if not isinstance(value, int) or value < low or (high is not None and value > high):
        raise _validation(name[0].lower() + name[1:], value, f"be between {low} and {high}")
    return value


def _threshold(params: Json) -> float:
    value = params.get("FaceMatchThreshold", 80.0)
    if not isinstance(value, int | float) or not 0 <= value <= 100:
        raise _validation("faceMatchThreshold", value, "be between 0 and 100")
    return float(value)


def _quality_filter(params: Json, default: str) -> str:
    value = params.get("QualityFilter", default)
    if value not in _QUALITY_BARS and value != "NONE":
        raise _validation("qualityFilter", value, "be one of NONE, AUTO, LOW, MEDIUM, HIGH")
    return str(value)


def _page(items: list[_T], params: Json) -> tuple[list[_T], str | None]:
    """One page of ``items`` for ``MaxResults`` / ``NextToken`` (an offset, as text)."""
    limit = _int_param(params, "MaxResults", _DEFAULT_MAX_RESULTS, 0, 4096) or 0
    token = params.get("NextToken")
    try:
        start = int(token) if token is not None else 0
    except (TypeError, ValueError):
        raise RekognitionError(
            "InvalidPaginationTokenException", "Invalid pagination token"
        ) from None
    end = start + limit
    return items[start:end], (str(end) if end < len(items) else None)


# ---------------------------------------------------------------------------------------------
# Test photos
# ---------------------------------------------------------------------------------------------

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


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------


async def _serve(port: int, tps_limit: float | None) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        # Not available on Windows' event loop: there Ctrl+C alone stops the fake.
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(signum, stop.set)
    async with FakeRekognition(tps_limit=tps_limit, port=port) as fake:
        print(f"READY {fake.endpoint_url}", flush=True)
        await stop.wait()


def main(argv: Sequence[str] | None = None) -> None:
    """Serve the fake until SIGTERM or SIGINT, after printing ``READY <endpoint_url>``."""
    parser = argparse.ArgumentParser(description="Fake Amazon Rekognition on 127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="TCP port; 0 picks a free one")
    parser.add_argument("--tps", type=float, default=None, help="requests per second allowed")
    args = parser.parse_args(argv)
    asyncio.run(_serve(args.port, args.tps))


if __name__ == "__main__":
    main()
