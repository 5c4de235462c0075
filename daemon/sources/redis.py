"""Redis between the hosts, without loss: a forwarder's pipelined pushes, a writer's lease and in-flight list.

Each shard `k` is three keys:
- `apilog.<k>`: the queue, a list (pushed on the left, taken from the right), the same list a
  stock Celery worker on Redis reads (`celery worker -Q apilog.<k>`);
- `apilog.<k>.inflight`: what the owner moved out of the queue and has not acknowledged,
  oldest on the right (Redis's "reliable queue" pattern: LMOVE, never pop-then-record);
- `apilog.<k>.owner`: the lease, the owner's id with a time to live, renewed while it runs.

A writer of named shards takes a free one at once; a standby (APILOG_WRITER_SHARDS=all) only once its lease has been
free for TAKEOVER_AFTER seconds, so an owner restarted after a crash gets its shards back.
Every move and every acknowledgement is a Lua script that first checks the lease, so a
writer that lost its shard moves and drops nothing. A new owner takes the in-flight list
over first, oldest first, so a dead owner's messages are neither lost nor reordered; the
ids the writer journaled make a message it already wrote a no-op.
"""

from __future__ import annotations

import contextlib
import hashlib
import time
from dataclasses import dataclass
from typing import Any

import redis

from apilog.core import wire
from apilog.core.entry import Entry
from apilog.core.shards import queue_name
from apilog.settings import Settings, redacted

from ..exceptions import say
from ..state.folders import Folders
from ..state.ledger import Ledger
from .broker import ShardWriter, quarantine_message

LEASE_MS = 10_000  # a SIGKILLed owner that comes back within this keeps its shards
TAKEOVER_AFTER = 10.0  # seconds a standby sees a shard's lease free before it takes it (lease + this < 30 s)
RENEW_EVERY = 3.0  # seconds
TRY_LEASE_EVERY = 1.0  # how often a standby asks for a shard
MAX_MOVE = 4096  # messages moved per script call

# KEYS: queue, inflight, lease. ARGV: me, n, lease ms. The lease is checked (and renewed) first.
_TAKE = """
if redis.call('GET', KEYS[3]) ~= ARGV[1] then return false end
redis.call('PEXPIRE', KEYS[3], ARGV[3])
local out = {}
for i = 1, tonumber(ARGV[2]) do
  local v = redis.call('LMOVE', KEYS[1], KEYS[2], 'RIGHT', 'LEFT')
  if not v then break end
  out[#out + 1] = v
end
return out
"""
# KEYS: inflight, lease. ARGV: me, n. Drops the n oldest in-flight messages.
_ACK = """
if redis.call('GET', KEYS[2]) ~= ARGV[1] then return false end
redis.call('LTRIM', KEYS[1], 0, -tonumber(ARGV[2]) - 1)
return 1
"""
# KEYS: lease. ARGV: me, lease ms. Takes a free lease, or keeps our own (a restart within its time).
_LEASE = """
local holder = redis.call('GET', KEYS[1])
if holder == false or holder == ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return 1
end
return 0
"""
# KEYS: lease. ARGV: me. A clean stop hands the shard over at once.
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


def client(url: str) -> redis.Redis:
    """A client with timeouts: a paused or unreachable Redis is an error to retry, never a hang."""
    return redis.Redis.from_url(url, socket_timeout=5, socket_connect_timeout=5, health_check_interval=10)


def durability_warning(conn: redis.Redis) -> str | None:
    """Why this Redis could lose what it acknowledged, or None (AOF with appendfsync always)."""
    try:
        conf = conn.config_get("append*")
    except redis.ResponseError:
        return "cannot read the Redis configuration (CONFIG is disabled): its durability is unknown"
    except redis.RedisError as exc:
        return f"cannot ask Redis how durable it is ({exc}); asked again later"
    if conf.get("appendonly") != "yes":
        return "Redis runs without appendonly: a crash of Redis loses every entry it holds (set appendonly yes)"
    if conf.get("appendfsync") != "always":
        return (f"Redis has appendfsync {conf.get('appendfsync')}: a crash of its machine can lose the last second "
                "of entries (set appendfsync always)")
    return None


