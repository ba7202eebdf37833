"""Owns the servers under test: start, wait until every worker serves, CPU time, stop.

All of them run gunicorn with poolkeeper's gunicorn settings (app/server/conf.py) on a free
127.0.0.1 port with the same certificate:

- ``poolkeeper``: ``poolkeeper serve`` itself (``python -m app serve``), rules shipped in rules/;
- ``floor``: bench/floor_app.py, a fixed "allowed" answer, through bench/gunicorn_conf.py;
- ``decode``: bench/floor_app.py, the body parsed with orjson, "allowed" for its uid, the same;
- ``opa``: bench/opa_app.py, the sample's Rego policy in OPA's Go evaluator, same config.
"""

from __future__ import annotations

import http.client
import os
import signal
import socket
import ssl
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from bench.inputs import ROOT

CLK_TCK = os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_certs(out: Path, service: str = "poolkeeper", namespace: str = "poolkeeper-system") -> str:
    """CA + serving pair through ``poolkeeper certs``; returns the base64 caBundle."""
    result = subprocess.run([sys.executable, "-m", "app", "certs", "--out", str(out), "--service",
                             service, "--namespace", namespace], cwd=ROOT, capture_output=True,
                            text=True, check=True)
    return result.stdout.strip()


def _clean_env(extra: dict[str, str]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("POOLKEEPER_", "BENCH_WSGI", "BENCH_OPA"))}
    env.update(extra)
    return env


@dataclass
class Server:
    name: str
    process: subprocess.Popen
    port: int
    cert_dir: Path
    log_path: Path
    ready_path: str
    workers: int = 0
    cpu_marks: dict = field(default_factory=dict)
    metrics_port: int = 0  # poolkeeper's plain-HTTP /metrics (0: none)

    @property
    def host_port(self) -> tuple[str, int]:
        return "127.0.0.1", self.port

    def url(self, path: str = "/mutate") -> str:
        return f"https://127.0.0.1:{self.port}{path}"

    def tls_context(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=str(self.cert_dir / "ca.crt"))
        ctx.check_hostname = False  # the certificate names localhost and 127.0.0.1 anyway
        return ctx

    def log(self, tail: int = 40) -> str:
        lines = self.log_path.read_text(errors="replace").splitlines()
        return "\n".join(lines[-tail:])

    def pids(self) -> list[int]:
        """The gunicorn master and its workers."""
        return [self.process.pid, *_children(self.process.pid)]

    def cpu_seconds(self) -> float:
        """User + system CPU of master and workers (all threads, Go's too)."""
        total = 0
        for pid in self.pids():
            try:
                with open(f"/proc/{pid}/stat", "rb") as f:
                    fields = f.read().rsplit(b")", 1)[1].split()
                total += int(fields[11]) + int(fields[12])  # utime, stime
            except (OSError, IndexError, ValueError):
                pass
        return total / CLK_TCK

    def worker_rss_mib(self) -> list[float]:
        out = []
        for pid in _children(self.process.pid):
            try:
                with open(f"/proc/{pid}/status") as f:
                    for line in f:
                        if line.startswith("VmRSS:"):
                            out.append(int(line.split()[1]) / 1024)
            except OSError:
                pass
        return out

    def request(self, body: bytes, path: str = "/mutate") -> tuple[int, bytes]:
        conn = http.client.HTTPSConnection("127.0.0.1", self.port, context=self.tls_context(),
                                           timeout=10)
        try:
            conn.request("POST", path, body, {"Content-Type": "application/json"})
            response = conn.getresponse()
            return response.status, response.read()
        finally:
            conn.close()

    def counter(self, name: str) -> float:
        """The sum of every sample of metric ``name`` on /metrics (all labels, all workers)."""
        conn = http.client.HTTPConnection("127.0.0.1", self.metrics_port, timeout=10)
        try:
            conn.request("GET", "/metrics")
            response = conn.getresponse()
            text = response.read().decode()
        finally:
            conn.close()
        if response.status != 200:
            raise RuntimeError(f"{self.name} /metrics answered {response.status}")
        total = 0.0
        for line in text.splitlines():
            if line.startswith((name + "{", name + " ")):
                total += float(line.rsplit(" ", 1)[1])
        return total

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)


