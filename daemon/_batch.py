"""The exactly-once core shared by every source: route a batch, append it journaled, commit, then let the source ack."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

from apilog._atomic import write_atomic
from apilog._entry import Entry, internal
from apilog._route import route
from apilog._streams import Registry
from apilog._tree import LogTree, TreeError
from apilog.settings import Settings
from apilog.spool.ledger import Ledger

from ._files import OpenFiles

NEW_FOLDERS_PER_MINUTE = 1000  # more new user folders than this in a minute is reported as a burst


class BatchWriter:
    """Writes batches of entries into their files, exactly once; a subclass says where batches come from.

    Before appending, the ledger records every target file's size (and what the source
    will have consumed); after the appends it commits. A crash in between is undone at
    the next start by cutting the files back, and the source hands the batch out again.
    """

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.durable = settings.fsync != "off"
        self.ledger = Ledger(settings.state_dir, durable=self.durable)
        self.tree = LogTree(settings.log_dir)
        self.files = OpenFiles(self.tree, durable=self.durable)
        self.registry = Registry(settings.home)
        self.notes: list[Entry] = []  # INTERNAL entries waiting for the next batch
        self.created: dict[str, float] = {}  # files the last batch created -> their first entry's time
        self._burst_window = (time.monotonic(), 0)  # (minute began, folders created before it)

    # What a source provides.

    source = "nothing"  # what the daemon drains, said at start-up

    def take(self) -> list[Any]:
        """The next batch of raw items (empty when there is nothing to do)."""
        raise NotImplementedError

    def entry(self, item: Any) -> Entry:
        """The entry an item carries, or an INTERNAL report after quarantining it."""
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
        self.files.close()
        self.tree.close()

    # The core.

    def recover(self) -> None:
        """Undo a batch a crash left half written: cut its files back, keep its items at the source."""
        pending = self.ledger.pending
        if pending is None:
            return
        for relpath, size in pending["files"].items():
            self.files.truncate(relpath, size)
        self.ledger.abort()
        self.rewind()
        print(f"apilogd: undid an unfinished batch over {len(pending['files'])} files", file=sys.stderr, flush=True)

    def step(self) -> int:
        """Write one batch; return how many items it committed (0 when there was nothing)."""
        self.recover()
        self.created = {}
        batch = self.take()
        if not batch and not self.notes:
            self.idle()
            return 0
        try:
            lines, firsts = self._lines([self.entry(item) for item in batch] + self.notes)
            sizes = self._sizes(lines)
            consumed = self.consumed(batch)
            self.ledger.begin(sizes, consumed)
            for relpath, texts in lines.items():
                self.files.append(relpath, "".join(texts).encode("utf-8"))
            if self.durable:
                self.files.sync(list(lines))
            self.ledger.commit(self.ids(batch))
        except BaseException:
            self.rewind(batch)  # written again after recover()
            raise
        self.notes.clear()
        self.created = {r: firsts.get(r, time.time()) for r, size in sizes.items() if size == 0}
        self.committed(batch, consumed)
        self._watch_for_bursts()
        return len(batch)

    def quarantine(self, path: Path, raw: bytes, what: str, why: str, **where: object) -> Entry:
        """Keep bad input aside in `path` and return the INTERNAL entry that reports it."""
        write_atomic(path, raw, mode=0o640, durable=self.durable)
        return internal(f"quarantined {what}: {why}",
                        {**where, "bytes": len(raw), "reason": why, "moved_to": str(path)})

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

    def _lines(self, entries: list[Entry]) -> tuple[dict[str, list[str]], dict[str, float]]:
        """Rendered lines by target file, and each target's first event time in this batch."""
        lines: dict[str, list[str]] = {}
        firsts: dict[str, float] = {}
        known = frozenset(self.registry.names())  # one look at the registry per batch
        for entry in entries:
            for relpath, text in route(entry, known, self.settings):
                if relpath not in lines:
                    lines[relpath], firsts[relpath] = [], entry.ts
                lines[relpath].append(text)
        return lines, firsts

    def _sizes(self, lines: dict[str, list[str]]) -> dict[str, int]:
        """Each target's size before the batch; a target that cannot be opened safely goes to INTERNAL."""
        sizes: dict[str, int] = {}
        for relpath in list(lines):
            try:
                sizes[relpath] = self.files.size(relpath)
            except TreeError as exc:
                texts = lines.pop(relpath)
                note = internal(f"cannot write {relpath}: {exc.strerror}", {"file": relpath, "entries": "".join(texts)})
                for target, text in route(note, self.registry.names(), self.settings):
                    lines.setdefault(target, []).append(text)
                    sizes.setdefault(target, self.files.size(target))
        return sizes
