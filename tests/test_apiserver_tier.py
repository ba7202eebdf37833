"""The apiserver tier: a real Kubernetes API server calls poolkeeper through deploy/'s own objects.

etcd + miniapiserver (k8s.io/apiserver with its real MutatingAdmissionWebhook,
ValidatingAdmissionPolicy and MutatingAdmissionPolicy plugins; not kube-apiserver: no scheduler,
no controllers and no RBAC enforcement, see ../shared/tools/miniapiserver/README.md), and
`poolkeeper serve --manage-certs` standing in for the pods: it creates the Secret poolkeeper-tls,
serves its pair over TLS and keeps the caBundle of every webhook, reading namespaces from that API
server. The base rendered from deploy/ (integration/manifests.py, as integration/deploy.sh does;
no caBundle anywhere) is installed as deploy.sh does: the workload, poolkeeper serving, then the
admission objects with `kubectl apply`. The server runs the rules of the applied ConfigMap; the
Service is mapped to the server's loopback port. Every request below goes through the kubernetes
client and the API server: the scenarios of integration/ that need no scheduler or controller.
"""

from __future__ import annotations

import base64
import contextlib
import copy
import datetime as dt
import json
import os
import random
import re
import socket
import ssl
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import kubernetes.client
import kubernetes.dynamic
import pytest
import requests
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from kubernetes.client.rest import ApiException
from kubernetes.dynamic.exceptions import ResourceNotFoundError

from app import certs
from app.admission import admit
from app.certmanager import CertManager, fingerprint, split_certificates
from app.config import Settings
from app.kube import load_api_client
from integration.manifests import DEPLOY, kubectl, render, with_ca_bundle

from .apiserver import MiniApiServer, apiserver_fixture
from .server import Server, start_server
from .support import DEADLINE, ROOT, make_request, shipped_rules, skip_or_fail, wait_for

pytestmark = pytest.mark.apiserver

tier_apiserver = apiserver_fixture("tier_apiserver", scope="module")
# Its own API server: the uninstall test removes everything the others use.
uninstall_apiserver = apiserver_fixture("uninstall_apiserver", scope="module")

SERVICE = "poolkeeper-system/poolkeeper:443"  # what every webhook's clientConfig.service names
MWC = "poolkeeper"
SECRET = "poolkeeper-tls"
# A renewal's overlap for the tier's poolkeeper: the caBundle trusts the old CA this long after
# a new one appears (a pod serves the new pair about 6 s after: SETTLE, then the file watcher).
OVERLAP = 12
POLICY = "poolkeeper-pod-placement"
# tests/faults/sitecustomize.py's (not imported here: it patches the rule kinds it is loaded into)
FAULT_ANNOTATION = "poolkeeper.test/raise-in"
# Eventual conditions are polled (support.wait_for), never slept on. Objects the API server
# applies asynchronously (webhook configurations, policies, namespace labels seen by policies)
# are probed with dry-run requests until they take effect.


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def pod(name: str, *, labels: dict | None = None, selector: dict | None = None,
        limits: dict | None = None, annotations: dict | None = None,
        gates: list[str] | None = None) -> dict:
    container: dict = {"name": "app", "image": "busybox:1.36"}
    if limits:
        container["resources"] = {"limits": dict(limits)}
    spec: dict = {"containers": [container]}
    if selector is not None:
        spec["nodeSelector"] = dict(selector)
    if gates:
        spec["schedulingGates"] = [{"name": gate} for gate in gates]
    metadata: dict = {"name": name, "labels": dict(labels or {})}
    if annotations:
        metadata["annotations"] = dict(annotations)
    return {"apiVersion": "v1", "kind": "Pod", "metadata": metadata, "spec": spec}


def status_message(exc: ApiException) -> str:
    return json.loads(exc.body)["message"]


def run_kubectl(apiserver: MiniApiServer, *args: str) -> subprocess.CompletedProcess:
    binary = kubectl()
    if binary is None:
        skip_or_fail("kubectl not found: this test runs it against the API server; install it "
                     "(e.g. apt-get install kubectl) to run it")
    return subprocess.run([binary, "--kubeconfig", apiserver.kubeconfig, *args],
                          capture_output=True, text=True, timeout=60)


def daemonset(name: str) -> dict:
    labels = {"app": name}
    return {"apiVersion": "apps/v1", "kind": "DaemonSet", "metadata": {"name": name},
            "spec": {"selector": {"matchLabels": labels},
                     "template": {"metadata": {"labels": labels},
                                  "spec": {"containers": [{"name": "agent",
                                                           "image": "busybox:1.36"}]}}}}


