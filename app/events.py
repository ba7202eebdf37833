"""Owns Kubernetes Events about denials and warnings: built on the request path, sent off it.

:meth:`EventRecorder.record` only builds the events and puts them on a bounded queue; one
daemon thread posts them (events.k8s.io/v1) so a slow API server never slows admission. The
transport records Events only in namespaces the namespace source knows (``/mutate`` is reachable
from the pod network, and a forged review names any namespace it likes). Events are rate limited
per namespace (not per object: the sender picks the name) and overall, so neither a
crash-looping controller nor a forger can flood etcd; a full queue drops. User values in the
note are quoted and truncated. Dry-run requests get no events.
"""

from __future__ import annotations

import logging
import os
import queue
import socket
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import cachetools

from . import metrics
from .admission import Decision
from .review import AdmissionRequest
from .text import clip

log = logging.getLogger("poolkeeper.events")

REPORTING_CONTROLLER = "poolkeeper.io/webhook"
REASONS = {"denied": "PoolkeeperDenied", "warned": "PoolkeeperWarning"}
# events.k8s.io/v1 limits: note <= 1 kB, action and reportingInstance <= 128 characters.
MAX_NOTE = 1024
MAX_FIELD = 128


class TokenBucket:
    __slots__ = ("capacity", "rate", "tokens", "stamp")

    def __init__(self, capacity: float, rate: float, now: float):
        self.capacity, self.rate, self.tokens, self.stamp = capacity, rate, capacity, now

    def take(self, now: float) -> bool:
        self.tokens = min(self.capacity, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens >= 1:
            self.tokens -= 1
            return True
        return False


class EventRecorder:
    def __init__(self, post: Callable[[str, dict], Any], *, instance: str | None = None,
                 queue_size: int = 1000, per_namespace_burst: int = 5,
                 per_namespace_interval: float = 12.0, global_burst: int = 20,
                 global_rate: float = 5.0,
                 clock: Callable[[], float] = time.monotonic):
        """``post(namespace, body)`` creates one event; it runs on the sender thread only."""
        self._post = post
        self.instance = (instance or os.environ.get("HOSTNAME") or socket.gethostname())[:MAX_FIELD]
        self._queue: queue.Queue[tuple[str, dict] | None] = queue.Queue(maxsize=queue_size)
        self._clock = clock
        # per namespace: a burst, then one event per interval
        self._per_namespace_burst = per_namespace_burst
        self._per_namespace_rate = 1.0 / per_namespace_interval
        self._keys: cachetools.LRUCache = cachetools.LRUCache(maxsize=10000)
        self._global = TokenBucket(global_burst, global_rate, clock())
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self.counts = {"sent": 0, "rate_limited": 0, "dropped": 0, "failed": 0}

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="poolkeeper-events",
                                            daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        if self._thread is not None:
            try:
                self._queue.put(None, timeout=timeout)
            except queue.Full:
                pass
            self._thread.join(timeout)
            self._thread = None

    def record(self, request: AdmissionRequest, decision: Decision, namespace: str) -> None:
        """Queue an event per denial and warning in ``namespace`` (one the namespace source
        knows: the object's, or a Namespace's own); never blocks and never raises."""
        if request.dry_run:
            return
        for action in decision.actions:
            reason = REASONS.get(action.effect)
            if reason is None:
                continue
            if not self._allow(namespace):
                self._count("rate_limited")
                continue
            body = self.event(request, namespace, action.rule, reason, action.detail)
            try:
                self._queue.put_nowait((namespace, body))
            except queue.Full:
                self._count("dropped")

    def _allow(self, namespace: str) -> bool:
        now = self._clock()
        with self._lock:
            bucket = self._keys.get(namespace)
            if bucket is None:
                bucket = self._keys[namespace] = TokenBucket(
                    self._per_namespace_burst, self._per_namespace_rate, now)
            if not bucket.take(now):
                return False
            return self._global.take(now)

    def event(self, request: AdmissionRequest, namespace: str, rule: str, reason: str,
              detail: str) -> dict:
        obj = request.object or request.old_object or {}
        verb = "denied" if reason == REASONS["denied"] else "warned about"
        name = clip(request.display_name) or "(unnamed)"
        note = f"[{rule}] {verb} {request.operation} of {clip(request.gvk.kind, 63)} {name}: " \
               f"{detail}"
        api_version = obj.get("apiVersion")
        regarding = {"apiVersion": clip(api_version if isinstance(api_version, str)
                                        else request.gvk.version, 63),
                     "kind": clip(request.gvk.kind, 63),
                     "name": clip(request.name or request.display_name)}
        if request.namespace:
            regarding["namespace"] = request.namespace
        return {
            "apiVersion": "events.k8s.io/v1",
            "kind": "Event",
            "metadata": {"generateName": "poolkeeper-", "namespace": namespace,
                         "labels": {"app.kubernetes.io/name": "poolkeeper",
                                    "poolkeeper.io/rule": rule}},
            "eventTime": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
            "reportingController": REPORTING_CONTROLLER,
            "reportingInstance": self.instance,
            "action": "Admit",
            "reason": reason,
            "regarding": regarding,
            "note": note if len(note) <= MAX_NOTE else note[:MAX_NOTE - 3] + "...",
            "type": "Warning",
        }

    def _count(self, outcome: str) -> None:
        with self._lock:
            self.counts[outcome] += 1
        metrics.EVENTS.labels(outcome).inc()

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            namespace, body = item
            try:
                self._post(namespace, body)
                self._count("sent")
            except Exception as exc:  # the API server may be down: an event is not worth more
                self._count("failed")
                log.warning("could not create event in %s: %s", namespace,
                            getattr(exc, "reason", None) or exc)


def api_poster(api_client: Any) -> Callable[[str, dict], Any]:
    """post(namespace, body) through the kubernetes client's events.k8s.io/v1 API."""
    import kubernetes.client

    # Any: with _preload_content=False the call returns the raw urllib3 response, and takes the
    # body as a plain dict, neither of which the generated annotations allow for.
    api: Any = kubernetes.client.EventsV1Api(api_client)

    def post(namespace: str, body: dict) -> None:
        api.create_namespaced_event(namespace, body, _request_timeout=(3, 5),
                                    _preload_content=False).release_conn()
    return post
