"""Metrics, logs and audit annotations as an operator sees them: scraped from real gunicorn."""

from __future__ import annotations

import json
import os
import re
import signal
import time

import pytest
import requests
import yaml

from app.certs import certificate_expiry, create_certificates

from .server import start_server
from .support import TESTDATA, pod, review_doc

SAMPLE = re.compile(r'^([a-z_]+)(\{[^}]*\})? ([0-9.e+-]+)$')


def parse(text: str) -> dict[str, float]:
    """'name{labels}' -> value for every sample line of a Prometheus text exposition."""
    samples = {}
    for line in text.splitlines():
        match = SAMPLE.match(line)
        if match:
            samples[match.group(1) + (match.group(2) or "")] = float(match.group(3))
    return samples


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    certs = tmp_path_factory.mktemp("certs")
    create_certificates(certs, "poolkeeper", "poolkeeper-system")
    srv = start_server(certs, tmp_path_factory.mktemp("logs") / "server.log", "--namespaces",
                       str(TESTDATA / "namespaces.yaml"), workers=3, threads=1)
    srv.wait_for_workers(3)
    yield srv
    srv.stop()


def fresh_post(server, doc, path="/mutate"):
    """One request on a new connection, so the kernel may hand it to any worker."""
    return requests.post(server.url + path, data=json.dumps(doc), verify=server.ca, timeout=10,
                         headers={"Content-Type": "application/json", "Connection": "close"})


def scrape(server) -> dict[str, float]:
    response = requests.get(server.metrics_url, timeout=10, headers={"Connection": "close"})
    assert response.status_code == 200
    assert response.headers["Content-Type"].startswith("text/plain")
    return parse(response.text)


def admission_lines(server):
    return [json.loads(line) for line in server.log().splitlines()
            if '"poolkeeper.admission"' in line]


def test_metrics_count_requests_of_every_worker_whichever_worker_is_scraped(server):
    doc = review_doc(pod(namespace="team-payments"))
    served = 0
    deadline = time.monotonic() + 60
    while True:
        for _ in range(20):
            assert fresh_post(server, doc).status_code == 200
            served += 1
        pids = {line["pid"] for line in admission_lines(server) if line["uid"] == "uid-1"}
        if len(pids) >= 2:
            break
        assert time.monotonic() < deadline, f"one worker served everything: {pids}"
    key = ('poolkeeper_admission_requests_total{decision="patched",kind="Pod",'
           'operation="CREATE"}')
    for _ in range(12):  # fresh connections: the scrapes land on different workers
        samples = scrape(server)
        assert samples[key] == served, "a scrape must count what every worker served"
        assert samples["poolkeeper_admission_duration_seconds_count"] >= served
    assert samples['poolkeeper_rule_actions_total{effect="mutated",namespace="team-payments",'
                   'rule="agentpool-node-selector"}'] == served
    assert samples['poolkeeper_namespace_cache_lookups_total{result="hit"}'] >= served
    assert samples["poolkeeper_namespace_cache_size"] == count_namespaces()


def test_metrics_port_is_plain_http_serves_only_metrics_and_survives_a_worker(server):
    # GET /metrics left the webhook port: there every client may connect (the API server's
    # address differs per provider), here a NetworkPolicy admits only the monitoring namespace.
    moved = requests.get(server.url + "/metrics", verify=server.ca, timeout=10)
    assert moved.status_code == 404
    other = requests.get(server.metrics_url.replace("/metrics", "/mutate"), timeout=10)
    assert other.status_code == 404 and b"only GET /metrics" in other.content
    # The scrape-time values come from the worker that answers: its rule set's digest too.
    from app.rules import SHIPPED_RULES, load_rule_set

    digest = load_rule_set(SHIPPED_RULES).digest
    assert scrape(server)[f'poolkeeper_rules_info{{digest="{digest}"}}'] == 1
    # Every worker accepts on the port (a socket the master bound): one worker gone, the others
    # answer, and gunicorn's replacement serves it too.
    victim = min(server.worker_pids())
    os.kill(victim, signal.SIGKILL)
    deadline = time.monotonic() + 30
    while victim in server.worker_pids():  # a connection it accepted while dying would be lost
        assert time.monotonic() < deadline, "the killed worker is still there"
        time.sleep(0.05)
    for _ in range(10):
        assert any(k.startswith("poolkeeper_build_info{") for k in scrape(server))
    while len(server.worker_pids()) < 3:
        assert time.monotonic() < deadline, "gunicorn did not replace the killed worker"
        time.sleep(0.1)
    for _ in range(10):
        assert any(k.startswith("poolkeeper_build_info{") for k in scrape(server))


