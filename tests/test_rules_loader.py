"""Loading rules/*.yaml: every invalid field named with its file, and hot reload of the directory."""

from __future__ import annotations

import logging
import os
import shutil

import pytest

from app.rules import SHIPPED_RULES, RulesError, RuleStore, load_rule_set, load_rules
from app.watch import FileWatcher

from .support import ROOT

VALID = """\
name: {name}
description: test rule
kind: ImagePullPolicy
webhook: defaults
enforcement: enforce
match:
  kinds: [Pod]
  operations: [CREATE]
  objectSelector:
    matchLabels: {{platform: "true"}}
    matchExpressions:
    - {{key: tier, operator: In, values: [web]}}
  namespaceSelector:
    matchExpressions:
    - {{key: team, operator: Exists}}
  excludedNamespaces: [kube-system]
params:
  policy: Always
"""


def write(directory, name, text):
    path = directory / f"{name}.yaml"
    path.write_text(text)
    return path


def test_rules_loader_loads_the_shipped_rules():
    rules = load_rules(SHIPPED_RULES)
    assert [r.name for r in rules] == ["agentpool-node-selector", "image-pull-policy",
                                       "namespace-labels", "remove-cpu-limits"]
    assert {r.webhook for r in rules} == {"placement", "defaults", "namespaces"}
    for rule in rules:
        assert rule.description and rule.enforcement == "enforce"
        assert {"kube-system", "kube-public", "kube-node-lease",
                "poolkeeper-system"} <= rule.match.excluded_namespaces


def test_rules_loader_parses_selectors_and_defaults(tmp_path):
    write(tmp_path, "pull", VALID.format(name="pull"))
    write(tmp_path, "minimal", "name: minimal\nkind: RemoveResourceLimits\n")
    minimal, pull = load_rules(tmp_path)
    assert minimal.match.operations == {"CREATE"} and minimal.enforcement == "enforce"
    assert minimal.match.excluded_namespaces == {"kube-system", "kube-public", "kube-node-lease",
                                                 "poolkeeper-system"}
    assert minimal.policy.resources == ("cpu",)
    assert pull.match.object_selector.matches({"platform": "true", "tier": "web"})
    assert not pull.match.object_selector.matches({"platform": "true", "tier": "db"})
    assert pull.match.namespace_selector.matches({"team": "x"})
    assert not pull.match.namespace_selector.matches({})


