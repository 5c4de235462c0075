"""One batch at a time: read spool records, route them, append them journaled, then commit the offsets."""

from __future__ import annotations

import sys
import time

from apilog import _message, spool
from apilog._atomic import write_atomic
from apilog._entry import Entry, internal
from apilog._route import route
from apilog._streams import Registry
from apilog._tree import LogTree, TreeError
from apilog.settings import Settings
from apilog.spool.ledger import Ledger
from apilog.spool.reader import Record, SpoolReader

from ._files import OpenFiles

NEW_FOLDERS_PER_MINUTE = 1000  # more new user folders than this in a minute is reported as a burst
MAX_RECORDS = 16384
MAX_BYTES = 16 * 1024 * 1024


class Drainer:
    """Moves records from the spool into their files, exactly once."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.durable = settings.fsync != "off"
        spool.ensure(settings.spool_dir)
        self.ledger = Ledger(settings.state_dir, durable=self.durable)
        self.tree = LogTree(settings.log_dir)
        self.files = OpenFiles(self.tree, durable=self.durable)
        self.reader = SpoolReader(settings.spool_dir, self.ledger.offsets)
        self.registry = Registry(settings.home)
        self.notes: list[Entry] = []  # INTERNAL entries waiting for the next batch
        self.created: dict[str, float] = {}  # files the last batch created -> their first entry's time
        self._burst_window = (time.monotonic(), 0)  # (minute began, folders created before it)

    def close(self) -> None:
        self.reader.close()
        self.files.close()
        self.tree.close()

    def recover(self) -> None:
        """Undo a batch a crash left half written: cut its files back, keep its records in the spool."""
        pending = self.ledger.pending
        if pending is None:
            return
        for relpath, size in pending["files"].items():
            self.files.truncate(relpath, size)
        self.ledger.abort()
        print(f"apilogd: undid an unfinished batch over {len(pending['files'])} files", file=sys.stderr, flush=True)
        self.reader.rewind(self.ledger.offsets)

    def sweep(self) -> None:
        """Tidy the spool's `tmp/`, reporting anything that had to be quarantined."""
        for path in self.reader.sweep_tmp():
            self.notes.append(internal("quarantined a file left in the spool's tmp folder",
                                       {"moved_to": str(path), "bytes": path.stat().st_size}))

    def step(self) -> int:
        """Drain one batch; return how many records it committed (0 when the spool is empty)."""
        self.recover()
        self.created = {}
        records = self.reader.read(MAX_RECORDS, MAX_BYTES)
        if not records and not self.notes:
            self._remove_drained()
            return 0
        lines, firsts = self._lines(records)
        sizes = self._sizes(lines)
        advance: dict[str, int] = {}
        for record in records:
            advance[record.segment] = record.end
        try:
            self.ledger.begin(sizes, advance)
            for relpath, texts in lines.items():
                self.files.append(relpath, "".join(texts).encode("utf-8"))
            if self.durable:
                self.files.sync(list(lines))
            self.ledger.commit()
        except BaseException:
            self.reader.rewind(self.ledger.offsets)  # read the batch again after recover()
            raise
        self.notes.clear()
        self.created = {r: firsts.get(r, time.time()) for r, size in sizes.items() if size == 0}
        self.reader.commit(advance)
        self._watch_for_bursts()
        self._remove_drained()
        return len(records)

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

    def _lines(self, records: list[Record]) -> tuple[dict[str, list[str]], dict[str, float]]:
        """Rendered lines by target file, and each target's first event time in this batch."""
        lines: dict[str, list[str]] = {}
        firsts: dict[str, float] = {}
        known = frozenset(self.registry.names())  # one look at the registry per batch
        for entry in [self._entry(record) for record in records] + self.notes:
            for relpath, text in route(entry, known, self.settings):
                if relpath not in lines:
                    lines[relpath], firsts[relpath] = [], entry.ts
                lines[relpath].append(text)
        return lines, firsts

    def _entry(self, record: Record) -> Entry:
        if record.damaged is None:
            try:
                return Entry.from_wire(_message.decode(record.payload))
            except ValueError as exc:  # BadMessage included
                why = str(exc)
        else:
            why = record.damaged
        name = f"{record.segment}.{record.start}.msg"
        quarantine = self.reader.dirs["quarantine"] / name
        write_atomic(quarantine, record.payload, mode=0o640, durable=self.durable)
        return internal(
            f"quarantined spool message: {why}",
            {"segment": record.segment, "offset": record.start, "bytes": len(record.payload),
             "reason": why, "moved_to": str(quarantine)},
        )

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

    def _remove_drained(self) -> None:
        for name in self.reader.drained():
            self.reader.remove(name)
            self.ledger.forget(name)
