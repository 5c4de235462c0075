"""What the `apilog` and `apilogd` commands share: apilog's errors as clean exits, settings read at start-up."""

from __future__ import annotations

from typing import Any

import click

from . import settings as settings_module
from .exceptions import ApilogError
from .settings import Settings


class Group(click.Group):
    """A command group whose commands end with a one-line error (exit 1) on any ApilogError."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except ApilogError as exc:
            error = click.ClickException(str(exc))
            error.exit_code = getattr(exc, "exit_code", 1)  # 78 for what no restart can fix
            raise error from None


def load_settings() -> Settings:
    """The settings, or a clear error naming the bad variable."""
    return settings_module.load()
