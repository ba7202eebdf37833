"""Owns list+watch of one kind of object from the API server into a store (an informer's loop),
and the proof-of-life bookkeeping that staleness decisions read.

:class:`ListWatch` lists in pages, then watches from the listing's resourceVersion with
BOOKMARKs, lists again on ``410 Gone``, backs off on errors and never dies. Its store maps each
object's name to what :meth:`ListWatch.keep` makes of it (only what lookups need: the raw stream
is parsed here, never turned into the client's models). The namespace source
(:mod:`app.namespaces.informer`) and the node source (:mod:`app.nodes.informer`) are built on it.

The store is known current as of its last *proof of life*: a listing, a watch stream opened or
ended on time, an event or a BOOKMARK. Staleness counts from there, never from the moment the
watch thread noticed a failure: a hung API server (connections accepted, nothing sent) fails
nothing, it is only silent. kube-apiserver sends a BOOKMARK about every minute and 2 s before a
watch's ``timeoutSeconds``, but only once its watch cache holds a newer resourceVersion than the
watch started from (k8s.io/apiserver cacher: ``defaultBookmarkFrequency = time.Minute``,
``cacheWatcher.nextBookmarkTime``), so a quiet list may get none. The heartbeat to count on is
the stream itself: each lives at most ``max_stale / 4`` seconds (and ``watch_timeout``), the
server ends it on time and the next one opens. A stream that has not ended by its deadline plus a
grace is silent too long: lookups stop trusting it at once (they compare the clock with the
deadline; they do not wait for the watch thread), and the watch's read timeout ends it.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Generic, TypeVar

import kubernetes.client
import orjson
import urllib3


class _Expired(Exception):
    """The watch's resourceVersion is too old (410 Gone): list again."""


class _WatchError(Exception):
    """The watch stream reported an error other than 410."""


class _Stopped(Exception):
    """stop() was called."""


# Errors that mean "the API server could not answer", as opposed to bugs.
API_ERRORS = (kubernetes.client.ApiException, urllib3.exceptions.HTTPError, OSError, ValueError)

# A watch stream lives at most this share of max_stale, so that its end (the one heartbeat a
# quiet watch is sure to get) comes often enough to tell a quiet watch from a hung server.
STREAM_SHARE_OF_MAX_STALE = 0.25
# How long past its timeoutSeconds a stream may stay open before it counts as silent, at least.
STREAM_GRACE = 2.0


T = TypeVar("T")


