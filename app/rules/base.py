"""Owns what every rule shares: the context a rule sees, its result, match and label selectors.

A rule kind is pure: it reads the request, asks the context for namespaces (labels and the
annotations the sources keep) and node pools (the lookups are injected, so no rule touches the
network) and edits through :class:`~app.patching.ObjectEditor`.
It returns a :class:`RuleResult`: what it changed, in words (``effects``), its denials and its
warnings. The engine (:mod:`app.admission`) applies the rule's enforcement to that result.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from ..kinds import OBJECT_KINDS
from ..namespaces.source import Namespace
from ..patching import ObjectEditor, ObjectShapeError, Path, expect_list, lookup
from ..review import AdmissionRequest
from ..text import quote

# Looks a namespace up by name: its record, or just its labels (label-only callers and tests pass
# a dict's get); None when it does not exist. Raises NamespaceLookupError when it cannot be known.
NamespaceLookup = Callable[[str], Namespace | Mapping[str, str] | None]
# The node pools of a node label key: how many nodes carry each value of it (nodes without the
# key are not counted); None when the nodes cannot be known now.
NodeLookup = Callable[[str], Mapping[str, int] | None]


@dataclass(frozen=True, slots=True)
class RuleResult:
    # what the rule changed, e.g. "set imagePullPolicy=Always on 2 containers"
    effects: tuple[str, ...] = ()
    denials: tuple[str, ...] = ()
    warnings: tuple[str, ...] = ()
    # auditAnnotations for the audit log, e.g. {"pool": "pool1"}; sent when the request is patched
    audit: tuple[tuple[str, str], ...] = ()


NOTHING = RuleResult()


class RuleContext:
    """What a rule may know about a request: the request, its namespaces, and the node pools
    (``nodes``: None when no node source is wired, e.g. offline without a cluster)."""

    __slots__ = ("request", "_lookup", "looked_up", "nodes")

    def __init__(self, request: AdmissionRequest, namespaces: NamespaceLookup,
                 looked_up: dict[str, Namespace | None] | None = None,
                 nodes: NodeLookup | None = None):
        self.request = request
        self._lookup = namespaces
        # name -> namespace, or None when it does not exist: what the rules asked for (shared by
        # the contexts of one request)
        self.looked_up: dict[str, Namespace | None] = {} if looked_up is None else looked_up
        self.nodes = nodes

    @property
    def namespace(self) -> str:
        """The request's namespace, or the object's when the request leaves it out."""
        if self.request.namespace:
            return self.request.namespace
        meta = lookup(self.request.object, ("metadata",), {})
        value = meta.get("namespace") if isinstance(meta, dict) else None
        return value if isinstance(value, str) else ""

    def find_namespace(self, name: str) -> Namespace | None:
        """Namespace ``name`` (None when it does not exist); looked up once per request."""
        if name not in self.looked_up:
            found = self._lookup(name)
            self.looked_up[name] = found if found is None or isinstance(found, Namespace) \
                else Namespace(found)
        return self.looked_up[name]

    def namespace_labels(self, name: str) -> Mapping[str, str]:
        """Labels of namespace ``name`` ({} when it does not exist)."""
        namespace = self.find_namespace(name)
        return {} if namespace is None else namespace.labels


@dataclass(frozen=True, slots=True)
class Param:
    """One setting of a rule kind: its default and a check that returns a problem or None."""

    default: Any
    check: Callable[[Any], str | None]


class Policy(Protocol):
    """What a rule file's ``kind:`` names: a class built from the file's validated params,
    evaluated once per matching request. ``KIND_NAME`` is that ``kind:`` value."""

    KIND_NAME: str
    OBJECT_KINDS: tuple[str, ...]  # the object kinds it can act on (app.kinds)
    OPERATIONS: tuple[str, ...]
    PARAMS: dict[str, Param]
    # What a pod controller's template gets from a rule of this kind: "judge" (the kind judges
    # templates itself, its OBJECT_KINDS name the controllers), "warn" (the engine runs the pod
    # rule on the template as on a pod, changes nothing and, with the rule's templateWarnings,
    # warns what the pods will get) or "none".
    ON_TEMPLATES: str

    def evaluate(self, ctx: RuleContext, editor: ObjectEditor) -> RuleResult: ...


def pod_containers(pod: Any) -> Iterator[tuple[Path, dict[str, Any]]]:
    """(path, container) for every init container and container of a pod."""
    for field in ("initContainers", "containers"):
        for index, container in enumerate(expect_list(pod, ("spec", field))):
            if isinstance(container, dict):
                yield ("spec", field, index), container


@dataclass(frozen=True)
class Requirement:
    key: str
    operator: str  # In, NotIn, Exists, DoesNotExist
    values: frozenset[str] = frozenset()

    def matches(self, labels: Mapping[str, str]) -> bool:
        if self.operator == "Exists":
            return self.key in labels
        if self.operator == "DoesNotExist":
            return self.key not in labels
        value = labels.get(self.key)
        if value is not None and not isinstance(value, str):  # a forged object's label
            raise ObjectShapeError(f"label {quote(self.key)} must be a string, not {quote(value)}")
        if self.operator == "In":
            return value in self.values
        return value not in self.values  # NotIn: also true when the key is absent


@dataclass(frozen=True)
class LabelSelector:
    """metav1.LabelSelector: matchLabels and matchExpressions, all ANDed; empty matches all."""

    requirements: tuple[Requirement, ...] = ()

    def matches(self, labels: Mapping[str, str]) -> bool:
        return all(r.matches(labels) for r in self.requirements)


@dataclass(frozen=True)
class Match:
    kinds: frozenset[tuple[str, str]]  # (API group, kind)
    operations: frozenset[str]
    namespace_selector: LabelSelector | None = None
    object_selector: LabelSelector | None = None
    excluded_namespaces: frozenset[str] = frozenset()

    def matches(self, ctx: RuleContext) -> bool:
        request = ctx.request
        if request.sub_resource or request.operation not in self.operations:
            return False
        if (request.gvk.group, request.gvk.kind) not in self.kinds:
            return False
        obj = request.object or {}
        kind = OBJECT_KINDS.get(request.gvk.kind)
        cluster_scoped = kind is not None and kind.cluster_scoped
        # A Namespace is judged by its own name and labels, as the API server's
        # namespaceSelector does for namespace objects.
        namespace = (request.name or _name(obj)) if cluster_scoped else ctx.namespace
        if namespace in self.excluded_namespaces:
            return False
        if self.object_selector and not self.object_selector.matches(_labels(obj)):
            return False
        if self.namespace_selector:
            labels = _labels(obj) if cluster_scoped else ctx.namespace_labels(namespace)
            if not self.namespace_selector.matches(labels):
                return False
        return True


def _name(obj: Mapping) -> str:
    name = lookup(obj, ("metadata", "name"), "")
    return name if isinstance(name, str) else ""


def _labels(obj: Mapping) -> Mapping[str, str]:
    labels = lookup(obj, ("metadata", "labels"), {})
    return labels if isinstance(labels, dict) else {}


@dataclass(frozen=True)
class Rule:
    """A loaded rule: its file's metadata around a rule kind instance."""

    name: str
    description: str
    kind_name: str  # the file's kind:, e.g. PoolPlacement
    match: Match
    policy: Policy
    enforcement: str = "enforce"  # enforce | warn | off
    webhook: str = "defaults"  # placement | defaults | namespaces (loader.PATHS: who serves it)
    # a pod rule on a pod controller: warn what its pods will get (Policy.ON_TEMPLATES "warn")
    template_warnings: bool = True
    docs_url: str | None = None  # appended to its denials and warnings: "See <url>"
    on_error: str = "ignore"  # ignore | fail: when it raises, skip it or fail the request