class RedisPublisher:
    """Pushes a forwarder's batch, every shard's messages in order, in one pipelined round trip."""

    def __init__(self, settings: Settings) -> None:
        assert settings.broker_url is not None  # noqa: S101 - the forward role requires it
        self.name = redacted(settings.broker_url)
        self.conn = client(settings.broker_url)

    def publish(self, by_shard: dict[int, list[Entry]]) -> None:
        try:
            with self.conn.pipeline(transaction=False) as pipe:
                for shard, entries in by_shard.items():
                    pipe.lpush(queue_name(shard), *(wire.encode(e) for e in entries))
                pipe.execute()
        except redis.RedisError as exc:
            raise OSError(f"Redis: {exc}") from exc

    def durability_warning(self) -> str | None:
        return durability_warning(self.conn)

    def close(self) -> None:
        self.conn.close()


class _Shard:
    """One owned (or wanted) shard: its keys, whether we hold its lease, and its in-flight messages in hand."""

    def __init__(self, shard: int) -> None:
        self.shard = shard
        self.queue = queue_name(shard)
        self.inflight = f"{self.queue}.inflight"
        self.lease = f"{self.queue}.owner"
        self.owned = False
        self.reclaim: list[bytes] = []  # a former owner's in-flight messages, oldest first, handed out first
        self.window: list[bytes] = []  # handed out or skipped, oldest first: exactly the right end of inflight
        self.base = 0  # the number of window[0]; each message taken gets the next number
        self.renewed = 0.0
        self.tried = 0.0
        self.free_since: float | None = None  # when a standby first saw its lease free


@dataclass(slots=True)
class Item:
    """A message handed out: its shard, its number in the shard's window, its bytes, and what they decode to."""

    shard: _Shard
    number: int
    raw: bytes
    entry: Entry | None  # None when the bytes are not an apilog message
    problem: str = ""


