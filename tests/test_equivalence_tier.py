"""The equivalence tier: the webhook and `poolkeeper export`'s policies give the same answers.

Every golden case under testdata/rules/ (and the apiserver tier's scenarios, SCENARIOS below)
goes through one real API server (miniapiserver: k8s.io/apiserver with its MutatingAdmissionPolicy,
MutatingAdmissionWebhook and ValidatingAdmissionPolicy plugins; not kube-apiserver, see
../shared/tools/miniapiserver/README.md) twice, with the same rules in force:

- webhook: `poolkeeper serve` over TLS behind deploy/base/webhook.yaml, its caBundle the CA of
  `poolkeeper certs` (as tests/test_apiserver_tier.py does), no policy;
- policies: only the objects `poolkeeper export` prints for those rules, no webhook.

Each request is a dry run (the API server runs the whole admission chain and answers with the
object it would store, storing nothing). The answers compared: the object (all of it but the
server-set metadata), or the refusal (HTTP code and the rule's message, without the prefix each
engine's API server message has), and the warnings (without the policy's prefix). A difference
names the case and both answers.

Only the rule a case is filed under runs (its rule.yaml when it has one), as `poolkeeper test`
runs it; the scenarios run the shipped rule set. A rule `poolkeeper export` cannot express is
skipped with the reason; a part of one left out (a warning) is not compared, and said so.

One API server serves every case. Between phases the rules directory is swapped (poolkeeper
reloads it) and the admission objects are changed; a change counts as in force once sentinel
objects changed after it act (the API server loads each kind of object in the order it was
written), so no phase waits longer than it must.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import re
import subprocess
import sys
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import jsonpatch
import pytest
import requests
import yaml

from app.cases import Case, discover, load_case_rule
from app.export import Export, export_policies
from app.namespaces.file import parse_namespaces
from app.namespaces.source import Namespace
from app.rules import DEFAULT_EXCLUDED_NAMESPACES, PoolPlacement, Rule, load_rules
from integration.manifests import DEPLOY, kubectl, listed_files, render, with_ca_bundle

from .apiserver import MiniApiServer, apiserver_fixture
from .server import Server, free_port, start_server
from .support import ROOT, TESTDATA, wait_for

pytestmark = pytest.mark.apiserver

equivalence_apiserver = apiserver_fixture("equivalence_apiserver", scope="module")

SERVICE = "poolkeeper-system/poolkeeper:443"  # what deploy's webhooks call
ADMISSION = "/apis/admissionregistration.k8s.io/v1"
COLLECTIONS = {  # kind -> (collection path, namespaced)
    "Pod": ("/api/v1/namespaces/{ns}/pods", True),
    "DaemonSet": ("/apis/apps/v1/namespaces/{ns}/daemonsets", True),
    "Deployment": ("/apis/apps/v1/namespaces/{ns}/deployments", True),
    "ReplicaSet": ("/apis/apps/v1/namespaces/{ns}/replicasets", True),
    "StatefulSet": ("/apis/apps/v1/namespaces/{ns}/statefulsets", True),
    "ReplicationController": ("/api/v1/namespaces/{ns}/replicationcontrollers", True),
    "Job": ("/apis/batch/v1/namespaces/{ns}/jobs", True),
    "CronJob": ("/apis/batch/v1/namespaces/{ns}/cronjobs", True),
    "Namespace": ("/api/v1/namespaces", False),
    "Node": ("/api/v1/nodes", False),
    "ConfigMap": ("/api/v1/namespaces/{ns}/configmaps", True),
    "MutatingWebhookConfiguration": (f"{ADMISSION}/mutatingwebhookconfigurations", False),
    "MutatingAdmissionPolicy": (f"{ADMISSION}/mutatingadmissionpolicies", False),
    "MutatingAdmissionPolicyBinding": (f"{ADMISSION}/mutatingadmissionpolicybindings", False),
    "ValidatingAdmissionPolicy": (f"{ADMISSION}/validatingadmissionpolicies", False),
    "ValidatingAdmissionPolicyBinding": (f"{ADMISSION}/validatingadmissionpolicybindings",
                                         False),
}
# Set by the API server, different on every request.
SERVER_METADATA = ("uid", "creationTimestamp", "resourceVersion", "managedFields", "generation")
REFUSAL = re.compile(r"(?:admission webhook \"[^\"]+\" denied the request|"
                     r"ValidatingAdmissionPolicy '[^']+' with binding '[^']+' denied request): "
                     r"(?P<message>.*)$", re.S)
# The admission objects each sentinel vouches for: loaded by one plugin, in the order written.
FAMILIES = {"webhook": ("MutatingWebhookConfiguration",),
            "map": ("MutatingAdmissionPolicy", "MutatingAdmissionPolicyBinding"),
            "vap": ("ValidatingAdmissionPolicy", "ValidatingAdmissionPolicyBinding")}
POLICY_WARNING = re.compile(r"^Validation failed for ValidatingAdmissionPolicy '[^']+' with "
                            r"binding '[^']+': ")


# -- what runs --------------------------------------------------------------------------------


@dataclass
class Item:
    """One request to judge twice: a golden case or a scenario."""

    id: str
    obj: dict
    namespaces: dict[str, Namespace]  # namespace -> the labels and annotations it must have
    old: dict | None = None  # stored before the phases; the request is then an UPDATE
    case: Path | None = None  # a golden case's directory: its expectations are checked too
    expect: str = ""  # a scenario's: "denied", "changed" or "unchanged"
    nodes: list[dict] = field(default_factory=list)  # Node objects the case's rules may count
    renamed: dict[str, str] = field(default_factory=dict)  # its namespaces' names -> ours


@dataclass
class Group:
    """Items that run with the same rules in force."""

    name: str
    rule_files: dict[str, str]  # file name -> text
    items: list[Item] = field(default_factory=list)
    directory: Path = Path()  # holds rule_files
    export: Export | None = None
    rules: tuple[Rule, ...] = ()

    @property
    def namespace_only(self) -> bool:
        return all(i.obj["kind"] == "Namespace" for i in self.items)


def _yaml(path: Path):
    return yaml.safe_load(path.read_text())


def _separate_namespaces(items: list[Item]) -> None:
    """Cases give one namespace different labels or annotations (team-ml is pool1 in one, gpu in
    another), or create it, and one API server holds one of each: every further variant gets a
    name of its own (team-ml-v1), in the item's objects and, for its expectations, in its
    messages."""
    variants: dict[str, list[tuple]] = {}
    for item in items:  # a Namespace an item creates must not exist: it keeps its name
        name = item.obj["metadata"].get("name")
        if item.obj["kind"] == "Namespace" and item.old is None and name and \
                name not in (*DEFAULT_EXCLUDED_NAMESPACES, "default"):
            variants[name] = [("absent",)]
    for item in items:
        for name, namespace in list(item.namespaces.items()):
            seen = variants.setdefault(name, [])
            state = (sorted((k, v) for k, v in namespace.labels.items()
                            if k != "kubernetes.io/metadata.name"),
                     sorted(namespace.annotations.items()))
            if state not in seen:
                seen.append(state)
            number = seen.index(state)
            if number == 0:
                continue
            assert name not in DEFAULT_EXCLUDED_NAMESPACES, f"{item.id}: {name} cannot be renamed"
            new = f"{name}-v{number}"
            item.namespaces[new] = item.namespaces.pop(name)
            item.renamed[name] = new
            for obj in (item.obj, item.old):
                if obj is not None and obj["metadata"].get("namespace") == name:
                    obj["metadata"]["namespace"] = new


def _case_item(case: Case) -> Item:
    ns_path = case.path / "namespaces.yaml"
    namespaces = parse_namespaces(ns_path.read_text()) if ns_path.exists() else {}
    old_path, nodes_path = case.path / "old.yaml", case.path / "nodes.yaml"
    nodes = [n for n in yaml.safe_load_all(nodes_path.read_text()) if n] \
        if nodes_path.exists() else []
    nodes = [item for n in nodes for item in (n.get("items") or [] if n.get("kind") == "List"
                                              else [n])]
    return Item(case.id, _yaml(case.path / "input.yaml"), namespaces,
                _yaml(old_path) if old_path.exists() else None, case.path, nodes=nodes)


def _pod(name: str, namespace: str, *, labels: dict | None = None,
         selector: dict | None = None, limits: dict | None = None,
         annotations: dict | None = None, gated: bool = False, node_name: str = "") -> dict:
    container: dict = {"name": "app", "image": "busybox:1.36"}
    if limits:
        container["resources"] = {"limits": dict(limits)}
    spec: dict = {"containers": [container]}
    if gated:
        spec["schedulingGates"] = [{"name": "example.com/wait"}]
    if node_name:
        spec["nodeName"] = node_name
    if selector:
        spec["nodeSelector"] = dict(selector)
    metadata: dict = {"name": name, "namespace": namespace, "labels": dict(labels or {})}
    if annotations:
        metadata["annotations"] = dict(annotations)
    return {"apiVersion": "v1", "kind": "Pod", "metadata": metadata, "spec": spec}


def _daemonset(name: str, namespace: str, selector: dict | None = None) -> dict:
    spec: dict = {"containers": [{"name": "agent", "image": "busybox:1.36"}]}
    if selector:
        spec["nodeSelector"] = dict(selector)
    return {"apiVersion": "apps/v1", "kind": "DaemonSet",
            "metadata": {"name": name, "namespace": namespace},
            "spec": {"selector": {"matchLabels": {"app": name}},
                     "template": {"metadata": {"labels": {"app": name}}, "spec": spec}}}


POOL1 = {"eq-pool1": Namespace({"agentpool": "pool1"})}
PLAIN = {"eq-plain": Namespace({})}
# tests/test_apiserver_tier.py's scenarios that need no scheduler, controller or outage, with
# the shipped rule set.
SCENARIOS = [
    Item("scenario/pool1-pod-is-pinned-and-defaulted",
         _pod("web", "eq-pool1", labels={"platform": "true"},
              selector={"kubernetes.io/os": "linux"}, limits={"cpu": "500m", "memory": "64Mi"}),
         POOL1, expect="changed"),
    Item("scenario/pool1-pod-without-platform-label-keeps-its-pull-policy",
         _pod("plain", "eq-pool1"), POOL1, expect="changed"),
    Item("scenario/pod-asking-for-pool2-is-denied",
         _pod("escapee", "eq-pool1", selector={"agentpool": "pool2"}), POOL1, expect="denied"),
    # Values kube-apiserver would refuse (miniapiserver checks no pod spec): echoed quoted and cut
    # after 64 characters, and named as no pool.
    Item("scenario/pod-asking-for-a-pool-that-is-no-label-value-is-denied",
         _pod("odd", "eq-pool1", selector={"agentpool": 'po"ol\\' + "x" * 70}), POOL1,
         expect="denied"),
    Item("scenario/pod-with-a-long-node-name-is-denied",
         _pod("bound", "eq-pool1", node_name="node-" + "7" * 80), POOL1, expect="denied"),
    Item("scenario/kube-system-pod-is-left-alone",
         _pod("dns", "kube-system", labels={"platform": "true"}, limits={"cpu": "1"}),
         {"kube-system": Namespace({"agentpool": "system"})}, expect="unchanged"),
    Item("scenario/unlabelled-namespace-pod-only-loses-cpu-limits",
         _pod("web", "eq-plain", limits={"cpu": "1"}), PLAIN, expect="changed"),
    Item("scenario/new-namespace-gets-type-and-systemid",
         {"apiVersion": "v1", "kind": "Namespace",
          "metadata": {"name": "54321-equivalence-dev", "labels": {"type": "other"}}}, {},
         expect="changed"),
    Item("scenario/daemonset-template-is-pinned", _daemonset("agent", "eq-pool1"), POOL1,
         expect="changed"),
    Item("scenario/daemonset-moved-to-pool2-is-denied",
         _daemonset("stored-agent", "eq-pool1", {"agentpool": "pool2"}), POOL1,
         old=_daemonset("stored-agent", "eq-pool1", {"agentpool": "pool1"}), expect="denied"),
    Item("scenario/mirror-pod-is-left-alone",
         _pod("static", "eq-pool1", limits={"cpu": "1"},
              annotations={"kubernetes.io/config.mirror": "0123456789abcdef"}), POOL1,
         expect="unchanged"),
    Item("scenario/gated-pod-update-dropping-the-pool-key-gets-it-back",
         _pod("stored-web", "eq-pool1", labels={"tier": "web"}, gated=True), POOL1,
         old=_pod("stored-web", "eq-pool1", selector={"agentpool": "pool1"}, gated=True),
         expect="changed"),
    Item("scenario/gated-pod-update-to-pool2-is-denied",
         _pod("stored-mover", "eq-pool1", selector={"agentpool": "pool2"}, gated=True), POOL1,
         old=_pod("stored-mover", "eq-pool1", selector={"agentpool": "pool1"}, gated=True),
         expect="denied"),
    # Only a gated pod can change placement (kube-apiserver refuses it for any other; this one
    # does not check pod specs): neither engine judges the UPDATE of an ungated pod.
    Item("scenario/ungated-pod-update-is-not-judged",
         _pod("stored-running", "eq-pool1", selector={"agentpool": "pool2"}), POOL1,
         old=_pod("stored-running", "eq-pool1", selector={"agentpool": "pool1"}),
         expect="unchanged"),
]


def collect_groups(tmp: Path) -> list[Group]:
    """One group per rule configuration: each shipped rule file, each case's rule.yaml, and the
    shipped set for the scenarios."""
    shipped = {p.stem: p.read_text() for p in sorted((ROOT / "rules").glob("*.yaml"))}
    groups: dict[str, Group] = {}
    for case in discover(TESTDATA / "rules"):
        rule_yaml = case.path / "rule.yaml"
        if rule_yaml.exists():
            load_case_rule(case)  # fails here, not in the API server, when it is invalid
            text, where = rule_yaml.read_text(), f"{case.id}/rule.yaml"
        else:
            text, where = shipped[case.rule], f"rules/{case.rule}.yaml"
        # Cases with the same rule file share a group: the first one names it.
        group = groups.setdefault(text, Group(where, {f"{case.rule}.yaml": text}))
        group.items.append(_case_item(case))
    scenarios = Group("the shipped rule set", {f"{n}.yaml": t for n, t in shipped.items()},
                      list(SCENARIOS))
    result = sorted(groups.values(), key=lambda g: g.name) + [scenarios]
    _separate_namespaces([item for group in result for item in group.items])
    # Each UPDATE item stores its old object: under a name of its own (cases reuse names, and no
    # rule reads a pod's or a controller's name).
    updates = [item for group in result for item in group.items if item.old is not None]
    for number, item in enumerate(updates):
        for obj in (item.obj, item.old):
            assert obj is not None, item.id
            name = obj["metadata"]["name"]
            obj["metadata"]["name"] = f"{name}-u{number}"
            labels = obj["metadata"].get("labels") or {}
            if labels.get("kubernetes.io/metadata.name") == name:  # a Namespace's own
                labels["kubernetes.io/metadata.name"] = obj["metadata"]["name"]
    for index, group in enumerate(result):
        group.directory = tmp / f"rules-{index}"
        group.directory.mkdir()
        for name, text in group.rule_files.items():
            (group.directory / name).write_text(text)
        group.rules = load_rules(group.directory)
        group.export = export_policies(group.rules)
    return result


# -- the API server, raw ----------------------------------------------------------------------


@dataclass
class Answer:
    """What the API server answered, normalised for comparison."""

    code: int
    obj: dict | None = None
    message: str = ""
    warnings: tuple[str, ...] = ()

    def describe(self, with_warnings: bool = True) -> str:
        what = (json.dumps(self.obj, sort_keys=True) if self.obj is not None
                else f"refused {self.code}: {self.message}")
        return what + (f"; warnings {list(self.warnings)}" if with_warnings and self.warnings
                       else "")


class Api:
    def __init__(self, apiserver: MiniApiServer):
        self.url = apiserver.url
        self.session = requests.Session()
        self.session.trust_env = False
        self.session.verify = str(apiserver.ca_file)

    def path(self, obj: dict, named: bool = False) -> str:
        collection, namespaced = COLLECTIONS[obj["kind"]]
        path = collection.format(ns=obj["metadata"].get("namespace")) if namespaced \
            else collection
        return f"{path}/{obj['metadata']['name']}" if named else path

    def send(self, method: str, path: str, body: dict | None = None, *,
             content_type: str = "application/json", **params: str) -> requests.Response:
        return self.session.request(method, self.url + path, params=params, timeout=30,
                                    data=json.dumps(body) if body is not None else None,
                                    headers={"Content-Type": content_type})

    def create(self, obj: dict) -> dict:
        response = self.send("POST", self.path(obj), obj)
        assert response.status_code == 201, (obj["kind"], obj["metadata"], response.text)
        return response.json()

    def delete(self, obj: dict) -> None:
        response = self.send("DELETE", self.path(obj, named=True))
        assert response.status_code in (200, 202, 404), response.text

    def merge(self, obj: dict, patch: dict) -> None:
        response = self.send("PATCH", self.path(obj, named=True), patch,
                             content_type="application/merge-patch+json")
        assert response.status_code == 200, response.text

    def get(self, obj: dict) -> dict | None:
        response = self.send("GET", self.path(obj, named=True))
        if response.status_code == 404:
            return None
        assert response.status_code == 200, response.text
        return response.json()

    def judge(self, item: Item) -> Answer:
        """The dry-run answer to the item's request (an UPDATE of the stored object when it
        has an old object)."""
        obj = copy.deepcopy(item.obj)
        if item.old is not None:
            stored = self.get(obj)
            assert stored is not None, f"{item.id}: its old object is not stored"
            obj["metadata"]["resourceVersion"] = stored["metadata"]["resourceVersion"]
            response = self.send("PUT", self.path(obj, named=True), obj, dryRun="All")
        else:
            response = self.send("POST", self.path(obj), obj, dryRun="All")
        warnings = tuple(sorted(POLICY_WARNING.sub("", w) for w in _warnings(response)))
        if response.status_code in (200, 201):
            return Answer(200, obj=_normalised(response.json()), warnings=warnings)
        message = response.json().get("message", response.text)
        refusal = REFUSAL.search(message)
        return Answer(response.status_code, message=refusal.group("message") if refusal
                      else message, warnings=warnings)


def _warnings(response: requests.Response) -> list[str]:
    """The texts of the Warning headers (RFC 7234: code agent "text")."""
    texts = []
    for header in response.raw.headers.getlist("Warning"):
        match = re.match(r'^\d{3} \S+ "(.*)"$', header, re.S)
        texts.append(re.sub(r"\\(.)", r"\1", match.group(1)) if match else header)
    return texts


def _normalised(obj: dict) -> dict:
    obj = copy.deepcopy(obj)
    metadata = obj.get("metadata", {})
    for key in SERVER_METADATA:
        metadata.pop(key, None)
    if metadata.get("generateName"):  # a random name: the same on both sides once masked
        generated = metadata["name"]
        metadata["name"] = metadata["generateName"] + "*"
        labels = metadata.get("labels", {})
        for key, value in labels.items():
            if value == generated:
                labels[key] = metadata["name"]
    return obj


# -- the engines ------------------------------------------------------------------------------


class Sentinels:
    """A webhook configuration, a mutating and a validating policy (and their bindings) acting
    only on ConfigMaps labelled with the current token. Admission objects of one kind are loaded
    in the order they were written; once the sentinels changed after a change act with their
    new token, that change is in force."""

    def __init__(self, api: Api):
        self.api = api
        self.tokens: dict[str, str] = {}
        dead = free_port()  # nothing listens there: a call fails, and failurePolicy Fail says so
        self.objects = {
            "MutatingWebhookConfiguration": {
                "apiVersion": "admissionregistration.k8s.io/v1",
                "kind": "MutatingWebhookConfiguration",
                "metadata": {"name": "pk-equivalence-sentinel"},
                "webhooks": [{
                    "name": "sentinel.poolkeeper.io", "admissionReviewVersions": ["v1"],
                    "sideEffects": "None", "failurePolicy": "Fail", "timeoutSeconds": 2,
                    "clientConfig": {"url": f"https://127.0.0.1:{dead}/"},
                    "rules": [{"apiGroups": [""], "apiVersions": ["v1"],
                               "operations": ["CREATE"], "resources": ["configmaps"]}],
                    "objectSelector": {"matchLabels": {"pk-sentinel-webhook": "-"}}}]},
            "MutatingAdmissionPolicy": self._policy("MutatingAdmissionPolicy", "map", {
                "reinvocationPolicy": "Never",
                "mutations": [{"patchType": "ApplyConfiguration", "applyConfiguration": {
                    "expression": "Object{metadata: Object.metadata{labels: "
                                  "{'pk-sentinel-seen': 'yes'}}}"}}]}),
            "MutatingAdmissionPolicyBinding": self._binding("MutatingAdmissionPolicy", "map"),
            "ValidatingAdmissionPolicy": self._policy("ValidatingAdmissionPolicy", "vap", {
                "validations": [{"expression": "false", "message": "pk-sentinel",
                                 "reason": "Forbidden"}]}),
            "ValidatingAdmissionPolicyBinding": self._binding("ValidatingAdmissionPolicy",
                                                              "vap", ["Deny"]),
        }

    @staticmethod
    def _policy(kind: str, which: str, spec: dict) -> dict:
        return {"apiVersion": "admissionregistration.k8s.io/v1", "kind": kind,
                "metadata": {"name": f"pk-equivalence-sentinel-{which}"},
                "spec": {"failurePolicy": "Fail",
                         "matchConstraints": {"resourceRules": [{
                             "apiGroups": [""], "apiVersions": ["v1"], "operations": ["CREATE"],
                             "resources": ["configmaps"]}]},
                         "matchConditions": [{"name": "token", "expression": "false"}],
                         **spec}}

    @staticmethod
    def _binding(kind: str, which: str, actions: list[str] | None = None) -> dict:
        spec: dict = {"policyName": f"pk-equivalence-sentinel-{which}",
                      "matchResources": {"objectSelector": {"matchLabels": {
                          f"pk-sentinel-{which}": "-"}}}}
        if actions:
            spec["validationActions"] = actions
        return {"apiVersion": "admissionregistration.k8s.io/v1", "kind": f"{kind}Binding",
                "metadata": {"name": f"pk-equivalence-sentinel-{which}"}, "spec": spec}

    def install(self) -> None:
        for obj in self.objects.values():
            self.api.create(obj)
        self.settle()

    def settle(self, families: Iterable[str] | None = None) -> None:
        """Give the sentinels of ``families`` (webhook, map, vap; default all) a new token and
        wait until they act with it."""
        families = list(FAMILIES if families is None else families)
        for which in families:
            token = self.tokens[which] = uuid.uuid4().hex[:12]
            for kind in FAMILIES[which]:
                obj = self.objects[kind]
                if kind == "MutatingWebhookConfiguration":
                    webhook = {**obj["webhooks"][0], "objectSelector": {
                        "matchLabels": {"pk-sentinel-webhook": token}}}
                    self.api.merge(obj, {"webhooks": [webhook]})
                elif kind.endswith("Binding"):
                    self.api.merge(obj, {"spec": {"matchResources": {"objectSelector": {
                        "matchLabels": {f"pk-sentinel-{which}": token}}}}})
                else:
                    self.api.merge(obj, {"spec": {"matchConditions": [{
                        "name": "token", "expression": "object.metadata.?labels"
                        f"[?'pk-sentinel-token'].orValue('') == '{token}'"}]}})
        acts = {"webhook": self._webhook_acts, "map": self._map_acts, "vap": self._vap_acts}
        for which in families:
            wait_for(lambda which=which: acts[which](self._probe(which)),
                     f"the sentinel {which} to act with token {self.tokens[which]}")

    def _probe(self, which: str) -> requests.Response:
        token = self.tokens[which]
        labels = {f"pk-sentinel-{which}": token}
        if which != "webhook":
            labels["pk-sentinel-token"] = token
        body = {"apiVersion": "v1", "kind": "ConfigMap",
                "metadata": {"name": f"pk-sentinel-{uuid.uuid4().hex[:8]}",
                             "namespace": "default", "labels": labels}}
        return self.api.send("POST", self.api.path(body), body, dryRun="All")

    @staticmethod
    def _webhook_acts(response: requests.Response) -> bool:
        return response.status_code >= 500 and "sentinel.poolkeeper.io" in response.text

    @staticmethod
    def _map_acts(response: requests.Response) -> bool:
        return response.status_code == 201 and \
            response.json()["metadata"]["labels"].get("pk-sentinel-seen") == "yes"

    @staticmethod
    def _vap_acts(response: requests.Response) -> bool:
        return response.status_code == 403 and "pk-sentinel" in response.text


@dataclass
class Engines:
    """poolkeeper (reloading a swapped rules directory) and the admission objects in force."""

    api: Api
    api_server: MiniApiServer
    sentinels: Sentinels
    deploy_mwc: dict  # deploy/base/webhook.yaml's, caBundle set
    rules_link: Path  # the directory poolkeeper serves: a symlink swapped per group
    work: Path
    server: Server | None = None
    applied: list[dict] = field(default_factory=list)  # admission objects of the current phase
    current_rules: Path | None = None
    _reloads_before: int = -1  # poolkeeper's reload count before the last swap, or -1

    def use_rules(self, group: Group) -> None:
        """Swap the group's rules in (one rename); poolkeeper reloads them within a second,
        which :meth:`rules_loaded` waits for."""
        if self.current_rules == group.directory:
            return
        self._reloads_before = self._reloads() if self.server is not None else -1
        staged = self.work / "rules.next"
        staged.symlink_to(group.directory)
        os.replace(staged, self.rules_link)
        self.current_rules = group.directory

    def rules_loaded(self) -> None:
        if self._reloads_before >= 0:
            before = self._reloads_before
            wait_for(lambda: self._reloads() > before, f"poolkeeper to reload {self.rules_link}")
            self._reloads_before = -1

    def _reloads(self) -> int:
        assert self.server is not None
        return sum(1 for line in self.server.log().splitlines()
                   if '"poolkeeper.rules"' in line and '"loaded ' in line)

    def start(self) -> None:
        self.server = start_server(self.work / "tls", self.work / "serve.log",
                                   "--kubeconfig", self.kubeconfig,
                                   "--rules", str(self.rules_link), workers=1, threads=4)
        self.api_server.map_webhook_service(SERVICE, f"127.0.0.1:{self.server.port}")

    def switch(self, objects: list[dict]) -> None:
        """Replace the admission objects in force with ``objects``; wait until they are."""
        if objects == self.applied:
            return
        for obj in reversed(self.applied):
            self.api.delete(obj)
        for obj in objects:
            self.api.create(obj)
        changed = {o["kind"] for o in [*self.applied, *objects]}
        self.applied = list(objects)
        self.sentinels.settle({w for w, kinds in FAMILIES.items() if changed & set(kinds)})

    def webhook_for(self, group: Group) -> list[dict]:
        """deploy's webhook configuration as README "The webhooks" says to adapt it to the pool
        rule: its namespaceLabelKey selects the namespaces, and with a defaultPool every one."""
        mwc = copy.deepcopy(self.deploy_mwc)
        pools = [r.policy for r in group.rules if isinstance(r.policy, PoolPlacement)]
        webhooks = {w["name"]: w for w in mwc["webhooks"]}
        for policy in pools:
            key = policy.namespace_label_key
            expressions = webhooks["placement.poolkeeper.io"]["namespaceSelector"][
                "matchExpressions"]
            for expression in list(expressions):
                if expression["key"] == "agentpool":
                    expression["key"] = key
                    if expression["operator"] == "Exists" and policy.default_pool is not None:
                        expressions.remove(expression)
            for condition in webhooks["namespaces.poolkeeper.io"].get("matchConditions", []):
                condition["expression"] = condition["expression"].replace(
                    "'agentpool'", repr(key))
        return [mwc]

    @property
    def kubeconfig(self) -> str:
        return self.api_server.kubeconfig


@pytest.fixture(scope="module")
def engines(equivalence_apiserver: MiniApiServer, tmp_path_factory) -> Iterator[Engines]:
    work = tmp_path_factory.mktemp("equivalence")
    cert_dir = work / "tls"
    certs = subprocess.run([sys.executable, "-m", "app", "certs", "--out", str(cert_dir),
                            "--service", "poolkeeper", "--namespace", "poolkeeper-system"],
                           cwd=ROOT, capture_output=True, text=True, timeout=60, check=True)
    objects = render(DEPLOY) if kubectl() else listed_files(DEPLOY)
    (mwc,) = [o for o in with_ca_bundle(objects, certs.stdout.strip())
              if o["kind"] == "MutatingWebhookConfiguration"]
    api = Api(equivalence_apiserver)
    sentinels = Sentinels(api)
    engines = Engines(api, equivalence_apiserver, sentinels, mwc, work / "rules", work)
    try:
        sentinels.install()
        yield engines
    finally:
        if engines.server is not None:
            engines.server.stop()
        api.session.close()


# -- the tier ---------------------------------------------------------------------------------


def _ensure_namespaces(api: Api, groups: list[Group]) -> dict[str, dict]:
    """Every namespace the items need, with the labels and annotations they name (created once;
    kube-system relabelled); returns the metadata kube-system had, to restore."""
    wanted: dict[str, dict] = {}
    for group in groups:
        for item in group.items:
            for name, namespace in item.namespaces.items():
                metadata = {"labels": {k: v for k, v in namespace.labels.items()
                                       if k != "kubernetes.io/metadata.name"},
                            "annotations": dict(namespace.annotations)}
                assert wanted.setdefault(name, metadata) == metadata, (
                    f"{item.id}: namespace {name} needs {metadata}, another item "
                    f"{wanted[name]}: one API server cannot hold both")
    restore = {}
    for name, metadata in wanted.items():
        ns = {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}}
        stored = api.get(ns)
        if stored is None:
            api.create({**ns, "metadata": {"name": name, **metadata}})
        else:
            restore[name] = {k: stored["metadata"].get(k, {}) for k in ("labels", "annotations")}
            api.merge(ns, {"metadata": metadata})
    return restore


def _create_nodes(api: Api, groups: list[Group]) -> None:
    """The Node objects of the cases' nodes.yaml (one set: a node is the same in every case), so
    poolkeeper's node watch counts the pools they carry."""
    nodes: dict[str, dict] = {}
    for group in groups:
        for item in group.items:
            for node in item.nodes:
                name = node["metadata"]["name"]
                assert nodes.setdefault(name, node) == node, f"{item.id}: node {name} differs"
    for node in nodes.values():
        api.create(node)


