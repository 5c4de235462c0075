"""The project's own lint and type configuration (pyproject.toml), run by the test command as a reader would run it."""

from __future__ import annotations

import ast
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


def _imports(path: Path) -> list[tuple[str, int]]:
    """Every module a file imports, made absolute, with its line."""
    package = "apilogd" if path.parts[-2] == "daemon" else ".".join(path.relative_to(ROOT).parts[:-1])
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
            found += [(f"{base}.{alias.name}" if base in ("apilog", "apilog.core", "apilog.spool") else base, node.lineno)
                      for alias in node.names]
    return found


def test_the_daemon_uses_only_apilogs_public_core() -> None:
    """apilogd reaches apilog through `core`, `settings`, `exceptions` and `spool` only, never a `_private` module."""
    allowed = ("apilog.core.", "apilog.spool", "apilog.settings", "apilog.exceptions", "apilog.__version__")
    wrong = [f"{path.name}:{line} imports {name}" for path in sorted((ROOT / "daemon").glob("*.py"))
             for name, line in _imports(path)
             if name.split(".")[0] == "apilog" and not name.startswith(allowed)]
    assert wrong == []


def test_the_app_side_never_loads_the_daemon_nor_the_daemon_only_state() -> None:
    """`apilog/` imports apilogd only inside the two commands that start or ask it (`apilog demo`, `apilog archive`)."""
    wrong = [f"{path.relative_to(ROOT)}:{line} imports {name}" for path in sorted((ROOT / "apilog").rglob("*.py"))
             for name, line in _imports(path)
             if name.split(".")[0] == "apilogd" and (path.name, name) not in {("cli.py", "apilogd"), ("_demo.py", "apilogd")}]
    assert wrong == []
