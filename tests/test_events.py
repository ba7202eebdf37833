"""Kubernetes Events about denials and warnings: content, rate limits, dry-run, off the request path."""

from __future__ import annotations

import threading

from app.admission import admit
from app.events import EventRecorder

from .support import make_request, pod, shipped_rules

RULES = shipped_rules()
NAMESPACES = {"team-a": {"agentpool": "pool1"}}


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


class Collector:
    """Stands in for the API server: records what would be posted."""

    def __init__(self, fail: bool = False, gate: threading.Event | None = None):
        self.posted: list[tuple[str, dict]] = []
        self.fail, self.gate = fail, gate
        self.done = threading.Event()

    def __call__(self, namespace, body):
        if self.gate is not None:
            self.gate.wait(10)
        if self.fail:
            raise ConnectionError("API server down")
        self.posted.append((namespace, body))
        self.done.set()


def denied_request(**kw):
    request = make_request(pod({"agentpool": "pool2"}, namespace="team-a", name="web"), **kw)
    return request, admit(request, NAMESPACES.get, RULES)


def drain(recorder):
    recorder.stop()


def test_events_denial_event_names_rule_object_and_fix():
    post = Collector()
    recorder = EventRecorder(post, instance="poolkeeper-abc")
    recorder.start()
    request, decision = denied_request()
    recorder.record(request, decision, "team-a")
    drain(recorder)
    ((namespace, event),) = post.posted
    assert namespace == "team-a"
    assert event["apiVersion"] == "events.k8s.io/v1" and event["type"] == "Warning"
    assert event["reason"] == "PoolkeeperDenied" and event["action"] == "Admit"
    assert event["reportingController"] == "poolkeeper.io/webhook"
    assert event["reportingInstance"] == "poolkeeper-abc"
    assert event["regarding"] == {"apiVersion": "v1", "kind": "Pod", "name": "web",
                                  "namespace": "team-a"}
    assert event["note"].startswith("[agentpool-node-selector] denied CREATE of Pod web: ")
    assert 'set it to "pool1"' in event["note"] and len(event["note"]) <= 1024
    assert event["eventTime"].endswith("Z") and event["metadata"]["namespace"] == "team-a"
    assert recorder.counts["sent"] == 1


def test_events_about_a_namespace_go_to_the_namespace_itself():
    post = Collector()
    recorder = EventRecorder(post)
    recorder.start()
    ns = {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "sandbox"}}
    request = make_request(ns)
    recorder.record(request, admit(request, {}.get, RULES), "sandbox")
    drain(recorder)
    ((namespace, event),) = post.posted
    assert namespace == "sandbox" and event["reason"] == "PoolkeeperWarning"
    assert "namespace" not in event["regarding"] and "sandbox" in event["note"]


def test_events_never_on_dry_run_or_plain_mutations():
    post = Collector()
    recorder = EventRecorder(post)
    recorder.start()
    recorder.record(*denied_request(dry_run=True), "team-a")
    request = make_request(pod(namespace="team-a"))
    recorder.record(request, admit(request, NAMESPACES.get, RULES), "team-a")
    drain(recorder)
    assert post.posted == [] and recorder.counts["sent"] == 0


def test_events_rate_limited_per_namespace_and_overall():
    post = Collector()
    clock = Clock()
    recorder = EventRecorder(post, clock=clock, per_namespace_burst=3, per_namespace_interval=60,
                             global_burst=5, global_rate=1.0)
    recorder.start()
    for _ in range(10):  # a crash-looping controller recreating the same pod
        recorder.record(*denied_request(), "team-a")
    for name in ("a", "b", "c"):  # other names in the same namespace: the same bucket
        request = make_request(pod({"agentpool": "pool2"}, namespace="team-a", name=name))
        recorder.record(request, admit(request, NAMESPACES.get, RULES), "team-a")
    clock.now += 60  # one more token for team-a; the global bucket is full again (5)
    recorder.record(*denied_request(), "team-a")
    for index in range(6):  # many namespaces: the global bucket limits
        namespace = f"team-{index}"
        request = make_request(pod({"agentpool": "pool2"}, namespace=namespace, name="web"))
        recorder.record(request, admit(request, {namespace: {"agentpool": "pool1"}}.get, RULES),
                        namespace)
    drain(recorder)
    # team-a: 3 of the first 13, then 1 a minute later; overall: 5 tokens after the minute,
    # 1 used by team-a, so 4 of the 6 other namespaces
    assert len(post.posted) == 3 + 1 + 4
    assert recorder.counts["rate_limited"] == 10 + 2
    assert {ns for ns, _ in post.posted} == {"team-a", "team-0", "team-1", "team-2", "team-3"}


