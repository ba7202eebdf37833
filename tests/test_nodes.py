"""Node pools: Node objects read from YAML, and the API server's nodes watched as metadata only
(through the real kubernetes client against miniapiserver, which serves Nodes as plain objects)."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable

import kubernetes.client
import pytest

from app.kube import load_api_client
from app.nodes import FixedNodes, Node, parse_nodes, pool_counts
from app.nodes.informer import KubeNodes

from .apiserver import MiniApiServer, apiserver_fixture

apiserver = apiserver_fixture()

DEADLINE = 30.0  # seconds any eventual condition may take; conditions are polled, never slept on

NODES = """\
apiVersion: v1
kind: List
items:
- apiVersion: v1
  kind: Node
  metadata:
    name: aks-pool1-0
    labels: {agentpool: pool1, kubernetes.io/arch: amd64}
  status:
    conditions:
    - {type: MemoryPressure, status: "False"}
    - {type: Ready, status: "True"}
- metadata:
    name: aks-pool1-1
    labels: {agentpool: pool1}
  status:
    conditions: [{type: Ready, status: "False"}]
- apiVersion: v1
  kind: Node
  metadata: {name: bare}
"""


def test_nodes_are_read_from_a_kubectl_list():
    nodes = parse_nodes(NODES)
    assert nodes == [Node("aks-pool1-0", {"agentpool": "pool1", "kubernetes.io/arch": "amd64"},
                          True),
                     Node("aks-pool1-1", {"agentpool": "pool1"}, False),
                     Node("bare", {}, None)]
    assert FixedNodes(nodes).pools("agentpool") == {"pool1": 2}
    assert FixedNodes(nodes).pools("kubernetes.io/arch") == {"amd64": 1}
    FixedNodes(nodes).stop()


def test_nodes_are_read_from_a_stream_and_a_single_node():
    stream = "kind: Node\nmetadata: {name: a, labels: {p: x}}\n---\n---\nkind: NodeList\nitems: []\n"
    assert [n.name for n in parse_nodes(stream)] == ["a"]


@pytest.mark.parametrize("text, problem", [
    ("kind: Pod\nmetadata: {name: a}\n", "document 1: expected a Node object"),
    ("metadata: {name: a}\n", "document 1: kind is missing"),
    ("kind: List\nitems: 3\n", "'items' is not a list"),
    ("kind: List\nitems: [3]\n", "document 1, items[0]: expected a Node object"),
    ("kind: Node\nmetadata: {labels: {}}\n", "metadata.name is missing"),
    ("kind: Node\nmetadata: x\n", "metadata.name is missing"),
    ("kind: Node\nmetadata: {name: a, labels: {p: 1}}\n", "(a): metadata.labels is not a map of "
                                                          "strings"),
])
def test_nodes_file_problems_name_the_document(text, problem):
    with pytest.raises(ValueError, match=problem.replace("(", r"\(").replace(")", r"\)")
                       .replace("[", r"\[").replace("]", r"\]")):
        parse_nodes(text)


def test_nodes_pool_counts_skip_nodes_without_the_key():
    assert pool_counts([{"a": "x"}, {"a": "x"}, {"a": "y"}, {}], "a") == {"x": 2, "y": 1}


def wait_until(condition: Callable[[], object], what: str) -> None:
    deadline = time.monotonic() + DEADLINE
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {DEADLINE:.0f}s waiting for {what}")
        time.sleep(0.05)


class FakeClock:
    def __init__(self) -> None:
        self.now = 10_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def cluster(apiserver: MiniApiServer):
    """The test's own client, and a pool name no other test uses."""
    apiserver.ensure_running()
    client = load_api_client(apiserver.kubeconfig)
    core = kubernetes.client.CoreV1Api(client)
    created: list[str] = []

    def node(pool: str, **labels: str) -> str:
        name = f"node-{uuid.uuid4().hex[:8]}"
        # what a kubelet reports; the watch asks for metadata only, so none of it is sent
        core.create_node({"metadata": {"name": name, "labels": {"agentpool": pool, **labels}},
                          "status": {"images": [{"names": ["registry/app:" + "x" * 200],
                                                 "sizeBytes": 1}]}})
        created.append(name)
        return name

    yield core, node, f"pool-{uuid.uuid4().hex[:6]}"
    for name in created:
        try:
            core.delete_node(name)
        except kubernetes.client.ApiException:
            pass
    client.close()


def watch_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "poolkeeper-nodes-watch"]


@pytest.mark.apiserver
def test_kube_nodes_watch_starts_on_first_lookup_and_follows_relabels(apiserver, cluster):
    core, node, pool = cluster
    first, second = node(pool), node(pool)
    client = load_api_client(apiserver.kubeconfig)
    accepts: list[str] = []
    send = client.call_api

    def call_api(method, url, header_params=None, *args, **kwargs):
        accepts.append((header_params or {}).get("Accept", ""))
        return send(method, url, header_params, *args, **kwargs)

    client.call_api = call_api
    nodes = KubeNodes(client, owns_client=True, backoff_cap=1.0)
    try:
        assert watch_threads() == [] and not nodes.ready()  # nothing runs until a rule asks
        assert nodes.pools("agentpool")[pool] == 2  # the first lookup waits for the listing
        assert all(labels.keys() == {"agentpool"} for labels in nodes._store.values()
                   if labels.get("agentpool") == pool)  # labels only
        assert accepts[0].startswith("application/json;as=PartialObjectMetadataList;")
        wait_until(lambda: len(accepts) > 1, "the watch")
        assert accepts[1].startswith("application/json;as=PartialObjectMetadata;")

        core.patch_node(first, {"metadata": {"labels": {"agentpool": f"{pool}-b"}}})
        wait_until(lambda: nodes.pools("agentpool").get(f"{pool}-b") == 1, "the relabel")
        core.delete_node(second)
        wait_until(lambda: pool not in nodes.pools("agentpool"), "the deletion")
        assert nodes.pools("kubernetes.io/hostname") == {}
    finally:
        nodes.stop()
    assert watch_threads() == []


@pytest.mark.apiserver
def test_kube_nodes_stale_store_is_not_known(apiserver, cluster):
    _, node, pool = cluster
    node(pool)
    clock = FakeClock()
    client = load_api_client(apiserver.kubeconfig)
    nodes = KubeNodes(client, max_stale=60, clock=clock)
    try:
        assert nodes.pools("agentpool")[pool] == 1
        nodes.stop()  # no proof of life from here on
        nodes.start = lambda: None  # and no new watch
        nodes._mark_broken("test: the watch broke")  # as the watch thread does on an error
        clock.now += 59
        assert nodes.pools("agentpool")[pool] == 1  # known current a minute ago, at most
        clock.now += 2
        assert nodes.pools("agentpool") is None
    finally:
        client.close()


def test_kube_nodes_unreachable_api_server_is_not_known():
    configuration = kubernetes.client.Configuration()
    configuration.host = "https://127.0.0.1:1"  # nothing listens there
    nodes = KubeNodes(kubernetes.client.ApiClient(configuration), owns_client=True,
                      first_wait=0.2, backoff_cap=0.5)
    try:
        started = time.monotonic()
        assert nodes.pools("agentpool") is None
        assert time.monotonic() - started < DEADLINE  # bounded by first_wait, not a timeout
        assert nodes.pools("agentpool") is None
    finally:
        nodes.stop()
