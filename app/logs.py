"""Owns log output: one JSON object per line on stderr, for poolkeeper's and gunicorn's loggers."""

from __future__ import annotations

import logging
import math
import sys
from datetime import datetime, timezone

import orjson
from gunicorn.glogging import Logger as GunicornLogger


class JSONFormatter(logging.Formatter):
    """{"time", "level", "logger", "pid", then the record's ``fields`` or its "message"}.

    Structured lines pass a dict: ``log.info("review", extra={"fields": {...}})``.
    """

    # (whole second, its ISO 8601 text up to the seconds): one admission line per request
    # would otherwise build a datetime and format it every time. One tuple, swapped whole, so
    # threads never see a half-updated pair.
    _second: tuple[int, str] = (-1, "")

    def format(self, record: logging.LogRecord) -> str:
        entry = {"time": self.iso_time(record.created), "level": record.levelname.lower(),
                 "logger": record.name, "pid": record.process}
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            entry.update(fields)
        else:
            entry["message"] = record.getMessage()
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return orjson.dumps(entry).decode()

    def iso_time(self, created: float) -> str:
        """Exactly ``datetime.fromtimestamp(created, timezone.utc).isoformat(timespec=
        "milliseconds")``, e.g. 2026-11-25T09:14:27.123+00:00, with the date part cached."""
        # fromtimestamp rounds the fraction to microseconds, half to even (which round() does),
        # carrying into the next second; isoformat then truncates to milliseconds.
        fraction, whole = math.modf(created)
        second, micros = int(whole), round(fraction * 1e6)
        if micros >= 1_000_000:
            second, micros = second + 1, micros - 1_000_000
        if micros < 0 or second < 0:  # before 1970: not worth a cache
            return datetime.fromtimestamp(created, timezone.utc).isoformat(
                timespec="milliseconds")
        cached_second, text = self._second
        if cached_second != second:
            text = datetime.fromtimestamp(second, timezone.utc).isoformat()[:-6]
            self._second = (second, text)
        return f"{text}.{micros // 1000:03d}+00:00"


class JSONLineHandler(logging.StreamHandler):
    """A StreamHandler that writes each formatted record with one write and one flush.

    ``StreamHandler.emit`` flushes through ``self.flush()``, which takes the handler's lock a
    second time and looks the stream's ``flush`` up again, for every line.
    """

    def emit(self, record: logging.LogRecord) -> None:
        try:
            stream = self.stream
            stream.write(self.format(record) + self.terminator)
            stream.flush()
        except RecursionError:  # as logging's own handlers do
            raise
        except Exception:
            self.handleError(record)


def configure_logging(level: str) -> None:
    """JSON lines on stderr at ``level`` for poolkeeper and the libraries under it."""
    handler = JSONLineHandler(sys.stderr)
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
