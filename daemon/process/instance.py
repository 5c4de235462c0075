"""One apilogd per APILOG_HOME: an exclusive lock held for the process's life, and a pidfile beside it.

Whom `apilogd stop` signals is decided by the kernel, never by the pidfile (docs/reference.md, D8): the
process that /proc/locks names as the lock's holder, that has the lock file open through a
descriptor carrying the lock, and whose command line is `apilogd run`. It is pinned by a
pidfd before those checks, so a pid reused in between is never signalled. The pidfile is
information for humans only.

The lock file, the pidfile and apilogd.out are opened relative to a descriptor of the home
folder, never through a link, and get their modes explicitly whatever the umask.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import select
import signal
import stat
import time
from pathlib import Path

from apilog.core import fs
from apilog.core.folder import Folder

from ..exceptions import AlreadyRunning, DaemonError

LOCK_NAME = "apilogd.lock"
PID_NAME = "apilogd.pid"
LOCK_MODE = 0o600  # the app's group must not be able to take (and so block) the daemon's lock
FILE_MODE = 0o640  # the pidfile and apilogd.out: readable by the group, writable by the daemon only
LOCK_PATIENCE = 0.5  # seconds a starting daemon retries the lock: `status` probes hold it shared for an instant
# Options of the Python interpreter that take the next argument as their value.
_PY_OPTIONS_WITH_VALUE = frozenset({"-W", "-X", "--check-hash-based-pycs"})


class ForeignHolder(DaemonError):
    """The instance lock is held, but not by an apilogd this process can identify: nothing is signalled."""


def output_tail(fd: int, lines: int = 5) -> str:
    """The last `lines` lines of an open output file, joined for a one-line error."""
    size = os.fstat(fd).st_size
    chunk = min(size, 64 * 1024)
    text = os.pread(fd, chunk, size - chunk).decode(errors="replace")
    return " | ".join(text.strip().splitlines()[-lines:]) or "no output"


class InstanceLock:
    """Held by the running daemon; the kernel releases it if the process dies."""

    def __init__(self, home: Folder) -> None:
        self.home = home
        self.fd = home.open_plain(LOCK_NAME, os.O_RDWR, LOCK_MODE)
        if not self._take():
            os.close(self.fd)
            raise AlreadyRunning(_held_by(home.path))
        try:
            # Replaced whole: a link planted at its name is replaced, never written through.
            home.write_atomic(PID_NAME, f"{os.getpid()}\n".encode(), mode=FILE_MODE, durable=False)
        except BaseException:
            self.release()
            raise

    def _take(self) -> bool:
        deadline = time.monotonic() + LOCK_PATIENCE
        while True:
            try:
                fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return True
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    return False
                time.sleep(0.01)

    def release(self) -> None:
        with contextlib.suppress(OSError):  # a stale pidfile is harmless: the lock decides, and it goes with us
            self.home.unlink(PID_NAME)
        os.close(self.fd)


def _held_by(home: Path) -> str:
    """Why the lock of `home` cannot be taken, naming its holder."""
    try:
        holder = lock_holder(home, strict=False)
    except DaemonError as exc:
        return f"apilogd cannot run for {home}: {exc}"
    if holder is None:  # released meanwhile
        return f"apilogd is already running for {home} (it has just stopped; retry)"
    holder.close()
    return f"apilogd is already running for {home} (pid {holder.pid})"


class Holder:
    """The apilogd holding an instance lock, pinned by a pidfd: a signal reaches that process or none."""

    def __init__(self, pid: int, pidfd: int) -> None:
        self.pid = pid
        self.pidfd = pidfd

    def signal(self, signum: int) -> bool:
        """Send `signum`; False when the process has already exited."""
        try:
            signal.pidfd_send_signal(self.pidfd, signum)
        except ProcessLookupError:
            return False
        return True

    def wait(self, timeout: float) -> bool:
        """Wait for the process to exit (a pidfd turns readable then); False on timeout."""
        poller = select.poll()
        poller.register(self.pidfd, select.POLLIN)
        return bool(poller.poll(max(0.0, timeout) * 1000))

    def close(self) -> None:
        if self.pidfd >= 0:
            os.close(self.pidfd)
            self.pidfd = -1

    def __enter__(self) -> Holder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _is_apilogd(args: list[str]) -> bool:
    """Whether a command line is `python [options] -m apilogd run ...` or the `apilogd` script with `run`."""
    if args and os.path.basename(args[0]) == "apilogd":
        return args[1:2] == ["run"]
    if len(args) > 1 and os.path.basename(args[1]) == "apilogd":  # the script started by its interpreter
        return args[2:3] == ["run"]
    i = 1
    while i < len(args) and args[i].startswith("-"):
        arg = args[i]
        if arg == "-m":
            return args[i + 1:i + 3] == ["apilogd", "run"]
        if arg.startswith("-m"):  # -mapilogd
            return arg[2:] == "apilogd" and args[i + 1:i + 2] == ["run"]
        if arg in {"-c", "-"}:
            return False
        i += 2 if arg in _PY_OPTIONS_WITH_VALUE else 1
    return False


def _cmdline(pid: int) -> list[str]:
    with open(f"/proc/{pid}/cmdline", "rb") as file:
        return [os.fsdecode(arg) for arg in file.read().split(b"\0")[:-1]]


def _holds(pid: int, st: os.stat_result) -> bool:
    """Whether `pid` has the lock file open through a descriptor that carries an exclusive flock."""
    for name in os.listdir(f"/proc/{pid}/fd"):
        try:
            opened = os.stat(f"/proc/{pid}/fd/{name}")
            if (opened.st_dev, opened.st_ino) != (st.st_dev, st.st_ino):
                continue
            with open(f"/proc/{pid}/fdinfo/{name}", encoding="ascii", errors="replace") as file:
                info = file.read()
        except OSError:  # closed meanwhile
            continue
        # "lock:\t1: FLOCK  ADVISORY  WRITE 4208 fe:00:2146315 0 EOF": the kernel lists locks per descriptor.
        if any(line.startswith("lock:") and line.split()[2:5:2] == ["FLOCK", "WRITE"] for line in info.splitlines()):
            return True
    return False


def _writers(st: os.stat_result) -> list[int]:
    """The pids /proc/locks names as holding an exclusive flock on the lock file's inode, same device first."""
    try:
        with open("/proc/locks", encoding="ascii", errors="replace") as file:
            lines = file.read().splitlines()
    except OSError:
        return []
    same_device: list[int] = []
    same_inode: list[int] = []
    for line in lines:
        # "7: FLOCK  ADVISORY  WRITE 4208 fe:00:2146315 0 EOF"; a waiter's line has "->" after the number.
        parts = line.split()
        if len(parts) < 6 or parts[1:4:2] != ["FLOCK", "WRITE"]:
            continue
        try:
            pid = int(parts[4])
            major, minor, inode = parts[5].split(":")
            device = os.makedev(int(major, 16), int(minor, 16))
        except ValueError:
            continue
        if int(inode) != st.st_ino:
            continue
        # st_dev is not the kernel's device on btrfs subvolumes or overlayfs: an inode match on another
        # device stays a candidate, and _holds() compares (device, inode) as stat() sees them.
        (same_device if device == st.st_dev else same_inode).append(pid)
    return same_device + same_inode


