"""docs/many-hosts.md over a real broker: app hosts forward their spools, sharded writers write, standbys take over.

Each host is its own APILOG_HOME (its own spool, state and log folder) and its own apilogd;
the brokers are real servers on loopback ports (tests/brokers.py).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from apilog.core.logfile import decode_user
from apilog.core.shards import queue_name, shard_of

from .brokers import Namespace, RabbitServer, RedisServer
from .utils import Daemon, wait_for

SHARDS = 4
PRODUCE = """
import sys, time
from apilog import logger
count, name, users, pause = int(sys.argv[1]), sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
took = []
for n in range(count):
    began = time.perf_counter()
    logger.delay("INFO", f"user{n % users}", f"{name} {n:06d}", timestamp=False)
    took.append(time.perf_counter() - began)
    time.sleep(pause)
took.sort()
print(took[int(len(took) * 0.99)] * 1000)  # delay()'s p99 in ms
"""


@pytest.fixture(params=["redis", "rabbitmq"])
def broker(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[RedisServer | RabbitServer]:
    server = RedisServer(tmp_path / "redis") if request.param == "redis" else RabbitServer(tmp_path / "rabbit")
    try:
        yield server
    finally:
        server.kill()


class Host:
    """One machine of the site: a home of its own and the apilogd of its role."""

    def __init__(self, tmp: Path, name: str, url: str, role: str, writer_shards: str = "all",
                 inside: list[str] | None = None) -> None:
        self.tmp = tmp
        self.inside = inside or []  # a prefix that runs its apilogd in a network namespace
        self.home = tmp / name
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("APILOG_")}
        self.env.update({"APILOG_HOME": str(self.home), "APILOG_BROKER_URL": url, "APILOG_ROLE": role,
                         "APILOG_SHARDS": str(SHARDS), "APILOG_WRITER_SHARDS": writer_shards})
        self.daemon: Daemon | None = None

    def start(self) -> Host:
        self.daemon = Daemon(self.tmp, env=self.env, python=[*self.inside, sys.executable, "-m"])
        assert self.daemon.ready(60), self.daemon.stderr
        return self

    def stop(self) -> None:
        if self.daemon is not None and self.daemon.proc.poll() is None:
            assert self.daemon.stop() == 0, self.daemon.stderr[-3000:]

    def kill(self) -> None:
        assert self.daemon is not None
        self.daemon.kill()

    def produce(self, count: int, name: str, users: int, pause: float = 0.0) -> subprocess.Popen[str]:
        """A producer process of this host; its stdout says its delay() p99 in ms."""
        return subprocess.Popen([sys.executable, "-c", PRODUCE, str(count), name, str(users), str(pause)], env=self.env,
                                stdout=subprocess.PIPE, text=True)

    def lines(self) -> dict[str, list[str]]:
        """Every user's INFO lines written on this host."""
        found = {}
        users = self.home / "logs" / "users"
        if users.is_dir():
            for folder in users.iterdir():
                try:
                    found[decode_user(folder.name)] = (folder / "INFO.log").read_text().splitlines()
                except FileNotFoundError:
                    continue  # the folder is made just before its first file
        return found


def _written(writers: list[Host]) -> tuple[Counter[str], dict[str, set[str]]]:
    """Every line written, counted, and for each user the writers that hold its file."""
    counted: Counter[str] = Counter()
    where: dict[str, set[str]] = {}
    for writer in writers:
        for user, lines in writer.lines().items():
            counted.update(lines)
            where.setdefault(user, set()).add(writer.home.name)
            for name in {line.split()[1] for line in lines}:  # per producer, in order in every file
                mine = [line for line in lines if line.split()[1] == name]
                assert mine == sorted(mine), f"{writer.home.name}: {user}'s lines of {name} out of order"
    return counted, where


def _on_their_shards_writer(where: dict[str, set[str]]) -> None:
    """Each user's files on the one writer of its shard: log-a owns shards 0-1, log-b 2-3."""
    for user, hosts in where.items():
        owner = "log-a" if shard_of(user, SHARDS) in (0, 1) else "log-b"
        assert hosts == {owner}, f"{user} (shard {shard_of(user, SHARDS)}) written on {hosts}"


