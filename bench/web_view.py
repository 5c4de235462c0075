"""Page times of `apilog web` over a big tree: 10,000 users, and one user with 1,000,000 entries (live and gzip archives).

    python bench/web_view.py            # builds the tree in a temporary folder, prints a table

The tree is written directly in apilog's format (apilogd's drain is measured elsewhere); the pages
are asked in-process through Starlette's test client, cold (first request of a new server) and warm.
"""

from __future__ import annotations

import gzip
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from urllib.parse import quote

from starlette.testclient import TestClient

from apilog import settings
from apilog.core.logfile import encode_user, render_text

USERS = 10_000
BIG = "big@example.com"
BIG_ENTRIES = 1_000_000
PER_ARCHIVE = 100_000
TOKEN = "bench"  # noqa: S105 - a token for this run only


def build(root: Path) -> None:
    now = time.time()
    for n in range(USERS):
        folder = root / "users" / encode_user(f"user{n}@example.com")
        folder.mkdir(parents=True)
        (folder / "INFO.log").write_text("".join(
            render_text("INFO", f"user {n} did thing {k}", heading=None, dict_to_string=False,
                        ts=now - 3600 * k, tz=None) for k in range(3)))
    big = encode_user(BIG)
    (root / "users" / big).mkdir(parents=True)
    (root / "archive" / "users" / big).mkdir(parents=True)
    spread = 30 * 86400 / BIG_ENTRIES  # a month of activity

    def chunk(first: int, count: int) -> bytes:
        return "".join(render_text("INFO", f"request {i} served in {i % 97} ms", heading=None, dict_to_string=False,
                                   ts=now - 30 * 86400 + i * spread, tz=None) for i in range(first, first + count)).encode()

    archives = BIG_ENTRIES // PER_ARCHIVE - 1
    for a in range(archives):
        name = f"INFO.{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime(now - 86400 * (archives - a)))}.log.gz"
        (root / "archive" / "users" / big / name).write_bytes(gzip.compress(chunk(a * PER_ARCHIVE, PER_ARCHIVE), 6))
    (root / "users" / big / "INFO.log").write_bytes(chunk(archives * PER_ARCHIVE, PER_ARCHIVE))
    (root / "users" / big / "SECURITY_ALERT.log").write_text(
        "".join(render_text("SECURITY ALERT", f"odd login {k}", heading=None, dict_to_string=False,
                            ts=now - 7200 * k, tz=None) for k in range(20)))


def timed(client: TestClient, url: str, rounds: int) -> tuple[float, float]:
    """(first, median of the rest) in ms."""
    times = []
    for _ in range(rounds):
        begun = time.perf_counter()
        response = client.get(url)
        times.append((time.perf_counter() - begun) * 1000)
        assert response.status_code == 200, (url, response.status_code)
    return times[0], statistics.median(times[1:])


def main() -> None:
    from apilog.web.app import create_app
    from apilog.web.trail import encode_cursor

    base = Path(tempfile.mkdtemp(prefix="apilog-webview-"))
    os.environ.update(APILOG_HOME=str(base / "home"), APILOG_LOG_DIR=str(base / "logs"))
    begun = time.perf_counter()
    build(base / "logs")
    print(f"tree built in {time.perf_counter() - begun:.1f}s: {USERS:,} users, {BIG} with {BIG_ENTRIES:,} entries",
          file=sys.stderr)
    settings.reset()
    client = TestClient(create_app(settings.load(), TOKEN), headers={"Authorization": f"Bearer {TOKEN}"})
    big = quote(BIG, safe="")
    second = client.get(f"/api/entries?user={big}&limit=200").json()["before"]
    deep = f"/u/{big}?before={second}"
    oldest = min((base / "logs" / "archive" / "users" / encode_user(BIG)).iterdir())
    inside = encode_cursor({"INFO": [str(oldest.relative_to(base / "logs")), 300_000]})  # a page in the oldest archive
    rows = [
        ("users page (10,000 users, 100 per page)", "/"),
        ("users page 50 (the last)", "/?page=99"),
        ("JSON users page", "/api/users"),
        ("timeline of the 1M-entry user, first page (200)", f"/u/{big}"),
        ("  its second page", deep),
        ("  a page inside its oldest gzip archive", f"/u/{big}?stream=INFO&before={inside}"),
        ("  only SECURITY ALERT", f"/u/{big}?stream=SECURITY%20ALERT"),
        ("  since 2h", f"/u/{big}?since=2h"),
        ("JSON entries, 200", f"/api/entries?user={big}"),
        ("timeline of a 3-entry user", "/u/user5000%40example.com"),
        ("search one user's 1M entries (first 200 hits)", f"/search?q=served+in+42&user={big}"),
    ]
    print("\n| page | first (ms) | warm median of 5 (ms) |\n|---|---|---|")
    for label, url in rows:
        first, warm = timed(client, url, 6)
        print(f"| {label} | {first:,.0f} | {warm:,.0f} |")


if __name__ == "__main__":
    main()
