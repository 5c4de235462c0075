"""docs/reference.md, "The log tree": user directory names, paths inside the tree, and permissions."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from apilog import logger
from apilog.core.logfile import BadLocation, decode_user, encode_user, relative_path

from .utils import wait_written


@pytest.mark.parametrize(
    ("location", "component"),
    [
        ("usera1@gizzleMail.com", "usera1@gizzleMail.com"),
        ("../etc", "%2E.%2Fetc"),
        (".hidden", "%2Ehidden"),
        ("a b/c%", "a%20b%2Fc%25"),
        ("zoë", "zo%C3%AB"),
        ("/etc/passwd", "%2Fetc%2Fpasswd"),
    ],
)
def test_encoding_examples(location: str, component: str) -> None:
    assert encode_user(location) == component
    assert decode_user(component) == location


def test_bad_locations() -> None:
    with pytest.raises(BadLocation, match="empty"):
        encode_user("")
    with pytest.raises(BadLocation, match="over 255 bytes"):
        encode_user("/" * 86)  # 86 * 3 = 258 bytes once encoded


@given(st.text(min_size=1, max_size=80))
def test_encoding_round_trips_as_one_safe_component(location: str) -> None:
    """Any text encodes to one component (never . or ..) that decodes back to it."""
    try:
        component = encode_user(location)
    except BadLocation:
        return
    assert "/" not in component and "\x00" not in component
    assert component not in (".", "..") and not component.startswith(".")
    assert decode_user(component) == location
    assert os.path.normpath(f"/logs/users/{component}").startswith("/logs/users/")


def test_paths() -> None:
    assert relative_path("SECURITY ALERT", "bob", ".log") == "users/bob/SECURITY_ALERT.log"
    assert relative_path("INFO", "system", ".log") == "system/INFO.log"
    assert relative_path("INTERNAL", "bob", ".jsonl") == "system/INTERNAL.jsonl"


def test_modes(daemon: Path) -> None:
    """Directories 0750, files 0640, the spool 2750 with its drop folders 3770 (sticky), whatever the umask."""
    logger.delay("INFO", "nina", "x")
    wait_written()
    logs = daemon / "logs"
    assert stat.S_IMODE((logs / "users" / "nina").stat().st_mode) == 0o750
    assert stat.S_IMODE((logs / "users").stat().st_mode) == 0o750
    assert stat.S_IMODE((logs / "users" / "nina" / "INFO.log").stat().st_mode) == 0o640
    assert stat.S_IMODE((daemon / "spool").stat().st_mode) == 0o2750
    assert stat.S_IMODE((daemon / "spool" / "segments").stat().st_mode) == 0o3770
    assert stat.S_IMODE((daemon / "spool" / "tmp").stat().st_mode) == 0o3770
    assert stat.S_IMODE((daemon / "spool" / "quarantine").stat().st_mode) == 0o2750
    assert stat.S_IMODE(daemon.stat().st_mode) & 0o022 == 0