def _each_once_on_its_writer(writers: list[Host], expected: Counter[str], timeout: float, settle: float) -> None:
    """Wait for every entry to be written, give a doubled one `settle` seconds to show, then check each once, on its writer."""
    wait_for(lambda: sum(_written(writers)[0].values()) >= sum(expected.values()), timeout=timeout,
             what="every entry on a writer")
    time.sleep(settle)  # anything doubled would show now
    counted, where = _written(writers)
    assert counted == expected
    _on_their_shards_writer(where)


def _expected(producers: dict[str, int], users: int) -> Counter[str]:
    return Counter(f"INFO:  {name} {n:06d}" for name, count in producers.items() for n in range(count))


def test_entries_travel_from_app_hosts_to_the_writer_of_their_shard_exactly_once(
        broker: RedisServer | RabbitServer, tmp_path: Path) -> None:
    """Two app hosts forward; two writers own two shards each; every entry lands once, on its shard's writer."""
    writers = [Host(tmp_path, "log-a", broker.url, "write", "0-1").start(),
               Host(tmp_path, "log-b", broker.url, "write", "2-3").start()]
    apps = [Host(tmp_path, f"app-{n}", broker.url, "forward").start() for n in (1, 2)]
    try:
        producers = {f"p{n}": 1500 for n in range(4)}
        procs = [apps[n % 2].produce(count, name, 20) for n, (name, count) in enumerate(producers.items())]
        assert [p.wait(120) for p in procs] == [0, 0, 0, 0]
        _each_once_on_its_writer(writers, _expected(producers, 20), timeout=90, settle=1)
    finally:
        for host in [*apps, *writers]:
            host.stop()


def test_a_killed_writer_restarted_writes_nothing_twice_and_a_standby_waits(
        broker: RedisServer | RabbitServer, tmp_path: Path) -> None:
    """SIGKILLs of a writer mid-stream, each followed by a restart: exactly once, the standby never writes;
    then the owner stops for good and the standby writes its shards within 30 s."""
    owner = Host(tmp_path, "log-a", broker.url, "write", "0-3").start()
    standby = Host(tmp_path, "log-s", broker.url, "write", "all").start()
    app = Host(tmp_path, "app-1", broker.url, "forward").start()
    try:
        producers = {"p0": 3000}
        proc = app.produce(3000, "p0", 20, 0.003)  # about 10 s: the kills land while entries flow
        for _ in range(3):
            time.sleep(0.7)
            owner.kill()
            time.sleep(3)  # systemd's RestartSec=: the standby must leave the shards to their owner meanwhile
            owner.start()
        assert proc.wait(120) == 0
        expected = _expected(producers, 20)
        wait_for(lambda: sum(_written([owner])[0].values()) >= 3000, timeout=90, what="the owner to write all")
        time.sleep(1)
        counted, _ = _written([owner, standby])
        assert counted == expected
        assert standby.lines() == {}, "the standby wrote while the owner lived"
        owner.stop()
        stopped = time.monotonic()
        later = app.produce(200, "p1", 20)
        assert later.wait(60) == 0
        wait_for(lambda: sum(len(v) for v in standby.lines().values()) >= 200, timeout=30,
                 what="the standby to take over")
        assert time.monotonic() - stopped < 30
        counted, _ = _written([owner, standby])
        assert counted == _expected({"p0": 3000, "p1": 200}, 20)
    finally:
        for host in (app, standby, owner):
            host.stop()


