"""The JSON log line: its shape, its timestamp, and the admission line written without extras."""

from __future__ import annotations

import io
import json
import logging
from datetime import UTC, datetime

import pytest
from hypothesis import given
from hypothesis import strategies as st

from app import webhook
from app.logs import JSONFormatter, JSONLineHandler


def reference_time(created: float) -> str:
    return datetime.fromtimestamp(created, UTC).isoformat(timespec="milliseconds")


@given(st.floats(min_value=-1e9, max_value=4e9, allow_nan=False))
def test_logs_time_is_datetime_isoformat_to_the_millisecond(created):
    assert JSONFormatter().iso_time(created) == reference_time(created)


@pytest.mark.parametrize("created", [1764064467.0, 1764064467.9994994, 1764064467.9995,
                                     1764064467.9999995, 1764064467.9999994, 1764064467.0005,
                                     0.0, -0.0000001, -1.5])
def test_logs_time_rounds_as_datetime_does_at_the_edges(created):
    formatter = JSONFormatter()
    assert formatter.iso_time(created - 1) == reference_time(created - 1)  # another second cached
    assert formatter.iso_time(created) == reference_time(created)
    assert formatter.iso_time(created) == reference_time(created)  # from the cache


def json_handler() -> tuple[io.StringIO, JSONLineHandler]:
    """poolkeeper's handler and formatter, writing to a string."""
    stream = io.StringIO()
    handler = JSONLineHandler(stream)
    handler.setFormatter(JSONFormatter())
    return stream, handler


@pytest.fixture
def admission_lines():
    stream, handler = json_handler()
    logger = logging.getLogger("poolkeeper.admission")
    logger.addHandler(handler)
    previous = logger.level
    logger.setLevel(logging.INFO)
    yield lambda: [json.loads(line) for line in stream.getvalue().splitlines()]
    logger.removeHandler(handler)
    logger.setLevel(previous)


def test_logs_admission_line_has_the_fields_in_order(admission_lines):
    webhook._observe(None, "error", 0.0012345, {"status": 400, "error": "the body is not valid JSON"})
    (line,) = admission_lines()
    assert list(line) == ["time", "level", "logger", "pid", "uid", "kind", "operation",
                          "decision", "status", "error", "ms"]
    assert line["time"] == reference_time(datetime.fromisoformat(line["time"]).timestamp())
    assert (line["level"], line["logger"], line["uid"], line["kind"], line["ms"]) == (
        "warning", "poolkeeper.admission", "", "unknown", 1.234)


def test_logs_admission_line_names_its_caller(admission_lines, caplog):
    with caplog.at_level(logging.INFO, logger="poolkeeper.admission"):
        webhook._observe(None, "error", 0.001, {"status": 500, "error": "bug"})
    (record,) = caplog.records
    assert (record.funcName, record.filename, record.getMessage()) == (
        "_observe", "webhook.py", "review")
    assert record.fields["error"] == "bug"


def test_logs_warning_level_suppresses_the_admission_line(admission_lines):
    logging.getLogger("poolkeeper.admission").setLevel(logging.WARNING)
    webhook._observe(None, "allowed", 0.001, {})
    assert admission_lines() == []
    webhook._observe(None, "error", 0.001, {"status": 400, "error": "x"})
    assert [line["decision"] for line in admission_lines()] == ["error"]


def test_logs_handler_writes_plain_messages_and_exceptions():
    stream, handler = json_handler()
    logger = logging.Logger("poolkeeper.test")
    logger.addHandler(handler)
    try:
        raise ValueError("boom")
    except ValueError:
        logger.exception("failed %s", "here")
    (line,) = [json.loads(text) for text in stream.getvalue().splitlines()]
    assert line["message"] == "failed here" and "ValueError: boom" in line["exception"]
