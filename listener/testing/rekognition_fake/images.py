"""Images as the service accepts them, and their quality (brightness, sharpness, contrast)."""

from __future__ import annotations

import math

import cv2
import numpy as np
import numpy.typing as npt

from listener.testing.rekognition_fake.protocol import Json, RekognitionError

MAX_IMAGE_BYTES = 5 * 1024 * 1024
"""Largest ``Image.Bytes`` the service accepts (raw bytes)."""
MIN_IMAGE_SIDE = 80
"""Smallest width and height the service accepts, in pixels."""
SHARPNESS_FULL_SCALE = 3000.0
Image = npt.NDArray[np.uint8]


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


def log_sharpness(laplacian_variance: float) -> float:
    """Sharpness 0-100 from the variance of the Laplacian (log scale, full at 3000)."""
    value = 100.0 * math.log1p(max(0.0, laplacian_variance)) / math.log1p(SHARPNESS_FULL_SCALE)
    return min(100.0, value)


def gray_quality(gray: npt.NDArray[np.uint8]) -> Json:
    """``{"Brightness", "Sharpness", "Contrast"}`` (0-100) of a grayscale image."""
    values = gray.astype(np.float32)
    laplacian = cv2.Laplacian(values, cv2.CV_32F)
    return {
        "Brightness": float(values.mean()) / 255.0 * 100.0,
        "Sharpness": log_sharpness(float(laplacian.var())),
        "Contrast": min(100.0, float(values.std()) / 127.5 * 100.0),
    }


def downscale(image: Image, max_side: int) -> Image:
    height, width = image.shape[:2]
    scale = min(1.0, max_side / max(height, width))
    if scale >= 1.0:
        return image
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    return np.asarray(cv2.resize(image, size, interpolation=cv2.INTER_AREA), dtype=np.uint8)
