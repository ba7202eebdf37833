"""Properties over generated objects: patches apply cleanly, and a second pass changes nothing."""

from __future__ import annotations

import copy
import dataclasses

import jsonpatch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from app.admission import admit
from app.rules import PoolPlacement

from .support import make_request, shipped_rules

# Label keys that need JSON Pointer escaping ('/' and '~' are legal only in the prefix or not at
# all, but the escaping must hold for any string the object may carry).
keys = st.sampled_from(["agentpool", "kubernetes.azure.com/agentpool", "kubernetes.io/os",
                        "disk", "a~b", "x/y~z", "topology.kubernetes.io/zone"])
pools = st.sampled_from(["pool1", "pool2", "gpu", "7", "12"])
operators = st.sampled_from(["In", "NotIn", "Exists", "DoesNotExist", "Gt", "Lt"])

requirement = st.builds(
    lambda key, op, values: {"key": key, "operator": op, "values": values}
    if op not in ("Exists", "DoesNotExist") else {"key": key, "operator": op},
    keys, operators, st.lists(pools, min_size=1, max_size=3))
term = st.one_of(
    st.builds(lambda exprs: {"matchExpressions": exprs}, st.lists(requirement, max_size=3)),
    st.just({"matchFields": [{"key": "metadata.name", "operator": "In", "values": ["n1"]}]}))
affinity = st.one_of(st.none(), st.builds(
    lambda terms: {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {
        "nodeSelectorTerms": terms}}}, st.lists(term, max_size=3)))


quantities = st.sampled_from(["100m", "0.1", "1", "1000m", "256Mi", "268435456", "1Gi", "2"])
resource_lists = st.dictionaries(st.sampled_from(["cpu", "memory", "ephemeral-storage"]),
                                 quantities, max_size=3)


@st.composite
def containers(draw, prefix):
    result = []
    for index in range(draw(st.integers(0 if prefix == "init" else 1, 3))):
        container = {"name": f"{prefix}{index}", "image": "busybox"}
        if draw(st.booleans()):
            container["imagePullPolicy"] = draw(st.sampled_from(["Always", "IfNotPresent",
                                                                 "Never"]))
        resources = {}
        for part in ("requests", "limits"):
            if draw(st.booleans()):
                resources[part] = draw(resource_lists)
        if resources:
            container["resources"] = resources
        result.append(container)
    return result


@st.composite
def pod_specs(draw):
    spec: dict = {"containers": draw(containers("c"))}
    init = draw(containers("init"))
    if init:
        spec["initContainers"] = init
    selector = draw(st.one_of(st.none(), st.dictionaries(keys, pools, max_size=3)))
    if selector is not None:
        spec["nodeSelector"] = selector
    aff = draw(affinity)
    if aff is not None:
        spec["affinity"] = aff
    if draw(st.integers(0, 3)) == 0:
        spec["nodeName"] = "node-1"
    return spec


@st.composite
def objects(draw):
    kind = draw(st.sampled_from(["Pod", "Pod", "Pod", "DaemonSet", "Namespace"]))
    labels = draw(st.dictionaries(st.sampled_from(["platform", "type", "systemid", "app"]),
                                  st.sampled_from(["true", "false", "user-workload", "12345"]),
                                  max_size=3))
    if kind == "Namespace":
        name = draw(st.sampled_from(["12345-pay-prod", "sandbox", "a-b-c", "kube-system",
                                     "99999-x-dev"]))
        return {"apiVersion": "v1", "kind": "Namespace",
                "metadata": {"name": name, "labels": {**labels,
                                                      "kubernetes.io/metadata.name": name}}}
    metadata = {"name": "x", "namespace": draw(st.sampled_from(["ns1", "ns2", "plain",
                                                                "kube-system"])),
                "labels": labels}
    annotations = {}
    if draw(st.integers(0, 9)) == 0:
        annotations["kubernetes.io/config.mirror"] = "h"
    if draw(st.integers(0, 4)) == 0:
        annotations["poolkeeper.io/keep-limits"] = "true"
    if annotations:
        metadata["annotations"] = annotations
    spec = draw(pod_specs())
    if kind == "Pod":
        return {"apiVersion": "v1", "kind": "Pod", "metadata": metadata, "spec": spec}
    return {"apiVersion": "apps/v1", "kind": "DaemonSet", "metadata": metadata,
            "spec": {"selector": {}, "template": {"metadata": {}, "spec": spec}}}


@st.composite
def rule_sets(draw):
    """The shipped rules, the pool rule with other params, each rule enforce, warn or off."""
    rules = []
    for rule in shipped_rules():
        if rule.kind_name == "PoolPlacement":
            rule = dataclasses.replace(rule, policy=PoolPlacement(
                namespaceLabelKey=draw(st.sampled_from(["agentpool", "example.com/pool"])),
                nodeLabelKey=draw(st.sampled_from(["agentpool", "kubernetes.azure.com/agentpool",
                                                   "a~b"])),
                defaultPool=draw(st.one_of(st.none(), pools))))
        rules.append(dataclasses.replace(rule, enforcement=draw(st.sampled_from(
            ["enforce", "enforce", "warn", "off"]))))
    return tuple(rules)


@st.composite
def namespace_tables(draw):
    table = {}
    for name in ("ns1", "ns2", "kube-system"):
        pool = draw(pools)
        table[name] = {"agentpool": pool, "example.com/pool": pool}
    table["plain"] = {}
    return table


def pool_rule(rules):
    return next(r.policy for r in rules if r.kind_name == "PoolPlacement")


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(objects(), rule_sets(), namespace_tables())
def test_properties_patch_applies_and_second_pass_changes_nothing(obj, rules, namespaces):
    original = copy.deepcopy(obj)
    request = make_request(obj)
    response = admit(request, namespaces.get, rules).response
    assert request.object == original, "the decision must not change the request"
    if not response.allowed:
        assert response.code == 403 and response.patch == ()
        # Denials are stable: the same object is denied again.
        assert not admit(make_request(obj), namespaces.get, rules).response.allowed
        return
    assert all(len(w) < 120 for w in response.warnings)
    result = jsonpatch.apply_patch(obj, list(response.patch))
    again = admit(make_request(result), namespaces.get, rules).response
    assert again.allowed and again.patch == (), "a second pass must change nothing"
    if obj["kind"] == "Namespace":
        return
    # The pool rule only ever touches its own key: every other selector key survives.
    path = ("spec",) if obj["kind"] == "Pod" else ("spec", "template", "spec")
    before, after = original, result
    for token in path:
        before, after = before[token], after[token]
    key = pool_rule(rules).node_label_key
    kept = before.get("nodeSelector") or {}
    now = after.get("nodeSelector") or {}
    assert {k: v for k, v in now.items() if k != key} == {k: v for k, v in kept.items() if k != key}


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(objects(), rule_sets(), namespace_tables())
def test_properties_warn_mode_never_patches_or_denies(obj, rules, namespaces):
    warned = tuple(dataclasses.replace(r, enforcement="warn") for r in rules)
    enforced = tuple(dataclasses.replace(r, enforcement="enforce") for r in rules)
    response = admit(make_request(obj), namespaces.get, warned).response
    assert response.allowed and response.patch == ()
    strict = admit(make_request(obj), namespaces.get, enforced).response
    if strict.patch or not strict.allowed:
        assert any("would" in w for w in response.warnings), "each effect must be announced"
