"""Turn any message value into plain JSON data, the only thing the spool carries."""

from __future__ import annotations

import math
from datetime import datetime
from typing import Any

DATETIME_FORMAT = "%m/%d/%Y %H:%M:%S"
MAX_DEPTH = 64


def safe_str(value: object) -> str:
    """`str(value)`, or a placeholder when its `__str__` itself fails."""
    try:
        return str(value)
    except Exception:  # noqa: BLE001 - a broken __str__ must not break the call
        return f"<unprintable {type(value).__name__}>"


def jsonable(value: Any) -> Any:
    """A JSON-ready copy: datetimes as `%m/%d/%Y %H:%M:%S`, other non-JSON values as `str()`."""
    return _convert(value, set(), 0)


def _convert(value: Any, active: set[int], depth: int) -> Any:
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else safe_str(value)
    if isinstance(value, datetime):
        return value.strftime(DATETIME_FORMAT)
    if not isinstance(value, (dict, list, tuple)):
        return safe_str(value)
    if depth >= MAX_DEPTH:
        return "[too deep]"
    if id(value) in active:
        return "[cycle]"
    active.add(id(value))
    try:
        if isinstance(value, dict):
            return {
                (k if isinstance(k, str) else safe_str(k)): _convert(v, active, depth + 1)
                for k, v in value.items()
            }
        return [_convert(v, active, depth + 1) for v in value]
    finally:
        active.discard(id(value))


def without_surrogates(value: Any) -> Any:
    """`value` with every lone surrogate (no UTF-8 for it) written as its `\\udXXX` escape text."""
    if isinstance(value, str):
        return value.encode("utf-8", "backslashreplace").decode("utf-8")
    if isinstance(value, dict):
        return {without_surrogates(k): without_surrogates(v) for k, v in value.items()}
    if isinstance(value, list):
        return [without_surrogates(v) for v in value]
    return value
