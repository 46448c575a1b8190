"""The operator console (``tally serve``): rollup health on web pages, actions, Prometheus metrics.

* :mod:`tally.web.app` — the Starlette application: pages, ``/api/``, ``/metrics``, actions;
* :mod:`tally.web.views` — what each page shows, read from the stored state;
* :mod:`tally.web.metrics` — ``/metrics`` in Prometheus' exposition format, at scrape time;
* :mod:`tally.web.actions` — retry, re-run, backfill and verify, sent as Celery tasks;
* :mod:`tally.web.guard` — credentials, form tokens, same-origin checks, security headers;
* :mod:`tally.web.charts` — server-rendered SVG charts.

Templates and static files ship in the package: no CDN, no script needed. See docs/CONSOLE.md.
Only ``tally serve`` imports this package, so ``import tally.cli`` stays fast.
"""
from __future__ import annotations

import errno
import socket

from ..errors import InvalidInput


def _bind(address: str, port: int) -> socket.socket:
    """The listening socket, bound before the server starts: a port in use is one line, exit 2."""
    try:
        family = socket.AF_INET6 if ":" in address else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((address, port))
    except OSError as exc:
        why = "address already in use" if exc.errno == errno.EADDRINUSE else (exc.strerror or str(exc))
        raise InvalidInput(f"cannot listen on {address}:{port}: {why}") from None
    except UnicodeError:
        raise InvalidInput(f"invalid --address {address!r}") from None
    sock.set_inheritable(True)
    return sock


def serve(url: str, address: str, port: int, auth: str | None, log_level: str = "info") -> int:
    """Serve the console on ``address:port`` until interrupted (uvicorn); returns an exit code."""
    import uvicorn

    from .app import create_app

    sock = _bind(address, port)
    app = create_app(url, auth)
    config = uvicorn.Config(app, log_level=log_level, access_log=False, server_header=False,
                            proxy_headers=False, lifespan="off")
    server = uvicorn.Server(config)
    try:
        server.run(sockets=[sock])
    finally:
        app.state.console.connections.close()
    return 0
