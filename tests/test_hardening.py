"""Hardening (issue 11): bad input that used to get a 500, echo amplification, memory held by
forged quantities, metric cardinality and Events from forged reviews.

The HTTP-level checks go through create_app(...).test_client() (fast); the cardinality check
also through real gunicorn, because the multiprocess files it bounds only exist there.
"""

from __future__ import annotations

import json
import os
import random
import string
import threading
import time

import pytest
import requests

from app.certs import create_certificates
from app.config import Settings
from app.events import EventRecorder
from app.factory import create_app
from app.namespaces.file import FileNamespaces
from app.rules import SHIPPED_RULES, RuleStore
from app.rules.limits import _parse_quantity_text
from app.watch import FileWatcher

from .server import start_server
from .support import TESTDATA, pod, review_doc

JSON = {"Content-Type": "application/json"}
# Deeper than Python's recursion limit (1000), within orjson's decode limit (1024 levels, less
# the envelope's): what reaches the rules. Deeper bodies are refused at decode (also a 400).
DEEP = 1010


def nested(depth: int = DEEP) -> list:
    value: list = []
    for _ in range(depth):
        value = [value]
    return value


def deep_json(depth: int = DEEP) -> str:
    return "[" * depth + "]" * depth


class Collector:
    """Stands in for the API server's Event endpoint."""

    def __init__(self):
        self.posted: list[tuple[str, dict]] = []

    def __call__(self, namespace, body):
        self.posted.append((namespace, body))


@pytest.fixture
def make_client(tmp_path):
    def make(events=None):
        watcher = FileWatcher()
        app = create_app(Settings(cert_dir=str(tmp_path)),
                         source=FileNamespaces(TESTDATA / "namespaces.yaml"),
                         rules=RuleStore(SHIPPED_RULES, watcher=watcher), watcher=watcher,
                         events=events)
        return app.test_client()
    return make


@pytest.fixture
def client(make_client):
    return make_client()


def raw_post(client, text: str, path: str = "/mutate"):
    return client.post(path, data=text.encode(), headers=JSON)


def answer(response) -> dict:
    body = response.get_json()
    assert body is not None, response.data[:200]
    assert body["apiVersion"] == "admission.k8s.io/v1" and body["kind"] == "AdmissionReview"
    return body["response"]


def error_of(response) -> str:
    reply = answer(response)
    assert reply["allowed"] is False and reply["status"]["code"] == response.status_code
    return reply["status"]["message"]


def pod_review_text(**spec_json: str) -> str:
    """A pod review in team-payments (pool1) with raw JSON spliced into spec fields."""
    doc = review_doc(pod(namespace="team-payments"))
    text = json.dumps(doc)
    for field, raw in spec_json.items():
        doc_spec = '"spec": {'
        text = text.replace(doc_spec, doc_spec + f'"{field}": {raw}, ', 1)
    return text


# -- 3. bad input that got a 500 -------------------------------------------------------------------

@pytest.mark.parametrize("field, raw", [
    ("nodeSelector", '{"agentpool": ' + deep_json() + "}"),
    ("nodeName", deep_json()),
])
def test_hardening_deep_nesting_in_the_pod_spec_is_a_400(client, field, raw):
    response = raw_post(client, pod_review_text(**{field: raw}), "/mutate/placement")
    assert response.status_code == 400, response.data[:300]
    assert "malformed" in error_of(response)


def test_hardening_nesting_deeper_than_the_decoder_allows_is_a_400(client):
    response = raw_post(client, pod_review_text(nodeName=deep_json(5000)), "/mutate/placement")
    assert response.status_code == 400 and "not valid JSON" in error_of(response)


def test_hardening_deep_nesting_in_a_cpu_quantity_is_a_400(client):
    doc = review_doc(pod(namespace="team-payments"))
    doc["request"]["object"]["spec"]["containers"][0]["resources"] = {
        "limits": {"cpu": "PLACEHOLDER", "memory": "1Gi"},
        "requests": {"cpu": "1", "memory": "1Gi"}}
    text = json.dumps(doc).replace('"PLACEHOLDER"', deep_json())
    response = raw_post(client, text, "/mutate/defaults")
    assert response.status_code == 400 and "malformed" in error_of(response)


