"""The exactly-once core shared by every source: route a batch, append it journaled, commit, then let the source ack.

Every unit fails alone (SPEC D7): an item that cannot be read or rendered is set aside by
its source and reported; a target file that cannot be opened sends its entries to
INTERNAL while the rest of the batch commits; an item that crashes the daemon is found by
the probe and set aside after its second crash. Only faults of the whole log disk (full,
read-only, failing) stop a batch, which is then undone and tried again.
"""

from __future__ import annotations

import errno
import resource
import sys
import time
from typing import Any

from apilog._entry import Entry, internal
from apilog._route import route
from apilog._streams import INTERNAL, Registry
from apilog._tree import SYSTEM, LogTree, relative_path
from apilog.settings import Settings
from apilog.spool.ledger import Ledger

from ._files import MAX_OPEN, OpenFiles
from ._folders import Folders
from ._probe import Probe

NEW_FOLDERS_PER_MINUTE = 1000  # more new user folders than this in a minute is reported as a burst
# Errors that say the log disk as a whole cannot take the batch: undo it and retry, never divert entries.
DISK_ERRORS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EIO, errno.EMFILE, errno.ENFILE, errno.ENOMEM})


def descriptor_share() -> int:
    """How many descriptors log files (and, as much again, spool segments) may hold: a quarter of the limit each.

    The rest is for folders, the ledger, watchdog's inotify and the broker: a low `ulimit -n`
    then costs reopening files, never a stall on EMFILE.
    """
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    return max(8, min(MAX_OPEN, (soft if soft != resource.RLIM_INFINITY else 4 * MAX_OPEN) // 4))


def say(text: str) -> None:
    print(f"apilogd: {text}", file=sys.stderr, flush=True)


def describe(exc: BaseException) -> str:
    """An error in a few words, for a report."""
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    if isinstance(exc, ValueError) and not isinstance(exc, UnicodeError):
        return str(exc)[:300]  # the reader's own words about bad input
    return f"{type(exc).__name__}: {str(exc)[:300]}"


class BatchWriter:
    """Writes batches of entries into their files, exactly once; a subclass says where batches come from.

    Before appending, the ledger records every target file's size (and what the source
    will have consumed); after the appends it commits. A crash in between is undone at
    the next start by cutting the files back, and the source hands the batch out again.
    """

    max_items = 16384

    def __init__(self, settings: Settings, folders: Folders) -> None:
        self.settings = settings
        self.folders = folders
        self.durable = settings.fsync != "off"
        self.ledger = Ledger(folders.state, durable=self.durable)
        self.tree = LogTree(settings.log_dir)
        self.files = OpenFiles(self.tree, durable=self.durable, limit=descriptor_share())
        self.registry = Registry(settings.home)
        self.internal_path = relative_path(INTERNAL, SYSTEM, settings.log_suffix)
        self.probe = Probe(folders.state)
        self.notes: list[Entry] = []  # INTERNAL entries waiting for the next batch
        self.created: dict[str, float] = {}  # files the last batch created -> when (the daemon's clock)
        self.one_at_a_time = 0  # items still to take singly, after a batch failed for no reason of the disk
        self.oversized: set[str] = set()  # files that met EFBIG, for the archiver to rotate
        self._burst_window = (time.monotonic(), 0)  # (minute began, folders created before it)

    # What a source provides.

    source = "nothing"  # what the daemon drains, said at start-up

    def take(self, limit: int) -> list[Any]:
        """The next batch of at most `limit` raw items (empty when there is nothing to do)."""
        raise NotImplementedError

    def key(self, item: Any) -> str:
        """A name for the item that stays the same when it is handed out again (for the crash probe)."""
        raise NotImplementedError

    def entry(self, item: Any) -> Entry:
        """The entry an item carries; any exception means the item is bad."""
        raise NotImplementedError

    def set_aside(self, item: Any, why: str) -> Entry:
        """Quarantine a bad item; return the INTERNAL entry that reports it."""
        raise NotImplementedError

    def consumed(self, batch: list[Any]) -> dict[str, int]:
        """What the ledger records as consumed once the batch is committed."""
        return {}

    def ids(self, batch: list[Any]) -> list[str] | None:
        """Ids the ledger commits with the batch, for a source that may deliver an item twice."""
        return None

    def committed(self, batch: list[Any], consumed: dict[str, int]) -> None:
        """The batch is in its files: acknowledge it at the source."""

    def rewind(self, batch: list[Any] | None = None) -> None:
        """A batch (or, after a crash, whatever was in flight) was not committed: hand it out again."""

    def idle(self) -> None:
        """Nothing to write this time round."""

    def scan(self) -> None:
        """Look for new input (cheap; called often while idle)."""

    def sweep(self) -> None:
        """Tidy up the source (called at start and once a minute)."""

    def waiting_bytes(self) -> int | None:
        """How much waits at the source, when the source can tell."""
        return None

    def close(self) -> None:
        """Release files and folders; a disk that fails now is reported, never raised (we are stopping)."""
        try:
            self.files.close()
        except OSError as exc:
            say(f"closing the log files failed ({describe(exc)}); the journal redoes any unsynced batch at the next start")
        self.tree.close()
        self.probe.close()

    # The core.

    def recover(self) -> None:
        """Undo a batch a crash left half written: cut its files back, keep its items at the source."""
        pending = self.ledger.pending
        if pending is None:
            return
        for relpath, size in pending["files"].items():
            try:
                self.files.truncate(relpath, size)
            except OSError as exc:
                if exc.errno in DISK_ERRORS:
                    raise
                # No longer a file we may open (swapped for a folder or a link): nothing of ours to cut.
                say(f"could not cut {relpath} back to {size} bytes: {describe(exc)}")
        self.ledger.abort()
        self.rewind()
        say(f"undid an unfinished batch over {len(pending['files'])} files")

    def step(self, *, only_notes: bool = False) -> int:
        """Write one batch (or, `only_notes`, just the INTERNAL notes waiting); return how many items it committed."""
        self.recover()
        self.created = {}
        batch = [] if only_notes else self.take(1 if self.one_at_a_time else self.max_items)
        if not batch and not self.notes:
            self.idle()
            return 0
        try:
            lines = self._lines(batch)
            sizes = self._sizes(lines)
            consumed = self.consumed(batch)
            self.ledger.begin(sizes, consumed)
            self._append(lines, sizes)
            if self.durable:
                self.files.sync(list(lines))
            self.ledger.commit(self.ids(batch))
        except BaseException as exc:
            self.rewind(batch)  # written again after recover()
            if not isinstance(exc, OSError) and isinstance(exc, Exception):
                self._blame(batch)
            raise
        self.notes.clear()
        now = time.time()  # the daemon's clock judges a file's age, never a producer's
        self.created = {r: now for r, size in sizes.items() if size == 0}
        if self.probe.armed:
            self.probe.committed({self.key(item) for item in batch})
        self.one_at_a_time = max(0, self.one_at_a_time - len(batch))
        self.committed(batch, consumed)
        self._watch_for_bursts()
        return len(batch)

    def _append(self, lines: dict[str, list[str]], sizes: dict[str, int]) -> None:
        """Append each file's lines, INTERNAL last; a file past its largest size (EFBIG) sends them to INTERNAL."""
        internal_path = self.internal_path
        for relpath in [r for r in lines if r != internal_path]:
            data = "".join(lines[relpath]).encode("utf-8")
            try:
                self.files.append(relpath, data)
            except OSError as exc:
                if exc.errno != errno.EFBIG or internal_path not in sizes:
                    raise
                # This file is full (RLIMIT_FSIZE, or the file system's largest file): it is rotated
                # soon; its entries go to INTERNAL now rather than hold up everyone else's.
                self.files.truncate(relpath, sizes[relpath])
                self.oversized.add(relpath)
                self._divert(lines, relpath, data.decode("utf-8"), exc, "; it will be rotated")
        if internal_path in sizes:
            self.files.append(internal_path, "".join(lines[internal_path]).encode("utf-8"))

    def _divert(self, lines: dict[str, list[str]], relpath: str, entries: str, exc: OSError, then: str = "") -> None:
        """Report a file that cannot be written, its entries' text included, in this batch's INTERNAL lines."""
        note = internal(f"cannot write {relpath}: {describe(exc)}{then}",
                        {"file": relpath, "error": describe(exc), "entries": entries})
        lines.setdefault(self.internal_path, []).extend(text for _, text in route(note, (INTERNAL,), self.settings))

    def _blame(self, batch: list[Any]) -> None:
        """A batch failed for no reason of the disk: take its items one at a time until the culprit is found."""
        if len(batch) == 1:
            self.probe.failed(self.key(batch[0]))  # set aside at its second failure
        self.one_at_a_time = max(self.one_at_a_time, len(batch))

    def _lines(self, batch: list[Any]) -> dict[str, list[str]]:
        """Rendered lines by target file; an item that cannot be read or rendered is set aside, alone."""
        lines: dict[str, list[str]] = {}
        known = frozenset(self.registry.names())  # one look at the registry per batch
        probing = self.probe.armed  # only after a crash or a failed batch: a write per item
        for item in batch:
            routed = None
            if probing:
                key = self.key(item)
                self.probe.before(key)
                if self.probe.poisoned(key):
                    why = f"it crashed apilogd {self.probe.crashes(key)} times; set aside without being read again"
                    routed = route(self.set_aside(item, why), known, self.settings)
            if routed is None:
                try:
                    routed = route(self.entry(item), known, self.settings)
                except Exception as exc:  # any failure of one item is that item's alone
                    routed = route(self.set_aside(item, describe(exc)), known, self.settings)
            for relpath, text in routed:
                lines.setdefault(relpath, []).append(text)
        self.probe.between()
        for note in self.notes:
            for relpath, text in route(note, known, self.settings):
                lines.setdefault(relpath, []).append(text)
        return lines

    def _sizes(self, lines: dict[str, list[str]]) -> dict[str, int]:
        """Each target's size before the batch; a target that cannot be opened sends its entries to INTERNAL.

        When INTERNAL itself cannot be opened, what it would have received goes to stderr (the
        service manager's journal): one broken file never holds up everyone's entries.
        """
        internal_path = self.internal_path
        sizes: dict[str, int] = {}
        for relpath in [r for r in lines if r != internal_path]:
            try:
                sizes[relpath] = self.files.size(relpath)
            except OSError as exc:
                if exc.errno in DISK_ERRORS:
                    raise  # the disk, not this file: the batch waits in the source
                self._divert(lines, relpath, "".join(lines.pop(relpath)), exc)
        lines.setdefault(internal_path, [])  # journaled always: appends may divert entries to it
        try:
            sizes[internal_path] = self.files.size(internal_path)
        except OSError as exc:
            if exc.errno in DISK_ERRORS:
                raise
            texts = "".join(lines.pop(internal_path)).rstrip("\n")
            say(f"cannot write {internal_path}: {describe(exc)}; what it would have received follows\n{texts}")
        return sizes

    def _watch_for_bursts(self) -> None:
        """Report (never refuse) a flood of new user folders: every entry is still written."""
        began, before = self._burst_window
        now = time.monotonic()
        created = self.tree.folders_created - before
        if created > NEW_FOLDERS_PER_MINUTE:
            self.notes.append(internal("burst of new user folders",
                                       {"created": created, "seconds": round(now - began, 1),
                                        "limit_per_minute": NEW_FOLDERS_PER_MINUTE}))
            self._burst_window = (now, self.tree.folders_created)
        elif now - began >= 60:
            self._burst_window = (now, self.tree.folders_created)
