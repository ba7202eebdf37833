"""Owns the API server namespace source: a list+watch store (an informer), GETs, stale fallback.

:class:`KubeNamespaces` keeps three layers, consulted in this order:

1. the *store*, kept current by a list+watch thread (an informer). While the watch is live a
   lookup never waits on the API server. After the watch breaks, or falls silent past its
   deadline, its entries are trusted like a GET result for ``cache_ttl`` seconds from the last
   proof of life;
2. a TTL cache (``cache_ttl``) of GET results, filled by one in-flight GET per namespace;
3. on API errors, the newest labels known (store, or last GET) if they were known current no more
   than ``max_stale`` seconds ago; otherwise :class:`NamespaceLookupError`.

The store is known current as of its last *proof of life*: a listing, a watch stream opened or
ended on time, an event or a BOOKMARK. Staleness counts from there, never from the moment the
watch thread noticed a failure: a hung API server (connections accepted, nothing sent) fails
nothing, it is only silent. kube-apiserver sends a BOOKMARK about every minute and 2 s before a
watch's ``timeoutSeconds``, but only once its watch cache holds a newer resourceVersion than the
watch started from (k8s.io/apiserver cacher: ``defaultBookmarkFrequency = time.Minute``,
``cacheWatcher.nextBookmarkTime``), so a quiet namespace list may get none. The heartbeat to count
on is the stream itself: each lives at most ``max_stale / 4`` seconds (and ``watch_timeout``), the
server ends it on time and the next one opens. A stream that has not ended by its deadline plus a
grace is silent too long: lookups stop trusting it at once (they compare the clock with the
deadline; they do not wait for the watch thread), and the watch's read timeout ends it. So after
a hang, lookups fail once the last proof is ``max_stale`` old: between 3/4 of ``max_stale`` and
``max_stale`` (plus one GET's timeout) after the hang began.

What it does is counted in the Prometheus metrics (:mod:`app.metrics`); :meth:`KubeNamespaces.state`
reports only what is not a metric.
"""

from __future__ import annotations

import enum
import logging
import random
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

import cachetools
import kubernetes.client
import orjson
import urllib3

from app import metrics

from .source import Labels, NamespaceLookupError

log = logging.getLogger("poolkeeper.namespaces")


class _Expired(Exception):
    """The watch's resourceVersion is too old (410 Gone): list again."""


class _WatchError(Exception):
    """The watch stream reported an error other than 410."""


class _Stopped(Exception):
    """stop() was called."""


class _Flight:
    """One GET in progress; callers asking for the same name wait for its outcome."""
    __slots__ = ("done", "labels", "error")

    def __init__(self) -> None:
        self.done = threading.Event()
        self.labels: Labels | None = None
        self.error: NamespaceLookupError | None = None


# Errors that mean "the API server could not answer", as opposed to bugs.
_API_ERRORS = (kubernetes.client.ApiException, urllib3.exceptions.HTTPError, OSError, ValueError)

class _Missing(enum.Enum):
    """Not in the TTL cache (``None`` there means: no such namespace)."""
    MISSING = enum.auto()


_MISSING = _Missing.MISSING

# A watch stream lives at most this share of max_stale, so that its end (the one heartbeat a
# quiet watch is sure to get) comes often enough to tell a quiet watch from a hung server.
STREAM_SHARE_OF_MAX_STALE = 0.25
# How long past its timeoutSeconds a stream may stay open before it counts as silent, at least.
STREAM_GRACE = 2.0


