"""Owns the drift audit (``poolkeeper audit`` and its periodic in-cluster run): which running
pods and DaemonSets disagree with their namespace's pool today, one line per workload.

Admission only sees new objects: pods created before poolkeeper was installed, or before their
namespace was relabelled, stay where they are. The audit judges each pod with the PoolPlacement
rules of the rules directory (their ``match`` and params: namespaceLabelKey, nodeLabelKey,
defaultPool, excluded namespaces, the pools a namespace's allowedPoolsAnnotation allows; an
opted-out namespace, its pool label empty, is not audited; mirror pods and finished pods
skipped) and reports

* ``no-pool-key``: ``spec.nodeSelector`` lacks the node label key;
* ``other-pool-key``: it names another pool;
* ``node-in-other-pool``: the pod runs on a node whose pool label differs (when nodes are
  readable).

Pods are grouped under their controller (a ReplicaSet named ``<deployment>-<pod-template-hash>``
counts as its Deployment: from the ReplicaSet list when it is readable, else from the pod's
``pod-template-hash`` label), so a Deployment of 300 pods is one line, with the command that
fixes it. Lists are paged (``limit``/``continue``, :data:`PAGE_SIZE` per page) and each page is
judged and dropped before the next is read, so memory follows the drift, not the cluster.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import kubernetes.client
import orjson
import urllib3
import yaml

from .kube import json_body
from .namespaces.source import Namespace, kept_annotations
from .patching import escape
from .review import request_for
from .rules import MIRROR_POD_ANNOTATION, PoolPlacement, Rule, RuleContext
from .rules.base import NamespaceLookup
from .text import ECHO_LIMIT, clip, quote

log = logging.getLogger("poolkeeper.audit")

REASONS = ("no-pool-key", "other-pool-key", "node-in-other-pool")
PAGE_SIZE = 500  # objects per list request, as kubectl's --chunk-size
FINISHED_PHASES = ("Succeeded", "Failed")  # such pods run nowhere any more
_REQUEST_TIMEOUT = (5.0, 60.0)  # (connect, read) seconds of each page
_API_ERRORS = (kubernetes.client.ApiException, urllib3.exceptions.HTTPError, OSError, ValueError)

# a namespace's record (or just its labels), None when it is unknown
NamespaceLabels = NamespaceLookup
Progress = Callable[[int, int | None], None]  # (pods read so far, total if known)


class AuditError(Exception):
    """The audit cannot run (no pool rule, an unreadable file, the API server refused)."""


class AuditAborted(Exception):
    """The in-cluster audit was stopped between pages (this process is no longer the auditor)."""


def _map(value: Any) -> Mapping[str, Any]:
    return value if isinstance(value, dict) else {}


def _text(value: Any, limit: int = ECHO_LIMIT) -> str:
    """A value from an object, as echoed: a string cut after ``limit`` characters, anything
    else named by its JSON type (app.text)."""
    return clip(value, limit) if isinstance(value, str) else quote(value)


@dataclass
class Workload:
    """One drifting workload: a controller (or a bare pod) and what is wrong with its pods."""

    namespace: str
    kind: str  # Deployment, DaemonSet, StatefulSet, ReplicaSet, Job, ..., or Pod (no controller)
    name: str
    pool: str  # the pool its namespace asks for
    node_label_key: str
    reasons: set[str] = field(default_factory=set)
    pods: list[str] = field(default_factory=list)  # the drifting pods
    found: set[str] = field(default_factory=set)  # what was found instead, e.g. agentpool=pool1
    template_value: str | None = None  # DaemonSets: the pool key in the template, as read

    @property
    def ref(self) -> str:
        return f"{self.kind.lower()}/{self.name}"

    def fix_hint(self) -> str:
        """The command that puts the workload's pods on its pool."""
        ns = self.namespace
        if self.kind == "Pod":
            return f"kubectl delete pod {self.name} -n {ns}"  # a bare pod: create it again
        if self.kind == "DaemonSet" and self.template_value not in (None, self.pool):
            # An UPDATE naming another pool is denied: drop the key, poolkeeper sets the pool's
            path = f"/spec/template/spec/nodeSelector/{escape(self.node_label_key)}"
            return (f"kubectl patch daemonset/{self.name} -n {ns} --type=json "
                    f"-p '[{{\"op\":\"remove\",\"path\":\"{path}\"}}]'")
        if self.kind in ("Deployment", "DaemonSet", "StatefulSet"):
            return f"kubectl rollout restart {self.kind.lower()}/{self.name} -n {ns}"
        # ReplicaSets without a Deployment, Jobs, other controllers: they recreate deleted pods
        return f"kubectl delete pod -n {ns} {' '.join(sorted(self.pods))}".rstrip()

    def to_dict(self) -> dict[str, Any]:
        return {"namespace": self.namespace, "kind": self.kind, "name": self.name,
                "pool": self.pool, "reasons": [r for r in REASONS if r in self.reasons],
                "pods": len(self.pods), "examples": sorted(self.pods)[:3],
                "found": sorted(self.found), "fix": self.fix_hint()}


