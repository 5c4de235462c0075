"""Record framing inside a segment: magic, length and CRC-32 ahead of each payload."""

from __future__ import annotations

import struct
import zlib

MAGIC = b"APL1"
HEADER = struct.Struct("<4sII")
MAX_PAYLOAD = 16 * 1024 * 1024


def frame(payload: bytes) -> bytes:
    """Header and payload, to be written with a single `write()`."""
    return HEADER.pack(MAGIC, len(payload), zlib.crc32(payload)) + payload
