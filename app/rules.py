"""Owns the rule kinds: what each rule wants done to an object, said through the edit API.

A rule is pure: it reads the request, asks the context for its namespace's labels (the lookup is
injected, so no rule touches the network) and edits through :class:`~app.patching.ObjectEditor`.
It returns a :class:`RuleResult`: the denial messages and warnings it has; its edits are in the
editor.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Mapping, Protocol

from .config import Settings
from .patching import ObjectEditor, ObjectShapeError, Path, describe, expect_list, expect_map, lookup
from .review import AdmissionRequest

# The annotation the kubelet puts on the API mirror of a static pod; such pods are never
# scheduled and never edited (admission plugins leave them alone as well).
MIRROR_POD_ANNOTATION = "kubernetes.io/config.mirror"


@dataclass(frozen=True, slots=True)
class RuleResult:
    denials: tuple[str, ...] = ()
    warnings: tuple[str, ...] = ()


NOTHING = RuleResult()


class RuleContext:
    """What a rule may know about a request: the request itself and its namespace's labels."""

    __slots__ = ("request", "_lookup", "_labels")

    def __init__(self, request: AdmissionRequest,
                 namespace_labels: Callable[[str], Mapping[str, str] | None]):
        self.request = request
        self._lookup = namespace_labels
        self._labels: dict[str, Mapping[str, str]] = {}

    @property
    def namespace(self) -> str:
        """The request's namespace, or the object's when the request leaves it out."""
        if self.request.namespace:
            return self.request.namespace
        meta = lookup(self.request.object, ("metadata",), {})
        value = meta.get("namespace") if isinstance(meta, dict) else None
        return value if isinstance(value, str) else ""

    def namespace_labels(self, name: str) -> Mapping[str, str]:
        """Labels of namespace ``name`` ({} when it does not exist); looked up once per request."""
        if name not in self._labels:
            self._labels[name] = self._lookup(name) or {}
        return self._labels[name]


class Rule(Protocol):
    name: str

    def evaluate(self, ctx: RuleContext, editor: ObjectEditor) -> RuleResult: ...


# Where each kind the pool rule handles keeps its pod spec: (API group, kind) -> path.
POD_SPEC_PATHS: dict[tuple[str, str], Path] = {
    ("", "Pod"): ("spec",),
    ("apps", "DaemonSet"): ("spec", "template", "spec"),
}


