"""deploy/monitoring/: every alert and dashboard expression uses metrics that exist, every alert
fires when it should and stays silent otherwise (promtool), and the counters alerts read exist
at 0 as soon as poolkeeper serves."""

from __future__ import annotations

import json
import re
import shutil
import subprocess

import pytest
import requests
import yaml
from prometheus_client import Counter, Gauge, Histogram
from prometheus_client.parser import text_string_to_metric_families

from app import metrics
from app.certs import create_certificates

from .server import start_server
from .support import ROOT, TESTDATA, skip_or_fail

MONITORING = ROOT / "deploy/monitoring"
METRIC_TOKEN = re.compile(r"\bpoolkeeper_[a-z_]+\b")
# What alerts may read besides poolkeeper's own metrics: `up` of the ServiceMonitor's job, and
# the API server's admission webhook metrics (k8s.io/apiserver pkg/admission/metrics).
APISERVER_METRICS = {"apiserver_admission_webhook_rejection_count",
                     "apiserver_admission_webhook_fail_open_count",
                     "apiserver_admission_webhook_admission_duration_seconds_bucket"}
APISERVER_TOKEN = re.compile(r"\bapiserver_[a-z_]+\b")
# name{label="value", ...}: an instant or range selector with equality matchers
SELECTOR = re.compile(r"\b(poolkeeper_[a-z_]+_total)\{([^}]*)\}")
PROMTOOL_TIMEOUT = 120  # seconds; the unit tests take well under one


def exported_names() -> set[str]:
    """Every series name the app can expose, with the suffixes each metric type adds."""
    names = {"poolkeeper_build_info", "poolkeeper_certificate_expiry_timestamp_seconds",
             "poolkeeper_rules_info"}
    for value in vars(metrics).values():
        if isinstance(value, Counter):
            names.add(value._name + "_total")
        elif isinstance(value, Histogram):
            names.update(value._name + s for s in ("_bucket", "_sum", "_count"))
        elif isinstance(value, Gauge):
            names.add(value._name)
    return names


def alert_rules() -> list[dict]:
    doc = yaml.safe_load((MONITORING / "prometheusrule.yaml").read_text())
    return [rule for group in doc["spec"]["groups"] for rule in group["rules"]]


def dashboard_exprs() -> list[str]:
    dashboard = json.loads((MONITORING / "grafana-dashboard.json").read_text())
    return [t["expr"] for p in dashboard["panels"] for t in p["targets"]]


def test_monitoring_exported_names_are_the_documented_ones():
    names = exported_names()
    for required in ("poolkeeper_admission_requests_total", "poolkeeper_rule_actions_total",
                     "poolkeeper_admission_duration_seconds_bucket",
                     "poolkeeper_namespace_cache_lookups_total", "poolkeeper_namespace_cache_size",
                     "poolkeeper_namespace_watch_last_event_timestamp_seconds",
                     "poolkeeper_namespace_watch_restarts_total",
                     "poolkeeper_rules_reload_total"):
        assert required in names
    readme = (ROOT / "README.md").read_text()
    for name in names:
        base = re.sub(r"_(bucket|sum|count)$", "", name)
        assert base in readme, f"{base} is not described in README.md"


OWN_ALERTS = {"PoolkeeperErrorRatioHigh", "PoolkeeperLatencyHigh",
              "PoolkeeperCertificateExpiringSoon", "PoolkeeperCertificateUnreadable",
              "PoolkeeperNamespaceWatchStale", "PoolkeeperRulesReloadFailing",
              "PoolkeeperRuleErrors",
              "PoolkeeperPlacementDrift"}
APISERVER_ALERTS = {"PoolkeeperWebhookCallsFailing", "PoolkeeperWebhookFailingOpen",
                    "PoolkeeperWebhookSlow"}


def test_monitoring_alerts_cover_the_failure_modes_and_use_exported_metrics():
    rules = alert_rules()
    names = {r["alert"] for r in rules}
    assert names == OWN_ALERTS | APISERVER_ALERTS | {"PoolkeeperDown"}
    exported = exported_names()
    readme = (ROOT / "README.md").read_text()
    for rule in rules:
        used = set(METRIC_TOKEN.findall(rule["expr"]))
        external = set(APISERVER_TOKEN.findall(rule["expr"]))
        if rule["alert"] in OWN_ALERTS:
            assert used and used <= exported and not external, (rule["alert"], used - exported)
        elif rule["alert"] in APISERVER_ALERTS:
            assert not used and len(external) == 1 and external <= APISERVER_METRICS, \
                (rule["alert"], external)
        else:
            assert not used and not external and "absent(up{" in rule["expr"]
        assert rule["annotations"]["summary"] and rule["labels"]["severity"]
        assert rule["alert"] in readme, f"README must say what to do when {rule['alert']} fires"
    latency = next(r for r in rules if r["alert"] == "PoolkeeperLatencyHigh")
    assert "0.99" in latency["expr"] and "> 0.1" in latency["expr"]
    expiring = next(r for r in rules if r["alert"] == "PoolkeeperCertificateExpiringSoon")
    assert "14 * 24 * 3600" in expiring["expr"]
    # A certificate the app cannot read has no expiry sample, so the expiry alert cannot fire.
    unreadable = next(r for r in rules if r["alert"] == "PoolkeeperCertificateUnreadable")
    assert "unless on(namespace, pod) poolkeeper_certificate_expiry_timestamp_seconds" in \
        unreadable["expr"]


