"""Owns file watching: one thread per process notices changed files and calls their owners back.

The serving certificate, the namespaces file and the rules directory are all reloaded when they
change on disk (a Secret or ConfigMap volume swaps its ``..data`` symlink). Each owner registers
a *signature* (what ``stat`` says of its files) and a callback; :class:`FileWatcher` compares the
signatures at most once per ``interval`` on its own daemon thread, never on the request path,
and calls the callback of each watch whose signature changed. A callback that fails is logged
and retried only when the files change again: the owner keeps what it had loaded before.

Threads do not survive ``fork``: :func:`process_watcher` gives each process (each gunicorn
worker) its own watcher, started by its owner in that process.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable, Hashable, Iterable

log = logging.getLogger("poolkeeper.watch")

# What ``os.stat`` says of a file that matters for "did it change": mtime, size, inode, device.
# Following symlinks, so a Kubernetes volume's ..data swap changes the inode.
StatSignature = tuple[int, int, int, int] | None

INTERVAL = 1.0  # seconds between checks: at most one stat per file per second


def stat_signature(path: str | os.PathLike[str]) -> StatSignature:
    """The file's (mtime_ns, size, inode, device), or None when it cannot be stat'ed."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_mtime_ns, st.st_size, st.st_ino, st.st_dev


def paths_signature(paths: Iterable[str | os.PathLike[str]]) -> tuple[StatSignature, ...]:
    return tuple(stat_signature(p) for p in paths)


class Watch:
    """One registration: a signature function and the callback for when it changes."""

    __slots__ = ("name", "signature", "on_change", "last")

    def __init__(self, name: str, signature: Callable[[], Hashable],
                 on_change: Callable[[], None], initial: Hashable) -> None:
        self.name = name
        self.signature = signature
        self.on_change = on_change
        self.last = initial


class FileWatcher:
    """Checks every registered watch once per ``interval`` on one daemon thread.

    Registering starts nothing: ``start()`` starts the thread (the app's wiring does, in the
    worker). ``check()`` runs one pass on the caller's thread (tests call it instead of waiting).
    """

    def __init__(self, interval: float = INTERVAL) -> None:
        self.interval = interval
        self._watches: list[Watch] = []
        self._lock = threading.Lock()  # one pass at a time; guards the list
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def watch(self, name: str, signature: Callable[[], Hashable],
              on_change: Callable[[], None], *, initial: Hashable = None) -> Watch:
        """Call ``on_change`` whenever ``signature()`` differs from the last value seen.

        ``initial`` is the signature of what the owner has loaded (so a change between its load
        and this call is not missed); by default the signature now.
        """
        entry = Watch(name, signature, on_change,
                      signature() if initial is None else initial)
        with self._lock:
            self._watches.append(entry)
        return entry

    def unwatch(self, entry: Watch) -> None:
        with self._lock:
            if entry in self._watches:
                self._watches.remove(entry)

    def check(self) -> int:
        """One pass over every watch; returns how many changed."""
        changed = 0
        with self._lock:
            for entry in list(self._watches):
                try:
                    signature = entry.signature()
                except Exception:  # a bug in an owner must not stop the others
                    log.exception("watch %s: cannot compute its signature", entry.name)
                    continue
                if signature == entry.last:
                    continue
                entry.last = signature  # a broken change is reported once, not every second
                changed += 1
                try:
                    entry.on_change()
                except Exception:
                    log.exception("watch %s: reloading after a change failed", entry.name)
        return changed

    def start(self) -> None:
        """Start the thread (idempotent)."""
        with self._lock:
            if self._thread is not None and self._thread.is_alive():
                return
            self._stop.clear()
            self._thread = threading.Thread(target=self._run, name="poolkeeper-file-watch",
                                            daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        thread = self._thread
        if thread is not None:
            thread.join(timeout)
        self._thread = None

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.check()


_process: tuple[int, FileWatcher] | None = None
_process_lock = threading.Lock()


def process_watcher() -> FileWatcher:
    """This process's watcher (a forked worker gets a new one: threads do not survive fork)."""
    global _process
    pid = os.getpid()
    held = _process
    if held is not None and held[0] == pid:
        return held[1]
    with _process_lock:
        if _process is None or _process[0] != pid:
            _process = (pid, FileWatcher())
        return _process[1]
