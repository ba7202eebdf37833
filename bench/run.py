"""Owns ``python -m bench`` (``make bench``): runs every part in one invocation, prints the tables.

Modes: full (default, about 5 minutes on 2 cores), ``--quick`` or ``BENCH_QUICK=1`` (about a
minute), ``--smoke`` (seconds; what tests/test_bench.py runs). Every load is bounded in time and
in request count and goes to 127.0.0.1 only. Progress goes to stderr, the results to stdout.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

import orjson

from bench import apiserver, inputs, loadgen, micro, opa, report, scale, servers
from bench.inputs import ROOT

README = Path(__file__).resolve().parent / "README.md"
RESULTS_START = "<!-- bench results: start (python -m bench --record) -->"
RESULTS_END = "<!-- bench results: end -->"


@dataclass(frozen=True)
class Mode:
    name: str
    rounds: int  # each server is measured this many times at each concurrency, in turn
    duration_s: float  # per round, server and concurrency
    warmup_s: float  # per server, at the highest concurrency, untimed
    max_requests: int  # per load run: the count bound
    workers: int | None  # None: poolkeeper's default (one per usable core, at least 2)
    threads: int | None  # None: poolkeeper's default (4)
    micro_reviews: int
    micro_repeats: int
    scale_counts: tuple[int, ...]
    scale_repeats: int
    pods: int  # timed creations per case and number of creators
    pod_warmup: int


MODES = {
    "full": Mode("full", 3, 4, 3, 500_000, None, None, 1000, 9, (10, 1000, 10_000, 100_000), 7,
                 400, 40),
    "quick": Mode("quick", 1, 2, 1, 100_000, None, None, 1000, 3, (10, 1000, 10_000, 100_000), 3,
                  100, 16),
    "smoke": Mode("smoke", 1, 1, 0, 40, 2, 2, 50, 1, (10, 1000, 10_000, 100_000), 1, 12, 2),
}


def progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def machine() -> str:
    model = "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{os.cpu_count()} cores (nproc), {model}, {platform.system()} {platform.release()}"


def git_revision() -> str:
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                             capture_output=True, text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "app", "rules"], cwd=ROOT,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return f"{rev}{' + uncommitted changes in app/ or rules/' if dirty else ''}" if rev else "unknown"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", default=bool(os.environ.get("BENCH_QUICK")),
                        help="about a minute (also BENCH_QUICK=1)")
    parser.add_argument("--smoke", action="store_true", help="seconds: tiny counts, for tests")
    parser.add_argument("--parts", default="http,micro,scale,apiserver",
                        help="comma-separated subset of http,micro,scale,apiserver")
    parser.add_argument("--loadgen", choices=("wrk", "python"), default="wrk",
                        help="load generator (default wrk, Debian's package)")
    parser.add_argument("--duration", type=float, help="seconds per server and concurrency")
    parser.add_argument("--max-requests", type=int, help="request bound per load run")
    parser.add_argument("--log-level", default=None,
                        help="poolkeeper's --log-level (default: its own default, info)")
    parser.add_argument("--record", action="store_true",
                        help=f"write the results into {README.relative_to(ROOT)}")
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    args = parser.parse_args(argv)
    parts = {p.strip() for p in args.parts.split(",") if p.strip()}
    unknown = parts - {"http", "micro", "scale", "apiserver"}
    if unknown:
        parser.error(f"unknown parts: {', '.join(sorted(unknown))}")
    args.parts = parts
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    mode = MODES["smoke" if args.smoke else "quick" if args.quick else "full"]
    if args.duration is not None:
        mode = replace(mode, duration_s=args.duration)
    if args.max_requests is not None:
        mode = replace(mode, max_requests=args.max_requests)
    if "http" in args.parts and args.loadgen == "wrk" and loadgen.wrk_path() is None:
        print(f"make bench: {loadgen.WRK_INSTALL_HINT}", file=sys.stderr)
        return 2
    work = Path(tempfile.mkdtemp(prefix="poolkeeper-bench-"))
    began = time.monotonic()
    results = report.Results()
    try:
        run_parts(args, mode, work, results)
    finally:
        if args.keep:
            progress(f"work directory kept: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    results.notes.append(f"bench wall time {time.monotonic() - began:.0f} s")
    text = report.render(results)
    print(text, end="")
    if args.record:
        record(text)
        progress(f"recorded in {README.relative_to(ROOT)}")
    return 0


def run_parts(args: argparse.Namespace, mode: Mode, work: Path, results: report.Results) -> None:
    now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    load = (f"{loadgen.wrk_version()} (1 thread, keep-alive, Lua script bench/load.lua)"
            if args.loadgen == "wrk" else "Python client (threads, keep-alive)")
    fixture = inputs.REVIEW_FIXTURE
    results.header = [
        f"poolkeeper bench, {now}, mode {mode.name}, revision {git_revision()}",
        "",
        f"- machine: {machine()}; Python {platform.python_version()}",
        f"- input: {fixture.relative_to(ROOT)} ({fixture.stat().st_size:,} bytes), namespace "
        f"varied per request over {inputs.NAMESPACES:,} namespaces ({inputs.POOLS} pools)",
    ]
    namespaces_yaml = inputs.write_namespaces_yaml(work / "namespaces.yaml")
    opa_data = work / "opa-namespaces.json"
    opa_data.write_bytes(orjson.dumps(inputs.opa_namespaces_data()))
    opa_missing = opa.available()
    if opa_missing:
        results.notes.append(f"OPA rows skipped: {opa_missing}")

    if "http" in args.parts:
        progress("== served over TLS")
        results.header.append(f"- load: {load}")
        run_http(args, mode, work, namespaces_yaml, opa_data, opa_missing, results)
    if "micro" in args.parts:
        progress("== pure decision, in-process")
        results.micro = micro.run(namespaces_yaml, mode.micro_repeats, mode.micro_reviews)
        results.micro_note = (f"Median of {mode.micro_repeats} passes over {mode.micro_reviews} "
                              "reviews (one namespace each), one process, no HTTP.")
    if "scale" in args.parts:
        progress("== scale")
        results.scale = scale.run(list(mode.scale_counts), mode.scale_repeats, work)
        results.scale_note = (
            "A fresh process per size (app, Flask, rules loaded) fills the cluster namespace "
            "source (KubeNamespaces, list + watch) from bench/fakeapi.py, a local list server "
            "answering as the API server does in pages of 500. Warm-up: start() to ready(). "
            "Cache MiB: RSS growth over the listing. Decision: admit(), all rules, over 1,000 "
            "reviews with namespaces spread over the cache.")
    if "apiserver" in args.parts:
        missing = apiserver.unavailable()
        if missing:
            results.apiserver_note = f"Skipped: {missing}."
            progress(f"== API server part skipped: {missing}")
        else:
            progress("== through miniapiserver")
            results.apiserver = apiserver.run(work, mode.pods, mode.pod_warmup,
                                              log_level=args.log_level, keep=args.keep,
                                              progress=progress)
            for creators, cases in results.apiserver.items():
                for case in cases:
                    if case.warmup_errors:
                        results.notes.append(
                            f"{case.label}, {creators} creators: {case.warmup_errors} of the "
                            f"{mode.pod_warmup} untimed warm-up creations failed or were not "
                            "mutated (the API server's log says why)")
            results.apiserver_note = (
                f"miniapiserver (k8s.io/apiserver + etcd, {apiserver.tool_dir()}), "
                f"{mode.pods} timed pod creations per row after {mode.pod_warmup} untimed, "
                "raw HTTPS with keep-alive, namespaces in turn. CPU: API server + etcd "
                "(+ poolkeeper in b) per pod. (b): " + (
                    f"{apiserver.DEPLOY_WEBHOOK_CONFIGURATION} (every webhook in it that "
                    "matches a pod is called, reinvocations included)"
                    if apiserver.DEPLOY_WEBHOOK_CONFIGURATION else
                    "the stand-in MutatingWebhookConfiguration in bench/apiserver.py") + ".")


def run_http(args: argparse.Namespace, mode: Mode, work: Path, namespaces_yaml: Path,
             opa_data: Path, opa_missing: str | None, results: report.Results) -> None:
    names = inputs.namespace_names()
    bodies = inputs.review_bodies(names)
    bodies_file = work / "bodies.jsonl"
    bodies_file.write_bytes(b"\n".join(bodies) + b"\n")
    cert_dir = work / "certs"
    servers.make_certs(cert_dir)
    variants = [v for v in report.VARIANTS if not (v == "opa" and opa_missing)]
    running: dict[str, servers.Server] = {}
    try:
        for variant in variants:
            server = servers.start(variant, cert_dir, work, namespaces_yaml=namespaces_yaml,
                                   opa_data=opa_data, workers=mode.workers,
                                   threads=mode.threads, log_level=args.log_level)
            running[variant] = server
            _check_answer(server, bodies[1])
        any_server = next(iter(running.values()))
        results.http_note = (
            f"gunicorn gthread, {any_server.workers} workers x "
            f"{mode.threads or 'default'} threads, keep-alive, TLS (app/server/conf.py) for "
            f"every server; per row the median of {mode.rounds} round(s) of {mode.duration_s:g} s "
            f"(at most {mode.max_requests:,} requests each; the servers take turns, so "
            f"drift hits all alike), after {mode.warmup_s:g} s of untimed load; max: the "
            "largest. floor: fixed answer, body unread by the app (the no-op floor); decode: the "
            "body parsed with orjson, allowed (the decode floor); poolkeeper: `poolkeeper serve "
            "--namespaces` (1,000 namespaces), all shipped rules on /mutate; opa: the "
            "k8s_node_selector policy (bench/policy/) in OPA's Go evaluator. CPU: server "
            "processes (master + workers) per request.")
        for variant, server in running.items():
            if mode.warmup_s > 0:
                progress(f"  warm-up {variant}")
                _load(args, server, bodies_file, bodies, max(report.CONCURRENCY),
                      mode.warmup_s, mode.max_requests)
        samples: dict[tuple[str, int], list[tuple[loadgen.LoadResult, float]]] = {}
        for round_ in range(mode.rounds):
            for c in report.CONCURRENCY:
                for variant, server in running.items():
                    cpu_before = server.cpu_seconds()
                    result = _load(args, server, bodies_file, bodies, c, mode.duration_s,
                                   mode.max_requests)
                    cpu = server.cpu_seconds() - cpu_before
                    samples.setdefault((variant, c), []).append((result, cpu))
                    progress(f"  round {round_ + 1}/{mode.rounds} {variant:10} c={c:<3} "
                             f"{result.rps:8.0f} req/s  p50 {result.p50_ms:6.2f}  "
                             f"p99 {result.p99_ms:6.2f} ms  "
                             f"CPU {cpu / max(result.requests, 1) * 1000:.3f} ms/req  "
                             f"errors {result.errors}")
        for c in report.CONCURRENCY:
            for variant in running:
                results.http.append(_aggregate(variant, c, samples[(variant, c)]))
        for variant, server in running.items():
            rss = server.worker_rss_mib()
            if rss:
                results.notes.append(f"{variant} worker RSS after the load: "
                                     f"{min(rss):.0f}-{max(rss):.0f} MiB")
        client = [r.client_cpu_ms for r in results.http if r.client_cpu_ms is not None]
        if client:
            results.notes.append(f"load generator CPU: {min(client):.3f}-{max(client):.3f} "
                                 "ms per request")
    finally:
        for server in running.values():
            server.stop()


def _median(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[len(ordered) // 2]


def _aggregate(variant: str, c: int,
               runs: list[tuple[loadgen.LoadResult, float]]) -> report.HttpRow:
    """One row from the rounds: medians, the largest max, errors and requests summed."""
    per_request = [(cpu / max(r.requests, 1) * 1000, r.client_cpu_s / max(r.requests, 1) * 1000)
                   for r, cpu in runs]
    return report.HttpRow(
        variant, c, rps=_median([r.rps for r, _ in runs]),
        p50_ms=_median([r.p50_ms for r, _ in runs]), p99_ms=_median([r.p99_ms for r, _ in runs]),
        max_ms=max(r.max_ms for r, _ in runs), cpu_ms=_median([p[0] for p in per_request]),
        client_cpu_ms=_median([p[1] for p in per_request]),
        errors=sum(r.errors for r, _ in runs), requests=sum(r.requests for r, _ in runs))


def _load(args, server: servers.Server, bodies_file: Path, bodies: list[bytes], c: int,
          duration_s: float, max_requests: int) -> loadgen.LoadResult:
    if args.loadgen == "wrk":
        return loadgen.run_wrk(server.port, bodies_file, c, duration_s, max_requests)
    return loadgen.run_python(server.port, server.tls_context(), bodies, c, duration_s,
                              max_requests)


def _check_answer(server: servers.Server, body: bytes) -> None:
    """Each server must give its real answer before it is measured."""
    status, answer = server.request(body)
    review = orjson.loads(answer) if status == 200 else {}
    response = review.get("response") or {}
    ok = status == 200 and response.get("allowed") is True
    if server.name == "decode":
        ok = ok and response.get("uid", "").endswith("1")
    elif server.name != "floor":
        ok = ok and bool(response.get("patch")) and response.get("uid", "").endswith("1")
    if not ok:
        raise RuntimeError(f"{server.name} answered {status}: {answer[:500]!r}\n{server.log()}")


def record(text: str) -> None:
    """Replace the results between the markers in bench/README.md."""
    readme = README.read_text()
    if RESULTS_START not in readme or RESULTS_END not in readme:
        raise RuntimeError(f"{README} lacks the results markers")
    head, rest = readme.split(RESULTS_START, 1)
    _, tail = rest.split(RESULTS_END, 1)
    README.write_text(f"{head}{RESULTS_START}\n\n{text}\n{RESULTS_END}{tail}")