def test_monitoring_dashboard_panels_use_exported_metrics():
    exprs = dashboard_exprs()
    exported = exported_names()
    assert len(exprs) >= 10
    for expr in exprs:
        used = set(METRIC_TOKEN.findall(expr))
        assert used and used <= exported, (expr, used - exported)
    joined = "\n".join(exprs)
    for needed in ('effect="denied"', "histogram_quantile(0.99", "by (decision)",
                   "poolkeeper_namespace_cache_lookups_total"):
        assert needed in joined


def test_monitoring_servicemonitor_scrapes_the_metrics_port_over_plain_http():
    monitor = yaml.safe_load((MONITORING / "servicemonitor.yaml").read_text())
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["path"] == "/metrics" and endpoint["scheme"] == "http"
    assert "tlsConfig" not in endpoint
    service = yaml.safe_load((ROOT / "deploy/base/service.yaml").read_text())
    (port,) = [p for p in service["spec"]["ports"] if p["name"] == endpoint["port"]]
    assert port["targetPort"] == "metrics"
    deployment = yaml.safe_load((ROOT / "deploy/base/deployment.yaml").read_text())
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert {"name": "metrics", "containerPort": int(env["POOLKEEPER_METRICS_PORT"]),
            "protocol": "TCP"} in container["ports"]


def test_monitoring_down_alert_reads_the_job_the_servicemonitor_scrapes():
    # prometheus-operator names the job after the Service the ServiceMonitor selects (no
    # spec.jobLabel) and labels each target with the Service's namespace.
    monitor = yaml.safe_load((MONITORING / "servicemonitor.yaml").read_text())
    assert "jobLabel" not in monitor["spec"]
    service = yaml.safe_load((ROOT / "deploy/base/service.yaml").read_text())
    (namespace,) = monitor["spec"]["namespaceSelector"]["matchNames"]
    assert service["metadata"]["namespace"] == namespace
    (down,) = [r for r in alert_rules() if r["alert"] == "PoolkeeperDown"]
    assert f'absent(up{{job="{service["metadata"]["name"]}", namespace="{namespace}"}} == 1)' \
        in down["expr"]
    assert down["for"] == "5m" and down["labels"]["severity"] == "critical"


def test_monitoring_apiserver_alerts_match_every_poolkeeper_webhook():
    webhooks = [w["name"] for w in
                yaml.safe_load((ROOT / "deploy/base/webhook.yaml").read_text())["webhooks"]]
    for rule in alert_rules():
        if rule["alert"] in APISERVER_ALERTS:
            (pattern,) = re.findall(r'name=~"([^"]+)"', rule["expr"])
            assert all(re.fullmatch(pattern, name) for name in webhooks), (rule["alert"], pattern)
            assert not re.fullmatch(pattern, "poolkeeper.io.example.com")
            assert "sum by (name" in rule["expr"]  # one alert per webhook, over all API servers


# -- promtool ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def promtool() -> str:
    """promtool, installed from Debian's `prometheus` package when missing (as root)."""
    if shutil.which("promtool") is None:
        subprocess.run(["bash", str(ROOT / "tests/install-promtool.sh")], capture_output=True,
                       timeout=600)
    binary = shutil.which("promtool")
    if binary is None:
        skip_or_fail("promtool not found and not installable here (needs root and apt-get): "
                     "sudo apt-get install prometheus")
    return binary


@pytest.fixture
def rule_files(tmp_path) -> tuple:
    """The PrometheusRule's spec as a Prometheus rule file, with the unit tests beside it."""
    spec = yaml.safe_load((MONITORING / "prometheusrule.yaml").read_text())["spec"]
    rules = tmp_path / "poolkeeper-rules.yaml"
    rules.write_text(yaml.safe_dump(spec, sort_keys=False))
    tests = tmp_path / "prometheusrule-test.yaml"
    shutil.copyfile(MONITORING / "prometheusrule-test.yaml", tests)
    return rules, tests


def run_promtool(promtool: str, *args) -> subprocess.CompletedProcess:
    return subprocess.run([promtool, *map(str, args)], capture_output=True, text=True,
                          timeout=PROMTOOL_TIMEOUT)


