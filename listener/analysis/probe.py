"""Read an image's header once, with bounded work, and refuse what would not fit in memory.

``probe_image`` answers "what is this image and may we decode it?" from the header alone:
format, size in pixels, Pillow mode and the bytes one decoded pixel takes. It runs off the
event loop (``ImageFetcher`` calls it through ``asyncio.to_thread``), once per fetched image;
the dispatcher and the batch manager reuse its answer instead of parsing again.

Pillow's header parsers walk JPEG segments, PNG chunks and GIF blocks in Python, one object
per segment: a 19 MiB JPEG of 5 million empty APP1 segments takes seconds and hundreds of MB
to open. ``scan_structure`` therefore walks the container first, in a loop whose length is
capped by the constants below, and refuses a file over a cap before Pillow sees it. The caps
are far above what cameras and editors write (a JPEG carries about 10 to 40 segments before
its first scan; an ICC profile split over APP2 segments may use up to 255 of them, ICC.1:2022
annex B.4), and far below what makes a parser slow.

Errors are those of ``listener.errors``: ``InvalidImage`` and ``ImageTooLarge``, both
permanent.
"""

from __future__ import annotations

import io
import struct
import warnings
from dataclasses import dataclass
from typing import Final

from PIL import Image, UnidentifiedImageError

from listener.errors import ImageTooLarge, InvalidImage

#: Formats accepted, as Pillow names them (``PIL.Image.Image.format``).
ACCEPTED_FORMATS: Final = ("JPEG", "PNG", "GIF", "WEBP", "BMP", "TIFF", "MPO")
# The plugins to try: Pillow's JPEG plugin opens MPO files (reporting "MPO") itself.
_OPENERS: Final = tuple(name for name in ACCEPTED_FORMATS if name != "MPO")

#: JPEG marker segments allowed before the first scan (SOS), ITU-T T.81 annex B.
MAX_JPEG_SEGMENTS: Final = 1024
#: Fill (0xFF) and stray bytes allowed between JPEG segments before the first scan.
MAX_JPEG_SKIPPED_BYTES: Final = 4096
#: Bytes of APPn and COM segments (EXIF, XMP, ICC, comments) allowed before the first scan.
MAX_METADATA_BYTES: Final = 16 * 1024 * 1024
#: PNG chunks allowed before the first IDAT (PNG spec, 3rd edition, section 5.3).
MAX_PNG_CHUNKS: Final = 1024
#: GIF extension blocks and data sub-blocks allowed before the first image (GIF89a, 23-24).
MAX_GIF_BLOCKS: Final = 1024
MAX_GIF_SUB_BLOCKS: Final = 65536

# Modes Pillow stores in one byte per pixel (libImaging/Storage.c).
_ONE_BYTE_MODES: Final = frozenset({"1", "L", "P"})
# Samples per pixel of each PNG colour type (PNG spec, section 11.2.2, table 11.1).
_PNG_CHANNELS: Final = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}
_JPEG_STANDALONE: Final = frozenset({0x01, *range(0xD0, 0xD9)})  # TEM, RSTn, SOI: no length


@dataclass(frozen=True, slots=True)
class ImageInfo:
    """What an image's header says, read without decoding the pixels.

    Attributes:
        format: Pillow's format name, one of ``ACCEPTED_FORMATS``.
        width, height: pixels, as stored (before any EXIF rotation).
        mode: Pillow's mode of the decoded image, e.g. ``"RGB"``, ``"RGBA"``, ``"I;16"``.
        bytes_per_pixel: bytes one pixel takes once decoded: the larger of Pillow's storage
            for ``mode`` (1 for ``1``/``L``/``P``, 2 for ``I;16``, 4 otherwise) and the
            file's own sample depth where it declares one (a 16-bit RGBA PNG: 8); 4 for an
            image with a transparent colour, which analysis expands to RGBA.
    """

    format: str
    width: int
    height: int
    mode: str
    bytes_per_pixel: int

    @property
    def decode_bytes(self) -> int:
        """Bytes the decoded pixels take: width x height x bytes_per_pixel."""
        return self.width * self.height * self.bytes_per_pixel


_KNOWN_MAGIC: Final = (
    (b"pk\x03\x04", "a ZIP archive (or an Office document)"),
    (b"\x1f\x8b", "gzip-compressed data"),
    (b"\x7felf", "an ELF executable"),
    (b"mz", "a Windows executable"),
    (b"ftypavif", "an AVIF image, which is not accepted"),
    (b"ftypheic", "a HEIC image, which is not accepted"),
)


