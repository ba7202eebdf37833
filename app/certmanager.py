"""Owns poolkeeper's own certificates in a cluster (``serve --manage-certs``): the CA and serving
pair in a Secret, the caBundle of every webhook of the MutatingWebhookConfiguration, and the
pair this pod serves from its certificate directory.

The Secret (``--cert-secret``, type kubernetes.io/tls) is the single source of truth:

=============================  ===============================================================
``tls.crt``, ``tls.key``       the serving pair (SANs: ``--service`` in the Secret's namespace)
``ca.crt``                     the CA that signed it (app/certs.py: a new CA per pair, its key
                               is never kept)
``ca-previous.crt``            CAs the webhooks still trust during an overlap (PEM, several)
annotation                     ``poolkeeper.io/previous-ca-until``: RFC 3339 time when those
                               are dropped
=============================  ===============================================================

and every webhook's ``clientConfig.caBundle`` is ``ca.crt`` followed by ``ca-previous.crt``: a
function of the Secret alone, so every replica computes the same bundle.

Every replica runs one manager (one process per pod, see app/server/sidecar.py). Whenever its
watch of the Secret or of the webhook configuration reports a change, and at the times the
Secret names (a renewal, the end of an overlap), it reconciles:

1. :func:`plan` says how the Secret must change, if at all: created when absent; renewed (a new
   CA and pair, the old CA moved to ``ca-previous.crt`` until ``now + --cert-overlap``) once the
   pair is two thirds through its lifetime or unusable; the CA this pod still serves added to
   ``ca-previous.crt`` when someone else replaced the pair; ``ca-previous.crt`` dropped after
   the overlap. Writes carry the resourceVersion read: a 409 means another replica got there
   first, and the manager reads again (usually nothing is left to do).
2. Every webhook whose caBundle differs from :func:`ca_bundle` gets it (a strategic-merge patch
   by webhook name, with the resourceVersion read), whoever emptied or changed it, for whatever
   webhooks the configuration holds.
3. The pod serves the Secret's pair (writes it into ``--cert-dir``, which app/server/tls.py
   reloads within a second) only once every webhook has trusted its CA for :data:`SETTLE`
   seconds, so the API servers, which pick the new bundle up from their own watches, never meet
   a certificate they do not trust yet. Without a webhook configuration nobody calls the pod, and
   the pair is served at once.

A renewal therefore goes: Secret {new pair, previous: old CA} -> caBundle old+new -> each pod
serves the new pair -> after the overlap, Secret {new pair} -> caBundle new. Pods are admitted
throughout.

:func:`plan`, :func:`ca_bundle`, :func:`bundle_patch` and :func:`trusted` are pure (no cluster);
:class:`CertManager` does the API calls through the raw JSON API of a kubernetes ApiClient
(objects are kept as the API server sent them, so no field is lost on update).
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import logging
import os
import random
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import kubernetes.client
import orjson
import urllib3
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from . import certs, metrics
from .config import Settings

log = logging.getLogger("poolkeeper.certs")

PREVIOUS_KEY = "ca-previous.crt"
UNTIL_ANNOTATION = "poolkeeper.io/previous-ca-until"
RENEW_AT = 2 / 3  # of a pair's lifetime
SETTLE = 5.0  # seconds every webhook trusts a CA before this pod serves a pair it signed
MAX_PREVIOUS = 4  # CAs kept in ca-previous.crt (each rotation during an overlap adds one)
RESYNC = 300.0  # seconds between reconciles when nothing happens (the watches are the trigger)
FIELD_MANAGER = "poolkeeper"
REQUEST_TIMEOUT = (5.0, 15.0)  # (connect, read) seconds of a GET or a write
WATCH_TIMEOUT = 300  # seconds a watch runs before it is renewed
LABELS = {"app.kubernetes.io/name": "poolkeeper"}

_API_ERRORS = (kubernetes.client.ApiException, urllib3.exceptions.HTTPError, OSError)


class CertManagerError(Exception):
    """The manager could not get a pair to serve; the message says why."""


# -- pure: the Secret's pair, what to change, the bundle -------------------------------------------


@dataclass(frozen=True)
class Pair:
    """What the Secret holds (PEM bytes; empty when a key is missing)."""

    ca: bytes
    cert: bytes
    key: bytes
    previous: tuple[bytes, ...] = ()  # each one CA certificate
    previous_until: dt.datetime | None = None


@dataclass(frozen=True)
class Change:
    """How the Secret must change: its new content, what kind of change (an action of
    metrics.CERTIFICATE_ACTIONS), and why (for the log)."""

    pair: Pair
    action: str
    reason: str


def parse_secret(secret: Mapping[str, Any]) -> Pair:
    """The pair in a Secret as the API server returns it (``data`` base64); what does not decode
    is left empty, for :func:`plan` to judge."""
    data = secret.get("data") or {}
    annotations = (secret.get("metadata") or {}).get("annotations") or {}

    def value(key: str) -> bytes:
        try:
            return base64.b64decode(data.get(key) or "", validate=True)
        except (ValueError, TypeError):
            return b""

    previous = tuple(split_certificates(value(PREVIOUS_KEY)))
    until = None
    try:
        until = dt.datetime.fromisoformat(annotations.get(UNTIL_ANNOTATION) or "")
    except ValueError:
        pass
    if until is not None and until.tzinfo is None:
        until = until.replace(tzinfo=dt.UTC)
    return Pair(value(certs.CA_FILE), value(certs.CERT_FILE), value(certs.KEY_FILE), previous,
                until)


def split_certificates(pem: bytes) -> list[bytes]:
    """Each certificate in a PEM bundle, re-encoded (what does not parse is left out)."""
    result = []
    marker = b"-----BEGIN CERTIFICATE-----"
    for chunk in pem.split(marker)[1:]:
        try:
            cert = x509.load_pem_x509_certificate(marker + chunk)
        except ValueError:
            continue
        result.append(cert.public_bytes(serialization.Encoding.PEM))
    return result


def fingerprint(pem: bytes) -> str:
    """SHA-256 of the (first) certificate's DER, or of the bytes if it does not parse."""
    try:
        der = x509.load_pem_x509_certificate(pem).public_bytes(serialization.Encoding.DER)
    except ValueError:
        der = pem
    return hashlib.sha256(der).hexdigest()