def _store_old_objects(api: Api, groups: list[Group]) -> None:
    """With no admission in force: the objects UPDATE items change, stored as they are."""
    stored: dict[tuple, dict] = {}
    for group in groups:
        for item in group.items:
            if item.old is None:
                continue
            key = (item.old["kind"], item.old["metadata"].get("namespace"),
                   item.old["metadata"]["name"])
            if key in stored:
                assert stored[key] == item.old, f"{item.id}: another item stores {key} otherwise"
                continue
            stored[key] = item.old
            api.delete(item.old)
            api.create(item.old)


def _difference(item: Item, group: Group, webhook: Answer, policies: Answer) -> str:
    text = (f"{item.id} ({group.name}):\n  webhook:  {webhook.describe()}\n"
            f"  policies: {policies.describe()}")
    if webhook.obj is not None and policies.obj is not None:
        text += f"\n  from webhook to policies: {jsonpatch.make_patch(webhook.obj, policies.obj)}"
    return text


def _lines(path: Path, renamed: dict[str, str] | None = None) -> list[str]:
    lines = [line.strip() for line in path.read_text().splitlines() if line.strip()] \
        if path.exists() else []
    for old, new in (renamed or {}).items():
        lines = [line.replace(f'"{old}"', f'"{new}"') for line in lines]
    return lines


