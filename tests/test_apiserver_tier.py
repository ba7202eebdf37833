"""The apiserver tier: a real Kubernetes API server calls poolkeeper through deploy/'s own objects.

etcd + miniapiserver (k8s.io/apiserver with its real MutatingAdmissionWebhook,
ValidatingAdmissionPolicy and MutatingAdmissionPolicy plugins; not kube-apiserver: no scheduler,
no controllers, see ../shared/tools/miniapiserver/README.md), and `poolkeeper serve` over TLS with
the pair `poolkeeper certs --service poolkeeper --namespace poolkeeper-system` writes, reading
namespaces from that API server. The base rendered from deploy/ (integration/manifests.py, as
integration/deploy.sh does) is applied with the generated caBundle; the server runs the rules of
the applied ConfigMap; the Service is mapped to the server's loopback port. Every request below
goes through the kubernetes client and the API server: the scenarios of integration/ that need
no scheduler or controller.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import kubernetes.client
import kubernetes.dynamic
import pytest
import yaml
from kubernetes.client.rest import ApiException
from kubernetes.dynamic.exceptions import ResourceNotFoundError

from app.admission import admit
from app.kube import load_api_client
from integration.manifests import DEPLOY, kubectl, listed_files, render, with_ca_bundle

from .apiserver import MiniApiServer, apiserver_fixture
from .server import Server, start_server
from .support import ROOT, make_request, shipped_rules, skip_or_fail

pytestmark = pytest.mark.apiserver

tier_apiserver = apiserver_fixture("tier_apiserver", scope="module")
# Its own API server: the uninstall test removes everything the others use.
uninstall_apiserver = apiserver_fixture("uninstall_apiserver", scope="module")

SERVICE = "poolkeeper-system/poolkeeper:443"  # what every webhook's clientConfig.service names
MWC = "poolkeeper"
POLICY = "poolkeeper-pod-placement"
DEADLINE = 30.0  # seconds any eventual condition may take; conditions are polled, never slept on
# Objects the API server applies asynchronously (webhook configurations, policies, namespace
# labels seen by policies) are probed with dry-run requests until they take effect.


def wait_for(probe: Callable[[], object], what: str, timeout: float = DEADLINE):
    deadline = time.monotonic() + timeout
    while True:
        result = probe()
        if result:
            return result
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(0.1)


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
    objects: list[dict]  # the rendered base, caBundle set
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

    def start_server(self) -> None:
        """`poolkeeper serve` on a free port, ready (first namespace listing done), mapped as the
        webhooks' Service."""
        if self.server is not None:
            self.server.stop()  # never two at once
        self.starts += 1
        self.server = start_server(self.cert_dir, self.log_dir / f"serve-{self.starts}.log",
                                   "--kubeconfig", self.apiserver.kubeconfig,
                                   "--rules", str(self.rules_dir))
        self.apiserver.map_webhook_service(SERVICE, f"127.0.0.1:{self.server.port}")

    def ensure_webhook(self) -> None:
        """poolkeeper serving and its webhook configuration active, whatever a test left."""
        if self.server is None or self.server.process.poll() is not None:
            self.start_server()
        try:
            self.admission.read_mutating_webhook_configuration(MWC)
        except ApiException as exc:
            if exc.status != 404:
                raise
            self.create(self.object("MutatingWebhookConfiguration"))
        wait_for(self.webhook_pins_pods, "the placement webhook to pin a dry-run pod")

    def webhook_pins_pods(self) -> bool:
        try:
            created = self.core.create_namespaced_pod(self.pool1, pod(unique("probe")),
                                                      dry_run="All")
        except ApiException as exc:
            # 500: the API server cannot reach poolkeeper yet; the policy's 403: it does not
            # call the webhook configuration just created yet.
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
    the webhook configuration and the policy), a pool1 and a plain namespace, the webhook
    pinning pods."""
    cert_dir, rules_dir, log_dir = base / "tls", base / "rules", base / "logs"
    rules_dir.mkdir()
    log_dir.mkdir()
    certs = subprocess.run([sys.executable, "-m", "app", "certs", "--out", str(cert_dir),
                            "--service", "poolkeeper", "--namespace", "poolkeeper-system"],
                           cwd=ROOT, capture_output=True, text=True, timeout=60, check=True)
    objects = render(DEPLOY) if kubectl() else listed_files(DEPLOY)
    objects = with_ca_bundle(objects, certs.stdout.strip())

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
            tier.create(tier.object(kind))

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
    # Everything in deploy/ that miniapiserver serves was created; it has no policy/v1 and no
    # resourcequotas.
    assert set(tier.not_served) <= {"PodDisruptionBudget", "ResourceQuota"}, tier.not_served
    mwc = tier.admission.read_mutating_webhook_configuration(MWC)
    assert [w.name for w in mwc.webhooks] == ["placement.poolkeeper.io", "defaults.poolkeeper.io",
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
