"""Benchmark apilog against its peers, side by side in one run; prints one table of medians and ratios.

    python bench/run.py            # the full table (several minutes)
    python bench/run.py --quick    # fewer calls and no 1M backlog, to try it out
    python bench/run.py --only web,users   # some groups of rows: callers, backlog, users, fsync, web, celery, brokers, seal,
                                           # limits (needs root: it mounts a tmpfs)

Every case runs in a fresh process and a fresh folder. Figures are medians over --rounds
rounds (the 1M backlog runs once). Caller latency is per `delay()`/`log()` call; "e2e" is
entries written per second: for the in-process peers from the first call until their
queue is flushed to the file, for apilog the drain of a backlog written with the daemon
stopped (from READY until the spool is empty), for stock Celery from its first written
line to its last.
"""

from __future__ import annotations

import argparse
import contextlib
import multiprocessing
import os
import random
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from unittest import mock

MESSAGE = "User 4711 changed the shipping address of order 98-1123; old and new kept in the audit trail"
USERS = 100
HERE = Path(__file__).resolve().parent
QUIET = ("alice@x.com", "bob@x.com")  # the well-behaved users of the limits rows
QUIET_CALLS, QUIET_SPACING = 200, 0.05  # entries each of them logs, and the pause between two of a user's
LIMITS_FLOOD = f"limits: {len(QUIET)} users {QUIET_SPACING} s apart, 1 flooding"
LIMITS_CALM = f"limits: {len(QUIET)} users {QUIET_SPACING} s apart, no flood"
SPOOL_MAX, SPOOL_OFFERED, SPOOL_PROCS = "4 MB", 10_000, 4  # 2 KB entries: 20 MB offered to a spool of 4 MB
LIMITS_SPOOL = f"limits: SPOOL_MAX={SPOOL_MAX}, {SPOOL_PROCS} x {SPOOL_OFFERED // SPOOL_PROCS:,} x 2 KB, all calls"
LIMITS_ON = "limits: delay(), defaults (limits on), 200 users"
LIMITS_OFF = "limits: delay(), USER_RATE=0 SPOOL_MAX=0, 200 users"


# ---------------------------------------------------------------- cases, each in its own process


def _latencies(call: Callable[[int], None], n: int, spacing: float = 0.0) -> tuple[list[int], float]:
    lat = []
    _READY[0]()  # every process of a case starts calling at once
    _BEGUN[0] = time.time()
    begun = time.perf_counter()
    for i in range(n):
        t = time.perf_counter_ns()
        call(i)
        lat.append(time.perf_counter_ns() - t)
        if spacing:
            time.sleep(spacing)
    return lat, time.perf_counter() - begun


_BEGUN = [0.0]  # wall clock at the first call, to add up several processes' e2e
_READY: list[Callable[[], Any]] = [lambda: None]


