"""Rotation and compression: live files past their size or age move into archive/ and are gzipped aside.

Rotation happens in the drain loop between batches (so no batch is ever split between
two files) and is one rename, journaled and sealed like a batch by the writer. Compression
runs in its own thread: gzip to `.gz.tmp`, fsync; the writer's next batch seals the .gz and
switches the archive to it in two renames, each leaving every entry under exactly one name
(`BatchWriter._switch`), and removes archives past APILOG_RETAIN_DAYS. A crash leaves a plain
archive, perhaps with a `.tmp` (removed, and compressed again), or one halfway through its switch
(finished by the journal's redo, or by the sweep).
"""

from __future__ import annotations

import contextlib
import gzip
import io
import os
import queue
import shutil
import stat
import threading
import time
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Protocol

from apilog.core import fs, seal
from apilog.core.logfile import ARCHIVE, SYSTEM, USERS, archive_name, first_time, parse_archive_name
from apilog.core.tree import LogTree, is_gzip
from apilog.settings import Settings

from .watch import ChangeWatcher


class ArchiveWriter(Protocol):
    """What the archiver asks of the writer (commit.batch.BatchWriter): it journals and seals every change to archive/."""

    tree: LogTree
    created: dict[str, float]  # files the last batch created -> when
    sizes: dict[str, int]  # files the last batch appended to -> their size after it
    oversized: set[str]  # files that cannot grow any more (EFBIG): to be rotated, whatever their size
    switched: list[str]  # archives switched to their .gz since the archiver last looked

    def rotate(self, relpath: str, archive: str) -> None:
        """Move a live file into archive/ (one journaled, sealed rename); OSError when it cannot be moved."""

    def compressed(self, archive: str, gz_size: int, gz_digest: str) -> None:
        """(Any thread) `archive` has its .gz.tmp, durable: the next batch seals it and switches the archive to it."""

    def retire(self, archive: str) -> None:
        """(Any thread) `archive` is past APILOG_RETAIN_DAYS: the next batch seals its removal and removes it."""

AGE_CHECK_EVERY = 1.0  # seconds between looks at live files' ages
ROTATIONS_PER_TICK = 16
SWEEP_EVERY = 30.0  # seconds between walks of the whole tree (the backstop of the events)
FIRST_SWEEP_AFTER = 5.0  # seconds after start


