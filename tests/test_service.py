"""The systemd side: units that verify and score well, install-service, and the two-user permission model."""

from __future__ import annotations

import grp
import os
import pwd
import re
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from .utils import Site, wait_for

APILOGD = [sys.executable, "-m", "apilogd"]
needs_analyze = pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")


def _render(tmp_path: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*APILOGD, "install-service", *args, "--root", str(tmp_path)],
                          capture_output=True, text=True, env={**os.environ, **(env or {})}, check=False)


@needs_analyze
def test_rendered_units_verify(home: Path, tmp_path: Path) -> None:
    """The system unit (with the broker drop-in) and the user unit pass `systemd-analyze verify`."""
    assert _render(tmp_path, "--system", env={"APILOG_BROKER_URL": "redis://localhost:6379/0"}).returncode == 0
    assert _render(tmp_path, "--user", env={"XDG_CONFIG_HOME": "/home/u/.config"}).returncode == 0
    system = tmp_path / "etc/systemd/system/apilogd.service"
    user = tmp_path / "home/u/.config/systemd/user/apilogd.service"
    assert f"ExecStart={sys.executable} -m apilogd run" in system.read_text()
    assert "EnvironmentFile=/etc/apilog/apilogd.env" in system.read_text()
    assert 'APILOG_BROKER_URL="redis://localhost:6379/0"' in (tmp_path / "etc/apilog/apilogd.env").read_text()
    assert (tmp_path / "etc/systemd/system/apilogd.service.d/broker-network.conf").exists()
    sysusers = (tmp_path / "etc/sysusers.d/apilog.conf").read_text().strip()
    assert sysusers.endswith('u apilog - "apilog log writer" /var/lib/apilog')
    for unit in (system, user):
        result = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True)
        assert result.returncode == 0, result.stderr


@needs_analyze
def test_system_unit_security_score(home: Path, tmp_path: Path) -> None:
    """`systemd-analyze security --offline=yes` rates the system unit 1.0 or lower."""
    assert _render(tmp_path, "--system").returncode == 0
    unit = tmp_path / "etc/systemd/system/apilogd.service"
    result = subprocess.run(["systemd-analyze", "security", "--offline=yes", str(unit)], capture_output=True, text=True)
    score = float(re.search(r"Overall exposure level for apilogd.service: ([\d.]+)", result.stdout).group(1))
    print("exposure", score)
    assert score <= 1.0


SECRET = "pa%ss w$rd\"q`\\@:x"  # every character a unit or a shell would take for something else


def test_a_broker_password_never_sits_in_a_unit_and_reads_back_whole(home: Path, tmp_path: Path) -> None:
    """Found by review: the broker URL went into a 0644 unit as Environment=, and systemd drops a line with
    a `%` it cannot expand, so the daemon silently drained the local spool instead.

    Now the settings go to an EnvironmentFile of mode 0600; the unit names it. What the service
    manager reads back from it (shell quoting, which systemd's parser follows) is the URL, whole.
    """
    url = f"amqp://app:{SECRET}@broker.example:5672//"
    for scope, env_file, unit in (("--system", "etc/apilog/apilogd.env", "etc/systemd/system/apilogd.service"),
                                  ("--user", "home/u/.config/apilog/apilogd.env", "home/u/.config/systemd/user/apilogd.service")):
        done = _render(tmp_path, scope, env={"APILOG_BROKER_URL": url, "XDG_CONFIG_HOME": "/home/u/.config"})
        assert done.returncode == 0, done.stderr
        path, unit_text = tmp_path / env_file, (tmp_path / unit).read_text()
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        assert "pa%ss" not in unit_text and "w$rd" not in unit_text
        assert f"EnvironmentFile=/{env_file}" in unit_text
        read = subprocess.run(["bash", "-c", 'set -a; . "$0"; printf %s "$APILOG_BROKER_URL"', str(path)],
                              capture_output=True, text=True, env={}, check=True)
        assert read.stdout == url
    shown = subprocess.run([*APILOGD, "install-service", "--system", "--dry-run"], capture_output=True, text=True,
                           env={**os.environ, "APILOG_BROKER_URL": url})
    assert shown.returncode == 0 and "amqp://app:***@broker.example" in shown.stdout
    assert "w$rd" not in shown.stdout and "w\\$rd" not in shown.stdout


