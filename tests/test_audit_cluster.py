"""The audit, its Lease election and ``poolkeeper status`` against a real API server.

miniapiserver (../shared/tools/miniapiserver) is k8s.io/apiserver on etcd, not kube-apiserver: it
stores Deployments, ReplicaSets, DaemonSets, Nodes and Leases as plain objects (no controllers,
no scheduler, no kubelet), so the tests create the pods, their owners and their nodes
themselves, with ownerReferences and nodeName as the controllers and the scheduler would set
them. The election runs between real ``poolkeeper serve`` processes (gunicorn workers, each a
candidate of its own).
"""

from __future__ import annotations

import json
import re
import shutil
import time
import urllib.parse
import uuid
from collections.abc import Callable
from pathlib import Path

import kubernetes.client
import pytest

from app.audit import ClusterLister, audit_cluster
from app.certs import create_certificates
from app.cli import main
from app.kube import load_api_client
from app.leases import AUDIT_LEASE, LeaseApi, list_replicas
from app.rules import SHIPPED_RULES, load_rule_set, load_rules

from .apiserver import MiniApiServer, apiserver_fixture
from .server import Server, start_server

# Its own API server: the audit lists every namespace and pod, so other modules' objects would
# show up in its output.
apiserver = apiserver_fixture(scope="module")

DEADLINE = 60.0  # seconds an eventual condition may take on a loaded 2-core machine


def wait_until(condition: Callable[[], object], what: str, timeout: float = DEADLINE):
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(0.1)
    return value


@pytest.fixture(scope="module")
def client(apiserver: MiniApiServer):
    api_client = load_api_client(apiserver.kubeconfig)
    yield api_client
    api_client.close()


@pytest.fixture(scope="module")
def core(client):
    return kubernetes.client.CoreV1Api(client)


@pytest.fixture(scope="module")
def apps(client):
    return kubernetes.client.AppsV1Api(client)


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    directory = tmp_path_factory.mktemp("certs")
    create_certificates(directory, "poolkeeper", "poolkeeper-system")
    return directory


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def owner(obj) -> list[dict]:
    return [{"apiVersion": obj.api_version, "kind": obj.kind, "name": obj.metadata.name,
             "uid": obj.metadata.uid, "controller": True, "blockOwnerDeletion": True}]


def pod_body(name: str, *, pool: str | None, node: str | None = None, owners=None,
             labels=None) -> dict:
    spec: dict = {"containers": [{"name": "c", "image": "registry.example/app:1.0"}]}
    if pool:
        spec["nodeSelector"] = {"agentpool": pool}
    if node:
        spec["nodeName"] = node
    return {"metadata": {"name": name, "labels": labels or {}, "ownerReferences": owners or []},
            "spec": spec}


def relabelled_namespace(core, apps) -> tuple[str, str]:
    """A namespace whose pods were pinned to pool1, relabelled to pool2 afterwards; returns it
    and the pool1 node its Deployment's pods run on."""
    namespace, node = unique("pk-team"), unique("node-pool1")
    core.create_node({"metadata": {"name": node, "labels": {"agentpool": "pool1"}}})
    core.create_namespace({"metadata": {"name": namespace, "labels": {"agentpool": "pool1"}}})
    template = {"metadata": {"labels": {"app": "web"}},
                "spec": {"containers": [{"name": "c", "image": "registry.example/app:1.0"}]}}
    deployment = apps.create_namespaced_deployment(namespace, {
        "metadata": {"name": "web"},
        "spec": {"replicas": 3, "selector": {"matchLabels": {"app": "web"}},
                 "template": template}})
    replicaset = apps.create_namespaced_replica_set(namespace, {
        "metadata": {"name": "web-5d8f7c9b6", "ownerReferences": owner(deployment),
                     "labels": {"app": "web", "pod-template-hash": "5d8f7c9b6"}},
        "spec": {"replicas": 3, "selector": {"matchLabels": {"app": "web"}},
                 "template": template}})
    for suffix in ("a1b2c", "d3e4f", "g5h6i"):
        core.create_namespaced_pod(namespace, pod_body(
            f"web-5d8f7c9b6-{suffix}", pool="pool1", node=node, owners=owner(replicaset),
            labels={"app": "web", "pod-template-hash": "5d8f7c9b6"}))
    daemonset = apps.create_namespaced_daemon_set(namespace, {
        "metadata": {"name": "log-agent"},
        "spec": {"selector": {"matchLabels": {"app": "log-agent"}},
                 "template": {"metadata": {"labels": {"app": "log-agent"}},
                              "spec": {**template["spec"], "nodeSelector": {"agentpool": "pool1"}}}}})
    core.create_namespaced_pod(namespace, pod_body("log-agent-x7k2p", pool="pool1", node=node,
                                                   owners=owner(daemonset)))
    core.create_namespaced_pod(namespace, pod_body("debug", pool=None))
    core.patch_namespace(namespace, {"metadata": {"labels": {"agentpool": "pool2"}}})
    return namespace, node


