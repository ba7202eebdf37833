"""Owns the scale run's list server: namespaces as the API server lists and watches them, from memory.

Plain HTTP on 127.0.0.1. ``/n<COUNT>/api/v1/namespaces`` lists COUNT namespaces in pages
(``limit``/``continue``), each item shaped like kube-apiserver's (uid, resourceVersion,
creationTimestamp, labels, a managedFields entry, spec.finalizers, status.phase); ``watch=true``
sends a BOOKMARK and holds the stream open until ``timeoutSeconds`` or shutdown. Creating
100,000 namespaces in a real API server would take minutes; listing them is what the cache does.
"""

from __future__ import annotations

import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

import orjson

from bench.inputs import namespace_labels, namespace_names

RESOURCE_VERSION = "100000"
_PATH = re.compile(r"^/n(\d+)/api/v1/namespaces/?$")


def namespace_item(name: str, index: int) -> dict:
    return {
        "metadata": {
            "name": name, "uid": f"00000000-0000-4000-8000-{index:012d}",
            "resourceVersion": str(1000 + index), "creationTimestamp": "2025-01-01T00:00:00Z",
            "labels": namespace_labels(name, index),
            "managedFields": [{"manager": "kubectl-create", "operation": "Update",
                               "apiVersion": "v1", "time": "2025-01-01T00:00:00Z",
                               "fieldsType": "FieldsV1",
                               "fieldsV1": {"f:metadata": {"f:labels": {
                                   ".": {}, "f:agentpool": {},
                                   "f:kubernetes.io/metadata.name": {}}}}}],
        },
        "spec": {"finalizers": ["kubernetes"]},
        "status": {"phase": "Active"},
    }


class FakeAPI:
    def __init__(self) -> None:
        self._names: dict[int, list[str]] = {}
        self._stopping = threading.Event()
        api = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:
                pass

            def do_GET(self) -> None:
                api._handle(self)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True,
                                       name="bench-fakeapi")

    @property
    def port(self) -> int:
        return self.server.server_address[1]

    def start(self) -> FakeAPI:
        self.thread.start()
        return self

    def stop(self) -> None:
        self._stopping.set()
        self.server.shutdown()
        self.server.server_close()

    def kubeconfig(self, count: int) -> str:
        server = f"http://127.0.0.1:{self.port}/n{count}"
        return ("apiVersion: v1\nkind: Config\n"
                f"clusters:\n- name: fake\n  cluster: {{server: '{server}'}}\n"
                "contexts:\n- name: fake\n  context: {cluster: fake, user: anonymous}\n"
                "current-context: fake\nusers:\n- name: anonymous\n  user: {token: bench}\n")

    def _names_for(self, count: int) -> list[str]:
        if count not in self._names:
            self._names[count] = namespace_names(count)
        return self._names[count]

    def _handle(self, h: BaseHTTPRequestHandler) -> None:
        url = urlsplit(h.path)
        match = _PATH.match(url.path)
        if not match:
            self._send(h, 404, {"kind": "Status", "code": 404, "message": f"{url.path} not found"})
            return
        query = {k: v[-1] for k, v in parse_qs(url.query).items()}
        names = self._names_for(int(match.group(1)))
        if query.get("watch") in ("true", "1"):
            self._watch(h, float(query.get("timeoutSeconds", "60")))
            return
        limit = int(query.get("limit") or 0) or len(names)
        start = int(query.get("continue") or 0)
        end = min(len(names), start + limit)
        metadata = {"resourceVersion": RESOURCE_VERSION}
        if end < len(names):
            metadata["continue"] = str(end)
        items = [namespace_item(names[i], i) for i in range(start, end)]
        self._send(h, 200, {"kind": "NamespaceList", "apiVersion": "v1", "metadata": metadata,
                            "items": items})

    @staticmethod
    def _send(h: BaseHTTPRequestHandler, status: int, doc: dict) -> None:
        body = orjson.dumps(doc)
        h.send_response(status)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        h.wfile.write(body)

    def _watch(self, h: BaseHTTPRequestHandler, timeout: float) -> None:
        h.send_response(200)
        h.send_header("Content-Type", "application/json")
        h.send_header("Transfer-Encoding", "chunked")
        h.end_headers()
        bookmark = orjson.dumps({"type": "BOOKMARK", "object": {
            "kind": "Namespace", "apiVersion": "v1",
            "metadata": {"resourceVersion": RESOURCE_VERSION}}}) + b"\n"
        try:
            h.wfile.write(b"%x\r\n%s\r\n" % (len(bookmark), bookmark))
            h.wfile.flush()
            deadline = time.monotonic() + min(timeout, 600)
            while not self._stopping.is_set() and time.monotonic() < deadline:
                self._stopping.wait(0.5)
            h.wfile.write(b"0\r\n\r\n")
        except OSError:
            pass
        h.close_connection = True