def test_a_broker_outage_only_grows_the_spool(broker: RedisServer | RabbitServer, tmp_path: Path) -> None:
    """The broker is down: delay() stays fast (it never touches the network), the forwarder says why it waits,
    and once the broker is back every entry arrives once."""
    writer = Host(tmp_path, "log-a", broker.url, "write").start()
    app = Host(tmp_path, "app-1", broker.url, "forward").start()
    try:
        assert app.produce(40, "early", 10).wait(60) == 0
        wait_for(lambda: sum(_written([writer])[0].values()) == 40, timeout=60, what="the first entries")
        if isinstance(broker, RabbitServer):
            time.sleep(5)  # RabbitMQ 3.10 registers a new quorum queue lazily: killed at once, it loses the queue
        broker.kill()
        began = time.monotonic()
        assert app.produce(500, "p0", 10).wait(60) == 0
        took = time.monotonic() - began
        status = subprocess.run([sys.executable, "-m", "apilogd", "status"], env=app.env, capture_output=True,
                                text=True, timeout=30)
        wait_for(lambda: "broker down:" in subprocess.run([sys.executable, "-m", "apilogd", "status"], env=app.env,
                                                          capture_output=True, text=True, timeout=30).stdout,
                 timeout=30, what="status to say the broker is down")
        broker.start()
        wait_for(lambda: sum(_written([writer])[0].values()) >= 540, timeout=90, what="entries after the outage")
        assert _written([writer])[0] == _expected({"early": 40, "p0": 500}, 10)
        assert took < 30, f"500 delay() calls took {took:.1f}s with the broker down: {status.stdout}"
    finally:
        app.stop()
        writer.stop()


def test_the_readmes_stock_worker_command_consumes_a_shard(broker: RedisServer | RabbitServer, tmp_path: Path) -> None:
    """`celery -A apilog worker -Q apilog.0,apilog.1` as docs/many-hosts.md writes it, with APILOG_BROKER_URL and
    APILOG_SHARDS set: a stock worker runs the forwarded messages of its shards (at least once)."""
    app = Host(tmp_path, "app-1", broker.url, "forward").start()
    worker_home = Host(tmp_path, "worker", broker.url, "write")
    try:
        assert app.produce(40, "p0", 10).wait(60) == 0
        wanted = {user for user in (f"user{n}" for n in range(10)) if shard_of(user, SHARDS) in (0, 1)}
        worker = subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", "apilog", "worker", "-Q", "apilog.0,apilog.1", "--pool=solo",
             "--without-gossip", "--without-mingle", "--without-heartbeat", "--loglevel=WARNING"],
            env=worker_home.env, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        try:
            def done() -> bool:
                found = worker_home.lines()
                return set(found) == wanted and sum(map(len, found.values())) == 4 * len(wanted)

            wait_for(done, timeout=60, what="the stock worker to write its shards' entries")
        finally:
            worker.terminate()
            _, err = worker.communicate(timeout=30)
        for user, lines in worker_home.lines().items():
            assert lines == [f"INFO:  p0 {n:06d}" for n in range(40) if f"user{n % 10}" == user], err[-2000:]
    finally:
        app.stop()


def test_a_site_through_writer_and_forwarder_kills_and_a_broker_pause(
        broker: RedisServer | RabbitServer, tmp_path: Path) -> None:
    """docs/many-hosts.md's whole promise: 2 app hosts x 2 producers x 3,000 entries; 2 writers owning 2 of 4 shards each and a
    standby; 3 SIGKILLs of writers, 1 of a forwarder, the broker paused 3 s. Every entry once, per-producer order
    in every file, each user's files on its shard's writer, and delay() p99 under 20 ms (it never waits on the network)."""
    writers = {"log-a": Host(tmp_path, "log-a", broker.url, "write", "0-1").start(),
               "log-b": Host(tmp_path, "log-b", broker.url, "write", "2-3").start()}
    standby = Host(tmp_path, "log-s", broker.url, "write", "all").start()
    apps = [Host(tmp_path, f"app-{n}", broker.url, "forward").start() for n in (1, 2)]
    try:
        producers = {f"p{n}": 3000 for n in range(4)}
        procs = [apps[n % 2].produce(count, name, 24, 0.002) for n, (name, count) in enumerate(producers.items())]
        for victim in ("log-a", "log-b", "log-a"):
            time.sleep(1.0)
            writers[victim].kill()
            writers[victim].start()
        time.sleep(0.5)
        apps[0].kill()
        apps[0].start()
        broker.pause(3)
        p99s = []
        for proc in procs:
            out, _ = proc.communicate(timeout=180)
            assert proc.returncode == 0
            p99s.append(float(out.strip()))
        _each_once_on_its_writer([*writers.values(), standby], _expected(producers, 24), timeout=120, settle=2)
        assert max(p99s) < 20, f"delay() p99 per producer (ms): {p99s}"
    finally:
        for host in [*apps, standby, *writers.values()]:
            host.stop()