@dataclass
class AuditResult:
    workloads: list[Workload]
    pods_read: int  # every pod listed
    pods_checked: int  # pods in pooled namespaces that a pool rule matches
    daemonsets_checked: int
    namespaces: int  # pooled namespaces with a checked pod or DaemonSet
    nodes_checked: bool
    rules: list[str]
    notes: list[str]

    @property
    def drift(self) -> bool:
        return bool(self.workloads)

    def counts(self) -> dict[tuple[str, str], int]:
        """Drifting workloads by (namespace, reason); a workload counts under each reason."""
        counts: dict[tuple[str, str], int] = {}
        for workload in self.workloads:
            for reason in workload.reasons:
                key = (workload.namespace, reason)
                counts[key] = counts.get(key, 0) + 1
        return counts

    def to_dict(self) -> dict[str, Any]:
        return {"drift": [w.to_dict() for w in self.workloads],
                "checked": {"pods": self.pods_checked, "daemonSets": self.daemonsets_checked,
                            "namespaces": self.namespaces, "podsRead": self.pods_read},
                "nodesChecked": self.nodes_checked, "rules": self.rules, "notes": self.notes}


class Audit:
    """Judges objects one at a time and keeps only what drifts.

    Feed it ReplicaSets first (they name the Deployments), then DaemonSets and pods, in any
    number of pages; ``result()`` sorts what it found.
    """

    def __init__(self, rules: Iterable[Rule], namespace_labels: NamespaceLabels, *,
                 nodes: Mapping[str, Mapping[str, str]] | None = None) -> None:
        self.rules = [r for r in rules if isinstance(r.policy, PoolPlacement)
                      and r.enforcement != "off"]
        if not self.rules:
            raise AuditError("the rules hold no PoolPlacement rule that is not off: there is no "
                             "pool to audit against")
        self._lookup = namespace_labels
        self._namespaces: dict[str, Namespace | None] = {}
        self.nodes = nodes
        self.deployments: dict[tuple[str, str], str | None] | None = None  # RS -> Deployment
        self._workloads: dict[tuple[str, str, str], Workload] = {}
        self._templates: dict[tuple[str, str], str | None] = {}  # DaemonSet -> its pool key
        self.pods_read = self.pods_checked = self.daemonsets_checked = 0
        self._pooled: set[str] = set()
        self.unknown_namespaces: set[str] = set()
        self.notes: list[str] = []

    # -- input -----------------------------------------------------------------------------------

    def add_replicaset(self, replicaset: Mapping[str, Any]) -> None:
        if self.deployments is None:
            self.deployments = {}
        meta = _map(replicaset.get("metadata"))
        ref = _controller(meta)
        owner = ref.get("name") if ref.get("kind") == "Deployment" else None
        self.deployments[(str(meta.get("namespace", "")), str(meta.get("name", "")))] = \
            owner if isinstance(owner, str) else None

    def add_daemonset(self, daemonset: Mapping[str, Any]) -> None:
        meta = _map(daemonset.get("metadata"))
        namespace, name = str(meta.get("namespace") or ""), str(meta.get("name") or "")
        record = self._namespace(namespace)
        if record is None:
            return
        selector = _map(_map(_map(_map(daemonset.get("spec")).get("template")).get("spec"))
                        .get("nodeSelector"))
        for _rule, policy, pool in self._pools("apps/v1", "DaemonSet", meta, namespace, record):
            self.daemonsets_checked += 1
            value = selector.get(policy.node_label_key)
            self._templates[(namespace, name)] = value if isinstance(value, str) else None
            reasons, found = _selector_drift(value, policy.allowed_pools(record, pool),
                                             policy.node_label_key, "template ")
            workload = self._workload(namespace, "DaemonSet", name, pool, policy)
            workload.template_value = value if isinstance(value, str) else None
            if reasons:
                workload.reasons.update(reasons)
                workload.found.update(found)
            elif not workload.reasons:
                del self._workloads[(namespace, "DaemonSet", name)]  # clean so far
            break  # the first pool rule that matches decides, as in admission's one patch

    def add_pod(self, pod: Mapping[str, Any]) -> None:
        self.pods_read += 1
        meta = _map(pod.get("metadata"))
        if MIRROR_POD_ANNOTATION in _map(meta.get("annotations")):
            return  # the kubelet's mirror of a static pod: never scheduled, never edited
        if _map(pod.get("status")).get("phase") in FINISHED_PHASES:
            return
        namespace, name = str(meta.get("namespace") or ""), str(meta.get("name") or "")
        record = self._namespace(namespace)
        if record is None:
            return
        spec = _map(pod.get("spec"))
        for _rule, policy, pool in self._pools("v1", "Pod", meta, namespace, record):
            self.pods_checked += 1
            key = policy.node_label_key
            value = _map(spec.get("nodeSelector")).get(key)
            allowed = policy.allowed_pools(record, pool)
            reasons, found = _selector_drift(value, allowed, key)
            chosen = value if value in allowed else pool  # a pool its namespace allows stays
            node = spec.get("nodeName")
            if node and self.nodes is not None and node in self.nodes:
                node_pool = self.nodes[node].get(key)
                if node_pool != chosen:
                    reasons.append("node-in-other-pool")
                    found.append(f"on {_text(node)} ({_text(node_pool)})" if node_pool
                                 else f"on {_text(node)} (no {key})")
            if reasons:
                kind, owner = self._owner(namespace, name, meta)
                workload = self._workload(namespace, kind, owner, pool, policy)
                workload.reasons.update(reasons)
                workload.found.update(found)
                workload.pods.append(name)
            break

    # -- output ----------------------------------------------------------------------------------

    def result(self) -> AuditResult:
        notes = list(self.notes)
        if self.unknown_namespaces:
            notes.append(f"{len(self.unknown_namespaces)} namespaces with pods were not known "
                         "to the namespace source and were skipped")
        workloads = sorted((w for w in self._workloads.values() if w.reasons),
                           key=lambda w: (w.namespace, w.kind, w.name))
        return AuditResult(workloads, self.pods_read, self.pods_checked,
                           self.daemonsets_checked, len(self._pooled), self.nodes is not None,
                           [r.name for r in self.rules], notes)

    # -- helpers ---------------------------------------------------------------------------------

    def _namespace(self, name: str) -> Namespace | None:
        if name not in self._namespaces:
            found = self._lookup(name)
            self._namespaces[name] = found if found is None or isinstance(found, Namespace) \
                else Namespace(found)
        record = self._namespaces[name]
        if record is None:
            self.unknown_namespaces.add(name)
        return record

    def _pools(self, api_version: str, kind: str, meta: Mapping[str, Any], namespace: str,
               record: Namespace) -> Iterator[tuple[Rule, PoolPlacement, str]]:
        """(rule, policy, pool) for each pool rule that matches the object and gives a pool
        (an opted-out namespace, its pool label empty, gets none)."""
        # Only what match reads: kind and metadata (the spec is not copied).
        request = request_for({"apiVersion": api_version, "kind": kind, "metadata": meta},
                              namespace=namespace, uid="poolkeeper-audit")
        ctx = RuleContext(request, lambda n: record if n == namespace else self._namespace(n))
        for rule in self.rules:
            policy = rule.policy
            assert isinstance(policy, PoolPlacement)
            if not rule.match.matches(ctx):
                continue
            pool = policy.pool_of(record.labels)
            if pool:
                self._pooled.add(namespace)
                yield rule, policy, pool

    def _owner(self, namespace: str, name: str, meta: Mapping[str, Any]) -> tuple[str, str]:
        ref = _controller(meta)
        kind, owner = ref.get("kind"), ref.get("name")
        if not isinstance(kind, str) or not isinstance(owner, str) or not owner:
            return "Pod", name
        if kind != "ReplicaSet":
            return kind, owner
        if self.deployments is not None and (namespace, owner) in self.deployments:
            deployment = self.deployments[(namespace, owner)]
            return ("Deployment", deployment) if deployment else ("ReplicaSet", owner)
        # No ReplicaSet list (or the ReplicaSet is newer than it): the Deployment controller names
        # its ReplicaSets <deployment>-<pod-template-hash>.
        template_hash = _map(meta.get("labels")).get("pod-template-hash")
        if isinstance(template_hash, str) and template_hash and \
                owner.endswith("-" + template_hash) and len(owner) > len(template_hash) + 1:
            return "Deployment", owner[:-len(template_hash) - 1]
        return "ReplicaSet", owner

    def _workload(self, namespace: str, kind: str, name: str, pool: str,
                  policy: PoolPlacement) -> Workload:
        key = (namespace, kind, name)
        workload = self._workloads.get(key)
        if workload is None:
            workload = self._workloads[key] = Workload(namespace, kind, name, pool,
                                                       policy.node_label_key)
            if kind == "DaemonSet" and (namespace, name) in self._templates:
                workload.template_value = self._templates[(namespace, name)]
        return workload


