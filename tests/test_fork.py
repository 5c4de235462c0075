"""The producer's spool writer under fork, a strict umask and a full disk (docs/reference.md, D1-D5), via a real apilogd."""

from __future__ import annotations

import os
import random
import resource
import select
import signal
import stat
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import pytest
from apilogd.process import control

from apilog import logger, settings
from apilog.spool import writer
from apilog.spool.transport import writer_for

from .utils import log_file, wait_for, wait_written

THREADS = 4
CHILDREN = 200
CHILD_ENTRIES = 2
CHILD_TIMEOUT = 10.0


def _child(i: int, logged_fd: int, release_fd: int, release_write_fd: int) -> None:
    """A forked child: log a couple of entries, say so, stay alive until released; never returns."""
    code = 3
    try:
        os.close(release_write_fd)  # or the parent's close would never reach us as end of file
        receipts = [logger.delay("INFO", "forked", f"c{i:03d}-{k}", timestamp=False) for k in range(CHILD_ENTRIES)]
        code = 0 if all(r.spooled for r in receipts) else 2
        os.write(logged_fd, b".")
        os.read(release_fd, 1)  # alive, and holding whatever it inherited, while the parent checks its own entries
    finally:
        os._exit(code)


def _users_lines(home: Path, user: str) -> list[str]:
    path = home / "logs" / "users" / user / "INFO.log"
    return path.read_text(encoding="utf-8").splitlines() if path.exists() else []


