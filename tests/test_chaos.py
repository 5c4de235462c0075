"""Chaos: producers log while apilogd is SIGKILLed and restarted; every entry lands exactly once, in order."""

from __future__ import annotations

import multiprocessing
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from apilogd.process import control
from apilogd.process.instance import running_pid

from apilog import logger, settings
from apilog.core.logfile import decode_user
from apilog.core.tree import LogTree
from apilog.reading import archives, read_text
from apilog.spool.transport import writer_for

from .utils import take_seal_key, wait_for, wait_written

STREAMS = ("INFO", "LOGIN", "SECURITY ALERT")
USERS = 64  # many files per batch: a long append window for the kills to land in
PAD = "z" * 60
LINE = re.compile(r"^(?P<stream>[A-Z ]+):  p(?P<p>\d+) n(?P<n>\d+) (?P<pad>z*)$")


def _target(producer: int, n: int) -> tuple[str, str]:
    return f"user{(producer * 7 + n) % USERS}", STREAMS[n % len(STREAMS)]


def _produce(producer: int, count: int, returned: Any) -> None:
    settings.reset()
    rng = random.Random(producer)
    for n in range(count):
        user, stream = _target(producer, n)
        logger.delay(stream, user, f"p{producer} n{n:06d} {PAD}", timestamp=False)
        returned.value = n + 1  # delay() has returned for entries 0..n
        if n % 10 == 0:
            time.sleep(rng.uniform(0, 0.01))  # spread the calls over the whole run of kills
    writer_for(settings.current().spool_dir, False).close()


def _kill_daemon(home: Path) -> None:
    pid = running_pid(home)
    assert pid and pid > 0
    os.kill(pid, signal.SIGKILL)
    while running_pid(home) is not None:
        time.sleep(0.01)


def run_chaos(home: Path, producers: int, per_producer: int, kills: int, seed: int) -> dict[str, int]:
    """Log from `producers` processes while killing apilogd `kills` times and producer 0 once; check the result."""
    rng = random.Random(seed)
    conf = settings.load()
    control.start(conf)
    try:
        returned = _chaos(rng, home, conf, producers, per_producer, kills)
        # Rotation runs between batches and catches up once the drain is idle, through the kills too.
        wait_for(lambda: _rotated(home, conf.rotate_bytes), timeout=120, what="every file past the rotation size rotated")
    finally:
        control.stop(conf)
    return check_logs(home, returned, per_producer)  # with the daemon stopped: no rotation mid-check


def _rotated(home: Path, rotate_bytes: int) -> bool:
    """No live file holds more than APILOG_ROTATE_BYTES."""
    return all(p.stat().st_size <= rotate_bytes for top in ("users", "system") for p in (home / "logs" / top).rglob("*.log"))


def _chaos(rng: random.Random, home: Path, conf: settings.Settings, producers: int, per_producer: int,
           kills: int) -> list[int]:
    """Produce while killing; return how many calls of each producer returned."""
    ctx = multiprocessing.get_context("fork")
    returned = [ctx.Value("q", 0, lock=False) for _ in range(producers)]
    procs = [ctx.Process(target=_produce, args=(p, per_producer, returned[p])) for p in range(producers)]
    for proc in procs:
        proc.start()
    producer_kill = rng.randrange(kills)
    for k in range(kills):
        # A backlog piles up while the daemon restarts; soon after READY it is busy draining it.
        time.sleep(rng.uniform(0.0, 0.3))
        _kill_daemon(home)
        if k == producer_kill:
            os.kill(procs[0].pid, signal.SIGKILL)  # the app crashes too
        control.start(conf)
    for proc in procs:
        proc.join(300)
    assert procs[0].exitcode in (0, -signal.SIGKILL)
    assert all(proc.exitcode == 0 for proc in procs[1:])
    wait_written(timeout=120)
    return [r.value for r in returned]


