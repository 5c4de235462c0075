"""Fault injection on apilogd's state files (docs/reference.md, D2): hand-damaged ledger.json and probe through a real apilogd.

D7: "A damaged state file gives a one-line error naming it and the recovery command, never a
traceback or a restart loop." D2: each entry exactly once. Each case below damages one state file
the way an operator, a bad restore or a stray tool could, and checks that `apilogd run` either
refuses with one line + exit 78 + `apilogd repair` (and that repair then brings every entry back
exactly once), or simply goes on writing every entry once.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from apilog import logger, settings
from apilog.spool.transport import writer_for

from .utils import Daemon, wait_written

APILOGD = [sys.executable, "-m", "apilogd"]


def _cli(*args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*APILOGD, *args], capture_output=True, text=True, timeout=timeout, check=False)


def _lines(home: Path, relpath: str = "users/lia/INFO.log") -> list[str]:
    path = home / "logs" / relpath
    return path.read_text().splitlines() if path.exists() else []


def _half_drained(home: Path, tmp_path: Path) -> dict:
    """e0-e4 written, e5-e7 waiting in the same (sealed) segment; return the ledger as it was left."""
    for n in range(5):
        logger.delay("INFO", "lia", f"e{n}", timestamp=False)
    daemon = Daemon(tmp_path)
    assert daemon.ready()
    wait_written()
    assert daemon.stop() == 0
    for n in range(5, 8):
        logger.delay("INFO", "lia", f"e{n}", timestamp=False)
    writer_for(settings.current().spool_dir, False).close()
    return json.loads((home / "state" / "ledger.json").read_bytes())


def _refuses_cleanly(tmp_path: Path) -> None:
    """`apilogd run` must refuse with one line, exit 78 and the way out (`apilogd repair`)."""
    daemon = Daemon(tmp_path)
    try:
        ready = daemon.ready(15)
    finally:
        code = daemon.stop()
    err = daemon.stderr
    assert not ready, f"apilogd ran on a damaged state file: {err[-1500:]}"
    assert "Traceback" not in err, err[-3000:]
    assert len(err.strip().splitlines()) == 1, err[-3000:]
    assert code == 78, f"exit {code} (systemd restarts it in a loop): {err.strip()}"
    assert "apilogd repair" in err, err


def _repair_and_drain(tmp_path: Path) -> None:
    """`apilogd repair`, then a daemon that drains what waits and stops."""
    repaired = _cli("repair")
    assert repaired.returncode == 0 and "Traceback" not in repaired.stderr, repaired.stderr[-3000:]
    daemon = Daemon(tmp_path)
    try:
        assert daemon.ready(), daemon.stderr
        wait_written(15)
    finally:
        daemon.stop()


def _repair_then_each_once(home: Path, tmp_path: Path) -> None:
    _repair_and_drain(tmp_path)
    written = [line.removeprefix("INFO:  ") for line in _lines(home)]
    assert len(written) == len(set(written)), f"written twice: {written}"
    assert written[:5] == [f"e{n}" for n in range(5)]


def _folder(ledger: Path, tmp_path: Path) -> None:
    ledger.unlink()
    ledger.mkdir()


def _symlink(ledger: Path, tmp_path: Path) -> None:
    (tmp_path / "ledger-copy.json").write_bytes(ledger.read_bytes())
    ledger.unlink()
    ledger.symlink_to(tmp_path / "ledger-copy.json")


def _fifo(ledger: Path, tmp_path: Path) -> None:
    ledger.unlink()
    os.mkfifo(ledger)


NOT_A_FILE: dict[str, Callable[[Path, Path], None]] = {"folder": _folder, "symlink": _symlink, "fifo": _fifo}


@pytest.mark.parametrize("kind", list(NOT_A_FILE))
def test_a_ledger_that_is_not_a_plain_file_is_refused_with_repair_and_repair_fixes_it(
        home: Path, tmp_path: Path, kind: str) -> None:
    """ledger.json swapped for a folder, a symlink (a restore onto another disk) or a FIFO.

    Found: `apilogd run` exits 1 ("cannot start: ... is not a regular file" / "Too many levels of
    symbolic links"), so systemd's Restart=on-failure restarts it every 2 s for ever, and the
    message names no way out; `apilogd repair` itself dies with an OSError traceback.
    """
    _half_drained(home, tmp_path)
    NOT_A_FILE[kind](home / "state" / "ledger.json", tmp_path)
    _refuses_cleanly(tmp_path)
    _repair_then_each_once(home, tmp_path)


def test_a_ledger_naming_an_unencodable_segment_is_refused_in_one_line(home: Path, tmp_path: Path) -> None:
    """A ledger whose offsets name a segment "\\ud800" (valid JSON, a lone surrogate).

    Found: the ledger passes `parse()`, then the start-up offset check dies with a 40-line
    UnicodeEncodeError traceback, exit 1 (a restart loop); `apilogd repair` dies the same way.
    """
    ledger = _half_drained(home, tmp_path)
    damaged = {**ledger, "offsets": {**ledger["offsets"], "\ud800": 5}}
    (home / "state" / "ledger.json").write_text(json.dumps(damaged))
    _refuses_cleanly(tmp_path)
    _repair_then_each_once(home, tmp_path)


def test_a_pending_batch_naming_an_unencodable_file_does_not_stall_every_user(home: Path, tmp_path: Path) -> None:
    """A ledger whose pending batch names `users/\\ud800/INFO.log` (valid JSON, passes parse()).

    Found: apilogd starts and becomes READY, then every step() fails in recover() with a
    UnicodeEncodeError traceback, "retrying" for ever: no entry of any user is ever written, no
    line names the ledger or `apilogd repair`, and `apilogd repair` says the ledger is sound.
    """
    ledger = _half_drained(home, tmp_path)
    damaged = {**ledger, "pending": {"files": {"users/\ud800/INFO.log": 0}, "offsets": {}}}
    (home / "state" / "ledger.json").write_text(json.dumps(damaged))
    daemon = Daemon(tmp_path)
    try:
        ready = daemon.ready(15)
        if ready:
            try:
                wait_written(10)
            except AssertionError:
                pytest.fail("apilogd runs but writes nothing: " + daemon.stderr.strip().splitlines()[-1])
    finally:
        code = daemon.stop()
    if ready:
        assert _lines(home) == [f"INFO:  e{n}" for n in range(8)]
    else:
        assert code == 78 and "apilogd repair" in daemon.stderr and "Traceback" not in daemon.stderr, daemon.stderr


def test_a_probe_file_with_a_non_decimal_digit_does_not_crash_every_start(home: Path, tmp_path: Path) -> None:
    """state/probe holding "\u00b2" (str.isdigit() is True, int() refuses it) after an unclean exit.

    Found: every start dies in Probe._read with "ValueError: invalid literal for int()", a
    traceback and exit 1: a restart loop that `apilogd repair` does not end.
    """
    _half_drained(home, tmp_path)
    (home / "state" / "probe").write_text("\u00b2\nsome.seg@0\n")
    (home / "state" / "running").write_text("1\n")  # the last run did not stop cleanly
    daemon = Daemon(tmp_path)
    try:
        ready = daemon.ready(15)
        if ready:
            wait_written(10)
    finally:
        code = daemon.stop()
    assert "Traceback" not in daemon.stderr, daemon.stderr[-3000:]
    if ready:
        assert _lines(home) == [f"INFO:  e{n}" for n in range(8)]
    else:
        assert code == 78 and len(daemon.stderr.strip().splitlines()) == 1, daemon.stderr


def test_a_deleted_ledger_writes_nothing_twice(home: Path, tmp_path: Path) -> None:
    """ledger.json deleted (or lost) while a drained-in-part segment waits in the spool.

    Found: apilogd starts afresh as if it never ran, reads the segment from 0 and writes e0-e4 a
    second time, silently (no line on stderr, nothing in INTERNAL). The state folder still held
    `probe` and `stats.json` and the log tree held the entries: a lost ledger was detectable.
    """
    _half_drained(home, tmp_path)
    (home / "state" / "ledger.json").unlink()
    daemon = Daemon(tmp_path)
    try:
        ready = daemon.ready(15)
        if ready:
            wait_written(10)
    finally:
        daemon.stop()
    written = [line.removeprefix("INFO:  ") for line in _lines(home)]
    assert len(written) == len(set(written)), f"entries written twice after the ledger was lost: {written}"


def _journal_two_batches(home: Path, files: list[tuple[str, int, int]], data: bytes) -> None:
    """Append two records to the journal as a daemon killed before its checkpoint leaves them."""
    from apilogd.state.journal import Journal
    from apilogd.state.ledger import parse

    from apilog.core.folder import Folder

    with Folder.at(home / "state") as state:
        journal = Journal(state, durable=False, checkpoint=parse(state.read("ledger.json")).checkpoint)
        journal.append(files, data, {}, [])
        journal.append([("users/lia/INFO.log", 0, 0)], b"", {}, [])
        journal.close()


def test_a_journal_record_naming_a_path_out_of_the_tree_is_refused_and_repaired(home: Path, tmp_path: Path) -> None:
    """A journal record with a valid checksum whose file is `users/../../etc/passwd` (a hand edit, a bug).

    Redoing it would write outside the log tree: apilogd must refuse in one line, exit 78 and name
    `apilogd repair`; the repair keeps what is certain and every entry is then written once.
    """
    _half_drained(home, tmp_path)
    _journal_two_batches(home, [("users/../../etc/passwd", 0, 6)], b"pwned\n")
    _refuses_cleanly(tmp_path)
    assert not (home / "logs" / ".." / ".." / "etc" / "passwd").exists()
    _repair_then_each_once(home, tmp_path)


def test_a_journal_damaged_before_its_last_record_is_refused_and_repaired(home: Path, tmp_path: Path) -> None:
    """A flipped byte in the first of two journal records (a failing disk): not a torn tail.

    Guessing would redo a batch wrongly or skip one: apilogd must refuse in one line, exit 78
    and name `apilogd repair`; the repair keeps the whole records before the damage and sets
    aside what it cannot place, and nothing is written twice.
    """
    _half_drained(home, tmp_path)
    _journal_two_batches(home, [("users/lia/INFO.log", 0, 9)], b"INFO:  x\n")
    journal = home / "state" / "journal"
    raw = bytearray(journal.read_bytes())
    raw[30] ^= 0xFF
    journal.write_bytes(bytes(raw))
    _refuses_cleanly(tmp_path)
    _repair_then_each_once(home, tmp_path)


def test_a_journal_torn_in_its_last_record_is_cut_off_and_nothing_is_lost(home: Path, tmp_path: Path) -> None:
    """A crash while a record was appended leaves it torn: that batch was never committed, so it is
    cut off and read again from the spool; apilogd starts without a word of damage."""
    _half_drained(home, tmp_path)
    journal = home / "state" / "journal"
    journal.write_bytes(journal.read_bytes() + b"APJ1\x10\x00\x00\x00")
    daemon = Daemon(tmp_path)
    try:
        assert daemon.ready(15), daemon.stderr
        wait_written(10)
    finally:
        assert daemon.stop() == 0
    assert _lines(home) == [f"INFO:  e{n}" for n in range(8)]
    assert journal.stat().st_size == 0  # checkpointed: the torn bytes are gone


@pytest.mark.parametrize("kind", list(NOT_A_FILE))
def test_a_journal_that_is_not_a_plain_file_is_refused_and_repaired(home: Path, tmp_path: Path, kind: str) -> None:
    """state/journal swapped for a folder, a symlink or a FIFO: refused in one line (exit 78), then repaired."""
    _half_drained(home, tmp_path)
    NOT_A_FILE[kind](home / "state" / "journal", tmp_path)
    _refuses_cleanly(tmp_path)
    _repair_then_each_once(home, tmp_path)


def _crashed_after_appends() -> list[tuple[str, str]]:
    """A daemon that journaled and appended its first batch, then died before any checkpoint."""
    from .test_durability import _crash_child, _log_batch, _seal_producer

    expected = _log_batch(60)
    _seal_producer()
    child = multiprocessing.get_context("fork").Process(target=_crash_child, args=("after-appends",))
    child.start()
    child.join(30)
    assert child.exitcode == -signal.SIGKILL
    return expected


def _every_line_once(home: Path, expected: list[tuple[str, str]]) -> None:
    by_file: dict[str, list[str]] = {}
    for relpath, line in expected:
        by_file.setdefault(relpath, []).append(line)
    for relpath, lines in by_file.items():
        written = (home / "logs" / relpath).read_text().splitlines(keepends=True)
        assert sorted(written) == sorted(lines), f"{relpath}: not each entry once"


def test_a_journal_lost_before_its_first_checkpoint_is_refused_and_repaired(home: Path, tmp_path: Path) -> None:
    """The journal removed after a daemon committed and appended its first batch, before any checkpoint.

    Found by an attack: with no checkpoint saved yet, a missing journal looked like a fresh
    start, and the whole segment was read again and written twice. The ledger says a journaling
    daemon ran here: refuse in one line (exit 78); after `apilogd repair` nothing is written twice.
    """
    expected = _crashed_after_appends()
    # Checkpointed so far: only the record of the seal log's first line, made at the first start.
    assert json.loads((home / "state" / "ledger.json").read_bytes())["checkpoint"] == 1
    (home / "state" / "journal").unlink()
    _refuses_cleanly(tmp_path)
    _repair_and_drain(tmp_path)
    _every_line_once(home, expected)


def test_a_journal_record_cut_after_its_batch_was_written_is_refused(home: Path, tmp_path: Path) -> None:
    """The journal's last record cut (a bad restore, a disk that lied about its flush) after its batch reached the files.

    Found by an attack: the cut record looked torn by a crash (never committed), so its entries
    were read again and written twice. A crash tears a record before any file is touched: a file
    already holding the batch's bytes proves damage. Refused (exit 78); repaired, each entry once.
    """
    expected = _crashed_after_appends()
    journal = home / "state" / "journal"
    journal.write_bytes(journal.read_bytes()[:-10])
    _refuses_cleanly(tmp_path)
    _repair_and_drain(tmp_path)
    _every_line_once(home, expected)


def test_a_log_file_cut_by_hand_before_a_redo_gets_its_batch_once_and_a_report(home: Path, tmp_path: Path) -> None:
    """An operator empties a live file (copytruncate) between a batch and the restart that redoes it.

    The redo finds the file shorter than the journal left it: the batch's entries go at its end,
    once, and INTERNAL says the file was cut outside apilogd.
    """
    logger.delay("INFO", "crash0", "written before", timestamp=False)
    daemon = Daemon(tmp_path)
    assert daemon.ready(), daemon.stderr
    wait_written()
    assert daemon.stop() == 0
    expected = _crashed_after_appends()
    (home / "logs" / "users" / "crash0" / "INFO.log").write_bytes(b"")  # "written before" and the batch
    daemon = Daemon(tmp_path)
    try:
        assert daemon.ready(), daemon.stderr
        wait_written(15)
    finally:
        assert daemon.stop() == 0
    _every_line_once(home, expected)
    assert "users/crash0/INFO.log was cut outside apilogd" in (home / "logs" / "system" / "INTERNAL.log").read_text()
