"""Owns gunicorn: its configuration (``conf``), the worker class (``worker``), the reloading TLS
context (``tls``) and gunicorn's JSON error log (``logger``). Nothing outside this package
imports gunicorn."""


def run() -> None:
    """Run gunicorn with :mod:`app.server.conf` (settings from the ``POOLKEEPER_*`` environment)
    until it is stopped."""
    import sys

    from gunicorn.app.wsgiapp import WSGIApplication

    sys.argv = ["poolkeeper serve", "-c", "python:app.server.conf"]
    WSGIApplication("%(prog)s [OPTIONS]").run()