def describe_bytes(data: bytes) -> str:
    """Say in a few words what ``data`` looks like, for an "it is not an image" message.

    Returns a predicate such as ``"looks like HTML"``, ``"looks like JSON"``, ``"looks like
    a ZIP archive"`` or ``"is binary data of an unknown format"``. The content itself is never
    quoted, not even its first bytes in hex: with file URLs allowed, they could be the start
    of any file the daemon can read.
    """
    head = data[:512].lstrip(b"\xef\xbb\xbf \t\r\n").lower()
    if not head:
        return "is empty or only whitespace"
    if head.startswith((b"<!doctype html", b"<html", b"<head", b"<body")):
        return "looks like HTML"
    if head.startswith(b"<?xml") or head.startswith(b"<svg"):
        return "looks like XML or SVG"
    if head.startswith(b"<"):
        return "looks like HTML"
    if head.startswith((b"{", b"[")):
        return "looks like JSON"
    if head.startswith(b"%pdf"):
        return "looks like a PDF document"
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        text = None
    if text is not None and all(c.isprintable() or c in "\t\r\n" for c in text):
        return "looks like plain text"
    kind = next((name for magic, name in _KNOWN_MAGIC if head.startswith(magic)), None)
    return f"looks like {kind}" if kind else "is binary data of an unknown format"


def scan_structure(data: bytes, source: str = "the data") -> int | None:
    """Walk the container of a JPEG, PNG or GIF up to its first image data, with caps.

    Other formats (and data that is no image at all) pass unchecked: Pillow parses their
    headers in bounded time. Malformed structure is not judged here either: the walk stops
    and Pillow gives the error.

    Args:
        data: the encoded image.
        source: what the bytes are, for messages.

    Returns:
        The bytes per pixel the file declares (PNG: samples x bit depth / 8, IHDR), or
        ``None`` when it does not say.

    Raises:
        InvalidImage: more segments, chunks, blocks, stray bytes or metadata than the caps
            (``MAX_*`` above) allow before the first image data; the message names the cap.
    """
    if data.startswith(b"\xff\xd8"):
        _scan_jpeg(data, source)
    elif data.startswith(b"\x89PNG\r\n\x1a\n"):
        return _scan_png(data, source)
    elif data.startswith((b"GIF87a", b"GIF89a")):
        _scan_gif(data, source)
    return None


def _refuse(source: str, what: str) -> InvalidImage:
    return InvalidImage(f"refusing {source}: {what} (a malformed or hostile file)")


def _scan_jpeg(data: bytes, source: str) -> None:
    """ITU-T T.81 B.1.1: segments are 0xFF, a marker byte, then (most) a 2-byte length."""
    n = len(data)
    pos, segments, skipped, metadata = 2, 0, 0, 0
    while pos + 1 < n:
        if data[pos] != 0xFF or data[pos + 1] in (0x00, 0xFF):
            # Fill bytes before a marker (B.1.1.2) or stray bytes: Pillow reads these one by one.
            skipped += 1
            pos += 1
            if skipped > MAX_JPEG_SKIPPED_BYTES:
                raise _refuse(
                    source,
                    f"more than {MAX_JPEG_SKIPPED_BYTES} fill or stray bytes between JPEG "
                    "segments before the image data",
                )
            continue
        marker = data[pos + 1]
        pos += 2
        segments += 1
        if segments > MAX_JPEG_SEGMENTS:
            raise _refuse(
                source, f"more than {MAX_JPEG_SEGMENTS} JPEG segments before the image data"
            )
        if marker == 0xDA:  # SOS: the entropy-coded data follows
            return
        if marker in _JPEG_STANDALONE:
            continue
        if pos + 2 > n:
            return
        length = (data[pos] << 8) | data[pos + 1]
        if 0xE0 <= marker <= 0xEF or marker == 0xFE:
            metadata += length
            if metadata > MAX_METADATA_BYTES:
                raise _refuse(
                    source,
                    f"more than {MAX_METADATA_BYTES} bytes of metadata segments (APPn, COM) "
                    "before the image data",
                )
        pos += length


