"""Record framing inside a segment: magic, length and CRC-32 ahead of each payload; written by producers, walked by readers."""

from __future__ import annotations

import os
import struct
import zlib
from collections.abc import Iterator

MAGIC = b"APL1"
HEADER = struct.Struct("<4sII")
MAX_PAYLOAD = 16 * 1024 * 1024
CHUNK = 1024 * 1024  # read at a time while walking headers


def frame(payload: bytes) -> bytes:
    """Header and payload, to be written with a single `write()`."""
    return HEADER.pack(MAGIC, len(payload), zlib.crc32(payload)) + payload


def whole_records(fd: int, pos: int, stop: int) -> Iterator[tuple[int, int]]:
    """(start, end) of each whole record from `pos` that ends by `stop`, walking headers a chunk at a time."""
    buf, base = b"", pos
    while pos + HEADER.size <= stop:
        if pos + HEADER.size > base + len(buf):
            buf, base = os.pread(fd, CHUNK, pos), pos
        magic, length, _ = HEADER.unpack_from(buf, pos - base)
        end = pos + HEADER.size + length
        if magic != MAGIC or length > MAX_PAYLOAD or end > stop:
            return  # garbage, or a record still being written
        yield pos, end
        pos = end


def boundaries(fd: int, upto: int) -> int:
    """The end of the last whole record at or before `upto`, walking headers from the segment's start."""
    return max((end for _, end in whole_records(fd, 0, min(os.fstat(fd).st_size, upto))), default=0)
