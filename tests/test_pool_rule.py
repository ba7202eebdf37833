"""The pool rule through the pure decision: admit(request, namespace lookup, rules)."""

from __future__ import annotations

import copy

import jsonpatch
import pytest

from app.admission import admit
from app.patching import ObjectShapeError

from .support import load_yaml, make_request, pod, pool_rules

NAMESPACES = {
    "team-a": {"agentpool": "pool1"},
    "team-b": {"agentpool": "pool2"},
    "plain": {"kubernetes.io/metadata.name": "plain"},
    "kube-system": {"agentpool": "system"},
    "empty-label": {"agentpool": ""},
}
RULES = pool_rules()


def decide(request, rules=RULES, namespaces=NAMESPACES):
    return admit(request, namespaces.get, rules).response


def mutated(obj, response):
    return jsonpatch.apply_patch(obj, list(response.patch)) if response.patch else obj


def test_pool_rule_adds_selector_when_absent():
    response = decide(make_request(pod()))
    assert response.allowed
    assert response.patch == ({"op": "add", "path": "/spec/nodeSelector",
                               "value": {"agentpool": "pool1"}},)


def test_pool_rule_adds_only_the_key_beside_other_selectors():
    obj = pod({"kubernetes.io/os": "linux"})
    response = decide(make_request(obj))
    assert response.patch == ({"op": "add", "path": "/spec/nodeSelector/agentpool",
                               "value": "pool1"},)
    assert mutated(obj, response)["spec"]["nodeSelector"] == {
        "kubernetes.io/os": "linux", "agentpool": "pool1"}


def test_pool_rule_null_selector_is_replaced_by_a_map():
    obj = pod()
    obj["spec"]["nodeSelector"] = None
    response = decide(make_request(obj))
    assert mutated(obj, response)["spec"]["nodeSelector"] == {"agentpool": "pool1"}


def test_pool_rule_escapes_slashes_in_the_node_label_key():
    rules = pool_rules(nodeLabelKey="kubernetes.azure.com/agentpool")
    obj = pod({"kubernetes.io/os": "linux"})
    response = decide(make_request(obj), rules)
    assert response.patch == ({"op": "add", "path": "/spec/nodeSelector/kubernetes.azure.com~1agentpool",
                               "value": "pool1"},)
    assert mutated(obj, response)["spec"]["nodeSelector"]["kubernetes.azure.com/agentpool"] == "pool1"


def test_pool_rule_same_pool_is_allowed_without_patch():
    response = decide(make_request(pod({"agentpool": "pool1"})))
    assert response.allowed and response.patch == () and response.code is None


def test_pool_rule_other_pool_is_denied_with_the_fix():
    response = decide(make_request(pod({"agentpool": "pool2"})))
    assert not response.allowed and response.code == 403
    for part in ('"team-a"', '"pool1"', '"pool2"', "agentpool=pool1", "agentpool-node-selector",
                 "set it to", "agentpool=pool2"):
        assert part in response.message


def test_pool_rule_empty_selector_value_is_denied():
    response = decide(make_request(pod({"agentpool": ""})))
    assert not response.allowed and '""' in response.message


@pytest.mark.parametrize("namespace", ["plain", "missing", "empty-label"])
def test_pool_rule_unpooled_namespace_is_left_alone(namespace):
    response = decide(make_request(pod(namespace=namespace)))
    assert response.allowed and response.patch == ()


def test_pool_rule_default_pool_applies_to_unlabelled_namespaces():
    rules = pool_rules(defaultPool="general")
    response = decide(make_request(pod(namespace="plain")), rules)
    assert response.patch[0]["value"] == {"agentpool": "general"}
    denied = decide(make_request(pod({"agentpool": "pool2"}, namespace="plain")), rules)
    assert not denied.allowed and "default node pool" in denied.message


def test_pool_rule_excluded_namespace_is_left_alone_even_with_a_pool_label():
    response = decide(make_request(pod(namespace="kube-system")))
    assert response.allowed and response.patch == ()


def test_pool_rule_excluded_namespace_is_never_looked_up():
    looked_up = []
    response = admit(make_request(pod(namespace="kube-system")), looked_up.append, RULES).response
    assert response.allowed and looked_up == []
    admit(make_request(pod(namespace="team-a")), looked_up.append, RULES)
    assert looked_up == ["team-a"]


def test_pool_rule_namespace_taken_from_object_when_request_has_none():
    doc_request = make_request(pod(namespace="team-b"), namespace="")
    assert doc_request.namespace == ""
    assert decide(doc_request).patch[0]["value"] == {"agentpool": "pool2"}


def test_pool_rule_mirror_pods_are_never_touched():
    obj = pod({"agentpool": "pool9"}, nodeName="node-1")
    obj["metadata"]["annotations"] = {"kubernetes.io/config.mirror": "abc"}
    response = decide(make_request(obj))
    assert response.allowed and response.patch == ()


def test_pool_rule_node_name_is_denied():
    response = decide(make_request(pod(nodeName="node-7")))
    assert not response.allowed and "nodeName" in response.message and '"node-7"' in response.message


