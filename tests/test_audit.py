"""poolkeeper audit on fixture files (testdata/audit/), paging through a stand-in lister, and the
in-cluster loop's metrics. Through a real API server: tests/test_audit_cluster.py."""

from __future__ import annotations

import dataclasses
import json
import shutil

import orjson
import pytest
import yaml
from prometheus_client import REGISTRY

from app import metrics
from app.audit import (
    AuditAborted,
    AuditError,
    AuditLoop,
    ClusterLister,
    audit_cluster,
    audit_files,
    read_objects,
    render,
)
from app.cli import main
from app.rules import SHIPPED_RULES, load_rules

from .support import TESTDATA

AUDIT = TESTDATA / "audit"
NAMESPACES, PODS, NODES = (str(AUDIT / f) for f in ("namespaces.yaml", "pods.yaml", "nodes.yaml"))


def rules():
    return load_rules(SHIPPED_RULES)


def by_ref(result) -> dict[str, object]:
    return {w.ref: w for w in result.workloads}


def test_audit_each_reason_one_line_per_workload():
    result = audit_files(rules(), NAMESPACES, PODS, NODES)
    lines = {ref: sorted(w.reasons) for ref, w in by_ref(result).items()}
    assert lines == {
        "daemonset/log-agent": ["node-in-other-pool", "other-pool-key"],
        "deployment/api": ["other-pool-key"],  # inferred from pod-template-hash
        "deployment/web": ["node-in-other-pool", "other-pool-key"],  # from the ReplicaSet list
        "job/migrate-28471230": ["no-pool-key"],
        "pod/debug": ["no-pool-key"],
        "pod/pinned": ["node-in-other-pool"],
        "statefulset/db": ["node-in-other-pool", "other-pool-key"],
    }
    web = by_ref(result)["deployment/web"]
    assert (web.namespace, web.pool, len(web.pods)) == ("team-a", "pool2", 2)
    assert web.found == {"agentpool=pool1", "on node-p1 (pool1)"}
    assert by_ref(result)["daemonset/log-agent"].found == {
        "agentpool=pool1", "on node-p1 (pool1)", "template agentpool=pool1"}
    # finished and mirror pods, excluded (kube-system) and unpooled (sandbox) namespaces, and
    # team-b, which agrees, are not listed
    assert {w.namespace for w in result.workloads} == {"team-a"}
    assert (result.pods_read, result.pods_checked, result.daemonsets_checked) == (14, 10, 2)
    assert result.namespaces == 2 and result.nodes_checked and result.drift
    assert result.counts()[("team-a", "other-pool-key")] == 4


def test_audit_fix_hints_name_the_command_per_controller():
    hints = {ref: w.fix_hint() for ref, w in by_ref(audit_files(rules(), NAMESPACES, PODS,
                                                                 NODES)).items()}
    assert hints["deployment/web"] == "kubectl rollout restart deployment/web -n team-a"
    assert hints["statefulset/db"] == "kubectl rollout restart statefulset/db -n team-a"
    assert hints["pod/debug"] == "kubectl delete pod debug -n team-a"
    assert hints["job/migrate-28471230"] == "kubectl delete pod -n team-a migrate-28471230-9xk2m"
    # the template names pool1: a restart (an UPDATE) would be denied, so drop the key instead
    assert hints["daemonset/log-agent"] == (
        "kubectl patch daemonset/log-agent -n team-a --type=json "
        "-p '[{\"op\":\"remove\",\"path\":\"/spec/template/spec/nodeSelector/agentpool\"}]'")


def test_audit_daemonset_without_the_key_is_restarted_and_keys_with_slashes_are_escaped(
        tmp_path):
    from app.rules import PoolPlacement

    (rule,) = [r for r in rules() if r.name == "agentpool-node-selector"]
    aks = dataclasses.replace(rule, policy=PoolPlacement(
        nodeLabelKey="kubernetes.azure.com/agentpool"))
    objects = [{"apiVersion": "apps/v1", "kind": "DaemonSet",
                "metadata": {"name": "agent", "namespace": "team-a"},
                "spec": {"template": {"spec": {"nodeSelector": {
                    "kubernetes.azure.com/agentpool": "pool1"}}}}},
               {"apiVersion": "apps/v1", "kind": "DaemonSet",
                "metadata": {"name": "fresh", "namespace": "team-a"},
                "spec": {"template": {"spec": {}}}}]
    (tmp_path / "pods.yaml").write_text(yaml.safe_dump_all(objects))
    result = audit_files([aks], NAMESPACES, str(tmp_path / "pods.yaml"))
    hints = {w.ref: w.fix_hint() for w in result.workloads}
    assert hints["daemonset/fresh"] == "kubectl rollout restart daemonset/fresh -n team-a"
    assert "/spec/template/spec/nodeSelector/kubernetes.azure.com~1agentpool" in \
        hints["daemonset/agent"]


