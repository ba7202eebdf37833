"""Fixtures for integration/: poolkeeper installed in the cluster of the current kubectl context.

    make kind-start kind-deploy integration

Without a reachable cluster, or without poolkeeper installed in it, every test skips and says
why. `make test` never collects this directory (setup.cfg: testpaths = tests).
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator

import kubernetes.client
import pytest
import urllib3
from kubernetes.client.rest import ApiException

from app.config import ConfigError
from app.kube import load_api_client

from .support import NAMESPACE, wait_for


@pytest.fixture(scope="session")
def api() -> Iterator[kubernetes.client.ApiClient]:
    try:
        client = load_api_client()
    except ConfigError as exc:
        pytest.skip(f"no cluster: {exc}")
    try:
        kubernetes.client.CoreV1Api(client).list_namespace(limit=1, _request_timeout=5)
    except (urllib3.exceptions.HTTPError, OSError) as exc:
        client.close()
        pytest.skip(f"no reachable cluster in the current kubeconfig context "
                    f"({client.configuration.host}): {exc}")
    try:
        kubernetes.client.AdmissionregistrationV1Api(client) \
            .read_mutating_webhook_configuration("poolkeeper")
        kubernetes.client.AppsV1Api(client).read_namespaced_deployment("poolkeeper", NAMESPACE)
    except ApiException as exc:
        client.close()
        if exc.status == 404:
            pytest.skip("poolkeeper is not installed in this cluster: run make kind-deploy")
        raise
    yield client
    client.close()


@pytest.fixture(scope="session")
def core(api) -> kubernetes.client.CoreV1Api:
    return kubernetes.client.CoreV1Api(api)


@pytest.fixture(scope="session")
def apps(api) -> kubernetes.client.AppsV1Api:
    return kubernetes.client.AppsV1Api(api)


@pytest.fixture(scope="session")
def namespaces(core) -> Iterator[Callable[..., str]]:
    """make(**labels): a new namespace with these labels; all are deleted at the end."""
    made: list[str] = []

    def make(prefix: str = "pk-it", **labels: str) -> str:
        name = f"{prefix}-{uuid.uuid4().hex[:8]}"
        core.create_namespace({"metadata": {"name": name, "labels": labels}})
        made.append(name)
        return name

    yield make
    for name in made:
        try:
            core.delete_namespace(name)
        except ApiException as exc:
            if exc.status != 404:
                raise


@pytest.fixture(scope="session")
def pool1(namespaces) -> str:
    return namespaces("team-pool1", agentpool="pool1")


@pytest.fixture
def webhook_ready(apps) -> None:
    """All poolkeeper replicas ready (a test may have deleted one)."""
    def ready() -> bool:
        deployment = apps.read_namespaced_deployment("poolkeeper", NAMESPACE)
        wanted, status = deployment.spec.replicas, deployment.status
        return (status.replicas, status.updated_replicas, status.ready_replicas) == \
            (wanted, wanted, wanted)

    wait_for(ready, "every poolkeeper replica to be ready")