def check_logs(home: Path, returned: list[int], per_producer: int) -> dict[str, int]:
    """Every entry whose delay() returned exactly once, whole, in its own file, in its producer's order.

    `returned[p]` entries of producer p had returned from delay(); the one after may or may not
    have reached the spool when its producer was killed, and none past it was ever called.
    """
    seen: dict[tuple[int, int], int] = {}
    torn = misplaced = reordered = 0
    for (user_dir, stem), text in _lineages(home).items():
        user = decode_user(user_dir)
        last: dict[int, int] = {}
        for line in text.split("\n")[:-1]:
            match = LINE.match(line)
            if not match or match["pad"] != PAD:
                torn += 1
                continue
            p, n = int(match["p"]), int(match["n"])
            seen[(p, n)] = seen.get((p, n), 0) + 1
            if _target(p, n) != (user, match["stream"]) or stem != match["stream"].replace(" ", "_"):
                misplaced += 1
            if n <= last.get(p, -1):
                reordered += 1
            last[p] = n
    expected = {(p, n) for p, count in enumerate(returned) for n in range(count)}
    in_flight = {(p, count) for p, count in enumerate(returned) if count < per_producer}
    counts = {
        "entries": len(expected),
        "lost": len(expected - seen.keys()),
        "doubled": sum(1 for c in seen.values() if c > 1),
        "torn": torn,
        "misplaced": misplaced,
        "reordered": reordered,
        "unexpected": len(seen.keys() - expected - in_flight),
    }
    internal = home / "logs" / "system" / "INTERNAL.log"
    notes = internal.read_text() if internal.exists() else ""
    # A producer killed inside write() may leave a torn record; that one is quarantined and reported.
    counts["internal_notes"] = notes.count("INTERNAL: ") - notes.count("INTERNAL: quarantined spool message: torn record")
    restarts = (home / "apilogd.out").read_text()
    counts["batches_redone"] = sum(int(n) for n in re.findall(r"redid (\d+) journaled batches", restarts))
    counts["archives"] = sum(1 for p in (home / "logs" / "archive").rglob("*") if p.is_file())
    return counts


def _lineages(home: Path) -> dict[tuple[str, str], str]:
    """Each user file's whole history, read as `apilog show` reads it: archives in rotation order, then live."""
    logs = home / "logs"
    parts: dict[tuple[str, str], list[str]] = {}
    folders = {p.name for base in (logs / "users", logs / "archive" / "users") if base.is_dir() for p in base.iterdir()}
    tree = LogTree(logs)
    for folder in sorted(folders):
        for path in archives(logs / "archive" / "users" / folder):
            parts.setdefault((folder, path.name.split(".", 1)[0]), []).append(read_text(tree, path, 1 << 30))
        for path in sorted((logs / "users" / folder).glob("*.log")) if (logs / "users" / folder).is_dir() else []:
            parts.setdefault((folder, path.stem), []).append(read_text(tree, path, 1 << 30))
    tree.close()
    return {key: "".join(texts) for key, texts in parts.items()}


def _assert_clean(counts: dict[str, int]) -> None:
    print("chaos:", counts)
    assert {k: v for k, v in counts.items() if k not in ("entries", "batches_redone", "archives")} == {
        "lost": 0, "doubled": 0, "torn": 0, "misplaced": 0, "reordered": 0, "unexpected": 0, "internal_notes": 0,
    }


def _chaos_test(home: Path, monkeypatch: pytest.MonkeyPatch, rotate_bytes: str | None,
                producers: int, per_producer: int, kills: int) -> None:
    """One chaos run; `batches_redone` in the printed counts says how many journaled batches the
    restarts after kills redid (the fixed crash points are in test_durability.py)."""
    if rotate_bytes:
        monkeypatch.setenv("APILOG_ROTATE_BYTES", rotate_bytes)
    seed = int(os.environ.get("APILOG_CHAOS_SEED", time.time()))
    print("seed", seed)
    counts = run_chaos(home, producers=producers, per_producer=per_producer, kills=kills, seed=seed)
    _assert_clean(counts)
    assert (counts["archives"] > 0) == bool(rotate_bytes)
    # The seals went through every kill too (docs/sealing.md): the untouched tree verifies against the key.
    key = take_seal_key(home / "verification.key")
    found = subprocess.run([sys.executable, "-m", "apilog", "verify", "--key", str(key)], capture_output=True, text=True)
    print("verify:", found.stdout.strip())
    assert found.returncode == 0, found.stdout


@pytest.mark.parametrize("rotate_bytes", [None, "1000"], ids=["no-rotation", "rotation"])
def test_chaos_kills(home: Path, monkeypatch: pytest.MonkeyPatch, rotate_bytes: str | None) -> None:
    """4 producers, 6,000 entries, 5 SIGKILLs of the daemon at random moments, one of a producer."""
    _chaos_test(home, monkeypatch, rotate_bytes, producers=4, per_producer=1500, kills=5)


@pytest.mark.stress
@pytest.mark.parametrize("rotate_bytes", [None, "5000"], ids=["no-rotation", "rotation"])
def test_chaos_kills_long(home: Path, monkeypatch: pytest.MonkeyPatch, rotate_bytes: str | None) -> None:
    """The long run: 6 producers, 60,000 entries, 25 SIGKILLs of the daemon, one of a producer."""
    _chaos_test(home, monkeypatch, rotate_bytes, producers=6, per_producer=10000, kills=25)
