"""The file watcher: changes noticed off the request path, once per change, callbacks isolated."""

from __future__ import annotations

import logging
import os
import threading
import time

from app.watch import FileWatcher, paths_signature, process_watcher, stat_signature


def test_watch_calls_back_once_per_change(tmp_path):
    path = tmp_path / "f"
    path.write_text("a")
    calls = []
    watcher = FileWatcher()
    watcher.watch("f", lambda: stat_signature(path), lambda: calls.append(path.read_text()))
    assert watcher.check() == 0 and calls == []
    path.write_text("bb")
    assert watcher.check() == 1 and calls == ["bb"]
    assert watcher.check() == 0 and calls == ["bb"]
    path.unlink()
    assert watcher.check() == 1  # gone is a change too; the owner decides what it means


def test_watch_a_failing_callback_is_logged_and_does_not_stop_the_others(tmp_path, caplog):
    first, second = tmp_path / "a", tmp_path / "b"
    first.write_text("1")
    second.write_text("1")
    seen = []
    watcher = FileWatcher()

    def broken():
        raise RuntimeError("cannot reload")

    watcher.watch("a", lambda: stat_signature(first), broken)
    watcher.watch("b", lambda: stat_signature(second), lambda: seen.append("b"))
    first.write_text("22")
    second.write_text("22")
    with caplog.at_level(logging.ERROR, "poolkeeper.watch"):
        assert watcher.check() == 2
        assert watcher.check() == 0  # reported once per change, not every pass
    assert seen == ["b"]
    assert [r.getMessage() for r in caplog.records] == ["watch a: reloading after a change failed"]


def test_watch_thread_notices_a_change_within_seconds(tmp_path):
    path = tmp_path / "f"
    path.write_text("a")
    changed = threading.Event()
    watcher = FileWatcher(interval=0.05)
    watcher.watch("f", lambda: paths_signature([path]), changed.set)
    watcher.start()
    try:
        path.write_text("bb")
        assert changed.wait(10), "the watcher thread did not notice the change"
    finally:
        watcher.stop()


def test_watch_stat_signature_follows_symlinks(tmp_path):
    (tmp_path / "v1").write_text("one")
    (tmp_path / "v2").write_text("two")
    link = tmp_path / "link"
    link.symlink_to("v1")
    before = stat_signature(link)
    tmp = tmp_path / "tmp"
    tmp.symlink_to("v2")
    os.replace(tmp, link)
    assert stat_signature(link) != before
    assert stat_signature(tmp_path / "missing") is None


def test_watch_each_process_gets_its_own_watcher(monkeypatch):
    parent = process_watcher()
    assert process_watcher() is parent
    monkeypatch.setattr(os, "getpid", lambda: -1)  # as a forked worker would see it
    assert process_watcher() is not parent


def test_watch_stop_ends_the_thread_promptly():
    watcher = FileWatcher(interval=30)
    watcher.start()
    started = time.monotonic()
    watcher.stop()
    assert time.monotonic() - started < 5
