"""Owns `poolkeeper export`: the rules as the API server's own admission policies.

For every enabled rule (``enforcement`` other than ``off``) it writes
``admissionregistration.k8s.io/v1`` objects with which the API server decides in process what
poolkeeper's webhook decides (Kubernetes 1.36+ for MutatingAdmissionPolicy):

- ``enforce``: a MutatingAdmissionPolicy ``poolkeeper-<rule>`` and its binding for what the rule
  changes (JSONPatch where a key is added or a field removed, ApplyConfiguration where fields are
  merged by name or key); a ValidatingAdmissionPolicy ``poolkeeper-<rule>`` (binding
  ``validationActions: [Deny]``) for its denials, with the webhook's message through
  ``messageExpression`` and its ``auditAnnotations``; and ``poolkeeper-<rule>-warnings``
  (``[Warn]``) for the warnings the rule gives.
- ``warn``: only ``poolkeeper-<rule>-warnings``, one warning per change or denial the rule would
  make ("would ..."), as the webhook's warn mode answers.

How the two engines line up: mutating policies run before validating ones, so a validating
policy sees the mutated object; the mutating policy therefore changes nothing where the webhook
would deny (the webhook never patches a refused request), and the validating policy judges what
the webhook judged. A validating policy reports only its first failed validation, so all of a
rule's denials are one validation whose message joins them with "; ", as the webhook does.
Messages and warnings carry the API server's own prefix instead of the webhook's ("admission
webhook ... denied the request: " becomes "ValidatingAdmissionPolicy ... denied request: "); the
text after it is the webhook's, character for character (tests/test_equivalence_tier.py proves it
through a real API server, over every golden case).

What no policy can say fails the export, one line each naming the rule and what is missing
(:class:`LeftOut`); ``--skip-unsupported`` leaves those parts out and lists them. Where a policy
can only approximate the webhook it says so in a comment here and in README "In-tree policies".
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import yaml

from .admission import DENIAL_CODE, MAX_WARNING, MAX_WARNING_WITH_URL
from .kinds import OBJECT_KINDS, POD_CONTROLLERS, template_path
from .patching import Path, describe, escape, pointer
from .rules import (
    MIRROR_POD_ANNOTATION,
    ImagePullPolicy,
    NamespaceLabels,
    PoolPlacement,
    RemoveResourceLimits,
    Requirement,
    Rule,
)
from .rules.loader import ELSEWHERE
from .rules.params import LABEL_VALUE_RE
from .rules.pool import PINNED_TEMPLATES, _identity, describe_toleration
from .text import ECHO_LIMIT

API_VERSION = "admissionregistration.k8s.io/v1"
TARGETS = ("policies",)
FORMATS = ("yaml", "json")
# The API resource of each object kind a rule may match (app.kinds names the kinds). A kind
# missing here cannot be exported.
RESOURCES = {"Pod": ("v1", "pods"), "DaemonSet": ("v1", "daemonsets"),
             "Namespace": ("v1", "namespaces"), "Deployment": ("v1", "deployments"),
             "StatefulSet": ("v1", "statefulsets"), "ReplicaSet": ("v1", "replicasets"),
             "ReplicationController": ("v1", "replicationcontrollers"),
             "Job": ("v1", "jobs"), "CronJob": ("v1", "cronjobs")}
# deploy/base/webhook.yaml's routing, which the policies keep: placement gets pods and DaemonSets
# and fails closed; defaults (pods) and namespaces fail open; the workloads webhook (/mutate, every
# rule) gets the other pod controllers and fails open: the pool rule judges their templates and
# pod rules warn what their pods will get. For a policy failurePolicy decides what a CEL error
# (or a missing binding parameter) does.
WORKLOADS = tuple(k for k in POD_CONTROLLERS if k not in PINNED_TEMPLATES)
FAILURE_POLICIES = {"placement": "Fail", "defaults": "Ignore", "namespaces": "Ignore",
                    "workloads": "Ignore"}
# The reason the API server reports (and whose HTTP status it answers) for a denial.
_REASONS = {400: "BadRequest", 403: "Forbidden", 404: "NotFound", 409: "Conflict",
            422: "Invalid"}
RULE_ANNOTATION = "poolkeeper.io/rule"
# The namespace label the API server sets to every namespace's name (excluded namespaces).
NAME_LABEL = "kubernetes.io/metadata.name"


@dataclass(frozen=True)
class LeftOut:
    """A rule, or a part of one, that no in-tree policy can express."""

    rule: str
    what: str
    warnings: tuple[str, ...] = ()  # when warnings are left out: how they start (after "[rule] ")
    denials: tuple[str, ...] = ()  # when denials are left out: text they hold

    def __str__(self) -> str:
        return f"{self.rule}: {self.what}"


@dataclass(frozen=True)
class Export:
    objects: tuple[dict, ...]
    left_out: tuple[LeftOut, ...]
    rules: tuple[str, ...]  # the rules exported (whole or in part)


class _Unsupported(Exception):
    """A rule cannot be exported at all; the message says which param and why."""


# -- CEL text -------------------------------------------------------------------------------------


def lit(text: str) -> str:
    """``text`` as a CEL string literal."""
    quote = '"' if "'" in text and '"' not in text else "'"
    out = []
    for char in text:
        if char in ("\\", quote):
            out.append("\\" + char)
        elif char == "\n":
            out.append("\\n")
        elif ord(char) < 0x20 or ord(char) == 0x7F:
            out.append(f"\\u{ord(char):04x}")
        else:
            out.append(char)
    return quote + "".join(out) + quote


def lits(items: Iterable[str]) -> str:
    return "[" + ", ".join(lit(i) for i in items) + "]"


class E(str):
    """A CEL expression among the literal text given to :func:`cat`."""


def cat(*parts: str) -> str:
    """A CEL string concatenation: plain ``str`` parts are literal text, :class:`E` parts are
    expressions."""
    tokens: list[str | E] = []
    for part in parts:
        if not isinstance(part, E) and tokens and not isinstance(tokens[-1], E):
            tokens[-1] = tokens[-1] + part
        else:
            tokens.append(part)
    return " + ".join(t if isinstance(t, E) else lit(t) for t in tokens)


def _plural(count: str, noun: str) -> str:
    """CEL for '<count> <noun>(s)', count an int expression."""
    return (f"string({count}) + ({count} == 1 ? {lit(' ' + noun)} : "
            f"{lit(' ' + noun + 's')})")


def _quoted(expression: str) -> str:
    """CEL for app.text.quote of a string: in double quotes, cut after ECHO_LIMIT characters,
    backslashes and quotes escaped."""
    cut = (f"({expression}.size() <= {ECHO_LIMIT} ? {expression} : "
           f"{expression}.substring(0, {ECHO_LIMIT}) + '...')")
    return (f"'\"' + {cut}.replace({lit(chr(92))}, {lit(chr(92) * 2)})"
            f".replace('\"', {lit(chr(92) + chr(34))}) + '\"'")


def _is_label_value(expression: str) -> str:
    """CEL for app.rules.params.is_label_value (Python's '$' also matches before a final line
    break, RE2's only at the end)."""
    pattern = LABEL_VALUE_RE.pattern
    assert pattern.endswith("$")
    anchored = pattern[:-1] + "\\n?$"
    return f"{expression}.size() <= 63 && {expression}.matches({lit(anchored)})"


def _by_kind(values: Mapping[str, str]) -> str:
    """A CEL expression choosing by the request's kind among ``values`` (kind -> CEL)."""
    kinds_of: dict[str, list[str]] = {}
    for kind, value in values.items():
        kinds_of.setdefault(value, []).append(kind)
    choices = sorted(kinds_of.items(), key=lambda item: len(item[1]))  # the commonest last
    expression = choices[-1][0]
    for value, kinds in reversed(choices[:-1]):
        test = (f"request.kind.kind == {lit(kinds[0])}" if len(kinds) == 1
                else f"request.kind.kind in {lits(kinds)}")
        expression = f"{test} ? {value} : {expression}"
    return expression if len(choices) == 1 else f"({expression})"


def _requirement_cel(requirement: Requirement, labels: str) -> str:
    key = lit(requirement.key)
    if requirement.operator == "Exists":
        return f"{key} in {labels}"
    if requirement.operator == "DoesNotExist":
        return f"!({key} in {labels})"
    within = f"({key} in {labels} && {labels}[{key}] in {lits(sorted(requirement.values))})"
    return within if requirement.operator == "In" else f"!{within}"


def _match_expression(requirement: Requirement) -> dict:
    expression: dict[str, Any] = {"key": requirement.key, "operator": requirement.operator}
    if requirement.operator in ("In", "NotIn"):
        expression["values"] = sorted(requirement.values)
    return expression


# -- what a rule kind exports -------------------------------------------------------------------


@dataclass
class _Parts:
    """A rule kind's policy pieces; every text is a CEL string expression that is '' when there
    is nothing to say."""

    root: str = "object"  # the pod the rule judges: the object, or a controller's template
    variables: list[tuple[str, str]] = field(default_factory=list)
    conditions: list[tuple[str, str]] = field(default_factory=list)  # matchConditions
    namespace_expressions: list[dict] = field(default_factory=list)  # extra namespaceSelector
    mutations: list[dict] = field(default_factory=list)  # MutatingAdmissionPolicy mutations
    denials: list[str] = field(default_factory=list)  # in the webhook's order
    warnings: list[str] = field(default_factory=list)  # the rule's own warnings
    effects: list[str] = field(default_factory=list)  # what enforce would change, in words
    audit: list[tuple[str, str]] = field(default_factory=list)  # auditAnnotations
    # what cannot be expressed, and how the warnings it is start (after "[rule] ")
    left_out: list[tuple[str, tuple[str, ...]]] = field(default_factory=list)
    # texts in the denials left out (for the equivalence tier to tell them)
    denied_left_out: list[tuple[str, ...]] = field(default_factory=list)


def _json_patch(expression: str) -> dict:
    return {"patchType": "JSONPatch", "jsonPatch": {"expression": expression}}


def _apply_configuration(expression: str) -> dict:
    return {"patchType": "ApplyConfiguration", "applyConfiguration": {"expression": expression}}


def _path(root: str, path: Path) -> str:
    return root + "".join(f".{token}" for token in path)


def _switch(subject: str, cases: Mapping[str, str], default: str) -> str:
    """CEL choosing among ``cases`` (value of ``subject`` -> CEL), else ``default``."""
    expression = default
    for value, result in reversed(list(cases.items())):
        expression = f"{subject} == {lit(value)} ? {result} : {expression}"
    return f"({expression})" if cases else expression


def _key_field(key: str) -> str:
    """How app.patching.describe writes one more path token (a nodeSelector key)."""
    return f".{key}" if key.replace("-", "").replace("_", "").isalnum() else f'["{key}"]'


def _toleration(toleration: Mapping[str, Any]) -> str:
    # every value dyn: tolerationSeconds is a number, the rest strings, in one list literal
    return "{" + ", ".join(f"{lit(k)}: dyn({lit(v) if isinstance(v, str) else v})"
                           for k, v in toleration.items()) + "}"


def _pool(rule: Rule, kinds: Sequence[str], root: str) -> _Parts:
    policy = rule.policy
    assert isinstance(policy, PoolPlacement)
    if list(kinds) == ["Namespace"]:
        return _pool_namespaces(rule, policy)
    spec_paths: dict[str, Path] = {}
    for kind in kinds:
        spec_path = OBJECT_KINDS[kind].pod_spec
        assert spec_path is not None  # PoolPlacement's other kinds all have a pod spec
        spec_paths[kind] = spec_path

    def per_kind(value: Callable[[str, Path], str]) -> str:
        return _by_kind({k: value(k, p) for k, p in spec_paths.items()})

    key, ns_key = policy.node_label_key, policy.namespace_label_key
    what = E("variables.what")
    pool, value, where = E("variables.pool"), E("variables.value"), E("variables.where")
    chosen = E("variables.chosen")
    namespace = E("request.namespace")
    terms = ("affinity", "nodeAffinity", "requiredDuringSchedulingIgnoredDuringExecution",
             "nodeSelectorTerms")
    optional_terms = "".join(f".?{t}" for t in terms)
    # Per pool of params.pools: its node labels ([key, value, how describe() writes the key])
    # and its tolerations (the object, its identity as app.rules.pool._identity reads it, and
    # describe_toleration's text), chosen by the pool the pod gets.
    labels_of = {name: "[" + ", ".join(f"[{lit(k)}, {lit(v)}, {lit(_key_field(k))}]"
                                       for k, v in spec.node_labels.items()) + "]"
                 for name, spec in policy.pools.items() if spec.node_labels}
    tolerations_of = {name: spec.tolerations for name, spec in policy.pools.items()
                      if spec.tolerations}
    selector_keys = list(dict.fromkeys(
        [key, *(k for spec in policy.pools.values() for k in spec.node_labels)]))
    most_labels = max((len(spec.node_labels) for spec in policy.pools.values()), default=0)
    annotation = policy.allowed_pools_annotation
    parts = _Parts()
    parts.variables = [
        ("isPod", "request.kind.kind == 'Pod'"),
        # templates that are pinned (patched): app.rules.pool.PINNED_TEMPLATES
        ("pinned", f"request.kind.kind in {lits(PINNED_TEMPLATES)}"),
        ("update", "request.operation == 'UPDATE' && oldObject != null"),
        ("podUpdate", "variables.isPod && variables.update"),
        ("spec", per_kind(lambda _, p: _path("object", p))),
        ("oldSpec", per_kind(lambda _, p: _path("oldObject", p))),
        ("what", per_kind(lambda k, _: lit("pod" if k == "Pod" else f"{k} pod template"))),
        ("nsLabels", "namespaceObject.metadata.?labels.orValue({})"),
        ("nsPool", f"variables.nsLabels[?{lit(ns_key)}].orValue('')"),
        # PoolPlacement.pool_of: the label, else the defaultPool; an empty label opts out
        ("pool", f"{lit(ns_key)} in variables.nsLabels ? variables.nsPool : "
                 f"{lit(policy.default_pool or '')}"),
        # PoolPlacement.allowed_pools: the pool, then those the annotation names (once each)
        ("extraPools", "[]" if annotation is None else
         f"namespaceObject.metadata.?annotations.orValue({{}})[?{lit(annotation)}].orValue('')"
         ".split(',').map(p, p.trim())"),
        ("allowed", "[variables.pool] + variables.extraPools.transformList(i, p, p != '' && "
                    f"{_is_label_value('p')} && p != variables.pool && "
                    "variables.extraPools.indexOf(p) == i, p)"),
        ("selector", "variables.spec.?nodeSelector.orValue({})"),
        ("oldSelector", "variables.update ? variables.oldSpec.?nodeSelector.orValue({}) : {}"),
        ("hasKey", f"{lit(key)} in variables.selector"),
        ("value", f"variables.selector[?{lit(key)}].orValue('')"),
        ("sameKey", f"variables.selector[?{lit(key)}] == variables.oldSelector[?{lit(key)}]"),
        # the pool the pod gets: the one it asks for when its namespace allows it
        ("chosen", "variables.hasKey && variables.value in variables.allowed ? variables.value "
                   ": variables.pool"),
        ("poolLabels", _switch("variables.chosen", labels_of, "[]")),
        ("nodeLabels", f"[[{lit(key)}, variables.chosen, {lit(_key_field(key))}]] + "
                       "variables.poolLabels"),
        ("wantedLabels", "variables.nodeLabels.map(l, l[0] + '=' + l[1]).join(', ')"),
        ("poolTolerations", _switch("variables.chosen", {
            n: f"dyn([{', '.join(_toleration(t) for t in ts)}])"
            for n, ts in tolerations_of.items()}, "dyn([])")),
        ("poolTolerationIds", _switch("variables.chosen", {
            n: "[" + ", ".join(lits(_identity(t, ())) for t in ts) + "]"
            for n, ts in tolerations_of.items()}, "[]")),
        ("poolTolerationTexts", _switch("variables.chosen", {
            n: lits(describe_toleration(t) for t in ts) for n, ts in tolerations_of.items()},
            "[]")),
        ("gated", "variables.podUpdate && "
                  "variables.oldSpec.?schedulingGates.orValue([]).size() > 0"),
        ("terms", f"variables.spec{optional_terms}.orValue([])"),
        ("oldTerms", f"variables.update ? variables.oldSpec{optional_terms}.orValue([]) : []"),
        ("nodeName", "variables.spec.?nodeName.orValue('')"),
        ("samePlacement", "variables.terms == variables.oldTerms && variables.nodeName == "
                          "variables.oldSpec.?nodeName.orValue('')"),
        # UPDATE: only a change of placement (the keys the rule sets, affinity, nodeName) is
        # judged, except of pinned templates and of gated pods (whose placement may still change)
        ("judged", f"!(variables.update && !variables.pinned && !variables.gated && "
                   f"{lits(selector_keys)}.all(k, variables.selector[?k] == "
                   "variables.oldSelector[?k]) && (variables.isPod || variables.samePlacement))"),
        ("applies", "variables.pool != '' && variables.judged"),
        ("where", "variables.nsPool != '' ? " + cat(
            'namespace "', namespace, '" is pinned to node pool "', pool,
            f'" (namespace label {ns_key}=', pool, ")") + " : " + cat(
            'namespace "', namespace, f'" has no {ns_key} label and gets the default node pool "',
            pool, '"')),
        ("selectorField", per_kind(lambda _, p: lit(describe((*p, "nodeSelector"))))),
        ("quotedValue", _quoted("variables.value")),
        ("elsewhere", f"{_is_label_value('variables.value')} ? " + cat(
            "to run on pool ", E("variables.quotedValue"),
            f", use a namespace labelled {ns_key}=", value) + " : " + cat(
            E("variables.quotedValue"), " is not a node pool name (a label value)")),
        # PoolPlacement._naming: the pools the annotation allows, five at most
        ("naming", "variables.allowed.size() < 2 ? '' : ' or to one of ' + "
                   "variables.allowed.transformList(i, p, i >= 1 && i <= 5, '\"' + p + '\"')"
                   ".join(', ') + (variables.allowed.size() > 6 ? ', ...' : '') + "
                   + lit(f" (the pools its annotation {annotation} allows)")),
        # a pod UPDATE judges only a key that changes: one set before pooling stays
        ("otherPool", "variables.applies && variables.hasKey && variables.value != "
                      "variables.chosen && !(variables.podUpdate && variables.sameKey) ? " +
                      cat(what, " ", E("variables.selectorField"), _key_field(key), " is ",
                          E("variables.quotedValue"), ", but ", where, ". Remove that "
                          'nodeSelector key (poolkeeper sets it) or set it to "', pool, '"',
                          E("variables.naming"), "; ", E("variables.elsewhere")) + " : ''"),
        ("labelDenials", "!variables.applies ? [] : variables.poolLabels.filter(l, l[0] in "
                         "variables.selector && variables.selector[l[0]] != l[1] && "
                         "!(variables.podUpdate && variables.selector[?l[0]] == "
                         "variables.oldSelector[?l[0]])).map(l, " + cat(
                             what, " ", E("variables.selectorField"), E("l[2]"), " is ",
                             E(_quoted("variables.selector[l[0]]")), ', but the nodes of pool "',
                             chosen, '" carry ', E("l[0]"), "=", E("l[1]"),
                             " (this rule's pools); ", where, ". Remove that nodeSelector key "
                             '(poolkeeper sets it) or set it to "', E("l[1]"), '"') + ")"),
        ("quotedNodeName", _quoted("variables.nodeName")),
        ("nodeNameField", per_kind(lambda _, p: lit(describe((*p, "nodeName"))))),
        ("nodeNameSet", "variables.applies && variables.nodeName != '' && !variables.podUpdate ? "
                        + cat(what, " sets ", E("variables.nodeNameField"), "=",
                              E("variables.quotedNodeName"), ", which bypasses the scheduler "
                              "and so the node pool; ", where, ". Remove nodeName and let the "
                              'scheduler place it on pool "', pool, '"') + " : ''"),
        ("termsField", per_kind(lambda _, p: lit(describe((*p, *terms))))),
        ("affinity", "variables.applies && (!variables.podUpdate || variables.terms != "
                     "variables.oldTerms) && variables.terms.size() > 0 && "
                     f"!variables.terms.exists(t, {_term_admits()}) ? " + cat(
                         what, " requires node affinity (", E("variables.termsField"),
                         ") that no node with ", E("variables.wantedLabels"), " can satisfy, "
                         "but ", where, ", so it could never be scheduled. Allow ",
                         E("variables.wantedLabels"), " in at least one term, or drop the term")
                     + " : ''"),
        # The webhook patches only what it does not deny, of templates only pinned ones, and not
        # a pod keeping a key it had before its namespace was pooled.
        ("mutate", "variables.applies && (variables.isPod || variables.pinned) && "
                   "!(variables.hasKey && variables.value != variables.chosen) && "
                   "variables.labelDenials.size() == 0 && variables.nodeNameSet == '' && "
                   "variables.affinity == ''"),
        ("missingLabels", "variables.nodeLabels.filter(l, !(l[0] in variables.selector))"),
        ("tolerated", "variables.spec.?tolerations.orValue([]).map(t, [t.?key.orValue(''), "
                      "t.?operator.orValue('') == '' ? 'Equal' : t.operator, "
                      "t.?value.orValue(''), t.?effect.orValue('')])"),
        ("newTolerations", "variables.poolTolerationIds.transformList(i, t, "
                           "!(t in variables.tolerated), i)"),
        ("selectorPath", per_kind(lambda _, p: lit(pointer((*p, "nodeSelector"))))),
        ("tolerationsPath", per_kind(lambda _, p: lit(pointer((*p, "tolerations"))))),
    ]
    parts.conditions = _mirror_condition(kinds)
    if "Pod" in kinds and "UPDATE" in rule.match.operations:
        # As the placement webhook of deploy/base/webhook.yaml: a pod UPDATE can change placement
        # only while the old pod has scheduling gates (the API server refuses nodeSelector and
        # affinity changes of any other), so only those are judged.
        parts.conditions.append((
            "pod-update-can-change-placement",
            "request.operation != 'UPDATE' || request.kind.kind != 'Pod' || "
            "oldObject.spec.?schedulingGates.orValue([]).size() > 0"))
    # unpooled and opted-out namespaces are left alone: skip them early, as the webhook does
    if policy.default_pool is None:
        parts.namespace_expressions.append({"key": ns_key, "operator": "Exists"})
    parts.namespace_expressions.append({"key": ns_key, "operator": "NotIn", "values": [""]})
    parts.denials = ["variables.otherPool",
                     *(f"variables.labelDenials.size() > {i} ? variables.labelDenials[{i}] : ''"
                       for i in range(most_labels)),
                     "variables.nodeNameSet", "variables.affinity"]
    if not any(k == "Pod" or k in PINNED_TEMPLATES for k in kinds):
        return parts  # templates judged, never patched: nothing to mutate or annotate
    parts.mutations = [_json_patch(
        "!variables.mutate ? [] : "
        "(variables.missingLabels.size() == 0 || variables.spec.?nodeSelector.hasValue() ? [] : "
        "[JSONPatch{op: 'add', path: variables.selectorPath, value: {}}]) + "
        "variables.missingLabels.map(l, JSONPatch{op: 'add', path: variables.selectorPath + "
        "'/' + jsonpatch.escapeKey(l[0]), value: l[1]}) + "
        "(variables.newTolerations.size() == 0 || variables.spec.?tolerations.hasValue() ? [] : "
        "[JSONPatch{op: 'add', path: variables.tolerationsPath, value: []}]) + "
        "variables.newTolerations.map(i, JSONPatch{op: 'add', path: variables.tolerationsPath + "
        "'/-', value: variables.poolTolerations[i]})")]
    parts.effects = [
        "variables.mutate && variables.missingLabels.size() > 0 ? 'set nodeSelector ' + "
        "variables.missingLabels.map(l, l[0] + '=' + l[1]).join(', ') : ''",
        "variables.mutate && variables.newTolerations.size() > 0 ? 'add toleration' + "
        "(variables.newTolerations.size() > 1 ? 's ' : ' ') + variables.newTolerations.map(i, "
        "variables.poolTolerationTexts[i]).join(', ') : ''"]
    # The webhook sends auditAnnotations only with a patch; a validating policy cannot tell a pod
    # pinned here from one that pinned itself, so it annotates every pod that ends up in a pool.
    parts.audit = [("pool", "variables.applies && (variables.isPod || variables.pinned) && "
                            "variables.hasKey && variables.value == variables.chosen ? "
                            "variables.chosen : ''")]
    return parts


_NO_NODES = "policies cannot list nodes"


def _pool_namespaces(rule: Rule, policy: PoolPlacement) -> _Parts:
    """PoolPlacement._judge_namespace: a Namespace's pool label set or changed to a pool that is
    not listed (onlyListedPools) is warned or denied (unknownPools); the check that the pool has
    nodes cannot be made."""
    parts = _Parts()
    if policy.unknown_pools == "off":
        return parts
    ns_key = lit(policy.namespace_label_key)
    # As the namespaces webhook of deploy/base/webhook.yaml: an UPDATE only when it sets or
    # changes the pool label.
    parts.conditions = [("update-changes-the-pool-label",
                         f"request.operation != 'UPDATE' || object.metadata.?labels.orValue({{}})"
                         f"[?{ns_key}].orValue('') != oldObject.metadata.?labels.orValue({{}})"
                         f"[?{ns_key}].orValue('')")]
    denied = policy.unknown_pools == "deny"
    starts = ("no node has", "cannot check that pool")
    parts.left_out.append((f"the check that a namespace's pool has nodes ({_NO_NODES})",
                           () if denied else starts))
    if denied:
        parts.denied_left_out.append(("no node has",))
    if not policy.only_listed_pools:
        return parts
    listed = ", ".join(policy.pools)
    parts.variables = [
        ("pool", f"object.metadata.?labels.orValue({{}})[?{ns_key}].orValue('')"),
        ("unlisted", f"variables.pool != '' && {_is_label_value('variables.pool')} && "
                     f"!(variables.pool in {lits(policy.pools)}) ? " + cat(
                         "pool ", E("variables.pool"), f" is not one of this rule's pools "
                         f"({listed})") + " : ''"),
    ]
    if denied:
        parts.denials = ["variables.unlisted == '' ? '' : " + cat(
            'namespace "', E("object.metadata.name"), '": ', E("variables.unlisted"),
            ". Label it with a pool that exists, or set the label empty to opt out of pools")]
    else:
        parts.warnings = ["variables.unlisted"]
    return parts


def _term_admits() -> str:
    """CEL: a node with variables.nodeLabels (the pool key and the pool's nodeLabels) can
    satisfy nodeSelectorTerm ``t`` (app.rules.pool._term_admits: terms ORed, requirements ANDed,
    an empty term matches nothing, other keys assumed fine)."""
    values = "e.?values.orValue([])"
    # Gt/Lt compare integers; a value that is no integer never satisfies them. int64 here: one
    # of more than 18 digits is taken as no integer (the webhook's Python would compare it).
    compare = ("l[1].matches('^[0-9]{1,18}$') && " + values + ".size() > 0 && "
               "e.values[0].matches('^[+-]?[0-9]{1,18}$') && (e.operator == 'Gt' ? "
               "int(l[1]) > int(e.values[0]) : int(l[1]) < int(e.values[0]))")
    requirement = (f"e.operator == 'In' ? l[1] in {values} : "
                   f"e.operator == 'NotIn' ? !(l[1] in {values}) : "
                   "e.operator == 'Exists' ? true : "
                   f"(e.operator == 'Gt' || e.operator == 'Lt') && {compare}")
    return ("(t.?matchExpressions.orValue([]).size() > 0 || "
            "t.?matchFields.orValue([]).size() > 0) && "
            "t.?matchExpressions.orValue([]).all(e, variables.nodeLabels.all(l, l[0] != e.key "
            f"|| ({requirement})))")


def _mirror_condition(kinds: Iterable[str]) -> list[tuple[str, str]]:
    """Mirror pods are never touched: the pool rule skips them and every webhook of
    deploy/base/webhook.yaml that gets pods skips them (matchConditions), so the policies too."""
    if "Pod" not in kinds:
        return []
    return [("not-a-mirror-pod", f"!(request.kind.kind == 'Pod' && {lit(MIRROR_POD_ANNOTATION)} "
                                 "in object.metadata.?annotations.orValue({}))")]


_FIELDS = ("initContainers", "containers")  # app.rules.base.pod_containers, in its order


def _image_pull_policy(rule: Rule, kinds: Sequence[str], root: str) -> _Parts:
    policy = rule.policy
    assert isinstance(policy, ImagePullPolicy)
    wanted = lit(policy.policy)
    parts = _Parts(root=root, conditions=_mirror_condition(kinds) if root == "object" else [])
    for field_name in _FIELDS:
        parts.variables.append((
            f"stale{field_name[0].upper()}{field_name[1:]}",
            f"{root}.spec.?{field_name}.orValue([])"
            f".filter(c, c.?imagePullPolicy.orValue('') != {wanted})"))
    parts.variables.append(("changed", "variables.staleInitContainers.size() + "
                                       "variables.staleContainers.size()"))
    # Containers are lists merged by name: an apply configuration sets the one field on each.
    merged = ", ".join(
        f"{f}: variables.stale{f[0].upper()}{f[1:]}.map(c, "
        f"Object.spec.{f}{{name: c.name, imagePullPolicy: {wanted}}})" for f in _FIELDS)
    if root == "object":
        parts.mutations = [_apply_configuration(
            f"variables.changed == 0 ? Object{{}} : Object{{spec: Object.spec{{{merged}}}}}")]
    parts.effects = ["variables.changed == 0 ? '' : " + lit(f"set imagePullPolicy={policy.policy} "
                                                           "on ") +
                     " + " + _plural("variables.changed", "container")]
    return parts


_QOS_WARNING = "QoS class changes from Guaranteed to Burstable"  # app/rules/limits.py's


def _remove_resource_limits(rule: Rule, kinds: Sequence[str], root: str) -> _Parts:
    policy = rule.policy
    assert isinstance(policy, RemoveResourceLimits)
    resources = lits(policy.resources)
    parts = _Parts(root=root, conditions=[
        *(_mirror_condition(kinds) if root == "object" else []),
        ("no-keep-annotation", f"{root}.metadata.?annotations[?{lit(policy.keep_annotation)}]"
                               ".orValue('') != 'true'")])
    limits, requests = "c.?resources.?limits.orValue({})", "c.?resources.?requests.orValue({})"
    # limits goes whole when every limit it holds is one to remove (limits.py, all_of_them)
    every = f"{resources}.filter(r, r in {limits}).size() == {limits}.size()"
    patches = []
    for field_name in _FIELDS:
        items = f"object.spec.?{field_name}.orValue([])"

        def path(suffix: str, field_name: str = field_name) -> str:
            return (lit(f"/spec/{field_name}/") + " + string(i) + " +
                    lit("/resources/limits" + suffix))

        patches.append(f"{items}.transformList(i, c, {limits}.size() > 0 && {every}, "
                       f"JSONPatch{{op: 'remove', path: {path('')}}})")
        for resource in dict.fromkeys(policy.resources):
            patches.append(
                f"{items}.transformList(i, c, {lit(resource)} in {limits} && !({every}), "
                f"JSONPatch{{op: 'remove', path: {path('/' + escape(resource))}}})")
    parts.variables = [
        ("containers", " + ".join(f"{root}.spec.?{f}.orValue([])" for f in _FIELDS)),
        ("removing", f"variables.containers.filter(c, {resources}.exists(r, r in {limits}))"
                     ".size()"),
    ]
    if root == "object":
        parts.mutations = [_json_patch(" +\n".join(patches))]
    names = "/".join(policy.resources)
    parts.effects = ["variables.removing == 0 ? '' : " + lit(f"remove {names} limits from ") +
                     " + " + _plural("variables.removing", "container")]
    # The warnings about what the removal does: a validating policy sees the pod only after the
    # limits are gone (it cannot tell which were removed), and mutating policies cannot warn.
    removed = "a validating policy sees only the pod without its limits"
    parts.left_out.append(("the warnings about downward API references (env resourceFieldRef, "
                           f"downwardAPI volumes) to a removed limit ({removed} in enforce mode; "
                           "not written for warn mode)", ("container ", "volume ", "and ")))
    qos = [r for r in policy.resources if r in ("cpu", "memory")]
    if not qos:
        return parts
    if rule.enforcement == "enforce":
        parts.left_out.append((f"the warning when a Guaranteed pod becomes Burstable ({removed})",
                               (_QOS_WARNING,)))
        return parts
    same = ("(r in " + requests + " ? (" + requests + "[r] == " + limits + "[r] || (isQuantity("
            + requests + "[r]) && isQuantity(" + limits + "[r]) && quantity(" + requests +
            "[r]).compareTo(quantity(" + limits + "[r])) == 0)) : true)")
    parts.variables.append((
        "guaranteed", "variables.containers.size() > 0 && variables.containers.all(c, "
                      f"['cpu', 'memory'].all(r, r in {limits} && {same}))"))
    parts.warnings = [
        f"variables.removing > 0 && variables.guaranteed && variables.containers.exists(c, "
        f"{lits(qos)}.exists(r, r in {limits})) ? " +
        lit(f"{_QOS_WARNING}: {names} limits removed") + " : ''"]
    return parts


def _namespace_labels(rule: Rule, kinds: Sequence[str], root: str) -> _Parts:
    policy = rule.policy
    assert isinstance(policy, NamespaceLabels)
    system = policy.system_id_label
    parts = _Parts(variables=[
        # At mutation the name is the request's or the object's; generateName has no name yet.
        ("name", "request.?name.orValue('') != '' ? request.name : "
                 "object.metadata.?name.orValue('')"),
        ("generateName", "object.metadata.?generateName.orValue('')"),
        ("systemId", "(variables.name != '' ? variables.name : variables.generateName)"
                     ".split('-')[0]"),
        ("labels", "object.metadata.?labels.orValue({})"),
    ])
    system_id = "string(variables.systemId)"
    with_id = {**{k: lit(v) for k, v in policy.labels.items()}, system: system_id}
    without_id = {k: lit(v) for k, v in policy.labels.items()}

    def map_literal(entries: Mapping[str, str]) -> str:
        return "{" + ", ".join(f"{lit(k)}: {v}" for k, v in entries.items()) + "}"

    pairs = [f"[{lit(k)}, {v}]" for k, v in without_id.items() if k != system]
    if system in policy.labels:
        pairs.insert(list(policy.labels).index(system),
                     f"[{lit(system)}, variables.systemId != '' ? {system_id} : "
                     f"{lit(policy.labels[system])}]")
        wanted = "[" + ", ".join(pairs) + "]"
    else:
        wanted = (f"[{', '.join(pairs)}] + "
                  f"(variables.systemId != '' ? [[{lit(system)}, {system_id}]] : [])")
    parts.variables += [
        ("changed", f"({wanted}).filter(p, variables.labels[?p[0]] != optional.of(p[1]))"),
    ]
    parts.mutations = [_apply_configuration(
        "Object{metadata: Object.metadata{labels: variables.systemId != '' ? "
        f"{map_literal(with_id)} : {map_literal(without_id)}}}}}")]
    parts.effects = ["variables.changed.size() == 0 ? '' : 'set labels ' + "
                     "variables.changed.map(p, p[0] + '=' + p[1]).join(', ')"]
    if policy.name_pattern is None or policy.name_pattern_enforcement == "off":
        return parts
    pattern = policy.name_pattern.pattern
    problem = _re2_problem(pattern)
    if problem:
        raise _Unsupported(f"params.namePattern {pattern!r} {problem}, which the API server's "
                           "regular expressions (RE2) do not have")
    parts.variables += [
        # A validating policy sees the name generated from generateName, which the webhook never
        # judges (it has no name yet): names of namespaces created with generateName are not
        # checked (nor, unlike the webhook, a name given together with a generateName).
        ("checkedName", "object.metadata.?generateName.orValue('') == '' ? "
                        "object.metadata.?name.orValue('') : ''"),
        ("nameProblem", f"variables.checkedName != '' && !variables.checkedName.matches("
                        f"{lit(pattern)}) ? " + cat('namespace name "', E("variables.checkedName"),
                                                    f'" does not match {pattern}') + " : ''"),
    ]
    if policy.name_pattern_enforcement == "enforce":
        parts.denials = ["variables.nameProblem == '' ? '' : variables.nameProblem + "
                         "'; choose a name that does'"]
    else:
        parts.warnings = ["variables.nameProblem"]
    return parts


_EXPORTERS: dict[str, Callable[[Rule, Sequence[str], str], _Parts]] = {
    "PoolPlacement": _pool,
    "ImagePullPolicy": _image_pull_policy,
    "RemoveResourceLimits": _remove_resource_limits,
    "NamespaceLabels": _namespace_labels,
}


# Python-only syntax of the re module that RE2 (Go's regexp, CEL's matches()) lacks or reads
# otherwise; everything else a namePattern uses means the same there (names are ASCII).
_PY_ONLY_GROUPS = (("(?=", "a lookahead"), ("(?!", "a lookahead"), ("(?<=", "a lookbehind"),
                   ("(?<!", "a lookbehind"), ("(?>", "an atomic group"),
                   ("(?P=", "a backreference"), ("(?(", "a conditional group"),
                   ("(?#", "a comment group"))


def _re2_problem(pattern: str) -> str | None:
    """What in ``pattern`` (valid for Python's re) RE2 cannot express; None if nothing."""
    index, in_class = 0, False
    while index < len(pattern):
        char = pattern[index]
        if char == "\\":
            escaped = pattern[index + 1:index + 2]
            if escaped.isdigit() and escaped != "0" and not in_class:
                return "uses a backreference"
            if escaped in ("Z", "u", "U", "N"):
                return f"uses the escape \\{escaped}"
            index += 2
            continue
        if in_class:
            in_class = char != "]"
            index += 1
            continue
        if char == "[":
            in_class = True
            index += 2 if pattern[index + 1:index + 2] == "^" else 1
            if pattern[index:index + 1] == "]":
                index += 1  # a ']' first in a class is literal
            continue
        for opening, name in _PY_ONLY_GROUPS:
            if pattern.startswith(opening, index):
                return f"uses {name}"
        if pattern.startswith("(?", index) and not pattern.startswith("(?P<", index) and \
                not pattern.startswith("(?:", index):
            flags = re.match(r"\(\?([a-zA-Z-]*)", pattern[index:])
            unknown = set(flags.group(1) if flags else "") - set("ims-")
            if unknown:
                return f"uses the inline flag {''.join(sorted(unknown))}"
        repeat = re.match(r"\{(\d*)(,?)(\d*)\}", pattern[index:])
        if char == "{" and repeat:
            low, comma, high = repeat.groups()
            if comma and not low:
                return "uses a repetition without a lower bound ({,n})"
            if any(n and int(n) > 1000 for n in (low, high)):
                return "repeats more than 1000 times"
            index += len(repeat.group(0))
            if pattern[index:index + 1] == "+":
                return "uses a possessive quantifier"
            continue
        if char in "*+?" and pattern[index + 1:index + 2] == "+":
            return "uses a possessive quantifier"
        index += 1
    return None


# -- the objects ----------------------------------------------------------------------------------


def _referenced(variables: Sequence[tuple[str, str]], expressions: Iterable[str]) -> list[dict]:
    """The variables the expressions use (directly or through other variables), in order."""
    defined = dict(variables)
    wanted: set[str] = set()
    pending = [name for text in expressions for name in re.findall(r"variables\.(\w+)", text)]
    while pending:
        name = pending.pop()
        if name not in wanted and name in defined:
            wanted.add(name)
            pending += re.findall(r"variables\.(\w+)", defined[name])
    return [{"name": n, "expression": e} for n, e in variables if n in wanted]


@dataclass(frozen=True)
class _Served:
    """The kinds of a rule one set of policies covers, as one webhook of deploy/ serves them."""

    suffix: str  # of the policies' names
    kinds: tuple[str, ...]
    operations: tuple[str, ...]
    failure_policy: str
    templates: bool = False  # a pod rule on pod controllers: warns what their pods will get


def _served(rule: Rule) -> list[_Served]:
    operations = tuple(op for op in ("CREATE", "UPDATE") if op in rule.match.operations)
    kinds = [k for _, k in sorted(rule.match.kinds)]  # core group first, as rules/ lists them
    elsewhere = ELSEWHERE.get(rule.kind_name, {})  # kinds served on another webhook
    own = tuple(k for k in kinds if k not in WORKLOADS and k not in elsewhere)
    workloads = tuple(k for k in kinds if k in WORKLOADS)
    served = []
    if own:
        served.append(_Served("", own, operations, FAILURE_POLICIES[rule.webhook]))
    for webhook in dict.fromkeys(elsewhere.values()):
        moved = tuple(k for k in kinds if elsewhere.get(k) == webhook)
        if moved:
            served.append(_Served(f"-{webhook}", moved, operations, FAILURE_POLICIES[webhook]))
    if workloads:
        served.append(_Served("-workloads", workloads, operations, FAILURE_POLICIES["workloads"]))
    if (rule.policy.ON_TEMPLATES == "warn" and rule.template_warnings and "Pod" in kinds
            and "CREATE" in operations):
        # app.admission: the rule runs on the template as on a pod CREATE, changes nothing and
        # warns; the workloads webhook gets these kinds' CREATEs and UPDATEs.
        served.append(_Served("-templates", WORKLOADS, ("CREATE", "UPDATE"),
                              FAILURE_POLICIES["workloads"], templates=True))
    return served


def _match_constraints(rule: Rule, parts: _Parts, served: _Served) -> dict:
    resource_rules = []
    for kind in served.kinds:
        version, resource = RESOURCES[kind]
        resource_rules.append({"apiGroups": [OBJECT_KINDS[kind].group], "apiVersions": [version],
                               "operations": list(served.operations), "resources": [resource]})
    constraints: dict[str, Any] = {"resourceRules": resource_rules}
    # The API server matches a namespace selector against the namespace's labels, and for a
    # Namespace against its own: what the webhook's Match does. Excluded namespaces by name.
    expressions = list(parts.namespace_expressions)
    if rule.match.namespace_selector:
        expressions += [_match_expression(r) for r in rule.match.namespace_selector.requirements]
    if rule.match.excluded_namespaces:
        expressions.append({"key": NAME_LABEL, "operator": "NotIn",
                            "values": sorted(rule.match.excluded_namespaces)})
    if expressions:
        constraints["namespaceSelector"] = {"matchExpressions": expressions}
    return constraints


def _conditions(rule: Rule, parts: _Parts) -> list[dict]:
    conditions = list(parts.conditions)
    if rule.match.object_selector and rule.match.object_selector.requirements:
        # As a condition, not an objectSelector: the API server's objectSelector also matches
        # when only the old object does, the webhook's only on the new one (and a template's
        # labels are not the object's).
        labels = f"{parts.root}.metadata.?labels.orValue({{}})"
        conditions.append(("object-selector", " && ".join(
            _requirement_cel(r, labels) for r in rule.match.object_selector.requirements)))
    return [{"name": n, "expression": e} for n, e in conditions]


def _metadata(name: str, rule: Rule) -> dict:
    return {"name": name, "annotations": {RULE_ANNOTATION: rule.name}}


def _policy(kind: str, name: str, rule: Rule, parts: _Parts, served: _Served, spec: dict,
            expressions: Iterable[str]) -> dict:
    expressions = list(expressions)
    conditions = _conditions(rule, parts)
    variables = _referenced(parts.variables, expressions)
    full: dict[str, Any] = {"failurePolicy": served.failure_policy,
                            "matchConstraints": _match_constraints(rule, parts, served)}
    if conditions:
        full["matchConditions"] = conditions
    if variables:
        full["variables"] = variables
    full.update(spec)
    return {"apiVersion": API_VERSION, "kind": kind, "metadata": _metadata(name, rule),
            "spec": full}


def _binding(kind: str, name: str, rule: Rule, actions: Sequence[str] | None = None) -> dict:
    spec: dict[str, Any] = {"policyName": name}
    if actions is not None:
        spec["validationActions"] = list(actions)
    return {"apiVersion": API_VERSION, "kind": f"{kind}Binding",
            "metadata": _metadata(name, rule), "spec": spec}


def _see(rule: Rule) -> str:
    return f" + {lit('. See ' + rule.docs_url)}" if rule.docs_url else ""


def _warning_validations(rule: Rule, texts: Sequence[str]) -> tuple[list[tuple[str, str]],
                                                                     list[dict]]:
    """One validation per warning text (CEL, '' for none): the webhook's "[rule] " prefix, its
    cut at MAX_WARNING characters and the docsURL after it (app.admission.warning)."""
    variables, validations = [], []
    head = f"[{rule.name}] "
    room = MAX_WARNING - len(head)
    for index, text in enumerate(texts):
        name, cut = f"warning{index}", f"message{index}"
        variables.append((name, text))
        variables.append((cut, f"variables.{name}.size() < {room} ? {lit(head)} + variables.{name}"
                               f" : {lit(head)} + variables.{name}.substring(0, {room - 4}) + "
                               "'...'"))
        message = f"variables.{cut}"
        if rule.docs_url:
            url = rule.docs_url
            see = (f"({message}.endsWith('.') ? {lit(' See ' + url)} : "
                   f"{lit('. See ' + url)})")
            if MAX_WARNING + len(url) + 6 <= MAX_WARNING_WITH_URL:  # always fits
                message = f"{message} + {see}"
            else:
                message = (f"{message}.size() + {len(url) + 6} <= {MAX_WARNING_WITH_URL} ? "
                           f"{message} + {see} : {message}")
        validations.append({"expression": f"variables.{name} == ''",
                            "messageExpression": message})
    return variables, validations


def _would(prefix: str, text: str) -> str:
    return f"({text}) == '' ? '' : {lit(prefix)} + ({text})"


def _objects(rule: Rule, parts: _Parts, served: _Served) -> list[dict]:
    name = f"poolkeeper-{rule.name}{served.suffix}"
    objects = []
    if served.templates:
        # app.admission._template_warning: "pods of this <kind> will get: <effects>"
        parts = dataclasses.replace(parts, variables=[
            *parts.variables, ("effects", "[" + ", ".join(parts.effects) + "].filter(e, e != '')")])
        warnings = ["variables.effects.size() == 0 ? '' : 'pods of this ' + request.kind.kind + "
                    "' will get: ' + variables.effects.join('; ')"]
    elif rule.enforcement == "enforce":
        warnings = list(parts.warnings)
        if parts.mutations:
            texts = [m.get("jsonPatch", m.get("applyConfiguration", {}))["expression"]
                     for m in parts.mutations]
            objects.append(_policy("MutatingAdmissionPolicy", name, rule, parts, served,
                                   {"reinvocationPolicy": "IfNeeded",
                                    "mutations": parts.mutations}, texts))
            objects.append(_binding("MutatingAdmissionPolicy", name, rule))
        if parts.denials:
            denials = ("[" + ", ".join(parts.denials) + "].filter(d, d != '')")
            validation = {"expression": f"{denials}.size() == 0",
                          "messageExpression": f"{denials}.map(d, {lit(f'[{rule.name}] ')} + d"
                                               f"{_see(rule)}).join('; ')",
                          "message": f"[{rule.name}] denied by poolkeeper rule {rule.name}",
                          "reason": _REASONS[DENIAL_CODE]}
            spec: dict[str, Any] = {"validations": [validation]}
            texts = [validation["expression"], validation["messageExpression"]]
            if parts.audit:
                spec["auditAnnotations"] = [{"key": k, "valueExpression": v}
                                            for k, v in parts.audit]
                texts += [v for _, v in parts.audit]
            objects.append(_policy("ValidatingAdmissionPolicy", name, rule, parts, served, spec,
                                   texts))
            objects.append(_binding("ValidatingAdmissionPolicy", name, rule, ["Deny"]))
    else:  # warn: what the rule would do, as warnings, and its own warnings
        warnings = [_would("would ", e) for e in parts.effects]
        warnings += [_would("would deny: ", d) for d in parts.denials]
        warnings += parts.warnings
    if warnings:
        own, validations = _warning_validations(rule, warnings)
        with_warnings = dataclasses.replace(parts, variables=[*parts.variables, *own])
        texts = [v["messageExpression"] for v in validations]
        warned = name if served.templates else f"{name}-warnings"
        objects.append(_policy("ValidatingAdmissionPolicy", warned, rule, with_warnings, served,
                               {"validations": validations}, texts))
        objects.append(_binding("ValidatingAdmissionPolicy", warned, rule, ["Warn"]))
    return objects


def export_policies(rules: Sequence[Rule]) -> Export:
    """The in-tree policies for the enabled rules, and what of them cannot be expressed."""
    objects: list[dict] = []
    left_out: list[LeftOut] = []
    exported: list[str] = []
    for rule in rules:
        if rule.enforcement == "off":
            continue
        exporter = _EXPORTERS.get(rule.kind_name)
        try:
            if exporter is None:
                raise _Unsupported(f"rule kind {rule.kind_name} has no in-tree form")
            unknown = sorted(k for _, k in rule.match.kinds if k not in RESOURCES)
            if unknown:
                raise _Unsupported(f"match.kinds: no API resource known for {', '.join(unknown)}")
            built = []
            for served in _served(rule):
                root = _by_kind({k: _path("object", template_path(OBJECT_KINDS[k].group, k)
                                                   or ()) for k in served.kinds}) \
                    if served.templates else "object"
                built.append((served, exporter(rule, served.kinds, root)))
        except _Unsupported as exc:
            left_out.append(LeftOut(rule.name, f"the whole rule: {exc}"))
            continue
        lost: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {}
        for served, parts in built:
            objects += _objects(rule, parts, served)
            if not served.templates:
                denied = sum(parts.denied_left_out, ())
                lost.update((what, (warnings, denied)) for what, warnings in parts.left_out)
        left_out += [LeftOut(rule.name, what, warnings, denials)
                     for what, (warnings, denials) in lost.items()]
        exported.append(rule.name)
    return Export(tuple(objects), tuple(left_out), tuple(exported))


# -- output ---------------------------------------------------------------------------------------


class _Dumper(yaml.SafeDumper):
    pass


class _Block(str):
    """A CEL expression, written as a YAML literal block (no quoting to undo by eye)."""


def _block(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style="|")


_Dumper.add_representer(_Block, _block)


def _wrap(expression: str) -> str:
    """Long expressions broken at top-level ' && ', ' || ' and ' : ' (never inside a string) so
    a block scalar stays readable; CEL reads a line break as a space."""
    if len(expression) <= 80 or "\n" in expression:
        return expression
    out, depth, quote, index, line = [], 0, "", 0, 0
    while index < len(expression):
        char = expression[index]
        if quote:
            out.append(char)
            if char == "\\":
                out.append(expression[index + 1])
                index += 1
            elif char == quote:
                quote = ""
        elif char in "'\"":
            quote = char
            out.append(char)
        else:
            depth += char in "([{"
            depth -= char in ")]}"
            for operator in (" && ", " || ", " ? ", " : ", " + "):
                if expression.startswith(operator, index) and depth == 0 and \
                        len(out) - line > 60:
                    out.append("\n" + operator.strip() + " ")
                    line = len(out)
                    index += len(operator)
                    break
            else:
                out.append(char)
                index += 1
                continue
            continue
        index += 1
    return "".join(out)


def _readable(node: Any, key: str = "") -> Any:
    if isinstance(node, dict):
        return {k: _readable(v, k) for k, v in node.items()}
    if isinstance(node, list):
        return [_readable(v, key) for v in node]
    if isinstance(node, str) and key in ("expression", "messageExpression", "valueExpression"):
        return _Block(_wrap(node))
    return node


def render(export: Export, output: str = "yaml") -> str:
    """The objects as a YAML stream (with a header naming the rules and what was left out) or a
    JSON List."""
    if output == "json":
        document = {"apiVersion": "v1", "kind": "List", "items": list(export.objects)}
        return json.dumps(document, indent=2) + "\n"
    header = ["# In-tree admission policies generated by `poolkeeper export` from the rules "
              + (", ".join(export.rules) or "(none enabled)") + "."]
    if export.left_out:
        header.append("# Left out (no admission policy can express it):")
        header += [f"# - {item}" for item in export.left_out]
    body = yaml.dump_all([_readable(o) for o in export.objects], Dumper=_Dumper,
                         sort_keys=False, explicit_start=True, width=100,
                         default_flow_style=None)
    return "\n".join(header) + "\n" + body


def command(args: Any, rules: Sequence[Rule]) -> int:
    """`poolkeeper export`: prints the policies; 1 when something cannot be expressed (without
    --skip-unsupported, which lists it on stderr and leaves it out)."""
    import sys

    result = export_policies(rules)
    if result.left_out and not args.skip_unsupported:
        for item in result.left_out:
            print(f"poolkeeper export: cannot express {item} (--skip-unsupported leaves it out)",
                  file=sys.stderr)
        return 1
    for item in result.left_out:
        print(f"poolkeeper export: left out {item}", file=sys.stderr)
    sys.stdout.write(render(result, args.output))
    return 0
