"""KubeNamespaces through the real kubernetes client against a real API server (miniapiserver).

miniapiserver is k8s.io/apiserver on real etcd, not kube-apiserver: lists, watches, bookmarks and
410 Expired behave as in a cluster; see ../shared/tools/miniapiserver/README.md.
"""

from __future__ import annotations

import threading
import time
import urllib.parse
import uuid
from collections.abc import Callable

import kubernetes.client
import pytest
from prometheus_client import REGISTRY

from app import kube
from app.config import ConfigError, Settings
from app.kube import KubeConfigError, load_api_client
from app.listwatch import _Expired, _lines, _WatchError
from app.namespaces import Namespace, NamespaceLookupError, NamespaceSource, namespace_source
from app.namespaces.informer import KubeNamespaces

from .apiserver import MiniApiServer, apiserver_fixture

apiserver = apiserver_fixture()

DEADLINE = 30.0  # seconds any eventual condition may take; tests wait for conditions, never sleep


def wait_until(condition: Callable[[], object], what: str, timeout: float = DEADLINE) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(0.05)


def metric(name: str, **labels: str) -> float:
    """A sample of this process's Prometheus metrics (0 if it has none yet)."""
    return REGISTRY.get_sample_value(name, labels) or 0.0


HITS = "poolkeeper_namespace_cache_lookups_total", {"result": "hit"}
MISSES = "poolkeeper_namespace_cache_lookups_total", {"result": "miss"}
STALE = "poolkeeper_namespace_cache_lookups_total", {"result": "stale"}
WATCH_RESTARTS = "poolkeeper_namespace_watch_restarts_total", {}
LAST_EVENT = "poolkeeper_namespace_watch_last_event_timestamp_seconds", {"source": "apiserver"}


def count(sample: tuple[str, dict[str, str]]) -> float:
    name, labels = sample
    return metric(name, **labels)


class FakeClock:
    """Monotonic time moved by hand (staleness and TTLs only; the watch sleeps in real time)."""

    def __init__(self) -> None:
        self.now = 10_000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class RequestLog:
    """Records an ApiClient's requests; ``on_read(name)`` runs before each GET of one namespace."""

    def __init__(self, api_client: kubernetes.client.ApiClient) -> None:
        self.requests: list[tuple[str, str, str]] = []
        self.on_read: Callable[[str], None] | None = None
        self._lock = threading.Lock()
        send = api_client.call_api

        def call_api(method, url, *args, **kwargs):
            parts = urllib.parse.urlsplit(url)
            with self._lock:
                self.requests.append((method, parts.path, parts.query))
            name = self._namespace_read(method, parts.path)
            if name and self.on_read is not None:
                self.on_read(name)
            return send(method, url, *args, **kwargs)

        api_client.call_api = call_api

    @staticmethod
    def _namespace_read(method: str, path: str) -> str | None:
        prefix = "/api/v1/namespaces/"
        if method == "GET" and path.startswith(prefix) and "/" not in path[len(prefix):]:
            return path[len(prefix):]
        return None

    def reads(self, name: str | None = None) -> int:
        """GET requests for single namespaces (for ``name`` only, if given)."""
        with self._lock:
            names = [self._namespace_read(m, p) for m, p, _ in self.requests]
        return sum(1 for n in names if n and (name is None or n == name))

    def lists(self) -> int:
        """Namespace listings (the first page of each; watches excluded)."""
        with self._lock:
            return sum(1 for m, p, q in self.requests
                       if m == "GET" and p == "/api/v1/namespaces"
                       and "watch=true" not in q.lower() and "continue=" not in q)


@pytest.fixture
def server(apiserver: MiniApiServer) -> MiniApiServer:
    apiserver.ensure_running()  # a test that killed it may have failed before restarting it
    return apiserver


@pytest.fixture
def core(server: MiniApiServer):
    """The test's own client, for making changes."""
    client = load_api_client(server.kubeconfig)
    try:
        yield kubernetes.client.CoreV1Api(client)
    finally:
        client.close()