def test_audit_without_nodes_checks_only_selectors():
    result = audit_files(rules(), NAMESPACES, PODS)
    assert not result.nodes_checked
    assert "pod/pinned" not in by_ref(result)  # its selector is right; its node is unknown
    assert all("node-in-other-pool" not in w.reasons for w in result.workloads)


def test_audit_clean_cluster_exits_0(tmp_path, capsys):
    namespaces = yaml.safe_load((AUDIT / "namespaces.yaml").read_text())
    for item in namespaces["items"]:
        if item["metadata"]["name"] == "team-a":
            item["metadata"]["labels"]["agentpool"] = "pool1"  # the relabel undone
    (tmp_path / "ns.yaml").write_text(yaml.safe_dump(namespaces))
    pods = yaml.safe_load((AUDIT / "pods.yaml").read_text())
    drifting = ("debug", "pinned", "migrate-28471230-9xk2m", "api-5f6d7c8b9-q2w3e")
    pods["items"] = [p for p in pods["items"] if p["metadata"]["name"] not in drifting]
    (tmp_path / "pods.yaml").write_text(yaml.safe_dump(pods))
    code = main(["audit", "--namespaces", str(tmp_path / "ns.yaml"), "--pods",
                 str(tmp_path / "pods.yaml"), "--nodes", NODES])
    out = capsys.readouterr().out
    assert code == 0
    assert out == "no drift: 6 pods and 2 DaemonSets in 2 pooled namespaces checked\n"


def test_audit_table_with_fix_hints_exits_1(capsys):
    code = main(["audit", "--namespaces", NAMESPACES, "--pods", PODS, "--nodes", NODES,
                 "--fix-hint"])
    out = capsys.readouterr().out.splitlines()
    assert code == 1
    assert out[0].split() == ["NAMESPACE", "WORKLOAD", "POOL", "REASONS", "PODS", "FOUND", "FIX"]
    web = next(line for line in out if "deployment/web" in line)
    assert web.split()[:5] == ["team-a", "deployment/web", "pool2",
                               "other-pool-key,node-in-other-pool", "2"]
    assert web.endswith("kubectl rollout restart deployment/web -n team-a")
    assert out[-1] == ("7 workloads (8 pods) drift from their namespace's pool; 10 pods and 2 "
                       "DaemonSets in 2 pooled namespaces checked")
    assert main(["audit", "--namespaces", NAMESPACES, "--pods", PODS]) == 1
    assert "FIX" not in capsys.readouterr().out.splitlines()[0]


@pytest.mark.parametrize("output, load", [("json", json.loads), ("yaml", yaml.safe_load)])
def test_audit_json_and_yaml_output(capsys, output, load):
    assert main(["audit", "--namespaces", NAMESPACES, "--pods", PODS, "--nodes", NODES,
                 "-o", output]) == 1
    doc = load(capsys.readouterr().out)
    assert doc["checked"] == {"pods": 10, "daemonSets": 2, "namespaces": 2, "podsRead": 14}
    assert doc["nodesChecked"] is True and doc["rules"] == ["agentpool-node-selector"]
    web = next(d for d in doc["drift"] if d["name"] == "web")
    assert web == {"namespace": "team-a", "kind": "Deployment", "name": "web", "pool": "pool2",
                   "reasons": ["other-pool-key", "node-in-other-pool"], "pods": 2,
                   "examples": ["web-7d9f8c6b5d-abcde", "web-7d9f8c6b5d-fghij"],
                   "found": ["agentpool=pool1", "on node-p1 (pool1)"],
                   "fix": "kubectl rollout restart deployment/web -n team-a"}
    assert len(doc["drift"]) == 7


