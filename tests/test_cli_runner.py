"""The `apilog` and `apilogd` commands through click's CliRunner where no daemon is needed: output, errors, exit codes."""

from __future__ import annotations

import gzip
import importlib.metadata
import json
from pathlib import Path

import click
import pytest
from apilogd.cli import main as apilogd
from click.testing import CliRunner, Result

from apilog import __version__
from apilog.cli import main as apilog

ARCHIVED_LINE = "INFO:  archived entry § [2024-04-08 10:00:00]\n"
DASHBOARD = "INFO:  opened the dashboard § [2024-04-09 20:39:05]\n"
LOGIN = 'LOGIN: New Login\n{\n    "email": "ann@example.com"\n} § [2024-04-09 20:40:00]\n'
SETTINGS = "INFO:  opened the settings § [2024-04-09 20:41:00]\n"

# A log tree written by hand in the documented format (docs/reference.md, "The log tree" and "Entry format"):
# users/<encoded user>/<STREAM>.log, archives as archive/users/<user>/<stem>.<UTC stamp>.log[.gz].
TREE = {
    "system/INFO.log": "INFO:  system started § [2024-04-09 20:39:00]\n",
    "users/ann/INFO.log": DASHBOARD + SETTINGS,
    "users/ann/LOGIN.log": LOGIN,
    "users/b%20c/SECURITY_ALERT.log": "SECURITY ALERT:  failed login from 10.0.0.1 § [2024-04-10 08:00:00]\n",
    "users/zo%C3%AB/WARN.log": "WARN:  disk almost full\n",  # no stamp (timestamp=False)
    "archive/users/old@x.com/INFO.20240101T000000Z.log": "INFO:  left long ago § [2023-12-31 23:00:00]\n",
}
ARCHIVED = ("archive/users/ann/INFO.20240409T000000Z.log.gz", ARCHIVED_LINE)  # gzipped


def run(command: click.Command, *args: str, home: Path, stdin: str | None = None, **env: str) -> Result:
    """One command in this process, APILOG_HOME (and any other setting) given through the environment."""
    name = "apilogd" if command is apilogd else "apilog"
    return CliRunner().invoke(command, list(args), input=stdin, env={"APILOG_HOME": str(home), **env}, prog_name=name)


@pytest.fixture
def tree(home: Path) -> Path:
    """APILOG_HOME with the hand-written log tree under logs/."""
    logs = home / "logs"
    for relpath, text in TREE.items():
        (logs / relpath).parent.mkdir(parents=True, exist_ok=True)
        (logs / relpath).write_text(text, encoding="utf-8")
    relpath, text = ARCHIVED
    (logs / relpath).parent.mkdir(parents=True, exist_ok=True)
    (logs / relpath).write_bytes(gzip.compress(text.encode()))
    return home


# ---------------------------------------------------------------- versions


def test_versions(home: Path) -> None:
    """`--version` of both commands names the command and the installed package's version."""
    version = importlib.metadata.version("apilog")
    assert version == __version__
    for command, name in ((apilog, "apilog"), (apilogd, "apilogd")):
        done = run(command, "--version", home=home)
        assert (done.exit_code, done.stdout, done.stderr) == (0, f"{name}, version {version}\n", "")


# ---------------------------------------------------------------- streams


def test_streams_lists_the_defaults(home: Path) -> None:
    """With no registry yet, `apilog streams` lists the eight default streams in order, and writes nothing."""
    done = run(apilog, "streams", home=home)
    assert done.exit_code == 0
    assert done.stdout.splitlines() == ["INFO", "WARN", "DEBUG", "LOGIN", "ERROR", "SECURITY ALERT", "STRANGE ACTIVITY",
                                        "INTERNAL"]
    assert not home.exists()


