"""Starts ``poolkeeper serve`` (real gunicorn, real TLS) on a free loopback port for tests."""

from __future__ import annotations

import os
import signal
import socket
import ssl
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import requests

from .support import ROOT


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Server:
    process: subprocess.Popen
    port: int
    cert_dir: Path
    log_path: Path
    metrics_port: int = 0

    @property
    def metrics_url(self) -> str:
        """GET /metrics, plain HTTP on its own port."""
        return f"http://127.0.0.1:{self.metrics_port}/metrics"

    @property
    def url(self) -> str:
        return f"https://localhost:{self.port}"

    @property
    def ca(self) -> str:
        return str(self.cert_dir / "ca.crt")

    def session(self) -> requests.Session:
        s = requests.Session()
        s.trust_env = False  # REQUESTS_CA_BUNDLE would override verify
        s.verify = self.ca
        return s

    def tls_context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=self.ca)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def worker_pids(self) -> set[int]:
        out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(self.process.pid)],
                             capture_output=True, text=True).stdout
        return {int(p) for p in out.split()}

    def wait_for_workers(self, count: int, deadline_s: float = 30.0) -> set[int]:
        """The worker pids once ``count`` workers run (the first ready one answers earlier)."""
        deadline = time.monotonic() + deadline_s
        while len(pids := self.worker_pids()) != count:
            if time.monotonic() > deadline:
                raise RuntimeError(f"expected {count} workers, have {pids}:\n{self.log()}")
            time.sleep(0.1)
        return pids

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)


def start_server(cert_dir: Path, log_path: Path, *args: str, env: dict | None = None,
                 workers: int = 2, threads: int = 2, wait_ready: bool = True,
                 deadline_s: float = 60.0) -> Server:
    port = free_port()
    while (metrics_port := free_port()) == port:
        pass
    environment = {k: v for k, v in os.environ.items() if not k.startswith("POOLKEEPER_")}
    environment.update(env or {})
    command = [sys.executable, "-m", "app", "serve", "--host", "127.0.0.1", "--port", str(port),
               "--cert-dir", str(cert_dir), "--workers", str(workers), "--threads",
               str(threads), "--metrics-port", str(metrics_port), *args]
    log = open(log_path, "wb")
    process = subprocess.Popen(command, cwd=ROOT, env=environment, stdout=log,
                               stderr=subprocess.STDOUT)
    log.close()
    server = Server(process, port, cert_dir, log_path, metrics_port)
    deadline = time.monotonic() + deadline_s
    path = "/readyz" if wait_ready else "/healthz"
    with server.session() as session:
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"poolkeeper serve exited {process.returncode}:\n{server.log()}")
            try:
                if session.get(server.url + path, timeout=2).status_code == 200:
                    return server
            except (requests.ConnectionError, requests.Timeout, OSError):
                # not listening yet, (a loaded machine) slow to answer while booting, or (with
                # --manage-certs) no ca.crt to verify it with yet
                pass
            if time.monotonic() > deadline:
                server.stop()
                raise RuntimeError(f"poolkeeper serve not ready on {path}:\n{server.log()}")
            time.sleep(0.1)


def connections_per_worker(server: Server) -> dict[int, int]:
    """Established TCP connections to the server's port that each worker process holds."""
    inodes: set[str] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as f:
                rows = f.read().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            fields = row.split()
            if fields[3] == "01" and int(fields[1].rsplit(":", 1)[1], 16) == server.port:
                inodes.add(fields[9])
    found = {}
    for pid in server.worker_pids():
        held = 0
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if target.startswith("socket:[") and target[8:-1] in inodes:
                held += 1
        found[pid] = held
    return found
