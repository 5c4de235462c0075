"""`apilogd status --json`, `apilogd metrics` and the node_exporter textfile, compared with what was written."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from apilogd.process import control
from prometheus_client.parser import text_string_to_metric_families

from apilog import logger, settings
from apilog.spool.frame import frame

from .utils import segment, wait_for, wait_written

APILOGD = [sys.executable, "-m", "apilogd"]


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*APILOGD, *args], capture_output=True, text=True, timeout=60, check=False)


def _samples(text: str) -> dict[str, float]:
    """name{labels} -> value, parsed with prometheus_client's own parser (so the format is checked too)."""
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()) if k != "le")
            if "le" in sample.labels:
                continue
            found[sample.name + (f"{{{labels}}}" if labels else "")] = sample.value
    return found


def _textfile(home: Path) -> dict[str, float]:
    path = home / "metrics" / "apilogd.prom"
    return _samples(path.read_text()) if path.exists() else {}


def test_metrics_and_status_count_what_was_written(daemon: Path) -> None:
    """25 entries and one record of garbage: the counters say 25 written and 1 quarantined, in the textfile
    node_exporter reads, in `apilogd metrics`, and `status --json` agrees; the file is refreshed as more come."""
    for n in range(25):
        logger.delay("INFO", f"user{n % 5}", f"entry {n}", timestamp=False)
    fd = segment(daemon, "777-garbage.00000001.seg")
    os.write(fd, frame(b"this is not JSON"))
    os.close(fd)
    wait_written()
    wait_for(lambda: _textfile(daemon).get("apilog_entries_written_total") == 25, what="25 entries in the textfile")
    seen = _textfile(daemon)
    assert seen["apilog_quarantined_total"] == 1
    assert seen["apilog_up"] == 1
    assert seen["apilog_batches_total"] >= 1
    assert seen["apilog_batch_seconds_count"] == seen["apilog_batches_total"]
    assert seen["apilog_backlog_entries"] == 0
    assert seen["apilog_errors_total{kind=write}"] == 0
    assert os.stat(daemon / "metrics" / "apilogd.prom").st_mode & 0o777 == 0o644

    printed = _cli("metrics")
    assert printed.returncode == 0, printed.stderr
    assert _samples(printed.stdout)["apilog_entries_written_total"] >= 25

    wait_for(lambda: json.loads(_cli("status", "--json").stdout)["written_last_minute"] == 25, what="stats.json")
    status = _cli("status", "--json")
    assert status.returncode == 0
    state = json.loads(status.stdout)
    pid = control.running_pid(daemon)
    key_id = json.loads((daemon / "state" / "seal.key").read_text())["id"]
    limits = state.pop("limits")  # nobody limited, nothing dropped, room on the disk
    assert limits["suppressed"] == {} and limits["limited_now"] == [] and limits["log_disk_full"] is False
    assert limits["user_rate"] == 200 and limits["tree_bytes"] > 0 and limits["free_bytes"] > 0
    assert pid is not None and state | {"oldest_age_s": None} == {
        "running": True, "pid": pid, "backlog": 0, "oldest_age_s": None, "written_last_minute": 25,
        "quarantined": 1, "role": "local", "broker": None, "home": str(daemon), "logs": str(daemon / "logs"),
        "shards": None, "writer_shards": None, "owned_shards": None, "broker_error": None,
        "broker_warning": None,
        "seal": {"on": True, "key_id": key_id, "epoch": 0, "verification_key_waiting": True},
    }

    for n in range(10):
        logger.delay("WARN", "late", f"later {n}", timestamp=False)
    wait_written()
    wait_for(lambda: _textfile(daemon).get("apilog_entries_written_total") == 35, what="the textfile refreshed")


def test_a_stopped_daemon_says_so_in_its_textfile_and_metrics(home: Path) -> None:
    """After a clean stop the textfile says apilog_up 0; `apilogd metrics` then reports what waits on disk."""
    control.start(settings.load())
    logger.delay("INFO", "ana", "before the stop", timestamp=False)
    wait_written()
    control.stop(settings.load())
    assert _textfile(home)["apilog_up"] == 0
    for n in range(3):
        logger.delay("INFO", "ana", f"waiting {n}", timestamp=False)
    printed = _cli("metrics")
    assert printed.returncode == 0
    assert _samples(printed.stdout) == {"apilog_up": 0, "apilog_backlog_entries": 3, "apilog_quarantine_files": 0}
    status = _cli("status", "--json")
    assert status.returncode == 3
    assert json.loads(status.stdout)["running"] is False and json.loads(status.stdout)["backlog"] == 3
