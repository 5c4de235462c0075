"""The consumer's ledger: committed offset per segment, and the journal of the batch being written.

Exactly-once into files: before a batch is appended, the ledger records the size each
target file had and the offsets the batch will advance to (`begin`); after the appends,
`commit` moves the offsets. A crash in between leaves `pending` set, and recovery cuts
each file back to its recorded size, so the batch is written again, once.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from .._atomic import write_atomic

LEDGER_NAME = "ledger.json"
STATE_MODE = 0o750


def read_offsets(state_dir: Path) -> dict[str, int]:
    """The committed offsets as last written (for readers other than the daemon)."""
    return _read(state_dir / LEDGER_NAME).get("offsets", {})


def _read(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_bytes())
    except FileNotFoundError:
        return {}
    if not isinstance(data, dict):
        raise ValueError(f"{path} is not a ledger")
    return data


class Ledger:
    """Committed offsets and the pending batch, persisted atomically on every change."""

    def __init__(self, state_dir: Path, *, durable: bool) -> None:
        os.makedirs(state_dir, mode=STATE_MODE, exist_ok=True)
        self.path = state_dir / LEDGER_NAME
        self.durable = durable
        data = _read(self.path)
        self.offsets: dict[str, int] = dict(data.get("offsets", {}))
        self.pending: dict[str, Any] | None = data.get("pending")
        self.last_ids: list[str] = list(data.get("last_ids", []))  # a broker batch's ids, committed with it

    def begin(self, files: dict[str, int], advance: dict[str, int]) -> None:
        """Record, before appending, each target file's size and where the batch ends."""
        self.pending = {"files": files, "offsets": advance}
        self._save()

    def commit(self, ids: list[str] | None = None) -> None:
        """The batch is in its files: move the offsets (or record a broker batch's ids), clear the journal."""
        assert self.pending is not None
        self.offsets.update(self.pending["offsets"])
        self.pending = None
        self.last_ids = ids or []
        self._save()

    def abort(self) -> None:
        """The batch was undone: clear the journal, keep the offsets."""
        self.pending = None
        self._save()

    def forget(self, segment: str) -> None:
        """A segment was removed; its offset goes with the next save."""
        self.offsets.pop(segment, None)

    def _save(self) -> None:
        state = {"offsets": self.offsets, "pending": self.pending, "last_ids": self.last_ids}
        body = json.dumps(state, separators=(",", ":"))
        write_atomic(self.path, body.encode(), durable=self.durable)
