"""Owns the pool rule kind: pins pods (and DaemonSet templates) to their namespace's node pool,
and judges every pod controller's template at apply time."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ..kinds import POD_CONTROLLERS, pod_spec_path
from ..namespaces.source import Namespace
from ..patching import (
    ObjectEditor,
    ObjectShapeError,
    Path,
    describe,
    expect_list,
    expect_map,
    lookup,
)
from ..text import quote
from .base import NOTHING, Param, RuleContext, RuleResult
from .params import (
    ParamError,
    boolean,
    is_label_value,
    label_key,
    one_of,
    optional_kept_annotation,
    optional_label_value,
    pool_map,
)

# The annotation the kubelet puts on the API mirror of a static pod; such pods are never
# scheduled and never edited (admission plugins leave them alone as well).
MIRROR_POD_ANNOTATION = "kubernetes.io/config.mirror"
# The namespace annotation naming further pools its pods may choose (allowedPoolsAnnotation).
ALLOWED_POOLS = "poolkeeper.io/allowed-pools"


# Templates poolkeeper pins (patches): a DaemonSet's controller targets nodes from its template.
# Other controllers' templates are judged but never patched: a GitOps tool (Argo CD, Flux) would
# see the live object drift from Git forever; their pods are pinned when created.
PINNED_TEMPLATES = ("DaemonSet",)


@dataclass(frozen=True, slots=True)
class Pool:
    """What pinning a pod to a pool means beyond the pool key (``params.pools.<pool>``)."""

    tolerations: tuple[dict[str, Any], ...] = ()
    node_labels: Mapping[str, str] = field(default_factory=dict)


_PLAIN = Pool()  # a pool the rule does not list: only the pool key
# At most this many of a namespace's allowed pools are named in a message.
_NAMED_POOLS = 5


class PoolPlacement:
    """Pins pods (and DaemonSet pod templates) to the node pool named by their namespace's label.

    Pod CREATE: add ``nodeSelector[nodeLabelKey] = pool`` when absent, with the pool's
    ``nodeLabels`` and ``tolerations`` (``pools``); deny a different value (unless the
    namespace's ``allowedPoolsAnnotation`` names it: the pod keeps that pool, and gets its
    labels and tolerations), a different value of one of the pool's node labels, a required node
    affinity no node of the pool can satisfy, and ``spec.nodeName`` (it bypasses the scheduler).
    Pod UPDATE: a change of those keys is judged as on CREATE; while the old pod has scheduling
    gates (the only time the API server lets placement change) a change of its required node
    affinity is judged too, and what is missing is added. Pod controllers
    (app.kinds.POD_CONTROLLERS), CREATE and UPDATE: their pod template is judged as a pod would
    be, so a misplaced Deployment fails at apply time; only DaemonSet templates are patched; an
    UPDATE that leaves the template's placement alone is not judged again. Mirror pods, unpooled
    namespaces and namespaces whose pool label is empty (opted out) are left alone.

    Namespace CREATE and UPDATE (served on the namespaces webhook, see app.rules.loader): a pool
    label set or changed to a pool no node carries (or, with ``onlyListedPools``, one missing
    from ``pools``) gets a warning, or a denial (``unknownPools``).
    """

    KIND_NAME = "PoolPlacement"
    OBJECT_KINDS: tuple[str, ...] = ("Pod", *POD_CONTROLLERS, "Namespace")
    OPERATIONS: tuple[str, ...] = ("CREATE", "UPDATE")
    ON_TEMPLATES = "judge"  # judges pod templates itself (app.admission)
    PARAMS = {
        # namespace label naming the pool; present but empty: the namespace opts out
        "namespaceLabelKey": Param("agentpool", label_key),
        # node label key set in nodeSelector (e.g. kubernetes.azure.com/agentpool)
        "nodeLabelKey": Param("agentpool", label_key),
        # pool for namespaces without the label; null leaves them alone
        "defaultPool": Param(None, optional_label_value),
        # pool -> {tolerations: [...], nodeLabels: {...}} its pods get; other pools get the key
        "pools": Param({}, pool_map),
        # namespace annotation naming further pools ("gpu,shared") its pods may choose; null: off
        "allowedPoolsAnnotation": Param(ALLOWED_POOLS, optional_kept_annotation),
        # a namespace labelled with a pool no node carries: warn, deny or off
        "unknownPools": Param("warn", one_of("warn", "deny", "off")),
        # pools: lists every pool, so a namespace label naming another is unknown too
        "onlyListedPools": Param(False, boolean),
    }

    def __init__(self, namespaceLabelKey: str = "agentpool", nodeLabelKey: str = "agentpool",
                 defaultPool: str | None = None, pools: Mapping[str, Any] | None = None,
                 allowedPoolsAnnotation: str | None = ALLOWED_POOLS,
                 unknownPools: str = "warn", onlyListedPools: bool = False):
        self.namespace_label_key = namespaceLabelKey
        self.node_label_key = nodeLabelKey
        self.default_pool = defaultPool
        self.pools = {name: Pool(tuple(dict(t) for t in (spec or {}).get("tolerations") or ()),
                                 dict((spec or {}).get("nodeLabels") or {}))
                      for name, spec in (pools or {}).items()}
        self.allowed_pools_annotation = allowedPoolsAnnotation
        self.unknown_pools = unknownPools
        self.only_listed_pools = onlyListedPools
        for name, pool in self.pools.items():
            if nodeLabelKey in pool.node_labels:
                raise ParamError("pools", f"{name}.nodeLabels: {nodeLabelKey!r} is nodeLabelKey, "
                                          "which poolkeeper sets to the pool's name")
        if onlyListedPools and not self.pools:
            raise ParamError("onlyListedPools", "true needs the pools listed in pools")
        if onlyListedPools and defaultPool is not None and defaultPool not in self.pools:
            raise ParamError("defaultPool", f"{defaultPool!r} is not in pools, and "
                                            "onlyListedPools is true")
        # the nodeSelector keys the rule sets: an UPDATE that changes none of them (nor the
        # affinity or nodeName) is not judged again
        self._selector_keys = tuple(dict.fromkeys(
            [nodeLabelKey, *(k for pool in self.pools.values() for k in pool.node_labels)]))

    def evaluate(self, ctx: RuleContext, editor: ObjectEditor) -> RuleResult:
        request = ctx.request
        kind = request.gvk.kind
        if kind == "Namespace":
            return self._judge_namespace(ctx)
        spec_path = pod_spec_path(request.gvk.group, kind)
        if spec_path is None:  # pragma: no cover - match.kinds admits only OBJECT_KINDS
            return NOTHING
        obj, old = editor.current, request.old_object
        is_pod = kind == "Pod"
        if is_pod and MIRROR_POD_ANNOTATION in expect_map(obj, ("metadata", "annotations")):
            return NOTHING
        selector_path = (*spec_path, "nodeSelector")
        key_path = (*selector_path, self.node_label_key)
        selector = expect_map(obj, selector_path)
        value = _string_or_none(selector.get(self.node_label_key), key_path)
        update = request.operation == "UPDATE" and old is not None
        old_selector = expect_map(old, selector_path) if update else {}
        old_value = _string_or_none(old_selector.get(self.node_label_key), key_path)
        terms_path = (*spec_path, "affinity", "nodeAffinity",
                      "requiredDuringSchedulingIgnoredDuringExecution", "nodeSelectorTerms")
        node_name_path = (*spec_path, "nodeName")
        gated = is_pod and update and bool(expect_list(old, (*spec_path, "schedulingGates")))
        if update and kind not in PINNED_TEMPLATES and not gated and all(
                selector.get(k) == old_selector.get(k) for k in self._selector_keys):
            if is_pod or self._same_placement(obj, old, terms_path, node_name_path):
                return NOTHING  # only a change of placement is judged on UPDATE
        namespace = ctx.find_namespace(ctx.namespace)
        labels = namespace.labels if namespace is not None else {}
        pool = self.pool_of(labels)
        if pool is None:
            return NOTHING  # unpooled, or opted out with an empty label
        allowed = self.allowed_pools(namespace, pool)
        chosen = value if value is not None and value in allowed else pool
        spec = self.pools.get(chosen, _PLAIN)

        def where() -> str:  # worded only for a denial: most pods are pinned and allowed
            return self._where(ctx.namespace, pool, labels)

        what = "pod" if is_pod else f"{kind} pod template"
        # On a pod UPDATE only a key that changes is judged: one set before the namespace was
        # pooled stays (the policy backstop does the same).
        kept = is_pod and update
        denials = []
        if value is not None and value != chosen and not (kept and value == old_value):
            elsewhere = (f"to run on pool {quote(value)}, use a namespace labelled "
                         f"{self.namespace_label_key}={value}" if is_label_value(value) else
                         f"{quote(value)} is not a node pool name (a label value)")
            denials.append(
                f"{what} {describe(key_path)} is {quote(value)}, but {where()}. Remove that "
                f"nodeSelector key (poolkeeper sets it) or set it to {quote(pool)}"
                f"{self._naming(allowed)}; {elsewhere}")
        for key, wanted in spec.node_labels.items():
            path = (*selector_path, key)
            have = _string_or_none(selector.get(key), path)
            if have is not None and have != wanted and not (
                    kept and have == _string_or_none(old_selector.get(key), path)):
                denials.append(
                    f"{what} {describe(path)} is {quote(have)}, but the nodes of pool "
                    f"{quote(chosen)} carry {key}={wanted} (this rule's pools); {where()}. "
                    f"Remove that nodeSelector key (poolkeeper sets it) or set it to "
                    f"{quote(wanted)}")
        node_name = _string_or_none(expect_map(obj, spec_path).get("nodeName"), node_name_path)
        if node_name and not kept:
            denials.append(
                f"{what} sets {describe(node_name_path)}={quote(node_name)}, which bypasses the "
                f"scheduler and so the node pool; {where()}. Remove nodeName and let the "
                f"scheduler place it on pool {quote(pool)}")
        node_labels = {self.node_label_key: chosen, **spec.node_labels}
        if not kept or expect_list(obj, terms_path) != expect_list(old, terms_path):
            affinity_problem = self._affinity_problem(obj, terms_path, node_labels)
            if affinity_problem:
                wanted_labels = ", ".join(f"{k}={v}" for k, v in node_labels.items())
                denials.append(f"{what} {affinity_problem}, but {where()}, so it could never be "
                               f"scheduled. Allow {wanted_labels} in at least one term, or drop "
                               "the term")
        if denials:
            return RuleResult(denials=tuple(denials))
        audit = (("pool", chosen),)
        if not (is_pod or kind in PINNED_TEMPLATES) or (value is not None and value != chosen):
            # a template judged only, or a pod keeping the key it had before pooling
            return RuleResult(audit=audit)
        added = [f"{key}={wanted}" for key, wanted in node_labels.items()
                 if selector.get(key) is None and editor.set((*selector_path, key), wanted)]
        effects = [f"set nodeSelector {', '.join(added)}"] if added else []
        tolerations_path = (*spec_path, "tolerations")
        tolerated = [_identity(t, tolerations_path) for t in expect_list(obj, tolerations_path)]
        new = [t for t in spec.tolerations if _identity(t, tolerations_path) not in tolerated]
        for item in new:
            editor.append(tolerations_path, dict(item))
        if new:
            effects.append(f"add toleration{'s' if len(new) > 1 else ''} "
                           f"{', '.join(describe_toleration(t) for t in new)}")
        return RuleResult(effects=tuple(effects), audit=audit)

    def _judge_namespace(self, ctx: RuleContext) -> RuleResult:
        """A Namespace whose pool label is set or changed to a pool that has no nodes (or is
        not listed, with onlyListedPools): a warning, or a denial (unknownPools)."""
        if self.unknown_pools == "off":
            return NOTHING
        request = ctx.request
        path = ("metadata", "labels", self.namespace_label_key)
        pool = _string_or_none(expect_map(request.object, path[:-1]).get(path[-1]), path)
        if not pool or not is_label_value(pool):
            return NOTHING  # no pool, opted out, or a value the API server refuses anyway
        if request.operation == "UPDATE" and request.old_object is not None and pool == \
                _string_or_none(expect_map(request.old_object, path[:-1]).get(path[-1]), path):
            return NOTHING  # only setting or changing the pool is judged
        if self.only_listed_pools and pool not in self.pools:
            problem = f"pool {pool} is not one of this rule's pools ({', '.join(self.pools)})"
        else:
            if ctx.nodes is None:
                return NOTHING  # no node source (offline without a cluster): nothing to check
            counts = ctx.nodes(self.node_label_key)
            if counts is None:
                return RuleResult(warnings=(f"cannot check that pool {pool} has nodes: the "
                                            "nodes are not known now",))
            if counts.get(pool):
                return NOTHING
            having = sorted(p for p, n in counts.items() if n)
            named = ", ".join(having[:_NAMED_POOLS]) + (", ..." if len(having) > _NAMED_POOLS
                                                        else "")
            problem = (f"no node has {self.node_label_key}={pool}: pods would stay Pending "
                       f"(pools with nodes: {named or 'none'})")
        if self.unknown_pools == "warn":
            return RuleResult(warnings=(problem,))
        name = request.name or lookup(request.object, ("metadata", "name"), "")
        return RuleResult(denials=(
            f"namespace {quote(name)}: {problem}. Label it with a pool that exists, or set the "
            "label empty to opt out of pools",))

    def pool_of(self, labels: Mapping[str, str]) -> str | None:
        """The pool of a namespace with these labels: its label, else the defaultPool; None when
        it has neither, or its label is empty (it opted out, even from a defaultPool)."""
        label = labels.get(self.namespace_label_key)
        return (label if label is not None else self.default_pool) or None

    def allowed_pools(self, namespace: Namespace | None, pool: str) -> tuple[str, ...]:
        """The pools a pod of the namespace may select: its own, then those its annotation
        names (comma-separated; names that are not label values are ignored)."""
        if namespace is None or self.allowed_pools_annotation is None:
            return (pool,)
        text = namespace.annotations.get(self.allowed_pools_annotation, "")
        extra = [p.strip() for p in text.split(",")]
        return tuple(dict.fromkeys([pool, *(p for p in extra if p and is_label_value(p))]))

    def _naming(self, allowed: tuple[str, ...]) -> str:
        """', or to one of ... (the pools its annotation X allows)' when there are such."""
        if len(allowed) < 2:
            return ""
        names = ", ".join(quote(p) for p in allowed[1:_NAMED_POOLS + 1])
        more = ", ..." if len(allowed) > _NAMED_POOLS + 1 else ""
        return (f" or to one of {names}{more} (the pools its annotation "
                f"{self.allowed_pools_annotation} allows)")

    @staticmethod
    def _same_placement(obj: object, old: object, terms_path: Path, node_name_path: Path) -> bool:
        """Whether an UPDATE leaves a template's affinity and nodeName as they were."""
        return (expect_list(obj, terms_path) == expect_list(old, terms_path)
                and lookup(obj, node_name_path) == lookup(old, node_name_path))

    def _where(self, namespace: str, pool: str, labels: Mapping[str, str]) -> str:
        if labels.get(self.namespace_label_key):
            return (f"namespace {quote(namespace)} is pinned to node pool {quote(pool)} "
                    f"(namespace label {self.namespace_label_key}={pool})")
        return (f"namespace {quote(namespace)} has no {self.namespace_label_key} label and "
                f"gets the default node pool {quote(pool)}")

    def _affinity_problem(self, obj: dict, terms_path: Path,
                          node_labels: Mapping[str, str]) -> str | None:
        terms = expect_list(obj, terms_path)
        if not terms or any(_term_admits(term, node_labels) for term in terms):
            return None
        wanted = ", ".join(f"{k}={v}" for k, v in node_labels.items())
        return (f"requires node affinity ({describe(terms_path)}) that no node with "
                f"{wanted} can satisfy")


