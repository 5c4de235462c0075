"""The original author's examples, through a real apilogd, compared with the exact text of docs/reference.md, "Entry format"."""

from __future__ import annotations

import time
from datetime import datetime
from pathlib import Path

from apilog import logger

from .utils import log_file, unstamp, wait_written


def test_seed_examples_write_the_exact_text(daemon: Path) -> None:
    """m= system INFO, a timestamped user INFO, a system ERROR and the LOGIN dict land as docs/reference.md says."""
    since = time.time()
    logger.delay(m="Log entry here.")
    logger.delay("INFO", "usera1@gizzleMail.com", "User a1 opened the dashboard.", timestamp=True)
    logger.delay("ERROR", "system", "Database connection lost.")
    login = {"email": "usera1@gizzleMail.com", "ip": "203.0.113.7", "time_in": datetime(2024, 4, 9, 20, 39, 5)}
    logger.delay("LOGIN", "usera1@gizzleMail.com", login, dict_to_string=True, heading="New Login")
    wait_written()
    until = time.time()

    assert unstamp(log_file(daemon, "system/INFO.log"), since, until) == "INFO:  Log entry here. \u00a7 [<TS>]\n"
    assert unstamp(log_file(daemon, "users/usera1@gizzleMail.com/INFO.log"), since, until) == (
        "INFO:  User a1 opened the dashboard. \u00a7 [<TS>]\n"
    )
    assert unstamp(log_file(daemon, "system/ERROR.log"), since, until) == "ERROR:  Database connection lost. \u00a7 [<TS>]\n"
    assert unstamp(log_file(daemon, "users/usera1@gizzleMail.com/LOGIN.log"), since, until) == (
        "LOGIN: New Login\n"
        "{\n"
        '    "email": "usera1@gizzleMail.com",\n'
        '    "ip": "203.0.113.7",\n'
        '    "time_in": "04/09/2024 20:39:05"\n'
        "} \u00a7 [<TS>]\n"
    )


def test_timestamp_off_and_compact_dict(daemon: Path) -> None:
    """timestamp=False drops the stamp; a dict without dict_to_string is compact JSON on one line."""
    logger.delay("DEBUG", "bob", "no stamp", timestamp=False)
    logger.delay("DEBUG", "bob", {"a": 1, "b": [1, 2]}, timestamp=False)
    wait_written()
    assert log_file(daemon, "users/bob/DEBUG.log") == 'DEBUG:  no stamp\nDEBUG:  {"a":1,"b":[1,2]}\n'


def test_event_time_is_taken_in_the_caller(home: Path) -> None:
    """An entry logged while the daemon is stopped carries the call's time, not the write's."""
    from apilogd.process import control

    from apilog import settings

    logger.delay("INFO", "late", "written later")
    called = time.time()
    time.sleep(1.2)
    control.start(settings.load())
    try:
        wait_written()
    finally:
        control.stop(settings.load())
    text = log_file(home, "users/late/INFO.log")
    assert unstamp(text, called - 1, called) == "INFO:  written later \u00a7 [<TS>]\n"