@dataclass(frozen=True)
class PoolPlacement:
    """Pins pods (and DaemonSet pod templates) to the node pool named by their namespace's label.

    Pod CREATE, DaemonSet CREATE/UPDATE: add ``nodeSelector[node_label_key] = pool`` when absent;
    deny a different value, a required node affinity no node of the pool can satisfy, and
    ``spec.nodeName`` (it bypasses the scheduler). Pod UPDATE: only a change of the pool key is
    judged, as on CREATE. Mirror pods and excluded or unpooled namespaces are left alone.
    """

    name: str = "agentpool-node-selector"
    namespace_label_key: str = "agentpool"
    node_label_key: str = "agentpool"
    default_pool: str | None = None
    excluded_namespaces: frozenset[str] = field(default_factory=frozenset)

    def evaluate(self, ctx: RuleContext, editor: ObjectEditor) -> RuleResult:
        request = ctx.request
        spec_path = POD_SPEC_PATHS.get((request.kind.group, request.kind.kind))
        if spec_path is None or request.sub_resource or request.operation not in ("CREATE", "UPDATE"):
            return NOTHING
        namespace = ctx.namespace
        if namespace in self.excluded_namespaces:
            return NOTHING
        obj = editor.current
        is_pod = request.kind.kind == "Pod"
        if is_pod and MIRROR_POD_ANNOTATION in expect_map(obj, ("metadata", "annotations")):
            return NOTHING
        selector_path = (*spec_path, "nodeSelector")
        key_path = (*selector_path, self.node_label_key)
        value = expect_map(obj, selector_path).get(self.node_label_key)
        if is_pod and request.operation == "UPDATE":
            old_value = expect_map(request.old_object, selector_path).get(self.node_label_key)
            if value == old_value:
                return NOTHING  # only a change of the pool key is judged on UPDATE
        labels = ctx.namespace_labels(namespace)
        pool = labels.get(self.namespace_label_key) or self.default_pool
        if not pool:
            return NOTHING
        where = self._where(namespace, pool, labels)
        what = "pod" if is_pod else "DaemonSet pod template"
        denials = []
        if value is not None and value != pool:
            denials.append(
                f"{what} {describe(key_path)} is {_quote(value)}, but {where}. Remove that "
                f"nodeSelector key (poolkeeper sets it) or set it to {_quote(pool)}; to run on "
                f"pool {_quote(value)}, use a namespace labelled "
                f"{self.namespace_label_key}={value}")
        node_name = expect_map(obj, spec_path).get("nodeName")
        if node_name and (request.operation == "CREATE" or not is_pod):
            denials.append(
                f"{what} sets {describe((*spec_path, 'nodeName'))}={_quote(node_name)}, which "
                f"bypasses the scheduler and so the node pool; {where}. Remove nodeName and let "
                f"the scheduler place it on pool {_quote(pool)}")
        affinity_problem = self._affinity_problem(obj, spec_path, pool)
        if affinity_problem:
            denials.append(f"{what} {affinity_problem}, but {where}, so it could never be "
                           f"scheduled. Allow {self.node_label_key}={pool} in at least one "
                           "term, or drop the term")
        if denials:
            return RuleResult(denials=tuple(f"[{self.name}] {d}" for d in denials))
        if value is None:
            editor.set(key_path, pool)
        return NOTHING

    def _where(self, namespace: str, pool: str, labels: Mapping[str, str]) -> str:
        if labels.get(self.namespace_label_key):
            return (f"namespace {_quote(namespace)} is pinned to node pool {_quote(pool)} "
                    f"(namespace label {self.namespace_label_key}={pool})")
        return (f"namespace {_quote(namespace)} has no {self.namespace_label_key} label and "
                f"gets the default node pool {_quote(pool)}")

    def _affinity_problem(self, obj: dict, spec_path: Path, pool: str) -> str | None:
        terms_path = (*spec_path, "affinity", "nodeAffinity",
                      "requiredDuringSchedulingIgnoredDuringExecution", "nodeSelectorTerms")
        terms = expect_list(obj, terms_path)
        if not terms or any(self._term_admits(term, pool) for term in terms):
            return None
        return (f"requires node affinity ({describe(terms_path)}) that no node with "
                f"{self.node_label_key}={pool} can satisfy")

    def _term_admits(self, term: object, pool: str) -> bool:
        """Whether a node labelled node_label_key=pool can satisfy this nodeSelectorTerm.

        Terms are ORed, requirements within a term ANDed; an empty term matches no node
        (core/v1 NodeSelectorTerm). Requirements on other keys and matchFields are assumed
        satisfiable: poolkeeper only knows the pool key.
        """
        if not isinstance(term, dict):
            raise ObjectShapeError("each nodeSelectorTerm must be an object")
        expressions = term.get("matchExpressions") or []
        if not expressions and not term.get("matchFields"):
            return False
        if not isinstance(expressions, list) or not all(isinstance(e, dict) for e in expressions):
            raise ObjectShapeError("nodeSelectorTerm matchExpressions must be a list of objects")
        return all(_requirement_admits(e, pool) for e in expressions
                   if e.get("key") == self.node_label_key)


def _requirement_admits(requirement: dict, value: str) -> bool:
    operator = requirement.get("operator")
    values = requirement.get("values") or []
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


def _quote(value: object) -> str:
    return f'"{value}"' if isinstance(value, str) else repr(value)


def build_rules(settings: Settings) -> tuple[Rule, ...]:
    """The rule set the settings ask for."""
    return (PoolPlacement(namespace_label_key=settings.namespace_label_key,
                          node_label_key=settings.node_label_key,
                          default_pool=settings.default_pool,
                          excluded_namespaces=frozenset(settings.excluded_namespaces)),)
