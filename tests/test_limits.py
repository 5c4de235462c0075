"""Bounded (docs/operations.md, "Limits"): no flood, full disk or full spool takes the logs down; every drop counted."""

from __future__ import annotations

import contextlib
import gzip
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from apilogd.process import control

from apilog import settings

from .utils import Daemon, take_seal_key, wait_for, wait_written

SUPPRESSED = re.compile(r"apilog suppressed ([\d,]+) entries of (?:this user|the system|other users): "
                        r"(rate limit|spool full|log space|quota)")


@contextlib.contextmanager
def mounted(where: Path, size_mb: int, kind: str = "tmpfs") -> Iterator[Path]:
    """A small file system of our own at `where`: tmpfs, or ext4 on a loop device."""
    where.mkdir(parents=True, exist_ok=True)
    if kind == "tmpfs":
        command = ["mount", "-t", "tmpfs", "-o", f"size={size_mb}m", "tmpfs", str(where)]
    else:
        image = where.with_suffix(".img")
        with open(image, "wb") as handle:
            handle.truncate(size_mb << 20)
        subprocess.run(["mkfs.ext4", "-q", "-m", "0", str(image)], check=True, capture_output=True)
        command = ["mount", "-o", "loop", str(image), str(where)]
    if os.geteuid() != 0 or subprocess.run(command, capture_output=True).returncode != 0:
        pytest.skip("needs root and mount")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


def free_bytes(path: Path) -> int:
    fs = os.statvfs(path)
    return fs.f_bavail * fs.f_frsize


def fill(path: Path, leave: int = 0) -> Path:
    """Fill the file system of `path` with one file until `leave` bytes are free (or none)."""
    filler = path / "filler"
    with open(filler, "wb") as handle:
        block = b"\0" * (1 << 20)
        with contextlib.suppress(OSError):
            while (room := free_bytes(path) - leave) > 0:
                handle.write(block[:min(len(block), room)])
                handle.flush()
    return filler


def lines_of(*folders: Path) -> Iterator[tuple[Path, str]]:
    """Every line of every file below `folders` (a file name seen in an earlier folder is skipped: a kept copy), gzip
    unpacked by its magic; `.tmp` files skipped as any reader would."""
    seen = set()
    for path in [p for folder in folders for p in sorted(folder.rglob("*"))]:
        if not path.is_file() or path.name.endswith(".tmp") or (path.name.endswith(".gz") and path.name in seen):
            continue
        seen.add(path.name)
        raw = path.read_bytes()
        if raw[:2] == b"\x1f\x8b":
            raw = gzip.decompress(raw)
        for line in raw.decode("utf-8", "replace").splitlines():
            yield path, line


def suppressed_in(*folders: Path) -> dict[str, int]:
    """The counts of every suppression note below `folders`, by reason."""
    counts: dict[str, int] = {}
    for _, line in lines_of(*folders):
        match = SUPPRESSED.search(line)
        if match:
            counts[match.group(2)] = counts.get(match.group(2), 0) + int(match.group(1).replace(",", ""))
    return counts


def verify(key: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "apilog", "verify", "--key", str(key)], capture_output=True, text=True)


PRODUCER = """
import random, sys, time
from apilog import logger
user, seconds, size, spacing, count = sys.argv[1], float(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4]), int(sys.argv[5])
calls, end = 0, time.monotonic() + seconds
while time.monotonic() < end and calls < count:
    logger.delay("INFO", user, f"{user} #{calls} {random.randbytes(size // 2).hex()}")  # as little compressible as entries
    calls += 1
    if spacing:
        time.sleep(spacing)
print(calls)
"""


def produce(user: str, seconds: float, *, size: int = 100, spacing: float = 0.0, count: int = 10**9) -> subprocess.Popen[str]:
    """A producer process logging `user`'s entries (numbered) for `seconds`; it prints how many calls it made."""
    return subprocess.Popen([sys.executable, "-c", PRODUCER, user, str(seconds), str(size), str(spacing), str(count)],
                            stdout=subprocess.PIPE, text=True)


def numbers(user: str, *folders: Path) -> list[int]:
    """The numbers of `user`'s entries found below `folders` (each entry's first line names its user and number)."""
    pattern = re.compile(rf"INFO:  {re.escape(user)} #(\d+) ")
    return [int(m.group(1)) for _, line in lines_of(*folders) if (m := pattern.match(line))]