@pytest.mark.parametrize("replace, expected", [
    (("kind: ImagePullPolicy", "kind: Teleport"), "kind: 'Teleport' is not one of PoolPlacement"),
    (("description: test rule", "colour: blue"), "colour: unknown field; allowed: name"),
    (("enforcement: enforce", "enforcement: maybe"), "enforcement: 'maybe' is not one of enforce"),
    (("webhook: defaults", "webhook: other"), "webhook: 'other' is not one of placement"),
    (("description: test rule", "description: [1]"), "description: must be a string"),
    (("policy: Always", "policy: Sometimes"), "params.policy: 'Sometimes' is not one of Always"),
    (("policy: Always", "colour: Always"), "params.colour: unknown param of ImagePullPolicy"),
    (("kinds: [Pod]", "kinds: [Deployment]"), "match.kinds: 'Deployment' is not one of Pod"),
    (("kinds: [Pod]", "kinds: Pod"), "match.kinds: must be a list of strings"),
    (("operations: [CREATE]", "operations: [DELETE]"), "match.operations: 'DELETE' is not one"),
    (("  excludedNamespaces: [kube-system]", "  labels: {}"), "match.labels: unknown field"),
    (("matchLabels: {platform: \"true\"}", "matchLabels: {platform: [x]}"),
     "match.objectSelector.matchLabels: ['x'] is not a label value"),
    (("matchLabels: {platform: \"true\"}", "matchLabels: [x]"),
     "match.objectSelector.matchLabels: must be a map"),
    (("    matchLabels:", "    matchFields:"), "match.objectSelector.matchFields: unknown field"),
    (("operator: In, values: [web]", "operator: Near, values: [web]"),
     "matchExpressions[0].operator: 'Near' is not one of In"),
    (("operator: In, values: [web]", "operator: In, values: []"), "In needs at least one value"),
    (("operator: In, values: [web]", "operator: In, values: [1]"), "must be a list of strings"),
    (("{key: team, operator: Exists}", "{key: team, operator: Exists, values: [a]}"),
     "Exists takes no values"),
    (("{key: team, operator: Exists}", "{key: 'bad key', operator: Exists}"),
     "matchExpressions[0].key: 'bad key' is not a label key"),
    (("    - {key: team, operator: Exists}", "    - team"), "must be a mapping with key"),
    (("  namespaceSelector:\n    matchExpressions:\n    - {key: team, operator: Exists}",
      "  namespaceSelector: team"), "match.namespaceSelector: must be a label selector"),
    (("  namespaceSelector:\n    matchExpressions:\n    - {key: team, operator: Exists}",
      "  namespaceSelector: {matchExpressions: x}"), "matchExpressions: must be a list"),
    (("params:\n  policy: Always", "params: [1]"), "params: must be a mapping"),
    (("match:\n", "match: 3\nignored:\n"), "match: must be a mapping"),
])
def test_rules_loader_names_file_field_and_allowed_values(tmp_path, replace, expected):
    text = VALID.format(name="broken")
    assert replace[0] in text
    path = write(tmp_path, "broken", text.replace(*replace))
    with pytest.raises(RulesError) as info:
        load_rules(tmp_path)
    assert str(path) in str(info.value) and expected in str(info.value)


@pytest.mark.parametrize("text, expected", [
    ("name: other\nkind: ImagePullPolicy\n", "name: 'other' must equal the file name 'rule'"),
    ("name: Rule_1\nkind: ImagePullPolicy\n", "must be a kebab-case name"),
    ("- a\n", "must hold one YAML mapping"),
    ("a: [\n", "cannot be read as YAML"),
    ("name: rule\nkind: PoolPlacement\nparams: {nodeLabelKey: 'a b', defaultPool: ''}\n",
     "params.nodeLabelKey: 'a b' is not a label key"),
    ("name: rule\nkind: PoolPlacement\nparams: {defaultPool: ''}\n", "use null"),
    ("name: rule\nkind: PoolPlacement\nparams: {defaultPool: 'x y'}\n", "is not a label value"),
    ("name: rule\nkind: NamespaceLabels\nparams: {labels: {}}\n", "non-empty map"),
    ("name: rule\nkind: NamespaceLabels\nparams: {labels: {'a b': c}}\n", "is not a label key"),
    ("name: rule\nkind: NamespaceLabels\nparams: {namePattern: '('}\n", "not a valid regular"),
    ("name: rule\nkind: NamespaceLabels\nparams: {namePattern: 5}\n", "must be a regular"),
    ("name: rule\nkind: RemoveResourceLimits\nparams: {resources: []}\n", "non-empty list"),
    ("name: rule\nkind: RemoveResourceLimits\nparams: {resources: ['a b']}\n", "non-empty list"),
    ("name: rule\nkind: PoolPlacement\nwebhook: defaults\n",
     "webhook: 'defaults': PoolPlacement rules run on placement"),
    ("name: rule\nkind: RemoveResourceLimits\nmatch: {excludedNamespaces: [Kube_System]}\n",
     "match.excludedNamespaces: 'Kube_System' is not a namespace name"),
    ("name: rule\nkind: RemoveResourceLimits\ndocsURL: http://example.com/x\n",
     "docsURL: 'http://example.com/x' is not an https URL"),
    ("name: rule\nkind: RemoveResourceLimits\ndocsURL: 'https://example.com/a b'\n",
     "is not an https URL"),
    ("name: rule\nkind: RemoveResourceLimits\ntemplateWarnings: 'yes'\n",
     "templateWarnings: must be true or false"),
    ("name: rule\nkind: PoolPlacement\ntemplateWarnings: false\n",
     "templateWarnings: applies to rule kinds that act on pods only; PoolPlacement does not"),
])
def test_rules_loader_rejects_bad_files(tmp_path, text, expected):
    write(tmp_path, "rule", text)
    with pytest.raises(RulesError, match="rule.yaml") as info:
        load_rules(tmp_path)
    assert expected in str(info.value)


