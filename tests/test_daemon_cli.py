"""docs/reference.md, "The daemon": `apilogd run/start/stop/status`, their exit codes, and one daemon per home."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

from apilog import logger

from .utils import log_file

APILOGD = [sys.executable, "-m", "apilogd"]


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*APILOGD, *args], capture_output=True, text=True, timeout=60)


def test_start_stop_status_are_idempotent(home: Path) -> None:
    """status exits 3 stopped and 0 running; a second start or stop says so and exits 0."""
    assert _cli("status").returncode == 3
    first = _cli("start")
    assert first.returncode == 0 and "apilogd started (pid" in first.stdout
    again = _cli("start")
    assert again.returncode == 0 and "already running" in again.stdout
    status = _cli("status")
    assert status.returncode == 0 and "apilogd is running" in status.stdout
    assert _cli("stop").returncode == 0
    stopped = _cli("stop")
    assert stopped.returncode == 0 and "not running" in stopped.stdout
    assert _cli("status").returncode == 3


def test_status_reports_the_backlog(home: Path) -> None:
    """Entries logged while the daemon is stopped show up as the backlog, with the oldest's age."""
    for n in range(3):
        logger.delay("INFO", "lee", f"waiting {n}")
    time.sleep(0.3)
    out = _cli("status")
    assert out.returncode == 3
    assert "backlog:     3 entries waiting" in out.stdout
    age = float(out.stdout.split("oldest:")[1].split("s")[0])
    assert 0.2 <= age < 30
    assert _cli("start").returncode == 0
    try:
        deadline = time.monotonic() + 20
        while "backlog:     0 entries" not in _cli("status").stdout:
            assert time.monotonic() < deadline
        assert log_file(home, "users/lee/INFO.log").count("INFO:  waiting") == 3
    finally:
        _cli("stop")


def test_a_second_run_refuses(home: Path) -> None:
    """Only one apilogd per APILOG_HOME: a second `run` exits 1 and names the first's pid."""
    assert _cli("start").returncode == 0
    try:
        first = int((home / "apilogd.pid").read_text())
        second = _cli("run")
        assert second.returncode == 1
        assert "already running" in second.stderr
        assert re.search(rf"\bpid {first}\b", second.stderr), second.stderr
    finally:
        _cli("stop")


def test_stale_pidfile_is_ignored(home: Path) -> None:
    """A pidfile left by a killed daemon does not make status or start believe it still runs."""
    assert _cli("start").returncode == 0
    pid = int((home / "apilogd.pid").read_text())
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while _cli("status").returncode != 3:
        assert time.monotonic() < deadline
    assert (home / "apilogd.pid").exists()
    restarted = _cli("start")
    assert restarted.returncode == 0 and "started" in restarted.stdout
    assert int((home / "apilogd.pid").read_text()) != pid
    assert _cli("stop").returncode == 0


def test_sigterm_exits_zero(home: Path) -> None:
    """`apilogd run` in the foreground exits 0 on SIGTERM."""
    proc = subprocess.Popen([*APILOGD, "run"], stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 20
    while not (home / "apilogd.pid").exists():
        assert time.monotonic() < deadline and proc.poll() is None
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=10) == 0


def test_bad_setting_is_a_clear_error(home: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """A bad value stops start-up with a message naming the variable."""
    monkeypatch.setenv("APILOG_FSYNC", "sometimes")
    out = _cli("run")
    assert out.returncode == 1
    assert "APILOG_FSYNC must be one of off, batch, always; got 'sometimes'" in out.stderr


def test_both_commands_say_their_version() -> None:
    """docs/operations.md, "Monitoring": `apilog --version` and `apilogd --version` print the installed version and exit 0."""
    from importlib.metadata import version

    for command in ([sys.executable, "-m", "apilog"], APILOGD):
        done = subprocess.run([*command, "--version"], capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        assert done.stdout.strip().endswith(f"version {version('apilog')}"), done.stdout


def test_status_never_prints_a_broker_password(home: Path) -> None:
    """A password holding `@` and `:` was printed in part (`redis://app:***@ss@host`); kombu's sanitizer hides all of it."""
    url = "redis://app:s3cr:et@pa55@broker.example:6379/0"
    done = subprocess.run([*APILOGD, "status"], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "APILOG_BROKER_URL": url, "APILOG_ROLE": "forward"})
    assert "broker:      redis://app:***@broker.example:6379/0, 1 shard" in done.stdout, done.stdout
    for part in ("s3cr", ":et@", "pa55"):
        assert part not in done.stdout


def test_a_daemon_that_fails_to_start_says_why_and_leaves_nothing_running(home: Path, tmp_path: Path,
                                                                           monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """`apilogd start` whose daemon dies at start-up (its log folder is a file) fails with the daemon's own
    reason, not a bare timeout; nothing is left running and a later start with a good folder works."""
    not_a_folder = tmp_path / "logs-file"
    not_a_folder.write_text("")
    monkeypatch.setenv("APILOG_LOG_DIR", str(not_a_folder))
    out = _cli("start")
    assert out.returncode == 1
    assert "apilogd exited with status 1" in out.stderr
    assert f"the log folder is not a folder ({not_a_folder})" in out.stderr
    assert "stopped" in _cli("status").stdout
    assert not (home / "apilogd.pid").exists()
    monkeypatch.setenv("APILOG_LOG_DIR", str(tmp_path / "logs"))
    try:
        assert _cli("start").returncode == 0
        logger.delay("INFO", "after", "started", timestamp=False)
        assert "running" in _cli("status").stdout
    finally:
        _cli("stop")
    assert (tmp_path / "logs" / "users" / "after" / "INFO.log").read_text() == "INFO:  started\n"
