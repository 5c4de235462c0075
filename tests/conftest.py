"""Shared fixtures: a private APILOG_HOME per test, and a real apilogd process."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from apilogd.process import control

from apilog import settings

from .utils import Site, as_user, python_for_others


def pytest_configure(config: pytest.Config) -> None:
    """Coverage's data folder open to the other users the tests run producers and daemons as (sticky, like /tmp)."""
    import coverage

    current = coverage.Coverage.current()
    if current is not None:
        folder = Path(current.config.data_file).parent
        folder.mkdir(parents=True, exist_ok=True)
        folder.chmod(0o1777)


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """An empty APILOG_HOME with every other APILOG_ variable cleared."""
    for name in list(os.environ):
        if name.startswith("APILOG_") or name in ("STATE_DIRECTORY", "LOGS_DIRECTORY", "NOTIFY_SOCKET"):
            monkeypatch.delenv(name)
    path = tmp_path / "home"
    monkeypatch.setenv("APILOG_HOME", str(path))
    settings.reset()
    yield path
    settings.reset()


@pytest.fixture
def daemon(home: Path) -> Iterator[Path]:
    """A real `apilogd` running in the background for this home; stopped afterwards."""
    control.start(settings.load())
    yield home
    control.stop(settings.load())


# ---------------------------------------------------------------- a second local user


@pytest.fixture
def two_users() -> Iterator[tuple[str, str, str]]:
    """A daemon user and an app user sharing a group, created for this test and removed after."""
    if os.geteuid() != 0 or shutil.which("useradd") is None:
        pytest.skip("needs root and useradd")
    tag = str(os.getpid())[-5:]
    group, daemon_user, app_user, other = f"alg{tag}", f"ald{tag}", f"ala{tag}", f"alo{tag}"
    subprocess.run(["groupadd", group], check=True)
    for name in (daemon_user, app_user, other):
        subprocess.run(["useradd", "--no-create-home", "--user-group", name], check=True)
    for name in (daemon_user, app_user):
        subprocess.run(["usermod", "-aG", group, name], check=True)
    try:
        yield daemon_user, app_user, group
    finally:
        for name in (daemon_user, app_user, other):
            subprocess.run(["userdel", name], check=False)
        subprocess.run(["groupdel", group], check=False)


@pytest.fixture
def site(two_users: tuple[str, str, str]) -> Iterator[Site]:
    daemon_user, app_user, group = two_users
    root = Path(tempfile.mkdtemp(dir="/var/tmp"))
    try:
        os.chmod(root, 0o755)
        python = python_for_others(root)
        home = root / "home"
        home.mkdir()
        shutil.chown(home, daemon_user, group)
        os.chmod(home, 0o750)  # StateDirectoryMode=0750
        env = {k: v for k, v in os.environ.items() if not k.startswith("APILOG_")} | {"APILOG_HOME": str(home)}
        probe = python and subprocess.run([*python, "apilogd", "--help"], env=env, capture_output=True, text=True,
                                          **as_user(app_user, group, 0o022))
        if not python or not probe or probe.returncode != 0:
            pytest.skip("no Python that other users may run here")
        yield Site(root, home, python, env, daemon_user, app_user, group)
    finally:
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 32 MB ext4 file system on a loop device (remounted read-only on any error), as the log disk."""
    image, mount = tmp_path / "disk.img", tmp_path / "logs"
    mount.mkdir()
    with open(image, "wb") as handle:
        handle.truncate(32 << 20)
    made = subprocess.run(["mkfs.ext4", "-q", str(image)], capture_output=True)
    mounted = made.returncode == 0 and subprocess.run(
        ["mount", "-o", "loop,errors=remount-ro", str(image), str(mount)], capture_output=True).returncode == 0
    if not mounted:
        pytest.skip("needs root, mkfs.ext4 and a loop device")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)