class KubeNamespaces:
    """Namespace labels from the API server: a watched store, a TTL cache of GETs, stale fallback.

    ``clock`` (monotonic seconds) drives the TTL cache and every staleness decision; sleeping and
    network timeouts use real time.
    """

    def __init__(self, api_client: kubernetes.client.ApiClient, *, cache_ttl: float = 30.0,
                 max_stale: float = 300.0, clock: Callable[[], float] = time.monotonic,
                 cache_size: int = 200_000, page_size: int = 500,
                 request_timeout: tuple[float, float] = (2.0, 5.0),
                 get_timeout: tuple[float, float] = (0.5, 1.25),
                 watch_timeout: int = 120, backoff_base: float = 0.25, backoff_cap: float = 4.0,
                 retry_interval: float = 1.0, owns_client: bool = False) -> None:
        self.api_client = api_client
        self.cache_ttl = cache_ttl
        self.max_stale = max_stale
        self.page_size = page_size
        self.request_timeout = request_timeout  # (connect, read) seconds of lists and watches
        # A GET runs while the API server waits for the review (webhook timeoutSeconds: 3), so
        # with its one connect retry it must end (and the stale fallback answer) well within that:
        # 0.5 + 0.5 + 1.25 s.
        self.get_timeout = get_timeout
        # Longest timeoutSeconds of a watch stream (also bounded by max_stale, see the module's
        # docstring); each stream takes 75-100% of it, so replicas spread their reconnects.
        self.watch_timeout = watch_timeout
        self.backoff_base = backoff_base
        self.backoff_cap = backoff_cap
        # after a failed GET, later misses go straight to the stale answer for this long
        self.retry_interval = retry_interval
        self.owns_client = owns_client
        # Any: with _preload_content=False the calls return the raw urllib3 response, which the
        # generated annotations do not allow for (lists, pages and watches are parsed here).
        self._api: Any = kubernetes.client.CoreV1Api(api_client)
        self._clock = clock

        self._lock = threading.Lock()  # guards the caches, the in-flight map and the watch response
        self._ttl: cachetools.TTLCache[str, Labels | None] = cachetools.TTLCache(
            maxsize=cache_size, ttl=cache_ttl, timer=clock)
        # name -> (labels or None, clock time the GET answered): the stale fallback for GET results
        self._last_known: cachetools.LRUCache[str, tuple[Labels | None, float]] = \
            cachetools.LRUCache(maxsize=cache_size)
        self._inflight: dict[str, _Flight] = {}

        # Written by the watch thread only; lookups read them without a lock (single reads).
        self._store: dict[str, Labels] = {}
        self._resource_version: str | None = None
        # (watch live, first listing done, clock time of the last proof of life, clock time up
        # to which a live watch is trusted without a new proof: its stream's deadline + grace)
        self._state: tuple[bool, bool, float, float] = (False, False, 0.0, 0.0)
        self._watch_response: Any = None

        self._unreachable_since: float | None = None  # first of the current run of API failures
        self._get_retry_at = float("-inf")
        self._last_error = ""

        self._thread: threading.Thread | None = None
        self._stop = threading.Event()

        self._last_event_at: float | None = None  # clock time of the last watch event or bookmark

    # -- NamespaceSource -------------------------------------------------------------------------

    def labels(self, name: str) -> Labels | None:
        live, synced, current_at, trusted_until = self._state
        if synced:
            labels = self._store.get(name)
            if labels is not None:
                now = self._clock()
                if (live and now <= trusted_until) or now - current_at < self.cache_ttl:
                    metrics.LOOKUP_HIT.inc()
                    return dict(labels)
        with self._lock:
            cached = self._ttl.get(name, _MISSING)
            if cached is _MISSING:
                flight = self._inflight.get(name)
                leader = flight is None
                if leader:
                    flight = self._inflight[name] = _Flight()
        if cached is not _MISSING:
            metrics.LOOKUP_HIT.inc()
            return None if cached is None else dict(cached)
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
        return None if flight.labels is None else dict(flight.labels)

    def ready(self) -> bool:
        return self._state[1]

    def start(self) -> None:
        with self._lock:
            if self._thread is not None and self._thread.is_alive():
                return
            self._stop.clear()
            self._thread = threading.Thread(target=self._run, name="poolkeeper-namespaces-watch",
                                            daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        with self._lock:
            thread, response = self._thread, self._watch_response
        if response is not None:
            _shutdown(response)  # unblocks the watch thread's read
        if thread is not None:
            thread.join(timeout)
            if thread.is_alive():
                log.warning("namespace watch thread did not stop within %.0fs", timeout)
        if self.owns_client:
            self.api_client.close()

    def state(self) -> dict[str, Any]:
        """What the metrics do not say: whether the watch thread holds a live stream, the first
        listing done, the sizes of the store and the GET cache, the seconds since the store was
        last known current (None before the first listing) and since the last watch event."""
        live, synced, current_at, _ = self._state
        now = self._clock()
        last = self._last_event_at
        return {"watch_live": live, "synced": synced, "store_size": len(self._store),
                "cache_size": len(self._ttl),
                "current_age": now - current_at if synced else None,
                "last_event_age": None if last is None else now - last}

    # -- lookups ---------------------------------------------------------------------------------

    def _flight_wait(self) -> float:
        connect, read = self.get_timeout
        return 4 * (connect + read) + 1  # the leader's GET is bounded by its timeouts and retries

    def _fetch(self, name: str, flight: _Flight) -> None:
        try:
            try:
                if self._clock() < self._get_retry_at:
                    raise _RecentFailure(self._last_error)
                labels = self._get(name)
            except (_RecentFailure, *_API_ERRORS) as e:
                flight.labels = self._stale(name, e)
            else:
                now = self._clock()
                self._unreachable_since = None
                with self._lock:
                    self._ttl[name] = labels
                    self._last_known[name] = (labels, now)
                flight.labels = labels
        except NamespaceLookupError as e:
            flight.error = e
        except BaseException as e:  # a bug: the waiting callers must not hang
            flight.error = NamespaceLookupError(f"looking up namespace {name!r} failed: {e!r}")
            raise
        finally:
            with self._lock:
                self._inflight.pop(name, None)
            flight.done.set()

    def _get(self, name: str) -> Labels | None:
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
        return dict((body.get("metadata") or {}).get("labels") or {})

    def _stale(self, name: str, error: BaseException) -> Labels | None:
        """The newest labels known for ``name`` if no older than max_stale; else raise."""
        now = self._clock()
        fresh_failure = not isinstance(error, _RecentFailure)
        live, synced, current_at, trusted_until = self._state
        if fresh_failure:
            self._last_error = _describe_api_error(error)
            self._get_retry_at = now + self.retry_interval
            if self._unreachable_since is None:
                # a watch silent past its deadline has heard nothing since its last proof
                self._unreachable_since = current_at if synced and now > trusted_until else now
        known: tuple[Labels | None, float] | None = None
        stored = self._store.get(name) if synced else None
        if stored is not None:
            known = (stored, current_at)
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

    # -- list + watch ----------------------------------------------------------------------------

    def _run(self) -> None:
        """The informer loop: list, then watch from the list's resourceVersion; never dies."""
        need_list = True
        failures = 0
        while not self._stop.is_set():
            try:
                if need_list:
                    self._relist()
                    need_list = False
                if self._watch():
                    failures = 0  # a healthy stream that ran its course; watch again at once
                    continue
                raise _WatchError("the watch closed at once without events")
            except _Stopped:
                break
            except _Expired as e:
                log.info("namespace watch: %s; listing again", e)
                metrics.NAMESPACE_WATCH_RESTARTS.inc()
                need_list = True
                failures = 0
                continue
            except (_WatchError, *_API_ERRORS) as e:
                level = logging.WARNING
                message = _describe_api_error(e)
            except Exception as e:  # a bug; keep the thread alive
                level = logging.ERROR
                message = repr(e)
                log.exception("namespace watch: unexpected error")
            if self._stop.is_set():
                break
            failures += 1
            metrics.NAMESPACE_WATCH_RESTARTS.inc()
            self._mark_broken(message)
            delay = self._backoff(failures)
            log.log(level, "namespace %s failed: %s; retrying in %.1fs",
                    "listing" if need_list else "watch", message, delay)
            self._stop.wait(delay)
        log.debug("namespace watch thread stopped")

    def _backoff(self, failures: int) -> float:
        """Exponential backoff with jitter, capped at backoff_cap."""
        ceiling = min(self.backoff_cap, self.backoff_base * 2 ** (failures - 1))
        return random.uniform(ceiling / 2, ceiling)

    def _mark_broken(self, reason: str) -> None:
        live, synced, current_at, _ = self._state
        if live:
            # the store is known current as of its last proof of life, not of this moment
            self._state = (False, synced, current_at, current_at)
            if self._unreachable_since is None:
                self._unreachable_since = current_at
            self._last_error = reason
            left = max(0.0, self.max_stale - (self._clock() - current_at))
            log.warning("namespace watch is down (%s); serving cached labels for up to %.0fs more "
                        "(max-stale %gs from the last word of the API server)", reason, left,
                        self.max_stale)

    def _relist(self) -> None:
        store: dict[str, Labels] = {}
        token: str | None = None
        resource_version = None
        while True:
            self._check_stop()
            response = self._api.list_namespace(limit=self.page_size, _continue=token,
                                                _preload_content=False,
                                                _request_timeout=self._list_timeout())
            try:
                body = orjson.loads(response.data)
            finally:
                response.release_conn()
            for item in body.get("items") or ():
                self._put(store, item)
            metadata = body.get("metadata") or {}
            resource_version = metadata.get("resourceVersion")
            token = metadata.get("continue") or None
            if token is None:
                break
        now = self._clock()
        with self._lock:
            self._store = store
            self._resource_version = resource_version
            self._ttl.clear()
            # the watch that follows at once brings its own deadline
            self._state = (True, True, now, now + min(STREAM_GRACE, self.max_stale))
        self._unreachable_since = None
        metrics.NAMESPACE_WATCH_LAST_EVENT.labels("apiserver").set(time.time())
        metrics.NAMESPACE_CACHE_SIZE.set(len(store))
        log.info("listed %d namespaces at resourceVersion %s", len(store), resource_version)

    def _list_timeout(self) -> tuple[float, float]:
        connect, read = self.request_timeout
        return connect, max(read, 30.0)  # a page of 500 namespaces from a busy API server

    def _watch(self) -> bool:
        """One watch stream until it ends; True if it ended normally after running a while or
        delivering events. Raises _Expired on 410, _WatchError or API errors otherwise."""
        self._check_stop()
        started = time.monotonic()
        connect, _ = self.request_timeout
        longest = min(self.watch_timeout, self.max_stale * STREAM_SHARE_OF_MAX_STALE)
        timeout = max(1, round(longest * random.uniform(0.75, 1.0)))
        grace = max(STREAM_GRACE, 0.1 * timeout)
        try:
            # The server ends the stream after timeoutSeconds; a stream silent for longer than
            # that (plus grace) is from a hung server, and the read timeout ends it.
            response = self._api.list_namespace(
                watch=True, resource_version=self._resource_version, allow_watch_bookmarks=True,
                timeout_seconds=timeout, _preload_content=False,
                _request_timeout=(connect, timeout + grace))
        except kubernetes.client.ApiException as e:
            if e.status == 410:
                raise _Expired(f"resourceVersion {self._resource_version} is too old "
                               "(HTTP 410)") from e
            raise
        events = 0
        try:
            with self._lock:
                self._watch_response = response
            if self._stop.is_set():
                raise _Stopped()
            now = self._clock()
            live, synced, _, _ = self._state
            if not live:
                log.info("namespace watch is back at resourceVersion %s", self._resource_version)
            self._state = (True, synced, now, now + min(timeout + grace, self.max_stale))
            metrics.NAMESPACE_WATCH_LAST_EVENT.labels("apiserver").set(time.time())
            self._unreachable_since = None
            for line in _lines(response.stream(65536, decode_content=True)):
                if self._stop.is_set():
                    raise _Stopped()
                self.handle_event(orjson.loads(line))
                events += 1
            if self._stop.is_set():
                raise _Stopped()
            self._proved()  # the server ended the stream as promised
        except (urllib3.exceptions.HTTPError, OSError):
            if self._stop.is_set():
                raise _Stopped() from None
            raise
        finally:
            with self._lock:
                self._watch_response = None
            response.close()
            response.release_conn()
        return events > 0 or time.monotonic() - started >= min(1.0, timeout / 2)

    def handle_event(self, event: dict[str, Any]) -> None:
        """Apply one watch event to the store; ERROR events raise _Expired (410) or _WatchError."""
        kind = event.get("type")
        obj = event.get("object") or {}
        metadata = obj.get("metadata") or {}
        self._last_event_at = self._clock()
        if kind == "ERROR":
            code = obj.get("code")
            message = obj.get("message") or obj.get("reason") or "no message"
            if code == 410:
                raise _Expired(f"{message} (410 {obj.get('reason') or 'Gone'})")
            raise _WatchError(f"watch error {code}: {message}")
        resource_version = metadata.get("resourceVersion")
        if kind == "BOOKMARK":
            if resource_version:
                self._resource_version = resource_version
            self._proved()
            return
        name = metadata.get("name")
        if kind in ("ADDED", "MODIFIED") and name:
            self._put(self._store, obj)
        elif kind == "DELETED" and name:
            self._store.pop(name, None)
            with self._lock:
                self._last_known.pop(name, None)
        else:
            log.warning("namespace watch: ignoring event of type %r", kind)
            return
        with self._lock:
            self._ttl.pop(name, None)  # the store is newer than any GET result
        metrics.NAMESPACE_CACHE_SIZE.set(len(self._store))
        if resource_version:
            self._resource_version = resource_version
        self._proved()

    def _proved(self) -> None:
        """The stream just showed the store current: a proof of life."""
        live, synced, _, trusted_until = self._state
        self._state = (live, synced, self._clock(), trusted_until)
        metrics.NAMESPACE_WATCH_LAST_EVENT.labels("apiserver").set(time.time())

    @staticmethod
    def _put(store: dict[str, Labels], obj: dict[str, Any]) -> None:
        metadata = obj.get("metadata") or {}
        name = metadata.get("name")
        if name:
            store[name] = dict(metadata.get("labels") or {})  # only what lookups need

    def _check_stop(self) -> None:
        if self._stop.is_set():
            raise _Stopped()


class _RecentFailure(Exception):
    """A GET failed less than retry_interval ago; don't make callers wait for another one."""


def _lines(chunks: Iterable[bytes]) -> Iterable[bytes]:
    """Complete newline-terminated lines from a stream of chunks (a chunk may hold part of an
    event, or several)."""
    rest = b""
    for chunk in chunks:
        parts = (rest + chunk).split(b"\n") if rest else chunk.split(b"\n")
        rest = parts.pop()
        for part in parts:
            if part.strip():
                yield part
    if rest.strip():
        yield rest


def _shutdown(response: Any) -> None:
    try:
        response.shutdown()
    except (ValueError, RuntimeError, OSError, AttributeError):
        pass  # already closed or released


def _describe_api_error(e: BaseException) -> str:
    if isinstance(e, kubernetes.client.ApiException):
        if e.status:
            return f"HTTP {e.status} {e.reason or ''}".strip()
        return " ".join(str(e.reason or e).split())
    if isinstance(e, urllib3.exceptions.MaxRetryError) and e.reason is not None:
        return _describe_api_error(e.reason)
    if isinstance(e, urllib3.exceptions.NewConnectionError):
        return f"cannot connect to {e.conn.host}:{e.conn.port}" if getattr(e, "conn", None) \
            else "cannot connect"
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text}" if text else type(e).__name__
