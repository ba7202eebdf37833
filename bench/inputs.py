"""Owns the benchmark's inputs: the AdmissionReview fixture, the namespaces and their files.

Every part of the bench sends the same 11 KB review of a Deployment-created pod, with its namespace
varied per request across ``NAMESPACES`` namespaces, each labelled with one of five pools.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import orjson

ROOT = Path(__file__).resolve().parents[1]
REVIEW_FIXTURE = ROOT / "testdata" / "reviews" / "pod-create-deployment.json"

NAMESPACES = 1000
POOLS = 5
POOL_LABEL = "agentpool"


def namespace_names(count: int = NAMESPACES) -> list[str]:
    width = max(4, len(str(count - 1)))
    return [f"bench-ns-{i:0{width}d}" for i in range(count)]


def namespace_labels(name: str, index: int) -> dict[str, str]:
    return {"kubernetes.io/metadata.name": name, POOL_LABEL: f"pool{index % POOLS + 1}"}


def namespace_objects(count: int = NAMESPACES) -> list[dict]:
    """Namespace objects as ``kubectl get ns -o json`` lists them (trimmed to metadata)."""
    return [{"apiVersion": "v1", "kind": "Namespace",
             "metadata": {"name": name, "labels": namespace_labels(name, i)}}
            for i, name in enumerate(namespace_names(count))]


def write_namespaces_yaml(path: Path, count: int = NAMESPACES) -> Path:
    """A ``kind: List`` for ``poolkeeper serve --namespaces``. JSON is YAML, and far faster to write."""
    path.write_bytes(orjson.dumps({"apiVersion": "v1", "kind": "List",
                                   "items": namespace_objects(count)}))
    return path


def opa_namespaces_data(count: int = NAMESPACES) -> dict[str, dict]:
    """The same namespaces as OPA's kube-mgmt replicates them: data.kubernetes.namespaces[name]."""
    return {obj["metadata"]["name"]: obj for obj in namespace_objects(count)}


def review_doc() -> dict:
    return json.loads(REVIEW_FIXTURE.read_text())


def review_for(doc: dict, namespace: str, index: int = 0) -> dict:
    """The fixture with another namespace (request and object) and a distinct uid."""
    out = dict(doc)
    request = dict(doc["request"])
    request["namespace"] = namespace
    request["uid"] = f"{request['uid'][:-12]}{index:012d}"
    obj = dict(request["object"])
    obj["metadata"] = dict(obj["metadata"], namespace=namespace)
    request["object"] = obj
    out["request"] = request
    return out


def review_bodies(names: list[str]) -> list[bytes]:
    doc = review_doc()
    return [orjson.dumps(review_for(doc, name, i)) for i, name in enumerate(names)]


def pod_for_create() -> dict:
    """The fixture's pod as its ReplicaSet controller would POST it: no server-set fields."""
    pod = copy.deepcopy(review_doc()["request"]["object"])
    meta = pod["metadata"]
    for key in ("uid", "resourceVersion", "creationTimestamp", "managedFields", "namespace",
                "name"):
        meta.pop(key, None)
    pod.pop("status", None)
    pod["spec"].pop("nodeName", None)
    return pod
