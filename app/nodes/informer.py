"""Owns the API server node source: node labels, listed and watched as metadata only.

:class:`KubeNodes` is a :class:`~app.listwatch.ListWatch` of nodes that keeps each node's labels
and nothing else. It asks for ``PartialObjectMetadata`` (what client-go's metadata informers
use), so the API server sends no status: no images, conditions or addresses, the bulk of a Node.
The watch starts on the first lookup, so it runs only where a rule checks pools (RBAC: nodes
get, list, watch). A lookup answers None (cannot know) before the first listing, which the first
lookup waits for a moment, and once the store was last known current more than ``max_stale``
ago.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import kubernetes.client

from app.listwatch import ListWatch

from . import pool_counts

log = logging.getLogger("poolkeeper.nodes")

# Listings as a PartialObjectMetadataList, watch events with PartialObjectMetadata objects (the
# API server refuses the one for the other); plain JSON from a server that serves neither.
_METADATA = "application/json;as=PartialObjectMetadata{};g=meta.k8s.io;v=v1, application/json"
METADATA_LIST, METADATA_EVENTS = _METADATA.format("List"), _METADATA.format("")


class KubeNodes(ListWatch[dict[str, str]]):
    """Labels of the API server's nodes; :meth:`pools` is the rules' node lookup."""

    NOUN = "node"

    def __init__(self, api_client: kubernetes.client.ApiClient, *, max_stale: float = 300.0,
                 clock: Callable[[], float] = time.monotonic, first_wait: float = 1.0,
                 **options: Any) -> None:
        api: Any = kubernetes.client.CoreV1Api(api_client)
        super().__init__(api_client, api.list_node, log=log, max_stale=max_stale, clock=clock,
                         list_headers={"Accept": METADATA_LIST},
                         watch_headers={"Accept": METADATA_EVENTS}, **options)
        # How long the first lookup waits for the first listing; the webhooks' timeoutSeconds
        # is 3 s, and the namespaces webhook, which asks, fails open.
        self.first_wait = first_wait

    def keep(self, obj: dict[str, Any]) -> dict[str, str]:
        return dict((obj.get("metadata") or {}).get("labels") or {})

    def pools(self, key: str) -> dict[str, int] | None:
        """How many nodes carry each value of label ``key``; None while that cannot be known."""
        self.start()  # idempotent: the watch runs from the first lookup on
        if not self.ready() and not self.wait_ready(self.first_wait):
            return None
        live, _, current_at, trusted_until = self._state
        now = self._clock()
        if not (live and now <= trusted_until) and now - current_at > self.max_stale:
            return None
        # A copy taken in one step: the watch thread changes the store meanwhile.
        return pool_counts(tuple(self._store.values()), key)