def _controller(meta: Mapping[str, Any]) -> Mapping[str, Any]:
    references = meta.get("ownerReferences")
    for ref in references if isinstance(references, list) else ():
        if isinstance(ref, dict) and ref.get("controller"):
            return ref
    return {}


def _selector_drift(value: Any, allowed: tuple[str, ...], key: str,
                    where: str = "") -> tuple[list[str], list[str]]:
    """Drift of a pool key against the namespace's pool and the further pools it allows."""
    if value is None:
        return ["no-pool-key"], [f"{where}no {key}".lstrip()]
    if value not in allowed:
        return ["other-pool-key"], [f"{where}{key}={_text(value)}"]
    return [], []


# -- reading objects ------------------------------------------------------------------------------


class ClusterLister:
    """Lists from the API server in pages of ``page_size``: each call returns one page."""

    def __init__(self, core: Any, apps: Any, page_size: int = PAGE_SIZE) -> None:
        self.core, self.apps, self.page_size = core, apps, page_size

    @classmethod
    def from_client(cls, api_client: kubernetes.client.ApiClient,
                    page_size: int = PAGE_SIZE) -> ClusterLister:
        return cls(kubernetes.client.CoreV1Api(api_client),
                   kubernetes.client.AppsV1Api(api_client), page_size)

    def pages(self, what: str) -> Iterator[tuple[list[dict], int | None]]:
        """(items, items left after this page if the server says) for pods, daemonsets,
        replicasets, nodes or namespaces, page by page."""
        call = {"pods": self.core.list_pod_for_all_namespaces,
                "nodes": self.core.list_node,
                "namespaces": self.core.list_namespace,
                "daemonsets": self.apps.list_daemon_set_for_all_namespaces,
                "replicasets": self.apps.list_replica_set_for_all_namespaces}[what]
        token: str | None = None
        while True:
            try:
                body = json_body(call(limit=self.page_size, _continue=token,
                                      _preload_content=False, _request_timeout=_REQUEST_TIMEOUT))
            except kubernetes.client.ApiException as e:
                if e.status == 410 and token:
                    raise AuditError(f"the {what} list expired while it was read page by page "
                                     "(HTTP 410): run the audit again") from e
                raise
            meta = _map(body.get("metadata"))
            remaining = meta.get("remainingItemCount")
            items = body.get("items")
            yield (items if isinstance(items, list) else []), \
                (remaining if isinstance(remaining, int) else None)
            token = meta.get("continue") or None
            if token is None:
                return


