"""Errors of apilogd (every one derives from `DaemonError`), and how the daemon says what went wrong on stderr."""

from __future__ import annotations

import sys

from apilog.exceptions import ApilogError


class DaemonError(ApilogError):
    """Root of every error apilogd raises."""


class AlreadyRunning(DaemonError):
    """Another apilogd holds this APILOG_HOME."""


class StartFailed(DaemonError):
    """A background apilogd did not become ready."""


class StopFailed(DaemonError):
    """A running apilogd did not exit in time."""


class BrokerUnavailable(DaemonError):
    """The broker named by APILOG_BROKER_URL cannot be reached at start-up."""


class StateDamaged(DaemonError):
    """A state file of apilogd cannot be trusted; it was set aside and `apilogd repair` rebuilds it."""

    exit_code = 78  # EX_CONFIG: the unit's RestartPreventExitStatus= stops a restart loop


class UnsafeSetup(DaemonError):
    """A folder apilogd works in is owned by another user or is not a plain folder: refused, not followed."""

    exit_code = 78  # EX_CONFIG: no restart can fix it; the unit's RestartPreventExitStatus= stops the loop


def say(text: str) -> None:
    print(f"apilogd: {text}", file=sys.stderr, flush=True)


def describe(exc: BaseException) -> str:
    """An error in a few words, for a report."""
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    if isinstance(exc, ValueError) and not isinstance(exc, UnicodeError):
        return str(exc)[:300]  # the reader's own words about bad input
    return f"{type(exc).__name__}: {str(exc)[:300]}"
