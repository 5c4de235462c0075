"""Finding the one input that crashes apilogd: after a crash, inputs are probed one at a time, and set aside after the second.

A record that kills the process (a crash in a C library, memory exhausted, a bug) is read
again at every restart, since it was never committed. After an unclean exit the daemon
writes each input's key to `state/probe` before handling it; if the process dies again,
the next start finds the key there and counts one more crash against it. At
`CRASHES_TO_SET_ASIDE` the input is quarantined unread, and everything else flows again.
"""

from __future__ import annotations

import contextlib
import errno
import os

from apilog.core import fs
from apilog.core.folder import Folder, UnsafePath

from .ledger import LIVED_NAME

PROBE_NAME = LIVED_NAME  # also tells the ledger that a daemon ran here before
RUNNING_NAME = "running"  # present while a daemon runs; found at start-up, it means the last one crashed
CRASHES_TO_SET_ASIDE = 2
FORGET_AFTER_BATCHES = 1000  # a suspect not met again in this many batches was removed by its owner


class Probe:
    """The crash count of the input being handled, kept in a file that survives the process."""

    def __init__(self, state: Folder) -> None:
        self.state = state
        self.armed = False
        self.suspect: tuple[str, int] | None = None  # (key, crashes) carried over from the last run
        self._fd = state.open_plain(PROBE_NAME, os.O_RDWR, 0o640)
        self._current: str | None = None
        self._batches_since = 0  # batches committed since the suspect was last blamed

    def start(self) -> bool:
        """Called once at start-up: arm probing if the last run crashed; return whether it did."""
        try:
            self.state.stat(RUNNING_NAME)
            crashed = True
        except FileNotFoundError:
            crashed = False
        if crashed:
            key, crashes = self._read()
            if key:
                self.suspect = (key, crashes + 1)  # it was being handled when the process died
            self.armed = True
        try:
            self.state.write_atomic(RUNNING_NAME, f"{os.getpid()}\n".encode(), durable=False)
        except IsADirectoryError:
            raise UnsafePath(errno.EISDIR, f"{self.state.path / RUNNING_NAME} is a folder; remove it") from None
        return crashed

    def stop(self) -> None:
        """A clean exit: nothing is suspect (a state disk gone read-only only costs probing at the next start)."""
        with contextlib.suppress(OSError):
            self.state.unlink(RUNNING_NAME)

    def _read(self) -> tuple[str, int]:
        raw = os.pread(self._fd, 4096, 0).decode("utf-8", "surrogateescape")
        count, _, key = raw.partition("\n")
        try:
            return key.rstrip("\n"), int(count, 10) if count.isascii() else 0
        except ValueError:
            return "", 0  # not ours (garbage): nothing to blame

    def crashes(self, key: str) -> int:
        """How many times handling `key` crashed the daemon."""
        if self.suspect is not None and self.suspect[0] == key:
            return self.suspect[1]
        return 0

    def poisoned(self, key: str) -> bool:
        return self.crashes(key) >= CRASHES_TO_SET_ASIDE

    def before(self, key: str) -> None:
        """About to handle `key`: if the process dies now, the next start blames it."""
        if self.armed and key != self._current:
            data = f"{self.crashes(key)}\n{key}\n".encode("utf-8", "surrogateescape")  # a name need not be UTF-8
            fs.pwrite(self._fd, data, 0)
            fs.ftruncate(self._fd, len(data))
            self._current = key

    def between(self) -> None:
        """No input is being handled now (the batch is being written): a crash now blames none."""
        if self._current is not None:
            fs.ftruncate(self._fd, 0)
            self._current = None

    def failed(self, key: str) -> None:
        """Handling `key` raised inside the process: counted like a crash."""
        self.suspect = (key, self.crashes(key) + 1)
        self.armed = True
        self._batches_since = 0

    def committed(self, keys: set[str]) -> None:
        """A batch holding `keys` was committed: a suspect among them is innocent; with none left, stop probing."""
        self._batches_since += 1
        if self.suspect is not None and (self.suspect[0] in keys or self._batches_since > FORGET_AFTER_BATCHES):
            self.suspect = None  # innocent, or gone (its owner removed it): stop paying a write per item
        if self.armed and self.suspect is None:
            self.armed = False
            self.between()

    def close(self) -> None:
        with contextlib.suppress(OSError):
            os.close(self._fd)
