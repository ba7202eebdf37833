"""Owns poolkeeper's settings: one frozen object, read from options or the environment.

Every setting has a command-line option and a ``POOLKEEPER_*`` environment variable (for the
container); the option wins. All problems are reported together at start-up in one
:class:`ConfigError`.
"""

from __future__ import annotations

import os
import re
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from typing import Any

ENV_PREFIX = "POOLKEEPER_"

# The API server limits a stored object to 3 MiB (etcd's request limit is 1.5 MiB by default, the
# apiserver's own decoder 3 MiB); an UPDATE review carries two objects plus the envelope.
MAX_BODY_BYTES = 7 * 1024 * 1024


class ConfigError(ValueError):
    """A setting is invalid; the message lists every problem found."""


@dataclass(frozen=True)
class Settings:
    # serving
    host: str = "0.0.0.0"
    port: int = 8443
    cert_dir: str = "/etc/poolkeeper/tls"
    workers: int = 0  # 0: one per usable core, at least 2
    threads: int = 4
    keepalive: int = 75  # seconds; above the API server's idle-connection reuse, below LB defaults
    log_level: str = "info"
    # plain-HTTP GET /metrics on its own port, so a NetworkPolicy can admit only Prometheus to it
    # (0: none)
    metrics_port: int = 9090
    # certificates: with manage_certs, poolkeeper keeps the CA and serving pair in cert_secret
    # (NS/NAME; the Service is `service` in that namespace) and the caBundle of every webhook of
    # the MutatingWebhookConfiguration webhook_configuration (app/certmanager.py)
    manage_certs: bool = False
    cert_secret: str = "poolkeeper-system/poolkeeper-tls"
    service: str = "poolkeeper"
    webhook_configuration: str = "poolkeeper"
    cert_days: int = 365  # lifetime of a pair it issues; renewed after two thirds of it
    cert_overlap: float = 3600.0  # seconds the caBundle still trusts the CA before a renewal
    # namespace source
    namespaces_file: str | None = None  # embedded source instead of the API server
    kubeconfig: str | None = None  # default: in-cluster, else $KUBECONFIG / ~/.kube/config
    cache_ttl: float = 30.0  # seconds a GET result is trusted while the watch is down
    max_stale: float = 300.0  # seconds cached labels may be served while the API server fails
    # rules/*.yaml to enforce; None: the rules shipped beside the package
    rules_dir: str | None = None
    # seconds between drift audits by the one process the audit Lease elects; 0: no audit.
    # Only with namespaces from the API server.
    audit_interval: float = 0.0

    def resolved_workers(self) -> int:
        # A review is CPU-bound Python (the worker's poller does the waiting on clients), so
        # more processes than cores only time-slice them: with five workers on two cores the
        # served p99 at 32 connections was 2-3 x that of two (bench/README.md). Two at least, so
        # one still serves while the other restarts.
        if self.workers:
            return self.workers
        affinity = getattr(os, "sched_getaffinity", None)  # Linux; macOS has none
        cores = len(affinity(0)) if affinity is not None else os.cpu_count() or 1
        return max(2, cores)

    @property
    def secret_namespace(self) -> str:
        return self.cert_secret.partition("/")[0]

    @property
    def secret_name(self) -> str:
        return self.cert_secret.partition("/")[2]