def _pin(pid: int, st: os.stat_result, strict: bool) -> tuple[Holder | None, str | None]:
    """A Holder for `pid` if it is an apilogd holding the lock; else why not (None: it has exited)."""
    if pid <= 1 or pid == os.getpid():
        return None, "init or this very process: never signalled"
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        return None, None
    # Taken before the checks: if the pid is reused after them, the pidfd still names the checked process.
    denied = "not ours to inspect or signal (permission denied): run this as its user or root"
    problem: str | None = None
    try:
        args = _cmdline(pid)
        if not _is_apilogd(args):
            shown = " ".join(args) or "no command line"
            problem = f"`{shown[:120]}` is not `apilogd run`"
        else:
            try:
                if not _holds(pid, st):
                    problem = "has no descriptor of the lock file open"
            except PermissionError:  # another user's daemon: fine to report, not to signal
                problem = denied if strict else None
        try:
            signal.pidfd_send_signal(pidfd, 0)  # still alive, so the /proc files read were its own
        except PermissionError:  # alive too (a dead process gives ESRCH first), but not ours to signal
            if strict and problem is None:
                problem = denied
    except (ProcessLookupError, FileNotFoundError):  # exited while we looked
        os.close(pidfd)
        return None, None
    except PermissionError:  # its command line is hidden from us (hidepid)
        problem = denied
    if problem is not None:
        os.close(pidfd)
        return None, problem
    return Holder(pid, pidfd), None


def _probe_free(fd: int) -> bool:
    """Whether nobody holds the lock exclusively (a shared lock taken and dropped at once)."""
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    fcntl.flock(fd, fcntl.LOCK_UN)
    return True


def _lock_file(home: Path) -> tuple[os.stat_result | None, int | None]:
    """The lock file's status and a read descriptor (None when we may not read it); (None, None) if there is none."""
    try:
        home_fd = fs.open(home, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except (FileNotFoundError, NotADirectoryError):
        return None, None
    try:
        fd = fs.open(LOCK_NAME, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=home_fd)
    except FileNotFoundError:
        return None, None
    except PermissionError:  # another user's daemon: its holder can still be named from /proc
        try:
            st = os.stat(LOCK_NAME, dir_fd=home_fd, follow_symlinks=False)
        except FileNotFoundError:
            return None, None
        return (st, None) if stat.S_ISREG(st.st_mode) else (None, None)
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENXIO):  # a link or a socket: no apilogd can hold it
            return None, None
        raise
    finally:
        os.close(home_fd)
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        return None, None
    return st, fd


def lock_holder(home: Path, *, strict: bool = True) -> Holder | None:
    """The apilogd holding `home`'s lock, pinned by a pidfd; None when nobody holds the lock.

    ForeignHolder when it is held by a process that is not a verified apilogd, or by none
    visible here (another PID namespace, a hidden /proc). `strict=False` accepts a holder
    whose open files we may not read, for reporting only: signalling needs `strict`.
    """
    st, fd = _lock_file(home)
    if st is None:
        return None
    lock = home / LOCK_NAME
    try:
        for _ in range(2):  # a daemon may take the lock between our look at /proc/locks and the probe
            problems: list[str] = []
            for pid in _writers(st):
                holder, problem = _pin(pid, st, strict)
                if holder is not None:
                    return holder
                if problem is not None:
                    problems.append(f"pid {pid} ({problem})")
            if problems:
                raise ForeignHolder(f"{lock} is held by {'; '.join(problems)}, not by an apilogd")
            if fd is None or _probe_free(fd):
                return None
        raise ForeignHolder(f"{lock} is held, but no process visible here holds it "
                            "(another PID namespace, or /proc hidden?)")
    finally:
        if fd is not None:
            os.close(fd)


def running_pid(home: Path) -> int | None:
    """The pid of the apilogd holding `home`'s lock, as the kernel tells (never the pidfile); None when none does."""
    try:
        holder = lock_holder(home, strict=False)
    except ForeignHolder:
        return None  # held, but by no apilogd we can name: no pid to report, nor to signal
    if holder is None:
        return None
    holder.close()
    return holder.pid