def test_events_quote_and_truncate_user_values():
    recorder = EventRecorder(Collector())
    request = make_request(pod({"agentpool": "x" * 100_000}, namespace="team-a",
                               name="n" * 5000))
    decision = admit(request, NAMESPACES.get, RULES)
    ((_, detail),) = [(a.effect, a.detail) for a in decision.actions if a.effect == "denied"]
    event = recorder.event(request, "team-a", "agentpool-node-selector", "PoolkeeperDenied",
                           detail)
    assert len(event["note"]) <= 1024 and "x" * 65 not in event["note"]
    assert '"' + "x" * 64 + '..."' in event["note"]
    assert len(event["regarding"]["name"]) <= 256


def test_events_full_queue_drops_without_blocking_admission():
    gate = threading.Event()
    post = Collector(gate=gate)
    recorder = EventRecorder(post, queue_size=2, global_burst=100, per_namespace_burst=100)
    recorder.start()
    for name in range(6):
        request = make_request(pod({"agentpool": "pool2"}, namespace="team-a", name=f"p{name}"))
        recorder.record(request, admit(request, NAMESPACES.get, RULES), "team-a")
    gate.set()
    drain(recorder)
    assert recorder.counts["dropped"] >= 3 and len(post.posted) + recorder.counts["dropped"] == 6


def test_events_failures_are_counted_not_raised():
    post = Collector(fail=True)
    recorder = EventRecorder(post)
    recorder.start()
    recorder.record(*denied_request(), "team-a")
    drain(recorder)
    assert recorder.counts["failed"] == 1 and recorder.counts["sent"] == 0


def test_events_long_notes_are_cut_to_the_api_limit():
    recorder = EventRecorder(Collector())
    request, _ = denied_request()
    event = recorder.event(request, "team-a", "rule", "PoolkeeperDenied", "x" * 5000)
    assert len(event["note"]) == 1024 and event["note"].endswith("...")


# --- through the real kubernetes client against a real API server (miniapiserver) -----------

import time  # noqa: E402

import pytest  # noqa: E402

from .apiserver import MiniApiServer, apiserver_fixture  # noqa: E402

apiserver = apiserver_fixture()


@pytest.mark.apiserver
def test_events_are_created_in_the_api_server(apiserver: MiniApiServer):
    import kubernetes.client

    from app.events import api_poster
    from app.kube import load_api_client

    client = load_api_client(apiserver.kubeconfig)
    core = kubernetes.client.CoreV1Api(client)
    core.create_namespace({"apiVersion": "v1", "kind": "Namespace",
                           "metadata": {"name": "team-a", "labels": {"agentpool": "pool1"}}})
    recorder = EventRecorder(api_poster(client), instance="test-instance")
    recorder.start()
    try:
        recorder.record(*denied_request(), "team-a")
        deadline = time.monotonic() + 20
        while True:
            events = core.list_namespaced_event("team-a", field_selector="reason=PoolkeeperDenied")
            if events.items or time.monotonic() > deadline:
                break
            time.sleep(0.1)
    finally:
        recorder.stop()
        client.close()
    (event,) = events.items
    assert event.type == "Warning" and event.involved_object.name == "web"
    assert event.message.startswith("[agentpool-node-selector] denied CREATE of Pod web")
    assert event.reporting_component == "poolkeeper.io/webhook"
    assert recorder.counts == {"sent": 1, "rate_limited": 0, "dropped": 0, "failed": 0}