class Archiver:
    """Decides which live files are due, rotates them, and compresses archives off the write path."""

    def __init__(self, settings: Settings, writer: ArchiveWriter) -> None:
        self.settings = settings
        self.tree: LogTree = writer.tree
        self.writer = writer  # journals (and seals) each rotation, compression and removal
        self.root = settings.log_dir
        self.first_entry: dict[str, float] = {}  # live file -> event time of its first entry
        self.notes: list[tuple[str, dict[str, object]]] = []  # INTERNAL reports for the drainer
        # Files others create or move; the daemon's own appends are counted as it writes them (`grew`),
        # not watched: an inotify event per file per batch costs more than the batch with thousands of users.
        self.watcher = ChangeWatcher(self.root, settings.log_suffix)
        if self.watcher.fallback_reason:
            self.notes.append(("archiver falls back to polling", {"reason": self.watcher.fallback_reason}))
        self._jobs: queue.SimpleQueue[str | None] = queue.SimpleQueue()
        self._queued: set[str] = set()  # plain archives waiting for or under compression
        self._due: set[str] = set()  # live files found due, not yet rotated
        self._swept: set[str] = set()  # found due by the sweeper thread, taken by tick()
        # Files whose rotation failed, with the error: reported once, and retried by the sweep
        # (every SWEEP_EVERY) rather than at every batch that makes them grow.
        self.failing: dict[str, str] = {}
        self._lock = threading.Lock()  # guards _swept and _queued, shared with the two threads
        self._closing = threading.Event()
        self._abandon = False  # closing without waiting: the queued compressions are left for the next start
        self._compressor = threading.Thread(target=self._compress_loop, name="apilog-gzip", daemon=True)
        self._compressor.start()
        # Walking the tree (a stat per file, each file's first entry read once) takes a while with
        # thousands of users: done in its own thread, it never holds up a batch.
        self._sweeper = threading.Thread(target=self._sweep_loop, name="apilog-sweep", daemon=True)
        self._sweeper.start()
        self._last_age_check = 0.0
        self.after_batch()  # what the writer's start-up redo grew

    def close(self, *, wait: bool = False) -> None:
        """Stop watching and compressing: the compression in hand is finished and handed to the writer (`wait`: every
        queued one); the rest are left for the next start. A second call does nothing."""
        if self._closing.is_set():
            return
        self._abandon = not wait
        self.watcher.stop()
        self._closing.set()
        self._jobs.put(None)
        # Within systemd's stop timeout; an unfinished job is redone at the next start.
        self._compressor.join(timeout=None if wait else 5)
        self._sweeper.join(timeout=5)

    def after_batch(self) -> None:
        """Learn from the writer's last batch: when the files it created had their first entry, which passed
        APILOG_ROTATE_BYTES, and which cannot grow any more (EFBIG: rotated whatever their size)."""
        writer = self.writer
        for relpath, ts in writer.created.items():
            self.first_entry.setdefault(relpath, ts)
        limit = self.settings.rotate_bytes
        self._due.update(relpath for relpath, size in writer.sizes.items() if size > limit)
        self._due.update(writer.oversized)
        writer.oversized.clear()

    def tick(self, *, now: float | None = None) -> int:
        """Rotate what is due, a few files per call; return how many were rotated. Call only between batches."""
        now = time.time() if now is None else now
        due = self._due
        for relpath in self.watcher.take():
            if relpath not in self.failing and self._too_big(relpath):
                due.add(relpath)
        if self.settings.rotate_age and now - self._last_age_check >= AGE_CHECK_EVERY:
            self._last_age_check = now
            due.update(r for r in self.first_entry if self._too_old(r, now))
        with self._lock:
            due.update(self._swept)
            self._swept.clear()
            self._queued.difference_update(self.writer.switched)  # out of hand once switched
        self.writer.switched.clear()
        # Each rotation costs a few fsyncs: a bounded share per tick keeps the loop (and SIGTERM) responsive.
        chosen = sorted(due)[:ROTATIONS_PER_TICK]
        due.difference_update(chosen)
        return self._rotate_each(chosen, now)[0]

    def _sweep_loop(self) -> None:
        wait = FIRST_SWEEP_AFTER  # a start-up backlog drains first
        while not self._closing.wait(wait):
            wait = SWEEP_EVERY
            try:
                found = self.sweep(time.time())
            except Exception as exc:  # noqa: BLE001 - the next sweep tries again; rotation by size goes on
                self.notes.append(("archive sweep failed, will retry", {"error": f"{type(exc).__name__}: {exc}"}))
                continue
            with self._lock:
                self._swept.update(found)

    def sweep(self, now: float) -> set[str]:
        """Walk the tree: learn files and ages, find what is due, resume compression, apply retention."""
        due = set()
        files, folders = self._live_files()
        for relpath in files:
            if relpath not in self.first_entry:
                first = self._first_entry_time(relpath)
                if first is not None:
                    self.first_entry[relpath] = first
            if self._too_old(relpath, now) or self._too_big(relpath):
                due.add(relpath)
        reason = self.watcher.check(folders + 1)  # + the root
        if reason:
            self.notes.append(("archiver falls back to polling", {"reason": reason}))
        self._archives(now)
        return due

    def rotate_all(self, now: float | None = None) -> tuple[int, list[str]]:
        """Rotate every live file that has anything in it (`apilog archive`): how many were, and what failed."""
        now = time.time() if now is None else now
        return self._rotate_each([r for r in self._live_files()[0] if self._size(r)], now)

    def _rotate_each(self, relpaths: Iterable[str], now: float) -> tuple[int, list[str]]:
        """Rotate each file in turn; one that cannot be rotated stays live and is reported, and the rest go on."""
        rotated, failed = 0, []
        for relpath in sorted(relpaths):
            try:
                rotated += self.rotate(relpath, now) is not None
            except OSError as exc:
                error = exc.strerror or str(exc)
                failed.append(f"{relpath}: {error}")
                if self.failing.get(relpath) != error:
                    self.notes.append(("rotation failed, will retry", {"file": relpath, "error": error}))
                self.failing[relpath] = error
            else:
                if self.failing.pop(relpath, None) is not None:
                    self.notes.append(("rotation works again", {"file": relpath}))
        return rotated, failed

    def rotate(self, relpath: str, now: float) -> str | None:
        """Move one live file into archive/ under a name never used before; queue its compression."""
        if not self._size(relpath):
            self.first_entry.pop(relpath, None)
            return None
        stamp = datetime.fromtimestamp(now, UTC).strftime("%Y%m%dT%H%M%SZ")
        folder, _, name = relpath.rpartition("/")
        counter = 0
        while True:
            target = f"{ARCHIVE}/{folder}/{archive_name(name, stamp, counter)}"
            if not self.tree.exists(target) and not self.tree.exists(target + ".gz"):
                break
            counter += 1
        self.writer.rotate(relpath, target)
        self.first_entry.pop(relpath, None)
        self._enqueue(target)
        return target

    def _enqueue(self, relpath: str) -> None:
        with self._lock:  # the sweeper resumes compressions too
            if relpath in self._queued:
                return
            self._queued.add(relpath)
            self._jobs.put(relpath)

    def _live_files(self) -> tuple[list[str], int]:
        """Live files below system/ and users/, and how many folders hold them (inotify watches each)."""
        out: list[str] = []
        folders = 0
        for top in (SYSTEM, USERS):
            for dirpath, _dirs, filenames in os.walk(self.root / top):
                folders += 1
                out.extend(os.path.relpath(os.path.join(dirpath, n), self.root)
                           for n in filenames if n.endswith(self.settings.log_suffix))
        return out, folders

    def _size(self, relpath: str) -> int:
        try:
            st = os.stat(self.root / relpath, follow_symlinks=False)
        except FileNotFoundError:
            return 0
        return st.st_size if stat.S_ISREG(st.st_mode) else 0

    def _too_old(self, relpath: str, now: float) -> bool:
        """Its first entry is older than APILOG_ROTATE_AGE (a file of unknown age is not)."""
        age = self.settings.rotate_age
        return bool(age) and self.first_entry.get(relpath, now) <= now - age

    def _too_big(self, relpath: str) -> bool:
        return self._size(relpath) > self.settings.rotate_bytes

    def _first_entry_time(self, relpath: str) -> float | None:
        """The first entry's stamp, read from the file; its mtime when entries carry none."""
        try:
            with self.tree.reader(relpath) as handle:  # never through a planted link
                head = handle.read(1 << 16)
                mtime = os.fstat(handle.fileno()).st_mtime
        except OSError:
            return None
        found = first_time(head, self.settings.format, self.settings.tz)
        return mtime if found is None else found

    def _archives(self, now: float) -> None:
        """Finish what a crash interrupted, and delete archives past APILOG_RETAIN_DAYS."""
        keep_after = now - self.settings.retain_days * 86400
        for dirpath, _dirs, filenames in os.walk(self.root / ARCHIVE):
            for name in filenames:
                match = parse_archive_name(name)
                relpath = os.path.relpath(os.path.join(dirpath, name), self.root)
                if match is None:
                    continue
                plain = relpath.removesuffix(".gz.tmp")
                with self._lock:
                    in_hand = plain in self._queued
                if match["tmp"] and not in_hand:
                    self.tree.unlink(relpath)  # a compression cut short, or its switch: its plain copy holds the entries
                elif not match["gz"]:  # plain, or halfway through its switch
                    self._enqueue(relpath)
                elif self.settings.retain_days:
                    with contextlib.suppress(FileNotFoundError):
                        if os.stat(os.path.join(dirpath, name), follow_symlinks=False).st_mtime < keep_after:
                            self.writer.retire(relpath)

    def _compress_loop(self) -> None:
        while True:
            relpath = self._jobs.get()
            if relpath is None or (self._closing.is_set() and self._abandon):
                return
            handed = False
            try:
                handed = self.compress(relpath)
            except OSError as exc:
                self.notes.append(("archive compression failed; will retry at the next sweep",
                                   {"file": relpath, "error": str(exc)}))
            if not handed:  # else in hand until the writer has switched it (`tick`)
                with self._lock:
                    self._queued.discard(relpath)

    def compress(self, relpath: str) -> bool:
        """gzip a plain archive to its `.gz.tmp`, durably, and hand it to the writer, which seals it and switches the
        archive to it; False when there was nothing to hand over (switched since it was queued)."""
        try:
            plain = self.tree.reader(relpath)
        except FileNotFoundError:
            return False
        with plain:
            if is_gzip(plain):  # halfway through its switch (its second rename failed): only that rename is left
                self.writer.compressed(relpath, os.fstat(plain.fileno()).st_size, seal.file_digest(plain))
                return True
            # A .gz beside its plain copy is an older apilogd's (it kept both until the next batch): made again.
            self.tree.unlink(relpath + ".gz")
            tmp = relpath + ".gz.tmp"
            self.tree.unlink(tmp)
            dst = self.tree.open_append(tmp)
            try:
                # The .gz is digested as it is written: what gets sealed is what we wrote, not what the path holds later.
                with (_Digesting(dst) as out,
                      gzip.GzipFile(filename=os.path.basename(relpath), mode="wb", fileobj=out, mtime=0) as packed):
                    shutil.copyfileobj(plain, packed, 1 << 20)
                fs.fsync(dst)
            finally:
                os.close(dst)
        self.tree.fsync_dir(relpath.rpartition("/")[0])  # the .gz.tmp is found by a redo of the record that names it
        self.writer.compressed(relpath, out.size, out.hashed.hexdigest())
        return True


class _Digesting(io.RawIOBase):
    """A write-only file over a descriptor (written through core.fs) that keeps the size and BLAKE2b of its bytes."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.hashed = seal.new_digest()
        self.size = 0

    def writable(self) -> bool:
        return True

    def write(self, data: bytes | bytearray | memoryview) -> int:  # type: ignore[override]
        view = memoryview(data).cast("B")
        self.hashed.update(view)
        self.size += view.nbytes
        written = view.nbytes
        while view:
            view = view[fs.write(self.fd, view):]
        return written