@pytest.mark.apiserver
def test_audit_cluster_finds_the_pods_of_a_relabelled_namespace(apiserver, core, apps, capsys):
    namespace, node = relabelled_namespace(core, apps)
    assert main(["audit", "--kubeconfig", apiserver.kubeconfig, "-o", "json"]) == 1
    doc = json.loads(capsys.readouterr().out)
    lines = {(d["kind"], d["name"]): d for d in doc["drift"] if d["namespace"] == namespace}
    assert set(lines) == {("Deployment", "web"), ("DaemonSet", "log-agent"), ("Pod", "debug")}
    web = lines[("Deployment", "web")]
    assert (web["pool"], web["pods"], web["reasons"]) == (
        "pool2", 3, ["other-pool-key", "node-in-other-pool"])
    assert web["found"] == ["agentpool=pool1", f"on {node} (pool1)"]
    assert web["fix"] == f"kubectl rollout restart deployment/web -n {namespace}"
    assert lines[("Pod", "debug")]["reasons"] == ["no-pool-key"]
    assert lines[("DaemonSet", "log-agent")]["fix"].startswith(
        f"kubectl patch daemonset/log-agent -n {namespace} --type=json")
    assert doc["nodesChecked"] is True

    assert main(["audit", "--kubeconfig", apiserver.kubeconfig, "--fix-hint"]) == 1
    table = capsys.readouterr().out
    assert re.search(rf"^{namespace}\s+deployment/web\s+pool2\s+other-pool-key,node-in-other-pool"
                     rf"\s+3\s+.*kubectl rollout restart deployment/web -n {namespace}$",
                     table, re.M)