@needs_analyze
def test_a_python_path_with_a_space_and_a_percent_sign_verifies(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """ExecStart= names this installation's Python: a `%` in its path is doubled and a space quoted, or systemd misreads it."""
    from apilogd.process import units

    python = tmp_path / "venv 100%" / "python"
    python.parent.mkdir()
    python.symlink_to(sys.executable)
    monkeypatch.setattr(sys, "executable", str(python))
    files, _ = units.plan(user=False, env={}, root=tmp_path / "root")
    units.install(files)
    unit = tmp_path / "root/etc/systemd/system/apilogd.service"
    assert f'ExecStart="{tmp_path}/venv 100%%/python" -m apilogd run' in unit.read_text()
    result = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def _system_state() -> dict[str, object]:
    """What a system install would change: its files, and whether the apilog user exists."""
    paths = ["/etc/systemd/system/apilogd.service", "/etc/systemd/system/apilogd.service.d", "/etc/sysusers.d/apilog.conf",
             "/etc/apilog"]
    state: dict[str, object] = {p: os.path.lexists(p) for p in paths}
    try:
        state["user"] = pwd.getpwnam("apilog").pw_uid
    except KeyError:
        state["user"] = None
    return state


@pytest.mark.skipif(os.geteuid() != 0, reason="a dry run changes nothing only means something as root")
def test_dry_run_changes_nothing(home: Path, tmp_path: Path) -> None:
    """--dry-run, as root, prints the units and the commands, and writes no file nor creates the user."""
    before = _system_state()
    result = subprocess.run([*APILOGD, "install-service", "--system", "--dry-run"], capture_output=True, text=True,
                            env={**os.environ, "APILOG_BROKER_URL": "redis://localhost:6379/0"})
    assert result.returncode == 0
    assert _system_state() == before
    assert "# /etc/systemd/system/apilogd.service" in result.stdout
    assert f"ExecStart={sys.executable} -m apilogd run" in result.stdout
    assert "would run: systemctl enable --now apilogd.service" in result.stdout


# ---------------------------------------------------------------- two users


def test_app_and_daemon_as_two_users(site: Site) -> None:
    """The app's user writes the spool through the shared group; the daemon's user writes logs others cannot read."""
    daemon = site.daemon()
    try:
        assert daemon.ready(), daemon.stderr
        code = "from apilog import logger; print(logger.delay('INFO', 'uma', 'from the app user', timestamp=False).spooled)"
        app = site.app_logs(code)
        assert app.stdout.strip() == "True", app.stderr
        home = site.home
        log = home / "logs" / "users" / "uma" / "INFO.log"
        wait_for(lambda: log.exists() and log.read_text() == "INFO:  from the app user\n",
                 what="the daemon to write the app's entry")
        spool = home / "spool"
        assert stat.S_IMODE(spool.stat().st_mode) == 0o2750 and grp.getgrgid(spool.stat().st_gid).gr_name == site.group
        assert stat.S_IMODE((spool / "segments").stat().st_mode) == 0o3770
        for path in (home / "logs", log.parent, log):
            assert stat.S_IMODE(path.stat().st_mode) & 0o007 == 0  # closed to others
            assert pwd.getpwuid(path.stat().st_uid).pw_name == site.daemon_user
        other = f"alo{str(os.getpid())[-5:]}"
        refused = subprocess.run(["cat", str(log)], capture_output=True, text=True, user=other, group=other)
        assert refused.returncode != 0 and "Permission denied" in refused.stderr
    finally:
        assert daemon.stop() == 0
