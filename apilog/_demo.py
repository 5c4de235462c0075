"""`apilog demo`: start the daemon if needed, log the sample entries, wait for them, show the tree."""

from __future__ import annotations

import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import click

from .core.logfile import USERS, decode_user
from .core.seal import SEALS
from .settings import Settings
from .spool.backlog import committed_offsets, waiting

WAIT_SECONDS = 30.0


def log_samples() -> int:
    """Sample entries for a few users and streams; returns how many calls were made."""
    # Celery is loaded by the demo, not by every `apilog` command.
    from ._task import logger

    logger.delay(m="Log entry here.")
    logger.delay("INFO", "usera1@gizzleMail.com", "Viewed the billing page.", timestamp=True)
    logger.delay("ERROR", "system", "Payment provider timed out after 30s.")
    data = {"email": "usera1@gizzleMail.com", "ip": "203.0.113.7", "time_in": datetime.now().astimezone()}
    logger.delay("LOGIN", "usera1@gizzleMail.com", data, dict_to_string=True, heading="New Login")
    logger.delay("WARN", "userb2@gizzleMail.com", "Password will expire in 3 days.")
    logger.delay("SECURITY ALERT", "userb2@gizzleMail.com", "5 failed logins from 198.51.100.23")
    logger.delay("STRANGE ACTIVITY,INFO", "userb2@gizzleMail.com", "Exported 4,000 records at 03:12.")
    logger.delay("SCREEN,DEBUG", "system", "The demo printed this line and also wrote it to DEBUG.")
    return 8


def run(settings: Settings) -> None:
    started = subprocess.run([sys.executable, "-m", "apilogd", "start"], capture_output=True, text=True, check=False)
    if started.returncode != 0:
        raise click.ClickException(f"apilogd did not start: {(started.stderr or started.stdout).strip()}")
    click.echo(started.stdout.strip())
    calls = log_samples()
    begun = time.monotonic()
    while waiting(settings.spool_dir, committed_offsets(settings.state_dir))[0]:
        if time.monotonic() - begun > WAIT_SECONDS:
            raise click.ClickException(f"apilogd has not written the entries after {WAIT_SECONDS:.0f}s")
        time.sleep(0.05)
    click.echo(f"logged {calls} calls; apilogd wrote them in {time.monotonic() - begun:.2f}s\n")
    click.echo(f"{settings.log_dir}/")
    files = sorted(p for p in settings.log_dir.rglob("*") if p.is_file())
    for path in files:
        click.echo(f"  {_label(path.relative_to(settings.log_dir))}")
    for path in [p for p in files if p.relative_to(settings.log_dir).parts[0] != SEALS]:
        lines = path.read_text(encoding="utf-8").splitlines()[-6:]
        click.echo(f"\n==> {path.relative_to(settings.log_dir)} (last lines) <==")
        click.echo("\n".join(lines))
    click.echo("\napilogd keeps running; stop it with: apilogd stop")


def _label(relpath: Path) -> str:
    parts = relpath.parts
    if parts[0] == SEALS:
        return f"{relpath}    (the seal log: `apilog verify` checks every file against it)"
    if len(parts) == 3 and parts[0] == USERS and decode_user(parts[1]) != parts[1]:
        return f"{relpath}    (user {decode_user(parts[1])!r})"
    return str(relpath)
