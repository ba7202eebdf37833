"""FileNamespaces: the embedded namespace source read from YAML."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest

from app.config import ConfigError, Settings
from app.namespaces import Namespace, NamespacesFileError, NamespaceSource, namespace_source
from app.namespaces.file import FileNamespaces
from app.watch import FileWatcher

LIST = """\
apiVersion: v1
kind: List
items:
- apiVersion: v1
  kind: Namespace
  metadata:
    name: team-a
    labels: {kubernetes.io/metadata.name: team-a, agentpool: pool1}
- apiVersion: v1
  kind: Namespace
  metadata:
    name: bare
metadata:
  resourceVersion: ""
"""

MULTI = """\
apiVersion: v1
kind: Namespace
metadata: {name: team-a, labels: {agentpool: pool1}}
---
apiVersion: v1
kind: Namespace
metadata: {name: team-b, labels: {agentpool: pool2}}
---
"""

SINGLE = """\
apiVersion: v1
kind: Namespace
metadata:
  name: solo
  labels:
    agentpool: "1"
"""


def write(path: Path, text: str) -> Path:
    """Write and make sure the change is visible by signature even on coarse-mtime filesystems."""
    before = path.stat() if path.exists() else None
    path.write_text(text)
    if before is not None and path.stat().st_mtime_ns == before.st_mtime_ns:
        os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns + 1_000_000_000))
    return path


@pytest.fixture
def watcher() -> FileWatcher:
    return FileWatcher()  # never started: tests run its passes with check()


def test_file_namespaces_reads_a_kubectl_list(tmp_path):
    source = FileNamespaces(write(tmp_path / "ns.yaml", LIST))
    assert isinstance(source, NamespaceSource)
    assert source.ready()
    assert source.labels("team-a") == {"kubernetes.io/metadata.name": "team-a",
                                       "agentpool": "pool1"}
    assert source.labels("bare") == {}


def test_file_namespaces_reads_a_multi_document_stream(tmp_path):
    source = FileNamespaces(write(tmp_path / "ns.yaml", MULTI))
    assert source.labels("team-a") == {"agentpool": "pool1"}
    assert source.labels("team-b") == {"agentpool": "pool2"}


def test_file_namespaces_reads_a_single_namespace(tmp_path):
    source = FileNamespaces(write(tmp_path / "ns.yaml", SINGLE))
    assert source.labels("solo") == {"agentpool": "1"}


def test_file_namespaces_unknown_name_is_none(tmp_path):
    source = FileNamespaces(write(tmp_path / "ns.yaml", LIST))
    assert source.labels("nope") is None


def test_file_namespaces_start_and_stop_are_harmless(tmp_path):
    source = FileNamespaces(write(tmp_path / "ns.yaml", LIST))
    source.start()
    source.start()
    assert source.labels("team-a")["agentpool"] == "pool1"
    source.stop()
    source.stop()


def test_file_namespaces_keep_only_poolkeeper_annotations(tmp_path):
    text = """\
apiVersion: v1
kind: Namespace
metadata:
  name: team-ml
  labels: {agentpool: pool1}
  annotations:
    poolkeeper.io/allowed-pools: gpu,shared
    kubectl.kubernetes.io/last-applied-configuration: '{"a": "big blob"}'
    poolkeeper.io/odd: 5