def test_streams_add_and_remove(home: Path) -> None:
    """`streams add` upper-cases and registers a name, `streams remove` drops it; the listing follows at once."""
    added = run(apilog, "streams", "add", " pay ments ", home=home)
    assert (added.exit_code, added.stdout) == (0, "added PAY MENTS\n")
    again = run(apilog, "streams", "add", "PAY MENTS", home=home)
    assert (again.exit_code, again.stdout) == (0, "added PAY MENTS\n")  # adding twice is no error, and no second entry
    assert run(apilog, "streams", home=home).stdout.splitlines()[-1:] == ["PAY MENTS"]
    assert run(apilog, "streams", home=home).stdout.count("PAY MENTS") == 1
    assert json.loads((home / "streams.json").read_text())["streams"][-1] == "PAY MENTS"
    removed = run(apilog, "streams", "remove", "pay ments", home=home)
    assert (removed.exit_code, removed.stdout) == (0, "removed PAY MENTS (its files are kept)\n")
    assert "PAY MENTS" not in run(apilog, "streams", home=home).stdout


@pytest.mark.parametrize(("args", "message"), [
    (("add", "bad/name"), "Error: bad stream name 'bad/name': use 1-32 of A-Z 0-9 _ - and single inner spaces\n"),
    (("add", "x" * 33), "Error: bad stream name"),
    (("add", "two  spaces"), "Error: bad stream name"),
    (("add", "screen"), "Error: SCREEN is a pseudo-stream and cannot be registered\n"),
    (("remove", "INTERNAL"), "Error: INTERNAL cannot be removed: apilog reports about itself there\n"),
    (("remove", "nope"), "Error: no stream named 'NOPE'\n"),
])
def test_streams_refusals_are_one_line_errors(home: Path, args: tuple[str, str], message: str) -> None:
    """A refused change is one line on stderr starting `Error:`, exit 1, and the registry unchanged."""
    done = run(apilog, "streams", *args, home=home)
    assert done.exit_code == 1 and done.stdout == ""
    assert done.stderr.startswith(message) and done.stderr.count("\n") == 1
    assert "Traceback" not in done.output
    assert not (home / "streams.json").exists()


# ---------------------------------------------------------------- reading a tree


def test_users_lists_decoded_names_live_and_archived(tree: Path) -> None:
    """`apilog users`: every user folder, live or only archived, by its decoded name, sorted; never `system`."""
    done = run(apilog, "users", home=tree)
    assert (done.exit_code, done.stdout.splitlines()) == (0, ["ann", "b c", "old@x.com", "zoë"])


def test_users_without_a_tree_lists_nothing(home: Path) -> None:
    done = run(apilog, "users", home=home)
    assert (done.exit_code, done.stdout, done.stderr) == (0, "", "")


def test_tail_merges_streams_by_time_archives_included(tree: Path) -> None:
    """`apilog tail USER` merges every stream and archive by event time; -n counts entries, not lines."""
    assert run(apilog, "tail", "ann", home=tree).stdout == ARCHIVED_LINE + DASHBOARD + LOGIN + SETTINGS
    assert run(apilog, "tail", "ann", "-n", "2", home=tree).stdout == LOGIN + SETTINGS
    assert run(apilog, "tail", "ann", "-n", "0", home=tree).stdout == ""


def test_tail_of_one_stream(tree: Path) -> None:
    """`apilog tail USER STREAM` reads that stream's archives then its live file; the name is upper-cased first."""
    assert run(apilog, "tail", "ann", "info", home=tree).stdout == ARCHIVED_LINE + DASHBOARD + SETTINGS
    assert run(apilog, "tail", "ann", "INFO", "-n", "1", home=tree).stdout == SETTINGS
    assert run(apilog, "tail", "b c", "security alert", home=tree).stdout == TREE["users/b%20c/SECURITY_ALERT.log"]
    assert run(apilog, "tail", "zoë", home=tree).stdout == "WARN:  disk almost full\n"
    assert run(apilog, "tail", "old@x.com", home=tree).stdout == TREE["archive/users/old@x.com/INFO.20240101T000000Z.log"]
    assert run(apilog, "tail", "nobody", home=tree).stdout == ""


