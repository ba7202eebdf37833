"""The pool rule through the pure decision: admit(request, namespace lookup, rules)."""

from __future__ import annotations

import copy

import jsonpatch
import pytest

from app.admission import admit
from app.namespaces import Namespace
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


# -- pools: tolerations and node labels, allowed pools, opt-out, pools that exist -------------------

SPOT = {"key": "kubernetes.azure.com/scalesetpriority", "operator": "Equal", "value": "spot",
        "effect": "NoSchedule"}
GPU = {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
POOLS = {"spot": {"tolerations": [SPOT]},
         "gpu": {"tolerations": [GPU], "nodeLabels": {"kubernetes.io/arch": "amd64"}},
         "pool2": None}
POOL_NAMESPACES = {
    "batch": {"agentpool": "spot"},
    "ml": {"agentpool": "gpu"},
    "team-a": {"agentpool": "pool1"},
    "shared": Namespace({"agentpool": "pool1"},
                        {"poolkeeper.io/allowed-pools": " gpu, ,spot,not a pool,pool1"}),
    "opted-out": {"agentpool": ""},
    "plain": {},
}


def pools(**params):
    return pool_rules(pools=POOLS, **params)


def decide_pools(obj, operation="CREATE", rules=None, namespaces=POOL_NAMESPACES, **kw):
    return decide(make_request(obj, operation, **kw), rules or pools(), namespaces)


def test_pool_rule_pod_in_a_tainted_pool_gets_its_tolerations_in_one_add():
    obj = pod(namespace="batch")
    response = decide_pools(obj)
    assert response.patch == (
        {"op": "add", "path": "/spec/nodeSelector", "value": {"agentpool": "spot"}},
        {"op": "add", "path": "/spec/tolerations", "value": [SPOT]})
    again = decide_pools(mutated(obj, response))
    assert again.allowed and again.patch == ()


def test_pool_rule_tolerations_are_added_after_the_pods_own_never_replacing_them():
    own = [{"key": "node.kubernetes.io/not-ready", "operator": "Exists", "effect": "NoExecute",
            "tolerationSeconds": 300}]
    obj = pod(namespace="ml", tolerations=list(own))
    response = decide_pools(obj)
    assert {"op": "add", "path": "/spec/tolerations/-", "value": GPU} in response.patch
    assert not any(op["op"] in ("replace", "remove") for op in response.patch)
    assert mutated(obj, response)["spec"]["tolerations"] == [*own, GPU]


@pytest.mark.parametrize("existing", [
    SPOT,
    {"key": "kubernetes.azure.com/scalesetpriority", "value": "spot", "effect": "NoSchedule"},
    {**SPOT, "operator": ""},
    {**SPOT, "tolerationSeconds": 60},  # not part of what makes a toleration the same
])
def test_pool_rule_a_toleration_the_pod_has_is_not_added_again(existing):
    response = decide_pools(pod({"agentpool": "spot"}, namespace="batch", tolerations=[existing]))
    assert response.allowed and response.patch == ()


@pytest.mark.parametrize("other", [
    {**SPOT, "effect": "NoExecute"}, {**SPOT, "value": "regular"},
    {"key": SPOT["key"], "operator": "Exists", "effect": "NoSchedule"}])
def test_pool_rule_a_different_toleration_is_kept_and_the_pools_added(other):
    response = decide_pools(pod({"agentpool": "spot"}, namespace="batch", tolerations=[other]))
    assert response.patch == ({"op": "add", "path": "/spec/tolerations/-", "value": SPOT},)


def test_pool_rule_pools_effects_and_audit_say_what_was_added():
    decision = admit(make_request(pod(namespace="ml")), POOL_NAMESPACES.get, pools())
    assert [a.detail for a in decision.actions] == [
        "set nodeSelector agentpool=gpu, kubernetes.io/arch=amd64",
        "add toleration nvidia.com/gpu:NoSchedule"]
    assert decision.response.audit_annotations["pool"] == "gpu"
    two = {"spot": {"tolerations": [SPOT, {"operator": "Exists"}, {"key": "a", "value": "b"}]}}
    decision = admit(make_request(pod({"agentpool": "spot"}, namespace="batch")),
                     POOL_NAMESPACES.get, pool_rules(pools=two))
    assert [a.detail for a in decision.actions] == [
        "add tolerations kubernetes.azure.com/scalesetpriority=spot:NoSchedule, every taint, a=b"]


def test_pool_rule_node_labels_of_the_pool_are_judged_like_the_pool_key():
    obj = pod({"kubernetes.io/arch": "amd64"}, namespace="ml")
    assert mutated(obj, decide_pools(obj))["spec"]["nodeSelector"] == {
        "kubernetes.io/arch": "amd64", "agentpool": "gpu"}
    denied = decide_pools(pod({"kubernetes.io/arch": "arm64"}, namespace="ml"))
    assert not denied.allowed
    assert ('pod spec.nodeSelector["kubernetes.io/arch"] is "arm64", but the nodes of pool "gpu" '
            'carry kubernetes.io/arch=amd64') in denied.message
    assert 'set it to "amd64"' in denied.message


def test_pool_rule_affinity_is_judged_against_the_pools_node_labels():
    arm = affinity({"matchExpressions": [expr("kubernetes.io/arch", "In", "arm64")]})
    denied = decide_pools(pod(namespace="ml", affinity=arm))
    assert not denied.allowed and "agentpool=gpu, kubernetes.io/arch=amd64" in denied.message
    assert decide_pools(pod(namespace="team-a", affinity=arm)).allowed  # pool1 has no such label
    weird = affinity({"matchExpressions": [{"key": ["x"], "operator": "In", "values": ["y"]}]})
    assert decide_pools(pod(namespace="ml", affinity=weird)).allowed  # not a key: not the pool's


def test_pool_rule_pod_update_keeps_a_node_label_value_it_had_and_judges_a_change():
    old = pod({"agentpool": "gpu", "kubernetes.io/arch": "arm64"}, namespace="ml",
              schedulingGates=[{"name": "wait"}])
    new = copy.deepcopy(old)
    new["metadata"]["labels"] = {"x": "y"}
    response = decide_pools(new, "UPDATE", old=old)
    assert response.allowed and {"op": "add", "path": "/spec/tolerations", "value": [GPU]} in \
        response.patch  # a gated pod gets what is missing
    moved = copy.deepcopy(old)
    moved["spec"]["nodeSelector"]["kubernetes.io/arch"] = "s390x"
    assert not decide_pools(moved, "UPDATE", old=old).allowed


def test_pool_rule_pod_update_of_a_pool_key_from_before_pooling_adds_nothing():
    old = pod({"agentpool": "elsewhere"}, namespace="ml", schedulingGates=[{"name": "wait"}])
    response = decide_pools(copy.deepcopy(old), "UPDATE", old=old)
    assert response.allowed and response.patch == ()


def test_pool_rule_controller_template_is_judged_by_node_labels_and_never_patched():
    deployment = {"apiVersion": "apps/v1", "kind": "Deployment",
                  "metadata": {"name": "d", "namespace": "ml"},
                  "spec": {"template": {"spec": {"containers": [{"name": "c", "image": "x"}]}}}}
    response = decide_pools(deployment)
    assert response.allowed and response.patch == ()
    deployment["spec"]["template"]["spec"]["nodeSelector"] = {"kubernetes.io/arch": "arm64"}
    denied = decide_pools(deployment)
    assert not denied.allowed and "Deployment pod template spec.template.spec.nodeSelector" in \
        denied.message
    # an UPDATE that leaves the template's pool keys alone is not judged again
    changed = copy.deepcopy(deployment)
    changed["spec"]["template"]["spec"]["nodeSelector"]["disk"] = "ssd"
    assert decide_pools(changed, "UPDATE", old=deployment).allowed
    # one that changes its affinity is
    moved = copy.deepcopy(changed)
    moved["spec"]["template"]["spec"]["affinity"] = affinity(
        {"matchExpressions": [expr("agentpool", "In", "pool2")]})
    assert "could never be scheduled" in decide_pools(moved, "UPDATE", old=changed).message


def test_pool_rule_daemonset_template_gets_the_pools_tolerations():
    ds = load_yaml("pods/daemonset.yaml")
    response = decide_pools(ds, namespace="batch")
    assert {"op": "add", "path": "/spec/template/spec/tolerations", "value": [SPOT]} in \
        response.patch


def test_pool_rule_pod_may_choose_a_pool_its_namespace_allows():
    obj = pod({"agentpool": "gpu"}, namespace="shared")
    response = decide_pools(obj)
    assert response.allowed
    assert mutated(obj, response)["spec"] == {
        **obj["spec"], "nodeSelector": {"agentpool": "gpu", "kubernetes.io/arch": "amd64"},
        "tolerations": [GPU]}
    assert response.audit_annotations["pool"] == "gpu"
    own = decide_pools(pod(namespace="shared"))  # the namespace's pool stays the default
    assert own.patch == ({"op": "add", "path": "/spec/nodeSelector",
                          "value": {"agentpool": "pool1"}},)


@pytest.mark.parametrize("value", ["pool2", "not a pool"])
def test_pool_rule_pod_choosing_a_pool_not_allowed_is_denied_naming_the_allowed(value):
    response = decide_pools(pod({"agentpool": value}, namespace="shared"))
    assert not response.allowed
    assert ('or set it to "pool1" or to one of "gpu", "spot" (the pools its annotation '
            'poolkeeper.io/allowed-pools allows)') in response.message


def test_pool_rule_allowed_pools_are_named_up_to_five():
    many = {"many": Namespace({"agentpool": "p0"}, {
        "poolkeeper.io/allowed-pools": ",".join(f"p{i}" for i in range(1, 9))})}
    response = decide_pools(pod({"agentpool": "other"}, namespace="many"), namespaces=many)
    assert '"p5", ...' in response.message and '"p6"' not in response.message


def test_pool_rule_allowed_pools_annotation_can_be_turned_off_or_renamed():
    assert not decide_pools(pod({"agentpool": "gpu"}, namespace="shared"),
                            rules=pools(allowedPoolsAnnotation=None)).allowed
    assert not decide_pools(pod({"agentpool": "gpu"}, namespace="shared"),
                            rules=pools(allowedPoolsAnnotation="poolkeeper.io/more")).allowed
    plain = {"shared": {"agentpool": "pool1"}}  # a label-only lookup: no annotations
    assert not decide_pools(pod({"agentpool": "gpu"}, namespace="shared"),
                            namespaces=plain).allowed


def test_pool_rule_default_pool_namespace_may_allow_more_pools():
    namespaces = {"plain": Namespace({}, {"poolkeeper.io/allowed-pools": "spot"})}
    rules = pools(defaultPool="pool1")
    response = decide_pools(pod({"agentpool": "spot"}, namespace="plain"), rules=rules,
                            namespaces=namespaces)
    assert response.allowed and response.audit_annotations["pool"] == "spot"


def test_pool_rule_empty_pool_label_opts_out_even_with_a_default_pool():
    rules = pools(defaultPool="pool1")
    for obj in (pod(namespace="opted-out"), pod({"agentpool": "anything"}, namespace="opted-out"),
                pod(namespace="opted-out", nodeName="node-1")):
        response = decide_pools(obj, rules=rules)
        assert response.allowed and response.patch == ()
    assert decide_pools(pod(namespace="plain"), rules=rules).patch  # unlabelled: the default


@pytest.mark.parametrize("tolerations, fragment", [
    ("x", "spec.tolerations must be a list"),
    (["x"], "each of spec.tolerations must be an object"),
    ([{"key": 5}], "must be strings"),
])
def test_pool_rule_malformed_tolerations_raise_shape_errors(tolerations, fragment):
    with pytest.raises(ObjectShapeError, match=fragment):
        decide_pools(pod(namespace="batch", tolerations=tolerations))


def namespace_obj(name="team-new", pool="pol1", **labels):
    if pool is not None:
        labels["agentpool"] = pool
    return {"apiVersion": "v1", "kind": "Namespace",
            "metadata": {"name": name, "labels": {"kubernetes.io/metadata.name": name, **labels}}}


NODE_POOLS = {"agentpool": {"pool1": 2, "spot": 1, "gpu": 0}}


def judge_namespace(obj, operation="CREATE", rules=None, nodes=NODE_POOLS.get, **kw):
    return admit(make_request(obj, operation, **kw), {}.get, rules or pools(), nodes).response


def test_pool_rule_namespace_labelled_with_a_pool_no_node_has_gets_a_warning():
    response = judge_namespace(namespace_obj())
    assert response.allowed and response.patch == ()
    assert response.warnings == (
        "[agentpool-node-selector] no node has agentpool=pol1: pods would stay Pending "
        "(pools with nodes: pool1, spot)",)
    assert judge_namespace(namespace_obj(pool="gpu")).warnings  # 0 nodes is no node


def test_pool_rule_namespace_labelled_with_a_pool_no_node_has_is_denied_with_unknown_pools_deny():
    response = judge_namespace(namespace_obj(), rules=pools(unknownPools="deny"))
    assert not response.allowed and response.code == 403
    assert response.message == (
        '[agentpool-node-selector] namespace "team-new": no node has agentpool=pol1: pods would '
        "stay Pending (pools with nodes: pool1, spot). Label it with a pool that exists, or set "
        "the label empty to opt out of pools")


@pytest.mark.parametrize("obj, rules", [
    (namespace_obj(pool="spot"), None),  # the pool has nodes
    (namespace_obj(pool=""), None),  # opted out
    (namespace_obj(pool=None), None),  # no pool
    (namespace_obj(pool="x" * 70), None),  # not a label value: the API server refuses it
    (namespace_obj(), pools(unknownPools="off")),
    (namespace_obj(name="kube-system"), None),  # excluded by name
])
def test_pool_rule_namespace_without_an_unknown_pool_is_left_alone(obj, rules):
    response = judge_namespace(obj, rules=rules)
    assert response.allowed and response.warnings == () and response.patch == ()


def test_pool_rule_namespace_update_is_judged_only_when_the_pool_changes():
    old = namespace_obj(pool="retired")
    new = namespace_obj(pool="retired", tier="gold")
    assert judge_namespace(new, "UPDATE", old=old).warnings == ()
    moved = judge_namespace(namespace_obj(pool="pool9"), "UPDATE", old=old)
    assert "agentpool=pool9" in moved.warnings[0]


def test_pool_rule_namespace_pools_are_not_checked_without_a_node_source():
    assert judge_namespace(namespace_obj(), nodes=None).warnings == ()


def test_pool_rule_namespace_pool_that_cannot_be_checked_now_gets_a_warning():
    response = judge_namespace(namespace_obj(), nodes=lambda key: None)
    assert response.allowed and response.warnings == (
        '[agentpool-node-selector] cannot check that pool pol1 has nodes: the nodes are not '
        'known now',)
    assert judge_namespace(namespace_obj(), rules=pools(unknownPools="deny"),
                           nodes=lambda key: None).allowed  # unknown is never a denial


def test_pool_rule_namespace_pools_with_nodes_are_named_up_to_five():
    nodes = {"agentpool": {f"p{i}": 1 for i in range(7)}}.get
    assert "(pools with nodes: p0, p1, p2, p3, p4, ...)." in judge_namespace(
        namespace_obj(), rules=pools(unknownPools="deny"), nodes=nodes).message
    assert judge_namespace(namespace_obj(), nodes={"agentpool": {}}.get).warnings[0].endswith(
        "(pools with nodes: none)")


def test_pool_rule_namespace_pool_must_be_listed_with_only_listed_pools():
    rules = pools(onlyListedPools=True)
    response = judge_namespace(namespace_obj(pool="pool1"), rules=rules)
    assert response.warnings == ("[agentpool-node-selector] pool pool1 is not one of this rule's "
                                 "pools (spot, gpu, pool2)",)
    # listed, but without nodes: the node check still runs
    assert "no node has agentpool=pool2" in judge_namespace(namespace_obj(pool="pool2"),
                                                            rules=rules).warnings[0]
    assert judge_namespace(namespace_obj(pool="spot"), rules=rules).warnings == ()


def test_pool_rule_namespace_pool_label_must_be_a_string():
    obj = namespace_obj()
    obj["metadata"]["labels"]["agentpool"] = 5
    with pytest.raises(ObjectShapeError, match="metadata.labels.agentpool must be a string"):
        judge_namespace(obj)