---
apiVersion: v1
kind: Namespace
metadata: {name: plain, annotations: {example.com/note: x}}
"""
    source = FileNamespaces(write(tmp_path / "ns.yaml", text))
    assert source.namespace("team-ml") == Namespace({"agentpool": "pool1"},
                                                    {"poolkeeper.io/allowed-pools": "gpu,shared"})
    assert source.namespace("plain") == Namespace({})
    assert source.namespace("nope") is None
    assert source.labels("team-ml") == {"agentpool": "pool1"}


def test_file_namespaces_returns_copies(tmp_path):
    source = FileNamespaces(write(tmp_path / "ns.yaml", LIST))
    source.labels("team-a")["agentpool"] = "mutated"
    assert source.labels("team-a")["agentpool"] == "pool1"


def reloads(caplog: pytest.LogCaptureFixture) -> int:
    return sum(1 for r in caplog.records if r.getMessage().startswith("reloaded "))


def test_file_namespaces_picks_up_a_change(tmp_path, watcher, caplog):
    path = write(tmp_path / "ns.yaml", LIST)
    source = FileNamespaces(path, watcher=watcher)
    write(path, MULTI)
    with caplog.at_level(logging.INFO, logger="poolkeeper.namespaces"):
        # until the watcher notices, lookups answer from what was loaded
        assert source.labels("team-b") is None
        watcher.check()
        assert source.labels("team-b") == {"agentpool": "pool2"}
        assert source.labels("bare") is None
        watcher.check()
        assert source.labels("team-b") == {"agentpool": "pool2"}  # unchanged: not read again
    assert reloads(caplog) == 1


def test_file_namespaces_picks_up_a_replaced_file(tmp_path, watcher):
    # how a mounted ConfigMap changes: a new file renamed over the old one (new inode)
    path = write(tmp_path / "ns.yaml", LIST)
    source = FileNamespaces(path, watcher=watcher)
    write(tmp_path / "new.yaml", SINGLE)
    os.replace(tmp_path / "new.yaml", path)
    watcher.check()
    assert source.labels("solo") == {"agentpool": "1"}
    assert source.labels("team-a") is None


def test_file_namespaces_broken_reload_keeps_old_data(tmp_path, watcher, caplog):
    path = write(tmp_path / "ns.yaml", LIST)
    source = FileNamespaces(path, watcher=watcher)
    write(path, "items: [unclosed\n")
    watcher.check()
    with caplog.at_level(logging.ERROR, logger="poolkeeper.namespaces"):
        assert source.labels("team-a")["agentpool"] == "pool1"
        watcher.check()
        assert source.labels("team-a")["agentpool"] == "pool1"  # reported once, not every second
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1 and str(path) in errors[0].getMessage()
    assert source.ready()
    # a later good version is loaded
    write(path, MULTI)
    watcher.check()
    assert source.labels("team-b") == {"agentpool": "pool2"}


def test_file_namespaces_deleted_file_keeps_old_data(tmp_path, watcher, caplog):
    path = write(tmp_path / "ns.yaml", LIST)
    source = FileNamespaces(path, watcher=watcher)
    path.unlink()
    watcher.check()
    assert source.labels("team-a")["agentpool"] == "pool1"
    assert any(str(path) in r.getMessage() for r in caplog.records if r.levelno == logging.ERROR)
    write(path, SINGLE)
    watcher.check()
    assert source.labels("solo") == {"agentpool": "1"}


@pytest.mark.parametrize("text, problem", [
    ("items: [unclosed\n", "ns.yaml"),
    ("- just\n- a list\n", "expected a Namespace or a List"),
    ("apiVersion: v1\nkind: Pod\nmetadata: {name: p}\n", "kind is 'Pod'"),
    ("kind: Namespace\nmetadata: {labels: {a: b}}\n", "metadata.name is missing"),
    ("kind: Namespace\nmetadata: {name: x, labels: {agentpool: 1}}\n", "is not a string"),
    ("kind: List\nitems: {a: b}\n", "'items' is not a list"),
])
def test_file_namespaces_invalid_at_start_raises(tmp_path, text, problem):
    path = write(tmp_path / "ns.yaml", text)
    with pytest.raises(NamespacesFileError) as info:
        FileNamespaces(path)
    assert str(path) in str(info.value)
    assert problem in str(info.value)
    assert isinstance(info.value, ConfigError)


def test_file_namespaces_missing_file_raises(tmp_path):
    with pytest.raises(NamespacesFileError, match="missing.yaml"):
        FileNamespaces(tmp_path / "missing.yaml")


def test_namespace_source_uses_the_file_when_given(tmp_path):
    source = namespace_source(Settings(namespaces_file=str(write(tmp_path / "ns.yaml", MULTI))))
    assert isinstance(source, FileNamespaces)
    assert source.labels("team-b") == {"agentpool": "pool2"}
