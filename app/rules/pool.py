"""Owns the pool rule kind: pins pods (and DaemonSet templates) to their namespace's node pool,
and judges every pod controller's template at apply time."""

from __future__ import annotations

from collections.abc import Mapping

from ..kinds import POD_CONTROLLERS, pod_spec_path
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
from .params import is_label_value, label_key, optional_label_value

# The annotation the kubelet puts on the API mirror of a static pod; such pods are never
# scheduled and never edited (admission plugins leave them alone as well).
MIRROR_POD_ANNOTATION = "kubernetes.io/config.mirror"


# Templates poolkeeper pins (patches): a DaemonSet's controller targets nodes from its template.
# Other controllers' templates are judged but never patched: a GitOps tool (Argo CD, Flux) would
# see the live object drift from Git forever; their pods are pinned when created.
PINNED_TEMPLATES = ("DaemonSet",)


class PoolPlacement:
    """Pins pods (and DaemonSet pod templates) to the node pool named by their namespace's label.

    Pod CREATE: add ``nodeSelector[nodeLabelKey] = pool`` when absent; deny a different value, a
    required node affinity no node of the pool can satisfy, and ``spec.nodeName`` (it bypasses
    the scheduler). Pod UPDATE: a change of the pool key is judged as on CREATE; while the old
    pod has scheduling gates (the only time the API server lets placement change) a change of
    its required node affinity is judged too, and a missing pool key is added. Pod controllers
    (app.kinds.POD_CONTROLLERS), CREATE and UPDATE: their pod template is judged as a pod would
    be, so a misplaced Deployment fails at apply time; only DaemonSet templates are patched; an
    UPDATE that leaves the template's placement alone is not judged again. Mirror pods and
    unpooled namespaces are left alone.
    """

    KIND_NAME = "PoolPlacement"
    OBJECT_KINDS: tuple[str, ...] = ("Pod", *POD_CONTROLLERS)
    OPERATIONS: tuple[str, ...] = ("CREATE", "UPDATE")
    ON_TEMPLATES = "judge"  # judges pod templates itself (app.admission)
    PARAMS = {
        # namespace label naming the pool
        "namespaceLabelKey": Param("agentpool", label_key),
        # node label key set in nodeSelector (e.g. kubernetes.azure.com/agentpool)
        "nodeLabelKey": Param("agentpool", label_key),
        # pool for namespaces without the label; null leaves them alone
        "defaultPool": Param(None, optional_label_value),
    }

    def __init__(self, namespaceLabelKey: str = "agentpool", nodeLabelKey: str = "agentpool",
                 defaultPool: str | None = None):
        self.namespace_label_key = namespaceLabelKey
        self.node_label_key = nodeLabelKey
        self.default_pool = defaultPool

    def evaluate(self, ctx: RuleContext, editor: ObjectEditor) -> RuleResult:
        request = ctx.request
        kind = request.gvk.kind
        spec_path = pod_spec_path(request.gvk.group, kind)
        if spec_path is None:  # pragma: no cover - match.kinds admits only OBJECT_KINDS
            return NOTHING
        obj, old = editor.current, request.old_object
        is_pod = kind == "Pod"
        if is_pod and MIRROR_POD_ANNOTATION in expect_map(obj, ("metadata", "annotations")):
            return NOTHING
        selector_path = (*spec_path, "nodeSelector")
        key_path = (*selector_path, self.node_label_key)
        value = _string_or_none(expect_map(obj, selector_path).get(self.node_label_key), key_path)
        update = request.operation == "UPDATE" and old is not None
        old_value = _string_or_none(expect_map(old, selector_path).get(self.node_label_key),
                                    key_path) if update else None
        terms_path = (*spec_path, "affinity", "nodeAffinity",
                      "requiredDuringSchedulingIgnoredDuringExecution", "nodeSelectorTerms")
        node_name_path = (*spec_path, "nodeName")
        gated = is_pod and update and bool(expect_list(old, (*spec_path, "schedulingGates")))
        if update and kind not in PINNED_TEMPLATES and not gated:
            if value == old_value and (is_pod or self._same_placement(obj, old, terms_path,
                                                                      node_name_path)):
                return NOTHING  # only a change of placement is judged on UPDATE
        labels = ctx.namespace_labels(ctx.namespace)
        pool = labels.get(self.namespace_label_key) or self.default_pool
        if not pool:
            return NOTHING
        where = self._where(ctx.namespace, pool, labels)
        what = "pod" if is_pod else f"{kind} pod template"
        denials = []
        # On a pod UPDATE only a key that changes is judged: one set before the namespace was
        # pooled stays (the policy backstop does the same).
        if value is not None and value != pool and not (is_pod and update and value == old_value):
            elsewhere = (f"to run on pool {quote(value)}, use a namespace labelled "
                         f"{self.namespace_label_key}={value}" if is_label_value(value) else
                         f"{quote(value)} is not a node pool name (a label value)")
            denials.append(
                f"{what} {describe(key_path)} is {quote(value)}, but {where}. Remove that "
                f"nodeSelector key (poolkeeper sets it) or set it to {quote(pool)}; {elsewhere}")
        node_name = _string_or_none(expect_map(obj, spec_path).get("nodeName"), node_name_path)
        if node_name and not (is_pod and update):
            denials.append(
                f"{what} sets {describe(node_name_path)}={quote(node_name)}, which bypasses the "
                f"scheduler and so the node pool; {where}. Remove nodeName and let the "
                f"scheduler place it on pool {quote(pool)}")
        if not (is_pod and update) or expect_list(obj, terms_path) != expect_list(old, terms_path):
            affinity_problem = self._affinity_problem(obj, terms_path, pool)
            if affinity_problem:
                denials.append(f"{what} {affinity_problem}, but {where}, so it could never be "
                               f"scheduled. Allow {self.node_label_key}={pool} in at least one "
                               "term, or drop the term")
        if denials:
            return RuleResult(denials=tuple(denials))
        audit = (("pool", pool),)
        if value is None and (is_pod or kind in PINNED_TEMPLATES) and editor.set(key_path, pool):
            return RuleResult(effects=(f"set nodeSelector {self.node_label_key}={pool}",),
                              audit=audit)
        return RuleResult(audit=audit)

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

    def _affinity_problem(self, obj: dict, terms_path: Path, pool: str) -> str | None:
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