@pytest.mark.parametrize("args, message", [
    (["--pods", PODS], "needs both --namespaces FILE and --pods FILE"),
    (["--nodes", NODES], "--nodes FILE is for the offline audit"),
    (["--namespaces", NAMESPACES, "--pods", "/nonexistent/pods.yaml"],
     "/nonexistent/pods.yaml: cannot be read"),
    (["--namespaces", NAMESPACES, "--pods", NAMESPACES], "holds no Pods, DaemonSets or "
                                                         "ReplicaSets"),
    (["--namespaces", NAMESPACES, "--pods", PODS, "--nodes", PODS], "not only Nodes"),
    (["--namespaces", PODS, "--pods", PODS], "kind is 'ReplicaSet', expected Namespace"),
    (["--kubeconfig", "/nonexistent/kubeconfig"], "kubeconfig not found"),
    (["--chunk-size", "0"], "--chunk-size 0 must be at least 1"),
])
def test_audit_errors_exit_2_with_one_clear_line(capsys, args, message):
    assert main(["audit", *args]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    (line,) = captured.err.splitlines()
    assert line.startswith("poolkeeper audit: ") and message in line


def test_audit_needs_a_pool_rule_that_is_not_off(tmp_path, capsys):
    shutil.copytree(SHIPPED_RULES, tmp_path / "rules")
    path = tmp_path / "rules/agentpool-node-selector.yaml"
    path.write_text(path.read_text().replace("enforcement: enforce", "enforcement: 'off'"))
    assert main(["audit", "--rules", str(tmp_path / "rules"), "--namespaces", NAMESPACES,
                 "--pods", PODS]) == 2
    assert "no PoolPlacement rule that is not off" in capsys.readouterr().err


def test_audit_default_pool_covers_unlabelled_namespaces():
    from app.rules import PoolPlacement

    (rule,) = [r for r in rules() if r.name == "agentpool-node-selector"]
    with_default = dataclasses.replace(rule, policy=PoolPlacement(defaultPool="pool1"))
    result = audit_files([with_default], NAMESPACES, PODS)
    assert by_ref(result)["pod/scratch"].pool == "pool1"  # sandbox has no label
    assert "deployment/coredns" not in by_ref(result)  # kube-system stays excluded


def test_audit_honours_allowed_pools_and_the_empty_label_opt_out(tmp_path):
    from app.rules import PoolPlacement

    namespaces = yaml.safe_load((AUDIT / "namespaces.yaml").read_text())
    for item in namespaces["items"]:
        if item["metadata"]["name"] == "team-a":  # relabelled to pool2, pods still on pool1
            item["metadata"]["annotations"] = {"poolkeeper.io/allowed-pools": "pool1"}
        if item["metadata"]["name"] == "sandbox":
            item["metadata"]["labels"]["agentpool"] = ""  # opted out
    (tmp_path / "ns.yaml").write_text(yaml.safe_dump(namespaces))
    (rule,) = [r for r in rules() if r.name == "agentpool-node-selector"]
    with_default = dataclasses.replace(rule, policy=PoolPlacement(defaultPool="pool1"))
    lines = {ref: sorted(w.reasons) for ref, w in by_ref(
        audit_files([with_default], str(tmp_path / "ns.yaml"), PODS, NODES)).items()}
    # pods keeping pool1, which team-a allows, are drift only on a node of another pool (api
    # on node-p2, and pinned, on its own pool2, on node-p1); those without a key still are;
    # sandbox's pod is not audited at all
    assert lines == {"deployment/api": ["node-in-other-pool"],
                     "job/migrate-28471230": ["no-pool-key"], "pod/debug": ["no-pool-key"],
                     "pod/pinned": ["node-in-other-pool"]}


def test_audit_read_objects_accepts_streams_and_typed_lists(tmp_path):
    (tmp_path / "stream.yaml").write_text("kind: Pod\nmetadata: {name: a}\n---\n---\n"
                                          "kind: PodList\nitems: [{metadata: {name: b}}]\n")
    assert [(o["kind"], o["metadata"]["name"]) for o in read_objects(
        str(tmp_path / "stream.yaml"))] == [("Pod", "a"), ("Pod", "b")]
    (tmp_path / "bad.yaml").write_text("- 1\n")
    with pytest.raises(AuditError, match="document 1 is not a Kubernetes object"):
        read_objects(str(tmp_path / "bad.yaml"))
    (tmp_path / "items.yaml").write_text("kind: List\nitems: 3\n")
    with pytest.raises(AuditError, match="items must be a list"):
        read_objects(str(tmp_path / "items.yaml"))


# -- paging ----------------------------------------------------------------------------------------


class Response:
    def __init__(self, body: dict) -> None:
        self.data = orjson.dumps(body)

    def release_conn(self) -> None:
        pass


class PagedApi:
    """Stands in for CoreV1Api and AppsV1Api: serves the fixture's objects in pages of
    ``limit`` with continue tokens and remainingItemCount, as the API server does, and records
    every call. Items carry no kind, as in a real list."""

    def __init__(self, objects: list[dict], forbidden: tuple[str, ...] = ()) -> None:
        self.calls: list[tuple[str, int, str | None]] = []
        self.forbidden = forbidden
        self.by_kind: dict[str, list[dict]] = {}
        for obj in objects:
            item = {k: v for k, v in obj.items() if k not in ("kind", "apiVersion")}
            self.by_kind.setdefault(obj["kind"], []).append(item)

    def _list(self, kind: str, limit: int, _continue: str | None, **_: object) -> Response:
        import kubernetes.client

        self.calls.append((kind, limit, _continue))
        if kind in self.forbidden:
            raise kubernetes.client.ApiException(status=403, reason="Forbidden")
        items = self.by_kind.get(kind, [])
        start = int(_continue or 0)
        page = items[start:start + limit]
        rest = len(items) - start - len(page)
        metadata = {"resourceVersion": "42"}
        if rest:
            metadata.update({"continue": str(start + limit), "remainingItemCount": rest})
        return Response({"metadata": metadata, "items": page})

    def list_pod_for_all_namespaces(self, **kw):
        return self._list("Pod", **kw)

    def list_node(self, **kw):
        return self._list("Node", **kw)

    def list_namespace(self, **kw):
        return self._list("Namespace", **kw)

    def list_daemon_set_for_all_namespaces(self, **kw):
        return self._list("DaemonSet", **kw)

    def list_replica_set_for_all_namespaces(self, **kw):
        return self._list("ReplicaSet", **kw)


def fixture_objects() -> list[dict]:
    return (read_objects(NAMESPACES) + read_objects(NODES) + read_objects(PODS))


def test_audit_pages_through_every_list_with_limit_and_continue():
    api = PagedApi(fixture_objects())
    seen: list[tuple[int, int | None]] = []
    result = audit_cluster(ClusterLister(api, api, page_size=4), rules(),
                           progress=lambda done, total: seen.append((done, total)))
    offline = audit_files(rules(), NAMESPACES, PODS, NODES)
    assert [w.to_dict() for w in result.workloads] == [w.to_dict() for w in offline.workloads]
    assert result.pods_read == 14
    pod_calls = [(limit, token) for kind, limit, token in api.calls if kind == "Pod"]
    assert pod_calls == [(4, None), (4, "4"), (4, "8"), (4, "12")]
    assert all(limit == 4 for _, limit, _ in api.calls)
    assert seen == [(4, 14), (8, 14), (12, 14), (14, 14)]


def test_audit_lists_it_cannot_read_are_noted_not_fatal():
    api = PagedApi(fixture_objects(), forbidden=("Node", "ReplicaSet", "DaemonSet"))
    result = audit_cluster(ClusterLister(api, api), rules())
    assert not result.nodes_checked
    assert len(result.notes) == 3 and "nodes are not readable (HTTP 403)" in result.notes[0]
    # without the ReplicaSet list the Deployment comes from the pod-template-hash label
    assert "deployment/web" in by_ref(result) and "daemonset/log-agent" in by_ref(result)


def test_audit_pods_it_cannot_read_fail_the_audit():
    import kubernetes.client

    api = PagedApi(fixture_objects(), forbidden=("Pod",))
    with pytest.raises(kubernetes.client.ApiException):
        audit_cluster(ClusterLister(api, api), rules())


def test_audit_expired_continue_token_says_run_again():
    import kubernetes.client

    api = PagedApi(fixture_objects())
    original = api._list

    def expire(kind, limit, _continue, **kw):
        if kind == "Pod" and _continue:
            raise kubernetes.client.ApiException(status=410, reason="Gone")
        return original(kind, limit, _continue, **kw)

    api._list = expire
    with pytest.raises(AuditError, match="expired while it was read page by page"):
        audit_cluster(ClusterLister(api, api, page_size=4), rules())


def test_audit_stops_between_pages_when_told():
    api = PagedApi(fixture_objects())
    pages = []

    def keep_going() -> bool:
        pages.append(1)
        return len(pages) < 3

    with pytest.raises(AuditAborted):
        audit_cluster(ClusterLister(api, api, page_size=4), rules(), keep_going=keep_going)


# -- the in-cluster loop and its metrics ------------------------------------------------------------


def drift_samples() -> dict[tuple[str, str], float]:
    return {(s.labels["namespace"], s.labels["reason"]): s.value
            for family in REGISTRY.collect() if family.name == "poolkeeper_drift_workloads"
            for s in family.samples}


def test_audit_loop_exports_only_while_elected_and_zeroes_when_it_stops():
    result = audit_files(rules(), NAMESPACES, PODS, NODES)
    elected = [True]
    loop = AuditLoop(lambda keep_going: result, lambda: elected[0], interval=300)
    assert loop.run_once() is result
    samples = drift_samples()
    assert samples[("team-a", "other-pool-key")] == 4
    assert samples[("team-a", "no-pool-key")] == 2
    assert samples[("team-a", "node-in-other-pool")] == 4
    last = REGISTRY.get_sample_value("poolkeeper_audit_last_run_timestamp_seconds")
    assert last and last > 0
    loop._retire()  # what the loop does once the Lease says another process audits
    assert set(drift_samples().values()) == {0}


def test_audit_loop_survives_a_failed_audit(caplog):
    def fail(keep_going):
        raise AuditError("the pods list expired")

    loop = AuditLoop(fail, lambda: True, interval=300)
    assert loop.run_once() is None
    assert "audit failed: the pods list expired" in caplog.text


def test_audit_drift_series_are_capped():
    before = set(metrics._drift_series)
    metrics._drift_series.clear()
    try:
        metrics.export_drift({(f"ns-{i}", "no-pool-key"): i + 1 for i in range(5)}, cap=3)
        samples = drift_samples()
        # the largest three keep their namespace, the rest are summed under _other
        assert samples[("ns-4", "no-pool-key")] == 5 and samples[("ns-2", "no-pool-key")] == 3
        assert samples[(metrics.OTHER_NAMESPACES, "no-pool-key")] == 1 + 2
        assert ("ns-0", "no-pool-key") not in metrics._drift_series
        metrics.export_drift({("ns-4", "no-pool-key"): 1}, cap=3)
        assert drift_samples()[("ns-2", "no-pool-key")] == 0  # clean now
    finally:
        metrics.clear_drift()
        metrics._drift_series.update(before)


def test_audit_render_cuts_long_values():
    result = audit_files(rules(), NAMESPACES, PODS, NODES)
    workload = result.workloads[0]
    workload.found = {"x" * 200}
    line = render(result).splitlines()[1]
    assert "x" * 57 + "..." in line and "x" * 61 not in line


def test_audit_progress_bar_only_on_a_terminal():
    import io

    from app.audit import _progress_bar

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    assert _progress_bar(io.StringIO()) is None  # a pipe or a log gets no bar
    terminal = Terminal()
    bar = _progress_bar(terminal)
    bar.update(500, 1200)
    bar.update(1200, 1200)
    bar.close()
    assert "pods" in terminal.getvalue()


def test_audit_interval_is_off_by_default_and_validated():
    from app.config import ConfigError, load_settings

    assert load_settings({}, environ={}).audit_interval == 0
    assert load_settings({}, environ={"POOLKEEPER_AUDIT_INTERVAL": "300"}).audit_interval == 300
    with pytest.raises(ConfigError, match="audit-interval: 0.5 must be 0 .off. or at least 1"):
        load_settings({"audit_interval": 0.5}, environ={})
