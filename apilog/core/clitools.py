"""What the `apilog` and `apilogd` commands share: apilog's errors as clean exits, settings read at start-up."""

from __future__ import annotations

from typing import Any

import click

from .. import settings as settings_module
from ..exceptions import ApilogError
from ..settings import Settings


class _Refused(click.ClickException):
    """A one-line error for what no restart can fix (EX_CONFIG): systemd's RestartPreventExitStatus= matches it."""

    exit_code = 78


class Group(click.Group):
    """A command group whose commands end with a one-line error (exit 1, or the error's own code) on any ApilogError."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except ApilogError as exc:
            failure = _Refused if getattr(exc, "exit_code", 1) == _Refused.exit_code else click.ClickException
            raise failure(str(exc)) from None


def load_settings() -> Settings:
    """The settings, or a clear error naming the bad variable."""
    return settings_module.load()
