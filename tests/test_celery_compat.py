"""The lean `delay()` path writes standard Celery messages: a stock worker runs them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

from apilogd.sources.spool_reader import SpoolReader

from apilog import logger, settings
from apilog.core import wire
from apilog.core.folder import Folder
from apilog.spool.transport import writer_for

from .utils import log_file, wait_for

HERE = Path(__file__).resolve().parent


def test_stock_worker_runs_lean_messages(home: Path, tmp_path: Path) -> None:
    """Records from delay(), copied into kombu's filesystem queue, are run by `celery worker` as apilog.log."""
    logger.delay("INFO", "tess", "first, through a stock worker", timestamp=False)
    logger.delay("LOGIN", "tess", {"ip": "203.0.113.9"}, heading="New Login", timestamp=False)
    writer_for(settings.current().spool_dir, False).close()
    with Folder.at(settings.current().spool_dir / "segments") as segments:
        reader = SpoolReader(segments, {})
        reader.scan()
        records = reader.read(10, 1 << 20)
        reader.close()
    assert len(records) == 2

    broker = tmp_path / "broker"
    (broker / "done").mkdir(parents=True)
    for n, record in enumerate(records):
        assert json.loads(record.payload)["headers"]["task"] == wire.TASK_NAME
        # kombu's filesystem transport stores exactly what its `_put` was given, as JSON, in such a file.
        (broker / f"{int(time.time() * 1000) + n}_{uuid.uuid4()}.{wire.QUEUE}.msg").write_bytes(record.payload)

    env = {**os.environ, "COMPAT_BROKER_DIR": str(broker), "PYTHONPATH": str(HERE)}
    worker = subprocess.Popen(
        [sys.executable, "-m", "celery", "-A", "stock_worker_app", "worker", "-Q", wire.QUEUE, "--pool=solo",
         "--without-gossip", "--without-mingle", "--without-heartbeat", "--loglevel=WARNING"],
        env=env, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )
    try:
        login = home / "logs" / "users" / "tess" / "LOGIN.log"
        wait_for(lambda: login.exists() and login.stat().st_size > 0, timeout=60,
                 what="the stock worker to run the messages")
    finally:
        worker.terminate()
        _, err = worker.communicate(timeout=30)
    assert log_file(home, "users/tess/INFO.log") == "INFO:  first, through a stock worker\n", err
    assert log_file(home, "users/tess/LOGIN.log") == 'LOGIN: New Login\n{"ip":"203.0.113.9"}\n'
