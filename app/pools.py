"""Owns ``poolkeeper pools``: every node pool the pool rules in force know of, with the namespaces
pinned to it, its nodes (how many are Ready) and what its pods get (tolerations, node labels),
from the cluster or from files.

A pool is known when the rule lists it (``pools:``), a namespace is labelled with it or allows
it (the allowed-pools annotation), it is the ``defaultPool``, or a node carries it. A pool with
namespaces but no node is where pods would stay Pending.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TextIO, TypeVar

from .namespaces.source import Namespace, kept_annotations
from .nodes import Node, node_from
from .rules import PoolPlacement, Rule
from .rules.pool import describe_toleration

# Namespaces named per pool in the table (all of them with -o json).
TABLE_NAMESPACES = 3

T = TypeVar("T")


class PoolsError(ValueError):
    """Input that cannot be read (a file, the cluster, the rules); one line for the user."""


@dataclass
class PoolRow:
    pool: str
    namespaces: list[str] = field(default_factory=list)  # pinned to it (label or defaultPool)
    allowed_in: list[str] = field(default_factory=list)  # namespaces whose annotation allows it
    nodes: int = 0
    ready: int | None = 0  # None: no node's Ready condition is known (a file without status)
    tolerations: list[dict[str, Any]] = field(default_factory=list)
    node_labels: dict[str, str] = field(default_factory=dict)
    listed: bool = False  # in the rule's pools:

    def to_json(self) -> dict[str, Any]:
        return {"pool": self.pool, "namespaces": self.namespaces, "allowedIn": self.allowed_in,
                "nodes": self.nodes, "ready": self.ready, "tolerations": self.tolerations,
                "nodeLabels": self.node_labels, "listed": self.listed}


@dataclass
class PoolReport:
    rule: str
    namespace_label_key: str
    node_label_key: str
    default_pool: str | None
    pools: list[PoolRow]
    opted_out: list[str]  # namespaces whose pool label is empty

    def to_json(self) -> dict[str, Any]:
        return {"rule": self.rule, "namespaceLabelKey": self.namespace_label_key,
                "nodeLabelKey": self.node_label_key, "defaultPool": self.default_pool,
                "pools": [p.to_json() for p in self.pools], "optedOut": self.opted_out}


def report(rule: Rule, namespaces: Mapping[str, Namespace], nodes: Sequence[Node]) -> PoolReport:
    """The pools of one PoolPlacement rule over the given namespaces and nodes."""
    policy = rule.policy
    assert isinstance(policy, PoolPlacement)
    rows: dict[str, PoolRow] = {}

    def row(pool: str) -> PoolRow:
        if pool not in rows:
            spec = policy.pools.get(pool)
            rows[pool] = PoolRow(pool, listed=spec is not None)
            if spec is not None:
                rows[pool].tolerations = [dict(t) for t in spec.tolerations]
                rows[pool].node_labels = dict(spec.node_labels)
        return rows[pool]

    for pool in policy.pools:
        row(pool)
    if policy.default_pool:
        row(policy.default_pool)
    opted_out = []
    selector = rule.match.namespace_selector
    for name in sorted(namespaces):
        namespace = namespaces[name]
        if name in rule.match.excluded_namespaces or (
                selector is not None and not selector.matches(namespace.labels)):
            continue
        label = namespace.labels.get(policy.namespace_label_key)
        if label == "":
            opted_out.append(name)
            continue
        chosen = label or policy.default_pool
        if not chosen:
            continue
        pool = chosen
        row(pool).namespaces.append(name)
        for other in policy.allowed_pools(namespace, pool)[1:]:
            row(other).allowed_in.append(name)
    known_ready = set()
    for node in nodes:
        carried = node.labels.get(policy.node_label_key)
        if carried is None:
            continue
        entry = row(carried)
        entry.nodes += 1
        if node.ready is not None:
            known_ready.add(carried)
            entry.ready = (entry.ready or 0) + node.ready
    for entry in rows.values():
        if entry.nodes and entry.pool not in known_ready:
            entry.ready = None
    return PoolReport(rule.name, policy.namespace_label_key, policy.node_label_key,
                      policy.default_pool, [rows[p] for p in sorted(rows)], opted_out)


def format_table(reports: Sequence[PoolReport]) -> str:
    """One table per rule (headed by the rule when there are several)."""
    out = []
    for item in reports:
        if len(reports) > 1:
            out.append(f"rule {item.rule}:")
        lines = [("POOL", "NAMESPACES", "NODES", "READY", "TOLERATIONS")]
        for entry in item.pools:
            names = entry.namespaces[:TABLE_NAMESPACES]
            text = ", ".join(names) + (f" (+{len(entry.namespaces) - len(names)})"
                                       if len(entry.namespaces) > len(names) else "")
            if entry.allowed_in:
                text = (text + " " if text else "") + f"(allowed in {len(entry.allowed_in)})"
            tolerations = ", ".join(describe_toleration(t) for t in entry.tolerations)
            ready = "?" if entry.ready is None else str(entry.ready)
            lines.append((entry.pool, text or "-", str(entry.nodes), ready, tolerations or "-"))
        widths = [max(len(line[i]) for line in lines) for i in range(4)]
        for line in lines:
            out.append("  ".join(cell.ljust(width) for cell, width in zip(line, widths,
                                                                          strict=False))
                       + "  " + line[4])
        empty = [e.pool for e in item.pools if (e.namespaces or e.allowed_in) and not e.nodes]
        if empty:
            out.append(f"pools no node has ({item.node_label_key}=<pool>), where pods would stay "
                       f"Pending: {', '.join(empty)}")
        if item.opted_out:
            out.append(f"opted out ({item.namespace_label_key}=\"\"): "
                       f"{', '.join(item.opted_out)}")
    return "\n".join(line.rstrip() for line in out) + "\n"


def format_json(reports: Sequence[PoolReport]) -> str:
    return json.dumps([r.to_json() for r in reports], indent=2) + "\n"


def format_yaml(reports: Sequence[PoolReport]) -> str:
    import yaml

    return yaml.safe_dump([r.to_json() for r in reports], sort_keys=False)


def pool_rules(rules: Sequence[Rule]) -> list[Rule]:
    found = [r for r in rules if r.kind_name == "PoolPlacement" and r.enforcement != "off"]
    if not found:
        raise PoolsError("no PoolPlacement rule is in force in the rules directory")
    return found


# -- reading namespaces and nodes ----------------------------------------------------------------

def read_namespaces_file(path: str) -> dict[str, Namespace]:
    from .namespaces.file import parse_namespaces

    return _parsed(path, parse_namespaces)


def read_nodes_file(path: str) -> list[Node]:
    from .nodes import parse_nodes

    return _parsed(path, parse_nodes)


def _parsed(path: str, parse: Callable[[str], T]) -> T:
    import yaml

    try:
        with open(path, encoding="utf-8") as stream:
            return parse(stream.read())
    except OSError as exc:
        raise PoolsError(f"cannot read {path}: {exc.strerror or exc}") from None
    except (ValueError, yaml.YAMLError) as exc:
        raise PoolsError(f"{path}: {' '.join(str(exc).split())}") from None


def read_cluster(kubeconfig: str | None, *, namespaces: bool,
                 nodes: bool) -> tuple[dict[str, Namespace], list[Node]]:
    """What the cluster of ``kubeconfig`` (default: in-cluster, else $KUBECONFIG) holds."""
    import kubernetes.client
    import orjson
    import urllib3

    from .kube import KubeConfigError, load_api_client

    try:
        client = load_api_client(kubeconfig)
    except KubeConfigError as exc:
        raise PoolsError(f"{exc}; without a cluster, give --namespaces FILE and --nodes FILE "
                         "(kubectl get namespaces,nodes -o yaml)") from None
    api: Any = kubernetes.client.CoreV1Api(client)

    def items(call: Any) -> list[dict[str, Any]]:
        found: list[dict[str, Any]] = []
        token = None
        while True:
            response = call(limit=500, _continue=token, _preload_content=False,
                            _request_timeout=(5, 60))
            try:
                body = orjson.loads(response.data)
            finally:
                response.release_conn()
            found += body.get("items") or []
            token = (body.get("metadata") or {}).get("continue")
            if not token:
                return found

    try:
        found_namespaces = {
            item["metadata"]["name"]: Namespace(dict(item["metadata"].get("labels") or {}),
                                                kept_annotations(item["metadata"]))
            for item in items(api.list_namespace)} if namespaces else {}
        found_nodes = [node_from(item, f"node {index}")
                       for index, item in enumerate(items(api.list_node))] if nodes else []
    except (kubernetes.client.ApiException, urllib3.exceptions.HTTPError, OSError) as exc:
        reason = f"HTTP {exc.status} {exc.reason}" if isinstance(
            exc, kubernetes.client.ApiException) else type(exc).__name__
        raise PoolsError(f"cannot list namespaces and nodes: {reason}") from None
    finally:
        client.close()
    return found_namespaces, found_nodes


def run(rules: Sequence[Rule], *, namespaces_file: str | None, nodes_file: str | None,
        kubeconfig: str | None, output: str, out: TextIO | None = None) -> None:
    """``poolkeeper pools``; PoolsError for input that cannot be read."""
    selected = pool_rules(rules)
    namespaces = read_namespaces_file(namespaces_file) if namespaces_file else {}
    nodes = read_nodes_file(nodes_file) if nodes_file else []
    if not namespaces_file or not nodes_file:
        cluster_namespaces, cluster_nodes = read_cluster(
            kubeconfig, namespaces=not namespaces_file, nodes=not nodes_file)
        namespaces = namespaces if namespaces_file else cluster_namespaces
        nodes = nodes if nodes_file else cluster_nodes
    reports = [report(rule, namespaces, nodes) for rule in selected]
    formats = {"json": format_json, "yaml": format_yaml, "table": format_table}
    (out or sys.stdout).write(formats[output](reports))


def command(args: Any) -> int:
    """``poolkeeper pools`` (app.cli): 0, or 2 with one line when the input cannot be read."""
    from .config import ConfigError
    from .rules import SHIPPED_RULES, load_rules

    try:
        rules = load_rules(args.rules_dir or SHIPPED_RULES)
        run(rules, namespaces_file=args.namespaces_file, nodes_file=args.nodes_file,
            kubeconfig=args.kubeconfig, output=args.output)
    except (PoolsError, ConfigError) as exc:
        print(f"poolkeeper pools: {exc}", file=sys.stderr)
        return 2
    return 0
