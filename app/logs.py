"""Owns log output: one JSON object per line on stderr, for every poolkeeper logger."""

from __future__ import annotations

import logging
import sys
from datetime import datetime, timezone

import orjson


class JSONFormatter(logging.Formatter):
    """{"time", "level", "logger", "pid", "message", ...}; a message that is JSON is merged."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {"time": datetime.fromtimestamp(record.created, timezone.utc).isoformat(
                     timespec="milliseconds"),
                 "level": record.levelname.lower(), "logger": record.name, "pid": record.process}
        message = record.getMessage()
        if message.startswith("{") and message.endswith("}"):
            try:
                entry.update(orjson.loads(message))
            except orjson.JSONDecodeError:
                entry["message"] = message
        else:
            entry["message"] = message
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return orjson.dumps(entry).decode()


def configure_logging(level: str) -> None:
    """JSON lines on stderr at ``level`` for poolkeeper and the libraries under it."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JSONFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.WARNING)
    logging.getLogger("poolkeeper").setLevel(level.upper())
