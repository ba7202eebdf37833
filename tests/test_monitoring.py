"""deploy/monitoring/: every alert and dashboard expression uses metrics poolkeeper exports."""

from __future__ import annotations

import json
import re

import yaml
from prometheus_client import Counter, Gauge, Histogram

from app import metrics

from .support import ROOT

MONITORING = ROOT / "deploy/monitoring"
METRIC_TOKEN = re.compile(r"\bpoolkeeper_[a-z_]+\b")


def exported_names() -> set[str]:
    """Every series name the app can expose, with the suffixes each metric type adds."""
    names = {"poolkeeper_build_info", "poolkeeper_certificate_expiry_timestamp_seconds"}
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


def test_monitoring_alerts_cover_the_failure_modes_and_use_exported_metrics():
    rules = alert_rules()
    names = {r["alert"] for r in rules}
    assert names == {"PoolkeeperErrorRatioHigh", "PoolkeeperLatencyHigh",
                     "PoolkeeperCertificateExpiringSoon", "PoolkeeperCertificateUnreadable",
                     "PoolkeeperNamespaceWatchStale", "PoolkeeperRulesReloadFailing"}
    exported = exported_names()
    readme = (ROOT / "README.md").read_text()
    for rule in rules:
        used = set(METRIC_TOKEN.findall(rule["expr"]))
        assert used and used <= exported, (rule["alert"], used - exported)
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


def test_monitoring_servicemonitor_scrapes_the_https_port():
    monitor = yaml.safe_load((MONITORING / "servicemonitor.yaml").read_text())
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["path"] == "/metrics" and endpoint["scheme"] == "https"
    assert endpoint["tlsConfig"]["serverName"] == "poolkeeper.poolkeeper-system.svc"
