"""docs/reference.md, "Streams": the default streams, `apilog streams [add|remove]`, and changes seen without a restart."""

from __future__ import annotations

from pathlib import Path

from click.testing import CliRunner

from apilog import logger
from apilog.cli import main
from apilog.core.streams import DEFAULT_STREAMS, MAX_STREAMS, Registry

from .utils import log_file, wait_written


def test_lists_the_defaults(home: Path) -> None:
    """With no registry yet, the eight defaults are listed in order."""
    result = CliRunner().invoke(main, ["streams"])
    assert result.exit_code == 0
    assert result.output.splitlines() == list(DEFAULT_STREAMS)


def test_add_and_remove(home: Path) -> None:
    """Names are upper-cased; bad names, unknown names and INTERNAL are refused with a clear error."""
    runner = CliRunner()
    assert runner.invoke(main, ["streams", "add", "payment failed"]).output == "added PAYMENT FAILED\n"
    assert "PAYMENT FAILED" in runner.invoke(main, ["streams"]).output.splitlines()
    bad = runner.invoke(main, ["streams", "add", "no/slashes"])
    assert bad.exit_code == 1 and "bad stream name" in bad.output
    assert runner.invoke(main, ["streams", "add", "a" * 33]).exit_code == 1
    assert runner.invoke(main, ["streams", "add", "two  spaces"]).exit_code == 1
    internal = runner.invoke(main, ["streams", "remove", "internal"])
    assert internal.exit_code == 1 and "INTERNAL cannot be removed" in internal.output
    missing = runner.invoke(main, ["streams", "remove", "NEVER ADDED"])
    assert missing.exit_code == 1 and "no stream named" in missing.output
    assert runner.invoke(main, ["streams", "remove", "debug"]).output.startswith("removed DEBUG")
    assert "DEBUG" not in runner.invoke(main, ["streams"]).output.splitlines()


def test_registry_is_capped(home: Path) -> None:
    """Past MAX_STREAMS, adding is refused rather than growing without bound."""
    registry = Registry(home)
    for n in range(MAX_STREAMS - len(DEFAULT_STREAMS)):
        registry.add(f"S{n}")
    result = CliRunner().invoke(main, ["streams", "add", "ONE MORE"])
    assert result.exit_code == 1 and f"holds {MAX_STREAMS} streams" in result.output


def test_changes_reach_a_running_app_and_daemon(daemon: Path) -> None:
    """A stream added or removed while the app and apilogd run takes effect at once; files stay."""
    logger.delay("AUDIT", "kim", "before add", timestamp=False)
    runner = CliRunner()
    assert runner.invoke(main, ["streams", "add", "audit"]).exit_code == 0
    logger.delay("AUDIT", "kim", "after add", timestamp=False)
    wait_written()
    assert log_file(daemon, "users/kim/AUDIT.log") == "AUDIT:  after add\n"
    assert "unknown stream 'AUDIT'" in log_file(daemon, "system/INTERNAL.log")
    assert "before add" in log_file(daemon, "system/INTERNAL.log")

    assert runner.invoke(main, ["streams", "remove", "audit"]).exit_code == 0
    logger.delay("AUDIT", "kim", "after remove", timestamp=False)
    wait_written()
    assert log_file(daemon, "users/kim/AUDIT.log") == "AUDIT:  after add\n"  # kept, not grown
    assert "after remove" in log_file(daemon, "system/INTERNAL.log")