def test_pool_rule_every_problem_is_named_in_one_message():
    obj = pod({"agentpool": "pool2"}, nodeName="node-7")
    response = decide(make_request(obj))
    assert response.message.count("[agentpool-node-selector]") == 2


def affinity(*terms):
    return {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {
        "nodeSelectorTerms": list(terms)}}}


def expr(key, operator, *values):
    e = {"key": key, "operator": operator}
    if values:
        e["values"] = list(values)
    return e


@pytest.mark.parametrize("terms", [
    [{"matchExpressions": [expr("agentpool", "In", "pool2")]}],
    [{"matchExpressions": [expr("agentpool", "NotIn", "pool1")]}],
    [{"matchExpressions": [expr("agentpool", "DoesNotExist")]}],
    [{"matchExpressions": [expr("agentpool", "Gt", "5")]}],
    [{"matchExpressions": [expr("agentpool", "Bogus", "x")]}],
    [{}],  # an empty term matches no node
    [{"matchExpressions": [expr("agentpool", "In", "pool2")]}, {"matchExpressions": []}],
    [{"matchExpressions": [expr("agentpool", "Exists"), expr("agentpool", "In", "pool3")]}],
])
def test_pool_rule_affinity_that_excludes_the_pool_is_denied(terms):
    response = decide(make_request(pod(affinity=affinity(*terms))))
    assert not response.allowed and "could never be scheduled" in response.message


@pytest.mark.parametrize("terms", [
    [{"matchExpressions": [expr("agentpool", "In", "pool1", "pool2")]}],
    [{"matchExpressions": [expr("agentpool", "In", "pool2")]},
     {"matchExpressions": [expr("agentpool", "Exists")]}],
    [{"matchExpressions": [expr("agentpool", "NotIn", "pool2")]}],
    [{"matchExpressions": [expr("kubernetes.io/arch", "In", "arm64")]}],
    [{"matchFields": [expr("metadata.name", "In", "node-1")]}],
])
def test_pool_rule_affinity_that_allows_the_pool_gets_the_selector(terms):
    response = decide(make_request(pod(affinity=affinity(*terms))))
    assert response.allowed and response.patch[0]["value"] == {"agentpool": "pool1"}


def test_pool_rule_affinity_with_numeric_pools():
    obj = pod(affinity=affinity({"matchExpressions": [expr("agentpool", "Gt", "3")]}),
              namespace="numbered")
    namespaces = {"numbered": {"agentpool": "7"}}
    assert decide(make_request(obj), namespaces=namespaces).allowed
    obj = pod(affinity=affinity({"matchExpressions": [expr("agentpool", "Lt", "3")]}),
              namespace="numbered")
    assert not decide(make_request(obj), namespaces=namespaces).allowed


def test_pool_rule_empty_term_list_is_no_constraint():
    response = decide(make_request(pod(affinity=affinity())))
    assert response.allowed and response.patch


def test_pool_rule_pod_update_without_pool_change_is_untouched():
    old = pod()
    new = pod()
    new["metadata"]["labels"] = {"x": "y"}
    response = decide(make_request(new, "UPDATE", old=old))
    assert response.allowed and response.patch == ()


def test_pool_rule_pod_update_adding_the_right_pool_is_allowed():
    response = decide(make_request(pod({"agentpool": "pool1"}), "UPDATE", old=pod()))
    assert response.allowed and response.patch == ()


def test_pool_rule_pod_update_to_another_pool_is_denied():
    response = decide(make_request(pod({"agentpool": "pool2"}), "UPDATE", old=pod()))
    assert not response.allowed and '"pool2"' in response.message


def test_pool_rule_pod_update_removing_the_pool_key_puts_it_back():
    old = pod({"agentpool": "pool1", "disk": "ssd"})
    response = decide(make_request(pod({"disk": "ssd"}), "UPDATE", old=old))
    assert response.patch == ({"op": "add", "path": "/spec/nodeSelector/agentpool",
                               "value": "pool1"},)


def test_pool_rule_pod_update_of_a_scheduled_pod_does_not_judge_node_name():
    old = pod({"disk": "ssd"}, nodeName="node-1")
    new = pod({"disk": "ssd", "agentpool": "pool1"}, nodeName="node-1")
    assert decide(make_request(new, "UPDATE", old=old)).allowed


def test_pool_rule_subresources_are_left_alone():
    response = decide(make_request(pod({"agentpool": "pool2"}), "UPDATE", old=pod(),
                                   sub_resource="status"))
    assert response.allowed and response.patch == ()


def test_pool_rule_daemonset_template_gets_the_selector():
    ds = load_yaml("pods/daemonset.yaml")
    response = decide(make_request(ds, namespace="team-b"))
    assert response.patch == ({"op": "add", "path": "/spec/template/spec/nodeSelector",
                               "value": {"agentpool": "pool2"}},)


