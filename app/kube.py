"""Owns the kubernetes client configuration: the one place that decides how to reach the API."""

from __future__ import annotations

import logging
import os
from typing import Any

import kubernetes.client
import kubernetes.config
import orjson
import urllib3
import yaml

from app.config import ConfigError

log = logging.getLogger("poolkeeper.kube")

# Where the kubelet mounts the pod's service-account credentials (as client-go's InClusterConfig).
SERVICE_HOST_ENV = "KUBERNETES_SERVICE_HOST"
SERVICE_TOKEN_FILE = "/var/run/secrets/kubernetes.io/serviceaccount/token"
SERVICE_CA_FILE = "/var/run/secrets/kubernetes.io/serviceaccount/ca.crt"
DEFAULT_KUBECONFIG = "~/.kube/config"

# One immediate retry of a failed connect and none of reads, so a slow API server costs one read
# timeout, not four (urllib3's default is Retry(3) on everything). Callers back off themselves.
_RETRIES = urllib3.Retry(total=1, connect=1, read=0, redirect=0, status=0, other=0)


def json_body(response: Any) -> dict:
    """The JSON object of a ``_preload_content=False`` response ({} for anything else); the
    connection goes back to the pool either way."""
    try:
        body = orjson.loads(response.data)
    finally:
        response.release_conn()
    return body if isinstance(body, dict) else {}


class KubeConfigError(ConfigError):
    """No way to reach the Kubernetes API server could be configured."""


def load_api_client(kubeconfig: str | None = None) -> kubernetes.client.ApiClient:
    """A new ApiClient: the kubeconfig given, else in-cluster, else $KUBECONFIG / ~/.kube/config."""
    configuration = kubernetes.client.Configuration()
    if kubeconfig:
        _load_kubeconfig(kubeconfig, configuration, source=f"--kubeconfig {kubeconfig}")
        log.info("kubernetes API via kubeconfig %s", kubeconfig)
    elif os.environ.get(SERVICE_HOST_ENV) and os.path.isfile(SERVICE_TOKEN_FILE):
        loader = kubernetes.config.incluster_config.InClusterConfigLoader(
            token_filename=SERVICE_TOKEN_FILE, cert_filename=SERVICE_CA_FILE)
        try:
            loader.load_and_set(configuration)  # re-reads the (rotating) token every minute
        except kubernetes.config.ConfigException as e:
            raise KubeConfigError(f"in-cluster Kubernetes config is unusable: {e}") from e
        log.info("kubernetes API in-cluster at %s", configuration.host)
    else:
        env = os.environ.get("KUBECONFIG")
        paths = env or DEFAULT_KUBECONFIG
        source = f"$KUBECONFIG={env}" if env else DEFAULT_KUBECONFIG
        if not any(os.path.exists(os.path.expanduser(p)) for p in paths.split(os.pathsep) if p):
            raise KubeConfigError(
                "no Kubernetes API access: no --kubeconfig given, not running in a pod "
                f"({SERVICE_HOST_ENV} unset or no service-account token at {SERVICE_TOKEN_FILE}), "
                f"and no kubeconfig at {source}")
        _load_kubeconfig(paths, configuration, source=source)
        log.info("kubernetes API via kubeconfig %s", source)
    configuration.retries = _RETRIES
    # TCP keepalive as client-go dials it, so a watch through a silent middlebox is noticed.
    configuration.keep_alive = True
    return kubernetes.client.ApiClient(configuration)


def _load_kubeconfig(paths: str, configuration: kubernetes.client.Configuration, *,
                     source: str) -> None:
    if not any(os.path.isfile(os.path.expanduser(p)) for p in paths.split(os.pathsep) if p):
        raise KubeConfigError(f"kubeconfig not found: {source}")
    try:
        kubernetes.config.load_kube_config(config_file=paths, client_configuration=configuration,
                                           persist_config=False)
    except (kubernetes.config.ConfigException, yaml.YAMLError, OSError, ValueError, KeyError,
            TypeError, AttributeError) as e:
        raise KubeConfigError(f"kubeconfig {source} is unusable: {e}") from e
