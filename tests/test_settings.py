"""docs/reference.md, "Configuration": defaults, the environment, apilog.toml, and clear errors naming the variable."""

from __future__ import annotations

from pathlib import Path

import platformdirs
import pytest

from apilog import settings
from apilog.exceptions import ConfigError


def test_defaults(home: Path) -> None:
    """With only APILOG_HOME set, every default of docs/reference.md, "Configuration" holds."""
    conf = settings.load()
    assert conf.home == home and conf.log_dir == home / "logs" and conf.spool_dir == home / "spool"
    assert conf.broker_url is None and conf.drains_spool
    assert (conf.role, conf.shards, conf.writer_shards, conf.standby) == ("local", 1, frozenset({0}), False)
    assert (conf.format, conf.timestamps, conf.tz_name, conf.fsync) == ("text", True, "UTC", "batch")
    assert (conf.max_entry_bytes, conf.rotate_bytes, conf.rotate_age, conf.retain_days) == (65536, 10485760, 86400, 0)
    assert conf.strict is False


def test_home_defaults_to_platformdirs(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("APILOG_HOME")
    assert settings.load().home == Path(platformdirs.user_data_dir("apilog"))


def test_systemd_directories(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Under systemd, StateDirectory= and LogsDirectory= give the defaults."""
    monkeypatch.delenv("APILOG_HOME")
    monkeypatch.setenv("STATE_DIRECTORY", "/var/lib/apilog")
    monkeypatch.setenv("LOGS_DIRECTORY", "/var/log/apilog")
    conf = settings.load()
    assert conf.home == Path("/var/lib/apilog") and conf.log_dir == Path("/var/log/apilog")


@pytest.mark.parametrize(
    ("name", "value", "says"),
    [
        ("APILOG_FORMAT", "xml", "APILOG_FORMAT must be one of text, jsonl"),
        ("APILOG_TIMESTAMPS", "maybe", "APILOG_TIMESTAMPS must be 1 or 0"),
        ("APILOG_TZ", "Nowhere/Land", "APILOG_TZ must be UTC, local or an IANA zone name"),
        ("APILOG_FSYNC", "never", "APILOG_FSYNC must be one of off, batch, always"),
        ("APILOG_MAX_ENTRY_BYTES", "lots", "APILOG_MAX_ENTRY_BYTES must be a whole number"),
        ("APILOG_ROTATE_BYTES", "0", "APILOG_ROTATE_BYTES must be at least 1"),
        ("APILOG_ROTATE_AGE", "-5", "APILOG_ROTATE_AGE must be at least 0"),
        ("APILOG_RETAIN_DAYS", "1.5", "APILOG_RETAIN_DAYS must be a whole number"),
        ("APILOG_RETAIN_DAYS", "36 hours", "APILOG_RETAIN_DAYS must be a whole number or whole days"),
        ("APILOG_ROTATE_BYTES", "10 parsecs", "APILOG_ROTATE_BYTES must be a whole number or a size such as 10 MB"),
        ("APILOG_ROTATE_BYTES", "1.5", "APILOG_ROTATE_BYTES must be a whole number or a size"),
        ("APILOG_ROTATE_AGE", "1 fortnight", "APILOG_ROTATE_AGE must be a whole number or a duration"),
        ("APILOG_MAX_ENTRY_BYTES", "1 kB", "APILOG_MAX_ENTRY_BYTES must be at least 1024; got 1000"),
        ("APILOG_STRICT", "2", "APILOG_STRICT must be 1 or 0"),
        ("APILOG_LOG_DIR", "relative/logs", "APILOG_LOG_DIR must be an absolute path"),
        ("APILOG_BROKER_URL", "localhost:6379", "APILOG_BROKER_URL must be a Celery broker URL"),
    ],
)
def test_bad_values_name_the_variable(home: Path, monkeypatch: pytest.MonkeyPatch, name: str, value: str, says: str) -> None:
    monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError, match=says):
        settings.load()


def test_toml_file_and_environment_wins(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """apilog.toml sets values; the environment overrides it; unknown keys are refused."""
    home.mkdir()
    (home / "apilog.toml").write_text('format = "jsonl"\nfsync = "always"\ntimestamps = false\n')
    conf = settings.load()
    assert (conf.format, conf.fsync, conf.timestamps) == ("jsonl", "always", False)
    monkeypatch.setenv("APILOG_FORMAT", "text")
    assert settings.load().format == "text"
    (home / "apilog.toml").write_text("colour = 1\n")
    with pytest.raises(ConfigError, match="unknown setting 'colour'"):
        settings.load()
    (home / "apilog.toml").write_text("rotate_bytes = 0\n")
    with pytest.raises(ConfigError, match="APILOG_ROTATE_BYTES must be at least 1"):
        settings.load()


@pytest.mark.parametrize(
    ("name", "value", "field", "expected"),
    [
        ("APILOG_ROTATE_BYTES", "10 MB", "rotate_bytes", 10_000_000),
        ("APILOG_ROTATE_BYTES", "10 MiB", "rotate_bytes", 10 * 2**20),
        ("APILOG_ROTATE_BYTES", "10M", "rotate_bytes", 10 * 2**20),  # K, M, G alone count in 1024s, as in systemd
        ("APILOG_ROTATE_BYTES", "1.5 kB", "rotate_bytes", 1500),
        ("APILOG_MAX_ENTRY_BYTES", "64 KiB", "max_entry_bytes", 65536),
        ("APILOG_ROTATE_AGE", "1 day", "rotate_age", 86400),
        ("APILOG_ROTATE_AGE", "1d 12h", "rotate_age", 129600),
        ("APILOG_ROTATE_AGE", "90 minutes", "rotate_age", 5400),
        ("APILOG_ROTATE_AGE", "3600", "rotate_age", 3600),
        ("APILOG_RETAIN_DAYS", "2 weeks", "retain_days", 14),
        ("APILOG_RETAIN_DAYS", "30 days", "retain_days", 30),
        ("APILOG_RETAIN_DAYS", "30", "retain_days", 30),
    ],
)
def test_sizes_and_durations_read_as_people_write_them(home: Path, monkeypatch: pytest.MonkeyPatch, name: str,
                                                        value: str, field: str, expected: int) -> None:
    monkeypatch.setenv(name, value)
    assert getattr(settings.load(), field) == expected


def test_human_values_in_the_toml_file(home: Path) -> None:
    home.mkdir()
    (home / "apilog.toml").write_text('rotate_bytes = "5 MB"\nrotate_age = "12 hours"\nretain_days = "1 week"\n')
    loaded = settings.load()
    assert (loaded.rotate_bytes, loaded.rotate_age, loaded.retain_days) == (5_000_000, 43200, 7)


def test_roles_and_shards(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """docs/many-hosts.md's variables: a role other than local needs a broker; writer shards are ranges within APILOG_SHARDS."""
    monkeypatch.setenv("APILOG_ROLE", "write")
    with pytest.raises(ConfigError, match="APILOG_ROLE=write needs APILOG_BROKER_URL"):
        settings.load()
    monkeypatch.setenv("APILOG_BROKER_URL", "redis://127.0.0.1:6379/0")
    monkeypatch.setenv("APILOG_SHARDS", "8")
    monkeypatch.setenv("APILOG_WRITER_SHARDS", "0-3, 7")
    conf = settings.load()
    assert (conf.role, conf.shards, conf.writer_shards, conf.standby) == ("write", 8, frozenset({0, 1, 2, 3, 7}), False)
    monkeypatch.setenv("APILOG_WRITER_SHARDS", "all")
    assert settings.load().standby and settings.load().writer_shards == frozenset(range(8))
    for bad, why in (("8", "outside the 8 shards 0-7"), ("3-1", "outside"), ("x", "not a shard number")):
        monkeypatch.setenv("APILOG_WRITER_SHARDS", bad)
        with pytest.raises(ConfigError, match=f"APILOG_WRITER_SHARDS: .*{why}"):
            settings.load()
    monkeypatch.setenv("APILOG_ROLE", "relay")
    with pytest.raises(ConfigError, match="APILOG_ROLE must be one of local, forward, write"):
        settings.load()


PINNED_SHARDS = [3, 0, 0, 2]  # computed once with hashlib.blake2b(user.encode(), digest_size=8), big-endian, % 4


def test_a_users_shard_is_the_same_everywhere() -> None:
    """The shard is BLAKE2b-64 of the UTF-8 location, big-endian, modulo the shard count: pinned here, because
    every host of a site (and every version of apilog) must agree on it."""
    from apilog.core.shards import shard_of

    assert [shard_of(user, 4) for user in ("usera1@gizzleMail.com", "system", "kim", "bob")] == PINNED_SHARDS
    assert shard_of("anyone", 1) == 0
    assert {shard_of(f"user{n}", 4) for n in range(100)} == {0, 1, 2, 3}