@pytest.mark.parametrize("where", ["kind", "apiVersion", "request.kind"])
def test_hardening_deep_nesting_in_the_envelope_is_a_400_review(client, where):
    doc = review_doc(pod(namespace="team-payments"))
    if where == "request.kind":
        doc["request"]["kind"] = "PLACEHOLDER"
    else:
        doc[where] = "PLACEHOLDER"
    response = raw_post(client, json.dumps(doc).replace('"PLACEHOLDER"', deep_json()))
    assert response.status_code == 400, response.data[:300]
    assert error_of(response)  # an AdmissionReview, not Flask's HTML page


def test_hardening_non_string_label_values_are_a_400(client):
    doc = review_doc(pod(namespace="team-payments"))
    doc["request"]["object"]["metadata"]["labels"] = {"platform": ["true"]}
    response = raw_post(client, json.dumps(doc), "/mutate/defaults")
    assert response.status_code == 400 and 'label "platform" must be a string' in \
        error_of(response)


def test_hardening_non_string_node_selector_value_is_a_400(client):
    doc = review_doc(pod({"agentpool": 7}, namespace="team-payments"))
    response = raw_post(client, json.dumps(doc), "/mutate/placement")
    assert response.status_code == 400 and "must be a string, not a number" in error_of(response)


@pytest.mark.parametrize("path", ["/mutate/", "/mutate/placement/x", "/mutate/a/b/c"])
def test_hardening_unknown_paths_under_mutate_get_a_404_review(client, path):
    response = raw_post(client, json.dumps(review_doc(pod(namespace="team-payments"))), path)
    assert response.status_code == 404 and "/mutate/placement" in error_of(response)


def test_hardening_a_bug_outside_admission_is_a_500_review(client, monkeypatch):
    from app import webhook

    def broken(*args):
        raise RuntimeError("boom")

    monkeypatch.setattr(webhook, "_observe", broken)
    response = raw_post(client, json.dumps(review_doc(pod(namespace="team-payments"))))
    assert response.status_code == 500 and "internal error" in error_of(response)


# -- 4. echo amplification -------------------------------------------------------------------------

def test_hardening_huge_values_are_echoed_truncated(client):
    huge = "x" * (6_500_000)
    response = raw_post(client, json.dumps(review_doc(pod({"agentpool": huge},
                                                          namespace="team-payments"))),
                        "/mutate/placement")
    assert response.status_code == 200
    message = error_of_denial = answer(response)["status"]["message"]
    print(f"\n6.5 MB nodeSelector value -> {len(response.data)} byte answer")
    assert len(response.data) < 2000
    assert '"' + "x" * 64 + '..."' in error_of_denial and "x" * 65 not in message
    assert "is not a node pool name" in message


def test_hardening_huge_namespace_name_is_warned_truncated(client):
    doc = review_doc({"apiVersion": "v1", "kind": "Namespace",
                      "metadata": {"name": "n" * 100_000}})
    response = raw_post(client, json.dumps(doc), "/mutate/namespaces")
    assert response.status_code == 200
    (warning,) = answer(response)["warnings"]
    text = warning.split(" See https://")[0]  # the shipped rule's docsURL follows
    assert len(text) <= 120 and "n" * 120 not in warning


def test_hardening_log_line_clips_user_values(client, caplog):
    import logging

    doc = review_doc(pod(namespace="team-payments", name="p" * 100_000), uid="u" * 100_000)
    doc["request"]["userInfo"]["username"] = "a" * 100_000
    with caplog.at_level(logging.INFO, "poolkeeper.admission"):
        assert raw_post(client, json.dumps(doc), "/mutate/placement").status_code == 200
    (record,) = [r for r in caplog.records if r.name == "poolkeeper.admission"]
    fields = record.fields
    assert all(len(str(fields[k])) <= 256 for k in ("uid", "name", "user", "namespace"))


# -- 5. memory held by quantities ------------------------------------------------------------------

def guaranteed_pod_review(cpu) -> dict:
    doc = review_doc(pod(namespace="team-payments"))
    doc["request"]["object"]["spec"]["containers"][0]["resources"] = {
        "limits": {"cpu": cpu, "memory": "1Gi"}, "requests": {"cpu": cpu, "memory": "1Gi"}}
    return doc


def test_hardening_invalid_quantities_are_a_400(client):
    for cpu in ("lots", "1.5.5", "0x10", "9" * 100):
        response = raw_post(client, json.dumps(guaranteed_pod_review(cpu)), "/mutate/defaults")
        assert response.status_code == 400, cpu
        assert "is not a quantity" in error_of(response)
    assert raw_post(client, json.dumps(guaranteed_pod_review("500m")),
                    "/mutate/defaults").status_code == 200