def _scan_png(data: bytes, source: str) -> int | None:
    """PNG spec section 5.3: each chunk is length (4), type (4), data, CRC (4)."""
    n = len(data)
    pos, chunks, metadata = 8, 0, 0
    declared: int | None = None
    while pos + 8 <= n:
        length, kind = struct.unpack_from(">I4s", data, pos)
        if kind in (b"IDAT", b"IEND"):
            break
        chunks += 1
        if chunks > MAX_PNG_CHUNKS:
            raise _refuse(source, f"more than {MAX_PNG_CHUNKS} PNG chunks before the image data")
        if kind == b"IHDR" and length >= 13 and pos + 8 + 10 <= n:
            depth, color = data[pos + 16], data[pos + 17]
            channels = _PNG_CHANNELS.get(color)
            if channels is not None:
                declared = max(1, channels * depth // 8)
        elif not kind[:1].isupper():  # ancillary chunks: text, EXIF, ICC, private data
            metadata += length
            if metadata > MAX_METADATA_BYTES:
                raise _refuse(
                    source,
                    f"more than {MAX_METADATA_BYTES} bytes of ancillary PNG chunks before "
                    "the image data",
                )
        pos += 12 + length
    return declared


def _scan_gif(data: bytes, source: str) -> None:
    """GIF89a sections 18-24: screen descriptor, colour table, then blocks up to an image."""
    n = len(data)
    if n < 13:
        return
    pos = 13
    if data[10] & 0x80:  # global colour table of 3 x 2^(size + 1) bytes
        pos += 3 * (2 << (data[10] & 0x07))
    blocks = sub_blocks = 0
    while pos < n and data[pos] == 0x21:  # extension introducer
        blocks += 1
        if blocks > MAX_GIF_BLOCKS:
            raise _refuse(
                source, f"more than {MAX_GIF_BLOCKS} GIF extension blocks before the first image"
            )
        pos += 2  # introducer and label
        while pos < n and data[pos]:
            sub_blocks += 1
            if sub_blocks > MAX_GIF_SUB_BLOCKS:
                raise _refuse(
                    source,
                    f"more than {MAX_GIF_SUB_BLOCKS} GIF data sub-blocks before the first image",
                )
            pos += 1 + data[pos]
        pos += 1  # block terminator


def bytes_per_pixel(mode: str, declared: int | None = None, transparent: bool = False) -> int:
    """Bytes one pixel takes once decoded: see ``ImageInfo.bytes_per_pixel``.

    Args:
        mode: Pillow's mode; Pillow stores ``1``, ``L`` and ``P`` in 1 byte, ``I;16*`` in
            2, every other mode (RGB too) in 4 (libImaging/Storage.c).
        declared: the file's own bytes per pixel (``scan_structure``), if it says.
        transparent: the image has a transparent colour (``info["transparency"]``).
    """
    stored = 1 if mode in _ONE_BYTE_MODES else 2 if mode.startswith("I;16") else 4
    return max(stored, declared or 1, 4 if transparent else 1)


def probe_image(
    data: bytes,
    *,
    max_pixels: int | None = None,
    max_decode_bytes: int | None = None,
    source: str = "the data",
) -> ImageInfo:
    """Format, size and decoded footprint of ``data``, read from the header (nothing decoded).

    CPU-bound (bounded by ``scan_structure``'s caps): call it off the event loop.

    Args:
        data: the image bytes.
        max_pixels: when given, images declaring more pixels than this are refused.
        max_decode_bytes: when given, images whose decoded pixels would take more bytes than
            this (``ImageInfo.decode_bytes``) are refused.
        source: what the bytes are, for messages: ``"the response from <url>"``.

    Raises:
        InvalidImage: empty; not an image in an accepted format (the message says what the
            bytes look like); an unreadable header; over a structure cap of ``scan_structure``.
        ImageTooLarge: over ``max_pixels`` pixels, over ``max_decode_bytes`` bytes once
            decoded, or over Pillow's own decompression-bomb limit (twice
            ``Image.MAX_IMAGE_PIXELS``); the message states the numbers.
    """
    if not data:
        raise InvalidImage(f"empty image: {source} has 0 bytes")
    declared = scan_structure(data, source)
    try:
        # Image.open checks the declared size against Pillow's process-wide limit; the warning
        # it emits below twice that limit is ours to judge, against max_pixels below.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data), formats=_OPENERS) as image:
                image_format = image.format
                width, height = image.size
                mode = image.mode
                transparent = "transparency" in image.info
    except Image.DecompressionBombError:
        raise ImageTooLarge(
            f"image too large: {source} declares more pixels than Pillow's decompression-bomb limit"
        ) from None
    except UnidentifiedImageError:
        raise InvalidImage(
            f"not an image: {source} {describe_bytes(data)} "
            f"(accepted formats: {', '.join(ACCEPTED_FORMATS)})"
        ) from None
    except Exception as exc:  # Pillow's plugins raise many types on malformed headers
        raise InvalidImage(f"cannot read the image header of {source}: {exc}") from None
    if image_format not in ACCEPTED_FORMATS:
        raise InvalidImage(f"unsupported image format {image_format!r} in {source}")
    pixels = width * height
    if max_pixels is not None and pixels > max_pixels:
        raise ImageTooLarge(
            f"image too large: {source} is {width}x{height} = {pixels} pixels, "
            f"over the limit of {max_pixels} pixels"
        )
    per_pixel = bytes_per_pixel(mode, declared, transparent)
    info = ImageInfo(image_format, width, height, mode, per_pixel)
    if max_decode_bytes is not None and info.decode_bytes > max_decode_bytes:
        raise ImageTooLarge(
            f"image too large: {source} is {width}x{height} pixels of mode {mode} at "
            f"{per_pixel} bytes per pixel = {info.decode_bytes} bytes once decoded, over the "
            f"limit of {max_decode_bytes} bytes (fetch.max_decode_bytes)"
        )
    return info
