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


def _package(path: Path) -> str:
    """The dotted package a source file belongs to (daemon/ installs as apilogd)."""
    parts = list(path.relative_to(ROOT).parts[:-1])
    if parts and parts[0] == "daemon":
        parts[0] = "apilogd"
    return ".".join(parts)


def _imports(path: Path) -> list[tuple[str, int]]:
    """Every module (or module.name) a file imports, made absolute, with its line."""
    package = _package(path)
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
            found += [(f"{base}.{alias.name}", node.lineno) for alias in node.names]
    return found


def _sources(*folders: str) -> list[Path]:
    return sorted(p for folder in folders for p in (ROOT / folder).rglob("*.py"))


def test_the_daemon_uses_only_apilogs_public_core() -> None:
    """apilogd reaches apilog through `core`, `settings`, `exceptions`, `spool` and `clitools` only."""
    allowed = ("apilog.core.", "apilog.spool", "apilog.settings", "apilog.exceptions", "apilog.clitools",
               "apilog.__version__")
    wrong = [f"{path.relative_to(ROOT)}:{line} imports {name}" for path in _sources("daemon")
             for name, line in _imports(path)
             if name.split(".")[0] == "apilog" and not name.startswith(allowed)]
    assert wrong == []


def test_the_app_side_never_imports_the_daemon() -> None:
    """Nothing under apilog/ imports apilogd: its commands start `apilogd` as a process or read what it wrote."""
    wrong = [f"{path.relative_to(ROOT)}:{line} imports {name}" for path in _sources("apilog")
             for name, line in _imports(path) if name.split(".")[0] == "apilogd"]
    assert wrong == []


def test_no_module_reaches_into_another_packages_private_module() -> None:
    """A `_private` module or name is imported only from its own package (tests aside)."""
    wrong = []
    for path in _sources("apilog", "daemon"):
        for name, line in _imports(path):
            parts = name.split(".")
            private = next((i for i, part in enumerate(parts) if i and part.startswith("_") and not part.startswith("__")),
                           None)
            if parts[0] in ("apilog", "apilogd") and private is not None and ".".join(parts[:private]) != _package(path):
                wrong.append(f"{path.relative_to(ROOT)}:{line} imports {name}")
    assert wrong == []


def test_the_daemons_root_holds_only_the_command_and_its_face() -> None:
    """daemon/ itself holds the command, __main__, the exceptions and the package's face; the rest lives in folders."""
    assert sorted(p.name for p in (ROOT / "daemon").glob("*.py")) == ["__init__.py", "__main__.py", "cli.py", "exceptions.py"]


def test_the_code_and_tests_cite_only_the_repository() -> None:
    """No citation of a contract file outside the repository, and no helper imported from conftest."""
    mine = Path(__file__).resolve()
    sources = [p for p in _sources("apilog", "daemon", "tests", "bench") if p != mine]
    assert [f"{p.relative_to(ROOT)}" for p in sources if "SPEC" in p.read_text()] == []
    from_conftest = [f"{p.relative_to(ROOT)}" for p in sources if "from .conftest import" in p.read_text()]
    assert from_conftest == []


def test_core_imports_no_click() -> None:
    """apilog.core is what the app and the daemon share: no command-line library in it."""
    assert [f"{p.name}:{line}" for p in _sources("apilog/core") for name, line in _imports(p) if name.startswith("click")] == []
