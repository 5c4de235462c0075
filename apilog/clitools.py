"""What the `apilog` and `apilogd` commands share: apilog's errors as clean exits, settings read at start-up."""

from __future__ import annotations

import functools
from typing import Any

import click

from . import settings as settings_module
from .exceptions import ApilogError
from .settings import Settings


class Group(click.Group):
    """A command group whose commands end with a one-line error and the error's own exit code on any ApilogError."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except ApilogError as exc:
            raise _failure(exc.exit_code)(str(exc)) from None


@functools.cache
def _failure(exit_code: int) -> type[click.ClickException]:
    """click's one-line error with this exit code (a class attribute in click)."""
    return type(f"Exit{exit_code}", (click.ClickException,), {"exit_code": exit_code})


def load_settings() -> Settings:
    """The settings, or a clear error naming the bad variable."""
    return settings_module.load()