def _forbidden(e: BaseException) -> bool:
    return isinstance(e, kubernetes.client.ApiException) and e.status in (401, 403)


def audit_cluster(lister: ClusterLister, rules: Iterable[Rule], *,
                  namespace_labels: NamespaceLabels | None = None,
                  progress: Progress | None = None,
                  keep_going: Callable[[], bool] = lambda: True) -> AuditResult:
    """The audit of the cluster ``lister`` reads. Without ``namespace_labels`` the namespaces
    are listed too. Nodes, ReplicaSets and DaemonSets that cannot be read (403) are left out
    with a note; pods or namespaces that cannot be read raise (AuditError, API errors)."""
    notes: list[str] = []
    if namespace_labels is None:
        known: dict[str, Namespace] = {}
        for items, _ in _pages(lister, "namespaces", keep_going):
            for item in items:
                meta = _map(item.get("metadata"))
                known[str(meta.get("name", ""))] = Namespace(_string_map(meta.get("labels")),
                                                             kept_annotations(meta))
        namespace_labels = known.get
    nodes: dict[str, Mapping[str, str]] | None = None
    try:
        listed: dict[str, Mapping[str, str]] = {}
        for items, _ in _pages(lister, "nodes", keep_going):
            for item in items:
                meta = _map(item.get("metadata"))
                listed[str(meta.get("name", ""))] = _string_map(meta.get("labels"))
        nodes = listed
    except kubernetes.client.ApiException as e:
        if not _forbidden(e):
            raise
        notes.append("nodes are not readable (HTTP 403): node pools not checked")
    audit = Audit(rules, namespace_labels, nodes=nodes)
    audit.notes.extend(notes)
    for what, add in (("replicasets", audit.add_replicaset),
                      ("daemonsets", audit.add_daemonset)):
        try:
            for items, _ in _pages(lister, what, keep_going):
                for item in items:
                    add(item)
        except kubernetes.client.ApiException as e:
            if not _forbidden(e):
                raise
            audit.notes.append(
                "replicasets are not readable (HTTP 403): Deployments inferred from the pods' "
                "pod-template-hash" if what == "replicasets" else
                "daemonsets are not readable (HTTP 403): only their pods were checked")
            if what == "replicasets":
                audit.deployments = None
    read = 0
    total: int | None = None  # remainingItemCount comes with every page but the last
    for items, remaining in _pages(lister, "pods", keep_going):
        for item in items:
            audit.add_pod(item)
        read += len(items)
        total = read + remaining if remaining is not None else \
            (total if total is not None and total >= read else None)
        if progress is not None:
            progress(read, total)
    return audit.result()


