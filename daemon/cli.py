"""The `apilogd` command: run, start, stop, status."""

from __future__ import annotations

import click

from apilog import settings as settings_module
from apilog.exceptions import ApilogError
from apilog.settings import Settings

from . import _control
from .service import Service

EXIT_STOPPED = 3  # LSB: program is not running


def _settings() -> Settings:
    try:
        return settings_module.load()
    except ApilogError as exc:
        raise click.ClickException(str(exc)) from None


@click.group()
def main() -> None:
    """apilogd: drains the apilog spool into per-user, per-stream log files."""


@main.command()
def run() -> None:
    """Run in the foreground (for systemd: Type=notify)."""
    try:
        code = Service(_settings()).run()
    except ApilogError as exc:
        raise click.ClickException(str(exc)) from None
    raise SystemExit(code)


@main.command()
def start() -> None:
    """Start in the background; return once it is ready."""
    conf = _settings()
    try:
        pid, started = _control.start(conf)
    except ApilogError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"apilogd started (pid {pid})" if started else f"apilogd is already running (pid {pid})")


@main.command()
def stop() -> None:
    """Stop gracefully and wait for the exit."""
    try:
        pid = _control.stop(_settings())
    except ApilogError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo("apilogd is not running" if pid is None else f"apilogd stopped (pid {pid})")


@main.command()
def status() -> None:
    """Say whether apilogd runs, and how much waits in the spool (exit 0 running, 3 stopped)."""
    conf = _settings()
    info = _control.status(conf)
    if info.pid is None:
        click.echo("apilogd is stopped")
    else:
        click.echo(f"apilogd is running (pid {info.pid})")
    click.echo(f"home:        {conf.home}")
    click.echo(f"logs:        {conf.log_dir}")
    click.echo(f"backlog:     {info.backlog} entries waiting")
    age = "-" if info.oldest_age is None else f"{info.oldest_age:.1f}s"
    click.echo(f"oldest:      {age}")
    click.echo(f"quarantined: {info.quarantined} spool messages")
    raise SystemExit(0 if info.pid is not None else EXIT_STOPPED)
