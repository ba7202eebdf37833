"""Owns the file namespace source: Namespace objects read from YAML, reloaded on change."""

from __future__ import annotations

import logging
import os
from typing import Any

import yaml

from app import metrics
from app.watch import FileWatcher, process_watcher, stat_signature

from .source import Labels, Namespace, NamespacesFileError, kept_annotations

log = logging.getLogger("poolkeeper.namespaces")


def parse_namespaces(text: str) -> dict[str, Namespace]:
    """Namespace name -> its labels and kept annotations, from YAML: a ``kind: List`` (``kubectl
    get ns -o yaml``), a multi-document stream, or a single Namespace. Raises ValueError or
    yaml.YAMLError."""
    result: dict[str, Namespace] = {}
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


def _add_namespace(result: dict[str, Namespace], obj: Any, where: str, *,
                   kind_optional: bool) -> None:
    if not isinstance(obj, dict):
        raise ValueError(f"{where}: expected a Namespace object")
    kind = obj.get("kind")
    if kind != "Namespace" and not (kind_optional and kind is None):
        raise ValueError(f"{where}: kind is {kind!r}, expected Namespace or List")
    metadata = obj.get("metadata")
    if not isinstance(metadata, dict):
        metadata = {}
    name = metadata.get("name")
    if not isinstance(name, str) or not name:
        raise ValueError(f"{where}: metadata.name is missing")
    labels = metadata.get("labels") or {}
    if not isinstance(labels, dict):
        raise ValueError(f"{where} ({name}): metadata.labels is not a map")
    for key, value in labels.items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise ValueError(f"{where} ({name}): label {key!r}: {value!r} is not a string "
                             "(quote values such as 'true' or '1')")
    result[name] = Namespace(dict(labels), kept_annotations(metadata))


class FileNamespaces:
    """Namespaces read from a YAML file, reloaded when the file changes.

    The file watcher (default: this process's, :mod:`app.watch`) notices a change of mtime,
    size or inode (e.g. a ConfigMap's symlink swap) off the request path; lookups only read a
    dict. A reload that fails keeps the previous data and logs an error once per change. A file
    that is invalid at start raises :class:`NamespacesFileError` from the constructor.
    """

    def __init__(self, path: str | os.PathLike[str], *,
                 watcher: FileWatcher | None = None) -> None:
        self.path = os.fspath(path)
        signature = stat_signature(self.path)
        try:
            self._namespaces = self._read()
        except (OSError, ValueError, yaml.YAMLError) as e:
            raise NamespacesFileError(f"namespaces file {self.path}: {_describe(e)}") from e
        metrics.NAMESPACE_CACHE_SIZE.set(len(self._namespaces))
        log.info("loaded %d namespaces from %s", len(self._namespaces), self.path)
        (watcher or process_watcher()).watch(f"namespaces file {self.path}",
                                             lambda: stat_signature(self.path), self._reload,
                                             initial=signature)

    def namespace(self, name: str) -> Namespace | None:
        namespace = self._namespaces.get(name)
        (metrics.LOOKUP_MISS if namespace is None else metrics.LOOKUP_HIT).inc()
        return namespace

    def labels(self, name: str) -> Labels | None:
        namespace = self.namespace(name)
        return None if namespace is None else dict(namespace.labels)

    def ready(self) -> bool:
        return True  # the constructor fails unless the first load succeeded

    def start(self) -> None:
        """Nothing to start: the file watcher belongs to the process (app.factory starts it)."""

    def stop(self) -> None:
        """Nothing to stop."""

    def _read(self) -> dict[str, Namespace]:
        with open(self.path, encoding="utf-8") as f:
            return parse_namespaces(f.read())

    def _reload(self) -> None:
        try:
            namespaces = self._read()
        except (OSError, ValueError, yaml.YAMLError) as e:
            log.error("namespaces file %s changed but cannot be loaded: %s; keeping the %d "
                      "namespaces loaded before", self.path, _describe(e), len(self._namespaces))
            return
        self._namespaces = namespaces
        metrics.NAMESPACE_CACHE_SIZE.set(len(namespaces))
        log.info("reloaded %d namespaces from %s", len(namespaces), self.path)


def _describe(e: BaseException) -> str:
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    return " ".join(str(e).split()) or type(e).__name__
