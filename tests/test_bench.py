"""Smoke test of `make bench`: the quickest mode prints every table row with numbers in it.

No timing is asserted, ever: the figures of a few dozen requests mean nothing; the test only
proves the bench runs end to end (servers, load generator, OPA, scale, API server) and reports.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys

import pytest

from .support import ROOT, skip_or_fail

NUMBER = re.compile(r"^-?[\d,]+(\.\d+)?$")


def run_bench(*args: str) -> str:
    result = subprocess.run([sys.executable, "-m", "bench", "--smoke", *args], cwd=ROOT,
                            capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, f"bench failed:\n{result.stdout}\n{result.stderr}"
    return result.stdout


def tables(text: str) -> dict[str, list[list[str]]]:
    """Section title (### ...) -> rows of its tables, header and separator rows left out."""
    sections: dict[str, list[list[str]]] = {}
    title = ""
    for line in text.splitlines():
        if line.startswith("### "):
            title = line[4:]
            sections[title] = []
        elif line.startswith("|") and title:
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if set("".join(cells)) <= set("-:") or cells[0] in ("server", "what", "admission",
                                                               "namespaces", "target",
                                                               "ratio (same run)"):
                continue
            sections[title].append(cells)
    return sections


def section(text: str, prefix: str) -> list[list[str]]:
    found = [rows for title, rows in tables(text).items() if title.startswith(prefix)]
    assert found, f"no section {prefix!r} in:\n{text}"
    return found[0]


def assert_numeric(row: list[str], cells: slice = slice(1, None)) -> None:
    for cell in row[cells]:
        assert NUMBER.match(cell), f"not a number: {cell!r} in {row}"


def opa_missing() -> str | None:
    from bench.opa import available

    return available()


@pytest.fixture(scope="module")
def smoke_output() -> str:
    # The Python client keeps it to a fraction of a second per row; wrk runs >= 1 s per row.
    return run_bench("--loadgen", "python", "--duration", "0.3")


def test_bench_prints_served_rows_for_floor_and_poolkeeper(smoke_output):
    rows = section(smoke_output, "Served over TLS")
    for variant in ("floor", "decode", "poolkeeper"):
        for c in ("1", "8", "32"):
            row = next((r for r in rows if r[:2] == [variant, c]), None)
            assert row is not None, f"no row {variant} c={c}"
            assert_numeric(row)
    for floor in ("floor", "decode"):
        ratios = [r for r in rows if r[0].startswith(f"poolkeeper/{floor} ")]
        assert len(ratios) == 3
        for row in ratios:
            assert_numeric(row)


def test_bench_prints_opa_rows(smoke_output):
    missing = opa_missing()
    if missing:
        pytest.skip(f"OPA part not run: {missing}")
    served = section(smoke_output, "Served over TLS")
    for c in ("1", "8", "32"):
        row = next((r for r in served if r[:2] == ["opa", c]), None)
        assert row is not None, f"no row opa c={c}"
        assert_numeric(row)
    for row in (r for r in served if r[0].startswith("poolkeeper/opa")):
        assert_numeric(row)
    micro = section(smoke_output, "Pure decision")
    assert len([r for r in micro if r[0].startswith("OPA")]) == 2
    for row in micro:
        assert_numeric(row)


def test_bench_prints_pure_decision_rows(smoke_output):
    rows = section(smoke_output, "Pure decision")
    labels = [r[0] for r in rows]
    assert any("all" in label and "admit()" in label for label in labels)
    assert any("pool rule alone" in label for label in labels)
    for row in rows:
        if not row[0].startswith("OPA") and "/ OPA" not in row[0]:
            assert_numeric(row)


def test_bench_prints_scale_rows(smoke_output):
    rows = section(smoke_output, "Scale")
    assert [r[0] for r in rows] == ["10", "1,000", "10,000", "100,000"]
    for row in rows:
        assert_numeric(row)


def test_bench_prints_api_server_rows(smoke_output):
    from bench.apiserver import unavailable

    missing = unavailable()
    if missing:  # ../shared/tools/miniapiserver: CI (POOLKEEPER_REQUIRE_SHARED=1) needs it
        skip_or_fail(f"API server part not run: {missing}")
    rows = section(smoke_output, "Through a real API server")
    assert [r[0][:3] for r in rows] == ["(a)", "(b)", "(c)", "(d)"] * 2
    for row in rows:
        cells = [c for c in row[1:] if c != "-"]
        assert_numeric(["", *cells])
        calls = row[-2]  # webhook calls per pod: poolkeeper's request counter, (b) only
        assert (calls != "-") == row[0].startswith("(b)"), row


def test_bench_prints_every_target(smoke_output):
    rows = section(smoke_output, "Targets")
    assert [r[3] for r in rows] == ["13"] * 5 + ["5"] * 2
    assert rows[0][0].startswith("webhook calls per pod")
    for row in rows:
        assert row[2] in ("yes", "NO", "n/a"), row


@pytest.mark.skipif(shutil.which("wrk") is None,
                    reason="wrk not installed (make bench installs Debian's wrk)")
def test_bench_wrk_load_prints_served_rows():
    output = run_bench("--parts", "http", "--max-requests", "20")
    rows = section(output, "Served over TLS")
    assert len([r for r in rows if r[1] in ("1", "8", "32")]) >= 6
    for row in rows:
        if not row[0].startswith("poolkeeper/"):
            assert_numeric(row)
