"""The project's own lint and type configuration (pyproject.toml), run by the test command as a reader would run it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _run(*command: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", *command], cwd=ROOT, capture_output=True, text=True, timeout=600)


def test_ruff_check_passes() -> None:
    """`ruff check .` under [tool.ruff]: a broad rule set, each ignore justified where it is made."""
    done = _run("ruff", "check", ".")
    assert done.returncode == 0, done.stdout[-5000:] + done.stderr[-2000:]


def test_mypy_strict_passes() -> None:
    """`mypy` under [tool.mypy]: strict on apilog and apilogd (daemon/)."""
    done = _run("mypy")
    assert done.returncode == 0, done.stdout[-5000:] + done.stderr[-2000:]