POOL_RULE = "name: rule\nkind: PoolPlacement\nparams:\n  {}\n"
SPOT = "{key: kubernetes.azure.com/scalesetpriority, value: spot, effect: NoSchedule}"


@pytest.mark.parametrize("params, expected", [
    ("pools: [spot]", "params.pools: must be a map of pool names"),
    ("pools: {'a b': {}}", "params.pools: 'a b' is not a pool name"),
    ("pools: {'': {}}", "params.pools: '' is not a pool name"),
    ("pools: {spot: [x]}", "params.pools: spot: must be a map with tolerations and nodeLabels"),
    ("pools: {spot: {taints: []}}", "params.pools: spot.taints: unknown field; allowed: "
                                    "tolerations, nodeLabels"),
    ("pools: {spot: {tolerations: {key: a}}}", "spot.tolerations: must be a list of tolerations"),
    ("pools: {spot: {tolerations: [a]}}", "spot.tolerations[0]: must be a toleration (key, "),
    ("pools: {spot: {tolerations: [{key: a, colour: b}]}}", "spot.tolerations[0]: 'colour': "
                                                            "unknown field"),
    ("pools: {spot: {tolerations: [{key: 'a b'}]}}", "spot.tolerations[0]: key: 'a b' is not a "
                                                     "label key"),
    ("pools: {spot: {tolerations: [{key: a, operator: Lt}]}}", "operator: 'Lt' is not one of "
                                                               "Equal, Exists"),
    ("pools: {spot: {tolerations: [{value: x}]}}", "an empty key needs operator Exists"),
    ("pools: {spot: {tolerations: [{key: a, operator: Exists, value: x}]}}",
     "value: operator Exists takes no value, not 'x'"),
    ("pools: {spot: {tolerations: [{key: a, value: 'x y'}]}}", "value: 'x y' is not a label value"),
    ("pools: {spot: {tolerations: [{key: a, effect: NoSchedul}]}}",
     "effect: 'NoSchedul' is not one of NoSchedule, PreferNoSchedule, NoExecute"),
    ("pools: {spot: {tolerations: [{key: a, effect: NoExecute, tolerationSeconds: '5'}]}}",
     "tolerationSeconds: '5' is not a whole number"),
    ("pools: {spot: {tolerations: [{key: a, effect: NoExecute, tolerationSeconds: true}]}}",
     "tolerationSeconds: True is not a whole number"),
    ("pools: {spot: {tolerations: [{key: a, effect: NoSchedule, tolerationSeconds: 5}]}}",
     "tolerationSeconds: only with effect NoExecute"),
    ("pools: {gpu: {nodeLabels: [a]}}", "params.pools: gpu.nodeLabels: must be a map"),
    ("pools: {gpu: {nodeLabels: {'a b': c}}}", "gpu.nodeLabels: 'a b' is not a label key"),
    ("pools: {gpu: {nodeLabels: {a: [c]}}}", "gpu.nodeLabels: ['c'] is not a label value"),
    ("pools: {gpu: {nodeLabels: {agentpool: gpu}}}",
     "params.pools: gpu.nodeLabels: 'agentpool' is nodeLabelKey"),
    ("onlyListedPools: true", "params.onlyListedPools: true needs the pools listed in pools"),
    ("onlyListedPools: 'yes'", "params.onlyListedPools: 'yes' is not true or false"),
    ("{onlyListedPools: true, pools: {spot: }, defaultPool: general}",
     "params.defaultPool: 'general' is not in pools, and onlyListedPools is true"),
    ("unknownPools: enforce", "params.unknownPools: 'enforce' is not one of warn, deny, off"),
    ("allowedPoolsAnnotation: example.com/allowed-pools",
     "params.allowedPoolsAnnotation: 'example.com/allowed-pools' is not an annotation key under "
     "poolkeeper.io/"),
    ("allowedPoolsAnnotation: 'poolkeeper.io/a b'", "is not an annotation key under"),
])
def test_rules_loader_pool_params_name_file_field_and_fix(tmp_path, params, expected):
    write(tmp_path, "rule", POOL_RULE.format(params))
    with pytest.raises(RulesError) as info:
        load_rules(tmp_path)
    assert f"{tmp_path / 'rule.yaml'}: " in str(info.value) and expected in str(info.value)


