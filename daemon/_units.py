"""`apilogd install-service`: render the units of systemd/ for this installation, and install them."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

SYSTEM_UNIT_DIR = Path("/etc/systemd/system")
SYSUSERS_DIR = Path("/etc/sysusers.d")
# The system unit fixes where state and logs live; every other APILOG_ setting set here is carried over.
_FIXED_BY_SYSTEM_UNIT = {"APILOG_HOME", "APILOG_LOG_DIR"}


@dataclass(frozen=True)
class UnitFile:
    """One file to install: where it goes, and what it holds."""

    path: Path
    text: str


def _template(name: str) -> str:
    return resources.files("apilogd.systemd").joinpath(name).read_text(encoding="utf-8")


def _environment(env: dict[str, str], skip: set[str]) -> str:
    lines = [
        f"Environment={shlex.quote(f'{key}={value}') if any(c.isspace() for c in value) else f'{key}={value}'}"
        for key, value in sorted(env.items())
        if key.startswith("APILOG_") and key not in skip
    ]
    return "\n".join(lines)


def _render(name: str, env: dict[str, str], skip: set[str]) -> str:
    text = _template(name).replace("@PYTHON@", sys.executable)
    environment = _environment(env, skip)
    return text.replace("@ENVIRONMENT@\n", environment + "\n" if environment else "")


def plan(*, user: bool, env: dict[str, str], root: Path | None = None) -> tuple[list[UnitFile], list[list[str]]]:
    """The files to write and the commands to run for a user or a system install."""
    prefix = root or Path("/")
    if user:
        config = Path(env.get("XDG_CONFIG_HOME") or Path.home() / ".config")
        unit_dir = prefix / config.relative_to("/") / "systemd" / "user"
        files = [UnitFile(unit_dir / "apilogd.service", _render("apilogd-user.service", env, set()))]
        commands = [["systemctl", "--user", "daemon-reload"], ["systemctl", "--user", "enable", "--now", "apilogd.service"]]
        return files, commands
    unit_dir = prefix / SYSTEM_UNIT_DIR.relative_to("/")
    files = [
        UnitFile(unit_dir / "apilogd.service", _render("apilogd.service", env, _FIXED_BY_SYSTEM_UNIT)),
        UnitFile(prefix / SYSUSERS_DIR.relative_to("/") / "apilog.conf", _template("apilog.sysusers.conf")),
    ]
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
        unit.path.write_text(unit.text, encoding="utf-8")
        os.chmod(unit.path, 0o644)


def run(command: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(command, capture_output=True, text=True, check=False)