def _children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(p) for p in f.read().split()]
    except OSError:
        pass
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat", "rb") as f:
                    if int(f.read().rsplit(b")", 1)[1].split()[1]) == pid:
                        found.append(int(entry))
            except (OSError, IndexError, ValueError):
                pass
    return found


def start(name: str, cert_dir: Path, work: Path, *, namespaces_yaml: Path | None = None,
          opa_data: Path | None = None, kubeconfig: str | None = None,
          workers: int | None = None, threads: int | None = None,
          log_level: str | None = None, port: int | None = None,
          args: tuple[str, ...] = (), deadline_s: float = 90.0) -> Server:
    """Start one server and return once every worker answers (or raise with its log)."""
    port = port or free_port()
    # The metrics port: a free one for poolkeeper, none for the floor and OPA apps (they share
    # poolkeeper's gunicorn configuration, which binds it).
    metrics_port = free_port() if name == "poolkeeper" else 0
    env = {"POOLKEEPER_HOST": "127.0.0.1", "POOLKEEPER_PORT": str(port),
           "POOLKEEPER_CERT_DIR": str(cert_dir), "POOLKEEPER_METRICS_PORT": str(metrics_port)}
    if workers:
        env["POOLKEEPER_WORKERS"] = str(workers)
    if threads:
        env["POOLKEEPER_THREADS"] = str(threads)
    if log_level:
        env["POOLKEEPER_LOG_LEVEL"] = log_level
    if name == "poolkeeper":
        command = [sys.executable, "-m", "app", "serve"]  # == `poolkeeper serve`
        if namespaces_yaml is not None:
            command += ["--namespaces", str(namespaces_yaml)]
        if kubeconfig is not None:
            command += ["--kubeconfig", kubeconfig]
        command += list(args)
        ready_path = "/readyz"
    elif name in ("floor", "decode"):
        command = [sys.executable, "-m", "gunicorn", "-c", "python:bench.gunicorn_conf"]
        env["BENCH_WSGI_APP"] = ("bench.floor_app:create_app()" if name == "floor" else
                                 "bench.floor_app:create_decode_app()")
        ready_path = "/healthz"
    elif name == "opa":
        command = [sys.executable, "-m", "gunicorn", "-c", "python:bench.gunicorn_conf"]
        env["BENCH_WSGI_APP"] = "bench.opa_app:create_app()"
        env["BENCH_OPA_DATA"] = str(opa_data)
        ready_path = "/healthz"
    else:
        raise ValueError(f"unknown server {name!r}")
    log_path = work / f"{name}-{port}.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(command, cwd=ROOT, env=_clean_env(env), stdout=log,
                                   stderr=subprocess.STDOUT, start_new_session=True)
    server = Server(name, process, port, cert_dir, log_path, ready_path, metrics_port=metrics_port)
    try:
        _wait_ready(server, time.monotonic() + deadline_s)
    except BaseException:
        server.stop()
        raise
    return server


def _wait_ready(server: Server, deadline: float) -> None:
    """Every worker must have loaded its app: new connections are spread over workers by the
    kernel, so once ``workers`` distinct connections in a row succeed quickly, all serve."""
    expected = None
    while True:
        if server.process.poll() is not None:
            raise RuntimeError(f"{server.name} exited {server.process.returncode}:\n{server.log()}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{server.name} not ready on {server.ready_path}:\n{server.log()}")
        children = _children(server.process.pid)
        if expected is None and children:
            time.sleep(0.3)  # gunicorn forks all workers at once
            expected = len(_children(server.process.pid))
        if expected and len(children) >= expected and _all_answer(server, 2 * expected):
            server.workers = expected
            return
        time.sleep(0.1)


def _all_answer(server: Server, attempts: int) -> bool:
    for _ in range(attempts):
        try:
            conn = http.client.HTTPSConnection("127.0.0.1", server.port,
                                               context=server.tls_context(), timeout=2)
            conn.request("GET", server.ready_path)
            status = conn.getresponse().status
            conn.close()
        except (OSError, http.client.HTTPException):
            return False
        if status != 200:
            return False
    return True
