"""Test helpers: AdmissionReview builders and sample objects from testdata/."""

from __future__ import annotations

import copy
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import NoReturn

import pytest
import yaml

from app.review import AdmissionRequest, parse_review

ROOT = Path(__file__).resolve().parents[1]
TESTDATA = ROOT / "testdata"

# CI (.ci/run) sets it to 1: a test that needs ../shared/tools or a test tool (kubectl,
# kubernetes-validate) then fails when it is missing instead of skipping, so no tier is lost
# silently. On a user's machine such tests skip and say why.
REQUIRE_SHARED = "POOLKEEPER_REQUIRE_SHARED"


def skip_or_fail(reason: str) -> NoReturn:
    """Skip the test for ``reason`` (something it needs is missing); with
    POOLKEEPER_REQUIRE_SHARED=1 fail it with the same reason instead."""
    if os.environ.get(REQUIRE_SHARED) == "1":
        pytest.fail(f"{reason} ({REQUIRE_SHARED}=1: it must not be skipped)", pytrace=False)
    pytest.skip(reason)


KINDS = {"Pod": ("", "v1"), "DaemonSet": ("apps", "v1"), "Namespace": ("", "v1"),
         "Deployment": ("apps", "v1"), "ConfigMap": ("", "v1")}


def load_yaml(relative: str) -> dict:
    return yaml.safe_load((TESTDATA / relative).read_text())


def review_doc(obj: dict | None, operation: str = "CREATE", *, namespace: str | None = None,
               old: dict | None = None, kind: str | None = None, uid: str = "uid-1",
               dry_run: bool = False, sub_resource: str | None = None) -> dict:
    """An AdmissionReview body as the API server sends it."""
    source = obj if obj is not None else old
    kind = kind or source["kind"]
    group, version = KINDS[kind]
    meta = source.get("metadata", {})
    if namespace is None:
        namespace = "" if kind == "Namespace" else meta.get("namespace", "default")
    request = {
        "uid": uid,
        "kind": {"group": group, "version": version, "kind": kind},
        "resource": {"group": group, "version": version, "resource": kind.lower() + "s"},
        "operation": operation,
        "userInfo": {"username": "alice@example.com"},
        "object": copy.deepcopy(obj),
        "oldObject": copy.deepcopy(old),
        "dryRun": dry_run,
    }
    if namespace:
        request["namespace"] = namespace
    if meta.get("name"):
        request["name"] = meta["name"]
    if sub_resource:
        request["subResource"] = sub_resource
    return {"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "request": request}


def make_request(obj: dict | None, operation: str = "CREATE", **kw) -> AdmissionRequest:
    return parse_review(review_doc(obj, operation, **kw))


def pod(selector: dict | None = None, *, namespace: str = "team-a", name: str = "p",
        **spec_extra) -> dict:
    spec: dict = {"containers": [{"name": "c", "image": "busybox:1.36"}]}
    if selector is not None:
        spec["nodeSelector"] = dict(selector)
    spec.update(spec_extra)
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": namespace}, "spec": spec}


def shipped_rules(*names: str, docs: bool = False):
    """The shipped rules (only ``names`` when given), as the server loads them; without their
    docsURL unless ``docs`` (so messages compare without the "See <url>" suffix, which
    tests/test_defaults.py checks on its own)."""
    import dataclasses

    from app.rules import SHIPPED_RULES, load_rules

    rules = load_rules(SHIPPED_RULES)
    return tuple(r if docs else dataclasses.replace(r, docs_url=None)
                 for r in rules if not names or r.name in names)


def pool_rules(**params):
    """The shipped pool rule with other params (camelCase, as in the rule file)."""
    import dataclasses

    from app.rules import PoolPlacement

    (rule,) = shipped_rules("agentpool-node-selector")
    return (dataclasses.replace(rule, policy=PoolPlacement(**params)),)


def qos_class(pod: dict) -> str:
    """Guaranteed, Burstable or BestEffort, as the kubelet computes it from cpu and memory
    (an oracle for the tests, written apart from the rule's own check)."""
    from app.rules.limits import parse_quantity

    containers = [c for field in ("initContainers", "containers")
                  for c in (pod.get("spec") or {}).get(field) or []]
    def part(container: dict, name: str) -> dict:
        value = (container.get("resources") or {}).get(name)
        return value if isinstance(value, dict) else {}

    requests = [part(c, "requests") for c in containers]
    limits = [part(c, "limits") for c in containers]
    if not any(name in part for part in requests + limits for name in ("cpu", "memory")):
        return "BestEffort"
    if not containers:
        return "BestEffort"
    for req, lim in zip(requests, limits, strict=True):
        for name in ("cpu", "memory"):
            if name not in lim:
                return "Burstable"
            if name in req and req[name] != lim[name] and \
                    parse_quantity(req[name]) != parse_quantity(lim[name]):
                return "Burstable"
    return "Guaranteed"


DEADLINE = 30.0  # seconds any eventual condition may take in the tests; polled, never slept on


def wait_for(probe: Callable[[], object], what: str, timeout: float = DEADLINE):
    """``probe()``'s first true result, polled every 0.1 s; the test fails after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        result = probe()
        if result:
            return result
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(0.1)
