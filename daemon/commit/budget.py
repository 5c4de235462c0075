"""Limits on the daemon's side: drop counters turned into suppression notes, and the log tree's disk budget.

Producers count what they drop in the spool's limits table (apilog/spool/limits.py); the
writer adds what it drops for disk space to the same table. `DropNotes` reads the counters
once a second and makes the notes: one per user, stream and reason at once, then at most
one a minute while drops go on, and a last one when they end.

`Budget` knows how much of the log tree each consumer (a user's folder, or the system)
holds, from a walk in its own thread plus what each batch appends. Before a batch is
committed it says which archives to remove (the largest consumer's oldest first, only
while it holds more than a fair share), whose entries to drop, or that the disk is full
and the batch must wait in the spool.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import struct
import threading
import time
from collections import Counter
from dataclasses import dataclass, field

from apilog.core.entry import Entry, internal
from apilog.core.logfile import ARCHIVE, SYSTEM, USERS, decode_user, parse_archive_name
from apilog.core.streams import INTERNAL
from apilog.settings import Settings
from apilog.spool.limits import OTHERS, RATE_LIMIT, REASONS, Dropped, Limits, TableDamaged, limits_for

from ..exceptions import describe, say

LOOK_EVERY = 1.0  # seconds between looks at the drop counters
DAEMON_LOCK_TRIES = 250  # at most 2.5 ms: a member of the group holding the table never stalls apilogd
NOTE_EVERY = 60.0  # at most one note a minute per user, stream and reason while drops go on
ENDED_AFTER = 2.0  # a counter with no new drop for this long has ended: its last note is written
LIMITED_NOW = 10.0  # a user with a drop this recent is "limited now" in status and the web view
LOG_SPACE, QUOTA = 3, 4  # reasons the writer drops an entry
REASON_NAMES = {**REASONS, LOG_SPACE: "log space", QUOTA: "quota"}
WALK_EVERY = 30.0  # seconds between walks of the tree (what each batch appends is counted in between)
WALK_UNDER_PRESSURE = 5.0  # the same while a budget is passed
DIP = 4 * 2**20  # how far users under their fair share may still write into APILOG_KEEP_FREE's reserve
NOTES_RESERVE = 2**20  # notes alone (INTERNAL, suppressions: a few KB a minute) stop this far from a full disk


def _size(n: float) -> str:
    for unit in ("bytes", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n} GB"


class LogDiskFull(OSError):
    """The log file system has no room for a batch that must be written: it waits in the spool."""

    def __init__(self, free: int, floor: int) -> None:
        super().__init__(errno.ENOSPC, f"log disk full: {_size(free)} free, {_size(floor)} kept free")


def note_id(key: int, first: float, upto: int) -> str:
    """The same id for the same note made again (after a crash, or a forwarder's retry): a writer keeps it once.

    A counter is named by its key and its first drop's time, so a later episode of the same
    user, stream and reason (its counter freed and counted again) gets notes of its own.
    """
    raw = hashlib.blake2b(f"{key}:{first!r}:{upto}".encode(), digest_size=16).hexdigest()
    return f"{raw[:8]}-{raw[8:12]}-5{raw[13:16]}-a{raw[17:20]}-{raw[20:32]}"


class DropNotes:
    """Turns the limits table's drop counters into notes, and counts drops for metrics and status.

    The table is shared with every member of the app's group, so apilogd never waits for it:
    what it owes the table (marks of committed notes, its own drops, the bytes it drained) is
    kept here until the table can be had, and no note is made while a mark is owed (a note
    made again would count its drops twice). A damaged table is replaced, and said in INTERNAL.
    """

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.table: Limits | None = limits_for(settings.spool_dir, settings.user_rate, settings.user_burst,
                                               settings.spool_max)
        self.totals: Counter[str] = Counter()  # drops seen since start, by reason name
        self._seen: dict[int, int] = {}  # counter key -> count already added to totals
        self.limited: list[dict[str, object]] = []  # who was limited lately, for status
        self._last_look = 0.0
        self._marks: dict[str, int] = {}  # owed: counters noted by committed batches
        self._drops: Counter[tuple[str, str, int]] = Counter()  # owed: the writer's own drops
        self._drained = 0  # owed: spool bytes batches took
        self._reports: list[Entry] = []  # INTERNAL notes about the table

    def why(self, reason: int) -> str:
        conf = self.settings
        if reason == RATE_LIMIT:
            return f"rate limit {conf.user_rate:g}/s"
        if reason == QUOTA:
            return f"quota {_size(conf.user_quota)}"
        return REASON_NAMES.get(reason, "limit")

    def _settle(self, waiting: int | None = None) -> bool:
        """Pay what is owed to the table (and, given `waiting`, recount the spool); False when it cannot be had now."""
        table = self.table
        if table is None:
            return False
        try:
            with table.locked(DAEMON_LOCK_TRIES) as held:
                if not held:
                    return False
                now = time.time()
                for slot_key, count in self._marks.items():
                    slot, key = slot_key.split(":")
                    table.mark_noted(int(slot), int(key), count, now)
                self._marks = {}
                for (location, stream, reason), n in self._drops.items():
                    table.count(location, stream, reason, now, n)
                self._drops.clear()
                appended, drained = table.counters()
                if waiting is not None:
                    table.set_drained(max(0, appended - waiting))
                elif self._drained:
                    table.set_drained(drained + self._drained)
                self._drained = 0
        except (TableDamaged, struct.error, OverflowError, ValueError) as exc:
            self._replace(exc, waiting)
            return False
        return True

    def _replace(self, exc: Exception, waiting: int | None) -> None:
        """A table someone damaged: a fresh one in its place (its counts are lost; they were not to be trusted)."""
        assert self.table is not None  # noqa: S101 - only called on a table in use
        try:
            self.table.replace(waiting or 0)
        except OSError as failure:
            say(f"cannot replace the damaged limits table: {describe(failure)}")
            return
        self._marks = {}  # the counters they name are gone with the old table
        self._seen.clear()
        self._reports.append(internal("replaced a damaged limits table", {
            "error": str(exc), "file": str(self.table.path),
            "what_happens": "drops it counted and did not note yet are lost; counting starts afresh"}))

    def due(self, *, force: bool = False) -> tuple[list[Entry], dict[str, int]]:
        """The notes due now, and the marks that record them as noted ({"slot:key": count}), committed with them."""
        now = time.time()
        reports, self._reports = self._reports, []
        if self.table is None or (not force and now - self._last_look < LOOK_EVERY):
            return reports, {}
        self._last_look = now
        if not self._settle():
            return reports + self._reports, {}
        try:
            with self.table.locked(DAEMON_LOCK_TRIES) as held:
                counters = self.table.dropped() if held else []
        except (TableDamaged, struct.error, OverflowError, ValueError) as exc:
            self._replace(exc, None)
            return reports + self._reports, {}
        notes, marks, limited, ended_free = reports, {}, [], []
        for item in counters:
            self._count(item)
            if now - item.last < LIMITED_NOW:
                limited.append({"user": item.location or "(other users)", "stream": item.stream or INTERNAL,
                                "reason": REASON_NAMES.get(item.reason, "limit"), "suppressed": item.count})
            new = item.count - item.noted
            ended = now - item.last >= ENDED_AFTER
            if new <= 0:
                if ended:
                    ended_free.append(item)
                continue
            if ended or now - item.noted_at >= NOTE_EVERY or force:
                notes.append(self._note(item, new))
                marks[f"{item.slot}:{item.key}"] = item.count
        if ended_free:
            with contextlib.suppress(TableDamaged, struct.error), self.table.locked(DAEMON_LOCK_TRIES) as held:
                for item in ended_free if held else []:
                    self.table.free(item.slot, item.key)
                    self._seen.pop(item.key, None)
        self.limited = limited
        return notes, marks

    def _count(self, item: Dropped) -> None:
        seen = self._seen.get(item.key, item.noted if item.noted_at else 0)
        if item.count > seen:
            self.totals[REASON_NAMES.get(item.reason, "limit")] += item.count - seen
        self._seen[item.key] = item.count

    def _note(self, item: Dropped, count: int) -> Entry:
        whose = "of other users" if item.location == OTHERS else (
            "of the system" if item.location == SYSTEM else "of this user")
        return Entry(id=note_id(item.key, item.first, item.count), ts=time.time(), streams=[item.stream or INTERNAL],
                     location=item.location or SYSTEM,
                     message=f"apilog suppressed {count:,} entries {whose}: {self.why(item.reason)}")

    def mark(self, marks: dict[str, int]) -> None:
        """The notes of `marks` are committed: their counts are noted (again after a redo: it only ever raises them)."""
        if marks:
            self._marks.update(marks)
            self._settle()

    def dropped(self, counts: dict[tuple[str, str, int], int]) -> None:
        """The writer dropped these entries ((location, stream, reason) -> how many) for disk space."""
        if counts and self.table is not None:
            self._drops.update(counts)
            self._settle()
            self._last_look = 0.0  # a first note at once

    def drained(self, consumed: int) -> None:
        """A batch took `consumed` bytes of records out of the spool: what waits shrinks now, not at the next recount."""
        if consumed and self.table is not None:
            self._drained += consumed
            self._settle()

    def recount(self, waiting: int | None) -> None:
        """What waits in the spool, measured: the producers' byte counter follows it (their budget is checked against it)."""
        if waiting is not None:
            self._settle(waiting)

    def report(self) -> dict[str, object]:
        """The `limits` part of `apilogd status --json`."""
        return {"suppressed": dict(self.totals), "limited_now": self.limited}


def consumer_of(relpath: str) -> str | None:
    """Whose space a file of the tree is: `system`, `users/<dir>` (live or archived), or None (the seal log)."""
    parts = relpath.split("/")
    if parts[0] == ARCHIVE:
        parts = parts[1:]
    if parts and parts[0] == SYSTEM:
        return SYSTEM
    if len(parts) >= 3 and parts[0] == USERS:
        return f"{USERS}/{parts[1]}"
    return None


def location_of(consumer: str) -> str:
    return SYSTEM if consumer == SYSTEM else decode_user(consumer.split("/", 1)[1])


@dataclass
class _Walked:
    usage: dict[str, int] = field(default_factory=dict)  # consumer -> bytes, live files and archives
    archives: dict[str, list[tuple[str, int]]] = field(default_factory=dict)  # consumer -> [(.gz archive, bytes)], oldest first
    total: int = 0  # the whole tree, the seal log included


@dataclass
class Plan:
    """What a batch may do within the budget."""

    remove: list[tuple[str, int]] = field(default_factory=list)  # archives to remove first, with their bytes
    drop: dict[str, int] = field(default_factory=dict)  # consumer -> reason its entries of this batch are dropped
    full: LogDiskFull | None = None  # the batch must wait


class Budget:
    """How much each consumer holds, and what a batch may write without passing APILOG_MAX_USE, KEEP_FREE or USER_QUOTA."""

    def __init__(self, settings: Settings, root_fd: int) -> None:
        self.settings = settings
        self.root_fd = root_fd
        self.root = settings.log_dir
        fs = os.fstatvfs(root_fd)
        size = fs.f_blocks * fs.f_frsize
        self.max_use = settings.max_use.of(size)
        self.keep_free = settings.keep_free.of(size)
        self.quota = settings.user_quota
        self._walked = _Walked()
        self._known = False  # until the first walk ends, only the file system's free space is checked
        self._since: Counter[str] = Counter()  # appended since the last walk began, by consumer
        self._since_total = 0
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._closing = False
        self.pressure = False
        self.full = False  # the last batch waited for space
        self._thread = threading.Thread(target=self._walk_loop, name="apilog-budget", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._closing = True
        self._wake.set()
        self._thread.join(timeout=5)

    def _walk_loop(self) -> None:
        while not self._closing:
            began = time.monotonic()
            try:
                walked = self._walk()
            except OSError:
                walked = None  # tried again at the next round
            if walked is not None:
                with self._lock:
                    self._walked, self._known = walked, True
                    self._since, self._since_total = Counter(), 0
            elapsed = time.monotonic() - began
            self._wake.wait(max(0.5, (WALK_UNDER_PRESSURE if self.pressure else WALK_EVERY) - elapsed))
            self._wake.clear()

    def _walk(self) -> _Walked:
        walked = _Walked()
        root = str(self.root)
        for dirpath, _dirs, filenames in os.walk(root):
            rel_dir = os.path.relpath(dirpath, root)
            for name in filenames:
                relpath = name if rel_dir == "." else f"{rel_dir}/{name}"
                try:
                    size = os.lstat(os.path.join(dirpath, name)).st_size
                except OSError:
                    continue
                walked.total += size
                owner = consumer_of(relpath)
                if owner is None:
                    continue
                walked.usage[owner] = walked.usage.get(owner, 0) + size
                match = parse_archive_name(name)
                if relpath.startswith(ARCHIVE + "/") and match and match["gz"] and not match["tmp"]:
                    walked.archives.setdefault(owner, []).append((relpath, size))
        for archives in walked.archives.values():
            archives.sort(key=lambda item: item[0].rsplit("/", 1)[1].split(".")[1:])  # by stamp: oldest first
        return walked

    def _changed(self, owner: str, n: int) -> None:
        """`owner` holds `n` bytes more (the lock is held)."""
        self._since[owner] += n
        self._since_total += n

    def grew(self, sizes: dict[str, int]) -> None:
        """A batch appended these bytes (relpath -> bytes)."""
        with self._lock:
            for relpath, n in sizes.items():
                self._changed(consumer_of(relpath) or "", n)

    def archived(self, archive: str, gz_size: int) -> None:
        """An archive is about to be switched to its .gz of `gz_size` bytes (or, at -1, removed): it holds less."""
        try:
            size = os.stat(self.root / archive, follow_symlinks=False).st_size
        except OSError:
            return
        with self._lock:
            self._changed(consumer_of(archive) or "", max(0, gz_size) - size)

    def removed(self, relpath: str, size: int) -> None:
        owner = consumer_of(relpath) or ""
        with self._lock:
            self._changed(owner, -size)
            archives = self._walked.archives.get(owner, [])
            self._walked.archives[owner] = [item for item in archives if item[0] != relpath]

    def held(self, owner: str) -> int:
        """The bytes `owner` holds, as of the last walk plus what changed since."""
        with self._lock:
            return self._walked.usage.get(owner, 0) + self._since.get(owner, 0)

    def usage(self) -> dict[str, int]:
        """Each consumer's bytes (a copy: read only when a budget is passed, it costs a look at every user)."""
        with self._lock:
            usage = dict(self._walked.usage)
            for owner, n in self._since.items():
                if owner:
                    usage[owner] = usage.get(owner, 0) + n
            return usage

    def plan(self, need: dict[str, int], notes_bytes: int) -> Plan:
        """What a batch that appends `need` (consumer -> bytes) plus `notes_bytes` of notes may do."""
        fs = os.fstatvfs(self.root_fd)
        free = fs.f_bavail * fs.f_frsize
        total = self._walked.total + self._since_total
        wanted = sum(need.values())
        plan = Plan()
        if self.quota:
            for owner, n in need.items():
                held = self.held(owner)
                if owner != SYSTEM and held + n > self.quota:
                    freed = self._free_from(owner, held + n - self.quota, 0, plan)
                    if held - freed + n > self.quota:
                        plan.drop[owner] = QUOTA
        over_tree = bool(self.max_use) and self._known and total + wanted > self.max_use
        over_free = free - wanted < self.keep_free
        if (over_tree or over_free) and not self.pressure:
            self._wake.set()  # walk again soon: the archives to remove are chosen from the walk
        self.pressure = over_tree or over_free
        if self.pressure:
            usage = self.usage()
            # A fair share of APILOG_MAX_USE; with none, of what the tree may take, or of what it holds when the
            # disk was filled from outside (the largest consumers first, never everyone).
            budget = self.max_use or max(total + free - self.keep_free, total)
            share = max(1, budget // max(1, len([n for n in usage.values() if n > 0])))
            deficit = max(total + wanted - (self.max_use or total + wanted), self.keep_free - (free - wanted))
            for owner in sorted(usage, key=usage.__getitem__, reverse=True):  # the largest consumer first
                if deficit <= 0 or usage[owner] <= share:
                    break
                freed = self._free_from(owner, min(deficit, usage[owner] - share), share, plan)
                usage[owner] -= freed
                deficit -= freed
            if deficit > 0:  # every archive over a fair share is gone: over-share consumers' entries wait no more
                for owner, n in need.items():
                    if usage.get(owner, 0) + n > share:
                        plan.drop.setdefault(owner, LOG_SPACE)
        freed = sum(size for _, size in plan.remove)
        kept = sum(n for owner, n in need.items() if owner not in plan.drop)
        floor = max(0, self.keep_free - min(self.keep_free // 2, DIP)) if kept else NOTES_RESERVE
        if (kept or notes_bytes) and free + freed - kept - notes_bytes < floor:
            plan.full = LogDiskFull(free + freed, self.keep_free)
        self.full = plan.full is not None
        return plan

    def _free_from(self, owner: str, wanted: int, keep: int, plan: Plan) -> int:
        """Choose `owner`'s oldest archives to remove, about `wanted` bytes, never below `keep` bytes held; return the bytes."""
        freed = 0
        with self._lock:
            archives = list(self._walked.archives.get(owner, []))
        held = self.held(owner)
        chosen = {relpath for relpath, _ in plan.remove}
        for relpath, size in archives:
            if freed >= wanted or held - freed <= keep:
                break
            if relpath not in chosen:
                plan.remove.append((relpath, size))
                freed += size
        return freed

    def report(self) -> dict[str, object]:
        """The disk part of `apilogd status --json`'s `limits`."""
        fs = os.fstatvfs(self.root_fd)
        usage, total = self.usage(), self._walked.total + self._since_total
        return {"log_disk_full": self.full, "tree_bytes": total if self._known else None,
                "free_bytes": fs.f_bavail * fs.f_frsize, "max_use_bytes": self.max_use,
                "keep_free_bytes": self.keep_free, "user_quota_bytes": self.quota,
                "largest": [{"user": location_of(owner), "bytes": n}
                            for owner, n in sorted(usage.items(), key=lambda item: -item[1])[:5]]}
