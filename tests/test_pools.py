"""poolkeeper pools: each pool's namespaces, nodes (Ready count) and tolerations, from files or
from the cluster (a real API server: miniapiserver, where Nodes are plain objects)."""

from __future__ import annotations

import json
import shutil
import uuid
from pathlib import Path

import kubernetes.client
import pytest

from app.cli import main
from app.kube import load_api_client
from app.namespaces import Namespace
from app.nodes import Node
from app.pools import format_table, report

from .apiserver import MiniApiServer, apiserver_fixture
from .support import ROOT, pool_rules

apiserver = apiserver_fixture()

SPOT = {"key": "kubernetes.azure.com/scalesetpriority", "operator": "Equal", "value": "spot",
        "effect": "NoSchedule"}
NAMESPACES = {
    "team-a": Namespace({"agentpool": "pool1"}),
    "team-b": Namespace({"agentpool": "pool1"},
                        {"poolkeeper.io/allowed-pools": "spot,gpu"}),
    "team-c": Namespace({"agentpool": "pool1"}),
    "team-d": Namespace({"agentpool": "pool1"}),
    "batch": Namespace({"agentpool": "spot"}),
    "typo": Namespace({"agentpool": "pol1"}),
    "storage": Namespace({"agentpool": ""}),
    "sandbox": Namespace({}),
    "kube-system": Namespace({"agentpool": "system"}),
}
NODES = [Node("n1", {"agentpool": "pool1"}, True), Node("n2", {"agentpool": "pool1"}, False),
         Node("s1", {"agentpool": "spot"}, True), Node("x", {}, True)]


def test_pools_report_places_each_namespace_and_node():
    (rule,) = pool_rules(pools={"spot": {"tolerations": [SPOT]}})
    result = report(rule, NAMESPACES, NODES)
    rows = {r.pool: r for r in result.pools}
    assert list(rows) == ["gpu", "pol1", "pool1", "spot"]  # kube-system is excluded
    assert rows["pool1"].namespaces == ["team-a", "team-b", "team-c", "team-d"]
    assert (rows["pool1"].nodes, rows["pool1"].ready) == (2, 1)
    assert rows["spot"].namespaces == ["batch"] and rows["spot"].allowed_in == ["team-b"]
    assert rows["spot"].tolerations == [SPOT] and rows["spot"].listed
    assert rows["gpu"].allowed_in == ["team-b"] and rows["gpu"].nodes == 0
    assert not rows["gpu"].listed
    assert rows["pol1"].namespaces == ["typo"] and rows["pol1"].nodes == 0
    assert result.opted_out == ["storage"]


def test_pools_report_default_pool_and_selector_and_unknown_readiness():
    (rule,) = pool_rules(defaultPool="general")
    rows = {r.pool: r for r in report(rule, NAMESPACES, [Node("g", {"agentpool": "general"})]
                                      ).pools}
    assert rows["general"].namespaces == ["sandbox"]  # unlabelled: the default pool
    assert rows["general"].ready is None  # a node file without status
    import dataclasses

    from app.rules import LabelSelector, Requirement

    selective = dataclasses.replace(rule, match=dataclasses.replace(
        rule.match, namespace_selector=LabelSelector((Requirement("agentpool", "In",
                                                                  frozenset({"spot"})),))))
    assert [r.pool for r in report(selective, NAMESPACES, []).pools] == ["general", "spot"]


def test_pools_table_names_a_few_namespaces_and_the_pools_without_nodes():
    (rule,) = pool_rules(pools={"spot": {"tolerations": [SPOT]}})
    table = format_table([report(rule, NAMESPACES, NODES)])
    assert table == (
        "POOL   NAMESPACES                   NODES  READY  TOLERATIONS\n"
        "gpu    (allowed in 1)               0      0      -\n"
        "pol1   typo                         0      0      -\n"
        "pool1  team-a, team-b, team-c (+1)  2      1      -\n"
        "spot   batch (allowed in 1)         1      1      "
        "kubernetes.azure.com/scalesetpriority=spot:NoSchedule\n"
        "pools no node has (agentpool=<pool>), where pods would stay Pending: gpu, pol1\n"
        'opted out (agentpool=""): storage\n')
    two = format_table([report(rule, {}, []), report(rule, {}, [])])
    assert two.startswith("rule agentpool-node-selector:\nPOOL")


def write(path: Path, text: str) -> str:
    path.write_text(text)
    return str(path)


NAMESPACES_YAML = """\
apiVersion: v1
kind: List
items:
- kind: Namespace
  metadata: {name: team-a, labels: {agentpool: pool1}}
- kind: Namespace
  metadata: {name: batch, labels: {agentpool: spot}}
"""
NODES_YAML = """\
apiVersion: v1
kind: List
items:
- kind: Node
  metadata: {name: n1, labels: {agentpool: pool1}}
  status: {conditions: [{type: Ready, status: "True"}]}
"""


