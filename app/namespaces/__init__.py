"""Owns namespace lookup: the choice of source, and its protocol and errors (re-exported).

Every source answers ``namespace(name)``: a :class:`Namespace` record of the namespace's labels
and the annotations the rules read (``labels(name)``: the labels alone), ``None`` when the
namespace does not exist, or :class:`NamespaceLookupError` when the answer cannot be known right
now (the webhook then answers 500 so the webhook's ``failurePolicy`` decides). The protocol, the
record and the errors live in :mod:`app.namespaces.source` and are re-exported here. The
sources:

- :mod:`app.namespaces.file`: ``FileNamespaces``, Namespace objects read from a YAML file;
- :mod:`app.namespaces.informer`: ``KubeNamespaces``, the API server's namespaces, listed and
  watched into a store, with GETs and a bounded stale fallback.

The submodules are imported when a source is made, so importing this package (or the file source
alone) does not load the kubernetes client.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from app.config import Settings

from .source import (
    KEPT_ANNOTATIONS,
    Labels,
    Namespace,
    NamespaceLookupError,
    NamespacesFileError,
    NamespaceSource,
)

if TYPE_CHECKING:
    import kubernetes.client

    from app.watch import FileWatcher

__all__ = ["KEPT_ANNOTATIONS", "Labels", "Namespace", "NamespaceLookupError", "NamespaceSource",
           "NamespacesFileError", "namespace_source"]


def namespace_source(settings: Settings,
                     api_client: kubernetes.client.ApiClient | None = None,
                     watcher: FileWatcher | None = None) -> NamespaceSource:
    """The source the settings ask for: the namespaces file if given, else the API server.

    ``api_client`` is a client already built (e.g. shared with the event recorder), which its
    owner closes; without one, a client is built from ``settings.kubeconfig`` and the source
    closes it on ``stop()``. A namespaces file is watched by ``watcher`` (default: the
    process's). Nothing is started.
    """
    if settings.namespaces_file:
        from .file import FileNamespaces
        return FileNamespaces(settings.namespaces_file, watcher=watcher)
    from .informer import KubeNamespaces
    owns_client = api_client is None
    if api_client is None:
        from app.kube import load_api_client
        api_client = load_api_client(settings.kubeconfig)
    return KubeNamespaces(api_client, cache_ttl=settings.cache_ttl, max_stale=settings.max_stale,
                          owns_client=owns_client)
