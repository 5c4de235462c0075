"""The exactly-once core shared by every source: route a batch, commit it in the journal, append it, checkpoint.

Every unit fails alone (docs/reference.md, D7): an item that cannot be read or rendered is set aside by
its source and reported; a target file that cannot be opened sends its entries to
INTERNAL while the rest of the batch commits; an item that crashes the daemon is found by
the probe and set aside after its second crash. Only faults of the whole disk (full,
read-only, failing) stop a batch: before its journal record it waits at its source;
after, its appends are redone until they succeed.
"""

from __future__ import annotations

import errno
import os
import queue
import resource
import time
from collections.abc import Callable
from typing import Any

from apilog.core.entry import Entry, internal
from apilog.core.logfile import SYSTEM, relative_path
from apilog.core.route import route
from apilog.core.seal import SEALS
from apilog.core.streams import INTERNAL, Registry
from apilog.core.tree import LogTree
from apilog.settings import Settings

from ..exceptions import describe, say
from ..sources.base import NoSource, Source
from ..state.folders import LOG_FILES_SHARE, Folders, descriptor_share
from ..state.journal import Batch, Journal
from ..state.ledger import Ledger
from ..state.probe import Probe
from .budget import Budget, DropNotes, consumer_of, location_of
from .open_files import DISK_ERRORS, OpenFiles
from .sealer import Sealer

MAX_ITEMS = 32768  # items per batch: one journal record, one write per file
CHECKPOINT_EVERY = 1.0  # age of the journal's oldest record when the log files are synced
CHECKPOINT_BYTES = 64 * 1024 * 1024  # or bytes: a restart redoes at most this much
NEW_FOLDERS_PER_MINUTE = 1000  # more new user folders than this in a minute is reported as a burst


