"""Helpers the tests import: waiting on apilogd, spool records, `apilogd run` as systemd runs it, a second user's Python."""

from __future__ import annotations

import fcntl
import os
import re
import signal
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from apilogd.process import control

from apilog import settings, spool
from apilog.core import wire
from apilog.core.entry import build
from apilog.core.streams import Registry
from apilog.spool.frame import frame

STAMP = re.compile(r" \u00a7 \[(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d)\]")


def wait_written(timeout: float = 20.0) -> None:
    """Wait until apilogd has committed everything waiting in the spool."""
    conf = settings.load()
    deadline = time.monotonic() + timeout
    while control.status(conf).backlog:
        assert time.monotonic() < deadline, "apilogd did not drain the spool in time"
        time.sleep(0.02)


def wait_for(check: Callable[[], bool], timeout: float = 20.0, what: str = "condition") -> None:
    """Poll `check` until it holds."""
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def take_seal_key(into: Path) -> Path:
    """`apilogd seal-key` for the current APILOG_HOME, its verification key kept in the file `into`."""
    printed = subprocess.run([sys.executable, "-m", "apilogd", "seal-key"], capture_output=True, text=True, check=True)
    into.write_text(printed.stdout)
    return into


def log_file(home: Path, relpath: str) -> str:
    return (home / "logs" / relpath).read_text(encoding="utf-8")


def unstamp(text: str, since: float, until: float) -> str:
    """`text` with every timestamp checked to lie in [since, until] (UTC) and replaced by `<TS>`."""

    def check(match: re.Match[str]) -> str:
        when = datetime.strptime(match.group(1), "%Y-%m-%d %H:%M:%S").replace(tzinfo=UTC)
        assert int(since) <= when.timestamp() <= until, f"timestamp {match.group(1)} is not the call's time"
        return " \u00a7 [<TS>]"

    return STAMP.sub(check, text)


def segment(home: Path, name: str) -> int:
    """Create a segment the way a producer does: locked aside, then renamed into place.

    Written through the returned descriptor, and sealed when it is closed (the lock goes with
    it, as with a producer that dies): kept open, it is a live producer's. Never unlocked
    before: an unlocked, empty segment is sealed and drained (removed) at once.
    """
    dirs = spool.ensure(home / "spool")
    fd = os.open(dirs["tmp"] / name, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
    fcntl.flock(fd, fcntl.LOCK_EX)
    os.rename(dirs["tmp"] / name, dirs["segments"] / name)
    return fd


def record(stream: str, user: str, text: str, *, max_entry_bytes: int = 65536) -> bytes:
    """One framed spool record carrying an entry, as `delay()` writes it."""
    entry, _ = build(stream, user, text, timestamp=False, registry=Registry(Path("/nonexistent")),
                     timestamps_default=False, max_entry_bytes=max_entry_bytes)
    return frame(wire.encode(entry))


class Daemon:
    """`apilogd run` as systemd runs it: READY=1 read from our own notify socket, SIGTERM to stop."""

    def __init__(self, tmp: Path, *, env: dict[str, str] | None = None, python: list[str] | None = None,
                 **popen: Any) -> None:
        self.sock_path = str(tmp / f"notify-{time.monotonic_ns()}.sock")
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.sock_path)
        os.chmod(self.sock_path, 0o666)  # a daemon run as another user reports to it too
        self.err_path = tmp / f"apilogd-{time.monotonic_ns()}.err"
        command = [*(python or [sys.executable, "-m"]), "apilogd", "run"]
        with open(self.err_path, "wb") as err:
            self.proc = subprocess.Popen(command, stderr=err, **popen,
                                         env={**(os.environ if env is None else env), "NOTIFY_SOCKET": self.sock_path,
                                              "PYTHONFAULTHANDLER": "1"})  # SIGABRT prints every thread

    @property
    def stderr(self) -> str:
        return self.err_path.read_text(errors="replace")

    def ready(self, timeout: float = 30.0) -> bool:
        """Wait for READY=1; False when the daemon exited first."""
        deadline = time.monotonic() + timeout
        self.sock.settimeout(0.1)
        while time.monotonic() < deadline:
            try:
                if b"READY=1" in self.sock.recv(4096):
                    return True
            except TimeoutError:
                pass
            if self.proc.poll() is not None:
                return False
        raise AssertionError(f"apilogd was not ready in {timeout}s: {self.stderr[-2000:]}")

    def exit_code(self, timeout: float = 30.0) -> int:
        return self.proc.wait(timeout)

    def stop(self) -> int:
        """SIGTERM, then the exit status (the process is killed if it does not exit in time)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.send_signal(signal.SIGABRT)  # where it hangs, for the failure message
            self.proc.wait(10)
            raise AssertionError(f"apilogd did not stop on SIGTERM in 20 s: {self.stderr[-6000:]}") from None
        finally:
            self.proc.kill()
            self.sock.close()

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait(10)
        self.sock.close()


# ---------------------------------------------------------------- a second local user


BOOT = """
import runpy, site, sys
for folder in {folders!r}:
    site.addsitedir(folder)
what = sys.argv.pop(1)
if what == "-c":
    exec(sys.argv.pop(1))
else:
    sys.argv[0] = what
    runpy.run_module(what, run_name="__main__", alter_sys=True)
"""


def _others_can_run(path: str) -> bool:
    path = os.path.realpath(path)
    parents = [str(p) for p in Path(path).parents]
    return all(os.stat(p).st_mode & stat.S_IXOTH for p in parents) and bool(os.stat(path).st_mode & stat.S_IXOTH)


def python_for_others(folder: Path) -> list[str] | None:
    """A command that another user can run apilog's code with (this venv's packages, this checkout); or None."""
    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    exe = next((e for e in (sys.executable, f"/usr/bin/{version}") if os.path.exists(e) and _others_can_run(e)), None)
    if exe is None:
        return None
    folders = [p for p in sys.path if p.endswith("site-packages")] + [str(Path(__file__).resolve().parents[1])]
    boot = folder / "boot.py"
    boot.write_text(BOOT.format(folders=folders))
    os.chmod(boot, 0o644)
    return [os.path.realpath(exe), str(boot)]


def as_user(user: str, group: str, umask: int) -> dict[str, Any]:
    """subprocess arguments that run a command as `user` with `group` as its group."""
    return {"user": user, "group": group, "extra_groups": [group], "umask": umask}


@dataclass
class Site:
    """A home shared the way the system unit shares it: the daemon's user owns it, the app's user is in its group."""

    root: Path
    home: Path
    python: list[str]
    env: dict[str, str]
    daemon_user: str
    app_user: str
    group: str

    def as_app(self, script: str, umask: int = 0o022) -> subprocess.CompletedProcess[str]:
        """A shell command run by the app's user (a member of the spool group)."""
        return subprocess.run(["sh", "-c", script], cwd=self.home, capture_output=True, text=True, env=self.env,
                              user=self.app_user, group=self.app_user, extra_groups=[self.group], umask=umask)

    def app_logs(self, code: str, umask: int = 0o022) -> subprocess.CompletedProcess[str]:
        """Python run by the app's user, with apilog importable."""
        return subprocess.run([*self.python, "-c", code], cwd=self.home, capture_output=True, text=True, env=self.env,
                              user=self.app_user, group=self.app_user, extra_groups=[self.group], umask=umask)

    def daemon(self) -> Daemon:
        """`apilogd run` as the unit runs it: the daemon's user and group, UMask=0027."""
        return Daemon(self.root, env=self.env, python=self.python, **as_user(self.daemon_user, self.group, 0o027))
