"""Owns rules/*.yaml: loading and validating rule files (:mod:`.store` reloads a changed directory).

A rule file::

    name: image-pull-policy          # equal to the file name, kebab-case
    description: ...
    kind: ImagePullPolicy            # one of RULE_KINDS
    webhook: defaults                # placement | defaults | namespaces: the paths serving it
                                     # are PATHS' (default: the kind's, DEFAULT_WEBHOOK; object
                                     # kinds the rule kind judges elsewhere go there: ELSEWHERE)
    enforcement: enforce             # enforce | warn | off
    onError: ignore                  # ignore | fail: a rule that raises is skipped or fails the
                                     # request (default: DEFAULT_ON_ERROR; PoolPlacement: fail)
    templateWarnings: true           # pod rules on pod controllers: warn what the pods will get
    docsURL: https://...             # appended to its denials and warnings ("See https://...")
    match:
      kinds: [Pod]                   # default: every kind the rule kind handles
      operations: [CREATE]           # default: every operation the rule kind handles
      namespaceSelector: {...}       # metav1.LabelSelector on the namespace's labels
      objectSelector: {matchLabels: {platform: "true"}}
      excludedNamespaces: [...]      # default: DEFAULT_EXCLUDED_NAMESPACES
    params: {policy: Always}         # the kind's settings

Every problem in every file is reported in one :class:`RulesError`, naming the file, the field
and what is allowed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import yaml

from ..config import ConfigError
from ..kinds import OBJECT_KINDS
from .base import LabelSelector, Match, Policy, Requirement, Rule
from .limits import RemoveResourceLimits
from .namespace_labels import NamespaceLabels
from .params import ParamError, https_url, label_key, label_value
from .pool import PoolPlacement
from .pull_policy import ImagePullPolicy

log = logging.getLogger("poolkeeper.rules")

_POLICIES: tuple[type[Policy], ...] = (PoolPlacement, NamespaceLabels, ImagePullPolicy,
                                       RemoveResourceLimits)
RULE_KINDS: dict[str, type[Policy]] = {k.KIND_NAME: k for k in _POLICIES}
ENFORCEMENTS = ("enforce", "warn", "off")
WEBHOOKS = ("placement", "defaults", "namespaces")
# The webhook a kind runs on when the file names none. PoolPlacement may run on no other: on the
# fail-open paths a webhook outage would let pods escape their pool.
DEFAULT_WEBHOOK = {"PoolPlacement": "placement", "NamespaceLabels": "namespaces"}
# Object kinds a rule kind judges on another webhook than its file's: a PoolPlacement rule's
# check that a Namespace's pool has nodes is advice, and a namespace must stay creatable while
# poolkeeper is down, so it runs on the fail-open namespaces webhook (pods stay on placement).
ELSEWHERE: dict[str, dict[str, str]] = {"PoolPlacement": {"Namespace": "namespaces"}}
# What each path /mutate/<path> serves: the rules of these webhooks (by_webhook). /mutate/pods is
# the pooled namespaces' one call per pod (placement and the defaults together, failurePolicy
# Fail in deploy/); the others serve one webhook each. Both paths that serve placement fail
# closed in deploy/ (tests/test_manifests.py).
PATHS: dict[str, tuple[str, ...]] = {
    "pods": ("placement", "defaults"),
    "placement": ("placement",),
    "defaults": ("defaults",),
    "namespaces": ("namespaces",),
}
# What happens when a rule raises (a bug, or a namespace lookup that cannot be answered; never a
# malformed object, which is the request's fault and a 400): ignore skips the rule with an
# admission warning, a log line and poolkeeper_rule_errors_total, and the other rules go on;
# fail answers 500 so the webhook's failurePolicy decides. PoolPlacement always fails: a skipped
# placement would let a pod land on any node.
ON_ERROR = ("ignore", "fail")
DEFAULT_ON_ERROR = "ignore"
FIXED_ON_ERROR = {"PoolPlacement": "fail"}
# Namespaces rules leave alone unless a rule file says otherwise: the control plane's own and
# poolkeeper's, so the webhook can always restart.
DEFAULT_EXCLUDED_NAMESPACES = ("kube-system", "kube-public", "kube-node-lease", "poolkeeper-system")
_FIELDS = ("name", "description", "kind", "webhook", "enforcement", "onError", "templateWarnings",
           "docsURL", "match", "params")
_MATCH_FIELDS = ("kinds", "operations", "namespaceSelector", "objectSelector",
                 "excludedNamespaces")
_RULE_NAME = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")
_SELECTOR_OPERATORS = ("In", "NotIn", "Exists", "DoesNotExist")

# The rules shipped with poolkeeper, beside the package (a source checkout or the image).
SHIPPED_RULES = Path(__file__).resolve().parents[2] / "rules"


class RulesError(ConfigError):
    """A rule file is invalid; the message lists every problem with file and field."""


class _Problems:
    def __init__(self, source: str):
        self.source = source
        self.items: list[str] = []

    def add(self, field: str, message: str) -> None:
        self.items.append(f"{self.source}: {field}: {message}")


@dataclass(frozen=True)
class RuleSet:
    """A validated rule set and its digest (:func:`rules_digest` of the files' contents)."""

    rules: tuple[Rule, ...]
    digest: str


def load_rules(directory: str | os.PathLike[str]) -> tuple[Rule, ...]:
    """Every rules/*.yaml in ``directory``, validated; RulesError naming each problem."""
    return load_rule_set(directory).rules


def load_rule_set(directory: str | os.PathLike[str]) -> RuleSet:
    """:func:`load_rules` with the digest of the contents it validated."""
    directory = Path(directory)
    if not directory.is_dir():
        raise RulesError(f"rules directory {directory} does not exist")
    files = rule_files(directory)
    if not files:
        raise RulesError(f"{directory} holds no rule files (*.yaml)")
    rules, problems, documents = [], [], {}
    for path in files:
        doc, rule, found = _read_rule_file(path, path.stem)
        problems.extend(found)
        if rule is not None:
            rules.append(rule)
            documents[rule.name] = doc
    if problems:
        raise RulesError("invalid rules:\n  " + "\n  ".join(problems))
    return RuleSet(tuple(rules), rules_digest(documents))


def rules_digest(documents: Mapping[str, Any]) -> str:
    """sha256 (hex) of the canonical JSON of each rule file's parsed content, sorted by rule
    name: comments, key order and YAML layout do not change it; any value does."""
    canonical = json.dumps(sorted(documents.items()), sort_keys=True, separators=(",", ":"),
                           ensure_ascii=False, default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()


def rule_files(directory: Path) -> list[Path]:
    # ConfigMap volumes hold '..data' and '..<timestamp>' entries beside the files: skip dotfiles.
    return sorted(p for p in directory.iterdir()
                  if p.suffix == ".yaml" and not p.name.startswith(".") and p.is_file())


def parse_rule_file(path: Path, stem: str | None = None) -> tuple[Rule | None, list[str]]:
    """The rule in ``path`` and the problems found; its name must be ``stem`` (default: the
    file's name without .yaml)."""
    _, rule, problems = _read_rule_file(path, stem or path.stem)
    return rule, problems


def _read_rule_file(path: Path, stem: str) -> tuple[Any, Rule | None, list[str]]:
    """The file's parsed content, its rule (None when invalid) and the problems found."""
    problems = _Problems(str(path))
    try:
        doc = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        problems.add("file", f"cannot be read as YAML: {exc}")
        return None, None, problems.items
    if not isinstance(doc, dict):
        problems.add("file", "must hold one YAML mapping (a rule)")
        return doc, None, problems.items
    rule = _parse_rule(doc, stem, problems)
    return doc, (rule if not problems.items else None), problems.items


def _parse_rule(doc: Mapping[str, Any], stem: str, problems: _Problems) -> Rule | None:
    for field in doc:
        if field not in _FIELDS:
            problems.add(str(field), f"unknown field; allowed: {', '.join(_FIELDS)}")
    name = doc.get("name")
    if not isinstance(name, str) or not _RULE_NAME.match(name):
        problems.add("name", f"{name!r} must be a kebab-case name (lowercase letters, digits, '-')")
    elif name != stem:
        problems.add("name", f"{name!r} must equal the file name {stem!r}")
    description = doc.get("description", "")
    if not isinstance(description, str):
        problems.add("description", "must be a string")
    enforcement = _off(doc.get("enforcement", "enforce"))
    if enforcement not in ENFORCEMENTS:
        problems.add("enforcement", f"{enforcement!r} is not one of {', '.join(ENFORCEMENTS)}")
    kind_name = doc.get("kind")
    kind = RULE_KINDS.get(kind_name) if isinstance(kind_name, str) else None
    webhook = doc.get("webhook", DEFAULT_WEBHOOK.get(kind_name, "defaults")
                      if isinstance(kind_name, str) else "defaults")
    if webhook not in WEBHOOKS:
        problems.add("webhook", f"{webhook!r} is not one of {', '.join(WEBHOOKS)}")
    elif kind_name == "PoolPlacement" and webhook != "placement":
        problems.add("webhook", f"{webhook!r}: PoolPlacement rules run on placement, the webhook "
                                "that fails closed (elsewhere an outage lets pods escape their "
                                "pool)")
    fixed = FIXED_ON_ERROR.get(kind_name) if isinstance(kind_name, str) else None
    on_error = doc.get("onError", fixed or DEFAULT_ON_ERROR)
    if on_error not in ON_ERROR:
        problems.add("onError", f"{on_error!r} is not one of {', '.join(ON_ERROR)}")
    elif fixed is not None and on_error != fixed:
        problems.add("onError", f"{on_error!r}: {kind_name} rules always fail the request when "
                                "they cannot run (a skipped placement lets a pod land on any "
                                f"node); leave onError out or set {fixed}")
    if kind is None:
        problems.add("kind", f"{kind_name!r} is not one of {', '.join(RULE_KINDS)}")
        return None
    docs_url = doc.get("docsURL")
    if docs_url is not None:
        problem = https_url(docs_url)
        if problem:
            problems.add("docsURL", problem)
    template_warnings = doc.get("templateWarnings", True)
    if not isinstance(template_warnings, bool):
        problems.add("templateWarnings", "must be true or false")
    elif "templateWarnings" in doc and kind.ON_TEMPLATES != "warn":
        problems.add("templateWarnings", f"applies to rule kinds that act on pods only; "
                                         f"{kind.KIND_NAME} does not take it")
    policy = _build_policy(kind, doc.get("params"), problems)
    match = _parse_match(doc.get("match"), kind, problems)
    if policy is None or match is None or problems.items:
        return None
    assert isinstance(name, str)  # checked above, else problems.items is not empty
    return Rule(name=name, description=description, kind_name=kind.KIND_NAME, match=match,
                policy=policy, enforcement=enforcement, webhook=webhook,
                template_warnings=template_warnings, docs_url=docs_url, on_error=on_error)


def _off(value: Any) -> Any:
    """An enforcement as written: YAML 1.1 reads an unquoted ``off`` as false, which can only
    have meant "off" there."""
    return "off" if value is False else value


def _build_policy(kind: type[Policy], params: Any, problems: _Problems) -> Policy | None:
    if params is None:
        params = {}
    if not isinstance(params, dict):
        problems.add("params", "must be a mapping")
        return None
    values = {}
    for key, value in params.items():
        spec = kind.PARAMS.get(key)
        if spec is None:
            problems.add(f"params.{key}", f"unknown param of {kind.KIND_NAME}; allowed: "
                                          f"{', '.join(kind.PARAMS)}")
            continue
        if key.endswith("Enforcement"):
            value = _off(value)
        problem = spec.check(value)
        if problem:
            problems.add(f"params.{key}", problem)
            continue
        values[key] = value
    try:
        return kind(**values)
    except ParamError as exc:  # a problem between params, e.g. onlyListedPools without pools
        problems.add(f"params.{exc.field}", exc.message)
        return None


def _string_list(value: Any, field: str, allowed: tuple[str, ...] | None,
                 problems: _Problems) -> frozenset[str] | None:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        problems.add(field, "must be a list of strings")
        return None
    if allowed is not None:
        for item in value:
            if item not in allowed:
                problems.add(field, f"{item!r} is not one of {', '.join(allowed)}")
                return None
    return frozenset(value)


def _parse_match(doc: Any, kind: type[Policy], problems: _Problems) -> Match | None:
    if doc is None:
        doc = {}
    if not isinstance(doc, dict):
        problems.add("match", "must be a mapping")
        return None
    for field in doc:
        if field not in _MATCH_FIELDS:
            problems.add(f"match.{field}", f"unknown field; allowed: {', '.join(_MATCH_FIELDS)}")
    kinds = _string_list(doc.get("kinds", list(kind.OBJECT_KINDS)), "match.kinds",
                         kind.OBJECT_KINDS, problems)
    operations = _string_list(doc.get("operations", list(kind.OPERATIONS)), "match.operations",
                              kind.OPERATIONS, problems)
    excluded = _string_list(doc.get("excludedNamespaces", list(DEFAULT_EXCLUDED_NAMESPACES)),
                            "match.excludedNamespaces", None, problems)
    for namespace in sorted(excluded or ()):
        if not _RULE_NAME.match(namespace):  # namespace names are DNS labels, as rule names
            problems.add("match.excludedNamespaces", f"{namespace!r} is not a namespace name")
            excluded = None
            break
    namespace_selector = _parse_selector(doc.get("namespaceSelector"), "match.namespaceSelector",
                                         problems)
    object_selector = _parse_selector(doc.get("objectSelector"), "match.objectSelector",
                                      problems)
    if kinds is None or operations is None or excluded is None:
        return None
    return Match(kinds=frozenset((OBJECT_KINDS[k].group, k) for k in kinds), operations=operations,
                 namespace_selector=namespace_selector, object_selector=object_selector,
                 excluded_namespaces=excluded)


def _parse_selector(doc: Any, field: str, problems: _Problems) -> LabelSelector | None:
    if doc is None:
        return None
    if not isinstance(doc, dict):
        problems.add(field, "must be a label selector (matchLabels, matchExpressions)")
        return None
    requirements: list[Requirement] = []
    for key in doc:
        if key not in ("matchLabels", "matchExpressions"):
            problems.add(f"{field}.{key}", "unknown field; allowed: matchLabels, matchExpressions")
    labels = doc.get("matchLabels") or {}
    if not isinstance(labels, dict):
        problems.add(f"{field}.matchLabels", "must be a map of label keys to values")
        labels = {}
    for key, value in labels.items():
        problem = label_key(key) or label_value(value)
        if problem:
            problems.add(f"{field}.matchLabels", problem)
        else:
            requirements.append(Requirement(key, "In", frozenset({value})))
    expressions = doc.get("matchExpressions") or []
    if not isinstance(expressions, list):
        problems.add(f"{field}.matchExpressions", "must be a list")
        expressions = []
    for index, expression in enumerate(expressions):
        where = f"{field}.matchExpressions[{index}]"
        if not isinstance(expression, dict):
            problems.add(where, "must be a mapping with key, operator and values")
            continue
        key, operator = expression.get("key"), expression.get("operator")
        values = expression.get("values") or []
        problem = label_key(key)
        if problem:
            problems.add(f"{where}.key", problem)
        if operator not in _SELECTOR_OPERATORS:
            problems.add(f"{where}.operator",
                         f"{operator!r} is not one of {', '.join(_SELECTOR_OPERATORS)}")
            continue
        if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
            problems.add(f"{where}.values", "must be a list of strings")
            continue
        if operator in ("In", "NotIn") and not values:
            problems.add(f"{where}.values", f"{operator} needs at least one value")
        elif operator in ("Exists", "DoesNotExist") and values:
            problems.add(f"{where}.values", f"{operator} takes no values")
        if not problem and isinstance(key, str):
            requirements.append(Requirement(key, operator, frozenset(values)))
    return LabelSelector(tuple(requirements))


def by_webhook(rules: tuple[Rule, ...]) -> dict[str, tuple[Rule, ...]]:
    """The rules each /mutate/<webhook> runs: every rule on its file's webhook, less the object
    kinds its kind judges elsewhere (ELSEWHERE), and on those webhooks for those kinds only."""
    served: dict[str, list[Rule]] = {w: [] for w in WEBHOOKS}
    for rule in rules:
        elsewhere = ELSEWHERE.get(rule.kind_name, {})
        moved = {w: frozenset(k for k in rule.match.kinds if elsewhere.get(k[1]) == w)
                 for w in set(elsewhere.values())}
        own = rule.match.kinds - frozenset().union(*moved.values())
        for webhook, kinds in ((rule.webhook, own), *moved.items()):
            if kinds:
                served[webhook].append(rule if kinds == rule.match.kinds else
                                       replace(rule, match=replace(rule.match, kinds=kinds)))
    return {w: tuple(r) for w, r in served.items()}


def by_path(rules: tuple[Rule, ...]) -> dict[str, tuple[Rule, ...]]:
    """The rules each /mutate/<path> runs (PATHS): those of its webhooks, in file order.

    On /mutate/pods the defaults give no template warnings: the DaemonSets placement judges
    there would get them, those of unpooled namespaces (on no poolkeeper webhook) would not,
    and none did while placement had a path of its own."""
    served = by_webhook(rules)
    order = {rule.name: index for index, rule in enumerate(rules)}

    def on(path: str, webhook: str, rule: Rule) -> Rule:
        if path == "pods" and webhook == "defaults" and rule.template_warnings:
            return replace(rule, template_warnings=False)
        return rule

    return {path: tuple(sorted((on(path, w, r) for w in webhooks for r in served[w]),
                               key=lambda r: order[r.name]))
            for path, webhooks in PATHS.items()}
