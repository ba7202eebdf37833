"""Runs miniapiserver (a real Kubernetes API server on real etcd, not kube-apiserver) for tests.

Use :func:`apiserver_fixture` to make a session-scoped fixture in a test module::

    from .apiserver import apiserver_fixture
    apiserver = apiserver_fixture()

The tool is found beside the checkout (``../shared/tools/miniapiserver``) or at
``$MINIAPISERVER_TOOL``; without ``bin/miniapiserver`` the tests that use the fixture are skipped
(they fail instead with ``POOLKEEPER_REQUIRE_SHARED=1``, as in CI: see support.skip_or_fail).
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import ssl
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from .support import skip_or_fail

TOOL = Path(os.environ.get("MINIAPISERVER_TOOL")
            or Path(__file__).parents[1].parent / "shared/tools/miniapiserver")

READY_TIMEOUT = 60.0  # seconds; start to ready takes about 1 s here


class MiniApiServer:
    """One etcd + miniapiserver started by the tool's start.sh; the API server can be killed and
    restarted on the same port against the same etcd, as after a crash."""

    def __init__(self, tool: Path, directory: Path, env: dict[str, str]) -> None:
        self.tool = tool
        self.dir = directory
        self.env = env
        self._children: list[subprocess.Popen] = []  # API servers started here (to reap)

    @classmethod
    def start(cls, tool: Path, directory: Path) -> MiniApiServer:
        result = subprocess.run([str(tool / "start.sh")],
                                env={**os.environ, "MINIAPI_DIR": str(directory)},
                                capture_output=True, text=True, timeout=READY_TIMEOUT + 30)
        if result.returncode != 0:
            subprocess.run([str(tool / "stop.sh"), str(directory)], capture_output=True, timeout=60)
            raise RuntimeError(f"miniapiserver start.sh failed ({result.returncode}):\n"
                               f"{result.stderr}")
        env = dict(line.split("=", 1) for line in result.stdout.splitlines() if "=" in line)
        return cls(tool, directory, env)

    @property
    def kubeconfig(self) -> str:
        return self.env["KUBECONFIG"]

    @property
    def url(self) -> str:
        return self.env["APISERVER_URL"]

    @property
    def port(self) -> int:
        return int(self.url.rsplit(":", 1)[1])

    @property
    def pid(self) -> int:
        return int(self.env["APISERVER_PID"])

    @property
    def ca_file(self) -> Path:
        return self.dir / "certs/apiserver.crt"

    def map_webhook_service(self, service: str, address: str) -> None:
        """Route webhook calls for ``service`` ("NS/NAME" or "NS/NAME:PORT") to ``address``
        ("127.0.0.1:PORT"), replacing an earlier mapping of it; the file is re-read per call."""
        path = Path(self.env["WEBHOOK_SERVICE_FILE"])
        lines = [line for line in path.read_text().splitlines()
                 if line.strip() and line.split("=", 1)[0].strip() != service]
        staged = path.with_name(path.name + ".new")
        staged.write_text("".join(f"{line}\n" for line in [*lines, f"{service}={address}"]))
        os.replace(staged, path)  # the API server never reads a half-written file

    def is_up(self) -> bool:
        return _ready(self.url, self.ca_file)

    def kill(self) -> None:
        """SIGKILL the API server (etcd keeps running); wait until its port refuses connections."""
        if _is_miniapiserver(self.pid):  # never signal a recycled pid
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)
        for child in self._children:
            if child.pid == self.pid:
                child.wait(timeout=30)
        _wait_closed(self.port)

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """SIGSTOP the API server for the block: a hung server, whose kernel still accepts
        connections while nothing answers or closes them. SIGCONT follows whatever happens."""
        if not _is_miniapiserver(self.pid):
            raise RuntimeError(f"pid {self.pid} is not a running miniapiserver")
        os.kill(self.pid, signal.SIGSTOP)
        try:
            yield
        finally:
            self.resume()

    def resume(self) -> None:
        """SIGCONT the API server (harmless if it runs)."""
        if _is_miniapiserver(self.pid):  # never signal a recycled pid
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGCONT)

    def restart(self) -> None:
        """Start the API server again: same port, etcd, certificates and webhook-service file."""
        self._spawn(self.port, bootstrap=True)

    def ensure_running(self) -> None:
        if not self.is_up():
            self.kill()
            self.restart()

    @contextlib.contextmanager
    def second_server(self) -> Iterator[str]:
        """Another API server on the same etcd (an HA control plane); yields its kubeconfig."""
        port = _free_port()
        child = self._spawn(port, bootstrap=False, record=False)
        kubeconfig = self.dir / f"kubeconfig-{port}"
        text = Path(self.kubeconfig).read_text()
        kubeconfig.write_text(text.replace(f":{self.port}\n", f":{port}\n"))
        try:
            yield str(kubeconfig)
        finally:
            child.kill()
            child.wait(timeout=30)
            _wait_closed(port)

    def stop(self) -> None:
        # API servers started here are reaped here (stop.sh would take a zombie for a live process);
        # stop.sh then stops etcd and an API server still running from start.sh. A stopped
        # (SIGSTOP) server would hold its SIGTERM until stop.sh's SIGKILL 10 s later: resume it.
        self.resume()
        for child in self._children:
            if child.poll() is None:
                child.kill()
            child.wait(timeout=30)
        subprocess.run([str(self.tool / "stop.sh"), str(self.dir)], capture_output=True,
                       timeout=120)

    def _spawn(self, port: int, *, bootstrap: bool, record: bool = True) -> subprocess.Popen:
        args = [str(self.tool / "bin/miniapiserver"), "--etcd", self.env["ETCD_URL"],
                "--port", str(port), "--cert-dir", str(self.dir / "certs"),
                "--webhook-service-file", self.env["WEBHOOK_SERVICE_FILE"]]
        if not bootstrap:
            args.append("--no-bootstrap-namespaces")
        url = f"https://127.0.0.1:{port}"
        with open(self.dir / "apiserver.log", "ab") as log:
            child = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=log,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        self._children.append(child)
        if record:
            self.env["APISERVER_PID"] = str(child.pid)
            (self.dir / "apiserver.pid").write_text(f"{child.pid}\n")  # so stop.sh stops this one
        deadline = time.monotonic() + READY_TIMEOUT
        while not _ready(url, self.ca_file):
            if child.poll() is not None or time.monotonic() > deadline:
                child.kill()
                child.wait(timeout=30)
                raise RuntimeError(f"miniapiserver did not become ready on port {port}; "
                                   f"see {self.dir / 'apiserver.log'}")
            time.sleep(0.1)
        return child


def apiserver_fixture(name: str = "apiserver", scope: str = "session"):
    """A fixture (session-scoped unless ``scope`` says otherwise) yielding a running
    :class:`MiniApiServer`; skips without it (fails under POOLKEEPER_REQUIRE_SHARED=1). A module
    that registers webhooks takes its own, module-scoped server, so its admission set-up touches
    no other test."""

    @pytest.fixture(scope=scope, name=name)
    def fixture(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MiniApiServer]:
        if not (TOOL / "bin/miniapiserver").exists():
            skip_or_fail(f"this test needs a real Kubernetes API server and found none at {TOOL}: "
                         "the project's CI provides one beside the checkout; to run these tests "
                         "yourself, set MINIAPISERVER_TOOL to a folder holding bin/miniapiserver "
                         "and start.sh/stop.sh (see CONTRIBUTING.md); everything else runs "
                         "without it")
        server = MiniApiServer.start(TOOL, tmp_path_factory.mktemp("miniapiserver"))
        try:
            yield server
        finally:
            server.stop()

    return fixture


def _ready(url: str, ca_file: Path) -> bool:
    context = ssl.create_default_context(cafile=str(ca_file))
    try:
        with urllib.request.urlopen(f"{url}/readyz", context=context, timeout=2) as response:
            return response.status == 200
    except urllib.error.HTTPError as e:
        e.close()
        return False
    except (urllib.error.URLError, OSError):
        return False


def _wait_closed(port: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            s.settimeout(1)
            if s.connect_ex(("127.0.0.1", port)) != 0:
                return
        time.sleep(0.05)
    raise RuntimeError(f"port {port} still accepts connections {timeout:.0f}s after the kill")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _is_miniapiserver(pid: int) -> bool:
    try:
        return b"miniapiserver" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
