"""The seal format (docs/sealing.md): forward-secure epoch keys, and the seal lines apilogd writes and `apilog verify` checks.

The seal log (`seals/<first record>.seal` beside the log tree) holds one line per batch: a JSON
body, a space, and the body's HMAC-SHA256 under the key of the body's epoch. A body names, for
each file the batch appended to, the file's size before it, the bytes appended and their BLAKE2b
digest; the files it rotated into archive/ (`mv`), the archives it compressed (`gz`, with the
digest of the .gz bytes) and the archives retention removed (`rm`). Each body carries the digest of
the line before it (`p`), so the lines form one chain from the first (`n` = 1, which names the key
and the epoch length) to the last.

Epoch keys evolve one way: K(e+1) = HMAC(K(e), "apilog seal epoch"). apilogd keeps only the current
key; before it moves on it writes an epoch's last line (`end`: the next epoch), so a later key can
neither re-seal nor cut a past epoch. The verification key, K(0) with the chain's start, is printed
once by `apilogd seal-key`.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
from pathlib import Path
from typing import BinaryIO

import msgspec

SEALS = "seals"  # the seal log's folder, beside system/, users/ and archive/
SEAL_SUFFIX = ".seal"
KEY_PREFIX = "apilog-seal-1"
_EVOLVE = b"apilog seal epoch"
_ID = b"apilog seal id"
_SEGMENT = re.compile(r"^(\d{12})\.seal$")


class Body(msgspec.Struct, omit_defaults=True):
    """What one line of the seal log says (the short names keep a line per batch small)."""

    n: int  # line number, from 1
    e: int  # epoch whose key tags this line
    t: float  # when it was written (the daemon's clock)
    p: str = ""  # digest of the line before ("" for the first)
    w: list[tuple[str, int, int, str]] = []  # (file, size before, bytes appended, digest of those bytes)
    mv: list[tuple[str, str]] = []  # (live file, archive it became)
    gz: list[tuple[str, int, str]] = []  # (plain archive, size of its .gz, digest of the .gz)
    rm: list[str] = []  # archives removed by APILOG_RETAIN_DAYS
    end: int | None = None  # this line ends its epoch; the next line is of this epoch
    id: str = ""  # first line only: the key's id, the chain's start time and epoch length
    t0: float = 0.0
    len: int = 0
    note: str = ""  # what apilogd found and sealed, e.g. a seal log cut outside it


_encode = msgspec.json.Encoder().encode
_decode = msgspec.json.Decoder(Body).decode


class BadKey(ValueError):
    """A verification key that is not one."""


def digest(data: bytes | memoryview) -> str:
    return hashlib.blake2b(data, digest_size=32).hexdigest()


def new_digest() -> hashlib.blake2b:
    """A `digest` fed in pieces."""
    return hashlib.blake2b(digest_size=32)


def file_digest(handle: BinaryIO) -> str:
    """`digest` of everything a file object has left to read."""
    hashed = new_digest()
    while chunk := handle.read(1 << 20):
        hashed.update(chunk)
    return hashed.hexdigest()


def evolve(key: bytes, steps: int = 1) -> bytes:
    """The key `steps` epochs later (there is no way back)."""
    for _ in range(steps):
        key = hmac.digest(key, _EVOLVE, "sha256")
    return key


def key_id(first_key: bytes) -> str:
    return hmac.digest(first_key, _ID, "sha256").hex()[:16]


def line(body: Body, key: bytes) -> bytes:
    """A body as its line of the seal log, tagged with its epoch's key."""
    raw = _encode(body)
    return raw + b" " + hmac.digest(key, raw, "sha256").hex().encode() + b"\n"


def split(raw_line: bytes) -> tuple[Body, bytes, str]:
    """(body, its bytes, tag) of one line; ValueError when it is not a seal line."""
    raw, _, tag = raw_line.rstrip(b"\n").rpartition(b" ")
    if not raw or len(tag) != 64:
        raise ValueError("not a seal line")
    try:
        return _decode(raw), raw, tag.decode("ascii")
    except (msgspec.DecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"not a seal line ({exc})") from None


def tag_holds(raw: bytes, tag: str, key: bytes) -> bool:
    return hmac.compare_digest(hmac.digest(key, raw, "sha256").hex(), tag)


def segment_name(first: int) -> str:
    return f"{first:012d}{SEAL_SUFFIX}"


def segments(log_dir: Path) -> list[str]:
    """The seal log's files in order (their names, below `seals/`); FileNotFoundError when there is none."""
    return sorted(n for n in os.listdir(log_dir / SEALS) if _SEGMENT.match(n))


class VerificationKey(msgspec.Struct, frozen=True):
    """K(0) of a chain, with what is needed to find every epoch's key: kept off the machine."""

    id: str
    key: bytes
    t0: float
    epoch_seconds: int

    def text(self) -> str:
        return f"{KEY_PREFIX}:{self.id}:{self.key.hex()}:{self.t0!r}:{self.epoch_seconds}"

    @classmethod
    def parse(cls, text: str) -> VerificationKey:
        parts = text.strip().split(":")
        try:
            if len(parts) != 5 or parts[0] != KEY_PREFIX:
                raise ValueError
            found = cls(parts[1], bytes.fromhex(parts[2]), float(parts[3]), int(parts[4]))
        except ValueError:
            raise BadKey(f"not an apilog verification key (expected {KEY_PREFIX}:<id>:<key>:<start>:<epoch seconds>)") from None
        if len(found.key) != 32 or key_id(found.key) != found.id or found.epoch_seconds < 1:
            raise BadKey("the verification key does not hold together (its id does not match its key)")
        return found


def epoch_at(when: float, t0: float, epoch_seconds: int) -> int:
    return max(0, int((when - t0) // epoch_seconds))
