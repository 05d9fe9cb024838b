"""Faces: OpenCV's cascade finds them, a signature identifies them, correlation compares them.

See "Faces" in the package docstring for the detector's settings, the signature and the
calibration of the similarity map.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import cv2
import cv2.data
import numpy as np
import numpy.typing as npt

from listener.testing.rekognition_fake.images import Image, decode_image_bytes, gray_quality
from listener.testing.rekognition_fake.protocol import Json

DETECT_MAX_SIDE = 1024

# Similarity map: (correlation, similarity) anchors, calibrated as the module docstring says.
_SIMILARITY_ANCHORS = ((0.0, 0.80, 0.905, 0.96, 1.0), (0.0, 70.0, 89.0, 97.0, 100.0))
_SIGNATURE_CORE = 32
_SIGNATURE_MARGIN = 0.25
_SIGNATURE_SIDE = 48
_SIGNATURE_SCALES = (0.88, 0.91, 0.94, 0.97, 1.0, 1.03, 1.06, 1.09, 1.12)
SHARPNESS_FULL_SCALE = 3000.0
# QualityFilter -> (minimum face sharpness, minimum face brightness); invented bars.
QUALITY_BARS = {
    "LOW": (15.0, 10.0),
    "AUTO": (25.0, 15.0),
    "MEDIUM": (25.0, 15.0),
    "HIGH": (40.0, 25.0),
}
Signature = npt.NDArray[np.float32]


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
        min_sharpness, min_brightness = QUALITY_BARS[quality_filter]
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