def test_rules_loader_pool_params_accept_core_v1_tolerations(tmp_path):
    params = ("{pools: {spot: {tolerations: [" + SPOT + ", {operator: Exists}, "
              "{key: a, operator: '', value: b, effect: NoExecute, tolerationSeconds: 30}, "
              "{key: c, value: null}]}, gpu: {nodeLabels: {kubernetes.io/arch: amd64}}, plain: }, "
              "onlyListedPools: true, defaultPool: plain, allowedPoolsAnnotation: null, "
              "unknownPools: deny}")
    write(tmp_path, "rule", POOL_RULE.format(params))
    (rule,) = load_rules(tmp_path)
    policy = rule.policy
    assert [len(p.tolerations) for p in policy.pools.values()] == [4, 0, 0]
    assert policy.pools["gpu"].node_labels == {"kubernetes.io/arch": "amd64"}
    assert policy.allowed_pools_annotation is None and policy.unknown_pools == "deny"


def test_rules_loader_serves_a_pool_rules_namespaces_on_the_namespaces_webhook(tmp_path):
    from app.rules.loader import by_webhook

    write(tmp_path, "all", "name: all\nkind: PoolPlacement\n")
    write(tmp_path, "pods", "name: pods\nkind: PoolPlacement\nmatch: {kinds: [Pod]}\n")
    write(tmp_path, "ns", "name: ns\nkind: PoolPlacement\nmatch: {kinds: [Namespace]}\n")
    write(tmp_path, "labels", "name: labels\nkind: NamespaceLabels\n")
    rules = load_rules(tmp_path)
    served = {webhook: [(r.name, sorted(k for _, k in r.match.kinds)) for r in on]
              for webhook, on in by_webhook(rules).items()}
    assert served["namespaces"] == [("all", ["Namespace"]), ("labels", ["Namespace"]),
                                    ("ns", ["Namespace"])]
    assert [name for name, _ in served["placement"]] == ["all", "pods"]
    assert "Namespace" not in served["placement"][0][1] and "Pod" in served["placement"][0][1]
    assert served["defaults"] == []
    assert by_webhook(rules)["namespaces"][2] is rules[2]  # served whole when nothing moves


def test_rules_loader_reports_every_problem_at_once(tmp_path):
    write(tmp_path, "one", "name: one\nkind: Nope\n")
    write(tmp_path, "two", "name: two\nkind: ImagePullPolicy\nenforcement: loud\n")
    with pytest.raises(RulesError) as info:
        load_rules(tmp_path)
    message = str(info.value)
    assert "one.yaml: kind" in message and "two.yaml: enforcement" in message


def test_rules_loader_defaults_each_kind_to_its_webhook(tmp_path):
    for name, kind in (("pool", "PoolPlacement"), ("ns", "NamespaceLabels"),
                       ("pull", "ImagePullPolicy"), ("limits", "RemoveResourceLimits")):
        write(tmp_path, name, f"name: {name}\nkind: {kind}\n")
    webhooks = {rule.name: rule.webhook for rule in load_rules(tmp_path)}
    assert webhooks == {"pool": "placement", "ns": "namespaces", "pull": "defaults",
                        "limits": "defaults"}


