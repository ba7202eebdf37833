"""Owns poolkeeper's coordination.k8s.io/v1 Leases: the election of the one process that audits,
and each process's record of the rule set it enforces (read by ``poolkeeper status``).

gunicorn runs several worker processes per pod, and each is a replica of its own: the identity
of a process is ``<pod name>_<pid>``. Every process that reads namespaces from the API server
keeps a Lease ``poolkeeper-replica-<pod>-<pid>`` whose annotations name its rules digest and
when it loaded it; it renews it every :data:`RECORD_HEARTBEAT` seconds and at once when its rules
change, and deletes it when it stops. With the audit enabled, every process also campaigns for
the Lease :data:`AUDIT_LEASE`, with client-go's leader-election rules: a holder renews every
:data:`RETRY_PERIOD` seconds, a candidate takes the Lease over only after it has seen the same
record for a whole ``leaseDurationSeconds`` (its own clock, so clock skew between nodes does not
matter) or after the holder released it (on a graceful stop), and every write carries the
resourceVersion it read, so two candidates cannot both win.
"""

from __future__ import annotations

import logging
import os
import re
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Protocol

import kubernetes.client
import orjson
import urllib3

from .kube import json_body

log = logging.getLogger("poolkeeper.leases")

AUDIT_LEASE = "poolkeeper-audit"
RECORD_PREFIX = "poolkeeper-replica-"
RECORD_LABEL = "poolkeeper.io/record"  # = "replica" on every replica record
DIGEST_ANNOTATION = "poolkeeper.io/rules-digest"
LOADED_ANNOTATION = "poolkeeper.io/rules-loaded-at"
POD_ANNOTATION = "poolkeeper.io/pod"
PID_ANNOTATION = "poolkeeper.io/pid"
VERSION_ANNOTATION = "poolkeeper.io/version"

# client-go's defaults (leaderelection.LeaderElectionConfig): a holder that has not renewed for
# LEASE_DURATION loses the Lease; it stops acting as leader after RENEW_DEADLINE without a renewal;
# candidates and the holder try every RETRY_PERIOD.
LEASE_DURATION = 15.0
RENEW_DEADLINE = 10.0
RETRY_PERIOD = 2.0
# Replica records: renewed this often, expired after RECORD_DURATION; the auditor deletes records
# expired for longer than RECORD_GRACE (processes that died without deleting their own).
RECORD_HEARTBEAT = 20.0
RECORD_DURATION = 60.0
RECORD_GRACE = 600.0

POD_NAME_ENV = "POD_NAME"
POD_NAMESPACE_ENV = "POD_NAMESPACE"
SERVICE_NAMESPACE_FILE = "/var/run/secrets/kubernetes.io/serviceaccount/namespace"
DEFAULT_NAMESPACE = "poolkeeper-system"

_TIMEOUT = (2.0, 5.0)  # (connect, read) seconds of every Lease request
API_ERRORS = (kubernetes.client.ApiException, urllib3.exceptions.HTTPError, OSError, ValueError)


def pod_name() -> str:
    """This pod's name (``POD_NAME``, from the downward API), else the host name."""
    return os.environ.get(POD_NAME_ENV) or socket.gethostname()


def pod_namespace() -> str:
    """Where poolkeeper's Leases live: ``POD_NAMESPACE``, else the service account's namespace,
    else poolkeeper-system."""
    if os.environ.get(POD_NAMESPACE_ENV):
        return os.environ[POD_NAMESPACE_ENV]
    try:
        with open(SERVICE_NAMESPACE_FILE, encoding="utf-8") as f:
            return f.read().strip() or DEFAULT_NAMESPACE
    except OSError:
        return DEFAULT_NAMESPACE


def record_name(pod: str, pid: int) -> str:
    """The replica record's name: a DNS subdomain (lowercase, at most 253 characters)."""
    safe = re.sub(r"[^a-z0-9.-]+", "-", pod.lower()).strip("-.") or "pod"
    return f"{RECORD_PREFIX}{safe[:200]}-{pid}"


