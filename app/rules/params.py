"""Owns the checks of rule params: each returns a problem in words, or None when the value is fine."""

from __future__ import annotations

import re
from typing import Any, Callable

from ..config import is_label_key, is_label_value

Check = Callable[[Any], "str | None"]


def label_key(value: Any) -> str | None:
    if isinstance(value, str) and is_label_key(value):
        return None
    return (f"{value!r} is not a label key (optional DNS prefix and '/', then up to 63 of "
            "[A-Za-z0-9-_.], starting and ending alphanumeric)")


def label_value(value: Any) -> str | None:
    if isinstance(value, str) and is_label_value(value):
        return None
    return f"{value!r} is not a label value (up to 63 of [A-Za-z0-9-_.], alphanumeric at the ends)"


def optional_label_value(value: Any) -> str | None:
    if value is None:
        return None
    if value == "":
        return "'' is not allowed: use null to leave the setting off"
    return label_value(value)


def label_map(value: Any) -> str | None:
    if not isinstance(value, dict) or not value:
        return "must be a non-empty map of label keys to label values"
    for key, item in value.items():
        problem = label_key(key) or label_value(item)
        if problem:
            return problem
    return None


def regex(value: Any) -> str | None:
    if not isinstance(value, str):
        return "must be a regular expression (a string)"
    try:
        re.compile(value)
    except re.error as exc:
        return f"{value!r} is not a valid regular expression: {exc}"
    return None


def optional_regex(value: Any) -> str | None:
    return None if value is None else regex(value)


def one_of(*allowed: str) -> Check:
    def check(value: Any) -> str | None:
        if value in allowed:
            return None
        return f"{value!r} is not one of {', '.join(allowed)}"
    return check


def name_list(pattern: str, what: str) -> Check:
    compiled = re.compile(pattern)

    def check(value: Any) -> str | None:
        if (isinstance(value, list) and value
                and all(isinstance(v, str) and compiled.fullmatch(v) for v in value)):
            return None
        return f"must be a non-empty list of {what}"
    return check
