"""Owns log output: one JSON object per line on stderr (gunicorn's own lines use the same
formatter, through :mod:`app.server.logger`)."""

from __future__ import annotations

import logging
import math
import sys
from datetime import UTC, datetime

import orjson


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
            return datetime.fromtimestamp(created, UTC).isoformat(
                timespec="milliseconds")
        cached_second, text = self._second
        if cached_second != second:
            text = datetime.fromtimestamp(second, UTC).isoformat()[:-6]
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
    # The lines carry the pid, never the thread or the multiprocessing process name: a record
    # need not look them up (logging's documented switches; one record per review).
    logging.logThreads = False
    logging.logMultiprocessing = False
    handler = JSONLineHandler(sys.stderr)
    handler.setFormatter(JSONFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.WARNING)
    logging.getLogger("poolkeeper").setLevel(level.upper())