def renewal_time(cert_pem: bytes) -> dt.datetime:
    """When a pair is due for renewal: two thirds through the certificate's lifetime."""
    cert = x509.load_pem_x509_certificate(cert_pem)
    start, end = cert.not_valid_before_utc, cert.not_valid_after_utc
    return start + (end - start) * RENEW_AT


def _valid_ca(pem: bytes | None, now: dt.datetime) -> bool:
    if not pem:
        return False
    try:
        cert = x509.load_pem_x509_certificate(pem)
    except ValueError:
        return False
    return cert.not_valid_after_utc > now


def _unique(pems: Iterable[bytes]) -> tuple[bytes, ...]:
    seen, result = set(), []
    for pem in pems:
        fp = fingerprint(pem)
        if fp not in seen:
            seen.add(fp)
            result.append(pem)
    return tuple(result)


def plan(pair: Pair | None, *, now: dt.datetime, served_ca: bytes | None, service: str,
         namespace: str, days: int, overlap: dt.timedelta,
         issue: Callable[..., tuple[bytes, bytes, bytes, dt.datetime]] = certs.issue_pair,
         ) -> Change | None:
    """How the Secret must change at ``now``, or None. ``pair`` is the Secret's (None: there is
    no Secret); ``served_ca`` the CA of the pair this pod serves (None: none yet)."""
    served = served_ca if _valid_ca(served_ca, now) else None
    if pair is None:  # never created, or deleted (pods may still serve its pair)
        ca, cert, key, _ = issue(service, namespace, days, now)
        kept = (served,) if served is not None else ()
        return Change(Pair(ca, cert, key, kept, now + overlap if kept else None), "created",
                      "the Secret did not exist: created it with a new CA and serving pair")
    live = pair.previous if pair.previous_until is not None and now < pair.previous_until else ()
    try:
        certs.check_pair(pair.ca, pair.cert, pair.key, service, namespace, now=now,
                         renewal_window=False)
    except certs.CertificateError as e:
        problem: str | None = f"its pair is unusable ({e})"
    else:
        due = renewal_time(pair.cert)
        problem = (f"its pair is two thirds through its lifetime (since {due:%Y-%m-%d %H:%M} "
                   "UTC)") if now >= due else None
    if problem is not None:
        ca, cert, key, _ = issue(service, namespace, days, now)
        trusted = [p for p in (pair.ca, *live, served or b"") if _valid_ca(p, now)]
        previous = tuple(p for p in _unique(trusted) if fingerprint(p) != fingerprint(ca))
        return Change(Pair(ca, cert, key, previous[:MAX_PREVIOUS],
                           now + overlap if previous else None), "renewed",
                      f"renewed the CA and serving pair: {problem}")
    known = {fingerprint(p) for p in (pair.ca, *live)}
    if served is not None and fingerprint(served) not in known:
        previous = _unique((*live, served))[-MAX_PREVIOUS:]
        return Change(Pair(pair.ca, pair.cert, pair.key, previous, now + overlap), "replaced",
                      "the Secret's pair was replaced: the webhooks trust the CA this pod still "
                      "serves until the overlap ends")
    if (pair.previous or pair.previous_until is not None) and not live:
        return Change(Pair(pair.ca, pair.cert, pair.key), "overlap_ended",
                      "the overlap ended: the webhooks trust only the current CA")
    return None


