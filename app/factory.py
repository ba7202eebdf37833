"""Owns wiring: builds the Flask app from settings, a namespace source, the rules and an event
recorder. Building starts nothing; :meth:`Services.start` (gunicorn's ``post_worker_init``, or the
first request) starts the threads in the process that serves."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from . import metrics
from .admission import Decision
from .certs import cert_paths
from .config import Settings, load_settings
from .events import EventRecorder, api_poster
from .namespaces import NamespaceLookupError, NamespaceSource, namespace_source
from .review import AdmissionRequest
from .rules import SHIPPED_RULES, RuleStore
from .watch import FileWatcher, process_watcher
from .webhook import flask_app

if TYPE_CHECKING:
    from flask import Flask

    from .nodes import NodeSource


class Background(Protocol):
    """A thread of the serving process beyond the namespace source and the event sender."""

    def start(self) -> None: ...

    def stop(self) -> None: ...


@dataclass
class Services:
    """What the transport needs to answer a request, and what it reports to."""

    settings: Settings
    source: NamespaceSource
    rules: RuleStore
    events: EventRecorder | None
    cert_file: str
    watcher: FileWatcher
    api_client: Any = None  # the kubernetes client the factory built (shared by source, events)
    # with namespaces from the API server: the replica record and audit Lease campaign
    # (app.leases.ReplicaPresence), then the periodic audit (app.audit.AuditLoop) when enabled
    background: tuple[Background, ...] = ()
    # the node pools the rules may ask about (a watch of the API server's nodes, started by the
    # first lookup); None without a cluster
    nodes: NodeSource | None = None
    started: bool = False
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def start(self) -> None:
        """Start the namespace watch, the event sender and the file watcher (idempotent)."""
        with self._lock:
            if self.started:
                return
            self.source.start()
            if self.events is not None:
                self.events.start()
            self.watcher.start()
            for thread in self.background:
                thread.start()
            self.started = True

    def stop(self) -> None:
        """Stop what start() started: the audit Lease is released and the replica record
        deleted (gunicorn's worker_exit calls this on a graceful stop)."""
        with self._lock:
            for thread in reversed(self.background):
                thread.stop()
            self.source.stop()
            if self.events is not None:
                self.events.stop()
            if self.nodes is not None:
                self.nodes.stop()
            if self.api_client is not None:
                self.api_client.close()
                self.api_client = None
            self.started = False

    def acted(self, request: AdmissionRequest, decision: Decision) -> None:
        """Count what the rules did and queue Events for denials and warnings: under the team
        they did it to (a namespaced object's namespace, a Namespace's own name) when the
        namespace source knows it; otherwise uncounted by name and without Events (a forged
        review may name any namespace)."""
        team = request.namespace or (
            request.display_name if request.gvk.kind == "Namespace" else "")
        known = bool(team) and self._known(team, decision)
        metrics.count_actions(decision, team if known else metrics.UNKNOWN_NAMESPACE)
        if known and self.events is not None:
            self.events.record(request, decision, team)

    def _known(self, namespace: str, decision: Decision) -> bool:
        if namespace in decision.namespaces:  # a rule looked it up already
            return decision.namespaces[namespace] is not None
        try:
            return self.source.labels(namespace) is not None
        except NamespaceLookupError:
            return False


def create_app(settings: Settings | None = None, *, source: NamespaceSource | None = None,
               rules: RuleStore | None = None, events: EventRecorder | None = None,
               watcher: FileWatcher | None = None, nodes: NodeSource | None = None) -> Flask:
    """The app; with no arguments, settings come from the ``POOLKEEPER_*`` environment.

    Without an explicit ``source``, namespaces come from the settings' file or, when there is
    none, from the API server, through one kubernetes client that the event recorder (unless an
    explicit ``events`` is given), the node watch (unless an explicit ``nodes`` is given), the
    replica record (``poolkeeper status``) and, with ``audit_interval``, the audit share.
    Nothing is started.
    """
    settings = settings or load_settings()
    metrics.initialise()
    watcher = watcher or process_watcher()
    rules = rules or RuleStore(settings.rules_dir or SHIPPED_RULES, watcher=watcher)
    metrics.initialise_rules(rule.name for rule in rules.rules())
    api_client = None
    background: tuple[Background, ...] = ()
    if source is None:
        if not settings.namespaces_file:
            from .kube import load_api_client

            api_client = load_api_client(settings.kubeconfig)
            if events is None:
                events = EventRecorder(api_poster(api_client))
            if nodes is None:
                from .nodes.informer import KubeNodes

                nodes = KubeNodes(api_client, max_stale=settings.max_stale)
        source = namespace_source(settings, api_client, watcher)
        if api_client is not None:
            background = _cluster_threads(settings, api_client, source, rules)
    return flask_app(Services(settings, source, rules, events, cert_paths(settings.cert_dir)[0],
                              watcher, api_client=api_client, background=background,
                              nodes=nodes))


def _cluster_threads(settings: Settings, api_client: Any, source: NamespaceSource,
                     rules: RuleStore) -> tuple[Background, ...]:
    """The replica record, and with audit_interval the audit Lease campaign and the audit."""
    from .leases import ReplicaPresence, delete_expired_records

    presence = ReplicaPresence(api_client, rules, audit=settings.audit_interval > 0,
                               version=metrics.version())
    if not settings.audit_interval:
        return (presence,)
    from .audit import AuditLoop, ClusterLister, audit_cluster, source_labels

    lister = ClusterLister.from_client(api_client)

    def run(keep_going: Callable[[], bool]) -> Any:
        return audit_cluster(lister, rules.rules(), namespace_labels=source_labels(source),
                             keep_going=keep_going)

    def after_run() -> None:
        record = presence.record
        if record is not None:
            delete_expired_records(presence.api, record.namespace, time.time())

    return presence, AuditLoop(run, presence.is_auditor, settings.audit_interval,
                               after_run=after_run)