@pytest.mark.filterwarnings("ignore:This process .* is multi-threaded:DeprecationWarning")  # the case under test
def test_fork_while_threads_log(daemon: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Forks while 4 threads roll segments: no child hangs, each entry lands once, the parent waits for no child."""
    monkeypatch.setattr(writer, "SEGMENT_BYTES", 2048)  # a roll every other entry: forks land mid-roll
    assert logger.delay("INFO", "warmup", "imports and settings loaded before any fork", timestamp=False).spooled
    stop = threading.Event()
    logged: list[list[str]] = [[] for _ in range(THREADS)]

    def work(t: int) -> None:
        n = 0
        while not stop.is_set():
            text = f"p{t}-{n:06d}"
            if logger.delay("INFO", f"fork{t}", text, timestamp=False).spooled:
                logged[t].append(text)
            n += 1
            if n % 4 == 0:
                time.sleep(0.0005)  # bounds the entries the daemon must drain

    logged_r, logged_w = os.pipe()
    release_r, release_w = os.pipe()
    children: dict[int, int] = {}  # pid -> child number
    exits: dict[int, int] = {}  # child number -> exit status
    rng = random.Random()
    threads = [threading.Thread(target=work, args=(t,)) for t in range(THREADS)]
    try:
        for thread in threads:
            thread.start()
        for i in range(CHILDREN):
            time.sleep(rng.uniform(0, 0.004))
            pid = os.fork()
            if pid == 0:
                _child(i, logged_w, release_r, release_w)
            children[pid] = i
        stop.set()
        for thread in threads:
            thread.join()
        writer_for(settings.current().spool_dir, False).close()  # seal the parent's last segment

        # Every child got through delay(): none inherited a held lock.
        arrived, deadline = 0, time.monotonic() + CHILD_TIMEOUT
        while arrived < CHILDREN and time.monotonic() < deadline:
            if select.select([logged_r], [], [], 0.1)[0]:
                arrived += len(os.read(logged_r, CHILDREN))
        assert arrived == CHILDREN, f"{CHILDREN - arrived} of {CHILDREN} forked children hung in delay()"

        # With every child still alive, the parent's entries drain: no child holds one of its segments locked.
        for t in range(THREADS):
            expected = [f"INFO:  {text}" for text in logged[t]]

            def drained(user: str = f"fork{t}", count: int = len(expected)) -> bool:
                return len(_users_lines(daemon, user)) >= count

            wait_for(drained, timeout=15,
                     what=f"thread {t}'s entries while the children live (a child holds a parent segment?)")
            assert _users_lines(daemon, f"fork{t}") == expected  # each once, in the thread's order

        os.close(release_w)
        release_w = -1
        deadline = time.monotonic() + CHILD_TIMEOUT
        while len(exits) < len(children) and time.monotonic() < deadline:
            for pid, i in children.items():
                if i not in exits:
                    done, status = os.waitpid(pid, os.WNOHANG)
                    if done:
                        exits[i] = os.waitstatus_to_exitcode(status)
            time.sleep(0.01)
        assert len(exits) == CHILDREN, f"{CHILDREN - len(exits)} forked children did not exit in time"
        assert set(exits.values()) == {0}, f"children whose entries were not spooled: {exits}"
    finally:
        stop.set()
        for thread in threads:
            if thread.ident is not None:
                thread.join()
        for pid, i in children.items():
            if i not in exits:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
        for fd in (logged_r, logged_w, release_r, release_w):
            if fd >= 0:
                os.close(fd)

    wait_written()
    kids = Counter(_users_lines(daemon, "forked"))
    assert kids == Counter(f"INFO:  c{i:03d}-{k}" for i in range(CHILDREN) for k in range(CHILD_ENTRIES))
    for t in range(THREADS):
        assert _users_lines(daemon, f"fork{t}") == [f"INFO:  {text}" for text in logged[t]]
    assert not list((daemon / "spool" / "quarantine").iterdir())


_UMASK_PRODUCER = """
import os, sys
os.umask(0o077)
from apilog import logger
assert logger.delay("INFO", "umask", "written under umask 077", timestamp=False).spooled
print("logged", flush=True)
sys.stdin.read()  # keeps its segment (and lock) until told to exit
"""


def test_segment_mode_ignores_umask(home: Path) -> None:
    """A producer with umask 077 still makes its segment 0640, so a daemon sharing only the group reads it."""
    producer = subprocess.Popen([sys.executable, "-c", _UMASK_PRODUCER], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, text=True)
    try:
        assert producer.stdout is not None and producer.stdin is not None
        assert producer.stdout.readline() == "logged\n"
        segments = list((home / "spool" / "segments").iterdir())
        assert len(segments) == 1
        assert oct(stat.S_IMODE(segments[0].stat().st_mode)) == oct(0o640)
        control.start(settings.load())
        try:
            wait_written()
            producer.stdin.close()
            assert producer.wait(10) == 0
        finally:
            control.stop(settings.load())
    finally:
        producer.kill()
        producer.wait()
    assert log_file(home, "users/umask/INFO.log") == "INFO:  written under umask 077\n"


_FULL_PRODUCER = """
import resource, sys
from apilog import logger
lost = sum(not logger.delay("INFO", "full", f"lost {n:03d}", timestamp=False).spooled for n in range(500))
print(lost, flush=True)
sys.stdin.readline()
resource.setrlimit(resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
kept = sum(logger.delay("INFO", "full", f"kept {n:03d}", timestamp=False).spooled for n in range(20))
print(kept, flush=True)
sys.stdin.read()
"""


def _no_room() -> None:
    """In the producer before exec: every write to a file fails with EFBIG (signal ignored), like a full disk."""
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (0, resource.RLIM_INFINITY))


def test_full_disk_leaves_no_pile_of_segments(home: Path) -> None:
    """500 calls that cannot spool leave at most a couple of segment files; once there is room, entries flow again."""
    # Its stderr is a pipe, read aside: a file would be refused too, and a full pipe would block it.
    producer = subprocess.Popen([sys.executable, "-c", _FULL_PRODUCER], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, preexec_fn=_no_room)  # noqa: PLW1509
    assert producer.stdout is not None and producer.stdin is not None and producer.stderr is not None
    stderr: list[str] = []
    reader = threading.Thread(target=lambda: stderr.append(producer.stderr.read()))  # type: ignore[union-attr]
    reader.start()
    try:
        assert producer.stdout.readline() == "500\n"  # none was spooled
        spool = home / "spool"
        files = list((spool / "segments").iterdir()) + list((spool / "tmp").iterdir())
        assert len(files) <= 2, f"{len(files)} segment files left by 500 failed calls"
        assert all(f.stat().st_size == 0 for f in files)
        producer.stdin.write("room again\n")
        producer.stdin.flush()
        assert producer.stdout.readline() == "20\n"
        control.start(settings.load())
        try:
            wait_written()
            producer.stdin.close()
            assert producer.wait(10) == 0
        finally:
            control.stop(settings.load())
    finally:
        producer.kill()
        producer.wait()
        reader.join()
    assert "".join(stderr).count("apilog: entry not spooled") == 500
    assert log_file(home, "users/full/INFO.log") == "".join(f"INFO:  kept {n:03d}\n" for n in range(20))
    assert not list((home / "spool" / "quarantine").iterdir())