@pytest.fixture
def make_source(server: MiniApiServer):
    made: list[KubeNamespaces] = []

    def make(*, start: bool = True, **options) -> tuple[KubeNamespaces, RequestLog]:
        client = load_api_client(server.kubeconfig)
        requests = RequestLog(client)
        options.setdefault("backoff_cap", 1.0)
        source = KubeNamespaces(client, owns_client=True, **options)
        made.append(source)
        if start:
            source.start()
            wait_until(source.ready, "the first listing")
        return source, requests

    yield make
    for source in made:
        source.stop()


def new_namespace(core: kubernetes.client.CoreV1Api, **labels: str) -> tuple[str, dict[str, str]]:
    """Create a namespace with a unique name; returns it and the labels the server stores."""
    name = f"pk-{uuid.uuid4().hex[:12]}"
    core.create_namespace({"metadata": {"name": name, "labels": labels}})
    return name, {**labels, "kubernetes.io/metadata.name": name}


def relabel(core: kubernetes.client.CoreV1Api, name: str, **labels: str) -> None:
    core.patch_namespace(name, {"metadata": {"labels": labels}})


def watch_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "poolkeeper-namespaces-watch"]


# -- against the API server ----------------------------------------------------------------------


@pytest.mark.apiserver
def test_kube_namespaces_first_listing_serves_labels_without_api_calls(core, make_source):
    name, labels = new_namespace(core, agentpool="pool1")
    source, requests = make_source(start=False)
    assert isinstance(source, NamespaceSource)
    assert not source.ready()
    started = time.time()
    source.start()
    source.start()  # idempotent
    wait_until(source.ready, "the first listing")
    assert len(watch_threads()) == 1

    hits, misses = count(HITS), count(MISSES)
    assert source.labels(name) == labels
    assert source.labels("default") == {"kubernetes.io/metadata.name": "default"}
    assert requests.reads() == 0
    assert (count(HITS) - hits, count(MISSES) - misses) == (2, 0)
    state = source.state()
    assert state["synced"] and state["watch_live"] and state["store_size"] >= 5
    assert requests.lists() == 1
    assert started <= count(LAST_EVENT) <= time.time()

    source.stop()
    assert watch_threads() == []


@pytest.mark.apiserver
def test_kube_namespaces_relabel_is_seen_through_the_watch(core, make_source):
    name, labels = new_namespace(core, agentpool="pool1")
    source, requests = make_source()
    assert source.labels(name)["agentpool"] == "pool1"

    relabel(core, name, agentpool="pool2")
    wait_until(lambda: source.labels(name)["agentpool"] == "pool2", "the relabel")
    assert source.labels(name) == {**labels, "agentpool": "pool2"}
    assert requests.reads() == 0
    assert source.state()["last_event_age"] is not None


@pytest.mark.apiserver
def test_kube_namespaces_annotations_are_seen_through_list_watch_and_get(core, make_source):
    name, labels = new_namespace(core, agentpool="pool1")
    core.patch_namespace(name, {"metadata": {"annotations": {
        "poolkeeper.io/allowed-pools": "gpu", "example.com/other": "dropped"}}})
    source, requests = make_source()
    assert source.namespace(name) == Namespace(labels, {"poolkeeper.io/allowed-pools": "gpu"})
    core.patch_namespace(name, {"metadata": {"annotations": {
        "poolkeeper.io/allowed-pools": "gpu,spot"}}})
    wait_until(lambda: source.namespace(name).annotations ==
               {"poolkeeper.io/allowed-pools": "gpu,spot"}, "the new annotation")
    assert source.labels(name) == labels and requests.reads() == 0
    # a GET (the watch does not know the name yet) keeps them too
    assert source._get(name) == source.namespace(name)


@pytest.mark.apiserver
def test_kube_namespaces_namespace_created_after_start(core, make_source):
    source, _ = make_source()
    name, labels = new_namespace(core, agentpool="late")
    wait_until(lambda: source.labels(name) == labels, "the new namespace")


@pytest.mark.apiserver
def test_kube_namespaces_deleted_namespace_is_none(core, make_source):
    name, labels = new_namespace(core, agentpool="doomed")
    source, _ = make_source()
    assert source.labels(name) == labels
    core.delete_namespace(name)
    wait_until(lambda: source.labels(name) is None, "the deletion")
    assert source.labels(name) is None


