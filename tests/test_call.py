"""docs/reference.md, "The call", the call: forms, SCREEN, several streams, bad input to INTERNAL, strict mode, Celery."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from celery import Celery

import apilog
from apilog import logger, settings
from apilog.exceptions import BadInput

from .utils import log_file, unstamp, wait_written


def _internal(home: Path) -> str:
    return log_file(home, "system/INTERNAL.log")


def test_screen_prints_and_spools_nothing(home: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """SCREEN alone prints the entry to the app's stdout and writes nothing to the spool."""
    receipt = logger.delay("SCREEN", "bob", "hello there", timestamp=False)
    assert capsys.readouterr().out == "SCREEN:  hello there\n"
    assert receipt.id and receipt.spooled is False
    assert not (home / "spool" / "segments").exists() or not list((home / "spool" / "segments").iterdir())


def test_several_streams_one_entry_each(daemon: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A comma list and a Python list both give one entry in each stream's file."""
    logger.delay("SCREEN,INFO,warn", "carol", "both", timestamp=False)
    logger.delay(["ERROR", "SECURITY ALERT"], "carol", "listed", timestamp=False)
    wait_written()
    assert capsys.readouterr().out == "SCREEN:  both\n"
    assert log_file(daemon, "users/carol/INFO.log") == "INFO:  both\n"
    assert log_file(daemon, "users/carol/WARN.log") == "WARN:  both\n"
    assert log_file(daemon, "users/carol/ERROR.log") == "ERROR:  listed\n"
    assert log_file(daemon, "users/carol/SECURITY_ALERT.log") == "SECURITY ALERT:  listed\n"


def test_unknown_stream_goes_to_internal_with_the_whole_entry(daemon: Path) -> None:
    """The known streams still get the entry; INTERNAL says why and keeps every field."""
    receipt = logger.delay("INFO,NOPE", "dave", {"amount": 5}, heading="Paid", timestamp=False)
    logger.delay("bad/name", "dave", "slash in a stream name", timestamp=False)
    wait_written()
    assert log_file(daemon, "users/dave/INFO.log") == 'INFO: Paid\n{"amount":5}\n'
    notes = _internal(daemon).split("INTERNAL: ")[1:]
    assert len(notes) == 2
    head, _, body = notes[0].partition("\n")
    assert head == "rejected input: unknown stream 'NOPE'"
    assert json.loads(body.rsplit(" \u00a7", 1)[0]) == {
        "id": receipt.id, "stream": "INFO,NOPE", "location": "dave", "message": {"amount": 5}, "heading": "Paid",
    }
    assert "bad stream name 'bad/name'" in notes[1] and "slash in a stream name" in notes[1]
    assert not (daemon / "logs" / "users" / "dave" / "NOPE.log").exists()


def test_bad_location_keeps_content_in_internal(daemon: Path) -> None:
    """An empty or non-string location writes nowhere but INTERNAL, content kept."""
    logger.delay("INFO", "", "empty user")
    logger.delay("INFO", {"not": "a user"}, "dict user")
    logger.delay("INFO", 42, "numeric ids are users too", timestamp=False)
    wait_written()
    internal = _internal(daemon)
    assert "bad location: empty location" in internal and '"message": "empty user"' in internal
    assert "location must be a string, got dict" in internal and '"message": "dict user"' in internal
    assert log_file(daemon, "users/42/INFO.log") == "INFO:  numeric ids are users too\n"


def test_call_forms_and_defaults(daemon: Path) -> None:
    """Positional and keyword forms, m=, the default stream and the current user."""
    logger.delay(m="just m", timestamp=False)
    logger.delay(stream="WARN", location="erin", message="keywords", timestamp=False)
    with apilog.user("frank"):
        logger.delay("INFO", message="from the context", timestamp=False)
    logger.delay(None, None, 12345, timestamp=False)
    wait_written()
    assert log_file(daemon, "system/INFO.log") == "INFO:  just m\nINFO:  12345\n"
    assert log_file(daemon, "users/erin/WARN.log") == "WARN:  keywords\n"
    assert log_file(daemon, "users/frank/INFO.log") == "INFO:  from the context\n"


def test_a_wrong_call_never_raises(daemon: Path) -> None:
    """Arguments delay() does not take go to INTERNAL instead of raising into the app."""
    receipt = logger.delay("INFO", "gina", "x", colour="red")
    wait_written()
    assert receipt.spooled
    internal = _internal(daemon)
    assert "bad call:" in internal and "colour" in internal and '"red"' in internal


def test_strict_mode_raises(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """APILOG_STRICT=1 turns bad input into BadInput instead of an INTERNAL entry."""
    monkeypatch.setenv("APILOG_STRICT", "1")
    settings.reset()
    with pytest.raises(BadInput, match="unknown stream 'NOPE'"):
        logger.delay("NOPE", "bob", "x")
    with pytest.raises(BadInput, match="empty location"):
        logger.delay("INFO", "", "x")


def test_unwritable_spool_prints_the_entry(home: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """When the spool cannot be created, the whole entry and the reason go to stderr; no exception."""
    home.mkdir()
    (home / "spool").write_text("a file where the spool folder should be")
    receipt = logger.delay("INFO", "hank", "keep me somewhere")
    assert receipt.spooled is False
    err = capsys.readouterr().err
    assert "entry not spooled" in err and "keep me somewhere" in err and "hank" in err


def test_event_time_and_ids(daemon: Path) -> None:
    """Each call gets its own id; the written stamp is the call's time."""
    since = time.time()
    ids = {logger.delay("INFO", "ivy", f"n{i}").id for i in range(5)}
    wait_written()
    assert len(ids) == 5
    assert unstamp(log_file(daemon, "users/ivy/INFO.log"), since, time.time()).count("[<TS>]") == 5


def test_apply_async_and_register(daemon: Path) -> None:
    """logger is a Celery task: apply_async works, and register() adds it to another app."""
    logger.apply_async(("INFO", "jack", "via apply_async"), {"timestamp": False})
    wait_written()
    other = Celery("other", set_as_current=False)
    task = apilog.register(other)
    assert other.tasks[task.name] is task and task.name == "apilog.log"
    task.run("INFO", "jack", "run by a worker", timestamp=False)  # what a stock worker does with a message
    assert log_file(daemon, "users/jack/INFO.log") == "INFO:  via apply_async\nINFO:  run by a worker\n"


def test_register_leaves_the_embedded_logger_alone(daemon: Path) -> None:
    """After register(other_app), apilog's own logger still spools locally."""
    apilog.register(Celery("another", set_as_current=False, broker="memory://"))
    assert logger.app is apilog.app
    assert logger.delay("INFO", "kate", "still local", timestamp=False).spooled
    wait_written()
    assert log_file(daemon, "users/kate/INFO.log") == "INFO:  still local\n"


def test_registered_task_publishes_through_kombu(daemon: Path) -> None:
    """On another Celery app whose broker is the spool ("apilog://"), kombu's own publish path lands the entry."""
    other = Celery("publisher", set_as_current=False, broker="apilog://")
    task = apilog.register(other)
    result = task.delay("WARN", "liam", "through kombu", timestamp=False)
    assert result.id
    wait_written()
    assert log_file(daemon, "users/liam/WARN.log") == "WARN:  through kombu\n"


def test_apply_async_task_id_names_the_entry(home: Path) -> None:
    """apply_async(task_id=...) gives the entry that id, as Celery users expect."""
    from apilog.testing import capture

    with capture() as entries:
        logger.apply_async(("INFO", "ned", "named"), task_id="order-42-shipped")
    assert entries[0].id == "order-42-shipped"
