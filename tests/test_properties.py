"""Properties over generated objects: patches apply cleanly, and a second pass changes nothing."""

from __future__ import annotations

import copy

import jsonpatch
from hypothesis import HealthCheck, given, settings, strategies as st

from app.admission import admit
from app.rules import PoolPlacement

from .support import make_request

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


@st.composite
def objects(draw):
    kind = draw(st.sampled_from(["Pod", "Pod", "DaemonSet"]))
    spec: dict = {"containers": [{"name": "c", "image": "busybox"}]}
    selector = draw(st.one_of(st.none(), st.dictionaries(keys, pools, max_size=3)))
    if selector is not None:
        spec["nodeSelector"] = selector
    aff = draw(affinity)
    if aff is not None:
        spec["affinity"] = aff
    if draw(st.booleans()) and draw(st.booleans()):
        spec["nodeName"] = "node-1"
    metadata = {"name": "x", "namespace": draw(st.sampled_from(["ns1", "ns2", "plain",
                                                                "kube-system"]))}
    if kind == "Pod" and draw(st.integers(0, 9)) == 0:
        metadata["annotations"] = {"kubernetes.io/config.mirror": "h"}
    if kind == "Pod":
        return {"apiVersion": "v1", "kind": "Pod", "metadata": metadata, "spec": spec}
    return {"apiVersion": "apps/v1", "kind": "DaemonSet", "metadata": metadata,
            "spec": {"selector": {}, "template": {"metadata": {}, "spec": spec}}}


rule_sets = st.builds(
    lambda ns_key, node_key, default: (PoolPlacement(
        namespace_label_key=ns_key, node_label_key=node_key, default_pool=default,
        excluded_namespaces=frozenset({"kube-system"})),),
    st.sampled_from(["agentpool", "example.com/pool"]),
    st.sampled_from(["agentpool", "kubernetes.azure.com/agentpool", "a~b"]),
    st.one_of(st.none(), pools))


@st.composite
def namespace_tables(draw):
    table = {}
    for name in ("ns1", "ns2", "kube-system"):
        pool = draw(pools)
        table[name] = {"agentpool": pool, "example.com/pool": pool}
    table["plain"] = {}
    return table


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(objects(), rule_sets, namespace_tables())
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
    result = jsonpatch.apply_patch(obj, list(response.patch))
    again = admit(make_request(result), namespaces.get, rules).response
    assert again.allowed and again.patch == (), "a second pass must change nothing"
    # Only the pool key may change: every other selector key survives.
    path = ("spec",) if obj["kind"] == "Pod" else ("spec", "template", "spec")
    before, after = original, result
    for token in path:
        before, after = before[token], after[token]
    rule = rules[0]
    kept = {k: v for k, v in (before.get("nodeSelector") or {}).items()}
    now = after.get("nodeSelector") or {}
    assert {k: v for k, v in now.items() if k != rule.node_label_key} == \
        {k: v for k, v in kept.items() if k != rule.node_label_key}
    if response.patch:
        pool = namespaces[obj["metadata"]["namespace"]].get(rule.namespace_label_key) or \
            rule.default_pool
        assert now[rule.node_label_key] == pool
