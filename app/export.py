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

from .admission import DENIAL_CODE, MAX_WARNING
from .kinds import OBJECT_KINDS
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
from .rules.params import LABEL_VALUE_RE
from .text import ECHO_LIMIT

API_VERSION = "admissionregistration.k8s.io/v1"
TARGETS = ("policies",)
FORMATS = ("yaml", "json")
# The API resource of each object kind a rule may match (app.kinds names the kinds). A kind
# missing here cannot be exported.
RESOURCES = {"Pod": ("v1", "pods"), "DaemonSet": ("v1", "daemonsets"),
             "Namespace": ("v1", "namespaces"), "Deployment": ("v1", "deployments"),
             "StatefulSet": ("v1", "statefulsets"), "ReplicaSet": ("v1", "replicasets"),
             "Job": ("v1", "jobs"), "CronJob": ("v1", "cronjobs")}
# failurePolicy of each webhook in deploy/base/webhook.yaml, kept for the rules it serves: the
# pool rule fails closed, the defaults and namespace labels fail open. For a policy it decides
# what a CEL error (or a missing binding parameter) does.
FAILURE_POLICIES = {"placement": "Fail", "defaults": "Ignore", "namespaces": "Ignore"}
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
    warning: str = ""  # when what is left out is a warning: how it starts (after "[rule] ")

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
    items = list(values.items())
    if len(items) == 1:
        return items[0][1]
    expression = items[-1][1]
    for kind, value in reversed(items[:-1]):
        expression = f"request.kind.kind == {lit(kind)} ? {value} : {expression}"
    return expression


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

    variables: list[tuple[str, str]] = field(default_factory=list)
    conditions: list[tuple[str, str]] = field(default_factory=list)  # matchConditions
    namespace_expressions: list[dict] = field(default_factory=list)  # extra namespaceSelector
    mutations: list[dict] = field(default_factory=list)  # MutatingAdmissionPolicy mutations
    denials: list[str] = field(default_factory=list)  # in the webhook's order
    warnings: list[str] = field(default_factory=list)  # the rule's own warnings
    effects: list[str] = field(default_factory=list)  # what enforce would change, in words
    audit: list[tuple[str, str]] = field(default_factory=list)  # auditAnnotations
    left_out: list[tuple[str, str]] = field(default_factory=list)  # (what, warning it starts)


def _json_patch(expression: str) -> dict:
    return {"patchType": "JSONPatch", "jsonPatch": {"expression": expression}}


def _apply_configuration(expression: str) -> dict:
    return {"patchType": "ApplyConfiguration", "applyConfiguration": {"expression": expression}}