def next_deadline(pair: Pair, now: dt.datetime) -> dt.datetime | None:
    """The next time :func:`plan` may decide differently without any change to the Secret."""
    times = []
    if pair.previous_until is not None:
        times.append(pair.previous_until)
    try:
        times.append(renewal_time(pair.cert))
    except ValueError:
        pass
    later = [t for t in times if t > now]
    return min(later) if later else None


def ca_bundle(pair: Pair) -> str:
    """Every webhook's caBundle: the CA, then the previous ones (base64 of the PEMs)."""
    pems = [pair.ca, *pair.previous]
    return base64.b64encode(b"".join(p if p.endswith(b"\n") else p + b"\n"
                                     for p in pems if p)).decode("ascii")


def bundle_patch(configuration: Mapping[str, Any], bundle: str) -> dict[str, Any] | None:
    """A strategic-merge patch giving every webhook (merged by name) ``bundle``, conditional on
    the configuration's resourceVersion; None when every webhook has it already."""
    stale = [w.get("name") for w in configuration.get("webhooks") or ()
             if (w.get("clientConfig") or {}).get("caBundle") != bundle]
    if not stale:
        return None
    return {"metadata": {"resourceVersion": (configuration.get("metadata") or {})
                         .get("resourceVersion")},
            "webhooks": [{"name": name, "clientConfig": {"caBundle": bundle}} for name in stale]}


def trusted(configuration: Mapping[str, Any]) -> set[str]:
    """Fingerprints of the CAs that every webhook of the configuration trusts."""
    result: set[str] | None = None
    for webhook in configuration.get("webhooks") or ():
        encoded = (webhook.get("clientConfig") or {}).get("caBundle") or ""
        try:
            pems = split_certificates(base64.b64decode(encoded, validate=True))
        except (ValueError, TypeError):
            pems = []
        fps = {fingerprint(p) for p in pems}
        result = fps if result is None else result & fps
    return result or set()


