"""Settings: read and validated in one place, from the environment and `$APILOG_HOME/apilog.toml`."""

from __future__ import annotations

import os
import re
import tomllib
import zoneinfo
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import tzinfo
from pathlib import Path
from typing import Any

import platformdirs

from .exceptions import ConfigError

FORMATS = ("text", "jsonl")
FSYNC_MODES = ("off", "batch", "always")
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


@dataclass(frozen=True)
class Settings:
    """Every knob of SPEC section 2, validated."""

    home: Path
    log_dir: Path
    broker_url: str | None
    format: str
    timestamps: bool
    tz_name: str
    tz: tzinfo | None  # None means the machine's local zone
    fsync: str
    max_entry_bytes: int
    rotate_bytes: int
    rotate_age: int
    retain_days: int
    strict: bool
    spool_dir: Path = field(init=False)
    state_dir: Path = field(init=False)

    def __post_init__(self) -> None:
        # Computed once: the hot path of delay() reads spool_dir on every call.
        object.__setattr__(self, "spool_dir", self.home / "spool")
        object.__setattr__(self, "state_dir", self.home / "state")

    @property
    def uses_spool(self) -> bool:
        """True when entries travel through the embedded filesystem spool."""
        return self.broker_url is None

    @property
    def log_suffix(self) -> str:
        return ".jsonl" if self.format == "jsonl" else ".log"


def _path(name: str, raw: str) -> Path:
    path = Path(raw).expanduser()
    if not path.is_absolute():
        raise ConfigError(f"{name} must be an absolute path, got {raw!r}")
    return path


def _choice(choices: tuple[str, ...]) -> Callable[[str, str], str]:
    def parse(name: str, raw: str) -> str:
        value = raw.strip().lower()
        if value not in choices:
            raise ConfigError(f"{name} must be one of {', '.join(choices)}; got {raw!r}")
        return value

    return parse


def _bool(name: str, raw: str) -> bool:
    value = raw.strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise ConfigError(f"{name} must be 1 or 0 (true/false, yes/no, on/off); got {raw!r}")


def _int(minimum: int) -> Callable[[str, str], int]:
    def parse(name: str, raw: str) -> int:
        try:
            value = int(raw.strip())
        except ValueError:
            raise ConfigError(f"{name} must be a whole number; got {raw!r}") from None
        if value < minimum:
            raise ConfigError(f"{name} must be at least {minimum}; got {value}")
        return value

    return parse


def _zone(name: str, raw: str) -> str:
    value = raw.strip()
    if value.lower() == "local" or value.upper() == "UTC":
        return value.lower() if value.lower() == "local" else "UTC"
    try:
        zoneinfo.ZoneInfo(value)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError):
        raise ConfigError(f"{name} must be UTC, local or an IANA zone name; got {raw!r}") from None
    return value


def _broker(name: str, raw: str) -> str | None:
    value = raw.strip()
    if not value:
        return None
    if "://" not in value:
        raise ConfigError(f"{name} must be a Celery broker URL like redis://host:6379/0; got {raw!r}")
    return value


def redacted(url: str) -> str:
    """A broker URL fit to print: its password replaced by ***."""
    return re.sub(r"://([^:/@]*):[^@]*@", r"://\1:***@", url)


def zone_of(tz_name: str) -> tzinfo | None:
    """The tzinfo written timestamps use; None for the machine's local zone."""
    if tz_name == "local":
        return None
    return zoneinfo.ZoneInfo(tz_name)


def _default_home(env: Mapping[str, str]) -> str:
    # Under systemd, StateDirectory= hands us /var/lib/apilog through this variable.
    return env.get("STATE_DIRECTORY", "").split(":")[0] or platformdirs.user_data_dir("apilog")


def _read_toml(home: Path) -> dict[str, str]:
    path = home / "apilog.toml"
    try:
        with path.open("rb") as handle:
            data = tomllib.load(handle)
    except FileNotFoundError:
        return {}
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"{path}: cannot be read: {exc}") from None
    values: dict[str, str] = {}
    for key, value in data.items():
        variable = f"APILOG_{key.upper()}"
        if variable not in _PARSERS or variable == "APILOG_HOME":
            raise ConfigError(f"{path}: unknown setting {key!r}")
        if isinstance(value, bool):
            value = int(value)
        if not isinstance(value, (str, int)):
            raise ConfigError(f"{path}: {key} ({variable}) must be a string or a number")
        values[variable] = str(value)
    return values


_PARSERS: dict[str, Callable[[str, str], Any]] = {
    "APILOG_HOME": _path,
    "APILOG_LOG_DIR": _path,
    "APILOG_BROKER_URL": _broker,
    "APILOG_FORMAT": _choice(FORMATS),
    "APILOG_TIMESTAMPS": _bool,
    "APILOG_TZ": _zone,
    "APILOG_FSYNC": _choice(FSYNC_MODES),
    "APILOG_MAX_ENTRY_BYTES": _int(1024),
    "APILOG_ROTATE_BYTES": _int(1),
    "APILOG_ROTATE_AGE": _int(0),
    "APILOG_RETAIN_DAYS": _int(0),
    "APILOG_STRICT": _bool,
}

_DEFAULTS = {
    "APILOG_BROKER_URL": "",
    "APILOG_FORMAT": "text",
    "APILOG_TIMESTAMPS": "1",
    "APILOG_TZ": "UTC",
    "APILOG_FSYNC": "batch",
    "APILOG_MAX_ENTRY_BYTES": "65536",
    "APILOG_ROTATE_BYTES": "10485760",
    "APILOG_ROTATE_AGE": "86400",
    "APILOG_RETAIN_DAYS": "0",
    "APILOG_STRICT": "0",
}


def load(env: Mapping[str, str] | None = None) -> Settings:
    """Read every setting; raise ConfigError naming the variable for a bad value."""
    env = os.environ if env is None else env
    home = _path("APILOG_HOME", env.get("APILOG_HOME") or _default_home(env))
    raw = {**_DEFAULTS, **_read_toml(home)}
    raw.update({k: v for k, v in env.items() if k in _PARSERS and k != "APILOG_HOME"})
    logs_default = env.get("LOGS_DIRECTORY", "").split(":")[0] or str(home / "logs")
    raw.setdefault("APILOG_LOG_DIR", logs_default)
    if not raw["APILOG_LOG_DIR"]:
        raw["APILOG_LOG_DIR"] = logs_default
    value = {name: _PARSERS[name](name, raw[name]) for name in _PARSERS if name != "APILOG_HOME"}
    return Settings(
        home=home,
        log_dir=value["APILOG_LOG_DIR"],
        broker_url=value["APILOG_BROKER_URL"],
        format=value["APILOG_FORMAT"],
        timestamps=value["APILOG_TIMESTAMPS"],
        tz_name=value["APILOG_TZ"],
        tz=zone_of(value["APILOG_TZ"]),
        fsync=value["APILOG_FSYNC"],
        max_entry_bytes=value["APILOG_MAX_ENTRY_BYTES"],
        rotate_bytes=value["APILOG_ROTATE_BYTES"],
        rotate_age=value["APILOG_ROTATE_AGE"],
        retain_days=value["APILOG_RETAIN_DAYS"],
        strict=value["APILOG_STRICT"],
    )


_current: Settings | None = None


def current() -> Settings:
    """The settings of this process, read once on first use."""
    global _current
    if _current is None:
        _current = load()
    return _current


def reset() -> None:
    """Forget the cached settings so the next `current()` reads the environment again."""
    global _current
    _current = None
