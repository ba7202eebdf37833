"""Owns the ``poolkeeper`` command line: serve, mutate, test, export, certs, audit, status
and pools."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from .config import ENV_PREFIX, ConfigError, Settings, load_settings

if TYPE_CHECKING:
    from .rules import Rule

DESCRIPTION = "poolkeeper: pins each namespace's pods to its node pool (mutating admission webhook)"


def _setting(parser: argparse.ArgumentParser | argparse._ArgumentGroup, flag: str, text: str,
             **kwargs: Any) -> None:
    """An option that sets a Settings field; its help names the default and the variable."""
    from dataclasses import fields

    name = flag.lstrip("-").replace("-", "_")
    dest = str(kwargs.pop("dest", name))
    default = {f.name: f.default for f in fields(Settings)}[dest]
    shown = "none" if default is None else default
    if dest == "workers" and default == 0:
        shown = "0, meaning one per usable core, at least 2"
    parser.add_argument(flag, dest=dest, help=f"{text} (default: {shown}; environment: "
                                             f"{ENV_PREFIX}{dest.upper()})", **kwargs)


def _add_source_options(parser: argparse.ArgumentParser) -> None:
    _setting(parser, "--rules", "directory of rule files (none: the shipped rules/)",
             dest="rules_dir", metavar="DIR")
    group = parser.add_argument_group("namespace source")
    _setting(group, "--namespaces", "read Namespace objects from this YAML file instead of the "
             "API server", dest="namespaces_file", metavar="FILE")
    _setting(group, "--kubeconfig", "kubeconfig to reach the API server (none: in-cluster, else "
             "$KUBECONFIG or ~/.kube/config)", metavar="FILE")


def _package_version() -> str:
    # Not app.metrics.version: `poolkeeper serve` must not import prometheus_client before
    # gunicorn's configuration has set up the multiprocess directory (app.metrics docstring).
    from importlib import metadata

    try:
        return metadata.version("poolkeeper")
    except metadata.PackageNotFoundError:  # pragma: no cover - an uninstalled tree
        return "unknown"


def _version() -> str:
    import platform

    return f"poolkeeper {_package_version()} (Python {platform.python_version()})"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="poolkeeper", description=DESCRIPTION,
        epilog="Every setting of serve also comes from a POOLKEEPER_* environment variable; an "
               "option wins. 'poolkeeper COMMAND --help' describes each command.")
    parser.add_argument("--version", action="version", version=_version())
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = commands.add_parser(
        "serve", help="serve the webhook over TLS with gunicorn",
        description="Serve the webhook (POST /mutate...) and /healthz, /readyz over TLS with "
                    "gunicorn, with the pair in --cert-dir (poolkeeper certs makes one, or "
                    "--manage-certs), and GET /metrics over plain HTTP on --metrics-port. Exits "
                    "2 with one message naming every invalid setting or rule.")
    _setting(serve, "--host", "address to listen on")
    _setting(serve, "--port", "port to listen on", type=int)
    _setting(serve, "--cert-dir", "directory with tls.crt and tls.key", metavar="DIR")
    _setting(serve, "--workers", "worker processes", type=int, metavar="N")
    _setting(serve, "--threads", "threads per worker", type=int, metavar="N")
    _setting(serve, "--keepalive", "seconds an idle keep-alive connection is kept", type=int,
             metavar="SECONDS")
    _setting(serve, "--log-level", "log level", choices=("debug", "info", "warning", "error"))
    _setting(serve, "--cache-ttl", "seconds a namespace GET is trusted while the watch is down",
             type=float, metavar="SECONDS")
    _setting(serve, "--max-stale", "seconds cached labels are served while the API server "
             "fails, then 500 (the webhook's failurePolicy decides)", type=float,
             metavar="SECONDS")
    _setting(serve, "--audit-interval", "seconds between drift audits, run in the one process "
             "the audit Lease elects (0: off; only with namespaces from the API server)",
             type=float, metavar="SECONDS")
    _setting(serve, "--metrics-port", "plain-HTTP port of GET /metrics (0: none)", type=int,
             metavar="PORT")
    managed = serve.add_argument_group(
        "certificates", "With --manage-certs poolkeeper keeps the CA and serving pair in a "
        "Secret, renews them, keeps the caBundle of every webhook current, and serves the pair "
        "from --cert-dir (which must be writable).")
    _setting(managed, "--manage-certs", "manage the certificates and caBundle (needs the API "
             "server)", action="store_true", default=None)
    _setting(managed, "--cert-secret", "the Secret", metavar="NS/NAME")
    _setting(managed, "--service", "the Service the webhooks call, in the Secret's namespace",
             metavar="NAME")
    _setting(managed, "--webhook-configuration", "the MutatingWebhookConfiguration whose "
             "webhooks get the caBundle", metavar="NAME")
    _setting(managed, "--cert-days", "lifetime of a new pair, renewed two thirds into it",
             type=int, metavar="N")
    _setting(managed, "--cert-overlap", "seconds the caBundle still trusts the old CA after a "
             "new one", type=float, metavar="SECONDS")
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
    mutate.add_argument("-o", "--output", choices=("yaml", "json", "review", "object"),
                        default="yaml", help="yaml (default; 'object' is the same): the "
                        "objects as poolkeeper would admit them; json: the same as JSON; "
                        "review: the AdmissionReview responses")
    mutate.add_argument("--namespace", "-n", dest="object_namespace", metavar="NS",
                        help="namespace of the object when it names none (default 'default')")
    _add_source_options(mutate)

    test = commands.add_parser(
        "test", help="run golden rule cases, like kyverno test",
        description="Runs golden cases (<rule-name>/<case-name>/ with input.yaml, see README) "
                    "against their rule from --rules. Prints one line per case and 'N passed, "
                    "N failed'; exits 1 on a failure or when no case ran.")
    test.add_argument("cases", nargs="*", metavar="PATH",
                      help="the case root, one rule's directory or one case (default: "
                           "testdata/rules beside the rules directory)")
    test.add_argument("--rule", action="append", metavar="NAME",
                      help="run only this rule's cases (repeatable)")
    test.add_argument("--rules", dest="rules_dir", metavar="DIR",
                      help="directory of rule files (default: the shipped rules/)")
    test.add_argument("-o", "--output", dest="format", choices=("text", "json", "yaml"),
                      default="text", help="text: a line per case (default); json or yaml: "
                                           "the results as data")
    test.add_argument("--junit", metavar="FILE",
                      help="also write the results as JUnit XML to FILE (for CI systems)")

    export = commands.add_parser(
        "export", help="print the rules as in-tree admission policies",
        description="Print, for the enabled rules, admissionregistration.k8s.io/v1 "
                    "MutatingAdmissionPolicies, ValidatingAdmissionPolicies and their bindings "
                    "that make the API server decide as poolkeeper does. What no policy can "
                    "express fails the export (exit 1), one line each, unless "
                    "--skip-unsupported.")
    export.add_argument("--rules", dest="rules_dir", metavar="DIR",
                        help="directory of rule files (default: the shipped rules/)")
    export.add_argument("--target", choices=("policies",), default="policies",
                        help="what to export to (default: policies)")
    export.add_argument("-o", "--output", choices=("yaml", "json"), default="yaml",
                        help="yaml: a YAML stream (default); json: a List")
    export.add_argument("--skip-unsupported", action="store_true",
                        help="leave out what no policy can express, listed on stderr")

    certs = commands.add_parser(
        "certs", help="create a CA and a serving certificate",
        description="Write ca.crt, tls.crt and tls.key (0600) into DIR for the Service "
                    "NAME.NS.svc and print the CA as a base64 caBundle. A valid pair is kept "
                    "unless --force; one inside its renewal window (the last 30 days, or the "
                    "last third of its lifetime when shorter) is replaced.")
    certs.add_argument("--out", required=True, metavar="DIR",
                       help="directory to write the pair into (created if missing)")
    certs.add_argument("--service", default="poolkeeper", metavar="NAME",
                       help="the webhook's Service name (default: poolkeeper)")
    certs.add_argument("--namespace", default="poolkeeper-system", metavar="NS",
                       help="the Service's namespace (default: poolkeeper-system)")
    certs.add_argument("--days", type=int, default=365, metavar="N",
                       help="lifetime of the serving certificate in days (default: 365)")
    certs.add_argument("--force", action="store_true",
                       help="replace a valid existing pair (a new CA: the caBundle changes)")

    version = commands.add_parser("version", help="print the version (-o json: with Python, "
                                                  "dependencies and the rule set's digest)")
    version.add_argument("-o", "--output", dest="format", choices=("text", "json", "yaml"),
                         default="text")
    version.add_argument("--rules", dest="rules_dir", metavar="DIR",
                         help="rules directory whose digest to print (default: the shipped "
                              "rules/)")

    completion = commands.add_parser(
        "completion", help="print a shell completion script",
        description="Print a completion script: e.g. 'source <(poolkeeper completion bash)', "
                    "'poolkeeper completion zsh > \"${fpath[1]}/_poolkeeper\"', or "
                    "'poolkeeper completion fish > ~/.config/fish/completions/poolkeeper.fish'.")
    completion.add_argument("shell", choices=("bash", "zsh", "fish"))
    _add_cluster_commands(commands)
    _add_pools_command(commands)
    return parser


def _add_kubeconfig(parser: argparse.ArgumentParser) -> None:
    """--kubeconfig of the commands that read the cluster themselves (no Settings)."""
    parser.add_argument("--kubeconfig", metavar="FILE",
                        help="kubeconfig to use (default: in-cluster, else $KUBECONFIG)")


def _add_table_output(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-o", "--output", choices=("table", "json", "yaml"), default="table")


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
    _add_kubeconfig(audit)
    audit.add_argument("--namespaces", dest="namespaces_file", metavar="FILE",
                       help="offline: Namespace objects (kubectl get ns -o yaml)")
    audit.add_argument("--pods", dest="pods_file", metavar="FILE",
                       help="offline: pods, with any DaemonSets and ReplicaSets "
                            "(kubectl get pods,ds,rs -A -o yaml)")
    audit.add_argument("--nodes", dest="nodes_file", metavar="FILE",
                       help="offline: nodes (kubectl get nodes -o yaml), to check node pools")
    _add_table_output(audit)
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
    _add_kubeconfig(status)
    status.add_argument("--namespace", "-n", default="poolkeeper-system", metavar="NS",
                        help="poolkeeper's namespace (default poolkeeper-system)")
    _add_table_output(status)


def _add_pools_command(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """``pools`` (app.pools): its own options, no Settings."""
    pools = commands.add_parser(
        "pools", help="list each node pool: its namespaces, nodes and tolerations",
        description="For each PoolPlacement rule in force, every pool it knows (listed in "
                    "pools:, named by a namespace label or annotation, the defaultPool, or "
                    "carried by a node): the namespaces pinned to it, its nodes and how many "
                    "are Ready, and the tolerations its pods get. Namespaces and nodes come "
                    "from the cluster of the kubeconfig, or from files.")
    pools.add_argument("--rules", dest="rules_dir", metavar="DIR",
                       help="rules whose PoolPlacement params say the pools (default: the "
                            "shipped rules/)")
    _add_kubeconfig(pools)
    pools.add_argument("--namespaces", dest="namespaces_file", metavar="FILE",
                       help="offline: Namespace objects (kubectl get ns -o yaml)")
    pools.add_argument("--nodes", dest="nodes_file", metavar="FILE",
                       help="offline: nodes (kubectl get nodes -o yaml)")
    _add_table_output(pools)


_NOT_SETTINGS = {"command", "input", "output", "object_namespace", "cases", "rule", "format",
                 "junit", "target", "skip_unsupported"}


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
        if args.command == "version":
            return version(args)
        if args.command == "export":
            from .export import command

            return command(args, _load_rules(_settings_from(args)))
        if args.command == "completion":
            from .completion import script

            print(script(args.shell, build_parser()), end="")
            return 0
        if args.command == "audit":
            from . import audit

            return audit.command(args)
        if args.command == "status":
            from . import status

            return status.command(args)
        if args.command == "pools":
            from . import pools

            return pools.command(args)
        return certs(args)
    except ConfigError as exc:
        print(f"poolkeeper: {exc}", file=sys.stderr)
        return 2


def serve(args: argparse.Namespace) -> int:
    settings = _settings_from(args)
    _load_rules(settings)  # an invalid rule fails start-up here, with every problem named
    from .certs import cert_paths

    missing = [p for p in cert_paths(settings.cert_dir) if not os.path.isfile(p)]
    if missing and not settings.manage_certs:
        raise ConfigError(f"{', '.join(missing)} not found: create them with "
                          f"'poolkeeper certs --out {settings.cert_dir}', or serve with "
                          "--manage-certs")
    _check_port_free(settings.host, settings.port)
    if settings.metrics_port:
        _check_port_free(settings.host, settings.metrics_port, "--metrics-port")
    # Workers build their app from the environment, as in the container image.
    for name, value in vars(args).items():
        if name not in _NOT_SETTINGS and value is not None:
            os.environ[ENV_PREFIX + name.upper()] = str(value)
    from .server import run

    run()
    return 0


def _check_port_free(host: str, port: int, option: str = "--port") -> None:
    """A clear message instead of gunicorn's retries and traceback when the port is taken."""
    import socket

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as gunicorn binds
        try:
            probe.bind((host, port))
        except OSError as exc:
            hint = "poolkeeper serve --port N, make run PORT=N" if option == "--port" else \
                f"poolkeeper serve {option} N"
            raise ConfigError(f"cannot listen on {host}:{port}: {exc.strerror or exc}; stop what "
                              f"uses it or pick another port ({hint})") from None


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
        outcomes = judge(document, rules, source.namespace, args.object_namespace, sys.stderr,
                         settings.namespaces_file)
    except (InputError, ReviewError, ObjectShapeError, NamespaceLookupError) as exc:
        print(f"poolkeeper: {exc}", file=sys.stderr)
        return 2
    return print_results(document, outcomes, args.output, sys.stdout, sys.stderr)


