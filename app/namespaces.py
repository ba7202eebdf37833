"""Owns namespace label lookup and its two sources: a YAML file, or the API server (cache + watch).

Every source answers ``labels(name)``: the namespace's labels, ``None`` when the namespace does not
exist, or :class:`NamespaceLookupError` when the answer cannot be known right now (the webhook then
answers 500 so the webhook's ``failurePolicy`` decides).

:class:`KubeNamespaces` keeps three layers, consulted in this order:

1. the *store*, kept current by a list+watch thread (an informer). While the watch is live a
   lookup never waits on the API server. After the watch breaks, its entries are trusted like a
   GET result for ``cache_ttl`` seconds from the moment it broke;
2. a TTL cache (``cache_ttl``) of GET results, filled by one in-flight GET per namespace;
3. on API errors, the newest labels known (store, or last GET) if they were known current no more
   than ``max_stale`` seconds ago; otherwise :class:`NamespaceLookupError`.
"""

from __future__ import annotations

import logging
import os
import random
import threading
import time
from typing import Any, Callable, Iterable, Protocol, runtime_checkable

import cachetools
import kubernetes.client
import orjson
import urllib3
import yaml

from app import metrics
from app.config import ConfigError, Settings

log = logging.getLogger("poolkeeper.namespaces")

Labels = dict[str, str]


class NamespaceLookupError(Exception):
    """A namespace's labels cannot be known now (e.g. the API server is unreachable too long)."""


class NamespacesFileError(ConfigError):
    """The namespaces file cannot be read or does not hold Namespace objects."""


@runtime_checkable
class NamespaceSource(Protocol):
    def labels(self, name: str) -> Labels | None:
        """The namespace's labels; None if it does not exist. Raises NamespaceLookupError."""

    def ready(self) -> bool:
        """True once the first full listing (or the first file load) succeeded."""

    def start(self) -> None:
        """Start background threads (daemon threads); idempotent."""

    def stop(self) -> None:
        """Stop background threads promptly."""


def namespace_source(settings: Settings,
                     api_client: kubernetes.client.ApiClient | None = None) -> NamespaceSource:
    """The source the settings ask for: the namespaces file if given, else the API server
    (through ``api_client``, or a client of its own)."""
    if settings.namespaces_file:
        return FileNamespaces(settings.namespaces_file)
    owns_client = api_client is None
    if api_client is None:
        from app.kube import load_api_client
        api_client = load_api_client(settings.kubeconfig)
    return KubeNamespaces(api_client, cache_ttl=settings.cache_ttl,
                          max_stale=settings.max_stale, owns_client=owns_client)


# --------------------------------------------------------------------------------------------------
# File source


def parse_namespaces(text: str) -> dict[str, Labels]:
    """Namespace name -> labels from YAML: a ``kind: List`` (``kubectl get ns -o yaml``), a
    multi-document stream, or a single Namespace. Raises ValueError or yaml.YAMLError."""
    result: dict[str, Labels] = {}
    for number, doc in enumerate(yaml.safe_load_all(text), start=1):
        if doc is None:
            continue
        where = f"document {number}"
        if not isinstance(doc, dict):
            raise ValueError(f"{where}: expected a Namespace or a List, got {type(doc).__name__}")
        if doc.get("kind") in ("List", "NamespaceList"):
            items = doc.get("items") or []
            if not isinstance(items, list):
                raise ValueError(f"{where}: 'items' is not a list")
            for index, item in enumerate(items):
                _add_namespace(result, item, f"{where}, items[{index}]", kind_optional=True)
        else:
            _add_namespace(result, doc, where, kind_optional=False)
    return result


def _add_namespace(result: dict[str, Labels], obj: Any, where: str, *, kind_optional: bool) -> None:
    if not isinstance(obj, dict):
        raise ValueError(f"{where}: expected a Namespace object")
    kind = obj.get("kind")
    if kind != "Namespace" and not (kind_optional and kind is None):
        raise ValueError(f"{where}: kind is {kind!r}, expected Namespace or List")
    metadata = obj.get("metadata")
    name = metadata.get("name") if isinstance(metadata, dict) else None
    if not isinstance(name, str) or not name:
        raise ValueError(f"{where}: metadata.name is missing")
    labels = metadata.get("labels") or {}
    if not isinstance(labels, dict):
        raise ValueError(f"{where} ({name}): metadata.labels is not a map")
    for key, value in labels.items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise ValueError(f"{where} ({name}): label {key!r}: {value!r} is not a string "
                             "(quote values such as 'true' or '1')")
    result[name] = dict(labels)


