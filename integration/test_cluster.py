"""poolkeeper in a real cluster (kind: integration/kind-config.yaml), through its real Service.

What the apiserver tier (tests/test_apiserver_tier.py) cannot show: pods scheduled onto their
pool's nodes, kubectl's server-side dry run, the webhook's own pods going away under load, and a
certificate rotation.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest
import yaml
from kubernetes.client.rest import ApiException

from .support import NAMESPACE, wait_for

ROOT = Path(__file__).resolve().parents[1]
# The pause image is on every kind node already (it is the pod sandbox): nothing is pulled.
IMAGE = "registry.k8s.io/pause:3.10"


def pod(name: str, *, labels: dict | None = None, selector: dict | None = None,
        limits: dict | None = None) -> dict:
    container: dict = {"name": "app", "image": IMAGE, "imagePullPolicy": "IfNotPresent"}
    if limits:
        container["resources"] = {"limits": dict(limits)}
    spec: dict = {"containers": [container], "terminationGracePeriodSeconds": 0}
    if selector is not None:
        spec["nodeSelector"] = dict(selector)
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "labels": dict(labels or {})}, "spec": spec}


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def message(exc: ApiException) -> str:
    return json.loads(exc.body)["message"]


def test_integration_pod_in_pool1_namespace_runs_on_the_pool1_worker(core, pool1):
    created = core.create_namespaced_pod(pool1, pod(unique("web")))
    assert created.spec.node_selector == {"agentpool": "pool1"}

    def scheduled():
        return core.read_namespaced_pod(created.metadata.name, pool1).spec.node_name

    node = wait_for(scheduled, "the scheduler to place the pod")
    assert core.read_node(node).metadata.labels.get("agentpool") == "pool1"


def test_integration_pod_asking_for_pool2_is_denied_with_the_message(core, pool1):
    with pytest.raises(ApiException) as caught:
        core.create_namespaced_pod(pool1, pod(unique("web"), selector={"agentpool": "pool2"}))
    assert caught.value.status == 403
    assert message(caught.value).startswith(
        'admission webhook "placement.poolkeeper.io" denied the request: '
        '[agentpool-node-selector] pod spec.nodeSelector.agentpool is "pool2", but namespace '
        f'"{pool1}" is pinned to node pool "pool1"')


def test_integration_kube_system_and_unlabelled_namespaces_are_not_pinned(core, namespaces):
    system = core.create_namespaced_pod("kube-system", pod(unique("probe"), limits={"cpu": "1"}),
                                        dry_run="All")
    assert system.spec.node_selector is None
    assert system.spec.containers[0].resources.limits == {"cpu": "1"}
    plain = core.create_namespaced_pod(namespaces("team-plain"), pod(unique("web")))
    assert plain.spec.node_selector is None


def test_integration_new_namespace_gets_its_labels(core, namespaces):
    name = namespaces("12345-shop")
    labels = core.read_namespace(name).metadata.labels
    assert labels["type"] == "user-workload" and labels["systemid"] == "12345"


def test_integration_platform_pod_always_pulls_and_loses_cpu_limits(core, pool1):
    created = core.create_namespaced_pod(
        pool1, pod(unique("web"), labels={"platform": "true"},
                   limits={"cpu": "500m", "memory": "32Mi"}))
    (container,) = created.spec.containers
    assert container.image_pull_policy == "Always"
    assert container.resources.limits == {"memory": "32Mi"}


def test_integration_daemonset_template_is_pinned(apps, pool1):
    labels = {"app": unique("agent")}
    created = apps.create_namespaced_daemon_set(pool1, {
        "apiVersion": "apps/v1", "kind": "DaemonSet", "metadata": {"name": labels["app"]},
        "spec": {"selector": {"matchLabels": labels},
                 "template": {"metadata": {"labels": labels},
                              "spec": pod("x")["spec"]}}})
    assert created.spec.template.spec.node_selector == {"agentpool": "pool1"}


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl not found")
def test_integration_kubectl_server_dry_run_shows_the_mutation_and_persists_nothing(core, pool1):
    name = unique("web")
    manifest = yaml.safe_dump({**pod(name, limits={"cpu": "1"}),
                               "metadata": {"name": name, "namespace": pool1}})
    result = subprocess.run(["kubectl", "apply", "--dry-run=server", "-o", "yaml", "-f", "-"],
                            input=manifest, capture_output=True, text=True, timeout=60,
                            check=True)
    shown = yaml.safe_load(result.stdout)
    assert shown["spec"]["nodeSelector"] == {"agentpool": "pool1"}
    assert "limits" not in shown["spec"]["containers"][0].get("resources", {})
    with pytest.raises(ApiException) as missing:
        core.read_namespaced_pod(name, pool1)
    assert missing.value.status == 404


def create_pods_while(core, namespace: str, disrupt) -> tuple[list[str], list[str]]:
    """Create pods one after another from a thread while ``disrupt()`` runs and for a few
    seconds after; returns (pinned pod names, failures)."""
    pinned, failures = [], []
    done = threading.Event()

    def create() -> None:
        while not done.is_set():
            try:
                created = core.create_namespaced_pod(namespace, pod(unique("load")))
                if created.spec.node_selector == {"agentpool": "pool1"}:
                    pinned.append(created.metadata.name)
                else:
                    failures.append(f"not pinned: {created.metadata.name}")
            except ApiException as exc:
                failures.append(f"{exc.status}: {message(exc)}")

    thread = threading.Thread(target=create, name="pod-creator")
    thread.start()
    try:
        disrupt()
        settle = time.monotonic() + 5
        while time.monotonic() < settle:  # keep creating while the replacement comes up
            time.sleep(0.2)
    finally:
        done.set()
        thread.join(timeout=60)
    return pinned, failures


@pytest.mark.usefixtures("webhook_ready")
def test_integration_deleting_a_webhook_pod_loses_no_admission(core, namespaces):
    namespace = namespaces("team-load", agentpool="pool1")
    (victim, *_) = core.list_namespaced_pod(
        NAMESPACE, label_selector="app.kubernetes.io/name=poolkeeper").items

    def delete_one() -> None:
        core.delete_namespaced_pod(victim.metadata.name, NAMESPACE)

        def gone() -> bool:
            try:
                core.read_namespaced_pod(victim.metadata.name, NAMESPACE)
            except ApiException as exc:
                return exc.status == 404
            return False

        wait_for(gone, "the deleted poolkeeper pod to terminate")

    pinned, failures = create_pods_while(core, namespace, delete_one)
    assert failures == []
    assert len(pinned) >= 10  # admissions happened throughout


@pytest.mark.usefixtures("webhook_ready")
def test_integration_certificate_rotation_loses_no_admission(api, apps, core, namespaces):
    """integration/deploy.sh with ROTATE=1: a new CA and pair while pods are being created
    (with the base, deploy.sh deletes the Secret and poolkeeper makes a new CA, trusting the old
    one for the overlap; with external-certs, deploy.sh rotates it itself). Uses the
    kustomization poolkeeper was installed with (INTEGRATION_KUSTOMIZATION, default
    deploy/overlays/kind) and the image it runs."""
    namespace = namespaces("team-rotate", agentpool="pool1")
    deployment = apps.read_namespaced_deployment("poolkeeper", NAMESPACE)
    image = deployment.spec.template.spec.containers[0].image
    secret_before = core.read_namespaced_secret("poolkeeper-tls", NAMESPACE).data["ca.crt"]
    env = {**os.environ, "ROTATE": "1", "IMAGE": image,
           # this interpreter has poolkeeper; `make integration` names its venv's explicitly
           "PYTHON": os.environ.get("PYTHON") or sys.executable}
    kustomization = os.environ.get("INTEGRATION_KUSTOMIZATION", "deploy/overlays/kind")

    def rotate() -> None:
        subprocess.run([str(ROOT / "integration/deploy.sh"), kustomization], env=env,
                       cwd=ROOT, check=True, timeout=600)

    pinned, failures = create_pods_while(core, namespace, rotate)
    assert failures == []
    assert pinned
    assert core.read_namespaced_secret("poolkeeper-tls", NAMESPACE).data["ca.crt"] != \
        secret_before