def _load_rules(settings: Settings) -> tuple[Rule, ...]:
    from .rules import SHIPPED_RULES, load_rules

    return load_rules(settings.rules_dir or SHIPPED_RULES)


def test(args: argparse.Namespace) -> int:
    import time

    from .cases import default_case_root, discover, junit_xml, run_case
    from .rules import SHIPPED_RULES

    try:
        settings = _settings_from(args)
        rules = _load_rules(settings)
    except ConfigError as exc:
        print(f"poolkeeper test: {exc}", file=sys.stderr)
        return 1
    paths = args.cases or [str(default_case_root(settings.rules_dir or SHIPPED_RULES))]
    # Exit 1 whenever no case could run, like a failed case (2 is for the other commands).
    missing = [p for p in paths if not os.path.isdir(p)]
    if missing:
        print(f"poolkeeper test: case directory {missing[0]} does not exist (give the case "
              "root <rule-name>/<case-name>/, a rule's directory or one case)", file=sys.stderr)
        return 1
    cases = [case for path in paths for case in discover(path)
             if not args.rule or case.rule in args.rule]
    started = time.monotonic()
    results = [run_case(case, rules) for case in cases]
    passed = sum(r.passed for r in results)
    failed = len(results) - passed
    if args.format == "text":
        for result in results:
            status = "PASS" if result.passed else "FAIL"
            detail = "" if result.passed else f": {result.detail}"
            print(f"{status} {result.case.id}{detail}")
        print(f"{passed} passed, {failed} failed")
    else:
        report = {"passed": passed, "failed": failed, "cases": [
            {"id": r.case.id, "rule": r.case.rule, "case": r.case.name, "passed": r.passed,
             **({} if r.passed else {"detail": r.detail})} for r in results]}
        _print_data(report, args.format)
    if args.junit:
        with open(args.junit, "w", encoding="utf-8") as out:
            out.write(junit_xml(results, time.monotonic() - started))
    if not results:
        which = f" of rule {', '.join(args.rule)}" if args.rule else ""
        print(f"poolkeeper test: no cases{which} under {', '.join(paths)}", file=sys.stderr)
    return 0 if results and not failed else 1


def _print_data(data: object, fmt: str) -> None:
    import orjson
    import yaml

    if fmt == "json":
        print(orjson.dumps(data, option=orjson.OPT_INDENT_2).decode())
    else:
        yaml.safe_dump(data, sys.stdout, sort_keys=False)


def version(args: argparse.Namespace) -> int:
    import platform
    from importlib import metadata

    from .rules import SHIPPED_RULES
    from .rules.loader import load_rule_set

    if args.format == "text":
        print(_version())
        return 0
    directory = args.rules_dir or str(SHIPPED_RULES)
    rules: dict[str, object] = {"directory": directory}
    try:
        rule_set = load_rule_set(directory)
        rules.update(digest=rule_set.digest, names=[r.name for r in rule_set.rules])
    except ConfigError as exc:
        rules["error"] = str(exc)
    dependencies: dict[str, str | None] = {}
    for name in ("flask", "gunicorn", "kubernetes", "prometheus-client", "orjson", "PyYAML",
                 "cryptography", "jsonpatch", "cachetools"):
        try:
            dependencies[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            dependencies[name] = None
    _print_data({"poolkeeper": _package_version(), "python": platform.python_version(),
                 "dependencies": dependencies, "rules": rules}, args.format)
    return 0


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
