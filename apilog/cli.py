"""The `apilog` command: streams and the demo."""

from __future__ import annotations

import click

from . import _demo
from . import settings as settings_module
from ._streams import Registry
from .exceptions import ApilogError
from .settings import Settings


def _settings() -> Settings:
    try:
        return settings_module.load()
    except ApilogError as exc:
        raise click.ClickException(str(exc)) from None


@click.group()
def main() -> None:
    """apilog: per-user, per-stream logs for web API backends."""


@main.group(invoke_without_command=True)
@click.pass_context
def streams(ctx: click.Context) -> None:
    """List the known streams (or add and remove them)."""
    if ctx.invoked_subcommand is None:
        for name in Registry(_settings().home).names():
            click.echo(name)


@streams.command("add")
@click.argument("name")
def streams_add(name: str) -> None:
    """Register a stream; running apps and apilogd see it at once."""
    try:
        stream = Registry(_settings().home).add(name)
    except ApilogError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"added {stream}")


@streams.command("remove")
@click.argument("name")
def streams_remove(name: str) -> None:
    """Unregister a stream; its files are kept."""
    try:
        stream = Registry(_settings().home).remove(name)
    except ApilogError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"removed {stream} (its files are kept)")


@main.command()
def archive() -> None:
    """Rotate every live log file into archive/ now (gzipped off the write path)."""
    from apilogd import _control  # noqa: PLC0415 - rotation has one owner: the daemon's code

    try:
        rotated = _control.archive_now(_settings())
    except ApilogError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"rotated {rotated} live file{'s' if rotated != 1 else ''} into archive/")


@main.command()
def demo() -> None:
    """Start apilogd if needed, log sample entries, and show what was written."""
    conf = _settings()
    settings_module.reset()  # the logger reads the same environment afresh
    try:
        _demo.run(conf)
    except ApilogError as exc:
        raise click.ClickException(str(exc)) from None