def _pool(rule: Rule) -> _Parts:
    policy = rule.policy
    assert isinstance(policy, PoolPlacement)
    kinds = sorted(k for _, k in rule.match.kinds)
    spec_paths: dict[str, Path] = {}
    for kind in kinds:
        spec_path = OBJECT_KINDS[kind].pod_spec
        assert spec_path is not None  # PoolPlacement's kinds all have a pod spec
        spec_paths[kind] = spec_path

    def per_kind(value: Callable[[str, Path], str]) -> str:
        return _by_kind({k: value(k, p) for k, p in spec_paths.items()})

    key, ns_key = policy.node_label_key, policy.namespace_label_key
    what = E("variables.what")
    pool, value, where = E("variables.pool"), E("variables.value"), E("variables.where")
    namespace = E("request.namespace")
    parts = _Parts()
    parts.variables = [
        ("isPod", "request.kind.kind == 'Pod'"),
        ("spec", per_kind(lambda _, p: "object." + ".".join(str(t) for t in p))),
        ("what", per_kind(lambda k, _: lit("pod" if k == "Pod" else f"{k} pod template"))),
        ("nsPool", f"namespaceObject.metadata.?labels.orValue({{}})[?{lit(ns_key)}]"
                   ".orValue('')"),
        # An empty label value counts as no label, as in the webhook.
        ("pool", f"variables.nsPool != '' ? variables.nsPool : {lit(policy.default_pool or '')}"),
        ("selector", "variables.spec.?nodeSelector.orValue({})"),
        ("hasKey", f"{lit(key)} in variables.selector"),
        ("value", f"variables.selector[?{lit(key)}].orValue('')"),
        # Pod UPDATE: only a change of the pool key is judged (the scheduling-gate case).
        ("judged", "!(variables.isPod && request.operation == 'UPDATE') || "
                   f"variables.selector[?{lit(key)}] != "
                   f"oldObject.spec.?nodeSelector.orValue({{}})[?{lit(key)}]"),
        ("applies", "variables.pool != '' && variables.judged"),
        ("where", "variables.nsPool != '' ? " + cat(
            'namespace "', namespace, '" is pinned to node pool "', pool,
            f'" (namespace label {ns_key}=', pool, ")") + " : " + cat(
            'namespace "', namespace, f'" has no {ns_key} label and gets the default node pool "',
            pool, '"')),
        ("keyField", per_kind(lambda _, p: lit(describe((*p, "nodeSelector", key))))),
        ("quotedValue", _quoted("variables.value")),
        ("elsewhere", f"{_is_label_value('variables.value')} ? " + cat(
            "to run on pool ", E("variables.quotedValue"),
            f", use a namespace labelled {ns_key}=", value) + " : " + cat(
            E("variables.quotedValue"), " is not a node pool name (a label value)")),
        ("otherPool", "variables.applies && variables.hasKey && variables.value != variables.pool"
                      " ? " + cat(what, " ", E("variables.keyField"), " is ",
                                  E("variables.quotedValue"), ", but ", where,
                                  ". Remove that nodeSelector key (poolkeeper sets it) or set it "
                                  'to "', pool, '"; ', E("variables.elsewhere")) + " : ''"),
        ("nodeName", "variables.spec.?nodeName.orValue('')"),
        ("quotedNodeName", _quoted("variables.nodeName")),
        ("nodeNameField", per_kind(lambda _, p: lit(describe((*p, "nodeName"))))),
        ("nodeNameSet", "variables.applies && variables.nodeName != '' && "
                        "(request.operation == 'CREATE' || !variables.isPod) ? " + cat(
                            what, " sets ", E("variables.nodeNameField"), "=",
                            E("variables.quotedNodeName"), ", which bypasses the scheduler and so "
                            "the node pool; ", where, ". Remove nodeName and let the scheduler "
                            'place it on pool "', pool, '"') + " : ''"),
        ("terms", "variables.spec.?affinity.?nodeAffinity."
                  "?requiredDuringSchedulingIgnoredDuringExecution.?nodeSelectorTerms"
                  ".orValue([])"),
        ("termsField", per_kind(lambda _, p: lit(describe(
            (*p, "affinity", "nodeAffinity", "requiredDuringSchedulingIgnoredDuringExecution",
             "nodeSelectorTerms"))))),
        ("affinity", "variables.applies && variables.terms.size() > 0 && "
                     f"!variables.terms.exists(t, {_term_admits(key)}) ? " + cat(
                         what, " requires node affinity (", E("variables.termsField"),
                         f") that no node with {key}=", pool, " can satisfy, but ", where,
                         f", so it could never be scheduled. Allow {key}=", pool,
                         " in at least one term, or drop the term") + " : ''"),
        # The webhook patches only what it does not deny.
        ("mutate", "variables.applies && !variables.hasKey && variables.nodeNameSet == '' && "
                   "variables.affinity == ''"),
        ("selectorPath", per_kind(lambda _, p: lit(pointer((*p, "nodeSelector"))))),
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
    if policy.default_pool is None:  # unlabelled namespaces are left alone: skip them early
        parts.namespace_expressions = [{"key": ns_key, "operator": "Exists"}]
    parts.mutations = [_json_patch(
        "!variables.mutate ? [] : variables.spec.?nodeSelector.hasValue() ? "
        f"[JSONPatch{{op: 'add', path: variables.selectorPath + {lit('/' + escape(key))}, "
        "value: variables.pool}] : "
        f"[JSONPatch{{op: 'add', path: variables.selectorPath, value: {{{lit(key)}: "
        "variables.pool}}]")]
    parts.denials = ["variables.otherPool", "variables.nodeNameSet", "variables.affinity"]
    parts.effects = ["variables.mutate ? " + cat(f"set nodeSelector {key}=", pool) + " : ''"]
    # The webhook sends auditAnnotations only with a patch; a validating policy cannot tell a pod
    # pinned here from one that pinned itself, so it annotates every pod that ends up in the pool.
    parts.audit = [("pool", "variables.applies && variables.hasKey && "
                            "variables.value == variables.pool ? variables.pool : ''")]
    return parts


def _term_admits(key: str) -> str:
    """CEL: a node labelled key=pool can satisfy nodeSelectorTerm ``t`` (pool.py _term_admits:
    terms ORed, requirements ANDed, an empty term matches nothing, other keys assumed fine)."""
    values = "e.?values.orValue([])"
    # Gt/Lt compare integers; a pool that is no integer never satisfies them. int64 here: a pool
    # of more than 18 digits is taken as no integer (the webhook's Python would compare it).
    compare = ("variables.pool.matches('^[0-9]{1,18}$') && " + values + ".size() > 0 && "
               "e.values[0].matches('^[+-]?[0-9]{1,18}$') && (e.operator == 'Gt' ? "
               "int(variables.pool) > int(e.values[0]) : int(variables.pool) < int(e.values[0]))")
    requirement = (f"e.operator == 'In' ? variables.pool in {values} : "
                   f"e.operator == 'NotIn' ? !(variables.pool in {values}) : "
                   "e.operator == 'Exists' ? true : "
                   f"(e.operator == 'Gt' || e.operator == 'Lt') && {compare}")
    return ("(t.?matchExpressions.orValue([]).size() > 0 || "
            "t.?matchFields.orValue([]).size() > 0) && "
            f"t.?matchExpressions.orValue([]).all(e, e.key != {lit(key)} || ({requirement}))")


def _mirror_condition(kinds: Iterable[str]) -> list[tuple[str, str]]:
    """Mirror pods are never touched: the pool rule skips them and every webhook of
    deploy/base/webhook.yaml that gets pods skips them (matchConditions), so the policies too."""
    if "Pod" not in kinds:
        return []
    return [("not-a-mirror-pod", f"!(request.kind.kind == 'Pod' && {lit(MIRROR_POD_ANNOTATION)} "
                                 "in object.metadata.?annotations.orValue({}))")]


_FIELDS = ("initContainers", "containers")  # app.rules.base.pod_containers, in its order


def _image_pull_policy(rule: Rule) -> _Parts:
    policy = rule.policy
    assert isinstance(policy, ImagePullPolicy)
    wanted = lit(policy.policy)
    parts = _Parts(conditions=_mirror_condition(k for _, k in rule.match.kinds))
    for field_name in _FIELDS:
        parts.variables.append((
            f"stale{field_name[0].upper()}{field_name[1:]}",
            f"object.spec.?{field_name}.orValue([])"
            f".filter(c, c.?imagePullPolicy.orValue('') != {wanted})"))
    parts.variables.append(("changed", "variables.staleInitContainers.size() + "
                                       "variables.staleContainers.size()"))
    # Containers are lists merged by name: an apply configuration sets the one field on each.
    merged = ", ".join(
        f"{f}: variables.stale{f[0].upper()}{f[1:]}.map(c, "
        f"Object.spec.{f}{{name: c.name, imagePullPolicy: {wanted}}})" for f in _FIELDS)
    parts.mutations = [_apply_configuration(
        f"variables.changed == 0 ? Object{{}} : Object{{spec: Object.spec{{{merged}}}}}")]
    parts.effects = ["variables.changed == 0 ? '' : " + lit(f"set imagePullPolicy={policy.policy} "
                                                           "on ") +
                     " + " + _plural("variables.changed", "container")]
    return parts


def _remove_resource_limits(rule: Rule) -> _Parts:
    policy = rule.policy
    assert isinstance(policy, RemoveResourceLimits)
    resources = lits(policy.resources)
    parts = _Parts(conditions=[
        *_mirror_condition(k for _, k in rule.match.kinds),
        ("no-keep-annotation",
         f"object.metadata.?annotations[?{lit(policy.keep_annotation)}].orValue('') != 'true'")])
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
        ("containers", " + ".join(f"object.spec.?{f}.orValue([])" for f in _FIELDS)),
        ("removing", f"variables.containers.filter(c, {resources}.exists(r, r in {limits}))"
                     ".size()"),
    ]
    parts.mutations = [_json_patch(" +\n".join(patches))]
    names = "/".join(policy.resources)
    parts.effects = ["variables.removing == 0 ? '' : " + lit(f"remove {names} limits from ") +
                     " + " + _plural("variables.removing", "container")]
    qos = [r for r in policy.resources if r in ("cpu", "memory")]
    if not qos:
        return parts
    if rule.enforcement == "enforce":
        # A validating policy sees the pod after the limits are gone, so it cannot tell that the
        # pod was Guaranteed before; mutating policies cannot warn.
        parts.left_out.append(("the warning when a Guaranteed pod becomes Burstable (a validating "
                               "policy sees only the pod without its limits)", _QOS_WARNING))
        return parts
    same = ("(r in " + requests + " ? (" + requests + "[r] == " + limits + "[r] || (isQuantity("
            + requests + "[r]) && isQuantity(" + limits + "[r]) && quantity(" + requests +
            "[r]).compareTo(quantity(" + limits + "[r])) == 0)) : true)")
    parts.variables.append((
        "guaranteed", "variables.containers.size() > 0 && variables.containers.all(c, "
                      f"['cpu', 'memory'].all(r, r in {limits} && {same}))"))
    parts.warnings = [
        f"variables.guaranteed && variables.containers.exists(c, {lits(qos)}.exists(r, r in "
        f"{limits})) ? " + lit(f"{_QOS_WARNING}: {names} limits removed") + " : ''"]
    return parts