def test_rules_loader_needs_a_directory_with_rules(tmp_path):
    with pytest.raises(RulesError, match="does not exist"):
        load_rules(tmp_path / "missing")
    (tmp_path / ".hidden.yaml").write_text("name: x\n")
    (tmp_path / "notes.txt").write_text("")
    with pytest.raises(RulesError, match="holds no rule files"):
        load_rules(tmp_path)


def reloads() -> dict[str, float]:
    """poolkeeper_rules_reload_total by result, in this process."""
    from prometheus_client import REGISTRY

    return {result: REGISTRY.get_sample_value("poolkeeper_rules_reload_total",
                                              {"result": result}) or 0.0
            for result in ("success", "failure")}


def reloaded_since(before: dict[str, float]) -> dict[str, float]:
    after = reloads()
    return {result: after[result] - before[result] for result in after}


def test_rules_store_reloads_a_changed_directory(tmp_path):
    shutil.copytree(SHIPPED_RULES, tmp_path / "rules")
    watcher = FileWatcher()
    before = reloads()
    store = RuleStore(tmp_path / "rules", watcher=watcher)
    assert store.rules("placement")[0].enforcement == "enforce"
    path = tmp_path / "rules/agentpool-node-selector.yaml"
    path.write_text(path.read_text().replace("enforcement: enforce", "enforcement: warn"))
    assert store.rules("placement")[0].enforcement == "enforce", "only the watcher reloads"
    watcher.check()
    assert store.rules("placement")[0].enforcement == "warn"
    assert reloaded_since(before) == {"success": 1, "failure": 0}
    assert [r.name for r in store.rules("defaults")] == ["image-pull-policy", "remove-cpu-limits"]
    assert len(store.rules()) == 4


def test_rules_store_keeps_the_running_set_when_a_change_is_invalid(tmp_path, caplog):
    shutil.copytree(SHIPPED_RULES, tmp_path / "rules")
    watcher = FileWatcher()
    before = reloads()
    store = RuleStore(tmp_path / "rules", watcher=watcher)
    path = tmp_path / "rules/image-pull-policy.yaml"
    path.write_text(path.read_text().replace("policy: Always", "policy: Sometimes"))
    with caplog.at_level(logging.ERROR, "poolkeeper.rules"):
        watcher.check()  # this pass reloads (and refuses) the change
        rules = store.rules()
        watcher.check()  # unchanged since: not reported again
    assert len(rules) == 4 and rules[1].policy.policy == "Always"
    assert reloaded_since(before) == {"success": 0, "failure": 1}
    assert len(caplog.records) == 1 and "params.policy" in caplog.records[0].getMessage()
    path.write_text(path.read_text().replace("policy: Sometimes", "policy: Never"))
    watcher.check()
    assert store.rules()[1].policy.policy == "Never"


def test_rules_store_follows_a_configmap_symlink_swap(tmp_path):
    """A ConfigMap volume: rule.yaml -> ..data/rule.yaml, ..data -> ..<timestamp> swapped."""
    volume = tmp_path / "volume"
    volume.mkdir()
    first = volume / "..2026_01_01"
    shutil.copytree(SHIPPED_RULES, first)
    os.symlink(first.name, volume / "..data")
    for name in os.listdir(first):
        os.symlink(f"..data/{name}", volume / name)
    watcher = FileWatcher()
    store = RuleStore(volume, watcher=watcher)
    second = volume / "..2026_01_02"
    shutil.copytree(SHIPPED_RULES, second)
    rule = second / "remove-cpu-limits.yaml"
    rule.write_text(rule.read_text().replace("resources: [cpu]", "resources: [cpu, memory]"))
    os.symlink(second.name, volume / "..data_tmp")
    os.replace(volume / "..data_tmp", volume / "..data")
    watcher.check()
    assert store.rules()[3].policy.resources == ("cpu", "memory")