def test_pool_rule_daemonset_update_is_judged_in_full():
    ds = load_yaml("pods/daemonset.yaml")
    escaped = copy.deepcopy(ds)
    escaped["spec"]["template"]["spec"]["nodeSelector"] = {"agentpool": "pool1"}
    response = decide(make_request(escaped, "UPDATE", old=ds, namespace="team-b"))
    assert not response.allowed and "DaemonSet pod template" in response.message
    response = decide(make_request(ds, "UPDATE", old=ds, namespace="team-b"))
    assert response.patch[0]["path"] == "/spec/template/spec/nodeSelector"


@pytest.mark.parametrize("operation", ["DELETE", "CONNECT"])
def test_pool_rule_delete_and_connect_are_allowed_untouched(operation):
    response = decide(make_request(None, operation, old=pod({"agentpool": "pool2"})))
    assert response.allowed and response.patch == ()


def test_pool_rule_other_kinds_are_allowed_untouched():
    cm = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "x", "namespace": "team-a"}}
    response = decide(make_request(cm))
    assert response.allowed and response.patch == ()


def test_pool_rule_dry_run_gets_the_same_answer():
    assert decide(make_request(pod(), dry_run=True)) == decide(make_request(pod()))


def test_pool_rule_patch_applied_is_idempotent():
    obj = pod({"kubernetes.io/os": "linux"})
    once = mutated(obj, decide(make_request(obj)))
    again = decide(make_request(once))
    assert again.allowed and again.patch == ()


def test_pool_rule_request_object_is_not_mutated():
    obj = pod({"kubernetes.io/os": "linux"})
    request = make_request(obj)
    before = copy.deepcopy(request.object)
    decide(request)
    assert request.object == before


def test_pool_rule_deployment_pod_review_is_patched(deployment_pod_review):
    from app.review import parse_review

    request = parse_review(deployment_pod_review)
    response = decide(request, namespaces={"team-payments": {"agentpool": "pool1"}})
    assert response.patch == ({"op": "add", "path": "/spec/nodeSelector",
                               "value": {"agentpool": "pool1"}},)
    assert admit(request, {"team-payments": {"agentpool": "pool1"}}.get, RULES).rules == (
        "agentpool-node-selector",)


@pytest.mark.parametrize("spec, fragment", [
    ({"nodeSelector": ["agentpool"]}, "spec.nodeSelector must be an object"),
    ({"affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {
        "nodeSelectorTerms": "x"}}}}, "must be a list"),
    ({"affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {
        "nodeSelectorTerms": ["x"]}}}}, "must be an object"),
    ({"affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {
        "nodeSelectorTerms": [{"matchExpressions": ["x"]}]}}}}, "list of objects"),
    ({"affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {
        "nodeSelectorTerms": [{"matchExpressions": [
            {"key": "agentpool", "operator": "In", "values": 5}]}]}}}}, "list of strings"),
    # a string is not a list: "xpool1x" must not admit pool1 by substring
    ({"affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {
        "nodeSelectorTerms": [{"matchExpressions": [
            {"key": "agentpool", "operator": "In", "values": "xpool1x"}]}]}}}}, "list of strings"),
])
def test_pool_rule_malformed_objects_raise_shape_errors(spec, fragment):
    obj = pod()
    obj["spec"].update(spec)
    with pytest.raises(ObjectShapeError, match=fragment):
        decide(make_request(obj))


def test_pool_rule_metadata_annotations_must_be_a_map():
    obj = pod()
    obj["metadata"]["annotations"] = "nope"
    with pytest.raises(ObjectShapeError, match="metadata.annotations"):
        decide(make_request(obj))


def deployment(selector: dict | None = None, *, name: str = "web", **spec_extra) -> dict:
    template_spec: dict = {"containers": [{"name": "c", "image": "busybox:1.36"}], **spec_extra}
    if selector is not None:
        template_spec["nodeSelector"] = dict(selector)
    return {"apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": {"name": name, "namespace": "team-a"},
            "spec": {"selector": {"matchLabels": {"app": name}},
                     "template": {"metadata": {"labels": {"app": name}}, "spec": template_spec}}}


def controller_request(obj, operation="CREATE", old=None):
    from app.review import request_for

    return request_for(obj, old)


def test_pool_rule_controller_update_leaving_placement_alone_is_not_judged_again():
    # a Deployment from before its namespace was pooled keeps updating (replicas, labels)
    old = deployment({"agentpool": "pool2"})
    new = deployment({"agentpool": "pool2"})
    new["metadata"]["labels"] = {"team": "a"}
    response = decide(controller_request(new, old=old))
    assert response.allowed and response.patch == ()


def test_pool_rule_controller_update_changing_placement_is_judged_as_on_create():
    old = deployment()
    for changed in (deployment({"agentpool": "pool2"}), deployment(nodeName="node-7"),
                    deployment(affinity={"nodeAffinity": {
                        "requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
                            {"matchExpressions": [{"key": "agentpool", "operator": "In",
                                                   "values": ["pool2"]}]}]}}})):
        response = decide(controller_request(changed, old=old))
        assert not response.allowed and "Deployment pod template" in response.message
    same = decide(controller_request(deployment(), old=old))
    assert same.allowed and same.patch == ()  # never patched: only DaemonSet templates are
