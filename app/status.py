"""Owns ``poolkeeper status``: which rule set each replica (each serving process) enforces, since
when, and whether every live one enforces the rules of a directory.

The replicas' records are Leases (:mod:`app.leases`) in poolkeeper's namespace. A record not
renewed within its ``leaseDurationSeconds`` belongs to a process that died without deleting it:
it is shown as ``expired`` and not counted.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import orjson
import yaml

from .leases import Replica, parse_time


def _when(unix: float | None) -> str:
    if unix is None:
        return "-"
    return datetime.fromtimestamp(unix, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _ago(unix: float | None, now: float) -> str:
    if unix is None:
        return "never"
    seconds = max(0, round(now - unix))
    if seconds < 120:
        return f"{seconds}s ago"
    if seconds < 7200:
        return f"{seconds // 60}m ago"
    return f"{seconds // 3600}h ago"


@dataclass(frozen=True)
class Status:
    directory: str
    digest: str  # of the rules in ``directory``
    replicas: list[Replica]
    auditor: str  # holder of the audit Lease, "" when none
    auditor_renewed_at: float | None
    now: float

    def live(self) -> list[Replica]:
        return [r for r in self.replicas if r.live(self.now)]

    @property
    def agreed(self) -> bool:
        live = self.live()
        return bool(live) and all(r.digest == self.digest for r in live)

    def state(self, replica: Replica) -> str:
        if not replica.live(self.now):
            return "expired"
        return "agrees" if replica.digest == self.digest else "differs"

    def to_dict(self) -> dict[str, Any]:
        return {
            "rules": {"directory": self.directory, "digest": self.digest},
            "agreed": self.agreed,
            "replicas": [{"pod": r.pod, "pid": r.pid, "digest": r.digest,
                          "loadedAt": _when(r.loaded_at), "renewedAt": _when(r.renewed_at),
                          "state": self.state(r), "version": r.version}
                         for r in self.replicas],
            "auditor": ({"holder": self.auditor, "renewedAt": _when(self.auditor_renewed_at)}
                        if self.auditor else None),
        }


def render(status: Status, output: str = "table") -> str:
    if output == "json":
        return orjson.dumps(status.to_dict(), option=orjson.OPT_INDENT_2).decode() + "\n"
    if output == "yaml":
        return yaml.safe_dump(status.to_dict(), sort_keys=False)
    lines = []
    if status.replicas:
        header = ["POD", "PID", "RULES DIGEST", "LOADED", "RENEWED", "STATE"]
        rows = [[r.pod, r.pid, r.digest[:12] or "-", _when(r.loaded_at),
                 _ago(r.renewed_at, status.now), status.state(r)] for r in status.replicas]
        widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
        lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True))
                 .rstrip() for row in [header, *rows]]
    live = status.live()
    agreeing = sum(r.digest == status.digest for r in live)
    if not live:
        lines.append("no live replica records: is poolkeeper running here, with namespaces from "
                     "the API server?")
    verdict = "all enforce them" if status.agreed else "not all enforce them yet"
    lines.append(f"rules {status.directory} (digest {status.digest[:12]}): {agreeing} of "
                 f"{len(live)} live replicas enforce them; {verdict}")
    if status.auditor:
        lines.append(f"auditor: {status.auditor} (renewed "
                     f"{_ago(status.auditor_renewed_at, status.now)})")
    return "\n".join(lines) + "\n"


def command(args: Any) -> int:
    """``poolkeeper status``: 0 when every live replica enforces ``--rules``, 1 when one does
    not (or none is live), 2 when the rules or the records cannot be read."""
    from .config import ConfigError
    from .kube import load_api_client
    from .leases import API_ERRORS, AUDIT_LEASE, LeaseApi, describe_error, list_replicas
    from .rules import SHIPPED_RULES, load_rule_set

    directory = str(args.rules_dir or SHIPPED_RULES)
    try:
        digest = load_rule_set(directory).digest
        client = load_api_client(args.kubeconfig)
        try:
            api = LeaseApi(client)
            replicas = list_replicas(api, args.namespace)
            lease = api.get(args.namespace, AUDIT_LEASE) or {}
        finally:
            client.close()
    except ConfigError as e:
        print(f"poolkeeper status: {e}", file=sys.stderr)
        return 2
    except API_ERRORS as e:
        print(f"poolkeeper status: cannot read the replica records in namespace "
              f"{args.namespace}: {describe_error(e)}", file=sys.stderr)
        return 2
    spec = lease.get("spec") or {}
    renewed = parse_time(spec.get("renewTime"))
    holder = spec.get("holderIdentity") or ""
    duration = spec.get("leaseDurationSeconds") or 0
    now = time.time()
    if renewed is None or now - renewed > duration:
        holder = ""  # released, or its holder is gone
    status = Status(directory, digest, replicas, holder, renewed, now)
    sys.stdout.write(render(status, args.output))
    return 0 if status.agreed else 1
