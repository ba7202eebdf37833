"""Owns the NamespaceLabels rule kind: labels every new namespace from fixed values and its name."""

from __future__ import annotations

import re
from collections.abc import Mapping

from ..patching import ObjectEditor, ObjectShapeError, expect_map
from ..text import quote
from .base import Param, RuleContext, RuleResult
from .params import label_key, label_map, one_of, optional_regex

_DEFAULT_LABELS = {"type": "user-workload"}
_DEFAULT_PATTERN = r"^[0-9]{5}-[a-z0-9]+-(dev|test|prod)$"


class NamespaceLabels:
    """Labels every new namespace: fixed labels, plus a system id taken from its name.

    ``systemIdLabel`` gets the name up to the first '-' (the whole name when it has none).
    Existing values of these keys are overwritten. An optional ``namePattern`` is checked with
    its own enforcement (``namePatternEnforcement``).
    """

    KIND_NAME = "NamespaceLabels"
    OBJECT_KINDS: tuple[str, ...] = ("Namespace",)
    OPERATIONS: tuple[str, ...] = ("CREATE",)
    ON_TEMPLATES = "none"
    PARAMS = {
        # labels set on every new namespace; existing values are overwritten
        "labels": Param({"type": "user-workload"}, label_map),
        # label that gets the namespace name up to the first '-'
        "systemIdLabel": Param("systemid", label_key),
        # regular expression new namespace names should match; null: none
        "namePattern": Param(r"^[0-9]{5}-[a-z0-9]+-(dev|test|prod)$", optional_regex),
        # what a name that does not match the pattern gets
        "namePatternEnforcement": Param("warn", one_of("enforce", "warn", "off")),
    }

    def __init__(self, labels: Mapping[str, str] = _DEFAULT_LABELS,
                 systemIdLabel: str = "systemid",
                 namePattern: str | None = _DEFAULT_PATTERN,
                 namePatternEnforcement: str = "warn"):
        self.labels = dict(labels)
        self.system_id_label = systemIdLabel
        self.name_pattern = re.compile(namePattern) if namePattern else None
        self.name_pattern_enforcement = namePatternEnforcement

    def evaluate(self, ctx: RuleContext, editor: ObjectEditor) -> RuleResult:
        meta = expect_map(editor.current, ("metadata",))
        name = ctx.request.name or meta.get("name") or ""
        generate_name = meta.get("generateName") or ""
        if not isinstance(name, str) or not isinstance(generate_name, str):
            raise ObjectShapeError("metadata.name and metadata.generateName must be strings")
        wanted = dict(self.labels)
        system_id = (name or generate_name).split("-", 1)[0]
        if system_id:
            wanted[self.system_id_label] = system_id
        changed = [f"{key}={value}" for key, value in wanted.items()
                   if editor.set(("metadata", "labels", key), value)]
        effects = (f"set labels {', '.join(changed)}",) if changed else ()
        if not (self.name_pattern and name and self.name_pattern_enforcement != "off"
                and not self.name_pattern.search(name)):
            return RuleResult(effects=effects)
        problem = f"namespace name {quote(name)} does not match {self.name_pattern.pattern}"
        if self.name_pattern_enforcement == "enforce":
            return RuleResult(effects=effects, denials=(f"{problem}; choose a name that does",))
        return RuleResult(effects=effects, warnings=(problem,))
