"""Owns the Prometheus metrics: their definitions, and the /metrics exposition across workers.

Under gunicorn every worker is a process, so the metrics use prometheus_client's multiprocess
mode: ``PROMETHEUS_MULTIPROC_DIR`` must be set before this module is first imported (the gunicorn
configuration does it), each worker writes its samples to files there, and a scrape served by
any worker sums them all. Without the variable (``poolkeeper mutate``, unit tests) the metrics
live in this process only. So nothing that ``poolkeeper serve`` runs before gunicorn's
configuration may import this module (tests/test_metrics.py scrapes a real server to check).
"""

from __future__ import annotations

import os
import platform
from collections.abc import Iterable, Iterator, Mapping
from importlib import metadata
from typing import TYPE_CHECKING

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)
from prometheus_client.core import GaugeMetricFamily, InfoMetricFamily, Metric

if TYPE_CHECKING:
    from .admission import Decision

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

ADMISSION_REQUESTS = Counter(
    "poolkeeper_admission_requests_total", "Admission reviews answered, by decision.",
    ["kind", "operation", "decision"])  # decision: allowed, patched, denied, error
RULE_ACTIONS = Counter(
    "poolkeeper_rule_actions_total", "What rules did, by rule, namespace and effect.",
    ["rule", "namespace", "effect"])  # effect: mutated, denied, warned
RULE_ERRORS = Counter(
    "poolkeeper_rule_errors_total",
    "Rules that raised and were skipped (onError: ignore) while the request went on, by rule.",
    ["rule"])
# The decision itself takes tens of microseconds; the buckets resolve that and still cover a
# slow namespace lookup up to the webhook's timeout.
ADMISSION_DURATION = Histogram(
    "poolkeeper_admission_duration_seconds", "Time from body read to response, per review.",
    buckets=(0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
             1.0, 2.5, 5.0))
NAMESPACE_LOOKUPS = Counter(
    "poolkeeper_namespace_cache_lookups_total", "Namespace label lookups, by result.",
    ["result"])  # hit, miss, stale
NAMESPACE_CACHE_SIZE = Gauge(
    "poolkeeper_namespace_cache_size", "Namespaces held by a worker's cache (largest worker).",
    multiprocess_mode="livemax")
# Labelled so that only workers that watch create a sample: the gunicorn master (and a worker
# reading a namespaces file) would otherwise add a 0 that livemin would report.
NAMESPACE_WATCH_LAST_EVENT = Gauge(
    "poolkeeper_namespace_watch_last_event_timestamp_seconds",
    "Unix time of the namespace watch's last sign of life (a listing, an event, a bookmark, a "
    "stream opened or ended on time); the stalest live worker's.", ["source"],
    multiprocess_mode="livemin")
NAMESPACE_WATCH_RESTARTS = Counter(
    "poolkeeper_namespace_watch_restarts_total", "Namespace watches restarted after an error.")
RULES_RELOADS = Counter(
    "poolkeeper_rules_reload_total", "Reloads of a changed rules directory, by result.",
    ["result"])  # success, failure
EVENTS = Counter(
    "poolkeeper_events_total", "Kubernetes Events about denials and warnings, by outcome.",
    ["outcome"])  # sent, rate_limited, dropped, failed

# Set by the one process that audits (app.audit.AuditLoop; the audit Lease elects it). livemax: a
# dead auditor's series go with it, and a process that stops auditing zeroes its own.
DRIFT_WORKLOADS = Gauge(
    "poolkeeper_drift_workloads", "Workloads whose running pods (or DaemonSet template) disagree "
    "with their namespace's pool, by namespace and reason, at the last audit.",
    ["namespace", "reason"], multiprocess_mode="livemax")
AUDIT_LAST_RUN = Gauge(
    "poolkeeper_audit_last_run_timestamp_seconds",
    "Unix time the last audit completed (0 where this pod does not audit).",
    multiprocess_mode="livemax")
# Bounded: namespaces come only from the namespace source's labels (the audit skips pods of
# namespaces it does not know), and past this many (namespace, reason) series the rest are summed
# under namespace OTHER_NAMESPACES.
MAX_DRIFT_SERIES = 1000
OTHER_NAMESPACES = "_other"
_drift_series: set[tuple[str, str]] = set()  # every series this process has set
# The certificate manager (serve --manage-certs); conflict: another replica wrote first.
CERTIFICATE_ACTIONS = Counter(
    "poolkeeper_certificate_actions_total", "What the certificate manager changed, by action.",
    ["action"])
CERTIFICATE_ACTION_NAMES = ("created", "renewed", "replaced", "overlap_ended", "cabundle_set",
                            "served", "conflict")

LOOKUP_HIT = NAMESPACE_LOOKUPS.labels("hit")
LOOKUP_MISS = NAMESPACE_LOOKUPS.labels("miss")
LOOKUP_STALE = NAMESPACE_LOOKUPS.labels("stale")

# What the webhooks in deploy/base/webhook.yaml send (kind, operation), and what an unreadable
# body is counted as; tests/test_monitoring.py checks the list against the manifest.
REVIEWED = (("Pod", "CREATE"), ("Pod", "UPDATE"), ("DaemonSet", "CREATE"),
            ("DaemonSet", "UPDATE"), ("Namespace", "CREATE"), ("Namespace", "UPDATE"),
            ("unknown", "unknown"),
            *((kind, operation) for kind in ("Deployment", "ReplicaSet", "StatefulSet", "Job",
                                             "CronJob", "ReplicationController")
              for operation in ("CREATE", "UPDATE")))