@pytest.mark.parametrize("kind", ["redis", "rabbitmq"])
def test_a_forwarder_cut_off_for_10_s_loses_and_doubles_nothing(kind: str, tmp_path: Path) -> None:
    """An app host in its own network namespace, joined by a veth pair: its link is cut for 10 s mid-stream,
    while its producers go on. Nothing is lost, nothing doubled, per-producer order kept."""
    ns = Namespace(1)
    server = (RedisServer if kind == "redis" else RabbitServer)(tmp_path / kind, also_on=ns.outer_ip)
    try:
        writer = Host(tmp_path, "log-a", server.url, "write").start()
        app = Host(tmp_path, "app-1", server.url_on(ns.outer_ip), "forward", inside=ns.run()).start()
        try:
            assert app.produce(100, "early", 16).wait(60) == 0
            wait_for(lambda: sum(_written([writer])[0].values()) == 100, timeout=60, what="the first entries")
            if kind == "rabbitmq":
                time.sleep(5)  # RabbitMQ 3.10 registers a new quorum queue lazily (see the outage test)
            procs = [app.produce(1000, name, 16, 0.005) for name in ("p0", "p1")]
            time.sleep(1)
            ns.cut(down=True)
            time.sleep(2)
            during = sum(_written([writer])[0].values())
            time.sleep(8)
            assert sum(_written([writer])[0].values()) == during, "entries crossed a cut link: no partition"
            ns.cut(down=False)
            assert [proc.wait(120) for proc in procs] == [0, 0]
            wait_for(lambda: sum(_written([writer])[0].values()) >= 2100, timeout=120, what="entries after the cut")
            time.sleep(1)
            assert _written([writer])[0] == _expected({"early": 100, "p0": 1000, "p1": 1000}, 16)
        finally:
            app.stop()
            writer.stop()
    finally:
        server.kill()
        ns.close()


def test_status_warns_of_a_redis_that_can_lose_what_it_acknowledged(tmp_path: Path) -> None:
    """Redis without appendonly loses every entry it holds when it is killed: `apilogd status` says so."""
    server = RedisServer(tmp_path / "redis")
    try:
        host = Host(tmp_path, "app-1", server.url, "forward")
        status = [sys.executable, "-m", "apilogd", "status"]
        assert "warning:" not in subprocess.run(status, env=host.env, capture_output=True, text=True, timeout=30).stdout
        import redis

        redis.Redis.from_url(server.url).config_set("appendonly", "no")
        said = subprocess.run(status, env=host.env, capture_output=True, text=True, timeout=30).stdout
        assert "warning:     Redis runs without appendonly" in said, said
    finally:
        server.kill()


