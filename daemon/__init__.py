"""apilogd: the daemon that drains the apilog spool into per-user, per-stream files."""

from __future__ import annotations

__all__: list[str] = []