def test_rules_store_survives_a_vanished_directory(tmp_path, caplog):
    shutil.copytree(SHIPPED_RULES, tmp_path / "rules")
    watcher = FileWatcher()
    before = reloads()
    store = RuleStore(tmp_path / "rules", watcher=watcher)
    shutil.rmtree(tmp_path / "rules")
    with caplog.at_level(logging.ERROR, "poolkeeper.rules"):
        watcher.check()
        assert len(store.rules()) == 4
    assert reloaded_since(before)["failure"] == 1


def test_rules_digest_is_the_content_not_the_layout(tmp_path):
    shutil.copytree(SHIPPED_RULES, tmp_path / "rules")
    shipped = load_rule_set(SHIPPED_RULES)
    assert [r.name for r in shipped.rules] == [r.name for r in load_rules(SHIPPED_RULES)]
    assert len(shipped.digest) == 64 and int(shipped.digest, 16) >= 0  # sha256, hex
    path = tmp_path / "rules/image-pull-policy.yaml"
    text = path.read_text()
    # comments, key order and flow style do not change what is enforced, nor the digest
    path.write_text("# a comment\n" + text.replace("policy: Always", "policy: 'Always'"))
    assert load_rule_set(tmp_path / "rules").digest == shipped.digest
    path.write_text(text.replace("policy: Always", "policy: IfNotPresent"))
    changed = load_rule_set(tmp_path / "rules").digest
    assert changed != shipped.digest
    path.write_text(text)
    (tmp_path / "rules/remove-cpu-limits.yaml").unlink()
    assert load_rule_set(tmp_path / "rules").digest not in (shipped.digest, changed)


def test_rules_store_reports_the_digest_and_when_it_loaded_it(tmp_path):
    shutil.copytree(SHIPPED_RULES, tmp_path / "rules")
    watcher = FileWatcher()
    now = [1000.0]
    store = RuleStore(tmp_path / "rules", watcher=watcher, clock=lambda: now[0])
    assert (store.digest, store.loaded_at) == (load_rule_set(SHIPPED_RULES).digest, 1000.0)
    path = tmp_path / "rules/agentpool-node-selector.yaml"
    path.write_text(path.read_text().replace("enforcement: enforce", "enforcement: warn"))
    now[0] = 1060.0
    watcher.check()
    assert store.loaded_at == 1060.0
    assert store.digest == load_rule_set(tmp_path / "rules").digest != \
        load_rule_set(SHIPPED_RULES).digest
    path.write_text(path.read_text().replace("enforcement: warn", "enforcement: bogus"))
    now[0] = 1120.0
    watcher.check()  # refused: the set in force, its digest and its load time stay
    assert store.loaded_at == 1060.0 and store.rules("placement")[0].enforcement == "warn"


def test_rules_shipped_directory_is_the_repository_rules():
    assert SHIPPED_RULES == ROOT / "rules"


@pytest.mark.parametrize("operator, values, labels, expected", [
    ("In", {"a"}, {"k": "a"}, True), ("In", {"a"}, {}, False),
    ("NotIn", {"a"}, {"k": "b"}, True), ("NotIn", {"a"}, {}, True), ("NotIn", {"a"}, {"k": "a"}, False),
    ("Exists", set(), {"k": ""}, True), ("Exists", set(), {}, False),
    ("DoesNotExist", set(), {}, True), ("DoesNotExist", set(), {"k": "a"}, False),
])
def test_rules_label_selector_operators(operator, values, labels, expected):
    from app.rules import Requirement

    assert Requirement("k", operator, frozenset(values)).matches(labels) is expected


def test_rules_loader_reads_an_unquoted_off_as_off(tmp_path):
    write(tmp_path, "rule", "name: rule\nkind: NamespaceLabels\nenforcement: off\n"
                            "params: {namePatternEnforcement: off}\n")
    (rule,) = load_rules(tmp_path)
    assert rule.enforcement == "off" and rule.policy.name_pattern_enforcement == "off"
