"""`apilogd status`: one report, gathered once, rendered as text for people or as JSON for scripts."""

from __future__ import annotations

import grp
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from apilog.settings import Settings, redacted

from ..commit.sealer import seal_status
from . import control

ROLES = {"local": "spool -> files", "forward": "spool -> broker", "write": "broker -> files"}


@dataclass(frozen=True)
class StatusReport:
    """What `apilogd status` says: the settings it runs with, and what the daemon and the disk report."""

    settings: Settings
    info: control.Status
    sealing: dict[str, Any]
    broker_warning: str | None

    @classmethod
    def gather(cls, settings: Settings) -> StatusReport:
        return cls(settings, control.status(settings),
                   seal_status(settings.state_dir, settings.seal and settings.role != "forward"),
                   control.durability_warning(settings))

    @property
    def running(self) -> bool:
        return self.info.pid is not None

    def limits(self) -> dict[str, Any]:
        """The limits' settings, and what the running daemon last reported of them."""
        conf = self.settings
        found = dict(self.info.limits or {})
        found.update(user_rate=conf.user_rate, user_burst=conf.user_burst, user_quota=conf.user_quota,
                     max_use=str(conf.max_use), keep_free=str(conf.keep_free), spool_max=str(conf.spool_max))
        found.setdefault("log_disk_full", False)
        found.setdefault("suppressed", {})
        found.setdefault("limited_now", [])
        return found

    def as_json(self) -> dict[str, Any]:
        conf, info = self.settings, self.info
        return {
            "running": self.running, "pid": info.pid, "backlog": info.backlog,
            "oldest_age_s": info.oldest_age, "written_last_minute": info.written_last_minute,
            "quarantined": info.quarantined, "role": conf.role,
            "broker": redacted(conf.broker_url) if conf.broker_url and conf.role != "local" else None,
            "shards": conf.shards if conf.role != "local" else None,
            "writer_shards": sorted(conf.writer_shards) if conf.role == "write" else None,
            "owned_shards": info.owned_shards, "broker_error": info.broker_error,
            "broker_warning": self.broker_warning,
            "home": str(conf.home), "logs": str(conf.log_dir), "seal": self.sealing,
            "limits": self.limits(),
        }

    def as_text(self) -> str:
        conf, info = self.settings, self.info
        lines = [f"apilogd is running (pid {info.pid})" if self.running else "apilogd is stopped",
                 f"home:        {conf.home}", f"logs:        {conf.log_dir}",
                 f"role:        {conf.role} ({ROLES[conf.role]})"]
        if conf.role != "local" and conf.broker_url:
            lines.append(f"broker:      {redacted(conf.broker_url)}, {conf.shards} shard{'s' if conf.shards > 1 else ''}")
        elif conf.broker_url:
            lines.append("warning:     APILOG_BROKER_URL is set but APILOG_ROLE is local: the broker is not used")
        if conf.role == "write":
            held = "-" if info.owned_shards is None else ",".join(map(str, info.owned_shards)) or "none (standing by)"
            lines.append(f"shards:      writes {','.join(map(str, sorted(conf.writer_shards)))}; holds {held}")
        if self.broker_warning:
            lines.append(f"warning:     {self.broker_warning}")
        if info.broker_error:
            lines.append(f"broker down: {info.broker_error} (entries wait in the spool; retrying)")
        lines.append(f"backlog:     {'unknown' if info.backlog is None else info.backlog} entries waiting")
        lines.append(f"oldest:      {'-' if info.oldest_age is None else f'{info.oldest_age:.1f}s'}")
        if info.written_last_minute is not None:
            lines.append(f"written:     {info.written_last_minute} entries in the last minute")
        lines += self._sealing_text()
        lines.append(f"quarantined: {info.quarantined} spool messages (in {conf.spool_dir / 'quarantine'})")
        lines += self._limits_text()
        lines.append(f"spool group: {_group_of(conf.spool_dir)} "
                     "(an app's user must be in it to log: usermod -aG <group> <user>)")
        return "\n".join(lines)

    def _sealing_text(self) -> list[str]:
        sealing = self.sealing
        if not sealing["on"]:
            return ["sealing:     off"]
        key = "no key yet" if sealing["key_id"] is None else f"key {sealing['key_id']}, epoch {sealing['epoch']}"
        lines = [f"sealing:     on ({key})"]
        if sealing["verification_key_waiting"]:
            lines.append("warning:     the verification key is still on this machine: take it off with `apilogd seal-key`")
        return lines

    def _limits_text(self) -> list[str]:
        conf, limits = self.settings, self.info.limits
        rate = f"{conf.user_rate:g}/s per user, bursts of {conf.user_burst}" if conf.user_rate else "no rate limit"
        lines = [f"limits:      {rate}; tree {conf.max_use}, keep {conf.keep_free} free; spool {conf.spool_max}"]
        if not limits:
            return lines
        if limits.get("log_disk_full"):
            free = limits.get("free_bytes")
            lines.append("warning:     log disk full: entries wait in the spool and are written once space returns"
                         + (f" ({free} bytes free)" if isinstance(free, int) else ""))
        suppressed = limits.get("suppressed") or {}
        if suppressed:
            lines.append("suppressed:  " + ", ".join(f"{n:,} ({reason})" for reason, n in sorted(suppressed.items())))
        lines.extend(f"limited now: {item.get('user')} {item.get('stream')}: {item.get('reason')}, "
                     f"{item.get('suppressed'):,} suppressed" for item in limits.get("limited_now") or [])
        return lines


def _group_of(path: Path) -> str:
    try:
        gid = path.stat().st_gid
    except FileNotFoundError:
        return "- (no spool yet)"
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return str(gid)
