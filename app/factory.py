"""Owns wiring: builds the Flask app from settings, a namespace source, the rules and an event
recorder. Building starts nothing; :meth:`Services.start` (gunicorn's ``post_worker_init``, or the
first request) starts the threads in the process that serves."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

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
            self.started = True

    def stop(self) -> None:
        with self._lock:
            self.source.stop()
            if self.events is not None:
                self.events.stop()
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
               watcher: FileWatcher | None = None) -> Flask:
    """The app; with no arguments, settings come from the ``POOLKEEPER_*`` environment.

    Without an explicit ``source``, namespaces come from the settings' file or, when there is
    none, from the API server, through one kubernetes client that the event recorder shares
    (unless an explicit ``events`` is given). Nothing is started.
    """
    settings = settings or load_settings()
    metrics.initialise()
    watcher = watcher or process_watcher()
    rules = rules or RuleStore(settings.rules_dir or SHIPPED_RULES, watcher=watcher)
    api_client = None
    if source is None:
        if not settings.namespaces_file:
            from .kube import load_api_client

            api_client = load_api_client(settings.kubeconfig)
            if events is None:
                events = EventRecorder(api_poster(api_client))
        source = namespace_source(settings, api_client, watcher)
    return flask_app(Services(settings, source, rules, events, cert_paths(settings.cert_dir)[0],
                              watcher, api_client=api_client))
