"""`apilogd repair`: rebuild a damaged journal, ledger or delivered-ids file without writing any entry twice.

What the damaged file still says for certain is kept. Records whose fate it cannot tell
(written already or not) are neither written again nor dropped: they are copied whole
into the quarantine and their segment's offset is moved past them, and INTERNAL says
where they went. A batch in flight that the file still describes is undone as usual.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from apilog.core import wire
from apilog.core.entry import internal
from apilog.core.folder import Folder
from apilog.settings import Settings
from apilog.spool.backlog import LEDGER_NAME, rejection
from apilog.spool.frame import boundaries
from apilog.spool.writer import SpoolWriter

from ..sources.broker import DELIVERED_NAME, parse_ids
from ..sources.spool import set_aside_range
from ..sources.spool_reader import offset_problem
from ..state.folders import Folders, open_folders, open_home
from ..state.journal import JOURNAL_NAME, scan
from ..state.ledger import (
    DAMAGED,
    LIVED_NAME,
    REPAIRED,
    parse,
    unrepaired,
)
from .instance import InstanceLock


@dataclass
class _Salvage:
    """What a damaged ledger still tells for certain."""

    offsets: dict[str, int] = field(default_factory=dict)
    listing_complete: bool = False  # the offsets object survived whole: a segment it omits was never read
    pending: dict[str, Any] | None = None
    doubtful: set[str] = field(default_factory=set)  # segments a lost in-flight batch may have written from
    last_ids: list[str] = field(default_factory=list)
    checkpoint: int = 0


def _salvage(raw: bytes) -> _Salvage:
    try:
        found = parse(raw)
    except ValueError:
        pass
    else:
        return _Salvage(found.offsets, True, found.pending, set(), found.last_ids, found.checkpoint or 0)
    out = _Salvage()
    try:
        data = json.loads(raw)
    except (ValueError, RecursionError):
        return out
    if type(data) is not dict:
        return out
    offsets = data.get("offsets")
    if type(offsets) is dict:
        out.offsets = {k: v for k, v in offsets.items()
                       if type(k) is str and "/" not in k and type(v) is int and v >= 0}
        out.listing_complete = len(out.offsets) == len(offsets)
    pending = data.get("pending")
    if pending is not None:
        try:
            parse(json.dumps({"pending": pending}).encode())
            out.pending = pending
        except ValueError:
            advance = pending.get("offsets") if type(pending) is dict else None
            if type(advance) is dict:
                out.doubtful = {k for k in advance if type(k) is str}
            else:
                out.listing_complete = False  # which segments it read from is lost: trust no omission
    return out


def _damaged_copy(state: Folder, name: str, sound: Callable[[bytes], bool]) -> str | None:
    """The damaged copy of state file `name` to rebuild from (set aside now if need be); None when sound or absent."""
    aside = unrepaired(state, name)
    if aside is not None:
        return aside
    try:
        raw = state.read(name)
    except FileNotFoundError:
        return None
    except OSError:  # a folder, a link or a FIFO in its place
        return state.set_aside(name, DAMAGED)
    return None if sound(raw) else state.set_aside(name, DAMAGED)


def _rebuild_journal(folders: Folders, durable: bool) -> list[str]:
    """Keep the whole records of a damaged (or lost) journal; return what was done (nothing when it is sound).

    The records after the damage are lost: which records of the spool they wrote is unknown,
    so the ledger is then rebuilt doubting every segment (`_rebuild_ledger(doubt_all=True)`).
    """
    state = folders.state
    lost = not state.exists(JOURNAL_NAME) and state.exists(LIVED_NAME) and _journaled(state)
    aside = _damaged_copy(state, JOURNAL_NAME, lambda raw: scan(raw)[2] is None)
    if aside is None and not lost:
        return []
    kept: list[Any] = []
    end = 0
    if aside is not None:
        with contextlib.suppress(OSError):
            raw = state.read(aside, 1 << 31)
            kept, end, _ = scan(raw)
            state.write_atomic(JOURNAL_NAME, raw[:end], durable=durable)
        state.rename(aside, f"{aside}.{REPAIRED}")
    if not state.exists(JOURNAL_NAME):
        state.write_atomic(JOURNAL_NAME, b"", durable=durable)
    source = f"{state.path / aside} (kept as {aside}.{REPAIRED})" if aside else "nothing (it was missing)"
    return [(f"journal: rebuilt {state.path / JOURNAL_NAME} from {source}: kept its first {len(kept)} whole "
             f"records ({end} bytes), redone at the next start")]


def _journaled(state: Folder) -> bool:
    """Whether the ledger was saved by a version with the journal (so a journal was kept here)."""
    try:
        return parse(state.read(LEDGER_NAME)).checkpoint is not None
    except (OSError, ValueError):
        return True  # unknown: a journal may have been lost with it


def _rebuild_ledger(folders: Folders, durable: bool, *,
                    doubt_all: bool = False) -> tuple[list[str], dict[str, Any] | None]:
    """Rebuild the ledger if it is damaged (or, `doubt_all`, the journal was); return what was done and the report.

    The report is the INTERNAL entry's body, None when nothing was rebuilt.
    """
    state = folders.state

    def sound(raw: bytes) -> bool:
        try:
            offsets = parse(raw)[0]
        except ValueError:
            return False
        return all(offset_problem(folders.segments, name, offset) is None for name, offset in offsets.items())

    aside = _damaged_copy(state, LEDGER_NAME, sound)
    salvage = _Salvage()  # a ledger lost whole, or not a file at all, says nothing
    source = "nothing (it was missing)"
    if aside is None:
        if not doubt_all and (state.exists(LEDGER_NAME) or not state.exists(LIVED_NAME)):
            return ["ledger: sound or none yet, nothing to repair"], None
        with contextlib.suppress(OSError):
            salvage = _salvage(state.read(LEDGER_NAME))
            source = "itself, doubting every segment (the journal was damaged)"
    else:
        with contextlib.suppress(OSError):
            salvage = _salvage(state.read(aside))
    if doubt_all:  # records of a lost stretch of the journal may have come from any segment
        salvage.listing_complete = False
        salvage.doubtful = set(folders.segments.names())
    offsets: dict[str, int] = {}
    moved: list[dict[str, Any]] = []
    for name in sorted(folders.segments.names()):
        try:
            if rejection(folders.segments.stat(name)) is not None:
                continue  # never read as a segment: the daemon reports it
            fd = folders.segments.open_regular(name)
        except OSError:
            continue
        try:
            size = os.fstat(fd).st_size
            claimed = salvage.offsets.get(name)
            if claimed is None:
                if salvage.listing_complete and name not in salvage.doubtful:
                    continue  # never read: drained from its start
                start = 0
            else:
                trusted = claimed <= size and boundaries(fd, claimed) == claimed
                if trusted and name not in salvage.doubtful:
                    offsets[name] = claimed
                    continue
                start = claimed if trusted else 0
            offsets[name], item = set_aside_range(folders, name, fd, start, durable, "repair")
            if item is not None:
                moved.append(item)
        finally:
            os.close(fd)
    ledger = {"offsets": offsets, "pending": salvage.pending, "last_ids": salvage.last_ids,
              "checkpoint": salvage.checkpoint}
    state.write_atomic(LEDGER_NAME, json.dumps(ledger, separators=(",", ":")).encode(), durable=durable)
    if aside is not None:
        state.rename(aside, f"{aside}.{REPAIRED}")
        source = f"{state.path / aside} (kept as {aside}.{REPAIRED})"
    done = [f"ledger: rebuilt {state.path / LEDGER_NAME} from {source}; {len(offsets)} segment offsets"]
    if salvage.pending is not None:
        done.append("ledger: the batch in flight is undone at the next start, then written once")
    done.extend(f"ledger: bytes {item['from']}-{item['to']} of {item['segment']} could have been written "
                f"already; copied to {item['moved_to']} instead of being written again" for item in moved)
    report = {"ledger": str(state.path / LEDGER_NAME), "damaged_copy": f"{aside}.{REPAIRED}" if aside else None,
              "set_aside": moved, "what_to_do": "check the set-aside records against the log files by hand"}
    return done, report


def _rebuild_delivered(folders: Folders, durable: bool) -> list[str]:
    state = folders.state
    aside = _damaged_copy(state, DELIVERED_NAME, lambda raw: parse_ids(raw)[1] is None)
    if aside is None:
        return []
    try:
        ids, _ = parse_ids(state.read(aside))
    except OSError:
        ids = []
    state.write_atomic(DELIVERED_NAME, "".join(f"{i}\n" for i in ids).encode(), durable=durable)
    state.rename(aside, f"{aside}.{REPAIRED}")
    return [f"{DELIVERED_NAME}: kept {len(ids)} readable ids of {state.path / aside}"]


def repair(settings: Settings) -> list[str]:
    """Repair apilogd's state files (the daemon must be stopped); return a line per thing done."""
    with contextlib.ExitStack() as stack:
        home = stack.enter_context(open_home(settings))
        stack.callback(InstanceLock(home).release)  # refuses while a daemon runs
        folders = open_folders(settings, home)
        stack.callback(folders.close)
        durable = settings.fsync != "off"
        done = _rebuild_journal(folders, durable)
        ledger_done, report = _rebuild_ledger(folders, durable, doubt_all=bool(done))
        done += ledger_done + _rebuild_delivered(folders, durable)
    if report is not None and settings.drains_spool:  # a writer of a broker drains no local spool
        _tell_internal("apilogd repair rebuilt a damaged ledger", {**report, "at": time.time()}, settings)
    return done


def _tell_internal(heading: str, body: dict[str, Any], settings: Settings) -> None:
    """Leave an INTERNAL entry in the spool: the daemon writes it once it runs again."""
    writer = SpoolWriter(settings.spool_dir, fsync=settings.fsync != "off")
    try:
        writer.append(wire.encode(internal(heading, body)))
    finally:
        writer.close()
