"""apilog: per-user, per-stream logging for web API backends, spooled durably through Celery."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as _version
from typing import TYPE_CHECKING, Any

from ._bridge import LoggingHandler
from .core.context import current_user, user
from .exceptions import ApilogError, BadInput, ConfigError, SpoolError, StreamError

if TYPE_CHECKING:
    from ._task import LogTask, Receipt, app, logger, register

# Celery and kombu take half a second to import: loaded with the first of these, not by `import apilog`.
_FROM_TASK = frozenset({"LogTask", "Receipt", "app", "logger", "register"})


def __getattr__(name: str) -> Any:
    if name in _FROM_TASK:
        from . import _task

        return getattr(_task, name)
    raise AttributeError(f"module 'apilog' has no attribute {name!r}")

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
