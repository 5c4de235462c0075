"""Errors raised by apilog; every one derives from `ApilogError`."""

from __future__ import annotations


class ApilogError(Exception):
    """Root of every error apilog raises; a command ends with its message and its `exit_code` (as click's errors do)."""

    exit_code = 1


class ConfigError(ApilogError):
    """A setting has a bad value; the message names the variable."""


class BadInput(ApilogError, ValueError):
    """A `delay()` call was given input that cannot be logged as asked (raised only when strict)."""


class SpoolError(ApilogError):
    """The spool could not take a message."""


class StreamError(ApilogError):
    """A stream name is invalid, or the registry refuses a change."""

