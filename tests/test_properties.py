"""Properties over generated objects: patches apply cleanly, and a second pass changes nothing."""

from __future__ import annotations

import copy
import dataclasses

import jsonpatch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from app.admission import admit
from app.namespaces import Namespace
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


# Tolerations a pod may carry and pools may add: some equal but for fields that do not make a
# toleration another (operator Equal or absent, tolerationSeconds).
tolerations = st.sampled_from([
    {"key": "kubernetes.azure.com/scalesetpriority", "operator": "Equal", "value": "spot",
     "effect": "NoSchedule"},
    {"key": "kubernetes.azure.com/scalesetpriority", "value": "spot", "effect": "NoSchedule"},
    {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"},
    {"key": "sku", "operator": "Equal", "value": "gpu", "effect": "NoSchedule"},
    {"key": "node.kubernetes.io/not-ready", "operator": "Exists", "effect": "NoExecute",
     "tolerationSeconds": 300},
    {"key": "node.kubernetes.io/not-ready", "operator": "Exists", "effect": "NoExecute"},
    {"operator": "Exists"},
])
node_label_maps = st.dictionaries(st.sampled_from(["kubernetes.io/arch", "disk", "a~b/c"]),
                                  st.sampled_from(["amd64", "arm64", "ssd"]), max_size=2)
pool_specs = st.dictionaries(pools, st.one_of(st.none(), st.fixed_dictionaries(
    {}, optional={"tolerations": st.lists(tolerations, max_size=3),
                  "nodeLabels": node_label_maps})), max_size=3)

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
    own = draw(st.one_of(st.none(), st.lists(tolerations, max_size=3)))
    if own is not None:
        spec["tolerations"] = own
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
        pool = draw(st.one_of(st.none(), st.just(""), pools))
        if pool is not None:
            labels = {**labels, "agentpool": pool, "example.com/pool": pool}
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
    """The shipped rules, the pool rule with other params, each rule enforce, warn or off.

    Every rule with ``onError: fail``: the shipped defaults' ``ignore`` would turn a rule that
    raises into a skipped rule and a warning, and the properties below would hold vacuously."""
    rules = []
    for rule in shipped_rules():
        if rule.kind_name == "PoolPlacement":
            node_label_key = draw(st.sampled_from(["agentpool", "kubernetes.azure.com/agentpool",
                                                   "a~b"]))
            rule = dataclasses.replace(rule, policy=PoolPlacement(
                namespaceLabelKey=draw(st.sampled_from(["agentpool", "example.com/pool"])),
                nodeLabelKey=node_label_key,
                defaultPool=draw(st.one_of(st.none(), pools)),
                pools=draw(pool_specs),
                unknownPools=draw(st.sampled_from(["warn", "deny", "off"]))))
        rules.append(dataclasses.replace(rule, on_error="fail", enforcement=draw(
            st.sampled_from(["enforce", "enforce", "warn", "off"]))))
    return tuple(rules)


@st.composite
def namespace_tables(draw):
    table = {}
    for name in ("ns1", "ns2", "kube-system"):
        pool = draw(st.one_of(pools, st.just("")))  # "": opted out
        labels = {"agentpool": pool, "example.com/pool": pool}
        allowed = draw(st.lists(pools, max_size=3))
        table[name] = Namespace(labels, {"poolkeeper.io/allowed-pools": ",".join(allowed)}) \
            if allowed else labels
    table["plain"] = {}
    return table


node_pools = st.one_of(st.none(), st.dictionaries(pools, st.integers(0, 2), max_size=4))


def pool_rule(rules):
    return next(r.policy for r in rules if r.kind_name == "PoolPlacement")


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(objects(), rule_sets(), namespace_tables(), node_pools)
def test_properties_patch_applies_and_second_pass_changes_nothing(obj, rules, namespaces, nodes):
    original = copy.deepcopy(obj)
    request = make_request(obj)
    node_lookup = (lambda key: nodes) if nodes is not None else None
    response = admit(request, namespaces.get, rules, node_lookup).response
    assert request.object == original, "the decision must not change the request"
    if not response.allowed:
        assert response.code == 403 and response.patch == ()
        # Denials are stable: the same object is denied again.
        assert not admit(make_request(obj), namespaces.get, rules,
                         node_lookup).response.allowed
        return
    assert all(len(w) < 120 for w in response.warnings)
    result = jsonpatch.apply_patch(obj, list(response.patch))
    again = admit(make_request(result), namespaces.get, rules, node_lookup).response
    assert again.allowed and again.patch == (), "a second pass must change nothing"
    if obj["kind"] == "Namespace":
        return
    # The pool rule only ever touches its own keys (the pool key and the pools' node labels):
    # every other selector key survives.
    path = ("spec",) if obj["kind"] == "Pod" else ("spec", "template", "spec")
    before, after = original, result
    for token in path:
        before, after = before[token], after[token]
    rule = pool_rule(rules)
    own = {rule.node_label_key, *(k for p in rule.pools.values() for k in p.node_labels)}
    kept = before.get("nodeSelector") or {}
    now = after.get("nodeSelector") or {}
    assert {k: v for k, v in now.items() if k not in own} == \
        {k: v for k, v in kept.items() if k not in own}
    # Tolerations are only ever added, after the pod's own, never removed or replaced; and a
    # pinned pod has every toleration of its pool (the pool its nodeSelector names).
    had, has = before.get("tolerations") or [], after.get("tolerations") or []
    assert has[:len(had)] == had
    assert all(op["op"] == "add" for op in response.patch if "/tolerations" in op["path"])
    pinned = now.get(rule.node_label_key)
    if pinned is not None and pinned != kept.get(rule.node_label_key):
        identities = {_identity(t) for t in has}
        spec = rule.pools.get(pinned)
        assert spec is None or {_identity(t) for t in spec.tolerations} <= identities


def _identity(toleration):
    """The test's own reading of what makes tolerations the same (key, operator, value, effect)."""
    return (toleration.get("key") or "", toleration.get("operator") or "Equal",
            toleration.get("value") or "", toleration.get("effect") or "")


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(objects(), rule_sets(), namespace_tables())
def test_properties_warn_mode_never_patches_or_denies(obj, rules, namespaces):
    warned = tuple(dataclasses.replace(r, enforcement="warn") for r in rules)
    enforced = tuple(dataclasses.replace(r, enforcement="enforce") for r in rules)
    nodes = lambda key: {}  # noqa: E731 - no pool has nodes
    response = admit(make_request(obj), namespaces.get, warned, nodes).response
    assert response.allowed and response.patch == ()
    strict = admit(make_request(obj), namespaces.get, enforced, nodes).response
    if strict.patch or not strict.allowed:
        assert any("would" in w for w in response.warnings), "each effect must be announced"