@pytest.mark.apiserver
def test_kube_namespaces_unknown_namespace_is_none_and_cached(make_source):
    source, requests = make_source(start=False)
    assert source.labels("pk-never-created") is None
    assert source.labels("pk-never-created") is None
    assert requests.reads("pk-never-created") == 1


@pytest.mark.apiserver
def test_kube_namespaces_serves_stale_labels_then_fails_when_api_server_killed(server, core,
                                                                               make_source):
    name, labels = new_namespace(core, agentpool="pool1")
    clock = FakeClock()
    source, requests = make_source(cache_ttl=1.0, max_stale=5.0, clock=clock)
    assert source.labels(name) == labels

    server.kill()
    wait_until(lambda: not source.state()["watch_live"], "the watch to notice the outage")
    # within cache_ttl of the break the store still answers, without trying the API server
    assert source.labels(name) == labels
    assert requests.reads() == 0

    clock.advance(2.0)  # past cache_ttl: a GET is tried, fails, and the known labels are served
    stale = count(STALE)
    assert source.labels(name) == labels
    assert requests.reads(name) == 1
    assert count(STALE) - stale == 1

    with pytest.raises(NamespaceLookupError, match="unreachable.*never known"):
        source.labels("pk-never-seen")

    clock.advance(10.0)  # past max_stale
    with pytest.raises(NamespaceLookupError, match=r"unreachable for 1\d\.\ds.*max-stale") as info:
        source.labels(name)
    assert name in str(info.value)
    assert count(STALE) - stale == 1


def answer(source: KubeNamespaces, name: str) -> dict[str, str] | None:
    """The labels, or None while the lookup fails."""
    try:
        return source.labels(name)
    except NamespaceLookupError:
        return None


@pytest.mark.apiserver
def test_kube_namespaces_max_stale_holds_when_the_api_server_hangs(server, core, make_source,
                                                                   capsys):
    # A hung API server (SIGSTOP: its kernel still accepts connections, nothing answers, nothing is
    # closed) sends no error: only silence tells. Cached labels are served until they are
    # max-stale old, counted from the last proof that the server was alive and the watch current,
    # then NamespaceLookupError (the webhook's 500). Each watch stream lives at most
    # max-stale / 4 (1.5 s here; watch_timeout is scaled down too), so proofs come often.
    max_stale = 6.0
    name, labels = new_namespace(core, agentpool="before")
    source, _ = make_source(cache_ttl=2.0, max_stale=max_stale, watch_timeout=2)
    assert source.labels(name) == labels
    wait_until(lambda: source.state()["watch_live"], "the watch")
    # hang it in the middle of a stream, not just after a proof of life
    wait_until(lambda: source.state()["current_age"] >= 0.5, "half a second of quiet")

    age_at_stop = source.state()["current_age"]
    with server.paused():
        stopped = time.monotonic()
        served_for = 0.0
        while True:
            try:
                assert source.labels(name) == labels
            except NamespaceLookupError as e:
                first_error = time.monotonic() - stopped
                message = str(e)
                break
            served_for = time.monotonic() - stopped
            if served_for > max_stale + 20:
                pytest.fail(f"cached labels still served {served_for:.0f}s after the API server "
                            f"hung, with max-stale {max_stale:g}s")
            time.sleep(0.02)
        assert answer(source, name) is None  # and it stays so while the server hangs
    resumed = time.monotonic()
    wait_until(lambda: answer(source, name) == labels, "answers after SIGCONT")
    recovered = time.monotonic() - resumed
    relabel(core, name, agentpool="after")
    relabelled = time.monotonic()
    wait_until(lambda: (answer(source, name) or {}).get("agentpool") == "after",
               "the relabel made after SIGCONT")
    seen = time.monotonic() - relabelled
    with capsys.disabled():
        print(f"\nhung API server, max-stale {max_stale:g}s, last proof of life "
              f"{age_at_stop:.1f}s before SIGSTOP: cached labels served for {served_for:.1f}s, "
              f"first NamespaceLookupError {first_error:.1f}s after SIGSTOP; after SIGCONT "
              f"answered again in {recovered:.1f}s, relabel seen in {seen:.1f}s")

    assert name in message and "max-stale" in message
    # proofs of life come at least once per stream (1.5 s) plus its grace (2 s)
    assert age_at_stop <= 3.5
    # cached labels until they are max-stale old (not before), then errors within a few seconds
    # of the bound (a GET to the hung server takes up to 1.25 s of it)
    assert max_stale - age_at_stop - 0.1 <= first_error <= max_stale + 4.0
    assert recovered <= 10.0
    assert seen <= 10.0