def test_tail_refuses_what_names_no_user_or_stream(tree: Path) -> None:
    """A user name no folder can have, or a bad stream name, is a one-line error and a non-zero exit."""
    empty = run(apilog, "tail", "", home=tree)
    assert empty.exit_code == 1 and empty.stderr.startswith("Error: bad user name ''")
    long = run(apilog, "tail", "x" * 300, home=tree)
    assert long.exit_code == 1 and "bad user name" in long.stderr
    stream = run(apilog, "tail", "ann", "no/such", home=tree)
    assert stream.exit_code == 1 and stream.stderr.startswith("Error: bad stream name 'no/such'")
    assert "Traceback" not in empty.output + long.output + stream.output


def test_show_with_and_without_since(tree: Path) -> None:
    """`apilog show USER` is every entry merged by time; --since keeps those from then on (UTC unless it says)."""
    assert run(apilog, "show", "ann", home=tree).stdout == ARCHIVED_LINE + DASHBOARD + LOGIN + SETTINGS
    assert run(apilog, "show", "ann", "--since", "2024-04-09T20:40:00", home=tree).stdout == LOGIN + SETTINGS
    assert run(apilog, "show", "ann", "--since", "2024-04-09T22:40:00+02:00", home=tree).stdout == LOGIN + SETTINGS
    assert run(apilog, "show", "ann", "--since", "1d", home=tree).stdout == ""  # an age: these are years old
    # Entries without a stamp have no time to compare: --since leaves them out.
    assert run(apilog, "show", "zoë", "--since", "2000-01-01", home=tree).stdout == ""


def test_show_in_another_zone(tree: Path) -> None:
    """Stamps are read in APILOG_TZ: the same --since instant keeps other entries when the tree was written in +02:00."""
    done = run(apilog, "show", "ann", "--since", "2024-04-09T18:40:00Z", home=tree, APILOG_TZ="Europe/Paris")
    assert done.stdout == LOGIN + SETTINGS


def test_show_refuses_a_bad_since(tree: Path) -> None:
    """--since that is neither an ISO time nor an age like 2h: a usage error (exit 2) saying what it takes."""
    done = run(apilog, "show", "ann", "--since", "yesterday", home=tree)
    assert done.exit_code == 2 and done.stdout == ""
    assert "'yesterday': give an ISO date/time or an age like 30m, 2h, 7d" in done.stderr


@pytest.mark.parametrize("args", [("show", "ann"), ("search", "opened")])
def test_an_age_past_the_calendar_is_a_usage_error(tree: Path, args: tuple[str, str]) -> None:
    """--since 1000000d (before year 1) is refused like any other bad --since, not with a traceback."""
    done = CliRunner().invoke(apilog, [*args, "--since", "1000000d"], env={"APILOG_HOME": str(tree)},
                              catch_exceptions=False)
    assert done.exit_code == 2 and "give an ISO date/time or an age" in done.stderr


def test_search_labels_each_hit_with_its_file(tree: Path) -> None:
    """`apilog search` finds a regular expression in live files and gzip archives, each hit after its file's path."""
    done = run(apilog, "search", "login", home=tree)
    assert (done.exit_code, done.stdout) == (0, "users/b%20c/SECURITY_ALERT.log: " + TREE["users/b%20c/SECURITY_ALERT.log"])
    archived = run(apilog, "search", "archived", home=tree)
    assert archived.stdout == f"{ARCHIVED[0]}: {ARCHIVED_LINE}"
    system = run(apilog, "search", "started", home=tree)
    assert system.stdout == "system/INFO.log: " + TREE["system/INFO.log"]


def test_search_narrowed_by_user_stream_and_since(tree: Path) -> None:
    """--user, --stream and --since narrow a search; they combine."""
    assert run(apilog, "search", "(?i)login", "--user", "ann", home=tree).stdout == "users/ann/LOGIN.log: " + LOGIN
    assert run(apilog, "search", "opened", "--stream", "info", home=tree).stdout == (
        "users/ann/INFO.log: " + DASHBOARD + "users/ann/INFO.log: " + SETTINGS)
    assert run(apilog, "search", "opened", "--user", "ann", "--since", "2024-04-09T20:40:00", home=tree).stdout == (
        "users/ann/INFO.log: " + SETTINGS)