@dataclass
class Tier:
    """The API server, poolkeeper serving it, and the clients the tests use."""

    apiserver: MiniApiServer
    api: kubernetes.client.ApiClient
    dynamic: kubernetes.dynamic.DynamicClient
    objects: list[dict]  # the rendered base (no caBundle: poolkeeper sets it)
    cert_dir: Path
    rules_dir: Path
    log_dir: Path
    server: Server | None = None
    not_served: list[str] = field(default_factory=list)  # kinds miniapiserver does not serve
    pool1: str = ""  # a namespace labelled agentpool=pool1
    plain: str = ""  # a namespace without a pool label
    starts: int = 0

    @property
    def core(self) -> kubernetes.client.CoreV1Api:
        return kubernetes.client.CoreV1Api(self.api)

    @property
    def apps(self) -> kubernetes.client.AppsV1Api:
        return kubernetes.client.AppsV1Api(self.api)

    @property
    def admission(self) -> kubernetes.client.AdmissionregistrationV1Api:
        return kubernetes.client.AdmissionregistrationV1Api(self.api)

    def object(self, kind: str) -> dict:
        (obj,) = [o for o in self.objects if o["kind"] == kind]
        return obj

    def create(self, obj: dict) -> None:
        """Create ``obj`` as `kubectl create` would, whatever its kind."""
        try:
            resource = self.dynamic.resources.get(api_version=obj["apiVersion"], kind=obj["kind"])
        except ResourceNotFoundError:
            self.not_served.append(obj["kind"])
            return
        resource.create(body=obj, namespace=obj["metadata"].get("namespace"))

    def apply(self, obj: dict, *flags: str) -> subprocess.CompletedProcess:
        """`kubectl apply -f` of ``obj`` (client-side unless ``flags`` say otherwise)."""
        return self.kubectl("apply", *flags, "-f", "-", stdin=yaml.safe_dump(obj))

    def kubectl(self, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
        result = subprocess.run([kubectl(), "--kubeconfig", self.apiserver.kubeconfig, *args],
                                input=stdin, capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, result.stderr
        return result

    def start_server(self, env: dict[str, str] | None = None) -> None:
        """`poolkeeper serve` on a free port, ready (first namespace listing done), mapped as the
        webhooks' Service."""
        if self.server is not None:
            self.server.stop()  # never two at once
        self.server = self.serve(self.cert_dir, env=env)
        self.apiserver.map_webhook_service(SERVICE, f"127.0.0.1:{self.server.port}")

    def serve(self, cert_dir: Path, *args: str, env: dict[str, str] | None = None) -> Server:
        """`poolkeeper serve --manage-certs` (a pod), ready; not mapped as the Service."""
        self.starts += 1
        return start_server(cert_dir, self.log_dir / f"serve-{self.starts}.log",
                            "--kubeconfig", self.apiserver.kubeconfig,
                            "--rules", str(self.rules_dir), "--manage-certs",
                            "--cert-overlap", str(OVERLAP), *args, env=env)

    def ensure_webhook(self) -> None:
        """poolkeeper serving and its webhook configuration active, whatever a test left."""
        if self.server is None or self.server.process.poll() is not None:
            self.start_server()
        try:
            self.admission.read_mutating_webhook_configuration(MWC)
        except ApiException as exc:
            if exc.status != 404:
                raise
            self.create(self.object("MutatingWebhookConfiguration"))  # poolkeeper sets caBundle
        wait_for(self.webhook_pins_pods, "the placement webhook to pin a dry-run pod")

    def webhook_pins_pods(self) -> bool:
        try:
            created = self.core.create_namespaced_pod(self.pool1, pod(unique("probe")),
                                                      dry_run="All")
        except ApiException as exc:
            # 500: the API server cannot reach poolkeeper yet (or trust it: no caBundle yet); the
            # policy's 403: it does not call the webhook configuration just created yet.
            if exc.status == 500 or (exc.status == 403 and POLICY in status_message(exc)):
                return False
            raise
        return (created.spec.node_selector or {}).get("agentpool") == "pool1"

    def admissions(self, name: str) -> list[dict]:
        """poolkeeper's log lines (one per review) about objects called ``name``."""
        lines = []
        for path in sorted(self.log_dir.glob("serve-*.log")):
            for line in path.read_text(errors="replace").splitlines():
                try:
                    entry = json.loads(line)
                except ValueError:
                    continue
                if entry.get("logger") == "poolkeeper.admission" and entry.get("name") == name:
                    lines.append(entry)
        return lines


@pytest.fixture(scope="module")
def tier(tier_apiserver: MiniApiServer, tmp_path_factory: pytest.TempPathFactory):
    with installed(tier_apiserver, tmp_path_factory.mktemp("tier")) as tier:
        yield tier


@contextlib.contextmanager
def installed(apiserver: MiniApiServer, base: Path) -> Iterator[Tier]:
    """The base installed as integration/deploy.sh does (the workload, poolkeeper serving, then
    the webhook configuration and the policy with `kubectl apply`), a pool1 and a plain
    namespace, the webhook pinning pods. No Secret and no caBundle come from here: poolkeeper
    (--manage-certs, an empty certificate directory) creates the one and sets the other."""
    cert_dir, rules_dir, log_dir = base / "tls", base / "rules", base / "logs"
    rules_dir.mkdir()
    log_dir.mkdir()
    if kubectl() is None:
        skip_or_fail("kubectl not found: the tier installs deploy/ with kubectl apply")
    objects = render(DEPLOY)
    assert not any("caBundle" in w.get("clientConfig", {}) for o in objects
                   for w in o.get("webhooks", [])), "the manifests must not own the caBundle"

    api = load_api_client(apiserver.kubeconfig)
    dynamic = kubernetes.dynamic.DynamicClient(api, cache_file=str(base / "discovery.json"))
    tier = Tier(apiserver, api, dynamic, objects, cert_dir, rules_dir, log_dir)
    try:
        admission_kinds = ("MutatingWebhookConfiguration", "ValidatingAdmissionPolicy",
                           "ValidatingAdmissionPolicyBinding")
        for obj in sorted(objects, key=lambda o: o["kind"] != "Namespace"):
            if obj["kind"] not in admission_kinds:
                tier.create(obj)
        # The server runs the rules of the ConfigMap the Deployment mounts (the shipped rules/
        # without kubectl, which generates that ConfigMap).
        rules = {path.name: path.read_text() for path in (ROOT / "rules").glob("*.yaml")}
        if any(o["kind"] == "ConfigMap" for o in objects):
            rules = tier.core.read_namespaced_config_map("poolkeeper-rules",
                                                         "poolkeeper-system").data
        for name, text in rules.items():
            (rules_dir / name).write_text(text)
        tier.start_server()
        for kind in admission_kinds:
            tier.apply(tier.object(kind))

        tier.pool1, tier.plain = unique("team-pool1"), unique("team-plain")
        tier.core.create_namespace({"metadata": {"name": tier.pool1,
                                                 "labels": {"agentpool": "pool1"}}})
        tier.core.create_namespace({"metadata": {"name": tier.plain}})
        tier.ensure_webhook()
        yield tier
    finally:
        if tier.server is not None:
            tier.server.stop()
        api.close()


@pytest.fixture
def live(tier: Tier) -> Tier:
    tier.ensure_webhook()
    return tier


def test_tier_base_is_accepted_by_the_api_server(tier: Tier):
    # Everything in deploy/ that miniapiserver serves was created; it has no policy/v1, no
    # resourcequotas and no networking.k8s.io.
    assert set(tier.not_served) <= set(NOT_SERVED), tier.not_served
    mwc = tier.admission.read_mutating_webhook_configuration(MWC)
    assert [w.name for w in mwc.webhooks] == ["placement.poolkeeper.io", "defaults.poolkeeper.io",
                                             "defaults-opted-out.poolkeeper.io",
                                             "workloads.poolkeeper.io",
                                             "namespaces.poolkeeper.io"]
    deployment = tier.apps.read_namespaced_deployment("poolkeeper", "poolkeeper-system")
    assert deployment.spec.replicas == 3


def test_tier_pod_in_pool1_namespace_is_pinned_and_defaulted(live: Tier):
    name = unique("web")
    body = pod(name, labels={"platform": "true"}, selector={"kubernetes.io/os": "linux"},
               limits={"cpu": "500m", "memory": "64Mi"})
    created = live.core.create_namespaced_pod(live.pool1, body)

    assert created.spec.node_selector == {"kubernetes.io/os": "linux", "agentpool": "pool1"}
    (container,) = created.spec.containers
    assert container.resources.limits == {"memory": "64Mi"}  # cpu limit removed, memory kept
    assert container.image_pull_policy == "Always"  # the API server defaulted IfNotPresent
    stored = live.core.read_namespaced_pod(name, live.pool1)
    assert stored.spec.node_selector == created.spec.node_selector

    other = live.core.create_namespaced_pod(live.pool1, pod(unique("web")))
    assert other.spec.containers[0].image_pull_policy == "IfNotPresent"  # not platform=true
    assert other.spec.node_selector == {"agentpool": "pool1"}


def test_tier_a_pod_costs_one_poolkeeper_call(live: Tier):
    # Pooled namespace: placement and the defaults in one call, and poolkeeper's own patch does
    # not make the API server call it again. Elsewhere: the defaults, in one call.
    name, plain, opted = unique("web"), unique("web"), unique("web")
    body = pod(name, labels={"platform": "true"}, limits={"cpu": "1"})
    created = live.core.create_namespaced_pod(live.pool1, body)
    assert created.spec.node_selector == {"agentpool": "pool1"}
    assert created.spec.containers[0].resources.limits is None
    assert [(e["decision"], e["rules"]) for e in live.admissions(name)] == [
        ("patched", ["agentpool-node-selector", "image-pull-policy", "remove-cpu-limits"])]
    live.core.create_namespaced_pod(live.plain, pod(plain, limits={"cpu": "1"}))
    opted_out = namespace(live, "opted-out", {"agentpool": ""})
    live.core.create_namespaced_pod(opted_out, pod(opted, limits={"cpu": "1"}))
    for other in (plain, opted):
        assert [(e["decision"], e["rules"]) for e in live.admissions(other)] == [
            ("patched", ["remove-cpu-limits"])]


def test_tier_failing_default_is_skipped_with_a_warning_failing_placement_refuses(
        live: Tier, tmp_path: Path):
    # tests/faults makes a rule kind raise for pods annotated with its name: a bug in a rule.
    # The defaults fail open inside the fail-closed call (onError: ignore); placement does not.
    live.start_server(env={"PYTHONPATH": str(ROOT / "tests/faults")})
    try:
        wait_for(live.webhook_pins_pods, "the webhook to call the restarted poolkeeper")

        def create(namespace: str, name: str, kind: str) -> subprocess.CompletedProcess:
            obj = pod(name, labels={"platform": "true"}, limits={"cpu": "1"},
                      annotations={FAULT_ANNOTATION: kind})
            obj["metadata"]["namespace"] = namespace
            return kubectl_create(live, tmp_path, obj, "-o", "json")

        warned = "Warning: [remove-cpu-limits] not applied: it failed in poolkeeper"
        for namespace_name, pinned in ((live.pool1, {"agentpool": "pool1"}), (live.plain, None)):
            name = unique("web")
            result = create(namespace_name, name, "RemoveResourceLimits")
            assert result.returncode == 0, result.stderr
            assert warned in result.stderr  # kubectl prints the admission warning
            created = json.loads(result.stdout)
            assert created["spec"].get("nodeSelector") == pinned
            (container,) = created["spec"]["containers"]
            assert container["resources"]["limits"] == {"cpu": "1"}  # the failed rule: skipped
            assert container["imagePullPolicy"] == "Always"  # the other default: applied
            (entry,) = live.admissions(name)
            assert (entry["decision"], entry["skippedRules"]) == ("patched", ["remove-cpu-limits"])

        name = unique("web")
        refused = create(live.pool1, name, "PoolPlacement")
        assert refused.returncode != 0
        assert 'failed calling webhook "placement.poolkeeper.io"' in refused.stderr
        with pytest.raises(ApiException) as missing:
            live.core.read_namespaced_pod(name, live.pool1)
        assert missing.value.status == 404

        assert live.server.log().count("fault injected into RemoveResourceLimits") == 2
        scraped = requests.get(live.server.metrics_url, timeout=10).text
        assert 'poolkeeper_rule_errors_total{rule="remove-cpu-limits"} 2.0' in scraped
    finally:
        live.start_server()


def test_tier_pod_asking_for_other_pool_is_denied_with_the_message(live: Tier):
    name = unique("web")
    body = pod(name, selector={"agentpool": "pool2"})
    with pytest.raises(ApiException) as caught:
        live.core.create_namespaced_pod(live.pool1, body)

    labels = live.core.read_namespace(live.pool1).metadata.labels
    request = make_request({**body, "metadata": {**body["metadata"], "namespace": live.pool1}},
                           namespace=live.pool1)
    decision = admit(request, lambda ns: labels if ns == live.pool1 else None, shipped_rules(docs=True))
    assert not decision.response.allowed
    assert caught.value.status == 403
    assert status_message(caught.value) == (
        'admission webhook "placement.poolkeeper.io" denied the request: '
        + decision.response.message)
    assert ('pod spec.nodeSelector.agentpool is "pool2", but namespace '
            f'"{live.pool1}" is pinned to node pool "pool1"') in status_message(caught.value)
    with pytest.raises(ApiException) as missing:
        live.core.read_namespaced_pod(name, live.pool1)
    assert missing.value.status == 404


def test_tier_kube_system_and_unlabelled_namespaces_are_not_pinned(live: Tier):
    # Even labelled with a pool, kube-system is excluded by name (webhooks, policy and rules).
    live.core.patch_namespace("kube-system", {"metadata": {"labels": {"agentpool": "pool1"}}})
    try:
        body = pod(unique("dns"), labels={"platform": "true"}, limits={"cpu": "1"})
        system = live.core.create_namespaced_pod("kube-system", body)
        assert system.spec.node_selector is None
        assert system.spec.containers[0].resources.limits == {"cpu": "1"}
        assert system.spec.containers[0].image_pull_policy == "IfNotPresent"
    finally:
        live.core.patch_namespace("kube-system",
                                  {"metadata": {"labels": {"agentpool": None}}})

    # No pool label: no placement. The defaults are not placement: they apply everywhere but
    # the system namespaces.
    plain = live.core.create_namespaced_pod(live.plain, pod(unique("web"),
                                                            limits={"cpu": "1"}))
    assert plain.spec.node_selector is None
    assert plain.spec.containers[0].resources.limits is None


def test_tier_new_namespace_gets_type_and_systemid_labels(live: Tier):
    systemid = f"{random.randrange(10**5):05d}"
    name = f"{systemid}-{uuid.uuid4().hex[:6]}-dev"
    created = live.core.create_namespace({"metadata": {"name": name,
                                                       "labels": {"type": "other"}}})
    labels = created.metadata.labels
    assert labels["type"] == "user-workload"  # overwritten, as documented
    assert labels["systemid"] == systemid
    assert live.core.read_namespace(name).metadata.labels == labels


def test_tier_dry_run_shows_the_mutation_and_persists_nothing(live: Tier):
    name = unique("web")
    shown = live.core.create_namespaced_pod(live.pool1, pod(name, limits={"cpu": "1"}),
                                            dry_run="All")
    assert shown.spec.node_selector == {"agentpool": "pool1"}
    assert shown.spec.containers[0].resources.limits is None
    with pytest.raises(ApiException) as missing:
        live.core.read_namespaced_pod(name, live.pool1)
    assert missing.value.status == 404

    ns_name = f"{random.randrange(10**5):05d}-{uuid.uuid4().hex[:6]}-test"
    shown_ns = live.core.create_namespace({"metadata": {"name": ns_name}}, dry_run="All")
    assert shown_ns.metadata.labels["type"] == "user-workload"
    with pytest.raises(ApiException) as missing:
        live.core.read_namespace(ns_name)
    assert missing.value.status == 404
    # poolkeeper saw them as dry runs (it sends no Events for those: sideEffects NoneOnDryRun).
    assert {entry["dryRun"] for entry in live.admissions(name)} == {True}


def test_tier_daemonset_template_is_pinned_and_cannot_move(live: Tier):
    name = unique("agent")
    created = live.apps.create_namespaced_daemon_set(live.pool1, daemonset(name))
    assert created.spec.template.spec.node_selector == {"agentpool": "pool1"}

    with pytest.raises(ApiException) as caught:
        live.apps.patch_namespaced_daemon_set(
            name, live.pool1, {"spec": {"template": {"spec": {
                "nodeSelector": {"agentpool": "pool2"}}}}})
    assert caught.value.status == 403
    assert '"pool2"' in status_message(caught.value)
    stored = live.apps.read_namespaced_daemon_set(name, live.pool1)
    assert stored.spec.template.spec.node_selector == {"agentpool": "pool1"}


CONTROLLERS = ["deployment", "replicaset", "statefulset", "replicationcontroller", "job",
               "cronjob"]


def controller(slug: str, outcome: str, namespace: str) -> dict:
    """A golden case's pod controller (testdata/rules/agentpool-node-selector/), renamed and
    moved into ``namespace``."""
    obj = yaml.safe_load((ROOT / "testdata/rules/agentpool-node-selector" /
                          f"{slug}-template-{outcome}/input.yaml").read_text())
    obj["metadata"] = {"name": unique(slug), "namespace": namespace}
    return obj


@pytest.mark.parametrize("slug", CONTROLLERS)
def test_tier_controller_with_another_pools_template_is_refused_at_apply(live: Tier, slug):
    obj = controller(slug, "with-other-pool-is-denied", live.pool1)
    with pytest.raises(ApiException) as caught:
        live.create(obj)
    assert caught.value.status == 403
    message = status_message(caught.value)
    assert 'admission webhook "workloads.poolkeeper.io" denied the request' in message
    assert f'{obj["kind"]} pod template spec.' in message and '"pool2"' in message
    assert 'set it to "pool1"' in message


@pytest.mark.parametrize("slug", CONTROLLERS)
def test_tier_controller_without_a_pool_key_is_stored_unchanged(live: Tier, slug):
    obj = controller(slug, "without-pool-is-left-unchanged", live.pool1)
    live.create(obj)
    resource = live.dynamic.resources.get(api_version=obj["apiVersion"], kind=obj["kind"])
    stored = resource.get(name=obj["metadata"]["name"], namespace=live.pool1).to_dict()
    spec = stored["spec"]
    template = spec["jobTemplate"]["spec"]["template"] if slug == "cronjob" else spec["template"]
    assert "nodeSelector" not in template["spec"]  # never patched: no drift for GitOps
    assert template["spec"]["containers"][0]["resources"]["limits"]["cpu"] == "1"
    reviews = [e for e in live.admissions(obj["metadata"]["name"]) if e["kind"] == obj["kind"]]
    assert [e["decision"] for e in reviews] == ["allowed"]
    assert reviews[0]["rules"] == [] and reviews[0]["warned"] == ["remove-cpu-limits"]


def test_tier_controller_outage_does_not_block_rollouts(live: Tier):
    live.server.stop()
    try:
        obj = controller("deployment", "with-other-pool-is-denied", live.pool1)
        live.create(obj)  # workloads fails open; its pods would still be judged, fail closed
    finally:
        live.start_server()


def test_tier_reinvocation_repins_a_pod_a_later_mutation_unpinned(live: Tier):
    # A MutatingAdmissionPolicy (standing in for any later webhook or policy) strips the pool key
    # from pods labelled strip-pool. Because placement has reinvocationPolicy IfNeeded, the API
    # server calls it again after the strip, and the pod is stored pinned.
    strip = {
        "apiVersion": "admissionregistration.k8s.io/v1", "kind": "MutatingAdmissionPolicy",
        "metadata": {"name": "test-strip-pool"},
        "spec": {
            "failurePolicy": "Fail", "reinvocationPolicy": "IfNeeded",
            "matchConstraints": {"resourceRules": [{
                "apiGroups": [""], "apiVersions": ["v1"], "operations": ["CREATE"],
                "resources": ["pods"]}]},
            "matchConditions": [{"name": "labelled", "expression":
                                 "has(object.metadata.labels) && "
                                 "'strip-pool' in object.metadata.labels"}],
            "mutations": [{"patchType": "JSONPatch", "jsonPatch": {"expression": (
                "has(object.spec.nodeSelector) && 'agentpool' in object.spec.nodeSelector"
                " ? [JSONPatch{op: 'remove', path: '/spec/nodeSelector/agentpool'}] : []")}}]}}
    binding = {"apiVersion": "admissionregistration.k8s.io/v1",
               "kind": "MutatingAdmissionPolicyBinding",
               "metadata": {"name": "test-strip-pool"},
               "spec": {"policyName": "test-strip-pool"}}
    live.create(strip)
    live.create(binding)
    try:
        def strips() -> bool:  # the policy is in force: it strips in a namespace without a pool
            shown = live.core.create_namespaced_pod(
                live.plain, pod(unique("probe"), labels={"strip-pool": "yes"},
                                selector={"agentpool": "elsewhere"}), dry_run="All")
            return not shown.spec.node_selector

        wait_for(strips, "the test MutatingAdmissionPolicy to take effect")
        name = unique("web")
        created = live.core.create_namespaced_pod(live.pool1,
                                                  pod(name, labels={"strip-pool": "yes"}))
        assert created.spec.node_selector == {"agentpool": "pool1"}
        placements = [e for e in live.admissions(name)
                      if e["rules"] == ["agentpool-node-selector"]]
        assert [e["decision"] for e in placements] == ["patched", "patched"]
    finally:
        for kind, obj in (("mutating_admission_policy_binding", binding),
                          ("mutating_admission_policy", strip)):
            getattr(live.admission, f"delete_{kind}")(obj["metadata"]["name"])


def test_tier_mirror_pods_are_left_alone(live: Tier):
    # matchConditions skip mirror pods in the webhooks and in the policy.
    name = unique("static")
    created = live.core.create_namespaced_pod(
        live.pool1, pod(name, limits={"cpu": "1"},
                        annotations={"kubernetes.io/config.mirror": "0123456789abcdef"}))
    assert created.spec.node_selector is None
    assert created.spec.containers[0].resources.limits == {"cpu": "1"}
    assert live.admissions(name) == []


# -- certificates and caBundle (serve --manage-certs) ---------------------------------------------


def secret_data(tier: Tier) -> dict[str, bytes]:
    """The Secret's data ({} while there is none)."""
    try:
        secret = tier.core.read_namespaced_secret(SECRET, "poolkeeper-system")
    except ApiException as exc:
        if exc.status != 404:
            raise
        return {}
    return {k: base64.b64decode(v) for k, v in (secret.data or {}).items()}


def bundles(tier: Tier) -> dict[str, str]:
    """Every webhook's caBundle (base64, "" when unset), read as kubectl would."""
    config = json.loads(tier.kubectl("get", "mutatingwebhookconfiguration", MWC,
                                     "-o", "json").stdout)
    return {w["name"]: w.get("clientConfig", {}).get("caBundle", "") for w in config["webhooks"]}


def trusted_cas(tier: Tier) -> list[set[str]]:
    """Per webhook, the fingerprints of the CAs its caBundle holds."""
    return [{fingerprint(p) for p in split_certificates(base64.b64decode(bundle))}
            for bundle in bundles(tier).values()]


def served_certificate(server: Server) -> bytes:
    """The DER certificate the server presents, as the API server dials it."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as raw:
        with context.wrap_socket(raw, server_hostname="poolkeeper.poolkeeper-system.svc") as tls:
            return tls.getpeercert(binary_form=True)


def der(pem: bytes) -> bytes:
    return x509.load_pem_x509_certificate(pem).public_bytes(serialization.Encoding.DER)


def cabundle_sets(tier: Tier) -> int:
    """How often poolkeeper (the server the Service is mapped to) has set a caBundle so far."""
    return tier.server.log().count("set the caBundle of webhooks")


def test_tier_poolkeeper_creates_its_secret_and_sets_every_cabundle(live: Tier):
    # Nothing but poolkeeper wrote them: the fixture applied no Secret and no caBundle.
    assert "the Secret did not exist: created it" in (live.log_dir / "serve-1.log").read_text()
    secret = live.core.read_namespaced_secret(SECRET, "poolkeeper-system")
    assert secret.type == "kubernetes.io/tls"
    assert secret.metadata.labels == {"app.kubernetes.io/name": "poolkeeper"}
    data = secret_data(live)
    assert set(data) == {"ca.crt", "tls.crt", "tls.key"}
    certs.check_pair(data["ca.crt"], data["tls.crt"], data["tls.key"], "poolkeeper",
                     "poolkeeper-system")
    assert served_certificate(live.server) == der(data["tls.crt"])
    assert set(bundles(live).values()) == {base64.b64encode(data["ca.crt"]).decode()}
    # kubectl's record of what it applied holds no caBundle: applying again never removes it.
    config = live.admission.read_mutating_webhook_configuration(MWC)
    applied = json.loads(
        config.metadata.annotations["kubectl.kubernetes.io/last-applied-configuration"])
    assert all("caBundle" not in w["clientConfig"] for w in applied["webhooks"])
    created = live.core.create_namespaced_pod(live.pool1, pod(unique("web")))
    assert created.spec.node_selector == {"agentpool": "pool1"}


def test_tier_applying_the_manifests_again_keeps_the_cabundle_or_poolkeeper_restores_it(
        live: Tier):
    rendered = live.object("MutatingWebhookConfiguration")
    before = bundles(live)
    assert all(before.values())

    def restored(what: str) -> float:
        started = time.monotonic()
        wait_for(lambda: bundles(live) == before, f"poolkeeper to restore the caBundle ({what})",
                 timeout=10)
        return time.monotonic() - started

    # `kubectl apply -k deploy`, client-side and server-side: the caBundle is left alone
    # (poolkeeper has nothing to restore).
    for flags in ((), ("--server-side", "--force-conflicts")):
        sets = cabundle_sets(live)
        live.apply(rendered, *flags)
        assert bundles(live) == before, flags
        time.sleep(1.5)  # a removal would be restored by now, and counted
        assert cabundle_sets(live) == sets, flags
        assert live.core.create_namespaced_pod(live.pool1, pod(unique("web"))) \
            .spec.node_selector == {"agentpool": "pool1"}

    # A tool that replaces the object (kubectl replace, Argo CD's Replace=true) empties it;
    # someone sets another CA on one webhook; a webhook is added: poolkeeper sets it again
    # within seconds, for every webhook the configuration has.
    live.kubectl("replace", "-f", "-", stdin=yaml.safe_dump(rendered))
    print(f"\nkubectl replace: caBundle restored after {restored('replace'):.2f}s")
    foreign = base64.b64encode(certs.issue_pair("other", "elsewhere", 30,
                                                dt.datetime.now(dt.UTC))[0]).decode()
    live.admission.patch_mutating_webhook_configuration(MWC, {"webhooks": [
        {"name": "defaults.poolkeeper.io", "clientConfig": {"caBundle": foreign}}]})
    restored("another CA")
    extra = copy.deepcopy(rendered)
    extra["webhooks"].append({**copy.deepcopy(rendered["webhooks"][-1]),
                              "name": "extra.poolkeeper.io"})
    live.apply(extra)
    before["extra.poolkeeper.io"] = before["placement.poolkeeper.io"]
    restored("a webhook added")
    live.apply(rendered)  # kubectl removes the webhook it added
    del before["extra.poolkeeper.io"]
    assert bundles(live) == before
    assert live.core.create_namespaced_pod(live.pool1, pod(unique("web"))) \
        .spec.node_selector == {"agentpool": "pool1"}

    # An install made by integration/deploy.sh before: kubectl's record holds the caBundle, so
    # the next apply without it removes it, and poolkeeper restores it (deploy.sh now ends
    # that: test_tier_deploy_sh_...).
    live.apply(with_ca_bundle([rendered], before["placement.poolkeeper.io"])[0])
    live.apply(rendered)
    restored("after an install by the old deploy.sh")


NOT_SERVED = ("PodDisruptionBudget", "ResourceQuota", "NetworkPolicy")  # by miniapiserver

KUBECTL_WRAPPER = """
import subprocess, sys, yaml
args = sys.argv[1:]
if args[:1] == ["-n"] and args[2:3] == ["rollout"]:
    sys.exit(print("rollout: no controllers here"))  # poolkeeper serves already
stdin = None
if args[:1] == ["apply"] and args[1:2] != ["set-last-applied"] and args[-2:] == ["-f", "-"]:
    docs = [d for d in yaml.safe_load_all(sys.stdin) if d and d["kind"] not in {not_served}]
    stdin, args = yaml.safe_dump_all(docs), [*args, "--validate=false"]
sys.exit(subprocess.run([{kubectl}, *args], input=stdin, text=True).returncode)
"""


def run_deploy_sh(tier: Tier, tmp_path: Path, **env: str) -> subprocess.CompletedProcess:
    """integration/deploy.sh against the tier's API server, through a kubectl wrapper:
    miniapiserver runs no controllers (`kubectl rollout status` would wait forever: the wrapper
    answers it, poolkeeper serves already) and serves no PDB, ResourceQuota or NetworkPolicy
    (the wrapper leaves them out, as the tier's install does)."""
    wrapper = tmp_path / "kubectl"
    wrapper.write_text(f"#!{sys.executable}\n" + KUBECTL_WRAPPER.format(
        not_served=repr(set(NOT_SERVED)), kubectl=repr(kubectl())))
    wrapper.chmod(0o755)
    env = {**os.environ, "KUBECONFIG": tier.apiserver.kubeconfig, "KUBECTL": str(wrapper),
           "PYTHON": sys.executable, **env}
    result = subprocess.run(["bash", str(ROOT / "integration/deploy.sh")], env=env, cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    return result


def test_tier_deploy_sh_installs_and_migrates_without_the_cabundle_ever_missing(live: Tier,
                                                                                 tmp_path: Path):
    rendered = live.object("MutatingWebhookConfiguration")
    before = bundles(live)
    # An install made by the old deploy.sh: kubectl's record of the configuration holds the
    # caBundle. deploy.sh drops it from the record, so neither its own apply nor any later
    # `kubectl apply -k deploy` removes the caBundle: poolkeeper has nothing to restore.
    live.apply(with_ca_bundle([rendered], before["placement.poolkeeper.io"])[0])
    sets = cabundle_sets(live)
    assert "poolkeeper manages its certificates" in run_deploy_sh(live, tmp_path).stderr
    config = live.admission.read_mutating_webhook_configuration(MWC)
    applied = json.loads(
        config.metadata.annotations["kubectl.kubernetes.io/last-applied-configuration"])
    assert all("caBundle" not in w["clientConfig"] for w in applied["webhooks"])
    live.apply(rendered)
    time.sleep(1.5)
    assert bundles(live) == before and cabundle_sets(live) == sets

    # A first install: deploy.sh creates the configuration with the CA poolkeeper put in the
    # Secret, so no call ever meets a configuration without caBundle.
    live.admission.delete_mutating_webhook_configuration(MWC)
    run_deploy_sh(live, tmp_path)
    assert bundles(live) == before
    time.sleep(1.5)
    assert cabundle_sets(live) == sets
    assert live.core.create_namespaced_pod(live.pool1, pod(unique("web"))) \
        .spec.node_selector == {"agentpool": "pool1"}


@contextlib.contextmanager
def creating_pods(tier: Tier) -> Iterator[list]:
    """Dry-run pods created in the pool1 namespace every 0.1 s meanwhile (the whole admission
    chain runs for them); yields the list of (answer, error) of each, filled in when done."""
    results: list = []
    stop = threading.Event()

    def run() -> None:
        while not stop.is_set():
            try:
                created = tier.core.create_namespaced_pod(tier.pool1, pod(unique("web")),
                                                          dry_run="All")
            except ApiException as exc:
                results.append((None, f"{exc.status}: {status_message(exc)}"))
            else:
                results.append((created.spec.node_selector, None))
            stop.wait(0.1)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        yield results
    finally:
        stop.set()
        thread.join(30)


def replace_pair(tier: Tier, ca: bytes, cert: bytes, key: bytes) -> None:
    """The Secret gets another pair, as an admin would apply it (previous CAs and their
    overlap dropped)."""
    secret = tier.core.read_namespaced_secret(SECRET, "poolkeeper-system")
    secret.data = {k: base64.b64encode(v).decode() for k, v in
                   (("ca.crt", ca), ("tls.crt", cert), ("tls.key", key))}
    secret.metadata.annotations = None
    tier.core.replace_namespaced_secret(SECRET, "poolkeeper-system", secret)


def rotation(tier: Tier, change: Callable[[], object]) -> dict[str, bytes]:
    """``change`` the Secret while pods are created; follow poolkeeper through the overlap:
    every webhook trusts the old and the new CA, the pod serves the new pair, the old CA goes.
    Returns the Secret at the end; every pod was admitted and pinned throughout."""
    old = secret_data(tier)
    with creating_pods(tier) as results:
        change()
        current = wait_for(lambda: (d := secret_data(tier)).get("ca-previous.crt") and d,
                           "poolkeeper to keep the old CA trusted for the overlap")
        assert fingerprint(old["ca.crt"]) in {fingerprint(p) for p in
                                              split_certificates(current["ca-previous.crt"])}
        new = current["ca.crt"]
        both = {fingerprint(old["ca.crt"]), fingerprint(new)}
        wait_for(lambda: all(both <= cas for cas in trusted_cas(tier)),
                 "every webhook to trust the old and the new CA")
        wait_for(lambda: served_certificate(tier.server) == der(secret_data(tier)["tls.crt"]),
                 "the pod to serve the new pair")
        wait_for(lambda: trusted_cas(tier) == [{fingerprint(new)}] * len(trusted_cas(tier)),
                 "the overlap to end", timeout=OVERLAP + DEADLINE)
        time.sleep(1.0)  # and a few pods after it
    final = secret_data(tier)
    assert set(final) == {"ca.crt", "tls.crt", "tls.key"} and final["ca.crt"] == new
    failed = [error for _, error in results if error]
    assert failed == [], failed
    assert len(results) > 50 and all(s == {"agentpool": "pool1"} for s, _ in results)
    return final


def test_tier_pods_are_admitted_throughout_a_new_ca_in_the_secret(live: Tier):
    # What an admin's `poolkeeper certs --force` and `kubectl apply` of the Secret do: a new CA
    # at once. The pod serves it only once every webhook trusts it; the old CA stays trusted
    # for the overlap.
    ca, cert, key, _ = certs.issue_pair("poolkeeper", "poolkeeper-system", 365,
                                        dt.datetime.now(dt.UTC))
    final = rotation(live, lambda: replace_pair(live, ca, cert, key))
    assert final["tls.crt"] == cert  # a good pair is kept as it is


def test_tier_a_deleted_secret_is_created_again_without_a_failed_admission(live: Tier,
                                                                          tmp_path: Path):
    # The way to force a new CA: delete the Secret, as `ROTATE=1 integration/deploy.sh` does.
    # The pod keeps serving the old pair until every webhook trusts the new CA, and the old one
    # stays trusted for the overlap.
    old = secret_data(live)["ca.crt"]
    final = rotation(live, lambda: run_deploy_sh(live, tmp_path, ROTATE="1"))
    assert final["ca.crt"] != old


def test_tier_a_pair_two_thirds_through_its_lifetime_is_renewed(live: Tier):
    issued = dt.datetime.now(dt.UTC) - dt.timedelta(days=250)
    ca, cert, key, _ = certs.issue_pair("poolkeeper", "poolkeeper-system", 365, issued)
    final = rotation(live, lambda: replace_pair(live, ca, cert, key))
    assert final["ca.crt"] != ca  # a new CA, issued now for the default lifetime
    renewed = x509.load_pem_x509_certificate(final["tls.crt"])
    assert renewed.not_valid_after_utc - dt.datetime.now(dt.UTC) > dt.timedelta(days=364)


def test_tier_replicas_that_race_agree_on_one_secret_and_one_cabundle(live: Tier,
                                                                      tmp_path: Path):
    # Every replica manages, idempotently: two that read the same state (no Secret yet; a
    # configuration without caBundle) both write; the second gets 409 (Conflict), reads again
    # and finds nothing left to do, and both serve the winner's pair. Their own Secret and
    # webhook configuration (a webhook no object matches), so the tier's stay as they are.
    name, secret = "race-poolkeeper", "race-tls"
    hook = copy.deepcopy(live.object("MutatingWebhookConfiguration")["webhooks"][1])
    hook.update(name="race.poolkeeper.io", objectSelector={"matchLabels": {"race": "never"}})
    live.admission.create_mutating_webhook_configuration(
        {"metadata": {"name": name}, "webhooks": [hook]})
    configuration = json.loads(live.kubectl("get", "mutatingwebhookconfiguration", name,
                                            "-o", "json").stdout)
    settings = [Settings(cert_dir=str(tmp_path / str(i)), manage_certs=True,
                         cert_secret=f"poolkeeper-system/{secret}",
                         webhook_configuration=name) for i in range(2)]
    managers = [CertManager(live.api, s, settle=0) for s in settings]
    try:
        for manager in managers:  # what each one's watches reported
            manager.observe_secret(None)
            manager.observe_configuration(configuration)
        first, second = managers
        first.reconcile()  # creates the Secret, then sets the caBundle
        assert second.reconcile() == 0  # its create: 409; it read the Secret again
        assert second.reconcile() == 0  # its caBundle patch (old resourceVersion): 409
        second.reconcile()
        stored = live.core.read_namespaced_secret(secret, "poolkeeper-system")
        pair = {k: base64.b64decode(v) for k, v in stored.data.items()}
        for s in settings:
            assert (Path(s.cert_dir) / "tls.crt").read_bytes() == pair["tls.crt"]
        final = live.admission.read_mutating_webhook_configuration(name)
        assert base64.b64decode(final.webhooks[0].client_config.ca_bundle) == pair["ca.crt"]
        assert second.reconcile() > 0 and first.reconcile() > 0  # nothing left to do
        assert live.core.read_namespaced_secret(secret, "poolkeeper-system") \
            .metadata.resource_version == stored.metadata.resource_version
    finally:
        live.admission.delete_mutating_webhook_configuration(name)
        live.core.delete_namespaced_secret(secret, "poolkeeper-system")


def test_tier_webhook_down_placement_fails_closed_defaults_and_namespaces_fail_open(live: Tier):
    live.server.stop()
    try:
        with pytest.raises(ApiException) as caught:
            live.core.create_namespaced_pod(live.pool1, pod(unique("web")))
        assert caught.value.status == 500
        assert 'failed calling webhook "placement.poolkeeper.io"' in status_message(caught.value)

        name = f"{random.randrange(10**5):05d}-{uuid.uuid4().hex[:6]}-prod"
        namespace = live.core.create_namespace({"metadata": {"name": name}})
        assert "type" not in namespace.metadata.labels  # created, unlabelled: failed open

        plain = live.core.create_namespaced_pod(live.plain, pod(unique("web"),
                                                                limits={"cpu": "1"}))
        assert plain.spec.containers[0].resources.limits == {"cpu": "1"}  # failed open
    finally:
        live.ensure_webhook()


def test_tier_admission_policy_denies_misplaced_pods_when_the_webhook_is_bypassed(live: Tier):
    live.admission.delete_mutating_webhook_configuration(MWC)
    try:
        prefix = (f"ValidatingAdmissionPolicy '{POLICY}' with binding '{POLICY}' denied "
                  "request: pod spec.nodeSelector.agentpool is ")

        def denied_by_policy() -> str | None:  # once the API server has dropped the webhook
            try:
                live.core.create_namespaced_pod(live.pool1, pod("unpinned"), dry_run="All")
            except ApiException as exc:
                if exc.status == 403 and prefix in status_message(exc):
                    return status_message(exc)
                raise
            return None

        message = wait_for(denied_by_policy, "the webhook configuration to be removed")
        assert message == (
            f'pods "unpinned" is forbidden: {prefix}missing, but namespace "{live.pool1}" is '
            'pinned to node pool "pool1" (namespace label agentpool=pool1); is the poolkeeper '
            'webhook bypassed? Set that nodeSelector key to "pool1" (poolkeeper sets it when its '
            'placement webhook runs)')
        with pytest.raises(ApiException) as caught:
            live.core.create_namespaced_pod(live.pool1,
                                            pod(unique("web"), selector={"agentpool": "pool2"}))
        assert caught.value.status == 403 and f'{prefix}"pool2"' in status_message(caught.value)
        pinned = live.core.create_namespaced_pod(
            live.pool1, pod(unique("web"), selector={"agentpool": "pool1"}))
        assert pinned.spec.node_selector == {"agentpool": "pool1"}

        # UPDATE: pods from before their namespace was pooled keep updating, unpinned or on
        # another pool; moving one to another pool is denied. (kube-apiserver forbids changing a
        # scheduled pod's nodeSelector anyway; miniapiserver does not check pod specs, which
        # makes the policy's own rule visible.)
        namespace = unique("team-later")
        live.core.create_namespace({"metadata": {"name": namespace}})
        older, elsewhere = unique("older"), unique("elsewhere")
        live.core.create_namespaced_pod(namespace, pod(older))
        live.core.create_namespaced_pod(namespace, pod(elsewhere, selector={"agentpool": "pool2"}))
        live.core.patch_namespace(namespace, {"metadata": {"labels": {"agentpool": "pool1"}}})

        def move_denied() -> bool:  # once the policy sees the new namespace label
            try:
                live.core.patch_namespaced_pod(
                    older, namespace, {"spec": {"nodeSelector": {"agentpool": "pool2"}}},
                    dry_run="All")
            except ApiException as exc:
                if exc.status == 403 and prefix in status_message(exc):
                    return True
                raise
            return False

        wait_for(move_denied, "the policy to see the namespace's pool label")
        relabelled = live.core.patch_namespaced_pod(
            older, namespace, {"metadata": {"labels": {"tier": "web"}}})
        assert relabelled.metadata.labels == {"tier": "web"}
        assert relabelled.spec.node_selector is None
        # The key of another pool, unchanged by the update, is not a move.
        annotated = live.core.patch_namespaced_pod(
            elsewhere, namespace, {"metadata": {"annotations": {"example.com/note": "kept"},
                                                "finalizers": ["example.com/cleanup"]}})
        assert annotated.metadata.annotations == {"example.com/note": "kept"}
        assert annotated.spec.node_selector == {"agentpool": "pool2"}
        live.core.patch_namespaced_pod(elsewhere, namespace, {"metadata": {"finalizers": None}})
        with pytest.raises(ApiException) as caught:
            live.core.patch_namespaced_pod(
                elsewhere, namespace, {"spec": {"nodeSelector": {"agentpool": "pool3"}}})
        assert caught.value.status == 403 and f'{prefix}"pool3"' in status_message(caught.value)
    finally:
        live.ensure_webhook()


def test_tier_pod_updates_pass_while_poolkeeper_is_down_and_creation_fails_closed(live: Tier):
    # The placement webhook gets a pod UPDATE only while the old pod has scheduling gates (the
    # only case in which the API server lets its placement change), so labels, annotations and
    # finalizers of a running workload never depend on poolkeeper. Everything that can change
    # placement still fails closed.
    name, gated, agent = unique("web"), unique("gated"), unique("agent")
    live.core.create_namespaced_pod(live.pool1, pod(name))
    live.core.create_namespaced_pod(live.pool1, pod(gated, gates=["example.com/wait"]))
    live.apps.create_namespaced_daemon_set(live.pool1, daemonset(agent))
    live.server.stop()
    try:
        for args in (("label", "pod", name, "tier=web"),
                     ("annotate", "pod", name, "example.com/note=updated")):
            result = run_kubectl(live.apiserver, "-n", live.pool1, *args)
            assert result.returncode == 0, result.stderr
        # A controller's finalizer, added and removed through the client (patch: UPDATE)
        finalized = live.core.patch_namespaced_pod(
            name, live.pool1, {"metadata": {"finalizers": ["example.com/cleanup"]}})
        assert finalized.metadata.finalizers == ["example.com/cleanup"]
        live.core.patch_namespaced_pod(name, live.pool1, {"metadata": {"finalizers": None}})
        stored = live.core.read_namespaced_pod(name, live.pool1)
        assert stored.metadata.labels == {"tier": "web"}
        assert stored.metadata.annotations == {"example.com/note": "updated"}
        assert stored.spec.node_selector == {"agentpool": "pool1"}

        with pytest.raises(ApiException) as caught:
            live.core.create_namespaced_pod(live.pool1, pod(unique("web")))
        assert caught.value.status == 500
        assert 'failed calling webhook "placement.poolkeeper.io"' in status_message(caught.value)
        refused = run_kubectl(live.apiserver, "-n", live.pool1, "label", "pod", gated, "tier=web")
        assert refused.returncode != 0
        assert 'failed calling webhook "placement.poolkeeper.io"' in refused.stderr
        with pytest.raises(ApiException) as caught:
            live.apps.patch_namespaced_daemon_set(agent, live.pool1,
                                                  {"metadata": {"labels": {"tier": "web"}}})
        assert caught.value.status == 500
    finally:
        live.ensure_webhook()


def test_tier_only_updates_of_gated_pods_reach_the_placement_webhook(live: Tier):
    name, gated = unique("web"), unique("gated")
    live.core.create_namespaced_pod(live.pool1, pod(name))
    created = live.core.create_namespaced_pod(live.pool1, pod(gated, gates=["example.com/wait"]))
    assert created.spec.node_selector == {"agentpool": "pool1"}

    def updates(pod_name: str) -> list[dict]:
        return [e for e in live.admissions(pod_name) if e["operation"] == "UPDATE"]

    for pod_name in (name, gated):
        live.core.patch_namespaced_pod(pod_name, live.pool1,
                                       {"metadata": {"labels": {"tier": "web"}}})
    assert updates(name) == []
    assert [e["decision"] for e in updates(gated)] == ["allowed"]
    # Removing the last gate is an UPDATE of a gated pod: sent. After it, updates are not.
    live.core.patch_namespaced_pod(gated, live.pool1, {"spec": {"schedulingGates": None}})
    live.core.patch_namespaced_pod(gated, live.pool1, {"metadata": {"labels": {"tier": "db"}}})
    assert len(updates(gated)) == 2


def test_tier_apiserver_counts_failed_calls_under_the_names_the_alerts_read(live: Tier):
    # deploy/monitoring's API server alerts select k8s.io/apiserver's admission metrics by these
    # names and labels; this API server is built from that library.
    live.server.stop()
    try:
        with pytest.raises(ApiException):
            live.core.create_namespaced_pod(live.pool1, pod(unique("web")))  # fails closed
        live.core.create_namespace({"metadata": {"name": unique("fail-open")}})  # fails open
    finally:
        live.ensure_webhook()
    method, url, headers, _, _ = live.api.param_serialize("GET", "/metrics",
                                                          auth_settings=["BearerToken"])
    response = live.api.call_api(method, url, header_params=headers, _request_timeout=30)
    samples = []
    for line in response.read().decode().splitlines():
        match = re.match(r"^(apiserver_admission_webhook_\w+)\{([^}]*)\} \S+$", line)
        if match:
            samples.append((match.group(1), dict(re.findall(r'(\w+)="([^"]*)"', match.group(2)))))
    rules = yaml.safe_load((ROOT / "deploy/monitoring/prometheusrule.yaml").read_text())
    alerts = [r for g in rules["spec"]["groups"] for r in g["rules"] if "apiserver_" in r["expr"]]
    assert len(alerts) == 3
    for alert in alerts:
        metric, matchers = re.search(r"(apiserver_\w+)\{([^}]*)\}", alert["expr"]).groups()
        selected = [labels for name, labels in samples if name == metric
                    and all(selects(labels.get(label), op, value) for label, op, value in
                            re.findall(r'(\w+)\s*(=~|!~|!=|=)\s*"([^"]*)"', matchers))]
        assert selected, (alert["alert"], metric, matchers, sorted({n for n, _ in samples}))
        assert "name" in selected[0]  # the alerts sum by (name)
    counted = {(name, labels.get("name"), labels.get("error_type")) for name, labels in samples}
    assert ("apiserver_admission_webhook_rejection_count", "placement.poolkeeper.io",
            "calling_webhook_error") in counted
    assert ("apiserver_admission_webhook_fail_open_count", "namespaces.poolkeeper.io",
            None) in counted


def selects(actual: str | None, op: str, value: str) -> bool:
    """A PromQL label matcher (regexes anchored, a missing label is the empty string)."""
    actual = actual or ""
    if op in ("=~", "!~"):
        return bool(re.fullmatch(value, actual)) == (op == "=~")
    return (actual == value) == (op == "=")


def run_uninstall(apiserver: MiniApiServer) -> subprocess.CompletedProcess:
    binary = kubectl()
    if binary is None:
        skip_or_fail("kubectl not found: integration/uninstall.sh runs it; install it "
                     "(e.g. apt-get install kubectl) to run it")
    env = {**os.environ, "KUBECONFIG": apiserver.kubeconfig, "KUBECTL": binary,
           "SETTLE_SECONDS": "0", "WAIT_SECONDS": str(int(DEADLINE))}
    return subprocess.run(["bash", str(ROOT / "integration/uninstall.sh")], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=DEADLINE * 4)


def test_tier_uninstall_removes_the_webhook_and_backstop_first_and_is_idempotent(
        uninstall_apiserver: MiniApiServer, tmp_path: Path):
    with installed(uninstall_apiserver, tmp_path) as tier:
        # poolkeeper broken, the case in which removal matters most: pods fail closed.
        tier.server.stop()
        with pytest.raises(ApiException) as caught:
            tier.core.create_namespaced_pod(tier.pool1, pod(unique("web")))
        assert caught.value.status == 500

        first = run_uninstall(uninstall_apiserver)
        assert first.returncode == 0, first.stdout + first.stderr
        created = tier.core.create_namespaced_pod(tier.pool1, pod(unique("web")))
        assert created.spec.node_selector is None  # neither pinned nor denied
        log = first.stderr
        order = [log.index(line) for line in (
            'validatingadmissionpolicybinding.admissionregistration.k8s.io '
            f'"{POLICY}" deleted',
            f'validatingadmissionpolicy.admissionregistration.k8s.io "{POLICY}" deleted',
            f'mutatingwebhookconfiguration.admissionregistration.k8s.io "{MWC}" deleted',
            'namespace "poolkeeper-system" deleted',
            'clusterrole.rbac.authorization.k8s.io "poolkeeper" deleted')]
        assert order == sorted(order), log
        for read in (lambda: tier.admission.read_mutating_webhook_configuration(MWC),
                     lambda: tier.admission.read_validating_admission_policy(POLICY),
                     lambda: tier.admission.read_validating_admission_policy_binding(POLICY),
                     lambda: tier.core.read_namespace("poolkeeper-system"),
                     lambda: kubernetes.client.RbacAuthorizationV1Api(tier.api)
                     .read_cluster_role("poolkeeper")):
            with pytest.raises(ApiException) as missing:
                read()
            assert missing.value.status == 404

        second = run_uninstall(uninstall_apiserver)
        assert second.returncode == 0, second.stdout + second.stderr
        assert " deleted" not in second.stdout + second.stderr
        again = tier.core.create_namespaced_pod(tier.pool1, pod(unique("web")))
        assert again.spec.node_selector is None


# -- pools: tolerations, allowed pools, opt-out, pools that exist --------------------------------

SPOT_TAINT = {"key": "kubernetes.azure.com/scalesetpriority", "operator": "Equal",
              "value": "spot", "effect": "NoSchedule"}
POOL_RULE = "agentpool-node-selector.yaml"


@contextlib.contextmanager
def pool_params(tier: Tier, **params) -> Iterator[None]:
    """The server's pool rule with other params for the block (the rules directory is reloaded
    within about a second); the rule as it was afterwards."""
    path = tier.rules_dir / POOL_RULE
    shipped = path.read_text()
    rule = yaml.safe_load(shipped)
    rule["params"].update(params)
    path.write_text(yaml.safe_dump(rule, sort_keys=False))
    try:
        yield
    finally:
        path.write_text(shipped)


def namespace(tier: Tier, prefix: str, labels: dict | None = None,
              annotations: dict | None = None) -> str:
    name = unique(prefix)
    metadata: dict = {"name": name, "labels": dict(labels or {})}
    if annotations:
        metadata["annotations"] = dict(annotations)
    tier.core.create_namespace({"metadata": metadata})
    return name


def test_tier_pods_of_a_tainted_pool_get_its_tolerations(live: Tier):
    spot = namespace(live, "team-spot", {"agentpool": "spot"})
    own = {"key": "example.com/dedicated", "operator": "Exists", "effect": "NoSchedule"}
    with pool_params(live, pools={"spot": {"tolerations": [SPOT_TAINT]}}):
        def tolerated() -> bool:
            shown = live.core.create_namespaced_pod(spot, pod(unique("probe")), dry_run="All")
            return bool(shown.spec.tolerations)

        wait_for(tolerated, "the pool rule with the spot pool to be loaded")
        body = pod(unique("batch"))
        body["spec"]["tolerations"] = [own]
        created = live.api.sanitize_for_serialization(
            live.core.create_namespaced_pod(spot, body))
        assert created["spec"]["nodeSelector"] == {"agentpool": "spot"}
        assert created["spec"]["tolerations"] == [own, SPOT_TAINT]  # added after the pod's own
        again = live.core.create_namespaced_pod(
            spot, {**created, "metadata": {"name": unique("again")}}, dry_run="All")
        assert len(again.spec.tolerations) == 2  # the second pass adds nothing

        agent = live.apps.create_namespaced_daemon_set(spot, daemonset(unique("agent")))
        template = live.api.sanitize_for_serialization(agent.spec.template.spec)
        assert template["tolerations"] == [SPOT_TAINT]
        # a Deployment's template is judged, never patched: its pods get the toleration
        deployment = controller("deployment", "without-pool-is-left-unchanged", spot)
        live.create(deployment)
        stored = live.apps.read_namespaced_deployment(deployment["metadata"]["name"], spot)
        assert stored.spec.template.spec.tolerations is None


def test_tier_pod_may_choose_a_pool_its_namespace_allows(live: Tier):
    team = namespace(live, "team-ml", {"agentpool": "pool1"},
                     {"poolkeeper.io/allowed-pools": "gpu, spot"})
    gpu_taint = {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
    with pool_params(live, pools={"gpu": {"tolerations": [gpu_taint]}}):
        def loaded() -> bool:
            shown = live.core.create_namespaced_pod(team, pod(unique("probe"),
                                                              selector={"agentpool": "gpu"}),
                                                    dry_run="All")
            return bool(shown.spec.tolerations)

        wait_for(loaded, "the pool rule with the gpu pool to be loaded")
        created = live.core.create_namespaced_pod(team, pod(unique("train"),
                                                            selector={"agentpool": "gpu"}))
        assert created.spec.node_selector == {"agentpool": "gpu"}
        assert live.api.sanitize_for_serialization(created.spec.tolerations) == [gpu_taint]
        default = live.core.create_namespaced_pod(team, pod(unique("web")))
        assert default.spec.node_selector == {"agentpool": "pool1"}  # its own pool by default
        with pytest.raises(ApiException) as caught:
            live.core.create_namespaced_pod(team, pod(unique("web"),
                                                      selector={"agentpool": "pool2"}))
        assert caught.value.status == 403
        assert 'or to one of "gpu", "spot"' in status_message(caught.value)


def test_tier_backstop_accepts_allowed_pools_when_the_webhook_is_bypassed(live: Tier):
    team = namespace(live, "team-ml", {"agentpool": "pool1"},
                     {"poolkeeper.io/allowed-pools": " gpu,spot"})
    live.admission.delete_mutating_webhook_configuration(MWC)
    try:
        def denied_by_policy() -> bool:
            try:
                live.core.create_namespaced_pod(team, pod(unique("probe")), dry_run="All")
            except ApiException as exc:
                if exc.status == 403 and POLICY in status_message(exc):
                    return True
                raise
            return False

        wait_for(denied_by_policy, "the webhook configuration to be removed")
        for chosen in ("pool1", "gpu", "spot"):  # the CEL splits and trims the annotation
            created = live.core.create_namespaced_pod(
                team, pod(unique("web"), selector={"agentpool": chosen}))
            assert created.spec.node_selector == {"agentpool": chosen}
        with pytest.raises(ApiException) as caught:
            live.core.create_namespaced_pod(team, pod(unique("web"),
                                                      selector={"agentpool": "pool2"}))
        assert caught.value.status == 403 and POLICY in status_message(caught.value)
    finally:
        live.ensure_webhook()


def test_tier_namespace_with_an_empty_pool_label_has_opted_out(live: Tier):
    opted = namespace(live, "storage-operator", {"agentpool": ""})
    name = unique("csi")
    created = live.core.create_namespaced_pod(opted, pod(name))
    assert created.spec.node_selector is None  # neither pinned nor denied by the backstop
    # not even sent to the fail-closed placement webhook (its namespaceSelector): it never
    # waits on poolkeeper
    assert [e for e in live.admissions(name) if e["rules"] == ["agentpool-node-selector"]] == []
    live.server.stop()
    try:
        live.core.create_namespaced_pod(opted, pod(unique("csi")))  # poolkeeper down: still fine
    finally:
        live.ensure_webhook()


def node(name: str, pool: str) -> dict:
    return {"apiVersion": "v1", "kind": "Node",
            "metadata": {"name": name, "labels": {"agentpool": pool,
                                                  "kubernetes.io/hostname": name}}}


def kubectl_create(tier: Tier, tmp_path: Path, obj: dict,
                   *args: str) -> subprocess.CompletedProcess:
    manifest = tmp_path / f"{obj['metadata']['name']}.yaml"
    manifest.write_text(yaml.safe_dump(obj))
    return run_kubectl(tier.apiserver, "create", "-f", str(manifest), *args)


def pooled_namespace(name: str, pool: str) -> dict:
    return {"apiVersion": "v1", "kind": "Namespace",
            "metadata": {"name": name, "labels": {"agentpool": pool}}}


def test_tier_namespace_labelled_with_a_pool_no_node_has_gets_a_warning(live: Tier,
                                                                         tmp_path: Path):
    # miniapiserver serves Nodes as plain objects: these stand for the cluster's node pools
    nodes = [unique("aks-pool1"), unique("aks-pool2")]
    for name, pool in zip(nodes, ("pool1", "pool2"), strict=True):
        live.core.create_node(node(name, pool))
    try:
        typo = unique("team-typo")
        result = kubectl_create(live, tmp_path, pooled_namespace(typo, "pol1"))
        assert result.returncode == 0, result.stderr
        assert ("Warning: [agentpool-node-selector] no node has agentpool=pol1: pods would stay "
                "Pending (pools with nodes: pool1, pool2") in result.stderr
        assert live.core.read_namespace(typo).metadata.labels["agentpool"] == "pol1"  # warned only

        # relabelling the namespace is judged again; other updates are not sent
        relabelled = run_kubectl(live.apiserver, "label", "namespace", typo, "agentpool=pool9",
                                 "--overwrite")
        assert relabelled.returncode == 0 and "no node has agentpool=pool9" in relabelled.stderr
        annotated = run_kubectl(live.apiserver, "annotate", "namespace", typo, "example.com/a=b")
        assert annotated.returncode == 0 and "[agentpool-node-selector]" not in annotated.stderr
        updates = [e for e in live.admissions(typo) if e["operation"] == "UPDATE"]
        assert len(updates) == 1  # the relabel only (matchConditions)

        # a node relabelled into the pool: the node watch sees it, and the warning goes
        live.core.patch_node(nodes[1], {"metadata": {"labels": {"agentpool": "pool9"}}})
        probe = pooled_namespace(unique("probe"), "pool9")

        def pool9_has_nodes() -> bool:
            shown = kubectl_create(live, tmp_path, probe, "--dry-run=server")
            assert shown.returncode == 0, shown.stderr
            return "[agentpool-node-selector]" not in shown.stderr

        wait_for(pool9_has_nodes, "the node watch to see the relabelled node")
    finally:
        for name in nodes:
            live.core.delete_node(name)


def test_tier_namespace_with_an_unknown_pool_is_denied_with_unknown_pools_deny(live: Tier,
                                                                               tmp_path: Path):
    with pool_params(live, unknownPools="deny"):
        def denies() -> bool:
            try:
                live.core.create_namespace({"metadata": {"name": unique("probe"),
                                                         "labels": {"agentpool": "nowhere"}}},
                                           dry_run="All")
            except ApiException as exc:
                if exc.status == 403:
                    return True
                raise
            return False

        wait_for(denies, "the pool rule with unknownPools: deny to be loaded")
        result = kubectl_create(live, tmp_path, pooled_namespace(unique("team-typo"), "pol1"))
        assert result.returncode != 0
        assert ('admission webhook "namespaces.poolkeeper.io" denied the request: '
                "[agentpool-node-selector] namespace") in result.stderr
        assert "no node has agentpool=pol1" in result.stderr
    live.server.stop()
    try:  # the namespaces webhook fails open: with poolkeeper down, namespaces are created
        live.core.create_namespace({"metadata": {"name": unique("team-down"),
                                                 "labels": {"agentpool": "nowhere"}}})
    finally:
        live.ensure_webhook()
