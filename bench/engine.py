"""Owns the bench's view of poolkeeper's decision interfaces: the shipped rules, one lookup, admit().

The rule set is reached through the public loaders only, whichever this checkout has:
``app.rules.load_rules(SHIPPED_RULES)`` (rules/*.yaml) or, before that, ``build_rules(settings)``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from app.admission import admit  # noqa: F401  (re-exported for the bench parts)
from app.config import load_settings
from app.review import encode_review, parse_review  # noqa: F401

POOL_RULE_KIND = "PoolPlacement"


def shipped_rules() -> tuple[Any, ...]:
    import app.rules as rules

    if hasattr(rules, "load_rules") and hasattr(rules, "SHIPPED_RULES"):
        return tuple(rules.load_rules(rules.SHIPPED_RULES))
    return tuple(rules.build_rules(load_settings({}, environ={})))


def pool_rule_only(rules: Sequence[Any]) -> tuple[Any, ...]:
    """The rules of the pool kind (the one the OPA sample implements)."""
    chosen = tuple(r for r in rules if _kind_name(r) == POOL_RULE_KIND)
    if not chosen:
        raise RuntimeError(f"no {POOL_RULE_KIND} rule among the shipped rules: "
                           + ", ".join(getattr(r, "name", type(r).__name__) for r in rules))
    return chosen


def rule_names(rules: Sequence[Any]) -> list[str]:
    return [getattr(r, "name", type(r).__name__) for r in rules]


def _kind_name(rule: Any) -> str:
    kind = getattr(rule, "kind_name", None)
    if isinstance(kind, str):
        return kind
    policy = getattr(rule, "policy", rule)
    return getattr(policy, "KIND_NAME", type(policy).__name__)


def file_namespace_source(path: str):
    """The namespace source ``poolkeeper serve --namespaces PATH`` uses."""
    from app.namespaces import namespace_source

    source = namespace_source(load_settings({"namespaces_file": path}, environ={}))
    source.start()
    return source


def kube_namespace_source(kubeconfig: str):
    """The namespace source ``poolkeeper serve --kubeconfig PATH`` uses (list + watch)."""
    from app.namespaces import namespace_source

    return namespace_source(load_settings({"kubeconfig": kubeconfig}, environ={}))