def test_search_exit_codes(tree: Path) -> None:
    """No hit: exit 1 and nothing printed (as grep); a bad regular expression: a usage error, exit 2."""
    none = run(apilog, "search", "no such words", home=tree)
    assert (none.exit_code, none.stdout, none.stderr) == (1, "", "")
    bad = run(apilog, "search", "(", home=tree)
    assert bad.exit_code == 2 and "Invalid value" in bad.stderr and "'('" in bad.stderr


def test_jsonl_trees_are_read_too(home: Path) -> None:
    """With APILOG_FORMAT=jsonl the same commands read .jsonl files, a JSON object a line, shown as written."""
    folder = home / "logs" / "users" / "ann"
    folder.mkdir(parents=True)
    first = {"id": "1", "ts": "2024-04-09T20:39:05.000000+00:00", "stream": "INFO", "location": "ann",
             "message": "opened", "heading": None}
    second = {**first, "id": "2", "ts": "2024-04-09T20:41:00.000000+00:00", "stream": "LOGIN", "message": {"ok": True}}
    (folder / "INFO.jsonl").write_text(json.dumps(first) + "\nnot json\n")
    (folder / "LOGIN.jsonl").write_text(json.dumps(second) + "\n")
    (folder / "WARN.log").write_text("WARN:  a text file, not read under jsonl\n")
    done = run(apilog, "tail", "ann", home=home, APILOG_FORMAT="jsonl")
    assert done.stdout == json.dumps(first) + "\n" + json.dumps(second) + "\n"
    assert run(apilog, "users", home=home, APILOG_FORMAT="jsonl").stdout == "ann\n"


# ---------------------------------------------------------------- the daemon's commands, with no daemon


def test_apilogd_status_says_stopped_with_exit_3(home: Path) -> None:
    """`apilogd status` with no daemon: it says so, exit 3 (LSB: not running); the JSON form too. It creates nothing."""
    done = run(apilogd, "status", home=home)
    assert done.exit_code == 3, done.output
    lines = done.stdout.splitlines()
    assert lines[0] == "apilogd is stopped"
    assert f"home:        {home}" in lines and f"logs:        {home / 'logs'}" in lines
    assert "backlog:     0 entries waiting" in lines
    as_json = run(apilogd, "status", "--json", home=home)
    assert as_json.exit_code == 3
    report = json.loads(as_json.stdout)
    assert (report["running"], report["pid"], report["backlog"], report["home"]) == (False, None, 0, str(home))
    assert not home.exists()


def test_apilogd_metrics_when_stopped(home: Path) -> None:
    """`apilogd metrics` with no daemon prints what the disk says, in Prometheus text format: up 0, nothing waiting."""
    done = run(apilogd, "metrics", home=home)
    assert done.exit_code == 0
    assert "apilog_up 0.0\n" in done.stdout and "apilog_backlog_entries 0.0\n" in done.stdout


def test_apilogd_seal_key_before_any_seal(home: Path) -> None:
    """`apilogd seal-key` before apilogd ever ran: a one-line error saying to start it first."""
    done = run(apilogd, "seal-key", home=home)
    assert done.exit_code == 1 and done.stdout == ""
    assert done.stderr == "Error: apilogd has sealed nothing yet: start it (`apilogd start`), then run `apilogd seal-key`\n"