def secret_body(current: Mapping[str, Any] | None, pair: Pair, namespace: str,
                name: str) -> dict[str, Any]:
    """The Secret to create (``current`` None) or to update from ``current`` (its labels,
    other annotations and type kept; its resourceVersion makes the update conditional)."""
    data = {certs.CA_FILE: pair.ca, certs.CERT_FILE: pair.cert, certs.KEY_FILE: pair.key}
    if pair.previous:
        data[PREVIOUS_KEY] = b"".join(pair.previous)
    encoded = {k: base64.b64encode(v).decode("ascii") for k, v in data.items()}
    if current is None:
        metadata: dict[str, Any] = {"name": name, "namespace": namespace, "labels": dict(LABELS)}
        body: dict[str, Any] = {"apiVersion": "v1", "kind": "Secret",
                                "type": "kubernetes.io/tls", "metadata": metadata}
    else:
        body = {k: v for k, v in current.items() if k != "data"}
        metadata = {k: v for k, v in (current.get("metadata") or {}).items()
                    if k != "managedFields"}
        body["metadata"] = metadata
    annotations = {k: v for k, v in (metadata.get("annotations") or {}).items()
                   if k != UNTIL_ANNOTATION}
    if pair.previous_until is not None:
        annotations[UNTIL_ANNOTATION] = pair.previous_until.astimezone(dt.UTC).isoformat(
            timespec="seconds")
    if annotations:
        metadata["annotations"] = annotations
    else:
        metadata.pop("annotations", None)
    body["data"] = encoded
    return body


# -- runtime: the API calls and the loop -----------------------------------------------------------


def _utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _describe(error: BaseException) -> str:
    if isinstance(error, kubernetes.client.ApiException):
        try:
            message = orjson.loads(error.body or b"{}").get("message")
        except (orjson.JSONDecodeError, AttributeError):
            message = None
        return f"HTTP {error.status}: {message or error.reason}"
    return f"{type(error).__name__}: {error}"


class _Expired(Exception):
    """A watch's resourceVersion is too old (410): list again."""


