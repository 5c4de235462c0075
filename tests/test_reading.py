"""docs/reference.md: users, tail (-n, -f across a rotation), show merged by time, search in live files and archives; jsonl."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from apilogd.process import control
from click.testing import CliRunner

from apilog import logger, settings
from apilog.cli import main

from .utils import wait_for, wait_written


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "apilog", *args], capture_output=True, text=True, timeout=60)


def test_users_lists_decoded_names(daemon: Path) -> None:
    for user in ("../etc", "zoë", "plain@example.com"):
        logger.delay("INFO", user, "hi")
    wait_written()
    assert _run("users").stdout.splitlines() == ["../etc", "plain@example.com", "zoë"]


def test_tail_n_and_multiline_entries(daemon: Path) -> None:
    """-n counts entries, not lines: a LOGIN dict spanning lines is one entry."""
    for n in range(4):
        logger.delay("LOGIN", "tom", {"n": n}, dict_to_string=True, heading=f"login {n}", timestamp=False)
    wait_written()
    out = _run("tail", "tom", "login", "-n", "2").stdout
    assert out == 'LOGIN: login 2\n{\n    "n": 2\n}\nLOGIN: login 3\n{\n    "n": 3\n}\n'


def test_tail_follows_across_a_rotation(daemon: Path) -> None:
    """tail -f prints what is appended, and keeps going once the file is rotated away."""
    logger.delay("INFO", "una", "before", timestamp=False)
    wait_written()
    proc = subprocess.Popen([sys.executable, "-m", "apilog", "tail", "una", "INFO", "-n", "1", "-f"],
                            stdout=subprocess.PIPE, text=True)
    seen: list[str] = []
    reader = threading.Thread(target=lambda: seen.extend(iter(proc.stdout.readline, "")), daemon=True)
    reader.start()
    try:
        wait_for(lambda: "INFO:  before\n" in seen, what="the first line")
        logger.delay("INFO", "una", "appended", timestamp=False)
        wait_for(lambda: "INFO:  appended\n" in seen, what="the appended line")
        assert CliRunner().invoke(main, ["archive"]).exit_code == 0
        logger.delay("INFO", "una", "after rotation", timestamp=False)
        wait_for(lambda: "INFO:  after rotation\n" in seen, what="the line written after the rotation")
    finally:
        proc.kill()
    assert seen == ["INFO:  before\n", "INFO:  appended\n", "INFO:  after rotation\n"]


def test_show_merges_streams_by_time(daemon: Path) -> None:
    """Entries of every stream of a user, in event-time order, archives included."""
    logger.delay("INFO", "vic", "first")
    time.sleep(1.1)
    logger.delay("WARN", "vic", "second")
    wait_written()
    assert CliRunner().invoke(main, ["archive"]).exit_code == 0
    time.sleep(3.5)  # so that --since 2s below tells "third" from the rest
    logger.delay("INFO", "vic", "third")
    wait_written()
    out = _run("show", "vic").stdout.splitlines()
    assert [line.split("  ")[1].split(" \u00a7")[0] for line in out] == ["first", "second", "third"]
    recent = _run("show", "vic", "--since", "2s").stdout.splitlines()
    assert [line.split("  ")[1].split(" \u00a7")[0] for line in recent] == ["third"]
    assert len(_run("show", "vic", "--since", "1h").stdout.splitlines()) == 3


def test_search_finds_live_and_archived(daemon: Path) -> None:
    """search reads gzip archives too, and labels each hit with its file."""
    logger.delay("ERROR", "wes", "needle one", timestamp=False)
    wait_written()
    assert CliRunner().invoke(main, ["archive"]).exit_code == 0
    logger.delay("ERROR", "wes", "needle two", timestamp=False)
    logger.delay("ERROR", "xia", "hay", timestamp=False)
    wait_written()
    out = _run("search", "needle", "--stream", "error").stdout.splitlines()
    assert len(out) == 2
    assert out[0].startswith("archive/users/wes/ERROR.") and out[0].endswith(".log.gz: ERROR:  needle one")
    assert out[1] == "users/wes/ERROR.log: ERROR:  needle two"
    assert _run("search", "nothing-like-this").returncode == 1


def test_jsonl_format_and_reading(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """APILOG_FORMAT=jsonl writes one object per line with the docs/reference.md, "Entry format" fields; show reads it."""
    monkeypatch.setenv("APILOG_FORMAT", "jsonl")
    settings.reset()
    control.start(settings.load())
    try:
        receipt = logger.delay("LOGIN", "yan", {"ip": "198.51.100.4"}, heading="New Login")
        wait_written()
    finally:
        control.stop(settings.load())
    import json

    record = json.loads((home / "logs" / "users" / "yan" / "LOGIN.jsonl").read_text())
    assert record["id"] == receipt.id and record["stream"] == "LOGIN" and record["location"] == "yan"
    assert record["message"] == {"ip": "198.51.100.4"} and record["heading"] == "New Login"
    assert record["ts"].endswith("+00:00")
    shown = CliRunner().invoke(main, ["show", "yan"], env={**os.environ})
    assert json.loads(shown.output)["id"] == receipt.id


def test_readers_see_archives_not_yet_compressed(home: Path) -> None:
    """A rotated file waiting for gzip (or whose gzip a crash cut short) is read, never twice, never through a link."""
    folder = home / "logs" / "archive" / "users" / "zia"
    folder.mkdir(parents=True)
    (folder / "INFO.20250101T000000Z.log").write_text("INFO:  plain, not compressed yet\n")
    (folder / "INFO.20250102T000000Z.log").write_text("INFO:  compressed, plain copy not removed yet\n")
    import gzip

    (folder / "INFO.20250102T000000Z.log.gz").write_bytes(gzip.compress(b"INFO:  compressed, plain copy not removed yet\n"))
    (folder / "INFO.20250103T000000Z.log.gz.tmp").write_bytes(b"half")
    secret = home / "secret.txt"
    secret.write_text("INFO:  not a log of zia\n")
    (folder / "INFO.20250104T000000Z.log").symlink_to(secret)  # a planted link is never read through
    out = CliRunner().invoke(main, ["show", "zia"]).output
    assert out == "INFO:  plain, not compressed yet\nINFO:  compressed, plain copy not removed yet\n"
