"""Attacks on the limits (docs/operations.md, "Limits"): the shared table, drop counters and notes, via a real apilogd.

Two kinds of attacker: an outside client of the web API (it picks user names, streams and
messages), and a member of the app's group (a second local user), who may add records to
the spool and update `spool/limits/table` but must not crash or hang the apps, stall or
crash apilogd, or make it lose other users' entries.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from apilog import settings
from apilog.spool import limits as table_format

from .test_limits import lines_of, mounted, numbers, suppressed_in
from .utils import Daemon, Site, wait_for, wait_written

TABLE = "spool/limits/table"

# A long-running app process of the site (a gunicorn worker): runs each line of Python it is sent, answers `out`.
APP_LOOP = """
import json, os, sys, time
from apilog import logger
for line in sys.stdin:
    scope = {"logger": logger, "os": os, "time": time}
    exec(line, scope)
    print(json.dumps(scope.get("out")), flush=True)
"""

# A member of the group holding the table's locks until killed: flock, and a record lock on the whole file (what
# the producers' and apilogd's byte-range locks conflict with).
HOLD_LOCK = """
import fcntl, os, time
fd = os.open("spool/limits/table", os.O_RDWR)
fcntl.flock(fd, fcntl.LOCK_EX)
fcntl.lockf(fd, fcntl.LOCK_EX)
print("locked", flush=True)
time.sleep(600)
"""


class App:
    """A long-running app process of the site's app user; `run` sends it a line of Python and returns its `out`."""

    def __init__(self, site: Site) -> None:
        self.err_path = site.root / f"app-{time.monotonic_ns()}.err"
        with open(self.err_path, "wb") as err:
            self.proc = subprocess.Popen([*site.python, "-c", APP_LOOP], cwd=site.home, env=site.env, text=True,
                                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err,
                                         user=site.app_user, group=site.app_user, extra_groups=[site.group],
                                         umask=0o022)

    @property
    def stderr(self) -> str:
        return self.err_path.read_text(errors="replace")

    def run(self, code: str) -> object:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(code + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        assert line, f"the app process died: {self.stderr[-2000:]}"
        return json.loads(line)

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait(10)


def _attacker(site: Site, code: str) -> subprocess.Popen[str]:
    """A process of the group member (the site's app user) running `code`, left running."""
    return subprocess.Popen([*site.python, "-c", code], cwd=site.home, env=site.env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            user=site.app_user, group=site.app_user, extra_groups=[site.group], umask=0o022)


def _hold_lock(site: Site) -> subprocess.Popen[str]:
    holder = _attacker(site, HOLD_LOCK)
    assert holder.stdout is not None and holder.stdout.readline() == "locked\n", holder.stderr
    return holder


def _as_member(site: Site, code: str) -> None:
    done = subprocess.run([*site.python, "-c", code], cwd=site.home, env=site.env, capture_output=True, text=True,
                          user=site.app_user, group=site.app_user, extra_groups=[site.group], umask=0o022)
    assert done.returncode == 0, done.stderr


def _text_in(site: Site, user: str, text: str) -> bool:
    log = site.home / "logs" / "users" / user / "INFO.log"
    return log.exists() and text in log.read_text(errors="replace")


def _stop(*procs: subprocess.Popen[str] | None) -> None:
    for proc in procs:
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait(10)


# ---------------------------------------------------------------- a member of the group and the table's lock


def test_a_group_member_holding_the_table_lock_never_stalls_apilogd(site: Site) -> None:
    """Attack: a group member takes the table's flock and keeps it (any read-only open may flock).

    Promise: apilogd never stalls. It takes the lock with a blocking flock (`locked(wait=True)`)
    at every look at the drop counters and every status report, so it stops draining for as
    long as the lock is held (and cannot be stopped: SIGTERM does not break the flock).
    """
    daemon = site.daemon()
    app = holder = None
    try:
        assert daemon.ready(), daemon.stderr
        app = App(site)
        app.run("out = logger.delay('INFO', 'ann', 'before').spooled")
        wait_for(lambda: _text_in(site, "ann", "before"), timeout=10, what="the first entry")
        holder = _hold_lock(site)
        time.sleep(2.5)  # apilogd's next look at the counters, and its next report
        assert app.run("out = logger.delay('INFO', 'ann', 'during').spooled") is True
        deadline = time.monotonic() + 8
        while not _text_in(site, "ann", "during") and time.monotonic() < deadline:
            time.sleep(0.1)
        assert _text_in(site, "ann", "during"), "apilogd stopped draining while a group member holds the table's lock"
    finally:
        _stop(holder)
        if app is not None:
            app.kill()
        daemon.kill()


def test_a_group_member_holding_the_table_lock_never_hangs_a_new_apps_delay(site: Site) -> None:
    """Attack: a group member holds the table's flock while a new app process (a worker just started) logs.

    Promise: delay() never blocks for the limits (a millisecond at most). A process opening the
    table waits up to 5 s (OPEN_WAIT_TRIES) for a shared lock it cannot get, in its first
    delay() (and in every fork child, whose at-fork hook reopens the table).
    """
    daemon = site.daemon()
    holder = None
    try:
        assert daemon.ready(), daemon.stderr
        holder = _hold_lock(site)
        code = ("import time\nfrom apilog import logger\nt = time.monotonic()\n"
                "logger.delay('INFO', 'bea', 'first call')\nprint(time.monotonic() - t)")
        done = subprocess.run([*site.python, "-c", code], cwd=site.home, env=site.env, capture_output=True,
                              text=True, timeout=60, user=site.app_user, group=site.app_user,
                              extra_groups=[site.group], umask=0o022)
        assert done.returncode == 0, done.stderr
        took = float(done.stdout.split()[-1])
        assert took < 0.5, f"the first delay() took {took:.1f} s while a group member held the table's lock"
    finally:
        _stop(holder)
        daemon.kill()


def test_a_group_member_zeroing_the_table_magic_never_hangs_a_delay(site: Site) -> None:
    """Attack: a group member writes four zero bytes over the table's magic (one pwrite; no process kept running).

    Promise: delay() never blocks for the limits. `_open_table` takes an all-zero magic for a
    table still being made and waits for it 5 s (OPEN_WAIT_TRIES), in the first delay() of
    every process started from then on (and in apilogd's start), for good.
    """
    daemon = site.daemon()
    try:
        assert daemon.ready(), daemon.stderr
        _as_member(site, f"import os\nfd = os.open({TABLE!r}, os.O_WRONLY)\nos.pwrite(fd, bytes(4), 0)")
        code = ("import time\nfrom apilog import logger\nt = time.monotonic()\n"
                "logger.delay('INFO', 'bea', 'first call')\nprint(time.monotonic() - t)")
        done = site.app_logs(code)
        assert done.returncode == 0, done.stderr
        took = float(done.stdout.split()[-1])
        assert took < 0.5, f"the first delay() took {took:.1f} s after a group member zeroed the table's magic"
    finally:
        daemon.kill()


def test_a_group_member_holding_the_table_lock_never_hangs_app_exit(site: Site) -> None:
    """Attack: a group member holds the table's flock while an app process that logs comes to exit.

    Promise: logging never hangs the app. The atexit hook `Limits.flush` took the lock with a
    blocking flock (`locked(wait=True)`), so the app process never exited while it was held
    (fixed meanwhile in the working tree: `flush` now uses `locked()`; kept as a regression test).
    """
    daemon = site.daemon()
    holder = None
    code = ("import sys\nfrom apilog import logger\nlogger.delay('INFO', 'cy', 'opened')\nprint('ready', flush=True)\n"
            "sys.stdin.readline()\nlogger.delay('INFO', 'cy', 'last words')\nprint('returning', flush=True)")
    app = subprocess.Popen([*site.python, "-c", code], cwd=site.home, env=site.env, text=True,
                           stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           user=site.app_user, group=site.app_user, extra_groups=[site.group], umask=0o022)
    try:
        assert daemon.ready(), daemon.stderr
        assert app.stdout is not None and app.stdin is not None
        assert app.stdout.readline() == "ready\n"
        holder = _hold_lock(site)
        app.stdin.write("go\n")
        app.stdin.flush()
        assert app.stdout.readline() == "returning\n"
        try:
            app.wait(5)
        except subprocess.TimeoutExpired:
            pytest.fail("the app process cannot exit while a group member holds the table's lock (atexit flush)")
    finally:
        _stop(holder, app)
        daemon.kill()


def test_a_lock_held_while_apilogd_starts_leaves_no_later_drop_silent(site: Site) -> None:
    """Attack: a group member holds the table's flock for 6 s while apilogd (re)starts, then lets go.

    Promise: every delay() is written or counted in a note. apilogd gives the table up for its
    whole life ("entries are not limited": `limits_for` caches None), while the apps, which open
    it fine once the lock is free, keep dropping entries past the rate limit and counting them
    in a table nobody reads: no note is ever written.
    """
    site.env = {**site.env, "APILOG_USER_RATE": "1", "APILOG_USER_BURST": "10"}
    first = site.daemon()
    assert first.ready(), first.stderr
    assert first.stop() == 0, first.stderr  # the table exists; now a restart (a deploy, systemd's Restart=)
    holder = _hold_lock(site)
    daemon = site.daemon()
    try:
        assert daemon.ready(), daemon.stderr
        _stop(holder)
        code = ("from apilog import logger\n"
                "print(sum(logger.delay('INFO', 'dee', f'dee #{n} x').spooled for n in range(100)))")
        done = subprocess.run([*site.python, "-c", code], cwd=site.home, env=site.env, capture_output=True, text=True,
                              timeout=60, user=site.app_user, group=site.app_user, extra_groups=[site.group])
        assert done.returncode == 0, done.stderr
        folder = site.home / "logs" / "users" / "dee"
        deadline = time.monotonic() + 8
        while time.monotonic() < deadline:
            if len(numbers("dee", folder)) + sum(suppressed_in(folder).values()) >= 100:
                break
            time.sleep(0.2)
        accounted = len(numbers("dee", folder)) + sum(suppressed_in(folder).values())
        assert accounted == 100, (f"{100 - accounted} of 100 calls neither written nor noted", suppressed_in(folder),
                                  daemon.stderr[-1000:])
    finally:
        _stop(holder)
        daemon.kill()


# ---------------------------------------------------------------- a member of the group rewriting the table


def test_a_group_member_truncating_the_table_never_crashes_apilogd(site: Site) -> None:
    """Attack: a group member truncates the table (it is group-writable): `truncate -s 0 spool/limits/table`.

    Promise: apilogd never crashes. Its `pread`s come back short and `struct.unpack` raises
    struct.error (not OSError): in `DropNotes.due` at every step (nothing drains), and in
    `recount` from `Service._report`, outside the loop's handler: apilogd exits.
    """
    daemon = site.daemon()
    try:
        assert daemon.ready(), daemon.stderr
        truncated = site.as_app(f"truncate -s 0 {TABLE}")
        assert truncated.returncode == 0, truncated.stderr
        time.sleep(3)  # a look at the counters and a report
        logged = site.app_logs("from apilog import logger; logger.delay('INFO', 'eve', 'after the cut')")
        assert logged.returncode == 0, logged.stderr
        deadline = time.monotonic() + 6
        while not _text_in(site, "eve", "after the cut") and time.monotonic() < deadline:
            time.sleep(0.1)
        assert daemon.proc.poll() is None, f"apilogd exited: {daemon.stderr[-1500:]}"
        assert _text_in(site, "eve", "after the cut"), f"apilogd stopped draining: {daemon.stderr[-1500:]}"
    finally:
        daemon.kill()


def test_a_truncated_table_never_makes_running_apps_lose_entries(site: Site) -> None:
    """Attack: a group member truncates the table while the app's workers run (they opened it before).

    Promise: every delay() is written or counted; one member must not silence every user.
    `Limits.admit` reads the short table, struct.error escapes it, and `_submit` reports
    "entry not spooled" on stderr: every entry of every user is lost, uncounted, for the
    worker's whole life (20 calls far under any limit: none should be dropped at all).
    """
    daemon = site.daemon()
    app = None
    try:
        assert daemon.ready(), daemon.stderr
        app = App(site)
        assert app.run("out = logger.delay('INFO', 'fay', 'fay #0 x').spooled") is True
        truncated = site.as_app(f"truncate -s 0 {TABLE}")
        assert truncated.returncode == 0, truncated.stderr
        spooled = app.run("out = sum(logger.delay('INFO', f'u{n}', f'u{n} #{n} x').spooled for n in range(20))")
        assert spooled == 20, f"{20 - spooled} of 20 entries neither spooled nor counted after the table was cut"
    finally:
        if app is not None:
            app.kill()
        daemon.kill()


def test_a_huge_spool_counter_never_makes_running_apps_lose_entries(site: Site) -> None:
    """Attack: a group member writes 2**64-1 into the table's `appended` counter (a pwrite of 8 bytes).

    Promise: every delay() is written or counted. A worker that shares its appends adds them to
    the counter and `struct.pack('<Q')` overflows: struct.error escapes `admit` (in
    `_share_appended`), the entry is "not spooled" and not counted, and so is every later one
    (its `_unshared` never goes back to 0).
    """
    daemon = site.daemon()
    app = None
    try:
        assert daemon.ready(), daemon.stderr
        app = App(site)
        assert app.run("out = logger.delay('INFO', 'gil', 'gil #0 x').spooled") is True
        _as_member(site, f"import os, struct\nfd = os.open({TABLE!r}, os.O_WRONLY)\n"
                         f"os.pwrite(fd, struct.pack('<Q', 2**64 - 1), {table_format._APPENDED_AT})")
        app.run("out = [logger.delay('INFO', 'gil', f'gil #{n} ' + 'y' * 2000).spooled for n in range(1, 50)]")
        folder = site.home / "logs" / "users" / "gil"

        def accounted() -> int:
            return len(set(numbers("gil", folder))) + sum(suppressed_in(folder).values())

        deadline = time.monotonic() + 10
        while accounted() < 50 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert accounted() == 50, f"{50 - accounted()} of 50 calls neither written nor noted ({suppressed_in(folder)})"
    finally:
        if app is not None:
            app.kill()
        daemon.kill()


# ---------------------------------------------------------------- an outside client: user names and streams


def test_many_users_then_other_streams_are_counted_when_the_note_table_is_full(home: Path, tmp_path: Path,
                                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """Attack: an outside client logs as 3,000 made-up users, each past its rate, then 20 users on six other streams
    (apilogd stopped meanwhile, as during a deploy; it is started after).

    Promise: every delay() is written or counted in a note (the overflow goes to the "other
    users" counter, "never lost"). The 3,000 counters fill the 1,024 note slots; the "other
    users" counter of each new (stream, reason) then finds its 16 probed slots taken and
    `Limits._count` drops the count silently (`elif location != OTHERS`).
    """
    monkeypatch.setenv("APILOG_USER_RATE", "0.1")
    monkeypatch.setenv("APILOG_USER_BURST", "1")
    settings.reset()
    conf = settings.load()
    code = ("from apilog import logger\nn = 0\n"
            "for r in range(2):\n    for i in range(3000):\n"
            "        n += logger.delay('INFO', f'u{i}', f'u{i} #{r}').spooled\n"
            "for s in ('WARN', 'DEBUG', 'LOGIN', 'ERROR', 'SECURITY ALERT', 'STRANGE ACTIVITY'):\n"
            "    for i in range(20):\n        n += logger.delay(s, f'u{i}', f'u{i} #{s}').spooled\nprint(n)")
    calls = 2 * 3000 + 6 * 20
    spooled = int(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60).stdout)
    daemon = Daemon(tmp_path)
    assert daemon.ready()
    wait_written()

    def accounted() -> tuple[int, dict[str, int]]:
        written = sum(1 for _, line in lines_of(conf.log_dir) if re.search(r":  u\d+ #", line))
        return written, suppressed_in(conf.log_dir)

    wait_for(lambda: sum(accounted()[1].values()) >= 3000, timeout=10, what="the notes of the first 3,000 drops")
    time.sleep(2)  # the notes of the rest, if they were counted
    written, notes = accounted()
    assert daemon.stop() == 0
    assert written == spooled
    assert written + sum(notes.values()) == calls, (
        f"{calls - written - sum(notes.values())} of {calls} calls neither written nor noted", notes)


def test_a_second_drop_episode_with_the_same_count_is_noted_over_a_broker(home: Path, tmp_path: Path) -> None:
    """Attack: an outside client goes past its rate by one entry, stops for a few seconds, and does it again.

    Promise: every delay() is written or counted in a note, on a forwarder too. The note's id is
    `note_id(key, count)`: the counter, freed after its first note, counts 1 again, so the
    second note has the first one's id, and the writer acks it as a redelivery (DeliveredIds)
    without writing it.
    """
    pytest.importorskip("sqlalchemy")
    url = f"sqla+sqlite:///{tmp_path / 'broker.db'}"
    writer_env = {**os.environ, "APILOG_BROKER_URL": url, "APILOG_ROLE": "write"}
    app = {**os.environ, "APILOG_HOME": str(tmp_path / "app"), "APILOG_ROLE": "forward", "APILOG_BROKER_URL": url,
           "APILOG_USER_RATE": "1", "APILOG_USER_BURST": "1"}
    writer = Daemon(tmp_path, env=writer_env)
    forwarder = None
    code = ("import sys\nfrom apilog import logger\n"
            "print(sum(logger.delay('INFO', 'ned', f'ned #{n} ' + sys.argv[1]).spooled for n in range(2)))")
    try:
        assert writer.ready(), writer.stderr
        forwarder = Daemon(tmp_path, env=app)
        assert forwarder.ready(), forwarder.stderr
        log = home / "logs" / "users" / "ned"
        for episode in ("first", "second"):
            done = subprocess.run([sys.executable, "-c", code, episode], env=app, capture_output=True, text=True,
                                  timeout=60)
            assert done.stdout.strip() == "1", done.stderr  # one written, one dropped past the rate
            if episode == "first":
                wait_for(lambda: sum(suppressed_in(log).values()) >= 1, timeout=10, what="the first note")
            time.sleep(5)  # the episode ends (2 s without a drop), is noted, and its counter is freed
        wait_for(lambda: len(numbers("ned", log)) == 2, timeout=10, what="both written entries")
        time.sleep(2)
        assert sum(suppressed_in(log).values()) == 2, (
            "the second episode's note was taken for a redelivery of the first", (log / "INFO.log").read_text())
    finally:
        if forwarder is not None:
            forwarder.stop()
        writer.stop()


def test_one_user_flooding_large_entries_never_silences_quiet_users(home: Path, tmp_path: Path,
                                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """Attack: while apilogd is stopped (a deploy: what the spool is for), one outside client sends 300 messages of
    30 KB (under the 64 KiB entry limit, a sixth of its burst) through an app worker, which then logs 100 small
    entries of a quiet user. The 48 MB file system of test_limits' flood test, every setting at its default.

    Promise: one user can never silence the other users ("past half of [the spool], already the
    entries of users who spent more than half their burst" are dropped). The "crowded" rule in
    `_take_token` counts the burst in entries, not bytes: 1,000 entries of 30 KB are 30 MB, six
    times the spool's budget (10%: 4.8 MB), so the flooder fills the spool alone without ever
    being cut at half, and `admit` then drops the quiet user's entries as "spool full". (With
    apilogd running the same happens whenever the flood outruns the drain: in one run on a
    loaded machine a 6 s flood of 30 KB entries cost two quiet users 41% and 21% of theirs.)
    """
    with mounted(tmp_path / "fs", 48) as fs:
        monkeypatch.setenv("APILOG_HOME", str(fs / "home"))
        settings.reset()
        conf = settings.load()
        code = ("import random\nfrom apilog import logger\n"
                "for n in range(300):\n"
                "    logger.delay('INFO', 'flood@x.com', f'flood@x.com #{n} {random.randbytes(15000).hex()}')\n"
                "print(sum(logger.delay('INFO', 'alice@x.com', f'alice@x.com #{n} x').spooled for n in range(100)))")
        served = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
        assert served.returncode == 0, served.stderr
        daemon = Daemon(tmp_path)
        assert daemon.ready()
        wait_written(timeout=30)
        folder = conf.log_dir / "users" / "alice@x.com"
        wait_for(lambda: len(numbers("alice@x.com", folder)) + sum(suppressed_in(folder).values()) >= 100,
                 timeout=10, what="alice's entries or notes")
        written, dropped = len(set(numbers("alice@x.com", folder))), suppressed_in(folder)
        flooder = suppressed_in(conf.log_dir / "users" / "flood@x.com")
        assert daemon.stop() == 0
        assert written == 100, (f"the quiet user lost {100 - written} of 100 entries to one flooder", dropped, flooder)


# ---------------------------------------------------------------- bad values of the new settings


def test_a_huge_user_burst_is_refused_naming_the_variable(home: Path, tmp_path: Path) -> None:
    """Attack (a mistyped setting): APILOG_USER_BURST of 400 digits.

    Promise: a bad value is a clear error naming the variable (apilogd refuses to start), or it
    works. `_int(1)` takes it; apilogd starts, and every delay() fails in `_take_token`
    (`self.burst * interval`: "int too large to convert to float"): entries lost, uncounted.
    """
    env = {**os.environ, "APILOG_USER_BURST": "9" * 400}
    daemon = Daemon(tmp_path, env=env)
    try:
        if not daemon.ready():
            assert "APILOG_USER_BURST" in daemon.stderr, daemon.stderr
            return
        code = "from apilog import logger\nfor n in range(3): logger.delay('INFO', 'ola', f'ola #{n} x')"
        done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
        folder = home / "logs" / "users" / "ola"
        deadline = time.monotonic() + 5
        while len(numbers("ola", folder)) < 3 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert len(numbers("ola", folder)) == 3, f"apilogd runs with this setting, and delay() loses: {done.stderr[-600:]}"
    finally:
        daemon.stop()


def test_a_tiny_user_rate_is_refused_naming_the_variable(home: Path, tmp_path: Path) -> None:
    """Attack (a mistyped setting): APILOG_USER_RATE=1e-320 with APILOG_USER_BURST=1.

    Promise: a setting means what it says, or is a clear error naming the variable. `_rate`
    takes it; `1.0 / rate` is inf, so `new - now > tau` (inf > inf) never holds: no limit at all.
    """
    env = {**os.environ, "APILOG_USER_RATE": "1e-320", "APILOG_USER_BURST": "1"}
    daemon = Daemon(tmp_path, env=env)
    try:
        if not daemon.ready():
            assert "APILOG_USER_RATE" in daemon.stderr, daemon.stderr
            return
        code = "from apilog import logger\nprint(sum(logger.delay('INFO', 'pat', f'pat #{n} x').spooled for n in range(50)))"
        done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
        assert int(done.stdout) == 1, f"{done.stdout.strip()} of 50 entries admitted at a rate of 1e-320/s, burst 1"
    finally:
        daemon.stop()
