"""Owns the checks of rule params: each returns a problem in words, or None when the value is
fine; and the label grammar they check against."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from ..namespaces.source import KEPT_ANNOTATIONS

Check = Callable[[Any], "str | None"]


class ParamError(ValueError):
    """Raised by a rule kind's constructor for a problem that involves several params; the
    loader reports it under ``params.<field>``."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field, self.message = field, message

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


def boolean(value: Any) -> str | None:
    return None if isinstance(value, bool) else f"{value!r} is not true or false"


def optional_kept_annotation(value: Any) -> str | None:
    """An annotation key the namespace sources keep (under KEPT_ANNOTATIONS), or null."""
    if value is None:
        return None
    if isinstance(value, str) and value.startswith(KEPT_ANNOTATIONS) and is_label_key(value):
        return None
    return (f"{value!r} is not an annotation key under {KEPT_ANNOTATIONS} (the only namespace "
            "annotations poolkeeper keeps), or null to turn it off")


# core/v1 Toleration (k8s.io/kubernetes pkg/apis/core/validation ValidateTolerations)
TOLERATION_FIELDS = ("key", "operator", "value", "effect", "tolerationSeconds")
TAINT_EFFECTS = ("NoSchedule", "PreferNoSchedule", "NoExecute")


def toleration(value: Any) -> str | None:
    if not isinstance(value, dict):
        return f"must be a toleration ({', '.join(TOLERATION_FIELDS)})"
    for field in value:
        if field not in TOLERATION_FIELDS:
            return f"{field!r}: unknown field; allowed: {', '.join(TOLERATION_FIELDS)}"
    key, operator, text, effect = (_or_empty(value, f) for f in ("key", "operator", "value",
                                                                  "effect"))
    if not isinstance(key, str) or (key and not is_label_key(key)):
        return f"key: {label_key(key)}"
    operator = operator or "Equal"  # the API server's meaning of an empty operator
    if operator not in ("Equal", "Exists"):
        return f"operator: {operator!r} is not one of Equal, Exists"
    if not key and operator != "Exists":
        return "an empty key needs operator Exists (it then tolerates every taint)"
    if operator == "Exists" and text != "":
        return f"value: operator Exists takes no value, not {text!r}"
    if not isinstance(text, str) or not is_label_value(text):
        return f"value: {label_value(text)}"
    if effect not in ("", *TAINT_EFFECTS):
        return f"effect: {effect!r} is not one of {', '.join(TAINT_EFFECTS)} (or empty: all)"
    seconds = value.get("tolerationSeconds")
    if seconds is not None:
        if isinstance(seconds, bool) or not isinstance(seconds, int):
            return f"tolerationSeconds: {seconds!r} is not a whole number of seconds"
        if effect != "NoExecute":
            return "tolerationSeconds: only with effect NoExecute"
    return None


def _or_empty(obj: dict, field: str) -> Any:
    """A toleration's field; null or absent is the empty string, as the API server has it."""
    value = obj.get(field)
    return "" if value is None else value


POOL_FIELDS = ("tolerations", "nodeLabels")


def pool_map(value: Any) -> str | None:
    """params.pools: pool name -> {tolerations: [core/v1 Toleration], nodeLabels: {key: value}}."""
    if not isinstance(value, dict):
        return "must be a map of pool names to {tolerations: [...], nodeLabels: {...}}"
    for name, pool in value.items():
        if not isinstance(name, str) or not name or not is_label_value(name):
            return f"{name!r} is not a pool name (a non-empty label value)"
        if pool is None:
            continue  # a pool listed with nothing to add (`gpu:`), for onlyListedPools
        if not isinstance(pool, dict):
            return f"{name}: must be a map with {' and '.join(POOL_FIELDS)}"
        for field in pool:
            if field not in POOL_FIELDS:
                return f"{name}.{field}: unknown field; allowed: {', '.join(POOL_FIELDS)}"
        tolerations = pool.get("tolerations") or []
        if not isinstance(tolerations, list):
            return f"{name}.tolerations: must be a list of tolerations"
        for index, item in enumerate(tolerations):
            problem = toleration(item)
            if problem:
                return f"{name}.tolerations[{index}]: {problem}"
        labels = pool.get("nodeLabels") or {}
        if not isinstance(labels, dict):
            return f"{name}.nodeLabels: must be a map of label keys to label values"
        for key, item in labels.items():
            problem = label_key(key) or label_value(item)
            if problem:
                return f"{name}.nodeLabels: {problem}"
    return None