def initialise_rules(names: Iterable[str]) -> None:
    """``poolkeeper_rule_errors_total`` at 0 for each of these rules, so PoolkeeperRuleErrors
    sees the first skip (see :func:`initialise`); for the rules at start and after a reload."""
    for name in names:
        RULE_ERRORS.labels(name)


def initialise() -> None:
    """Create at 0 the labelled counter series that deploy/monitoring's alerts and dashboard
    read, for each known label value. Otherwise a series is born at 1 with its first increment,
    and ``increase()``/``rate()`` see nothing until the second: the first refused rules reload
    would never fire PoolkeeperRulesReloadFailing. Call it in each process that counts (each
    gunicorn worker: in multiprocess mode a process writes its own samples); calling it again
    changes nothing.
    """
    for result in ("success", "failure"):
        RULES_RELOADS.labels(result)
    for outcome in ("sent", "rate_limited", "dropped", "failed"):
        EVENTS.labels(outcome)
    for result in ("hit", "miss", "stale"):
        NAMESPACE_LOOKUPS.labels(result)
    for kind, operation in REVIEWED:
        ADMISSION_REQUESTS.labels(kind, operation, "error")
    for action in CERTIFICATE_ACTION_NAMES:
        CERTIFICATE_ACTIONS.labels(action)


# Each review counts under a few label values that repeat; ``labels()`` validates them and takes
# the metric's lock every time, so the children are kept here once made (as many as the metric
# itself holds: the label values are bounded).
_children: dict[tuple[Counter, tuple[str, ...]], Counter] = {}


def _child(metric: Counter, *values: str) -> Counter:
    child = _children.get((metric, values))
    if child is None:
        child = _children.setdefault((metric, values), metric.labels(*values))
    return child


def observe_review(kind: str, operation: str, decision: str, seconds: float) -> None:
    """One answered review: its decision (allowed, patched, denied, error) and its duration."""
    _child(ADMISSION_REQUESTS, kind, operation, decision).inc()
    ADMISSION_DURATION.observe(seconds)


# The namespace label of rule actions in namespaces the namespace source does not know: /mutate is
# reachable from the pod network, and forged reviews with random namespaces would otherwise grow
# a series (and multiprocess file space) per namespace.
UNKNOWN_NAMESPACE = "-"


def count_actions(decision: Decision, namespace: str) -> None:
    """What each rule did, under ``namespace`` (a known namespace, else UNKNOWN_NAMESPACE)."""
    for action in decision.actions:
        _child(RULE_ACTIONS, action.rule, namespace, action.effect).inc()


def export_drift(counts: Mapping[tuple[str, str], int], cap: int = MAX_DRIFT_SERIES) -> None:
    """The audit's drifting workloads by (namespace, reason); series of earlier audits that are
    clean now read 0."""
    values: dict[tuple[str, str], int] = {}
    for (namespace, reason), count in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])):
        key = (namespace, reason)
        if key not in _drift_series and len(_drift_series) + len(values) >= cap:
            key = (OTHER_NAMESPACES, reason)
        values[key] = values.get(key, 0) + count
    _drift_series.update(values)
    for namespace, reason in _drift_series:
        DRIFT_WORKLOADS.labels(namespace, reason).set(values.get((namespace, reason), 0))


def clear_drift() -> None:
    """This process no longer audits: its drift series read 0."""
    for namespace, reason in _drift_series:
        DRIFT_WORKLOADS.labels(namespace, reason).set(0)


def version() -> str:
    try:
        return metadata.version("poolkeeper")
    except metadata.PackageNotFoundError:  # pragma: no cover - running from an uninstalled tree
        return "unknown"


class _ScrapeTimeCollector:
    """Values read when scraped: the serving certificate's expiry, the build, and the digest of
    the rules the answering worker enforces (the workers of a pod read the same directory and
    pick a change up within a second of each other)."""

    def __init__(self, cert_file: str | None, rules_digest: str | None = None):
        self.cert_file = cert_file
        self.rules_digest = rules_digest

    def collect(self) -> Iterator[Metric]:
        info = InfoMetricFamily("poolkeeper_build", "poolkeeper version and runtime.")
        info.add_metric([], {"version": version(), "python": platform.python_version()})
        yield info
        if self.rules_digest:
            rules = InfoMetricFamily("poolkeeper_rules", "Digest of the rule set in force.")
            rules.add_metric([], {"digest": self.rules_digest})
            yield rules
        if self.cert_file:
            from .certs import CertificateError, certificate_expiry

            expiry = GaugeMetricFamily(
                "poolkeeper_certificate_expiry_timestamp_seconds",
                "Unix time when the serving certificate expires.")
            try:
                expiry.add_metric([], certificate_expiry(self.cert_file).timestamp())
            except (CertificateError, OSError, ValueError):
                pass  # no sample: PoolkeeperCertificateUnreadable fires
            yield expiry


def exposition(cert_file: str | None = None, rules_digest: str | None = None) -> bytes:
    """The text a scrape gets: every worker's samples plus the scrape-time values."""
    registry = CollectorRegistry()
    if "PROMETHEUS_MULTIPROC_DIR" in os.environ:
        multiprocess.MultiProcessCollector(registry)
    else:
        from prometheus_client import REGISTRY
        registry = REGISTRY
    output = generate_latest(registry)
    extra = CollectorRegistry()
    extra.register(_ScrapeTimeCollector(cert_file, rules_digest))
    return output + generate_latest(extra)


def worker_exited(pid: int) -> None:
    """gunicorn child_exit hook: drop a dead worker's live gauges."""
    if "PROMETHEUS_MULTIPROC_DIR" in os.environ:
        multiprocess.mark_process_dead(pid)
