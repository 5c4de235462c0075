"""APILOG_ROLE=forward/write over a broker apilog has no native client for (kombu's SQLAlchemy transport over SQLite)."""

from __future__ import annotations

import json
import os
import pickle
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
from apilogd.process import control
from apilogd.sources.kombu import KombuPublisher

from apilog import settings
from apilog.core import wire
from apilog.core.entry import build
from apilog.core.shards import queue_name
from apilog.core.streams import Registry

from .utils import Daemon, log_file, wait_for

pytest.importorskip("sqlalchemy")


@pytest.fixture
def broker(home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    url = f"sqla+sqlite:///{tmp_path / 'broker.db'}"
    monkeypatch.setenv("APILOG_BROKER_URL", url)
    monkeypatch.setenv("APILOG_ROLE", "write")  # `home` is the log host; app hosts are made by the tests
    settings.reset()
    return url


def _send(url: str, user: str, *texts: str) -> None:
    """Entries into the broker as a forwarder publishes them (its publisher, without its daemon)."""
    entries = [build("INFO", user, text, timestamp=False, registry=Registry(Path("/nonexistent")),
                     timestamps_default=False, max_entry_bytes=65536)[0] for text in texts]
    publisher = KombuPublisher(settings.load({"APILOG_HOME": "/nonexistent", "APILOG_BROKER_URL": url,
                                              "APILOG_ROLE": "forward"}))
    try:
        publisher.publish({0: entries})
    finally:
        publisher.close()


def _publish_raw(url: str, body: bytes, headers: dict[str, object], content_type: str = "application/json") -> None:
    from kombu import Connection, Exchange, Producer, Queue

    queue = Queue(queue_name(0), Exchange(queue_name(0), type="direct"), routing_key=queue_name(0))
    with Connection(url) as conn:
        Producer(conn.channel()).publish(body, routing_key=queue_name(0), exchange=queue.exchange, declare=[queue],
                                         headers=headers, content_type=content_type, content_encoding="utf-8")


def test_entries_travel_through_another_broker(broker: str, home: Path, tmp_path: Path) -> None:
    """An app host's delay() spools; its forwarder publishes to the broker; the log host's writer writes and acks."""
    app = {**os.environ, "APILOG_HOME": str(tmp_path / "app"), "APILOG_ROLE": "forward"}
    produce = ("from apilog import logger\n"
               "for n in range(30): logger.delay('INFO', 'bea', f'over the broker {n:02d}', timestamp=False)")
    subprocess.run([sys.executable, "-c", produce], env=app, check=True, timeout=60)
    forwarder = Daemon(tmp_path, env=app)
    try:
        assert forwarder.ready(), forwarder.stderr
        apilogd = [sys.executable, "-m", "apilogd", "status"]
        wait_for(lambda: "backlog:     0 entries" in subprocess.run(apilogd, env=app, capture_output=True, text=True).stdout,
                 what="the forwarder to empty its spool")
        status = subprocess.run(apilogd, capture_output=True, text=True)
        assert status.returncode == 3 and "backlog:     30 entries waiting" in status.stdout, status.stdout
        assert "broker:      sqla+sqlite:///" in status.stdout and "role:        write" in status.stdout
        control.start(settings.load())
        try:
            path = home / "logs" / "users" / "bea" / "INFO.log"
            wait_for(lambda: path.exists() and path.read_text().count("\n") == 30, what="the broker's entries")
            late = "from apilog import logger; logger.delay('WARN', 'bea', 'while running', timestamp=False)"
            subprocess.run([sys.executable, "-c", late], env=app, check=True, timeout=60)
            wait_for(lambda: (home / "logs" / "users" / "bea" / "WARN.log").exists(), what="a live entry")
        finally:
            control.stop(settings.load())
    finally:
        assert forwarder.stop() == 0, forwarder.stderr
    assert log_file(home, "users/bea/INFO.log") == "".join(f"INFO:  over the broker {n:02d}\n" for n in range(30))
    assert log_file(home, "users/bea/WARN.log") == "WARN:  while running\n"


def test_redelivered_message_is_written_once(broker: str, home: Path) -> None:
    """A message delivered twice (as a broker does after a lost ack) is written once; garbage is quarantined."""
    entry, _ = build("INFO", "cal", "only once", timestamp=False, registry=Registry(home),
                     timestamps_default=False, max_entry_bytes=65536)
    body = wire.task_body(entry)
    headers = {"task": wire.TASK_NAME, "id": entry.id, "lang": "py"}
    _publish_raw(broker, body, headers)
    control.start(settings.load())
    try:
        wait_for(lambda: (home / "logs" / "users" / "cal" / "INFO.log").exists(), what="the first delivery")
        _publish_raw(broker, body, headers)  # the same message again
        _publish_raw(broker, pickle.dumps(([], {}, {})), {**headers, "id": "pickled"}, "application/x-python-serialize")
        _send(broker, "cal", "after")
        wait_for(lambda: "after" in (home / "logs" / "users" / "cal" / "INFO.log").read_text(), what="the later entry")
    finally:
        control.stop(settings.load())
    assert log_file(home, "users/cal/INFO.log") == "INFO:  only once\nINFO:  after\n"
    internal = log_file(home, "system/INTERNAL.log")
    assert "quarantined broker message: content type 'application/x-python-serialize' refused" in internal
    assert json.loads((home / "state" / "ledger.json").read_text())["pending"] is None


def test_a_broker_that_fails_mid_run_is_survived(broker: str, home: Path, tmp_path: Path) -> None:
    """The broker's database locked for longer than its client waits: apilogd reconnects; each entry is written once."""
    _send(broker, "dee", *(f"before {n:02d}" for n in range(20)))
    daemon = Daemon(tmp_path)
    try:
        assert daemon.ready(), daemon.stderr
        path = home / "logs" / "users" / "dee" / "INFO.log"
        wait_for(lambda: path.exists() and path.read_text().count("\n") == 20, what="the first entries")
        _send(broker, "dee", *(f"after {n:02d}" for n in range(20)))
        db = sqlite3.connect(tmp_path / "broker.db", timeout=30)
        try:  # a broker that hangs, then fails: its client gives up after its own busy timeout
            db.execute("BEGIN EXCLUSIVE")
            wait_for(lambda: "broker connection lost" in daemon.stderr, timeout=40,
                     what="the daemon to meet the broker's failure")
        finally:
            db.rollback()
            db.close()
        wait_for(lambda: path.read_text().count("\n") == 40, timeout=30, what="the entries after the failure")
        assert daemon.proc.poll() is None
    finally:
        assert daemon.stop() == 0
    assert log_file(home, "users/dee/INFO.log") == "".join(
        [f"INFO:  before {n:02d}\n" for n in range(20)] + [f"INFO:  after {n:02d}\n" for n in range(20)])
    assert "Traceback" not in daemon.stderr


def test_damaged_delivered_ids_stop_a_broker_daemon_cleanly(broker: str, home: Path) -> None:
    """state/delivered.ids that is not text: one line naming it and `apilogd repair`, exit 78; repaired, it drains."""
    _send(broker, "eli", "kept")
    control.start(settings.load())
    control.stop(settings.load())
    ids = home / "state" / "delivered.ids"
    ids.write_bytes(ids.read_bytes() + b"\xff\xfe\x00 not an id\n")
    _send(broker, "eli", "waiting")
    run = subprocess.run([sys.executable, "-m", "apilogd", "run"], capture_output=True, text=True, timeout=60)
    assert run.returncode == 78 and "delivered.ids" in run.stderr and "apilogd repair" in run.stderr
    assert "Traceback" not in run.stderr and len(run.stderr.strip().splitlines()) == 1, run.stderr
    repair = subprocess.run([sys.executable, "-m", "apilogd", "repair"], capture_output=True, text=True, timeout=60)
    assert repair.returncode == 0 and "kept 1 readable ids" in repair.stdout, repair.stdout + repair.stderr
    control.start(settings.load())
    try:
        path = home / "logs" / "users" / "eli" / "INFO.log"
        wait_for(lambda: "waiting" in path.read_text(), what="the entry after the repair")
    finally:
        control.stop(settings.load())
    assert log_file(home, "users/eli/INFO.log") == "INFO:  kept\nINFO:  waiting\n"
