"""Faces offline, in the ``local`` provider's worker processes: detection, alignment, embeddings.

The models are dlib's (http://dlib.net), with weights that ship inside packages from PyPI, so
nothing is downloaded at run time:

- detection: dlib's HOG + linear SVM frontal face detector (``get_frontal_face_detector``,
  after Dalal & Triggs, "Histograms of Oriented Gradients for Human Detection", CVPR 2005),
  built into the ``dlib-bin`` wheel. It finds faces of about 80x80 pixels and larger in the
  copy it is given, which is downscaled to ``face_max_side``;
- alignment: dlib's 5-point landmark model ``shape_predictor_5_face_landmarks.dat``;
- embedding: dlib's ResNet ``dlib_face_recognition_resnet_model_v1.dat`` (128 floats per
  face; 99.38% on the LFW benchmark, King, "High Quality Face Recognition with Deep Metric
  Learning", dlib blog, 2017). Both files ship in the ``face-recognition-models`` package
  (MIT licence, https://github.com/ageitgey/face_recognition_models).

Two embeddings of one person lie within Euclidean distance 0.6 of each other, per dlib's
documentation of the model. ``similarity_from_distance`` turns a distance into the 0-100
similarity that the thresholds of the faces step sort on (95: auto-assign; 80: a suggestion),
so that they mean what they mean for Rekognition. The measurements behind the choice of
detector and the mapping are in ``docs/explanations/offline-faces.md``.

Everything here is CPU-bound and synchronous; it runs in the worker processes of
``listener.analysis.providers.local.LocalProvider``. dlib, NumPy and the models are imported
and loaded inside the workers only.
"""

from __future__ import annotations

import functools
import importlib.util
import itertools
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from PIL import Image

if TYPE_CHECKING:
    import numpy as np
    from numpy.typing import NDArray

EMBEDDING_SIZE: Final = 128
"""Floats per face embedding (dlib's ResNet)."""
SAME_PERSON_DISTANCE: Final = 0.6
"""dlib's documented decision threshold: two embeddings of one person are closer than this."""
MODEL: Final = "dlib hog + resnet v1"
"""How the faces step's results name the models (``StepResult.model``)."""
#: (distance, similarity) anchors of the piecewise-linear map; see similarity_from_distance.
_ANCHORS: Final = ((0.0, 0.5, SAME_PERSON_DISTANCE, 1.0), (100.0, 95.0, 80.0, 0.0))
#: Slope of the logistic map from the detector's SVM score to a 0-100 confidence.
_CONFIDENCE_SLOPE: Final = 4.0
_MODELS_PACKAGE: Final = "face_recognition_models"


def similarity_from_distance(distance: float) -> float:
    """The 0-100 similarity of two face embeddings at Euclidean ``distance`` (0..2).

    Piecewise linear through (0, 100), (0.5, 95), (0.6, 80), (1.0, 0), flat at 0 beyond:

    - 0.6, dlib's own same-person threshold, is the suggestion floor (80): below it dlib calls
      the two faces one person, so a person should look at them;
    - 0.5 is the auto-assign bar (95): a margin of 0.1 under dlib's threshold. On the real
      photographs of ``listener/demo_images`` (and copies of them mirrored, halved, darkened
      and turned 20 degrees), two different photographs of one person lay at 0.21-0.50 and
      photographs of two people at 0.78 or more (``docs/explanations/offline-faces.md``).

    The anchors are listener's own calibration, not dlib's.
    """
    xs, ys = _ANCHORS
    if distance <= 0.0:
        return 100.0
    for (x0, x1), (y0, y1) in zip(itertools.pairwise(xs), itertools.pairwise(ys), strict=True):
        if distance <= x1:
            return y0 + (y1 - y0) * (distance - x0) / (x1 - x0)
    return 0.0


def distance_for_similarity(similarity: float) -> float:
    """The largest Euclidean distance whose ``similarity_from_distance`` is >= ``similarity``.

    The inverse of ``similarity_from_distance`` on 0 < similarity <= 100; 1.0 for 0 or less
    (the map reaches 0 there). Used to bound the search of an owner's faces.
    """
    xs, ys = _ANCHORS
    if similarity >= 100.0:
        return 0.0
    for (x0, x1), (y0, y1) in zip(itertools.pairwise(xs), itertools.pairwise(ys), strict=True):
        if similarity >= y1:
            return x0 + (x1 - x0) * (y0 - similarity) / (y0 - y1)
    return xs[-1]


def confidence_from_score(score: float) -> float:
    """A 0-100 detection confidence from the HOG detector's SVM score.

    ``100 / (1 + exp(-4 * score))``: the detector keeps scores above 0 (50%); a score of 0.5
    gives 88%, 1.0 gives 98%. listener's own map, so that confidences read like
    Rekognition's percentages; it is not a calibrated probability.
    """
    return 100.0 / (1.0 + math.exp(-_CONFIDENCE_SLOPE * score))


@functools.lru_cache(maxsize=1)
def detector() -> Any:
    """dlib's HOG frontal face detector, built once per process (no file: it is in dlib)."""
    import dlib

    return dlib.get_frontal_face_detector()


@functools.lru_cache(maxsize=1)
def recognition_models() -> tuple[Any, Any]:
    """dlib's 5-point shape predictor and ResNet face model, loaded once per process.

    Raises:
        RuntimeError: the ``face-recognition-models`` package is not installed.
    """
    import dlib

    path = models_folder()
    shapes = dlib.shape_predictor(str(path / "shape_predictor_5_face_landmarks.dat"))
    embedder = dlib.face_recognition_model_v1(
        str(path / "dlib_face_recognition_resnet_model_v1.dat")
    )
    return shapes, embedder


