"""Hostile but small image files, built in the tests (Pillow plus byte manipulation).

Each is a few MB at most on disk; what makes it hostile is its structure (millions of JPEG
segments, PNG chunks) or the memory it declares (8000x8000 pixels of 16-bit RGBA in 1 MB).
"""

from __future__ import annotations

import functools
import io
import struct
import zlib

from PIL import Image


@functools.cache
def tiny_jpeg() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 40, 40)).save(buffer, "JPEG")
    return buffer.getvalue()


def app1_bomb_jpeg(segments: int) -> bytes:
    """A valid 8x8 JPEG whose SOI is followed by ``segments`` empty APP1 segments (4 bytes
    each: FF E1 00 02, ITU-T T.81 B.1.1.4); 5 million of them is 19 MiB."""
    jpeg = tiny_jpeg()
    return jpeg[:2] + b"\xff\xe1\x00\x02" * segments + jpeg[2:]


def fill_bytes_jpeg(count: int) -> bytes:
    """A valid 8x8 JPEG with ``count`` 0xFF fill bytes before its first marker after SOI."""
    jpeg = tiny_jpeg()
    return jpeg[:2] + b"\xff" * count + jpeg[2:]


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_by_hand(
    width: int, height: int, *, bit_depth: int = 8, color_type: int = 6, extra_chunks: int = 0
) -> bytes:
    """A valid all-zero PNG, compressed row by row, so the test never holds the pixels.

    ``color_type`` as in the PNG spec (0 gray, 2 RGB, 6 RGBA); ``extra_chunks`` empty private
    ancillary chunks (``prVt``) are put before IDAT.
    """
    channels = {0: 1, 2: 3, 4: 2, 6: 4}[color_type]
    row = b"\x00" + bytes(width * channels * bit_depth // 8)  # filter type 0, then samples
    compressor = zlib.compressobj(6)
    body = bytearray()
    for _ in range(height):
        body += compressor.compress(row)
    body += compressor.flush()
    header = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _chunk(b"IHDR", header)
        + _chunk(b"prVt", b"") * extra_chunks
        + _chunk(b"IDAT", bytes(body))
        + _chunk(b"IEND", b"")
    )


@functools.cache
def rgba_8k_png() -> bytes:
    """8000x8000 8-bit RGBA: about 250 KB, 256,000,000 bytes once decoded."""
    return png_by_hand(8000, 8000, bit_depth=8, color_type=6)


@functools.cache
def rgba16_8k_png() -> bytes:
    """8000x8000 16-bit RGBA: about 500 KB, 512,000,000 bytes once decoded at 8 per pixel."""
    return png_by_hand(8000, 8000, bit_depth=16, color_type=6)


def chunk_bomb_png(chunks: int) -> bytes:
    """A valid 8x8 RGBA PNG with ``chunks`` empty ancillary chunks before IDAT (12 bytes each)."""
    return png_by_hand(8, 8, extra_chunks=chunks)


def comment_bomb_gif(blocks: int) -> bytes:
    """A valid 8x8 GIF with ``blocks`` comment extensions of one 1-byte sub-block each."""
    buffer = io.BytesIO()
    Image.new("P", (8, 8), 1).save(buffer, "GIF")
    gif = buffer.getvalue()
    # Header (6) + logical screen descriptor (7) + global colour table, then the blocks.
    table = 3 * (2 << (gif[10] & 0x07)) if gif[10] & 0x80 else 0
    start = 13 + table
    return gif[:start] + b"\x21\xfe\x01x\x00" * blocks + gif[start:]
