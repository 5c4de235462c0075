"""The consumer's ledger: committed offset per segment, and the journal of the batch being written.

Exactly-once into files: before a batch is appended, the ledger records the size each
target file had and the offsets the batch will advance to (`begin`); after the appends,
`commit` moves the offsets. A crash in between leaves `pending` set, and recovery cuts
each file back to its recorded size, so the batch is written again, once.

The ledger is checked whole when it is read: a damaged one is set aside and apilogd
refuses to drain until `apilogd repair` has rebuilt it, since guessing offsets would
write entries twice or skip them.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, NoReturn

from .._folder import Folder
from ..exceptions import StateDamaged

LEDGER_NAME = "ledger.json"
DAMAGED = "damaged"  # suffix of a ledger set aside, until `apilogd repair` handles it
REPAIRED = "repaired"
REPAIR_HINT = "run `apilogd repair`, then start apilogd again"
LIVED_NAME = "probe"  # made at a daemon's first start (daemon/_probe.py); its presence means one ran here


def read_offsets(state_dir: Path) -> dict[str, int]:
    """The committed offsets as last written (for readers other than the daemon); empty when unreadable."""
    try:
        return parse(Path(state_dir, LEDGER_NAME).read_bytes())[0]
    except (OSError, ValueError):
        return {}


def _segment_name(name: object) -> bool:
    if type(name) is not str or not 0 < len(name) <= 255 or "/" in name or "\0" in name or name in (".", ".."):
        return False
    try:
        os.fsencode(name)  # a lone surrogate names no file
    except UnicodeEncodeError:
        return False
    return True


def _relpath(path: object) -> bool:
    if type(path) is not str or "\0" in path:
        return False
    parts = path.split("/")
    return len(parts) >= 2 and parts[0] in ("system", "users") and all(_segment_name(p) for p in parts)


def _offsets(value: object, what: str, check: Any = _segment_name) -> dict[str, int]:
    if type(value) is not dict:
        raise ValueError(f"{what} is not an object")
    for key, offset in value.items():
        if not check(key):
            raise ValueError(f"{what} names {str(key)[:80]!r}, which is not a name apilogd writes")
        if type(offset) is not int or offset < 0:
            raise ValueError(f"{what}[{str(key)[:80]!r}] is {str(offset)[:40]!r}, not a size")
    return value


def parse(raw: bytes) -> tuple[dict[str, int], dict[str, Any] | None, list[str]]:
    """Offsets, pending batch and last ids of a ledger; ValueError saying what is wrong with it."""
    try:
        data = json.loads(raw)
    except (ValueError, RecursionError):
        raise ValueError("not JSON" if raw.strip() else "empty") from None
    if type(data) is not dict:
        raise ValueError("not a JSON object")
    offsets = _offsets(data.get("offsets", {}), "offsets")
    pending = data.get("pending")
    if pending is not None:
        if type(pending) is not dict:
            raise ValueError("pending is not an object")
        _offsets(pending.get("files"), "pending files", _relpath)
        _offsets(pending.get("offsets"), "pending offsets")
    last_ids = data.get("last_ids", [])
    if type(last_ids) is not list or not all(type(i) is str and 0 < len(i) <= 64 for i in last_ids):
        raise ValueError("last_ids is not a list of entry ids")
    return offsets, pending, last_ids


def unrepaired(state: Folder, name: str) -> str | None:
    """The name of a copy of state file `name` set aside as damaged and not yet repaired, if any."""
    for found in sorted(state.names()):
        if found.startswith(f"{name}.{DAMAGED}") and not found.endswith(f".{REPAIRED}"):
            return found
    return None


def refuse_unrepaired(state: Folder, name: str) -> None:
    """A state file missing while its damaged copy waits for `apilogd repair`: starting afresh would lose track."""
    aside = unrepaired(state, name)
    if aside is not None:
        raise StateDamaged(f"{state.path / aside} is a damaged {name} set aside and not repaired yet; {REPAIR_HINT}")


class Ledger:
    """Committed offsets and the pending batch, persisted atomically on every change."""

    def __init__(self, state: Folder, *, durable: bool) -> None:
        self.state = state
        self.path = state.path / LEDGER_NAME
        self.durable = durable
        try:
            raw = state.read(LEDGER_NAME)
        except FileNotFoundError:
            refuse_unrepaired(state, LEDGER_NAME)
            if state.exists(LIVED_NAME):  # a daemon ran here before: the ledger was lost, not never made
                raise StateDamaged(f"{self.path} is missing, though apilogd ran here before "
                                   f"({state.path / LIVED_NAME} exists); nothing was written; {REPAIR_HINT}") from None
            raw = b"{}"
        except OSError as exc:  # a folder, a link or a FIFO in its place
            self.damaged(f"not a plain file: {exc.strerror or exc}")
        try:
            self.offsets, self.pending, self.last_ids = parse(raw)
        except ValueError as exc:
            self.damaged(str(exc))
        self.save()  # from now on its absence means it was lost

    def damaged(self, why: str) -> NoReturn:
        """Set the ledger aside and refuse to go on: one line naming the file and the way out."""
        aside = self.state.set_aside(LEDGER_NAME, DAMAGED)
        raise StateDamaged(f"{self.path} is damaged ({why}); moved to {self.state.path / aside}; "
                           f"nothing was written; {REPAIR_HINT}")

    def begin(self, files: dict[str, int], advance: dict[str, int]) -> None:
        """Record, before appending, each target file's size and where the batch ends."""
        self.pending = {"files": files, "offsets": advance}
        self.save()

    def commit(self, ids: list[str] | None = None) -> None:
        """The batch is in its files: move the offsets (or record a broker batch's ids), clear the journal."""
        assert self.pending is not None
        self.offsets.update(self.pending["offsets"])
        self.pending = None
        self.last_ids = ids or []
        self.save()

    def abort(self) -> None:
        """The batch was undone: clear the journal, keep the offsets."""
        self.pending = None
        self.save()

    def forget(self, segment: str) -> None:
        """A segment was removed; its offset goes with the next save."""
        self.offsets.pop(segment, None)

    def save(self) -> None:
        state = {"offsets": self.offsets, "pending": self.pending, "last_ids": self.last_ids}
        body = json.dumps(state, separators=(",", ":"))
        self.state.write_atomic(LEDGER_NAME, body.encode(), durable=self.durable)
