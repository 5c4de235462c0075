"""docs/reference.md, D8: `apilogd stop` signals only the apilogd holding the instance lock; the home's own files stay private."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

APILOGD = [sys.executable, "-m", "apilogd"]

# Runs as PID 1 of a new PID namespace: whatever a broken `stop` signals (even kill(-1)) stays inside it.
NAMESPACE_DRIVER = r"""
import json, os, subprocess, sys, time

garbage, home = sys.argv[1], os.environ["APILOG_HOME"]
apilogd = [sys.executable, "-m", "apilogd"]
bystander = subprocess.Popen(["sleep", "120"])
started = subprocess.run([*apilogd, "start"], capture_output=True, text=True, timeout=60)
assert started.returncode == 0, started.stderr
pid = int(started.stdout.rsplit("pid ", 1)[1].split(")")[0])
with open(os.path.join(home, "apilogd.pid"), "w") as pidfile:
    pidfile.write(garbage)
stopped = subprocess.run([*apilogd, "stop"], capture_output=True, text=True, timeout=60)
time.sleep(0.3)  # a signal sent to the bystander has landed by now
status = None
deadline = time.monotonic() + 10
while status is None and time.monotonic() < deadline:  # the daemon is our child now: reap it
    done, code = os.waitpid(pid, os.WNOHANG)
    status = os.waitstatus_to_exitcode(code) if done else time.sleep(0.05)
result = {"pid": pid, "rc": stopped.returncode, "out": stopped.stdout, "err": stopped.stderr,
          "bystander_alive": bystander.poll() is None, "daemon_status": status}
print(json.dumps(result))
bystander.kill()
"""


def _cli(*args: str, umask: int = -1) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*APILOGD, *args], check=False, capture_output=True, text=True, timeout=60, umask=umask)


@contextlib.contextmanager
def _pinned(pid: int) -> Iterator[int]:
    """A pidfd of `pid`; the process is killed afterwards if a failing stop left it running."""
    pidfd = os.pidfd_open(pid)
    try:
        yield pidfd
    finally:
        with contextlib.suppress(ProcessLookupError):
            signal.pidfd_send_signal(pidfd, signal.SIGKILL)
        os.close(pidfd)


def _running(pid: int) -> bool:
    """Whether `pid` exists and is not a zombie."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def _can_unshare() -> bool:
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        return False
    probe = subprocess.run(["unshare", "--pid", "--fork", "--mount-proc", "true"],
                           check=False, capture_output=True, timeout=30)
    return probe.returncode == 0


@pytest.mark.parametrize("garbage", ["abc", "", "-1", "0"])
def test_garbage_pidfile_signals_nothing_else(home: Path, garbage: str) -> None:
    """A garbage pidfile: stop stops the real daemon and signals no other process."""
    if not _can_unshare():
        pytest.skip("needs root and `unshare --pid` to keep a kill(-1) from reaching the test machine")
    # A new session too: kill(0) reaches the caller's process group, which crosses PID namespaces.
    unshare = ["unshare", "--pid", "--fork", "--mount-proc"]
    run = subprocess.run([*unshare, sys.executable, "-c", NAMESPACE_DRIVER, garbage], check=False,
                         capture_output=True, text=True, timeout=120, start_new_session=True)
    assert run.returncode == 0, run.stderr
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert result["bystander_alive"], f"stop signalled a bystander: {result}"
    assert result["rc"] == 0 and f"apilogd stopped (pid {result['pid']})" in result["out"], result
    assert result["daemon_status"] == 0, f"the daemon did not stop cleanly: {result}"
    assert "apilogd: stopped" in (home / "apilogd.out").read_text()


def test_pidfile_naming_another_process_spares_it(daemon: Path) -> None:
    """A pidfile naming another live process: stop never kills it, and stops the real daemon."""
    real = int((daemon / "apilogd.pid").read_text())
    bystander = subprocess.Popen(["sleep", "60"])
    try:
        with _pinned(real):  # never left running by a failing stop
            (daemon / "apilogd.pid").write_text(f"{bystander.pid}\n")
            out = _cli("stop")
            time.sleep(0.3)
            assert bystander.poll() is None, "stop killed the process the pidfile named"
            assert out.returncode == 0 and f"apilogd stopped (pid {real})" in out.stdout, out.stderr
            assert not _running(real)
            assert _cli("status").returncode == 3
    finally:
        bystander.kill()
        bystander.wait()


def test_lock_held_by_another_program_is_refused(home: Path) -> None:
    """The lock held by a program that is not apilogd: stop refuses clearly, exits non-zero, signals nothing."""
    home.mkdir(mode=0o750)
    code = ("import fcntl, os, sys, time; fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT, 0o600); "
            "fcntl.flock(fd, fcntl.LOCK_EX); print('locked', flush=True); time.sleep(120)")
    holder = subprocess.Popen([sys.executable, "-c", code, str(home / "apilogd.lock")],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "locked\n"
        (home / "apilogd.pid").write_text(f"{holder.pid}\n")
        out = _cli("stop")
        time.sleep(0.3)
        assert holder.poll() is None, "stop signalled the lock's holder although it is not apilogd"
        assert out.returncode != 0
        assert f"held by pid {holder.pid}" in out.stderr and "not by an apilogd" in out.stderr, out.stderr
        assert "nothing was signalled" in out.stderr
    finally:
        holder.kill()
        holder.wait()


def test_start_under_umask_000_keeps_files_private(home: Path) -> None:
    """Under umask 000, start makes home 0750 and the pidfile and apilogd.out 0640 (the lock 0600)."""
    out = _cli("start", umask=0)
    try:
        assert out.returncode == 0, out.stderr
        modes = {path.name: stat.S_IMODE(path.stat().st_mode)
                 for path in (home, home / "apilogd.pid", home / "apilogd.out", home / "apilogd.lock")}
        assert modes == {"home": 0o750, "apilogd.pid": 0o640, "apilogd.out": 0o640, "apilogd.lock": 0o600}
    finally:
        _cli("stop")


@pytest.mark.parametrize("name", ["apilogd.out", "apilogd.pid"])
def test_planted_link_is_never_written_through(home: Path, tmp_path: Path, name: str) -> None:
    """A link planted at apilogd.out or .pid, to a file outside home: start refuses or replaces it, never writes it."""
    assert _cli("start").returncode == 0  # a home as a real daemon leaves it
    assert _cli("stop").returncode == 0
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    (home / name).unlink(missing_ok=True)
    (home / name).symlink_to(victim)
    out = _cli("start", umask=0)
    try:
        assert victim.read_text() == "precious\n", f"start wrote through the link at {name}"
        if out.returncode == 0:
            assert not (home / name).is_symlink()
        else:
            assert name in out.stderr and "not followed" in out.stderr, out.stderr
    finally:
        _cli("stop")
    assert victim.read_text() == "precious\n"