def micro_time(unix: float) -> str:
    """metav1.MicroTime as the API server writes it (RFC 3339, microseconds, UTC)."""
    return datetime.fromtimestamp(unix, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def parse_time(value: Any) -> float | None:
    """Unix time of an RFC 3339 timestamp; None when absent or unreadable."""
    if not isinstance(value, str) or not value:
        return None
    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


def describe_error(e: BaseException) -> str:
    if isinstance(e, kubernetes.client.ApiException):
        reason = e.reason or ""
        try:
            message = orjson.loads(e.body or b"{}").get("message") or ""
        except (orjson.JSONDecodeError, AttributeError):
            message = ""
        return f"HTTP {e.status} {reason}: {message}".rstrip(": ")
    return " ".join(str(e).split()) or type(e).__name__


class LeaseApi:
    """The few Lease calls poolkeeper makes, on plain JSON (no generated models: MicroTime
    values are written exactly as the API server expects them)."""

    def __init__(self, api_client: kubernetes.client.ApiClient) -> None:
        # Any: with _preload_content=False the calls return raw urllib3 responses and take dicts.
        self._api: Any = kubernetes.client.CoordinationV1Api(api_client)

    def get(self, namespace: str, name: str) -> dict | None:
        try:
            return json_body(self._api.read_namespaced_lease(
                name, namespace, _preload_content=False, _request_timeout=_TIMEOUT))
        except kubernetes.client.ApiException as e:
            if e.status == 404:
                return None
            raise

    def create(self, namespace: str, body: dict) -> dict:
        return json_body(self._api.create_namespaced_lease(
            namespace, body, _preload_content=False, _request_timeout=_TIMEOUT))

    def replace(self, namespace: str, body: dict) -> dict:
        return json_body(self._api.replace_namespaced_lease(
            body["metadata"]["name"], namespace, body, _preload_content=False,
            _request_timeout=_TIMEOUT))

    def delete(self, namespace: str, name: str, resource_version: str | None = None) -> None:
        options = {"preconditions": {"resourceVersion": resource_version}} \
            if resource_version else None
        try:
            self._api.delete_namespaced_lease(name, namespace, body=options,
                                              _preload_content=False,
                                              _request_timeout=_TIMEOUT).release_conn()
        except kubernetes.client.ApiException as e:
            if e.status not in (404, 409):  # gone already, or renewed since we read it
                raise

    def list(self, namespace: str, label_selector: str) -> list[dict]:
        items: list[dict] = []
        token = None
        while True:
            body = json_body(self._api.list_namespaced_lease(
                namespace, label_selector=label_selector, limit=500, _continue=token,
                _preload_content=False, _request_timeout=_TIMEOUT))
            items.extend(body.get("items") or ())
            token = (body.get("metadata") or {}).get("continue") or None
            if token is None:
                return items


def _lease(namespace: str, name: str, spec: dict, *, resource_version: str | None = None,
           labels: dict[str, str] | None = None,
           annotations: dict[str, str] | None = None) -> dict:
    metadata: dict[str, Any] = {"name": name, "namespace": namespace,
                                "labels": {"app.kubernetes.io/name": "poolkeeper",
                                           **(labels or {})}}
    if resource_version:
        metadata["resourceVersion"] = resource_version
    if annotations:
        metadata["annotations"] = annotations
    return {"apiVersion": "coordination.k8s.io/v1", "kind": "Lease", "metadata": metadata,
            "spec": spec}


class LeaseElector:
    """Leader election on one Lease, as client-go's leaderelection package does it.

    ``try_acquire_or_renew()`` is called every RETRY_PERIOD by one thread; ``is_leader()`` may
    be read from any thread: true while the last successful renewal is younger than
    RENEW_DEADLINE, so a holder that cannot reach the API server stops acting as leader before
    a candidate may take over (LEASE_DURATION after its last renewal).
    """

    def __init__(self, api: LeaseApi, namespace: str, name: str, identity: str, *,
                 lease_duration: float = LEASE_DURATION, renew_deadline: float = RENEW_DEADLINE,
                 clock: Callable[[], float] = time.monotonic,
                 wall: Callable[[], float] = time.time) -> None:
        self.api, self.namespace, self.name, self.identity = api, namespace, name, identity
        self.lease_duration = lease_duration
        self.renew_deadline = renew_deadline
        self._clock, self._wall = clock, wall
        self._observed: tuple[Any, ...] | None = None  # (holder, renewTime, resourceVersion)
        self._observed_at = 0.0  # clock time the observed record last changed
        self._renewed_at: float | None = None  # clock time of our last successful write
        self.holder = ""  # the holder last seen

    def is_leader(self) -> bool:
        renewed = self._renewed_at
        return renewed is not None and self._clock() - renewed < self.renew_deadline

    def try_acquire_or_renew(self) -> bool:
        """One round; True when this process holds the Lease afterwards. API errors raise."""
        now = self._wall()
        lease = self.api.get(self.namespace, self.name)
        if lease is None:
            spec = self._spec(now, acquired=now, transitions=0)
            try:
                self._accept(self.api.create(self.namespace,
                                             _lease(self.namespace, self.name, spec)))
            except kubernetes.client.ApiException as e:
                if e.status == 409:  # another candidate created it first
                    self._renewed_at = None
                    return False
                raise
            log.info("became the holder of Lease %s/%s (created it)", self.namespace, self.name)
            return True
        spec = lease.get("spec") or {}
        metadata = lease.get("metadata") or {}
        holder = spec.get("holderIdentity") or ""
        observed = (holder, spec.get("renewTime"), metadata.get("resourceVersion"))
        if observed != self._observed:
            self._observed, self._observed_at = observed, self._clock()
        self.holder = holder
        duration = spec.get("leaseDurationSeconds") or self.lease_duration
        if holder and holder != self.identity and \
                self._clock() - self._observed_at < duration:
            self._renewed_at = None
            return False
        ours = holder == self.identity
        transitions = spec.get("leaseTransitions") or 0
        acquired = (parse_time(spec.get("acquireTime")) or now) if ours else now
        new_spec = self._spec(now, acquired=acquired,
                              transitions=transitions if ours else transitions + 1)
        body = _lease(self.namespace, self.name, new_spec,
                      resource_version=metadata.get("resourceVersion"),
                      labels=metadata.get("labels"), annotations=metadata.get("annotations"))
        try:
            self._accept(self.api.replace(self.namespace, body))
        except kubernetes.client.ApiException as e:
            if e.status == 409:  # someone else wrote it since we read it
                self._renewed_at = None
                return False
            raise
        if not ours:
            log.info("became the holder of Lease %s/%s (was %s)", self.namespace, self.name,
                     holder or "released")
        return True

    def release(self) -> None:
        """Give the Lease up at once (a graceful stop), so a candidate need not wait it out."""
        if self._renewed_at is None:
            return
        self._renewed_at = None
        lease = self.api.get(self.namespace, self.name)
        if lease is None or (lease.get("spec") or {}).get("holderIdentity") != self.identity:
            return
        metadata = lease.get("metadata") or {}
        now = self._wall()
        spec = {"leaseDurationSeconds": 1, "acquireTime": micro_time(now),
                "renewTime": micro_time(now),
                "leaseTransitions": (lease.get("spec") or {}).get("leaseTransitions") or 0}
        try:
            self.api.replace(self.namespace, _lease(
                self.namespace, self.name, spec, resource_version=metadata.get("resourceVersion"),
                labels=metadata.get("labels"), annotations=metadata.get("annotations")))
        except kubernetes.client.ApiException as e:
            if e.status != 409:
                raise
        log.info("released Lease %s/%s", self.namespace, self.name)

    def _spec(self, now: float, *, acquired: float, transitions: int) -> dict:
        return {"holderIdentity": self.identity,
                "leaseDurationSeconds": int(self.lease_duration),
                "acquireTime": micro_time(acquired), "renewTime": micro_time(now),
                "leaseTransitions": transitions}

    def _accept(self, written: dict) -> None:
        spec = written.get("spec") or {}
        self._observed = (spec.get("holderIdentity"), spec.get("renewTime"),
                          (written.get("metadata") or {}).get("resourceVersion"))
        self._observed_at = self._renewed_at = self._clock()
        self.holder = self.identity


class RulesInForce(Protocol):
    """What a replica record reports: app.rules.RuleStore."""

    @property
    def digest(self) -> str: ...

    @property
    def loaded_at(self) -> float: ...


class ReplicaRecord:
    """This process's replica record: which rule set it enforces, since when."""

    def __init__(self, api: LeaseApi, namespace: str, pod: str, pid: int, rules: RulesInForce,
                 *, version: str = "", duration: float = RECORD_DURATION,
                 wall: Callable[[], float] = time.time) -> None:
        self.api, self.namespace, self.pod, self.pid = api, namespace, pod, pid
        self.rules = rules
        self.version = version
        self.duration = duration
        self.name = record_name(pod, pid)
        self.identity = f"{pod}_{pid}"
        self._wall = wall
        self._resource_version: str | None = None
        self.published_digest: str | None = None

    def publish(self) -> None:
        """Create or renew the record with the digest in force now. API errors raise."""
        digest, loaded_at = self.rules.digest, self.rules.loaded_at
        now = self._wall()
        spec = {"holderIdentity": self.identity, "leaseDurationSeconds": int(self.duration),
                "renewTime": micro_time(now)}
        annotations = {DIGEST_ANNOTATION: digest, LOADED_ANNOTATION: micro_time(loaded_at),
                       POD_ANNOTATION: self.pod, PID_ANNOTATION: str(self.pid),
                       VERSION_ANNOTATION: self.version}
        labels = {RECORD_LABEL: "replica"}
        for _ in range(2):
            if self._resource_version is None:
                current = self.api.get(self.namespace, self.name)
                if current is None:
                    written = self.api.create(self.namespace, _lease(
                        self.namespace, self.name, {**spec, "acquireTime": micro_time(now)},
                        labels=labels, annotations=annotations))
                    break
                self._resource_version = (current.get("metadata") or {}).get("resourceVersion")
            try:
                written = self.api.replace(self.namespace, _lease(
                    self.namespace, self.name, spec, resource_version=self._resource_version,
                    labels=labels, annotations=annotations))
                break
            except kubernetes.client.ApiException as e:
                if e.status not in (404, 409):
                    raise
                self._resource_version = None  # deleted or changed under us: read it again
        else:
            raise RuntimeError(f"Lease {self.name} keeps changing under this process")
        self._resource_version = (written.get("metadata") or {}).get("resourceVersion")
        if self.published_digest != digest:
            log.info("replica record %s/%s: rules digest %s", self.namespace, self.name,
                     digest[:12])
        self.published_digest = digest

    def delete(self) -> None:
        self.api.delete(self.namespace, self.name)
        self._resource_version = None


@dataclass(frozen=True)
class Replica:
    """A replica record as ``poolkeeper status`` reads it."""

    pod: str
    pid: str
    digest: str
    loaded_at: float | None
    renewed_at: float | None
    duration: float
    version: str
    name: str

    def live(self, now: float) -> bool:
        return self.renewed_at is not None and now - self.renewed_at <= self.duration


def replica_from(lease: dict) -> Replica:
    metadata = lease.get("metadata") or {}
    annotations = metadata.get("annotations") or {}
    spec = lease.get("spec") or {}
    return Replica(pod=annotations.get(POD_ANNOTATION, ""),
                   pid=annotations.get(PID_ANNOTATION, ""),
                   digest=annotations.get(DIGEST_ANNOTATION, ""),
                   loaded_at=parse_time(annotations.get(LOADED_ANNOTATION)),
                   renewed_at=parse_time(spec.get("renewTime")),
                   duration=float(spec.get("leaseDurationSeconds") or RECORD_DURATION),
                   version=annotations.get(VERSION_ANNOTATION, ""),
                   name=metadata.get("name", ""))


def list_replicas(api: LeaseApi, namespace: str) -> list[Replica]:
    return sorted((replica_from(lease) for lease in api.list(namespace, f"{RECORD_LABEL}=replica")),
                  key=lambda r: (r.pod, r.pid))


def delete_expired_records(api: LeaseApi, namespace: str, now: float,
                           grace: float = RECORD_GRACE) -> int:
    """Delete replica records expired for longer than ``grace`` (their process died without
    deleting its own); returns how many."""
    deleted = 0
    for lease in api.list(namespace, f"{RECORD_LABEL}=replica"):
        replica = replica_from(lease)
        if replica.renewed_at is not None and now - replica.renewed_at > replica.duration + grace:
            api.delete(namespace, replica.name,
                       (lease.get("metadata") or {}).get("resourceVersion"))
            deleted += 1
    return deleted


class ReplicaPresence:
    """One thread per process: keeps the replica record current and, with an elector,
    campaigns for the audit Lease every RETRY_PERIOD. ``stop()`` releases the Lease and deletes
    the record (a graceful stop; a killed process's record expires instead)."""

    def __init__(self, api_client: kubernetes.client.ApiClient, rules: RulesInForce, *,
                 audit: bool, version: str = "", namespace: str | None = None,
                 pod: str | None = None, heartbeat: float = RECORD_HEARTBEAT,
                 retry_period: float = RETRY_PERIOD) -> None:
        self.api = LeaseApi(api_client)
        self.rules = rules
        self.audit = audit
        self.version = version
        self.namespace = namespace
        self.pod = pod
        self.heartbeat = heartbeat
        self.retry_period = retry_period
        self.record: ReplicaRecord | None = None
        self.elector: LeaseElector | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def start(self) -> None:
        """Start the thread (idempotent); the identity is taken here, in the serving process."""
        with self._lock:
            if self._thread is not None and self._thread.is_alive():
                return
            namespace = self.namespace or pod_namespace()
            pod, pid = self.pod or pod_name(), os.getpid()
            self.record = ReplicaRecord(self.api, namespace, pod, pid, self.rules,
                                        version=self.version)
            if self.audit:
                self.elector = LeaseElector(self.api, namespace, AUDIT_LEASE, f"{pod}_{pid}")
            self._stop.clear()
            self._thread = threading.Thread(target=self._run, name="poolkeeper-leases",
                                            daemon=True)
            self._thread.start()

    def is_auditor(self) -> bool:
        elector = self.elector
        return elector is not None and elector.is_leader()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        thread = self._thread
        if thread is not None:
            thread.join(timeout)
        self._thread = None
        try:
            if self.elector is not None:
                self.elector.release()
            if self.record is not None and self.record.published_digest is not None:
                self.record.delete()
        except API_ERRORS as e:
            log.warning("could not release poolkeeper's Leases on stop: %s", describe_error(e))

    def _run(self) -> None:
        record, elector = self.record, self.elector
        assert record is not None
        next_record = next_campaign = 0.0
        attempted: str | None = None  # the digest last sent (or tried)
        failing: set[str] = set()
        while not self._stop.is_set():
            now = time.monotonic()
            if now >= next_record or self.rules.digest != attempted:
                attempted = self.rules.digest
                ok = self._attempt("replica record", record.publish, failing)
                next_record = now + (self.heartbeat if ok else 2 * self.retry_period)
            if elector is not None and now >= next_campaign:
                next_campaign = now + self.retry_period
                self._attempt("audit Lease", elector.try_acquire_or_renew, failing)
            self._stop.wait(min(1.0, self.retry_period))  # a rules change is published at once

    @staticmethod
    def _attempt(what: str, call: Callable[[], object], failing: set[str]) -> bool:
        try:
            call()
        except API_ERRORS as e:
            # once per run of failures at WARNING, then at DEBUG
            level = logging.DEBUG if what in failing else logging.WARNING
            failing.add(what)
            log.log(level, "%s: %s", what, describe_error(e))
            return False
        except Exception:  # a bug: keep the thread alive
            log.exception("%s: unexpected error", what)
            return False
        if what in failing:
            failing.discard(what)
            log.info("%s: the API server answers again", what)
        return True