class ListWatch(Generic[T]):
    """A list+watch thread keeping ``_store`` (name -> :meth:`keep` of the object) current.

    ``list_call`` is the client's list function (e.g. ``CoreV1Api.list_namespace``), called with
    ``_preload_content=False``; ``list_headers`` go with each listing and ``watch_headers`` with
    each watch (e.g. Accept headers asking for metadata only). ``clock`` (monotonic seconds)
    drives every staleness decision; sleeping and network timeouts use real time. Subclasses say
    what to keep of an object and may react to changes (:meth:`_replaced`, :meth:`_changed`) and
    count signs of life.
    """

    NOUN = "object"  # what log lines call the objects, e.g. "namespace"

    def __init__(self, api_client: kubernetes.client.ApiClient,
                 list_call: Callable[..., Any], *, log: logging.Logger,
                 max_stale: float = 300.0, clock: Callable[[], float] = time.monotonic,
                 page_size: int = 500, request_timeout: tuple[float, float] = (2.0, 5.0),
                 watch_timeout: int = 120, backoff_base: float = 0.25, backoff_cap: float = 4.0,
                 owns_client: bool = False, list_headers: Mapping[str, str] | None = None,
                 watch_headers: Mapping[str, str] | None = None) -> None:
        self.api_client = api_client
        self.max_stale = max_stale
        self.page_size = page_size
        self.request_timeout = request_timeout  # (connect, read) seconds of lists and watches
        # Longest timeoutSeconds of a watch stream (also bounded by max_stale, see the module's
        # docstring); each stream takes 75-100% of it, so replicas spread their reconnects.
        self.watch_timeout = watch_timeout
        self.backoff_base = backoff_base
        self.backoff_cap = backoff_cap
        self.owns_client = owns_client
        self._list_call = list_call
        self._list_headers = dict(list_headers or {})
        self._watch_headers = dict(watch_headers or {})
        self._log = log
        self._clock = clock

        self._lock = threading.Lock()  # guards the watch response (and what subclasses add)
        # Written by the watch thread only; lookups read them without a lock (single reads).
        self._store: dict[str, T] = {}
        self._resource_version: str | None = None
        # (watch live, first listing done, clock time of the last proof of life, clock time up
        # to which a live watch is trusted without a new proof: its stream's deadline + grace)
        self._state: tuple[bool, bool, float, float] = (False, False, 0.0, 0.0)
        self._watch_response: Any = None

        self._unreachable_since: float | None = None  # first of the current run of API failures
        self._last_error = ""

        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._synced = threading.Event()  # set by the first listing

        self._last_event_at: float | None = None  # clock time of the last watch event or bookmark

    # -- what subclasses say ---------------------------------------------------------------------

    def keep(self, obj: dict[str, Any]) -> T:
        """What the store holds for ``obj`` (a dict parsed from the API server's JSON)."""
        raise NotImplementedError

    def _replaced(self) -> None:
        """Called under the lock as a new listing replaces the store."""

    def _changed(self, name: str, deleted: bool) -> None:
        """Called under the lock after a watch event changed (or deleted) ``name``."""

    def _alive(self) -> None:
        """A sign of life of the watch (for a metric)."""

    def _restarted(self) -> None:
        """The watch is established again after an error (for a metric)."""

    def _resized(self, size: int) -> None:
        """The store now holds ``size`` objects (for a metric)."""

    # -- lifecycle -------------------------------------------------------------------------------

    def ready(self) -> bool:
        return self._state[1]

    def wait_ready(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for the first listing; whether it is done."""
        return self._synced.wait(timeout)

    def start(self) -> None:
        with self._lock:
            if self._thread is not None and self._thread.is_alive():
                return
            self._stop.clear()
            self._thread = threading.Thread(target=self._run,
                                            name=f"poolkeeper-{self.NOUN}s-watch", daemon=True)
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
                self._log.warning("%s watch thread did not stop within %.0fs", self.NOUN,
                                  timeout)
        if self.owns_client:
            self.api_client.close()

    def state(self) -> dict[str, Any]:
        """Whether the watch thread holds a live stream, the first listing done, the store's
        size, the seconds since the store was last known current (None before the first
        listing) and since the last watch event."""
        live, synced, current_at, _ = self._state
        now = self._clock()
        last = self._last_event_at
        return {"watch_live": live, "synced": synced, "store_size": len(self._store),
                "current_age": now - current_at if synced else None,
                "last_event_age": None if last is None else now - last}

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
                self._log.info("%s watch: %s; listing again", self.NOUN, e)
                self._restarted()
                need_list = True
                failures = 0
                continue
            except (_WatchError, *API_ERRORS) as e:
                level = logging.WARNING
                message = describe_api_error(e)
            except Exception as e:  # a bug; keep the thread alive
                level = logging.ERROR
                message = repr(e)
                self._log.exception("%s watch: unexpected error", self.NOUN)
            if self._stop.is_set():
                break
            failures += 1
            self._restarted()
            self._mark_broken(message)
            delay = self._backoff(failures)
            self._log.log(level, "%s %s failed: %s; retrying in %.1fs", self.NOUN,
                          "listing" if need_list else "watch", message, delay)
            self._stop.wait(delay)
        self._log.debug("%s watch thread stopped", self.NOUN)

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
            self._log.warning("%s watch is down (%s); serving what it holds for up to %.0fs more "
                              "(max-stale %gs from the last word of the API server)", self.NOUN,
                              reason, left, self.max_stale)

    def _relist(self) -> None:
        store: dict[str, T] = {}
        token: str | None = None
        resource_version = None
        while True:
            self._check_stop()
            response = self._list_call(limit=self.page_size, _continue=token,
                                       _preload_content=False, _headers=self._list_headers,
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
            self._replaced()
            # the watch that follows at once brings its own deadline
            self._state = (True, True, now, now + min(STREAM_GRACE, self.max_stale))
        self._unreachable_since = None
        self._synced.set()
        self._alive()
        self._resized(len(store))
        self._log.info("listed %d %ss at resourceVersion %s", len(store), self.NOUN,
                       resource_version)

    def _list_timeout(self) -> tuple[float, float]:
        connect, read = self.request_timeout
        return connect, max(read, 30.0)  # a page of 500 objects from a busy API server

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
            response = self._list_call(
                watch=True, resource_version=self._resource_version, allow_watch_bookmarks=True,
                timeout_seconds=timeout, _preload_content=False, _headers=self._watch_headers,
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
                self._log.info("%s watch is back at resourceVersion %s", self.NOUN,
                               self._resource_version)
            self._state = (True, synced, now, now + min(timeout + grace, self.max_stale))
            self._alive()
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
        else:
            self._log.warning("%s watch: ignoring event of type %r", self.NOUN, kind)
            return
        with self._lock:
            self._changed(name, kind == "DELETED")
        self._resized(len(self._store))
        if resource_version:
            self._resource_version = resource_version
        self._proved()

    def _proved(self) -> None:
        """The stream just showed the store current: a proof of life."""
        live, synced, _, trusted_until = self._state
        self._state = (live, synced, self._clock(), trusted_until)
        self._alive()

    def _put(self, store: dict[str, T], obj: dict[str, Any]) -> None:
        name = (obj.get("metadata") or {}).get("name")
        if name:
            store[name] = self.keep(obj)

    def _check_stop(self) -> None:
        if self._stop.is_set():
            raise _Stopped()


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


def describe_api_error(e: BaseException) -> str:
    if isinstance(e, kubernetes.client.ApiException):
        if e.status:
            return f"HTTP {e.status} {e.reason or ''}".strip()
        return " ".join(str(e.reason or e).split())
    if isinstance(e, urllib3.exceptions.MaxRetryError) and e.reason is not None:
        return describe_api_error(e.reason)
    if isinstance(e, urllib3.exceptions.NewConnectionError):
        return f"cannot connect to {e.conn.host}:{e.conn.port}" if getattr(e, "conn", None) \
            else "cannot connect"
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text}" if text else type(e).__name__
