"""The perceptual hash of an image: ImageHash's ``phash``, computed with OpenCV's DCT.

ImageHash 4.3 (``imagehash.phash``, https://github.com/JohannesBuchner/imagehash, after
Zauner, "Implementation and Benchmarking of Perceptual Image Hash Functions", 2010, and
https://www.hackerfactor.com/blog/index.php?/archives/432-Looks-Like-It.html):

1. convert to gray (Pillow's ``L``) and resize to 32 x 32 with Lanczos resampling;
2. take the 2-D DCT-II, ``scipy.fftpack.dct(scipy.fftpack.dct(pixels, axis=0), axis=1)``,
   unnormalized: ``y[k] = 2 * sum_n x[n] * cos(pi * k * (2n + 1) / (2N))`` per axis;
3. keep the 8 x 8 lowest frequencies (top-left corner), DC term included;
4. a bit is 1 where the coefficient is above the median of those 64;
5. the 64 bits in row-major order, most significant first, as 16 hex digits.

ImageHash needs SciPy (over 140 MB installed) for step 2 alone. OpenCV's ``cv2.dct`` computes
the orthonormal DCT-II (OpenCV's reference: ``C(k) = sqrt(1/N)`` for k = 0, ``sqrt(2/N)``
otherwise, times the same cosine sum), so multiplying coefficient k by ``2 * sqrt(N)`` (k = 0)
or ``sqrt(2N)`` (k > 0), per axis, gives SciPy's values (to about 1e-15 relative).

The two agree on every photograph tried (the demo images and thousands of crops of them, in
``tests/unit/test_phash.py``); they can differ only where two of the 64 coefficients tie
with the median to within floating-point rounding (say a flat image with one odd pixel, or
an image symmetric about its diagonal), where the bit depends on the rounding of the DCT
algorithm, not on the image. Coefficients within ``_ZERO`` of zero, which the DCT of a
symmetric image has exactly, are set to zero so their rounding noise decides no bit.
"""

from __future__ import annotations

from typing import Final

import cv2
import numpy as np
import numpy.typing as npt
from PIL import Image

HASH_SIZE: Final = 8
"""Bits per side of the hash: 8 x 8 = 64 bits."""
IMAGE_SIZE: Final = 32
"""The side, in pixels, of the gray image the DCT is taken of (``HASH_SIZE * 4``)."""
# Coefficients are sums of 1024 levels (0..255) times cosines: up to about 5e5 in magnitude,
# and the DCT's rounding error is about 1e-10.
_ZERO: Final = 1e-6


def _unnormalize() -> npt.NDArray[np.float64]:
    per_axis = np.full(HASH_SIZE, np.sqrt(2.0 * IMAGE_SIZE))
    per_axis[0] = 2.0 * np.sqrt(IMAGE_SIZE)
    return np.outer(per_axis, per_axis)


_SCALE: Final = _unnormalize()


def phash(image: Image.Image) -> str:
    """The 64-bit perceptual hash of ``image``, as 16 hex digits (``imagehash.phash``'s).

    ``imagehash.hex_to_hash`` reads the result; the Hamming distance between two hashes is
    small for images that look alike (a re-encoded or resized copy: a few bits of 64).

    Args:
        image: any Pillow image (converted to gray here).
    """
    small = image.convert("L").resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.LANCZOS)
    pixels = np.asarray(small, dtype=np.float64)
    low = cv2.dct(pixels)[:HASH_SIZE, :HASH_SIZE] * _SCALE
    low[np.abs(low) < _ZERO] = 0.0
    bits = (low > np.median(low)).flatten()
    return f"{int(''.join('1' if bit else '0' for bit in bits), 2):016x}"
