"""Owns the checks of rule params: each returns a problem in words, or None when the value is
fine; and the label grammar they check against."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

Check = Callable[[Any], "str | None"]

# Label keys: optional DNS-subdomain prefix (<= 253) and '/', then a name of <= 63 characters
# (k8s.io/apimachinery/pkg/util/validation IsQualifiedName); values <= 63 (IsValidLabelValue).
_LABEL_NAME = r"([A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?)"
_DNS_SUBDOMAIN = r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*"
LABEL_KEY_RE = re.compile(rf"^({_DNS_SUBDOMAIN}/)?{_LABEL_NAME}$")
LABEL_VALUE_RE = re.compile(rf"^({_LABEL_NAME})?$")


def is_label_key(key: str) -> bool:
    prefix, _, name = key.rpartition("/")
    return bool(LABEL_KEY_RE.match(key)) and len(prefix) <= 253 and len(name) <= 63


def is_label_value(value: str) -> bool:
    return len(value) <= 63 and bool(LABEL_VALUE_RE.match(value))


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


# An https URL without spaces: what a docsURL appended to messages may be (RFC 3986 reserved and
# unreserved characters only, so it prints as one clickable word).
_URL = re.compile(r"^https://[A-Za-z0-9.-]+(:[0-9]+)?(/[A-Za-z0-9._~!$&'()*+,;=:@%/?#-]*)?$")
MAX_URL = 200


def https_url(value: Any) -> str | None:
    if isinstance(value, str) and len(value) <= MAX_URL and _URL.match(value):
        return None
    return f"{value!r} is not an https URL (https://host/path, at most {MAX_URL} characters)"
