"""Owns the scale run: decision time, memory and warm-up time against the size of the cache.

For each count, a fresh process (as a worker would be: app, Flask, rules loaded) builds the
namespace source ``poolkeeper serve --kubeconfig`` uses (list + watch, ``KubeNamespaces``), pointed
at :mod:`bench.fakeapi`, which lists that many namespaces in pages of 500 as the API server would.
It reports the time from ``start()`` to ``ready()`` (the first full listing), its RSS before and
after, and the time of ``admit()`` (all shipped rules) over 1,000 reviews whose namespaces are
spread over the whole cache.
"""

from __future__ import annotations

import argparse
import gc
import json
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from bench.inputs import ROOT


@dataclass
class ScaleRow:
    count: int
    decision_us: float
    warm_ms: float
    rss_mib: float
    cache_mib: float


def run(counts: list[int], repeats: int, work: Path) -> list[ScaleRow]:
    from bench.fakeapi import FakeAPI

    api = FakeAPI().start()
    rows = []
    try:
        for count in counts:
            kubeconfig = work / f"fakeapi-{count}.kubeconfig"
            kubeconfig.write_text(api.kubeconfig(count))
            result = subprocess.run(
                [sys.executable, "-m", "bench.scale", "--count", str(count), "--kubeconfig",
                 str(kubeconfig), "--repeats", str(repeats)],
                cwd=ROOT, capture_output=True, text=True, timeout=300)
            line = next((out for out in result.stdout.splitlines() if out.startswith("{")), None)
            if result.returncode != 0 or line is None:
                raise RuntimeError(f"scale run with {count} namespaces failed "
                                   f"({result.returncode}):\n{result.stdout}\n{result.stderr}")
            data = json.loads(line)
            rows.append(ScaleRow(count, data["decision_us"], data["warm_ms"], data["rss_mib"],
                                 data["cache_mib"]))
    finally:
        api.stop()
    return rows


def _rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def _measure(count: int, kubeconfig: str, repeats: int) -> dict:
    import logging

    import app.factory  # noqa: F401  (what a worker has loaded: Flask, the app)
    from bench import engine, inputs
    from bench.micro import per_request_us

    logging.basicConfig(level=logging.WARNING)
    rules = engine.shipped_rules()
    names = inputs.namespace_names(count)
    picked = [names[(i * count) // 1000] if count >= 1000 else names[i % count]
              for i in range(1000)]
    doc = inputs.review_doc()
    requests = [engine.parse_review(inputs.review_for(doc, name, i))
                for i, name in enumerate(picked)]
    source = engine.kube_namespace_source(kubeconfig)  # client built, nothing listed yet
    gc.collect()
    rss_before = _rss_mib()
    began = time.perf_counter()
    source.start()
    deadline = time.monotonic() + 240
    while not source.ready():
        if time.monotonic() > deadline:
            raise RuntimeError(f"the namespace cache did not warm up from {kubeconfig}")
        time.sleep(0.001)
    warm_ms = (time.perf_counter() - began) * 1000
    gc.collect()
    rss_after = _rss_mib()
    lookup = source.labels
    admit = engine.admit
    decision = admit(requests[0], lookup, rules)
    if not decision.response.patch:
        raise RuntimeError(f"no patch with {count} namespaces: {decision.response}")
    us = per_request_us(lambda req: admit(req, lookup, rules), requests, repeats)
    state = source.state()
    source.stop()
    return {"count": count, "decision_us": us, "warm_ms": warm_ms, "rss_mib": rss_after,
            "cache_mib": rss_after - rss_before, "state": state}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.scale")
    parser.add_argument("--count", type=int, required=True)
    parser.add_argument("--kubeconfig", required=True)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args(argv)
    print(json.dumps(_measure(args.count, args.kubeconfig, args.repeats), default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