def test_verify_refusals(tree: Path) -> None:
    """`apilog verify` with no log tree, or with a key that is not one: usage errors naming what is wrong."""
    bad_key = run(apilog, "verify", "--key", "-", home=tree, stdin="apilog-seal-1:nonsense\n")
    assert bad_key.exit_code == 2 and "Invalid value for --key: not an apilog verification key" in bad_key.stderr
    bad_user = run(apilog, "verify", "--user", "", home=tree)
    assert bad_user.exit_code == 2 and "--user" in bad_user.stderr
    no_tree = run(apilog, "verify", home=tree, APILOG_LOG_DIR=str(tree / "elsewhere"))
    assert no_tree.exit_code == 2 and f"no log tree at {tree / 'elsewhere'} (APILOG_LOG_DIR)" in no_tree.stderr


# ---------------------------------------------------------------- bad settings


BAD_SETTINGS = [
    ("APILOG_FORMAT", "xml", "APILOG_FORMAT must be one of text, jsonl; got 'xml'"),
    ("APILOG_TZ", "Mars/Olympus_Mons", "APILOG_TZ must be UTC, local or an IANA zone name; got 'Mars/Olympus_Mons'"),
    ("APILOG_ROTATE_BYTES", "lots", "APILOG_ROTATE_BYTES must be"),
    ("APILOG_MAX_ENTRY_BYTES", "10", "APILOG_MAX_ENTRY_BYTES must be at least 1024"),
    ("APILOG_FSYNC", "sometimes", "APILOG_FSYNC must be one of"),
    ("APILOG_SEAL", "maybe", "APILOG_SEAL must be 1 or 0"),
    ("APILOG_LOG_DIR", "relative/logs", "APILOG_LOG_DIR must be an absolute path, got 'relative/logs'"),
    ("APILOG_ROLE", "write", "APILOG_ROLE=write needs APILOG_BROKER_URL"),
    ("APILOG_USER_RATE", "-5", "APILOG_USER_RATE must be"),
]


@pytest.mark.parametrize(("variable", "value", "message"), BAD_SETTINGS)
@pytest.mark.parametrize("command", [(apilog, "streams"), (apilog, "users"), (apilogd, "status")],
                         ids=["apilog streams", "apilog users", "apilogd status"])
def test_a_bad_setting_is_a_one_line_error_naming_it(home: Path, command: tuple[click.Command, str], variable: str, value: str,
                                                     message: str) -> None:
    """A bad value in the environment stops the command before it does anything: `Error: <variable> ...`, exit 1."""
    program, name = command
    done = run(program, name, home=home, **{variable: value})
    assert done.exit_code == 1, done.output
    assert done.stdout == ""
    assert done.stderr.startswith(f"Error: {message}") and done.stderr.count("\n") == 1, done.stderr
    assert "Traceback" not in done.output


def test_a_relative_home_is_refused(home: Path) -> None:
    """APILOG_HOME must be absolute: said as it was given."""
    done = run(apilog, "users", home=Path("relative/home"))
    assert done.exit_code == 1
    assert done.stderr == "Error: APILOG_HOME must be an absolute path, got 'relative/home'\n"


def test_a_bad_settings_file_is_named(home: Path) -> None:
    """A setting in $APILOG_HOME/apilog.toml that does not exist, or of the wrong type, is refused naming the file."""
    home.mkdir()
    (home / "apilog.toml").write_text('format = "text"\nrotate_size = "10 MB"\n')
    done = run(apilog, "users", home=home)
    assert done.exit_code == 1
    assert done.stderr == f"Error: {home / 'apilog.toml'}: unknown setting 'rotate_size'\n"
    (home / "apilog.toml").write_text("tz = [1, 2]\n")
    typed = run(apilogd, "status", home=home)
    assert typed.exit_code == 1
    assert typed.stderr == f"Error: {home / 'apilog.toml'}: tz (APILOG_TZ) must be a string or a number\n"
    (home / "apilog.toml").write_text('format = "xml"\n')
    assert run(apilog, "users", home=home).stderr == "Error: APILOG_FORMAT must be one of text, jsonl; got 'xml'\n"
    (home / "apilog.toml").write_text("format = \n")
    broken = run(apilog, "users", home=home)
    assert broken.exit_code == 1 and broken.stderr.startswith(f"Error: {home / 'apilog.toml'}: cannot be read")