@pytest.mark.apiserver
def test_audit_cluster_reads_pods_page_by_page(apiserver, core, apps):
    namespace, _ = relabelled_namespace(core, apps)
    api_client = load_api_client(apiserver.kubeconfig)
    queries: list[dict[str, list[str]]] = []
    send = api_client.call_api

    def call_api(method, url, *args, **kwargs):
        parts = urllib.parse.urlsplit(url)
        if parts.path == "/api/v1/pods":
            queries.append(urllib.parse.parse_qs(parts.query))
        return send(method, url, *args, **kwargs)

    api_client.call_api = call_api
    try:
        result = audit_cluster(ClusterLister.from_client(api_client, page_size=2),
                               load_rules(SHIPPED_RULES))
    finally:
        api_client.close()
    assert ("Deployment", "web") in {(w.kind, w.name) for w in result.workloads
                                     if w.namespace == namespace}
    assert len(queries) == -(-result.pods_read // 2) >= 3  # every page holds at most 2 pods
    assert all(q["limit"] == ["2"] for q in queries)
    assert "continue" not in queries[0] and all("continue" in q for q in queries[1:])


def scrape(server: Server) -> str:
    with server.session() as session:
        response = session.get(server.metrics_url, timeout=10, headers={"Connection": "close"})
    assert response.status_code == 200
    return response.text


def last_audit(server: Server) -> float:
    found = re.search(r"^poolkeeper_audit_last_run_timestamp_seconds ([0-9.e+]+)$",
                      scrape(server), re.M)
    return float(found.group(1)) if found else 0.0


def holder(leases: LeaseApi, namespace: str) -> str:
    lease = leases.get(namespace, AUDIT_LEASE) or {}
    return (lease.get("spec") or {}).get("holderIdentity") or ""


def serve(certs, tmp_path, apiserver, name: str, namespace: str, *args: str,
          workers: int = 1) -> Server:
    return start_server(certs, tmp_path / f"{name}.log", "--kubeconfig", apiserver.kubeconfig,
                        *args, workers=workers, threads=2,
                        env={"POD_NAME": name, "POD_NAMESPACE": namespace})


@pytest.mark.apiserver
def test_audit_lease_elects_one_serve_process_and_another_takes_over(apiserver, client, core,
                                                                     apps, certs, tmp_path):
    team, _ = relabelled_namespace(core, apps)
    home = unique("pk-system")
    core.create_namespace({"metadata": {"name": home}})
    leases = LeaseApi(client)
    servers = {name: serve(certs, tmp_path, apiserver, name, home, "--audit-interval", "1",
                           workers=workers)
               for name, workers in (("replica-a", 2), ("replica-b", 1))}
    try:
        first = wait_until(lambda: holder(leases, home), "an auditor to be elected")
        leader_name = first.split("_")[0]
        other_name = next(n for n in servers if n != leader_name)
        leader, other = servers[leader_name], servers[other_name]
        assert int(first.split("_")[1]) in leader.worker_pids()  # a worker process holds it
        wait_until(lambda: last_audit(leader) > 0, "the first audit")
        drift = scrape(leader)
        assert f'poolkeeper_drift_workloads{{namespace="{team}",reason="other-pool-key"}} 2.0' \
            in drift  # the Deployment and the DaemonSet
        assert f'poolkeeper_drift_workloads{{namespace="{team}",reason="no-pool-key"}} 1.0' \
            in drift
        time.sleep(3 * 2.0)  # a few retry periods: nobody else campaigns successfully
        assert holder(leases, home) == first
        assert last_audit(other) == 0.0
        logs = leader.log() + other.log()
        assert logs.count("became the holder of Lease") == 1, logs

        leader.stop()  # graceful: the Lease is released, the next candidate needn't wait it out
        second = wait_until(lambda: (h := holder(leases, home)) and h != first and h,
                            "another process to take the Lease over", timeout=30)
        assert second.startswith(f"{other_name}_")
        wait_until(lambda: last_audit(other) > 0, "the new auditor's first audit")
    finally:
        for server in servers.values():
            server.stop()


@pytest.mark.apiserver
def test_status_shows_replicas_on_different_rules_until_the_change_reaches_them(
        apiserver, client, core, certs, tmp_path, capsys):
    home = unique("pk-system")
    core.create_namespace({"metadata": {"name": home}})
    shipped = tmp_path / "shipped"
    changed = tmp_path / "changed"
    shutil.copytree(SHIPPED_RULES, shipped)
    shutil.copytree(SHIPPED_RULES, changed)
    rule = changed / "image-pull-policy.yaml"
    rule.write_text(rule.read_text().replace("policy: Always", "policy: IfNotPresent"))
    servers = [serve(certs, tmp_path, apiserver, "replica-a", home, "--rules", str(shipped)),
               serve(certs, tmp_path, apiserver, "replica-b", home, "--rules", str(changed))]
    status = ["status", "--kubeconfig", apiserver.kubeconfig, "-n", home, "--rules", str(shipped)]
    try:
        leases = LeaseApi(client)
        wait_until(lambda: len(list_replicas(leases, home)) == 2, "both replica records")
        assert main(status) == 1
        out = capsys.readouterr().out
        shipped_digest = load_rule_set(shipped).digest
        assert re.search(rf"^replica-a\s+\d+\s+{shipped_digest[:12]}\s+\S+Z\s+\d+s ago\s+agrees$",
                         out, re.M), out
        assert re.search(rf"^replica-b\s+\d+\s+{load_rule_set(changed).digest[:12]}\s+.*differs$",
                         out, re.M), out
        assert f"(digest {shipped_digest[:12]}): 1 of 2 live replicas enforce them" in out
        with servers[1].session() as session:  # the replica's own view: its /readyz
            ready = session.get(servers[1].url + "/readyz", timeout=10)
        assert ready.text == f"ok\nrules {load_rule_set(changed).digest}\n"

        shutil.copy(shipped / "image-pull-policy.yaml", rule)  # the ConfigMap edit reaches b
        wait_until(lambda: main(status) == 0, "replica-b to report the new rules")
        out = capsys.readouterr().out
        assert "2 of 2 live replicas enforce them; all enforce them" in out.splitlines()[-1]
        assert main([*status, "-o", "json"]) == 0
        doc = json.loads(capsys.readouterr().out)
        assert doc["agreed"] is True and {r["state"] for r in doc["replicas"]} == {"agrees"}
        assert {r["pod"] for r in doc["replicas"]} == {"replica-a", "replica-b"}

        servers[1].stop()  # a graceful stop deletes its record
        wait_until(lambda: len(list_replicas(leases, home)) == 1, "replica-b's record to go")
    finally:
        for server in servers:
            server.stop()


@pytest.mark.apiserver
def test_status_without_replicas_or_api_server_exits_1_or_2(apiserver, core, capsys):
    home = unique("pk-empty")
    core.create_namespace({"metadata": {"name": home}})
    assert main(["status", "--kubeconfig", apiserver.kubeconfig, "-n", home]) == 1
    assert "no live replica records" in capsys.readouterr().out
    broken = apiserver.dir / "kubeconfig-unreachable"
    broken.write_text(Path(apiserver.kubeconfig).read_text().replace(
        f":{apiserver.port}\n", ":1\n"))
    assert main(["status", "--kubeconfig", str(broken), "-n", home]) == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith(f"poolkeeper status: cannot read the replica records in namespace "
                           f"{home}: ")