def _term_admits(term: object, node_labels: Mapping[str, str]) -> bool:
    """Whether a node with ``node_labels`` (the pool key and the pool's nodeLabels) can satisfy
    this nodeSelectorTerm.

    Terms are ORed, requirements within a term ANDed; an empty term matches no node
    (core/v1 NodeSelectorTerm). Requirements on other keys and matchFields are assumed
    satisfiable: poolkeeper only knows the pool's labels.
    """
    if not isinstance(term, dict):
        raise ObjectShapeError("each nodeSelectorTerm must be an object")
    expressions = term.get("matchExpressions") or []
    if not expressions and not term.get("matchFields"):
        return False
    if not isinstance(expressions, list) or not all(isinstance(e, dict) for e in expressions):
        raise ObjectShapeError("nodeSelectorTerm matchExpressions must be a list of objects")
    return all(_requirement_admits(e, node_labels[key]) for e in expressions
               if isinstance(key := e.get("key"), str) and key in node_labels)


def _identity(toleration: object, path: Path) -> tuple[str, str, str, str]:
    """What makes two tolerations the same: key, operator, value and effect, as the API server
    reads them (absent or null is "", an empty operator is Equal); tolerationSeconds aside."""
    if not isinstance(toleration, dict):
        raise ObjectShapeError(f"each of {describe(path)} must be an object")
    fields = [toleration.get(f) for f in ("key", "operator", "value", "effect")]
    if not all(f is None or isinstance(f, str) for f in fields):
        raise ObjectShapeError(f"the key, operator, value and effect of {describe(path)} must "
                               "be strings")
    key, operator, value, effect = (f or "" for f in fields)
    return (key, operator or "Equal", value, effect)


def describe_toleration(toleration: Mapping[str, Any]) -> str:
    """kubectl taint's form: key=value:Effect (Exists: key:Effect; no effect: every effect)."""
    key, operator, value, effect = _identity(toleration, ())
    text = (key or "every taint") if operator == "Exists" else f"{key}={value}"
    return f"{text}:{effect}" if effect else text


def _requirement_admits(requirement: dict, value: str) -> bool:
    operator = requirement.get("operator")
    values = requirement.get("values") or []
    if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
        raise ObjectShapeError("nodeSelectorRequirement values must be a list of strings")
    if operator == "In":
        return value in values
    if operator == "NotIn":
        return value not in values
    if operator == "Exists":
        return True
    if operator in ("Gt", "Lt"):
        try:
            have, bound = int(value), int(values[0])
        except (ValueError, IndexError, TypeError):
            return False
        return have > bound if operator == "Gt" else have < bound
    return False  # DoesNotExist, or an operator the API server would have rejected


def _string_or_none(value: object, path: Path) -> str | None:
    """A field the API server holds as a string (a nodeSelector value, nodeName)."""
    if value is None or isinstance(value, str):
        return value
    raise ObjectShapeError(f"{describe(path)} must be a string, not {quote(value)}")