def _unmet(item: Item, answer: Answer, baseline: Answer) -> list[str]:
    """How the webhook's answer misses what the golden case expects (so neither engine can pass
    by doing nothing): a denial with its lines, a change (expected.yaml) or none, its warnings.
    The API server defaults the object, so a change is judged against the answer with nothing
    in force."""
    if baseline.obj is None:  # the API server refuses it by itself
        return []
    if item.case is None:
        outcome = ("denied" if answer.obj is None else
                   "changed" if answer.obj != baseline.obj else "unchanged")
        return [] if outcome == item.expect else [f"{outcome}, expected {item.expect}"]
    denied = _lines(item.case / "denied.txt", item.renamed)
    if denied:
        if answer.obj is not None:
            return ["expected a denial"]
        return [f"denial lacks {line!r}" for line in denied if line not in answer.message]
    if answer.obj is None:
        return [f"refused: {answer.message}"]
    changed = answer.obj != baseline.obj
    problems = []
    if changed != (item.case / "expected.yaml").exists():
        problems.append("changed, expected.yaml says no change" if changed else
                        "unchanged, expected.yaml says changed")
    problems += [f"no warning contains {line!r}" for line in
                 _lines(item.case / "warnings.txt", item.renamed)
                 if not any(line in w for w in answer.warnings)]
    return problems


