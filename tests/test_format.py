"""docs/reference.md, "Entry format": escaping, headings, JSON bodies, and that no entry can forge another."""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime
from pathlib import Path

from hypothesis import given
from hypothesis import strategies as st

from apilog import logger
from apilog.core.logfile import escape_line, render_jsonl, render_text

from .utils import log_file, wait_written

ENTRY_START = re.compile(r"^[A-Z0-9_-]+(?: [A-Z0-9_-]+)*:", re.MULTILINE)


def test_escaping_through_the_daemon(daemon: Path) -> None:
    """CR, LF, backslash, ESC and other controls are escaped in messages and headings alike."""
    logger.delay("INFO", "mallory", "ok\r\nINFO:  forged line\\n\x1b[31mred\x00\t", timestamp=False)
    logger.delay("WARN", "mallory", "body\nERROR: fake", heading="Head\nINFO: fake", timestamp=False)
    logger.delay("ERROR", "mallory", {"k\ney": "v\r\n\x85\u2028", "ERROR": 1}, dict_to_string=True, timestamp=False)
    wait_written()
    assert log_file(daemon, "users/mallory/INFO.log") == (
        "INFO:  ok\\r\\nINFO:  forged line\\\\n\\x1b[31mred\\x00\\x09\n"
    )
    assert log_file(daemon, "users/mallory/WARN.log") == "WARN: Head\\nINFO: fake\n    body\\nERROR: fake\n"
    text = log_file(daemon, "users/mallory/ERROR.log")
    assert len(ENTRY_START.findall(text)) == 1
    assert json.loads(text.removeprefix("ERROR:  ")) == {"k\ney": "v\r\n\x85\u2028", "ERROR": 1}
    assert "\x85" not in text and "\u2028" not in text


def test_render_text_forms() -> None:
    """The one-line form, the heading form with a plain and a JSON body, and the stamp."""
    ts = datetime(2024, 4, 9, 20, 39, 5, tzinfo=UTC).timestamp()
    one = render_text("INFO", "Log entry here.", heading=None, dict_to_string=False, ts=ts, tz=UTC)
    assert one == "INFO:  Log entry here. \u00a7 [2024-04-09 20:39:05]\n"
    headed = render_text("INFO", "body", heading="Title", dict_to_string=False, ts=None, tz=UTC)
    assert headed == "INFO: Title\n    body\n"
    as_json = render_text("LOGIN", {"a": "é"}, heading=None, dict_to_string=True, ts=ts, tz=UTC)
    assert as_json == 'LOGIN:  {\n    "a": "é"\n} \u00a7 [2024-04-09 20:39:05]\n'


def test_jsonl_record() -> None:
    """jsonl: one object per line with id, ISO time, stream, location, message and heading."""
    line = render_jsonl("INFO", "a\nb", entry_id="x1", location="bob", heading=None, ts=0.0, tz=UTC)
    assert line.endswith("\n") and line.count("\n") == 1
    assert json.loads(line) == {
        "id": "x1", "ts": "1970-01-01T00:00:00.000000+00:00", "stream": "INFO",
        "location": "bob", "message": "a\nb", "heading": None,
    }


@given(st.text())
def test_escaped_text_is_one_line(text: str) -> None:
    """No message, however hostile, yields a second line or a raw control character."""
    line = escape_line(text)
    assert line.splitlines() == [line] or line == ""
    assert not any(ord(c) < 0x20 or 0x7F <= ord(c) <= 0x9F for c in line)


@given(st.text(), st.one_of(st.none(), st.text()), st.dictionaries(st.text(), st.text()))
def test_no_input_forges_a_second_entry(message: str, heading: str | None, data: dict[str, str]) -> None:
    """Whatever goes into message, heading or dict keys, only the first line starts with NAME:."""
    for body, as_string in ((message, False), (data, True), (data, False)):
        text = render_text("INFO", body, heading=heading, dict_to_string=as_string, ts=0.0, tz=UTC)
        lines = text.split("\n")
        assert lines[-1] == ""
        assert [n for n, line in enumerate(lines) if ENTRY_START.match(line)] == [0]
        assert len(text.splitlines()) == len(lines) - 1  # no hidden line breaks for other readers
