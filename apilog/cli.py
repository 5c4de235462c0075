"""The `apilog` command: streams, reading the logs, archiving, and the demo."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from io import BufferedReader
from pathlib import Path
from typing import IO

import click

from . import _demo, reading
from . import settings as settings_module
from .clitools import Group, load_settings
from .core.logfile import SYSTEM, BadLocation, Written, file_stem, parse, user_dir
from .core.streams import Registry, normalize
from .settings import Settings


@click.group(cls=Group)
@click.version_option(package_name="apilog", prog_name="apilog")
def main() -> None:
    """apilog: per-user, per-stream logs for web API backends."""


@main.group(invoke_without_command=True)
@click.pass_context
def streams(ctx: click.Context) -> None:
    """List the known streams (or add and remove them)."""
    if ctx.invoked_subcommand is None:
        for name in Registry(load_settings().home).names():
            click.echo(name)


@streams.command("add")
@click.argument("name")
def streams_add(name: str) -> None:
    """Register a stream; running apps and apilogd see it at once."""
    stream = Registry(load_settings().home).add(name)
    click.echo(f"added {stream}")


@streams.command("remove")
@click.argument("name")
def streams_remove(name: str) -> None:
    """Unregister a stream; its files are kept."""
    stream = Registry(load_settings().home).remove(name)
    click.echo(f"removed {stream} (its files are kept)")


_COLOURS = {"ERROR": "red", "SECURITY ALERT": "magenta", "STRANGE ACTIVITY": "yellow", "WARN": "yellow",
            "LOGIN": "cyan", "DEBUG": "blue", "INTERNAL": "bright_black"}


def _show(item: Written, label: bool = False) -> None:
    """An entry as written; the stream name coloured on a terminal (click strips colour elsewhere)."""
    text = item.text
    if text.startswith(item.stream):  # the text format; a jsonl line is shown as it is
        text = click.style(item.stream, fg=_COLOURS.get(item.stream, "green"), bold=True) + text[len(item.stream):]
    prefix = click.style(f"{item.source}: ", dim=True) if label else ""
    click.echo(prefix + text, nl=False)


def _since(value: str | None) -> float | None:
    if value is None:
        return None
    try:
        return reading.since(value)
    except (ValueError, OverflowError):  # OverflowError: an age past the calendar's range
        raise click.BadParameter(f"{value!r}: give an ISO date/time or an age like 30m, 2h, 7d") from None


def _location(location: str) -> str:
    try:
        user_dir(location)
    except BadLocation as exc:
        raise click.ClickException(f"bad user name {location!r}: {exc}") from None
    return location


@main.command()
def users() -> None:
    """List the users that have logs (live or archived), by name."""
    for name in reading.users(load_settings()):
        click.echo(name)


@main.command()
@click.argument("location")
@click.argument("stream", required=False)
@click.option("-n", "lines", default=10, show_default=True, help="How many entries to show.")
@click.option("-f", "--follow", is_flag=True, help="Keep printing new entries, across rotations.")
def tail(location: str, stream: str | None, lines: int, follow: bool) -> None:
    """The last entries of a user (one stream, or all merged by time); archives included."""
    conf = load_settings()
    location = _location(location)
    stream = _stream(stream)
    folder = conf.log_dir / user_dir(location)
    # Live files are opened before they are read, so following goes on exactly where the last lines ended.
    followed = {path: _Followed(path) for path in _live(conf, folder, stream) if path.exists()} if follow else {}
    texts = {path: f.complete_lines() for path, f in followed.items()}
    items = reading.merged(conf, reading.files_of(conf, location, stream), texts)
    for item in items[-lines:] if lines > 0 else []:
        _show(item)
    if follow:
        _follow(conf, folder, stream, followed)


def _stream(stream: str | None) -> str | None:
    if stream is None:
        return None
    return normalize(stream)


class _Followed:
    """A live file being followed: its handle, and the bytes of a line not yet complete."""

    def __init__(self, path: Path) -> None:
        self.handle: BufferedReader = path.open("rb")
        self.inode = os.fstat(self.handle.fileno()).st_ino
        self.partial = b""

    def complete_lines(self) -> str:
        """What was appended since the last call, up to its last newline."""
        data = self.partial + self.handle.read()
        cut = data.rfind(b"\n") + 1
        self.partial = data[cut:]
        return data[:cut].decode("utf-8", errors="replace")


def _follow(conf: Settings, folder: Path, stream: str | None, followed: dict[Path, _Followed]) -> None:
    """Print entries as they are appended; a rotated file is read to its end before its successor."""
    while True:
        for path in _live(conf, folder, stream):
            try:
                inode = os.stat(path).st_ino
            except FileNotFoundError:
                continue
            known = followed.get(path)
            if known is not None and known.inode == inode:
                continue
            if known is not None:  # rotated away: finish the old file first
                _print_lines(conf, path, known.complete_lines() + known.partial.decode("utf-8", errors="replace"))
                known.handle.close()
            followed[path] = _Followed(path)
        for path, current in followed.items():
            _print_lines(conf, path, current.complete_lines())
        sys.stdout.flush()
        time.sleep(0.2)


def _print_lines(conf: Settings, path: Path, text: str) -> None:
    for item in parse(text, str(path.relative_to(conf.log_dir)), conf.format, conf.tz):
        _show(item)


def _live(conf: Settings, folder: Path, stream: str | None) -> list[Path]:
    """The live files to follow; a planted link is never read through."""
    if stream:
        paths = [folder / (file_stem(stream) + conf.log_suffix)]
    else:
        paths = sorted(folder.glob("*" + conf.log_suffix)) if folder.is_dir() else []
    return [p for p in paths if not p.is_symlink()]


@main.command()
@click.argument("location")
@click.option("--since", "since_", help="Only entries from then on: ISO time, or an age like 2h.")
def show(location: str, since_: str | None) -> None:
    """Every stream of a user merged by time, archives included."""
    conf = load_settings()
    after = _since(since_)
    for item in reading.merged(conf, reading.files_of(conf, _location(location))):
        if after is None or (item.ts is not None and item.ts >= after):
            _show(item)


@main.command()
@click.argument("pattern")
@click.option("--user", "user_", help="Only this user's files.")
@click.option("--stream", help="Only this stream.")
@click.option("--since", "since_", help="Only entries from then on: ISO time, or an age like 2h.")
def search(pattern: str, user_: str | None, stream: str | None, since_: str | None) -> None:
    """Entries matching a regular expression, in live files and archives (exit 1 when none)."""
    conf = load_settings()
    try:
        regex = re.compile(pattern)
    except re.error as exc:
        raise click.BadParameter(f"{pattern!r}: {exc}") from None
    after = _since(since_)
    stream = _stream(stream)
    locations = [_location(user_)] if user_ else [SYSTEM, *reading.users(conf)]
    found = 0
    for location in locations:
        for item in reading.entries(conf, reading.files_of(conf, location, stream)):
            if regex.search(item.text) and (after is None or (item.ts is not None and item.ts >= after)):
                _show(item, label=True)
                found += 1
    if not found:
        raise SystemExit(1)


@main.command()
@click.option("--user", "user_", help="Only this user's files and archives (the seal log is checked whole).")
@click.option("--key", "key_file", type=click.File("r"),
              help="The verification key `apilogd seal-key` printed (a file, or - for stdin).")
def verify(user_: str | None, key_file: IO[str] | None) -> None:
    """Check that every log file and archive is as apilogd sealed it: exit 0 intact, 1 tampered."""
    from . import _verify
    from .core import seal

    conf = load_settings()
    key = None
    if key_file is not None:
        try:
            key = seal.VerificationKey.parse(key_file.read(4096))
        except seal.BadKey as exc:
            raise click.BadParameter(str(exc), param_hint="--key") from None
    if user_ is not None:
        try:
            user_dir(user_)
        except BadLocation as exc:
            raise click.BadParameter(str(exc), param_hint="--user") from None
    if not conf.log_dir.is_dir():
        raise click.UsageError(f"no log tree at {conf.log_dir} (APILOG_LOG_DIR)")
    check = _verify.Verification(conf.log_dir, key, user_, conf.state_dir)
    if user_ is not None and not check.paths:
        raise click.UsageError(f"nothing was ever logged or sealed for user {user_!r}")
    with click.progressbar(length=check.total_bytes, label="verifying", file=sys.stderr,
                           show_pos=False) as bar:
        report = check.run(bar.update)
    for problem in report.problems:
        click.echo(f"TAMPERED {problem}")
    if key is None:
        click.echo("apilog: no --key: the files agree with the seal log, but its seals were not checked "
                   "against the verification key", err=True)
    if report.problems:
        raise SystemExit(1)
    when = "" if report.last_time is None else time.strftime(" through %Y-%m-%d %H:%M:%S UTC",
                                                            time.gmtime(report.last_time))
    click.echo(f"intact: {report.files} files and archives, {report.lines} seal lines{when}")


@main.command()
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on (loopback unless you say).")
@click.option("--port", default=8787, show_default=True, type=click.IntRange(1, 65535))
def web(host: str, port: int) -> None:
    """Read-only pages over the log tree in the browser, for holders of the token it prints."""
    import importlib.util

    missing = [m for m in ("starlette", "uvicorn", "jinja2") if importlib.util.find_spec(m) is None]
    if missing:
        raise click.ClickException(f"apilog web needs its extra: pip install 'apilog[web]' (missing: {', '.join(missing)})")
    from .web import serve

    serve(load_settings(), host, port)


@main.command()
def archive() -> None:
    """Rotate every live log file into archive/ now (gzipped off the write path)."""
    # Rotation has one owner, the daemon's code: `apilogd archive` asks the running daemon, or rotates offline.
    done = subprocess.run([sys.executable, "-m", "apilogd", "archive"], capture_output=True, text=True, check=False)
    click.echo(done.stdout, nl=False)
    click.echo(done.stderr, nl=False, err=True)
    raise SystemExit(done.returncode)


@main.command()
def demo() -> None:
    """Start apilogd if needed, log sample entries, and show what was written."""
    conf = load_settings()
    settings_module.reset()  # the logger reads the same environment afresh
    _demo.run(conf)