def test_monitoring_promtool_checks_the_rules(promtool, rule_files):
    rules, _ = rule_files
    result = run_promtool(promtool, "check", "rules", rules)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(alert_rules())} rules found" in result.stdout


def test_monitoring_promtool_unit_tests_pass(promtool, rule_files):
    rules, tests = rule_files
    result = run_promtool(promtool, "test", "rules", tests)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_monitoring_promtool_unit_tests_make_every_alert_fire_and_stay_silent():
    doc = yaml.safe_load((MONITORING / "prometheusrule-test.yaml").read_text())
    assert doc["rule_files"] == ["poolkeeper-rules.yaml"]
    fires, silent = set(), set()
    for case in doc["tests"]:
        for check in case["alert_rule_test"]:
            (fires if check["exp_alerts"] else silent).add(check["alertname"])
    names = {r["alert"] for r in alert_rules()}
    assert fires == names, f"no case where these fire: {names - fires}"
    assert silent == names, f"no case where these stay silent: {names - silent}"


def test_monitoring_promtool_unit_tests_catch_a_broken_alert(promtool, rule_files):
    # The cases are not vacuous: an alert that never fires fails them.
    rules, tests = rule_files
    spec = yaml.safe_load(rules.read_text())
    for rule in spec["groups"][0]["rules"]:
        if rule["alert"] == "PoolkeeperRulesReloadFailing":
            rule["expr"] = rule["expr"].replace("> 0", "> 1")
    rules.write_text(yaml.safe_dump(spec, sort_keys=False))
    result = run_promtool(promtool, "test", "rules", tests)
    assert result.returncode != 0
    assert "the first refused reload fires" in result.stdout + result.stderr


# -- counters at 0 from the start ----------------------------------------------------------------


@pytest.fixture(scope="module")
def fresh_samples(tmp_path_factory) -> list:
    """(name, labels, value) of every sample a just-started server (2 workers) exposes."""
    certs = tmp_path_factory.mktemp("certs")
    create_certificates(certs, "poolkeeper", "poolkeeper-system")
    server = start_server(certs, tmp_path_factory.mktemp("logs") / "server.log",
                          "--namespaces", str(TESTDATA / "namespaces.yaml"))
    try:
        server.wait_for_workers(2)
        response = requests.get(server.metrics_url, timeout=10)
        assert response.status_code == 200
    finally:
        server.stop()
    return [(s.name, s.labels, s.value) for family in text_string_to_metric_families(response.text)
            for s in family.samples]


def matching(samples, name: str, **labels) -> list[float]:
    return [v for n, got, v in samples if n == name and labels.items() <= got.items()]


def test_monitoring_counters_alerts_read_exist_at_zero_when_poolkeeper_starts(fresh_samples):
    selectors = set()
    for rule in alert_rules():
        for name, matchers in SELECTOR.findall(rule["expr"]):
            equal = tuple(sorted(re.findall(r'(\w+)="([^"]*)"', matchers)))
            if equal:
                selectors.add((name, equal))
    assert ("poolkeeper_rules_reload_total", (("result", "failure"),)) in selectors
    for name, equal in selectors:
        values = matching(fresh_samples, name, **dict(equal))
        assert values and set(values) == {0.0}, (name, equal, values)


def test_monitoring_labelled_counters_start_at_zero_for_every_known_value(fresh_samples):
    for name, label, values in (("poolkeeper_rules_reload_total", "result", ("success", "failure")),
                                ("poolkeeper_events_total", "outcome",
                                 ("sent", "rate_limited", "dropped", "failed")),
                                ("poolkeeper_namespace_cache_lookups_total", "result",
                                 ("hit", "miss", "stale"))):
        for value in values:
            assert matching(fresh_samples, name, **{label: value}) == [0.0], (name, value)
    for kind, operation in metrics.REVIEWED:
        assert matching(fresh_samples, "poolkeeper_admission_requests_total", kind=kind,
                        operation=operation, decision="error") == [0.0], (kind, operation)
    from app.rules import SHIPPED_RULES, load_rules

    for rule in load_rules(SHIPPED_RULES):  # PoolkeeperRuleErrors sees a rule's first skip
        assert matching(fresh_samples, "poolkeeper_rule_errors_total",
                        rule=rule.name) == [0.0], rule.name


def test_monitoring_reviewed_kinds_are_what_the_webhooks_send():
    from app.kinds import OBJECT_KINDS

    kinds = {name.lower() + "s": name for name in OBJECT_KINDS}
    sent = set()
    for webhook in yaml.safe_load((ROOT / "deploy/base/webhook.yaml").read_text())["webhooks"]:
        for rule in webhook["rules"]:
            sent.update((kinds[r], op) for r in rule["resources"] for op in rule["operations"])
    assert set(metrics.REVIEWED) == sent | {("unknown", "unknown")}