class CertManager:
    """Keeps the Secret, every webhook's caBundle and this pod's pair current (module docstring).

    ``bootstrap()`` runs before the server starts, until there is a pair to serve; ``run()``
    watches and reconciles until ``stop()``. ``now`` (UTC, aware) and ``clock`` (monotonic) are
    replaced in tests.
    """

    def __init__(self, api_client: kubernetes.client.ApiClient, settings: Settings, *,
                 settle: float = SETTLE, now: Callable[[], dt.datetime] = _utcnow,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.api = api_client
        self.settings = settings
        self.namespace, self.name = settings.secret_namespace, settings.secret_name
        self.configuration_name = settings.webhook_configuration
        self.cert_dir = settings.cert_dir
        self.settle = settle
        self._now, self._clock = now, clock
        self._lock = threading.Lock()
        self._secret: dict[str, Any] | None = None
        self._secret_seen = False
        self._configuration: dict[str, Any] | None = None
        self._configuration_seen = False
        self._trusted_since: dict[str, float] = {}  # CA fingerprint -> clock time
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._responses: list[Any] = []  # open watch streams, closed by stop()
        self.reconciles = 0

    # -- paths -------------------------------------------------------------------------------------

    @property
    def _secret_path(self) -> str:
        return f"/api/v1/namespaces/{quote(self.namespace)}/secrets"

    _configuration_path = "/apis/admissionregistration.k8s.io/v1/mutatingwebhookconfigurations"

    # -- what was seen -----------------------------------------------------------------------------

    def observe_secret(self, secret: dict[str, Any] | None) -> None:
        with self._lock:
            self._secret_seen = True
            self._secret = secret
        self._wake.set()

    def observe_configuration(self, configuration: dict[str, Any] | None) -> None:
        now = self._clock()
        with self._lock:
            first = not self._configuration_seen
            self._configuration_seen = True
            self._configuration = configuration
            fps = trusted(configuration) if configuration is not None else set()
            # A CA trusted when first seen was trusted before this process started.
            self._trusted_since = {fp: self._trusted_since.get(fp, float("-inf") if first
                                                                 else now) for fp in fps}
        self._wake.set()

    # -- one pass ----------------------------------------------------------------------------------

    def reconcile(self) -> float:
        """Bring the Secret, the caBundle and this pod's files one step closer to what they
        should be; returns how many seconds may pass before the next pass is needed."""
        self.reconciles += 1
        with self._lock:
            if not self._secret_seen:
                return RESYNC  # its watch has not listed it yet: the listing wakes us
            secret, configuration = self._secret, self._configuration
        now = self._now()
        pair = parse_secret(secret) if secret is not None else None
        change = plan(pair, now=now, served_ca=self._served()[0], service=self.settings.service,
                      namespace=self.namespace, days=self.settings.cert_days,
                      overlap=dt.timedelta(seconds=self.settings.cert_overlap))
        if change is not None:
            written = self._write_secret(secret, change)
            if written is None:
                return 0.0  # another replica wrote first: judge what it wrote
            pair = change.pair
        assert pair is not None
        if configuration is not None:
            patch = bundle_patch(configuration, ca_bundle(pair))
            if patch is not None and not self._patch_configuration(patch):
                return 0.0
        wait = self._serve(pair)
        deadline = next_deadline(pair, now)
        if deadline is not None:
            wait = min(wait, (deadline - now).total_seconds())
        return max(0.0, wait)

    def _served(self) -> tuple[bytes | None, bytes | None, bytes | None]:
        """(ca.crt, tls.crt, tls.key) of this pod's certificate directory (None: missing)."""
        result: list[bytes | None] = []
        for name in (certs.CA_FILE, certs.CERT_FILE, certs.KEY_FILE):
            try:
                with open(os.path.join(self.cert_dir, name), "rb") as f:
                    result.append(f.read())
            except OSError:
                result.append(None)
        return result[0], result[1], result[2]

    def _serve(self, pair: Pair) -> float:
        """Write the Secret's pair into the certificate directory once its CA is trusted; the
        seconds until then (RESYNC when there is nothing to wait for)."""
        _, cert, key = self._served()
        if (cert, key) == (pair.cert, pair.key):
            return RESYNC
        with self._lock:
            unconfigured = self._configuration_seen and self._configuration is None
            since = self._trusted_since.get(fingerprint(pair.ca))
        if not unconfigured:
            if since is None:
                return RESYNC  # the patch's watch event brings us back
            remaining = since + self.settle - self._clock()
            if remaining > 0:
                return remaining
        certs.write_pair(self.cert_dir, pair.ca, pair.cert, pair.key)
        metrics.CERTIFICATE_ACTIONS.labels("served").inc()
        log.info("serving the pair of Secret %s/%s (CA %s, valid until %s) from %s",
                 self.namespace, self.name, fingerprint(pair.ca)[:12],
                 f"{certs.parse_certificate(pair.cert).not_valid_after_utc:%Y-%m-%d %H:%M} UTC",
                 self.cert_dir)
        return RESYNC

    def _write_secret(self, current: dict[str, Any] | None,
                      change: Change) -> dict[str, Any] | None:
        """Create or update the Secret; None after a conflict (the Secret was read again)."""
        body = secret_body(current, change.pair, self.namespace, self.name)
        try:
            if current is None:
                written = self._call("POST", self._secret_path, body=body)
            else:
                written = self._call("PUT", f"{self._secret_path}/{quote(self.name)}", body=body)
        except kubernetes.client.ApiException as e:
            if e.status != 409:
                raise
            metrics.CERTIFICATE_ACTIONS.labels("conflict").inc()
            log.info("Secret %s/%s changed meanwhile (another replica?): reading it again",
                     self.namespace, self.name)
            self.observe_secret(self._get(f"{self._secret_path}/{quote(self.name)}"))
            return None
        metrics.CERTIFICATE_ACTIONS.labels(change.action).inc()
        log.info("Secret %s/%s: %s", self.namespace, self.name, change.reason)
        self.observe_secret(written)
        return written

    def _patch_configuration(self, patch: dict[str, Any]) -> bool:
        """Set the caBundle; False after a conflict or when the configuration is gone (read
        again)."""
        path = f"{self._configuration_path}/{quote(self.configuration_name)}"
        try:
            written = self._call("PATCH", path, body=patch,
                                 content_type="application/strategic-merge-patch+json")
        except kubernetes.client.ApiException as e:
            if e.status not in (404, 409):
                raise
            metrics.CERTIFICATE_ACTIONS.labels("conflict").inc()
            self.observe_configuration(self._get(path))
            return False
        metrics.CERTIFICATE_ACTIONS.labels("cabundle_set").inc()
        log.info("set the caBundle of webhooks %s of MutatingWebhookConfiguration %s",
                 ", ".join(w["name"] for w in patch["webhooks"]), self.configuration_name)
        self.observe_configuration(written)
        return True

    # -- start-up ----------------------------------------------------------------------------------

    def bootstrap(self, timeout: float) -> None:
        """Reconcile from fresh GETs until this pod has a pair to serve (the server cannot start
        TLS without one); raise CertManagerError after ``timeout`` seconds."""
        deadline = self._clock() + timeout
        failures = 0
        while True:
            try:
                self.observe_secret(self._get(f"{self._secret_path}/{quote(self.name)}"))
                self.observe_configuration(self._get(
                    f"{self._configuration_path}/{quote(self.configuration_name)}"))
                wait = self.reconcile()
                if self._served()[1] is not None:
                    return
                error = None
            except (*_API_ERRORS, certs.CertificateError) as e:
                failures += 1
                error = _describe(e)
                wait = min(4.0, 0.25 * 2 ** failures)
                log.warning("cannot get a serving pair from Secret %s/%s yet: %s", self.namespace,
                            self.name, error)
            left = deadline - self._clock()
            if left <= 0:
                raise CertManagerError(
                    f"no serving pair after {timeout:.0f}s: "
                    + (error or f"the caBundle of MutatingWebhookConfiguration "
                                f"{self.configuration_name} does not trust the Secret's CA"))
            time.sleep(min(wait, left, 1.0))

    # -- the loop ----------------------------------------------------------------------------------

    def run(self) -> None:
        """Watch the Secret and the webhook configuration and reconcile on every change, until
        stop()."""
        watches = [
            threading.Thread(target=self._watch_loop, name="poolkeeper-cert-secret-watch",
                             args=(self._secret_path, self.name, self.observe_secret),
                             daemon=True),
            threading.Thread(target=self._watch_loop, name="poolkeeper-cabundle-watch",
                             args=(self._configuration_path, self.configuration_name,
                                   self.observe_configuration), daemon=True)]
        for thread in watches:
            thread.start()
        failures = 0
        while not self._stop.is_set():
            self._wake.wait(RESYNC if failures == 0 else min(30.0, 0.5 * 2 ** failures))
            if self._stop.is_set():
                break
            self._wake.clear()
            try:
                wait = self.reconcile()
                failures = 0
            except (*_API_ERRORS, certs.CertificateError) as e:
                failures += 1
                log.warning("certificate manager: %s; retrying", _describe(e))
                continue
            except Exception:  # a bug: keep the thread alive, retry later
                failures += 1
                log.exception("certificate manager: unexpected error")
                continue
            if wait < RESYNC:
                self._schedule(wait)

    def _schedule(self, seconds: float) -> None:
        timer = threading.Timer(seconds + 0.05, self._wake.set)
        timer.daemon = True
        timer.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        with self._lock:
            responses = list(self._responses)
        for response in responses:
            try:
                response.shutdown()  # unblocks the watch thread's read
            except (ValueError, RuntimeError, OSError, AttributeError):
                pass  # already closed or released

    def _watch_loop(self, collection: str, name: str,
                    observe: Callable[[dict[str, Any] | None], None]) -> None:
        """List the one object ``name`` (a fieldSelector on metadata.name, which RBAC's
        resourceNames can restrict), then watch it; again after errors, with backoff."""
        failures = 0
        version: str | None = None
        while not self._stop.is_set():
            try:
                if version is None:
                    listing = self._call("GET", collection, query={
                        "fieldSelector": f"metadata.name={name}"})
                    items = listing.get("items") or []
                    observe(items[0] if items else None)
                    version = (listing.get("metadata") or {}).get("resourceVersion")
                started = self._clock()
                version = self._watch(collection, name, version, observe)
                failures = 0
                if self._clock() - started < 1.0:
                    self._stop.wait(1.0)  # a stream the server ends at once: not in a tight loop
            except _Expired:
                version = None
            except (*_API_ERRORS, ValueError) as e:
                if self._stop.is_set():
                    break
                failures += 1
                version = None
                delay = random.uniform(0.5, 1.0) * min(30.0, 0.5 * 2 ** failures)
                log.warning("watch of %s %s failed: %s; again in %.1fs", collection, name,
                            _describe(e), delay)
                self._stop.wait(delay)

    def _watch(self, collection: str, name: str, version: str | None,
               observe: Callable[[dict[str, Any] | None], None]) -> str | None:
        query = {"fieldSelector": f"metadata.name={name}", "watch": "true",
                 "allowWatchBookmarks": "true", "timeoutSeconds": str(WATCH_TIMEOUT)}
        if version:
            query["resourceVersion"] = version
        response = self._open(collection, query, (REQUEST_TIMEOUT[0], WATCH_TIMEOUT + 30))
        with self._lock:
            self._responses.append(response)
        try:
            for line in _lines(response.stream(65536, decode_content=True)):
                event = orjson.loads(line)
                kind, obj = event.get("type"), event.get("object") or {}
                if kind == "ERROR":
                    if obj.get("code") == 410:
                        raise _Expired()
                    raise ValueError(f"watch error {obj.get('code')}: {obj.get('message')}")
                version = (obj.get("metadata") or {}).get("resourceVersion") or version
                if kind in ("ADDED", "MODIFIED"):
                    observe(obj)
                elif kind == "DELETED":
                    observe(None)
        finally:
            with self._lock:
                self._responses.remove(response)
            response.close()
            response.release_conn()
        return version

    # -- HTTP --------------------------------------------------------------------------------------

    def _get(self, path: str) -> dict[str, Any] | None:
        try:
            return self._call("GET", path)
        except kubernetes.client.ApiException as e:
            if e.status == 404:
                return None
            raise

    def _call(self, method: str, path: str, *, body: Any = None,
              query: Mapping[str, str] | None = None,
              content_type: str = "application/json") -> dict[str, Any]:
        headers = {"Accept": "application/json", "Content-Type": content_type}
        params = [("fieldManager", FIELD_MANAGER)] if method in ("POST", "PUT", "PATCH") else []
        params += list((query or {}).items())
        request = self.api.param_serialize(method, path, query_params=params,
                                           header_params=headers, body=body,
                                           auth_settings=["BearerToken"])
        response = self.api.call_api(*request[:4], _request_timeout=REQUEST_TIMEOUT)
        data = response.read()
        if not 200 <= response.status < 300:
            raise kubernetes.client.ApiException(status=response.status, reason=response.reason,
                                                 body=data.decode("utf-8", "replace"))
        result: dict[str, Any] = orjson.loads(data)
        return result

    def _open(self, path: str, query: Mapping[str, str], timeout: tuple[float, float]) -> Any:
        request = self.api.param_serialize("GET", path, query_params=list(query.items()),
                                           header_params={"Accept": "application/json"},
                                           auth_settings=["BearerToken"])
        response = self.api.call_api(*request[:4], _request_timeout=timeout)
        if response.status == 410:
            response.read()
            raise _Expired()
        if not 200 <= response.status < 300:
            data = response.read()
            raise kubernetes.client.ApiException(status=response.status, reason=response.reason,
                                                 body=data.decode("utf-8", "replace"))
        return response.response  # the urllib3 response, streamed


def _lines(chunks: Iterable[bytes]) -> Iterator[bytes]:
    """Newline-delimited JSON from a watch stream."""
    buffer = b""
    for chunk in chunks:
        buffer += chunk
        *lines, buffer = buffer.split(b"\n")
        for line in lines:
            if line.strip():
                yield line
    if buffer.strip():
        yield buffer