@pytest.mark.apiserver
def test_kube_namespaces_quiet_watch_is_trusted_past_max_stale(core, make_source):
    # No namespace changes for longer than max-stale: the store still answers every lookup without
    # a GET, because each short watch stream that the server opens and ends on time proves it
    # alive (a quiet watch may get no BOOKMARK at all).
    max_stale = 4.0
    name, labels = new_namespace(core, agentpool="quiet")
    source, requests = make_source(cache_ttl=1.0, max_stale=max_stale)
    hits = count(HITS)
    lookups = 0
    ages = []
    quiet_until = time.monotonic() + 2 * max_stale
    while time.monotonic() < quiet_until:
        assert source.labels(name) == labels
        lookups += 1
        ages.append(source.state()["current_age"])
        time.sleep(0.05)
    assert requests.reads() == 0
    assert count(HITS) - hits == lookups
    assert max(ages) <= max_stale * 0.25 + 2.0  # one stream plus its grace
    # and the watch's last-sign-of-life gauge (PoolkeeperNamespaceWatchStale) stays fresh too
    assert time.time() - count(LAST_EVENT) <= max_stale * 0.25 + 2.0


@pytest.mark.apiserver
def test_kube_namespaces_watch_resumes_after_api_server_restart(server, core, make_source):
    name, labels = new_namespace(core, agentpool="before")
    source, requests = make_source(cache_ttl=300.0, max_stale=600.0)
    assert source.labels(name) == labels

    restarts = count(WATCH_RESTARTS)
    server.kill()
    wait_until(lambda: not source.state()["watch_live"], "the watch to notice the outage")
    assert source.labels(name) == labels  # the store, trusted for cache_ttl after the break
    server.restart()
    wait_until(lambda: source.state()["watch_live"], "the watch to come back")

    relabel(core, name, agentpool="after")
    wait_until(lambda: source.labels(name)["agentpool"] == "after", "the relabel after the restart")
    assert requests.reads() == 0
    assert count(WATCH_RESTARTS) - restarts >= 1


@pytest.mark.apiserver
def test_kube_namespaces_relists_on_410_after_changes_during_outage(server, core, make_source):
    # While "our" API server is down, the namespace is relabelled through another one on the same
    # etcd (an HA control plane). The restarted server's watch cache starts after that change, so
    # the watch from our old resourceVersion gets 410 Expired and the source must list again.
    name, labels = new_namespace(core, agentpool="before")
    source, requests = make_source(cache_ttl=300.0, max_stale=600.0)
    assert source.labels(name) == labels
    assert requests.lists() == 1

    server.kill()
    wait_until(lambda: not source.state()["watch_live"], "the watch to notice the outage")
    with server.second_server() as other_kubeconfig:
        other = load_api_client(other_kubeconfig)
        try:
            relabel(kubernetes.client.CoreV1Api(other), name, agentpool="during")
        finally:
            other.close()
    server.restart()

    wait_until(lambda: source.labels(name)["agentpool"] == "during",
               "the relabel made during the outage")
    assert requests.lists() == 2
    assert requests.reads() == 0
    relabel(core, name, agentpool="after")
    wait_until(lambda: source.labels(name)["agentpool"] == "after", "a relabel after the re-list")


