"""Owns the WSGI application gunicorn's workers load: the app factory's, told how this server
closes a connection after a refused body."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..factory import create_app
from .worker import discard_or_close

if TYPE_CHECKING:
    from flask import Flask


def application() -> Flask:
    """``wsgi_app = "app.server.wsgi:application()"``: settings from the environment."""
    return create_app(on_too_large=discard_or_close)
