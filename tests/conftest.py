"""Shared fixtures."""

from __future__ import annotations

import json

import pytest

from .support import TESTDATA


@pytest.fixture
def deployment_pod_review() -> dict:
    return json.loads((TESTDATA / "reviews/pod-create-deployment.json").read_text())
