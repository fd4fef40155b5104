"""PNG encoding on several cores, for the images a user waits on (the A1111 API's base64 PNGs, samples).

Pillow encodes a PNG on one core: for a 512 px image that is tens of milliseconds, which the
A1111 API adds to every image it returns. The deflate stream of a PNG can be cut into parts that
are compressed independently and joined, as pigz does: every part but the last ends with a sync
flush (byte-aligned, not final), so the joined raw deflate data is one valid stream. Each part's
rows are filtered ("Up", from the raw rows, so a part needs only the row above it) and compressed
on a thread; zlib releases the GIL, so the parts run in parallel. The result is
an ordinary PNG (IHDR, text chunks, one IDAT, IEND) that every decoder reads.

A part whose first rows do not deflate to less than :data:`STORE_ABOVE` of their size (noise, such
as a random-weight model's images) is stored instead: deflate there costs most of the encode and
saves nothing.

Text chunks follow Pillow's ``PngInfo.add_text``: ``tEXt`` when the value is Latin-1, else ``iTXt``
(UTF-8), so A1111's ``parameters`` infotext is read back by the same readers.
"""

from __future__ import annotations

import os
import struct
import zlib
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

#: Below this many pixels Pillow's single-threaded encoder is as fast (threads cost more than they save).
MIN_PIXELS = 256 * 256
#: Rows per part at least: small parts compress worse (each starts with an empty window).
MIN_ROWS = 32
#: A part is stored (deflate level 0) when its first :data:`SAMPLE_ROWS` rows deflate to more than this share.
STORE_ABOVE = 0.9
SAMPLE_ROWS = 4
_COLOR_TYPE = {"L": (0, 1), "RGB": (2, 3), "LA": (4, 2), "RGBA": (6, 4)}  # mode -> (PNG colour type, channels)
_pool: ThreadPoolExecutor | None = None


def workers() -> int:
    """Threads for one encode: the cores this process may use, at most 8."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    return max(1, min(8, cores))


def can_encode(image: Any) -> bool:
    """Whether :func:`encode` handles ``image`` and gains from it: 8-bit L/LA/RGB/RGBA, large, several cores."""
    return image.mode in _COLOR_TYPE and image.width * image.height >= MIN_PIXELS and workers() > 1


def encode(image: Any, text: dict[str, str] | None = None, level: int = 6) -> bytes:
    """The PNG of a PIL ``image`` (a mode :func:`can_encode` accepts), ``text`` as text chunks, zlib ``level``."""
    color_type, channels = _COLOR_TYPE[image.mode]
    px = np.asarray(image, dtype=np.uint8).reshape(image.height, image.width * channels)
    rows = px.shape[0]
    parts = max(1, min(workers(), rows // MIN_ROWS))
    bounds = [rows * i // parts for i in range(parts + 1)]
    global _pool
    if _pool is None:
        _pool = ThreadPoolExecutor(max_workers=workers(), thread_name_prefix="fastsd-png")
    jobs = [_pool.submit(_part, px, bounds[i], bounds[i + 1], channels, level, i == parts - 1) for i in range(parts)]
    deflated, checksum = [], 1
    for job in jobs:
        data, raw = job.result()
        deflated.append(data)
        checksum = zlib.adler32(raw, checksum)
    idat = b"\x78\x01" + b"".join(deflated) + struct.pack(">I", checksum)  # zlib header: deflate, 32 KiB window
    header = struct.pack(">IIBBBBB", image.width, image.height, 8, color_type, 0, 0, 0)
    chunks = [_chunk(b"IHDR", header), *(_text(k, v) for k, v in (text or {}).items())]
    return b"\x89PNG\r\n\x1a\n" + b"".join([*chunks, _chunk(b"IDAT", idat), _chunk(b"IEND", b"")])


def _part(px: np.ndarray, start: int, stop: int, bpp: int, level: int, last: bool) -> tuple[bytes, bytes]:
    """Rows ``start:stop`` "Up"-filtered (type byte 2 on each) and raw-deflated: (deflate bytes, filtered rows).

    Stored rather than compressed when its first rows show it does not compress (:data:`STORE_ABOVE`).

    Up (each byte minus the byte above, modulo 256) costs one vectorised subtraction; on photos and
    renders it compresses within a few per cent of Paeth, which costs more than the deflate saves.
    """
    rows = px[start:stop]
    filtered = np.empty((rows.shape[0], rows.shape[1] + 1), dtype=np.uint8)
    filtered[:, 0] = 2
    filtered[1:, 1:] = rows[1:] - rows[:-1]  # uint8 arithmetic wraps, as the filter's modulo wants
    filtered[0, 1:] = rows[0] - px[start - 1] if start > 0 else rows[0]  # the first image row has zeros above
    raw = filtered.tobytes()
    sample = raw[: SAMPLE_ROWS * filtered.shape[1]]
    if level and len(zlib.compress(sample, level)) > STORE_ABOVE * len(sample):
        level = 0  # incompressible: stored blocks, a copy
    co = zlib.compressobj(level, zlib.DEFLATED, -15)  # raw deflate: the zlib header and checksum come once
    return co.compress(raw) + co.flush(zlib.Z_FINISH if last else zlib.Z_SYNC_FLUSH), raw


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _text(key: str, value: str) -> bytes:
    try:
        return _chunk(b"tEXt", key.encode("latin-1") + b"\0" + value.encode("latin-1"))
    except UnicodeEncodeError:  # iTXt: keyword, no compression, no language or translated keyword, UTF-8 text
        return _chunk(b"iTXt", key.encode("latin-1") + b"\0\0\0\0\0" + value.encode("utf-8"))
