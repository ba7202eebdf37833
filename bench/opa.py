"""Owns the OPA side of the bench: the Rego policy in the real Go evaluator (opa_bindings).

PyPI ``opa-golib-python-bindings`` (the ``bench`` extra) embeds OPA's Go ``rego`` package as a
c-shared library. Its metadata says Python >= 3.14 but it works on 3.11, so it is installed with
``pip install --ignore-requires-python`` (the Makefile's ``bench`` target does that).

The Go runtime must start in the process that uses it: under gunicorn, create the engine in each
worker after the fork (``create_engine`` is called from the app factory, which gunicorn runs in
the worker when ``--preload`` is off; with ``--preload`` the workers hang).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

POLICY = Path(__file__).resolve().parent / "policy" / "k8s_node_selector.rego"
DOCUMENT = "system.main"
INSTALL_HINT = ("pip install --ignore-requires-python 'opa-golib-python-bindings==0.4.4' "
                "(make bench does it)")


def available() -> str | None:
    """None when the OPA bindings can be imported, else why not."""
    try:
        import opa_bindings  # noqa: F401
    except ImportError as exc:  # also an OSError from ctypes loading the .so
        return f"opa-golib-python-bindings not installed ({exc.__class__.__name__}: {exc}); " \
               f"{INSTALL_HINT}"
    except OSError as exc:
        return f"opa-golib-python-bindings cannot load its Go library: {exc}"
    return None


class OpaPolicy:
    """The sample's policy with ``namespaces`` (name -> Namespace object) as its data."""

    def __init__(self, namespaces: dict[str, dict]):
        from opa_bindings import OpaEngine

        self.pid = os.getpid()
        self.engine = OpaEngine()
        self.engine.add_policy(POLICY.name, POLICY.read_text())
        self.engine.add_data(namespaces, path="kubernetes.namespaces")
        self._path = DOCUMENT.encode()

    def evaluate(self, review: dict) -> Any:
        """Through the bindings' public API: the input dict is JSON-encoded by stdlib json."""
        return self.engine.eval_document(DOCUMENT, review)

    def evaluate_raw(self, body: bytes) -> Any:
        """The request body handed to Go as it arrived (Go decodes it once): OPA's best case,
        and what a webhook built on these bindings would do. Uses the bindings' internal call
        (pinned 0.4.4) to skip a Python decode + stdlib re-encode of the 11 KB review."""
        engine = self.engine
        with engine._eval_lock:
            envelope = engine._call(engine._lib.OpaEvalDocument, self._path, body, 0, 0)
        result = envelope.get("result")
        if not result or not result[0].get("expressions"):
            raise LookupError(f"data.{DOCUMENT} is undefined")
        return result[0]["expressions"][0]["value"]


def load_namespaces(path: str) -> dict[str, dict]:
    with open(path, encoding="utf-8") as f:
        return json.load(f)