def _pages(lister: ClusterLister, what: str,
           keep_going: Callable[[], bool]) -> Iterator[tuple[list[dict], int | None]]:
    for page in lister.pages(what):
        if not keep_going():
            raise AuditAborted()
        yield page


def _string_map(value: Any) -> dict[str, str]:
    return {str(k): str(v) for k, v in _map(value).items()}


def read_objects(path: str) -> list[dict]:
    """Objects from a YAML or JSON file: ``kubectl get ... -o yaml`` (a List), a multi-document
    stream, or one object. Raises AuditError naming the file."""
    try:
        with open(path, encoding="utf-8") as stream:
            documents = list(yaml.safe_load_all(stream))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        raise AuditError(f"{path}: cannot be read as YAML or JSON: "
                         f"{' '.join(str(e).split())}") from e
    objects: list[dict] = []
    for number, doc in enumerate(documents, start=1):
        if doc is None:
            continue
        if not isinstance(doc, dict):
            raise AuditError(f"{path}: document {number} is not a Kubernetes object or a List")
        if str(doc.get("kind", "")).endswith("List"):
            items = doc.get("items") or []
            if not isinstance(items, list) or not all(isinstance(i, dict) for i in items):
                raise AuditError(f"{path}: document {number}: items must be a list of objects")
            kind = str(doc.get("kind"))[:-4]  # PodList items carry no kind of their own
            objects.extend(item if item.get("kind") else {**item, "kind": kind}
                           for item in items)
        else:
            objects.append(doc)
    return objects


