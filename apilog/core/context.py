"""The current user: a contextvar that `delay()` and the logging bridge read for the location."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar, Token

_current_user: ContextVar[str | None] = ContextVar("apilog_user", default=None)


@contextmanager
def user(name: str) -> Iterator[str]:
    """Within this block, entries without a location belong to `name`."""
    token = _current_user.set(name)
    try:
        yield name
    finally:
        _current_user.reset(token)


def set_user(name: str | None) -> Token[str | None]:
    """Make `name` the current user until `reset_user` (for middlewares that cannot use a `with` block)."""
    return _current_user.set(name)


def reset_user(token: Token[str | None]) -> None:
    _current_user.reset(token)


def current_user() -> str | None:
    """The user set by the innermost `user()` block of this context, if any."""
    return _current_user.get()
