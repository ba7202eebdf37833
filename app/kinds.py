"""Owns what poolkeeper knows of each object kind: its API group, its scope, and where it keeps
the pod spec rules act on. Every rule kind, the matching and the tests read this one table."""

from __future__ import annotations

from dataclasses import dataclass

from .patching import Path


@dataclass(frozen=True, slots=True)
class ObjectKind:
    name: str
    group: str  # API group; "" is the core group
    cluster_scoped: bool = False
    pod_spec: Path | None = None  # path of the pod spec inside the object, if it has one


OBJECT_KINDS: dict[str, ObjectKind] = {k.name: k for k in (
    ObjectKind("Pod", "", pod_spec=("spec",)),
    ObjectKind("DaemonSet", "apps", pod_spec=("spec", "template", "spec")),
    ObjectKind("Namespace", "", cluster_scoped=True),
)}


def pod_spec_path(group: str, kind: str) -> Path | None:
    """Where an object of this (API group, kind) keeps its pod spec; None if it has none."""
    known = OBJECT_KINDS.get(kind)
    return known.pod_spec if known is not None and known.group == group else None