def audit_files(rules: Iterable[Rule], namespaces_file: str, pods_file: str,
                nodes_file: str | None = None) -> AuditResult:
    """The audit of objects in files: namespaces (as ``--namespaces`` elsewhere), pods with
    any DaemonSets and ReplicaSets (``kubectl get pods,daemonsets,replicasets -A -o yaml``), and
    optionally nodes (``kubectl get nodes -o yaml``)."""
    from .namespaces.file import parse_namespaces

    try:
        with open(namespaces_file, encoding="utf-8") as stream:
            namespaces = parse_namespaces(stream.read())
    except (OSError, UnicodeDecodeError, ValueError, yaml.YAMLError) as e:
        raise AuditError(f"{namespaces_file}: {' '.join(str(e).split())}") from e
    nodes = None
    if nodes_file is not None:
        nodes = {}
        for obj in read_objects(nodes_file):
            if obj.get("kind") != "Node":
                raise AuditError(f"{nodes_file}: holds a {_text(obj.get('kind'))}, not only "
                                 "Nodes")
            meta = _map(obj.get("metadata"))
            nodes[str(meta.get("name", ""))] = _string_map(meta.get("labels"))
    objects = read_objects(pods_file)
    by_kind: dict[str, list[dict]] = {"ReplicaSet": [], "DaemonSet": [], "Pod": []}
    for obj in objects:
        kind = obj.get("kind")
        if kind in by_kind:
            by_kind[str(kind)].append(obj)
    if not objects or not any(by_kind.values()):
        raise AuditError(f"{pods_file}: holds no Pods, DaemonSets or ReplicaSets")
    audit = Audit(rules, namespaces.get, nodes=nodes)
    for replicaset in by_kind["ReplicaSet"]:
        audit.add_replicaset(replicaset)
    for daemonset in by_kind["DaemonSet"]:
        audit.add_daemonset(daemonset)
    for pod in by_kind["Pod"]:
        audit.add_pod(pod)
    return audit.result()


# -- rendering ------------------------------------------------------------------------------------


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def render(result: AuditResult, output: str = "table", *, fix_hint: bool = False) -> str:
    if output == "json":
        return orjson.dumps(result.to_dict(), option=orjson.OPT_INDENT_2).decode() + "\n"
    if output == "yaml":
        return yaml.safe_dump(result.to_dict(), sort_keys=False)
    checked = (f"{_count(result.pods_checked, 'pod')} and "
               f"{_count(result.daemonsets_checked, 'DaemonSet')} in "
               f"{_count(result.namespaces, 'pooled namespace')} checked")
    if not result.workloads:
        return f"no drift: {checked}\n"
    header = ["NAMESPACE", "WORKLOAD", "POOL", "REASONS", "PODS", "FOUND"]
    rows = [[w.namespace, w.ref, w.pool, ",".join(r for r in REASONS if r in w.reasons),
             str(len(w.pods)), _text(", ".join(sorted(w.found)), 57)]
            for w in result.workloads]
    if fix_hint:
        header.append("FIX")
        for row, workload in zip(rows, result.workloads, strict=True):
            row.append(workload.fix_hint())
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True))
             .rstrip() for row in [header, *rows]]
    pods = sum(len(w.pods) for w in result.workloads)
    lines.append(f"{_count(len(result.workloads), 'workload')} ({_count(pods, 'pod')}) drift "
                 f"from their namespace's pool; {checked}")
    return "\n".join(lines) + "\n"


# -- the command ----------------------------------------------------------------------------------


def command(args: Any) -> int:
    """``poolkeeper audit``: 0 without drift, 1 with drift, 2 when it cannot audit."""
    import sys

    from .config import ConfigError
    from .rules import SHIPPED_RULES, load_rules

    offline = [args.namespaces_file, args.pods_file]
    try:
        if any(offline) and not all(offline):
            raise AuditError("offline audit needs both --namespaces FILE and --pods FILE")
        if args.nodes_file and not all(offline):
            raise AuditError("--nodes FILE is for the offline audit, with --namespaces and "
                             "--pods")
        if args.chunk_size < 1:
            raise AuditError(f"--chunk-size {args.chunk_size} must be at least 1")
        rules = load_rules(args.rules_dir or SHIPPED_RULES)
        if all(offline):
            result = audit_files(rules, args.namespaces_file, args.pods_file, args.nodes_file)
        else:
            from .kube import load_api_client

            client = load_api_client(args.kubeconfig)
            bar = _progress_bar(sys.stderr)
            try:
                result = audit_cluster(ClusterLister.from_client(client, args.chunk_size), rules,
                                       progress=bar.update if bar else None)
            finally:
                if bar:
                    bar.close()
                client.close()
    except (AuditError, ConfigError) as e:
        print(f"poolkeeper audit: {e}", file=sys.stderr)
        return 2
    except _API_ERRORS as e:
        from .leases import describe_error

        print(f"poolkeeper audit: cannot read the cluster: {describe_error(e)}", file=sys.stderr)
        return 2
    for note in result.notes:
        print(f"note: {note}", file=sys.stderr)
    sys.stdout.write(render(result, args.output, fix_hint=args.fix_hint))
    return 1 if result.drift else 0