def test_equivalence_webhook_and_exported_policies_answer_alike(engines: Engines, capsys,
                                                                tmp_path: Path):
    groups = collect_groups(tmp_path)
    skipped: list[str] = []
    ignored: dict[str, tuple[str, ...]] = {}  # group -> starts of warnings left out
    refused: dict[str, tuple[str, ...]] = {}  # group -> texts of denials left out
    runnable = []
    for group in groups:
        assert group.export is not None
        whole = [str(i) for i in group.export.left_out if i.what.startswith("the whole rule")]
        if whole:
            skipped += [f"{item.id}: {'; '.join(whole)}" for item in group.items]
            continue
        parts = [i for i in group.export.left_out if not (i.warnings or i.denials)]
        assert not parts, f"{group.name}: the tier cannot compare without {parts}"
        ignored[group.name] = tuple(f"[{i.rule}] {w}" for i in group.export.left_out
                                    for w in i.warnings)
        refused[group.name] = tuple(d for i in group.export.left_out for d in i.denials)
        runnable.append(group)
    # Namespace items first, before the namespaces the others need exist (a case may create a
    # namespace another case's pod lives in); then, with nothing in force, the namespaces and the
    # stored objects of the UPDATE items.
    first = [g for g in runnable if g.namespace_only]
    then = [g for g in runnable if not g.namespace_only]
    differences: list[str] = []
    unmet: list[str] = []
    by_itself: list[str] = []  # refused by the API server whatever admission says
    not_compared: dict[str, list[str]] = {}  # warning start -> items whose warning it was
    compared = 0
    restore: dict[str, dict] = {}
    _create_nodes(engines.api, runnable)
    engines.use_rules(runnable[0])
    engines.start()
    baseline: dict[str, Answer] = {}
    try:
        index = 0
        for batch in (first, then):
            engines.switch([])
            if batch is then:
                restore = _ensure_namespaces(engines.api, then)
            _store_old_objects(engines.api, batch)
            baseline.update({i.id: engines.api.judge(i) for g in batch for i in g.items})
            for group in batch:
                index += 1
                engines.use_rules(group)
                answers: dict[str, dict[str, Answer]] = {"webhook": {}, "policies": {}}
                # Alternate the order, so that consecutive groups share a phase.
                phases = ("webhook", "policies") if index % 2 else ("policies", "webhook")
                for phase in phases:
                    assert group.export is not None
                    if phase == "webhook":
                        engines.rules_loaded()
                    engines.switch(engines.webhook_for(group) if phase == "webhook"
                                   else list(group.export.objects))
                    for item in group.items:
                        answers[phase][item.id] = engines.api.judge(item)
                for item in group.items:
                    webhook, policies = answers["webhook"][item.id], answers["policies"][item.id]
                    compared += 1
                    if ignored[group.name]:  # what the export left out is not compared
                        for warning in webhook.warnings:
                            for start in ignored[group.name]:
                                if warning.startswith(start):
                                    not_compared.setdefault(start, []).append(item.id)
                        webhook = dataclasses.replace(webhook, warnings=tuple(
                            w for w in webhook.warnings if not w.startswith(ignored[group.name])))
                    if webhook.obj is None and any(d in webhook.message
                                                   for d in refused[group.name]):
                        not_compared.setdefault("a refusal", []).append(item.id)
                    elif webhook != policies:
                        differences.append(_difference(item, group, webhook, policies))
                    unmet += [f"{item.id}: {p}" for p in
                              _unmet(item, answers["webhook"][item.id], baseline[item.id])]
                    if baseline[item.id].obj is None:
                        by_itself.append(f"{item.id} ({baseline[item.id].message})")
    finally:
        engines.switch([])
        for name, metadata in restore.items():
            ns = {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}}
            stored = (engines.api.get(ns) or {"metadata": {}})["metadata"]
            engines.api.merge(ns, {"metadata": {
                part: {**{k: None for k in stored.get(part, {}) if k not in values}, **values}
                for part, values in metadata.items()}})
    with capsys.disabled():
        print(f"\nequivalence tier: {compared} cases compared through miniapiserver, webhook "
              f"against exported policies, in {len(runnable)} rule configurations")
        for start in sorted({w for starts in ignored.values() for w in starts}):
            print(f"  not compared, left out of the export: warnings {start!r}... "
                  f"({', '.join(not_compared.get(start, [])) or 'no item got one'})")
        for text in sorted({d for texts in refused.values() for d in texts}):
            print(f"  not compared, left out of the export: refusals holding {text!r} "
                  f"({', '.join(not_compared.get('a refusal', [])) or 'no item got one'})")
        for line in by_itself:
            print(f"  compared as the API server's own refusal only: {line}")
        for line in skipped:
            print(f"  skipped {line}")
    assert not unmet, "the webhook misses the golden cases' expectations:\n" + "\n".join(unmet)
    assert not differences, "the engines answer differently:\n" + "\n".join(differences)
    assert compared >= len(discover(TESTDATA / "rules")) - len(skipped)