_LOG_LEVELS = ("debug", "info", "warning", "error")
# k8s.io/apimachinery/pkg/util/validation: IsDNS1123Label (namespaces), IsDNS1035Label
# (Services), IsDNS1123Subdomain (most object names), each within its length limit.
_DNS1123_LABEL = re.compile(r"^(?=.{1,63}$)[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_DNS1035_LABEL = re.compile(r"^(?=.{1,63}$)[a-z]([-a-z0-9]*[a-z0-9])?$")
_DNS1123_SUBDOMAIN = re.compile(
    r"^(?=.{1,253}$)[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
# Field name -> its type (the annotations are strings under `from __future__ import annotations`).
_FIELD_TYPES: dict[str, Any] = typing.get_type_hints(Settings)


def _type_name(typ: Any) -> str:
    return " | ".join(getattr(t, "__name__", str(t)) for t in typing.get_args(typ)) \
        if isinstance(typ, types.UnionType) else typ.__name__


_TRUE, _FALSE = ("true", "1", "yes"), ("false", "0", "no", "")


def _convert(raw: Any, typ: Any) -> Any:
    """``raw`` (an option's value, or an environment variable's text) as the field's type:
    int, float, str or bool (true/false, 1/0, yes/no), or ``X | None`` where an empty string
    means None."""
    allowed = typing.get_args(typ) if isinstance(typ, types.UnionType) else (typ,)
    base = next(t for t in allowed if t is not type(None))
    if raw == "" and type(None) in allowed:
        return None
    if base is bool:
        if isinstance(raw, bool):
            return raw
        text = str(raw).strip().lower()
        if text not in _TRUE + _FALSE:
            raise ValueError(raw)
        return text in _TRUE
    return base(raw)


def load_settings(options: Mapping[str, Any] | None = None,
                  environ: Mapping[str, str] | None = None) -> Settings:
    """Settings from explicit options (None = not given) over ``POOLKEEPER_*`` variables."""
    options = dict(options or {})
    environ = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    problems: list[str] = []
    known = {f.name: f for f in fields(Settings)}
    for name in options:
        if name not in known:
            problems.append(f"unknown setting {name!r}")
    for name in known:
        raw = options.get(name)
        source = f"--{name.replace('_', '-')}"
        if raw is None and ENV_PREFIX + name.upper() in environ:
            raw = environ[ENV_PREFIX + name.upper()]
            source = ENV_PREFIX + name.upper()
        if raw is None:
            continue
        try:
            values[name] = _convert(raw, _FIELD_TYPES[name])
        except (TypeError, ValueError):
            problems.append(f"{source}: {raw!r} is not a valid {_type_name(_FIELD_TYPES[name])}")
    settings = replace(Settings(), **values)
    problems.extend(_validate(settings))
    if problems:
        raise ConfigError("invalid configuration: " + "; ".join(problems))
    return settings


def _validate(s: Settings) -> list[str]:
    problems = []
    if not 0 < s.port < 65536:
        problems.append(f"port: {s.port} is not in 1..65535")
    if not 0 <= s.metrics_port < 65536:
        problems.append(f"metrics-port: {s.metrics_port} is not in 1..65535 (0: none)")
    elif s.metrics_port == s.port:
        problems.append(f"metrics-port: {s.metrics_port} is the webhook port too")
    namespace, slash, name = s.cert_secret.partition("/")
    if not (slash and _DNS1123_LABEL.match(namespace) and _DNS1123_SUBDOMAIN.match(name)):
        problems.append(f"cert-secret: {s.cert_secret!r} is not NAMESPACE/NAME")
    if not _DNS1035_LABEL.match(s.service):
        problems.append(f"service: {s.service!r} is not a valid Service name (lowercase "
                        "letters, digits and '-', starting with a letter, <= 63)")
    if not _DNS1123_SUBDOMAIN.match(s.webhook_configuration):
        problems.append(f"webhook-configuration: {s.webhook_configuration!r} is not a valid "
                        "object name")
    if s.cert_days < 1:
        problems.append(f"cert-days: {s.cert_days} must be >= 1")
    if s.cert_overlap <= 0:
        problems.append(f"cert-overlap: {s.cert_overlap} must be > 0 seconds")
    if s.workers < 0:
        problems.append(f"workers: {s.workers} must be >= 0 (0 means one per usable core, "
                        "at least 2)")
    if s.threads < 1:
        problems.append(f"threads: {s.threads} must be >= 1")
    if s.keepalive < 1:
        problems.append(f"keepalive: {s.keepalive} must be >= 1 second")
    if s.log_level not in _LOG_LEVELS:
        problems.append(f"log-level: {s.log_level!r} is not one of {', '.join(_LOG_LEVELS)}")
    if s.cache_ttl <= 0 or s.max_stale < s.cache_ttl:
        problems.append(f"cache-ttl ({s.cache_ttl}) must be > 0 and <= max-stale ({s.max_stale})")
    if s.audit_interval != 0 and s.audit_interval < 1:
        problems.append(f"audit-interval: {s.audit_interval:g} must be 0 (off) or at least 1 "
                        "second")
    if s.rules_dir is not None and not os.path.isdir(s.rules_dir):
        problems.append(f"rules: {s.rules_dir!r} is not a directory")
    if s.namespaces_file is not None and not os.path.isfile(s.namespaces_file):
        problems.append(f"namespaces: {s.namespaces_file!r} is not a readable file")
    return problems