class _Bar:
    def __init__(self, stream: Any) -> None:
        from tqdm import tqdm

        self._bar = tqdm(file=stream, unit=" pods", desc="pods", leave=False)

    def update(self, done: int, total: int | None) -> None:
        if total is not None and self._bar.total != total:
            self._bar.total = total
        self._bar.update(done - self._bar.n)

    def close(self) -> None:
        self._bar.close()


def _progress_bar(stream: Any) -> _Bar | None:
    """A progress bar on ``stream`` when it is a terminal (never in a pipe or a log)."""
    isatty = getattr(stream, "isatty", None)
    return _Bar(stream) if isatty is not None and isatty() else None


# -- in the cluster -------------------------------------------------------------------------------


class AuditLoop:
    """The periodic audit: runs every ``interval`` seconds while ``is_auditor()`` (the audit
    Lease, :mod:`app.leases`) says this process is the one, and exports the result as
    ``poolkeeper_drift_workloads``. A process that stops being the auditor zeroes its series."""

    def __init__(self, run: Callable[[Callable[[], bool]], AuditResult],
                 is_auditor: Callable[[], bool], interval: float, *, tick: float = 1.0,
                 after_run: Callable[[], None] | None = None) -> None:
        self.run, self.is_auditor, self.interval, self.tick = run, is_auditor, interval, tick
        self.after_run = after_run
        self.runs = 0
        self._exporting = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if self._thread is not None and self._thread.is_alive():
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, name="poolkeeper-audit", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
        self._thread = None
        self._retire()

    def _loop(self) -> None:
        last: float | None = None
        while not self._stop.wait(self.tick):
            if not self.is_auditor():
                if self._exporting:
                    log.info("no longer the auditor: drift series zeroed")
                self._retire()
                last = None  # when elected again, audit at once
                continue
            if last is not None and time.monotonic() - last < self.interval:
                continue
            last = time.monotonic()
            self.run_once()

    def run_once(self) -> AuditResult | None:
        from . import metrics
        from .leases import describe_error

        started = time.monotonic()
        try:
            result = self.run(lambda: self.is_auditor() and not self._stop.is_set())
        except AuditAborted:
            return None
        except (AuditError, *_API_ERRORS) as e:
            log.warning("audit failed: %s", describe_error(e))
            return None
        except Exception:  # a bug: keep the thread alive
            log.exception("audit failed")
            return None
        metrics.export_drift(result.counts())
        metrics.AUDIT_LAST_RUN.set(time.time())
        self._exporting = True
        self.runs += 1
        pods = sum(len(w.pods) for w in result.workloads)
        log.info("audit: %d workloads (%d pods) drift; %d pods and %d DaemonSets checked in "
                 "%.1fs", len(result.workloads), pods, result.pods_checked,
                 result.daemonsets_checked, time.monotonic() - started)
        if self.after_run is not None:
            try:
                self.after_run()
            except (*_API_ERRORS, AuditError) as e:
                log.warning("after the audit: %s", describe_error(e))
        return result

    def _retire(self) -> None:
        if self._exporting:
            from . import metrics

            metrics.clear_drift()
            self._exporting = False


def source_labels(source: Any) -> NamespaceLabels:
    """The namespace source's lookup for the audit: a namespace whose labels cannot be known now
    counts as unknown (its pods are skipped this time)."""
    from .namespaces import NamespaceLookupError

    def labels(name: str) -> Namespace | None:
        try:
            found: Namespace | None = source.namespace(name)
            return found
        except NamespaceLookupError:
            return None

    return labels
