"""Owns what poolkeeper knows of nodes: their labels (so, which node pools have nodes) and, read
from a file or listed once, whether they are Ready.

The rules ask a :data:`~app.rules.base.NodeLookup` how many nodes carry each value of a node
label key (the pool rule warns about a namespace whose pool no node has). In a cluster that is
:meth:`KubeNodes.pools <app.nodes.informer.KubeNodes.pools>`, a list+watch of node metadata that
starts the first time a rule asks; offline (golden cases' ``nodes.yaml``, ``poolkeeper pools
--nodes``) Node objects are read from YAML (:func:`parse_nodes`) into :class:`FixedNodes`. This
module imports no kubernetes client (``poolkeeper test`` reads nodes through it); the informer
is a submodule of its own.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import yaml


class NodeSource(Protocol):
    def pools(self, key: str) -> Mapping[str, int] | None:
        """How many nodes carry each value of label ``key``; None when that cannot be known."""

    def stop(self) -> None:
        """Stop background threads promptly."""


@dataclass(frozen=True, slots=True)
class Node:
    name: str
    labels: Mapping[str, str]
    ready: bool | None = None  # its Ready condition is True; None: not known (metadata only)


def node_from(obj: Any, where: str) -> Node:
    """A Node object (a dict) as a :class:`Node`; ValueError naming ``where`` when it is none."""
    if not isinstance(obj, dict) or obj.get("kind", "Node") != "Node":
        raise ValueError(f"{where}: expected a Node object")
    metadata = obj.get("metadata")
    metadata = metadata if isinstance(metadata, dict) else {}
    name = metadata.get("name")
    if not isinstance(name, str) or not name:
        raise ValueError(f"{where}: metadata.name is missing")
    labels = metadata.get("labels") or {}
    if not isinstance(labels, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                               for k, v in labels.items()):
        raise ValueError(f"{where} ({name}): metadata.labels is not a map of strings")
    status = obj.get("status")
    conditions = status.get("conditions") if isinstance(status, dict) else None
    ready = None
    if isinstance(conditions, list):
        ready = any(isinstance(c, dict) and c.get("type") == "Ready" and c.get("status") == "True"
                    for c in conditions)
    return Node(name, dict(labels), ready)


def parse_nodes(text: str) -> list[Node]:
    """The nodes in YAML: a ``kind: List`` (``kubectl get nodes -o yaml``), a multi-document
    stream, or one Node. Raises ValueError or yaml.YAMLError."""
    nodes = []
    for number, doc in enumerate(yaml.safe_load_all(text), start=1):
        if doc is None:
            continue
        if isinstance(doc, dict) and doc.get("kind") in ("List", "NodeList"):
            items = doc.get("items") or []
            if not isinstance(items, list):
                raise ValueError(f"document {number}: 'items' is not a list")
            nodes += [node_from(item, f"document {number}, items[{index}]")
                      for index, item in enumerate(items)]
        elif isinstance(doc, dict) and "kind" not in doc:
            raise ValueError(f"document {number}: kind is missing, expected Node or List")
        else:
            nodes.append(node_from(doc, f"document {number}"))
    return nodes


def pool_counts(labels: Iterable[Mapping[str, str]], key: str) -> dict[str, int]:
    """How many of the nodes (their labels) carry each value of label ``key``."""
    return dict(Counter(node[key] for node in labels if key in node))


class FixedNodes:
    """A fixed set of nodes (read from a file, or a test's) as a node source."""

    def __init__(self, nodes: Iterable[Node]) -> None:
        self.nodes = tuple(nodes)

    def pools(self, key: str) -> dict[str, int]:
        return pool_counts((node.labels for node in self.nodes), key)

    def stop(self) -> None:
        """Nothing to stop."""