def test_metrics_rule_actions_on_a_namespace_name_that_namespace_when_it_is_known(server):
    """Namespaces are cluster-scoped (request.namespace is empty): the team is the name, when
    the namespace source knows it; a new name counts under "-" like any unknown namespace."""
    def actions(name: str) -> None:
        doc = review_doc({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}})
        assert fresh_post(server, doc).status_code == 200

    before = scrape(server)
    actions("team-search")  # in testdata/namespaces.yaml
    actions("sandbox")  # not (yet) a namespace
    samples = scrape(server)
    for effect in ("mutated", "warned"):
        assert samples[f'poolkeeper_rule_actions_total{{effect="{effect}",namespace="team-search",'
                       f'rule="namespace-labels"}}'] >= 1
        key = f'poolkeeper_rule_actions_total{{effect="{effect}",namespace="-",rule="namespace-labels"}}'
        assert samples[key] - before.get(key, 0) >= 1
        assert not any('namespace="sandbox"' in k for k in samples)


def count_namespaces() -> int:
    return len(yaml.safe_load((TESTDATA / "namespaces.yaml").read_text())["items"])


def test_metrics_include_errors_denials_build_and_certificate(server):
    before = scrape(server)
    assert requests.post(server.url + "/mutate", data=b"nope", verify=server.ca, timeout=10,
                         headers={"Content-Type": "application/json"}).status_code == 400
    assert fresh_post(server, review_doc(pod({"agentpool": "pool9"},
                                              namespace="team-payments"))).status_code == 200
    after = scrape(server)
    error = 'poolkeeper_admission_requests_total{decision="error",kind="unknown",operation="unknown"}'
    assert after[error] == before.get(error, 0) + 1
    denied = ('poolkeeper_rule_actions_total{effect="denied",namespace="team-payments",'
              'rule="agentpool-node-selector"}')
    assert after[denied] == before.get(denied, 0) + 1
    build = [k for k in after if k.startswith("poolkeeper_build_info{")]
    assert len(build) == 1 and 'version="' in build[0]
    expiry = certificate_expiry(server.cert_dir / "tls.crt").timestamp()
    assert after["poolkeeper_certificate_expiry_timestamp_seconds"] == pytest.approx(expiry)
    assert 'poolkeeper_admission_duration_seconds_bucket{le="0.0005"}' in after


def test_metrics_log_line_names_what_happened_and_never_the_object(server):
    doc = review_doc(pod({"kubernetes.io/os": "linux"}, namespace="team-payments"),
                     uid="log-sample")
    doc["request"]["object"]["spec"]["containers"][0]["env"] = [{"name": "TOKEN",
                                                                 "value": "s3cr3t"}]
    assert fresh_post(server, doc).status_code == 200
    deadline = time.monotonic() + 10
    while not (lines := [line for line in admission_lines(server) if line["uid"] == "log-sample"]):
        assert time.monotonic() < deadline
        time.sleep(0.1)
    (line,) = lines
    assert set(line) == {"time", "level", "logger", "pid", "uid", "kind", "operation",
                         "namespace", "name", "user", "dryRun", "decision", "rules", "patchOps",
                         "ms"}
    assert line["decision"] == "patched" and line["patchOps"] == 1 and line["name"] == "p"
    assert "s3cr3t" not in server.log()


def test_metrics_audit_annotations_on_mutation(server):
    doc = review_doc(pod(namespace="team-payments"))
    doc["request"]["object"]["spec"]["containers"][0]["resources"] = {"limits": {"cpu": "1"}}
    answer = fresh_post(server, doc).json()["response"]
    assert answer["auditAnnotations"] == {"pool": "pool1",
                                          "rules": "agentpool-node-selector,remove-cpu-limits"}
    unchanged = fresh_post(server, review_doc(pod({"agentpool": "pool1"},
                                                  namespace="team-payments"))).json()["response"]
    assert "auditAnnotations" not in unchanged