def test_a_crafted_broker_message_is_quarantined_and_the_rest_flows(
        broker: RedisServer | RabbitServer, tmp_path: Path) -> None:
    """Anyone who can publish to the broker can send garbage, a pickle, or a task of another name: each is kept in
    the writer's quarantine and reported in INTERNAL, and the entries around it are written once, in order."""
    writer = Host(tmp_path, "log-a", broker.url, "write").start()
    app = Host(tmp_path, "app-1", broker.url, "forward").start()
    try:
        assert app.produce(20, "before", 1).wait(60) == 0
        wait_for(lambda: sum(_written([writer])[0].values()) == 20, timeout=60, what="the first entries")
        shard = queue_name(shard_of("user0", SHARDS))
        if isinstance(broker, RedisServer):
            import redis

            conn = redis.Redis.from_url(broker.url)
            conn.lpush(shard, b"not json at all", b'{"body": "gAN9cQAu", "content-type": "application/x-python-serialize"}')
        else:
            from kombu import Connection

            with Connection(broker.url) as conn:
                channel = conn.default_channel
                for body, content_type, task in ((b"not json", "application/json", "apilog.log"),
                                                 (b"\x80\x03}q\x00.", "application/x-python-serialize", "apilog.log"),
                                                 (b"[[], {}, {}]", "application/json", "os.system")):
                    channel.basic_publish(channel.prepare_message(body, content_type=content_type,
                                                                  headers={"task": task, "id": "x"}),
                                          exchange="", routing_key=shard)
        assert app.produce(20, "after", 1).wait(60) == 0
        wait_for(lambda: sum(_written([writer])[0].values()) == 40, timeout=60, what="the entries after the garbage")
        time.sleep(1)
        assert _written([writer])[0] == _expected({"before": 20, "after": 20}, 1)
        internal = (writer.home / "logs" / "system" / "INTERNAL.log").read_text()
        assert internal.count("quarantined broker message") >= 2, internal
        assert len(list((writer.home / "spool" / "quarantine").iterdir())) >= 2
    finally:
        app.stop()
        writer.stop()


def test_a_writer_killed_while_it_holds_messages_loses_none(broker: RedisServer | RabbitServer, tmp_path: Path) -> None:
    """The writer has taken messages but cannot commit them (its journal is made immutable, so every batch fails
    and is retried), and is SIGKILLed then. A restarted writer gets every one of them back and writes each once."""
    writer = Host(tmp_path, "log-a", broker.url, "write").start()
    app = Host(tmp_path, "app-1", broker.url, "forward").start()
    journal = writer.home / "state" / "journal"
    if subprocess.run(["chattr", "+i", str(journal)], capture_output=True).returncode:
        pytest.skip("chattr +i is not supported on this file system")
    try:
        assert app.produce(30, "held", 5).wait(60) == 0
        assert writer.daemon is not None
        wait_for(lambda: "write failed" in writer.daemon.stderr, timeout=60, what="the writer to hold the messages")
        writer.kill()
        subprocess.run(["chattr", "-i", str(journal)], check=True)
        writer.start()
        wait_for(lambda: sum(_written([writer])[0].values()) >= 30, timeout=60, what="the held entries")
        time.sleep(1)
        assert _written([writer])[0] == _expected({"held": 30}, 5)
    finally:
        subprocess.run(["chattr", "-i", str(journal)], capture_output=True)
        app.stop()
        writer.stop()


def test_an_entry_published_twice_is_written_once(broker: RedisServer | RabbitServer, tmp_path: Path) -> None:
    """A forwarder that dies after the broker confirmed a batch, before its ledger moved, publishes the batch
    again; a writer that dies after its commit, before its ack, gets it again. Either way: written once."""
    from apilogd.sources import open_publisher

    from apilog import settings
    from apilog.core.entry import build
    from apilog.core.streams import Registry

    writer = Host(tmp_path, "log-a", broker.url, "write").start()
    entries = [build("INFO", "twice", f"once {n}", timestamp=False, registry=Registry(tmp_path / "none"),
                     timestamps_default=False, max_entry_bytes=65536)[0] for n in range(5)]
    publisher = open_publisher(settings.load({**writer.env, "APILOG_HOME": str(tmp_path / "app"), "APILOG_ROLE": "forward"}))
    try:
        shard = shard_of("twice", SHARDS)
        publisher.publish({shard: entries})
        wait_for(lambda: len(writer.lines().get("twice", [])) == 5, timeout=60, what="the first delivery")
        publisher.publish({shard: entries[2:]})  # the same entries again, as a forwarder's retry sends them
        publisher.publish({shard: [build("INFO", "twice", "later", timestamp=False, registry=Registry(tmp_path / "none"),
                                         timestamps_default=False, max_entry_bytes=65536)[0]]})
        wait_for(lambda: "INFO:  later" in writer.lines().get("twice", []), timeout=60, what="the later entry")
        assert writer.lines()["twice"] == [f"INFO:  once {n}" for n in range(5)] + ["INFO:  later"]
    finally:
        publisher.close()
        writer.stop()