_QOS_WARNING = "QoS class changes from Guaranteed to Burstable"  # app/rules/limits.py's


def _namespace_labels(rule: Rule) -> _Parts:
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


_EXPORTERS: dict[str, Callable[[Rule], _Parts]] = {
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


def _match_constraints(rule: Rule, parts: _Parts) -> dict:
    operations = [op for op in ("CREATE", "UPDATE") if op in rule.match.operations]
    resource_rules = []
    for group, kind in sorted(rule.match.kinds):
        version, resource = RESOURCES[kind]
        resource_rules.append({"apiGroups": [group], "apiVersions": [version],
                               "operations": operations, "resources": [resource]})
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
        # when only the old object does, the webhook's only on the new one.
        labels = "object.metadata.?labels.orValue({})"
        conditions.append(("object-selector", " && ".join(
            _requirement_cel(r, labels) for r in rule.match.object_selector.requirements)))
    return [{"name": n, "expression": e} for n, e in conditions]


def _metadata(name: str, rule: Rule) -> dict:
    return {"name": name, "annotations": {RULE_ANNOTATION: rule.name}}


def _policy(kind: str, name: str, rule: Rule, parts: _Parts, spec: dict,
            expressions: Iterable[str]) -> dict:
    expressions = list(expressions)
    conditions = _conditions(rule, parts)
    variables = _referenced(parts.variables, expressions)
    full: dict[str, Any] = {"failurePolicy": FAILURE_POLICIES[rule.webhook],
                            "matchConstraints": _match_constraints(rule, parts)}
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


def _warning_validations(rule: Rule, texts: Sequence[tuple[str, str]]) \
        -> tuple[list[tuple[str, str]], list[dict]]:
    """One validation per warning: (static prefix, CEL text); the webhook's '[rule] ' prefix and
    its truncation at MAX_WARNING characters (app.admission.warning)."""
    variables, validations = [], []
    for index, (prefix, text) in enumerate(texts):
        name = f"warning{index}"
        head = f"[{rule.name}] {prefix}"
        room = MAX_WARNING - len(head)
        variables.append((name, text))
        validations.append({
            "expression": f"variables.{name} == ''",
            "messageExpression": f"variables.{name}.size() < {room} ? {lit(head)} + "
                                 f"variables.{name} : {lit(head)} + variables.{name}"
                                 f".substring(0, {room - 4}) + '...'"})
    return variables, validations


def _rule_objects(rule: Rule, parts: _Parts) -> list[dict]:
    name = f"poolkeeper-{rule.name}"
    objects = []
    if rule.enforcement == "enforce":
        warnings = [("", w) for w in parts.warnings]
        if parts.mutations:
            texts = [m.get("jsonPatch", m.get("applyConfiguration", {}))["expression"]
                     for m in parts.mutations]
            objects.append(_policy("MutatingAdmissionPolicy", name, rule, parts,
                                   {"reinvocationPolicy": "IfNeeded",
                                    "mutations": parts.mutations}, texts))
            objects.append(_binding("MutatingAdmissionPolicy", name, rule))
        if parts.denials:
            denials = ("[" + ", ".join(parts.denials) + "].filter(d, d != '')")
            prefix = lit(f"[{rule.name}] ")
            validation = {"expression": f"{denials}.size() == 0",
                          "messageExpression": f"{denials}.map(d, {prefix} + d).join('; ')",
                          "message": f"[{rule.name}] denied by poolkeeper rule {rule.name}",
                          "reason": _REASONS[DENIAL_CODE]}
            spec: dict[str, Any] = {"validations": [validation]}
            texts = [validation["expression"], validation["messageExpression"]]
            if parts.audit:
                spec["auditAnnotations"] = [{"key": k, "valueExpression": v}
                                            for k, v in parts.audit]
                texts += [v for _, v in parts.audit]
            objects.append(_policy("ValidatingAdmissionPolicy", name, rule, parts, spec, texts))
            objects.append(_binding("ValidatingAdmissionPolicy", name, rule, ["Deny"]))
    else:  # warn: what the rule would do, as warnings, and its own warnings
        warnings = [("would ", e) for e in parts.effects]
        warnings += [("would deny: ", d) for d in parts.denials]
        warnings += [("", w) for w in parts.warnings]
    if warnings:
        own, validations = _warning_validations(rule, warnings)
        with_warnings = dataclasses.replace(parts, variables=[*parts.variables, *own])
        texts = [v["messageExpression"] for v in validations]
        objects.append(_policy("ValidatingAdmissionPolicy", f"{name}-warnings", rule,
                               with_warnings, {"validations": validations}, texts))
        objects.append(_binding("ValidatingAdmissionPolicy", f"{name}-warnings", rule, ["Warn"]))
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
            parts = exporter(rule)
        except _Unsupported as exc:
            left_out.append(LeftOut(rule.name, f"the whole rule: {exc}"))
            continue
        objects += _rule_objects(rule, parts)
        left_out += [LeftOut(rule.name, what, warning) for what, warning in parts.left_out]
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
