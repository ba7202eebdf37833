"""The test helpers' own behaviour: a missing shared tool skips, or fails in CI."""

from __future__ import annotations

import pytest

from .support import REQUIRE_SHARED, skip_or_fail


def test_skip_or_fail_skips_with_the_reason_on_a_user_machine(monkeypatch):
    monkeypatch.delenv(REQUIRE_SHARED, raising=False)
    with pytest.raises(pytest.skip.Exception, match="kubectl not found"):
        skip_or_fail("kubectl not found")


def test_skip_or_fail_fails_with_the_reason_when_shared_tools_are_required(monkeypatch):
    monkeypatch.setenv(REQUIRE_SHARED, "1")
    with pytest.raises(pytest.fail.Exception,
                       match="kubectl not found.*POOLKEEPER_REQUIRE_SHARED=1"):
        skip_or_fail("kubectl not found")


def test_ci_runs_the_suite_with_shared_tools_required():
    from .support import ROOT

    assert f"{REQUIRE_SHARED}=1 make test" in (ROOT / ".ci/run").read_text()
