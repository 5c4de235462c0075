"""The `apilogd` command: run, start, stop, status, repair, seal-key, metrics, install-service."""

from __future__ import annotations

import grp
import json
import os
from pathlib import Path
from typing import Any

import click

from apilog.clitools import Group, load_settings
from apilog.settings import Settings, redacted

from .process import control, units
from .process import metrics as daemon_metrics
from .process.service import Service

EXIT_STOPPED = 3  # LSB: program is not running


def _group_of(path: Path) -> str:
    try:
        gid = path.stat().st_gid
    except FileNotFoundError:
        return "- (no spool yet)"
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return str(gid)


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


def _limits_json(conf: Settings, limits: dict[str, Any] | None) -> dict[str, Any]:
    """The settings of the limits, and what the running daemon last reported of them."""
    found = dict(limits or {})
    found.update(user_rate=conf.user_rate, user_burst=conf.user_burst, user_quota=conf.user_quota,
                 max_use=str(conf.max_use), keep_free=str(conf.keep_free), spool_max=str(conf.spool_max))
    found.setdefault("log_disk_full", False)
    found.setdefault("suppressed", {})
    found.setdefault("limited_now", [])
    return found


def _limits_text(conf: Settings, limits: dict[str, Any] | None) -> list[str]:
    rate = f"{conf.user_rate:g}/s per user, bursts of {conf.user_burst}" if conf.user_rate else "no rate limit"
    lines = [f"limits:      {rate}; tree {conf.max_use}, keep {conf.keep_free} free; spool {conf.spool_max}"]
    if not limits:
        return lines
    if limits.get("log_disk_full"):
        free = limits.get("free_bytes")
        lines.append("warning:     log disk full: entries wait in the spool and are written once space returns"
                     + (f" ({free} bytes free)" if isinstance(free, int) else ""))
    suppressed = limits.get("suppressed") or {}
    if suppressed:
        lines.append("suppressed:  " + ", ".join(f"{n:,} ({reason})" for reason, n in sorted(suppressed.items())))
    lines.extend(f"limited now: {item.get('user')} {item.get('stream')}: {item.get('reason')}, "
                 f"{item.get('suppressed'):,} suppressed" for item in limits.get("limited_now") or [])
    return lines


@main.command()
@click.option("--json", "as_json", is_flag=True, help="One JSON object, for scripts and monitoring.")
def status(as_json: bool) -> None:
    """Say whether apilogd runs, and how much waits in the spool (exit 0 running, 3 stopped)."""
    from .commit.sealer import seal_status

    conf = load_settings()
    info = control.status(conf)
    sealing = seal_status(conf.state_dir, conf.seal and conf.role != "forward")
    if as_json:
        click.echo(json.dumps({
            "running": info.pid is not None, "pid": info.pid, "backlog": info.backlog,
            "oldest_age_s": info.oldest_age, "written_last_minute": info.written_last_minute,
            "quarantined": info.quarantined, "role": conf.role,
            "broker": redacted(conf.broker_url) if conf.broker_url and conf.role != "local" else None,
            "shards": conf.shards if conf.role != "local" else None,
            "writer_shards": sorted(conf.writer_shards) if conf.role == "write" else None,
            "owned_shards": info.owned_shards, "broker_error": info.broker_error,
            "broker_warning": control.durability_warning(conf),
            "home": str(conf.home), "logs": str(conf.log_dir), "seal": sealing,
            "limits": _limits_json(conf, info.limits),
        }))
        raise SystemExit(0 if info.pid is not None else EXIT_STOPPED)
    if info.pid is None:
        click.echo("apilogd is stopped")
    else:
        click.echo(f"apilogd is running (pid {info.pid})")
    click.echo(f"home:        {conf.home}")
    click.echo(f"logs:        {conf.log_dir}")
    click.echo(f"role:        {conf.role}" + {"local": " (spool -> files)", "forward": " (spool -> broker)",
                                                 "write": " (broker -> files)"}[conf.role])
    if conf.role != "local" and conf.broker_url:
        click.echo(f"broker:      {redacted(conf.broker_url)}, {conf.shards} shard{'s' if conf.shards > 1 else ''}")
    elif conf.broker_url:
        click.echo("warning:     APILOG_BROKER_URL is set but APILOG_ROLE is local: the broker is not used")
    if conf.role == "write":
        held = "-" if info.owned_shards is None else ",".join(map(str, info.owned_shards)) or "none (standing by)"
        click.echo(f"shards:      writes {','.join(map(str, sorted(conf.writer_shards)))}; holds {held}")
    warning = control.durability_warning(conf)
    if warning:
        click.echo(f"warning:     {warning}")
    if info.broker_error:
        click.echo(f"broker down: {info.broker_error} (entries wait in the spool; retrying)")
    click.echo(f"backlog:     {'unknown' if info.backlog is None else info.backlog} entries waiting")
    age = "-" if info.oldest_age is None else f"{info.oldest_age:.1f}s"
    click.echo(f"oldest:      {age}")
    if info.written_last_minute is not None:
        click.echo(f"written:     {info.written_last_minute} entries in the last minute")
    if sealing["on"]:
        key = "no key yet" if sealing["key_id"] is None else f"key {sealing['key_id']}, epoch {sealing['epoch']}"
        click.echo(f"sealing:     on ({key})")
        if sealing["verification_key_waiting"]:
            click.echo("warning:     the verification key is still on this machine: take it off with `apilogd seal-key`")
    else:
        click.echo("sealing:     off")
    click.echo(f"quarantined: {info.quarantined} spool messages (in {conf.spool_dir / 'quarantine'})")
    for line in _limits_text(conf, info.limits):
        click.echo(line)
    click.echo(f"spool group: {_group_of(conf.spool_dir)} (an app's user must be in it to log: usermod -aG <group> <user>)")
    raise SystemExit(0 if info.pid is not None else EXIT_STOPPED)
