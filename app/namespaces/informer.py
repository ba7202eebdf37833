"""Owns the API server namespace source: a list+watch store (an informer), GETs, stale fallback.

:class:`KubeNamespaces` keeps three layers, consulted in this order:

1. the *store*, kept current by a list+watch thread (an informer, :mod:`app.listwatch`). While
   the watch is live a lookup never waits on the API server. After the watch breaks, or falls
   silent past its deadline, its entries are trusted like a GET result for ``cache_ttl`` seconds
   from the last proof of life;
2. a TTL cache (``cache_ttl``) of GET results, filled by one in-flight GET per namespace;
3. on API errors, the newest labels known (store, or last GET) if they were known current no more
   than ``max_stale`` seconds ago; otherwise :class:`NamespaceLookupError`.

The store is known current as of its last proof of life (a listing, a watch stream opened or
ended on time, an event or a BOOKMARK: see :mod:`app.listwatch`), and each watch stream lives at
most ``max_stale / 4`` seconds, so after a hang lookups fail once the last proof is ``max_stale``
old: between 3/4 of ``max_stale`` and ``max_stale`` (plus one GET's timeout) after the hang began.

A namespace is stored as its labels alone, or, when it has annotations the rules read
(:data:`~app.namespaces.source.KEPT_ANNOTATIONS`), as a :class:`Namespace` record: 100,000
namespaces cost no more than their labels.

What it does is counted in the Prometheus metrics (:mod:`app.metrics`); :meth:`KubeNamespaces.state`
reports only what is not a metric.
"""

from __future__ import annotations

import enum
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import cachetools
import kubernetes.client
import orjson

from app import metrics
from app.listwatch import API_ERRORS, ListWatch, describe_api_error

from .source import Labels, Namespace, NamespaceLookupError, kept_annotations

log = logging.getLogger("poolkeeper.namespaces")


class _Flight:
    """One GET in progress; callers asking for the same name wait for its outcome."""
    __slots__ = ("done", "namespace", "error")

    def __init__(self) -> None:
        self.done = threading.Event()
        self.namespace: Namespace | None = None
        self.error: NamespaceLookupError | None = None


class _Missing(enum.Enum):
    """Not in the TTL cache (``None`` there means: no such namespace)."""
    MISSING = enum.auto()


_MISSING = _Missing.MISSING

# What the store holds per namespace: its labels, or a record when it has kept annotations.
Stored = Labels | Namespace


