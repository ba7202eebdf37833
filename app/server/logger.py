"""Owns gunicorn's error log: the same JSON lines as poolkeeper's own loggers."""

from __future__ import annotations

from typing import Any

from gunicorn.glogging import Logger as GunicornLogger

from ..logs import JSONFormatter


class JSONGunicornLogger(GunicornLogger):
    """gunicorn's error log in poolkeeper's JSON shape.

    Set as ``logger_class`` rather than through ``logconfig_dict``: any logconfig makes gunicorn
    build the access-log atoms of every request (a dict over the whole WSGI environ) even with
    no access log, which cost a third of the server stack's CPU per request here.
    """

    def setup(self, cfg: Any) -> None:
        super().setup(cfg)
        for handler in self.error_log.handlers:
            handler.setFormatter(JSONFormatter())
