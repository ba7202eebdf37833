"""Shared fixtures."""

from __future__ import annotations

import json

import pytest

from app.certs import create_certificates

from .support import TESTDATA

# Lines recorded through the ``figures`` fixture, repeated at the end of the run.
FIGURES: list[str] = []


@pytest.fixture(scope="module")
def cert_dir(tmp_path_factory):
    """A CA and serving pair for poolkeeper-system/poolkeeper, one per test module."""
    directory = tmp_path_factory.mktemp("certs")
    create_certificates(directory, "poolkeeper", "poolkeeper-system")
    return directory


@pytest.fixture
def deployment_pod_review() -> dict:
    return json.loads((TESTDATA / "reviews/pod-create-deployment.json").read_text())


def pytest_addoption(parser):
    parser.addoption("--long", action="store_true", default=False,
                     help="reliability tests run their long variants (more generated cases)")


@pytest.fixture(scope="session")
def long_run(request) -> bool:
    """Whether pytest runs with --long (docs/reliability.md)."""
    return request.config.getoption("--long")


@pytest.fixture
def figures():
    """``figures(line)`` prints a test's figures (seen with ``pytest -s``) and repeats them in
    the "figures" section of the run's summary, so they are visible in any run."""
    def record(line: str) -> None:
        print(line)
        FIGURES.append(line)
    return record


def pytest_terminal_summary(terminalreporter) -> None:
    if FIGURES:
        terminalreporter.section("figures")
        for line in FIGURES:
            terminalreporter.write_line(line)
