"""Owns how user-supplied values appear in messages, warnings, Events and log lines: quoted and
truncated, so a forged 6 MB value is echoed as 64 characters, not three times over."""

from __future__ import annotations

from typing import Any

# Characters of a user value echoed before "...": enough for any real name, key or label value
# (names <= 63 or 253, label values <= 63).
ECHO_LIMIT = 64

_TYPE_NAMES = {dict: "an object", list: "a list", bool: "a boolean", int: "a number",
               float: "a number", type(None): "null"}


def quote(value: Any, limit: int = ECHO_LIMIT) -> str:
    """A string in double quotes, cut after ``limit`` characters ("abc..."); anything else named
    by its JSON type (never its repr: a forged value may be huge or nested 1,000 deep)."""
    if isinstance(value, str):
        text = value if len(value) <= limit else value[:limit] + "..."
        return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return _TYPE_NAMES.get(type(value), type(value).__name__)


def clip(value: str, limit: int = 253) -> str:
    """A user value for a log field or an Event: at most ``limit`` characters, then "..."."""
    return value if len(value) <= limit else value[:limit] + "..."