def _summary(lat: list[int], seconds: float, written: bool) -> dict[str, float]:
    """Latency percentiles and calls/s; with `written`, the interval from first call to all written."""
    lat.sort()
    out = {"p50": lat[len(lat) // 2] / 1000, "p99": lat[int(len(lat) * 0.99)] / 1000, "calls": len(lat) / seconds,
           "n": len(lat)}
    if written:
        out["begin"], out["end"] = _BEGUN[0], time.time()
    return out


def case_apilog(home: str, n: int, threads: int = 1, users: int = USERS) -> dict[str, float]:
    """`delay()` n times into the spool (daemon stopped); the drain is timed by the caller of this case."""
    os.environ["APILOG_HOME"] = home
    from apilog import logger, settings
    from apilog.spool.transport import writer_for

    logger.delay("INFO", "warmup", "warm up the registry and the segment")
    names = [f"user{i}" for i in range(users)]
    if threads == 1:
        lat, seconds = _latencies(lambda i: logger.delay("INFO", names[i % users], MESSAGE), n)
    else:
        results: list[list[int]] = []
        _READY[0]()
        _READY[0] = lambda: None
        begun = time.perf_counter()
        workers = [threading.Thread(target=lambda: results.append(
            _latencies(lambda i: logger.delay("INFO", names[i % users], MESSAGE), n // threads)[0]))
            for _ in range(threads)]
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        seconds = time.perf_counter() - begun
        lat = [x for r in results for x in r]
    writer_for(settings.current().spool_dir, settings.current().fsync == "always").close()
    return _summary(lat, seconds, False)


def case_apilog_paced(home: str, n: int, spacing: float = 0.05) -> dict[str, float]:
    """Well-behaved users: each of QUIET `delay()`s n numbered entries, `spacing` apart, from this one process."""
    os.environ["APILOG_HOME"] = home
    from apilog import logger

    logger.delay("INFO", "warmup", "warm up the registry and the segment")
    calls = [(user, f"{user} #{i} {MESSAGE}") for i in range(n) for user in QUIET]
    lat, seconds = _latencies(lambda i: logger.delay("INFO", *calls[i]), len(calls), spacing / len(QUIET))
    return _summary(lat, seconds, False)


def case_apilog_offered(home: str, n: int, size: int = 2000) -> dict[str, float]:
    """n numbered entries of `size` random characters (as tests/test_limits.py's PRODUCER writes them) for a user of
    this process's own, as fast as it can; the calls are also timed apart by their receipt: spooled or dropped."""
    os.environ["APILOG_HOME"] = home
    from apilog import logger

    logger.delay("INFO", "warmup", "warm up the registry and the segment")
    user = f"p{os.getpid()}@x.com"
    texts = [f"{user} #{i} {random.randbytes(size // 2).hex()}" for i in range(n)]
    spooled: list[bool] = []
    lat, seconds = _latencies(lambda i: spooled.append(logger.delay("INFO", user, texts[i]).spooled), n)
    out = {"dropped": float(spooled.count(False))}
    for tag, kept in (("ok_", True), ("drop_", False)):
        theirs = [t for t, s in zip(lat, spooled, strict=True) if s is kept]
        if theirs:
            summary = _summary(theirs, seconds, False)
            out.update({tag + k: summary[k] for k in ("p50", "p99")})
    return {**_summary(lat, seconds, False), **out}


def case_stdlib(folder: str, n: int) -> dict[str, float]:
    """stdlib QueueHandler -> QueueListener -> FileHandler."""
    import logging
    import logging.handlers
    import queue

    q: queue.SimpleQueue[Any] = queue.SimpleQueue()
    file_handler = logging.FileHandler(f"{folder}/stdlib.log")
    listener = logging.handlers.QueueListener(q, file_handler)
    log = logging.getLogger("bench")
    log.addHandler(logging.handlers.QueueHandler(q))
    log.setLevel(logging.INFO)
    log.propagate = False
    listener.start()
    lat, seconds = _latencies(lambda i: log.info(MESSAGE), n)
    listener.stop()  # returns once every queued record is in the file
    file_handler.close()
    return _summary(lat, seconds, True)


def case_loguru(folder: str, n: int) -> dict[str, float]:
    """loguru with enqueue=True to one file sink."""
    from loguru import logger

    logger.remove()
    logger.add(f"{folder}/loguru.log", enqueue=True, format="{time} {level} {message}")
    lat, seconds = _latencies(lambda i: logger.info(MESSAGE), n)
    logger.complete()
    logger.remove()  # stops the writer thread once the file has everything
    return _summary(lat, seconds, True)


def case_fsync_per_line(folder: str, n: int) -> dict[str, float]:
    """Raw append of one line, then fsync, per entry."""
    fd = os.open(f"{folder}/fsync.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o640)
    line = (MESSAGE + "\n").encode()

    def call(i: int) -> None:
        os.write(fd, line)
        os.fsync(fd)

    lat, seconds = _latencies(call, n)
    os.close(fd)
    return _summary(lat, seconds, True)


def case_celery(folder: str, n: int) -> dict[str, float]:
    """Stock Celery delay() over kombu's filesystem transport (the worker is timed by the caller)."""
    sys.path.insert(0, str(HERE))
    os.environ["BENCH_CELERY_DIR"] = folder
    from stock_celery import write_line

    lat, seconds = _latencies(lambda i: write_line.delay(f"{i} {MESSAGE}"), n)
    return _summary(lat, seconds, False)


CASES: dict[str, Callable[..., dict[str, float]]] = {
    "apilog": case_apilog,
    "apilog_paced": case_apilog_paced,
    "apilog_offered": case_apilog_offered,
    "stdlib": case_stdlib,
    "loguru": case_loguru,
    "fsync": case_fsync_per_line,
    "celery": case_celery,
}


def _child(name: str, folder: str, n: int, extra: dict[str, Any], out: Any, start: Any) -> None:
    os.environ.update(extra.pop("env", {}))
    _READY[0] = start.wait
    out.send(CASES[name](folder, n, **extra))


def run_case(name: str, folder: str, n: int, procs: int = 1, **extra: Any) -> dict[str, float]:
    """Run a case in `procs` fresh processes at once; latencies are the median of theirs, rates add up."""
    ctx = multiprocessing.get_context("spawn")
    start = ctx.Barrier(procs)
    pipes, workers = [], []
    for p in range(procs):
        sub = folder if name.startswith("apilog") or procs == 1 else f"{folder}/p{p}"  # apilog's producers share a spool
        os.makedirs(sub, exist_ok=True)
        mine, theirs = ctx.Pipe()
        workers.append(ctx.Process(target=_child, args=(name, sub, n // procs, dict(extra), theirs, start)))
        pipes.append(mine)
    for w in workers:
        w.start()
    results = [pipe.recv() for pipe in pipes]
    for w in workers:
        w.join()
    keys = list(dict.fromkeys(k for r in results for k in r))  # a process may have no dropped calls to time
    merged = {k: statistics.median(r[k] for r in results if k in r) for k in keys if k.endswith(("p50", "p99"))}
    merged.update({k: sum(r[k] for r in results) for k in ("calls", "dropped") if k in keys})
    if all("end" in r for r in results):
        span = max(r["end"] for r in results) - min(r["begin"] for r in results)
        merged["e2e"] = sum(r["n"] for r in results) / span
    return merged


# ---------------------------------------------------------------- apilog's daemon and stock Celery's worker


def drain(home: str, env: dict[str, str] | None = None) -> dict[str, float]:
    """Start `apilogd run`, time READY -> empty spool; report entries/s and the daemon's peak memory."""
    from apilog.spool.backlog import committed_offsets, waiting

    spool = Path(home) / "spool"
    count = waiting(spool, committed_offsets(Path(home) / "state"))[0]
    with _daemon({**os.environ, **(env or {}), "APILOG_HOME": home}) as proc:
        begun = time.perf_counter()
        segments = spool / "segments"
        while any(segments.iterdir()):
            time.sleep(0.005)
        seconds = time.perf_counter() - begun
        peak_kb = int(next(line.split()[1] for line in open(f"/proc/{proc.pid}/status") if line.startswith("VmHWM")))
    return {"entries": count, "e2e": count / seconds, "peak_mb": peak_kb / 1024}


def warm_drain(home: str, n: int, users: int) -> dict[str, float]:
    """A running apilogd that wrote to every user's file already: stopped (SIGSTOP) while n entries are
    written, then timed from SIGCONT until the spool is empty: the drain of a daemon in its steady state."""
    segments = Path(home) / "spool" / "segments"
    with _daemon({**os.environ, "APILOG_HOME": home}) as proc:
        run_case("apilog", home, users, users=users)
        while any(segments.iterdir()):
            time.sleep(0.01)
        time.sleep(1.5)  # past a checkpoint: the journal is empty
        proc.send_signal(signal.SIGSTOP)
        run_case("apilog", home, n, users=users)
        begun = time.perf_counter()
        proc.send_signal(signal.SIGCONT)
        while any(segments.iterdir()):
            time.sleep(0.005)
        seconds = time.perf_counter() - begun
    return {"entries": n, "e2e": n / seconds}


def celery_worker_rate(folder: str, n: int) -> float:
    """Run a stock worker over the backlog the celery case left; entries/s from first to last line."""
    env = {**os.environ, "BENCH_CELERY_DIR": folder, "PYTHONPATH": str(HERE)}
    out = Path(folder) / "celery.log"
    proc = subprocess.Popen(
        [sys.executable, "-m", "celery", "-A", "stock_celery", "worker", "--pool=solo", "--loglevel=WARNING",
         "--without-gossip", "--without-mingle", "--without-heartbeat"],
        env=env, cwd=folder, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if out.exists() and out.read_text().count("\n") >= n:
            break
        time.sleep(0.2)
    proc.terminate()
    proc.wait(30)
    stamps = [float(line.split(" ", 1)[0]) for line in out.read_text().splitlines()]
    return (len(stamps) - 1) / (stamps[-1] - stamps[0])


def backlog(home: str, n: int, procs: int) -> None:
    """Write n entries into a fresh spool with `procs` producer processes (the daemon stopped)."""
    run_case("apilog", home, n, procs=procs)


# ---------------------------------------------------------------- many hosts over a real broker


def _lines_written(log_dir: Path) -> int:
    total = 0
    for path in log_dir.glob("users/*/*.log"):
        with open(path, "rb") as handle:
            total += sum(chunk.count(b"\n") for chunk in iter(lambda h=handle: h.read(1 << 20), b""))
    return total


def broker_round(kind: str, base: Path, n: int) -> tuple[dict[str, float], dict[str, float]]:
    """n entries through a real broker: a forwarder empties an app host's spool into it (READY -> spool empty),
    then a writer drains the broker's backlog into files (READY -> every line written). Servers: tests/brokers.py."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from tests.brokers import RabbitServer, RedisServer

    server = (RedisServer if kind == "redis" else RabbitServer)(Path(fresh(base, f"{kind}-server")))
    try:
        site = {"APILOG_BROKER_URL": server.url, "APILOG_SHARDS": "4"}
        app = fresh(base, "app")
        backlog(app, n, 1)
        forwarded = drain(app, {**site, "APILOG_ROLE": "forward"})
        log = fresh(base, "log")
        env = {**os.environ, **site, "APILOG_HOME": log, "APILOG_ROLE": "write", "APILOG_WRITER_SHARDS": "0-3"}
        with _daemon(env) as proc:
            begun = time.perf_counter()
            while _lines_written(Path(log) / "logs") < n:
                time.sleep(0.05)
            seconds = time.perf_counter() - begun
            peak_kb = int(next(line.split()[1] for line in open(f"/proc/{proc.pid}/status") if line.startswith("VmHWM")))
        return forwarded, {"entries": n, "e2e": n / seconds, "peak_mb": peak_kb / 1024}
    finally:
        server.kill()


# ---------------------------------------------------------------- the limits (docs/operations.md, "Limits")


def flood_round(base: Path, flooded: bool) -> dict[str, float]:
    """QUIET's timed delay()s with apilogd running and spool, state and logs on a 48 MB tmpfs; with `flooded`, one user
    floods 2 KB entries meanwhile (tests/test_limits.py's scenario). Then what reached the files: QUIET's entries once the
    spool is empty, and the flooder's entries and suppression notes (it is accounted when they add up to its calls)."""
    sys.path.insert(0, str(HERE.parent))
    from apilogd.commit.budget import ENDED_AFTER, LOOK_EVERY

    from tests.test_limits import mounted, numbers, produce, suppressed_in
    from tests.utils import wait_for

    with mounted(Path(fresh(base, "fs")), 48) as fs, mock.patch.dict(os.environ, {"APILOG_HOME": str(fs / "home")}):
        home = fs / "home"
        users, archived = home / "logs" / "users", home / "logs" / "archive" / "users"
        with _daemon(dict(os.environ)):
            flood = produce("flood@x.com", QUIET_CALLS * QUIET_SPACING + 1, size=2000) if flooded else None
            result = run_case("apilog_paced", str(home), QUIET_CALLS, spacing=QUIET_SPACING)
            del result["calls"]  # paced: calls/s says nothing
            calls = int(flood.communicate(timeout=120)[0]) if flood else 0
            with contextlib.suppress(AssertionError):  # what is missing then is reported, not waited for
                wait_for(lambda: not any((home / "spool" / "segments").iterdir()), timeout=60, what="the drain")
            whose = {"quiet": ([users / user for user in QUIET], QUIET_CALLS * len(QUIET))}
            if flood:
                whose["flood"] = ([users / "flood@x.com", archived / "flood@x.com"], calls)

            def found(who: str) -> tuple[list[tuple[str, int]], dict[str, int]]:
                """Each entry found (its user and number; a user's live and archived files are one folder's name)."""
                folders = whose[who][0]
                return [(f.name, n) for f in folders for n in numbers(f.name, f)], suppressed_in(*folders)

            def accounted(who: str) -> bool:
                written, notes = found(who)
                return len(set(written)) + sum(notes.values()) >= whose[who][1]

            with contextlib.suppress(AssertionError):
                wait_for(lambda: all(accounted(who) for who in whose), timeout=30, what="the last suppression notes")
            time.sleep(ENDED_AFTER + LOOK_EVERY)  # a note made twice would be in by now
            for who, (_, offered) in whose.items():
                written, notes = found(who)
                result.update({f"{who}_offered": offered, f"{who}_written": len(set(written)),
                               f"{who}_twice": len(written) - len(set(written)),
                               **{f"{who}: {k}": v for k, v in notes.items()}})
    return result


def spool_budget_round(base: Path, offered: int, procs: int) -> dict[str, float]:
    """`offered` 2 KB entries from `procs` processes at once into a spool of SPOOL_MAX (apilogd stopped, no
    rate limit): the calls, and the spool's bytes at the end; then apilogd drains it and each entry must be in its
    file or counted in a "spool full" note (tests/test_limits.py)."""
    sys.path.insert(0, str(HERE.parent))
    from apilogd.commit.budget import ENDED_AFTER, LOOK_EVERY

    from apilog import settings
    from tests.test_limits import numbers, suppressed_in
    from tests.utils import wait_for

    home = fresh(base, "spool-budget")
    env = {"APILOG_SPOOL_MAX": SPOOL_MAX, "APILOG_USER_RATE": "0"}
    result = run_case("apilog_offered", home, offered, procs=procs, env=env)
    result["spool_bytes"] = sum(path.stat().st_size for path in (Path(home) / "spool" / "segments").iterdir())
    result["budget"] = settings.load({**env, "APILOG_HOME": home}).spool_max.of(0)
    users = Path(home) / "logs" / "users"

    def found() -> tuple[list[list[int]], dict[str, int]]:
        mine = [folder for folder in users.iterdir() if folder.name != "warmup"] if users.is_dir() else []
        return [numbers(folder.name, folder) for folder in mine], suppressed_in(*mine)

    def accounted() -> int:
        written, notes = found()
        return sum(len(set(w)) for w in written) + sum(notes.values())

    with _daemon({**os.environ, **env, "APILOG_HOME": home}), contextlib.suppress(AssertionError):
        wait_for(lambda: accounted() >= offered, timeout=60, what="the spool-full notes")
        time.sleep(ENDED_AFTER + LOOK_EVERY)  # a note made twice would be in by now
    written, notes = found()
    result.update({"offered": offered, "written": sum(len(set(w)) for w in written),
                   "twice": sum(len(w) - len(set(w)) for w in written), **{f"notes: {k}": v for k, v in notes.items()}})
    return result


def medians(results: list[dict[str, float]]) -> dict[str, float]:
    """Each figure's median over rounds: a latency over the rounds that timed one, a count missing in a round is 0 there."""
    keys = dict.fromkeys(k for r in results for k in r)
    return {k: statistics.median(r[k] for r in results if k in r) if k.endswith(("p50", "p99"))
            else statistics.median(r.get(k, 0.0) for r in results) for k in keys}


def accounting(calls: float, written: float, twice: float, notes: dict[str, float]) -> str:
    """`calls = written + suppressed (by reason): OK`, or by how much they differ; entries written twice named."""
    suppressed = sum(notes.values())
    reasons = ", ".join(f"{reason} {n:,.0f}" for reason, n in sorted(notes.items())) or "no notes"
    verdict = "OK" if calls == written + suppressed else f"DIFFERS by {written + suppressed - calls:+,.0f}"
    return (f"{calls:,.0f} calls, {written:,.0f} written + {suppressed:,.0f} suppressed ({reasons}): {verdict}"
            + (f"; {twice:,.0f} written twice" if twice else ""))


# ---------------------------------------------------------------- the web case


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _wrk_time(text: str) -> float:
    """A wrk latency (`850.00us`, `1.23ms`, `1.02s`) in microseconds."""
    for unit, scale in (("us", 1.0), ("ms", 1e3), ("s", 1e6)):
        if text.endswith(unit):
            return float(text[: -len(unit)]) * scale
    raise ValueError(text)


def web_round(kind: str, base: Path, seconds: int, connections: int) -> dict[str, float]:
    """gunicorn (2 sync workers, --preload) serving one logged entry per request, loaded by wrk; apilogd drains alongside."""
    folder = fresh(base, f"web-{kind}")
    env = {**os.environ, "BENCH_LOGGER": kind, "BENCH_DIR": folder, "APILOG_HOME": f"{folder}/home",
           "PYTHONPATH": str(HERE)}
    port = _free_port()
    with contextlib.ExitStack() as stack:
        if kind == "apilog":
            stack.enter_context(_daemon(env))
        server = subprocess.Popen([sys.executable, "-m", "gunicorn", "-w", "2", "--preload", "-b", f"127.0.0.1:{port}",
                                   "--log-level", "warning", "web_app:app"], env=env, cwd=HERE,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        stack.callback(lambda: (server.terminate(), server.wait(30)))
        url = f"http://127.0.0.1:{port}/"
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert time.monotonic() < deadline and server.poll() is None, "gunicorn did not start"
                time.sleep(0.1)
        wrk = ["wrk", "-t2", f"-c{connections}", "--latency"]
        subprocess.run([*wrk, "-d2s", url], capture_output=True, check=True)  # warm up
        out = subprocess.run([*wrk, f"-d{seconds}s", url], capture_output=True, text=True, check=True).stdout
    found: dict[str, float] = {}
    for line in out.splitlines():
        words = line.split()
        if line.startswith("Requests/sec:"):
            found["calls"] = float(words[1])
        elif len(words) == 2 and words[0] in ("50%", "99%"):
            found["p50" if words[0] == "50%" else "p99"] = _wrk_time(words[1])
    return found


def _as_the_unit_schedules() -> None:
    """Nice=10 and CPUSchedulingPolicy=batch, as systemd/apilogd.process.service runs the daemon."""
    os.nice(10)
    os.sched_setscheduler(0, os.SCHED_BATCH, os.sched_param(0))


@contextlib.contextmanager
def _daemon(env: dict[str, str]) -> Iterator[subprocess.Popen[bytes]]:
    """`apilogd run` with `env`, from READY=1 to SIGTERM."""
    with tempfile.TemporaryDirectory() as tmp, socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(f"{tmp}/n")
        proc = subprocess.Popen([sys.executable, "-m", "apilogd", "run"], env={**env, "NOTIFY_SOCKET": f"{tmp}/n"},
                                stderr=subprocess.DEVNULL, preexec_fn=_as_the_unit_schedules)
        sock.settimeout(60)
        while b"READY=1" not in sock.recv(4096):
            pass
        try:
            yield proc
        finally:
            proc.terminate()
            proc.wait(30)


# ---------------------------------------------------------------- the table


def median_of(rounds: int, run: Callable[[], dict[str, float]]) -> dict[str, float]:
    results = [run() for _ in range(rounds)]
    return {k: statistics.median(r[k] for r in results) for k in results[0]}


def fresh(base: Path, name: str) -> str:
    path = base / name
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    return str(path)


GROUPS = ("callers", "users", "backlog", "fsync", "web", "celery", "brokers", "seal", "limits")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--calls", type=int, default=100_000, help="calls per caller case")
    parser.add_argument("--procs", type=int, default=4, help="producer processes in the several-producer rows")
    parser.add_argument("--quick", action="store_true", help="10x fewer calls, no 1M backlog, shorter web runs")
    parser.add_argument("--only", default=",".join(GROUPS), help=f"comma-separated groups of rows: {', '.join(GROUPS)}")
    args = parser.parse_args()
    only = set(args.only.split(","))
    n = args.calls // 10 if args.quick else args.calls
    base = Path(tempfile.mkdtemp(prefix="apilog-bench-"))
    rows: list[tuple[str, dict[str, float]]] = []
    checks: list[str] = []  # counts that must add up, printed under the table

    def row(label: str, result: dict[str, float]) -> dict[str, float]:
        rows.append((label, result))
        print(f"  done: {label}", file=sys.stderr, flush=True)
        return result

    def apilog_round(procs: int) -> dict[str, float]:
        home = fresh(base, "apilog")
        caller = run_case("apilog", home, n, procs=procs)
        return {**caller, **drain(home)}

    if "callers" in only:
        for procs in (1, args.procs):
            tag = f"{procs} proc" + ("s" if procs > 1 else "")
            row(f"apilog delay() + drain, {tag}, {USERS} users",
                median_of(args.rounds, lambda p=procs: apilog_round(p)))
            row(f"stdlib QueueHandler, {tag}",
                median_of(args.rounds, lambda p=procs: run_case("stdlib", fresh(base, "std"), n, p)))
            row(f"loguru enqueue=True, {tag}",
                median_of(args.rounds, lambda p=procs: run_case("loguru", fresh(base, "lg"), n, p)))

    if "users" in only:
        entries = 30_000  # as many as the issue measured
        for users in (1, 1_000, 10_000):
            def cold(users: int = users) -> dict[str, float]:
                home = fresh(base, "users")
                run_case("apilog", home, users, users=users)  # every user's file exists before the timed drain
                drain(home)
                run_case("apilog", home, entries, users=users)
                return drain(home)

            row(f"apilog drain, {entries:,} over {users:,} users with files", median_of(args.rounds, cold))
            row(f"  same, apilogd already running, {users:,} users",
                median_of(args.rounds, lambda u=users: warm_drain(fresh(base, "users"), entries, u)))

    if "backlog" in only:
        sizes = [10_000, 100_000] + ([] if args.quick else [1_000_000])
        for size in sizes:
            rounds = 1 if size >= 1_000_000 else args.rounds

            def drained(size: int = size) -> dict[str, float]:
                home = fresh(base, "backlog")
                backlog(home, size, procs=args.procs)
                return drain(home)

            row(f"apilog drain, {size:,} waiting", median_of(rounds, drained))

    if "fsync" in only:
        fsync_n = max(500, n // 50)
        row("fsync per line, 1 proc", median_of(args.rounds, lambda: run_case("fsync", fresh(base, "fs"), fsync_n)))
        row(f"fsync per line, {args.procs * 2} procs",
            median_of(args.rounds, lambda: run_case("fsync", fresh(base, "fs"), fsync_n, procs=args.procs * 2)))
        always = {"env": {"APILOG_FSYNC": "always"}}
        always_n = n // 2  # enough for the drain to be timed, not only started
        for procs, threads in ((1, 1), (1, 8), (args.procs * 2, 1)):
            label = (f"apilog FSYNC=always, {procs} proc{'s' if procs > 1 else ''} "
                     f"x {threads} thread{'s' if threads > 1 else ''}")

            def durable(procs: int = procs, threads: int = threads) -> dict[str, float]:
                home = fresh(base, "always")
                caller = run_case("apilog", home, always_n, procs=procs, threads=threads, **always)
                return {**caller, **drain(home, {"APILOG_FSYNC": "always"})}

            row(label, median_of(args.rounds, durable))

    if "seal" in only:
        # Sealed and unsealed rounds alternate, so both meet the same moments of a noisy machine.
        for entries, users in ((n, USERS), (30_000, 10_000)):
            results: dict[str, list[dict[str, float]]] = {"1": [], "0": []}
            for _ in range(args.rounds):
                for sealed in ("1", "0"):
                    home = fresh(base, "seal")
                    run_case("apilog", home, users, users=users)  # every user's file exists before the timed drain
                    drain(home, {"APILOG_SEAL": sealed})
                    run_case("apilog", home, entries, users=users)
                    results[sealed].append(drain(home, {"APILOG_SEAL": sealed}))
            for sealed, label in (("1", "sealed"), ("0", "APILOG_SEAL=0")):
                row(f"apilog drain {label}, {entries:,} over {users:,} users",
                    {k: statistics.median(r[k] for r in results[sealed]) for k in results[sealed][0]})

    if "web" in only:
        seconds = 5 if args.quick else 15
        for kind in ("none", "apilog", "loguru", "stdlib"):
            row(f"web: gunicorn + wrk, {WEB_LABELS[kind]}",
                median_of(args.rounds, lambda k=kind: web_round(k, base, seconds, connections=16)))

    if "celery" in only:
        celery_n = 2000

        def celery_round() -> dict[str, float]:
            folder = fresh(base, "celery")
            caller = run_case("celery", folder, celery_n)
            return {**caller, "e2e": celery_worker_rate(folder, celery_n)}

        row(f"stock Celery + kombu filesystem, {celery_n:,} waiting", median_of(args.rounds, celery_round))
    if "brokers" in only:
        broker_n = 30_000
        row(f"apilog drain, {broker_n:,} waiting, local spool",
            median_of(args.rounds, lambda: (backlog(h := fresh(base, "local"), broker_n, 1), drain(h))[1]))
        for kind in ("redis", "rabbitmq"):
            results = [broker_round(kind, base, broker_n) for _ in range(args.rounds)]
            row(f"{kind}: forwarder, spool -> broker, {broker_n:,} waiting",
                {k: statistics.median(r[0][k] for r in results) for k in results[0][0]})
            row(f"{kind}: writer, broker -> files, {broker_n:,} waiting",
                {k: statistics.median(r[1][k] for r in results) for k in results[0][1]})
    if "limits" in only:
        import pytest  # mounted() skips with pytest's exception when it cannot mount

        # Flooded and calm rounds alternate, so both meet the same moments of a noisy machine; so do limits on and off.
        flooding: dict[bool, list[dict[str, float]]] = {True: [], False: []}
        try:
            for _ in range(args.rounds):
                for flooded in (True, False):
                    flooding[flooded].append(flood_round(base, flooded))
        except pytest.skip.Exception as exc:
            print(f"limits: group skipped: a 48 MB tmpfs for the flood row cannot be mounted ({exc.msg})", flush=True)
        else:
            for flooded, label in ((True, LIMITS_FLOOD), (False, LIMITS_CALM)):
                row(label, medians(flooding[flooded]))
                for i, r in enumerate(flooding[flooded], 1):
                    for who, name in (("quiet", "the well-behaved users"), ("flood", "the flooder")):
                        if f"{who}_offered" in r:
                            notes = {k.split(": ", 1)[1]: v for k, v in r.items() if k.startswith(f"{who}: ")}
                            counted = accounting(r[f"{who}_offered"], r[f"{who}_written"], r[f"{who}_twice"], notes)
                            checks.append(f"- {label}, round {i}, {name}: {counted}")

            budgets = [spool_budget_round(base, SPOOL_OFFERED, SPOOL_PROCS) for _ in range(args.rounds)]
            budget = medians(budgets)
            row(LIMITS_SPOOL, budget)
            row(f"  dropped (Receipt.spooled False), {budget['dropped']:,.0f} calls",
                {k: budget[f"drop_{k}"] for k in ("p50", "p99") if f"drop_{k}" in budget})
            row(f"  accepted, {SPOOL_OFFERED - budget['dropped']:,.0f} calls",
                {k: budget[f"ok_{k}"] for k in ("p50", "p99") if f"ok_{k}" in budget})
            for i, r in enumerate(budgets, 1):
                notes = {k.split(": ", 1)[1]: v for k, v in r.items() if k.startswith("notes: ")}
                slack = r["spool_bytes"] - r["budget"]
                checks.append(f"- limits, spool budget, round {i}: the spool held {r['spool_bytes']:,.0f} bytes at the end "
                              f"against {r['budget']:,.0f}: slack {slack:+,.0f} ({slack / r['budget']:+.1%}); "
                              f"{accounting(r['offered'], r['written'], r['twice'], notes)}; the receipts said "
                              f"{r['dropped']:,.0f} dropped")
            from apilog.spool.backlog import waiting

            costs: dict[str, list[dict[str, float]]] = {LIMITS_ON: [], LIMITS_OFF: []}
            for _ in range(args.rounds):
                for label, env in ((LIMITS_ON, {}), (LIMITS_OFF, {"APILOG_USER_RATE": "0", "APILOG_SPOOL_MAX": "0"})):
                    home = fresh(base, "limits-cost")
                    cost = run_case("apilog", home, n, users=200, env=env)
                    cost["spooled"] = waiting(Path(home) / "spool", {})[0] - 1  # but the warm-up call's
                    costs[label].append(cost)
            for label, each in costs.items():
                row(label, medians(each))
                spooled = ", ".join(f"{r['spooled']:,.0f}" for r in each)
                checks.append(f"- {label}: entries in the spool / calls, by round: {spooled} / {n:,}")
    shutil.rmtree(base, ignore_errors=True)
    print_table(rows, args, checks)


WEB_LABELS = {"none": "no logging", "apilog": "apilog (apilogd alongside)", "loguru": "loguru enqueue=True",
              "stdlib": "stdlib FileHandler"}


def print_table(rows: list[tuple[str, dict[str, float]]], args: argparse.Namespace, checks: list[str]) -> None:
    by = dict(rows)
    print(f"\nmedians of {args.rounds} rounds (1M backlog: 1 round); {os.cpu_count()} cores; Python {sys.version.split()[0]}\n")
    print(f"| {'case':<52} | {'p50 us':>7} | {'p99 us':>7} | {'calls/s':>9} | {'e2e entries/s':>13} | {'peak MB':>7} |")
    print(f"|{'-' * 54}|{'-' * 9}|{'-' * 9}|{'-' * 11}|{'-' * 15}|{'-' * 9}|")

    def cell(r: dict[str, float], k: str, fmt: str) -> str:
        return format(r[k], fmt) if k in r else "-"

    for label, r in rows:
        print(f"| {label:<52} | {cell(r, 'p50', '7.1f')} | {cell(r, 'p99', '7.1f')} | {cell(r, 'calls', '9,.0f')} "
              f"| {cell(r, 'e2e', '13,.0f')} | {cell(r, 'peak_mb', '7.1f')} |")

    def ratio(a: str, ka: str, b: str, kb: str) -> str:
        try:
            return f"{by[a][ka] / by[b][kb]:.2f}x"
        except KeyError:
            return "-"

    procs = f"{args.procs} procs"
    one = f"apilog delay() + drain, 1 proc, {USERS} users"
    many = f"apilog delay() + drain, {procs}, {USERS} users"
    print("\nratios")
    print(f"- delay() p50 / stdlib QueueHandler p50, 1 proc: {ratio(one, 'p50', 'stdlib QueueHandler, 1 proc', 'p50')}")
    print(f"- delay() p99 / stdlib QueueHandler p99, 1 proc: {ratio(one, 'p99', 'stdlib QueueHandler, 1 proc', 'p99')}")
    print(f"- delay() p50 / loguru p50, 1 proc: {ratio(one, 'p50', 'loguru enqueue=True, 1 proc', 'p50')}")
    print(f"- apilog drain ({USERS} users) / stdlib queue e2e, 1 proc: {ratio(one, 'e2e', 'stdlib QueueHandler, 1 proc', 'e2e')}")
    print(f"- apilog drain / stdlib queue e2e, {procs}: {ratio(many, 'e2e', f'stdlib QueueHandler, {procs}', 'e2e')}")
    print(f"- apilog drain / loguru e2e, 1 proc: {ratio(one, 'e2e', 'loguru enqueue=True, 1 proc', 'e2e')}")
    labels = [label for label, _ in rows]
    spread = [label for label in labels if " users with files" in label]
    for label in spread[1:]:
        print(f"- {label[13:]} / {spread[0][13:]}: {ratio(label, 'e2e', spread[0], 'e2e')}")
        warm, warm_one = labels[labels.index(label) + 1], labels[labels.index(spread[0]) + 1]  # the row after each
        print(f"  - apilogd already running: {ratio(warm, 'e2e', warm_one, 'e2e')}")
    print(f"- drain 100k / drain 10k: {ratio('apilog drain, 100,000 waiting', 'e2e', 'apilog drain, 10,000 waiting', 'e2e')}")
    print(f"- drain 1M / drain 100k: {ratio('apilog drain, 1,000,000 waiting', 'e2e', 'apilog drain, 100,000 waiting', 'e2e')}")
    for label, _ in rows:
        if label.startswith("apilog FSYNC=always"):
            # Like with like: as many callers as the fsync-per-line row it is held against.
            alone = label.endswith("1 proc x 1 thread")
            peer = "fsync per line, 1 proc" if alone else next(n for n, _ in rows if n.startswith("fsync per line, ")
                                                                and not n.endswith(" 1 proc"))
            print(f"- {label[7:]} / {peer}: e2e {ratio(label, 'e2e', peer, 'e2e')}, "
                  f"calls/s {ratio(label, 'calls', peer, 'calls')}")
    web = {kind: f"web: gunicorn + wrk, {text}" for kind, text in WEB_LABELS.items()}
    for kind in ("apilog", "loguru", "stdlib"):
        print(f"- web, {WEB_LABELS[kind]} / no logging: req/s {ratio(web[kind], 'calls', web['none'], 'calls')}, "
              f"p99 {ratio(web[kind], 'p99', web['none'], 'p99')}")
    print(f"- web, apilog / loguru: req/s {ratio(web['apilog'], 'calls', web['loguru'], 'calls')}, "
          f"p99 {ratio(web['apilog'], 'p99', web['loguru'], 'p99')}")
    print(f"- apilog drain / stock Celery worker: "
          f"{ratio(one, 'e2e', 'stock Celery + kombu filesystem, 2,000 waiting', 'e2e')}")
    for label in labels:
        if label.startswith("apilog drain sealed, "):
            peer = label.replace("sealed", "APILOG_SEAL=0")
            print(f"- {label[13:]} / {peer[13:]}: {ratio(label, 'e2e', peer, 'e2e')}")
    local = next((label for label in labels if label.endswith("waiting, local spool")), "")
    for label in labels:
        if label.startswith(("redis:", "rabbitmq:")):
            print(f"- {label} / {local}: {ratio(label, 'e2e', local, 'e2e')}")
    print(f"- limits, the well-behaved users' delay() with a user flooding / without: "
          f"p50 {ratio(LIMITS_FLOOD, 'p50', LIMITS_CALM, 'p50')}, p99 {ratio(LIMITS_FLOOD, 'p99', LIMITS_CALM, 'p99')}")
    dropped = next((label for label in labels if label.startswith("  dropped (Receipt.spooled False)")), "")
    accepted = next((label for label in labels if label.startswith("  accepted, ")), "")
    print(f"- limits, spool full: a dropped delay() / an accepted one: p50 {ratio(dropped, 'p50', accepted, 'p50')}, "
          f"p99 {ratio(dropped, 'p99', accepted, 'p99')}")
    print(f"- limits, delay() with limits on / off: p50 {ratio(LIMITS_ON, 'p50', LIMITS_OFF, 'p50')}, "
          f"p99 {ratio(LIMITS_ON, 'p99', LIMITS_OFF, 'p99')}")
    if checks:
        print("\ncounts that must add up")
        for line in checks:
            print(line)


if __name__ == "__main__":
    main()