class Sampler(threading.Thread):
    """Watches a file system's free space, and keeps a copy of every archive of one user before it can be removed."""

    def __init__(self, fs: Path, archives: Path, keep: Path) -> None:
        super().__init__(daemon=True)
        self.fs, self.archives, self.keep = fs, archives, keep
        self.lowest = free_bytes(fs)
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.wait(0.05):
            self.lowest = min(self.lowest, free_bytes(self.fs))
            for path in self.archives.glob("*.gz") if self.archives.is_dir() else ():
                copy = self.keep / path.name
                if not copy.exists():
                    with contextlib.suppress(OSError):
                        shutil.copyfile(path, copy)


@pytest.mark.parametrize("kind", ["tmpfs", "ext4"])
def test_one_flooding_user_on_a_small_disk_is_bounded_counted_and_silences_nobody(
        home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kind: str) -> None:
    """One user floods 2 KB entries for 12 s on a 48 MB file system holding spool and logs; two others log 200 each.

    The quiet users lose nothing, free space never falls more than a few MB under APILOG_KEEP_FREE,
    the flooder's calls are each written or counted in a note, and the tree verifies after the
    removals of the flooder's archives.
    """
    flood_scenario(tmp_path, monkeypatch, kind, 12)


@pytest.mark.stress
@pytest.mark.parametrize("kind", ["tmpfs", "ext4"])
def test_the_flood_of_the_issue_for_25_seconds(home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                               kind: str) -> None:
    """The same for 25 s, as the flood was first tried from outside."""
    flood_scenario(tmp_path, monkeypatch, kind, 25)


def flood_scenario(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kind: str, seconds: float) -> None:
    with mounted(tmp_path / "fs", 48, kind) as fs:
        monkeypatch.setenv("APILOG_HOME", str(fs / "home"))
        monkeypatch.setenv("APILOG_ROTATE_BYTES", "256 KiB")  # archives to remove
        monkeypatch.setenv("APILOG_SEAL_EPOCH", "2")
        settings.reset()
        conf = settings.load()
        keep_free = conf.keep_free.of(os.statvfs(fs).f_blocks * os.statvfs(fs).f_frsize)
        daemon = Daemon(tmp_path)
        assert daemon.ready()
        key = take_seal_key(tmp_path / "seal.key")
        kept = tmp_path / "kept"
        kept.mkdir()
        sampler = Sampler(fs, conf.log_dir / "archive" / "users" / "flood@x.com", kept)
        sampler.start()
        flood = produce("flood@x.com", seconds, size=2000)
        quiet = [produce(user, 60, spacing=seconds / 250, count=200) for user in ("alice@x.com", "bob@x.com")]
        time.sleep(seconds / 2)
        assert control.status(conf).written_last_minute, "apilogd stopped draining during the flood"
        calls = int(flood.communicate(timeout=60)[0])
        for producer in quiet:
            assert int(producer.communicate(timeout=120)[0]) == 200
        wait_written()

        # The flooder's files, and copies of its archives taken before the budget removed them.
        flooders = (conf.log_dir / "users" / "flood@x.com", conf.log_dir / "archive" / "users" / "flood@x.com", kept)

        def flood_accounted() -> int:
            return len(set(numbers("flood@x.com", conf.log_dir, kept))) + sum(suppressed_in(*flooders).values())

        wait_for(lambda: flood_accounted() >= calls, timeout=30, what="the last suppression note")
        sampler.done.set()
        sampler.join()
        status = json.loads(subprocess.run([sys.executable, "-m", "apilogd", "status", "--json"],
                                           capture_output=True, text=True).stdout)
        assert daemon.stop() == 0

        for user in ("alice@x.com", "bob@x.com"):
            assert sorted(numbers(user, conf.log_dir)) == list(range(200)), f"{user} lost entries"
        written = numbers("flood@x.com", *flooders)
        notes = suppressed_in(*flooders)
        assert len(set(written)) == len(written), "an entry written twice"
        assert notes and set(notes) <= {"rate limit", "spool full", "log space"}, notes
        assert len(set(written)) + sum(notes.values()) == calls, (len(set(written)), notes, calls)
        assert sampler.lowest >= keep_free - 5 * 2**20, (sampler.lowest, keep_free)
        removed = [line for _, line in lines_of(conf.log_dir) if "archives to keep the log tree" in line]
        assert removed, ("no archive was removed to make room", len(set(written)), notes, status["limits"])
        assert status["limits"]["suppressed"].get("rate limit")
        result = verify(key)
        assert result.returncode == 0, result.stdout + result.stderr