def test_hardening_distinct_huge_quantities_are_not_kept(client):
    before = _parse_quantity_text.cache_info().currsize
    for index in range(300):
        cpu = str(index) + "0" * 100_000
        assert raw_post(client, json.dumps(guaranteed_pod_review(cpu)),
                        "/mutate/defaults").status_code == 400
    assert _parse_quantity_text.cache_info().currsize == before


# -- 6 and 7. forged namespaces: metric series and Events ------------------------------------------

def random_namespace(rng: random.Random) -> str:
    return "forged-" + "".join(rng.choices(string.ascii_lowercase, k=12))


def forged_review(rng: random.Random) -> dict:
    return review_doc(pod({"agentpool": "SECURITY NOTICE: run curl x | sh"},
                          namespace=random_namespace(rng), name="p"))


def test_hardening_forged_reviews_get_events_only_in_known_namespaces_and_rate_limited(
        make_client):
    posted = Collector()
    recorder = EventRecorder(posted, per_namespace_burst=2)
    client = make_client(events=recorder)
    rng = random.Random(7)
    for _ in range(20):  # a rule warns (Guaranteed -> Burstable) in namespaces that do not exist
        doc = guaranteed_pod_review("1")
        doc["request"]["namespace"] = random_namespace(rng)
        assert raw_post(client, json.dumps(doc), "/mutate/defaults").status_code == 200
    for index in range(5):  # forged denials in a real namespace, each under another name
        doc = review_doc(pod({"agentpool": "SECURITY NOTICE: " + "curl x | sh " * 20},
                             namespace="team-payments", name=f"p{index}"))
        assert raw_post(client, json.dumps(doc), "/mutate/placement").status_code == 200
    recorder.stop()
    assert [ns for ns, _ in posted.posted] == ["team-payments"] * 2  # per namespace, not name
    for _, event in posted.posted:
        assert "curl x | sh " * 6 not in event["note"] and '..."' in event["note"]


def test_hardening_forged_namespaces_keep_series_and_files_bounded(tmp_path):
    certs = tmp_path / "certs"
    create_certificates(certs, "poolkeeper", "poolkeeper-system")
    metrics_dir = tmp_path / "metrics"
    server = start_server(certs, tmp_path / "server.log", "--namespaces",
                          str(TESTDATA / "namespaces.yaml"), workers=2, threads=4,
                          env={"PROMETHEUS_MULTIPROC_DIR": str(metrics_dir)})
    try:
        def series() -> int:
            text = requests.get(server.metrics_url, timeout=10).text
            return sum(1 for line in text.splitlines() if line and not line.startswith("#"))

        def files_size() -> int:
            return sum(f.stat().st_size for f in metrics_dir.iterdir())

        # every rule acts: cpu limits removed, pull policy set on a platform pod
        def review(namespace: str) -> bytes:
            obj = pod(namespace=namespace)
            obj["metadata"]["labels"] = {"platform": "true"}
            obj["spec"]["containers"][0]["resources"] = {"limits": {"cpu": "1"}}
            return json.dumps(review_doc(obj)).encode()

        rng = random.Random(11)
        with server.session() as session:
            for _ in range(50):
                session.post(server.url + "/mutate", data=review("team-payments"),
                             headers=JSON, timeout=10)
        before_series, before_files = series(), files_size()
        errors = []

        def send(count: int, seed: int) -> None:
            local = random.Random(seed)
            with server.session() as session:
                for _ in range(count):
                    reply = session.post(server.url + "/mutate",
                                         data=review(random_namespace(local)), headers=JSON,
                                         timeout=10)
                    if reply.status_code != 200:
                        errors.append(reply.status_code)

        started = time.monotonic()
        threads = [threading.Thread(target=send, args=(1250, rng.random())) for _ in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(300)
        after_series, after_files = series(), files_size()
        print(f"\n5,000 forged reviews in {time.monotonic() - started:.1f}s: series "
              f"{before_series} -> {after_series}, multiprocess files {before_files} -> "
              f"{after_files} bytes")
        assert errors == []
        assert after_series - before_series <= 10  # the "-" series of each rule and effect
        assert after_files <= before_files * 2
        assert "forged-" not in requests.get(server.metrics_url, timeout=10).text
    finally:
        server.stop()
    assert os.path.isdir(metrics_dir)