class KubeNamespaces(ListWatch[Stored]):
    """Namespace labels from the API server: a watched store, a TTL cache of GETs, stale fallback.

    ``clock`` (monotonic seconds) drives the TTL cache and every staleness decision; sleeping and
    network timeouts use real time.
    """

    NOUN = "namespace"

    def __init__(self, api_client: kubernetes.client.ApiClient, *, cache_ttl: float = 30.0,
                 max_stale: float = 300.0, clock: Callable[[], float] = time.monotonic,
                 cache_size: int = 200_000, page_size: int = 500,
                 request_timeout: tuple[float, float] = (2.0, 5.0),
                 get_timeout: tuple[float, float] = (0.5, 1.25),
                 watch_timeout: int = 120, backoff_base: float = 0.25, backoff_cap: float = 4.0,
                 retry_interval: float = 1.0, owns_client: bool = False) -> None:
        # Any: with _preload_content=False the calls return the raw urllib3 response, which the
        # generated annotations do not allow for (lists, pages and watches are parsed here).
        self._api: Any = kubernetes.client.CoreV1Api(api_client)
        super().__init__(api_client, self._api.list_namespace, log=log, max_stale=max_stale,
                         clock=clock, page_size=page_size, request_timeout=request_timeout,
                         watch_timeout=watch_timeout, backoff_base=backoff_base,
                         backoff_cap=backoff_cap, owns_client=owns_client)
        self.cache_ttl = cache_ttl
        # A GET runs while the API server waits for the review (webhook timeoutSeconds: 3), so
        # with its one connect retry it must end (and the stale fallback answer) well within that:
        # 0.5 + 0.5 + 1.25 s.
        self.get_timeout = get_timeout
        # after a failed GET, later misses go straight to the stale answer for this long
        self.retry_interval = retry_interval

        # self._lock also guards the caches and the in-flight map
        self._ttl: cachetools.TTLCache[str, Namespace | None] = cachetools.TTLCache(
            maxsize=cache_size, ttl=cache_ttl, timer=clock)
        # name -> (namespace or None, clock time the GET answered): the stale fallback for GETs
        self._last_known: cachetools.LRUCache[str, tuple[Namespace | None, float]] = \
            cachetools.LRUCache(maxsize=cache_size)
        self._inflight: dict[str, _Flight] = {}
        self._get_retry_at = float("-inf")

    # -- NamespaceSource -------------------------------------------------------------------------

    def namespace(self, name: str) -> Namespace | None:
        live, synced, current_at, trusted_until = self._state
        if synced:
            stored = self._store.get(name)
            if stored is not None:
                now = self._clock()
                if (live and now <= trusted_until) or now - current_at < self.cache_ttl:
                    metrics.LOOKUP_HIT.inc()
                    return _record(stored)
        with self._lock:
            cached = self._ttl.get(name, _MISSING)
            if cached is _MISSING:
                flight = self._inflight.get(name)
                leader = flight is None
                if leader:
                    flight = self._inflight[name] = _Flight()
        if cached is not _MISSING:
            metrics.LOOKUP_HIT.inc()
            return cached
        assert flight is not None
        if leader:
            metrics.LOOKUP_MISS.inc()
            self._fetch(name, flight)
        elif not flight.done.wait(self._flight_wait()):
            raise NamespaceLookupError(f"timed out waiting for the lookup of namespace {name!r}")
        if flight.error is not None:
            if leader:
                raise flight.error
            raise NamespaceLookupError(str(flight.error))  # one exception object per thread
        return flight.namespace

    def labels(self, name: str) -> Labels | None:
        namespace = self.namespace(name)
        return None if namespace is None else dict(namespace.labels)

    def state(self) -> dict[str, Any]:
        """What the metrics do not say: whether the watch thread holds a live stream, the first
        listing done, the sizes of the store and the GET cache, the seconds since the store was
        last known current (None before the first listing) and since the last watch event."""
        return {**super().state(), "cache_size": len(self._ttl)}

    # -- what the store keeps, and what changes mean for the GET caches ---------------------------

    def keep(self, obj: dict[str, Any]) -> Stored:
        metadata = obj.get("metadata") or {}
        labels = dict(metadata.get("labels") or {})  # only what lookups need
        annotations = kept_annotations(metadata)
        return Namespace(labels, annotations) if annotations else labels

    def _replaced(self) -> None:
        self._ttl.clear()

    def _changed(self, name: str, deleted: bool) -> None:
        if deleted:
            self._last_known.pop(name, None)
        self._ttl.pop(name, None)  # the store is newer than any GET result

    def _alive(self) -> None:
        metrics.NAMESPACE_WATCH_LAST_EVENT.labels("apiserver").set(time.time())

    def _restarted(self) -> None:
        metrics.NAMESPACE_WATCH_RESTARTS.inc()

    def _resized(self, size: int) -> None:
        metrics.NAMESPACE_CACHE_SIZE.set(size)

    # -- lookups ---------------------------------------------------------------------------------

    def _flight_wait(self) -> float:
        connect, read = self.get_timeout
        return 4 * (connect + read) + 1  # the leader's GET is bounded by its timeouts and retries

    def _fetch(self, name: str, flight: _Flight) -> None:
        try:
            try:
                if self._clock() < self._get_retry_at:
                    raise _RecentFailure(self._last_error)
                namespace = self._get(name)
            except (_RecentFailure, *API_ERRORS) as e:
                flight.namespace = self._stale(name, e)
            else:
                now = self._clock()
                self._unreachable_since = None
                with self._lock:
                    self._ttl[name] = namespace
                    self._last_known[name] = (namespace, now)
                flight.namespace = namespace
        except NamespaceLookupError as e:
            flight.error = e
        except BaseException as e:  # a bug: the waiting callers must not hang
            flight.error = NamespaceLookupError(f"looking up namespace {name!r} failed: {e!r}")
            raise
        finally:
            with self._lock:
                self._inflight.pop(name, None)
            flight.done.set()

    def _get(self, name: str) -> Namespace | None:
        try:
            response = self._api.read_namespace(name, _preload_content=False,
                                                _request_timeout=self.get_timeout)
        except kubernetes.client.ApiException as e:
            if e.status == 404:
                return None
            raise
        try:
            body = orjson.loads(response.data)
        finally:
            response.release_conn()
        return _record(self.keep(body))

    def _stale(self, name: str, error: BaseException) -> Namespace | None:
        """The newest labels known for ``name`` if no older than max_stale; else raise."""
        now = self._clock()
        fresh_failure = not isinstance(error, _RecentFailure)
        live, synced, current_at, trusted_until = self._state
        if fresh_failure:
            self._last_error = describe_api_error(error)
            self._get_retry_at = now + self.retry_interval
            if self._unreachable_since is None:
                # a watch silent past its deadline has heard nothing since its last proof
                self._unreachable_since = current_at if synced and now > trusted_until else now
        known: tuple[Namespace | None, float] | None = None
        stored = self._store.get(name) if synced else None
        if stored is not None:
            known = (_record(stored), current_at)
        with self._lock:
            record = self._last_known.get(name)
        if record is not None and (known is None or record[1] > known[1]):
            known = record
        since = self._unreachable_since if self._unreachable_since is not None else now
        down = f"the API server has been unreachable for {now - since:.1f}s ({self._last_error})"
        if known is None:
            raise NamespaceLookupError(f"cannot look up namespace {name!r}: {down}, and its labels "
                                       "were never known")
        age = now - known[1]
        if age > self.max_stale:
            raise NamespaceLookupError(
                f"cannot look up namespace {name!r}: {down}; its labels were last known {age:.1f}s "
                f"ago, more than max-stale ({self.max_stale:g}s)")
        metrics.LOOKUP_STALE.inc()
        log.log(logging.WARNING if fresh_failure else logging.DEBUG,
                "serving labels of namespace %s known %.0fs ago: %s", name, age, down)
        return known[0]


class _RecentFailure(Exception):
    """A GET failed less than retry_interval ago; don't make callers wait for another one."""


def _record(stored: Stored) -> Namespace:
    return stored if isinstance(stored, Namespace) else Namespace(stored)