def test_past_every_budget_only_the_user_over_its_fair_share_is_dropped(home: Path, tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """With nothing left to remove (no archives), the user past its fair share of APILOG_MAX_USE is dropped and
    counted; a user under it is still written, whole."""
    monkeypatch.setenv("APILOG_MAX_USE", "2 MB")
    monkeypatch.setenv("APILOG_USER_RATE", "0")
    settings.reset()
    conf = settings.load()
    daemon = Daemon(tmp_path)
    assert daemon.ready()
    key = take_seal_key(tmp_path / "seal.key")
    flood = produce("flood@x.com", 60, size=2000, spacing=0.0005, count=3000)  # 6 MB: three times the whole budget
    quiet = produce("jo@x.com", 60, spacing=0.01, count=300)
    calls = int(flood.communicate(timeout=120)[0])
    assert int(quiet.communicate(timeout=120)[0]) == 300
    wait_written()
    flooder = conf.log_dir / "users" / "flood@x.com"
    wait_for(lambda: len(numbers("flood@x.com", flooder)) + sum(suppressed_in(flooder).values()) >= calls,
             timeout=30, what="the last suppression note")
    notes = suppressed_in(flooder)
    assert set(notes) == {"log space"}, notes
    assert len(set(numbers("flood@x.com", flooder))) + notes["log space"] == calls
    assert (flooder / "INFO.log").stat().st_size < 2_000_000  # about a fair share (two consumers of 2 MB), no more
    assert sorted(numbers("jo@x.com", conf.log_dir)) == list(range(300))
    assert daemon.stop() == 0
    result = verify(key)
    assert result.returncode == 0, result.stdout + result.stderr


def test_a_log_disk_filled_from_outside_holds_entries_until_space_returns(home: Path, tmp_path: Path,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """Another program fills the log disk: 500 entries wait in the spool, status says so, and all are written once after."""
    with mounted(tmp_path / "logs", 16) as logs:
        monkeypatch.setenv("APILOG_LOG_DIR", str(logs))
        settings.reset()
        conf = settings.load()
        daemon = Daemon(tmp_path)
        assert daemon.ready()
        key = take_seal_key(tmp_path / "seal.key")
        filler = fill(logs)
        producers = [produce(user, 60, count=250, spacing=0.002) for user in ("carol@x.com", "dave@x.com")]
        assert [int(p.communicate(timeout=60)[0]) for p in producers] == [250, 250]

        def full() -> bool:
            found = control.status(conf).limits or {}
            return bool(found.get("log_disk_full"))

        wait_for(full, timeout=20, what="status to say the log disk is full")
        shown = subprocess.run([sys.executable, "-m", "apilogd", "status"], capture_output=True, text=True).stdout
        assert "log disk full" in shown
        assert control.status(conf).backlog, "the entries were not kept in the spool"
        result = verify(key)  # nothing half-written while the disk is full
        assert result.returncode == 0, result.stdout + result.stderr
        filler.unlink()
        began = time.monotonic()
        wait_written(timeout=30)
        assert time.monotonic() - began < 30
        assert daemon.proc.poll() is None, "apilogd exited"
        for user in ("carol@x.com", "dave@x.com"):
            assert sorted(numbers(user, logs)) == list(range(250))
        wait_for(lambda: not full(), timeout=10, what="status to say the disk has room again")
        assert daemon.stop() == 0
        result = verify(key)
        assert result.returncode == 0, result.stdout + result.stderr


def test_a_disk_full_in_the_middle_of_a_batch_leaves_no_unsealed_bytes(home: Path, tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """A write fails half-way through a batch: its files go back to their sealed end (verify passes), then it is redone.

    8 KB stay free, which the budget's check sees as room for a batch of a few hundred bytes;
    but each new user's file takes a page of its own, so the third file's write fails.
    """
    with mounted(tmp_path / "logs", 8) as logs:
        monkeypatch.setenv("APILOG_LOG_DIR", str(logs))
        monkeypatch.setenv("APILOG_KEEP_FREE", "0")
        monkeypatch.setenv("APILOG_MAX_USE", "0")
        settings.reset()
        daemon = Daemon(tmp_path)
        assert daemon.ready()
        key = take_seal_key(tmp_path / "seal.key")
        users = [f"u{n}@x.com" for n in range(8)]
        code = ("import sys\nfrom apilog import logger\n"
                "for n in range(3):\n    for user in sys.argv[1:]:\n        logger.delay('INFO', user, f'{user} #{n} x')")
        filler = fill(logs, leave=8192)
        subprocess.run([sys.executable, "-c", code, *users], check=True)
        wait_for(lambda: "No space left" in daemon.stderr, timeout=20, what="a write to fail for lack of space")
        result = verify(key)
        assert result.returncode == 0, result.stdout + result.stderr
        filler.unlink()
        wait_written(timeout=30)  # out of the spool; the batch that failed is redone from the journal
        wait_for(lambda: all(len(numbers(user, logs)) >= 3 for user in users), timeout=30, what="the redo")
        for user in users:
            assert sorted(numbers(user, logs)) == [0, 1, 2]
        assert daemon.stop() == 0
        result = verify(key)
        assert result.returncode == 0, result.stdout + result.stderr


def test_a_full_spool_drops_and_counts_and_never_passes_its_budget(home: Path, tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """APILOG_SPOOL_MAX=4 MB, apilogd stopped, 20 MB offered by four processes: the spool stays in budget; all accounted."""
    monkeypatch.setenv("APILOG_SPOOL_MAX", "4 MB")
    monkeypatch.setenv("APILOG_USER_RATE", "0")
    settings.reset()
    conf = settings.load()
    users = ["erin@x.com", "finn@x.com", "gus@x.com", "hal@x.com"]
    producers = [produce(user, 120, size=2000, count=2500) for user in users]  # 4 x 2,500 x ~2.2 KB: about 20 MB
    calls = [int(p.communicate(timeout=120)[0]) for p in producers]
    spooled = sum(f.stat().st_size for f in (conf.spool_dir / "segments").iterdir())
    # The slack: each process shares its count every 64 KiB, and a segment's header.
    assert spooled <= 4_000_000 + len(users) * 64 * 1024 + 4096, spooled
    assert spooled >= 3_000_000, spooled
    daemon = Daemon(tmp_path)
    assert daemon.ready()
    wait_written()

    def accounted(user: str) -> int:
        return len(numbers(user, conf.log_dir / "users" / user)) + sum(suppressed_in(conf.log_dir / "users" / user).values())

    wait_for(lambda: all(accounted(user) >= n for user, n in zip(users, calls, strict=True)), timeout=30,
             what="the spool-full notes")
    for user, n in zip(users, calls, strict=True):
        assert len(set(numbers(user, conf.log_dir))) == len(numbers(user, conf.log_dir))
        assert accounted(user) == n, (user, accounted(user), n)
        assert set(suppressed_in(conf.log_dir / "users" / user)) == {"spool full"}
    assert daemon.stop() == 0


def test_worker_processes_share_one_user_rate(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Four processes flooding one user together get about one user's rate, not four times it."""
    monkeypatch.setenv("APILOG_USER_RATE", "100")
    monkeypatch.setenv("APILOG_USER_BURST", "50")
    settings.reset()
    code = ("import sys, time\nfrom apilog import logger\nend = time.monotonic() + 2\nn = 0\n"
            "while time.monotonic() < end:\n    n += logger.delay('INFO', 'ivy@x.com', 'x').spooled\nprint(n)")
    began = time.monotonic()
    procs = [subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True) for _ in range(4)]
    admitted = sum(int(p.communicate(timeout=60)[0]) for p in procs)
    elapsed = time.monotonic() - began
    assert admitted <= 50 + 100 * elapsed * 1.1, (admitted, elapsed)
    assert admitted >= 50 + 100 * 1.5, admitted  # and the user does get its rate


def test_status_and_the_web_view_say_who_is_limited_now(home: Path, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """A user past its rate shows in `apilogd status` (text and JSON), the metrics and `apilog web`'s users page."""
    pytest.importorskip("starlette")
    from starlette.testclient import TestClient

    from apilog.web.app import create_app

    monkeypatch.setenv("APILOG_USER_RATE", "10")
    monkeypatch.setenv("APILOG_USER_BURST", "10")
    settings.reset()
    daemon = Daemon(tmp_path)
    assert daemon.ready()
    produce("kim@x.com", 60, count=500).communicate(timeout=60)

    def shown() -> str:
        return subprocess.run([sys.executable, "-m", "apilogd", "status"], capture_output=True, text=True).stdout

    wait_for(lambda: "limited now: kim@x.com INFO: rate limit" in shown(), what="status to name the limited user")
    state = json.loads(subprocess.run([sys.executable, "-m", "apilogd", "status", "--json"],
                                      capture_output=True, text=True).stdout)
    assert state["limits"]["limited_now"][0]["user"] == "kim@x.com"
    assert state["limits"]["suppressed"]["rate limit"] >= 480
    metrics = subprocess.run([sys.executable, "-m", "apilogd", "metrics"], capture_output=True, text=True).stdout
    assert re.search(r'apilog_suppressed_total\{reason="rate limit"\} (\d+)', metrics)
    web = TestClient(create_app(settings.load(), "t" * 32), headers={"Authorization": "Bearer " + "t" * 32})
    assert web.get("/api/users").json()["limits"]["limited_now"][0]["user"] == "kim@x.com"
    page = web.get("/").text
    assert "Limited now" in page and "kim@x.com</a> INFO: rate limit" in page
    assert daemon.stop() == 0


def test_many_hosts_a_forwarder_limits_its_producers_and_a_writer_keeps_its_disk(home: Path, tmp_path: Path) -> None:
    """Over Redis: the app host's rate limit drops at delay(), its notes travel through the broker to the writer;
    the writer's own tree budget drops the user past its fair share there; every call is accounted on the writer."""
    from .brokers import redis_server

    with redis_server(tmp_path / "redis") as redis:
        common = {k: v for k, v in os.environ.items() if not k.startswith("APILOG_")}
        common |= {"APILOG_BROKER_URL": redis.url, "APILOG_SHARDS": "1"}
        writer_env = common | {"APILOG_HOME": str(tmp_path / "log-host"), "APILOG_ROLE": "write",
                               "APILOG_MAX_USE": "400 KB"}
        app_env = common | {"APILOG_HOME": str(tmp_path / "app-host"), "APILOG_ROLE": "forward",
                            "APILOG_USER_RATE": "100", "APILOG_USER_BURST": "100"}
        writer, forwarder = Daemon(tmp_path, env=writer_env), Daemon(tmp_path, env=app_env)
        try:
            assert writer.ready(60) and forwarder.ready(60)
            flood = subprocess.Popen([sys.executable, "-c", PRODUCER, "lee@x.com", "4", "2000", "0.0005", "4000"],
                                     env=app_env, stdout=subprocess.PIPE, text=True)
            calls = int(flood.communicate(timeout=60)[0])
            logs = tmp_path / "log-host" / "logs" / "users" / "lee@x.com"
            wait_for(lambda: len(numbers("lee@x.com", logs)) + sum(suppressed_in(logs).values()) >= calls,
                     timeout=60, what="every call written or noted on the writer")
            notes = suppressed_in(logs)
            assert notes.get("rate limit") and notes.get("log space"), notes
            assert len(set(numbers("lee@x.com", logs))) + sum(notes.values()) == calls
            assert not (tmp_path / "app-host" / "logs" / "users").exists()  # nothing written on the app host
        finally:
            assert forwarder.stop() == 0 and writer.stop() == 0


def test_a_spool_that_drains_as_fast_as_it_fills_never_counts_as_full(home: Path, tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """5 MB through a 1 MB spool budget while apilogd keeps up: what waits stays small, so nothing is dropped.

    (The producers' count of what waits must follow each batch, not only apilogd's recount every few seconds.)
    """
    monkeypatch.setenv("APILOG_SPOOL_MAX", "1 MB")
    monkeypatch.setenv("APILOG_USER_RATE", "0")
    settings.reset()
    conf = settings.load()
    daemon = Daemon(tmp_path)
    assert daemon.ready()
    producer = produce("mo@x.com", 60, size=2000, spacing=0.002, count=1500)  # about 5 MB in 4 s
    assert int(producer.communicate(timeout=120)[0]) == 1500
    wait_written()
    assert sorted(numbers("mo@x.com", conf.log_dir)) == list(range(1500))
    assert daemon.stop() == 0