@pytest.mark.apiserver
def test_kube_namespaces_single_flight_sends_one_get_for_concurrent_misses(core, make_source):
    name, labels = new_namespace(core, agentpool="pool1")
    source, requests = make_source(start=False)  # no watch: every lookup misses the store
    callers = 16
    arrived = 0
    arrived_lock = threading.Lock()

    def hold_read(_: str) -> None:
        # keep the first GET in flight until every caller has asked (plus a margin), so a second
        # GET would be sent if lookups were not single-flight
        wait_until(lambda: arrived == callers, "all callers")
        time.sleep(0.2)

    requests.on_read = hold_read
    results: list[object] = [None] * callers
    misses = count(MISSES)

    def lookup(i: int) -> None:
        nonlocal arrived
        with arrived_lock:
            arrived += 1
        try:
            results[i] = source.labels(name)
        except Exception as e:  # reported below
            results[i] = e

    threads = [threading.Thread(target=lookup, args=(i,)) for i in range(callers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(DEADLINE)
    assert not any(t.is_alive() for t in threads)
    assert results == [labels] * callers
    assert requests.reads(name) == 1
    assert count(MISSES) - misses == 1


@pytest.mark.apiserver
def test_kube_namespaces_lookups_of_different_names_do_not_block_each_other(core, make_source):
    slow, slow_labels = new_namespace(core, agentpool="slow")
    fast, fast_labels = new_namespace(core, agentpool="fast")
    source, requests = make_source(start=False)
    release = threading.Event()
    requests.on_read = lambda name: release.wait(DEADLINE) if name == slow else None
    results: dict[str, object] = {}

    def lookup(name: str) -> None:
        results[name] = source.labels(name)

    slow_thread = threading.Thread(target=lookup, args=(slow,))
    slow_thread.start()
    wait_until(lambda: requests.reads(slow) == 1, "the slow GET to start")
    fast_thread = threading.Thread(target=lookup, args=(fast,))
    fast_thread.start()
    fast_thread.join(DEADLINE)
    finished_while_slow_in_flight = not fast_thread.is_alive() and slow_thread.is_alive()
    release.set()
    slow_thread.join(DEADLINE)
    assert finished_while_slow_in_flight
    assert results == {slow: slow_labels, fast: fast_labels}


@pytest.mark.apiserver
def test_namespace_source_uses_the_api_server_without_a_file(server):
    source = namespace_source(Settings(kubeconfig=server.kubeconfig, cache_ttl=5.0, max_stale=10.0))
    try:
        assert isinstance(source, KubeNamespaces)
        assert source.owns_client  # built from the settings, closed by stop()
        assert (source.cache_ttl, source.max_stale) == (5.0, 10.0)
        # not started: answered by a GET
        assert source.labels("default") == {"kubernetes.io/metadata.name": "default"}
    finally:
        source.stop()


@pytest.mark.apiserver
def test_namespace_source_shares_a_given_client_and_leaves_it_open(server):
    client = load_api_client(server.kubeconfig)
    try:
        source = namespace_source(Settings(kubeconfig=server.kubeconfig), api_client=client)
        assert isinstance(source, KubeNamespaces)
        assert source.api_client is client and not source.owns_client
        assert source.labels("default") == {"kubernetes.io/metadata.name": "default"}
        source.stop()
        # the owner's client still works after the source stopped
        namespaces = kubernetes.client.CoreV1Api(client).list_namespace(limit=1)
        assert len(namespaces.items) == 1
    finally:
        client.close()


# -- without the API server ----------------------------------------------------------------------


@pytest.fixture
def offline_source():
    configuration = kubernetes.client.Configuration(host="https://127.0.0.1:1")  # nothing listens
    client = kubernetes.client.ApiClient(configuration)
    source = KubeNamespaces(client, owns_client=True)
    yield source
    source.stop()


def event(kind: str, name: str | None, rv: str, labels: dict[str, str] | None = None) -> dict:
    metadata: dict = {"resourceVersion": rv}
    if name:
        metadata["name"] = name
    if labels is not None:
        metadata["labels"] = labels
    return {"type": kind, "object": {"kind": "Namespace", "apiVersion": "v1", "metadata": metadata}}


def test_kube_namespaces_handle_event_applies_watch_events(offline_source):
    source = offline_source
    assert source.state()["last_event_age"] is None
    before = time.time()
    source.handle_event(event("ADDED", "a", "10", {"agentpool": "p1"}))
    source.handle_event(event("ADDED", "b", "11"))
    source.handle_event(event("MODIFIED", "a", "12", {"agentpool": "p2"}))
    assert source._store == {"a": {"agentpool": "p2"}, "b": {}}
    assert source._resource_version == "12"
    source.handle_event(event("BOOKMARK", None, "15"))
    assert source._resource_version == "15"
    assert source._store == {"a": {"agentpool": "p2"}, "b": {}}
    source.handle_event(event("DELETED", "b", "16"))
    assert source._store == {"a": {"agentpool": "p2"}}
    assert source.state()["last_event_age"] is not None
    assert before <= count(LAST_EVENT) <= time.time()


def test_kube_namespaces_store_keeps_labels_and_only_poolkeeper_annotations(offline_source):
    source = offline_source
    added = event("ADDED", "ml", "20", {"agentpool": "pool1"})
    added["object"]["metadata"]["annotations"] = {
        "poolkeeper.io/allowed-pools": "gpu", "kubectl.kubernetes.io/last-applied-configuration":
        "{...}"}
    source.handle_event(added)
    source.handle_event(event("ADDED", "plain", "21", {"agentpool": "pool2"}))
    # a namespace without such annotations costs only its labels
    assert source._store == {"ml": Namespace({"agentpool": "pool1"},
                                             {"poolkeeper.io/allowed-pools": "gpu"}),
                             "plain": {"agentpool": "pool2"}}


def test_kube_namespaces_handle_event_410_means_list_again(offline_source):
    # what miniapiserver sends when a watch starts from a resourceVersion older than its cache
    expired = {"type": "ERROR", "object": {
        "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
        "message": "too old resource version: 1 (8)", "reason": "Expired", "code": 410}}
    with pytest.raises(_Expired, match="too old resource version"):
        offline_source.handle_event(expired)
    internal = {"type": "ERROR",
                "object": {"kind": "Status", "code": 500, "message": "etcd is sad"}}
    with pytest.raises(_WatchError, match="500: etcd is sad"):
        offline_source.handle_event(internal)


def test_kube_namespaces_unreachable_and_never_known_raises(offline_source):
    with pytest.raises(NamespaceLookupError, match="unreachable.*never known"):
        offline_source.labels("anything")


def test_watch_lines_are_reassembled_across_chunks():
    chunks = [b'{"a":', b'1}\n{"b"', b':2}\n\n{"c":3}\n{"d"', b":4}"]
    assert list(_lines(chunks)) == [b'{"a":1}', b'{"b":2}', b'{"c":3}', b'{"d":4}']


# -- app.kube ------------------------------------------------------------------------------------


@pytest.fixture
def no_cluster(monkeypatch, tmp_path):
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    monkeypatch.delenv("KUBECONFIG", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    return tmp_path


def test_load_api_client_explicit_missing_kubeconfig_names_it(no_cluster):
    with pytest.raises(KubeConfigError, match="missing.yaml") as info:
        load_api_client(str(no_cluster / "missing.yaml"))
    assert isinstance(info.value, ConfigError)


def test_load_api_client_broken_kubeconfig_names_it(no_cluster):
    path = no_cluster / "broken.yaml"
    path.write_text("clusters: [unclosed\n")
    with pytest.raises(KubeConfigError, match="broken.yaml"):
        load_api_client(str(path))


def test_load_api_client_without_any_config_says_what_was_tried(no_cluster, monkeypatch):
    with pytest.raises(KubeConfigError, match=r"not running in a pod.*~/.kube/config"):
        load_api_client(None)
    missing = str(no_cluster / "nope")
    monkeypatch.setenv("KUBECONFIG", missing)
    with pytest.raises(KubeConfigError, match=f"KUBECONFIG={missing}"):
        load_api_client(None)


def test_load_api_client_in_cluster(no_cluster, monkeypatch):
    token, ca = no_cluster / "token", no_cluster / "ca.crt"
    token.write_text("sekret")
    ca.write_text("-----BEGIN CERTIFICATE-----\n")
    monkeypatch.setattr(kube, "SERVICE_TOKEN_FILE", str(token))
    monkeypatch.setattr(kube, "SERVICE_CA_FILE", str(ca))
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "10.0.0.1")
    monkeypatch.setenv("KUBERNETES_SERVICE_PORT", "443")
    client = load_api_client(None)
    try:
        assert client.configuration.host == "https://10.0.0.1:443"
        assert client.configuration.api_key["BearerToken"] == "bearer sekret"
    finally:
        client.close()


@pytest.mark.apiserver
def test_load_api_client_from_kubeconfig_env(server, no_cluster, monkeypatch):
    monkeypatch.setenv("KUBECONFIG", server.kubeconfig)
    client = load_api_client(None)
    try:
        assert client.configuration.host == server.url
    finally:
        client.close()
