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

from .core.logfile import SUFFIXES
from .core.shards import MAX_SHARDS, parse_shard_set
from .exceptions import ConfigError

FORMATS = tuple(SUFFIXES)
FSYNC_MODES = ("off", "batch", "always")
ROLES = ("local", "forward", "write")
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


DEFAULT_CAP = 4 * 2**30  # a default share of a file system never counts more than this, as journald's


@dataclass(frozen=True)
class Share:
    """A budget in bytes, or a percentage of a file system's size (with a cap where it is a default); 0 means none."""

    size: int = 0
    percent: float = 0.0
    cap: int = 0

    def of(self, fs_bytes: int) -> int:
        """The budget in bytes on a file system of `fs_bytes`; 0 when there is none."""
        if not self.percent:
            return self.size
        share = max(1, int(fs_bytes * self.percent / 100))
        return min(share, self.cap) if self.cap else share

    def __str__(self) -> str:
        if self.percent:
            return f"{self.percent:g}%" + (f" (at most {self.cap // 2**30} GiB)" if self.cap else "")
        return f"{self.size} bytes" if self.size else "none"


@dataclass(frozen=True)
class Settings:
    """Every knob of docs/reference.md, "Configuration", validated."""

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
    role: str = "local"  # local: spool -> files; forward: spool -> broker; write: broker -> files
    shards: int = 1
    writer_shards: frozenset[int] = frozenset({0})  # the shards a writer owns
    standby: bool = False  # APILOG_WRITER_SHARDS=all among several shards: the writer stands by for every shard
    seal: bool = True  # seal every file as it is written (docs/sealing.md)
    seal_epoch: int = 900  # seconds a seal key lives before it evolves (fixed when the first key is made)
    web_token: str | None = None  # `apilog web`'s token; None: one kept in the home
    user_rate: float = 200.0  # entries a second one user may write, sustained; 0: no limit
    user_burst: int = 2000  # entries one user may write at once
    user_quota: int = 0  # bytes one user may hold in the tree; 0: no quota
    max_use: Share = field(default_factory=lambda: Share(percent=10, cap=DEFAULT_CAP))  # the whole tree
    keep_free: Share = field(default_factory=lambda: Share(percent=15, cap=DEFAULT_CAP))  # the log file system
    spool_max: Share = field(default_factory=lambda: Share(percent=10, cap=DEFAULT_CAP))  # what waits in the spool
    spool_dir: Path = field(init=False)
    state_dir: Path = field(init=False)

    def __post_init__(self) -> None:
        # Computed once: the hot path of delay() reads spool_dir on every call.
        object.__setattr__(self, "spool_dir", self.home / "spool")
        object.__setattr__(self, "state_dir", self.home / "state")

    @property
    def drains_spool(self) -> bool:
        """True when apilogd reads this host's spool (roles local and forward); a writer reads the broker."""
        return self.role != "write"

    @property
    def log_suffix(self) -> str:
        return SUFFIXES[self.format]


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


# Human quantities: "10 MB", "64 KiB", "1 day", "1d 12h". K, M, G alone count in 1024s, as systemd does.
_SIZE_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
               "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40,
               "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
_SECONDS = {"s": 1, "sec": 1, "second": 1, "m": 60, "min": 60, "minute": 60,
            "h": 3600, "hr": 3600, "hour": 3600, "d": 86400, "day": 86400, "w": 604800, "week": 604800}
_DURATION_UNITS = {**_SECONDS, **{f"{name}s": n for name, n in _SECONDS.items() if len(name) > 1}}
_QUANTITY = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([a-z]*)\s*")


def _quantity(raw: str, units: Mapping[str, int], bare: int) -> int | None:
    """The sum of `raw`'s number-and-unit terms in base units (a bare number counts `bare`); None when it is not one."""
    text = raw.strip().lower()
    total, at = 0.0, 0
    while at < len(text):
        match = _QUANTITY.match(text, at)
        if match is None or (match.group(2) and match.group(2) not in units):
            return None
        total += float(match.group(1)) * (units[match.group(2)] if match.group(2) else bare)
        at = match.end()
    return round(total) if text and total == round(total) else None


def _int(minimum: int, *, units: Mapping[str, int] | None = None, per: int = 1, like: str = "",
         maximum: int = 2**62) -> Callable[[str, str], int]:
    """A whole number from `minimum` to `maximum`; with `units`, also a human quantity counted in `per` base units."""
    def parse(name: str, raw: str) -> int:
        text = raw.strip()
        if re.fullmatch(r"[+-]?\d+", text):
            value = int(text)
        else:
            found = _quantity(text, units, per) if units else None
            if found is None or found % per:
                wanted = f"a whole number or {like}" if units else "a whole number"
                raise ConfigError(f"{name} must be {wanted}; got {raw!r}")
            value = found // per
        if value < minimum:
            raise ConfigError(f"{name} must be at least {minimum}; got {value}")
        if value > maximum:
            raise ConfigError(f"{name} must be at most {maximum}; got {raw.strip()[:40]}")
        return value

    return parse


def _rate(name: str, raw: str) -> float:
    try:
        value = float(raw.strip().lower().removesuffix("/s"))
    except ValueError:
        raise ConfigError(f"{name} must be a number of entries a second such as 200 (0: no limit); got {raw!r}") from None
    if value and not 0.001 <= value <= 1e9:
        raise ConfigError(f"{name} must be 0 (no limit) or from 0.001 to 1e9 entries a second; got {raw!r}")
    return value


