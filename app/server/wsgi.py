"""Owns the WSGI application gunicorn's workers load: the app factory's."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..factory import create_app

if TYPE_CHECKING:
    from flask import Flask


def application() -> Flask:
    """``wsgi_app = "app.server.wsgi:application()"``: settings from the environment."""
    return create_app()
