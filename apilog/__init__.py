"""apilog: per-user, per-stream logging for web API backends, spooled durably through Celery."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as _version

from ._bridge import LoggingHandler
from ._context import current_user, user
from ._task import LogTask, Receipt, app, logger, register
from .exceptions import ApilogError, BadInput, ConfigError, SpoolError, StreamError

__all__ = [
    "ApilogError",
    "BadInput",
    "ConfigError",
    "LogTask",
    "LoggingHandler",
    "Receipt",
    "SpoolError",
    "StreamError",
    "app",
    "current_user",
    "logger",
    "register",
    "user",
]
try:
    __version__ = _version("apilog")  # one place: pyproject.toml
except PackageNotFoundError:  # a source tree run without installing it
    __version__ = "0+unknown"