def _share(default: str) -> Callable[[str, str], Share]:
    """A size (`500 MB`) or a percentage of the file system (`10%`); the default's percentage is capped."""
    sizes = _int(0, units=_SIZE_UNITS, like="a size such as 500 MB, or a percentage such as 10%")

    def parse(name: str, raw: str) -> Share:
        text = raw.strip()
        if not text.endswith("%"):
            return Share(size=sizes(name, text))
        try:
            percent = float(text[:-1])
        except ValueError:
            percent = -1
        if not 0 <= percent <= 100:
            raise ConfigError(f"{name} must be a size such as 500 MB, or a percentage from 0% to 100%; got {raw!r}")
        return Share(percent=percent, cap=DEFAULT_CAP if text == default else 0)

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
    """A broker URL fit to print: its password replaced by *** (by kombu, which parses every broker's URL form)."""
    # Imported on use: reading settings stays light.
    from kombu.utils.url import maybe_sanitize_url

    return str(maybe_sanitize_url(url, mask="***"))


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
        if not isinstance(value, (str, int)):
            raise ConfigError(f"{path}: {key} ({variable}) must be a string or a number")
        values[variable] = str(int(value) if isinstance(value, bool) else value)
    return values


# Defaults a machine nobody tuned can live with (docs/operations.md, "Limits"): journald's 10% and 15%, each at most 4 GiB.
_DEFAULT_MAX_USE, _DEFAULT_KEEP_FREE, _DEFAULT_SPOOL_MAX = "10%", "15%", "10%"

_PARSERS: dict[str, Callable[[str, str], Any]] = {
    "APILOG_HOME": _path,
    "APILOG_LOG_DIR": _path,
    "APILOG_BROKER_URL": _broker,
    "APILOG_FORMAT": _choice(FORMATS),
    "APILOG_TIMESTAMPS": _bool,
    "APILOG_TZ": _zone,
    "APILOG_FSYNC": _choice(FSYNC_MODES),
    "APILOG_MAX_ENTRY_BYTES": _int(1024, units=_SIZE_UNITS, like="a size such as 64 KiB"),
    "APILOG_ROTATE_BYTES": _int(1, units=_SIZE_UNITS, like="a size such as 10 MB"),
    "APILOG_ROTATE_AGE": _int(0, units=_DURATION_UNITS, like="a duration such as 1 day or 12h"),
    "APILOG_RETAIN_DAYS": _int(0, units=_DURATION_UNITS, per=86400, like="whole days such as 30 days or 2 weeks"),
    "APILOG_STRICT": _bool,
    "APILOG_ROLE": _choice(ROLES),
    "APILOG_SHARDS": _int(1),
    "APILOG_WRITER_SHARDS": lambda name, raw: raw.strip(),  # checked against APILOG_SHARDS in load()
    "APILOG_SEAL": _bool,
    "APILOG_SEAL_EPOCH": _int(1, units=_DURATION_UNITS, like="a duration such as 15 min"),
    "APILOG_WEB_TOKEN": lambda name, raw: raw.strip() or None,
    "APILOG_USER_RATE": _rate,
    "APILOG_USER_BURST": _int(1, maximum=10**9),
    "APILOG_USER_QUOTA": _int(0, units=_SIZE_UNITS, like="a size such as 1 GB"),
    "APILOG_MAX_USE": _share(_DEFAULT_MAX_USE),
    "APILOG_KEEP_FREE": _share(_DEFAULT_KEEP_FREE),
    "APILOG_SPOOL_MAX": _share(_DEFAULT_SPOOL_MAX),
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
    "APILOG_ROLE": "local",
    "APILOG_SHARDS": "1",
    "APILOG_WRITER_SHARDS": "all",
    "APILOG_SEAL": "1",
    "APILOG_SEAL_EPOCH": "900",
    "APILOG_WEB_TOKEN": "",
    "APILOG_USER_RATE": "200",
    "APILOG_USER_BURST": "2000",
    "APILOG_USER_QUOTA": "0",
    "APILOG_MAX_USE": _DEFAULT_MAX_USE,
    "APILOG_KEEP_FREE": _DEFAULT_KEEP_FREE,
    "APILOG_SPOOL_MAX": _DEFAULT_SPOOL_MAX,
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
    if value["APILOG_SHARDS"] > MAX_SHARDS:
        raise ConfigError(f"APILOG_SHARDS must be at most {MAX_SHARDS}; got {value['APILOG_SHARDS']}")
    try:
        writer_shards = parse_shard_set(value["APILOG_WRITER_SHARDS"], value["APILOG_SHARDS"])
    except ValueError as exc:
        raise ConfigError(f"APILOG_WRITER_SHARDS: {exc}; got {raw['APILOG_WRITER_SHARDS']!r}") from None
    if value["APILOG_ROLE"] != "local" and value["APILOG_BROKER_URL"] is None:
        raise ConfigError(f"APILOG_ROLE={value['APILOG_ROLE']} needs APILOG_BROKER_URL (the broker between the hosts)")
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
        role=value["APILOG_ROLE"],
        shards=value["APILOG_SHARDS"],
        writer_shards=writer_shards,
        standby=value["APILOG_SHARDS"] > 1 and value["APILOG_WRITER_SHARDS"].lower() in ("", "all"),
        seal=value["APILOG_SEAL"],
        seal_epoch=value["APILOG_SEAL_EPOCH"],
        web_token=value["APILOG_WEB_TOKEN"],
        user_rate=value["APILOG_USER_RATE"],
        user_burst=value["APILOG_USER_BURST"],
        user_quota=value["APILOG_USER_QUOTA"],
        max_use=value["APILOG_MAX_USE"],
        keep_free=value["APILOG_KEEP_FREE"],
        spool_max=value["APILOG_SPOOL_MAX"],
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
