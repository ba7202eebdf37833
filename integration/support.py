"""Helpers of integration/ tests: the installed namespace and bounded waits."""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest

NAMESPACE = "poolkeeper-system"
DEADLINE = 180.0  # seconds: scheduling and rollouts in a fresh kind cluster


def wait_for(probe: Callable[[], object], what: str, timeout: float = DEADLINE):
    deadline = time.monotonic() + timeout
    while True:
        result = probe()
        if result:
            return result
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(0.5)
