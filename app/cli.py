"""Owns the ``poolkeeper`` command line: serve, mutate, test, certs, audit and status."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

from .config import ENV_PREFIX, ConfigError, Settings, load_settings

if TYPE_CHECKING:
    from .rules import Rule

DESCRIPTION = "poolkeeper: pins each namespace's pods to its node pool (mutating admission webhook)"


def _add_source_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--rules", dest="rules_dir", metavar="DIR",
                        help="directory of rule files (default: the shipped rules/)")
    group = parser.add_argument_group("namespace source")
    group.add_argument("--namespaces", dest="namespaces_file", metavar="FILE",
                       help="read Namespace objects from this YAML file instead of the API server")
    group.add_argument("--kubeconfig", metavar="FILE",
                       help="kubeconfig to use (default: in-cluster, else $KUBECONFIG)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="poolkeeper", description=DESCRIPTION)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = commands.add_parser("serve", help="serve the webhook over TLS with gunicorn")
    serve.add_argument("--host", help="address to listen on (default 0.0.0.0)")
    serve.add_argument("--port", type=int, help="port (default 8443)")
    serve.add_argument("--cert-dir", metavar="DIR",
                       help="directory with tls.crt and tls.key (default /etc/poolkeeper/tls)")
    serve.add_argument("--workers", type=int, metavar="N", help="worker processes "
                       "(default 2 x cores + 1)")
    serve.add_argument("--threads", type=int, metavar="N", help="threads per worker (default 4)")
    serve.add_argument("--keepalive", type=int, metavar="SECONDS",
                       help="idle keep-alive time (default 75)")
    serve.add_argument("--log-level", choices=("debug", "info", "warning", "error"))
    serve.add_argument("--cache-ttl", type=float, metavar="SECONDS",
                       help="trust a namespace GET this long while the watch is down "
                            "(default 30)")
    serve.add_argument("--max-stale", type=float, metavar="SECONDS",
                       help="serve cached labels this long while the API server fails, then "
                            "answer 500 (default 300)")
    serve.add_argument("--audit-interval", type=float, metavar="SECONDS",
                       help="audit drift this often, in the one process the audit Lease elects "
                            "(default 0: off; only with namespaces from the API server)")
    _add_source_options(serve)

    mutate = commands.add_parser(
        "mutate", help="show offline what poolkeeper does to an object",
        description="Print objects as poolkeeper would admit them. INPUT is YAML or JSON: a "
                    "Pod, a pod controller (Deployment, ReplicaSet, StatefulSet, DaemonSet, "
                    "Job, CronJob, ReplicationController), a Namespace, a kind: List or a "
                    "multi-document stream (as kubectl get -o yaml prints them; status and "
                    "managedFields are kept), or an AdmissionReview; '-' reads stdin. Output "
                    "has the input's shape. Denials go to stderr, naming the object when there "
                    "are several, and exit 1; unreadable input exits 2.")
    mutate.add_argument("input", metavar="INPUT")
    mutate.add_argument("--output", choices=("object", "review"), default="object",
                        help="object: the mutated object as YAML (default); review: the "
                             "AdmissionReview response")
    mutate.add_argument("--namespace", "-n", dest="object_namespace", metavar="NS",
                        help="namespace of the object when it names none (default 'default')")
    _add_source_options(mutate)

    test = commands.add_parser(
        "test", help="run golden rule cases, like kyverno test",
        description="Runs every case under DIR/<rule-name>/<case-name>/ against that rule from "
                    "--rules. Prints one line per case and 'N passed, N failed'; exits 1 on a "
                    "failure or when no case ran.")
    test.add_argument("cases", nargs="?", default=None, metavar="DIR",
                      help="default: testdata/rules")
    test.add_argument("--rules", dest="rules_dir", metavar="DIR",
                      help="directory of rule files (default: the shipped rules/)")

    certs = commands.add_parser("certs", help="create a CA and a serving certificate")
    certs.add_argument("--out", required=True, metavar="DIR")
    certs.add_argument("--service", default="poolkeeper", metavar="NAME")
    certs.add_argument("--namespace", default="poolkeeper-system", metavar="NS")
    certs.add_argument("--days", type=int, default=365, metavar="N")
    certs.add_argument("--force", action="store_true",
                       help="replace a valid existing pair")
    _add_cluster_commands(commands)
    return parser


def _add_cluster_commands(
        commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """``audit`` and ``status`` (app.audit, app.status): their own options, no Settings."""
    audit = commands.add_parser(
        "audit", help="list workloads whose placement drifts from their namespace's pool",
        description="Lists pods and DaemonSets whose placement disagrees with their namespace's "
                    "pool today, one line per workload. Reads the cluster of the kubeconfig, or "
                    "files with --namespaces and --pods. Exits 0 without drift, 1 with drift, "
                    "2 when it cannot audit.")
    audit.add_argument("--rules", dest="rules_dir", metavar="DIR",
                       help="rules whose PoolPlacement params judge (default: the shipped rules/)")
    audit.add_argument("--kubeconfig", metavar="FILE",
                       help="kubeconfig to use (default: in-cluster, else $KUBECONFIG)")
    audit.add_argument("--namespaces", dest="namespaces_file", metavar="FILE",
                       help="offline: Namespace objects (kubectl get ns -o yaml)")
    audit.add_argument("--pods", dest="pods_file", metavar="FILE",
                       help="offline: pods, with any DaemonSets and ReplicaSets "
                            "(kubectl get pods,ds,rs -A -o yaml)")
    audit.add_argument("--nodes", dest="nodes_file", metavar="FILE",
                       help="offline: nodes (kubectl get nodes -o yaml), to check node pools")
    audit.add_argument("-o", "--output", choices=("table", "json", "yaml"), default="table")
    audit.add_argument("--fix-hint", action="store_true",
                       help="add a FIX column with the command that resolves each line")
    audit.add_argument("--chunk-size", type=int, default=500, metavar="N",
                       help="objects per list request (default 500)")

    status = commands.add_parser(
        "status", help="show which rules each replica enforces",
        description="Lists every poolkeeper process's replica record (a Lease in --namespace): "
                    "the digest of the rules it enforces and when it loaded them. Exits 0 when "
                    "every live replica enforces the rules of --rules, 1 when one does not, 2 "
                    "when the records cannot be read.")
    status.add_argument("--rules", dest="rules_dir", metavar="DIR",
                        help="the rules the replicas should enforce (default: the shipped rules/)")
    status.add_argument("--kubeconfig", metavar="FILE",
                        help="kubeconfig to use (default: in-cluster, else $KUBECONFIG)")
    status.add_argument("--namespace", "-n", default="poolkeeper-system", metavar="NS",
                        help="poolkeeper's namespace (default poolkeeper-system)")
    status.add_argument("-o", "--output", choices=("table", "json", "yaml"), default="table")


_NOT_SETTINGS = {"command", "input", "output", "object_namespace", "cases"}


def _settings_from(args: argparse.Namespace) -> Settings:
    options = {k: v for k, v in vars(args).items() if k not in _NOT_SETTINGS}
    return load_settings(options)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return _run(args)
    except BrokenPipeError:  # `poolkeeper test | head`: the reader left; not an error of ours
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # so the interpreter's final flush is quiet too
        return 0


def _run(args: argparse.Namespace) -> int:
    try:
        if args.command == "serve":
            return serve(args)
        if args.command == "mutate":
            return mutate(args)
        if args.command == "test":
            return test(args)
        if args.command == "audit":
            from . import audit

            return audit.command(args)
        if args.command == "status":
            from . import status

            return status.command(args)
        return certs(args)
    except ConfigError as exc:
        print(f"poolkeeper: {exc}", file=sys.stderr)
        return 2


def serve(args: argparse.Namespace) -> int:
    settings = _settings_from(args)
    _load_rules(settings)  # an invalid rule fails start-up here, with every problem named
    from .certs import cert_paths

    missing = [p for p in cert_paths(settings.cert_dir) if not os.path.isfile(p)]
    if missing:
        raise ConfigError(f"{', '.join(missing)} not found: create them with "
                          f"'poolkeeper certs --out {settings.cert_dir}'")
    _check_port_free(settings.host, settings.port)
    # Workers build their app from the environment, as in the container image.
    for name, value in vars(args).items():
        if name not in _NOT_SETTINGS and value is not None:
            os.environ[ENV_PREFIX + name.upper()] = str(value)
    from .server import run

    run()
    return 0


def _check_port_free(host: str, port: int) -> None:
    """A clear message instead of gunicorn's retries and traceback when the port is taken."""
    import socket

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as gunicorn binds
        try:
            probe.bind((host, port))
        except OSError as exc:
            raise ConfigError(f"cannot listen on {host}:{port}: {exc.strerror or exc}; stop what "
                              "uses it or pick another port (poolkeeper serve --port N, make run "
                              "PORT=N)") from None