class RedisSource(ShardWriter[_Shard]):
    """A writer's shards on Redis: taken under a lease into the in-flight list, acknowledged once committed."""

    def __init__(self, settings: Settings, folders: Folders, ledger: Ledger, writer_id: str) -> None:
        super().__init__(settings, folders, ledger)
        self.me = writer_id
        self.conn = client(settings.broker_url or "")
        self.take_script = self.conn.register_script(_TAKE)
        self.ack_script = self.conn.register_script(_ACK)
        self.lease_script = self.conn.register_script(_LEASE)
        self.release_script = self.conn.register_script(_RELEASE)
        self.shards = [_Shard(k) for k in sorted(settings.writer_shards)]
        self.warned: str | None = None
        self._redis_call(self.conn.ping)

    def _redis_call(self, call: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return call(*args, **kwargs)
        except redis.RedisError as exc:
            raise OSError(f"Redis: {exc}") from exc

    # Leases.

    def _leases(self) -> None:
        now = time.monotonic()
        for shard in self.shards:
            if shard.owned and now - shard.renewed < RENEW_EVERY:
                continue
            if not shard.owned and now - shard.tried < TRY_LEASE_EVERY:
                continue
            shard.tried = now
            if not shard.owned and self.standby:
                holder = self._redis_call(self.conn.get, shard.lease)
                if holder is not None and holder.decode(errors="replace") != self.me:
                    shard.free_since = None
                    continue
                shard.free_since = shard.free_since or now
                if holder is None and now - shard.free_since < TAKEOVER_AFTER:
                    continue
            held = bool(self._redis_call(self.lease_script, keys=[shard.lease], args=[self.me, LEASE_MS]))
            if held and not shard.owned:
                self._took_over(shard)
            elif not held and shard.owned:
                self._lost(shard)
            shard.renewed = now

    def _took_over(self, shard: _Shard) -> None:
        shard.owned = True
        shard.window, shard.base = [], 0
        shard.reclaim = list(reversed(self._redis_call(self.conn.lrange, shard.inflight, 0, -1)))
        say(f"owns shard {shard.shard} ({shard.queue}); {len(shard.reclaim)} in-flight messages taken over")

    def _lost(self, shard: _Shard) -> None:
        shard.owned = False
        shard.reclaim, shard.window = [], []
        say(f"lost the lease of shard {shard.shard}: another writer owns it now; standing by")

    # The Source protocol.

    def take(self, limit: int) -> list[Item]:
        self._leases()
        batch: list[Item] = []
        for shard in self.shards:
            if not shard.owned or len(batch) >= limit:
                continue
            while shard.reclaim and len(batch) < limit:
                self._hand_out(shard, shard.reclaim.pop(0), batch)
            want = min(limit - len(batch), MAX_MOVE)
            if want <= 0 or shard.reclaim:
                continue
            moved = self._redis_call(self.take_script, keys=[shard.queue, shard.inflight, shard.lease],
                                     args=[self.me, want, LEASE_MS])
            if moved is None:
                self._lost(shard)
                continue
            shard.renewed = time.monotonic()
            for raw in moved:
                self._hand_out(shard, raw, batch)
        if not batch:
            self._ack_skipped()
        return batch

    def _hand_out(self, shard: _Shard, raw: bytes, batch: list[Item]) -> None:
        """Decode once; a message whose entry this writer journaled already (a redelivery) is skipped, not handed out."""
        number = shard.base + len(shard.window)
        shard.window.append(raw)
        try:
            entry = wire.decode(raw)
        except ValueError as exc:
            batch.append(Item(shard, number, raw, None, str(exc)))  # quarantined by the batch writer
            return
        if entry.id not in self.delivered:
            batch.append(Item(shard, number, raw, entry))

    def _ack_skipped(self) -> None:
        """With nothing fresh in hand, the redeliveries taken are acknowledged at once."""
        for shard in self.shards:
            if shard.owned and shard.window:
                self._ack(shard, len(shard.window))

    def _ack(self, shard: _Shard, count: int) -> None:
        """Drop the `count` oldest in-flight messages; on a failure they stay in flight, acked with the next batch."""
        try:
            done = self._redis_call(self.ack_script, keys=[shard.inflight, shard.lease], args=[self.me, count])
        except OSError as exc:
            say(f"Redis ack failed, kept in flight for the next one: {exc}")
            return
        if done is None:
            self._lost(shard)  # the new owner takes them over; its ids or ours tell what was written
            return
        del shard.window[:count]
        shard.base += count

    def key(self, item: Item) -> str:
        return f"redis:{item.shard.shard}:{hashlib.sha256(item.raw).hexdigest()[:16]}"

    def set_aside(self, item: Item, why: str) -> Entry:
        return quarantine_message(self.folders, item.raw, why, self.durable)

    def ids(self, batch: list[Item]) -> list[str]:
        return [item.entry.id for item in batch if item.entry is not None]

    def acknowledge(self, batch: list[Item]) -> None:
        self.delivered.add(self.ids(batch))
        last: dict[_Shard, int] = {}
        for item in batch:
            last[item.shard] = max(item.number, last.get(item.shard, -1))
        for shard, number in last.items():
            if shard.owned:  # everything up to the batch's last message, skipped redeliveries included, is done
                self._ack(shard, number - shard.base + 1)

    def rewind(self, batch: list[Item]) -> None:
        for shard in self.shards:
            shard.reclaim = shard.window + shard.reclaim
            shard.base += len(shard.window)
            shard.window = []

    def look_for_input(self) -> None:
        self._leases()

    def clean_up(self) -> None:
        warning = durability_warning(self.conn)
        if warning and warning != self.warned:
            say(f"warning: {warning}")
        self.warned = warning

    def close(self) -> None:
        for shard in self.shards:
            if shard.owned:
                with contextlib.suppress(redis.RedisError):  # else the lease runs out by itself
                    self.release_script(keys=[shard.lease], args=[self.me])
        self.conn.close()
        self.delivered.close()
