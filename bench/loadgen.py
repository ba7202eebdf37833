"""Owns the load generators: Debian's wrk (the default) and a Python client (the fallback).

Both keep connections alive, send only to 127.0.0.1, stop after a duration or a request count,
whichever comes first, and report the same figures. wrk is one C thread with LuaJIT: on two
cores it takes a small share of one, where a Python client takes several times more CPU per
request from the server it measures (bench/README.md has the figures).
"""

from __future__ import annotations

import http.client
import json
import math
import resource
import shutil
import ssl
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path

LUA = Path(__file__).resolve().parent / "load.lua"
WRK_INSTALL_HINT = ("wrk is not installed: run `make bench` as root (it runs apt-get install wrk) "
                    "or install Debian's wrk package yourself; `--loadgen python` uses the "
                    "slower Python client instead")


@dataclass
class LoadResult:
    requests: int
    duration_s: float
    errors: int
    p50_ms: float
    p99_ms: float
    max_ms: float
    client_cpu_s: float

    @property
    def rps(self) -> float:
        return self.requests / self.duration_s if self.duration_s > 0 else 0.0


def wrk_path() -> str | None:
    return shutil.which("wrk")


def wrk_version() -> str:
    path = wrk_path()
    if not path:
        return "wrk (missing)"
    out = subprocess.run([path, "--version"], capture_output=True, text=True).stdout
    first = (out.splitlines() or ["wrk"])[0]
    return " ".join(first.split()[:2])


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_wrk(port: int, bodies_file: Path, connections: int, duration_s: float,
            max_requests: int, path: str = "/mutate", timeout_s: float = 10.0) -> LoadResult:
    wrk = wrk_path()
    if wrk is None:
        raise RuntimeError(WRK_INSTALL_HINT)
    seconds = max(1, round(duration_s))
    command = [wrk, "-t1", f"-c{connections}", f"-d{seconds}s", f"--timeout={int(timeout_s)}s",
               "-s", str(LUA), f"https://127.0.0.1:{port}{path}", "--", str(bodies_file),
               str(max_requests)]
    cpu_before = _children_cpu()
    result = subprocess.run(command, capture_output=True, text=True,
                            timeout=seconds + timeout_s + 30)
    client_cpu = _children_cpu() - cpu_before
    line = next((out for out in result.stdout.splitlines() if out.startswith("BENCH_RESULT ")), None)
    if result.returncode != 0 or line is None:
        raise RuntimeError(f"wrk failed ({result.returncode}): {result.stdout}\n{result.stderr}")
    data = json.loads(line.split(" ", 1)[1])
    errors = sum(data["errors"].values())
    return LoadResult(requests=data["requests"], duration_s=data["duration_us"] / 1e6,
                      errors=errors, p50_ms=data["p50_us"] / 1000, p99_ms=data["p99_us"] / 1000,
                      max_ms=data["max_us"] / 1000, client_cpu_s=client_cpu)


def run_python(port: int, context: ssl.SSLContext, bodies: list[bytes], connections: int,
               duration_s: float, max_requests: int, path: str = "/mutate",
               timeout_s: float = 10.0) -> LoadResult:
    """``connections`` threads, one keep-alive HTTPS connection each (reconnecting after an
    error), until ``duration_s`` or ``max_requests`` in total."""
    headers = {"Content-Type": "application/json"}
    latencies: list[list[float]] = [[] for _ in range(connections)]
    errors = [0] * connections
    budget = max_requests if max_requests > 0 else float("inf")
    lock = threading.Lock()
    sent = [0]
    start_event = threading.Event()
    deadline = [0.0]

    def take() -> bool:
        with lock:
            if sent[0] >= budget:
                return False
            sent[0] += 1
            return True

    def worker(index: int) -> None:
        conn = None
        i = index * 997
        mine = latencies[index]
        start_event.wait()
        while time.monotonic() < deadline[0] and take():
            body = bodies[i % len(bodies)]
            i += 1
            if conn is None:
                conn = http.client.HTTPSConnection("127.0.0.1", port, context=context,
                                                   timeout=timeout_s)
            began = time.perf_counter()
            try:
                conn.request("POST", path, body, headers)
                response = conn.getresponse()
                response.read()
                ok = response.status == 200
            except (OSError, http.client.HTTPException):
                ok = False
                conn.close()
                conn = None
            mine.append(time.perf_counter() - began)
            if not ok:
                errors[index] += 1
        if conn is not None:
            conn.close()

    threads = [threading.Thread(target=worker, args=(i,), daemon=True)
               for i in range(connections)]
    for t in threads:
        t.start()
    usage = resource.getrusage(resource.RUSAGE_SELF)
    cpu_before = usage.ru_utime + usage.ru_stime
    began = time.monotonic()
    deadline[0] = began + duration_s
    start_event.set()
    for t in threads:
        t.join(duration_s + timeout_s + 30)
    elapsed = time.monotonic() - began
    usage = resource.getrusage(resource.RUSAGE_SELF)
    client_cpu = usage.ru_utime + usage.ru_stime - cpu_before
    merged = sorted(x for per in latencies for x in per)
    if not merged:
        return LoadResult(0, elapsed, sum(errors), 0.0, 0.0, 0.0, client_cpu)
    return LoadResult(requests=len(merged), duration_s=elapsed, errors=sum(errors),
                      p50_ms=percentile(merged, 50) * 1000, p99_ms=percentile(merged, 99) * 1000,
                      max_ms=merged[-1] * 1000, client_cpu_s=client_cpu)


def percentile(ordered: list[float], p: float) -> float:
    """Nearest-rank percentile of an ascending list."""
    if not ordered:
        return 0.0
    rank = min(len(ordered), max(1, math.ceil(p / 100 * len(ordered))))
    return ordered[rank - 1]