def mutate(args: argparse.Namespace) -> int:
    from .kube import KubeConfigError
    from .namespaces import NamespaceLookupError, namespace_source
    from .offline import InputError, judge, no_cluster_hint, print_results, read_input
    from .patching import ObjectShapeError
    from .review import ReviewError

    settings = _settings_from(args)
    rules = _load_rules(settings)
    try:
        document = read_input(args.input)
        try:
            source = namespace_source(settings)
        except KubeConfigError as exc:
            raise InputError(no_cluster_hint(str(exc))) from None
        outcomes = judge(document, rules, source.labels, args.object_namespace, sys.stderr,
                         settings.namespaces_file)
    except (InputError, ReviewError, ObjectShapeError, NamespaceLookupError) as exc:
        print(f"poolkeeper: {exc}", file=sys.stderr)
        return 2
    return print_results(document, outcomes, args.output, sys.stdout, sys.stderr)


def _load_rules(settings: Settings) -> tuple[Rule, ...]:
    from .rules import SHIPPED_RULES, load_rules

    return load_rules(settings.rules_dir or SHIPPED_RULES)


DEFAULT_CASES = "testdata/rules"


def test(args: argparse.Namespace) -> int:
    from .cases import discover, run_case

    directory = args.cases or DEFAULT_CASES
    # Exit 1 whenever no case could run, like a failed case (2 is for the other commands).
    if not os.path.isdir(directory):
        print(f"poolkeeper test: case directory {directory} does not exist (give the directory "
              "that holds <rule-name>/<case-name>/)", file=sys.stderr)
        return 1
    try:
        rules = _load_rules(_settings_from(args))
    except ConfigError as exc:
        print(f"poolkeeper test: {exc}", file=sys.stderr)
        return 1
    results = [run_case(case, rules) for case in discover(directory)]
    for result in results:
        status = "PASS" if result.passed else "FAIL"
        detail = "" if result.passed else f": {result.detail}"
        print(f"{status} {result.case.id}{detail}")
    passed = sum(r.passed for r in results)
    failed = len(results) - passed
    print(f"{passed} passed, {failed} failed")
    if not results:
        print(f"poolkeeper test: no cases under {directory}", file=sys.stderr)
    return 0 if results and not failed else 1


def certs(args: argparse.Namespace) -> int:
    from .certs import CertificateError, create_certificates

    try:
        result = create_certificates(args.out, args.service, args.namespace, days=args.days,
                                     force=args.force)
    except (CertificateError, ValueError) as exc:
        print(f"poolkeeper: {exc}", file=sys.stderr)
        return 2
    print(result.summary(), file=sys.stderr)
    print(result.ca_bundle)
    return 0
