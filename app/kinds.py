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


_TEMPLATE = ("spec", "template")

OBJECT_KINDS: dict[str, ObjectKind] = {k.name: k for k in (
    ObjectKind("Pod", "", pod_spec=("spec",)),
    # pod controllers: the pod spec of their template (spec.template.spec)
    ObjectKind("DaemonSet", "apps", pod_spec=(*_TEMPLATE, "spec")),
    ObjectKind("Deployment", "apps", pod_spec=(*_TEMPLATE, "spec")),
    ObjectKind("ReplicaSet", "apps", pod_spec=(*_TEMPLATE, "spec")),
    ObjectKind("StatefulSet", "apps", pod_spec=(*_TEMPLATE, "spec")),
    ObjectKind("ReplicationController", "", pod_spec=(*_TEMPLATE, "spec")),
    ObjectKind("Job", "batch", pod_spec=(*_TEMPLATE, "spec")),
    ObjectKind("CronJob", "batch", pod_spec=("spec", "jobTemplate", *_TEMPLATE, "spec")),
    ObjectKind("Namespace", "", cluster_scoped=True),
)}

# The kinds whose objects hold a pod template rather than being a pod.
POD_CONTROLLERS = tuple(name for name, k in OBJECT_KINDS.items()
                        if k.pod_spec is not None and name != "Pod")


def pod_spec_path(group: str, kind: str) -> Path | None:
    """Where an object of this (API group, kind) keeps its pod spec; None if it has none."""
    known = OBJECT_KINDS.get(kind)
    return known.pod_spec if known is not None and known.group == group else None


def template_path(group: str, kind: str) -> Path | None:
    """Where a pod controller keeps its pod template (metadata and spec); None for a pod or a
    kind without one."""
    spec = pod_spec_path(group, kind)
    return tuple(spec[:-1]) if spec is not None and kind != "Pod" else None
