"""`apilogd install-service`: render the units of systemd/ for this installation, and install them."""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path

from apilog.exceptions import ConfigError
from apilog.settings import redacted

SYSTEM_UNIT_DIR = Path("/etc/systemd/system")
SYSUSERS_DIR = Path("/etc/sysusers.d")
SYSTEM_ENV_FILE = Path("/etc/apilog/apilogd.env")
# The system unit fixes where state and logs live; every other APILOG_ setting set here is carried over.
_FIXED_BY_SYSTEM_UNIT = {"APILOG_HOME", "APILOG_LOG_DIR"}


@dataclass(frozen=True)
class UnitFile:
    """One file to install: where it goes, what it holds, its mode, and what `--dry-run` shows of it."""

    path: Path
    text: str
    mode: int = 0o644
    shown: str | None = None  # the text with secrets masked; None: the text itself


def units_folder() -> Path:
    """Where this installation keeps the units of systemd/: installed as data (`pip install .`), else the checkout's."""
    installed = Path(sysconfig.get_path("data")) / "share" / "apilog" / "systemd"
    return installed if installed.is_dir() else Path(__file__).resolve().parents[2] / "systemd"


def _template(name: str) -> str:
    return (units_folder() / name).read_text(encoding="utf-8")


def _unit_word(value: str) -> str:
    """`value` as one word of a unit file: `%` doubled (systemd's specifiers), quoted if it holds a space or a quote."""
    value = value.replace("%", "%%")
    if any(c.isspace() or c in "\"'\\" for c in value):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return value


def _env_value(key: str, value: str) -> str:
    """`value` double-quoted for an EnvironmentFile: `\\`, `"`, `$` and a backquote escaped, as the shell reads them."""
    if "\n" in value or "\r" in value:
        raise ConfigError(f"{key} holds a line break, which a systemd environment file cannot hold")
    return '"' + "".join("\\" + c if c in '\\"$`' else c for c in value) + '"'


def _settings(env: dict[str, str], skip: set[str]) -> dict[str, str]:
    return {key: value for key, value in sorted(env.items()) if key.startswith("APILOG_") and key not in skip}


def _env_file(path: Path, settings: dict[str, str]) -> UnitFile:
    """The settings the unit carries over, in a file only its owner reads: a broker password never sits in a unit."""
    header = "# apilogd's settings, written by `apilogd install-service`; mode 0600: it may hold the broker's password\n"

    def text(*, masked: bool) -> str:
        return header + "".join(
            f"{key}={_env_value(key, redacted(value) if masked and key == 'APILOG_BROKER_URL' else value)}\n"
            for key, value in settings.items())

    return UnitFile(path, text(masked=False), 0o600, text(masked=True))


def _render(name: str, env_file: Path | None) -> str:
    text = _template(name).replace("@PYTHON@", _unit_word(sys.executable))
    line = f"EnvironmentFile={_unit_word(str(env_file))}\n" if env_file else ""
    return text.replace("@ENVIRONMENT@\n", line)


def plan(*, user: bool, env: dict[str, str], root: Path | None = None) -> tuple[list[UnitFile], list[list[str]]]:
    """The files to write and the commands to run for a user or a system install."""
    prefix = root or Path("/")
    if user:
        config = Path(env.get("XDG_CONFIG_HOME") or Path.home() / ".config")
        unit_dir = prefix / config.relative_to("/") / "systemd" / "user"
        settings, env_path = _settings(env, set()), config / "apilog" / "apilogd.env"
        files = [UnitFile(unit_dir / "apilogd.service", _render("apilogd-user.service", env_path if settings else None))]
        if settings:
            files.append(_env_file(prefix / env_path.relative_to("/"), settings))
        commands = [["systemctl", "--user", "daemon-reload"], ["systemctl", "--user", "enable", "--now", "apilogd.service"]]
        return files, commands
    unit_dir = prefix / SYSTEM_UNIT_DIR.relative_to("/")
    settings = _settings(env, _FIXED_BY_SYSTEM_UNIT)
    files = [
        UnitFile(unit_dir / "apilogd.service", _render("apilogd.service", SYSTEM_ENV_FILE if settings else None)),
        UnitFile(prefix / SYSUSERS_DIR.relative_to("/") / "apilog.conf", _template("apilog.sysusers.conf")),
    ]
    if settings:
        files.append(_env_file(prefix / SYSTEM_ENV_FILE.relative_to("/"), settings))
    if env.get("APILOG_BROKER_URL"):  # a networked broker: open what the hardening closed
        files.append(UnitFile(unit_dir / "apilogd.service.d" / "broker-network.conf", _template("broker-network.conf")))
    commands = [
        ["systemd-sysusers", str(SYSUSERS_DIR / "apilog.conf")],
        ["systemctl", "daemon-reload"],
        ["systemctl", "enable", "--now", "apilogd.service"],
    ]
    return files, commands


def install(files: list[UnitFile]) -> None:
    for unit in files:
        unit.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(unit.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, unit.mode)
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            os.fchmod(fd, unit.mode)  # before a byte is written: an older, wider file must not show the secret
            out.write(unit.text)


def run(command: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(command, capture_output=True, text=True, check=False)