class FileNamespaces:
    """Namespaces read from a YAML file, reloaded when the file changes.

    The file is checked (one ``stat``) at most every ``check_interval`` seconds, on lookup; a
    change of mtime, size or inode (e.g. a ConfigMap's symlink swap) reloads it. A reload that
    fails keeps the previous data and logs an error. A file that is invalid at start raises
    :class:`NamespacesFileError` from the constructor.
    """

    def __init__(self, path: str | os.PathLike[str], *, check_interval: float = 1.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.path = os.fspath(path)
        self.check_interval = check_interval
        self._clock = clock
        self._check_lock = threading.Lock()
        self.reloads = 0
        self.reload_errors = 0
        try:
            signature = self._signature()
            self._namespaces = self._read()
        except (OSError, ValueError, yaml.YAMLError) as e:
            raise NamespacesFileError(f"namespaces file {self.path}: {_describe(e)}") from e
        self._loaded_signature = signature
        self._checked_at = clock()
        metrics.NAMESPACE_CACHE_SIZE.set(len(self._namespaces))
        log.info("loaded %d namespaces from %s", len(self._namespaces), self.path)

    def labels(self, name: str) -> Labels | None:
        if self._clock() - self._checked_at >= self.check_interval:
            self._maybe_reload()
        labels = self._namespaces.get(name)
        if labels is None:
            metrics.LOOKUP_MISS.inc()
            return None
        metrics.LOOKUP_HIT.inc()
        return dict(labels)

    def ready(self) -> bool:
        return True  # the constructor fails unless the first load succeeded

    def start(self) -> None:
        """Nothing to start: the file is checked on lookup."""

    def stop(self) -> None:
        """Nothing to stop."""

    def stats(self) -> dict[str, Any]:
        return {"namespaces": len(self._namespaces), "reloads": self.reloads,
                "reload_errors": self.reload_errors}

    def _signature(self) -> tuple[int, int, int, int]:
        st = os.stat(self.path)  # follows symlinks, so a ConfigMap update changes the inode
        return st.st_mtime_ns, st.st_size, st.st_ino, st.st_dev

    def _read(self) -> dict[str, Labels]:
        with open(self.path, encoding="utf-8") as f:
            return parse_namespaces(f.read())

    def _maybe_reload(self) -> None:
        if not self._check_lock.acquire(blocking=False):
            return  # another thread is checking; answer from the current data
        try:
            self._checked_at = self._clock()
            try:
                signature = self._signature()
            except OSError as e:
                if self._loaded_signature is not None:
                    log.error("namespaces file %s: %s; keeping the %d namespaces loaded before",
                              self.path, _describe(e), len(self._namespaces))
                    self.reload_errors += 1
                self._loaded_signature = None
                return
            if signature == self._loaded_signature:
                return
            self._loaded_signature = signature  # a broken file is reported once, not every second
            try:
                namespaces = self._read()
            except (OSError, ValueError, yaml.YAMLError) as e:
                self.reload_errors += 1
                log.error("namespaces file %s changed but cannot be loaded: %s; keeping the %d "
                          "namespaces loaded before", self.path, _describe(e),
                          len(self._namespaces))
                return
            self._namespaces = namespaces
            self.reloads += 1
            metrics.NAMESPACE_CACHE_SIZE.set(len(namespaces))
            log.info("reloaded %d namespaces from %s", len(namespaces), self.path)
        finally:
            self._check_lock.release()


def _describe(e: BaseException) -> str:
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    return " ".join(str(e).split()) or type(e).__name__


# --------------------------------------------------------------------------------------------------
# API server source


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

_MISSING = object()


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
        # timeoutSeconds of each watch (75-100% of it, so replicas spread their reconnects); the
        # read timeout leaves room for an idle but healthy stream.
        self.watch_timeout = watch_timeout
        self.backoff_base = backoff_base
        self.backoff_cap = backoff_cap
        # after a failed GET, later misses go straight to the stale answer for this long
        self.retry_interval = retry_interval
        self.owns_client = owns_client
        self._api = kubernetes.client.CoreV1Api(api_client)
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
        # (watch live, first listing done, clock time up to which the store is known current)
        self._state: tuple[bool, bool, float] = (False, False, 0.0)
        self._current_at = 0.0
        self._watch_response: Any = None

        self._unreachable_since: float | None = None  # first of the current run of API failures
        self._get_retry_at = float("-inf")
        self._last_error = ""

        self._thread: threading.Thread | None = None
        self._stop = threading.Event()

        # statistics (plain counters, cheap; exact enough for metrics)
        self.hits = 0  # answered from the store or the TTL cache
        self.misses = 0  # needed a GET
        self.stale = 0  # answered with stale labels because the API server failed
        self.errors = 0  # raised NamespaceLookupError
        self.gets = 0  # GET requests sent
        self.watch_events = 0
        self.watch_restarts = 0  # watches re-established after an error or a 410
        self.relists = 0  # full listings completed
        self.last_event_at: float | None = None  # clock time of the last watch event or bookmark
        self.last_event_unix: float | None = None  # Unix time of the last event, bookmark or listing

    # -- NamespaceSource -------------------------------------------------------------------------

    def labels(self, name: str) -> Labels | None:
        live, synced, current_at = self._state
        if synced:
            labels = self._store.get(name)
            if labels is not None and (live or self._clock() - current_at < self.cache_ttl):
                self.hits += 1
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
            self.hits += 1
            metrics.LOOKUP_HIT.inc()
            return None if cached is None else dict(cached)
        assert flight is not None
        if leader:
            self.misses += 1
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

    def stats(self) -> dict[str, Any]:
        live, synced, _ = self._state
        last = self.last_event_at
        return {
            "hits": self.hits, "misses": self.misses, "stale": self.stale, "errors": self.errors,
            "gets": self.gets, "store_size": len(self._store), "cache_size": len(self._ttl),
            "watch_live": live, "synced": synced, "watch_events": self.watch_events,
            "watch_restarts": self.watch_restarts, "relists": self.relists,
            "last_event_at": last, "last_event_age": None if last is None else self._clock() - last,
            "last_event_unix": self.last_event_unix,
        }

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
            self.errors += 1
            flight.error = e
        except BaseException as e:  # a bug: the waiting callers must not hang
            flight.error = NamespaceLookupError(f"looking up namespace {name!r} failed: {e!r}")
            raise
        finally:
            with self._lock:
                self._inflight.pop(name, None)
            flight.done.set()

    def _get(self, name: str) -> Labels | None:
        self.gets += 1
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
        if fresh_failure:
            self._last_error = _describe_api_error(error)
            self._get_retry_at = now + self.retry_interval
            if self._unreachable_since is None:
                self._unreachable_since = now
        known: tuple[Labels | None, float] | None = None
        live, synced, current_at = self._state
        stored = self._store.get(name) if synced else None
        if stored is not None:
            known = (stored, now if live else current_at)
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
        self.stale += 1
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
                self.watch_restarts += 1
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
            self.watch_restarts += 1
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
        live, synced, _ = self._state
        if live:
            # the store was kept current up to the moment its stream ended
            self._state = (False, synced, self._current_at)
            if self._unreachable_since is None:
                self._unreachable_since = self._current_at
            self._last_error = reason
            log.warning("namespace watch is down (%s); serving cached labels for up to %gs",
                        reason, self.max_stale)

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
            self._current_at = now
            self._state = (True, True, now)
        self._unreachable_since = None
        self.last_event_unix = time.time()
        metrics.NAMESPACE_WATCH_LAST_EVENT.labels("apiserver").set(self.last_event_unix)
        metrics.NAMESPACE_CACHE_SIZE.set(len(store))
        self.relists += 1
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
        timeout = max(1, round(self.watch_timeout * random.uniform(0.75, 1.0)))
        try:
            response = self._api.list_namespace(
                watch=True, resource_version=self._resource_version, allow_watch_bookmarks=True,
                timeout_seconds=timeout, _preload_content=False,
                _request_timeout=(connect, timeout + 30))
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
            self._current_at = now
            live, synced, _ = self._state
            if not live:
                log.info("namespace watch is back at resourceVersion %s", self._resource_version)
            self._state = (True, synced, now)
            self._unreachable_since = None
            for line in _lines(response.stream(65536, decode_content=True)):
                if self._stop.is_set():
                    raise _Stopped()
                self.handle_event(orjson.loads(line))
                events += 1
            if self._stop.is_set():
                raise _Stopped()
        except (urllib3.exceptions.HTTPError, OSError):
            if self._stop.is_set():
                raise _Stopped() from None
            raise
        finally:
            self._current_at = self._clock()
            with self._lock:
                self._watch_response = None
            response.close()
            response.release_conn()
        return events > 0 or time.monotonic() - started >= 1.0

    def handle_event(self, event: dict[str, Any]) -> None:
        """Apply one watch event to the store; ERROR events raise _Expired (410) or _WatchError."""
        kind = event.get("type")
        obj = event.get("object") or {}
        metadata = obj.get("metadata") or {}
        self.last_event_at = self._clock()
        self.last_event_unix = time.time()
        metrics.NAMESPACE_WATCH_LAST_EVENT.labels("apiserver").set(self.last_event_unix)
        self.watch_events += 1
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