def test_pools_command_reads_files_and_prints_json(tmp_path, capsys):
    rules = tmp_path / "rules"
    shutil.copytree(ROOT / "rules", rules)
    code = main(["pools", "--rules", str(rules),
                 "--namespaces", write(tmp_path / "ns.yaml", NAMESPACES_YAML),
                 "--nodes", write(tmp_path / "nodes.yaml", NODES_YAML), "-o", "json"])
    out, err = capsys.readouterr()
    assert code == 0, err
    (result,) = json.loads(out)
    assert result["rule"] == "agentpool-node-selector"
    assert [(p["pool"], p["namespaces"], p["nodes"], p["ready"]) for p in result["pools"]] == [
        ("pool1", ["team-a"], 1, 1), ("spot", ["batch"], 0, 0)]
    assert main(["pools", "--namespaces", str(tmp_path / "ns.yaml"),
                 "--nodes", str(tmp_path / "nodes.yaml")]) == 0
    assert capsys.readouterr().out.startswith("POOL   NAMESPACES")


@pytest.mark.parametrize("args, problem", [
    (["--namespaces", "missing.yaml", "--nodes", "missing.yaml"],
     "poolkeeper pools: cannot read missing.yaml: No such file or directory"),
    (["--namespaces", "{ns}", "--nodes", "{bad}"], "bad.yaml: document 1: expected a Node object"),
    (["--namespaces", "{bad}", "--nodes", "{nodes}"],
     "bad.yaml: document 1: kind is 'Pod', expected Namespace or List"),
    (["--namespaces", "{ns}", "--nodes", "{nodes}", "--rules", "{no_pool_rule}"],
     "no PoolPlacement rule is in force"),
])
def test_pools_command_problems_are_one_line_and_exit_2(tmp_path, capsys, args, problem):
    files = {"ns": write(tmp_path / "ns.yaml", NAMESPACES_YAML),
             "nodes": write(tmp_path / "nodes.yaml", NODES_YAML),
             "bad": write(tmp_path / "bad.yaml", "kind: Pod\nmetadata: {name: x}\n")}
    other = tmp_path / "other-rules"
    other.mkdir()
    shutil.copy(ROOT / "rules/image-pull-policy.yaml", other)
    files["no_pool_rule"] = str(other)
    code = main(["pools", *(a.format(**files) for a in args)])
    err = capsys.readouterr().err
    assert code == 2 and problem in err and len(err.strip().splitlines()) == 1, err


def test_pools_command_without_a_cluster_says_to_give_files(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "missing-kubeconfig"))
    assert main(["pools", "--nodes", write(tmp_path / "nodes.yaml", NODES_YAML)]) == 2
    err = capsys.readouterr().err
    assert "give --namespaces FILE and --nodes FILE" in err


@pytest.mark.apiserver
def test_pools_command_reads_the_cluster(apiserver: MiniApiServer, capsys):
    apiserver.ensure_running()
    client = load_api_client(apiserver.kubeconfig)
    core = kubernetes.client.CoreV1Api(client)
    pool, team = f"pool-{uuid.uuid4().hex[:6]}", f"team-{uuid.uuid4().hex[:6]}"
    nodes = [f"{pool}-{i}" for i in range(3)]
    try:
        core.create_namespace({"metadata": {"name": team, "labels": {"agentpool": pool},
                                            "annotations": {"poolkeeper.io/allowed-pools": "gpu"}}})
        for index, name in enumerate(nodes):
            core.create_node({"metadata": {"name": name, "labels": {"agentpool": pool}}})
            status = "True" if index else "False"
            core.patch_node_status(name, {"status": {"conditions": [
                {"type": "Ready", "status": status, "reason": "KubeletReady",
                 "message": "test", "lastHeartbeatTime": "2026-01-01T00:00:00Z",
                 "lastTransitionTime": "2026-01-01T00:00:00Z"}]}})
        assert main(["pools", "--kubeconfig", apiserver.kubeconfig, "-o", "json"]) == 0
        (result,) = json.loads(capsys.readouterr().out)
        rows = {p["pool"]: p for p in result["pools"]}
        assert (rows[pool]["namespaces"], rows[pool]["nodes"], rows[pool]["ready"]) == (
            [team], 3, 2)
        assert team in rows["gpu"]["allowedIn"]
    finally:
        core.delete_namespace(team)
        for name in nodes:
            core.delete_node(name)
        client.close()


def test_mutate_sees_the_pools_a_namespace_allows(tmp_path, capsys):
    pod = {"apiVersion": "v1", "kind": "Pod",
           "metadata": {"name": "train", "namespace": "team-search"},
           "spec": {"containers": [{"name": "c", "image": "x"}],
                    "nodeSelector": {"agentpool": "gpu"}}}
    path = tmp_path / "pod.json"
    path.write_text(json.dumps(pod))
    code = main(["mutate", "--rules", str(ROOT / "testdata/pools/rules"), "--namespaces",
                 str(ROOT / "testdata/pools/namespaces.yaml"), "-o", "json", str(path)])
    out, err = capsys.readouterr()
    assert code == 0, err
    spec = json.loads(out)["spec"]
    assert spec["nodeSelector"] == {"agentpool": "gpu", "kubernetes.io/arch": "amd64"}
    assert spec["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists",
                                    "effect": "NoSchedule"}]
