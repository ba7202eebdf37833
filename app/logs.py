"""Owns log output: one JSON object per line on stderr, for poolkeeper's and gunicorn's loggers."""

from __future__ import annotations

import logging
import sys
from datetime import datetime, timezone

import orjson
from gunicorn.glogging import Logger as GunicornLogger


class JSONFormatter(logging.Formatter):
    """{"time", "level", "logger", "pid", then the record's ``fields`` or its "message"}.

    Structured lines pass a dict: ``log.info("review", extra={"fields": {...}})``.
    """

    def format(self, record: logging.LogRecord) -> str:
        entry = {"time": datetime.fromtimestamp(record.created, timezone.utc).isoformat(
                     timespec="milliseconds"),
                 "level": record.levelname.lower(), "logger": record.name, "pid": record.process}
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            entry.update(fields)
        else:
            entry["message"] = record.getMessage()
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


class JSONGunicornLogger(GunicornLogger):
    """gunicorn's error log in poolkeeper's JSON shape.

    Set as ``logger_class`` rather than through ``logconfig_dict``: any logconfig makes gunicorn
    build the access-log atoms of every request (a dict over the whole WSGI environ) even with
    no access log, which cost a third of the server stack's CPU per request here.
    """

    def setup(self, cfg) -> None:
        super().setup(cfg)
        for handler in self.error_log.handlers:
            handler.setFormatter(JSONFormatter())
