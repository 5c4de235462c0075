"""The `apilogd` command: run, start, stop, status, repair, seal-key, metrics, install-service."""

from __future__ import annotations

import json
import os
from pathlib import Path

import click

from apilog.clitools import Group, load_settings

from .process import control, units
from .process import metrics as daemon_metrics
from .process.report import StatusReport
from .process.service import Service

EXIT_STOPPED = 3  # LSB: program is not running


@click.group(cls=Group)
@click.version_option(package_name="apilog", prog_name="apilogd")
def main() -> None:
    """apilogd: drains the apilog spool into per-user, per-stream log files."""


@main.command()
def run() -> None:
    """Run in the foreground (for systemd: Type=notify)."""
    raise SystemExit(Service(load_settings()).run())


@main.command()
def start() -> None:
    """Start in the background; return once it is ready."""
    conf = load_settings()
    pid, started = control.start(conf)
    click.echo(f"apilogd started (pid {pid})" if started else f"apilogd is already running (pid {pid})")


@main.command()
def stop() -> None:
    """Stop gracefully and wait for the exit."""
    pid = control.stop(load_settings())
    click.echo("apilogd is not running" if pid is None else f"apilogd stopped (pid {pid})")


@main.command()
def repair() -> None:
    """Rebuild a damaged state file (apilogd must be stopped); nothing is written twice or dropped."""
    from .process.repair import repair as run_repair  # only for this command

    for line in run_repair(load_settings()):
        click.echo(line)


@main.command("seal-key")
def seal_key() -> None:
    """Print the verification key of the seals, once; keep it off this machine (`apilog verify --key`)."""
    from apilog.core.folder import Folder

    from .commit.sealer import KEY_NAME, take_verification_key

    conf = load_settings()
    try:
        with Folder.at(conf.state_dir) as state:
            text = take_verification_key(state)
            sealing = state.exists(KEY_NAME)
    except FileNotFoundError:
        text, sealing = None, False
    except OSError as exc:
        raise click.ClickException(f"cannot read {conf.state_dir}: {exc.strerror or exc} (run as apilogd's user)") from None
    if text is not None:
        click.echo(text)
        click.echo("apilogd: this is the only copy; it was removed from this machine. Keep it safe and off it: "
                   "`apilog verify --key FILE` needs it.", err=True)
        return
    if sealing:
        raise click.ClickException("the verification key was printed before and is no longer on this machine")
    raise click.ClickException("apilogd has sealed nothing yet: start it (`apilogd start`), then run `apilogd seal-key`")


@main.command()
def archive() -> None:
    """Rotate every live log file into archive/ now: the running daemon does it, else this process (`apilog archive`)."""
    rotated, failed = control.archive_now(load_settings())
    click.echo(f"rotated {rotated} live file{'s' if rotated != 1 else ''} into archive/")
    for problem in failed:
        click.echo(f"apilog: could not rotate {problem} (left live; apilogd retries it)", err=True)
    if failed:
        raise SystemExit(1)


@main.command()
def metrics() -> None:
    """Print apilogd's metrics in Prometheus text format: the running daemon's textfile, or what the disk says."""
    conf = load_settings()
    info = control.status(conf)
    path = daemon_metrics.textfile_path(conf.home)
    if info.pid is not None and path.is_file():
        click.echo(path.read_text(encoding="utf-8"), nl=False)
        return
    click.echo(daemon_metrics.stopped(info.backlog, info.quarantined), nl=False)


@main.command("install-service")
@click.option("--user", "scope", flag_value="user", help="Install a user unit (the default when not root).")
@click.option("--system", "scope", flag_value="system", help="Install the system unit (the default as root).")
@click.option("--dry-run", is_flag=True, help="Print the units and commands; change nothing.")
@click.option("--root", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Write the files under this folder and run no command (for packaging).")
def install_service(scope: str | None, dry_run: bool, root: Path | None) -> None:
    """Install apilogd's systemd units with this installation's paths and settings."""
    load_settings()  # refuse to install settings that would not start
    user = scope == "user" if scope else os.geteuid() != 0
    files, commands = units.plan(user=user, env=dict(os.environ), root=root)
    if dry_run:
        for unit in files:
            click.echo(f"# {unit.path} (mode {unit.mode:o})\n{unit.shown or unit.text}")
        for command in commands:
            click.echo(f"would run: {' '.join(command)}")
        return
    units.install(files)
    for unit in files:
        click.echo(f"wrote {unit.path}")
    if root is not None:
        return
    for command in commands:
        result = units.run(command)
        if result.returncode != 0:
            raise click.ClickException(f"{' '.join(command)} failed: {(result.stderr or result.stdout).strip()}")
        click.echo(f"ran {' '.join(command)}")
    if not user:
        click.echo("apps that log must be in the apilog group: usermod -aG apilog <the app's user>")


@main.command()
@click.option("--json", "as_json", is_flag=True, help="One JSON object, for scripts and monitoring.")
def status(as_json: bool) -> None:
    """Say whether apilogd runs, and how much waits in the spool (exit 0 running, 3 stopped)."""
    report = StatusReport.gather(load_settings())
    click.echo(json.dumps(report.as_json()) if as_json else report.as_text())
    raise SystemExit(0 if report.running else EXIT_STOPPED)