def models_folder() -> Path:
    """The ``models`` folder of the installed ``face-recognition-models`` package.

    Found without importing the package: its ``__init__`` imports ``pkg_resources``, which
    needs setuptools (absent from the container image, and dropped by recent setuptools).

    Raises:
        RuntimeError: the package is not installed.
    """
    spec = importlib.util.find_spec(_MODELS_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            "the faces step needs the face-recognition-models package (pip install "
            "face-recognition-models)"
        )
    return Path(next(iter(spec.submodule_search_locations))) / "models"


def detect(
    pixels: NDArray[np.uint8], max_faces: int | None = None, upsample: int = 0
) -> list[tuple[Any, float]]:
    """Faces in ``pixels`` (gray HxW or RGB HxWx3, uint8): ``[(dlib.rectangle, score)]``,
    highest score first, at most ``max_faces``. Faces smaller than about 80x80 pixels of
    ``pixels`` are not found; each ``upsample`` doubles the image first (dlib's pyramid), so
    faces half that size are found, at about four times the time."""
    rects, scores, _ = detector().run(pixels, upsample, 0.0)
    found = sorted(zip(rects, scores, strict=True), key=lambda pair: -pair[1])
    return found if max_faces is None else found[:max_faces]


def face_boxes(
    gray: NDArray[np.uint8],
    *,
    max_side: int,
    scale: float,
    width: int,
    height: int,
    upsample: int = 0,
) -> dict[str, Any]:
    """The faces of the local analysis: ``{"count": n, "boxes": [[x, y, w, h], ...]}``.

    Args:
        gray: the upright gray copy of the image (HxW uint8).
        max_side: the detector runs on ``gray`` downscaled to this longest side (pixels).
        scale: original pixels per pixel of ``gray``.
        width, height: the original image's size, to clamp the boxes (pixels).
        upsample: as ``detect``.
    """
    import cv2
    import numpy as np

    rows, cols = gray.shape
    factor = min(1.0, max_side / max(rows, cols))
    small = gray
    if factor < 1.0:
        size = (max(1, round(cols * factor)), max(1, round(rows * factor)))
        small = np.asarray(cv2.resize(gray, size, interpolation=cv2.INTER_AREA), dtype=np.uint8)
    to_original = scale / factor
    boxes: list[list[int]] = []
    for rect, _ in detect(small, upsample=upsample):
        left = min(width, max(0, round(rect.left() * to_original)))
        top = min(height, max(0, round(rect.top() * to_original)))
        right = min(width, max(left, round(rect.right() * to_original)))
        bottom = min(height, max(top, round(rect.bottom() * to_original)))
        boxes.append([left, top, right - left, bottom - top])
    return {"count": len(boxes), "boxes": boxes}


def embed_faces(rgb: NDArray[np.uint8], max_faces: int, upsample: int = 0) -> list[dict[str, Any]]:
    """Detect, align and embed the faces of ``rgb`` (an upright HxWx3 uint8 RGB image);
    ``upsample`` as ``detect``.

    Returns:
        Up to ``max_faces`` faces, most confident first, each::

            bounding_box: {"Width", "Height", "Left", "Top"}  ratios of the image (0..1),
                                                             as Rekognition's BoundingBox
            confidence: float   0-100 (confidence_from_score)
            embedding: [float] * 128

    Raises:
        RuntimeError: the models are not installed (``recognition_models``).
    """
    shapes, embedder = recognition_models()
    rows, cols = rgb.shape[:2]
    faces: list[dict[str, Any]] = []
    for rect, score in detect(rgb, max_faces, upsample):
        left, top = max(0, rect.left()), max(0, rect.top())
        right, bottom = min(cols, rect.right()), min(rows, rect.bottom())
        shape = shapes(rgb, rect)
        vector = embedder.compute_face_descriptor(rgb, shape)
        faces.append(
            {
                "bounding_box": {
                    "Width": round((right - left) / cols, 6),
                    "Height": round((bottom - top) / rows, 6),
                    "Left": round(left / cols, 6),
                    "Top": round(top / rows, 6),
                },
                "confidence": round(confidence_from_score(float(score)), 3),
                "embedding": [round(float(v), 6) for v in vector],
            }
        )
    return faces


_TRANSPOSE: Final = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


def upright_rgb(image: Image.Image, orientation: int, max_side: int) -> NDArray[np.uint8]:
    """``image`` downscaled to ``max_side`` (longest side, pixels), as upright RGB pixels.

    Transparent areas are composited over white, as the local analysis does. The downscale
    happens first (Pillow's ``thumbnail``, in place), so the conversions touch only the small
    copy: memory beyond the decoded image is about 4 x ``max_side``^2 bytes.
    """
    import numpy as np

    image.thumbnail((max_side, max_side), Image.Resampling.BILINEAR, reducing_gap=2.0)
    if image.mode in ("I", "F") or image.mode.startswith("I;16"):
        image = image.convert("L")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        image = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
    rgb = image.convert("RGB")
    method = _TRANSPOSE.get(orientation)
    if method is not None:
        rgb = rgb.transpose(method)
    return np.ascontiguousarray(np.asarray(rgb, dtype=np.uint8))