class BatchWriter:
    """Writes the batches of one source into their files, exactly once, with one fdatasync per batch.

    A batch is routed and rendered, then committed as one journal record (each target
    file's size before it, its bytes, where the source stands after it); only then is the
    source acknowledged and are the files appended, without a sync. A checkpoint (every
    second, before a rotation, at stop) syncs the log file system, saves the ledger and
    empties the journal. After a crash the records since the last checkpoint are redone.
    """

    def __init__(self, settings: Settings, folders: Folders,
                 open_source: Callable[[Ledger], Source[Any]] | None = None, *, seal: bool = True) -> None:
        self.settings = settings
        self.folders = folders
        self.durable = settings.fsync != "off"
        self.ledger = Ledger(folders.state, durable=self.durable)
        self.journal = Journal(folders.state, durable=self.durable,
                               checkpoint=self.ledger.checkpoint if self.ledger.journaled else None)
        self.tree = LogTree(settings.log_dir, durable=self.durable)
        self.files = OpenFiles(self.tree, limit=descriptor_share(LOG_FILES_SHARE))
        self.registry = Registry(settings.home)
        self.internal_path = relative_path(INTERNAL, SYSTEM, settings.log_suffix)
        self.probe = Probe(folders.state)
        self.notes: list[Entry] = []  # INTERNAL entries waiting for the next batch
        self.created: dict[str, float] = {}  # files the last batch created -> when (the daemon's clock)
        self.sizes: dict[str, int] = {}  # files the last batch appended to -> their size after it
        self.one_at_a_time = 0  # items still to take singly, after a batch failed for no reason of the disk
        self.oversized: set[str] = set()  # files that would pass RLIMIT_FSIZE, for the archiver to rotate
        fsize = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
        self.largest_file = float("inf") if fsize == resource.RLIM_INFINITY else fsize
        self.quarantined = 0  # items committed batches set aside, since the service last took the count
        self._set_aside_now = 0  # of the batch being made
        self.unapplied: tuple[Batch, bytes] | None = None  # committed, but its appends failed: redone first
        self._rename_error: OSError | None = None  # why the last record's rotation did not happen
        self.journal_since = 0.0  # when the journal's oldest record was committed (it is empty after a checkpoint)
        self._burst_window = (time.monotonic(), 0)  # (minute began, folders created before it)
        self.source: Source[Any] = NoSource()
        self.sealer: Sealer | None = None
        # Compressions and removals the archiver's threads finished, sealed and journaled by the next batch.
        self.archive_ops: queue.SimpleQueue[tuple[str, int, str]] = queue.SimpleQueue()
        self._ops: list[tuple[str, int, str]] = []  # taken from archive_ops, not committed yet
        # Limits (docs/operations.md, "Limits"): notes of dropped entries, and the tree's disk budget.
        self.drop_notes = DropNotes(settings)
        self.budget = Budget(settings, self.tree.root_fd)
        self._marks: dict[str, int] = {}  # drop counters the notes waiting in self.notes account for
        self._dropping: dict[tuple[str, str, int], int] = {}  # entries of the batch being made dropped for space
        # Archives switched to their .gz (or whose switch failed) since the archiver last looked: until then it keeps
        # them in hand, so that no sweep compresses one again, or removes its .gz.tmp, under the switch.
        self.switched: list[str] = []
        try:
            self._recover()
            if seal and settings.seal:
                self.sealer = Sealer(folders.state, self.tree, self.files, settings.seal_epoch,
                                     durable=self.durable, saved=self.ledger.seal)
                if self.sealer.genesis is not None or self.sealer.notes:
                    self._commit_and_apply([])
            if open_source is not None:
                self.source = open_source(self.ledger)
            self.checkpoint()
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """Release the source, files and folders; a disk that fails now is reported, never raised (we are stopping)."""
        self.budget.close()
        self.source.close()
        self.files.close()
        self.tree.close()
        self.probe.close()
        self.journal.close()

    # Recovery and checkpoints.

    def _recover(self) -> None:
        """Redo the batches journaled since the last checkpoint (and undo a batch a ledger of the version before left)."""
        pending = self.ledger.pending
        if pending is not None:
            for relpath, size in pending["files"].items():
                try:
                    self.files.truncate(relpath, size)
                except OSError as exc:
                    if exc.errno in DISK_ERRORS:
                        raise
                    # No longer a file we may open (swapped for a folder or a link): nothing of ours to cut.
                    say(f"could not cut {relpath} back to {size} bytes: {describe(exc)}")
            self.ledger.abort()
            say(f"undid an unfinished batch over {len(pending['files'])} files")
        torn = self.journal.torn
        if torn is not None:  # cut by a crash before any of its files was touched, or cut since: damage
            for relpath, before, _ in torn.files:
                if self.files.size_on_disk(relpath) > before:
                    self.journal.damaged(f"its last record is cut, yet {relpath} holds that batch's bytes")
            self.journal.cut_torn()
        redo = self.journal.to_redo
        for batch, data in redo:
            self._apply(batch, data)
            # The archiver learns what the redo grew as it learns from a batch: a file a killed run filled
            # past APILOG_ROTATE_BYTES is rotated at the first tick, not at the first sweep.
            self.sizes.update((r, before + length) for r, before, length in batch.files if not r.startswith(SEALS + "/"))
            for live, _archive in batch.renames:
                self.sizes.pop(live, None)
            self.drop_notes.mark(batch.noted)
            self.ledger.advance(batch.advance)
            self.ledger.last_ids.extend(batch.ids)
        if redo:
            say(f"redid {len(redo)} journaled batches since the last checkpoint")
        self.journal.to_redo = []

    def checkpoint(self) -> None:
        """Make every committed batch durable in its files, save the ledger, empty the journal."""
        self._apply_unapplied()
        if self.journal.size == 0:
            return
        if self.durable:
            self.files.sync()
            self.source.persist_acks()
        self.ledger.checkpoint = self.journal.seq
        if self.sealer is not None:
            self.ledger.seal = self.sealer.position
        self.ledger.last_ids = []  # the source's own record of them is on disk now
        self.ledger.save()
        self.journal.empty()

    # The core.

    def step(self, *, only_notes: bool = False) -> int:
        """Write one batch (or, `only_notes`, just the INTERNAL notes waiting); return how many items it committed."""
        source = self.source
        self._apply_unapplied()
        self._end_epoch()
        self.created, self.sizes = {}, {}
        self.notes.extend(source.notes)
        source.notes.clear()
        if not self._marks:  # else the notes made last time wait in self.notes still
            drop_notes, self._marks = self.drop_notes.due(force=only_notes)
            self.notes.extend(drop_notes)
        batch = [] if only_notes else source.take(1 if self.one_at_a_time else MAX_ITEMS)
        self._take_archive_ops()
        if not batch and not self.notes and not self._ops:
            self.checkpoint()  # idle: make the last batches durable now
            source.drop_consumed()
            return 0
        rendered = len(self.notes)
        try:
            lines, note_lines = self._lines(batch)
            self._keep_within_budget(lines, note_lines)
            targets = self._targets(lines)
            record, data = self._commit(targets, source.positions(batch), source.ids(batch), noted=self._marks)
        except BaseException as exc:
            source.rewind(batch)  # taken again at the next step
            if not isinstance(exc, OSError) and isinstance(exc, Exception):
                self._blame(batch)
            raise
        # Committed: whatever happens now, the journal brings the batch back.
        self.ledger.advance(record.advance)
        self.quarantined += self._set_aside_now
        del self.notes[:rendered]  # a note added while the batch was made (a removal's seal report) goes next time
        self.drop_notes.mark(self._marks)
        self.drop_notes.dropped(self._dropping)
        self.drop_notes.drained(source.consumed(batch))
        self._marks, self._dropping = {}, {}
        self._take_seal_reports()
        now = time.time()  # the daemon's clock judges a file's age, never a producer's
        self.created = {r: now for r, before, _ in targets if before == 0}
        self.sizes = {r: before + len(chunk) for r, before, chunk in targets}
        if self.probe.armed:
            self.probe.committed({source.key(item) for item in batch})
        self.one_at_a_time = max(0, self.one_at_a_time - len(batch))
        try:
            source.acknowledge(batch)
        except Exception as exc:  # noqa: BLE001 - the batch is journaled: it reaches its files whatever the source says
            say(f"could not acknowledge a committed batch at {source.name} ({describe(exc)}); "
                "it comes back and is recognised by its ids")
        self._apply(record, data, redo=False)
        self._watch_for_bursts()  # after the appends: a batch makes its new users' folders as it applies
        self.budget.grew({relpath: len(chunk) for relpath, _, chunk in targets})
        source.drop_consumed()  # in the files, and the journal can bring it back: consumed input may go
        if time.monotonic() - self.journal_since >= CHECKPOINT_EVERY or self.journal.size >= CHECKPOINT_BYTES:
            self.checkpoint()
        return len(batch)

    def _commit(self, targets: list[tuple[str, int, bytes]], advance: dict[str, int], ids: list[str], *,
                mv: list[tuple[str, str]] | None = None, end: int | None = None,
                noted: dict[str, int] | None = None) -> tuple[Batch, bytes]:
        """Commit a batch as one journal record: its files' bytes, then its seal line; return the record and its data.

        A rotation (`mv`) travels alone: its record may be taken back, which the archive changes must not be.
        """
        ops = [] if mv else self._ops
        mv = mv or []
        gz = [(relpath, size, digest) for relpath, size, digest in ops if size >= 0]
        rm = [relpath for relpath, size, _ in ops if size < 0]
        line = None
        if self.sealer is not None:
            line = self.sealer.make(targets, mv=mv, gz=gz, rm=rm, end=end)
            targets = [*targets, line]
        data = b"".join(chunk for _, _, chunk in targets)
        if self.journal.size == 0:  # a burst after a quiet spell runs a full second before its checkpoint
            self.journal_since = time.monotonic()
        record = self.journal.append([(r, before, len(chunk)) for r, before, chunk in targets], data, advance, ids,
                                     renames=mv, switches=[(relpath, size) for relpath, size, _ in gz], removes=rm,
                                     noted=noted)
        if not mv:
            self._ops = []
        if self.sealer is not None and line is not None:
            self.sealer.committed(line, end)
        return record, data

    def _commit_and_apply(self, targets: list[tuple[str, int, bytes]], **how: Any) -> None:
        """A batch of no entries (a seal line, a rotation, archive changes), committed and applied at once."""
        record, data = self._commit(targets, {}, [], **how)
        self._take_seal_reports()
        self._apply(record, data, redo=False)

    def _take_seal_reports(self) -> None:
        """What the sealer found (a seal log cut or swapped outside apilogd, a damaged key) goes to INTERNAL too."""
        if self.sealer is not None and self.sealer.reports:
            self.notes.extend(internal(report, {}) for report in self.sealer.reports)
            self.sealer.reports.clear()

    def _end_epoch(self) -> None:
        """The clock passed the seal key's epoch: its last line, then the next epoch's key (the old one is gone)."""
        if self.sealer is not None and (epoch := self.sealer.epoch_over()) is not None:
            self._take_archive_ops()
            self._commit_and_apply([], end=epoch)

    def _take_archive_ops(self) -> None:
        while not self.archive_ops.empty():  # this thread is the only one that takes
            op = self.archive_ops.get_nowait()
            self._ops.append(op)
            self.budget.archived(op[0], op[1])

    # What the archiver does to files, journaled (and sealed) like a batch.

    def rotate(self, relpath: str, archive: str) -> None:
        """Move a live file into archive/: one record naming the move, applied at once; OSError when it cannot be moved."""
        self.checkpoint()  # no record may name the file's size from before it was rotated
        self._commit_and_apply([], mv=[(relpath, archive)])
        if not self.tree.exists(archive):  # the rename failed: take the record (and its seal line) back
            self.unapplied = None
            error = self._rename_error or OSError(errno.ENOENT, "the file vanished")
            self._take_back()
            raise error

    def _take_back(self) -> None:
        """Undo the record committed last, whose rename did not happen: it is cut from the journal and the seal log."""
        self.journal.drop_last()
        if self.sealer is not None:
            self.sealer.take_back()

    def compressed(self, archive: str, gz_size: int, gz_digest: str) -> None:
        """(Any thread) `archive` has its .gz.tmp, durable: the next batch seals it and switches the archive to it."""
        self.archive_ops.put((archive, gz_size, gz_digest))

    def retire(self, archive: str) -> None:
        """(Any thread) `archive` is past APILOG_RETAIN_DAYS: the next batch seals its removal and removes it."""
        self.archive_ops.put((archive, -1, ""))

    def _rename(self, relpath: str, archive: str) -> None:
        if self.tree.exists(archive) or self.tree.exists(archive + ".gz") or not self.tree.exists(relpath):
            return  # done before a crash
        self.files.forget(relpath)  # the next entry opens a fresh live file
        self.tree.rename(relpath, archive)

    def _switch(self, archive: str, size: int) -> None:
        """Put an archive's .gz in the place of its plain copy, so that each entry has one name at every instant.

        The .gz.tmp is renamed over the plain name (its gzip bytes replace the text under that one name; readers
        tell them by their magic), then that name to `.gz`. No fsync: the record stays in the journal until a
        checkpoint syncs the file system, and a crash before it redoes the switch from the step it stopped at. A
        .gz.tmp that is not the one sealed (lost, or a later attempt's) is left to the archiver's sweep.
        """
        tmp, packed = archive + ".gz.tmp", archive + ".gz"
        if self.tree.exists(packed):
            return  # switched before a crash
        if self.tree.size(tmp) == size:
            self.tree.replace(tmp, archive)
        if self.tree.is_gzip(archive):
            self.tree.rename(archive, packed)

    def _remove(self, relpath: str) -> None:
        if relpath.endswith(".gz") or self.tree.exists(relpath + ".gz"):  # never the only copy
            self.tree.unlink(relpath)

    def _apply_unapplied(self) -> None:
        """Redo the committed batch whose appends failed last time (a full or failing disk), before anything else."""
        if self.unapplied is not None:
            self._apply(*self.unapplied)
            self.unapplied = None

    def _apply(self, batch: Batch, data: bytes, *, redo: bool = True) -> None:
        """Append a committed batch to its files; `redo` (after a failure or a crash) cuts each file back first."""
        try:
            for relpath, before, chunk in batch.shares(data):
                try:
                    if redo:
                        found = self.files.redo(relpath, before, chunk)
                        if found is not None:
                            self.notes.append(internal(
                                f"{relpath} was cut outside apilogd: the journal left it at {before} bytes, "
                                f"it had {found}; the batch's entries were written at its end",
                                {"file": relpath, "expected_bytes": before, "found_bytes": found}))
                    else:
                        self.files.append(relpath, chunk)  # its size was measured for this batch
                except OSError as exc:
                    if exc.errno in DISK_ERRORS or exc.errno == errno.EFBIG:
                        raise
                    # Opened fine when the batch was made, not now (a redo after a restart): not lost, reported.
                    self.notes.append(self._diverted(relpath, chunk.decode("utf-8", "replace"), exc))
            self._rename_error = None
            for relpath, archive in batch.renames:
                try:
                    self._rename(relpath, archive)
                except OSError as exc:
                    if exc.errno in DISK_ERRORS:
                        raise
                    self._rename_error = exc  # `rotate` takes the record back
                    if redo:  # a crash came between the record and its rename, which fails now: said, not retried
                        self.notes.append(internal(f"could not finish rotating {relpath} into {archive}: {describe(exc)}",
                                                   {"file": relpath, "archive": archive, "error": describe(exc)}))
            for archive, size in batch.switches:
                try:
                    self._switch(archive, size)
                except OSError as exc:
                    if exc.errno in DISK_ERRORS:
                        raise
                    # Refused (a folder made immutable): the plain copy keeps the entries, and the archiver's next
                    # sweep compresses it again. Retried at every batch, it would hold up every entry.
                    self.notes.append(internal(f"could not switch {archive} to its .gz: {describe(exc)}",
                                               {"file": archive, "error": describe(exc)}))
                self.switched.append(archive)
            for relpath in batch.removes:
                self._remove(relpath)
        except BaseException as exc:
            self.unapplied = (batch, data)
            if isinstance(exc, OSError) and exc.errno in DISK_ERRORS:
                self._cut_back(batch)
            raise

    def _cut_back(self, batch: Batch) -> None:
        """A full or failing disk stopped a batch half-way: its files go back to their sizes before it.

        So no file holds bytes past its last seal line while the batch waits in the journal to be
        redone (cutting frees space, so it works on a full disk too).
        """
        for relpath, before, _ in batch.files:
            try:
                self.files.truncate(relpath, before)
                if before == 0:  # made by this batch: an empty file no seal line names would read as planted
                    self.tree.unlink(relpath)
            except OSError as exc:
                say(f"could not cut {relpath} back to {before} bytes after a failed write: {describe(exc)}")

    def _diverted(self, relpath: str, entries: str, exc: OSError, then: str = "") -> Entry:
        """The INTERNAL entry reporting a file that cannot be written, its entries' text included."""
        return internal(f"cannot write {relpath}: {describe(exc)}{then}",
                        {"file": relpath, "error": describe(exc), "entries": entries})

    def _divert(self, lines: dict[str, list[str]], relpath: str, exc: OSError, then: str = "") -> None:
        """Move a file's lines of this batch into its INTERNAL lines, reported."""
        note = self._diverted(relpath, "".join(lines.pop(relpath)), exc, then)
        lines.setdefault(self.internal_path, []).extend(text for _, text in route(note, (INTERNAL,), self.settings))

    def _blame(self, batch: list[Any]) -> None:
        """A batch failed for no reason of the disk: take its items one at a time until the culprit is found."""
        if len(batch) == 1:
            self.probe.failed(self.source.key(batch[0]))  # set aside at its second failure
        self.one_at_a_time = max(self.one_at_a_time, len(batch))

    def _lines(self, batch: list[Any]) -> tuple[dict[str, list[str]], dict[str, list[str]]]:
        """Rendered lines by target file, the entries' and the notes'; an item that cannot be read or rendered is set aside."""
        lines: dict[str, list[str]] = {}
        known = frozenset(self.registry.names())  # one look at the registry per batch
        probing = self.probe.armed  # only after a crash or a failed batch: a write per item
        source = self.source
        self._set_aside_now = 0
        for item in batch:
            routed = None
            if probing:
                key = source.key(item)
                self.probe.before(key)
                if self.probe.poisoned(key):
                    why = f"it crashed apilogd {self.probe.crashes(key)} times; set aside without being read again"
                    routed = route(source.set_aside(item, why), known, self.settings)
                    self._set_aside_now += 1
            if routed is None:
                try:
                    routed = route(source.entry(item), known, self.settings)
                except Exception as exc:  # noqa: BLE001 - any failure of one item is that item's alone
                    routed = route(source.set_aside(item, describe(exc)), known, self.settings)
                    self._set_aside_now += 1
            for relpath, text in routed:
                lines.setdefault(relpath, []).append(text)
        self.probe.between()
        note_lines: dict[str, list[str]] = {}
        for note in self.notes:
            for relpath, text in route(note, known, self.settings):
                note_lines.setdefault(relpath, []).append(text)
        return lines, note_lines

    def _keep_within_budget(self, lines: dict[str, list[str]], note_lines: dict[str, list[str]]) -> None:
        """Make room for the batch, or drop the entries of consumers past their share, or wait: then add the notes.

        Archives are removed in a record of their own, committed and applied before the batch. The
        dropped entries are counted when the batch commits; notes (bounded) are never dropped.
        """
        need: dict[str, int] = {}
        for relpath, texts in lines.items():
            owner = consumer_of(relpath)
            if owner is not None:
                need[owner] = need.get(owner, 0) + sum(map(len, texts))
        plan = self.budget.plan(need, sum(len(text) for texts in note_lines.values() for text in texts))
        if plan.remove:
            self._ops.extend((relpath, -1, "") for relpath, _ in plan.remove)
            self._commit_and_apply([])
            for relpath, size in plan.remove:
                self.budget.removed(relpath, size)
            self.notes.append(internal(  # written with the next batch
                f"removed {len(plan.remove)} archives to keep the log tree within its budget",
                {"removed": [relpath for relpath, _ in plan.remove], "bytes": sum(size for _, size in plan.remove),
                 "why": "APILOG_USER_QUOTA takes a user's own oldest archives; APILOG_MAX_USE and APILOG_KEEP_FREE "
                        "the largest consumer's oldest, only while it holds more than a fair share"}))
        if plan.full is not None:
            raise plan.full
        self._dropping = {}
        for relpath in [r for r in lines if consumer_of(r) in plan.drop]:
            owner = consumer_of(relpath) or ""
            stream = relpath.rsplit("/", 1)[1].rsplit(".", 1)[0].replace("_", " ")
            key = (location_of(owner), stream, plan.drop[owner])
            self._dropping[key] = self._dropping.get(key, 0) + len(lines.pop(relpath))
        for relpath, texts in note_lines.items():
            lines.setdefault(relpath, []).extend(texts)

    def _targets(self, lines: dict[str, list[str]]) -> list[tuple[str, int, bytes]]:
        """(file, size before the batch, bytes) for each target, INTERNAL last; a file that cannot take its lines diverts them.

        A target that cannot be opened, or that would pass the largest file size allowed
        (RLIMIT_FSIZE: rotated soon), sends its entries to INTERNAL. When INTERNAL itself cannot
        be written, what it would have received goes to stderr (the service manager's journal):
        one broken file never holds up everyone's entries.
        """
        internal_path = self.internal_path
        targets = []
        for relpath in [r for r in lines if r != internal_path]:
            data = "".join(lines[relpath]).encode("utf-8")
            try:
                before = self.files.size(relpath)
            except OSError as exc:
                if exc.errno in DISK_ERRORS:
                    raise  # the disk, not this file: the batch waits in the source
                self._divert(lines, relpath, exc)
                continue
            if before + len(data) > self.largest_file:
                self.oversized.add(relpath)
                self._divert(lines, relpath, OSError(errno.EFBIG, os.strerror(errno.EFBIG)), "; it will be rotated")
                continue
            targets.append((relpath, before, data))
        if lines.get(internal_path):
            data = "".join(lines[internal_path]).encode("utf-8")
            try:
                before = self.files.size(internal_path)
                if before + len(data) > self.largest_file:
                    self.oversized.add(internal_path)
                    raise OSError(errno.EFBIG, os.strerror(errno.EFBIG))
                targets.append((internal_path, before, data))
            except OSError as exc:
                if exc.errno in DISK_ERRORS:
                    raise
                texts = data.decode("utf-8").rstrip("\n")
                say(f"cannot write {internal_path}: {describe(exc)}; what it would have received follows\n{texts}")
        return targets

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
