"""Which broker queue an entry travels in: its shard, a stable hash of its location, the same on every host.

shard = first 8 bytes of BLAKE2b(location as UTF-8), read big-endian, modulo APILOG_SHARDS.
The hash is fixed by this definition (not Python's `hash()`, which is salted per process),
so any host, any version and any language computes the same shard for a user.
"""

from __future__ import annotations

import hashlib

QUEUE_PREFIX = "apilog."
_KINDS = {"redis": "redis", "rediss": "redis", "amqp": "rabbitmq", "amqps": "rabbitmq", "pyamqp": "rabbitmq"}


def broker_kind(url: str | None) -> str:
    """`redis`, `rabbitmq`, or `kombu` (any other Celery broker) for a broker URL: the one place its scheme is read."""
    return _KINDS.get((url or "").split("://", 1)[0].lower(), "kombu")

MAX_SHARDS = 1024


def shard_of(location: str, shards: int) -> int:
    """The shard of `location` among `shards` queues."""
    if shards == 1:
        return 0
    digest = hashlib.blake2b(location.encode("utf-8", "surrogatepass"), digest_size=8).digest()
    return int.from_bytes(digest, "big") % shards


def queue_name(shard: int) -> str:
    """The broker queue of a shard: `apilog.<k>`."""
    return f"{QUEUE_PREFIX}{shard}"


def parse_shard_set(text: str, shards: int) -> frozenset[int]:
    """`all`, or comma-separated shards and ranges such as `0-3,7`; ValueError saying what is wrong."""
    value = text.strip().lower()
    if value in ("", "all"):
        return frozenset(range(shards))
    chosen: set[int] = set()
    for part in value.split(","):
        low, sep, high = part.strip().partition("-")
        if not low.isdigit() or (sep and not high.isdigit()):
            raise ValueError(f"{part.strip()!r} is not a shard number or a range like 0-3")
        first, last = int(low), int(high) if sep else int(low)
        if first > last or last >= shards:
            raise ValueError(f"{part.strip()!r} is outside the {shards} shards 0-{shards - 1}")
        chosen.update(range(first, last + 1))
    return frozenset(chosen)
